"""Downstream solvers against the equations they solve (anchors §1, §4; ote_se §2; see
docs/references.md).

Our orientation: W [F, D], keys K [n, F], residuals R [n, D]. MEMIT solves
(λC + G + KᵀK) ΔW = Kᵀ R; AlphaEdit solves (P(G + KᵀK) + L2·I) ΔW = P Kᵀ R.
Exactness checks run in float64 under a local `jax.enable_x64(True)`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from keedit_jax import downstream as ds
from keedit_jax.intervene import Taps, run
from keedit_jax.models import abstract_params, config_from_hf, down_proj_path
from keedit_jax.models.params import get_path

F, D = 24, 10
NULL_RANK = 9  # dimensions of the key space the preserved knowledge never uses


def random_keys(rng: np.random.Generator, n: int, f: int = F) -> np.ndarray:
    return rng.standard_normal((n, f))


def model_like_keys(rng: np.random.Generator, n: int, f: int = F, rank: int = 5) -> np.ndarray:
    """Correlated, nearly low-rank keys with a shared offset, like gated MLP activations."""
    basis = rng.standard_normal((rank, f)) * np.geomspace(3.0, 0.05, rank)[:, None]
    offset = 0.5 * rng.standard_normal(f)
    return offset + rng.standard_normal((n, rank)) @ basis + 1e-3 * rng.standard_normal((n, f))


def moment(keys: np.ndarray) -> np.ndarray:
    """E[k kᵀ]: the normalised, uncentred second moment (anchors §3)."""
    return keys.T @ keys / keys.shape[0]


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def moment_with_null_space(
        rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A moment C whose eigenvalues are ≥ 0.5 on a random subspace and 1e-4 off it, the
    projector P onto its null space as keedit_jax.stats builds it (eigenvalues < 2e-2,
    anchors §4), and preserved keys K0 in the range of C (so P k0 = 0)."""
    basis, _ = np.linalg.qr(rng.standard_normal((F, F)))
    eigenvalues = np.concatenate([rng.uniform(0.5, 3.0, F - NULL_RANK), np.full(NULL_RANK, 1e-4)])
    c = (basis * eigenvalues) @ basis.T
    w, u = np.linalg.eigh(c)
    null = u[:, w < 2e-2]
    assert null.shape[1] == NULL_RANK
    preserved = rng.standard_normal((30, F - NULL_RANK)) @ basis[:, : F - NULL_RANK].T
    return c, null @ null.T, preserved


def x64_memit(lam: float, **kw) -> ds.MemitHParams:
    return ds.MemitHParams(mom2_update_weight=lam, dtype="float64", **kw)


# MEMIT ------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["random", "model_like"])
@pytest.mark.parametrize("lam", [1.0, 15000.0])
def test_memit_solves_its_normal_equations(kind: str, lam: float) -> None:
    rng = np.random.default_rng(0)
    make = random_keys if kind == "random" else model_like_keys
    c = moment(make(rng, 400))
    keys, resid = make(rng, 6), rng.standard_normal((6, D))
    previous = make(rng, 5)
    with jax.enable_x64(True):
        state = ds.MemitState(key_gram=jnp.asarray(previous.T @ previous))
        delta, _, report = ds.memit_update(c, keys, resid, state, x64_memit(lam))
        delta = np.asarray(delta)
    assert delta.shape == (F, D) and delta.dtype == np.float64
    lhs = (lam * c + previous.T @ previous + keys.T @ keys) @ delta
    assert rel(lhs, keys.T @ resid) < 1e-6
    assert bool(report.finite) and float(report.rel_residual) < 1e-6


@settings(max_examples=8, deadline=None)
@given(n=st.integers(1, 12), f=st.integers(2, 20), d=st.integers(1, 9),
       lam=st.floats(1e-2, 2e4), seed=st.integers(0, 2**16))
