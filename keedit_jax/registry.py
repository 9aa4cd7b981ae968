"""One record per editing method: the single table the flags, the runners and the solver
choices are derived from, so a new method is one record (plus its solver), not edits in
four string-keyed tables. Light to import (no jax): flags.py reads it."""

from __future__ import annotations

import dataclasses
from typing import Literal

Protocol = Literal["by_dataset", "longform", "sequential"]
Statistics = Literal["moment", "projector", "ote"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodRecord:
    """A method: its protocol (by_dataset: structured, its --sequential stream, or long form
    by the dataset), the long-form token-weight strategy, the downstream solver, the key
    statistic that solver reads, and its paper."""

    name: str
    protocol: Protocol
    solver: str
    statistics: Statistics
    paper: str
    strategy: str = ""

    def __post_init__(self) -> None:
        if self.protocol != "sequential" and not self.strategy:
            raise ValueError(f"{self.name}: a long-form capable method needs its strategy")


RECORDS = (
    MethodRecord(name="memit", protocol="by_dataset", strategy="one_for_all", solver="memit",
                 statistics="moment", paper="Meng et al. 2023, Mass-Editing Memory in a "
                 "Transformer"),
    MethodRecord(name="alphaedit", protocol="by_dataset", strategy="one_for_all",
                 solver="alphaedit", statistics="projector",
                 paper="Fang et al. 2025, AlphaEdit: Null-Space Constrained Knowledge Editing"),
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


def method_record(name: str) -> MethodRecord:
    """The record of a method, or a ValueError naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name]
