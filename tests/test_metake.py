"""MetaKE (docs/references.md: metake §8) on the tiny Llama: T = 0 is AlphaEdit; jax.grad of
the virtual look-ahead objective is exactly the Structural Gradient Proxy
Xᵀ·(∂L/∂W_L) + 2(V − V⁽⁰⁾); stop-grad feedback leaves the targets where they were; the exact
hypergradient through the multi-layer realization is a descent direction that the proxy
points along."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from keedit_jax import downstream, testing
from keedit_jax.methods import metake
from keedit_jax.methods.structured import StructuredConfig, batch_readout, edit_requests
from keedit_jax.models import down_proj_path, get_path
from keedit_jax.upstream import encode_requests, optimise_shifts
from tests.test_structured import REQUESTS, TARGET

LAYERS = (0, 1)
HP = downstream.AlphaEditHParams(l2=1.0)


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_tokenizer_dir):
    model = testing.cached_model(tiny_checkpoint("llama"))
    cfg = model.config
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(cfg.d_ff, cfg.d_ff // 3)))
    projector = jnp.asarray(np.eye(cfg.d_ff) - basis @ basis.T, jnp.float32)
    stats = {layer: projector for layer in LAYERS}
    states = downstream.init_states(downstream.alphaedit(HP), LAYERS, cfg.d_ff, cfg.d_model)
    return model.params, cfg, AutoTokenizer.from_pretrained(tiny_tokenizer_dir), stats, states


def edit(setup, config: metake.MetaKEConfig | None):
    params, cfg, tok, stats, states = setup
    structured = StructuredConfig(layers=LAYERS, solver="alphaedit", target=TARGET, alphaedit=HP)
    refine = None if config is None else metake.metake_refiner(config, cfg, TARGET, stats,
                                                               LAYERS, HP)
    return edit_requests(params, cfg, tok, REQUESTS, ("{}",), stats, states, structured,
                         refine=refine)


def lookahead_inputs(setup):
    """V⁽⁰⁾, the batch's Lookahead, the layer-L readout and the frozen gate."""
    params, cfg, tok, stats, states = setup
    encoded = encode_requests(tok, REQUESTS, ("{}",), TARGET)
    v0 = optimise_shifts(params, cfg, encoded.batch, TARGET).targets[:, 0]
    look = metake.prepare_lookahead(params, cfg, encoded.batch, TARGET)
    readout = batch_readout(cfg, tok, REQUESTS, ("{}",), TARGET.fact_token, LAYERS[-1])
    sites = readout(params, LAYERS[-1])
    gate = metake.structural_gate(stats[1], sites.keys, states[1], HP)
    return v0, look, readout, sites, gate


def test_zero_steps_is_alphaedit(setup):
    plain, _, _ = edit(setup, None)
    meta, _, diag = edit(setup, metake.MetaKEConfig(steps=0))
    path = down_proj_path(setup[1])
    np.testing.assert_allclose(get_path(meta, path), get_path(plain, path), atol=1e-6, rtol=0)
    assert diag["refined"]["objective"] == []


def test_autograd_of_the_lookahead_objective_is_the_structural_gradient_proxy(setup):
    params, cfg, *_ = setup
    v0, look, _, sites, gate = lookahead_inputs(setup)
    v = v0 + 0.1 * jax.random.normal(jax.random.key(1), v0.shape)
    auto = jax.grad(metake.lookahead_objective)(v, v0, sites.outputs, gate, params, cfg, look)
    virtual_kernel = gate @ (v - sites.outputs)

    def task_loss(delta):  # L_edit + L_loc as a function of layer L's kernel change
        return metake.outer_losses(metake.with_virtual_update(params, cfg, 1, delta), cfg, look)

    task_signal = jax.grad(task_loss)(virtual_kernel)  # ∂L/∂W_L at W_L + ΔŴ  [F, D]
    proxy = gate.T @ task_signal + 2 * (v - v0)
    np.testing.assert_allclose(auto, proxy, rtol=1e-5, atol=1e-6)
    assert float(jnp.linalg.norm(gate.T @ task_signal)) > 1e-3  # the feedback is not vacuous
    np.testing.assert_allclose(gate, setup[3][1] @ gate, atol=1e-5)  # G_L P_L = G_L


