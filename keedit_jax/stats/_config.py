"""Hyperparameters of the statistics pass, one frozen dataclass (STYLE.md §5)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from keedit_jax.models import ModelConfig

AccumulateDtype = Literal["float32", "float64"]
PlainTextDocuments = Literal["paragraph", "line"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class StatsConfig:
    """How E[k kᵀ] is collected (docs/references.md: anchors §3).

    source: the local text file (.jsonl, .parquet, or plain text).
    text_field: the jsonl / parquet field holding a document.
    plain_text_documents: "paragraph" (blank-line-separated, the default: a Wikipedia article
      dumped as text keeps its paragraphs as documents rather than single sentences) or
      "line" (one document per non-empty line).
    n_samples: documents used (the reference's mom2_n_samples counts articles, not tokens).
    max_length: tokens kept per document; None means the model's max positions, as the
      reference does (8192 for Llama-3).
    batch_tokens: the token budget of one forward (rows × bucket length); the reference's
      3 × npos budget is what ran out of memory (anchors §10).
    min_bucket: the shortest padded length; lengths are padded to the next of 16, 24, 32,
      48, 64, ... above it so that the jitted step compiles once per bucket.
    pack_length: documents of up to this many tokens (rounded up to a bucket, at most
      max_length) are packed several to a row of that length, each attending only to itself
      with its own positions: the same sums, with rows ~95% full instead of ~70-85%. Longer
      documents are bucketed by length. None: one document per row, as the reference.
    accumulate_dtype: the host accumulator. Each batch's KᵀK is a float32 matmul on the device,
      summed on the device for `flush_every` batches, then added on the host in this dtype.
    with_values: also collect Σ v kᵀ and Σ v vᵀ with v = W_down k (LyapLock, anchors §5.4).
    log_every_s: seconds between progress lines.
    """

    source: str = ""
    text_field: str = "text"
    plain_text_documents: PlainTextDocuments = "paragraph"
    n_samples: int = 100_000
    max_length: int | None = None
    add_special_tokens: bool = True
    batch_tokens: int = 8192
    min_bucket: int = 16
    pack_length: int | None = 512
    accumulate_dtype: AccumulateDtype = "float32"
    flush_every: int = 16
    with_values: bool = False
    log_every_s: float = 10.0

    def __post_init__(self) -> None:
        for name in ("n_samples", "batch_tokens", "min_bucket", "flush_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"stats {name} must be >= 1, got {getattr(self, name)}")
        if self.pack_length is not None and self.pack_length < 1:
            raise ValueError(f"stats pack_length must be >= 1 or None, got {self.pack_length}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"stats max_length must be >= 1 or None, got {self.max_length}")
        if self.accumulate_dtype not in ("float32", "float64"):
            raise ValueError(f"stats accumulate_dtype must be float32 or float64, "
                             f"got {self.accumulate_dtype!r}")
        if self.plain_text_documents not in ("paragraph", "line"):
            raise ValueError(f"stats plain_text_documents must be paragraph or line, "
                             f"got {self.plain_text_documents!r}")

    def resolved_max_length(self, cfg: ModelConfig) -> int:
        """Tokens per document: the explicit cap, else the model's context length."""
        return cfg.max_positions if self.max_length is None else self.max_length
