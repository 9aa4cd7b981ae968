"""The config.json of the papers' real models, for shape-only work: memory estimates, roofline
counts and mesh checks at real sizes (no weights exist on these machines)."""

from __future__ import annotations

import copy
from typing import Any

from keedit_jax.models.config import ModelConfig, config_from_hf

# meta-llama/Meta-Llama-3-8B-Instruct and Qwen/Qwen2.5-7B-Instruct, as published.
PUBLISHED_CONFIGS: dict[str, dict[str, Any]] = {
    "Llama-3-8B": {
        "architectures": ["LlamaForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 128000, "eos_token_id": 128009,
        "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 8192, "model_type": "llama",
        "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8,
        "pretraining_tp": 1, "rms_norm_eps": 1e-05, "rope_scaling": None,
        "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.40.0.dev0", "use_cache": True, "vocab_size": 128256},
    "Qwen2.5-7B": {
        "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0,
        "bos_token_id": 151643, "eos_token_id": 151645, "hidden_act": "silu",
        "hidden_size": 3584, "initializer_range": 0.02, "intermediate_size": 18944,
        "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2",
        "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
        "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072,
        "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 152064},
}


def published_config(name: str) -> ModelConfig:
    """Our ModelConfig of a published model ("Llama-3-8B" or "Qwen2.5-7B")."""
    return config_from_hf(copy.deepcopy(PUBLISHED_CONFIGS[name]), f"{name}/config.json")
