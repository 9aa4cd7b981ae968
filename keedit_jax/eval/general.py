"""General capability under sequential editing: GLUE-style generation tests and drift metrics.

GLUE-style tasks (ote_se §5.4; prompts and labels in `keedit_jax.data.general`): each prompt
is continued greedily for `max_new_tokens` (5) tokens, 0-shot and without a chat template, and
the answer is parsed from the continuation alone (`parse_answer`):
- word answers (positive/negative, Yes/No, True/False): the earliest whole-word,
  case-insensitive occurrence of one of the task's answer words;
- letter answers (MMLU, dialogue): the first capital A-D standing alone (not inside a word),
  e.g. " B\n", " (C)", " D. ...";
- nothing found: -1, "invalid", which counts as wrong.
These rules are ours. The AlphaEdit harness tests substrings in a fixed order ("no" also
matches "not", "true" matches "untrue") and takes a letter only when a newline follows it;
the results differ only on continuations that the rules read differently.

Scores per task: weighted F1 exactly as scikit-learn's `f1_score(average="weighted")` (the
papers' "F1"), accuracy, Matthews correlation (sklearn's multiclass form; MetaKE reports it for
CoLA) and the number of invalid answers. In F1 and MCC the invalid answers are one more
predicted class, -1, which has no support: it lowers the recall of the true classes and adds no
term to the weighted mean. An all-invalid model scores F1 0.

Drift (ote_se §5.5 Eqs. 40-41, A15) on held-out text, teacher-forced:
PPL = exp(mean token NLL) and Agree_top1 = the fraction of scored positions where the edited
model's argmax equals the original model's. `held_out_batches` tokenizes the texts once into
left-padded batches; `reference_predictions` gives the original model's argmaxes once, to be
passed to every later `perplexity_drift` call of a sequential run. A position is scored when it
and the token it predicts are both real (the first token of each window and pads never are).
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from keedit_jax.data.general import GeneralExample
from keedit_jax.eval.structured import _next_token_scores_jit
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.generate import GenerationConfig, bucket, generate, left_pad
from keedit_jax.models.params import Params, to_device
from keedit_jax.models.tokenizer import encode_prompts, stop_token_ids

INVALID = -1

# ---------------------------------------------------------------- answer parsing


def _answer_pattern(label_names: tuple[str, ...]) -> re.Pattern[str]:
    if all(len(name) == 1 and name.isupper() for name in label_names):
        letters = "".join(re.escape(name) for name in label_names)
        return re.compile(rf"(?<![A-Za-z])([{letters}])(?![A-Za-z])")
    words = "|".join(re.escape(name) for name in label_names)
    return re.compile(rf"\b({words})\b", re.IGNORECASE)


def parse_answer(text: str, label_names: Sequence[str]) -> int:
    """The class whose answer word the continuation `text` gives first; INVALID (-1) if none.

    Single capital letters (A-D) must stand alone; words match whole and case-insensitively.
    """
    names = tuple(label_names)
    match = _answer_pattern(names).search(text)
    if match is None:
        return INVALID
    found = match.group(1).lower()
    return next(i for i, name in enumerate(names) if name.lower() == found)


# ---------------------------------------------------------------- classification metrics


def _as_labels(labels: Sequence[int], preds: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(labels, np.int64), np.asarray(preds, np.int64)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"need equally long, non-empty label lists, got {y_true.shape} and "
                         f"{y_pred.shape}")
    return y_true, y_pred


def _confusion(y_true: np.ndarray, y_pred: np.ndarray) -> np.ndarray:
    """Counts [true class, predicted class] over the sorted union of both label sets."""
    classes = np.union1d(y_true, y_pred)
    matrix = np.zeros((classes.size, classes.size), np.int64)
    np.add.at(matrix, (np.searchsorted(classes, y_true), np.searchsorted(classes, y_pred)), 1)
    return matrix


def weighted_f1(labels: Sequence[int], preds: Sequence[int]) -> float:
    """sklearn `f1_score(labels, preds, average="weighted")`: per-class F1 = 2TP/(2TP+FP+FN)
    (0 when undefined), averaged with weights = true support, over every class seen."""
    matrix = _confusion(*_as_labels(labels, preds))
    tp = np.diag(matrix).astype(np.float64)
    support = matrix.sum(axis=1)
    denominator = (support + matrix.sum(axis=0)).astype(np.float64)  # (TP+FN) + (TP+FP)
    f1 = np.divide(2 * tp, denominator, out=np.zeros_like(tp), where=denominator > 0)
    return float(np.sum(f1 * support) / np.sum(support))


def matthews_corrcoef(labels: Sequence[int], preds: Sequence[int]) -> float:
    """sklearn `matthews_corrcoef` (multiclass R_K form); 0 when either side is constant."""
    matrix = _confusion(*_as_labels(labels, preds)).astype(np.float64)
    true_counts, pred_counts = matrix.sum(axis=1), matrix.sum(axis=0)
    n, correct = matrix.sum(), np.trace(matrix)
    covariance = correct * n - true_counts @ pred_counts
    variance = (n * n - pred_counts @ pred_counts) * (n * n - true_counts @ true_counts)
    return 0.0 if variance == 0 else float(covariance / math.sqrt(variance))


def classification_scores(labels: Sequence[int], preds: Sequence[int]) -> dict[str, float]:
    """f1 (weighted), accuracy, mcc, invalid (count of -1 answers) and n."""
    y_true, y_pred = _as_labels(labels, preds)
    return {"f1": weighted_f1(y_true, y_pred), "accuracy": float(np.mean(y_true == y_pred)),
            "mcc": matthews_corrcoef(y_true, y_pred),
            "invalid": int(np.sum(y_pred == INVALID)), "n": int(y_true.size)}


def score_task(examples: Sequence[GeneralExample],
               continuations: Sequence[str]) -> dict[str, float]:
    """The scores of one task's examples from their generated continuations."""
    if len(examples) != len(continuations):
        raise ValueError(f"{len(examples)} examples but {len(continuations)} continuations")
    preds = [parse_answer(text, ex.label_names) for ex, text in zip(examples, continuations,
                                                                   strict=True)]
    return classification_scores([ex.label for ex in examples], preds)


