"""Building blocks shared by the decoder families: norms, RoPE, attention, MLP activations.

Axis letters (STYLE.md §8): B batch, T query positions, S key positions, D d_model, F d_ff,
N query heads, K kv heads, G query heads per kv head, H head dim, L layers, V vocab.
Kernels are [d_in, d_out], so a projection is ``x @ kernel``.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from keedit_jax.models.config import ModelConfig, RopeConfig

Array = jax.Array
Params = dict


class AttnInputs(NamedTuple):
    """What attention needs besides the hidden states; built once per forward, shared by layers.

    positions: [B, T] rotary/learned position of each query token (left padding aware).
    mask: [B, T, S] True where query t may attend to key slot s.
    cache_index: slot of the first query token in the KV cache, or None without a cache.
    """

    positions: Array
    mask: Array
    cache_index: Array | None = None


class KVCache(NamedTuple):
    """Keys and values of every slot, per layer: k, v [L, B, S, K, H] (or one layer's slice)."""

    k: Array
    v: Array


class BlockOut(NamedTuple):
    """One decoder block's result: the residual stream after it and the MEMIT sites inside it.

    mlp_key is the down-projection input [B, T, F]; mlp_out its output [B, T, D]; attn_out
    the attention output projection's output [B, T, D] (PMET's MHSA site). mlp_out and
    attn_out are what the weights compute, before `SublayerShifts` adds to them.
    """

    hidden: Array
    mlp_key: Array
    mlp_out: Array
    kv: KVCache | None
    attn_out: Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Codebook:
    """GRACE's discrete key-value adaptor at one layer's MLP output (Hartvigsen et al. 2023,
    "Aging with GRACE", §2: a codebook of keys, values and deferral radii ε at layer l).

    The adapted layer is the down projection: a key lives at its input (the seam's mlp_key
    site, [F]) and a value replaces its output (mlp_out, [D]). Capacity N is fixed, so adding
    entries changes no shape (no recompilation); `used` marks the filled slots. `labels`
    (an id of each entry's target) is read by codebook maintenance only, never by the lookup.
    A GRACE-edited model is its parameter tree with the codebook under `CODEBOOK`
    (`keedit_jax.intervene.with_codebook`), so every path that runs the model applies it.
    """

    keys: Array  # [N, F] float32
    values: Array  # [N, D]
    radii: Array  # [N] float32, the deferral radii ε
    used: Array  # [N] bool
    labels: Array  # [N] int32
    layer: int = dataclasses.field(metadata={"static": True})

    @property
    def capacity(self) -> int:
        return self.keys.shape[0]


# Where a GRACE-edited parameter tree holds its Codebook.
CODEBOOK = "grace_codebook"


def codebook_of(params: Params) -> Codebook | None:
    """The parameter tree's GRACE codebook, or None for a plain model."""
    return params.get(CODEBOOK)


def codebook_lookup(book: Codebook, query_btf: Array) -> tuple[Array, Array]:
    """GRACE's deferral rule (§2) at every position: the nearest used key i* by Euclidean
    distance and whether the query lies within its radius, d(h, k_i*) ≤ ε_i* (closed, so the
    radius an edit expands to, ε = d, covers that edit). Returns (i* [B, T] int32, hit
    [B, T] bool)."""
    q = query_btf.astype(jnp.float32)
    keys = book.keys.astype(jnp.float32)
    cross = jnp.einsum("btf,nf->btn", q, keys, precision=jax.lax.Precision.HIGHEST)
    sq = jnp.sum(q * q, -1)[..., None] - 2 * cross + jnp.sum(keys * keys, -1)
    sq = jnp.where(book.used, jnp.maximum(sq, 0.0), jnp.inf)
    nearest = jnp.argmin(sq, axis=-1).astype(jnp.int32)
    distance = jnp.sqrt(jnp.take_along_axis(sq, nearest[..., None], -1)[..., 0])
    return nearest, distance <= book.radii[nearest]


def routed_mlp_out(adds: SublayerShifts, key_btf: Array, out_btd: Array) -> Array:
    """The MLP output after the block's codebook, if any: the value of the nearest key where
    the down-projection input lies inside its radius, the layer's own output elsewhere (the
    deferral: those positions compute exactly what the unedited block computes)."""
    if adds.mlp_codebook is None:
        return out_btd
    nearest, hit = codebook_lookup(adds.mlp_codebook, key_btf)
    value = adds.mlp_codebook.values[nearest].astype(out_btd.dtype)
    return jnp.where(hit[..., None], value, out_btd)


class SublayerShifts(NamedTuple):
    """Dense additions [B, T, D] to one block's attention output and MLP output (zero away
    from the shifted positions), or None: the seam's shifts at the "attn_out" and "mlp_out"
    sites (`keedit_jax.intervene.Shift`), applied inside the block so that whatever reads
    the sublayer's output downstream (in a sequential block, the MLP reads the attention
    output through the residual) sees the shifted value. `mlp_codebook`: GRACE's codebook
    of this layer, replacing the MLP output where a key is hit (before the mlp_out shift)."""

    attn_out: Array | None = None
    mlp_out: Array | None = None
    mlp_codebook: Codebook | None = None


NO_SHIFTS = SublayerShifts()


def plus(x: Array, add: Array | None) -> Array:
    """x + add (cast to x's dtype), or x itself when there is nothing to add."""
    return x if add is None else x + add.astype(x.dtype)


def linear(x: Array, p: Params) -> Array:
    """x @ kernel (+ bias): kernels are [d_in, d_out]."""
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def rms_norm(x: Array, p: Params, eps: float) -> Array:
    """RMSNorm with the statistics in float32, cast back before the scale (as transformers does)."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return p["scale"] * normed.astype(x.dtype)


def layer_norm(x: Array, p: Params, eps: float) -> Array:
    """LayerNorm with the statistics in float32."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)
    return normed * p["scale"] + p["bias"]


def norm(cfg: ModelConfig, x: Array, p: Params) -> Array:
    return rms_norm(x, p, cfg.norm_eps) if cfg.norm == "rms" else layer_norm(x, p, cfg.norm_eps)


def activation(name: str, x: Array) -> Array:
    if name == "silu":
        return jax.nn.silu(x)
    if name == "gelu_tanh":
        return jax.nn.gelu(x, approximate=True)
    if name == "gelu":
        return jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu(x)
    raise ValueError(f"unknown activation {name!r}")


def apply_rope(x_btnh: Array, positions_bt: Array, rope: RopeConfig) -> Array:
    """Rotate the first `rotary_dim` dims of every head by position; pass the rest through."""
    inv_freq = jnp.asarray(rope.inverse_frequencies())
    angles = positions_bt.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    cos = jnp.cos(angles)[:, :, None, :].astype(x_btnh.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x_btnh.dtype)
    rot, rest = x_btnh[..., : rope.rotary_dim], x_btnh[..., rope.rotary_dim:]
    if rope.style == "half":
        x1, x2 = jnp.split(rot, 2, axis=-1)
        rotated = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    else:
        even, odd = rot[..., 0::2], rot[..., 1::2]
        pairs = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
        rotated = pairs.reshape(rot.shape)
    return jnp.concatenate([rotated, rest], axis=-1)


def attend(q_btnh: Array, k_bskh: Array, v_bskh: Array, mask_bts: Array, scale: float) -> Array:
    """Grouped-query softmax attention; query head n reads kv head n // G (transformers' order).

    Scores and softmax are float32. A fully masked row (a left-pad query) gets uniform weights,
    finite rather than NaN, and its output is never read.
    """
    b, t, n, h = q_btnh.shape
    k_heads = k_bskh.shape[2]
    q_btkgh = q_btnh.reshape(b, t, k_heads, n // k_heads, h)
    scores = jnp.einsum("btkgh,bskh->bkgts", q_btkgh, k_bskh,
                        preferred_element_type=jnp.float32) * scale
    scores = jnp.where(mask_bts[:, None, None], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v_bskh.dtype)
    out = jnp.einsum("bkgts,bskh->btkgh", probs, v_bskh)
    return out.reshape(b, t, n * h)


def self_attention(cfg: ModelConfig, q: Array, k: Array, v: Array, inputs: AttnInputs,
                   kv: KVCache | None) -> tuple[Array, KVCache | None]:
    """Split heads, rotate, write the new keys/values into the cache if any, attend.

    q [B, T, N*H], k and v [B, T, K*H] -> ([B, T, N*H], the updated cache of this layer).
    """
    b, t, _ = q.shape
    q = q.reshape(b, t, cfg.n_heads, cfg.head_dim)
    k = k.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    v = v.reshape(b, t, cfg.n_kv_heads, cfg.head_dim)
    if cfg.rope is not None:
        q = apply_rope(q, inputs.positions, cfg.rope)
        k = apply_rope(k, inputs.positions, cfg.rope)
    if kv is not None:
        start = (0, inputs.cache_index, 0, 0)
        kv = KVCache(jax.lax.dynamic_update_slice(kv.k, k.astype(kv.k.dtype), start),
                     jax.lax.dynamic_update_slice(kv.v, v.astype(kv.v.dtype), start))
        k, v = kv.k, kv.v
    out = attend(q, k, v, inputs.mask, cfg.head_dim ** -0.5)
    return out, kv


def attention_mask(query_slots_bt: Array, key_valid_bs: Array,
                   sliding_window: int | None) -> Array:
    """[B, T, S] causal mask over key slots, restricted to real (unpadded) keys and the window."""
    key_slots = jnp.arange(key_valid_bs.shape[1])
    q = query_slots_bt[:, :, None]
    mask = (key_slots[None, None, :] <= q) & key_valid_bs[:, None, :].astype(bool)
    if sliding_window is not None:
        mask &= key_slots[None, None, :] > q - sliding_window
    return mask


def positions_from_mask(attention_mask_bt: Array) -> Array:
    """Position ids for a left-padded batch: 0 at each row's first real token."""
    return jnp.maximum(jnp.cumsum(attention_mask_bt, axis=-1) - 1, 0).astype(jnp.int32)


def positions_in_segments(segment_ids_bt: Array) -> Array:
    """Position ids of packed rows: 0 at the first slot of each run of equal segment ids, so
    every document packed into a row sees the positions it would see alone."""
    t = segment_ids_bt.shape[-1]
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids_bt.shape)
    starts = jnp.concatenate([jnp.ones_like(segment_ids_bt[:, :1], dtype=bool),
                              segment_ids_bt[:, 1:] != segment_ids_bt[:, :-1]], axis=-1)
    run_start = jax.lax.cummax(jnp.where(starts, slots, 0), axis=segment_ids_bt.ndim - 1)
    return slots - run_start
