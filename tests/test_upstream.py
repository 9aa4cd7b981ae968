"""The memory-shift loop (MEMIT compute_z) on the tiny llama: optimisation, seam consistency,
clamp, early stop, batching, determinism, errors, NaN reporting and compile-once."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keedit_jax import testing, upstream
from keedit_jax.data import Request
from keedit_jax.intervene import Shift, Taps, run

TEMPLATES = ("{}", "The city. {}", "I think. {}")
# δ at the last prompt token of layer 1 of 3 (v_loss_layer 2 = the last): single-token targets
# are reachable on a random model; clamp 1.0 is active, so both regimes are exercised.
HP = upstream.TargetConfig(layer=1, v_loss_layer=2, fact_token="last", v_lr=1.0,
                           v_weight_decay=1e-3, clamp_norm_factor=1.0, early_stop_loss=0.0)
REQUESTS = (
    Request(case_id="a", prompt="{} is located in", subject="The Eiffel Tower",
            target_new="capital"),
    Request(case_id="b", prompt="The tongue of {} is", subject="Danielle Darrieux",
            target_new="the"),
    Request(case_id="c", prompt="{} was a", subject="Marie Curie", target_new="capital"),
)
OTHER = (
    Request(case_id="d", prompt="{} is in", subject="The Colosseum", target_new="the"),
    Request(case_id="e", prompt="{} won two", subject="Marie Curie", target_new="capital"),
    Request(case_id="f", prompt="The capital of {} is", subject="Japan", target_new="Rome"),
)


@pytest.fixture(scope="module")
def encoded(tok):
    return upstream.encode_requests(tok, REQUESTS, TEMPLATES, HP)


@pytest.fixture(scope="module")
def solved(model, encoded):
    return jax.device_get(upstream.optimise_shifts(model.params, model.config, encoded.batch, HP))


@functools.partial(jax.jit, static_argnames="cfg")
def _replay(params, cfg, batch, targets_epd):
    """Independently of the loop: h at (layer, lookup) of the "{}" row from tokens, then the
    weighted target NLL of a full forward with m* substituted there via a Shift."""
    e, s, t = batch.tokens.shape
    tokens = jnp.reshape(batch.tokens, (e * s, t))
    mask = jnp.reshape(batch.attention_mask, (e * s, t))
    _, caps = run(params, cfg, tokens=tokens, attention_mask=mask, stop=HP.layer + 1,
                  taps=Taps(block_out=(HP.layer,)))
    out = caps.block_out[HP.layer].reshape(e, s, t, -1)[:, 0]
    h = jnp.take_along_axis(out, batch.shift_pos[:, 0, :, None], axis=1)
    shift = Shift(jnp.reshape(batch.shift_pos, (e * s, -1)),
                  jnp.repeat(targets_epd - h, s, axis=0), HP.layer)
    _, caps = run(params, cfg, tokens=tokens, attention_mask=mask, shifts=(shift,),
                  taps=Taps(logits=True))
    logp = jax.nn.log_softmax(caps.logits, -1).reshape(e, s, t, -1)
    picked = jnp.take_along_axis(logp, batch.labels[..., None], -1)[..., 0]
    return h, -(batch.weights * picked).sum((1, 2))


def test_nll_drops_and_targets_reproduce_the_loss_through_the_seam(model, encoded, solved):
    nll = solved.trace.nll
    assert np.all(nll[:, -1] < 0.35 * nll[:, 0]), nll[:, [0, -1]]
    h, replay = _replay(model.params, model.config, encoded.batch, solved.targets)
    np.testing.assert_allclose(solved.h, h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(replay, nll[:, -1], rtol=1e-4, atol=1e-5)
    assert solved.finite.all() and np.all(solved.updates == HP.v_num_grad_steps - 1)


def test_prefix_cached_loss_equals_full_forward_loss(model, encoded, solved):
    full = upstream.evaluate_shift(model.params, model.config, encoded.batch,
                                   jnp.asarray(solved.delta), HP)
    for name, value in full._asdict().items():
        np.testing.assert_allclose(value, getattr(solved.trace, name)[:, -1], rtol=1e-4,
                                   atol=1e-6, err_msg=name)
    assert np.all(solved.trace.kl[:, 1:] > 0)  # the KL term is live once δ moves


def test_logits_are_read_at_every_weighted_and_kl_position_only(model, encoded, solved):
    batch = encoded.batch
    read = np.asarray(batch.read_pos)
    weighted = np.asarray(batch.weights) != 0
    for e, s in np.ndindex(read.shape[:2]):
        wanted = set(np.flatnonzero(weighted[e, s]))
        if batch.kl_weight[e, s]:
            wanted.add(int(batch.kl_pos[e, s]))
        assert set(read[e, s][read[e, s] >= 0]) == wanted, (e, s)
    # reading every position (the reference's cost) changes no term
    every = upstream.encode.read_every_position(batch)
    full = upstream.evaluate_shift(model.params, model.config, every,
                                   jnp.asarray(solved.delta), HP)
    for name, value in full._asdict().items():
        np.testing.assert_allclose(value, getattr(solved.trace, name)[:, -1], rtol=1e-4,
                                   atol=1e-6, err_msg=name)
    assert read.shape[-1] < every.read_pos.shape[-1]


def test_clamp_holds_at_every_step(solved):
    radius = HP.clamp_norm_factor * np.linalg.norm(solved.h, axis=-1)  # [E, P]
    assert np.all(solved.delta_norm <= radius[:, None, :] * (1 + 1e-5) + 1e-6)
    np.testing.assert_allclose(np.linalg.norm(solved.delta, axis=-1), solved.delta_norm[:, -1],
                               rtol=1e-5)
    assert np.any(np.isclose(solved.delta_norm[:, -1], radius, rtol=1e-4))  # clamp is active


def test_early_stop_masks_updates(model, encoded, solved):
    hp = dataclasses.replace(HP, early_stop_loss=float(np.median(solved.trace.total[:, -1])) + 0.5)
    res = jax.device_get(upstream.optimise_shifts(model.params, model.config, encoded.batch, hp))
    total = res.trace.total
    below = total < hp.early_stop_loss
    assert below.any(axis=1).any() and not below.any(axis=1).all()  # stops some, not all
    for e in range(total.shape[0]):
        if not below[e].any():
            assert res.updates[e] == hp.v_num_grad_steps - 1
            continue
        stop = int(np.argmax(below[e]))
        assert stop > 0 and res.updates[e] == stop, (e, stop, res.updates[e])
        assert np.all(res.delta_norm[e, stop:] == res.delta_norm[e, stop])
        assert np.all(total[e, stop:] == total[e, stop])
        np.testing.assert_array_equal(total[e, :stop], solved.trace.total[e, :stop])


def test_batched_equals_each_request_alone(model, tok, encoded, solved):
    for i, request in enumerate(REQUESTS):
        alone = upstream.encode_requests(tok, [request], TEMPLATES, HP)
        assert alone.batch.tokens.shape[2] == encoded.batch.tokens.shape[2]
        res = upstream.optimise_shifts(model.params, model.config, alone.batch, HP)
        np.testing.assert_allclose(res.delta[0], solved.delta[i], rtol=1e-5, atol=1e-5,
                                   err_msg=f"request {request.case_id}")
        np.testing.assert_allclose(res.trace.total[0], solved.trace.total[i], rtol=1e-4)


def test_same_key_gives_bitwise_identical_delta(model, tok):
    contexts = upstream.ContextConfig(seeds=("The", "I"), length=5)

    def once(key: jax.Array) -> tuple[tuple[str, ...], np.ndarray]:
        templates = upstream.context_templates(model.params, model.config, tok, key, contexts)
        result = upstream.compute_targets(model.params, model.config, tok, REQUESTS[:1],
                                          templates, HP)
        return templates, np.asarray(result.delta)

    templates, delta = once(jax.random.key(7))
    again_templates, again = once(jax.random.key(7))
    assert templates == again_templates and templates[0] == "{}" and len(templates) == 3
    assert all(t.endswith(". {}") and t.count("{}") == 1 for t in templates[1:])
    np.testing.assert_array_equal(delta, again)
    assert once(jax.random.key(8))[0] != templates


def test_lookup_is_the_subjects_last_token(tok):
    hp = dataclasses.replace(HP, fact_token="subject_last")
    enc = upstream.encode_requests(tok, REQUESTS[:1], TEMPLATES, hp)
    b = enc.batch
    for s, context in enumerate(TEMPLATES):
        row = b.tokens[0, s][b.attention_mask[0, s] == 1]
        pad = b.tokens.shape[2] - len(row)
        head = tok.decode(row[: b.shift_pos[0, s, 0] - pad + 1])
        assert head == context.format("The Eiffel Tower"), (context, head)
        labels = b.labels[0, s][b.weights[0, s] > 0]
        assert tok.decode(labels) == " capital"
        assert math.isclose(b.weights[0, s].sum(), 1 / len(TEMPLATES), rel_tol=1e-6)
    kl_row = b.tokens[0, -1][b.attention_mask[0, -1] == 1]
    assert tok.decode(kl_row) == "The Eiffel Tower is a"
    assert b.kl_weight[0].tolist() == [0] * len(TEMPLATES) + [1]


def test_target_prob_is_the_papers_per_context_mean_and_the_edited_model_reads_it(model, tok):
    """One template: target_prob = exp(−mean token NLL) of that row; at step 0 (δ = 0) it is
    what the unshifted model gives from tokens (the path run after an edit)."""
    enc = upstream.encode_requests(tok, REQUESTS, ("{}",), HP)
    res = jax.device_get(upstream.optimise_shifts(model.params, model.config, enc.batch, HP))
    np.testing.assert_allclose(res.trace.target_prob, np.exp(-res.trace.nll), rtol=1e-5)
    plain = upstream.unshifted_target_prob(model.params, model.config, enc.batch, HP)
    np.testing.assert_allclose(plain, res.trace.target_prob[:, 0], rtol=1e-4)
    rows = upstream.shift_diagnostics(res, HP, enc.case_ids)
    assert [r["case_id"] for r in rows] == ["a", "b", "c"]
    for e, row in enumerate(rows):
        assert row["target_prob_last"] > row["target_prob_first"]
        assert row["delta_norm"] <= row["clamp_radius"] * (1 + 1e-5)
        assert row["stopped_at_step"] == int(res.updates[e])


def test_encoding_errors_name_the_request(tok):
    empty = Request(case_id="x9", prompt="{} is", subject="Paris", target_new="é")
    with pytest.raises(upstream.EncodingError, match="request x9: target_new 'é'"):
        upstream.encode_requests(tok, [empty], TEMPLATES,
                                 dataclasses.replace(HP, prepend_space=False))


def _merging_tokenizer():
    """Whitespace words, characters, and one merge ")" + "?" -> ")?": the subject "X (A)" of
    "Who made X (A)?" ends inside the prompt's token ")?", as in SmolLM2's BPE."""
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate("WhomadeX(A)?s ")}
    vocab[")?"] = len(vocab)
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[(")", "?")]))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe)


class _NoOffsets:
    """The same tokenizer seen as a slow one (no offset mapping)."""

    is_fast = False

    def __init__(self, fast):
        self.fast = fast

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": self.fast(text, add_special_tokens=add_special_tokens)["input_ids"]}


def test_subject_whose_last_token_merges_with_the_next_character_is_located():
    tok = _merging_tokenizer()
    prompt, subject = "Who made {}?", "X (A)"
    ids = tok(prompt.format(subject))["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == list("Who") + list("made") + ["X", "(", "A", ")?"]
    head = tok("Who made X (A)")["input_ids"]
    assert ids[: len(head)] != head  # the old "whole tokens" rule could not place it
    for tokenizer in (tok, _NoOffsets(tok)):
        got, index = upstream.prompt_and_lookup(tokenizer, "{}", prompt, subject,
                                                "subject_last", 14)
        assert got == ids and tok.convert_ids_to_tokens(got[index]) == ")?"
    with_context, index = upstream.prompt_and_lookup(tok, "As Sam. {}", prompt, "X",
                                                     "subject_last", 14)
    assert tok.convert_ids_to_tokens(with_context[index]) == "X"


def test_nan_raises_naming_request_and_step_and_weights_are_untouched(model, encoded):
    params_before = jax.tree.map(np.array, model.params)
    weights = np.array(encoded.batch.weights)
    weights[1, 0, np.flatnonzero(weights[1, 0])[0]] = np.nan  # poison request "b" only
    batch = dataclasses.replace(encoded.batch, weights=weights)
    res = upstream.optimise_shifts(model.params, model.config, batch, HP)
    assert np.asarray(res.finite).tolist() == [True, False, True]
    with pytest.raises(upstream.NonFiniteShiftError, match=r"^request b: .* at step 0"):
        upstream.check_finite(res, encoded.case_ids)
    testing.assert_trees_equal(jax.tree.map(np.asarray, model.params), params_before)


def test_second_batch_of_same_shapes_does_not_retrace(model, tok, encoded, solved):
    other = upstream.encode_requests(tok, OTHER, TEMPLATES, HP)
    assert other.batch.tokens.shape == encoded.batch.tokens.shape
    before = upstream.optimise_shifts._cache_size()
    res = upstream.optimise_shifts(model.params, model.config, other.batch, HP)
    assert upstream.optimise_shifts._cache_size() == before
    assert not np.allclose(np.asarray(res.delta), solved.delta)
