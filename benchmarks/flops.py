"""Analytic FLOP counts of decoder passes, to cross-check XLA's own count.

XLA's cost analysis sees a while loop's body once, so for our layer loop it needs an unrolled
twin; this count needs nothing compiled. Only matmuls are counted (norms, softmax and RoPE
are a few percent), which is also what the matmul peak measures.
"""

from __future__ import annotations

from keedit_jax.models import ModelConfig


def layer_matmul_params(cfg: ModelConfig) -> int:
    """Weights one token multiplies through in one layer: q, k, v, o and the gated MLP."""
    q, kv = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    mlp = (3 if cfg.family == "llama" else 2) * cfg.d_model * cfg.d_ff
    return cfg.d_model * (2 * q + 2 * kv) + mlp


def forward(cfg: ModelConfig, *, tokens: int, key_len: int, layers: int,
            logit_tokens: int) -> float:
    """2·weights per token and layer, QKᵀ and PV over every key slot (masked slots are
    computed too), and the unembedding of the tokens whose logits are produced."""
    attention = 4 * key_len * cfg.n_heads * cfg.head_dim
    per_layer = tokens * (2 * layer_matmul_params(cfg) + attention)
    return float(layers * per_layer + logit_tokens * 2 * cfg.d_model * cfg.vocab_size)


def backward_inputs(cfg: ModelConfig, *, tokens: int, key_len: int, layers: int,
                    logit_tokens: int) -> float:
    """Backward pass for input gradients only (δ is the sole differentiated input, no weight
    gradients): one matmul per forward weight matmul, two per attention matmul."""
    attention = 8 * key_len * cfg.n_heads * cfg.head_dim
    per_layer = tokens * (2 * layer_matmul_params(cfg) + attention)
    return float(layers * per_layer + logit_tokens * 2 * cfg.d_model * cfg.vocab_size)


def stats_batch(cfg: ModelConfig, *, rows: int, length: int, stop: int, layers: int) -> float:
    """One statistics step as computed: the forward through layers [0, stop) over every padded
    slot (full T×S attention, masked slots included) and a 2F² Gram per slot and edited layer."""
    tokens = rows * length
    return forward(cfg, tokens=tokens, key_len=length, layers=stop, logit_tokens=0) \
        + tokens * layers * 2.0 * cfg.d_ff**2


def stats_useful(cfg: ModelConfig, doc_lengths: list[int], *, stop: int, layers: int) -> float:
    """The same work over real tokens only: a document of n tokens multiplies n tokens through
    the weights and the Grams, and its causal attention reads n(n+1)/2 keys."""
    tokens = sum(doc_lengths)
    keys = sum(n * (n + 1) // 2 for n in doc_lengths)
    return float(tokens * (stop * 2 * layer_matmul_params(cfg) + layers * 2.0 * cfg.d_ff**2)
                 + stop * 4 * keys * cfg.n_heads * cfg.head_dim)
