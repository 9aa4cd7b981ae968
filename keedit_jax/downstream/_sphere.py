"""SPHERE's sparse projection of an update (Liu, Gu, Yao, Wang and Peng, "Energy-Regularized
Sequential Model Editing on Hyperspheres", ICLR 2026, arXiv 2510.01172; MetaKE's reference
[29]), on AlphaEdit's null-space projected solve (`_alphaedit`).

What SPHERE changes relative to AlphaEdit, and nothing else: AlphaEdit's ΔW is solved as before
(targets, keys, the null-space projector P, the previous-edit key cache), then multiplied by a
second, fixed projector before it is written. In the paper's orientation (W_p [D, F], each row
a neuron on the hypersphere; see `_linalg` for ours):

1. Principal space (the method section's Eq. 10): the eigenvectors of C = (1/n) Ŵ_pᵀ Ŵ_p, the
   neurons' second moment with every neuron scaled to unit length (Ŵ_p: rows of W_p normalised,
   the hypersphere that hyperspherical energy is defined on), for the r largest eigenvalues
   λ_1 ≥ … ≥ λ_r: U [F, r], r the fewest with Σ_{i≤r} λ_i ≥ η Σ_i λ_i (η, the cumulative ratio).
2. Sparse space projection: P⊥ = I − α U Uᵀ (α, the suppression strength: 1 removes the
   update's component along U, "hard"; 0 < α < 1 attenuates it, "soft"), and
   Ŵ_p = W_p + ΔW_p P⊥.

In our orientation (W [F, D], neurons are the columns) that is ΔW ← P⊥ ΔW, on the key side
where AlphaEdit's P also acts. η = 0 or α = 0 gives P⊥ = I: AlphaEdit itself.

U is estimated once per layer, from the pretrained weights (the paper's "principal hyperspherical
directions of the pretrained weight matrices"): the first update of a layer reads it from the
kernel it is given, which in a stream starting from the unedited model is the pretrained one,
and carries P⊥ in the state after that. The paper's Llama3-8B and Qwen2.5-7B settings on
AlphaEdit are η = 0.5, α = 0.5 (the authors' README; 0.5 / 0.8 on MEMIT, PRUNE and RECT).

A design finding: P⊥ acts after the solve, not inside it, so SPHERE is a projector variant of
the solver family only in the loose sense. P⊥ P is no projector, the projected ΔW no longer
solves AlphaEdit's normal equations, and a preserved key k (k P = 0, so k ΔW = 0 under AlphaEdit)
now moves by −α (k U) Uᵀ ΔW: SPHERE trades AlphaEdit's exact null-space invariance for keeping
the update off the weights' principal directions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from keedit_jax.downstream._layers import Solver
from keedit_jax.downstream._linalg import all_finite

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class SphereHParams:
    """SPHERE's two constants (static under jit); the defaults are the paper's on AlphaEdit.

    cumulative_ratio: η in [0, 1): the principal directions are the fewest top eigenvectors
                      whose eigenvalues reach η of the total (0: none, AlphaEdit).
    suppression:      α in [0, 1]: the share of the update's principal component removed.
    """

    cumulative_ratio: float = 0.5
    suppression: float = 0.5

    def __post_init__(self) -> None:
        if not 0 <= self.cumulative_ratio < 1:
            raise ValueError("SPHERE's cumulative ratio η (--sphere_cumulative_ratio) must be "
                             f"in [0, 1), got {self.cumulative_ratio}")
        if not 0 <= self.suppression <= 1:
            raise ValueError("SPHERE's suppression strength α (--sphere_suppression) must be "
                             f"in [0, 1], got {self.suppression}")


class SphereState(NamedTuple):
    """base: the wrapped solver's state (AlphaEdit's key cache); projector: P⊥ [F, F]
    (the identity until `ready`); ready: whether P⊥ was read from the pretrained kernel."""

    base: Any
    projector: Array
    ready: Array


def unit_neurons(kernel: Array) -> Array:
    """W [F, D] with every neuron (a column: one output unit's weights over the F keys)
    scaled onto the unit sphere; a zero neuron has no direction and stays zero."""
    norms = jnp.linalg.norm(kernel, axis=0, keepdims=True)
    return kernel / jnp.where(norms > 0, norms, 1)


def principal_space(kernel: Array, cumulative_ratio: float) -> Array:
    """U as [F, F]: the eigenvectors of C = Ŵ Ŵᵀ / D by decreasing eigenvalue, the columns past
    the r-th zeroed, r the fewest whose eigenvalues reach η of C's trace (Eq. 10)."""
    w = unit_neurons(kernel)
    eigvals, eigvecs = jnp.linalg.eigh(w @ w.T / w.shape[1])
    eigvals, eigvecs = jnp.maximum(eigvals[::-1], 0), eigvecs[:, ::-1]
    larger = jnp.cumsum(eigvals) - eigvals  # what the directions before each one reach
    return eigvecs * (larger < cumulative_ratio * jnp.sum(eigvals))


def sparse_projector(kernel: Array, hparams: SphereHParams) -> Array:
    """P⊥ = I − α U Uᵀ [F, F] of a pretrained kernel W [F, D], in the kernel's dtype."""
    u = principal_space(kernel, hparams.cumulative_ratio)
    return jnp.eye(u.shape[0], dtype=u.dtype) - hparams.suppression * (u @ u.T)


@functools.partial(jax.jit, static_argnames=("hparams",))
def project_update(delta: Array, state: SphereState, kernel: Array,
                   hparams: SphereHParams) -> tuple[Array, Array]:
    """(P⊥ ΔW, P⊥): P⊥ from the state once ready, else from `kernel` (the first update)."""
    dtype = state.projector.dtype
    projector = jax.lax.cond(state.ready, lambda: state.projector,
                             lambda: sparse_projector(kernel.astype(dtype), hparams))
    return (projector @ delta.astype(dtype)).astype(delta.dtype), projector


def sphere(solver: Solver, hparams: SphereHParams) -> Solver:
    """The solver whose every ΔW is multiplied by P⊥ of the layer's pretrained kernel (the
    registry's SPHERE wraps AlphaEdit; the paper also plugs it into MEMIT, PRUNE, RECT)."""

    def init(d_ff: int, d_model: int, dtype: Any = jnp.float32) -> SphereState:
        return SphereState(base=solver.init(d_ff, d_model, dtype),
                           projector=jnp.eye(d_ff, dtype=dtype), ready=jnp.asarray(False))

    def update(stats: Any, keys: Array, resid: Array, state: SphereState, *,
               kernel: Array | None = None, preserve: Array | None = None) -> Any:
        if kernel is None:
            raise ValueError("SPHERE reads the layer's kernel: pass kernel= (its first update "
                             "takes the principal directions from it)")
        delta, base, report = solver.update(stats, keys, resid, state.base, kernel=kernel,
                                            preserve=preserve)
        delta, projector = project_update(delta, state, kernel, hparams)
        new_state = SphereState(base=base, projector=projector, ready=jnp.asarray(True))
        return delta, new_state, report._replace(
            finite=report.finite & all_finite(delta, projector))

    return solver._replace(init=init, update=update, name="sphere")
