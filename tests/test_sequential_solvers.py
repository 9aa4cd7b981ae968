"""The sequential solvers against the one-time solutions they claim to equal (docs/references.md:
ote_se §2.5-2.10, §9) and LyapLock against its queue recursion and its own objective
(lyaplock §2.5-2.6, §8). Random keys, float64 under a local `jax.enable_x64(True)`.

Our orientation: W [F, D], keys [n, F], values [n, D]; C stands for λ·E[kkᵀ] = K₀ᵀK₀.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import keedit_jax.downstream as ds

F, D, N, T = 12, 5, 3, 5


def problem(seed: int = 0, rank: int | None = None):
    """W₀, C = K₀ᵀK₀ (full rank, or of `rank`), and T batches of (K_t, V_t)."""
    rng = np.random.default_rng(seed)
    k0 = rng.standard_normal((rank or 4 * F, F))
    keys = [rng.standard_normal((N, F)) for _ in range(T)]
    values = [rng.standard_normal((N, D)) for _ in range(T)]
    return rng.standard_normal((F, D)), k0, k0.T @ k0, keys, values


def projector_of(c: np.ndarray) -> np.ndarray:
    u, s, _ = np.linalg.svd(c)
    null = u[:, s < 1e-8 * s.max()]
    return null @ null.T


def run_sequence(hparams: ds.OteHParams, stats: ds.OteStats, w0, keys, values, solver=None):
    """W after each batch, and each batch's un-regularised candidate (same state, post=none)."""
    update = solver or (lambda s, k, r, st: ds.ote_update(s, k, r, st, hparams, kernel=w))
    plain = ds.OteHParams(**{**hparams.__dict__, "post": "none", "error_correction": False})
    w, state = jnp.asarray(w0), ds.ote_init(F, D, jnp.float64)
    weights, candidates = [], []
    for k, v in zip(keys, values, strict=True):
        r = jnp.asarray(v) - jnp.asarray(k) @ w
        candidates.append(ds.ote_update(stats, k, r, state, plain, kernel=w)[0])
        delta, state, report = update(stats, jnp.asarray(k), r, state)
        assert bool(report.finite)
        w = w + delta
        weights.append(w)
    return weights, candidates


def one_time(w0, c, keys, values, projector=None, ridge=0.0):
    """W₀ + Δ_total on every batch so far, from W₀ (ote_se §2.5's OTE solution)."""
    k, v = np.concatenate(keys), np.concatenate(values)
    p = np.eye(F) if projector is None else projector
    a = p @ (c + k.T @ k) + ridge * np.eye(F)
    return w0 + np.linalg.solve(a, p @ k.T @ (v - k @ w0))


def rel(a, b) -> float:
    return float(np.linalg.norm(np.asarray(a) - np.asarray(b)) / np.linalg.norm(np.asarray(b)))


@pytest.mark.parametrize("case", ["identity", "null_space"])
def test_sequential_sum_equals_one_time_solution(case):
    """Prop. 3.2: Σ_t ΔW_t = Δ_total,t at every t, for P = I (MEMIT-seq, ridge 0) and for a
    null-space P with ridge > 0; with P the update stays in the projected subspace."""
    with jax.enable_x64(True):
        if case == "identity":
            w0, _, c, keys, values = problem(0)
            p, hp = None, ds.OteHParams(mom2_update_weight=1.0, dtype="float64")
        else:
            w0, _, c, keys, values = problem(1, rank=6)
            p = projector_of(c)
            hp = ds.OteHParams(mom2_update_weight=1.0, project=True, ridge=0.5, dtype="float64")
        stats = ds.OteStats(moment=jnp.asarray(c), projector=None if p is None else jnp.asarray(p))
        weights, _ = run_sequence(hp, stats, w0, keys, values)
        for t, w in enumerate(weights, start=1):
            expected = one_time(w0, c, keys[:t], values[:t], p, hp.ridge)
            assert rel(w - w0, expected - w0) < 1e-6
        if p is not None:
            total = np.asarray(weights[-1]) - w0
            np.testing.assert_allclose(p @ total, total, atol=1e-10)
            assert np.abs(total).max() > 1e-2  # not the trivial zero update


