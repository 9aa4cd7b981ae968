"""OTE-aligned sequential solvers (ote_se, docs/references.md): one closed form for the family.

Our orientation (see `_linalg`): W [F, D], keys K [n, F], residuals R [n, D] = V − K W_{t−1}
against the *current* weights, C = λ·E[kkᵀ] the preserved-key term (λC stands in for K₀ᵀK₀,
ote_se §2.1), G = Σ_past KᵀK the carried key Gram, U = W_{t−1} − W₀ the carried total update.
Per layer and batch, with P the null-space projector (or I) and ρ a ridge:

    A  = P (C + G + KᵀK) + ρ I                                  [F, F]
    ΔW = A⁻¹ (P Kᵀ R − E − P C U·[memorize_latest])             [F, D]

- Prop. 3.2 (ote_se §2.5): with G carried, the sum of the sequential ΔW equals the one-time
  solution on all batches from W₀, for P = I (ρ ≥ 0) and for a null-space P with ρ > 0
  (ρ = 0 with P ≠ I is singular: refused). P = I, ρ = 0 is MEMIT-seq; P, C = 0, ρ = L2 is
  AlphaEdit as published (Eq. 2); P with C > 0 is the "full" AlphaEdit target of App. A.3, which
  we call AlphaEdit-aligned (ote_se §8 erratum 7: the paper's own "AlphaEdit (aligned)" label is
  the published Eq. 2).
- Naive ("not OTE aligned", §3.5): G is not carried; each batch is a fresh one-time edit.
- Memorize-the-latest (§2.10 Eq. 32, §3.6): G is not carried, and the preserved term is anchored
  at W₀ through −C U, so earlier batches are forgotten and only [K₀ | K_t] is fitted.
- Post-processing R_p (§2.7-2.8): PRUNE (log-compress singular values of ΔW above σ_max of the
  current W) or RECT (keep the top `rect_keep` of entries by |ΔW|/|W|). With error correction
  (Algorithm 1) the carried E = A (R_p(ΔW) − ΔW) makes the next un-regularised candidate equal
  the exact one-time optimum (Prop. A.3); without it, R_p's deviations accumulate.

The post-processed ΔW is written at once, so the layers above see it (the released code lets
them see the un-regularised ΔW and swaps it at the end of the batch, ote_se §3.3; we keep one
write per layer, and the upper layers' residuals compensate for what R_p removed).
Solves are LU (A is not symmetric when P ≠ I) in the solver's dtype; float64 as the reference.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from keedit_jax.downstream._linalg import SolveDtype, SolveReport, make_report, solve_dtype

Array = jax.Array
PostProcessing = Literal["none", "prune", "rect"]
POST_PROCESSING = ("none", "prune", "rect")
CORRECTION_RIDGE = 1.0  # ρ of Algorithm 1's error-corrected solve: the released code's + I


@dataclasses.dataclass(frozen=True, kw_only=True)
class OteHParams:
    """One member of the OTE family (static under jit).

    mom2_update_weight: λ on E[kkᵀ] (the paper's 3000; 0 drops the preserved term, as
                        AlphaEdit's Eq. 2 does).
    project:            use the null-space projector P (AlphaEdit family).
    ridge:              ρ; Algorithm 1's code adds 1 (CORRECTION_RIDGE), AlphaEdit's L2 is 10.
    accumulate_keys:    carry G (OTE-aligned); False is the naive re-application of OTE.
    memorize_latest:    anchor the preserved term at W₀ and forget earlier batches (Eq. 32).
    post:               none, prune or rect (the post-processing regulariser R_p).
    rect_keep:          RECT's kept fraction of entries (0.4 main tables, 0.2 Table 6).
    error_correction:   carry Algorithm 1's E so post-processing stays OTE-aligned.
    """

    mom2_update_weight: float = 3000.0
    project: bool = False
    ridge: float = 0.0
    accumulate_keys: bool = True
    memorize_latest: bool = False
    post: PostProcessing = "none"
    rect_keep: float = 0.4
    error_correction: bool = False
    dtype: SolveDtype = "float32"
    max_rel_residual: float = 1e-2

    def __post_init__(self) -> None:
        if self.post not in POST_PROCESSING:
            raise ValueError(f"post-processing must be one of {POST_PROCESSING}, not {self.post!r}")
        if self.project and self.ridge <= 0:
            raise ValueError("a null-space projector needs ridge > 0: P(C + G + KᵀK) is "
                             "singular without it (ote_se §8 erratum 2)")
        if self.error_correction and (self.post == "none" or self.project):
            raise ValueError("error correction (Algorithm 1) corrects a post-processor of the "
                             "unprojected solve: it needs post=prune|rect and project=False")
        if self.memorize_latest and self.accumulate_keys:
            raise ValueError("memorize-the-latest forgets earlier batches: accumulate_keys=False")
        if not 0 < self.rect_keep <= 1:
            raise ValueError(f"rect_keep must be in (0, 1], not {self.rect_keep}")


class OteState(NamedTuple):
    """key_gram G [F, F]; error E [F, D] (Algorithm 1); total U = W − W₀ [F, D] of the layer."""

    key_gram: Array
    error: Array
    total: Array


class OteStats(NamedTuple):
    """A layer's fixed statistics: the normalised moment E[kkᵀ] and the projector P (or None)."""

    moment: Array
    projector: Array | None = None


def ote_init(d_ff: int, d_model: int, dtype: jnp.dtype = jnp.float32) -> OteState:
    return OteState(key_gram=jnp.zeros((d_ff, d_ff), dtype),
                    error=jnp.zeros((d_ff, d_model), dtype),
                    total=jnp.zeros((d_ff, d_model), dtype))


def prune(delta: Array, kernel: Array) -> Array:
    """PRUNE (ote_se §2.8, the code's form): singular values of ΔW above σ_max(W) become
    log σ − log σ_max + σ_max; the others are kept."""
    u, s, vt = jnp.linalg.svd(delta, full_matrices=False)
    sigma_max = jnp.linalg.norm(kernel, ord=2)
    safe = jnp.maximum(s, sigma_max)  # log only where s > σ_max (no log 0)
    s = jnp.where(s > sigma_max, jnp.log(safe) - jnp.log(sigma_max) + sigma_max, s)
    return (u * s) @ vt


def rect(delta: Array, kernel: Array, keep: float) -> Array:
    """RECT (ote_se §2.8): keep the entries whose relative change |ΔW| / (|W| + 1e-8) is among
    the top `keep` fraction (ties at the threshold kept), zero the rest."""
    ratio = (jnp.abs(delta) / (jnp.abs(kernel) + 1e-8)).ravel()
    kth = ratio.size * (100 - round(keep * 100)) // 100  # kthvalue at ⌊numel·(100−k)/100⌋
    threshold = jnp.sort(ratio)[max(kth - 1, 0)]
    return jnp.where(ratio.reshape(delta.shape) >= threshold, delta, 0)


def post_process(delta: Array, kernel: Array, hparams: OteHParams) -> Array:
    if hparams.post == "prune":
        return prune(delta, kernel)
    if hparams.post == "rect":
        return rect(delta, kernel, hparams.rect_keep)
    return delta


def ote_system(stats: OteStats, keys: Array, state: OteState, hparams: OteHParams) -> Array:
    """A = P(λ·E[kkᵀ] + G + KᵀK) + ρI [F, F] in the solve dtype (G = 0 when naive)."""
    dtype = solve_dtype(hparams.dtype)
    k = keys.astype(dtype)
    m = hparams.mom2_update_weight * stats.moment.astype(dtype) + k.T @ k
    if hparams.accumulate_keys:
        m = m + state.key_gram.astype(dtype)
    if hparams.project:
        m = stats.projector.astype(dtype) @ m
    return m + hparams.ridge * jnp.eye(m.shape[0], dtype=dtype)


@functools.partial(jax.jit, static_argnames=("hparams",))
def ote_update(stats: OteStats, keys: Array, resid: Array, state: OteState, hparams: OteHParams,
               *, kernel: Array | None = None, preserve: Array | None = None
               ) -> tuple[Array, OteState, SolveReport]:
    """The written ΔW [F, D] of one layer (post-processed if asked), the new state, a report.

    kernel [F, D] is the layer's current W (PRUNE's σ_max and RECT's ratio read it). preserve
    is accepted for the Solver protocol and refused (the OTE family edits facts, not contexts).
    """
    if preserve is not None:
        raise ValueError("the OTE solvers take no in-context preservation keys")
    if hparams.post != "none" and kernel is None:
        raise ValueError(f"{hparams.post} reads the layer's current kernel: pass kernel=")
    if hparams.project and stats.projector is None:
        raise ValueError("project=True needs the layer's null-space projector in OteStats")
    dtype = solve_dtype(hparams.dtype)
    k, r = keys.astype(dtype), resid.astype(dtype)
    total = state.total.astype(dtype)
    a = ote_system(stats, keys, state, hparams)
    b = k.T @ r
    if hparams.memorize_latest:
        b = b - hparams.mom2_update_weight * stats.moment.astype(dtype) @ total
    if hparams.project:
        b = stats.projector.astype(dtype) @ b
    b = b - state.error.astype(dtype)
    candidate = jnp.linalg.solve(a, b)
    delta = candidate if kernel is None else post_process(candidate, kernel.astype(dtype),
                                                          hparams)
    store = state.key_gram.dtype
    new_state = OteState(
        key_gram=(state.key_gram + (k.T @ k).astype(store) if hparams.accumulate_keys
                  else state.key_gram),
        error=(a @ (delta - candidate)).astype(store) if hparams.error_correction
        else state.error,
        total=(total + delta).astype(store))
    return delta, new_state, make_report(a, candidate, b, hparams.max_rel_residual, delta,
                                         new_state.key_gram, new_state.error)


def resolve_conflicts(previous_system: Array, kernel: Array, keys: Array, values: Array,
                      replaced_keys: Array, replaced_values: Array) -> tuple[Array, Array]:
    """SE with conflict resolution (ote_se §2.9, Prop. 3.5 with its erratum): ΔW [F, D] and
    the new system C_t [F, F] when the batch (K, V) replaces the earlier pairs (K_o, V'_o).

        (C_{t−1} + KᵀK − K_oᵀK_o) ΔW = Kᵀ(V − K W) − K_oᵀ(V'_o − K_o W)

    C_{t−1} [F, F] is the system the current W solved (λC plus the Gram of every live key);
    V'_o are the old values W was fitted to, not the new ones (the printed Eq. 30 uses the
    resolved values, which is wrong for a real conflict). A deletion is a replaced pair with no
    new column. Exact when W is the least-squares solution of the live set.
    """
    system = previous_system + keys.T @ keys - replaced_keys.T @ replaced_keys
    rhs = keys.T @ (values - keys @ kernel) - replaced_keys.T @ (
        replaced_values - replaced_keys @ kernel)
    return jnp.linalg.solve(system, rhs), system
