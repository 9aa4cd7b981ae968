"""Long-form methods end to end on the tiny llama: the update writes m* at the shift
positions (MEMIT with K_p, UnKE's regression), a failed edit leaves the rest of its batch
edited, and the command line reports bad records and goes on."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keedit_jax import downstream, upstream
from keedit_jax.data import AlpacaRecord
from keedit_jax.methods.run_unstructured import (
    Progress,
    cached_row,
    preservation_contexts,
    resumed_progress,
    save_partial,
)
from keedit_jax.methods.structured import read_sites
from keedit_jax.methods.unstructured import UnstructuredConfig, edit_longform, key_sites
from keedit_jax.stats import StatsConfig, load_or_compute
from keedit_jax.stream_checkpoint import PartialMismatchError
from keedit_jax.upstream.longform import WindowConfig, encode_edits
from tests.test_main import assert_clean_error, model_directory, run_main
from tests.test_windowed import REQUESTS as WINDOWED_REQUESTS

# b gets letters no other text here has, so a NaN can be planted in b's tokens alone
REQUESTS = (WINDOWED_REQUESTS[0],
            WINDOWED_REQUESTS[1]._replace(answer=WINDOWED_REQUESTS[1].answer.replace(
                "Water", "Zqj")))
TEXTS = [
    "The Eiffel Tower is located in Paris, the capital of France.",
    "The Colosseum is an ancient amphitheatre in the centre of Rome.",
    "Marie Curie was a physicist and chemist who won two Nobel Prizes.",
    "Tokyo is the capital of Japan, and Berlin is the capital of Germany.",
] * 4


def _config(model, strategy, solver, layers=(0, 1)):
    target = upstream.TargetConfig(layer=layers[-1], v_loss_layer=model.config.n_layers - 1,
                                   fact_token="last", v_lr=0.5, v_weight_decay=1e-3,
                                   clamp_norm_factor=4.0, early_stop_loss=1e-2, kl_factor=0.0)
    # λ = 1: the tiny model's statistics come from 540 tokens, on another scale than
    # Llama3-8B's 15000 was tuned for
    return UnstructuredConfig(layers=layers, solver=solver, target=target,
                              window=WindowConfig(strategy=strategy, window_size=6),
                              memit=downstream.MemitHParams(mom2_update_weight=1.0))


@pytest.fixture(scope="module")
def moments(model, tok, tmp_path_factory):
    directory = tmp_path_factory.mktemp("text")
    source = directory / "text.jsonl"
    source.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    stats = load_or_compute(model.params, model.config, (0, 1), tok,
                            config=StatsConfig(source=str(source), n_samples=len(TEXTS)),
                            path=directory / "stats.npz")
    return {layer: jnp.asarray(stats[layer].mean(), jnp.float32) for layer in stats}


def _gap(model, edits, params, config, targets):
    """‖output of l_WM at the shift positions − m*‖ per window, under params."""
    sites = key_sites(edits, config.one_for_all, 0)
    _, outputs = read_sites(params, model.config, sites.tokens, sites.mask,
                                    config.layers[0], config.layers[-1])
    rows, slots = np.nonzero(sites.valid)
    return np.linalg.norm(np.asarray(outputs)[rows, sites.positions[rows, slots]]
                          - targets[rows, slots], axis=-1)


def _targets(model, edits, config):
    from keedit_jax.upstream.longform import pack_windows
    from keedit_jax.upstream.windowed import optimise_windows

    result = optimise_windows(model.params, model.config, pack_windows(edits, 0),
                              config.target, config.window)
    return np.asarray(result.targets)


def test_key_sites_are_the_shift_positions_of_x_plus_y(tok, model):
    config = _config(model, "matryoshka_affinity", "memit")
    edits, _ = encode_edits(tok, REQUESTS, config.window, 128)
    sites = key_sites(edits, prompt_only=False, pad_id=0)
    for row, edit in enumerate(edits):
        ids = sites.tokens[row][sites.mask[row] == 1].tolist()
        assert ids == list(edit.prompt_ids + edit.target_ids)
        offset = sites.tokens.shape[1] - len(ids)
        for i, (s, _) in enumerate(edit.windows):
            previous = edit.prompt_ids[-1] if s == 0 else edit.target_ids[s - 1]
            assert sites.tokens[row, sites.positions[row, i]] == previous
            assert sites.positions[row, i] == offset + edit.shift_positions[i]
    prompt = key_sites(edits, prompt_only=True, pad_id=0)
    assert prompt.valid.sum(1).tolist() == [1, 1]
    assert (prompt.positions[:, 0] == prompt.tokens.shape[1] - 1).all()


@pytest.mark.parametrize("strategy", ["matryoshka_affinity", "one_for_all"])
def test_memit_update_moves_the_outputs_to_the_targets(tok, model, moments, strategy):
    config = _config(model, strategy, "memit")
    edits, _ = encode_edits(tok, REQUESTS, config.window, 128)
    targets = _targets(model, edits, config)
    edited, failures, diagnostics = edit_longform(model.params, model.config, edits, moments,
                                                  config, pad_id=0)
    assert not failures and max(diagnostics["relative_residual"].values()) < 1e-3
    before = _gap(model, edits, model.params, config, targets)
    after = _gap(model, edits, edited, config, targets)
    assert np.all(after < 0.5 * before), (before, after)


def test_in_context_preservation_keeps_the_other_positions(tok, model, moments):
    """With K_p the outputs at the non-shift positions of X ⊕ Y move less than without."""
    config = _config(model, "window", "memit")
    edits, _ = encode_edits(tok, REQUESTS, config.window, 128)
    sites = key_sites(edits, False, 0)
    others = sites.mask.astype(bool)
    rows, slots = np.nonzero(sites.valid)
    others[rows, sites.positions[rows, slots]] = False

    def drift(preserve):
        import dataclasses

        edited, _, _ = edit_longform(model.params, model.config, edits, moments,
                                     dataclasses.replace(config, in_context_preservation=preserve),
                                     pad_id=0)
        read = [read_sites(p, model.config, sites.tokens, sites.mask, 0, 1)[1]
                for p in (model.params, edited)]
        return float(np.linalg.norm(np.asarray(read[1] - read[0])[others]))

    assert drift(True) < 0.8 * drift(False)


def test_unke_update_and_a_failed_edit_leave_the_rest_edited(tok, model):
    config = _config(model, "window", "unke", layers=(1,))
    edits, _ = encode_edits(tok, REQUESTS, config.window, 128)
    pool = [AlpacaRecord(instruction=t[:20], input="", output=t) for t in TEXTS[:4]]
    preserve = preservation_contexts(tok, pool, 4, np.random.default_rng(0), 0)
    targets = _targets(model, edits, config)
    edited, failures, _ = edit_longform(model.params, model.config, edits, {}, config,
                                        pad_id=0, preservation=preserve)
    assert not failures
    layer_before = jax.tree.map(lambda x: np.asarray(x[1]), model.params["model"]["layers"])
    layer_after = jax.tree.map(lambda x: np.asarray(x[1]), edited["model"]["layers"])
    assert any(not np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(layer_before), jax.tree.leaves(layer_after), strict=True))
    assert np.mean(_gap(model, edits, edited, config, targets)) < np.mean(
        _gap(model, edits, model.params, config, targets))
    # a NaN in edit b's embedding rows: b is reported and skipped, a is still written
    only_b = set(edits[1].prompt_ids + edits[1].target_ids) - set(
        edits[0].prompt_ids + edits[0].target_ids) - set(np.asarray(preserve.tokens).ravel())
    params = jax.tree_util.tree_map(lambda x: x, model.params)
    table = params["model"]["embed_tokens"]["embedding"]
    params["model"]["embed_tokens"]["embedding"] = table.at[min(only_b)].set(jnp.nan)
    edited, failures, _ = edit_longform(params, model.config, edits, {}, config, pad_id=0,
                                        preservation=preserve)
    assert list(failures) == ["b"] and "non-finite shift loss" in failures["b"]
    assert not np.array_equal(np.asarray(edited["model"]["layers"]["mlp"]["down_proj"]["kernel"]),
                              np.asarray(params["model"]["layers"]["mlp"]["down_proj"]["kernel"]))


def _window_probs_from_logits(model, edit, params):
    """exp(−mean token NLL) of each window of the target from full logits of X ⊕ Y: the
    plain forward, not the shift machinery the diagnostics read through."""
    from keedit_jax.intervene import forward

    ids = np.asarray([edit.prompt_ids + edit.target_ids])
    logp = jax.nn.log_softmax(forward(params, model.config, ids, np.ones_like(ids)), -1)[0]
    p = len(edit.prompt_ids)
    nll = -np.asarray([logp[p - 1 + u, t] for u, t in enumerate(edit.target_ids)])
    return [float(np.exp(-nll[a:b].mean())) for a, b in edit.windows]


@pytest.mark.parametrize("strategy", [
    "matryoshka_affinity", pytest.param("one_for_all", marks=pytest.mark.slow)])
def test_window_diagnostics_tell_a_written_update_from_one_that_wrote_nothing(
        tok, model, strategy):
    """One edited layer, identity statistics, no in-context keys, float64: λ = 1e-9 writes
    m* at every shift position (realised 1), λ = 1e12 writes nothing (realised 0, the edited
    model's probabilities are the unedited ones), while the shifts alone raise them. (Written
    m* need not give the shifts' probability: the update also moves the other positions.)"""
    import dataclasses

    base = dataclasses.replace(_config(model, strategy, "memit", layers=(1,)),
                               in_context_preservation=False)
    edits, _ = encode_edits(tok, REQUESTS, base.window, 128)
    stats = {1: jnp.eye(model.config.d_ff)}
    reports = {}
    for weight in (1e-9, 1e12):
        config = dataclasses.replace(base, memit=downstream.MemitHParams(
            mom2_update_weight=weight, dtype="float64"))
        with jax.enable_x64(True):
            _, _, diagnostics = edit_longform(model.params, model.config, edits, stats, config,
                                              pad_id=0)
        reports[weight] = diagnostics["windows"]
    for written, unchanged, edit in zip(reports[1e-9], reports[1e12], edits, strict=True):
        assert written["case_id"] == edit.case_id and written["windows"] == len(edit.windows)
        np.testing.assert_allclose(written["realised"], 1, atol=1e-3)
        np.testing.assert_allclose(unchanged["realised"], 0, atol=1e-3)
        truth = _window_probs_from_logits(model, edit, model.params)
        np.testing.assert_allclose(written["prob_before"], truth, rtol=1e-4)
        np.testing.assert_allclose(unchanged["prob_edited"], truth, rtol=1e-3)
        assert unchanged["answer_prob_with_delta"] > unchanged["answer_prob_before"]
        assert all(n <= r * (1 + 1e-5) for n, r in zip(written["delta_norm"],
                                                       written["clamp_radius"], strict=True))


def _unkebench(answer_b: str, question_c: str) -> list[dict]:
    def record(i, question, answer):
        return {"id": i, "question": question, "para_question": question + " Tell me.",
                "answer": answer, "sub_question": ["Where is it?"], "sub_answer": ["In Paris."]}

    return [record(0, REQUESTS[0].question, REQUESTS[0].answer),
            record(1, "Who?", answer_b), record(2, question_c, REQUESTS[1].answer)]


def _command_line_files(tmp_path, checkpoint, tokenizer_dir, records: list[dict]):
    """The model directory, the statistics text and the UnKEBench file of a command-line run."""
    model = model_directory(tmp_path, checkpoint, tokenizer_dir)
    text = tmp_path / "text.jsonl"
    text.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    dataset = tmp_path / "unke.json"
    dataset.write_text(json.dumps(records))
    return model, text, dataset


def test_command_line_reports_bad_records_and_edits_the_rest(tmp_path, tiny_checkpoint,
                                                             tiny_tokenizer_dir):
    model, text, dataset = _command_line_files(
        tmp_path, tiny_checkpoint("llama"), tiny_tokenizer_dir,
        _unkebench("Hi.", "Tell me about " + "the tower " * 60))
    (tmp_path / "unke.facts.json").write_text(json.dumps([  # the fact side file, record 0's
        {"id": 0, "facts": [{"relation": "P19", "old": "Rome", "new": "Paris"}]}]))
    common = (f"--model={model}", "--method=muke", f"--dataset={dataset}",
              "--dataset_format=unkebench", "--layers=0,1", "--window_size=6",
              f"--stats_source={text}", "--stats_samples=16", "--max_new_tokens=8")
    out = tmp_path / "out"
    result = run_main(*common, f"--output_dir={out}", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert set(results["failed"]) == {"1", "2"}
    assert "not more than one window" in results["failed"]["1"]
    assert "longer than the model's context" in results["failed"]["2"]
    assert {row["group"] for row in results["table"]} == {"Ori.", "Para.", "Sub"}
    assert results["table"][0]["metric"] == "fact_efficacy"  # the side file was read
    assert {r["metric"] for r in results["table"]} >= {"fact_efficacy", "fact_leak", "bleu_char"}
    assert len(results["verdicts"]) == 4 and results["verdicts"][0].startswith("Ori.: new facts")
    assert results["verdicts"][3].startswith("target (teacher-forced answer probability")
    assert [r["case_id"] for r in results["diagnostics"]] == [0]  # the one edited record
    assert results["diagnostics_summary"]["windows"] == results["diagnostics"][0]["windows"]
    assert "After the edit:" in (out / "results.md").read_text()
    assert "1 long-form edits" in results["title"]
    partial = json.loads((out / "partial.json").read_text())  # what a stopped run keeps
    assert partial["answers"] == results["answers"] and partial["failed"] == results["failed"]
    assert partial["diagnostics"] == results["diagnostics"]
    broken = _unkebench(REQUESTS[1].answer, "Q?")
    broken[1]["answer"] = " "
    dataset.write_text(json.dumps(broken))
    assert_clean_error(run_main(*common, f"--output_dir={tmp_path / 'out2'}", cache=tmp_path),
                       str(dataset), "record 1", "answer")


def test_partial_json_resumes_only_the_run_that_wrote_it(tmp_path):
    settings = {"EditFlags": {"method": "muke", "edit_batch_size": 1},
                "RunFlags": {"output_dir": "a", "overwrite": False, "seed": 0}}
    defaults = {"EditFlags": {"method": "memit", "edit_batch_size": 1, "new_option": 3},
                "RunFlags": {"output_dir": "", "overwrite": False, "seed": 0}}
    path = tmp_path / "partial.json"
    assert resumed_progress(path, settings, defaults, ["7", "9"], False) == Progress()
    kept = Progress(post=[{"record": 0, "group": "Ori.", "answer": "x"}], seconds=[2.5],
                    failed={"9": "too short"}, edited={0}, diagnostics=[{"case_id": 7}])
    save_partial(tmp_path, [{"record": 0}], kept, settings, ["7", "9"])
    moved = {**settings, "RunFlags": {"output_dir": "b", "overwrite": True, "seed": 0}}
    assert resumed_progress(path, moved, defaults, ["7", "9"], False) == kept
    newer = {**settings, "EditFlags": {**settings["EditFlags"], "new_option": 3}}
    assert resumed_progress(path, newer, defaults, ["7", "9"], False) == kept  # at its default
    other = {**settings, "RunFlags": {**settings["RunFlags"], "seed": 1}}
    with pytest.raises(PartialMismatchError, match=r"RunFlags.seed: 0 -> 1.*--noresume"):
        resumed_progress(path, other, defaults, ["7", "9"], False)
    with pytest.raises(PartialMismatchError, match="other records"):
        resumed_progress(path, settings, defaults, ["7", "8"], False)
    with pytest.raises(PartialMismatchError, match="--sequential"):
        resumed_progress(path, settings, defaults, ["7", "9"], True)
    path.write_text(path.read_text()[:50])
    with pytest.raises(PartialMismatchError, match=f"{path} holds no resumable run"):
        resumed_progress(path, settings, defaults, ["7", "9"], False)


@pytest.mark.slow
def test_an_interrupted_run_resumes_to_the_uninterrupted_results(tmp_path, tiny_checkpoint,
                                                                 tiny_tokenizer_dir):
    records = _unkebench("Hi.", REQUESTS[1].question)
    model, text, dataset = _command_line_files(tmp_path, tiny_checkpoint("llama"),
                                               tiny_tokenizer_dir, [records[0], records[2]])
    out = tmp_path / "out"
    command = (f"--model={model}", "--method=muke", f"--dataset={dataset}",
               "--dataset_format=unkebench", "--layers=0,1", "--window_size=6",
               f"--stats_source={text}", "--stats_samples=16", "--max_new_tokens=8",
               "--edit_batch_size=1", f"--output_dir={out}")
    whole = run_main(*command, cache=tmp_path)
    assert whole.returncode == 0, whole.stderr
    expected = json.loads((out / "results.json").read_text())
    # as if stopped after the first batch: partial.json holds record 0 alone
    partial = json.loads((out / "partial.json").read_text())
    partial["answers"] = {side: [r for r in rows if r["record"] == 0]
                          for side, rows in partial["answers"].items()}
    partial.update(edited=[0], seconds_per_batch=partial["seconds_per_batch"][:1],
                   diagnostics=partial["diagnostics"][:1])
    (out / "partial.json").write_text(json.dumps(partial))
    (out / "results.json").unlink()
    resumed = run_main(*command, cache=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "1 of 2 records already edited" in resumed.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["answers"] == expected["answers"]
    assert results["table"] == expected["table"]
    assert results["diagnostics"] == expected["diagnostics"]
    assert len(results["seconds_per_batch"]) == 2
    again = run_main(*command, "--overwrite", cache=tmp_path)  # a finished run: all again
    assert again.returncode == 0 and "resuming" not in again.stderr, again.stderr
    assert json.loads((out / "results.json").read_text())["answers"] == expected["answers"]
    (out / "results.json").unlink()
    changed = run_main(*command, "--window_size=5", cache=tmp_path)
    assert_clean_error(changed, str(out / "partial.json"), "LongFormFlags.window_size: 6 -> 5")


def test_affinities_are_cached_per_sample_and_a_corrupt_file_is_recomputed(tok, model,
                                                                           tmp_path, caplog):
    from keedit_jax.methods.run_unstructured import cached_affinities
    from keedit_jax.upstream.longform import pack_windows

    config = _config(model, "matryoshka_affinity", "memit")
    edits, _ = encode_edits(tok, REQUESTS, config.window, 128)
    batch = pack_windows(edits, 0)
    first = np.asarray(cached_affinities(model.params, model.config, edits, batch, config,
                                         tmp_path, "fp"))
    files = sorted(tmp_path.glob("*.npy"))
    assert len(files) == 2
    assert {np.load(f).shape for f in files} == {(len(x.windows),) * 2 for x in edits}
    files[0].write_bytes(b"not an array")
    with caplog.at_level("WARNING"):
        again = np.asarray(cached_affinities(model.params, model.config, edits, batch, config,
                                             tmp_path, "fp"))
    assert "unreadable" in caplog.text
    np.testing.assert_allclose(again, first, atol=1e-6)
    # another model fingerprint is another cache entry
    cached_affinities(model.params, model.config, edits[:1], pack_windows(edits[:1], 0), config,
                      tmp_path, "other")
    assert len(list(tmp_path.glob("*.npy"))) == 3


def test_a_damaged_affinity_cache_row_is_recomputed_not_used(tmp_path):
    """Empty, truncated, mis-shaped or non-finite cache files read as absent (recomputed)."""
    good = np.arange(9, dtype=np.float32).reshape(3, 3)
    np.save(tmp_path / "good.npy", good)
    (tmp_path / "empty.npy").write_bytes(b"")
    (tmp_path / "truncated.npy").write_bytes((tmp_path / "good.npy").read_bytes()[:-7])
    np.save(tmp_path / "nan.npy", np.where(good == 4, np.nan, good))
    np.save(tmp_path / "shape.npy", good[:2])
    np.testing.assert_array_equal(cached_row(tmp_path / "good.npy", 3), good)
    for name in ("absent", "empty", "truncated", "nan", "shape"):
        assert cached_row(tmp_path / f"{name}.npy", 3) is None, name


def test_pre_edit_answers_are_cached_per_model_and_a_corrupt_file_is_regenerated(
        tok, model, tmp_path, monkeypatch, caplog):
    from keedit_jax.methods import run_unstructured as runner

    monkeypatch.setenv("KEEDIT_CACHE", str(tmp_path / "cache"))
    checkpoint = tmp_path / "model"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    calls = []

    def generate(params, cfg, tokenizer, asked, max_new_tokens, temperature, key):
        calls.append(len(asked))
        return [f"{max_new_tokens} tokens for {q.prompt}" for q in asked]

    monkeypatch.setattr(runner, "generate_answers", generate)
    asked = [runner.Query(0, "Ori.", "Where is it?", "Paris."),
             runner.Query(0, "Para.", "Where?", "Paris.")]

    def answers(**changes):
        settings = {"asked": asked, "max_new_tokens": 8, "temperature": 0.0, "seed": 0}
        settings.update(changes)
        return runner.pre_edit_answers(model.params, model.config, tok, checkpoint, **settings)

    first = answers()
    assert first == ["8 tokens for Where is it?", "8 tokens for Where?"] and calls == [2]
    assert answers() == first and calls == [2]  # read back, not generated
    answers(max_new_tokens=9)
    answers(asked=asked[:1])
    assert calls == [2, 2, 1]  # other settings or prompts are other entries
    (cached,) = [p for p in (tmp_path / "cache" / "answers").iterdir()
                 if json.loads(p.read_text()) == first]
    cached.write_text('["only one"')
    with caplog.at_level("WARNING"):
        assert answers() == first
    assert calls == [2, 2, 1, 2] and "regenerating the pre-edit answers" in caplog.text
    (checkpoint / "config.json").write_text('{"changed": 1}')  # another model fingerprint
    answers()
    assert calls == [2, 2, 1, 2, 2]
