"""FT-L and FT-M against losses computed from the plain forward's full logits: FT-M's loss
is the teacher-forced NLL of the target tokens alone (the prompt masked), FT-L's every target
token at the prompt's last position; Adam's first step is −lr·sign of that loss's gradient;
the L∞ bound holds and no other weight moves."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keedit_jax.data import Request
from keedit_jax.intervene import forward
from keedit_jax.methods.finetune import FinetuneConfig, finetune, finetune_requests
from keedit_jax.models.params import down_proj_path, get_path, set_path
from keedit_jax.upstream import TargetConfig
from keedit_jax.upstream.encode import encode_ids, encode_requests, target_ids

REQUESTS = [Request(case_id=f"r{i}", prompt=p, subject=s, target_new=t, target_true=tt)
            for i, (p, s, t, tt) in enumerate([("{} was born in", "Alice", "Paris city", "Rome"),
                                               ("{} plays the", "Bob", "grand piano", "guitar")])]


def _config(model, objective, **kwargs):
    target = TargetConfig(layer=1, v_loss_layer=model.config.n_layers - 1, fact_token="last")
    return FinetuneConfig(layers=(0, 1), target=target, objective=objective, **kwargs)


def _reference_losses(params, cfg, tok, target, objective):
    """Per request, from the full logits of prompt ⊕ target (no padding, no read positions)."""
    out = []
    for request in REQUESTS:
        prompt = encode_ids(tok, request.prompt.format(request.subject))
        ys = target_ids(tok, request, target)
        ids = jnp.asarray([prompt + ys])
        logp = jax.nn.log_softmax(forward(params, cfg, ids, jnp.ones_like(ids)), -1)[0]
        at = [len(prompt) - 1] * len(ys) if objective == "prompt_last" else [
            len(prompt) - 1 + u for u in range(len(ys))]
        out.append(-jnp.mean(logp[jnp.asarray(at), jnp.asarray(ys)]))
    return jnp.stack(out)


@pytest.mark.parametrize("objective", [
    "target_new", pytest.param("prompt_last", marks=pytest.mark.slow)])
def test_the_first_loss_and_adams_first_step_match_the_full_logits(model, tok, objective):
    config = _config(model, objective, steps=1, lr=1e-3, norm_constraint=0.0)
    batch = encode_requests(tok, REQUESTS, ("{}",), config.target).batch
    result = finetune(model.params, model.config, batch, config)
    truth = _reference_losses(model.params, model.config, tok, config.target, objective)
    np.testing.assert_allclose(result.loss_first, truth, rtol=1e-5)
    other = _reference_losses(model.params, model.config, tok, config.target,
                              {"target_new": "prompt_last", "prompt_last": "target_new"}[objective])
    assert not np.allclose(other, truth, rtol=1e-2)  # the two objectives are told apart

    path = down_proj_path(model.config)
    stack = get_path(model.params, path)

    def mean_loss(w):
        tuned = set_path(model.params, path, stack.at[jnp.asarray([0, 1])].set(w))
        return _reference_losses(tuned, model.config, tok, config.target, objective).mean()

    grad = jax.grad(mean_loss)(stack[:2])
    step = np.asarray(result.kernels - stack[:2])
    big = np.abs(np.asarray(grad)) > 1e-4  # Adam's first step: lr·g/(|g| + 1e-8) ≈ lr·sign(g)
    np.testing.assert_allclose(step[big], -1e-3 * np.sign(np.asarray(grad))[big], rtol=1e-3)


def test_prompt_tokens_are_masked_out_of_the_target_new_loss(model, tok):
    """Changing what a prompt position's label would be changes nothing: only target slots
    carry weight."""
    config = _config(model, "target_new", steps=1, lr=1e-3, norm_constraint=0.0)  # compiled
    batch = encode_requests(tok, REQUESTS, ("{}",), config.target).batch
    labels = np.asarray(batch.labels).copy()
    weights = np.asarray(batch.weights)
    labels[weights == 0] = 3  # every non-target position
    relabelled = dataclasses.replace(batch, labels=labels)
    a = finetune(model.params, model.config, batch, config)
    b = finetune(model.params, model.config, relabelled, config)
    np.testing.assert_array_equal(a.loss_first, b.loss_first)


def test_the_bound_holds_and_only_the_fine_tuned_layers_move(model, tok):
    epsilon = 1e-3
    config = _config(model, "target_new", steps=10, lr=1e-2, norm_constraint=epsilon)
    edited, rows = finetune_requests(model.params, model.config, tok, REQUESTS, config)
    path = down_proj_path(model.config)
    before, after = (np.asarray(get_path(p, path)) for p in (model.params, edited))
    assert np.abs(after[:2] - before[:2]).max() <= epsilon * (1 + 1e-5)
    assert np.abs(after[:2] - before[:2]).max() >= 0.99 * epsilon  # the bound is active
    np.testing.assert_array_equal(after[2:], before[2:])
    others = jax.tree.leaves(jax.tree.map(
        lambda x, y: bool(np.array_equal(x, y)), model.params["model"]["layers"]["self_attn"],
        edited["model"]["layers"]["self_attn"]))
    assert all(others)
    for row in rows:
        assert row["loss_last"] < row["loss_first"], row
        assert row["target_prob_edited"] > row["target_prob_first"], row
        assert row["weight_change"] == pytest.approx(epsilon, rel=1e-2)
