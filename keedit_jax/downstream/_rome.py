"""ROME's rank-one layer update (Meng et al. 2022, "Locating and Editing Factual Associations
in GPT", §3 eq. 2), a single-layer structured solver.

In our orientation (see `_linalg`: W [F, D] the layer's down-projection kernel, y = x @ W,
keys are rows k [F]), with C = E[k kᵀ] the layer's uncentred second moment (the "moment"
statistic, the one MEMIT reads), k* the down-projection input at the lookup token (averaged
over the context templates by the caller's readout) and v*ᵀ = k*ᵀW + rᵀ the value the layer
must produce, r being the residual it must add (`edit_layers` gives a single edited layer the
whole δ = z − h), ROME solves

    min tr(ΔWᵀ C ΔW)   subject to   k*ᵀ (W + ΔW) = v*ᵀ

whose solution is rank one:

    ΔW = (C⁻¹ k*) rᵀ / (k*ᵀ C⁻¹ k*)          [F, D]

C⁻¹k* is a Cholesky solve (never an explicit inverse), in the solve dtype (float32 default,
float64 offered, as MEMIT). The scale of C cancels, so ROME has no λ; a C that is not positive
definite makes the factor NaN, which the report flags and `check_solve` refuses (SolveError).

Batches. ROME is a single-edit method. A batch of E requests at the layer is applied as MEMIT's
paper ran ROME on batches: one rank-one update after another in request order, each computed
on the kernel the previous ones left. Only this layer's down projection changes, so the keys
at this layer stay the same and are reused. Request j then adds u_j s_jᵀ, u_j = C⁻¹k_j, where
s_j (k_jᵀu_j) = r_j − k_jᵀ Σ_{i<j} u_i s_iᵀ (what is still missing after the earlier
updates); stacked, T S = R with T = tril(K Uᵀ) lower triangular (U [E, F] the rows u_j), so
all E steps are one triangular solve and ΔW = Uᵀ S. The last request's constraint holds
exactly after the batch; an earlier one's held at its own step and is then moved by the later
updates (as in sequential ROME).

The report's relative residual is that of the constraints as the steps solved them, read off
the ΔW returned: ‖K ΔW − triu₁(K Uᵀ) S − R‖_F / ‖V*‖_F with V* = K W + R (for one request:
|k*ᵀW' − v*ᵀ| / |v*|; ‖R‖_F when the kernel is not given), so an inaccurate or non-finite
solve is refused like MEMIT's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve, solve_triangular

from keedit_jax.downstream._layers import Solver, in_solve_dtype
from keedit_jax.downstream._linalg import SolveDtype, SolveReport, all_finite, solve_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class RomeHParams:
    """ROME's solve hyperparameters (static under jit).

    dtype:            solve precision (float64 needs x64 on, as MEMIT's).
    max_rel_residual: refuse a solve whose constraint residual exceeds this.
    """

    dtype: SolveDtype = "float32"
    max_rel_residual: float = 1e-3


class RomeState(NamedTuple):
    """ROME carries nothing between batches."""


def rome_init(d_ff: int, d_model: int, dtype: jnp.dtype = jnp.float32) -> RomeState:
    del d_ff, d_model, dtype
    return RomeState()


@functools.partial(jax.jit, static_argnames=("hparams",))
def rome_update(mom2: Array, keys: Array, resid: Array, state: RomeState,
                hparams: RomeHParams, *, kernel: Array | None = None,
                preserve: Array | None = None) -> tuple[Array, RomeState, SolveReport]:
    """ΔW [F, D] of the E rank-one ROME updates in request order, the state, the report.

    mom2 [F, F] = C = E[k kᵀ]; keys [E, F] = k*; resid [E, D] = r, what the layer must add at
    each key (v* = k*ᵀW + r); kernel [F, D] the layer's current W, read only for the report's
    ‖V*‖. ROME preserves no in-context keys: `preserve` must be None.
    """
    if preserve is not None:
        raise ValueError("ROME has no in-context preservation: preserve must be None")
    dtype = solve_dtype(hparams.dtype)
    k, r = keys.astype(dtype), resid.astype(dtype)
    u = cho_solve(cho_factor(mom2.astype(dtype), lower=True), k.T).T  # [E, F] rows C⁻¹k_j
    cross = k @ u.T  # [E, E]: k_jᵀ u_i, diagonal k_jᵀC⁻¹k_j
    s = solve_triangular(jnp.tril(cross), r, lower=True)  # [E, D]
    delta = u.T @ s  # [F, D], rank ≤ E
    # Request j's constraint at its own step: k_jᵀ (ΔW less the later requests' terms) = r_j.
    miss = jnp.linalg.norm(k @ delta - jnp.triu(cross, 1) @ s - r)
    values = r if kernel is None else k @ kernel.astype(dtype) + r  # V* [E, D]
    v_norm = jnp.linalg.norm(values)
    residual = jnp.where(v_norm > 0, miss / jnp.where(v_norm > 0, v_norm, 1), miss)
    report = SolveReport(finite=all_finite(u, delta), rel_residual=residual,
                         tolerance=jnp.asarray(hparams.max_rel_residual, jnp.float32))
    return delta, state, report


def rome(hparams: RomeHParams) -> Solver:
    """ROME (Meng et al. 2022): one layer, rank one per request, no λ."""
    return Solver(rome_init, functools.partial(rome_update, hparams=hparams), "rome",
                  max_layers=1)


def structured_solver(config: Any) -> Solver:
    """ROME from a `methods.structured.StructuredConfig` (its registry record's factory): the
    config's `solver_hparams`, else the defaults solved in its `solve_dtype`."""
    hparams = config.solver_hparams or RomeHParams(dtype=config.solve_dtype)
    return in_solve_dtype(rome(hparams), hparams.dtype)
