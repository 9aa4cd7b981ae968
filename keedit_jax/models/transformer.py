"""The layer loop: run decoder layers [start, stop) of a stacked parameter tree.

The loop is one `fori_loop` whose body indexes the stack, so compile time does not grow with
depth and no copy of a layer range is ever sliced out of the stack (STYLE.md §2).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from keedit_jax.models.config import ModelConfig
from keedit_jax.models.family import get_family
from keedit_jax.models.layers import (
    NO_SHIFTS,
    AttnInputs,
    BlockOut,
    KVCache,
    SublayerShifts,
    attention_mask,
    codebook_of,
    positions_from_mask,
    positions_in_segments,
)
from keedit_jax.models.params import Params, layer

Array = jax.Array


def prompt_inputs(cfg: ModelConfig, mask_bt: Array,
                  segment_ids_bt: Array | None = None) -> AttnInputs:
    """Attention inputs for a left-padded batch processed without a cache.

    segment_ids_bt (packed rows: contiguous runs of equal nonzero ids, 0 on padding): each
    token attends only within its run and positions restart at 0 with each run, so a packed
    document computes what it computes alone."""
    b, t = mask_bt.shape
    slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask = attention_mask(slots, mask_bt, cfg.sliding_window)
    if segment_ids_bt is None:
        return AttnInputs(positions=positions_from_mask(mask_bt), mask=mask)
    same = segment_ids_bt[:, :, None] == segment_ids_bt[:, None, :]
    return AttnInputs(positions=positions_in_segments(segment_ids_bt), mask=mask & same)


def embed(params: Params, cfg: ModelConfig, tokens_bt: Array, positions_bt: Array) -> Array:
    return get_family(cfg).embed(cfg, params, tokens_bt, positions_bt)


def head(params: Params, cfg: ModelConfig, h_btd: Array) -> Array:
    """Final norm and unembedding -> logits [B, T, V]."""
    return get_family(cfg).head(cfg, params, h_btd)


def run_block(params: Params, cfg: ModelConfig, index: int | Array, h_btd: Array,
              inputs: AttnInputs, kv: KVCache | None = None,
              adds: SublayerShifts = NO_SHIFTS) -> BlockOut:
    """Layer `index` alone: the only place a block is called (used by the loop and the seam);
    `adds` are the seam's shifts of its attention / MLP outputs. A static `index` that is the
    layer of the parameter tree's GRACE codebook also gets the codebook (`run_layers` gives
    that layer a static index)."""
    book = codebook_of(params)
    if book is not None and isinstance(index, int) and index == book.layer:
        adds = adds._replace(mlp_codebook=book)
    layer_kv = None if kv is None else KVCache(kv.k[index], kv.v[index])
    return get_family(cfg).block(cfg, layer(params, cfg, index), h_btd, inputs, layer_kv, adds)


def _stored(cache: KVCache | None, index: int | Array, out: BlockOut) -> KVCache | None:
    """The cache with layer `index`'s slice replaced by what its block wrote."""
    if cache is None:
        return None
    return KVCache(cache.k.at[index].set(out.kv.k), cache.v.at[index].set(out.kv.v))


def run_layers(params: Params, cfg: ModelConfig, h_btd: Array, inputs: AttnInputs,
               start: int, stop: int, kv: KVCache | None = None,
               remat: bool = False) -> tuple[Array, KVCache | None]:
    """Run layers [start, stop) and return the residual stream (and the updated KV cache).

    Under differentiation the loop body saves only matmul outputs: without a policy the
    backward would keep a copy of every layer's weight slice (~10 GB for Llama-3-8B in bf16,
    benchmarks/README.md). `remat` saves nothing and recomputes each block in the backward,
    for gradients through many layers of a large model at ~10% more time. A GRACE codebook
    in `params` splits the loop around its layer, which runs alone with the codebook.
    """
    book = codebook_of(params)
    if book is not None and start <= book.layer < stop:
        h_btd, kv = run_layers(params, cfg, h_btd, inputs, start, book.layer, kv, remat)
        out = run_block(params, cfg, book.layer, h_btd, inputs, kv)
        return run_layers(params, cfg, out.hidden, inputs, book.layer + 1, stop,
                          _stored(kv, book.layer, out), remat)
    if stop <= start:
        return h_btd, kv

    def body(i: Array, carry: tuple[Array, KVCache | None]) -> tuple[Array, KVCache | None]:
        h, cache = carry
        out = run_block(params, cfg, i, h, inputs, cache)
        return out.hidden, _stored(cache, i, out)

    policies = jax.checkpoint_policies
    policy = policies.nothing_saveable if remat else policies.dots_with_no_batch_dims_saveable
    return jax.lax.fori_loop(start, stop, jax.checkpoint(body, policy=policy), (h_btd, kv))
