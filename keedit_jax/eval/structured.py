"""The MEMIT evaluation protocol for structured edits: CounterFact / MCF and ZsRE.

Everything below the model section is model-agnostic: a protocol gets a `ScoreFn`, which maps
(prompt, continuation) text pairs to teacher-forced `TargetScore`s, so the metrics can be
checked against hand-computed cases. `model_score_fn` builds the ScoreFn of one of our models.

CounterFact (anchors §7.1, MEMIT `experiments/py/eval_utils_counterfact.py`, `summarize.py`):
- each prompt is scored with " " + target_new and " " + target_true; the NLL of a target is
  the *mean* per-token NLL of its tokens;
- "score" (`*_success`): rewrite / paraphrase prompts succeed when NLL_true > NLL_new,
  neighbourhood prompts when NLL_true < NLL_new; the case value is the mean over its prompts;
- "magnitude" (`*_diff`): exp(-NLL_new) - exp(-NLL_true) (reversed for the neighbourhood);
- `*_acc`: every target token is the argmax (target_new; target_true for the neighbourhood);
- Efficacy = rewrite_success, Generalization = paraphrase_success, Specificity =
  neighborhood_success; `score` = harmonic mean of the three (summaries, ×100, mean ± std);
- Fluency = `ngram_entropy` of the generated texts: per text, the mean of (2/3)·H2 and
  (4/3)·H3, the bigram and trigram entropies in bits; averaged over texts;
- Consistency = `reference_score`: TF-IDF cosine between the joined generations and the joined
  attribute snippets of (relation_id, target_new.id) (`attribute_snippets.json`, `idf.npy`,
  `tfidf_vocab.json`, read in their published formats).

ZsRE (anchors §7.2, MEMIT `experiments/py/eval_utils_zsre.py`): teacher-forced top-1 token
accuracy of " " + target_new after the rewrite and rephrase prompts, and of " " + loc_ans after
`loc + "?"`, each averaged over the case's target tokens. EasyEdit's locality (agreement of
post-edit with pre-edit predictions, anchors §7.4) is `locality_agreement`.

Tokenisation (anchors §11.4): prompts get the tokenizer's special tokens (BOS), targets none,
and the target ids are appended to the prompt ids. This is the AlphaEdit Llama fix (no BOS
inside a target); MEMIT instead re-tokenises prompt + " " + target as one string, which gives the
same ids for GPT-2/GPT-J/Llama-3 byte-level BPE at a word boundary.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keedit_jax import parallel
from keedit_jax.data._fields import DatasetError, FieldReader, load_records, read_all
from keedit_jax.data.counterfact import CounterFactRecord
from keedit_jax.data.zsre import ZsreRecord
from keedit_jax.intervene import forward
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.generate import bucket, left_pad
from keedit_jax.models.params import Params, to_device

# ---------------------------------------------------------------- teacher-forced scores


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetScore:
    """Teacher-forced scores of one continuation: per target token i, log P(t_i | prompt,
    t_<i) and the argmax id at the same position."""

    target_ids: np.ndarray  # [n] int
    logprobs: np.ndarray  # [n] float
    predicted: np.ndarray  # [n] int

    @property
    def mean_nll(self) -> float:
        """MEMIT's per-target NLL: the mean over target tokens (anchors §7.1)."""
        return float(-np.mean(self.logprobs))

    @property
    def correct(self) -> np.ndarray:
        return np.asarray(self.predicted) == np.asarray(self.target_ids)


ScoreFn = Callable[[Sequence[tuple[str, str]]], Sequence[TargetScore]]