# ---------------------------------------------------------------- generation


def greedy_continuations(params: Params, cfg: ModelConfig, tokenizer: Any,
                         prompts: Sequence[str], *, max_new_tokens: int = 5,
                         batch_size: int = 64) -> list[str]:
    """The decoded greedy continuation (prompt excluded) of each raw prompt, `batch_size` prompts
    per `generate` call. Prompts keep the tokenizer's special tokens (BOS), no chat template."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=stop_token_ids(tokenizer, cfg),
                           pad_id=tokenizer.pad_token_id or 0)
    ids = encode_prompts(tokenizer, prompts, chat=False)
    too_long = [i for i, row in enumerate(ids) if len(row) + max_new_tokens > cfg.max_positions]
    if too_long:
        raise ValueError(f"prompts {too_long[:10]} have more than {cfg.max_positions} - "
                         f"{max_new_tokens} tokens (the model's positions less the answer)")
    out: list[str] = []
    for start in range(0, len(ids), batch_size):
        outputs = generate(params, cfg, ids[start:start + batch_size], gen)
        out.extend(tokenizer.decode(o, skip_special_tokens=True) for o in outputs)
    return out


def evaluate_general(params: Params, cfg: ModelConfig, tokenizer: Any,
                     examples_by_task: Mapping[str, Sequence[GeneralExample]], *,
                     max_new_tokens: int = 5,
                     batch_size: int = 64) -> dict[str, dict[str, float]]:
    """Per task: f1 (the papers' score), accuracy, mcc, invalid and n (module docstring)."""
    results = {}
    for task, examples in examples_by_task.items():
        if not examples:
            raise ValueError(f"general task {task!r} has no examples")
        texts = greedy_continuations(params, cfg, tokenizer, [ex.prompt for ex in examples],
                                     max_new_tokens=max_new_tokens, batch_size=batch_size)
        results[task] = score_task(examples, texts)
    return results


# ---------------------------------------------------------------- perplexity drift


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenBatch:
    """Left-padded held-out windows: tokens and mask [B, T], mask 1 on real tokens."""

    tokens: np.ndarray
    mask: np.ndarray

    def scored(self) -> np.ndarray:
        """[B, T-1] bool: position t predicts token t+1 and both are real."""
        real = self.mask.astype(bool)
        return real[:, :-1] & real[:, 1:]


def held_out_windows(tokenizer: Any, texts: Sequence[str], max_tokens: int) -> list[list[int]]:
    """Each text's ids cut into consecutive windows of at most `max_tokens` tokens, each window
    starting with the tokenizer's special prefix (BOS where it adds one, as in training).
    With a prefix every text token is scored exactly once; without one (GPT-2, Qwen) the first
    token of each window is context only."""
    prefix = tokenizer("", add_special_tokens=True)["input_ids"]
    step = max_tokens - len(prefix)
    if step < 1 or max_tokens < 2:
        raise ValueError(f"max_tokens {max_tokens} leaves no room after the prefix {prefix}")
    windows = []
    for i, text in enumerate(texts):
        body = tokenizer(text, add_special_tokens=False)["input_ids"]
        if not body:
            raise ValueError(f"held-out text {i} has no tokens")
        windows.extend(prefix + body[s:s + step] for s in range(0, len(body), step))
    return windows


def held_out_batches(tokenizer: Any, texts: Sequence[str], *, max_tokens: int = 512,
                     batch_size: int = 8, min_length: int = 8) -> list[TokenBatch]:
    """Held-out texts as left-padded batches of `batch_size` windows (`held_out_windows`);
    lengths are padded to power-of-two buckets, so a run compiles a few programs."""
    windows = held_out_windows(tokenizer, texts, max_tokens)
    pad_id = tokenizer.pad_token_id or 0
    batches = []
    for start in range(0, len(windows), batch_size):
        chunk = windows[start:start + batch_size]
        longest = max(map(len, chunk))
        length = max(longest, min(bucket(longest, min_length), max_tokens))
        tokens, mask = left_pad(chunk, length, batch_size, pad_id)
        batches.append(TokenBatch(tokens=tokens, mask=mask))
    return batches


def _batch_scores(params: Params, cfg: ModelConfig,
                  batch: TokenBatch) -> tuple[np.ndarray, np.ndarray]:
    """log P(next token) and argmax [B, T-1] of one batch (teacher-forced)."""
    logprobs, argmax = _next_token_scores_jit(params, cfg, to_device(batch.tokens),
                                              to_device(batch.mask))
    return np.asarray(logprobs, np.float64), np.asarray(argmax)


def reference_predictions(params: Params, cfg: ModelConfig,
                          batches: Sequence[TokenBatch]) -> list[np.ndarray]:
    """The (original) model's argmax [B, T-1] per batch, -1 where nothing is scored; computed
    once and passed to every `perplexity_drift` of a sequential run."""
    out = []
    for batch in batches:
        argmax = _batch_scores(params, cfg, batch)[1]
        out.append(np.where(batch.scored(), argmax, INVALID).astype(np.int32))
    return out


def perplexity_drift(params: Params, cfg: ModelConfig, batches: Sequence[TokenBatch],
                     reference_argmax: Sequence[np.ndarray] | None = None) -> dict[str, float]:
    """perplexity (Eq. 40), nll (mean per token) and tokens (scored positions); with the
    original model's `reference_predictions`, top1_agreement (Eq. 41) too."""
    if reference_argmax is not None and len(reference_argmax) != len(batches):
        raise ValueError(f"{len(reference_argmax)} reference arrays for {len(batches)} batches")
    nll_sum, count, agree = 0.0, 0, 0
    for i, batch in enumerate(batches):
        logprobs, argmax = _batch_scores(params, cfg, batch)
        scored = batch.scored()
        nll_sum -= float(np.sum(logprobs[scored]))
        count += int(np.sum(scored))
        if reference_argmax is not None:
            reference = np.asarray(reference_argmax[i])
            if reference.shape != scored.shape:
                raise ValueError(f"batch {i}: reference argmax {reference.shape} does not match "
                                 f"the batch's {scored.shape} positions")
            agree += int(np.sum((argmax == reference) & scored))
    if count == 0:
        raise ValueError("no scored positions: every window has fewer than two tokens")
    result = {"perplexity": math.exp(nll_sum / count), "nll": nll_sum / count, "tokens": count}
    if reference_argmax is not None:
        result["top1_agreement"] = agree / count
    return result
