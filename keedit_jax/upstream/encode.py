"""Structured requests -> the padded arrays the shift loop consumes (MEMIT `compute_z` inputs).

For request e and context template c, sequence (e, c) is the token ids of
`c.format(prompt.format(subject))` followed by target_new[:-1] (teacher forcing); the logits at
the last prompt token and after predict the target tokens (anchors §1). One more sequence per
request is the KL prompt "{subject} is a" (anchors §1). The shift δ_e is added at the lookup
index of every one of request e's sequences.

Choices where the reference differs (anchors §11.4, muke §7.11):
- the target is appended as token ids, not decoded and re-tokenised into one string, so every
  label position is exact;
- the target is tokenised without special tokens (the reference strips Llama-3's BOS);
- `fact_token="last"` is the last *prompt* token; the reference's index -1 is the last token of
  the prompt+target string, a known misfire.
Rows are left-padded to a power-of-two length, so batches of similar requests share a program.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from keedit_jax.data import Request
from keedit_jax.models.generate import bucket, fine_bucket
from keedit_jax.upstream.config import FactToken, TargetConfig

Array = jax.Array


class EncodingError(ValueError):
    """A request that cannot be turned into a shift problem; the message names its case_id."""


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShiftBatch:
    """E edits × S sequences × T (left-padded) tokens, with P shifts per edit.

    The loss of edit e is Σ_{s,t} weights·NLL(labels | logits at t) + kl_factor·Σ_s kl_weight·KL
    at kl_pos, so an upstream strategy (MEMIT, AnyEdit windows, μKE figures) is a choice of
    weights, not a new loop (DESIGN "One edit, as data"). h = the unshifted layer output at
    shift_pos of sequence 0 sets each shift's clamp radius and weight-decay scale.

    Logits are computed at read_pos only: a nonzero weight or a KL term anywhere else is
    never read. A CounterFact row reads ~4 of its 32 positions, and the unembedding is the
    widest matmul of a step (`read_every_position` restores the reference's cost).
    """

    tokens: Array  # [E, S, T] int32
    attention_mask: Array  # [E, S, T] int32, 1 on real tokens
    shift_pos: Array  # [E, S, P] int32, where shift p of edit e is added in sequence s
    labels: Array  # [E, S, T] int32, the token the logits at t must predict
    weights: Array  # [E, S, T] float32, NLL weight of labels at t (0: not a target)
    kl_pos: Array  # [E, S] int32, where the KL term reads the next-token distribution
    kl_weight: Array  # [E, S] float32, 0 on sequences without a KL term
    read_pos: Array  # [E, S, R] int32, every position the loss reads (labels, kl_pos), −1 pads


@dataclasses.dataclass(frozen=True)
class EncodedRequests:
    """The arrays (traced) plus the host-side ids used to name failures (never traced)."""

    batch: ShiftBatch
    case_ids: tuple[int | str, ...]


@dataclasses.dataclass(frozen=True)
class _Row:
    ids: list[int]
    lookup: int
    targets: list[int]  # predicted from position lookup_from onward
    targets_from: int
    weight: float
    kl: bool


def encode_ids(tokenizer: Any, text: str) -> list[int]:
    """Token ids as the reference tokenises prompts: with the tokenizer's special tokens."""
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def target_ids(tokenizer: Any, request: Request, cfg: TargetConfig) -> list[int]:
    """target_new's ids, with the leading space the reference adds (anchors §1), no BOS."""
    text = request.target_new
    if cfg.prepend_space and not text.startswith(" "):
        text = " " + text
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
        raise EncodingError(f"request {request.case_id}: target_new {request.target_new!r} "
                            "tokenises to no tokens")
    return ids


def prompt_and_lookup(tokenizer: Any, context: str, prompt: str, subject: str,
                      fact_token: FactToken, case_id: int | str) -> tuple[list[int], int]:
    """Ids of context.format(prompt.format(subject)) and the lookup index (anchors §1).

    subject_last is the token holding the subject's last character, found from the tokenizer's
    character offsets: where BPE merges that character with the next one (")?" after
    "USS Leedstown (APA-56)"), the merged token is the lookup, as the reference's rule (the
    last token of the tokenised text up to the end of the subject) gives. A tokenizer without
    offsets (not a fast one) uses that rule, checked against the prompt's tokens.
    """
    if prompt.count("{}") != 1:
        raise EncodingError(f"request {case_id}: prompt {prompt!r} needs exactly one '{{}}' "
                            f"for the subject {subject!r}")
    text = context.format(prompt.format(subject))
    if fact_token == "last":
        ids = encode_ids(tokenizer, text)
        return ids, len(ids) - 1
    end = len(context.format(prompt[: prompt.index("{}")] + subject))
    if getattr(tokenizer, "is_fast", False):
        return _lookup_by_offsets(tokenizer, text, end, len(subject), case_id)
    ids = encode_ids(tokenizer, text)
    head = encode_ids(tokenizer, text[:end])
    if not head or ids[: len(head) - 1] != head[:-1]:
        raise EncodingError(f"request {case_id}: subject {subject!r} is not found in the "
                            f"tokens of the prompt {text!r} (the tokens before the subject's "
                            "last one differ from the prompt's)")
    return ids, len(head) - 1


def _lookup_by_offsets(tokenizer: Any, text: str, end: int, length: int,
                       case_id: int | str) -> tuple[list[int], int]:
    """Ids of text and the index of the last token that starts before character `end` and
    overlaps the subject [end - length, end); special tokens (empty spans) never qualify."""
    encoding = tokenizer(text, add_special_tokens=True, return_offsets_mapping=True)
    ids, spans = list(encoding["input_ids"]), encoding["offset_mapping"]
    inside = [i for i, (a, b) in enumerate(spans) if b > a and a < end and b > end - length]
    if not inside:
        raise EncodingError(f"request {case_id}: no token of the prompt {text!r} covers the "
                            f"subject's characters {end - length}..{end}")
    return ids, inside[-1]


def request_rows(tokenizer: Any, request: Request, templates: Sequence[str],
                 cfg: TargetConfig) -> list[_Row]:
    """One rewriting row per context template, then the KL row (anchors §1).

    Weights 1/(C·M): NLL normalised by target length M, then averaged over the C contexts.
    """
    target = target_ids(tokenizer, request, cfg)
    weight = 1.0 / (len(templates) * len(target))
    rows = []
    for context in templates:
        ids, lookup = prompt_and_lookup(tokenizer, context, request.prompt, request.subject,
                                        cfg.fact_token, request.case_id)
        rows.append(_Row(ids + target[:-1], lookup, target, len(ids) - 1, weight, False))
    ids, lookup = prompt_and_lookup(tokenizer, "{}", cfg.kl_prompt, request.subject,
                                    cfg.fact_token, request.case_id)
    rows.append(_Row(ids, lookup, [], len(ids) - 1, 0.0, True))
    return rows


def encoding_failures(tokenizer: Any, requests: Sequence[Request], templates: Sequence[str],
                      cfg: TargetConfig, max_positions: int | None = None
                      ) -> dict[int | str, str]:
    """The reason each request that cannot be encoded under every template, or whose longest
    row exceeds the model's `max_positions`, fails, by case_id: checked before any expensive
    work, so a run skips them instead of ending on them."""
    failures = {}
    for request in requests:
        try:
            longest = max(len(row.ids) + (not row.kl)  # a row holds all but the last target
                          for row in request_rows(tokenizer, request, templates, cfg))
        except EncodingError as error:
            failures[request.case_id] = str(error)
            continue
        if max_positions is not None and longest > max_positions:
            failures[request.case_id] = (
                f"request {request.case_id}: prompt and target take {longest} tokens, more "
                f"than the model's {max_positions} positions")
    return failures


def encode_requests(tokenizer: Any, requests: Sequence[Request], templates: Sequence[str],
                    cfg: TargetConfig) -> EncodedRequests:
    """Left-padded ShiftBatch for all requests; templates[0] is where h is read ("{}")."""
    if not requests:
        raise EncodingError("no requests to encode")
    if not templates or any(t.count("{}") != 1 for t in templates):
        raise EncodingError(f"context templates {list(templates)!r} must be non-empty and "
                            "each hold exactly one '{}'")
    rows = [request_rows(tokenizer, r, templates, cfg) for r in requests]
    width = bucket(max(len(row.ids) for per in rows for row in per), 8)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batch = _pack(rows, width, pad_id)
    return EncodedRequests(batch, tuple(r.case_id for r in requests))


def _pack(rows: list[list[_Row]], width: int, pad_id: int) -> ShiftBatch:
    """Right-align every row in [E, S, width] arrays, moving indices by the padding."""
    e, s = len(rows), len(rows[0])
    out = {"tokens": np.full((e, s, width), pad_id, np.int32),
           "attention_mask": np.zeros((e, s, width), np.int32),
           "shift_pos": np.zeros((e, s, 1), np.int32),
           "labels": np.zeros((e, s, width), np.int32),
           "weights": np.zeros((e, s, width), np.float32),
           "kl_pos": np.zeros((e, s), np.int32), "kl_weight": np.zeros((e, s), np.float32)}
    reads = []
    for i, per in enumerate(rows):
        for j, row in enumerate(per):
            pad = width - len(row.ids)
            out["tokens"][i, j, pad:] = row.ids
            out["attention_mask"][i, j, pad:] = 1
            out["shift_pos"][i, j, 0] = pad + row.lookup
            at = pad + row.targets_from + np.arange(len(row.targets))
            out["labels"][i, j, at] = row.targets
            out["weights"][i, j, at] = row.weight
            out["kl_pos"][i, j] = pad + row.lookup
            out["kl_weight"][i, j] = 1.0 if row.kl else 0.0
            reads.append([pad + p for p in _read_positions(row)])
    return ShiftBatch(**out, read_pos=read_pos_array(reads, (e, s), width))


def _read_positions(row: _Row) -> list[int]:
    """Unpadded positions whose next-token distribution row's loss reads, ascending."""
    targets = range(row.targets_from, row.targets_from + len(row.targets))
    return sorted(set(targets) | ({row.lookup} if row.kl else set()))


def read_pos_array(positions: Sequence[Sequence[int]], leading: tuple[int, ...],
                   width: int) -> np.ndarray:
    """[*leading, R] positions padded with −1, R a shape bucket (`fine_bucket`, >= 4,
    <= width) so similar batches share a program."""
    size = min(width, fine_bucket(max(len(p) for p in positions), 4))
    out = np.full((len(positions), size), -1, np.int32)
    for row, p in enumerate(positions):
        out[row, : len(p)] = p
    return out.reshape(leading + (size,))


def read_every_position(batch: ShiftBatch) -> ShiftBatch:
    """The batch with logits read at every position: the reference's cost (benchmarks)."""
    t = batch.tokens.shape[-1]
    every = np.broadcast_to(np.arange(t, dtype=np.int32), batch.tokens.shape)
    return dataclasses.replace(batch, read_pos=every)
