"""SPHERE (Liu et al. 2026, arXiv 2510.01172): AlphaEdit's update multiplied by the sparse
projector P⊥ = I − αUUᵀ of the pretrained kernel's unit-length neurons.

Truth: P⊥ built by hand in float64 numpy; a 3-key kernel whose principal directions and
eigenvalues are read off by eye; the claimed property (α = 1 removes the update's component
along U and keeps the rest; α < 1 scales it by 1 − α); AlphaEdit itself when η = 0 or α = 0;
U read from the first (pretrained) kernel only. Our orientation: W [F, D], keys [n, F].
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import keedit_jax.downstream as ds
from keedit_jax.flags import SequentialFlags, StructuredFlags
from keedit_jax.methods.run_sequential import make_editor
from tests.test_main import run_main
from tests.test_sequential_run import edited, stream_args, stream_inputs  # noqa: F401

F, D, N = 10, 6, 3
ALPHAEDIT = ds.AlphaEditHParams(l2=1.0, dtype="float64")


def hand_projector(kernel: np.ndarray, eta: float, alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """(P⊥, U) in float64: unit columns, C = ŴŴᵀ/D, the fewest top eigenvectors reaching η."""
    unit = kernel / np.linalg.norm(kernel, axis=0)
    lam, vec = np.linalg.eigh(unit @ unit.T / kernel.shape[1])
    lam, vec = lam[::-1], vec[:, ::-1]
    r = 0
    while lam[:r].sum() < eta * lam.sum():
        r += 1
    u = vec[:, :r]
    return np.eye(len(kernel)) - alpha * u @ u.T, u


def problem(seed: int = 0):
    """A kernel W [F, D], AlphaEdit's P of a rank-deficient key moment, keys and residuals."""
    rng = np.random.default_rng(seed)
    k0 = rng.standard_normal((F - 3, F))
    lam, vec = np.linalg.eigh(k0.T @ k0)
    null = vec[:, lam < 1e-8 * lam.max()]
    return (rng.standard_normal((F, D)), null @ null.T, rng.standard_normal((N, F)),
            rng.standard_normal((N, D)))


def run_both(eta: float, alpha: float, kernels: list[np.ndarray], seed: int = 0):
    """Per update: (SPHERE's ΔW, AlphaEdit's ΔW) from the same carried key cache, SPHERE's
    final state; one batch per kernel, all in float64."""
    _, p, keys, resid = problem(seed)
    solver = ds.sphere(ds.alphaedit(ALPHAEDIT), ds.SphereHParams(cumulative_ratio=eta,
                                                                 suppression=alpha))
    pairs = []
    with jax.enable_x64(True):
        state, base = solver.init(F, D, jnp.float64), ds.alphaedit_init(F, jnp.float64)
        for kernel in kernels:
            delta, state, report = solver.update(jnp.asarray(p), jnp.asarray(keys),
                                                 jnp.asarray(resid), state,
                                                 kernel=jnp.asarray(kernel))
            plain, base, _ = ds.alphaedit_update(jnp.asarray(p), jnp.asarray(keys),
                                                 jnp.asarray(resid), base, ALPHAEDIT)
            assert bool(report.finite)
            pairs.append((np.asarray(delta), np.asarray(plain)))
    return pairs, state


@pytest.mark.parametrize(("eta", "alpha"), [(0.5, 0.5), (0.9, 1.0), (0.3, 0.8)])
def test_projector_is_the_hand_built_one(eta, alpha):
    kernel = problem()[0]
    want, u = hand_projector(kernel, eta, alpha)
    with jax.enable_x64(True):
        got = np.asarray(ds.sparse_projector(jnp.asarray(kernel),
                                             ds.SphereHParams(cumulative_ratio=eta,
                                                              suppression=alpha)))
    np.testing.assert_allclose(got, want, atol=1e-10)
    assert 0 < u.shape[1] < F
    if alpha == 1.0:  # hard: the orthogonal projector onto U's complement
        np.testing.assert_allclose(got @ got, got, atol=1e-10)
        np.testing.assert_allclose(got @ u, 0, atol=1e-10)


@pytest.mark.parametrize(("eta", "diagonal"), [
    (0.5, (0.6, 1, 1)), (0.75, (0.6, 1, 1)), (0.8, (0.6, 0.6, 1)), (0.0, (1, 1, 1))])
