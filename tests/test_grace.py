"""GRACE against truths it must satisfy: the codebook lookup is the nearest used key by
Euclidean distance, hit within its (closed) radius (numpy, hand cases); a query outside every
radius leaves the logits exactly the unedited model's (deferral); inside one, the MLP output
is exactly the stored value and nothing else moves; the add / expand / split / overwrite rules
on hand cases; after an edit the target is the model's prediction."""

from __future__ import annotations

import dataclasses
import json
import pathlib
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keedit_jax.data import Request
from keedit_jax.eval.structured import model_score_fn
from keedit_jax.intervene import Taps, run, with_codebook
from keedit_jax.methods.grace import (
    Entries,
    GraceConfig,
    apply_placement,
    grace_requests,
    maintain_batch,
    place,
    to_device,
)
from keedit_jax.models import GenerationConfig, generate
from keedit_jax.models.layers import Codebook, codebook_lookup
from keedit_jax.testing import left_padded_batch
from keedit_jax.upstream import TargetConfig

LAYER = 1


def _book(keys, radii, used, values=None, labels=None, layer=LAYER) -> Codebook:
    keys = np.asarray(keys, np.float32)
    n = keys.shape[0]
    return Codebook(keys=jnp.asarray(keys),
                    values=jnp.asarray(np.zeros((n, 1)) if values is None else values,
                                       jnp.float32),
                    radii=jnp.asarray(radii, jnp.float32), used=jnp.asarray(used),
                    labels=jnp.asarray(np.zeros(n) if labels is None else labels, jnp.int32),
                    layer=layer)


def test_lookup_is_the_nearest_used_key_hit_within_its_radius():
    book = _book([[0, 0], [3, 0], [0, 4], [1, 1]], [1.0, 2.0, 0.5, 10.0],
                 [True, True, True, False])
    queries = np.array([[0.5, 0], [2.5, 0], [0, 3], [1, 1], [0, 1], [9, 9]], np.float32)
    # by hand: (nearest used key, within its radius?); the unused [1, 1] of radius 10 is
    # never chosen; [0, 1] lies on key 0's sphere, which the closed ball holds
    expected = [(0, True), (1, True), (2, False), (0, False), (0, True), (2, False)]
    nearest, hit = codebook_lookup(book, jnp.asarray(queries)[None])
    assert list(zip(np.asarray(nearest)[0].tolist(), np.asarray(hit)[0].tolist(),
                    strict=True)) == expected
    distances = np.linalg.norm(queries[:, None] - np.asarray(book.keys)[None], axis=-1)
    distances[:, 3] = np.inf
    np.testing.assert_array_equal(np.asarray(nearest)[0], distances.argmin(1))


# One compiled program per tree structure serves both seam tests (same shapes).
TAPS = Taps(block_out=(LAYER - 1, LAYER), attn_out=(LAYER,), mlp_key=(LAYER,), logits=True)


@partial(jax.jit, static_argnames=("cfg",))
def _captures(params, cfg, tokens, mask):
    return run(params, cfg, tokens=tokens, attention_mask=mask, taps=TAPS)[1]


def _setup(model, rng):
    """A batch, its captures under the unedited model, and 4 keys far from every position."""
    tokens, mask, _ = left_padded_batch((5, 8), seed=1)
    tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
    plain = _captures(model.params, model.config, tokens, mask)
    keys = np.asarray(plain.mlp_key[LAYER]).reshape(-1, model.config.d_ff)[:4] + 100.0
    values = rng.normal(size=(4, model.config.d_model)).astype(np.float32)
    return tokens, mask, plain, keys, values


def test_deferral_leaves_the_logits_exactly_the_unedited_models(model):
    """Every key 100·√F away: each position defers. Compiled, as every evaluation path runs
    (eager op-by-op execution rounds differently from a fused loop)."""
    tokens, mask, plain, keys, values = _setup(model, np.random.default_rng(0))
    edited = with_codebook(model.params, _book(keys, np.ones(4), np.ones(4, bool), values))
    routed = _captures(edited, model.config, tokens, mask)
    np.testing.assert_array_equal(routed.logits, plain.logits)


