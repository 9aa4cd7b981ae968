"""Batched generation: left-padded prompts, KV cache, greedy or temperature sampling (from the
full distribution, or with `top_k` among the k most likely tokens, as MEMIT's generate_fast).

The decode loop is one `lax.while_loop` that stops early once every row has emitted a stop
token. Prompt length and batch size are rounded up to shape buckets, so a sweep over prompts
compiles a handful of programs rather than one per prompt.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from keedit_jax import parallel
from keedit_jax.compile_cache import exported_jit
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.layers import CODEBOOK, AttnInputs, KVCache, attention_mask
from keedit_jax.models.params import Params
from keedit_jax.models.transformer import embed, head, prompt_inputs, run_layers

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class GenerationConfig:
    """How to decode. temperature 0 is greedy; otherwise sampling at `temperature`, among the
    `top_k` most likely tokens (0: all of them); stop_ids end a row (the stop token is kept)."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_k: int = 0
    stop_ids: tuple[int, ...] = ()
    pad_id: int = 0
    use_cache: bool = True
    min_prompt_bucket: int = 8

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0: the full distribution), got {self.top_k}")


def bucket(n: int, minimum: int = 1) -> int:
    """The next power of two >= max(n, minimum): the shape buckets we compile for."""
    return max(minimum, 1 << max(0, n - 1).bit_length())


def fine_bucket(n: int, minimum: int = 1) -> int:
    """The next of 2^k·{1, 5/4, 3/2, 7/4} >= max(n, minimum), a power of two up to 32: at most
    four shape buckets per doubling (multiples of 8 above 32), at most 25% padding beyond 32
    where `bucket` pads up to 100% (159 tokens: 160, not 256)."""
    n = max(n, minimum)
    top = bucket(n)
    if top <= 32:
        return top
    return next(c for c in (top * q // 8 for q in (5, 6, 7, 8)) if c >= n)


def left_pad(prompts: Sequence[Sequence[int]], length: int, rows: int,
             pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Tokens and mask [rows, length], prompts right-aligned; extra rows are all padding."""
    tokens = np.full((rows, length), pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for row, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {row} is empty")
        tokens[row, length - len(prompt):] = prompt
        mask[row, length - len(prompt):] = 1
    return tokens, mask


def generate(params: Params, cfg: ModelConfig, prompts: Sequence[Sequence[int]],
             gen: GenerationConfig, key: Array | None = None) -> list[list[int]]:
    """Generate continuations of token-id prompts; each ends at (and includes) a stop token."""
    longest = max(len(p) for p in prompts)
    if longest + gen.max_new_tokens > cfg.max_positions:
        raise ValueError(
            f"prompt of {longest} tokens + {gen.max_new_tokens} new tokens exceeds the model's "
            f"{cfg.max_positions} positions")
    length = min(bucket(longest, gen.min_prompt_bucket), cfg.max_positions - gen.max_new_tokens)
    tokens, mask = left_pad(prompts, length, bucket(len(prompts)), gen.pad_id)
    key = jax.random.key(0) if key is None else key
    decode = _generate_cached if gen.use_cache else _generate_recompute
    out = parallel.to_host(decode(params, cfg, parallel.put_rows(tokens),
                                  parallel.put_rows(mask), key, gen))
    return [_until_stop(row, gen.stop_ids) for row in out[: len(prompts)]]


def _until_stop(row: np.ndarray, stop_ids: tuple[int, ...]) -> list[int]:
    for i, token in enumerate(row.tolist()):
        if token in stop_ids:
            return row[: i + 1].tolist()
    return row.tolist()


def sample_tokens(logits_bv: Array, key: Array, temperature: float, top_k: int = 0) -> Array:
    """One token per row [B]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) restricted to the row's `top_k` largest logits (0 or at
    least the vocabulary: unrestricted), renormalised, as MEMIT's generate_fast samples."""
    if temperature == 0.0:
        return jnp.argmax(logits_bv, axis=-1).astype(jnp.int32)
    scaled = logits_bv.astype(jnp.float32) / temperature
    if 0 < top_k < scaled.shape[-1]:
        values, indices = jax.lax.top_k(scaled, top_k)
        chosen = jax.random.categorical(key, values)
        return jnp.take_along_axis(indices, chosen[:, None], axis=-1)[:, 0].astype(jnp.int32)
    return jax.random.categorical(key, scaled).astype(jnp.int32)


def _decode_loop(first_logits: Array, step_fn, key: Array, gen: GenerationConfig,
                 state: object) -> Array:
    """Shared sampling loop: sample, record, stop rows that emitted a stop id, feed back."""
    batch = first_logits.shape[0]
    stop_ids = jnp.asarray(gen.stop_ids or (-1,), jnp.int32)
    out = jnp.full((batch, gen.max_new_tokens), gen.pad_id, jnp.int32)
    done = jnp.zeros((batch,), bool)

    def cond(carry: tuple) -> Array:
        step, _, done, *_ = carry
        return (step < gen.max_new_tokens) & ~jnp.all(done)

    def body(carry: tuple) -> tuple:
        step, logits, done, out, state = carry
        token = sample_tokens(logits, jax.random.fold_in(key, step), gen.temperature,
                              gen.top_k)
        token = jnp.where(done, gen.pad_id, token)
        out = out.at[:, step].set(token)
        done = done | jnp.isin(token, stop_ids)
        logits, state = step_fn(step, token, state)
        return step + 1, logits, done, out, state

    carry = (jnp.int32(0), first_logits, done, out, state)
    return jax.lax.while_loop(cond, body, carry)[3]


@partial(exported_jit, static_argnames=("cfg", "gen"))
def _generate_cached(params: Params, cfg: ModelConfig, tokens_bt: Array, mask_bt: Array,
                     key: Array, gen: GenerationConfig) -> Array:
    """Prefill the prompt into a KV cache of T + max_new slots, then decode one token a step."""
    b, t = tokens_bt.shape
    slots = t + gen.max_new_tokens
    dtype = params_dtype(params)
    shape = (cfg.n_layers, b, slots, cfg.n_kv_heads, cfg.head_dim)
    cache = KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))
    slot_valid = jnp.concatenate([mask_bt, jnp.ones((b, gen.max_new_tokens), mask_bt.dtype)], 1)
    prompt = prompt_inputs(cfg, mask_bt)
    inputs = AttnInputs(prompt.positions, attention_mask(
        jnp.broadcast_to(jnp.arange(t), (b, t)), slot_valid, cfg.sliding_window), jnp.int32(0))
    h = embed(params, cfg, tokens_bt, inputs.positions)
    h, cache = run_layers(params, cfg, h, inputs, 0, cfg.n_layers, cache)
    next_position = jnp.sum(mask_bt, axis=1).astype(jnp.int32)

    def step_fn(step: Array, token_b: Array, cache: KVCache) -> tuple[Array, KVCache]:
        slot = t + step
        positions = (next_position + step)[:, None]
        mask = attention_mask(jnp.full((b, 1), slot), slot_valid, cfg.sliding_window)
        x = embed(params, cfg, token_b[:, None], positions)
        x, cache = run_layers(params, cfg, x, AttnInputs(positions, mask, slot), 0,
                              cfg.n_layers, cache)
        return head(params, cfg, x)[:, -1], cache

    return _decode_loop(head(params, cfg, h[:, -1:])[:, -1], step_fn, key, gen, cache)


