"""PMET (Li et al. 2024, "PMET: Precise Model Editing in a Transformer") against independent
truths: the seam's attention / MLP output shifts against torch hooks on the same modules and
against a hand-written block; the joint target step's per-component h, clamp and weight
decay; only FFN down projections change; the square-root spread of the FFN residual against
a hand computation; one edited layer solves the normal equations; the command line edits."""

from __future__ import annotations

import functools
import json
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_main import run_main
from transformers import AutoTokenizer

from keedit_jax import downstream, intervene, registry, testing
from keedit_jax.data import Request
from keedit_jax.downstream._pmet import sqrt_spread_residual
from keedit_jax.intervene import Shift, Taps
from keedit_jax.methods.structured import StructuredConfig, edit_requests, lookup_rows
from keedit_jax.models import down_proj_path, get_path, set_path
from keedit_jax.upstream import TargetConfig, compute_targets, evaluate_shift
from keedit_jax.upstream.encode import encode_requests

torch = pytest.importorskip("torch")

LAYER = 1  # a middle layer of the 3-layer tiny models
POSITIONS = np.array([[2, 5], [8, 10], [4, 6]], np.int32)  # real tokens of each row
# The torch module whose output each site is, per family (HF names, inside a decoder layer).
SITE_MODULES = {
    "llama": {"attn_out": "self_attn.o_proj", "mlp_out": "mlp.down_proj"},
    "gpt2": {"attn_out": "attn.c_proj", "mlp_out": "mlp.c_proj"},
    "gptj": {"attn_out": "attn.out_proj", "mlp_out": "mlp.fc_out"},
}
SITE_MODULES["qwen2"] = SITE_MODULES["mistral"] = SITE_MODULES["llama"]
REQUESTS = [Request(case_id=f"r{i}", prompt=p, subject=s, target_new=t, target_true=tt)
            for i, (p, s, t, tt) in enumerate([("{} was born in", "Alice", "Paris", "Rome"),
                                               ("{} plays the", "Bob", "piano", "guitar")])]
PMET_SITES = registry.method_record("pmet").sites
# One target step for every test below, so the loop compiles once (a clamp small enough to
# bind on the tiny model).
TARGET = TargetConfig(layer=1, v_loss_layer=2, v_lr=0.5, v_num_grad_steps=8,
                      clamp_norm_factor=0.25, fact_token="subject_last", sites=PMET_SITES)


def _delta(d_model: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(POSITIONS.shape + (d_model,)).astype(
        np.float32)


@functools.partial(jax.jit, static_argnames=("cfg", "sites"))
def _logits(params, cfg, tokens, mask, delta, sites):
    """Logits with the same δ added at each of `sites` of LAYER (none: the plain forward)."""
    shifts = tuple(Shift(POSITIONS, delta, LAYER, site) for site in sites)
    return intervene.run(params, cfg, tokens=tokens, attention_mask=mask, shifts=shifts,
                         taps=Taps(logits=True))[1].logits


def _torch_logits(model, batch, module_path, delta):
    """transformers' model with a forward hook adding δ to the output of `module_path`."""
    tokens, mask, pos_ids = batch
    layers = model.model.layers if hasattr(model, "model") else model.transformer.h
    rows = torch.arange(POSITIONS.shape[0])[:, None].expand(POSITIONS.shape)
    index = (rows, torch.as_tensor(POSITIONS, dtype=torch.long))

    def hook(module, args, output):
        return output.index_put(index, torch.as_tensor(delta), accumulate=True)

    handle = layers[LAYER].get_submodule(module_path).register_forward_hook(hook)
    try:
        with torch.no_grad():
            return model(input_ids=torch.as_tensor(tokens, dtype=torch.long),
                         attention_mask=torch.as_tensor(mask, dtype=torch.long),
                         position_ids=torch.as_tensor(pos_ids, dtype=torch.long)).logits.numpy()
    finally:
        handle.remove()


# --- the seam's new sites -------------------------------------------------------------------


@pytest.mark.parametrize("site", ["attn_out", "mlp_out"])
@pytest.mark.parametrize("family", ["llama", "gpt2", "gptj"])
def test_sublayer_shift_matches_a_torch_hook_on_that_module(family, site, tiny_checkpoint):
    path = tiny_checkpoint(family)
    model = testing.cached_model(path)
    batch = tokens, mask, _ = testing.left_padded_batch()
    delta = _delta(model.config.d_model)
    ours = _logits(model.params, model.config, tokens, mask, delta, (site,))
    expected = _torch_logits(testing.cached_torch_model(path), batch,
                             SITE_MODULES[family][site], delta)
    plain = _logits(model.params, model.config, tokens, mask, delta, ())
    testing.assert_trees_close(testing.real_tokens(ours, mask),
                               testing.real_tokens(expected, mask), atol=1e-5)
    assert np.abs(testing.real_tokens(ours - plain, mask)).max() > 0.1  # the shift matters


def _rms(x, scale, eps):
    return scale * x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)


