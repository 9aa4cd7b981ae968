"""The papers' long-form metrics against the very packages their code called (nltk, rouge 1.0.1),
on hand-made and generated texts, plus hand-computed values and the standard metrics beside."""

from __future__ import annotations

import math
import sys
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keedit_jax.eval import longform_metrics as lm
from keedit_jax.eval.text_metrics import rouge_l

bleu_score = pytest.importorskip("nltk.translate.bleu_score")
rouge = pytest.importorskip("rouge")

# Few symbols so that texts share n-grams; '.' splits ROUGE sentences, odd whitespace included.
TEXT = st.text(alphabet="ab c.\n\t\u00a0", max_size=40)
PAIRS = [
    ("the cat", "the cat sat"),
    ("The cat sat on the mat. It was happy.", "the cat sat on a mat. it was very happy. yes"),
    ("Paris is the capital of France.", "Paris is the capital of France."),
    ("a", "abc"),  # no 2-gram overlap: NLTK's tiny non-zero score
    ("xyz", "abc"),  # no character overlap: exactly 0
    ("a. . b", "a b. c"),  # a whitespace-only sentence is the token ''
    ("b a b a. a b", "a b a b. b a"),  # LCS tie-breaks decide the union
    ("word", "a much longer reference text than the prediction"),
]


def nltk_bleu(prediction: str, reference: str) -> float:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NLTK warns on every zero n-gram precision
        return bleu_score.sentence_bleu([reference], prediction)


def package_rouge(prediction: str, reference: str) -> dict[str, float]:
    scores = rouge.Rouge().get_scores(prediction, reference)[0]
    return {key: scores[key]["r"] for key in ("rouge-1", "rouge-2", "rouge-l")}


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_char_bleu_equals_nltk_on_raw_strings(prediction, reference):
    prediction = lm.prepare_prediction(prediction)
    assert lm.char_bleu(prediction, reference) == nltk_bleu(prediction, reference)


@settings(max_examples=400, deadline=None)
@given(prediction=TEXT, reference=TEXT)
def test_char_bleu_equals_nltk_on_generated_strings(prediction, reference):
    assert lm.char_bleu(prediction, reference) == nltk_bleu(prediction, reference)


def test_char_bleu_by_hand():
    assert lm.char_bleu("abcd", "abcd") == 1.0
    # 'ab' against 'abc': p1 = p2 = 1, p3 = p4 = 0 -> NLTK's floor, brevity exp(1 - 3/2).
    tiny = math.exp(1 - 3 / 2) * math.exp(math.log(sys.float_info.min) / 2)
    assert lm.char_bleu("ab", "abc") == pytest.approx(tiny, rel=1e-12)
    assert lm.char_bleu("xyz", "abc") == 0.0
    assert lm.char_bleu("", "abc") == 0.0


@pytest.mark.parametrize(("prediction", "reference"), PAIRS)
def test_rouge_recall_equals_package(prediction, reference):
    prediction = lm.prepare_prediction(prediction)
    assert lm.rouge_recall(prediction, reference) == package_rouge(prediction, reference)


@settings(max_examples=400, deadline=None)
@given(prediction=TEXT, reference=TEXT)
def test_rouge_recall_equals_package_on_generated_strings(prediction, reference):
    try:
        expected = package_rouge(prediction, reference)
    except ValueError:  # the package refuses a text with no sentence; so must we
        with pytest.raises(ValueError, match="ROUGE needs a non-empty"):
            lm.rouge_recall(prediction, reference)
        return
    assert lm.rouge_recall(prediction, reference) == expected


def test_rouge_recall_by_hand():
    assert lm.rouge_recall("the cat", "the cat sat") == {
        "rouge-1": 2 / 3, "rouge-2": 1 / 2, "rouge-l": 2 / 3}
    # Distinct words only: "the the" covers 1 of the 2 distinct reference words {the, cat}.
    assert lm.rouge_recall("the the", "the cat the")["rouge-1"] == 1 / 2
    # Case-sensitive; '.' splits sentences but n-grams still run across the split.
    assert lm.rouge_recall("The cat", "the cat")["rouge-1"] == 1 / 2
    assert lm.rouge_recall("a b", "a. b")["rouge-2"] == 1.0
    # Summary-level ROUGE-L: the union of per-sentence LCS words ("a c" and "b").
    assert lm.rouge_recall("a x c. b", "a b c")["rouge-l"] == 1.0
    with pytest.raises(ValueError, match="reference"):
        lm.rouge_recall("a b", "...")


def test_prediction_without_space_gets_one():
    assert lm.prepare_prediction("") == " "
    assert lm.prepare_prediction("Paris.") == "Paris. "
    assert lm.prepare_prediction("in Paris") == "in Paris"
    # An empty generation would crash the rouge package; after preprocessing it scores 0.
    assert lm.score_pair("", "Paris is in France")["rouge1_recall"] == 0.0


def test_score_pair_names_paper_and_standard_metrics():
    scores = lm.score_pair("the cat", "the cat sat")
    assert set(scores) == set(lm.PAPER_KEYS + lm.STANDARD_KEYS)
    assert scores["bleu_char"] == nltk_bleu("the cat", "the cat sat")
    assert scores["rougeL_recall"] == 2 / 3
    assert scores["rougeL_f1"] == rouge_l("the cat", "the cat sat") == 0.8
    sacrebleu = pytest.importorskip("sacrebleu")
    assert scores["sacrebleu"] == sacrebleu.sentence_bleu("the cat", ["the cat sat"]).score / 100
    assert lm.score_pair("a b c d e", "a b c d e")["sacrebleu"] == pytest.approx(1.0)
    # The papers' appended space changes neither standard score.
    assert lm.sacrebleu_sentence("Paris. ", "Paris.") == lm.sacrebleu_sentence("Paris.", "Paris.")
    assert rouge_l("Paris. ", "Paris.") == rouge_l("Paris.", "Paris.") == 1.0


def test_score_pairs_adds_embedding_cosine_and_aggregates():
    def embed(texts):  # a stand-in embedder: 2-d vectors from the stripped text's length
        return np.array([[len(t.strip()), 1.0] for t in texts])

    scores = lm.score_pairs(["ab", "abc"], ["ab", "x"], embed=embed)
    assert scores[0][lm.EMBEDDING_KEY] == pytest.approx(1.0)
    expected = (3 * 1 + 1) / (math.hypot(3, 1) * math.hypot(1, 1))
    assert scores[1][lm.EMBEDDING_KEY] == pytest.approx(expected)
    mean = lm.aggregate(scores)
    assert mean["rouge1_recall"] == pytest.approx((1.0 + 0.0) / 2)
    assert mean[lm.EMBEDDING_KEY] == pytest.approx((1.0 + expected) / 2)
    with pytest.raises(ValueError, match="different metrics"):
        lm.aggregate([scores[0], lm.score_pair("a", "b")])
    with pytest.raises(ValueError, match="predictions"):
        lm.score_pairs(["a"], [])
