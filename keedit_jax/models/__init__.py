"""Decoder models as pure functions over HF-named parameter pytrees.

Public API: configs from config.json, checkpoint load/save, parameter helpers, the layer loop.
The seam that methods use (shifts and captures) is `keedit_jax.intervene`.
"""

from keedit_jax.models.checkpoint import (
    CheckpointError,
    LoadedModel,
    export_gguf,
    load_model,
    save_model,
    tensor_rules,
)
from keedit_jax.models.config import (
    ConfigError,
    LayerError,
    ModelConfig,
    RopeConfig,
    config_from_hf,
    read_hf_config,
)
from keedit_jax.models.generate import GenerationConfig, generate
from keedit_jax.models.layers import AttnInputs, KVCache
from keedit_jax.models.params import (
    abstract_params,
    cast,
    count,
    down_proj_path,
    get_path,
    init_params,
    layer,
    layer_stack,
    set_path,
)
from keedit_jax.models.transformer import embed, head, prompt_inputs, run_block, run_layers

__all__ = [
    "AttnInputs", "CheckpointError", "ConfigError", "LayerError",
    "GenerationConfig", "KVCache", "LoadedModel", "ModelConfig",
    "RopeConfig", "abstract_params", "cast", "config_from_hf", "count", "down_proj_path",
    "embed", "export_gguf",
    "generate", "get_path", "head", "init_params", "layer", "layer_stack", "load_model",
    "prompt_inputs", "read_hf_config", "run_block", "run_layers", "save_model", "set_path",
    "tensor_rules",
]