def test_naive_reapplication_is_not_the_one_time_solution():
    """The same batches without the carried Gram drift away from the OTE solution: the test
    above can fail."""
    with jax.enable_x64(True):
        w0, _, c, keys, values = problem(0)
        hp = ds.OteHParams(mom2_update_weight=1.0, accumulate_keys=False, dtype="float64")
        weights, _ = run_sequence(hp, ds.OteStats(moment=jnp.asarray(c)), w0, keys, values)
        assert rel(weights[-1] - w0, one_time(w0, c, keys, values) - w0) > 1e-2


def test_memit_seq_and_published_alphaedit_are_members_of_the_family():
    """MEMIT(accumulate_keys) = OTE(P=I, ρ=0); published AlphaEdit (Eq. 2) = OTE(P, C=0, ρ=L2),
    whose sequential sum is Eq. 10's one-time solution (Lemma 3.1)."""
    with jax.enable_x64(True):
        for rank in (None, 6):
            w0, _, c, keys, values = problem(2, rank=rank)
            if rank is None:  # MEMIT-seq
                proj, ridge = None, 0.0
                solver, stats = ds.memit(ds.MemitHParams(
                    mom2_update_weight=1.0, accumulate_keys=True, dtype="float64")), c
                hp, c_term = ds.OteHParams(mom2_update_weight=1.0, dtype="float64"), c
            else:  # AlphaEdit, Eq. 2: no K₀ term, ridge L2
                proj, ridge = projector_of(c), 10.0
                solver, stats = ds.alphaedit(ds.AlphaEditHParams(l2=10.0, dtype="float64")), proj
                hp = ds.OteHParams(mom2_update_weight=0.0, project=True, ridge=10.0,
                                   dtype="float64")
                c_term = np.zeros_like(c)
            ote_stats = ds.OteStats(jnp.asarray(c), None if proj is None else jnp.asarray(proj))
            weights, _ = run_sequence(hp, ote_stats, w0, keys, values)
            w, state = jnp.asarray(w0), solver.init(F, D, jnp.float64)
            for k, v in zip(keys, values, strict=True):
                delta, state, _ = solver.update(jnp.asarray(stats), jnp.asarray(k), v - k @ w,
                                                state)
                w = w + delta
            assert rel(w, weights[-1]) < 1e-9
            assert rel(w - w0, one_time(w0, c_term, keys, values, proj, ridge) - w0) < 1e-6


@pytest.mark.parametrize("post", ["rect", "prune"])
def test_error_correction_restores_the_one_time_solution(post):
    """Algorithm 1 / Prop. A.3: before R_p, W^R_{t−1} + Δ_t is the exact OTE optimum (with the
    code's +I ridge: min Σ‖(W)K_τ − V_τ‖² + ‖W − W₀‖²) at every t, while the post-processed
    weights differ from it; without correction the candidate drifts."""
    with jax.enable_x64(True):
        w0, _, c, keys, values = problem(3)
        if post == "prune":  # updates far above σ_max(W), so PRUNE triggers
            w0, values = 0.05 * w0, [20.0 * v for v in values]
        stats = ds.OteStats(moment=jnp.asarray(c))
        corrected = ds.OteHParams(mom2_update_weight=1.0, ridge=1.0, post=post, rect_keep=0.4,
                                  error_correction=True, dtype="float64")
        weights, candidates = run_sequence(corrected, stats, w0, keys, values)
        previous = [jnp.asarray(w0)] + weights[:-1]
        changed = []
        for t in range(1, T + 1):
            optimum = one_time(w0, c, keys[:t], values[:t], ridge=1.0)
            assert rel(previous[t - 1] + candidates[t - 1], optimum) < 1e-8
            changed.append(rel(weights[t - 1], optimum))
        assert changed[0] > 1e-2  # R_p really changed the update
        ablation = ds.OteHParams(**{**corrected.__dict__, "error_correction": False})
        weights, candidates = run_sequence(ablation, stats, w0, keys, values)
        last = weights[-2] + candidates[-1]
        assert rel(last, one_time(w0, c, keys, values, ridge=1.0)) > 1e-3


