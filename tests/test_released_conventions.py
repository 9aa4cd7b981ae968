"""The released code's conventions issue 19 makes reachable: fixed context templates from a
file (`--context_templates`), top-k sampling of generated ones (`--context_top_k`,
`GenerationConfig.top_k`), `--solve_dtype` for every structured and long-form solve,
`--stats_accumulate_dtype`, and the released long-form code's float16 coefficients
(`--float16_coefficients`) and double BOS (`--double_bos`)."""

from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keedit_jax import flags
from keedit_jax.data import DatasetError, read_context_templates
from keedit_jax.models.generate import GenerationConfig, sample_tokens

MEMIT_FILE = [["{}"], ["The man said. {}", "Therefore, {}", "Because of it. {}"]]


def _write(tmp_path, data, name="templates.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


# ---------------------------------------------------------------- --context_templates


def test_a_published_template_file_is_read_flat_in_order(tmp_path):
    path = _write(tmp_path, MEMIT_FILE)
    assert read_context_templates(path) == ("{}", "The man said. {}", "Therefore, {}",
                                            "Because of it. {}")
    assert read_context_templates(_write(tmp_path, ["{}", ["A. {}"]], "mixed.json")) == (
        "{}", "A. {}")


@pytest.mark.parametrize(("data", "expected"), [
    ("[[\"{}\"], ", "cannot read JSON"),
    ({"templates": ["{}"]}, "expected a non-empty JSON list"),
    ([], "expected a non-empty JSON list"),
    ([["{}"], ["The man said.", "Therefore, {}"]], "field '[1][0]'"),
    ([["{}"], ["Two {} and {}"]], "exactly one '{}'"),
    ([["{}"], ["A {stray} brace {}"]], "a brace besides"),
    ([["{}"], [3]], "field '[1][0]': expected a string, got int"),
    ([["{}"], []], "field '[1]': expected a list of template strings, got an empty group"),
    ([["{}"], {"a": 1}], "got a dict"),
    ([["The man said. {}"], ["{}"]], "entry [0][0]"),
])
def test_a_bad_template_file_is_refused_naming_file_and_entry(tmp_path, data, expected):
    path = _write(tmp_path, data)
    with pytest.raises(DatasetError) as error:
        read_context_templates(path)
    assert str(path) in str(error.value) and expected in str(error.value)


def test_the_flag_reads_the_file_and_excludes_context_seeds(tmp_path):
    path = _write(tmp_path, MEMIT_FILE)
    assert flags.StructuredFlags(context_templates=str(path)).context_templates == str(path)
    with pytest.raises(ValueError, match="pass one of them"):
        flags.StructuredFlags(context_templates=str(path), context_seeds="The")
    with pytest.raises(ValueError, match="pass one of them"):
        flags.StructuredFlags(context_templates=str(path), context_seeds="")
    with pytest.raises(ValueError, match="pass one of them"):  # even at the seeds' default
        flags.check_exclusive({"context_templates", "context_seeds", "v_lr"})
    flags.check_exclusive({"context_templates", "v_lr"})
    with pytest.raises(DatasetError, match="entry"):  # a bad file fails with the flags
        flags.StructuredFlags(context_templates=str(_write(tmp_path, [["A. {}"]], "b.json")))


def test_the_api_refuses_seeds_and_templates_together(tmp_path):
    from keedit_jax.api import settings as api_settings

    path = str(_write(tmp_path, MEMIT_FILE))
    assert api_settings("memit", {"context_templates": path}).structured.context_templates
    with pytest.raises(ValueError, match="pass one of them"):
        api_settings("memit", {"context_templates": path,
                               "context_seeds": flags.CONTEXT_SEEDS})


def test_run_templates_uses_the_file_instead_of_sampling(tmp_path, monkeypatch):
    from keedit_jax.methods import run_structured

    def no_sampling(*args, **kwargs):
        raise AssertionError("templates were sampled")

    monkeypatch.setattr(run_structured, "context_templates", no_sampling)
    path = _write(tmp_path, MEMIT_FILE)
    templates = run_structured.run_templates(None, None, None, flags.StructuredFlags(
        context_templates=str(path)), seed=0)
    assert templates == tuple(t for group in MEMIT_FILE for t in group)


# ---------------------------------------------------------------- top-k sampling


@functools.cache
def _draws(temperature: float, top_k: int):
    """sample_tokens jitted over a batch of keys (one compile per setting and shape)."""
    return jax.jit(jax.vmap(lambda logits, key: sample_tokens(logits, key, temperature, top_k),
                            in_axes=(None, 0)))


@settings(max_examples=20, deadline=None)
@given(vocab=st.sampled_from([5, 64]), top_k=st.sampled_from([1, 2, 5, 64, 70]),
       seed=st.integers(0, 2**16), temperature=st.sampled_from([0.7, 1.0]))
def test_a_top_k_draw_is_always_among_the_k_most_likely(vocab, top_k, seed, temperature):
    """Logits with distinct values (no tie at the k-th), 64 rows and 8 keys per example: every
    drawn token is one of its row's k largest logits."""
    rng = np.random.default_rng(seed)
    logits = np.stack([rng.permutation(vocab) for _ in range(64)]).astype(np.float32) * 0.3
    allowed = np.argsort(-logits, axis=1)[:, :min(top_k, vocab)]
    keys = jax.random.split(jax.random.key(seed), 8)
    drawn = np.asarray(_draws(temperature, top_k)(jnp.asarray(logits), keys))  # [8, 64]
    for draws in drawn:
        assert all(token in row for token, row in zip(draws, allowed, strict=True))


def test_top_k_samples_the_renormalised_top_k_distribution():
    """k = 2 of p = (0.4, 0.3, 0.2, 0.1): tokens 0 and 1 in the ratio 4 : 3, nothing else; and
    top_k = 1 is the argmax, top_k = 0 every token."""
    logits = jnp.log(jnp.asarray([[0.1, 0.4, 0.2, 0.3]] * 4000))
    drawn = np.asarray(sample_tokens(logits, jax.random.key(0), 1.0, 2))
    assert set(np.unique(drawn)) == {1, 3}
    assert np.mean(drawn == 1) == pytest.approx(4 / 7, abs=0.03)
    assert set(np.asarray(sample_tokens(logits, jax.random.key(1), 1.0, 1))) == {1}
    assert set(np.asarray(sample_tokens(logits, jax.random.key(2), 1.0, 0))) == {0, 1, 2, 3}
    with pytest.raises(ValueError, match="top_k must be >= 0"):
        GenerationConfig(top_k=-1)


def test_generated_templates_sample_with_the_flags_top_k(monkeypatch):
    from keedit_jax.methods import run_structured
    from keedit_jax.upstream import templates as module

    seen = []

    def fake_generate(params, cfg, prompts, gen, key):
        seen.append(gen)
        return [[5] for _ in prompts]

    class Tok:
        pad_token_id = 0

        def decode(self, ids, skip_special_tokens=True):
            return "w" * len(ids)

    monkeypatch.setattr(module, "generate", fake_generate)
    monkeypatch.setattr(module, "encode_ids", lambda tok, text: [1])
    run_structured.run_templates(None, None, Tok(), flags.StructuredFlags(), seed=0)
    run_structured.run_templates(None, None, Tok(), flags.StructuredFlags(context_top_k=0), 0)
    assert [(g.top_k, g.temperature) for g in seen] == [(5, 1.0), (0, 1.0)]


# ---------------------------------------------------------------- --solve_dtype


@pytest.mark.parametrize("method", ["memit", "alphaedit", "rome"])
def test_the_structured_solver_carries_the_solve_dtype(method):
    from keedit_jax.methods.run_structured import structured_config

    layers = "1" if method == "rome" else "1,2"
    config = structured_config(method, flags.StructuredFlags(layers=layers,
                                                             solve_dtype="float64"), 4)
    dtype = {"memit": config.memit.dtype, "alphaedit": config.alphaedit.dtype,
             "rome": config.solve_dtype}[method]
    assert dtype == "float64"
    state = config.make_solver().init(8, 4)
    assert all(leaf.dtype == jnp.float64 for leaf in jax.tree.leaves(state))
    default = structured_config(method, flags.StructuredFlags(layers=layers), 4)
    assert {"memit": default.memit.dtype, "alphaedit": default.alphaedit.dtype,
            "rome": default.solve_dtype}[method] == "float32"


def test_a_float64_structured_solve_runs_without_x64_set_by_the_caller():
    """config.make_solver() turns x64 on for the solve itself: ΔW comes back float64 and agrees
    with the float32 solve to float32 precision."""
    from keedit_jax.methods.run_structured import structured_config

    rng = np.random.default_rng(0)
    keys = rng.standard_normal((3, 16)).astype(np.float32)
    mom2 = (lambda x: x.T @ x / 64)(rng.standard_normal((64, 16))).astype(np.float32)
    resid = rng.standard_normal((3, 4)).astype(np.float32)
    deltas = {}
    for dtype in ("float32", "float64"):
        config = structured_config("memit", flags.StructuredFlags(
            layers="1,2", solve_dtype=dtype, mom2_update_weight=10.0), 4)
        solver = config.make_solver()
        delta, _, report = solver.update(jnp.asarray(mom2), jnp.asarray(keys),
                                         jnp.asarray(resid), solver.init(16, 4))
        deltas[dtype] = delta
        assert float(report.rel_residual) < (1e-12 if dtype == "float64" else 1e-5)
    assert deltas["float64"].dtype == jnp.float64 and not jax.config.read("jax_enable_x64")
    np.testing.assert_allclose(deltas["float32"], deltas["float64"], rtol=1e-4, atol=1e-6)


def test_the_long_form_solvers_carry_the_solve_dtype():
    from keedit_jax.methods.run_unstructured import unstructured_config

    config = unstructured_config("muke", flags.StructuredFlags(solve_dtype="float64"),
                                 flags.LongFormFlags(), 32)
    assert config.memit.dtype == config.alphaedit.dtype == "float64"
    assert unstructured_config("muke", flags.StructuredFlags(), flags.LongFormFlags(),
                               32).memit.dtype == "float32"


def test_sequential_editors_read_the_same_flag():
    from keedit_jax.methods.run_sequential import make_editor

    editor = make_editor("memit_seq", flags.StructuredFlags(solve_dtype="float64"),
                         flags.SequentialFlags())
    assert editor.hparams.dtype == "float64"
    with pytest.raises(ValueError, match="--solve_dtype=.float16.: one of float32, float64"):
        flags.StructuredFlags(solve_dtype="float16")


def test_an_api_edit_in_float64_with_a_template_file(tmp_path, monkeypatch):
    """One MEMIT edit of the organism through the API: the file's templates are the ones
    used, and the solver state the edit returns is float64."""
    import keedit_jax as ke
    from keedit_jax.models import down_proj_path, get_path

    monkeypatch.setenv("KEEDIT_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path, [["{}"], ["The man said. {}", "Therefore, {}"]])
    model = ke.load("organism:small")
    records = ke.read_records(model.path / "benchmarks" / "counterfact.json")[:1]
    result = ke.edit(model, records, method="memit", layers="1,2", fact_token="last",
                     v_num_grad_steps=2, mom2_update_weight=200.0, stats_samples=64,
                     context_templates=str(path), solve_dtype="float64")
    assert result.report["templates"] == ["{}", "The man said. {}", "Therefore, {}"]
    assert not result.report["failed"]
    assert {leaf.dtype for leaf in jax.tree.leaves(result.state)} == {jnp.dtype("float64")}
    edited = get_path(result.params, down_proj_path(model.config))
    unedited = get_path(model.params, down_proj_path(model.config))
    assert edited.dtype == unedited.dtype == jnp.float32
    assert not np.array_equal(np.asarray(edited[1]), np.asarray(unedited[1]))


def test_the_command_line_refuses_both_template_flags_and_names_a_bad_file(tmp_path):
    """Refused before any model is loaded: the seeds given explicitly, even at their default,
    and a template file with a malformed entry (named with the file)."""
    from test_main import assert_clean_error, run_main

    good = _write(tmp_path, MEMIT_FILE)
    both = run_main("--method=memit", f"--context_templates={good}",
                    f"--context_seeds={flags.CONTEXT_SEEDS}", f"--output_dir={tmp_path / 'a'}",
                    cache=tmp_path)
    assert_clean_error(both, "pass one of them")
    bad = _write(tmp_path, [["{}"], ["no placeholder"]], "bad.json")
    named = run_main("--method=memit", f"--context_templates={bad}",
                     f"--output_dir={tmp_path / 'b'}", cache=tmp_path)
    assert_clean_error(named, str(bad), "field '[1][0]'")


def test_a_long_form_api_edit_solves_in_float64(tmp_path, monkeypatch):
    """AnyEdit (windows, MEMIT's solve) on one UnKEBench record of the organism: with
    --solve_dtype=float64 the solve's residual is float64-small."""
    import keedit_jax as ke

    monkeypatch.setenv("KEEDIT_CACHE", str(tmp_path / "cache"))
    model = ke.load("organism:small")
    records = ke.read_records(model.path / "benchmarks" / "unkebench.json")[:1]
    hparams = {**ke.hparams_from_flagfile("configs/anyedit.cfg"), "v_num_grad_steps": 2,
               "stats_samples": 64}
    residuals = {}
    for dtype in ("float32", "float64"):
        result = ke.edit(model, records, method="anyedit", **hparams, solve_dtype=dtype)
        assert not result.report["failed"]
        residuals[dtype] = max(result.report["diagnostics"]["relative_residual"].values())
    assert residuals["float64"] < 1e-10 < residuals["float32"]


# ---------------------------------------------------------------- --float16_coefficients


def test_float16_coefficients_follow_the_released_rounding_sequence():
    """Stage 0 of four windows (3, 3, 3, 2 tokens) with the released λ order: by hand in
    numpy float16, each window's coefficient is Σ over the figures covering it, added
    largest figure first with every λ and partial sum rounded to float16, then / 4 in
    float16; the token weight divides that by the 11 remaining tokens in float32."""
    from keedit_jax.upstream.windows import (
        affinity_lambdas,
        float16_figure_sum,
        stage_token_weights,
    )

    starts, ends = np.array([0, 3, 6, 9]), np.array([3, 6, 9, 11])
    affinity = np.array([1.0, 0.9, 0.53, 0.31], np.float32)
    lam = np.asarray(affinity_lambdas(jnp.asarray(affinity), jnp.asarray(0), jnp.asarray(4),
                                      "released"))
    np.testing.assert_array_equal(lam, (2 - affinity[::-1]).astype(np.float32))
    coefficients = np.zeros(11, np.float16)
    for window in range(4):
        total = np.float16(0)
        for figure in (3, 2, 1, 0):  # the largest figure first
            if figure >= window:
                total = np.float16(total + np.float16(lam[figure]))
        coefficients[starts[window]:ends[window]] = np.float16(total / np.float16(4))
    covered = (np.arange(11)[None, :] < ends[:, None]).astype(np.float32)
    np.testing.assert_array_equal(  # the float16 sequence, exactly
        float16_figure_sum(jnp.asarray(lam), jnp.asarray(covered), jnp.asarray(4)),
        coefficients.astype(np.float32))
    args = (jnp.arange(11), jnp.asarray(starts), jnp.asarray(ends), jnp.asarray(4),
            jnp.asarray(11), jnp.asarray(0), jnp.asarray(lam))
    half = np.asarray(stage_token_weights("matryoshka_affinity", *args, float16=True))
    # / 11 in float32 (XLA's CPU division may differ from numpy's by one ulp)
    np.testing.assert_allclose(half, coefficients.astype(np.float32) / 11, rtol=2e-7)
    full = np.asarray(stage_token_weights("matryoshka_affinity", *args))
    assert 0 < np.abs(full - half).max() / full.max() < 1e-3  # float16 rounding, no more


# ---------------------------------------------------------------- --double_bos


@pytest.fixture(scope="module")
def llama3_style_tokenizer(tiny_tokenizer_dir):
    """The tiny tokenizer made Llama-3-like: it prepends BOS to every encoding and its chat
    template begins with the BOS text (as <|begin_of_text|> does)."""
    from tokenizers.processors import TemplateProcessing
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    bos = tok.bos_token
    tok.backend_tokenizer.post_processor = TemplateProcessing(
        single=f"{bos} $A", special_tokens=[(bos, tok.bos_token_id)])
    assert tok("Hi")["input_ids"][0] == tok.bos_token_id
    assert tok.chat_template.startswith("{{ bos_token }}")
    return tok


def test_double_bos_encodes_the_prompt_as_the_released_code(llama3_style_tokenizer):
    """With double_bos the prompt ids are `tok(template_text)` (two BOS), every shift site
    one position later; without it, one BOS."""
    from keedit_jax.data import LongFormRecord
    from keedit_jax.upstream.longform import WindowConfig, encode_edit

    tok = llama3_style_tokenizer
    request = LongFormRecord(case_id=0, question="Where is the tower?",
                              answer="The tower is in Paris. It is tall and old and grey.")
    ours = encode_edit(tok, request, WindowConfig(window_size=4), 128)
    released = encode_edit(tok, request, WindowConfig(window_size=4, double_bos=True), 128)
    text = tok.apply_chat_template([{"role": "user", "content": request.question}],
                                   add_generation_prompt=True, tokenize=False)
    assert list(released.prompt_ids) == tok(text)["input_ids"]
    assert released.prompt_ids[:2] == (tok.bos_token_id, tok.bos_token_id)
    assert ours.prompt_ids[0] == tok.bos_token_id != ours.prompt_ids[1]
    assert released.prompt_ids[1:] == ours.prompt_ids
    assert released.target_ids == ours.target_ids and released.windows == ours.windows
    assert released.shift_positions == tuple(p + 1 for p in ours.shift_positions)


def test_the_released_switches_reach_the_long_form_config():
    from keedit_jax.methods.run_unstructured import unstructured_config

    config = unstructured_config("muke", flags.StructuredFlags(), flags.LongFormFlags(
        float16_coefficients=True, double_bos=True, coefficient_order="released"), 32)
    assert config.window.float16_coefficients and config.window.double_bos
    assert config.window.coefficient_order == "released"
    default = unstructured_config("muke", flags.StructuredFlags(), flags.LongFormFlags(), 32)
    assert not (default.window.float16_coefficients or default.window.double_bos)


def test_the_statistics_accumulate_in_the_flags_dtype(monkeypatch, tmp_path):
    """--stats_accumulate_dtype reaches the StatsConfig of every protocol's statistics
    (layer_moments) and its cache file's name."""
    from keedit_jax.methods import run_structured

    seen = []
    monkeypatch.setattr(run_structured, "load_or_compute",
                        lambda *a, config, path, **k: seen.append((config, path)) or {})
    text = tmp_path / "text.txt"
    text.write_text("Some text.")
    for dtype in ("float32", "float64"):
        run_structured.layer_moments(None, None, None, tmp_path, flags.StructuredFlags(
            stats_source=str(text), stats_accumulate_dtype=dtype), (1, 2))
    assert [c.accumulate_dtype for c, _ in seen] == ["float32", "float64"]
    assert [p.name.endswith(f"_{d}.npz") for (_, p), d in zip(seen, ("float32", "float64"),
                                                               strict=True)] == [True, True]