def _next_token_scores(params: Params, cfg: ModelConfig, tokens: jax.Array,
                       mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """log P(tokens[:, t+1]) and argmax at every position t, both [B, T-1]."""
    logits_btv = forward(params, cfg, tokens, mask)[:, :-1].astype(jnp.float32)
    log_probs_btv = jax.nn.log_softmax(logits_btv, axis=-1)
    picked_bt = jnp.take_along_axis(log_probs_btv, tokens[:, 1:, None], axis=-1)[..., 0]
    return picked_bt, jnp.argmax(logits_btv, axis=-1)


_next_token_scores_jit = jax.jit(_next_token_scores, static_argnames=("cfg",))


def _score_chunk(params: Params, cfg: ModelConfig, rows: Sequence[tuple[list[int], list[int]]],
                 pad_id: int, min_length: int) -> list[TargetScore]:
    """One left-padded batch, padded to a (rows, length) power-of-two bucket."""
    sequences = [prompt + target for prompt, target in rows]
    length = bucket(max(map(len, sequences)), min_length)
    tokens, mask = left_pad(sequences, length, bucket(len(rows)), pad_id)
    picked, argmax = _next_token_scores_jit(params, cfg, to_device(tokens), to_device(mask))
    picked, argmax = parallel.to_host((picked, argmax))
    out = []
    for r, (_, target) in enumerate(rows):
        n = len(target)  # right-aligned: the targets are the last n tokens, predicted at T-1-n..
        out.append(TargetScore(target_ids=np.asarray(target), logprobs=picked[r, -n:],
                               predicted=argmax[r, -n:]))
    return out


def teacher_forced_scores(params: Params, cfg: ModelConfig,
                          rows: Sequence[tuple[Sequence[int], Sequence[int]]], *,
                          pad_id: int = 0, max_rows: int = 64,
                          min_length: int = 8) -> list[TargetScore]:
    """Scores of (prompt ids, target ids) rows under our model, in chunks of `max_rows`.

    Rows are left-padded, so the target tokens of every row end the sequence; shapes are
    bucketed to powers of two, so one jitted program serves each (rows, length) bucket.
    """
    rows = [(list(p), list(t)) for p, t in rows]
    for i, (prompt, target) in enumerate(rows):
        if not prompt or not target:
            raise ValueError(f"row {i}: empty prompt or target ids (a target token needs a "
                             "preceding position to be predicted from)")
    out: list[TargetScore] = []
    for start in range(0, len(rows), max_rows):
        out.extend(_score_chunk(params, cfg, rows[start:start + max_rows], pad_id, min_length))
    return out


def model_score_fn(params: Params, cfg: ModelConfig, tokenizer: Any, *,
                   max_rows: int = 64) -> ScoreFn:
    """A ScoreFn of our model: prompts with special tokens, continuations without."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def score(pairs: Sequence[tuple[str, str]]) -> list[TargetScore]:
        rows = [(tokenizer(p, add_special_tokens=True)["input_ids"],
                 tokenizer(t, add_special_tokens=False)["input_ids"]) for p, t in pairs]
        return teacher_forced_scores(params, cfg, rows, pad_id=pad_id, max_rows=max_rows)

    return score


def prefetched(score_fn: ScoreFn, evaluate: Callable[[ScoreFn], Any]) -> Any:
    """Run `evaluate(score_fn)` with every pair it asks for scored in one batched call.

    A first pass records the pairs (answering with placeholders), one ScoreFn call scores them
    all, and a second pass replays the answers: a protocol written one case at a time then
    costs a few full batches instead of several tiny ones per case.
    """
    asked: list[tuple[str, str]] = []
    placeholder = TargetScore(target_ids=np.zeros(1, int), logprobs=np.zeros(1),
                              predicted=np.zeros(1, int))

    def record(pairs: Sequence[tuple[str, str]]) -> list[TargetScore]:
        asked.extend(pairs)
        return [placeholder] * len(pairs)

    evaluate(record)
    unique = list(dict.fromkeys(asked))
    scores = dict(zip(unique, score_fn(unique), strict=True))
    return evaluate(lambda pairs: [scores[pair] for pair in pairs])


# ---------------------------------------------------------------- CounterFact probability tests


@dataclasses.dataclass(frozen=True, kw_only=True)
class PromptComparison:
    """One prompt scored with both targets: mean per-token NLLs and argmax exact matches."""

    nll_new: float
    nll_true: float
    new_correct: bool
    true_correct: bool


def compare_targets(score_fn: ScoreFn, prompts: Sequence[str], target_new: str,
                    target_true: str | Sequence[str]) -> tuple[PromptComparison, ...]:
    """Every prompt with " " + target_new and " " + target_true, in one ScoreFn call;
    `target_true` may give each prompt its own (a neighbourhood proxy of other cases)."""
    trues = [target_true] * len(prompts) if isinstance(target_true, str) else list(target_true)
    if len(trues) != len(prompts):
        raise ValueError(f"{len(trues)} true targets for {len(prompts)} prompts")
    pairs = [(p, f" {t}") for p, true in zip(prompts, trues, strict=True)
             for t in (target_new, true)]
    scores = list(score_fn(pairs)) if pairs else []
    return tuple(
        PromptComparison(nll_new=new.mean_nll, nll_true=true.mean_nll,
                         new_correct=bool(new.correct.all()), true_correct=bool(true.correct.all()))
        for new, true in zip(scores[0::2], scores[1::2], strict=True)
    )


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def success_score(comparisons: Sequence[PromptComparison], prefer_new: bool) -> float:
    """Share of prompts where the preferred target has the lower mean NLL (ES / NS)."""
    return _mean([(c.nll_true > c.nll_new) if prefer_new else (c.nll_true < c.nll_new)
                  for c in comparisons])


def success_magnitude(comparisons: Sequence[PromptComparison], prefer_new: bool) -> float:
    """Mean gap exp(-NLL_preferred) - exp(-NLL_other) (MEMIT's `*_diff`, EM / NM)."""
    sign = 1.0 if prefer_new else -1.0
    return _mean([sign * (math.exp(-c.nll_new) - math.exp(-c.nll_true)) for c in comparisons])


def _argmax_accuracy(comparisons: Sequence[PromptComparison], prefer_new: bool) -> float:
    return _mean([c.new_correct if prefer_new else c.true_correct for c in comparisons])


# ---------------------------------------------------------------- fluency: n-gram entropy

_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s)")
_TREEBANK_RULES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    # starting quotes, punctuation, brackets, dashes (nltk NLTKWordTokenizer, in its order)
    (r'^"', "``"), (r"(``)", r" \1 "), (r'([ (\[{<])("|\'{2})', r"\1 `` "),
    (r"([^.])(\.)([\]\)}>\"']*)\s*$", r"\1 \2\3 "), (r"([:,])([^\d])", r" \1 \2"),
    (r"([:,])$", r" \1 "), (r"\.{2,}", r" \g<0> "), (r"[;@#$%&?!*]", r" \g<0> "),
    (r"([^'])' ", r"\1 ' "), (r"[\]\[(){}<>]", r" \g<0> "), (r"--", r" -- "),
))
_ENDING_RULES = tuple((re.compile(pattern), replacement) for pattern, replacement in (
    # ending quotes and contractions, applied after padding the sentence with spaces
    (r'"', " '' "), (r"(\S)('')", r"\1 \2 "), (r"([^' ])('[sSmMdD]|') ", r"\1 \2 "),
    (r"([^' ])('ll|'LL|'re|'RE|'ve|'VE|n't|N'T) ", r"\1 \2 "),
))


