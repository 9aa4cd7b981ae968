"""GPT-2 (up to XL): learned positions, LayerNorm, fused QKV, Conv1D kernels stored [in, out]."""

from __future__ import annotations

import jax
import jax.numpy as jnp

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
    n, d = cfg.n_layers, cfg.d_model
    layers = {
        "ln_1": norm_shape(cfg, n),
        "attn": {"c_attn": dense_shape(d, 3 * d, True, n), "c_proj": dense_shape(d, d, True, n)},
        "ln_2": norm_shape(cfg, n),
        "mlp": {"c_fc": dense_shape(d, cfg.d_ff, True, n),
                "c_proj": dense_shape(cfg.d_ff, d, True, n)},
    }
    shapes = {"transformer": {"wte": {"embedding": (cfg.vocab_size, d)},
                              "wpe": {"embedding": (cfg.max_positions, d)},
                              "h": layers, "ln_f": norm_shape(cfg)}}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = dense_shape(d, cfg.vocab_size, False)
    return shapes


def embed(cfg: ModelConfig, params: dict, tokens: Array, positions: Array) -> Array:
    del cfg
    tp = params["transformer"]
    return tp["wte"]["embedding"][tokens] + tp["wpe"]["embedding"][positions]


def block(cfg: ModelConfig, lp: dict, h: Array, inputs: AttnInputs,
          kv: KVCache | None, adds: SublayerShifts = NO_SHIFTS) -> BlockOut:
    x = norm(cfg, h, lp["ln_1"])
    q, k, v = jnp.split(linear(x, lp["attn"]["c_attn"]), 3, axis=-1)
    attn, kv = self_attention(cfg, q, k, v, inputs, kv)
    attn_out = linear(attn, lp["attn"]["c_proj"])
    h = h + plus(attn_out, adds.attn_out)  # the MLP reads the shifted attention output
    x = norm(cfg, h, lp["ln_2"])
    key = activation(cfg.activation, linear(x, lp["mlp"]["c_fc"]))
    out = linear(key, lp["mlp"]["c_proj"])
    return BlockOut(hidden=h + plus(routed_mlp_out(adds, key, out), adds.mlp_out),
                    mlp_key=key, mlp_out=out, kv=kv, attn_out=attn_out)


def head(cfg: ModelConfig, params: dict, h: Array) -> Array:
    h = norm(cfg, h, params["transformer"]["ln_f"])
    if cfg.tie_embeddings:
        return h @ params["transformer"]["wte"]["embedding"].T
    return linear(h, params["lm_head"])


OPS = FamilyOps(layers_path=("transformer", "h"), down_proj_path=("mlp", "c_proj"),
                conv1d=True, ignored_keys=(r"\.attn\.(masked_)?bias$",),
                param_shapes=param_shapes, embed=embed, block=block, head=head)
