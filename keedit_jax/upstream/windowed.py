"""The windowed memory-shift optimisation: every long-form strategy on one shared loop.

Sequential strategies run N stages in one `lax.scan`: stage i trains δ_i alone under that
stage's token weights (keedit_jax.upstream.windows) with δ*_<i frozen and injected, from a fresh
Adam state, then freezes it (muke §3.1 Stage B; anyedit §2.3). One-for-All and parallel-NLL
are one stage with every shift trainable. The layers below l_WM run once per edit batch (the
prefix of `loop.prepare`); every step runs layers [l_WM, v_loss_layer] only.

μKE's affinities (keedit_jax.upstream.affinity) come either up front, on the unedited model
for all windows at once (`compute_affinities`; cacheable per sample and window size), or in
the loop, just before each stage, with δ*_<i injected (WindowConfig.affinity_context).
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from keedit_jax.compile_cache import exported_jit
from keedit_jax.intervene import Taps, run
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.params import Params
from keedit_jax.upstream.affinity import affinity_row, edit_loss, figure_weights
from keedit_jax.upstream.config import TargetConfig
from keedit_jax.upstream.longform import WindowBatch, WindowConfig
from keedit_jax.upstream.loop import (
    LossTerms,
    Problem,
    check_layers,
    is_finite,
    optimise_stage,
    prepare,
    read,
    read_log_probs,
    shift_of,
    token_nll,
)
from keedit_jax.upstream.windows import affinity_lambdas, is_sequential, stage_token_weights

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WindowResult:
    """Optimised shifts of every window: δ, h, m* = h + δ [E, N, D]; per-stage traces
    [E, stages, steps]; Adam updates [E, stages]; the affinities used [E, N, N] (μKE only,
    else 1); finite [E]."""

    delta: Array
    h: Array
    targets: Array
    trace: LossTerms
    updates: Array
    affinity: Array
    finite: Array


def _edit_rows(batch: WindowBatch, problem: Problem) -> tuple[Array, ...]:
    """Per-edit arrays the affinity functions vmap over; labels and target indices at the
    read positions (−1: a pad slot, outside every figure)."""
    shift = batch.shift
    read_er = shift.read_pos[:, 0]
    token_index = jnp.where(read_er >= 0, read(batch.token_index, read_er), -1)
    return (problem.prefix, shift.attention_mask[:, 0], read_er, read(shift.labels[:, 0], read_er),
            shift.shift_pos[:, 0], problem.h, token_index, batch.starts, batch.ends,
            batch.n_windows)


def _affinity_for(params: Params, cfg: ModelConfig, hp: TargetConfig, wc: WindowConfig,
                  frozen_nd: Array, stage: Array, prefix: Array, mask: Array, read_r: Array,
                  labels: Array, positions: Array, h: Array, token_index: Array, starts: Array,
                  ends: Array, n_windows: Array) -> Array:
    """a_{stage,·} [N] of one edit."""
    loss = edit_loss(params, cfg, hp, prefix, mask, read_r, labels, positions, frozen_nd, stage)
    weights = figure_weights(token_index, starts, ends, n_windows, stage)
    return affinity_row(loss, h[stage], weights, stage, hp, wc.affinity_steps,
                        wc.affinity_lr, wc.affinity_gradients)


def _upfront(params: Params, cfg: ModelConfig, hp: TargetConfig, wc: WindowConfig,
             batch: WindowBatch, problem: Problem) -> Array:
    """[E, N, N] affinities of every window of every edit, on the unedited model: the rows
    of the edit's n_windows stages in turn (a padded stage's row is all 1, uncomputed)."""
    n = batch.starts.shape[1]
    zeros = jnp.zeros(problem.h.shape[1:], jnp.float32)

    def one_edit(*rows: Array) -> Array:
        per_stage = partial(_affinity_for, params, cfg, hp, wc, zeros)
        if wc.affinity_gradients == "vmap":
            return jax.vmap(lambda i: per_stage(i, *rows))(jnp.arange(n))
        return jax.lax.fori_loop(0, rows[-1], lambda i, out: out.at[i].set(per_stage(i, *rows)),
                                 jnp.ones((n, n), jnp.float32))

    return jax.vmap(one_edit)(*_edit_rows(batch, problem))


@partial(exported_jit, static_argnames=("cfg", "hp", "wc", "remat"))
def compute_affinities(params: Params, cfg: ModelConfig, batch: WindowBatch, hp: TargetConfig,
                       wc: WindowConfig, remat: bool = False) -> Array:
    """[E, N, N] up-front affinities a_{i,k} (row i: stage i; a_{i,i} = 1)."""
    check_layers(cfg, hp)
    return _upfront(params, cfg, hp, wc, batch, prepare(params, cfg, batch.shift, hp, remat))


def _stage_weights(wc: WindowConfig, batch: WindowBatch, stage: Array,
                   affinity_en: Array) -> Array:
    """[E, 1, T] token weights of every edit for this stage."""
    lambdas = jax.vmap(partial(affinity_lambdas, order=wc.coefficient_order),
                       in_axes=(0, None, 0))(affinity_en, stage, batch.n_windows)
    weights = jax.vmap(partial(stage_token_weights, wc.strategy,
                               float16=wc.float16_coefficients),
                       in_axes=(0, 0, 0, 0, 0, None, 0))(
        batch.token_index, batch.starts, batch.ends, batch.n_windows, batch.n_target, stage,
        lambdas)
    return weights[:, None, :].astype(jnp.float32)


def _window_reads(wc: WindowConfig, batch: WindowBatch, stage: Array) -> Array:
    """[E, 1, W] the read positions of window `stage` alone (AnyEdit's stage reads no other
    token): W = window_size slots from slot s_i (read_pos lists target tokens in order; a
    window near the end takes the last W slots, which still hold it)."""
    read_er = batch.shift.read_pos[:, 0]
    size = min(wc.window_size, read_er.shape[1])
    start = batch.starts[:, stage]
    return jax.vmap(lambda r, s: jax.lax.dynamic_slice(r, (s,), (size,)))(read_er, start)[:, None]


@partial(exported_jit, static_argnames=("cfg", "hp", "wc", "remat", "prefix_cache", "window_reads"))
def optimise_windows(params: Params, cfg: ModelConfig, batch: WindowBatch, hp: TargetConfig,
                     wc: WindowConfig, affinity: Array | None = None, remat: bool = False,
                     prefix_cache: bool = True, window_reads: bool = True) -> WindowResult:
    """Optimise every window's shift of every edit under wc.strategy, as one program.

    affinity [E, N, N]: up-front affinities (e.g. from a cache); computed here when μKE
    needs them and none are given (affinity_context "upfront"), or per stage ("in_loop").
    prefix_cache=False runs every layer at every step (the reference's cost, benchmarks only).
    window_reads: AnyEdit's stage unembeds only its window's positions (False: every target
    position, weight 0 outside the window; the same δ, for tests and benchmarks).
    """
    check_layers(cfg, hp)
    problem = prepare(params, cfg, batch.shift, hp, remat)
    e, n = batch.starts.shape
    valid = jnp.arange(n)[None, :] < batch.n_windows[:, None]  # [E, N]
    if affinity is None:
        upfront = wc.uses_affinity and wc.affinity_context == "upfront"
        affinity = (_upfront(params, cfg, hp, wc, batch, problem) if upfront
                    else jnp.ones((e, n, n), jnp.float32))
    delta0 = jnp.zeros(problem.h.shape, jnp.float32)
    stepping = problem if prefix_cache else problem._replace(prefix=None)

    def stage(delta: Array, i: Array) -> tuple[Array, tuple[LossTerms, Array, Array]]:
        row = affinity[:, i]
        if wc.uses_affinity and wc.affinity_context == "in_loop":
            row = jax.vmap(partial(_affinity_for, params, cfg, hp, wc),
                           in_axes=(0, None) + (0,) * 10)(delta, i, *_edit_rows(batch, problem))
        shift = dataclasses.replace(batch.shift, weights=_stage_weights(wc, batch, i, row))
        if window_reads and wc.strategy == "window":
            shift = dataclasses.replace(shift, read_pos=_window_reads(wc, batch, i))
        trainable = valid & (jnp.arange(n)[None, :] == i)
        result = optimise_stage(params, cfg, shift, hp, stepping, delta, trainable, remat)
        return result.delta, (result.trace, result.updates, row)

    if is_sequential(wc.strategy):
        delta, (trace, updates, rows) = jax.lax.scan(stage, delta0, jnp.arange(n))
        trace = LossTerms(*(jnp.swapaxes(x, 0, 1) for x in trace))
        updates, affinity = updates.T, jnp.swapaxes(rows, 0, 1)
    else:
        weights = _stage_weights(wc, batch, jnp.asarray(0), affinity[:, 0])
        shift = dataclasses.replace(batch.shift, weights=weights)
        result = optimise_stage(params, cfg, shift, hp, stepping, delta0, valid, remat)
        delta = result.delta
        trace = LossTerms(*(x[:, None] for x in result.trace))
        updates = result.updates[:, None]
    finite = is_finite(LossTerms(*(x.reshape(e, -1) for x in trace)), delta)
    return WindowResult(delta, problem.h, problem.h + delta, trace, updates, affinity, finite)


@partial(exported_jit, static_argnames=("cfg", "hp"))
def window_readings(params: Params, cfg: ModelConfig, batch: WindowBatch, hp: TargetConfig,
                    delta: Array | None = None) -> tuple[Array, Array]:
    """Under `params`, with every window's δ injected when given: the output of layer l_WM at
    each window's shift position [E, N, D] and the NLL of each target token [E, R] (slot r:
    target token r, 0 on pads). Before and after an edit, they say whether the edited weights
    give what the shifts reached (the diagnostics of `methods.unstructured`)."""
    shift = batch.shift
    shifts = () if delta is None else (shift_of(shift, delta, hp.layer),)
    top, caps = run(params, cfg, tokens=shift.tokens[:, 0],
                    attention_mask=shift.attention_mask[:, 0], stop=hp.v_loss_layer + 1,
                    shifts=shifts, taps=Taps(block_out=(hp.layer,)))
    h = read(caps.block_out[hp.layer], shift.shift_pos[:, 0])
    reads = shift.read_pos[:, 0]
    nll = token_nll(read_log_probs(params, cfg, top, shift), read(shift.labels[:, 0], reads))
    return h.astype(jnp.float32), jnp.where(reads >= 0, nll, 0.0)


def check_windows_finite(result: WindowResult, case_ids: tuple[int | str, ...]) -> dict:
    """{case_id: message} for every edit whose shift loss or δ went non-finite (the others
    stand: a failed edit is dropped from the weight update, not the whole batch)."""
    finite = np.asarray(result.finite)
    total = np.asarray(result.trace.total)  # [E, stages, steps]
    failures = {}
    for e in np.flatnonzero(~finite):
        bad = np.argwhere(~np.isfinite(total[e]))
        where = (f"window {bad[0][0]}, step {bad[0][1]}" if bad.size else "the final δ")
        failures[case_ids[e]] = (f"request {case_ids[e]}: non-finite shift loss at {where}; "
                                 "this edit is skipped")
    return failures

