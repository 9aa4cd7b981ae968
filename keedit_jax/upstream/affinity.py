"""μKE's affinity coefficients (docs/references.md: muke §2.5, Eq. 12; §7.2-7.4).

For stage i: T_aff Adam steps (lr 0.5, no clamp, from δ = 0) on the first figure's loss
(token-mean NLL of window i + weight decay); at each visited δ^t, the gradient of every figure
(Y_i..Y_k) (token-mean NLL of tokens [s_i, e_k) + weight decay) and its cosine with the first
figure's; a_{i,k} = mean over t. The figure losses are linear in the per-token NLL, so all
their gradients at one δ come from one forward pass (`jax.vjp`) and one backward pass vmap'd
over the figures' token weights (DESIGN "Never recompute"). The head (final norm, unembedding,
NLL) acts on each position alone, so its backward runs once: figure k's cotangent at the final
hidden state is its token weights times the per-token NLL gradient, and only the layers'
backward is vmap'd (no [K, T, vocab] buffer). By default ("used") only the figures that
exist, k in [i, n_windows), get a backward, one after another: of the N padded figures of a
stage, N − i or fewer (the others' cosines are never read).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp
import optax

from keedit_jax.intervene import Shift, run
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.params import Params
from keedit_jax.upstream.config import TargetConfig
from keedit_jax.upstream.loop import log_probs, read, safe_norm, token_nll

Array = jax.Array


class EditLoss(NamedTuple):
    """One edit's per-token NLL as layers then head: δ -> final hidden states at the read
    positions [R, D] (`stack`) -> NLL [R] (`head_nll`, position by position)."""

    stack: Callable[[Array], Array]
    head_nll: Callable[[Array], Array]

    def nll(self, delta: Array) -> Array:
        return self.head_nll(self.stack(delta))


def figure_weights(token_index: Array, starts: Array, ends: Array, n_windows: Array,
                   stage: Array) -> Array:
    """[N, T]: row k is figure (Y_stage..Y_k)'s token-mean weights, 0 for k outside
    [stage, n_windows)."""
    u, s_i = token_index, starts[stage]
    k = jnp.arange(starts.shape[0])
    inside = (u[None, :] >= s_i) & (u[None, :] < ends[:, None]) & (u[None, :] >= 0)
    valid = ((k >= stage) & (k < n_windows))[:, None]
    size = jnp.maximum(ends - s_i, 1)[:, None]
    return jnp.where(inside & valid, 1.0 / size, 0.0)


GradientMode = Literal["used", "vmap", "loop"]


def used_figures(weights_kr: Array) -> tuple[Array, Array]:
    """[lo, hi): the rows of weights_kr with any weight (figure_weights' rows are contiguous)."""
    k = jnp.arange(weights_kr.shape[0])
    nonzero = jnp.any(weights_kr != 0, axis=1)
    lo = jnp.min(jnp.where(nonzero, k, weights_kr.shape[0]))
    return jnp.minimum(lo, weights_kr.shape[0]), jnp.max(jnp.where(nonzero, k + 1, 0))


def figure_gradients(loss: EditLoss, wd_fn: Callable[[Array], Array], delta: Array,
                     weights_kr: Array, mode: GradientMode = "used") -> Array:
    """[K, D]: ∇_δ (weights_k · nll(δ) + wd(δ)) for every row k of weights_kr.

    "used": one forward, the head's backward once, then the layers' backward for each row
    with any weight in turn (the others: ∇wd only); "vmap": the same backward vmap'd over all
    K cotangents, empty rows included (more work, fewer and larger kernels); "loop": one
    forward + backward per figure (the reference's way; less memory).
    """
    wd_grad = jax.grad(wd_fn)(delta)
    if mode == "loop":
        def one(w_r: Array) -> Array:
            return jax.grad(lambda d: jnp.dot(w_r, loss.nll(d)))(delta)
        return jax.lax.map(one, weights_kr) + wd_grad
    top_rd, pullback = jax.vjp(loss.stack, delta)
    per_token_rd = jax.grad(lambda h: jnp.sum(loss.head_nll(h)))(top_rd)
    if mode == "vmap":
        return jax.vmap(lambda w_r: pullback(w_r[:, None] * per_token_rd)[0])(weights_kr) + wd_grad

    def figure(k: Array, grads_kd: Array) -> Array:
        return grads_kd.at[k].set(pullback(weights_kr[k][:, None] * per_token_rd)[0])

    lo, hi = used_figures(weights_kr)
    grads = jax.lax.fori_loop(lo, hi, figure, jnp.zeros(weights_kr.shape[:1] + delta.shape,
                                                        delta.dtype))
    return grads + wd_grad


def cosine(a: Array, b_kd: Array) -> Array:
    """cos(a, b_k) for every row k, 0 where a norm is 0."""
    denominator = safe_norm(a) * safe_norm(b_kd)
    return jnp.where(denominator > 0, b_kd @ a / jnp.where(denominator > 0, denominator, 1.0),
                     0.0)


def affinity_row(loss: EditLoss, h_d: Array, weights_kr: Array, stage: Array,
                 hp: TargetConfig, steps: int, lr: float,
                 mode: GradientMode = "used") -> Array:
    """a_{stage,·} [N] (muke §3.1 Stage A); a_{stage,stage} = 1, entries outside the figures 1."""
    def wd_fn(delta: Array) -> Array:
        return hp.v_weight_decay * safe_norm(delta) / safe_norm(h_d) ** 2

    optimiser = optax.adam(lr)

    def step(carry: tuple[Array, optax.OptState], _: None
             ) -> tuple[tuple[Array, optax.OptState], Array]:
        delta, state = carry
        grads = figure_gradients(loss, wd_fn, delta, weights_kr, mode)
        query = grads[stage]
        updates, state = optimiser.update(query, state, delta)
        return (optax.apply_updates(delta, updates), state), cosine(query, grads)

    delta0 = jnp.zeros(h_d.shape, jnp.float32)
    _, cosines = jax.lax.scan(step, (delta0, optimiser.init(delta0)), None, length=steps)
    figures = jnp.any(weights_kr != 0, axis=1) & (jnp.arange(weights_kr.shape[0]) != stage)
    return jnp.where(figures, cosines.mean(0), 1.0)


def edit_loss(params: Params, cfg: ModelConfig, hp: TargetConfig, prefix_td: Array,
              mask_t: Array, read_r: Array, labels_r: Array, positions_n: Array,
              frozen_nd: Array, stage: Array) -> EditLoss:
    """One edit's per-token NLL [R] at its read positions, δ at window `stage` and frozen_nd
    at the others, from the cached hidden state entering layer l_WM."""
    def stack(delta_d: Array) -> Array:
        shifts = frozen_nd.at[stage].set(delta_d)
        top, _ = run(params, cfg, attention_mask=mask_t[None], hidden=prefix_td[None],
                     start=hp.layer, stop=hp.v_loss_layer + 1,
                     shifts=(Shift(positions_n[None], shifts[None], hp.layer),))
        return read(top, read_r[None])[0]

    def head_nll(top_rd: Array) -> Array:
        return token_nll(log_probs(params, cfg, top_rd), labels_r)

    return EditLoss(stack, head_nll)