def test_llama_attention_shift_reaches_the_mlp_by_a_hand_written_block(tiny_checkpoint):
    """Llama's block is sequential: h' = h + a + δ, then h' + down(silu(gate x)·up x) with
    x = RMSNorm(h'), written out here from the parameters; its MLP-output shift is the
    block-output shift, its attention-output shift is not."""
    model = testing.cached_model(tiny_checkpoint("llama"))
    params, cfg = model.params, model.config
    tokens, mask, _ = testing.left_padded_batch()
    delta = _delta(cfg.d_model, seed=4)
    h_in, _ = intervene.run(params, cfg, tokens=tokens, attention_mask=mask, stop=LAYER)
    caps = intervene.run(params, cfg, hidden=h_in, attention_mask=mask, start=LAYER,
                         stop=LAYER + 1, taps=Taps(attn_out=(LAYER,)))[1]
    rows = np.arange(3)[:, None]
    h_mid = (h_in + caps.attn_out[LAYER]).at[rows, POSITIONS].add(delta)
    lp = jax.tree.map(lambda x: x[LAYER], params["model"]["layers"])
    x = _rms(h_mid, lp["post_attention_layernorm"]["scale"], cfg.norm_eps)
    mlp = lp["mlp"]
    gated = jax.nn.silu(x @ mlp["gate_proj"]["kernel"]) * (x @ mlp["up_proj"]["kernel"])
    h_out = h_mid + gated @ mlp["down_proj"]["kernel"]
    _, hand = intervene.run(params, cfg, hidden=h_out, attention_mask=mask, start=LAYER + 1,
                            taps=Taps(logits=True))
    shifted = {sites: _logits(params, cfg, tokens, mask, delta, sites)
               for sites in (("attn_out",), ("mlp_out",), ("block_out",))}
    real = functools.partial(testing.real_tokens, mask=mask)
    testing.assert_trees_close(real(shifted[("attn_out",)]), real(hand.logits), atol=1e-5)
    testing.assert_trees_close(real(shifted[("mlp_out",)]), real(shifted[("block_out",)]),
                               atol=1e-5)
    assert np.abs(real(shifted[("attn_out",)] - shifted[("block_out",)])).max() > 1e-2


def test_gptj_parallel_block_makes_all_three_sites_one_shift(tiny_checkpoint):
    """GPT-J's MLP reads LayerNorm(h), not the attention output: h + (a + δ) + m, h + a +
    (m + δ) and (h + a + m) + δ are the same residual stream."""
    model = testing.cached_model(tiny_checkpoint("gptj"))
    tokens, mask, _ = testing.left_padded_batch()
    delta = _delta(model.config.d_model, seed=5)
    real = functools.partial(testing.real_tokens, mask=mask)
    block = real(_logits(model.params, model.config, tokens, mask, delta, ("block_out",)))
    for site in ("attn_out", "mlp_out"):
        testing.assert_trees_close(
            real(_logits(model.params, model.config, tokens, mask, delta, (site,))), block,
            atol=1e-5)


def test_two_sites_of_one_layer_add_up_and_bad_sites_are_refused(tiny_checkpoint):
    model = testing.cached_model(tiny_checkpoint("gptj"))
    tokens, mask, _ = testing.left_padded_batch()
    delta = _delta(model.config.d_model, seed=6)
    both = _logits(model.params, model.config, tokens, mask, delta, ("attn_out", "mlp_out"))
    twice = _logits(model.params, model.config, tokens, mask, 2 * delta, ("block_out",))
    testing.assert_trees_close(testing.real_tokens(both, mask),
                               testing.real_tokens(twice, mask), atol=1e-4)
    run = functools.partial(intervene.run, model.params, model.config, tokens=tokens,
                            attention_mask=mask)
    with pytest.raises(ValueError, match="unknown site 'mlp_key'"):
        run(shifts=(Shift(POSITIONS, delta, LAYER, "mlp_key"),))
    with pytest.raises(ValueError, match="at most one Shift per layer and site"):
        run(shifts=(Shift(POSITIONS, delta, LAYER, "mlp_out"),) * 2)


# --- the joint target step -----------------------------------------------------------------


