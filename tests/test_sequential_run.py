"""The sequential stream end to end through the command line, on the tiny Llama: a run killed
with SIGKILL mid-stream and started again ends with exactly the weights of an uninterrupted
run, every edit applied once; every editor runs; bad resumes and flags fail clearly."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from safetensors.numpy import load_file

from keedit_jax.flags import SequentialFlags, StructuredFlags
from keedit_jax.methods.run_sequential import make_editor
from keedit_jax.stream_checkpoint import (
    CheckpointDamagedError,
    CheckpointMismatchError,
    StreamCheckpoints,
    run_fingerprint,
)
from tests.test_main import ROOT, assert_clean_error, model_directory, run_main

SUBJECTS = ("Marie Curie", "The Eiffel Tower", "Tokyo", "Berlin", "Jane Austen", "The Amazon",
            "Danielle Darrieux", "The Colosseum", "Paris", "Rome", "Japan", "Water")
N_EDITS, BATCH = 12, 2


def counterfact(path: pathlib.Path) -> pathlib.Path:
    """N_EDITS CounterFact records in MEMIT's format: distinct subjects, except that the last
    edits the first record's fact again, to another target (a conflict)."""
    subjects = [*SUBJECTS[:N_EDITS - 1], SUBJECTS[0]]
    targets = ["France"] * (N_EDITS - 1) + ["Germany"]
    records = [{"case_id": i,
                "requested_rewrite": {"prompt": "{} is located in", "subject": subject,
                                      "relation_id": "P276",
                                      "target_new": {"str": target, "id": f"Q{i}"},
                                      "target_true": {"str": "Japan", "id": "Q17"}},
                "paraphrase_prompts": [f"The place of {subject} is"],
                "neighborhood_prompts": ["The capital of Italy is"],
                "attribute_prompts": [], "generation_prompts": [f"{subject} is"]}
               for i, (subject, target) in enumerate(zip(subjects, targets, strict=True))]
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def stream_inputs(tmp_path_factory, tiny_checkpoint, tiny_tokenizer_dir):
    base = tmp_path_factory.mktemp("stream")
    model = model_directory(base, tiny_checkpoint("llama"), tiny_tokenizer_dir)
    texts = base / "texts.jsonl"
    sentences = ["The quick brown fox jumps over the lazy dog.",
                 "Tokyo is the capital of Japan, and Berlin is the capital of Germany.",
                 "Marie Curie was a physicist and chemist who won two Nobel Prizes."]
    texts.write_text("".join(json.dumps({"text": s}) + "\n" for s in sentences * 4))
    tasks = base / "glue"
    tasks.mkdir()
    (tasks / "sst2.json").write_text(json.dumps(
        [{"sentence": s, "label": i % 2, "idx": i} for i, s in enumerate(sentences * 4)]))
    (tasks / "mmlu.json").write_text(json.dumps(
        [{"question": s, "subject": "misc", "choices": ["a", "b", "c", "d"], "answer": i % 4}
         for i, s in enumerate(sentences * 4)]))
    return {"model": model, "dataset": counterfact(base / "cf.json"), "texts": texts,
            "cache": base / "cache", "tasks": tasks}


def stream_args(inputs, out: pathlib.Path, *extra: str) -> list[str]:
    return [f"--model={inputs['model']}", "--method=memit_seq", f"--dataset={inputs['dataset']}",
            "--dataset_format=counterfact", f"--num_edits={N_EDITS}",
            f"--edit_batch_size={BATCH}", "--layers=0,1", "--fact_token=last",
            "--v_num_grad_steps=4", "--mom2_update_weight=1", f"--stats_source={inputs['texts']}",
            "--stats_samples=8", "--drift_samples=4", "--max_new_tokens=3", "--eval_every=3",
            "--checkpoint_every=1", f"--output_dir={out}", *extra]


def edited(out: pathlib.Path) -> dict[str, np.ndarray]:
    return load_file(out / "edited_layers.safetensors")


