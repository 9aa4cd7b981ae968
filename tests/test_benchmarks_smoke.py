"""Smoke tests of the benchmarks: the model benchmark's `small` preset runs and reports every
figure; the suite's end-to-end part (`benchmarks.run --parts endtoend`) reaches the headline and
the report (its timed calls faked, so it takes seconds), and, under `-m slow`, each of its
naive paths computes the library's shifts on the tiny model.

No timing thresholds: the machine is shared, so only the shape of the results is checked.
"""

from __future__ import annotations

import collections
import json
import math

import pytest

from benchmarks import common, latency, model
from benchmarks import run as suite
from keedit_jax import testing, upstream
from keedit_jax.data import Request
from keedit_jax.upstream.longform import WindowConfig, encode_edits, pack_windows

LongForm = collections.namedtuple("LongForm", "case_id question answer")

TIMED = ("warmup_s", "median_s", "min_s", "max_s", "flops_analytic", "flop_per_s",
         "fraction_of_peak")
COMPILED = ("compile_s", "twin_compile_s", "flops_xla", "flops_xla_looped")


def _positive(value: object) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def results(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("bench")
    returned = model.main(["--preset", "small", "--out", str(out)])
    assert (out / "results.md").read_text().startswith("| figure |")
    written = json.loads((out / "results.json").read_text())
    assert written == json.loads(json.dumps(returned))
    return written


def test_every_figure_is_timed(results: dict) -> None:
    assert tuple(results["figures"]) == model.FIGURES
    for name, figure in results["figures"].items():
        for field in TIMED:
            assert _positive(figure[field]), f"{name}.{field} = {figure[field]!r}"
        assert figure["min_s"] <= figure["median_s"] <= figure["max_s"], name
        assert figure["repeats"] == model.PRESETS["small"].repeats, name


def test_edit_figures_have_xla_counts_and_memory(results: dict) -> None:
    for name in model.EDIT_FIGURES:
        figure = results["figures"][name]
        for field in COMPILED:
            assert _positive(figure[field]), f"{name}.{field} = {figure[field]!r}"
        assert _positive(figure["memory"]["argument_bytes"]), name
        assert figure["memory"]["temp_bytes"] >= 0, name


def test_generation_reports_tokens_and_bandwidth(results: dict) -> None:
    for name in model.GENERATION_FIGURES:
        assert _positive(results["figures"][name]["tokens_per_s"]), name
    cached = results["figures"]["generate_cached"]
    for field in ("decode_bytes_per_s", "fraction_of_copy_bandwidth",
                  "fraction_of_matvec_bandwidth"):
        assert _positive(cached[field]), f"generate_cached.{field} = {cached[field]!r}"


def test_limits_and_ratios(results: dict) -> None:
    assert set(model.LIMITS) <= set(results["limits"])  # accelerators add matmul_bf16
    for name, limit in results["limits"].items():
        assert _positive(limit["per_s"]) and _positive(limit["best_per_s"]), name
    assert tuple(results["ratios"]) == model.RATIOS
    for name, value in results["ratios"].items():
        assert _positive(value), f"{name} = {value!r}"


def test_prefix_cached_steps_match_the_full_step(results: dict) -> None:
    checks = results["checks"]
    assert _positive(checks["loss_full"])
    for name in ("prefix_cached", "prefix_cached_target_logits", "prefix_cached_remat"):
        assert checks[f"{name}_loss_abs_diff"] < 1e-4, checks
        assert checks[f"{name}_grad_max_rel_diff"] < 1e-3, checks


def test_machine_and_config(results: dict) -> None:
    machine, config = results["machine"], results["config"]
    assert machine["jax"] and machine["device_count"] >= 1
    assert config["n_params"] > 0 and config["param_bytes"] == 4 * config["n_params"]
    assert 0 < config["shift_layer"] < config["hf_config"]["num_hidden_layers"] - 1


# --- the suite's end-to-end part (`benchmarks.run`, part `endtoend`) ----------------------

FAKE_LIMITS = {"matmul": {"per_s": 1e11, "unit": "FLOP/s"},
               "copy": {"per_s": 1e10, "unit": "B/s"}}


def _fake_endtoend(model: str, memit_sizes: tuple[int, ...]) -> latency.Paths:
    """`latency.endtoend`'s calls and agreement, named as it names them; each call returns
    the seconds it stands for (the test's clock, so no sleep is timed on a loaded machine)."""
    calls, agreement = {}, {}
    for method, sizes in (("memit", memit_sizes), ("muke", (1,))):
        for size in sizes:
            calls[f"{method} optimised @{size}"] = lambda: 1e-3
            calls[f"{method} naive @{size}"] = lambda: 3e-3
            agreement[f"{method} @{size}"] = {"max_abs_diff": 1e-6, "relative": 1e-7}
    return calls, agreement


def test_endtoend_part_reaches_the_headline_and_the_report(monkeypatch, tmp_path) -> None:
    monkeypatch.setattr(latency, "endtoend", _fake_endtoend)
    monkeypatch.setattr(suite, "limits", lambda _: FAKE_LIMITS)
    monkeypatch.setattr(common, "timed", lambda call: call())
    results = suite.main(["--smoke", "--parts", "endtoend", "--out", str(tmp_path)])
    rows = results["headline"]
    assert [r["figure"][:25] for r in rows] == ["end to end: MEMIT targets",
                                                "end to end: μKE upstream "]
    for row in rows:
        assert row["figure"].endswith(", batch 1") and row["naive_over_optimised"] > 1, row
    report = (tmp_path / "report.md").read_text()
    assert rows[0]["figure"] in report and "| memit @1 | 1.00e-06 | 1.00e-07 |" in report


@pytest.mark.slow  # ~40 s on 2 loaded cores, all compiling; the wiring is tested fast above
def test_naive_paths_compute_the_library_s_shifts(tiny_checkpoint, tok) -> None:
    """Each naive variant is the same computation as the library's path (same δ), named as
    the harness expects."""
    tiny = testing.cached_model(tiny_checkpoint("llama"))
    params, cfg = tiny.params, tiny.config
    hp = upstream.TargetConfig(layer=1, v_loss_layer=2, fact_token="last", v_lr=0.5,
                               v_weight_decay=1e-3, clamp_norm_factor=4.0, early_stop_loss=1e-2,
                               v_num_grad_steps=6)
    structured = upstream.encode_requests(
        tok, [Request(case_id="a", prompt="{} is located in", subject="The Eiffel Tower",
                      target_new="capital")], ("{}", "The city. {}"), hp)
    memit_calls, memit_agreement = latency.memit_paths(params, cfg, hp, {1: structured.batch})
    window = WindowConfig(strategy="matryoshka_affinity", window_size=6, affinity_steps=2)
    edits, _ = encode_edits(tok, [LongForm("b", "Where is the Eiffel Tower?",
                                           "The Eiffel Tower is in Paris, in France.")],
                            window, cfg.max_positions)
    muke_calls, muke_agreement = latency.muke_paths(params, cfg, hp, window,
                                                    pack_windows(edits, tok.pad_token_id))
    expected_calls, expected_agreement = _fake_endtoend("", (1,))
    assert {**memit_calls, **muke_calls}.keys() == expected_calls.keys()
    assert {**memit_agreement, **muke_agreement}.keys() == expected_agreement.keys()
    for name, agreement in {**memit_agreement, **muke_agreement}.items():
        assert agreement["relative"] < 1e-4, (name, agreement)