@pytest.fixture(scope="module")
def setup(tiny_checkpoint, tiny_tokenizer_dir):
    model = testing.cached_model(tiny_checkpoint("llama"))
    return model.params, model.config, AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def _clean_sites(params, cfg, tok, layer):
    """attn_out, mlp_key and mlp_out of `layer` at each request's lookup token, clean prompt."""
    rows = lookup_rows(tok, REQUESTS, ("{}",), "subject_last", 0)
    caps = intervene.run(params, cfg, tokens=jnp.asarray(rows.tokens),
                         attention_mask=jnp.asarray(rows.mask), stop=layer + 1,
                         taps=Taps(attn_out=(layer,), mlp_key=(layer,), mlp_out=(layer,)))[1]
    at = np.arange(len(REQUESTS)), rows.lookup
    return (np.asarray(caps.attn_out[layer][at]), np.asarray(caps.mlp_key[layer][at]),
            np.asarray(caps.mlp_out[layer][at]))


def test_joint_shifts_have_their_own_h_clamp_and_weight_decay(setup):
    params, cfg, tok = setup
    hp = TARGET
    result = compute_targets(params, cfg, tok, REQUESTS, ("{}",), hp)
    attn, _, mlp = _clean_sites(params, cfg, tok, 1)
    assert result.delta.shape == (2, 2, cfg.d_model)
    np.testing.assert_allclose(result.h[:, 0], attn, atol=1e-5)  # site-major: attention ...
    np.testing.assert_allclose(result.h[:, 1], mlp, atol=1e-5)  # ... then the FFN output
    norms = np.linalg.norm(np.asarray(result.delta), axis=-1)  # [E, sites]
    radius = hp.clamp_norm_factor * np.linalg.norm(np.asarray(result.h), axis=-1)
    assert (norms <= radius * (1 + 1e-5)).all()
    assert (norms >= radius * 0.999).any(), "the small clamp binds somewhere"
    decay = hp.v_weight_decay * (norms / np.linalg.norm(np.asarray(result.h), axis=-1) ** 2)
    np.testing.assert_allclose(result.trace.weight_decay[:, -1], decay.sum(1), rtol=1e-5)
    batch = encode_requests(tok, REQUESTS, ("{}",), hp).batch
    full = evaluate_shift(params, cfg, batch, result.delta, hp)  # no prefix cache
    np.testing.assert_allclose(full.total, result.trace.total[:, -1], rtol=1e-4)


# --- the downstream update ------------------------------------------------------------------


def _edit(params, cfg, tok, layers, lam, stats=None):
    """PMET's edit of REQUESTS (one template, float32 solve)."""
    config = StructuredConfig(layers=layers, solver="pmet", target=TARGET,
                              memit=downstream.MemitHParams(mom2_update_weight=lam))
    stats = stats or {layer: jnp.eye(cfg.d_ff) for layer in layers}
    states = downstream.init_states(config.make_solver(), layers, cfg.d_ff, cfg.d_model)
    edited, _, diag = edit_requests(params, cfg, tok, REQUESTS, ("{}",), stats, states, config)
    return edited, diag


@pytest.mark.parametrize("family", ["llama", pytest.param("gptj", marks=pytest.mark.slow)])
def test_only_the_edited_ffn_down_projections_change(family, tiny_checkpoint,
                                                      tiny_tokenizer_dir):
    model = testing.cached_model(tiny_checkpoint(family))
    tok = AutoTokenizer.from_pretrained(tiny_tokenizer_dir)
    cfg = model.config
    edited, _ = _edit(model.params, cfg, tok, (0, 1), lam=1.0)
    path = "/".join(down_proj_path(cfg))
    before = dict(jax.tree_util.tree_leaves_with_path(model.params))
    after = dict(jax.tree_util.tree_leaves_with_path(edited))
    for key, leaf in before.items():
        name = jax.tree_util.keystr(key, simple=True, separator="/")
        if name == path:
            moved = np.abs(np.asarray(after[key] - leaf)).reshape(cfg.n_layers, -1).max(1)
            assert (moved[:2] > 0).all() and moved[2] == 0, (name, moved)
        else:  # attention (q/k/v/o), norms, the MLP's input side, embeddings: bit-identical
            np.testing.assert_array_equal(np.asarray(after[key]), np.asarray(leaf),
                                          err_msg=name)


