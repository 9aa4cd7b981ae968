"""ROME (Meng et al. 2022) against its equation, its batch rule, its refusals, and end to end.

Our orientation: W [F, D], keys k [F] rows; ROME's update is ΔW = C⁻¹k rᵀ / (kᵀC⁻¹k), the
minimum-C-norm change with kᵀ(W + ΔW) = v*ᵀ = kᵀW + rᵀ. Exactness checks run in float64
under a local `jax.enable_x64(True)`.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_main import assert_clean_error, run_main

from keedit_jax import downstream as ds
from keedit_jax.downstream import _rome

F, D = 24, 10
X64 = _rome.RomeHParams(dtype="float64")


def spd(rng: np.random.Generator, f: int = F) -> np.ndarray:
    """A random, well-conditioned symmetric positive definite C, like E[kkᵀ]."""
    a = rng.standard_normal((4 * f, f))
    return a.T @ a / (4 * f) + 0.1 * np.eye(f)


def reference(c: np.ndarray, w: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
    """ROME's paper form, independently: Λ = (v* − Wᵀk) / ((C⁻¹k)ᵀk), ΔW = C⁻¹k Λᵀ (numpy)."""
    u = np.linalg.solve(c, k)
    return np.outer(u, (v - w.T @ k) / (u @ k))


def update(c, keys, resid, kernel=None, hparams=X64):
    return _rome.rome_update(jnp.asarray(c), jnp.asarray(keys), jnp.asarray(resid),
                             _rome.rome_init(F, D), hparams,
                             kernel=None if kernel is None else jnp.asarray(kernel))


def test_single_update_meets_its_constraint_along_c_inverse_k():
    rng = np.random.default_rng(0)
    c, w = spd(rng), rng.standard_normal((F, D))
    k, r = rng.standard_normal(F), rng.standard_normal(D)
    with jax.enable_x64(True):
        delta, _, report = update(c, k[None], r[None], w)
        delta = np.asarray(delta)
        assert delta.dtype == np.float64
    v = w.T @ k + r
    assert np.linalg.norm(k @ (w + delta) - v) / np.linalg.norm(v) < 1e-6
    assert float(report.rel_residual) < 1e-10 and bool(report.finite)
    u = np.linalg.solve(c, k)  # the column space: ΔW = C⁻¹k aᵀ
    a = u @ delta / (u @ u)
    np.testing.assert_allclose(delta, np.outer(u, a), atol=1e-10)
    np.testing.assert_allclose(delta, reference(c, w, k, v), rtol=1e-8, atol=1e-12)
    assert np.linalg.matrix_rank(delta, tol=1e-8) == 1


def test_the_scale_of_c_cancels():
    rng = np.random.default_rng(1)
    c, k, r = spd(rng), rng.standard_normal((1, F)), rng.standard_normal((1, D))
    with jax.enable_x64(True):
        np.testing.assert_allclose(np.asarray(update(1e4 * c, k, r)[0]),
                                   np.asarray(update(c, k, r)[0]), rtol=1e-9)


