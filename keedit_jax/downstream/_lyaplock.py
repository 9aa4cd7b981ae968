"""LyapLock (docs/references.md: lyaplock): sequential editing with a virtual queue that bounds the
long-term preservation loss.

Per edited layer, one queue Z (lyaplock §2.1 Eq. 7, §7 #3):

    Z(t+1) = max(Z(t) + a·(PL(t) − D) + b, Z_max),   PL(t) = tr(Uᵀ Σ U),  U = W_t − W₀

with Σ = E[kkᵀ] (the normalised moment; the queue is scale-free, λ does not enter PL). The
drift-plus-penalty step (Eqs. 11-13) is, in our orientation (see `_linalg`) and with
w = a·Z/V the preservation weight:

    A  = V·(KᵀK + S_kk) + w·λ·Σ
    ΔW = A⁻¹ [ V·KᵀR + V·(S_ku − S_kk U) − w·λ·Σ U ]

S_kk = Σ_s K_sᵀK_s and S_ku = Σ_s K_sᵀK_s U_s carry the previously edited knowledge with its
achieved outputs W_s K_s (lyaplock §2.5, §7 #6): S_kvᵀ − S_kk W of the spec is S_ku − S_kk U once
W₀ cancels, so W₀ itself is never stored. The constants (§2.6): the first batch is solved with
w = 1 (D is unknown); then D = α·PL(1), a = 1/√D, Z(1) = Z_max = V/a, b as given (0), so that

    w(t+1) = max(w(t) + PL(t)/D − 1, 1)     (V = 1, b = 0)

and a preservation loss above the threshold by one fold doubles its weight. The carried state
is O(F² + F·D) per layer whatever the number of edits.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_factor, cho_solve

from keedit_jax.downstream._linalg import SolveDtype, SolveReport, make_report, solve_dtype

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class LyapLockHParams:
    """LyapLock's constants (lyaplock §4.2; static under jit).

    mom2_update_weight: λ on Σ inside the solve (1000 in the released hparams).
    alpha:              D = α·PL(first batch) (60 for every model).
    control:            V, the weight of the editing losses (1).
    drift:              b of the queue (0).
    """

    mom2_update_weight: float = 1000.0
    alpha: float = 60.0
    control: float = 1.0
    drift: float = 0.0
    dtype: SolveDtype = "float32"
    max_rel_residual: float = 1e-2

    def __post_init__(self) -> None:
        if self.alpha <= 0 or self.control <= 0 or self.drift < 0:
            raise ValueError(f"LyapLock needs alpha > 0, V > 0 and b >= 0 (got α={self.alpha}, "
                             f"V={self.control}, b={self.drift})")


class LyapLockState(NamedTuple):
    """Per layer: S_kk [F, F], S_ku [F, D], U [F, D]; the queue and its constants (scalars,
    zero until the first batch has set them); `steps` batches done."""

    key_gram: Array
    key_update: Array
    total: Array
    queue: Array
    threshold: Array
    step_size: Array
    floor: Array
    steps: Array


def lyaplock_init(d_ff: int, d_model: int, dtype: jnp.dtype = jnp.float32) -> LyapLockState:
    scalar = jnp.zeros((), dtype)
    return LyapLockState(key_gram=jnp.zeros((d_ff, d_ff), dtype),
                         key_update=jnp.zeros((d_ff, d_model), dtype),
                         total=jnp.zeros((d_ff, d_model), dtype),
                         queue=scalar, threshold=scalar, step_size=scalar, floor=scalar,
                         steps=jnp.zeros((), jnp.int32))


def preservation_weight(state: LyapLockState, hparams: LyapLockHParams) -> Array:
    """w = a·Z/V, and 1 for the first batch (a·Z = V by construction, lyaplock §2.6)."""
    return jnp.where(state.steps == 0, 1.0, state.step_size * state.queue / hparams.control)


def preservation_loss(moment: Array, total: Array) -> Array:
    """PL = tr(Uᵀ Σ U), the squared drift of the preserved outputs from W₀'s (per key)."""
    return jnp.sum(total * (moment @ total))


@functools.partial(jax.jit, static_argnames=("hparams",))
def lyaplock_update(moment: Array, keys: Array, resid: Array, state: LyapLockState,
                    hparams: LyapLockHParams, *, kernel: Array | None = None,
                    preserve: Array | None = None) -> tuple[Array, LyapLockState, SolveReport]:
    """ΔW [F, D] of one layer, the state with the queue advanced, and the solve report.

    moment [F, F] = Σ = E[kkᵀ]; keys [n, F]; resid [n, D] (the spread residual against the
    current weights). kernel is unused (U is carried); preserve is refused.
    """
    del kernel
    if preserve is not None:
        raise ValueError("LyapLock takes no in-context preservation keys")
    dtype = solve_dtype(hparams.dtype)
    k, r = keys.astype(dtype), resid.astype(dtype)
    sigma = moment.astype(dtype)
    gram, key_update = state.key_gram.astype(dtype), state.key_update.astype(dtype)
    total = state.total.astype(dtype)
    v, lam = hparams.control, hparams.mom2_update_weight
    w = preservation_weight(state, hparams).astype(dtype)
    a = v * (k.T @ k + gram) + w * lam * sigma
    b = v * (k.T @ r) + v * (key_update - gram @ total) - w * lam * (sigma @ total)
    delta = cho_solve(cho_factor(a, lower=True), b)
    total = total + delta
    loss = preservation_loss(sigma, total)
    first = state.steps == 0
    threshold = jnp.where(first, hparams.alpha * loss, state.threshold)
    step_size = jnp.where(first, jax.lax.rsqrt(threshold), state.step_size)
    floor = jnp.where(first, v / step_size, state.floor)
    queue = jnp.where(first, floor, state.queue)
    queue = jnp.maximum(queue + step_size * (loss - threshold) + hparams.drift, floor)
    store = state.key_gram.dtype
    gram_k = k.T @ k
    new_state = LyapLockState(
        key_gram=(gram + gram_k).astype(store),
        key_update=(key_update + gram_k @ total).astype(store),
        total=total.astype(store), queue=queue.astype(store),
        threshold=threshold.astype(store), step_size=step_size.astype(store),
        floor=floor.astype(store), steps=state.steps + 1)
    return delta, new_state, make_report(a, delta, b, hparams.max_rel_residual,
                                         new_state.key_update, new_state.queue,
                                         new_state.step_size)