def test_rect_keeps_the_top_fraction_by_relative_change():
    """The code's threshold is the ⌊n·0.6⌋-th smallest ratio, kept with ≥: of ratios
    (1, 2, 3, 4, 0.5) the 3rd smallest is 2, so 2, 3 and 4 survive."""
    delta = jnp.asarray([[1.0, 2.0, 3.0, 4.0, 5.0]])
    kernel = jnp.asarray([[1.0, 1.0, 1.0, 1.0, 10.0]])
    np.testing.assert_array_equal(ds.rect(delta, kernel, 0.4), [[0.0, 2.0, 3.0, 4.0, 0.0]])
    ten = jnp.arange(1.0, 11.0)[None]
    assert int((ds.rect(ten, jnp.ones_like(ten), 0.2) != 0).sum()) == 3  # 8th smallest: 8..10


def test_prune_compresses_only_singular_values_above_the_kernel_norm():
    with jax.enable_x64(True):
        u, _ = np.linalg.qr(np.random.default_rng(4).standard_normal((F, D)))
        v, _ = np.linalg.qr(np.random.default_rng(5).standard_normal((D, D)))
        s = np.array([9.0, 5.0, 1.0, 0.5, 0.1])
        kernel = np.diag([2.0] * D)  # σ_max = 2
        kernel = np.vstack([kernel, np.zeros((F - D, D))])
        out = np.linalg.svd(np.asarray(ds.prune(jnp.asarray((u * s) @ v.T), jnp.asarray(kernel))),
                            compute_uv=False)
        expected = [np.log(9) - np.log(2) + 2, np.log(5) - np.log(2) + 2, 1.0, 0.5, 0.1]
        np.testing.assert_allclose(out, expected, rtol=1e-10)


def test_memorize_the_latest_equals_the_one_time_solution_on_k0_and_the_latest_batch():
    """Eq. 32: after batch t, W = argmin ‖W[K₀|K_t] − [W₀K₀|V_t]‖, whatever came before."""
    with jax.enable_x64(True):
        w0, _, c, keys, values = problem(6)
        hp = ds.OteHParams(mom2_update_weight=1.0, accumulate_keys=False, memorize_latest=True,
                           dtype="float64")
        weights, _ = run_sequence(hp, ds.OteStats(moment=jnp.asarray(c)), w0, keys, values)
        for t, w in enumerate(weights):
            k, v = keys[t], values[t]
            expected = np.linalg.solve(c + k.T @ k, c @ w0 + k.T @ v)
            assert rel(w, expected) < 1e-8


