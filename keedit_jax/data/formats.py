"""`read_dataset`: one entry point for `--dataset_format`, with detection by field names.

Formats: "counterfact" and "mcf" (one layout, MEMIT's CounterFact / MultiCounterFact), "zsre"
(the MEND split), "akew_mquake_cf" (AKEW MQuAKE-CF's rewrites as CounterFact cases,
`akew_structured`), and "auto", which looks at the first record's fields (anchors §8):
a `requested_rewrite` object means CounterFact, a list of them AKEW MQuAKE-CF, {`src`, `alt`,
`answers`, `loc`} ZsRE. The readers then validate every record, so a detection by one record
cannot half-read a file. (The command line sends an "auto" AKEW file to the long-form protocol,
`methods._is_longform`; its structured reading is asked for by name.)
"""

from __future__ import annotations

import pathlib

from keedit_jax.data._fields import DatasetError, load_records
from keedit_jax.data.akew_structured import read_akew_mquake_cf
from keedit_jax.data.counterfact import CounterFactRecord, read_counterfact
from keedit_jax.data.zsre import ZsreRecord, ZsreTarget, read_zsre

DATASET_FORMATS: tuple[str, ...] = ("auto", "counterfact", "mcf", "zsre", "akew_mquake_cf")
_ZSRE_FIELDS = frozenset({"src", "alt", "answers", "loc"})

StructuredRecord = CounterFactRecord | ZsreRecord


def detect_format(path: str | pathlib.Path) -> str:
    """"counterfact", "akew_mquake_cf" or "zsre" from the first record's fields; DatasetError
    otherwise."""
    records = load_records(path)
    if not records or not isinstance(records[0], dict):
        raise DatasetError(path, message="cannot detect the format: no record object first")
    fields = set(records[0])
    if isinstance(records[0].get("requested_rewrite"), list):
        return "akew_mquake_cf"
    if "requested_rewrite" in fields:
        return "counterfact"
    if _ZSRE_FIELDS <= fields:
        return "zsre"
    raise DatasetError(path, message=f"cannot detect the format from fields {sorted(fields)}; "
                                     "expected 'requested_rewrite' (CounterFact/MCF) or "
                                     f"{sorted(_ZSRE_FIELDS)} (ZsRE)")


def read_dataset(path: str | pathlib.Path, format: str = "auto", *,
                 zsre_target: ZsreTarget = "alt") -> tuple[StructuredRecord, ...]:
    """All records of a structured editing dataset, validated (keedit_jax.data readers)."""
    if format not in DATASET_FORMATS:
        raise ValueError(f"dataset format {format!r}: expected one of {DATASET_FORMATS}")
    if format == "auto":
        format = detect_format(path)
    if format == "zsre":
        return read_zsre(path, target=zsre_target)
    if format == "akew_mquake_cf":
        return read_akew_mquake_cf(path)
    return read_counterfact(path)
