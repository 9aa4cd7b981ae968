"""Long-form edit metrics as the AnyEdit and μKE papers computed them, and standard ones beside.

The papers' scores (docs/references.md: muke §5.3, anyedit §6; both repos' `summarize_uns.py`) are
reproduced exactly, without nltk or rouge at runtime (the tests compare against both):

- `prepare_prediction`: a prediction without any space gets one appended (guards empty outputs).
- `char_bleu`: `nltk.translate.bleu_score.sentence_bleu([reference], prediction)` on raw
  strings, so NLTK iterates characters: character 4-gram BLEU, uniform weights, no smoothing.
- `rouge_recall`: `rouge.Rouge().get_scores(prediction, reference)[0][m]['r']` of the PyPI
  `rouge` package 1.0.1 for m in rouge-1, rouge-2, rouge-l. That package counts *distinct*
  n-grams and words, and its ROUGE-L is the summary-level union LCS over sentences split at '.'.
- "BERT score": cosine of all-MiniLM-L6-v2 sentence embeddings, not Zhang et al.'s BERTScore.

Standard, clearly named alternatives: `sacrebleu_sentence` (sacreBLEU 13a, exp smoothing) and
word-level ROUGE-L F1 (`text_metrics.rouge_l`). Every score is in [0, 1]; reports multiply by
100 as the papers' tables do.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable, Mapping, Sequence

import numpy as np
import sacrebleu

from keedit_jax.eval.sentence_encoder import pairwise_cosine
from keedit_jax.eval.text_metrics import MAX_ORDER, _ngrams, ngram_precision, rouge_l

Embedder = Callable[[Sequence[str]], np.ndarray]

# Keys of `score_pair`: the papers' metrics, then the standard ones.
PAPER_KEYS = ("bleu_char", "rouge1_recall", "rouge2_recall", "rougeL_recall")
STANDARD_KEYS = ("sacrebleu", "rougeL_f1")
EMBEDDING_KEY = "bert_score"


def prepare_prediction(prediction: str) -> str:
    """The papers' preprocessing: append ' ' to a prediction that contains no space."""
    return prediction if " " in prediction else prediction + " "


def char_bleu(prediction: str, reference: str) -> float:
    """NLTK 3.x `sentence_bleu([reference], prediction)` on raw strings, bit for bit.

    Characters are the tokens. NLTK returns 0 when no character matches; otherwise a zero
    higher-order precision becomes `sys.float_info.min` (log ~ -708), so the score is tiny
    (~1e-77) but not 0, and NLTK warns. With one reference the brevity penalty uses its length.
    """
    precisions = [ngram_precision(prediction, reference, n) for n in range(1, MAX_ORDER + 1)]
    if precisions[0] == 0.0:
        return 0.0
    log_sum = math.fsum(math.log(p if p > 0 else sys.float_info.min) / MAX_ORDER
                        for p in precisions)
    hyp_len, ref_len = len(prediction), len(reference)
    brevity = 1.0 if hyp_len > ref_len else math.exp(1 - ref_len / hyp_len)
    return brevity * math.exp(log_sum)


def rouge_sentences(text: str) -> list[list[str]]:
    """The `rouge` package's tokenisation: split at every '.', drop empty pieces, collapse
    whitespace, split on ' '. A whitespace-only piece survives as the one token ''."""
    return [" ".join(piece.split()).split(" ") for piece in text.split(".") if piece]


def _rouge_n_recall(hyp: list[list[str]], ref: list[list[str]], n: int) -> float:
    """Distinct n-grams of the reference found in the prediction, words joined across '.'."""
    ref_grams = set(_ngrams([w for s in ref for w in s], n))
    if not ref_grams:
        return 0.0
    hyp_grams = set(_ngrams([w for s in hyp for w in s], n))
    return len(hyp_grams & ref_grams) / len(ref_grams)