def test_memit_normal_equations_random_shapes(n: int, f: int, d: int, lam: float,
                                              seed: int) -> None:
    rng = np.random.default_rng(seed)
    c = moment(model_like_keys(rng, 200, f, rank=min(f, 4)) + 0.05 * rng.standard_normal((200, f)))
    keys, resid = model_like_keys(rng, n, f, rank=min(f, 4)), rng.standard_normal((n, d))
    with jax.enable_x64(True):
        delta, _, _ = ds.memit_update(c, keys, resid, ds.memit_init(f, jnp.float64),
                                      x64_memit(lam))
    assert rel((lam * c + keys.T @ keys) @ np.asarray(delta), keys.T @ resid) < 1e-6


def test_memit_float32_agrees_with_float64() -> None:
    rng = np.random.default_rng(1)
    c, keys, resid = moment(random_keys(rng, 400)), random_keys(rng, 6), rng.standard_normal((6, D))
    hp32 = ds.MemitHParams(mom2_update_weight=10.0)
    d32, _, report = ds.memit_update(c, keys, resid, ds.memit_init(F), hp32)
    assert d32.dtype == jnp.float32 and float(report.rel_residual) < 1e-5
    with jax.enable_x64(True):
        d64, _, _ = ds.memit_update(c, keys, resid, ds.memit_init(F, jnp.float64),
                                    x64_memit(10.0))
    assert rel(np.asarray(d32, np.float64), np.asarray(d64)) < 1e-4


# AlphaEdit ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, tol", [("float64", 1e-12), ("float32", 1e-5)])
def test_alphaedit_leaves_preserved_keys_unchanged(dtype: str, tol: float) -> None:
    rng = np.random.default_rng(2)
    _, p, preserved = moment_with_null_space(rng)
    assert np.abs(preserved @ p).max() < 1e-12  # P k0 = 0 for the preserved keys
    keys, resid, previous = random_keys(rng, 5), rng.standard_normal((5, D)), random_keys(rng, 7)
    with jax.enable_x64(dtype == "float64"):
        state = ds.AlphaEditState(key_gram=jnp.asarray(previous.T @ previous, dtype))
        delta, _, _ = ds.alphaedit_update(p, keys, resid, state,
                                          ds.AlphaEditHParams(l2=10.0, dtype=dtype))
        delta = np.asarray(delta, np.float64)
    assert np.abs(delta).max() > 1e-3  # the edit itself is not empty
    # k0 (W + ΔW) = k0 W for every preserved key, relative to the size of the edit.
    assert np.abs(preserved @ delta).max() < tol * np.abs(preserved).max() * np.abs(delta).max()
    assert rel(p @ delta, delta) < tol  # ΔW = P ΔW: applied as is, never projected again


def test_alphaedit_solves_its_normal_equations() -> None:
    rng = np.random.default_rng(3)
    _, p, _ = moment_with_null_space(rng)
    for make in (random_keys, model_like_keys):
        keys, resid, previous = make(rng, 6), rng.standard_normal((6, D)), make(rng, 8)
        gram = previous.T @ previous
        with jax.enable_x64(True):
            delta, _, report = ds.alphaedit_update(
                p, keys, resid, ds.AlphaEditState(key_gram=jnp.asarray(gram)),
                ds.AlphaEditHParams(l2=10.0, dtype="float64"))
            delta = np.asarray(delta)
        lhs = (p @ (gram + keys.T @ keys) + 10.0 * np.eye(F)) @ delta
        assert rel(lhs, p @ keys.T @ resid) < 1e-6
        assert float(report.rel_residual) < 1e-6
        # Paper form, transposed (ote_se Eq. 2 with ridge L2): R Kᵀ P (M P + L2 I)⁻¹.
        paper = resid.T @ keys @ p @ np.linalg.inv((gram + keys.T @ keys) @ p + 10.0 * np.eye(F))
        assert rel(delta, paper.T) < 1e-9


