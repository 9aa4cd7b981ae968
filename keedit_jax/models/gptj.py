"""GPT-J: attention and MLP in parallel from one LayerNorm; partial, interleaved rotary."""

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
    n, d = cfg.n_layers, cfg.d_model
    layers = {
        "ln_1": norm_shape(cfg, n),
        "attn": {name: dense_shape(d, d, False, n)
                 for name in ("q_proj", "k_proj", "v_proj", "out_proj")},
        "mlp": {"fc_in": dense_shape(d, cfg.d_ff, True, n),
                "fc_out": dense_shape(cfg.d_ff, d, True, n)},
    }
    shapes = {"transformer": {"wte": {"embedding": (cfg.vocab_size, d)}, "h": layers,
                              "ln_f": norm_shape(cfg)}}
    if not cfg.tie_embeddings:
        shapes["lm_head"] = dense_shape(d, cfg.vocab_size, cfg.lm_head_bias)
    return shapes


def embed(cfg: ModelConfig, params: dict, tokens: Array, positions: Array) -> Array:
    del cfg, positions  # positions enter through the rotary embedding
    return params["transformer"]["wte"]["embedding"][tokens]


def block(cfg: ModelConfig, lp: dict, h: Array, inputs: AttnInputs,
          kv: KVCache | None, adds: SublayerShifts = NO_SHIFTS) -> BlockOut:
    x = norm(cfg, h, lp["ln_1"])
    ap = lp["attn"]
    attn, kv = self_attention(cfg, linear(x, ap["q_proj"]), linear(x, ap["k_proj"]),
                              linear(x, ap["v_proj"]), inputs, kv)
    key = activation(cfg.activation, linear(x, lp["mlp"]["fc_in"]))
    out = linear(key, lp["mlp"]["fc_out"])
    attn_out = linear(attn, ap["out_proj"])
    # Parallel block: the MLP reads x, not the attention output, so a shift of either only
    # enters the residual sum.
    return BlockOut(hidden=h + plus(attn_out, adds.attn_out)
                    + plus(routed_mlp_out(adds, key, out), adds.mlp_out),
                    mlp_key=key, mlp_out=out, kv=kv, attn_out=attn_out)


def head(cfg: ModelConfig, params: dict, h: Array) -> Array:
    h = norm(cfg, h, params["transformer"]["ln_f"])
    if cfg.tie_embeddings:
        return h @ params["transformer"]["wte"]["embedding"].T
    return linear(h, params["lm_head"])


OPS = FamilyOps(layers_path=("transformer", "h"), down_proj_path=("mlp", "fc_out"),
                conv1d=False, ignored_keys=(r"\.attn\.(masked_)?bias$",),
                param_shapes=param_shapes, embed=embed, block=block, head=head)
