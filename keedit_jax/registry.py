"""One record per editing method: the single table the flags, the runners and the solver
choices are derived from, so a new method is one record (plus its solver), not edits in
four string-keyed tables. Light to import (no jax): flags.py reads it."""

from __future__ import annotations

import dataclasses
from typing import Literal

Protocol = Literal["by_dataset", "structured", "longform", "sequential"]
Statistics = Literal["moment", "projector", "ote"]
# The protocols that edit long-form texts (by_dataset: when the dataset is long form).
LONGFORM_PROTOCOLS = ("by_dataset", "longform")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodRecord:
    """A method: its protocol (by_dataset: structured, its --sequential stream, or long form
    by the dataset; structured: the structured protocol only), the long-form token-weight
    strategy (long-form capable methods only), the downstream solver (a structured method's is
    a key of `keedit_jax.downstream.STRUCTURED_SOLVERS`), the key statistic that solver reads,
    and its paper."""

    name: str
    protocol: Protocol
    solver: str
    statistics: Statistics
    paper: str
    strategy: str = ""

    def __post_init__(self) -> None:
        if self.longform and not self.strategy:
            raise ValueError(f"{self.name}: a long-form capable method needs its strategy")
        if not self.longform and self.strategy:
            raise ValueError(f"{self.name}: a {self.protocol} method edits no long form, so "
                             f"it has no strategy (got {self.strategy!r})")

    @property
    def longform(self) -> bool:
        """Whether the method edits long-form texts (then by its `strategy`)."""
        return self.protocol in LONGFORM_PROTOCOLS


RECORDS = (
    MethodRecord(name="memit", protocol="by_dataset", strategy="one_for_all", solver="memit",
                 statistics="moment", paper="Meng et al. 2023, Mass-Editing Memory in a "
                 "Transformer"),
    MethodRecord(name="alphaedit", protocol="by_dataset", strategy="one_for_all",
                 solver="alphaedit", statistics="projector",
                 paper="Fang et al. 2025, AlphaEdit: Null-Space Constrained Knowledge Editing"),
    MethodRecord(name="rome", protocol="structured", solver="rome", statistics="moment",
                 paper="Meng et al. 2022, Locating and Editing Factual Associations in GPT"),
    MethodRecord(name="unke", protocol="longform", strategy="one_for_all", solver="unke",
                 statistics="moment", paper="Deng et al. 2025, UnKE"),
    MethodRecord(name="anyedit", protocol="longform", strategy="window", solver="memit",
                 statistics="moment", paper="Jiang et al. 2025, AnyEdit (MEMIT+)"),
    MethodRecord(name="anyedit_star", protocol="longform", strategy="window", solver="unke",
                 statistics="moment", paper="Jiang et al. 2025, AnyEdit* (UnKE+)"),
    MethodRecord(name="muke", protocol="longform", strategy="matryoshka_affinity",
                 solver="memit", statistics="moment", paper="μKE (Matryoshka Unstructured "
                 "Knowledge Editing)"),
    MethodRecord(name="muke_star", protocol="longform", strategy="matryoshka_affinity",
                 solver="unke", statistics="moment", paper="μKE* (on UnKE)"),
    MethodRecord(name="memit_seq", protocol="sequential", solver="memit", statistics="moment",
                 paper="OTE sequential editing: MEMIT-seq (aligned keys)"),
    MethodRecord(name="alphaedit_aligned", protocol="sequential", solver="ote",
                 statistics="ote", paper="OTE sequential editing: aligned AlphaEdit"),
    MethodRecord(name="memorize_latest", protocol="sequential", solver="ote",
                 statistics="ote", paper="OTE sequential editing: memorize-latest"),
    MethodRecord(name="lyaplock", protocol="sequential", solver="lyaplock",
                 statistics="moment", paper="LyapLock: bounded knowledge preservation"),
    MethodRecord(name="metake", protocol="sequential", solver="alphaedit",
                 statistics="projector", paper="MetaKE: meta-learned targets on AlphaEdit"),
)
METHODS: dict[str, MethodRecord] = {record.name: record for record in RECORDS}


def _solver_statistics(records: tuple[MethodRecord, ...]) -> dict[str, Statistics]:
    """Each solver's statistic; records sharing a solver must agree on it."""
    out: dict[str, Statistics] = {}
    for record in records:
        if out.setdefault(record.solver, record.statistics) != record.statistics:
            raise ValueError(f"{record.name}: solver {record.solver!r} reads "
                             f"{out[record.solver]!r}, not {record.statistics!r}")
    return out


# The statistic each solver reads, from the records (the runners key statistics by solver).
SOLVER_STATISTICS: dict[str, Statistics] = _solver_statistics(RECORDS)


def method_record(name: str) -> MethodRecord:
    """The record of a method, or a ValueError naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name]