@pytest.mark.parametrize("solver", ["alphaedit", "memit_seq"])
def test_key_gram_accumulates_previous_batches(solver: str) -> None:
    rng = np.random.default_rng(4)
    _, p, _ = moment_with_null_space(rng)
    c = moment(random_keys(rng, 300))
    with jax.enable_x64(True):
        if solver == "alphaedit":
            update = ds.alphaedit(ds.AlphaEditHParams(dtype="float64"))
            stats = p
        else:
            update = ds.memit(x64_memit(100.0, accumulate_keys=True))
            stats = c
        state = update.init(F, D, jnp.float64)
        expected = np.zeros((F, F))
        for n in (3, 1, 5):
            keys = random_keys(rng, n)
            _, state, _ = update.update(stats, keys, rng.standard_normal((n, D)), state)
            expected += keys.T @ keys
            np.testing.assert_allclose(np.asarray(state.key_gram), expected, rtol=1e-12)


def test_caches_off_keep_state_zero() -> None:
    rng = np.random.default_rng(5)
    keys, resid = random_keys(rng, 4), rng.standard_normal((4, D))
    _, p, _ = moment_with_null_space(rng)
    _, s1, _ = ds.alphaedit_update(p, keys, resid, ds.alphaedit_init(F),
                                   ds.AlphaEditHParams(use_key_cache=False))
    _, s2, _ = ds.memit_update(np.eye(F), keys, resid, ds.memit_init(F),
                               ds.MemitHParams(mom2_update_weight=1.0))
    assert not np.any(np.asarray(s1.key_gram)) and not np.any(np.asarray(s2.key_gram))


@pytest.mark.parametrize("solver", ["alphaedit", "memit_seq"])
def test_sequential_steps_sum_to_the_one_time_edit(solver: str) -> None:
    """ote_se Lemma 3.1 / Prop. 3.2 (§9 test 1): with the key cache and residuals against the
    current weights, the sequential updates sum to the one-batch solution from W0."""
    rng = np.random.default_rng(6)
    c, p, _ = moment_with_null_space(rng)
    w0 = rng.standard_normal((F, D))
    batches = [(random_keys(rng, 3), rng.standard_normal((3, D))) for _ in range(4)]
    with jax.enable_x64(True):
        if solver == "alphaedit":
            s, stats = ds.alphaedit(ds.AlphaEditHParams(l2=10.0, dtype="float64")), p
        else:
            s, stats = ds.memit(x64_memit(50.0, accumulate_keys=True)), c
        w, state = w0.copy(), s.init(F, D, jnp.float64)
        for keys, values in batches:
            delta, state, _ = s.update(stats, keys, values - keys @ w, state)
            w = w + np.asarray(delta)
    k_all = np.concatenate([k for k, _ in batches])
    r_all = np.concatenate([v for _, v in batches]) - k_all @ w0
    if solver == "alphaedit":
        total = np.linalg.solve(p @ k_all.T @ k_all + 10.0 * np.eye(F), p @ k_all.T @ r_all)
    else:
        total = np.linalg.solve(50.0 * c + k_all.T @ k_all, k_all.T @ r_all)
    assert rel(w - w0, total) < 1e-9


# Failures ----------------------------------------------------------------------------------


def fake_model(n_layers: int = 3, seed: int = 7):
    """A linear stand-in for a transformer: fixed keys per layer, and the output of the last
    edited layer = base + Σ_l K_l W_l, so every edit moves it exactly by K_l ΔW_l."""
    rng = np.random.default_rng(seed)
    keys = {layer: random_keys(rng, 4) for layer in range(n_layers)}
    base = rng.standard_normal((4, D))
    params = {"mlp": {"kernel": jnp.asarray(0.1 * rng.standard_normal((n_layers, F, D)))}}

    def readout(tree, layer: int) -> ds.Readout:
        kernel = np.asarray(tree["mlp"]["kernel"])
        out = base + sum(keys[m] @ kernel[m] for m in range(n_layers))
        return ds.Readout(keys=jnp.asarray(keys[layer]), outputs=jnp.asarray(out))

    return params, readout, rng


