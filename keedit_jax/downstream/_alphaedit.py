"""AlphaEdit's null-space-projected layer update (anchors §4, ote_se §2.2, §3.2;
docs/references.md).

Paper, ote_se Eq. (2), in the papers' orientation: Δ_p = R_p K_pᵀ P (K_prev K_prevᵀ P +
K_p K_pᵀ P + I)⁻¹. The reference code (anchors §4) solves the transposed system with the ridge
`L2·I` (L2 = 10, not the paper's 1; ote_se §7 A2) and no λC term. In our orientation (see
`_linalg`), with M = G + KᵀK and G = Σ_past KᵀK (the previous-edit key cache `cache_c`):

    (P M + L2·I) ΔW = P Kᵀ R        (a non-symmetric system: LU, `jnp.linalg.solve`)

which equals ΔW_pᵀ of the paper's form because P, M are symmetric (ote_se §2.2). It is the
stationarity condition of min_D ‖K(W + PD) − V‖² + tr((PD)ᵀ G PD) + L2·‖PD‖² with ΔW = PD, and
P ΔW = ΔW holds (ote_se §2.2 identity P(MP + cI)⁻¹ = (PM + cI)⁻¹P), so ΔW is applied as is,
never projected again; every key k with P k = 0 (the preserved subspace) keeps k·W unchanged.

P [F, F] is the symmetric projector onto the (approximate) null space of C = E[k kᵀ], built by
keedit_jax.stats (eigenvalues below `nullspace_threshold` = 2e-2, anchors §4).

The cache G is updated with this batch's KᵀK after its solve. The reference recomputes the keys
on the edited model after all layers; a layer's keys depend only on the layers below it, all
of which are edited before it is solved, so they are the keys solved with. The AnyEdit copy
drops the cache (anchors §4): `use_key_cache=False`. The reference solves in float32.

In-context preservation (AnyEdit's `AlphaEdit_ARE`, anyedit §2.4.2): the keys K_p [m, F] at the
non-edited positions of the edit sequence join M, so (P(G + KᵀK + K_pᵀK_p) + L2·I) ΔW = P Kᵀ R.
As in MEMIT (see `_memit`), K_p is context and never enters the cache G; zero rows are padding.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from keedit_jax.compile_cache import exported_jit
from keedit_jax.downstream._linalg import SolveDtype, SolveReport, make_report, solve_dtype
from keedit_jax.downstream._memit import batch_gram

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlphaEditHParams:
    """AlphaEdit's solve hyperparameters (anchors §2.1, §4; static under jit).

    l2:               the ridge L2 (10 in AlphaEdit's Llama3-8B file; EasyEdit's is 1).
    use_key_cache:    carry G = K_prev K_prevᵀ across batches (AlphaEdit); False = AnyEdit's copy.
    dtype:            solve precision; the reference uses float32.
    max_rel_residual: refuse a solve whose relative residual exceeds this (ill-conditioned).
    """

    l2: float = 10.0
    use_key_cache: bool = True
    dtype: SolveDtype = "float32"
    max_rel_residual: float = 1e-2


class AlphaEditState(NamedTuple):
    """key_gram: G = Σ over previous batches of KᵀK [F, F] (the reference's `cache_c`)."""

    key_gram: Array


def alphaedit_init(d_ff: int, dtype: jnp.dtype = jnp.float32) -> AlphaEditState:
    return AlphaEditState(key_gram=jnp.zeros((d_ff, d_ff), dtype))


def alphaedit_system(projector: Array, keys: Array, state: AlphaEditState,
                     hparams: AlphaEditHParams, preserve: Array | None = None) -> Array:
    """A = P (G + KᵀK + K_pᵀK_p) + L2·I [F, F] in the solve dtype (G = 0 without the cache)."""
    dtype = solve_dtype(hparams.dtype)
    p = projector.astype(dtype)
    m = batch_gram(keys, preserve, dtype)
    if hparams.use_key_cache:
        m = m + state.key_gram.astype(dtype)
    return p @ m + hparams.l2 * jnp.eye(p.shape[0], dtype=dtype)


@functools.partial(exported_jit, static_argnames=("hparams",))
def alphaedit_update(projector: Array, keys: Array, resid: Array, state: AlphaEditState,
                     hparams: AlphaEditHParams, preserve: Array | None = None
                     ) -> tuple[Array, AlphaEditState, SolveReport]:
    """ΔW [F, D] solving (P(G + KᵀK + K_pᵀK_p) + L2·I) ΔW = P Kᵀ R for one layer, new state,
    report.

    projector [F, F] = P; keys [n, F]; resid [n, D] (the spread residual); preserve [m, F] =
    K_p, the in-context keys to keep (zero rows are padding), or None.
    """
    dtype = solve_dtype(hparams.dtype)
    k, r, p = keys.astype(dtype), resid.astype(dtype), projector.astype(dtype)
    a = alphaedit_system(projector, keys, state, hparams, preserve)
    b = p @ k.T  # [F, n]
    x = jnp.linalg.solve(a, b)  # ΔW = X R, the cheaper order when n ≤ D
    delta = x @ r
    gram = state.key_gram + (k.T @ k).astype(state.key_gram.dtype)
    new_state = AlphaEditState(key_gram=gram) if hparams.use_key_cache else state
    return delta, new_state, make_report(a, x, b, hparams.max_rel_residual, delta, gram)