def test_a_kernel_read_by_eye(eta, diagonal):
    """Neurons e₁, 2e₁, 5e₁, 3e₂ (norms do not count): C = diag(3/4, 1/4, 0), so η up to 3/4
    keeps e₁ alone off the update, beyond it e₁ and e₂; α = 0.4."""
    kernel = np.array([[1.0, 2.0, 5.0, 0.0], [0.0, 0.0, 0.0, 3.0], [0.0, 0.0, 0.0, 0.0]])
    hparams = ds.SphereHParams(cumulative_ratio=eta, suppression=0.4)
    np.testing.assert_allclose(ds.sparse_projector(jnp.asarray(kernel, jnp.float32), hparams),
                               np.diag(diagonal), atol=1e-6)
    with_zero_neuron = np.concatenate([kernel, np.zeros((3, 1))], axis=1)
    if eta == 0.5:  # a zero neuron has no direction: the principal one is still e₁
        np.testing.assert_allclose(ds.sparse_projector(jnp.asarray(with_zero_neuron,
                                                                   jnp.float32), hparams),
                                   np.diag(diagonal), atol=1e-6)


@pytest.mark.parametrize(("eta", "alpha"), [(0.0, 0.5), (0.5, 0.0)])
def test_switched_off_it_is_alphaedit(eta, alpha):
    kernel = problem()[0]
    pairs, state = run_both(eta, alpha, [kernel, kernel + 1])
    for delta, plain in pairs:
        np.testing.assert_array_equal(delta, plain)
    assert bool(state.ready)


@pytest.mark.parametrize("alpha", [1.0, 0.3])
def test_the_update_loses_its_principal_component_only(alpha):
    """Uᵀ ΔW_SPHERE = (1 − α) Uᵀ ΔW_AlphaEdit, and the component off U is AlphaEdit's."""
    kernel = problem()[0]
    (delta, plain), = run_both(0.5, alpha, [kernel])[0]
    _, u = hand_projector(kernel, 0.5, alpha)
    np.testing.assert_allclose(u.T @ delta, (1 - alpha) * (u.T @ plain), atol=1e-10)
    off = np.eye(F) - u @ u.T
    np.testing.assert_allclose(off @ delta, off @ plain, atol=1e-10)
    assert np.abs(u.T @ plain).max() > 1e-3  # AlphaEdit's update does lie partly along U


def test_principal_directions_come_from_the_first_kernel_only():
    """The stream's first update sees the pretrained kernel; later, edited kernels are not
    read again: the second ΔW is P⊥(W₀) times AlphaEdit's."""
    w0 = problem()[0]
    w1 = w0 + np.random.default_rng(1).standard_normal(w0.shape)
    pairs, state = run_both(0.5, 0.5, [w0, w1])
    want = hand_projector(w0, 0.5, 0.5)[0]
    np.testing.assert_allclose(np.asarray(state.projector), want, atol=1e-10)
    np.testing.assert_allclose(pairs[1][0], want @ pairs[1][1], atol=1e-10)


def test_bad_settings_and_a_missing_kernel_are_refused():
    with pytest.raises(ValueError, match="--sphere_cumulative_ratio"):
        ds.SphereHParams(cumulative_ratio=1.0)
    with pytest.raises(ValueError, match="--sphere_suppression"):
        SequentialFlags(sphere_suppression=1.5)
    kernel, p, keys, resid = problem()
    solver = ds.sphere(ds.alphaedit(ds.AlphaEditHParams(l2=1.0)), ds.SphereHParams())
    with pytest.raises(ValueError, match="kernel"):
        solver.update(jnp.asarray(p, jnp.float32), jnp.asarray(keys, jnp.float32),
                      jnp.asarray(resid, jnp.float32), solver.init(F, D))


def test_the_editor_is_alphaedits_projected_and_refines_no_targets():
    seq = SequentialFlags(sphere_cumulative_ratio=0.3, sphere_suppression=0.9)
    editor = make_editor("sphere", StructuredFlags(alphaedit_l2=2.0), seq)
    assert (editor.solver.name, editor.stats_kind, editor.metake) == ("sphere", "projector",
                                                                      None)
    assert editor.hparams.l2 == 2.0 and make_editor("alphaedit", StructuredFlags(),
                                                    seq).metake is None


@pytest.mark.slow
def test_the_command_line_streams_and_resumes(stream_inputs, tmp_path):  # noqa: F811
    """Two batches through `--method=sphere`, then the same command again: it restores the
    finished stream's checkpoint (SphereState included) and ends with the same weights."""
    out = tmp_path / "out"
    args = [a for a in stream_args(stream_inputs, out, "--num_edits=4", "--alphaedit_l2=1")
            if not a.startswith("--method")]
    first = run_main("--method=sphere", *args, cache=stream_inputs["cache"])
    assert first.returncode == 0, first.stderr
    results = json.loads((out / "results.json").read_text())
    assert [p["edits"] for p in results["curve"]] == [0, 4]
    weights = edited(out)
    again = run_main("--method=sphere", "--overwrite", *args, cache=stream_inputs["cache"])
    assert again.returncode == 0, again.stderr
    assert "resuming sphere at batch 2/2" in again.stderr
    for name, value in edited(out).items():
        np.testing.assert_array_equal(value, weights[name])