def _treebank(sentence: str) -> list[str]:
    for pattern, replacement in _TREEBANK_RULES:
        sentence = pattern.sub(replacement, sentence)
    sentence = f" {sentence} "
    for pattern, replacement in _ENDING_RULES:
        sentence = pattern.sub(replacement, sentence)
    return sentence.split()


def word_tokenize(text: str) -> list[str]:
    """An approximation of nltk's `word_tokenize`, which MEMIT's fluency uses (§7.1).

    The Penn Treebank rules of nltk's NLTKWordTokenizer (without its rare multi-word
    contractions such as "cannot"), applied per sentence; sentences are split after . ! ?
    (and closing quotes or brackets) followed by whitespace instead of by the trained Punkt
    model, so an abbreviation ("Mr.") loses its period where Punkt would keep it.
    Pass `tokenize=nltk.word_tokenize` to `ngram_entropy` for exact parity.
    """
    ends = [m.end() for m in _SENTENCE_END.finditer(text)]
    bounds = zip([0, *ends], [*ends, len(text)], strict=True)
    return [token for start, end in bounds for token in _treebank(text[start:end].strip())]


def _entropy_bits(counts: Counter[tuple[str, ...]]) -> float:
    total = sum(counts.values())
    freqs = np.asarray(list(counts.values()), np.float64) / max(total, 1)
    return float(-np.sum(freqs * np.log2(freqs))) if total else 0.0


def text_ngram_entropy(text: str, ns: Sequence[int] = (2, 3),
                       weights: Sequence[float] = (2 / 3, 4 / 3),
                       tokenize: Callable[[str], list[str]] = word_tokenize) -> float:
    """MEMIT's `compute_n_gram_entropy`: mean over n of weight_n · H_n (bits; §7.1)."""
    tokens = tokenize(text)
    entropies = [_entropy_bits(Counter(zip(*(tokens[i:] for i in range(n)), strict=False)))
                 for n in ns]
    return float(np.mean(np.asarray(entropies) * np.asarray(weights)))


def ngram_entropy(texts: Sequence[str],
                  tokenize: Callable[[str], list[str]] = word_tokenize) -> float:
    """Fluency: the arithmetic mean of `text_ngram_entropy` over texts (§7.1)."""
    return _mean([text_ngram_entropy(t, tokenize=tokenize) for t in texts])


# ---------------------------------------------------------------- consistency: TF-IDF cosine

_TFIDF_TOKEN = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn TfidfVectorizer's default pattern