def test_singular_system_raises_naming_layer_and_requests() -> None:
    params, readout, rng = fake_model()
    targets = jnp.asarray(rng.standard_normal((4, D)))

    def zero_keys_at_2(tree, layer: int) -> ds.Readout:
        r = readout(tree, layer)
        return r._replace(keys=jnp.zeros_like(r.keys)) if layer == 2 else r

    before = np.asarray(params["mlp"]["kernel"]).copy()
    solver = ds.memit(ds.MemitHParams(mom2_update_weight=1.0))
    states = ds.init_states(solver, (0, 1, 2), F, D)
    stats = {0: jnp.eye(F), 1: jnp.eye(F), 2: jnp.zeros((F, F))}  # A = λC + KᵀK = 0 at layer 2
    with pytest.raises(ds.SolveError, match=r"memit solve failed at layer 2 .*\[3, 5\].*not fin"):
        ds.edit_layers(params, ("mlp", "kernel"), solver, stats, states, targets,
                       zero_keys_at_2, layers=(0, 1, 2), request_ids=(3, 5))
    # Layers 0 and 1 were solved before the failure, yet the caller's params are untouched.
    np.testing.assert_array_equal(np.asarray(params["mlp"]["kernel"]), before)


def test_alphaedit_singular_and_nonfinite_inputs_raise() -> None:
    rng = np.random.default_rng(8)
    keys, resid = random_keys(rng, 3), rng.standard_normal((3, D))
    hp = ds.AlphaEditHParams(l2=0.0)  # P = 0, L2 = 0: A = 0
    _, _, report = ds.alphaedit_update(np.zeros((F, F)), keys, resid, ds.alphaedit_init(F), hp)
    with pytest.raises(ds.SolveError, match="alphaedit solve failed at layer 4"):
        ds.check_solve(report, layer=4, request_ids=(11,), method="alphaedit")
    bad = keys.copy()
    bad[1, 2] = np.nan
    _, _, report = ds.alphaedit_update(np.eye(F), bad, resid, ds.alphaedit_init(F),
                                       ds.AlphaEditHParams())
    with pytest.raises(ds.SolveError, match="not finite"):
        ds.check_solve(report, layer=5)


def test_inaccurate_solve_raises_and_float64_needs_x64() -> None:
    rng = np.random.default_rng(9)
    keys, resid = random_keys(rng, 3), rng.standard_normal((3, D))
    hp = ds.MemitHParams(mom2_update_weight=1.0, max_rel_residual=1e-30)
    _, _, report = ds.memit_update(np.eye(F), keys, resid, ds.memit_init(F), hp)
    with pytest.raises(ds.SolveError, match="relative residual"):
        ds.check_solve(report, layer=6)
    with pytest.raises(ValueError, match="x64"):
        ds.memit_update(np.eye(F), keys, resid, ds.memit_init(F), x64_memit(1.0))


# The multi-layer loop ------------------------------------------------------------------------


def test_spread_residual_hand_computed() -> None:
    targets, outputs = jnp.full((1, 2), 12.0), jnp.zeros((1, 2))
    assert [float(ds.spread_residual(targets, outputs, i, 3)[0, 0]) for i in range(3)] == [
        4.0, 6.0, 12.0]
    with pytest.raises(IndexError):
        ds.spread_residual(targets, outputs, 3, 3)


def test_edit_layers_spreads_the_residual_over_three_layers() -> None:
    """With an (almost) exact per-layer fit, layer i of 3 receives (z − cur_i)/(3 − i), which by
    hand is R0/3 at every layer, R0 = z − cur_0; and the output reaches z."""
    params, readout, rng = fake_model()
    targets = jnp.asarray(rng.standard_normal((4, D)))
    r0 = np.asarray(targets) - np.asarray(readout(params, 0).outputs)
    with jax.enable_x64(True):
        solver = ds.memit(x64_memit(1e-9))
        stats = {layer: jnp.eye(F) for layer in range(3)}
        new, _, reports = ds.edit_layers(
            params, ("mlp", "kernel"), solver, stats, ds.init_states(solver, range(3), F, D,
                                                                     jnp.float64),
            targets, readout, layers=(2, 0, 1))
        for layer in range(3):
            np.testing.assert_allclose(np.asarray(reports[layer].resid), r0 / 3, atol=1e-7)
        np.testing.assert_allclose(np.asarray(readout(new, 2).outputs), np.asarray(targets),
                                   atol=1e-7)


LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
         "num_hidden_layers": 3, "num_attention_heads": 4, "num_key_value_heads": 2,
         "max_position_embeddings": 64, "rms_norm_eps": 1e-5, "rope_theta": 10000.0}


def numpy_params(cfg, rng: np.random.Generator):
    """Random weights drawn in numpy: init_params' per-leaf jax.random compiles take seconds."""
    def leaf(path, x: jax.ShapeDtypeStruct) -> jax.Array:
        if path[-1].key == "scale":
            return jnp.ones(x.shape, x.dtype)
        return jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype)

    return jax.tree_util.tree_map_with_path(leaf, abstract_params(cfg))


def test_memit_edits_a_tiny_model_through_the_seam() -> None:
    """Layers 0 and 1 of a tiny Llama, keys and outputs read with intervene.run: after the
    loop the last edited layer's output at the lookup token reaches the targets."""
    cfg = config_from_hf(LLAMA)
    params = numpy_params(cfg, np.random.default_rng(11))
    layers, last = (0, 1), 1
    rng = np.random.default_rng(10)
    tokens = jnp.asarray(rng.integers(0, LLAMA["vocab_size"], (3, 7)), jnp.int32)
    mask = jnp.ones_like(tokens)

    run_jit = jax.jit(run, static_argnames=("cfg", "stop", "taps"))
    taps = Taps(mlp_key=layers, block_out=(last,))  # one program for every readout

    def readout(tree, layer: int) -> ds.Readout:
        _, caps = run_jit(tree, cfg, tokens=tokens, attention_mask=mask, stop=last + 1, taps=taps)
        return ds.Readout(keys=caps.mlp_key[layer][:, -1], outputs=caps.block_out[last][:, -1])

    # The tiny model's own key moments, as keedit_jax.stats would collect them.
    wide = jnp.asarray(rng.integers(0, 64, (8, 16)), jnp.int32)
    _, caps = run_jit(params, cfg, tokens=wide, attention_mask=jnp.ones_like(wide),
                      stop=last + 1, taps=taps)
    stats = {layer: moment(np.asarray(caps.mlp_key[layer], np.float64).reshape(-1, cfg.d_ff))
             for layer in layers}
    before = readout(params, last).outputs
    targets = before + 0.5 * jnp.asarray(rng.standard_normal(before.shape), jnp.float32)
    solver = ds.memit(ds.MemitHParams(mom2_update_weight=1e-3))
    new, states, reports = ds.edit_layers(
        params, down_proj_path(cfg), solver, stats,
        ds.init_states(solver, layers, cfg.d_ff, cfg.d_model),
        targets, readout, layers=layers, request_ids=(0, 1, 2))
    after = readout(new, last).outputs
    before_gap = rel(np.asarray(before), np.asarray(targets))
    after_gap = rel(np.asarray(after), np.asarray(targets))
    assert after_gap < 1e-2 * before_gap
    # Layer 1's keys were read after layer 0's edit, so they differ from the unedited ones.
    assert not np.allclose(readout(new, 1).keys, readout(params, 1).keys)
    edited = np.asarray(get_path(new, down_proj_path(cfg)))
    original = np.asarray(get_path(params, down_proj_path(cfg)))
    assert np.array_equal(edited[2], original[2]) and not np.allclose(edited[1], original[1])
    assert states[1].key_gram.shape == (cfg.d_ff, cfg.d_ff)
    assert all(bool(r.solve.finite) for r in reports.values())
