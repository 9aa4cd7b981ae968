"""Testing kit shared by tests, notebooks and benchmarks.

- Tiny random Hugging Face checkpoints (PyTorch, safetensors) for parity against transformers.
- A tiny tokenizer with a chat template, loadable offline with `AutoTokenizer`.
- Pytree assertions whose messages name the failing leaf.
- The published config.json of Llama-3-8B and Qwen2.5-7B, for work at real shapes.

torch and transformers are imported only when a checkpoint or tokenizer is built.
"""

from keedit_jax.testing._batches import (
    cached_model,
    cached_torch_model,
    left_padded_batch,
    real_tokens,
    torch_inputs,
)
from keedit_jax.testing._hf_models import (
    FAMILIES,
    load_hf_torch_model,
    save_tiny_hf_model,
    tiny_hf_config,
)
from keedit_jax.testing._published import PUBLISHED_CONFIGS, published_config
from keedit_jax.testing._tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, save_tiny_tokenizer
from keedit_jax.testing._trees import assert_trees_close, assert_trees_equal

__all__ = [
    "CHAT_TEMPLATE",
    "FAMILIES",
    "PUBLISHED_CONFIGS",
    "SPECIAL_TOKENS",
    "assert_trees_close",
    "assert_trees_equal",
    "cached_model",
    "cached_torch_model",
    "left_padded_batch",
    "real_tokens",
    "torch_inputs",
    "load_hf_torch_model",
    "published_config",
    "save_tiny_hf_model",
    "save_tiny_tokenizer",
    "tiny_hf_config",
]