def stopped_after_checkpoint(inputs, out: pathlib.Path, step: int, signum: int,
                             *extra: str) -> tuple[int, str]:
    """A sequential run sent `signum` once its checkpoint of batch `step` exists: its exit
    status and stderr (through a file: a pipe left unread could block the run's logging)."""
    env = {**os.environ, "KEEDIT_CACHE": str(inputs["cache"]), "JAX_PLATFORMS": "cpu"}
    log = out.with_name(f"{out.name}.stderr")
    with log.open("w") as stderr:
        process = subprocess.Popen([sys.executable, "-m", "keedit_jax.main",
                                    *stream_args(inputs, out, *extra)], cwd=ROOT, env=env,
                                   stdout=subprocess.DEVNULL, stderr=stderr)
        deadline = time.monotonic() + 240
        while not (out / "checkpoints" / str(step)).is_dir() and process.poll() is None:
            assert time.monotonic() < deadline, f"no checkpoint of batch {step} appeared"
            time.sleep(0.02)
        process.send_signal(signum)
        process.wait()
    return process.returncode, log.read_text()


# Both signals take the same handler (keedit_jax.interrupts, tested alone there): SIGINT's
# end-to-end run is slow-marked to keep the suite under 15 minutes.
@pytest.mark.parametrize("signum", [pytest.param(signal.SIGINT, marks=pytest.mark.slow),
                                    signal.SIGTERM])
def test_ctrl_c_and_sigterm_end_a_stream_with_one_line_and_its_checkpoint(
        stream_inputs, tmp_path, signum):
    out = tmp_path / "out"
    returncode, stderr = stopped_after_checkpoint(stream_inputs, out, 1, signum)
    assert returncode == 128 + signum, stderr
    assert "Traceback" not in stderr, stderr
    assert f"interrupted by {signal.Signals(signum).name}" in stderr
    assert (out / "checkpoints" / "1").is_dir() and not (out / "results.json").exists()


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(stream_inputs, tmp_path):
    """With conflict resolution on, so the per-fact registry is checkpointed and restored too;
    the repeated fact's earlier value is removed exactly once."""
    whole = tmp_path / "whole"
    conflicts = "--resolve_conflicts"
    result = run_main(*stream_args(stream_inputs, whole, conflicts), cache=stream_inputs["cache"])
    assert result.returncode == 0, result.stderr
    expected = json.loads((whole / "results.json").read_text())
    assert expected["applied_case_ids"] == list(range(N_EDITS))

    killed = tmp_path / "killed"
    returncode, _ = stopped_after_checkpoint(stream_inputs, killed, 2, signal.SIGKILL, conflicts)
    assert returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (killed / "results.json").exists()
    partial = json.loads((killed / "partial.json").read_text())  # batch 1 at least, readable
    curve, applied = partial["curve"], partial["applied_case_ids"]
    assert curve and curve == expected["curve"][:len(curve)]  # evaluated every few batches
    assert applied and applied == expected["applied_case_ids"][:len(applied)]

    resumed = run_main(*stream_args(stream_inputs, killed, conflicts),
                       cache=stream_inputs["cache"])
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming memit_seq at batch" in resumed.stderr
    assert resumed.stderr.count("were edited before") == 1
    assert result.stderr.count("were edited before") == 1
    results = json.loads((killed / "results.json").read_text())
    assert results["applied_case_ids"] == list(range(N_EDITS))  # none lost, none twice
    got, want = edited(killed), edited(whole)
    assert got.keys() == want.keys() == {"layer_0", "layer_1"}
    for name in want:
        np.testing.assert_array_equal(got[name], want[name])
    assert [p["edits"] for p in results["curve"]] == [p["edits"] for p in expected["curve"]]
    assert results["curve"] == expected["curve"]


def test_a_checkpoint_of_another_configuration_is_not_resumed(tmp_path):
    """The fingerprint covers what changes the stream's result, not where results go."""
    configs = {"StructuredFlags": {"mom2_update_weight": 1.0},
               "RunFlags": {"output_dir": "a", "seed": 0}}
    moved = {**configs, "RunFlags": {"output_dir": "b", "seed": 0}}
    assert run_fingerprint(configs) == run_fingerprint(moved)
    state = {"kernels": {0: np.ones((3, 2), np.float32)}}
    first = StreamCheckpoints(tmp_path, run_fingerprint(configs))
    first.save(1, state, {"applied": [[0]]})
    step, restored, meta = first.restore(state)
    assert step == 1 and meta["applied"] == [[0]]
    np.testing.assert_array_equal(restored["kernels"][0], state["kernels"][0])
    changed = {**configs, "StructuredFlags": {"mom2_update_weight": 2.0}}
    with pytest.raises(CheckpointMismatchError, match=r"another configuration.*--noresume"):
        StreamCheckpoints(tmp_path, run_fingerprint(changed)).restore(state)


