"""MEMIT/AlphaEdit composed from targets, keys and the closed form (anchors §1, §4).

Truth: with one context template and λ -> 0, MEMIT's update is the minimum-norm solution of
K ΔW = R, so after all layers the last edited layer's output at each lookup token must equal
the optimised target z exactly (up to float32); AlphaEdit must leave preserved keys' outputs
unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from keedit_jax import downstream, testing
from keedit_jax.data import Request
from keedit_jax.methods.structured import (
    StructuredConfig,
    edit_requests,
    lookup_rows,
    read_sites,
    template_weights,
)
from keedit_jax.models import down_proj_path, get_path
from keedit_jax.upstream import TargetConfig, compute_targets

REQUESTS = [Request(case_id=f"r{i}", prompt=p, subject=s, target_new=t, target_true=tt)
            for i, (p, s, t, tt) in enumerate([("{} was born in", "Alice", "Paris", "Rome"),
                                               ("{} plays the", "Bob", "piano", "guitar")])]
TARGET = TargetConfig(layer=1, v_loss_layer=2, v_lr=0.5, v_num_grad_steps=8,
                      clamp_norm_factor=4.0, fact_token="subject_last")


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_tokenizer_dir):
    model = testing.cached_model(tiny_checkpoint("llama"))
    return model.params, model.config, AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def test_template_weights_average_groups_then_groups():
    np.testing.assert_allclose(template_weights(1), [1.0])
    np.testing.assert_allclose(template_weights(6), [0.5] + [0.1] * 5)


def test_memit_reaches_the_targets_exactly_with_one_template(setup):
    params, cfg, tok = setup
    # λ -> 0 leaves a rank-2 Gram plus a tiny ridge: solvable only in float64.
    config = StructuredConfig(layers=(0, 1), solver="memit", target=TARGET,
                              memit=downstream.MemitHParams(mom2_update_weight=1e-9,
                                                            dtype="float64"))
    stats = {layer: jnp.eye(cfg.d_ff) for layer in config.layers}
    states = downstream.init_states(config.make_solver(), config.layers, cfg.d_ff, cfg.d_model)
    z = compute_targets(params, cfg, tok, REQUESTS, ("{}",), TARGET).targets[:, 0]
    with jax.enable_x64(True):
        edited, _, diag = edit_requests(params, cfg, tok, REQUESTS, ("{}",), stats, states,
                                        config)
    rows = lookup_rows(tok, REQUESTS, ("{}",), "subject_last", 0)
    before = read_sites(params, cfg, rows.tokens, rows.mask, 1, 1, rows.lookup)[1]
    after = read_sites(edited, cfg, rows.tokens, rows.mask, 1, 1, rows.lookup)[1]
    gap = float(jnp.linalg.norm(after - z) / jnp.linalg.norm(before - z))
    assert gap < 1e-3, f"edited output misses z: relative gap {gap}"
    kernel_before, kernel_after = (get_path(p, down_proj_path(cfg)) for p in (params, edited))
    np.testing.assert_array_equal(kernel_before[2], kernel_after[2])  # layer 2 not edited
    assert all(r < 1e-4 for r in diag["relative_residual"].values())
    for row in diag["requests"]:  # the solve wrote all of δ, and the edit alone raises p
        assert abs(row["realised"] - 1) < 1e-3, row
        assert row["target_prob_edited"] > row["target_prob_first"], row


def test_diagnostics_tell_a_solve_that_wrote_nothing(setup):
    """λ = 1e12 makes ΔW ~ 0: the optimisation reached its target, the edit did not."""
    params, cfg, tok = setup
    config = StructuredConfig(layers=(0, 1), solver="memit", target=TARGET,
                              memit=downstream.MemitHParams(mom2_update_weight=1e12))
    stats = {layer: jnp.eye(cfg.d_ff) for layer in config.layers}
    states = downstream.init_states(config.make_solver(), config.layers, cfg.d_ff, cfg.d_model)
    _, _, diag = edit_requests(params, cfg, tok, REQUESTS, ("{}",), stats, states, config)
    for row in diag["requests"]:
        assert row["target_prob_last"] > row["target_prob_first"], row
        assert abs(row["realised"]) < 1e-3, row
        assert row["target_prob_edited"] == pytest.approx(row["target_prob_first"], rel=1e-3)
        assert row["delta_norm"] <= row["clamp_radius"] * (1 + 1e-5)


def test_alphaedit_leaves_preserved_keys_unchanged(setup):
    params, cfg, tok = setup
    rng = np.random.default_rng(0)
    preserved = rng.normal(size=(cfg.d_ff // 2, cfg.d_ff)).astype(np.float32)  # K0 rows
    basis, _ = np.linalg.qr(preserved.T)  # range of K0ᵀ
    projector = jnp.asarray(np.eye(cfg.d_ff) - basis @ basis.T, jnp.float32)  # P K0ᵀ = 0
    config = StructuredConfig(layers=(0, 1), solver="alphaedit", target=TARGET)
    states = downstream.init_states(config.make_solver(), config.layers, cfg.d_ff, cfg.d_model)
    stats = {layer: projector for layer in config.layers}
    edited, _, _ = edit_requests(params, cfg, tok, REQUESTS, ("{}",), stats, states, config)
    path = down_proj_path(cfg)
    for layer in config.layers:
        delta = get_path(edited, path)[layer] - get_path(params, path)[layer]
        assert float(jnp.abs(delta).max()) > 1e-4, f"layer {layer} was not edited"
        leak = float(jnp.abs(jnp.asarray(preserved) @ delta).max())
        assert leak < 1e-4, f"layer {layer}: preserved keys' outputs moved by {leak}"


def test_bad_layers_are_refused(setup):
    params, cfg, tok = setup
    with pytest.raises(ValueError, match="last edited layer"):
        StructuredConfig(layers=(0, 2), solver="memit", target=TARGET)
    bad = StructuredConfig(layers=(1, 7), solver="memit",
                           target=TargetConfig(layer=7, v_loss_layer=7))
    with pytest.raises(IndexError, match="edited layer 7 is out of range"):
        edit_requests(params, cfg, tok, REQUESTS, ("{}",), {}, {}, bad)
