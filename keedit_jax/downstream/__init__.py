"""Downstream: weight solvers and their carried state (DESIGN.md, STYLE §4): closed form
(MEMIT, AlphaEdit, with optional in-context preservation keys) or gradient (UnKE), and
SPHERE's sparse projection of a solver's update.

Orientation: kernels are [d_in, d_out], so the down-projection kernel is W [F, D], keys are
rows [n, F] and residuals rows [n, D]; the papers' W [D, F] is our Wᵀ (see `_linalg`).

A solver that one method alone uses (as ROME's) is reached through its registry record's
`solver_factory`, not exported here.
"""

from keedit_jax.downstream._alphaedit import (
    AlphaEditHParams,
    AlphaEditState,
    alphaedit_init,
    alphaedit_system,
    alphaedit_update,
)
from keedit_jax.downstream._layers import (
    LayerReport,
    Readout,
    Solver,
    add_layer_delta,
    alphaedit,
    check_layer_count,
    edit_layers,
    in_float64,
    in_solve_dtype,
    init_states,
    lyaplock,
    memit,
    ote,
    spread_residual,
)
from keedit_jax.downstream._linalg import (
    SolveError,
    SolveReport,
    check_solve,
    relative_residual,
    solve_dtype,
)
from keedit_jax.downstream._lyaplock import (
    LyapLockHParams,
    LyapLockState,
    lyaplock_init,
    lyaplock_update,
    preservation_loss,
    preservation_weight,
)
from keedit_jax.downstream._memit import (
    MemitHParams,
    MemitState,
    memit_init,
    memit_system,
    memit_update,
)
from keedit_jax.downstream._ote import (
    CORRECTION_RIDGE,
    POST_PROCESSING,
    OteHParams,
    OteState,
    OteStats,
    ote_init,
    ote_system,
    ote_update,
    prune,
    rect,
    resolve_conflicts,
)
from keedit_jax.downstream._sphere import (
    SphereHParams,
    SphereState,
    sparse_projector,
    sphere,
)
from keedit_jax.downstream._unke import (
    Contexts,
    NonFiniteRegressionError,
    UnkeHParams,
    UnkeLayerReport,
    unke_edit,
)

__all__ = [
    "CORRECTION_RIDGE",
    "POST_PROCESSING",
    "LyapLockHParams",
    "LyapLockState",
    "OteHParams",
    "OteState",
    "OteStats",
    "lyaplock",
    "lyaplock_init",
    "lyaplock_update",
    "ote",
    "ote_init",
    "ote_system",
    "ote_update",
    "preservation_loss",
    "preservation_weight",
    "prune",
    "rect",
    "resolve_conflicts",
    "AlphaEditHParams",
    "AlphaEditState",
    "Contexts",
    "LayerReport",
    "MemitHParams",
    "MemitState",
    "NonFiniteRegressionError",
    "Readout",
    "SolveError",
    "SolveReport",
    "Solver",
    "SphereHParams",
    "SphereState",
    "UnkeHParams",
    "UnkeLayerReport",
    "add_layer_delta",
    "alphaedit",
    "alphaedit_init",
    "alphaedit_system",
    "alphaedit_update",
    "check_layer_count",
    "check_solve",
    "edit_layers",
    "in_float64",
    "in_solve_dtype",
    "init_states",
    "memit",
    "memit_init",
    "memit_system",
    "memit_update",
    "relative_residual",
    "solve_dtype",
    "sparse_projector",
    "sphere",
    "spread_residual",
    "unke_edit",
]
