"""Local text sources, tokenisation and length-bucketed batches for the statistics pass.

Documents stream from the file one at a time, so a multi-gigabyte dump never sits in memory.
Short documents are packed several to a row of one length; longer ones are left-padded (the
model's convention) to a length bucket (powers of two and their 1.5 times) with a fixed row
count per bucket, so the jitted step compiles once per row shape.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from keedit_jax.stats._config import PlainTextDocuments


class TextSourceError(ValueError):
    """A text source that cannot be read: names the file (and line) at fault."""


def read_texts(path: str | Path, *, text_field: str = "text",
               plain_text_documents: PlainTextDocuments = "paragraph") -> Iterator[str]:
    """Documents of a local file, by suffix: .jsonl, .parquet, anything else is plain text."""
    path = Path(path)
    if not path.is_file():
        raise TextSourceError(f"statistics text source {path} does not exist")
    if path.suffix == ".jsonl":
        return _jsonl_texts(path, text_field)
    if path.suffix == ".parquet":
        return _parquet_texts(path, text_field)
    return _plain_texts(path, plain_text_documents)


def _jsonl_texts(path: Path, text_field: str) -> Iterator[str]:
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            if line.strip():
                yield _jsonl_record(line, path, number, text_field)


def _jsonl_record(line: str, path: Path, number: int, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise TextSourceError(f"{path}:{number}: not valid JSON ({error.msg})") from None
    if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
        raise TextSourceError(
            f"{path}:{number}: expected an object with a string field {text_field!r}, "
            f"got {type(record).__name__}"
            + (f" with fields {sorted(record)}" if isinstance(record, dict) else ""))
    return record[text_field]


def _parquet_texts(path: Path, text_field: str) -> Iterator[str]:
    try:
        import pyarrow.parquet as pq  # noqa: PLC0415 (optional dependency)
    except ImportError:
        raise TextSourceError(
            f"reading {path} needs pyarrow, which is not installed: pip install -e '.[parquet]' "
            "(or convert the file to .jsonl with a 'text' field)") from None
    file = pq.ParquetFile(path)
    if text_field not in file.schema_arrow.names:
        raise TextSourceError(f"{path}: no column {text_field!r} "
                              f"(columns: {file.schema_arrow.names})")
    for batch in file.iter_batches(columns=[text_field], batch_size=1024):
        yield from (text for text in batch.column(0).to_pylist() if text)


def _plain_texts(path: Path, documents: PlainTextDocuments) -> Iterator[str]:
    """One document per line, or per paragraph (lines up to a blank line, joined by \\n)."""
    paragraph: list[str] = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            line = line.rstrip("\n")
            if documents == "line":
                if line.strip():
                    yield line
            elif line.strip():
                paragraph.append(line)
            elif paragraph:
                yield "\n".join(paragraph)
                paragraph = []
    if paragraph:
        yield "\n".join(paragraph)


def tokenize_texts(texts: Iterable[str], tokenizer: Any, *, max_length: int, n_samples: int,
                   add_special_tokens: bool = True) -> Iterator[list[int]]:
    """Token ids of the first `n_samples` non-empty documents, each truncated to max_length
    (as the reference's TokenizedDataset does: BOS included, the tail dropped)."""
    taken = 0
    for text in texts:
        if taken == n_samples:
            return
        ids = tokenizer(text, add_special_tokens=add_special_tokens, truncation=True,
                        max_length=max_length)["input_ids"]
        if ids:
            taken += 1
            yield list(ids)


@dataclasses.dataclass(frozen=True, kw_only=True)
class TokenBatch:
    """Token ids and segment ids [B, T]. Segment 0 is padding; a row holds one left-padded
    document (segment 1) or several packed ones (segments 1, 2, ...); an all-zero row is a
    padding row."""

    tokens_bt: np.ndarray
    segments_bt: np.ndarray

    @property
    def n_tokens(self) -> int:
        return int(np.count_nonzero(self.segments_bt))


def bucket_length(n: int, *, min_bucket: int, max_length: int) -> int:
    """The padded length of an n-token document: the next rung of 16, 24, 32, 48, 64, 96, ...
    (the powers of two and 1.5 times each), at least min_bucket, at most max_length (itself
    a bucket when off the ladder). Half steps pad real prose to ~86% full rows instead of
    ~75% with powers of two alone, for twice the (once per bucket) compiles."""
    power = 1 << max(n - 1, 0).bit_length()  # the smallest power of two >= n
    step = power * 3 // 4 if power >= 4 and power * 3 // 4 >= n else power
    return min(max(min_bucket, step), max_length)


def rows_per_batch(length: int, batch_tokens: int) -> int:
    return max(1, batch_tokens // length)


def length_batches(sequences: Iterable[Sequence[int]], *, batch_tokens: int, min_bucket: int,
                   max_length: int, pack_length: int | None = None) -> Iterator[TokenBatch]:
    """Batches of the documents, each of one shape per length bucket (one compile each).

    With `pack_length`, documents that fit a row of R = bucket_length(pack_length) tokens are
    packed several to a row (`RowPacker`: one shape for them all, rows ~95% full where
    bucketing fills ~70-85%); longer documents, and all of them without it, are bucketed by
    length (`LengthBuckets`). Packed or bucketed, each document computes what it computes
    alone (`transformer.prompt_inputs`). Memory holds at most a few batches."""
    packer = None
    if pack_length is not None:
        row = bucket_length(min(pack_length, max_length), min_bucket=min_bucket,
                            max_length=max_length)
        packer = RowPacker(row, rows_per_batch(row, batch_tokens))
    buckets = LengthBuckets(batch_tokens=batch_tokens, min_bucket=min_bucket,
                            max_length=max_length)
    for ids in sequences:
        if len(ids) > max_length:
            raise ValueError(f"a document of {len(ids)} tokens exceeds max_length={max_length}")
        yield from (packer.add(ids) if packer is not None and len(ids) <= packer.length
                    else buckets.add(ids))
    if packer is not None:
        yield from packer.finish()
    yield from buckets.finish()


@dataclasses.dataclass
class LengthBuckets:
    """Documents grouped by length bucket; a bucket is emitted when its rows are full.

    At the end, a bucket's leftover documents ride up into the next longer bucket when they
    fit in one batch of it (the longer rows are padding, which the mask drops), else they
    form a last batch padded with empty rows: a short pass computes a few partial batches,
    not one per bucket of mostly empty rows."""

    batch_tokens: int
    min_bucket: int
    max_length: int
    pools: dict[int, list[Sequence[int]]] = dataclasses.field(default_factory=dict)

    def add(self, ids: Sequence[int]) -> Iterator[TokenBatch]:
        length = bucket_length(len(ids), min_bucket=self.min_bucket, max_length=self.max_length)
        pool = self.pools.setdefault(length, [])
        pool.append(ids)
        if len(pool) == rows_per_batch(length, self.batch_tokens):
            yield pad_left(pool, length, len(pool))
            self.pools[length] = []

    def finish(self) -> Iterator[TokenBatch]:
        lengths = sorted(self.pools)
        leftover: list[Sequence[int]] = []
        for length, longer in zip(lengths, [*lengths[1:], None], strict=False):
            pool = leftover + self.pools[length]
            rows = rows_per_batch(length, self.batch_tokens)
            while len(pool) >= rows:
                yield pad_left(pool[:rows], length, rows)
                pool = pool[rows:]
            if pool and (longer is None
                         or len(pool) > rows_per_batch(longer, self.batch_tokens)):
                yield pad_left(pool, length, rows)
                pool = []
            leftover = pool
        self.pools = {}


@dataclasses.dataclass
class RowPacker:
    """Best-fit packing of documents into rows of `length` tokens, `rows` rows a batch.

    A document goes to the fullest open row it fits; up to two batches of rows stay open, and
    when a document fits none of them the fullest `rows` rows are emitted. The last batch
    has the fewest power-of-two rows (at most `rows`) that hold what is left: one more
    compile at most, for less padding than a batch of mostly empty rows."""

    length: int
    rows: int
    open_rows: list[list[Sequence[int]]] = dataclasses.field(default_factory=list)

    def add(self, ids: Sequence[int]) -> Iterator[TokenBatch]:
        best = self._best_fit(len(ids))
        if best is None and len(self.open_rows) == 2 * self.rows:
            yield self._emit(self.rows)
            best = self._best_fit(len(ids))
        if best is None:
            self.open_rows.append([ids])
        else:
            self.open_rows[best].append(ids)

    def finish(self) -> Iterator[TokenBatch]:
        while len(self.open_rows) >= self.rows:
            yield self._emit(self.rows)
        if self.open_rows:
            yield self._emit(min(self.rows, 1 << (len(self.open_rows) - 1).bit_length()))

    def _best_fit(self, n: int) -> int | None:
        room = [(self.length - _used(row), index) for index, row in enumerate(self.open_rows)]
        fitting = [(free, index) for free, index in room if free >= n]
        return min(fitting)[1] if fitting else None

    def _emit(self, rows: int) -> TokenBatch:
        fullest = sorted(range(len(self.open_rows)), key=lambda i: -_used(self.open_rows[i]))
        taken = set(fullest[:rows])
        batch = pack_rows([self.open_rows[i] for i in sorted(taken)], self.length, rows)
        self.open_rows = [row for i, row in enumerate(self.open_rows) if i not in taken]
        return batch


def _used(row: Sequence[Sequence[int]]) -> int:
    return sum(map(len, row))


def pack_rows(rows_of_documents: Sequence[Sequence[Sequence[int]]], length: int, rows: int,
              pad_id: int = 0) -> TokenBatch:
    """Each row's documents end to end, right-aligned in a [rows, length] batch, segment ids
    1, 2, ... in order; missing rows are all padding."""
    tokens = np.full((rows, length), pad_id, np.int32)
    segments = np.zeros((rows, length), np.int32)
    for row, documents in enumerate(rows_of_documents):
        start = length - _used(documents)
        for segment, ids in enumerate(documents, start=1):
            tokens[row, start:start + len(ids)] = ids
            segments[row, start:start + len(ids)] = segment
            start += len(ids)
    return TokenBatch(tokens_bt=tokens, segments_bt=segments)


def pad_left(sequences: Sequence[Sequence[int]], length: int, rows: int,
             pad_id: int = 0) -> TokenBatch:
    """Right-align each sequence in a [rows, length] batch (segment 1); missing rows are all
    padding."""
    return pack_rows([[ids] for ids in sequences], length, rows, pad_id)