def test_inside_a_radius_the_mlp_output_is_exactly_the_stored_value(model):
    tokens, mask, plain, keys, values = _setup(model, np.random.default_rng(1))
    keys[2] = np.asarray(plain.mlp_key[LAYER])[1, -1]  # row 1's last token, inside 0.5
    book = _book(keys, [1.0, 1.0, 0.5, 1.0], np.ones(4, bool), values)
    routed = _captures(with_codebook(model.params, book), model.config, tokens, mask)
    # a Llama block: h + attn_out, then + the MLP output, here the value
    residual = np.asarray(routed.block_out[LAYER - 1] + routed.attn_out[LAYER])
    np.testing.assert_array_equal(np.asarray(routed.block_out[LAYER])[1, -1],
                                  residual[1, -1] + values[2])
    hit = np.zeros(tokens.shape, bool)
    hit[1, -1] = True
    np.testing.assert_array_equal(np.asarray(routed.block_out[LAYER])[~hit],
                                  np.asarray(plain.block_out[LAYER])[~hit])
    # causal: the positions before the routed one see nothing of it
    np.testing.assert_array_equal(routed.logits[1, :-1], plain.logits[1, :-1])
    assert not np.allclose(routed.logits[1, -1], plain.logits[1, -1])


def _entries(keys, radii, labels) -> Entries:
    keys = np.asarray(keys, np.float64)
    n = keys.shape[0]
    return Entries(keys=keys, values=np.zeros((n, 1)), radii=np.asarray(radii, np.float64),
                   used=np.ones(n, bool), labels=np.asarray(labels, np.int32))


@pytest.mark.parametrize("query, label, op, slot, radius, nearest_radius", [
    ([10.0, 0.0], 7, "add", 2, 1.0, 1.0),  # d = 10 > ε* + ε_init = 2: a new key
    ([1.5, 0.0], 7, "expand", 0, 1.5, 1.5),  # same label, d = 1.5 in reach: ε* grows to d
    ([0.5, 0.0], 7, "expand", 0, 1.0, 1.0),  # same label, already inside: ε* kept
    ([1.6, 0.0], 8, "split", 2, 0.8, 0.8),  # another label at d = 1.6: both radii d/2
    ([0.4, 0.0], 8, "split", 2, 0.2, 0.2),
    ([0.0, 0.0], 8, "overwrite", 0, 1.0, 1.0),  # the same key with a new label
])
def test_codebook_maintenance_rules_on_hand_cases(query, label, op, slot, radius,
                                                  nearest_radius):
    entries = _entries([[0, 0], [0, 30]], [1.0, 1.0], [7, 9])
    entries = Entries(*(np.concatenate([a, np.zeros_like(a[:1])]) for a in entries))
    entries.used[2] = False  # one free slot
    got = place(entries, np.asarray(query), label, epsilon=1.0)
    assert (got.op, got.slot, got.nearest) == (op, slot, 0)
    assert (got.radius, got.nearest_radius) == pytest.approx((radius, nearest_radius))
    apply_placement(entries, got, np.asarray(query), np.array([5.0]), label)
    assert entries.labels[slot] == label and entries.used[slot]
    nearest, hit = codebook_lookup(to_device(entries, LAYER),
                                   jnp.asarray([[query, [0.0, 0.0]]], jnp.float32))
    # the edit's input now routes to its entry; a split leaves the old key routed to its own
    assert np.asarray(nearest)[0].tolist() == [slot, 0]
    assert np.asarray(hit)[0].tolist() == [True, op != "split" or nearest_radius > 0]


def test_a_split_never_grows_the_old_ball_and_a_batch_sees_its_own_edits():
    small = _entries([[0, 0]], [0.1], [7])
    got = place(small, np.array([1.0, 0.0]), 8, epsilon=1.0)  # d = 1 ≤ 0.1 + 1: in reach
    assert (got.op, got.nearest_radius, got.radius) == ("split", pytest.approx(0.1),
                                                        pytest.approx(0.5))
    # 16 slots full: the batch grows the codebook; its second edit expands its first's entry
    full = _entries(np.arange(16)[:, None] * [100.0, 0.0], np.ones(16), np.arange(16))
    queries = np.array([[0.0, 50.0], [0.0, 51.5]])
    out, placements = maintain_batch(full, queries, np.ones((2, 1)), [3, 3], epsilon=1.0)
    assert out.used.shape == (32,) and out.used.sum() == 17 and full.used.shape == (16,)
    assert [p.op for p in placements] == ["add", "expand"]
    assert placements[1].slot == placements[0].slot == 16
    assert out.radii[16] == pytest.approx(1.5)