def test_a_later_version_resumes_when_only_its_new_options_are_at_their_defaults(tmp_path):
    """A step records its settings: a run that adds an option at its default (what a newer
    library does) resumes it; the same option off its default, or a changed value, is
    refused with the setting named."""
    defaults = {"StructuredFlags": {"mom2_update_weight": 15000.0, "solve_dtype": "float32"}}
    saved = {"StructuredFlags": {"mom2_update_weight": 1.0}, "templates": {"texts": ["{}"]}}
    state = {"kernels": {0: np.ones((3, 2), np.float32)}}
    StreamCheckpoints(tmp_path, run_fingerprint(saved), settings=saved,
                      defaults=defaults).save(1, state, {"applied": [[0]]})

    def resume(structured: dict) -> tuple:
        current = {**saved, "StructuredFlags": structured}
        return StreamCheckpoints(tmp_path, run_fingerprint(current), settings=current,
                                 defaults=defaults).restore(state)

    step, _, meta = resume({"mom2_update_weight": 1.0, "solve_dtype": "float32"})
    assert step == 1 and meta["applied"] == [[0]]
    with pytest.raises(CheckpointMismatchError,
                       match=r"StructuredFlags.solve_dtype: absent -> 'float64'"):
        resume({"mom2_update_weight": 1.0, "solve_dtype": "float64"})
    with pytest.raises(CheckpointMismatchError,
                       match=r"StructuredFlags.mom2_update_weight: 1.0 -> 2.0.*--noresume"):
        resume({"mom2_update_weight": 2.0, "solve_dtype": "float32"})


SLOW = pytest.mark.slow  # each is a command-line run (~30 s); the solvers' math is tested fast


@pytest.mark.parametrize("method", [
    pytest.param(("memit", "--sequential"), marks=SLOW),
    pytest.param(("alphaedit", "--sequential", "--alphaedit_l2=1"), marks=SLOW),
    pytest.param(("alphaedit_aligned", "--alphaedit_l2=1", "--solve_dtype=float64"), marks=SLOW),
    pytest.param(("memorize_latest",), marks=SLOW),
    ("lyaplock", "--lyaplock_alpha=2", "--solve_dtype=float64", "--general_tasks={tasks}",
     "--general_task_names=sst2,mmlu", "--general_tests=2"),
    pytest.param(("memit_seq", "--post_processing=rect"), marks=SLOW),
    pytest.param(("memit_seq", "--post_processing=prune", "--noerror_correction"), marks=SLOW),
    pytest.param(("memit", "--sequential", "--post_processing=prune"), marks=SLOW),
    ("metake", "--metake_steps=3", "--alphaedit_l2=1")])
def test_every_sequential_editor_runs_and_edits(stream_inputs, tmp_path, method):
    out = tmp_path / "out"
    args = [a for a in stream_args(stream_inputs, out, "--num_edits=4", "--v_num_grad_steps=8")
            if not a.startswith("--method")]
    flags = [flag.format(tasks=stream_inputs["tasks"]) for flag in method[1:]]
    result = run_main(f"--method={method[0]}", *flags, *args, cache=stream_inputs["cache"])
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [p["edits"] for p in results["curve"]] == [0, 4]
    if "--general_tests=2" in flags:  # the GLUE-style scores join every point of the curve
        assert all({"sst2_f1", "mmlu_f1"} <= set(p) for p in results["curve"])
    if method[0] == "lyaplock":  # the queue's preservation weight per layer, w >= 1
        assert results["curve"][-1]["lyaplock_w_layer0"] >= 1.0
    assert (out / "curves.png").stat().st_size > 0
    before = load_file(next(stream_inputs["model"].glob("*.safetensors")))
    kernel = next(v for k, v in before.items() if "layers.0.mlp.down_proj" in k)
    assert np.abs(edited(out)["layer_0"] - kernel.T).max() > 1e-6  # the layer was edited


def test_post_processing_is_refused_for_editors_without_it(stream_inputs, tmp_path):
    args = [a for a in stream_args(stream_inputs, tmp_path / "out")
            if not a.startswith("--method")]
    result = run_main("--method=lyaplock", "--post_processing=rect", *args,
                      cache=stream_inputs["cache"])
    assert_clean_error(result, "--post_processing=rect applies to memit and memit_seq")


