"""One record per editing method: the single table the flags, the runners, the structured
solvers, the sequential editors and the flagfile check are derived from, so a new method is
one record plus its solver, not edits in string-keyed tables. Light to import (no jax):
flags.py reads it, and the factories are import paths ("module:function") resolved on use."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable
from typing import Any, Literal

Protocol = Literal["by_dataset", "structured", "longform", "sequential"]
Statistics = Literal["moment", "projector", "ote", "none"]
# Where a structured edit takes its targets: one at the last edited layer, spread over the
# layers (MEMIT), or one optimised at each edited layer's own output (BLUE).
TargetSchedule = Literal["last_layer", "each_layer"]
# The protocols that edit long-form texts (by_dataset: when the dataset is long form).
LONGFORM_PROTOCOLS = ("by_dataset", "longform")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MethodRecord:
    """A method: its protocol (by_dataset: structured, its --sequential stream, or long form
    by the dataset; structured: the structured protocol, and its --sequential stream when it
    has a sequential editor: GRACE, whose stream state is its codebook), the long-form
    token-weight strategy (long-form capable methods only), the downstream solver (a
    structured method's is built by a `solver_factory`), the key statistic that solver reads,
    and its paper.

    solver_factory:    "module:function" building the structured solver from a
                       `methods.structured.StructuredConfig`; given once per solver name, by
                       the first record of that solver (the others share it).
    sequential_editor: "module:function" building a streaming method's editor from its
                       flags (`methods.run_sequential.Editor`); every method that can stream
                       (sequential, or by_dataset with --sequential) has one, and a structured
                       batch editor may (its stream state lives in the parameters it returns).
    post_processing:   whether --post_processing (PRUNE, RECT) applies to its stream.
    batch_editor:      "module:function" editing one structured batch itself, for a method
                       with no target shift and no closed-form solve (fine-tuning): then
                       the record has no solver_factory and reads no statistics ("none").
    sites:             where the structured target step adds its shifts at the last edited
                       layer (`upstream.TargetConfig.sites`): the block output, or PMET's
                       attention and MLP outputs, optimised jointly.
    targets:           the structured edit's `TargetSchedule`: "each_layer" is BLUE's, a
                       target per edited layer and no residual distribution
                       (`methods.structured.edit_each_layer`).
    The method's defaults are its flagfile, `configs/<name>.cfg` (`flagfile`)."""

    name: str
    protocol: Protocol
    solver: str
    statistics: Statistics
    paper: str
    strategy: str = ""
    solver_factory: str = ""
    sequential_editor: str = ""
    post_processing: bool = False
    batch_editor: str = ""
    sites: tuple[str, ...] = ("block_out",)
    targets: TargetSchedule = "last_layer"

    def __post_init__(self) -> None:
        if self.targets != "last_layer" and self.protocol != "structured":
            raise ValueError(f"{self.name}: targets at each layer are structured-only (the "
                             "long-form and sequential runners insert one target)")
        if self.sites != ("block_out",) and self.protocol != "structured":
            raise ValueError(f"{self.name}: shifts at {self.sites} are structured-only (the "
                             "long-form and sequential runners shift the block output)")
        if self.batch_editor and (self.solver_factory or self.statistics != "none"
                                  or self.protocol != "structured"):
            raise ValueError(f"{self.name}: a batch editor is a structured method with no "
                             "solver factory and no statistics")
        streams = self.protocol in ("sequential", "by_dataset")
        if streams and not self.sequential_editor:
            raise ValueError(f"{self.name}: a {self.protocol} method needs sequential editor")
        if self.sequential_editor and not (streams or self.batch_editor):
            raise ValueError(f"{self.name}: a {self.protocol} method has no sequential editor "
                             "(a structured one streams only through its batch editor)")
        if self.post_processing and not streams:
            raise ValueError(f"{self.name}: post-processing applies to streams only")
        if self.longform and not self.strategy:
            raise ValueError(f"{self.name}: a long-form capable method needs its strategy")
        if not self.longform and self.strategy:
            raise ValueError(f"{self.name}: a {self.protocol} method edits no long form, so "
                             f"it has no strategy (got {self.strategy!r})")

    @property
    def longform(self) -> bool:
        """Whether the method edits long-form texts (then by its `strategy`)."""
        return self.protocol in LONGFORM_PROTOCOLS

    @property
    def structured(self) -> bool:
        """Whether the method edits structured requests once per batch (a structured solver)."""
        return self.protocol in ("by_dataset", "structured")

    @property
    def flagfile(self) -> str:
        """The method's defaults as a flagfile, relative to the repository."""
        return f"configs/{self.name}.cfg"


_SEQ = "keedit_jax.methods.run_sequential"
RECORDS = (
    MethodRecord(name="memit", protocol="by_dataset", strategy="one_for_all", solver="memit",
                 solver_factory="keedit_jax.methods.structured:memit_solver",
                 sequential_editor=f"{_SEQ}:memit_editor", post_processing=True,
                 statistics="moment", paper="Meng et al. 2023, Mass-Editing Memory in a "
                 "Transformer"),
    MethodRecord(name="alphaedit", protocol="by_dataset", strategy="one_for_all",
                 solver="alphaedit", statistics="projector",
                 solver_factory="keedit_jax.methods.structured:alphaedit_solver",
                 sequential_editor=f"{_SEQ}:alphaedit_editor",
                 paper="Fang et al. 2025, AlphaEdit: Null-Space Constrained Knowledge Editing"),
    MethodRecord(name="rome", protocol="structured", solver="rome", statistics="moment",
                 solver_factory="keedit_jax.downstream._rome:structured_solver",
                 paper="Meng et al. 2022, Locating and Editing Factual Associations in GPT"),
    MethodRecord(name="pmet", protocol="structured", solver="pmet", statistics="moment",
                 solver_factory="keedit_jax.downstream._pmet:structured_solver",
                 sites=("attn_out", "mlp_out"),
                 paper="Li et al. 2024, PMET: Precise Model Editing in a Transformer (AAAI)"),
    MethodRecord(name="memit_blue", protocol="structured", solver="memit",
                 statistics="moment", targets="each_layer",
                 paper="Li et al. 2025, Rethinking Residual Distribution in Locate-then-Edit "
                 "Model Editing (BLUE), on MEMIT"),
    MethodRecord(name="alphaedit_blue", protocol="structured", solver="alphaedit",
                 statistics="projector", targets="each_layer",
                 paper="Li et al. 2025, Rethinking Residual Distribution in Locate-then-Edit "
                 "Model Editing (BLUE), on AlphaEdit"),
    MethodRecord(name="ft_l", protocol="structured", solver="finetune", statistics="none",
                 batch_editor="keedit_jax.methods.finetune:finetune_requests",
                 paper="Meng et al. 2022 (ROME), the FT+L baseline: fine-tuning under an "
                 "L∞ bound"),
    MethodRecord(name="ft_m", protocol="structured", solver="finetune", statistics="none",
                 batch_editor="keedit_jax.methods.finetune:finetune_requests",
                 paper="Zhang et al. 2024, A Comprehensive Study of Knowledge Editing, FT-M"),
    MethodRecord(name="grace", protocol="structured", solver="grace", statistics="none",
                 batch_editor="keedit_jax.methods.grace:grace_requests",
                 sequential_editor=f"{_SEQ}:params_state_editor",
                 paper="Hartvigsen et al. 2023, Aging with GRACE: Lifelong Model Editing "
                 "with Discrete Key-Value Adaptors (NeurIPS)"),
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
                 sequential_editor=f"{_SEQ}:memit_editor", post_processing=True,
                 paper="OTE sequential editing: MEMIT-seq (aligned keys)"),
    MethodRecord(name="alphaedit_aligned", protocol="sequential", solver="ote",
                 statistics="ote", sequential_editor=f"{_SEQ}:aligned_alphaedit_editor",
                 paper="OTE sequential editing: aligned AlphaEdit"),
    MethodRecord(name="memorize_latest", protocol="sequential", solver="ote",
                 statistics="ote", sequential_editor=f"{_SEQ}:memorize_latest_editor",
                 paper="OTE sequential editing: memorize-latest"),
    MethodRecord(name="lyaplock", protocol="sequential", solver="lyaplock",
                 statistics="moment", sequential_editor=f"{_SEQ}:lyaplock_editor",
                 paper="LyapLock: bounded knowledge preservation"),
    MethodRecord(name="metake", protocol="sequential", solver="alphaedit",
                 statistics="projector", sequential_editor=f"{_SEQ}:alphaedit_editor",
                 paper="MetaKE: meta-learned targets on AlphaEdit"),
    MethodRecord(name="sphere", protocol="sequential", solver="sphere",
                 statistics="projector", sequential_editor=f"{_SEQ}:sphere_editor",
                 paper="Liu et al. 2026, Energy-Regularized Sequential Model Editing on "
                 "Hyperspheres (SPHERE), on AlphaEdit"),
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


def _solver_factories(records: tuple[MethodRecord, ...]) -> dict[str, str]:
    """Each structured solver's factory path, given once; every structured record's solver
    must have one."""
    out: dict[str, str] = {}
    for record in records:
        if record.solver_factory:
            if out.setdefault(record.solver, record.solver_factory) != record.solver_factory:
                raise ValueError(f"{record.name}: solver {record.solver!r} is built by "
                                 f"{out[record.solver]}, not {record.solver_factory}")
    for record in records:
        if record.structured and not record.batch_editor and record.solver not in out:
            raise ValueError(f"{record.name}: structured solver {record.solver!r} has no "
                             f"solver_factory in any record")
    return out


# The factory path of each structured solver, from the records.
SOLVER_FACTORIES: dict[str, str] = _solver_factories(RECORDS)


def load_factory(path: str) -> Callable[..., Any]:
    """The function a "module:function" path names (imported on use, so this module stays
    light)."""
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def structured_solver_factory(solver: str) -> Callable[..., Any]:
    """The factory of a structured solver (config -> Solver), or a ValueError naming them."""
    if solver not in SOLVER_FACTORIES:
        raise ValueError(f"unknown structured solver {solver!r}; solvers: "
                         f"{', '.join(SOLVER_FACTORIES)}")
    return load_factory(SOLVER_FACTORIES[solver])


def method_record(name: str) -> MethodRecord:
    """The record of a method, or a ValueError naming the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; methods: {', '.join(METHODS)}")
    return METHODS[name]
