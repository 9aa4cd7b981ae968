"""GRACE in the sequential stream, against truths it must satisfy: the stream's editor over
three batches leaves the codebook that editing the same requests one at a time leaves (GRACE
as the paper streams it); a checkpoint restores the codebook exactly, at the capacity it had
when saved (it doubles along a stream); --export_gguf, which cannot hold a codebook, is
refused; the command line's stream killed mid-way and started again ends with the codebook of
an uninterrupted run, which its edited-layers file holds (slow)."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import signal

import numpy as np
import orbax.checkpoint as ocp
import pytest
from safetensors.numpy import load_file

from keedit_jax.api import SequentialEditor, settings
from keedit_jax.data import Request
from keedit_jax.intervene import with_codebook
from keedit_jax.methods.grace import GraceConfig, blank_codebook, grace_requests
from keedit_jax.models.layers import Codebook, codebook_of
from keedit_jax.models.params import down_proj_path, get_path
from keedit_jax.upstream import TargetConfig
from tests.test_main import assert_clean_error, run_main
from tests.test_sequential_run import (  # noqa: F401 (stream_inputs: a fixture)
    N_EDITS,
    stopped_after_checkpoint,
    stream_args,
    stream_inputs,
)

LAYER = 1
HPARAMS = {"layers": str(LAYER), "fact_token": "last", "grace_lr": 10.0, "grace_steps": 5}
FIELDS = ("keys", "values", "radii", "used", "labels")


def _requests() -> list[Request]:
    """Three distinct facts, the first edited again with its own target (an expand) in the
    second batch, beside a new fact: batches of 1, 2 and 1 (those of 1 share the programs of
    the one-at-a-time truth, which keeps the test short)."""
    facts = [("Alice", "was born in", "and"), ("Bob", "plays the", "of"),
             ("Carol", "works for", "the")]
    first, second, third = [Request(case_id=str(i), prompt="{} " + prompt, subject=subject,
                                    target_new=target, target_true="a")
                            for i, (subject, prompt, target) in enumerate(facts)]
    return [first, second, dataclasses.replace(first, case_id="3"), third]


BATCHES = ((0, 1), (1, 3), (3, 4))


def _editor(model, tok) -> SequentialEditor:
    return SequentialEditor.prepared(model, tok, settings("grace", HPARAMS))


def test_the_streams_codebook_is_the_one_edit_at_a_time_codebook(model, tok):
    """Both start from an empty 16-slot codebook (as after a stream's restore; one parameter
    tree, so every call shares its programs)."""
    requests, blank = _requests(), blank_codebook(model.config, LAYER, 16)
    stream = _editor(model, tok)
    stream.load_state(0, {**stream.stream_state(), "codebook": blank})
    ops = [row["op"] for start, stop in BATCHES
           for row in stream.edit(requests[start:stop])["diagnostics"]]
    config = GraceConfig(layers=(LAYER,), target=TargetConfig(
        layer=LAYER, v_loss_layer=model.config.n_layers - 1, fact_token="last"),
        lr=10.0, steps=5)
    params, truth_ops = with_codebook(model.params, blank), []
    for request in requests:
        params, rows = grace_requests(params, model.config, tok, [request], config)
        truth_ops += [r["op"] for r in rows]
    assert ops == truth_ops == ["add", "add", "expand", "add"]
    got, truth = codebook_of(stream.edited), codebook_of(params)
    assert got.layer == truth.layer == LAYER and stream.batches == 3
    for name in ("used", "labels"):
        np.testing.assert_array_equal(getattr(got, name), getattr(truth, name))
    for name in ("keys", "values", "radii"):  # the rows are padded to other widths
        np.testing.assert_allclose(getattr(got, name), getattr(truth, name), rtol=1e-4,
                                   atol=1e-5, err_msg=name)
    path = down_proj_path(model.config)
    np.testing.assert_array_equal(get_path(stream.edited, path),  # no weight moved
                                  get_path(model.params, path))


def _random_book(model, capacity: int, seed: int) -> Codebook:
    rng = np.random.default_rng(seed)
    blank = blank_codebook(model.config, LAYER, capacity)
    return dataclasses.replace(
        blank, keys=rng.normal(size=blank.keys.shape).astype(np.float32),
        values=rng.normal(size=blank.values.shape).astype(np.float32),
        radii=rng.uniform(size=capacity).astype(np.float32),
        used=rng.uniform(size=capacity) < 0.7,
        labels=rng.integers(0, 2**31 - 1, capacity).astype(np.int32))


def _assert_same_book(restored: Codebook, saved: Codebook) -> None:
    assert restored.layer == saved.layer and restored.capacity == saved.capacity
    for name in FIELDS:
        np.testing.assert_array_equal(getattr(restored, name), getattr(saved, name))
        assert np.asarray(getattr(restored, name)).dtype == np.asarray(getattr(saved, name)).dtype


def test_a_checkpoint_restores_the_codebook_at_the_capacity_it_was_saved_with(model, tok,
                                                                              tmp_path):
    stream, resumed = _editor(model, tok), _editor(model, tok)
    for batches, capacity in ((1, 16), (2, 32)):  # the second save after a doubling
        book = _random_book(model, capacity, seed=batches)
        stream.load_state(batches, {**stream.stream_state(), "codebook": book})
        stream.save(tmp_path)
        resumed.restore(tmp_path)  # holds the 16-slot codebook before the second restore
        assert resumed.batches == batches
        _assert_same_book(codebook_of(resumed.edited), book)


GRACE_STREAM = ("--method=grace", "--sequential", f"--layers={LAYER}", "--grace_steps=5")


def test_a_gguf_export_of_the_stream_is_refused_naming_the_flag(tmp_path):
    """A GGUF file holds weights, not the codebook that is GRACE's edit."""
    assert_clean_error(run_main("--flagfile=configs/grace_seq.cfg",
                                f"--export_gguf={tmp_path / 'x.gguf'}",
                                f"--output_dir={tmp_path / 'out'}", cache=tmp_path),
                       "--export_gguf: the stream of --method=grace")