def test_after_an_edit_the_target_is_predicted_and_no_weight_moves(model, tok):
    requests = [Request(case_id="a", prompt="{} was born in", subject="Alice",
                        target_new="and", target_true="the"),
                Request(case_id="b", prompt="{} plays the", subject="Bob", target_new="of",
                        target_true="is")]
    target = TargetConfig(layer=LAYER, v_loss_layer=model.config.n_layers - 1,
                          fact_token="last")
    config = GraceConfig(layers=(LAYER,), target=target, lr=300.0, steps=30)
    edited, rows = grace_requests(model.params, model.config, tok, requests, config)
    assert [r["op"] for r in rows] == ["add", "add"]
    pairs = [(r.prompt.format(r.subject), " " + r.target_new) for r in requests]
    before = model_score_fn(model.params, model.config, tok)(pairs)
    after = model_score_fn(edited, model.config, tok)(pairs)
    assert [len(s.target_ids) for s in after] == [1, 1]  # one token each: the whole target
    assert not any(s.correct.all() for s in before)
    assert all(s.correct.all() for s in after), [r["loss_last"] for r in rows]
    np.testing.assert_allclose([np.exp(s.logprobs.sum()) for s in after],
                               [r["target_prob_edited"] for r in rows], rtol=1e-4)
    prompt = tok(pairs[0][0])["input_ids"]
    generated = generate(edited, model.config, [prompt], GenerationConfig(max_new_tokens=1))
    assert generated == [after[0].target_ids.tolist()]  # generation routes through it too
    assert edited.keys() - model.params.keys() == {"grace_codebook"}
    assert all(edited[k] is model.params[k] for k in model.params)
    with pytest.raises(ValueError, match="--layers: GRACE adapts exactly one layer"):
        dataclasses.replace(config, layers=(0, 1))
    with pytest.raises(ValueError, match="--fact_token=subject_last"):
        dataclasses.replace(config, target=dataclasses.replace(target,
                                                               fact_token="subject_last"))


@pytest.mark.slow
def test_the_flagfile_runs_on_the_organism(tmp_path):
    """configs/grace.cfg through the command line: every edit lands, no weight moves."""
    root = pathlib.Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "keedit_jax.main",
                             "--flagfile=configs/grace.cfg", "--num_edits=4",
                             "--edit_batch_size=2", "--max_new_tokens=2",
                             f"--output_dir={tmp_path}"], cwd=root, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["post"]["rewrite_success"][0] == 100
    assert {r["op"] for r in results["diagnostics"]["requests"]} == {"add"}
    assert results["diagnostics"]["summary"]["weight_change"] == 0


def test_the_edited_layers_file_holds_the_codebook_that_is_the_edit(model, tmp_path):
    from safetensors import safe_open

    from keedit_jax.methods.run_structured import save_edited_layers
    from keedit_jax.models.params import down_proj_path, get_path

    keys, values = np.eye(4, model.config.d_ff), np.full((4, model.config.d_model), 0.5)
    book = _book(keys, np.arange(4.0), np.array([True, True, False, True]), values)
    path = down_proj_path(model.config)
    file = save_edited_layers(tmp_path / "edited.safetensors", with_codebook(model.params, book),
                              path, (LAYER,))
    with safe_open(file, "np") as saved:
        assert saved.metadata()["grace_layer"] == str(LAYER)
        for name in ("keys", "values", "radii", "used", "labels"):
            np.testing.assert_array_equal(saved.get_tensor(f"grace_{name}"),
                                          np.asarray(getattr(book, name)))
        np.testing.assert_array_equal(saved.get_tensor(f"layer_{LAYER}"),  # unchanged kernel
                                      np.asarray(get_path(model.params, path)[LAYER]))
