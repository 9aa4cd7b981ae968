"""Llama-2/3, Qwen2 and Mistral: pre-norm RMSNorm decoder with RoPE, GQA and a gated MLP.

Qwen2 adds q/k/v biases and (small sizes) tied embeddings; Mistral adds a sliding window; all
are fields of ModelConfig, so one block serves the three.
"""

from __future__ import annotations

import jax

from keedit_jax.models.config import ModelConfig
from keedit_jax.models.family import FamilyOps, Shapes, dense_shape, norm_shape
from keedit_jax.models.layers import (
    NO_SHIFTS,
    AttnInputs,
    BlockOut,
    KVCache,
    SublayerShifts,
    activation,
    linear,
    norm,
    plus,
    routed_mlp_out,
    self_attention,
)

Array = jax.Array


def param_shapes(cfg: ModelConfig) -> Shapes:
    n, d, q, kv = cfg.n_layers, cfg.d_model, cfg.n_heads * cfg.head_dim, \
        cfg.n_kv_heads * cfg.head_dim
    layers = {
        "self_attn": {
            "q_proj": dense_shape(d, q, cfg.qkv_bias, n),
            "k_proj": dense_shape(d, kv, cfg.qkv_bias, n),
            "v_proj": dense_shape(d, kv, cfg.qkv_bias, n),
            "o_proj": dense_shape(q, d, cfg.o_bias, n),
        },
        "mlp": {
            "gate_proj": dense_shape(d, cfg.d_ff, cfg.mlp_bias, n),
            "up_proj": dense_shape(d, cfg.d_ff, cfg.mlp_bias, n),
            "down_proj": dense_shape(cfg.d_ff, d, cfg.mlp_bias, n),
        },
        "input_layernorm": norm_shape(cfg, n),
        "post_attention_layernorm": norm_shape(cfg, n),
    }
    shapes = {"model": {"embed_tokens": {"embedding": (cfg.vocab_size, d)},
                        "layers": layers, "norm": norm_shape(cfg)}}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = dense_shape(d, cfg.vocab_size, False)
    return shapes


def embed(cfg: ModelConfig, params: dict, tokens: Array, positions: Array) -> Array:
    del cfg, positions  # positions enter through RoPE
    return params["model"]["embed_tokens"]["embedding"][tokens]


def block(cfg: ModelConfig, lp: dict, h: Array, inputs: AttnInputs,
          kv: KVCache | None, adds: SublayerShifts = NO_SHIFTS) -> BlockOut:
    attn_p = lp["self_attn"]
    x = norm(cfg, h, lp["input_layernorm"])
    attn, kv = self_attention(cfg, linear(x, attn_p["q_proj"]), linear(x, attn_p["k_proj"]),
                              linear(x, attn_p["v_proj"]), inputs, kv)
    attn_out = linear(attn, attn_p["o_proj"])
    h = h + plus(attn_out, adds.attn_out)  # the MLP reads the shifted attention output
    x = norm(cfg, h, lp["post_attention_layernorm"])
    mlp_p = lp["mlp"]
    key = activation(cfg.activation, linear(x, mlp_p["gate_proj"])) * linear(x, mlp_p["up_proj"])
    out = linear(key, mlp_p["down_proj"])
    return BlockOut(hidden=h + plus(routed_mlp_out(adds, key, out), adds.mlp_out),
                    mlp_key=key, mlp_out=out, kv=kv, attn_out=attn_out)


def head(cfg: ModelConfig, params: dict, h: Array) -> Array:
    h = norm(cfg, h, params["model"]["norm"])
    if cfg.tie_embeddings:
        return h @ params["model"]["embed_tokens"]["embedding"].T
    return linear(h, params["lm_head"])


OPS = FamilyOps(layers_path=("model", "layers"), down_proj_path=("mlp", "down_proj"),
                conv1d=False, ignored_keys=(r"\.rotary_emb\.inv_freq$",),
                param_shapes=param_shapes, embed=embed, block=block, head=head)
