"""The one memory-shift optimisation loop (MEMIT's `compute_z`, generalised to token weights).

Every upstream strategy optimises shifts δ [E, P, D] added to the output of layer l_WM at given
positions, under the loss of `ShiftBatch` (per-token NLL weights + KL + weight decay); they
differ only in the weights and in how many shifts there are (DESIGN "One edit, as data").
With several `TargetConfig.sites` (PMET: attention and MLP outputs) each position carries one
shift per site, δ [E, sites·P, D] site-major, and each shift has its own h, weight decay term
and clamp radius, as the P shifts of one site do.

Reference behaviour kept (anchors §1, muke §2.6):
- loss = Σ w·NLL + kl_factor·KL + v_weight_decay·‖δ‖/‖h‖² (the norm of δ, not its square);
- the KL term is KL(p_shifted ‖ p_original): the reference calls torch's
  `kl_div(log p_init, log p, log_target=True)`, which is Σ p·(log p − log p_init) (so does
  lyaplock §2.7; anchors §1 writes the arguments the other way round);
- Adam from δ = 0; after each update, projection onto the ball of radius clamp_norm_factor·‖h‖;
- v_num_grad_steps forward passes, no update after the last one, and a stop (a mask on the
  updates here) once the total loss is below early_stop_loss, checked before the update.
The layers below l_WM run once (the prefix); each step runs layers [l_WM, v_loss_layer] only,
and unembeds only the positions the loss reads (ShiftBatch.read_pos).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keedit_jax import parallel
from keedit_jax.compile_cache import exported_jit
from keedit_jax.intervene import Shift, Taps, run
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.params import Params
from keedit_jax.models.transformer import head
from keedit_jax.upstream.config import TargetConfig
from keedit_jax.upstream.encode import ShiftBatch

Array = jax.Array


class NonFiniteShiftError(FloatingPointError):
    """The shift loss or δ became NaN/inf; the message names the request and the step."""


class LossTerms(NamedTuple):
    """Per-edit loss terms [E] (a trace stacks them to [E, steps]).

    target_prob is not a loss term but what the reference prints per step: the mean, over the
    edit's sequences with target tokens, of exp(−their weighted mean token NLL), so a user can
    read whether the optimisation reached its target.
    """

    total: Array
    nll: Array
    kl: Array
    weight_decay: Array
    target_prob: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ShiftResult:
    """The optimised shifts and how the loop got there.

    trace holds the terms at the δ of each step (step 0: δ = 0; the last step: the returned δ);
    delta_norm [E, steps, P] is ‖δ‖ at each step; updates [E] counts applied Adam steps.
    """

    delta: Array  # [E, P, D]
    h: Array  # [E, P, D], unshifted layer-l_WM output at the shift positions of sequence 0
    targets: Array  # [E, P, D], m* = h + δ
    trace: LossTerms
    delta_norm: Array
    updates: Array
    finite: Array  # [E] bool


class Problem(NamedTuple):
    """What stays fixed while δ moves: computed once per edit batch."""

    prefix: Array | None  # [B, T, D], hidden state entering layer l_WM (B = E·S)
    h: Array  # [E, P, D]
    kl_ref: Array  # [B, V], unshifted log-probs at kl_pos


def _flat(x: Array) -> Array:
    """[E, S, ...] -> [E·S, ...]: every sequence of every edit in one forward batch."""
    return x.reshape((-1,) + x.shape[2:])


def safe_norm(x: Array, axis: int = -1) -> Array:
    """‖x‖ with gradient 0 at x = 0 (torch's subgradient), where jnp.linalg.norm gives NaN."""
    sq = jnp.sum(x * x, axis=axis)
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def log_probs(params: Params, cfg: ModelConfig, h_btd: Array) -> Array:
    """Output of v_loss_layer through the final norm and unembedding (anchors §1), fp32."""
    return jax.nn.log_softmax(head(params, cfg, h_btd).astype(jnp.float32), axis=-1)


def read(x_bt: Array, read_br: Array) -> Array:
    """x [B, T, ...] at each row's read positions [B, R] (a −1 pad reads position 0)."""
    return x_bt[jnp.arange(x_bt.shape[0])[:, None], jnp.maximum(read_br, 0)]


def read_log_probs(params: Params, cfg: ModelConfig, h_btd: Array, batch: ShiftBatch) -> Array:
    """Log-probs [E·S, R, V] at the positions the loss reads: the head never sees the rest."""
    return log_probs(params, cfg, read(h_btd, _flat(batch.read_pos)))


def shift_of(batch: ShiftBatch, delta_epd: Array, layer: int, site: str = "block_out") -> Shift:
    """Edit e's δ is shared by all its sequences, each at its own positions (anchors §1)."""
    s = batch.tokens.shape[1]
    return Shift(_flat(batch.shift_pos), jnp.repeat(delta_epd, s, axis=0), layer, site)


def shifts_of(batch: ShiftBatch, delta_epd: Array, hp: TargetConfig) -> tuple[Shift, ...]:
    """One Shift per site of hp.sites from the site-major δ [E, sites·P, D]."""
    parts = jnp.split(delta_epd, len(hp.sites), axis=1)
    return tuple(shift_of(batch, part, hp.layer, site)
                 for part, site in zip(parts, hp.sites, strict=True))


def _kl_rows(logp_brv: Array, batch: ShiftBatch) -> Array:
    """[B, V] log-probs at each sequence's kl_pos (its slot among the read positions; any
    slot on sequences without a KL term, whose kl_weight is 0)."""
    slot = jnp.argmax(_flat(batch.read_pos) == _flat(batch.kl_pos)[:, None], axis=1)
    return logp_brv[jnp.arange(slot.shape[0]), slot]


def token_nll(logp_btv: Array, labels_bt: Array) -> Array:
    """−log p(label) at every position [B, T] (weights pick which positions count)."""
    return -jnp.take_along_axis(logp_btv, labels_bt[..., None], axis=-1)[..., 0]


def weight_decay(delta_epd: Array, h_epd: Array, trainable_ep: Array, hp: TargetConfig) -> Array:
    """[E] v_weight_decay · Σ_p ‖δ_p‖/‖h_p‖² over the shifts being trained (anchors §1)."""
    per_shift = safe_norm(delta_epd) / safe_norm(h_epd) ** 2
    return hp.v_weight_decay * jnp.sum(jnp.where(trainable_ep, per_shift, 0.0), axis=1)


def weighted_nll(logp_brv: Array, batch: ShiftBatch) -> tuple[Array, Array]:
    """(w·NLL, w) [E·S, R] at the read positions; 0 where a position is no target."""
    read_br = _flat(batch.read_pos)
    weights = jnp.where(read_br >= 0, read(_flat(batch.weights), read_br), 0.0)
    nll_br = token_nll(logp_brv, read(_flat(batch.labels), read_br))
    return jnp.where(weights != 0, weights * nll_br, 0.0), weights


def loss_terms(logp_brv: Array, kl_ref_bv: Array, batch: ShiftBatch, delta_epd: Array,
               h_epd: Array, hp: TargetConfig, trainable_ep: Array | None = None) -> LossTerms:
    """Per-edit loss from the shifted log-probs at the read positions [E·S, R, V]:
    Σ w·NLL + kl·KL(p‖p_ref) + wd·‖δ‖/‖h‖².

    The weight decay covers the trainable shifts only (frozen earlier shifts are not the
    stage's variables: muke §2.6 `wd(δ_i)`); by default every shift is trainable.
    """
    e, s = batch.tokens.shape[:2]
    weighted_br, weights = weighted_nll(logp_brv, batch)
    nll = weighted_br.reshape(e, -1).sum(1)
    logp = _kl_rows(logp_brv, batch)
    kl_b = jnp.sum(jnp.exp(logp) * (logp - kl_ref_bv), axis=-1)
    kl = jnp.sum(batch.kl_weight * kl_b.reshape(e, s), axis=1)
    if trainable_ep is None:
        trainable_ep = jnp.ones(delta_epd.shape[:2], bool)
    wd = weight_decay(delta_epd, h_epd, trainable_ep, hp)
    return LossTerms(nll + hp.kl_factor * kl + wd, nll, kl, wd,
                     target_prob(weighted_br, weights, e))


def target_prob(weighted_nll_br: Array, weights_br: Array, e: int) -> Array:
    """[E] mean over target-bearing sequences of exp(−Σ w·NLL / Σ w) (LossTerms)."""
    mass_b = weights_br.sum(1)
    has_b = mass_b > 0
    prob_b = jnp.exp(-weighted_nll_br.sum(1) / jnp.where(has_b, mass_b, 1.0))
    prob_es = jnp.where(has_b, prob_b, 0.0).reshape(e, -1)
    return prob_es.sum(1) / jnp.maximum(has_b.reshape(e, -1).sum(1), 1)


def prepare(params: Params, cfg: ModelConfig, batch: ShiftBatch, hp: TargetConfig,
            remat: bool = False) -> Problem:
    """The prefix (layers below l_WM, run once), h (each site's unshifted value at the shift
    positions of sequence 0, site-major) and the unshifted KL reference."""
    mask = _flat(batch.attention_mask)
    prefix, _ = run(params, cfg, tokens=_flat(batch.tokens), attention_mask=mask,
                    stop=hp.layer, remat=remat)
    top, caps = run(params, cfg, attention_mask=mask, hidden=prefix, start=hp.layer,
                    stop=hp.v_loss_layer + 1, taps=Taps(**{site: (hp.layer,) for site in hp.sites}),
                    remat=remat)
    e, s, t = batch.tokens.shape

    def at_positions(site: str) -> Array:
        first_etd = getattr(caps, site)[hp.layer].reshape(e, s, t, -1)[:, 0]
        return jnp.take_along_axis(first_etd, batch.shift_pos[:, 0, :, None], axis=1)

    h = jnp.concatenate([at_positions(site) for site in hp.sites], axis=1)
    kl_ref = _kl_rows(read_log_probs(params, cfg, top, batch), batch)
    return Problem(prefix, h.astype(jnp.float32), kl_ref)


def shifted_log_probs(params: Params, cfg: ModelConfig, batch: ShiftBatch, hp: TargetConfig,
                      problem: Problem, delta_epd: Array, remat: bool) -> Array:
    """Log-probs [E·S, R, V] at δ and the read positions: layers [l_WM, v_loss_layer] from
    the cached prefix, or every layer from the tokens when problem.prefix is None (the
    uncached reference, for benchmarks)."""
    shifts = shifts_of(batch, delta_epd, hp)
    mask = _flat(batch.attention_mask)
    if problem.prefix is None:
        top, _ = run(params, cfg, tokens=_flat(batch.tokens), attention_mask=mask,
                     stop=hp.v_loss_layer + 1, shifts=shifts, remat=remat)
    else:
        top, _ = run(params, cfg, attention_mask=mask, hidden=problem.prefix, start=hp.layer,
                     stop=hp.v_loss_layer + 1, shifts=shifts, remat=remat)
    return read_log_probs(params, cfg, top, batch)


def _cached_terms(params: Params, cfg: ModelConfig, batch: ShiftBatch, hp: TargetConfig,
                  problem: Problem, delta_epd: Array, remat: bool,
                  trainable_ep: Array | None = None) -> LossTerms:
    """Loss at δ from the cached prefix."""
    logp = shifted_log_probs(params, cfg, batch, hp, problem, delta_epd, remat)
    return loss_terms(logp, problem.kl_ref, batch, delta_epd, problem.h, hp, trainable_ep)


@partial(jax.jit, static_argnames=("cfg", "hp"))
def evaluate_shift(params: Params, cfg: ModelConfig, batch: ShiftBatch, delta_epd: Array,
                   hp: TargetConfig) -> LossTerms:
    """The same loss by a full forward from tokens (no prefix cache): the loop's reference."""
    problem = prepare(params, cfg, batch, hp)
    mask = _flat(batch.attention_mask)
    top, _ = run(params, cfg, tokens=_flat(batch.tokens), attention_mask=mask,
                 stop=hp.v_loss_layer + 1, shifts=shifts_of(batch, delta_epd, hp))
    logp = read_log_probs(params, cfg, top, batch)
    return loss_terms(logp, problem.kl_ref, batch, delta_epd, problem.h, hp)


@partial(jax.jit, static_argnames=("cfg", "hp"))
def unshifted_target_prob(params: Params, cfg: ModelConfig, batch: ShiftBatch,
                          hp: TargetConfig) -> Array:
    """[E] LossTerms.target_prob under params with no shift: after an edit, whether the
    edited weights alone give what the optimisation reached with δ."""
    top, _ = run(params, cfg, tokens=_flat(batch.tokens),
                 attention_mask=_flat(batch.attention_mask), stop=hp.v_loss_layer + 1)
    weighted, weights = weighted_nll(read_log_probs(params, cfg, top, batch), batch)
    return target_prob(weighted, weights, batch.tokens.shape[0])


def _project(delta_epd: Array, radius_ep: Array) -> Array:
    """Each shift onto its own ball ‖δ_p‖ ≤ c·‖h_p‖ (STYLE §4: optax's projection)."""
    return jax.vmap(jax.vmap(optax.projections.projection_l2_ball))(delta_epd, radius_ep)


class _Carry(NamedTuple):
    delta: Array
    opt_state: optax.OptState
    stopped: Array  # [E] bool, sticky: the reference breaks out of its loop
    updates: Array  # [E] int32


class StageResult(NamedTuple):
    """One optimisation stage: the final δ [E, P, D], the trace [E, steps] and ‖δ‖ per step."""

    delta: Array
    trace: LossTerms
    delta_norm: Array  # [E, steps, P]
    updates: Array  # [E]


def _step(params: Params, cfg: ModelConfig, batch: ShiftBatch, hp: TargetConfig,
          problem: Problem, remat: bool, trainable: Array, carry: _Carry,
          step: Array) -> tuple[_Carry, tuple[LossTerms, Array]]:
    """One forward + backward; Adam + projection applied only to trainable shifts of edits
    still running (frozen shifts stay injected, unchanged)."""
    def total(delta: Array) -> tuple[Array, LossTerms]:
        terms = _cached_terms(params, cfg, batch, hp, problem, delta, remat, trainable)
        return jnp.sum(terms.total), terms  # edits are independent: ∂/∂δ_e sees only L_e

    (_, terms), grad = jax.value_and_grad(total, has_aux=True)(carry.delta)
    grad = jnp.where(trainable[..., None], grad, 0.0)
    stopped = carry.stopped | (terms.total < hp.early_stop_loss)
    active = ~stopped & (step < hp.v_num_grad_steps - 1)
    updates, opt_state = optax.adam(hp.v_lr).update(grad, carry.opt_state, carry.delta)
    radius = hp.clamp_norm_factor * safe_norm(problem.h)
    moved = _project(optax.apply_updates(carry.delta, updates), radius)
    delta = jnp.where(active[:, None, None] & trainable[..., None], moved, carry.delta)
    new = _Carry(delta, opt_state, stopped, carry.updates + active.astype(jnp.int32))
    return new, (terms, safe_norm(carry.delta))


def optimise_stage(params: Params, cfg: ModelConfig, batch: ShiftBatch, hp: TargetConfig,
                   problem: Problem, delta0: Array, trainable: Array,
                   remat: bool = False) -> StageResult:
    """Up to v_num_grad_steps steps of Adam from a fresh state on the trainable shifts [E, P]
    of delta0, under batch.weights; the other shifts of delta0 stay injected as they are.

    One `while_loop` that ends once every edit has stopped (the reference's `break`); the
    trace past that step repeats the last one, which is what further steps would compute
    (δ no longer moves), so the result equals running all steps. A stage with no trainable
    shift runs no step; its trace and norms are 0.
    """
    e, steps = delta0.shape[0], hp.v_num_grad_steps
    # An edit with no trainable shift (a padded window) has stopped before its first step:
    # a stage where no edit trains runs no step at all.
    carry = _Carry(delta0, optax.adam(hp.v_lr).init(delta0), ~jnp.any(trainable, axis=1),
                   jnp.zeros(e, jnp.int32))
    body = partial(_step, params, cfg, batch, hp, problem, remat, trainable)
    trace = LossTerms(*(jnp.zeros((steps, e), jnp.float32) for _ in LossTerms._fields))
    norms = jnp.zeros((steps,) + delta0.shape[:2], jnp.float32)

    def running(state: tuple) -> Array:
        step, carry, _, _ = state
        return (step < steps) & ~jnp.all(carry.stopped)

    def advance(state: tuple) -> tuple:
        step, carry, trace, norms = state
        carry, (terms, norm) = body(carry, step)
        trace = LossTerms(*(t.at[step].set(x.astype(t.dtype)) for t, x in zip(trace, terms,
                                                                              strict=True)))
        return step + 1, carry, trace, norms.at[step].set(norm)

    done, carry, trace, norms = jax.lax.while_loop(running, advance,
                                                   (jnp.asarray(0), carry, trace, norms))
    ran = (jnp.arange(steps) < done)[:, None]
    last = jnp.maximum(done - 1, 0)
    trace = LossTerms(*(jnp.where(ran, t, t[last]) for t in trace))
    norms = jnp.where(ran[..., None], norms, norms[last])
    return StageResult(carry.delta, LossTerms(*(x.T for x in trace)),
                       jnp.swapaxes(norms, 0, 1), carry.updates)


def is_finite(trace: LossTerms, delta: Array) -> Array:
    """[E] True where every traced loss and the final δ are finite."""
    return jnp.all(jnp.isfinite(trace.total), axis=1) & jnp.all(
        jnp.isfinite(delta), axis=tuple(range(1, delta.ndim)))


@partial(exported_jit, static_argnames=("cfg", "hp", "remat"))
def optimise_shifts(params: Params, cfg: ModelConfig, batch: ShiftBatch, hp: TargetConfig,
                    remat: bool = False) -> ShiftResult:
    """Optimise every edit's shifts together and independently, as one compiled program.

    The model is frozen (params are only read). A non-finite loss is reported in `finite`,
    never skipped: call `check_finite` on the host (STYLE §4).
    """
    check_layers(cfg, hp)
    problem = prepare(params, cfg, batch, hp, remat)
    delta0 = jnp.zeros(problem.h.shape, jnp.float32)
    stage = optimise_stage(params, cfg, batch, hp, problem, delta0,
                           jnp.ones(delta0.shape[:2], bool), remat)
    return ShiftResult(stage.delta, problem.h, problem.h + stage.delta, stage.trace,
                       stage.delta_norm, stage.updates, is_finite(stage.trace, stage.delta))


def shift_diagnostics(result: ShiftResult, hp: TargetConfig,
                      case_ids: Sequence[int | str]) -> list[dict[str, Any]]:
    """Per request, on the host: the loss and target probability at the first and the last
    step, the step it stopped at (early stop or the last), and ‖δ‖ against its clamp radius;
    read off the compiled loop's outputs (no callback per step)."""
    total, prob, updates, delta, h = parallel.to_host(
        (result.trace.total, result.trace.target_prob, result.updates, result.delta, result.h))
    delta_norm = np.linalg.norm(delta, axis=-1).max(axis=-1)
    radius = hp.clamp_norm_factor * np.linalg.norm(h, axis=-1).max(axis=-1)
    return [{"case_id": case_id, "loss_first": float(total[e, 0]),
             "loss_last": float(total[e, -1]), "target_prob_first": float(prob[e, 0]),
             "target_prob_last": float(prob[e, -1]), "stopped_at_step": int(updates[e]),
             "early_stop": bool(total[e, -1] < hp.early_stop_loss),
             "delta_norm": float(delta_norm[e]), "clamp_radius": float(radius[e])}
            for e, case_id in enumerate(case_ids)]


def check_layers(cfg: ModelConfig, hp: TargetConfig) -> None:
    if not 0 <= hp.layer <= hp.v_loss_layer < cfg.n_layers:
        raise ValueError(f"need 0 <= layer ({hp.layer}) <= v_loss_layer ({hp.v_loss_layer}) "
                         f"< n_layers ({cfg.n_layers}) for this model")


def check_finite(result: ShiftResult, case_ids: tuple[int | str, ...]) -> None:
    """Raise, naming each failed request and the first step whose loss was not finite."""
    finite = parallel.to_host(result.finite)
    if finite.all():
        return
    total = parallel.to_host(result.trace.total)
    failures = []
    for e in np.flatnonzero(~finite):
        bad = np.flatnonzero(~np.isfinite(total[e]))
        where = f"step {bad[0]}" if bad.size else "the final δ"
        failures.append(f"request {case_ids[e]}: non-finite shift loss at {where}")
    raise NonFiniteShiftError("; ".join(failures) + " (model weights are unchanged)")