@partial(jax.jit, static_argnames=("cfg", "gen"))
def _generate_recompute(params: Params, cfg: ModelConfig, tokens_bt: Array, mask_bt: Array,
                        key: Array, gen: GenerationConfig) -> Array:
    """Reference decoder without a cache: the whole sequence is recomputed at every step."""
    b, t = tokens_bt.shape
    pad = jnp.zeros((b, gen.max_new_tokens), jnp.int32)
    tokens = jnp.concatenate([tokens_bt, pad + gen.pad_id], axis=1)
    mask = jnp.concatenate([mask_bt, pad], axis=1)

    def logits_at(tokens: Array, mask: Array, slot: Array) -> Array:
        inputs = prompt_inputs(cfg, mask)
        h, _ = run_layers(params, cfg, embed(params, cfg, tokens, inputs.positions), inputs, 0,
                          cfg.n_layers)
        return head(params, cfg, jax.lax.dynamic_slice_in_dim(h, slot, 1, axis=1))[:, 0]

    def step_fn(step: Array, token_b: Array, state: tuple) -> tuple[Array, tuple]:
        tokens, mask = state
        tokens = tokens.at[:, t + step].set(token_b)
        mask = mask.at[:, t + step].set(1)
        return logits_at(tokens, mask, t + step), (tokens, mask)

    return _decode_loop(logits_at(tokens, mask, t - 1), step_fn, key, gen, (tokens, mask))


def params_dtype(params: Params) -> jnp.dtype:
    """The model's dtype (a GRACE codebook's float32 keys are not the model's)."""
    return jax.tree.leaves({k: v for k, v in params.items() if k != CODEBOOK})[0].dtype