@dataclasses.dataclass(frozen=True, kw_only=True)
class Tfidf:
    """MEMIT's TF-IDF vectoriser: `tfidf_vocab.json` (term -> column) and `idf.npy` [V]."""

    vocabulary: Mapping[str, int]
    idf: np.ndarray

    def vector(self, text: str) -> dict[int, float]:
        """Sparse raw-count × idf vector of lower-cased tokens (TfidfVectorizer defaults)."""
        counts = Counter(self.vocabulary[t] for t in _TFIDF_TOKEN.findall(text.lower())
                         if t in self.vocabulary)
        return {column: count * float(self.idf[column]) for column, count in counts.items()}


def load_tfidf(idf_path: str | pathlib.Path, vocab_path: str | pathlib.Path) -> Tfidf:
    """The published `idf.npy` and `tfidf_vocab.json` (MEMIT `data/`; anchors §8)."""
    try:
        vocabulary = json.loads(pathlib.Path(vocab_path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise DatasetError(vocab_path, message=f"TF-IDF vocabulary not readable ({err})") from err
    try:
        idf = np.load(idf_path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:  # a pickled array is refused, not loaded
        raise DatasetError(idf_path, message=f"TF-IDF idf not readable ({err})") from err
    if not isinstance(vocabulary, dict) or not all(
            isinstance(c, int) and not isinstance(c, bool) for c in vocabulary.values()):
        raise DatasetError(vocab_path, message="expected an object of term -> column index")
    if idf.ndim != 1 or len(idf) <= max(vocabulary.values(), default=-1):
        raise DatasetError(idf_path, message=f"idf of shape {idf.shape} does not cover the "
                                             f"{len(vocabulary)} columns of {vocab_path}")
    return Tfidf(vocabulary=vocabulary, idf=idf)


def tfidf_similarity(text_a: str, text_b: str, tfidf: Tfidf) -> float:
    """Cosine of the TF-IDF vectors (MEMIT `tfidf_similarity`); nan if either is empty."""
    a, b = tfidf.vector(text_a), tfidf.vector(text_b)
    norm = math.sqrt(sum(v * v for v in a.values())) * math.sqrt(sum(v * v for v in b.values()))
    return sum(v * b.get(k, 0.0) for k, v in a.items()) / norm if norm else math.nan


@dataclasses.dataclass(frozen=True, kw_only=True)
class AttributeSnippets:
    """`attribute_snippets.json`: [{"relation_id", "target_id", "samples": [{"name", "text"}]}]
    grouped as MEMIT's `AttributeSnippets`: (relation_id, target_id) -> snippet texts."""

    texts: Mapping[tuple[str, str], tuple[str, ...]]

    def for_record(self, record: CounterFactRecord) -> tuple[str, ...]:
        return self.texts.get((record.relation_id, record.target_new_id), ())


def _snippet_entry(reader: FieldReader) -> tuple[tuple[str, str], list[str]]:
    """One `attribute_snippets.json` entry: (relation, target) and its samples' texts."""
    key = (reader.text("relation_id"), reader.text("target_id"))
    texts = []
    for i, sample in enumerate(reader.raw("samples", list) or []):
        if not isinstance(sample, dict) or not isinstance(sample.get("text"), str):
            reader.note(f"samples[{i}].text", "expected an object with a string 'text'")
        else:
            texts.append(sample["text"])
    return key, texts


def load_attribute_snippets(path: str | pathlib.Path) -> AttributeSnippets:
    """MEMIT's attribute snippets; DatasetError naming each malformed entry and field."""
    grouped: dict[tuple[str, str], list[str]] = {}
    for key, texts in read_all(path, load_records(path), _snippet_entry):
        grouped.setdefault(key, []).extend(texts)
    return AttributeSnippets(texts={k: tuple(v) for k, v in grouped.items()})


def reference_score(generated: Sequence[str], snippets: Sequence[str], tfidf: Tfidf) -> float:
    """Consistency: TF-IDF cosine of the joined generations and joined snippets (§7.1)."""
    return tfidf_similarity(" ".join(generated), " ".join(snippets), tfidf)


# ---------------------------------------------------------------- CounterFact case and summary

GenerateFn = Callable[[Sequence[str]], Sequence[str]]


@dataclasses.dataclass(frozen=True, kw_only=True)
class CounterFactCase:
    """The probability tests of one case, and its generation metrics when they were run."""

    case_id: int | str
    rewrite: tuple[PromptComparison, ...]
    paraphrase: tuple[PromptComparison, ...]
    neighborhood: tuple[PromptComparison, ...]
    ngram_entropy: float | None = None
    reference_score: float | None = None

    def metrics(self) -> dict[str, float]:
        """MEMIT's per-case keys (`rewrite_success`, `rewrite_diff`, `rewrite_acc`, …)."""
        out = {}
        for name, tests, prefer_new in (("rewrite", self.rewrite, True),
                                        ("paraphrase", self.paraphrase, True),
                                        ("neighborhood", self.neighborhood, False)):
            out[f"{name}_success"] = success_score(tests, prefer_new)
            out[f"{name}_diff"] = success_magnitude(tests, prefer_new)
            out[f"{name}_acc"] = _argmax_accuracy(tests, prefer_new)
        for key in ("ngram_entropy", "reference_score"):
            if getattr(self, key) is not None:
                out[key] = getattr(self, key)
        return out


def evaluate_counterfact(record: CounterFactRecord, score_fn: ScoreFn, *,
                         generate_fn: GenerateFn | None = None,
                         snippets: AttributeSnippets | None = None,
                         tfidf: Tfidf | None = None) -> CounterFactCase:
    """One case under the MEMIT protocol (§7.1). Generation metrics need `generate_fn`, which
    maps prompts to generated texts (MEMIT: prompt + 100 tokens, top-k 5); consistency also
    needs the snippets and the TF-IDF files."""
    req = record.request
    tests = [compare_targets(score_fn, prompts, req.target_new, trues)
             for prompts, trues in (([req.filled_prompt], record.neighborhood_answer),
                                    (record.paraphrase_prompts, record.neighborhood_answer),
                                    (record.neighborhood_prompts, record.neighborhood_targets))]
    entropy = consistency = None
    if generate_fn is not None:
        texts = list(generate_fn(record.generation_prompts))
        entropy = ngram_entropy(texts)
        if snippets is not None and tfidf is not None:
            consistency = reference_score(texts, snippets.for_record(record), tfidf)
    return CounterFactCase(case_id=record.case_id, rewrite=tests[0], paraphrase=tests[1],
                           neighborhood=tests[2], ngram_entropy=entropy,
                           reference_score=consistency)


def _harmonic_mean(values: Sequence[float]) -> float:
    if any(math.isnan(v) for v in values):
        return math.nan
    return 0.0 if min(values) <= 0 else len(values) / sum(1.0 / v for v in values)


def summarize(case_metrics: Sequence[Mapping[str, float]]) -> dict[str, tuple[float, float]]:
    """(mean, std) × 100 over cases per key, as MEMIT's `summarize.py` (population std; cases
    where a key is nan, e.g. no neighbourhood prompts, are left out of that key). With the three
    successes present, `score` is their harmonic mean (Efficacy, Generalization, Specificity)."""
    keys = sorted({k for m in case_metrics for k in m})
    out = {}
    for key in keys:
        values = np.asarray([m[key] for m in case_metrics if key in m], np.float64)
        values = values[~np.isnan(values)]
        out[key] = ((float(np.mean(values)) * 100, float(np.std(values)) * 100) if len(values)
                    else (math.nan, math.nan))
    successes = [f"{k}_success" for k in ("rewrite", "paraphrase", "neighborhood")]
    if all(k in out for k in successes):
        out["score"] = (_harmonic_mean([out[k][0] for k in successes]), math.nan)
    return out


# ---------------------------------------------------------------- ZsRE token accuracy


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZsreCase:
    """Per-token teacher-forced results of one ZsRE case (§7.2)."""

    case_id: int | str
    rewrite: TargetScore
    paraphrase: TargetScore
    neighborhood: TargetScore

    def metrics(self) -> dict[str, float]:
        """`rewrite_acc` (Efficacy), `paraphrase_acc` (Generalization), `neighborhood_acc`
        (Specificity, against loc_ans): each the mean over the case's target tokens."""
        return {f"{name}_acc": float(np.mean(getattr(self, name).correct))
                for name in ("rewrite", "paraphrase", "neighborhood")}


def evaluate_zsre(record: ZsreRecord, score_fn: ScoreFn) -> ZsreCase:
    """One case under the MEMIT ZsRE protocol, in one ScoreFn call (§7.2)."""
    target = f" {record.request.target_new}"
    rewrite, paraphrase, neighborhood = score_fn([
        (record.request.filled_prompt, target), (record.rephrase, target),
        (record.loc_prompt, f" {record.loc_ans}")])
    return ZsreCase(case_id=record.case_id, rewrite=rewrite, paraphrase=paraphrase,
                    neighborhood=neighborhood)


def locality_agreement(pre: ZsreCase, post: ZsreCase) -> float:
    """EasyEdit's locality (§7.4): share of loc tokens whose argmax the edit left unchanged."""
    return float(np.mean(np.asarray(pre.neighborhood.predicted)
                         == np.asarray(post.neighborhood.predicted)))