@pytest.mark.parametrize(("method", "flags", "expected"), [
    ("memit", {}, ("memit", "moment", False)),
    ("memit_seq", {}, ("memit_seq", "moment", False)),
    ("memit", {"post_processing": "prune"}, ("memit", "moment", True)),
    ("memit", {"post_processing": "rect"}, ("memit_rect", "ote", False)),
    ("memit_seq", {"post_processing": "rect"}, ("memit_seq_rect", "ote", False)),
    ("alphaedit", {}, ("alphaedit", "projector", False)),
    ("alphaedit_aligned", {}, ("alphaedit_aligned", "ote", False)),
    ("memorize_latest", {}, ("memorize_latest", "ote", False)),
    ("lyaplock", {}, ("lyaplock", "moment", False)),
    ("metake", {}, ("alphaedit", "projector", False))])
def test_each_method_gets_its_solver(method, flags, expected):
    editor = make_editor(method, StructuredFlags(), SequentialFlags(**flags))
    assert (editor.solver.name, editor.stats_kind, editor.prune_at_end) == expected


def test_error_correction_switches_the_family_member():
    """Algorithm 1 with its +I ridge, and the ablation without either (ote_se §3.3-3.4)."""
    hp = make_editor("memit_seq", StructuredFlags(),
                     SequentialFlags(post_processing="rect")).hparams
    ablation = make_editor("memit_seq", StructuredFlags(),
                           SequentialFlags(post_processing="rect", error_correction=False)).hparams
    assert hp.error_correction and hp.ridge == 1.0 and hp.accumulate_keys
    assert not ablation.error_correction and ablation.ridge == 0.0 and ablation.accumulate_keys
    naive = make_editor("memit", StructuredFlags(), SequentialFlags(post_processing="rect"))
    assert not naive.hparams.accumulate_keys


def test_the_streams_first_batch_is_the_one_time_memit_edit(stream_inputs, tmp_path):
    """MEMIT-seq's carried key Gram starts at zero, so its first batch solves MEMIT's normal
    equations on the unedited model: the sequential runner must reach, request by request,
    what the one-time command reaches with the same flags (templates included: it once
    ignored --context_seeds and optimised every target under six templates)."""
    runs = {}
    for method, extra in (("memit_seq", ()), ("memit", ("--nosequential",))):
        out = tmp_path / method
        args = [a for a in stream_args(stream_inputs, out, f"--num_edits={BATCH}")
                if not a.startswith("--method")]
        result = run_main(f"--method={method}", "--context_seeds=", *extra, *args,
                          cache=stream_inputs["cache"])
        assert result.returncode == 0, result.stderr
        runs[method] = json.loads((out / "results.json").read_text())
    assert runs["memit_seq"]["templates"] == ["{}"]
    stream, once = (runs[m]["diagnostics"]["requests"] for m in ("memit_seq", "memit"))
    assert [r["case_id"] for r in stream] == [r["case_id"] for r in once] == list(range(BATCH))
    for key in ("target_prob_last", "target_prob_edited", "realised", "delta_norm"):
        np.testing.assert_allclose([r[key] for r in stream], [r[key] for r in once],
                                   rtol=1e-4, atol=1e-6, err_msg=key)


def _truncate_data(step: pathlib.Path) -> None:
    for file in (step / "state").rglob("d/*"):
        file.write_bytes(file.read_bytes()[:10])


@pytest.mark.parametrize("damage", [
    pytest.param(lambda step: (step / "meta" / "metadata").write_text("{not json"), id="meta"),
    pytest.param(lambda step: (step / "state" / "_METADATA").unlink(), id="state-metadata"),
    pytest.param(_truncate_data, id="truncated-arrays")])
def test_a_damaged_latest_step_falls_back_to_the_intact_one(tmp_path, damage, caplog):
    ones = {"kernels": {0: np.ones((64, 48), np.float32)}}  # not inlined in orbax's index
    store = StreamCheckpoints(tmp_path, "fingerprint")
    store.save(1, ones, {"applied": [[0]]})
    store.save(2, {"kernels": {0: 2 * ones["kernels"][0]}}, {"applied": [[0], [1]]})
    store.close()
    damage(tmp_path / "2")
    step, state, meta = StreamCheckpoints(tmp_path, "fingerprint").restore(ones)
    assert step == 1 and meta["applied"] == [[0]]
    np.testing.assert_array_equal(state["kernels"][0], ones["kernels"][0])
    assert f"checkpoint {tmp_path.resolve()} step 2 is damaged" in caplog.text
    damage(tmp_path / "1")
    with pytest.raises(CheckpointDamagedError, match=r"every step \(2, 1\) is damaged.*"
                                                     "--noresume"):
        StreamCheckpoints(tmp_path, "fingerprint").restore(ones)
