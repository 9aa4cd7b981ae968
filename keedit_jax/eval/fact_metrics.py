"""Fact-level long-form scores: which of the facts an edit changed does an answer state?

The papers' text metrics (`longform_metrics`) compare an answer with the whole target text,
so an edit that changes a few facts of a text the model already knows barely moves them. Where
the changed facts are known (the organism's `<benchmark>.facts.json` side files), an answer is
scored per fact instead:

- `fact_efficacy`: the fraction of changed facts whose NEW value the answer states;
- `fact_leak`: the fraction of changed facts whose OLD value it still states;
- `fact_kept`: the fraction of unchanged facts whose value it states.

A value is stated when it occurs as whole words, case-insensitively ("a Tailor." states
"tailor"; "Tailorsby" does not), and not only inside a longer value of the vocabulary ("Port
Mira" does not state "Mira" when "Port Mira" is a value too). A score whose fact set is empty
(an answer about no changed fact) is absent, not 0; means skip absent scores.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from keedit_jax.data import DatasetError

FACT_KEYS = ("fact_efficacy", "fact_leak", "fact_kept")


@dataclasses.dataclass(frozen=True)
class FactChange:
    """One fact of a target text: its value before and after the edit (equal when kept)."""

    relation: str
    old: str
    new: str

    @property
    def changed(self) -> bool:
        return self.old != self.new


def _spans(text: str, value: str) -> list[tuple[int, int]]:
    pattern = rf"(?<!\w){re.escape(value)}(?!\w)"
    return [m.span() for m in re.finditer(pattern, text, flags=re.IGNORECASE)]


def states(text: str, value: str, vocabulary: Iterable[str] = ()) -> bool:
    """Whether `text` states `value`: a whole-word match not inside a match of a longer value
    of `vocabulary` that contains it."""
    longer = [v for v in vocabulary if len(v) > len(value) and value.lower() in v.lower()]
    covered = [span for v in longer for span in _spans(text, v)]
    return any(not any(a <= start and end <= b for a, b in covered)
               for start, end in _spans(text, value))


def _fraction(hits: Sequence[bool]) -> float | None:
    return sum(hits) / len(hits) if hits else None


def fact_scores(answer: str, facts: Sequence[FactChange],
                vocabulary: Iterable[str] = ()) -> dict[str, float]:
    """FACT_KEYS of one answer about `facts`; a key is absent when its fact set is empty."""
    vocabulary = set(vocabulary) | {f.old for f in facts} | {f.new for f in facts}
    changed = [f for f in facts if f.changed]
    kept = [f for f in facts if not f.changed]
    scores = {
        "fact_efficacy": _fraction([states(answer, f.new, vocabulary) for f in changed]),
        "fact_leak": _fraction([states(answer, f.old, vocabulary) for f in changed]),
        "fact_kept": _fraction([states(answer, f.new, vocabulary) for f in kept]),
    }
    return {key: value for key, value in scores.items() if value is not None}


def mean_available(rows: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each key over the rows that have it (fact scores are absent where undefined)."""
    if not rows:
        raise ValueError("no scores to aggregate")
    keys = dict.fromkeys(k for row in rows for k in row)
    return {k: math.fsum(r[k] for r in rows if k in r) / sum(k in r for r in rows) for k in keys}


def side_file(dataset: str | Path) -> Path:
    """Where a long-form file's fact sheets live: `unkebench.json` -> `unkebench.facts.json`."""
    path = Path(dataset)
    return path.with_name(f"{path.stem}.facts.json")


def read_fact_sheets(path: str | Path) -> dict[int | str, tuple[FactChange, ...]]:
    """Record id -> its facts in text order, from a side file written by
    `organism.benchmarks.fact_sheets`; one error naming the file and record if malformed."""
    sheets = {}
    for i, item in enumerate(json.loads(Path(path).read_text(encoding="utf-8"))):
        try:
            sheets[item["id"]] = tuple(FactChange(f["relation"], f["old"], f["new"])
                                       for f in item["facts"])
        except (KeyError, TypeError) as err:
            raise DatasetError(path, message=f"record {i} is not a fact sheet ({err!r}: it "
                               "needs id, and facts of relation, old, new)") from err
    return sheets