def _final_codebook(out: pathlib.Path) -> dict[str, np.ndarray]:
    """The codebook of the run's last checkpoint, read as saved (no structure given)."""
    steps = sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())
    state = ocp.StandardCheckpointer().restore(out / "checkpoints" / str(steps[-1]) / "state")
    return {name: np.asarray(state["codebook"][name]) for name in FIELDS}


@pytest.mark.slow
def test_a_killed_grace_stream_resumes_to_the_codebook_of_an_uninterrupted_run(
        stream_inputs, tmp_path):  # noqa: F811 (the imported fixture)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    result = run_main(*stream_args(stream_inputs, whole, *GRACE_STREAM),
                      cache=stream_inputs["cache"])
    assert result.returncode == 0, result.stderr[-3000:]
    expected = json.loads((whole / "results.json").read_text())
    assert expected["applied_case_ids"] == list(range(N_EDITS))
    returncode, _ = stopped_after_checkpoint(stream_inputs, killed, 2, signal.SIGKILL,
                                             *GRACE_STREAM)
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    resumed = run_main(*stream_args(stream_inputs, killed, *GRACE_STREAM),
                       cache=stream_inputs["cache"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming grace at batch" in resumed.stderr
    results = json.loads((killed / "results.json").read_text())
    assert results["applied_case_ids"] == list(range(N_EDITS))  # none lost, none twice
    assert results["curve"] == expected["curve"]
    got, want = _final_codebook(killed), _final_codebook(whole)
    assert want["used"].sum() >= N_EDITS - 1  # one entry per fact (the repeat may reuse one)
    saved = load_file(killed / "edited_layers.safetensors")  # the stream's edited model
    for name in FIELDS:
        np.testing.assert_array_equal(got[name], want[name])
        np.testing.assert_array_equal(saved[f"grace_{name}"], want[name])
