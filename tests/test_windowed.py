"""Long-form upstream: windows, every strategy's token weights (hand-computed, incl. the worked
example of muke §2.5 in docs/references.md), the affinity gradients against per-figure
jax.grad, Eq. 9's split of the parallel gradient, and the windowed loop against independent
replays."""

from __future__ import annotations

import collections
import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keedit_jax import upstream
from keedit_jax.intervene import Shift, Taps, run
from keedit_jax.upstream.affinity import edit_loss, figure_gradients, figure_weights
from keedit_jax.upstream.encode import EncodingError
from keedit_jax.upstream.longform import WindowConfig, encode_edit, encode_edits, pack_windows
from keedit_jax.upstream.windowed import check_windows_finite, compute_affinities, optimise_windows
from keedit_jax.upstream.windows import (
    stage_token_weights,
    window_bounds,
)

Req = collections.namedtuple("Req", "case_id question answer")
REQUESTS = (
    Req("a", "Where is the Eiffel Tower?",
        "The Eiffel Tower is located in Paris, the capital of France."),
    Req("b", "Who was Marie Curie?",
        "Marie Curie was a physicist and chemist who won two Nobel Prizes. Water boils."),
)
WINDOW = 6


# ---------------------------------------------------------------- windows and token weights


def test_window_bounds_cover_the_target_with_and_without_overlap():
    assert window_bounds(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert window_bounds(10, 4, overlap=1) == [(0, 4), (3, 7), (6, 10)]
    assert window_bounds(8, 4) == [(0, 4), (4, 8)]
    assert window_bounds(3, 4) == [(0, 3)]
    with pytest.raises(ValueError, match="overlap"):
        window_bounds(10, 4, overlap=4)


M = 10  # target tokens; windows [0,4) [4,8) [8,10); labels at sequence positions 2..11
TOKEN_INDEX = np.array([-1, -1] + list(range(M)) + [-1, -1], np.int32)
STARTS, ENDS = np.array([0, 4, 8]), np.array([4, 8, 10])


def _weights(strategy, stage, lambdas=None):
    w = stage_token_weights(strategy, jnp.asarray(TOKEN_INDEX), jnp.asarray(STARTS),
                            jnp.asarray(ENDS), jnp.asarray(3), jnp.asarray(M),
                            jnp.asarray(stage),
                            None if lambdas is None else jnp.asarray(lambdas, jnp.float32))
    w = np.asarray(w)
    assert np.all(w[TOKEN_INDEX < 0] == 0)
    return w[TOKEN_INDEX >= 0]


def _by_window(values):
    """Per-token weights from per-window values over [0,4) [4,8) [8,10)."""
    return np.repeat(np.asarray(values, np.float64), [4, 4, 2])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_static_strategies_give_their_hand_computed_weights(stage):
    remaining = M - STARTS[stage]
    expected = {
        "one_for_all": np.full(M, 1 / M),
        "parallel_nll": np.full(M, 1 / M),
        "window": _by_window([1 / 4 if j == stage else 0 for j, size in enumerate([4, 4, 2])]
                             if stage < 2 else [0, 0, 1 / 2]),
        "sequential_nll": _by_window([1 / remaining if j >= stage else 0 for j in range(3)]),
        # λ ≡ 1: c_j = (N − j)/(N − i), token weight c_j / (M − s_i)
        "matryoshka_vanilla": _by_window(
            [(3 - j) / (3 - stage) / remaining if j >= stage else 0 for j in range(3)]),
    }
    for strategy, want in expected.items():
        np.testing.assert_allclose(_weights(strategy, stage), want, rtol=1e-6,
                                   err_msg=f"{strategy} stage {stage}")


def test_affinity_weights_follow_the_paper_and_the_released_order():
    # stage 0, a = [1, .9, .5]: muke §2.5's worked example, window coefficients
    # [1.2, .867, .5] (paper) and [1.2, .7, .333] (released), over M = 10 tokens
    row0 = [1.0, 0.9, 0.5]
    paper = upstream.windows.affinity_lambdas(jnp.asarray(row0), jnp.asarray(0),
                                              jnp.asarray(3), "paper")
    released = upstream.windows.affinity_lambdas(jnp.asarray(row0), jnp.asarray(0),
                                                 jnp.asarray(3), "released")
    np.testing.assert_allclose(_weights("matryoshka_affinity", 0, paper),
                               _by_window([1.2, 2.6 / 3, 0.5]) / 10, rtol=1e-6)
    np.testing.assert_allclose(_weights("matryoshka_affinity", 0, released),
                               _by_window([1.2, 0.7, 1 / 3]) / 10, rtol=1e-6)
    # stage 1, a_{1,·} = [·, 1, .8]: paper λ = [1, 1.2] -> c = [1.1, .6]; released λ = [1.2, 1]
    # -> c = [1.1, .5]; 6 remaining tokens
    row1 = jnp.asarray([7.0, 1.0, 0.8])  # entry 0 is outside the figures and must not matter
    for order, c in (("paper", [0, 1.1, 0.6]), ("released", [0, 1.1, 0.5])):
        lam = upstream.windows.affinity_lambdas(row1, jnp.asarray(1), jnp.asarray(3), order)
        np.testing.assert_allclose(_weights("matryoshka_affinity", 1, lam),
                                   _by_window(c) / 6, rtol=1e-6, err_msg=order)


def test_last_stage_of_matryoshka_is_the_plain_window_nll():
    np.testing.assert_allclose(_weights("matryoshka_vanilla", 2), _weights("window", 2))
    np.testing.assert_allclose(_weights("matryoshka_affinity", 2, [1, 1, 1]),
                               _weights("window", 2))


# ---------------------------------------------------------------- on the tiny model


@pytest.fixture(scope="module")
def hp(model):
    return upstream.TargetConfig(layer=1, v_loss_layer=model.config.n_layers - 1,
                                 fact_token="last", v_lr=0.5, v_weight_decay=1e-3,
                                 clamp_norm_factor=4.0, early_stop_loss=1e-2, kl_factor=0.0)


def _batch(tok, model, strategy="matryoshka_affinity"):
    wc = WindowConfig(strategy=strategy, window_size=WINDOW)
    edits, failures = encode_edits(tok, REQUESTS, wc, model.config.max_positions)
    assert not failures
    return wc, edits, pack_windows(edits, tok.pad_token_id)


def test_shape_buckets_pad_at_most_a_quarter_beyond_32():
    from keedit_jax.models.generate import bucket, fine_bucket

    assert [fine_bucket(n) for n in (1, 5, 17, 32, 33, 41, 129, 159, 161, 257)] == [
        1, 8, 32, 32, 40, 48, 160, 160, 192, 320]
    for n in range(1, 2100):
        size = fine_bucket(n, 8)
        assert n <= size <= bucket(n, 8) and (size <= 32 or (size % 8 == 0 and size < 1.25 * n))
    assert len({fine_bucket(n) for n in range(33, 4097)}) == 4 * 7  # four per doubling


def test_encoding_places_each_shift_before_its_window(tok, model):
    _, edits, batch = _batch(tok, model)
    for row, edit in enumerate(edits):
        assert edit.target_ids[-1] == tok.convert_tokens_to_ids("<|eot|>")
        tokens = np.asarray(batch.shift.tokens[row, 0])
        labels = np.asarray(batch.shift.labels[row, 0])
        for i, (s, _) in enumerate(edit.windows):
            p = int(batch.shift.shift_pos[row, 0, i])
            # the logits at p predict the window's first token; p holds the token before it
            assert labels[p] == edit.target_ids[s]
            previous = edit.prompt_ids[-1] if s == 0 else edit.target_ids[s - 1]
            assert tokens[p] == previous


def test_bad_targets_and_prompts_fail_with_the_case_named(tok, model):
    wc = WindowConfig(strategy="window", window_size=WINDOW)
    with pytest.raises(EncodingError, match="request s: the target has .* not more than one"):
        encode_edit(tok, Req("s", "Q?", "Hi."), wc, 512)
    with pytest.raises(EncodingError, match="request e: the answer is empty"):
        encode_edit(tok, Req("e", "Q?", "  "), wc, 512)
    with pytest.raises(EncodingError, match="request l: .* longer than the model's context of 20"):
        encode_edit(tok, REQUESTS[0]._replace(case_id="l"), wc, 20)
    edits, failures = encode_edits(tok, [REQUESTS[0], Req("s", "Q?", "Hi.")], wc, 512)
    assert [x.case_id for x in edits] == ["a"] and set(failures) == {"s"}
    # One-for-All takes a short target as its one window
    short = encode_edit(tok, Req("s", "Q?", "Hi."), dataclasses.replace(
        wc, strategy="one_for_all"), 512)
    assert short.windows == ((0, len(short.target_ids)),) and len(short.target_ids) <= WINDOW


def _edit_loss(model, hp, batch, problem, edit, frozen, stage):
    shift = batch.shift
    read = shift.read_pos[edit, 0]
    return edit_loss(model.params, model.config, hp, problem.prefix[edit],
                     shift.attention_mask[edit, 0], read, shift.labels[edit, 0][read],
                     shift.shift_pos[edit, 0], frozen, jnp.asarray(stage))


def _read_token_index(batch, edit):
    """Target index u at each read position of `edit` (−1 on pad slots)."""
    read = np.asarray(batch.shift.read_pos[edit, 0])
    return jnp.asarray(np.where(read >= 0, np.asarray(batch.token_index[edit])[read], -1))


def test_read_positions_are_every_label_and_nothing_else(tok, model):
    _, edits, batch = _batch(tok, model)
    for row, edit in enumerate(edits):
        read = np.asarray(batch.shift.read_pos[row, 0])
        labelled = np.flatnonzero(np.asarray(batch.token_index[row]) >= 0)
        np.testing.assert_array_equal(read[read >= 0], labelled)
        assert len(labelled) == len(edit.target_ids)


def test_vmapped_figure_gradients_equal_a_per_figure_grad_loop(tok, model, hp):
    _, _, batch = _batch(tok, model)
    problem = upstream.loop.prepare(model.params, model.config, batch.shift, hp)
    n, d = batch.starts.shape[1], model.config.d_model
    frozen = 0.3 * jax.random.normal(jax.random.PRNGKey(0), (n, d))
    delta = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (d,))
    loss = _edit_loss(model, hp, batch, problem, 1, frozen, 1)
    weights = figure_weights(_read_token_index(batch, 1), batch.starts[1], batch.ends[1],
                             batch.n_windows[1], jnp.asarray(1))

    def wd(x):
        return hp.v_weight_decay * upstream.safe_norm(x) / upstream.safe_norm(problem.h[1, 1]) ** 2

    @jax.jit
    def all_four(x):
        by_hand = jnp.stack([jax.grad(lambda y, w=w: jnp.dot(w, loss.nll(y)) + wd(y))(x)
                             for w in weights])
        return (figure_gradients(loss, wd, x, weights, "vmap"),
                figure_gradients(loss, wd, x, weights, "loop"),
                figure_gradients(loss, wd, x, weights, "used"), by_hand)

    vmapped, looped, used, by_hand = all_four(delta)
    assert float(jnp.abs(by_hand).max()) > 1e-3  # not a vacuous comparison of zeros
    assert not bool(jnp.any(weights[0] != 0))  # row 0 precedes stage 1: no backward in "used"
    np.testing.assert_allclose(vmapped, by_hand, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(looped, by_hand, atol=1e-6, rtol=1e-5)
    np.testing.assert_allclose(used, by_hand, atol=1e-6, rtol=1e-5)


def test_parallel_gradient_splits_as_eq_9(tok, model, hp):
    """∇_{δ_j} L_prl = (1/M)[|Y_j| ∇L_win(δ_j) + Σ_{i>j} ∇_{δ_j}(−log P(Y_i | ·))], where
    L_win(δ_j) sees only δ_≤j: later shifts cannot reach window j's tokens (causality)."""
    _, edits, batch = _batch(tok, model)
    problem = upstream.loop.prepare(model.params, model.config, batch.shift, hp)
    row, m = 1, len(edits[1].target_ids)
    n = int(batch.n_windows[row])
    deltas = 0.5 * jax.random.normal(jax.random.PRNGKey(2), (batch.starts.shape[1],
                                                            model.config.d_model))
    deltas = deltas.at[n:].set(0.0)  # padded windows repeat window 0's position with δ = 0
    u = _read_token_index(batch, row)
    starts, ends = jnp.asarray(batch.starts[row]), jnp.asarray(batch.ends[row])

    @jax.jit
    def terms(j):
        nll = _edit_loss(model, hp, batch, problem, row, deltas, j).nll
        parallel = jax.grad(lambda x: jnp.sum(jnp.where(u >= 0, nll(x), 0.0)) / m)(deltas[j])
        causal = _edit_loss(model, hp, batch, problem, row,
                            jnp.where(jnp.arange(deltas.shape[0])[:, None] > j, 0.0, deltas),
                            j).nll
        window = ((u >= starts[j]) & (u < ends[j])).astype(jnp.float32)
        size = ends[j] - starts[j]
        window_term = size * jax.grad(lambda x: jnp.dot(window, causal(x)) / size)(deltas[j])
        later_tokens = (u >= ends[j]).astype(jnp.float32)  # windows j+1..N-1, no overlap
        later = jax.grad(lambda x: jnp.dot(later_tokens, nll(x)))(deltas[j])
        return parallel, window_term, later

    for j in range(n - 1):
        parallel, window_term, later = terms(jnp.asarray(j))
        np.testing.assert_allclose(parallel, (window_term + later) / m, atol=1e-6, rtol=1e-5)
        assert float(jnp.linalg.norm(later)) > 1e-4  # the term AnyEdit drops is not zero


@pytest.fixture(scope="module")
def results(tok, model, hp):
    out = {}
    for strategy in ("window", "matryoshka_affinity", "parallel_nll"):
        wc, edits, batch = _batch(tok, model, strategy)
        out[strategy] = (wc, edits, batch, jax.device_get(
            optimise_windows(model.params, model.config, batch, hp, wc)))
    return out


def test_first_window_equals_a_single_shift_run(results, model, hp):
    """Stage 0 of AnyEdit is MEMIT's loop with one shift and window-0 weights."""
    wc, _, batch, result = results["window"]
    first = dataclasses.replace(
        batch.shift, shift_pos=batch.shift.shift_pos[:, :, :1],
        weights=jax.vmap(lambda *a: stage_token_weights("window", *a, jnp.asarray(0)))(
            batch.token_index, batch.starts, batch.ends, batch.n_windows,
            batch.n_target)[:, None])
    single = upstream.optimise_shifts(model.params, model.config, first, hp)
    np.testing.assert_allclose(result.delta[:, 0], single.delta[:, 0], atol=1e-5, rtol=1e-4)
    assert result.finite.all() and (result.updates[:, 0] > 0).all()


@functools.partial(jax.jit, static_argnames=("cfg", "layer"))
def _logp_with_shifts(params, cfg, layer, ids, positions, deltas):
    shift = Shift(positions, deltas, layer)
    _, caps = run(params, cfg, tokens=ids, attention_mask=jnp.ones_like(ids), shifts=(shift,),
                  taps=Taps(logits=True))
    return jax.nn.log_softmax(caps.logits[0], -1)


def _replay_window_loss(model, hp, edit, targets, h, i):
    """AnyEdit's own context X ⊕ Y[:e_i − 1] from tokens, δ*_≤i injected: mean NLL of Y_i."""
    s, e = edit.windows[i]
    ids = np.asarray(edit.prompt_ids + edit.target_ids[: e - 1], np.int32)[None]
    positions = np.asarray(edit.shift_positions[: i + 1], np.int32)[None]
    logp = _logp_with_shifts(model.params, model.config, hp.layer, jnp.asarray(ids),
                             jnp.asarray(positions),
                             jnp.asarray(targets[None, : i + 1] - h[None, : i + 1]))
    at = len(edit.prompt_ids) - 1 + np.arange(s, e)
    return float(-logp[at, np.asarray(edit.target_ids[s:e])].mean())


def test_each_window_loss_replays_in_anyedits_growing_context(results, model, hp):
    _, edits, _, result = results["window"]
    for row, edit in enumerate(edits[1:], start=1):
        for i in range(len(edit.windows)):
            replayed = _replay_window_loss(model, hp, edit, result.targets[row],
                                           result.h[row], i)
            final = result.trace.nll[row, i, -1]
            np.testing.assert_allclose(replayed, final, rtol=1e-4, atol=1e-5)
        assert result.trace.nll[row, 0, -1] < result.trace.nll[row, 0, 0]


def test_sequential_stages_train_one_shift_and_clamp_it(results, hp):
    for strategy in ("window", "matryoshka_affinity"):
        _, edits, batch, result = results[strategy]
        norms = np.linalg.norm(result.delta, axis=-1)
        radius = hp.clamp_norm_factor * np.linalg.norm(result.h, axis=-1)
        assert np.all(norms <= radius * (1 + 1e-5))
        for row, edit in enumerate(edits):
            n = len(edit.windows)
            assert np.all(norms[row, :n] > 0) and np.all(norms[row, n:] == 0), strategy


def test_affinities_upfront_in_loop_and_cached(results, tok, model, hp):
    wc, _, batch, result = results["matryoshka_affinity"]
    upfront = np.asarray(compute_affinities(model.params, model.config, batch, hp, wc))
    np.testing.assert_allclose(result.affinity, upfront, atol=1e-6)
    n = np.asarray(batch.n_windows)
    for row in range(len(n)):
        diag = np.diagonal(upfront[row])[: n[row]]
        np.testing.assert_array_equal(diag, 1.0)
        figures = upfront[row][np.triu_indices(n[row], 1)]
        assert np.all((figures > -1) & (figures <= 1)) and np.any(figures < 0.999)
    in_loop = jax.device_get(optimise_windows(
        model.params, model.config, batch, hp,
        dataclasses.replace(wc, affinity_context="in_loop")))
    # before stage 0 nothing is frozen yet: the same row as up front
    np.testing.assert_allclose(in_loop.affinity[:, 0], upfront[:, 0], atol=1e-5)
    cached = jax.device_get(optimise_windows(model.params, model.config, batch, hp, wc,
                                             affinity=jnp.asarray(upfront)))
    np.testing.assert_allclose(cached.delta, result.delta, atol=1e-5)


def test_a_nan_fails_only_its_own_edit(results, model, hp):
    wc, edits, batch, _ = results["window"]
    only_b = set(edits[1].prompt_ids + edits[1].target_ids) - set(
        edits[0].prompt_ids + edits[0].target_ids)
    params = jax.tree_util.tree_map(lambda x: x, model.params)
    table = params["model"]["embed_tokens"]["embedding"]
    params["model"]["embed_tokens"]["embedding"] = table.at[min(only_b)].set(jnp.nan)
    result = jax.device_get(optimise_windows(params, model.config, batch, hp, wc))
    assert result.finite.tolist() == [True, False]
    failures = check_windows_finite(result, ("a", "b"))
    assert list(failures) == ["b"] and "request b: non-finite shift loss" in failures["b"]


def test_prefix_cache_gives_the_shifts_of_a_full_forward(results, model, hp):
    wc, _, batch, result = results["window"]
    uncached = jax.device_get(optimise_windows(model.params, model.config, batch, hp, wc,
                                               prefix_cache=False))
    np.testing.assert_allclose(uncached.trace.total, result.trace.total, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(uncached.delta, result.delta, rtol=1e-3, atol=1e-4)


@pytest.mark.slow
def test_the_lean_paths_keep_delta_and_the_affinities(tok, model, hp):
    """Issue 20's savings change no δ, each against the path it replaced (max |Δδ| ≤ 1e-5 of
    max |δ|): the affinities from the existing figures' gradients only, against all padded
    figures vmap'd; padding to a shape bucket, against twice the width (the same affinities
    given); AnyEdit's stages reading their window alone, against every target position; no
    step for a stage without a trainable shift (two edits with different window counts, no
    early stop, so a padded stage would otherwise run every step). Together, float32 rounding
    (summation order) grows over the stages to a little more."""
    hp = dataclasses.replace(hp, early_stop_loss=0.0, v_num_grad_steps=6)

    def relative(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.abs(a - b).max() / np.abs(b).max())

    def windows(batch, wc, **kwargs):
        return jax.device_get(optimise_windows(model.params, model.config, batch, hp, wc,
                                               **kwargs))

    wc, edits, lean = _batch(tok, model, "matryoshka_affinity")
    assert np.unique(np.asarray(lean.n_windows)).size == 2
    wide = pack_windows(edits, tok.pad_token_id, width=2 * lean.shift.tokens.shape[-1])
    now = windows(lean, wc)
    vmapped = windows(lean, dataclasses.replace(wc, affinity_gradients="vmap"))
    np.testing.assert_allclose(now.affinity, vmapped.affinity, atol=1e-6)
    assert relative(now.delta, vmapped.delta) <= 1e-5
    padded = windows(wide, wc, affinity=jnp.asarray(now.affinity))
    assert relative(now.delta, padded.delta) <= 1e-5
    np.testing.assert_allclose(now.trace.total, padded.trace.total, rtol=1e-5, atol=1e-6)
    before = windows(wide, dataclasses.replace(wc, affinity_gradients="vmap"))
    assert relative(now.delta, before.delta) <= 5e-5

    wc, edits, lean = _batch(tok, model, "window")
    now = windows(lean, wc)
    every = windows(lean, wc, window_reads=False)
    assert relative(now.delta, every.delta) <= 1e-5
    np.testing.assert_allclose(now.trace.total, every.trace.total, rtol=1e-5, atol=1e-6)
    for row, edit in enumerate(edits):
        n = len(edit.windows)
        assert np.all(now.updates[row, :n] == hp.v_num_grad_steps - 1)
        assert np.all(now.updates[row, n:] == 0)