def test_sqrt_spread_of_the_ffn_residual_by_hand(setup):
    """Two layers: layer 0 fits (m* − M)/√2 with M the FFN output of layer 1 (the last) under
    the unedited weights; layer 1 fits m* − M', M' read after layer 0's update. MEMIT's
    /(L − i) would give layer 0 half, not 1/√2, of the residual."""
    params, cfg, tok = setup
    m_star = np.asarray(compute_targets(params, cfg, tok, REQUESTS, ("{}",), TARGET)
                        .targets[:, 1])
    edited, diag = _edit(params, cfg, tok, (0, 1), lam=3.0)
    path = down_proj_path(cfg)
    w0, w1 = (np.asarray(get_path(p, path)) for p in (params, edited))
    after_0 = set_path(params, path, get_path(params, path).at[0].set(w1[0]))
    _, _, m_before = _clean_sites(params, cfg, tok, 1)
    _, _, m_after_0 = _clean_sites(after_0, cfg, tok, 1)
    resid = {layer: np.asarray(values) - np.asarray(keys) @ w0[layer]
             for layer, (keys, values) in diag["fitted"].items()}
    np.testing.assert_allclose(resid[0], (m_star - m_before) / np.sqrt(2), atol=1e-4)
    np.testing.assert_allclose(resid[1], m_star - m_after_0, atol=1e-4)
    assert not np.allclose(resid[0], (m_star - m_before) / 2, atol=1e-3)
    np.testing.assert_allclose(sqrt_spread_residual(jnp.full(3, 7.0), jnp.ones(3), 1, 5),
                               np.full(3, 3.0))  # 6 / √4


def test_one_layer_solves_the_normal_equations(setup):
    """(λC + KᵀK) ΔW = Kᵀ(m* − M) with K the layer's keys and M its FFN output (numpy)."""
    params, cfg, tok = setup
    rng = np.random.default_rng(0)
    a = rng.standard_normal((4 * cfg.d_ff, cfg.d_ff))
    c = a.T @ a / (4 * cfg.d_ff) + 0.1 * np.eye(cfg.d_ff)
    lam = 2.0
    m_star = np.asarray(compute_targets(params, cfg, tok, REQUESTS, ("{}",), TARGET)
                        .targets[:, 1], np.float64)
    _, keys, m = _clean_sites(params, cfg, tok, 1)
    edited, _ = _edit(params, cfg, tok, (1,), lam=lam, stats={1: jnp.asarray(c)})
    path = down_proj_path(cfg)
    delta = np.asarray(get_path(edited, path)[1] - get_path(params, path)[1], np.float64)
    k = keys.astype(np.float64)
    truth = np.linalg.solve(lam * c + k.T @ k, k.T @ (m_star - m))
    np.testing.assert_allclose(delta, truth, rtol=1e-4, atol=1e-6)
    assert np.abs(truth).max() > 1e-3


def test_pmet_lives_in_its_solver_file_and_its_record_only():
    """No library file but PMET's solver and the registry names PMET."""
    package = pathlib.Path(registry.__file__).parent
    naming = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                    if re.search(r"\bpmet\b", p.read_text()))
    assert naming == ["downstream/_pmet.py", "registry.py"]


def test_the_flags_give_pmet_its_sites_solver_and_lambda():
    from keedit_jax.flags import StructuredFlags
    from keedit_jax.methods.run_structured import structured_config

    config = structured_config("pmet", StructuredFlags(layers="1,2", mom2_update_weight=7.0), 4)
    solver = config.make_solver()
    assert config.target.sites == ("attn_out", "mlp_out") and config.target_index() == 1
    assert (solver.name, solver.target_site, solver.spread) == (
        "pmet", "mlp_out", sqrt_spread_residual)
    assert config.memit.mom2_update_weight == 7.0
    memit = structured_config("memit", StructuredFlags(layers="1,2"), 4)
    assert memit.target.sites == ("block_out",) and memit.make_solver().spread is None
    with pytest.raises(ValueError, match="memit inserts targets at block_out"):
        StructuredConfig(layers=(1,), solver="memit", target=TARGET).target_index()


@pytest.mark.slow  # ~25 s: a fresh statistics pass, context-free, and the compiles
def test_pmet_on_the_organism_through_the_command_line(tmp_path):
    """configs/pmet.cfg on 3 edits in one batch: the edits are made."""
    out = tmp_path / "out"
    result = run_main("--flagfile=configs/pmet.cfg", "--num_edits=3", "--edit_batch_size=3",
                      "--stats_samples=2000", "--max_new_tokens=4", "--context_seeds=",
                      f"--output_dir={out}", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert results["pre"]["rewrite_success"][0] <= 50
    assert results["post"]["rewrite_success"][0] >= 95
    assert results["title"] == "pmet on 3 requests, batch size 3"
    assert not results["failed"]
