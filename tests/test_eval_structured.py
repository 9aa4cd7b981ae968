"""The MEMIT structured-editing protocol on hand-computed cases, and our teacher-forced scores
against a direct numpy computation from `forward` logits on a tiny model."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
import pytest

from keedit_jax import testing
from keedit_jax.data import CounterFactRecord, DatasetError, Request, ZsreRecord
from keedit_jax.eval import structured as st
from keedit_jax.intervene import forward


def _fake_score_fn(table: dict[tuple[str, str], Sequence[tuple[float, bool]]]) -> st.ScoreFn:
    """(prompt, continuation) -> per-token (probability, argmax is the target)."""

    def score(pairs: Sequence[tuple[str, str]]) -> list[st.TargetScore]:
        out = []
        for pair in pairs:
            probs, hits = zip(*table[pair], strict=True)
            ids = np.arange(len(probs)) + 10
            out.append(st.TargetScore(target_ids=ids, logprobs=np.log(probs),
                                      predicted=np.where(hits, ids, 0)))
        return out

    return score


def _cf_record() -> CounterFactRecord:
    request = Request(case_id=7, prompt="{} speaks", subject="Ann", target_new="French",
                      target_true="English")
    return CounterFactRecord(request=request, relation_id="P103", pararel_idx=None,
                             target_new_id="Q150", target_true_id="Q1860",
                             paraphrase_prompts=("Ann's language is", "Ann talks"),
                             neighborhood_prompts=("Bob speaks",), attribute_prompts=(),
                             generation_prompts=("Ann is",))


CF_TABLE = {
    # rewrite: new mean NLL = -(ln .5 + ln .2)/2, true = -ln .1 -> new preferred
    ("Ann speaks", " French"): [(0.5, True), (0.2, True)],
    ("Ann speaks", " English"): [(0.1, False)],
    # paraphrase 1: new wins; paraphrase 2: true wins
    ("Ann's language is", " French"): [(0.6, True), (0.6, False)],
    ("Ann's language is", " English"): [(0.3, False)],
    ("Ann talks", " French"): [(0.05, False), (0.5, True)],
    ("Ann talks", " English"): [(0.4, True)],
    # neighbourhood: true should win, and does
    ("Bob speaks", " French"): [(0.2, False), (0.2, False)],
    ("Bob speaks", " English"): [(0.7, True)],
}


def test_counterfact_probability_tests_by_hand() -> None:
    case = st.evaluate_counterfact(_cf_record(), _fake_score_fn(CF_TABLE))
    rewrite = case.rewrite[0]
    assert rewrite.nll_new == pytest.approx(-(math.log(0.5) + math.log(0.2)) / 2)
    assert rewrite.nll_true == pytest.approx(-math.log(0.1))
    m = case.metrics()
    assert m["rewrite_success"] == 1.0 and m["rewrite_acc"] == 1.0
    assert m["rewrite_diff"] == pytest.approx(math.sqrt(0.5 * 0.2) - 0.1)
    assert m["paraphrase_success"] == 0.5 and m["paraphrase_acc"] == 0.0
    assert m["paraphrase_diff"] == pytest.approx(
        ((0.6 - 0.3) + (math.sqrt(0.05 * 0.5) - 0.4)) / 2)
    assert m["neighborhood_success"] == 1.0 and m["neighborhood_acc"] == 1.0
    assert m["neighborhood_diff"] == pytest.approx(0.7 - 0.2)
    assert "ngram_entropy" not in m


def test_summary_and_harmonic_score() -> None:
    cases = [{"rewrite_success": 1.0, "paraphrase_success": 0.5, "neighborhood_success": 1.0},
             {"rewrite_success": 0.0, "paraphrase_success": 1.0,
              "neighborhood_success": math.nan}]
    out = st.summarize(cases)
    assert out["rewrite_success"] == pytest.approx((50.0, 50.0))
    assert out["paraphrase_success"] == pytest.approx((75.0, 25.0))
    assert out["neighborhood_success"] == pytest.approx((100.0, 0.0))  # nan case left out
    assert out["score"][0] == pytest.approx(3 / (1 / 50 + 1 / 75 + 1 / 100))


def test_empty_prompt_lists_are_undefined() -> None:
    assert math.isnan(st.success_score((), prefer_new=True))
    assert st.compare_targets(_fake_score_fn({}), (), "a", "b") == ()


def test_ngram_entropy_by_hand() -> None:
    # tokens a b a b: bigrams {ab: 2, ba: 1}, trigrams {aba: 1, bab: 1}
    h2 = -(2 / 3 * math.log2(2 / 3) + 1 / 3 * math.log2(1 / 3))
    expected = (2 / 3 * h2 + 4 / 3 * 1.0) / 2
    assert st.text_ngram_entropy("a b a b") == pytest.approx(expected)
    assert st.text_ngram_entropy("a") == 0.0
    # all distinct: H2 = log2(3), H3 = log2(2) over "w x y z"
    distinct = (2 / 3 * math.log2(3) + 4 / 3 * 1.0) / 2
    assert st.ngram_entropy(["a b a b", "w x y z"]) == pytest.approx((expected + distinct) / 2)


def test_word_tokenize_follows_treebank() -> None:
    assert st.word_tokenize('He said, "I can\'t go." Then (maybe) he left.') == [
        "He", "said", ",", "``", "I", "ca", "n't", "go", ".", "''", "Then", "(", "maybe", ")",
        "he", "left", "."]


def test_tfidf_consistency_by_hand(tmp_path) -> None:
    vocab = {"paris": 0, "french": 1, "wine": 2}
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0, 3.0]))
    (tmp_path / "vocab.json").write_text(json_dump(vocab), encoding="utf-8")
    tfidf = st.load_tfidf(tmp_path / "idf.npy", tmp_path / "vocab.json")
    a, b = [2.0, 2.0, 0.0], [0.0, 2.0, 3.0]  # "Paris paris French a", "french WINE"
    expected = np.dot(a, b) / np.linalg.norm(a) / np.linalg.norm(b)
    assert st.tfidf_similarity("Paris paris, French a", "french WINE", tfidf) == pytest.approx(
        expected)
    snippets_path = tmp_path / "attribute_snippets.json"
    snippets_path.write_text(json_dump([{"relation_id": "P103", "target_id": "Q150", "samples": [
        {"name": "X", "text": "french"}, {"name": "Y", "text": "WINE"}]}]), encoding="utf-8")
    snippets = st.load_attribute_snippets(snippets_path)
    assert snippets.for_record(_cf_record()) == ("french", "WINE")
    case = st.evaluate_counterfact(_cf_record(), _fake_score_fn(CF_TABLE),
                                   generate_fn=lambda ps: ["Paris paris, French a"] * len(ps),
                                   snippets=snippets, tfidf=tfidf)
    assert case.metrics()["reference_score"] == pytest.approx(expected)
    assert case.metrics()["ngram_entropy"] == pytest.approx(
        st.text_ngram_entropy("Paris paris, French a"))


def test_malformed_consistency_files_are_named(tmp_path) -> None:
    snippets = tmp_path / "attribute_snippets.json"
    snippets.write_text(json_dump([{"relation_id": "P103", "samples": [{"name": "X"}]}]),
                        encoding="utf-8")
    with pytest.raises(DatasetError) as error:
        st.load_attribute_snippets(snippets)
    assert [(p.index, p.field) for p in error.value.problems] == [
        (0, "target_id"), (0, "samples[0].text")]
    assert "attribute_snippets.json" in str(error.value)
    np.save(tmp_path / "idf.npy", np.array([1.0, 2.0]))
    (tmp_path / "vocab.json").write_text(json_dump({"paris": 0, "wine": 5}), encoding="utf-8")
    with pytest.raises(DatasetError, match=r"idf\.npy: idf of shape \(2,\) does not cover"):
        st.load_tfidf(tmp_path / "idf.npy", tmp_path / "vocab.json")
    np.save(tmp_path / "idf.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DatasetError, match=r"idf\.npy: TF-IDF idf not readable"):  # no unpickling
        st.load_tfidf(tmp_path / "idf.npy", tmp_path / "vocab.json")


def json_dump(value) -> str:
    import json  # noqa: PLC0415

    return json.dumps(value)


def test_zsre_token_accuracy_by_hand() -> None:
    record = ZsreRecord(request=Request(case_id=0, prompt="Where is {}?", subject="Ann",
                                        target_new="Rome", target_true="Oslo"),
                        rephrase="Ann lives where?", loc="nq question: who won", loc_ans="Bo",
                        alt="Rome", answers=("Oslo",), pred=None)
    table = {("Where is Ann?", " Rome"): [(0.9, True), (0.1, False), (0.9, True)],
             ("Ann lives where?", " Rome"): [(0.9, False), (0.1, False), (0.9, True)],
             ("nq question: who won?", " Bo"): [(0.5, True), (0.5, True)]}
    case = st.evaluate_zsre(record, _fake_score_fn(table))
    assert case.metrics() == pytest.approx({"rewrite_acc": 2 / 3, "paraphrase_acc": 1 / 3,
                                            "neighborhood_acc": 1.0})
    table[("nq question: who won?", " Bo")] = [(0.5, False), (0.5, True)]
    assert st.locality_agreement(case, st.evaluate_zsre(record, _fake_score_fn(table))) == 0.5


def _direct_scores(model, prompt: list[int], target: list[int]):
    """log P and argmax of the target tokens from `forward` on the unpadded row, in numpy."""
    tokens = np.asarray([prompt + target], np.int32)
    logits = np.asarray(forward(model.params, model.config, jnp.asarray(tokens),
                                jnp.ones_like(jnp.asarray(tokens))), np.float64)[0]
    at = logits[len(prompt) - 1: len(prompt) + len(target) - 1]
    log_probs = at - at.max(-1, keepdims=True)
    log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
    return log_probs[np.arange(len(target)), target], at.argmax(-1)


def test_teacher_forced_scores_match_forward(tiny_checkpoint, tiny_tokenizer_dir) -> None:
    from transformers import AutoTokenizer  # noqa: PLC0415

    model = testing.cached_model(tiny_checkpoint("llama"))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
    pairs = [("The mother tongue of Danielle Darrieux is", " French"),
             ("Tokyo is the capital of", " Japan, and Berlin"), ("Water", " boils")]
    scores = st.model_score_fn(model.params, model.config, tokenizer, max_rows=2)(pairs)
    for (prompt, target), score in zip(pairs, scores, strict=True):
        prompt_ids = tokenizer(prompt)["input_ids"]
        target_ids = tokenizer(target, add_special_tokens=False)["input_ids"]
        assert len(prompt_ids) >= 1 and len(target_ids) >= 1
        logp, argmax = _direct_scores(model, prompt_ids, target_ids)
        np.testing.assert_array_equal(score.target_ids, target_ids)
        np.testing.assert_allclose(score.logprobs, logp, atol=1e-4, err_msg=prompt)
        np.testing.assert_array_equal(score.predicted, argmax, err_msg=prompt)
        assert score.mean_nll == pytest.approx(-np.mean(logp), abs=1e-4)


def test_one_program_per_bucket(tiny_checkpoint) -> None:
    model = testing.cached_model(tiny_checkpoint("llama"))
    rows = [([1, 5, 6, 7], [8, 9]), ([1, 4], [5])]
    st.teacher_forced_scores(model.params, model.config, rows)
    size = st._next_token_scores_jit._cache_size()
    st.teacher_forced_scores(model.params, model.config, [([1, 9, 9], [4, 4, 4]), ([1], [7])])
    assert st._next_token_scores_jit._cache_size() == size  # same (2, 8) bucket: no retrace
    with pytest.raises(ValueError, match="row 1: empty"):
        st.teacher_forced_scores(model.params, model.config, [([1], [2]), ([], [3])])
