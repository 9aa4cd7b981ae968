"""Windows over a long target and the token weights of every upstream strategy.

A target of M tokens (answer + end-of-turn) is cut into windows [s_i, e_i) of w tokens,
starting every w − overlap tokens (docs/references.md: anyedit §2.1; muke §1.3); shift δ_i sits
at the token before window i. Each strategy is a choice of per-token NLL weights for the stage that
optimises δ_i (DESIGN "One edit, as data"), written once here over target-relative token
indices u ∈ [0, M):

| strategy            | stages | weight of token u while optimising δ_i            |
|---------------------|--------|---------------------------------------------------|
| one_for_all         | 1      | 1/M (one window covering the target, muke §2.1)   |
| window (AnyEdit)    | N      | [s_i ≤ u < e_i] / |Y_i|                (Eq. 4)     |
| sequential_nll      | N      | [s_i ≤ u < M] / (M − s_i)             (muke §3.3) |
| matryoshka_vanilla  | N      | Σ_{k≥i} λ_k [s_i ≤ u < e_k] / ((N−i)(M − s_i)), λ ≡ 1 |
| matryoshka_affinity | N      | the same with λ from affinities       (Eq. 10, 12) |
| parallel_nll        | 1      | 1/M, all shifts trainable at once     (Eq. 6)     |

The Matryoshka form sums figure log-probs over tokens and divides by the remaining token count,
which is Eq. 10 times a constant (muke §2.4, as the released code computes it). Indices here
are 0-based; the paper's N − i + 1 figures are N − i.

Affinity order (muke §2.5, §7.1): the paper gives figure (Y_i..Y_k) λ_{i,k} = 2 − a_{i,k};
the released code walks the figures in reverse, so figure (Y_i..Y_{N−1−m}) gets 2 − a_{i,i+m}.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

Array = jax.Array
Strategy = Literal["one_for_all", "window", "sequential_nll", "matryoshka_vanilla",
                   "matryoshka_affinity", "parallel_nll"]
STRATEGIES: tuple[str, ...] = ("one_for_all", "window", "sequential_nll", "matryoshka_vanilla",
                               "matryoshka_affinity", "parallel_nll")
CoefficientOrder = Literal["paper", "released"]


def window_bounds(n_tokens: int, size: int, overlap: int = 0) -> list[tuple[int, int]]:
    """[(s_i, e_i)]: windows of `size` tokens every size − overlap tokens, the last shorter.

    A target shorter than one window is one window (N = 1, One-for-All; muke §7.22).
    """
    if size < 1 or not 0 <= overlap < size:
        raise ValueError(f"need window size >= 1 and 0 <= overlap < size, got size={size}, "
                         f"overlap={overlap}")
    if n_tokens < 1:
        raise ValueError("cannot window an empty target")
    bounds, start = [], 0
    while True:
        bounds.append((start, min(start + size, n_tokens)))
        if start + size >= n_tokens:
            return bounds
        start += size - overlap


def is_sequential(strategy: str) -> bool:
    """Whether δ_1..δ_N are optimised one after another (else all at once, one stage)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown upstream strategy {strategy!r}; expected one of {STRATEGIES}")
    return strategy not in ("one_for_all", "parallel_nll")


def affinity_lambdas(affinity_row: Array, stage: Array, n_windows: Array,
                     order: CoefficientOrder) -> Array:
    """λ_{i,k} [N] for stage i from a_{i,·} [N] (a_{i,i} = 1); entries outside [i, N) unused."""
    if order == "paper":
        return 2.0 - affinity_row
    k = jnp.arange(affinity_row.shape[0])
    mirrored = jnp.clip(stage + n_windows - 1 - k, 0, affinity_row.shape[0] - 1)
    return 2.0 - affinity_row[mirrored]


def float16_figure_sum(figure: Array, covered: Array, n_figures: Array) -> Array:
    """[T] Σ_k figure_k · covered_kt / n_figures as the released get_token_coeffs computes it
    in a float16 tensor: the figures added largest first (k from N − 1 down), each λ rounded
    to float16 before its add and every partial sum rounded, then the division in float16."""
    half = figure.astype(jnp.float16)

    def add(k: Array, total: Array) -> Array:
        k = figure.shape[0] - 1 - k
        return jnp.where(covered[k] > 0, total + half[k], total)

    total = jax.lax.fori_loop(0, figure.shape[0], add, jnp.zeros(covered.shape[1], jnp.float16))
    return (total / n_figures.astype(jnp.float16)).astype(jnp.float32)


def stage_token_weights(strategy: Strategy, token_index: Array, starts: Array, ends: Array,
                        n_windows: Array, n_target: Array, stage: Array,
                        lambdas: Array | None = None, float16: bool = False) -> Array:
    """NLL weight of every sequence position while optimising δ_stage (see the module table).

    token_index [T]: target-relative index u of the label at each position, −1 for none.
    starts, ends [N]: window bounds (padded windows beyond n_windows are ignored).
    lambdas [N]: λ_{stage,k} (matryoshka_affinity only; vanilla uses 1).
    float16: the Matryoshka coefficients Σ_k λ_k / (N − i) accumulated in float16 as the
      released code does (`float16_figure_sum`); the division by M − s_i stays float32.
    """
    u = token_index
    is_target = u >= 0
    s_i = starts[stage]
    if strategy in ("one_for_all", "parallel_nll"):
        return jnp.where(is_target, 1.0 / n_target, 0.0)
    if strategy == "window":
        inside = is_target & (u >= s_i) & (u < ends[stage])
        return jnp.where(inside, 1.0 / (ends[stage] - s_i), 0.0)
    remaining = is_target & (u >= s_i)
    n_remaining = n_target - s_i
    if strategy == "sequential_nll":
        return jnp.where(remaining, 1.0 / n_remaining, 0.0)
    k = jnp.arange(starts.shape[0])
    lam = jnp.ones(starts.shape, jnp.float32) if strategy == "matryoshka_vanilla" else lambdas
    figure = ((k >= stage) & (k < n_windows)).astype(jnp.float32) * lam  # [N]
    covered = (u[None, :] < ends[:, None]).astype(jnp.float32)  # [N, T]: token in figure k
    if float16:
        coefficient = float16_figure_sum(figure, covered, n_windows - stage)
        return jnp.where(remaining, coefficient / n_remaining, 0.0)
    summed = jnp.einsum("k,kt->t", figure, covered)
    return jnp.where(remaining, summed / ((n_windows - stage) * n_remaining), 0.0)

