"""The multi-layer MEMIT insertion loop (docs/references.md: anchors §1 "Per-layer insertion",
ote_se §3.0), written over any closed-form solver with optax's (init, update) shape.

Layers are edited in increasing depth. Before layer i of L, the caller's `readout` recomputes,
under the params edited so far, the keys at that layer and the output of the last edited layer
at the lookup tokens; the layer then takes (targets − outputs) / (L − i), its share of what is
still missing, so later layers see the earlier layers' changes (MEMIT's schedule). A solver
may bring its own share (`Solver.spread`: PMET's (targets − outputs) / √(L − i)) and the site
its targets live at (`Solver.target_site`: PMET's are MLP outputs, not block outputs).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from keedit_jax.downstream._alphaedit import (
    AlphaEditHParams,
    alphaedit_init,
    alphaedit_update,
)
from keedit_jax.downstream._linalg import SolveReport, check_solve
from keedit_jax.downstream._lyaplock import LyapLockHParams, lyaplock_init, lyaplock_update
from keedit_jax.downstream._memit import MemitHParams, memit_init, memit_update
from keedit_jax.downstream._ote import OteHParams, ote_init, ote_update
from keedit_jax.models.params import Params, Path, get_path, set_layers

Array = jax.Array
State = Any


class Solver(NamedTuple):
    """A downstream solver in optax's shape (STYLE §4), hyperparameters bound.

    init(d_ff, d_model, dtype) -> State of one layer.
    update(stats, keys, resid, state, *, kernel=None, preserve=None) -> (ΔW [F, D], new State,
    SolveReport), where stats is the layer's statistic (MEMIT, LyapLock: the moment E[kkᵀ];
    AlphaEdit: the projector P; the OTE family: `OteStats`), keys [n, F], resid [n, D], kernel
    [F, D] the layer's current W (PRUNE / RECT read it) and preserve [m, F] the optional
    in-context keys to keep (zero rows are padding; AnyEdit / μKE, anyedit §2.4). kernel and
    preserve are passed by keyword only. Pure and jitted; check the report with `check_solve`.
    max_layers: the most layers one edit may span (ROME: 1); None for any number.
    spread: (targets, outputs, index, n_layers) -> the residual [n, D] layer `index` of
    n_layers is fitted to (default MEMIT's `spread_residual`).
    target_site: the seam site (`keedit_jax.intervene.SITES`) of the last edited layer whose
    optimised value the targets are and whose output the readout compares them with:
    "block_out" (the residual stream, MEMIT) or "mlp_out" (the FFN output, PMET).
    """

    init: Callable[..., State]
    update: Callable[..., tuple[Array, State, SolveReport]]
    name: str
    max_layers: int | None = None
    spread: Callable[[Array, Array, int, int], Array] | None = None
    target_site: str = "block_out"


def check_layer_count(solver: Solver, layers: Sequence[int]) -> None:
    """A ValueError naming the layers when the solver edits fewer layers than given."""
    if solver.max_layers is not None and len(layers) > solver.max_layers:
        raise ValueError(f"{solver.name} edits at most {solver.max_layers} layer(s) at a time; "
                         f"got layers {', '.join(str(i) for i in layers)}: give one --layers")


def in_float64(solver: Solver) -> Solver:
    """The solver run with x64 on: its float64 solves (hparams dtype="float64") need it, the
    model stays in its own dtype. Every float64 solve of the library goes through this."""

    def init(d_ff: int, d_model: int, dtype: Any = jnp.float64) -> State:
        with jax.enable_x64(True):
            return solver.init(d_ff, d_model, jnp.float64)

    def update(*args: Any, **kwargs: Any) -> Any:
        with jax.enable_x64(True):
            return solver.update(*args, **kwargs)

    return solver._replace(init=init, update=update)


def in_solve_dtype(solver: Solver, dtype: str) -> Solver:
    """`in_float64(solver)` for a float64 solve, the solver itself for float32."""
    return in_float64(solver) if dtype == "float64" else solver


def _square_init(init: Callable[..., State]) -> Callable[..., State]:
    """An init whose state is [F, F] only, in the (d_ff, d_model, dtype) shape."""
    return lambda d_ff, d_model, dtype=jnp.float32: init(d_ff, dtype)


def _kernel_free(update: Callable[..., Any]) -> Callable[..., Any]:
    """An update that does not read the current kernel, in the Solver shape."""
    def solver_update(stats: Array, keys: Array, resid: Array, state: State, *,
                      kernel: Array | None = None, preserve: Array | None = None) -> Any:
        del kernel
        return update(stats, keys, resid, state, preserve=preserve)
    return solver_update


def memit(hparams: MemitHParams) -> Solver:
    """MEMIT (anchors §1), or MEMIT-seq with `accumulate_keys` (ote_se §3.1)."""
    name = "memit_seq" if hparams.accumulate_keys else "memit"
    return Solver(_square_init(memit_init),
                  _kernel_free(functools.partial(memit_update, hparams=hparams)), name)


def alphaedit(hparams: AlphaEditHParams) -> Solver:
    """AlphaEdit with its previous-edit key cache (anchors §4, ote_se §3.2)."""
    return Solver(_square_init(alphaedit_init),
                  _kernel_free(functools.partial(alphaedit_update, hparams=hparams)),
                  "alphaedit")


def ote(hparams: OteHParams, name: str = "ote") -> Solver:
    """A member of the OTE-aligned family (ote_se; see `_ote`)."""
    return Solver(ote_init, functools.partial(ote_update, hparams=hparams), name)


def lyaplock(hparams: LyapLockHParams) -> Solver:
    """LyapLock's queue-weighted solve (lyaplock §2.5-2.6; see `_lyaplock`)."""
    return Solver(lyaplock_init, functools.partial(lyaplock_update, hparams=hparams),
                  "lyaplock")


class Readout(NamedTuple):
    """What the caller reads under the current params for one edited layer.

    keys:     [n, F] the MEMIT keys (down-projection inputs at the lookup tokens) of that layer
    outputs:  [n, D] the output of the last edited layer at the lookup tokens (clean prompts)
    preserve: [m, F] keys of that layer to keep, read at the other positions of the edit
              sequences (AnyEdit / μKE's K_p, anyedit §2.4); zero rows are padding. None for
              plain MEMIT / AlphaEdit.
    """

    keys: Array
    outputs: Array
    preserve: Array | None = None


@dataclasses.dataclass(frozen=True)
class LayerReport:
    """Per-layer record of one batch: the keys [n, F] and residual [n, D] given to the layer,
    the values [n, D] = K W + R it was fitted to (what conflict resolution later removes), and
    the solve report."""

    keys: Array
    resid: Array
    values: Array
    solve: SolveReport


def spread_residual(targets: Array, outputs: Array, index: int, n_layers: int) -> Array:
    """(targets − outputs) / (L − i): layer i's share of what the remaining layers must add."""
    if not 0 <= index < n_layers:
        raise IndexError(f"layer index {index} is outside 0..{n_layers - 1}")
    return (targets - outputs) / (n_layers - index)


def ordered_layers(layers: Sequence[int]) -> list[int]:
    """The edited layers in increasing depth, the order the residual is spread in."""
    order = sorted(layers)
    if len(set(order)) != len(order):
        raise ValueError(f"edited layers repeat: {list(layers)}")
    return order


def add_layer_delta(params: Params, kernel_path: Path, layer: int, delta: Array) -> Params:
    """A copy of params with ΔW [F, D] added to layer `layer` of the stacked kernel [L, F, D]."""
    kernel = get_path(params, kernel_path)
    if kernel.shape[1:] != delta.shape:
        raise ValueError(f"ΔW {delta.shape} does not match the kernel of layer {layer} "
                         f"{kernel.shape[1:]} at {'/'.join(kernel_path)}")
    return set_layers(params, kernel_path, {layer: kernel[layer] + delta.astype(kernel.dtype)})


def init_states(solver: Solver, layers: Sequence[int], d_ff: int, d_model: int,
                dtype: jnp.dtype = jnp.float32) -> dict[int, State]:
    return {layer: solver.init(d_ff, d_model, dtype) for layer in layers}


def edit_layers(params: Params, kernel_path: Path, solver: Solver,
                stats: Mapping[int, Array], states: Mapping[int, State], targets: Array,
                readout: Callable[[Params, int], Readout], *, layers: Sequence[int],
                request_ids: Sequence[object] = ()
                ) -> tuple[Params, dict[int, State], dict[int, LayerReport]]:
    """Insert one batch: per layer in increasing depth, read out, spread, solve, check, write.

    targets [n, D] are the optimised values z at the last edited layer. A readout's
    `preserve` keys (AnyEdit / μKE's K_p) go to the solver of the same layer. kernel_path is
    `keedit_jax.models.params.down_proj_path(cfg)`. Returns the edited params, the new
    per-layer states and per-layer reports. A failed solve raises SolveError naming the
    layer and request ids; nothing is returned, so the caller's params and states stand.
    """
    order = ordered_layers(layers)
    check_layer_count(solver, order)
    new_states = dict(states)
    reports: dict[int, LayerReport] = {}
    for index, layer in enumerate(order):
        sites = readout(params, layer)
        resid = (solver.spread or spread_residual)(targets, sites.outputs, index, len(order))
        kernel = get_path(params, kernel_path)[layer]
        delta, new_states[layer], report = solver.update(
            stats[layer], sites.keys, resid, states[layer], kernel=kernel,
            preserve=sites.preserve)
        check_solve(report, layer=layer, request_ids=request_ids, method=solver.name)
        params = add_layer_delta(params, kernel_path, layer, delta)
        reports[layer] = LayerReport(keys=sites.keys, resid=resid,
                                     values=sites.keys @ kernel + resid, solve=report)
    return params, new_states, reports