def test_stop_grad_feedback_leaves_the_targets_unchanged(setup):
    params, cfg, *_ = setup
    v0, look, _, sites, gate = lookahead_inputs(setup)
    v, _ = metake.descend_lookahead(v0, sites.outputs, gate, params, cfg, look, 0.5, 5,
                                    stop_grad=True)
    np.testing.assert_array_equal(v, v0)
    moved, values = metake.descend_lookahead(v0, sites.outputs, gate, params, cfg, look, 0.05, 5)
    assert float(jnp.abs(moved - v0).max()) > 1e-4
    assert values[-1] < values[0]  # gradient descent decreases F_VL


def test_exact_hypergradient_is_a_descent_direction_the_proxy_agrees_with(setup):
    """Through the full two-layer realization (keys recomputed after layer 0): a small step
    along −g lowers F, and the proxy's cosine with g is positive (metake Theorem 2)."""
    params, cfg, _, stats, states = setup
    v0, look, readout, sites, gate = lookahead_inputs(setup)

    def realization(v):
        return metake.realize(v, params, cfg, readout, stats, states, LAYERS, HP)

    def exact(v):
        return metake.exact_objective(v, v0, params, cfg, look, realization)

    value, g = jax.value_and_grad(exact)(v0)
    proxy = jax.grad(metake.lookahead_objective)(v0, v0, sites.outputs, gate, params, cfg, look)
    cosine = float(jnp.vdot(g, proxy) / (jnp.linalg.norm(g) * jnp.linalg.norm(proxy)))
    assert cosine > 0.1
    step = 1e-2 / float(jnp.linalg.norm(g))
    assert float(exact(v0 - step * g)) < float(value)
    assert float(exact(v0 - step * proxy / jnp.linalg.norm(proxy) * jnp.linalg.norm(g))) < float(
        value)


def test_exact_feedback_descends_the_exact_objective(setup):
    """--metake_feedback=exact: T compiled steps on F itself, which decreases."""
    params, cfg, _, stats, states = setup
    v0, look, readout, *_ = lookahead_inputs(setup)
    config = metake.MetaKEConfig(steps=3, meta_lr=0.05, feedback="exact")
    v, info = metake.refine_targets(v0, params, cfg, look, readout, stats, states, LAYERS, HP,
                                    config)
    assert len(info["objective"]) == 3 and info["objective"][-1] < info["objective"][0]
    assert float(jnp.abs(v - v0).max()) > 1e-5


@pytest.mark.parametrize("feedback", ["proxy", "stop_grad"])
def test_the_target_move_is_reported_per_request_as_a_share_of_delta(setup, feedback):
    """‖V − V⁽⁰⁾‖ / ‖V⁽⁰⁾ − H‖ by hand; 0 where stop-grad leaves V at V⁽⁰⁾; in each request's
    diagnostics row and the batch summary."""
    from keedit_jax.methods.run_structured import diagnostics_summary

    config = metake.MetaKEConfig(steps=3, meta_lr=0.05, feedback=feedback)
    params, cfg, _, stats, states = setup
    v0, look, readout, sites, _ = lookahead_inputs(setup)
    v, info = metake.refine_targets(v0, params, cfg, look, readout, stats, states, LAYERS, HP,
                                    config)
    by_hand = (np.linalg.norm(np.asarray(v - v0), axis=-1)
               / np.linalg.norm(np.asarray(v0 - sites.outputs), axis=-1))
    np.testing.assert_allclose(info["moved"], by_hand, rtol=1e-5, atol=1e-7)
    assert (max(info["moved"]) == 0) == (feedback == "stop_grad")
    _, _, diag = edit(setup, config)
    rows = diag["requests"]
    assert [r["target_moved"] for r in rows] == diag["refined"]["moved"]
    assert diagnostics_summary(rows)["target_moved"] == pytest.approx(np.mean(by_hand), 1e-4)