def _lcs_tokens(x: Sequence[str], y: Sequence[str]) -> list[str]:
    """One longest common subsequence, backtracked with `rouge`'s tie-break (which one is
    chosen decides the token set the union counts)."""
    table = [[0] * (len(y) + 1) for _ in range(len(x) + 1)]
    for i, a in enumerate(x, start=1):
        for j, b in enumerate(y, start=1):
            table[i][j] = table[i - 1][j - 1] + 1 if a == b else max(table[i - 1][j],
                                                                     table[i][j - 1])
    tokens, i, j = [], len(x), len(y)
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            tokens.append(x[i - 1])
            i, j = i - 1, j - 1
        elif table[i - 1][j] > table[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return tokens


def _rouge_l_recall(hyp: list[list[str]], ref: list[list[str]]) -> float:
    """Summary-level union LCS as `rouge` 1.0.1 counts it: the distinct words of every
    (reference sentence, prediction sentence) LCS, over the distinct reference words."""
    union = {token for r in ref for h in hyp for token in _lcs_tokens(r, h)}
    return len(union) / len({w for s in ref for w in s})


def rouge_recall(prediction: str, reference: str) -> dict[str, float]:
    """ROUGE-1/2/L recall exactly as `rouge` 1.0.1 `Rouge().get_scores(prediction, reference)`.

    Case- and punctuation-sensitive apart from '.', which splits sentences. Raises ValueError,
    as the package does, when either text has no sentence (empty or only '.'). Unlike the
    package, long sentences need no raised recursion limit.
    """
    hyp, ref = rouge_sentences(prediction), rouge_sentences(reference)
    for side, text, sentences in (("prediction", prediction, hyp), ("reference", reference, ref)):
        if not sentences:
            raise ValueError(f"ROUGE needs a non-empty {side}, not {text!r}")
    return {"rouge-1": _rouge_n_recall(hyp, ref, 1), "rouge-2": _rouge_n_recall(hyp, ref, 2),
            "rouge-l": _rouge_l_recall(hyp, ref)}


def sacrebleu_sentence(prediction: str, reference: str) -> float:
    """Standard sentence BLEU (sacreBLEU defaults: 13a tokens, exp smoothing), in [0, 1]."""
    return sacrebleu.sentence_bleu(prediction, [reference]).score / 100


def score_pairs(predictions: Sequence[str], references: Sequence[str],
                embed: Embedder | None = None) -> list[dict[str, float]]:
    """Every metric per (prediction, reference) pair, after the papers' preprocessing (which
    changes none of the standard scores). `embed` (e.g. `SentenceEncoder.embed`) adds
    "bert_score", computed in one batched call per side."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions for {len(references)} references")
    predictions = [prepare_prediction(p) for p in predictions]
    scores = []
    for prediction, reference in zip(predictions, references, strict=True):
        rouge = rouge_recall(prediction, reference)
        scores.append({"bleu_char": char_bleu(prediction, reference),
                       "rouge1_recall": rouge["rouge-1"], "rouge2_recall": rouge["rouge-2"],
                       "rougeL_recall": rouge["rouge-l"],
                       "sacrebleu": sacrebleu_sentence(prediction, reference),
                       "rougeL_f1": rouge_l(prediction, reference)})
    if embed is not None and scores:
        for score, cosine in zip(scores, pairwise_cosine(embed(predictions), embed(references)),
                                 strict=True):
            score[EMBEDDING_KEY] = float(cosine)
    return scores


def score_pair(prediction: str, reference: str, embed: Embedder | None = None) -> dict[str, float]:
    """`score_pairs` for one pair."""
    return score_pairs([prediction], [reference], embed)[0]


def aggregate(scores: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over samples (the papers average per-sample scores)."""
    if not scores:
        raise ValueError("no scores to aggregate")
    keys = set(scores[0])
    if any(set(s) != keys for s in scores):
        raise ValueError("samples were scored with different metrics")
    return {key: math.fsum(s[key] for s in scores) / len(scores) for key in scores[0]}
