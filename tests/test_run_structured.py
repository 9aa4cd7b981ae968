"""A structured run on a real-format ZsRE file: an unencodable record is reported under
`failed` and skipped, the others are edited, and the per-request diagnostics are written."""

from __future__ import annotations

import json

import pytest
from test_main import model_directory, run_main, varied_text


def _zsre(subject: str, question: str) -> dict:
    return {"subject": subject, "src": question, "rephrase": question, "alt": "Paris",
            "answers": ["Rome"], "pred": "Rome", "loc": "nq question: who wrote it",
            "loc_ans": "Jane Austen", "cond": ""}


@pytest.mark.slow
def test_unencodable_record_is_skipped_and_reported(tmp_path, tiny_checkpoint,
                                                     tiny_tokenizer_dir):
    model = model_directory(tmp_path, tiny_checkpoint("llama"), tiny_tokenizer_dir)
    dataset = tmp_path / "zsre.json"
    # The tiny tokenizer drops "é": no token covers record 1's subject.
    # Record 3's target is longer than the tiny model's 128 positions.
    too_long = {**_zsre("Tokyo", "Where is Tokyo?"), "alt": " ".join(["Paris"] * 200)}
    dataset.write_text(json.dumps([_zsre("The Eiffel Tower", "Where is The Eiffel Tower?"),
                                   _zsre("é", "Where is é?"),
                                   _zsre("Marie Curie", "Where was Marie Curie born?"),
                                   too_long]))
    text = varied_text(tmp_path, "the capital of France is Paris Rome Japan tower river "
                                 "old new city born")
    out = tmp_path / "out"
    result = run_main(f"--model={model}", "--method=memit", f"--dataset={dataset}",
                      "--dataset_format=zsre", "--num_edits=5", "--edit_batch_size=1",
                      "--layers=0,1", "--v_num_grad_steps=3", f"--stats_source={text}",
                      "--stats_samples=64", f"--output_dir={out}", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert list(results["failed"]) == ["1", "3"] and "no token" in results["failed"]["1"]
    assert "more than the model's 128 positions" in results["failed"]["3"]
    assert "--num_edits=5 but" in result.stderr and "holds 4 records" in result.stderr
    requests = results["diagnostics"]["requests"]
    assert [r["case_id"] for r in requests] == [0, 2]
    for row in requests:
        assert row["delta_norm"] <= row["clamp_radius"] * (1 + 1e-5)
        assert 0 <= row["target_prob_edited"] <= 1
    assert "target prob" in result.stderr and "skipping request 1" in result.stderr
    assert json.loads((out / "partial.json").read_text())["failed"] == results["failed"]
    assert [c["case_id"] for c in results["cases"]] == [0, 2]
    assert set(results["cases"][0]["post"]) == {"rewrite_acc", "paraphrase_acc", "neighborhood_acc"}


def test_a_failure_in_the_11th_edit_keeps_the_first_10(tmp_path, monkeypatch):
    """A non-sequential run whose 11th request fails mid-run (its shift loss goes NaN) still
    reports the 10 finished edits, and lists the failure beside them."""
    from keedit_jax import flags
    from keedit_jax.api import resolve_checkpoint
    from keedit_jax.methods import run_structured as runner
    from keedit_jax.methods import structured
    from keedit_jax.upstream import NonFiniteShiftError

    monkeypatch.setenv("KEEDIT_CACHE", str(tmp_path / "cache"))
    real_edit = structured.edit_requests

    def failing_on_the_11th(params, cfg, tokenizer, requests, *args, **kwargs):
        if requests[0].case_id == 10:
            raise NonFiniteShiftError("request 10: the shift loss is nan at step 2")
        return real_edit(params, cfg, tokenizer, requests, *args, **kwargs)

    monkeypatch.setattr(structured, "edit_requests", failing_on_the_11th)
    out = tmp_path / "out"
    configs = {
        "ModelFlags": flags.ModelFlags(model="organism:small"),
        "DataFlags": flags.DataFlags(dataset_format="counterfact", num_edits=11),
        "EditFlags": flags.EditFlags(method="memit", edit_batch_size=1),
        "RunFlags": flags.RunFlags(output_dir=str(out), max_new_tokens=2),
        "StructuredFlags": flags.StructuredFlags(
            layers="1,2", fact_token="last", v_num_grad_steps=2, context_seeds="",
            mom2_update_weight=200, stats_samples=64)}
    out.mkdir()
    results = runner.run_structured(checkpoint=resolve_checkpoint("organism:small"),
                                    configs=configs)
    assert [c["case_id"] for c in results["cases"]] == list(range(10))
    assert results["failed"] == {"10": "request 10: the shift loss is nan at step 2"}
    assert len(results["seconds_per_batch"]) == 10
    assert results["title"].startswith("memit on 10 requests")
    partial = json.loads((out / "partial.json").read_text())
    assert partial["failed"] == results["failed"] and len(partial["diagnostics"]) == 10