def test_conflict_resolution_equals_brute_force_least_squares():
    """Prop. 3.5 (old-value form): replacing fact 0 of batch 1 with a new value while adding
    batch 2 gives the least-squares solution of the live set; the printed Eq. 30 (resolved,
    i.e. new, values in the subtracted term) does not."""
    with jax.enable_x64(True):
        w0, k0, c, keys, values = problem(7)
        k1, v1, k2, v2 = keys[0], values[0], keys[1], values[1]
        w1 = w0 + np.linalg.solve(c + k1.T @ k1, k1.T @ (v1 - k1 @ w0))
        v_new = np.random.default_rng(8).standard_normal((1, D))
        k_batch, v_batch = np.vstack([k2, k1[:1]]), np.vstack([v2, v_new])
        live_k = np.vstack([k0, k1[1:], k2, k1[:1]])
        live_v = np.vstack([k0 @ w0, v1[1:], v2, v_new])
        brute = np.linalg.lstsq(live_k, live_v, rcond=None)[0]
        delta, system = ds.resolve_conflicts(jnp.asarray(c + k1.T @ k1), jnp.asarray(w1),
                                             jnp.asarray(k_batch), jnp.asarray(v_batch),
                                             jnp.asarray(k1[:1]), jnp.asarray(v1[:1]))
        assert rel(w1 + delta, brute) < 1e-8
        np.testing.assert_allclose(system, live_k.T @ live_k, rtol=1e-10)
        printed, _ = ds.resolve_conflicts(jnp.asarray(c + k1.T @ k1), jnp.asarray(w1),
                                          jnp.asarray(k_batch), jnp.asarray(v_batch),
                                          jnp.asarray(k1[:1]), jnp.asarray(v_new))
        assert rel(w1 + printed, brute) > 1e-3


def lyaplock_run(alpha: float, seed: int = 9, steps: int = 8):
    """LyapLock over random batches; returns per-step (w, PL, W, state) with PL from W."""
    rng = np.random.default_rng(seed)
    w0 = rng.standard_normal((F, D))
    sigma = np.cov(rng.standard_normal((F, 4 * F))) + 0.1 * np.eye(F)
    hp = ds.LyapLockHParams(mom2_update_weight=2.0, alpha=alpha, dtype="float64")
    state, w = ds.lyaplock_init(F, D, jnp.float64), jnp.asarray(w0)
    history = []
    for _ in range(steps):
        k = rng.standard_normal((N, F))
        r = 3.0 * rng.standard_normal((N, D))
        weight = float(ds.preservation_weight(state, hp))
        delta, new_state, report = ds.lyaplock_update(jnp.asarray(sigma), jnp.asarray(k),
                                                      jnp.asarray(r), state, hp)
        assert bool(report.finite)
        history.append({"w": weight, "k": k, "r": r, "before": w, "state": state,
                        "delta": delta})
        w, state = w + delta, new_state
        u = np.asarray(w) - w0
        history[-1]["pl"] = float(np.trace(u.T @ sigma @ u))
    return w0, sigma, hp, history


def test_lyaplock_weight_follows_its_recursion():
    """w(1) = w(2) = 1, D = α·PL(1), then w(t+1) = max(w(t) + PL(t)/D − 1, 1); α small enough
    that the threshold is crossed, so the weight does rise (lyaplock §2.6, §8)."""
    with jax.enable_x64(True):
        _, _, hp, history = lyaplock_run(alpha=1.5)
        d = hp.alpha * history[0]["pl"]
        assert history[0]["w"] == 1.0 and abs(history[1]["w"] - 1.0) < 1e-12
        for t in range(1, len(history) - 1):
            expected = max(history[t]["w"] + history[t]["pl"] / d - 1, 1.0)
            assert abs(history[t + 1]["w"] - expected) < 1e-9 * max(1.0, expected)
        assert max(h["w"] for h in history) > 1.5


