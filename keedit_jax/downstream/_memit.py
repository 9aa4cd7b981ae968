"""MEMIT's closed-form layer update (anchors §1 "Per-layer insertion", §2.1, §3;
docs/references.md).

In our orientation (see `_linalg`), with C = E[k kᵀ] the normalised, uncentred second moment
of the layer's down-projection inputs (the stored sum divided by its count, anchors §3) and
λ = `mom2_update_weight` (15000 for Llama-3-8B, anchors §2.1), MEMIT minimises

    ‖K (W + ΔW) − V‖² + λ · tr(ΔWᵀ C ΔW)          (λC stands in for K₀ᵀK₀, ote_se §2.1)

whose normal equations are (λC + G + KᵀK) ΔW = Kᵀ R, R = V − K W, G = 0. With
`accumulate_keys` the solver is MEMIT-seq / "MEMIT (aligned)" (ote_se §2.5 Remark A.1, §3.1):
G = Σ_past KᵀK is carried in the state and each batch's KᵀK is added after its solve.

In-context preservation (AnyEdit's and μKE's `memit_ARE`, anyedit §2.4.1, muke §2.7): the
keys K_p [m, F] at the non-edited positions of the edit sequence itself are preserved too, so
the system becomes (λC + G + K_pᵀK_p + KᵀK) ΔW = Kᵀ R. K_p is context, not an edit: it is
never added to G, so MEMIT-seq carries only the keys it inserted (a later batch's context is
its own). Zero rows of K_p add nothing to K_pᵀK_p, so padded K_p batches need no mask.

The system is symmetric positive definite, so it is solved by Cholesky (never an explicit
inverse): X = A⁻¹ Kᵀ [F, n], then ΔW = X R [F, D] (n ≤ D in practice, so this is the cheaper
order; it is also the reference's `solve(A, K)` then `R adjᵀ`). The reference solves in
float64 (anchors §1, §11.3); we default to float32 and offer float64.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

from keedit_jax.compile_cache import exported_jit
from keedit_jax.downstream._linalg import SolveDtype, SolveReport, make_report, solve_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class MemitHParams:
    """MEMIT's solve hyperparameters (anchors §2.1; static under jit).

    mom2_update_weight: λ, the weight of the normalised second moment C.
    accumulate_keys:    carry G = Σ_past KᵀK across batches (MEMIT-seq, ote_se §3.1).
    dtype:              solve precision; the reference uses float64.
    max_rel_residual:   refuse a solve whose relative residual exceeds this (ill-conditioned).
    """

    mom2_update_weight: float = 15000.0
    accumulate_keys: bool = False
    dtype: SolveDtype = "float32"
    max_rel_residual: float = 1e-2


class MemitState(NamedTuple):
    """key_gram: G = Σ over previous batches of KᵀK [F, F]; stays 0 unless accumulate_keys."""

    key_gram: Array


def memit_init(d_ff: int, dtype: jnp.dtype = jnp.float32) -> MemitState:
    return MemitState(key_gram=jnp.zeros((d_ff, d_ff), dtype))


def batch_gram(keys: Array, preserve: Array | None, dtype: jnp.dtype) -> Array:
    """KᵀK + K_pᵀK_p [F, F] in `dtype`: the edit keys plus the in-context preserved keys.

    Shared by MEMIT and AlphaEdit, whose systems differ only around this sum.
    """
    k = keys.astype(dtype)
    gram = k.T @ k
    if preserve is None:
        return gram
    kp = preserve.astype(dtype)
    return gram + kp.T @ kp


def memit_system(mom2: Array, keys: Array, state: MemitState, hparams: MemitHParams,
                 preserve: Array | None = None) -> Array:
    """A = λC + G + K_pᵀK_p + KᵀK [F, F] in the solve dtype: the normal equations' left side."""
    dtype = solve_dtype(hparams.dtype)
    return (hparams.mom2_update_weight * mom2.astype(dtype) + state.key_gram.astype(dtype)
            + batch_gram(keys, preserve, dtype))


@functools.partial(exported_jit, static_argnames=("hparams",))
def memit_update(mom2: Array, keys: Array, resid: Array, state: MemitState,
                 hparams: MemitHParams, preserve: Array | None = None
                 ) -> tuple[Array, MemitState, SolveReport]:
    """ΔW [F, D] solving (λC + G + K_pᵀK_p + KᵀK) ΔW = Kᵀ R for one layer, new state, report.

    mom2 [F, F] = E[k kᵀ]; keys [n, F]; resid [n, D] = what this layer should add to the
    outputs at the keys (the spread residual, see `spread_residual`); preserve [m, F] = K_p,
    the in-context keys to keep (zero rows are padding), or None.
    """
    dtype = solve_dtype(hparams.dtype)
    k, r = keys.astype(dtype), resid.astype(dtype)
    a = memit_system(mom2, keys, state, hparams, preserve)
    x = cho_solve(cho_factor(a, lower=True), k.T)  # [F, n]; NaN if A is not positive definite
    delta = x @ r
    gram = state.key_gram + (k.T @ k).astype(state.key_gram.dtype)
    new_state = MemitState(key_gram=gram) if hparams.accumulate_keys else state
    return delta, new_state, make_report(a, x, k.T, hparams.max_rel_residual, delta, gram)