def test_a_batch_is_single_updates_in_turn_and_the_last_constraint_holds():
    rng = np.random.default_rng(2)
    c, w = spd(rng), rng.standard_normal((F, D))
    keys, resid = rng.standard_normal((2, F)), rng.standard_normal((2, D))
    values = keys @ w + resid  # v*_j, fixed before the batch
    with jax.enable_x64(True):
        batch, _, report = update(c, keys, resid, w)
        first = np.asarray(update(c, keys[:1], resid[:1], w)[0])
        w1 = w + first  # the second request's residual is measured on the updated kernel
        second = np.asarray(update(c, keys[1:], values[1:] - keys[1:] @ w1, w1)[0])
    np.testing.assert_allclose(np.asarray(batch), first + second, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(keys[1] @ (w + np.asarray(batch)), values[1], rtol=1e-9)
    np.testing.assert_allclose(keys[0] @ w1, values[0], rtol=1e-9)  # held at its own step
    assert float(report.rel_residual) < 1e-10
    ds.check_solve(report, layer=0)


def test_float32_default_and_float64_needs_x64():
    rng = np.random.default_rng(3)
    c, k, r = spd(rng), rng.standard_normal((1, F)), rng.standard_normal((1, D))
    delta, _, report = update(c, k, r, hparams=_rome.RomeHParams())
    assert delta.dtype == jnp.float32 and float(report.rel_residual) < 1e-4
    with pytest.raises(ValueError, match="x64"):
        update(c, k, r)


def test_a_c_that_is_not_positive_definite_is_a_solve_error():
    rng = np.random.default_rng(4)
    c = spd(rng)
    c[0, 0] = -1.0
    _, _, report = update(c, rng.standard_normal((1, F)), rng.standard_normal((1, D)),
                          hparams=_rome.RomeHParams())
    with pytest.raises(ds.SolveError, match="rome solve failed at layer 3 .*\\[7\\].*not fin"):
        ds.check_solve(report, layer=3, request_ids=(7,), method="rome")


def test_rome_edits_one_layer():
    from keedit_jax.methods.structured import StructuredConfig
    from keedit_jax.upstream import TargetConfig

    solver = _rome.rome(_rome.RomeHParams())
    with pytest.raises(ValueError, match="rome edits at most 1 layer.*got layers 1, 2"):
        ds.check_layer_count(solver, (1, 2))
    with pytest.raises(ValueError, match="got layers 0, 2"):
        ds.edit_layers({}, ("k",), solver, {}, {}, jnp.zeros((1, D)), None, layers=(0, 2))
    target = TargetConfig(layer=2, v_loss_layer=3)
    with pytest.raises(ValueError, match="got layers 1, 2"):
        StructuredConfig(layers=(1, 2), solver="rome", target=target)
    assert StructuredConfig(layers=(2,), solver="rome", target=target).make_solver() \
        .name == "rome"


def test_preserve_keys_are_refused():
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="no in-context preservation"):
        _rome.rome_update(jnp.asarray(spd(rng)), jnp.ones((1, F)), jnp.ones((1, D)),
                          _rome.rome_init(F, D), _rome.RomeHParams(),
                          preserve=jnp.ones((2, F)))


@pytest.mark.parametrize(("flags", "message"), [
    (("--dataset_format=unkebench",), "--method=rome edits structured"),
    (("--sequential",), "--method=rome has no sequential protocol"),
    (("--layers=1,2",), "rome edits at most 1 layer(s) at a time; got layers 1, 2"),
])
def test_the_command_line_refuses_what_rome_cannot_do(tmp_path, flags, message):
    out = tmp_path / "out"
    assert_clean_error(run_main("--flagfile=configs/rome.cfg", *flags, f"--output_dir={out}",
                                cache=tmp_path), message)
    assert not out.exists()


@pytest.mark.slow  # 26 s (suite budget); the structured command line: test_api (MEMIT)
def test_rome_on_the_organism_through_the_command_line(tmp_path):
    """configs/rome.cfg on 3 edits: every edit is made (efficacy was 0 before)."""
    out = tmp_path / "out"
    result = run_main("--flagfile=configs/rome.cfg", "--num_edits=3", "--stats_samples=2000",
                      "--max_new_tokens=4", f"--output_dir={out}", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["post"]["rewrite_success"][0] >= 95
    assert results["pre"]["rewrite_success"][0] < results["post"]["rewrite_success"][0]
    assert results["pre"]["rewrite_success"][0] <= 50
    assert not results["failed"]
    assert results["title"] == "rome on 3 requests, batch size 1"


def test_solve_dtype_float64_reaches_rome_through_the_structured_config():
    """--solve_dtype=float64 gives ROME a float64 solve with x64 on (as MEMIT's), not a
    float64 request that silently runs in float32."""
    from keedit_jax.flags import StructuredFlags
    from keedit_jax.methods.run_structured import structured_config

    config = structured_config("rome", StructuredFlags(layers="1", solve_dtype="float64"), 4)
    rng = np.random.default_rng(0)
    a = rng.normal(size=(6, 6))
    delta, _, report = config.make_solver().update(
        jnp.asarray(a @ a.T + 6 * np.eye(6), jnp.float32),
        jnp.asarray(rng.normal(size=(1, 6)), jnp.float32),
        jnp.asarray(rng.normal(size=(1, 3)), jnp.float32), _rome.RomeState(),
        kernel=jnp.zeros((6, 3), jnp.float32))
    assert delta.dtype == jnp.float64 and float(report.rel_residual) < 1e-12