def test_lyaplock_step_minimises_its_objective():
    """Each ΔW zeroes the gradient of V·(‖K(W+Δ) − V₁‖² + Σ_s‖K_s(W+Δ) − K_sW_s‖²)
    + w·λ·tr((U+Δ)ᵀΣ(U+Δ)), with the past keys and achieved weights W_s kept explicitly
    (the state carries only their sums); the first step is MEMIT with λ anchored at W₀."""
    with jax.enable_x64(True):
        w0, sigma, hp, history = lyaplock_run(alpha=1.5)
        past = []
        for h in history:
            w, k, r = h["before"], jnp.asarray(h["k"]), jnp.asarray(h["r"])
            v1 = k @ w + r

            def objective(delta, w=w, k=k, v1=v1, weight=h["w"], past=tuple(past)):
                edit = jnp.sum((k @ (w + delta) - v1) ** 2)
                kept = sum(jnp.sum((ks @ (w + delta) - ks @ ws) ** 2) for ks, ws in past)
                u = w + delta - w0
                return hp.control * (edit + kept) + weight * hp.mom2_update_weight * jnp.sum(
                    u * (sigma @ u))

            grad = jax.grad(objective)(h["delta"])
            scale = jnp.linalg.norm(jax.grad(objective)(jnp.zeros_like(h["delta"])))
            assert float(jnp.linalg.norm(grad) / scale) < 1e-8
            past.append((k, w + h["delta"]))
        first = history[0]
        memit, _, _ = ds.memit_update(jnp.asarray(sigma), jnp.asarray(first["k"]),
                                      jnp.asarray(first["r"]), ds.memit_init(F, jnp.float64),
                                      ds.MemitHParams(mom2_update_weight=2.0, dtype="float64"))
        np.testing.assert_allclose(first["delta"], memit, rtol=1e-9, atol=1e-12)


def test_invalid_family_members_are_refused():
    with pytest.raises(ValueError, match="ridge > 0"):
        ds.OteHParams(project=True, ridge=0.0)
    with pytest.raises(ValueError, match="post=prune"):
        ds.OteHParams(error_correction=True)
    with pytest.raises(ValueError, match="accumulate_keys=False"):
        ds.OteHParams(memorize_latest=True)
    with pytest.raises(ValueError, match="alpha > 0"):
        ds.LyapLockHParams(alpha=0.0)


def test_removing_a_fact_from_a_memit_seq_layer_equals_never_inserting_it():
    """run_sequential.forget_pairs with the (key, value) the layer was fitted to: inserting
    batches A, B then removing a₀ gives the weights of inserting A∖{a₀}, B (one layer, where the
    values are the targets), and the carried Gram forgets k₀ too."""
    from keedit_jax.methods.run_sequential import forget_pairs

    rng = np.random.default_rng(11)
    w0, moment = rng.standard_normal((F, D)), np.cov(rng.standard_normal((F, 4 * F)))
    keys, targets = rng.standard_normal((6, F)), rng.standard_normal((6, D))
    path = ("mlp", "kernel")

    def insert(rows):
        params = {"mlp": {"kernel": jnp.asarray(w0[None])}}
        solver = ds.memit(ds.MemitHParams(mom2_update_weight=2.0, accumulate_keys=True,
                                          dtype="float64"))
        states, fitted = ds.init_states(solver, (0,), F, D, jnp.float64), []
        for batch in rows:
            def readout(p, layer, batch=batch):
                k = jnp.asarray(keys[batch])
                return ds.Readout(keys=k, outputs=k @ p["mlp"]["kernel"][0])
            params, states, reports = ds.edit_layers(params, path, solver, {0: moment}, states,
                                                     jnp.asarray(targets[batch]), readout,
                                                     layers=(0,))
            fitted.append((np.asarray(reports[0].keys), np.asarray(reports[0].values)))
        return params, states, fitted

    with jax.enable_x64(True):
        params, states, fitted = insert([[0, 1, 2], [3, 4, 5]])
        np.testing.assert_allclose(fitted[0][1], targets[:3], atol=1e-12)  # values = targets
        removed, states = forget_pairs(params, states, {0: jnp.asarray(moment)}, 2.0, path,
                                       {0: (fitted[0][0][:1], fitted[0][1][:1])})
        expected, expected_states, _ = insert([[1, 2], [3, 4, 5]])
        assert rel(removed["mlp"]["kernel"][0], expected["mlp"]["kernel"][0]) < 1e-9
        np.testing.assert_allclose(states[0].key_gram, expected_states[0].key_gram, atol=1e-9)
        assert rel(params["mlp"]["kernel"][0], expected["mlp"]["kernel"][0]) > 1e-3
