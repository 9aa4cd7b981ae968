"""Model configuration read from a Hugging Face ``config.json``.

The config is a frozen, hashable dataclass so that it can be a static argument of ``jax.jit``.
Every attribute of the checkpoint's config that changes the computation must be one we
implement: anything else raises (penzai's guard, STYLE.md §2), so a Llama-3 checkpoint can never
load with its RoPE scaling silently ignored, as transformers' old Flax models did.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np

Family = Literal["llama", "gpt2", "gptj"]

# model_type -> the family whose math it uses. Qwen2 and Mistral are Llama-shaped decoders that
# differ only in biases, tying and sliding windows, which are config fields here.
MODEL_TYPE_FAMILY: dict[str, Family] = {
    "llama": "llama",
    "qwen2": "llama",
    "mistral": "llama",
    "gpt2": "gpt2",
    "gptj": "gptj",
}

_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh",
                "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu", "relu": "relu"}

# Keys that never change the forward computation (training, bookkeeping, generation defaults).
_BENIGN_KEYS = frozenset({
    "architectures", "transformers_version", "torch_dtype", "dtype", "initializer_range",
    "use_cache", "attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop",
    "summary_activation", "summary_first_dropout", "summary_proj_to_labels", "summary_type",
    "summary_use_proj", "task_specific_params", "bos_token_id", "eos_token_id",
    "pad_token_id", "model_type", "pretraining_tp", "max_window_layers", "_name_or_path",
    "n_ctx", "output_past", "output_attentions", "output_hidden_states", "return_dict",
    "id2label", "label2id", "tokenizer_class", "is_decoder", "gradient_checkpointing",
    "reorder_and_upcast_attn", "rope_theta", "rope_scaling", "rope_parameters", "head_dim",
    "layer_types", "use_sliding_window", "sliding_window", "tie_word_embeddings",
    "attention_bias", "mlp_bias", "add_cross_attention", "scale_attn_weights",
    "scale_attn_by_inverse_layer_idx", "activation_function", "hidden_act", "n_inner",
    "rotary", "rotary_dim", "layer_norm_epsilon", "rms_norm_eps",
    # Bookkeeping of published checkpoints (tests/fixtures/published_configs.json): a GGUF->HF
    # conversion's unk id and source name, nanotron's and transformers.js's markers, the
    # autoset attention backend, and GPT-2 keys left from OpenAI GPT that transformers ignores.
    "unk_token_id", "_model_name_or_path", "is_llama_config", "transformers.js_config",
    "_attn_implementation_autoset", "n_special", "predict_special_tokens", "rope_interleaved",
    "use_mrope",
})
# Keys whose value must equal the one given here, or the computation would differ.
_REQUIRED_VALUES: dict[str, Any] = {
    "add_cross_attention": False,
    "scale_attn_by_inverse_layer_idx": False,
    "scale_attn_weights": True,
    "rope_interleaved": False,  # nanotron's flag: True would pair (x[2i], x[2i+1]) in Llama
    # Qwen2.5 text checkpoints carry use_mrope=false; True declares Qwen2-VL's 3-D multimodal
    # rotary positions, which a text forward pass does not compute.
    "use_mrope": False,
}


class ConfigError(ValueError):
    """A checkpoint config that this library cannot honour exactly."""


class LayerError(IndexError):
    """A layer index (from a flag or a config) outside the model: bad input, not a bug."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeConfig:
    """Rotary position embedding: which frequencies, on how many dims, in which pairing.

    style "half" rotates (x[i], x[i + R/2]) as Llama does; "interleaved" rotates
    (x[2i], x[2i+1]) as GPT-J does.
    """

    theta: float
    rotary_dim: int
    style: Literal["half", "interleaved"]
    scaling: Literal["default", "linear", "llama3"] = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192

    def inverse_frequencies(self) -> np.ndarray:
        """Inverse frequencies [R/2] in float32, computed as transformers computes them."""
        exponents = np.arange(0, self.rotary_dim, 2, dtype=np.int64).astype(np.float32)
        inv_freq = (1.0 / (np.float32(self.theta) ** (exponents / self.rotary_dim)))
        inv_freq = inv_freq.astype(np.float32)
        if self.scaling == "linear":
            return (inv_freq / self.factor).astype(np.float32)
        if self.scaling == "llama3":
            return _llama3_scaled(inv_freq, self)
        return inv_freq


def _llama3_scaled(inv_freq: np.ndarray, rope: RopeConfig) -> np.ndarray:
    """Llama-3.1 frequency scaling: long wavelengths divided by `factor`, a smooth ramp between."""
    low_wavelen = rope.original_max_positions / rope.low_freq_factor
    high_wavelen = rope.original_max_positions / rope.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_wavelen, inv_freq / rope.factor, inv_freq)
    smooth = (rope.original_max_positions / wavelen - rope.low_freq_factor) / (
        rope.high_freq_factor - rope.low_freq_factor)
    smoothed = (1 - smooth) * scaled / rope.factor + smooth * scaled
    is_medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """Everything the forward pass needs, derived from a checkpoint's config.json.

    Kernels are stored [d_in, d_out]; layers are stacked on a leading L axis.
    """

    model_type: str
    family: Family
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    d_ff: int
    max_positions: int
    norm: Literal["rms", "layer"]
    norm_eps: float
    activation: str
    rope: RopeConfig | None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    lm_head_bias: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        if self.n_heads % self.n_kv_heads:
            raise ConfigError(
                f"num_attention_heads={self.n_heads} is not a multiple of "
                f"num_key_value_heads={self.n_kv_heads}")
        if self.rope is not None and self.rope.rotary_dim > self.head_dim:
            raise ConfigError(f"rotary_dim={self.rope.rotary_dim} > head_dim={self.head_dim}")

    @property
    def mlp_key_dim(self) -> int:
        """Width F of the down-projection input (the MEMIT key)."""
        return self.d_ff

    def check_layer(self, layer: int, what: str = "layer") -> int:
        """Validate a layer index, naming the range, so that a bad flag fails before any work."""
        if not 0 <= layer < self.n_layers:
            raise LayerError(
                f"{what} {layer} is out of range: this {self.model_type} model has layers "
                f"0..{self.n_layers - 1}")
        return layer


def read_hf_config(path: str | Path) -> dict[str, Any]:
    """Read config.json from a checkpoint directory (or the file itself)."""
    path = Path(path)
    file = path / "config.json" if path.is_dir() else path
    if not file.exists():
        raise FileNotFoundError(f"no config.json in {path}")
    try:
        hf = json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from err
    if not isinstance(hf, dict):
        raise ConfigError(f"{file}: a config must be a JSON object, got a {type(hf).__name__}")
    return hf


def config_from_hf(hf: Mapping[str, Any], source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from a Hugging Face config dict, refusing what we do not implement."""
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPE_FAMILY:
        raise ConfigError(
            f"{source}: unsupported model_type {model_type!r}; supported: "
            f"{sorted(MODEL_TYPE_FAMILY)}")
    _refuse_unknown_keys(hf, source)
    family = MODEL_TYPE_FAMILY[model_type]
    builder = {"llama": _llama_like, "gpt2": _gpt2, "gptj": _gptj}[family]
    return builder(hf, source)


def _refuse_unknown_keys(hf: Mapping[str, Any], source: str) -> None:
    family = MODEL_TYPE_FAMILY[hf["model_type"]]
    shape_keys = {
        "llama": {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                  "num_attention_heads", "num_key_value_heads", "max_position_embeddings"},
        "gpt2": {"vocab_size", "n_embd", "n_layer", "n_head", "n_positions"},
        "gptj": {"vocab_size", "n_embd", "n_layer", "n_head", "n_positions"},
    }[family]
    unknown = sorted(set(hf) - _BENIGN_KEYS - shape_keys)
    if unknown:
        raise ConfigError(
            f"{source}: config keys {unknown} are not implemented for model_type "
            f"{hf['model_type']!r}; refusing to load a model we might compute wrongly")
    for key, required in _REQUIRED_VALUES.items():
        if hf.get(key, required) != required:
            raise ConfigError(f"{source}: {key}={hf[key]!r} is not supported (need {required!r})")


_NO_DEFAULT = object()


def _size(hf: Mapping[str, Any], key: str, source: str, default: Any = _NO_DEFAULT) -> int:
    """A positive integer field (a width, a count), named when it is missing or not one."""
    value = hf.get(key)
    if value is None and default is not _NO_DEFAULT:  # absent or null: the family's default
        value = default
    if value is None:
        raise ConfigError(f"{source}: the required key {key!r} is missing")
    if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value) \
            or value <= 0:
        raise ConfigError(f"{source}: {key}={value!r} must be a positive integer")
    return int(value)


def _activation(name: str, source: str) -> str:
    if name not in _ACTIVATIONS:
        raise ConfigError(f"{source}: activation {name!r} is not implemented")
    return _ACTIVATIONS[name]


def _eos_ids(hf: Mapping[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    if eos is None:
        return ()
    return tuple(eos) if isinstance(eos, list) else (int(eos),)


def _rope_parameters(hf: Mapping[str, Any]) -> dict[str, Any]:
    """Merge transformers-4 (`rope_theta` + `rope_scaling`) and -5 (`rope_parameters`) styles."""
    params = dict(hf.get("rope_parameters") or {})
    params.update(hf.get("rope_scaling") or {})
    if "type" in params and "rope_type" not in params:
        params["rope_type"] = params.pop("type")
    params.setdefault("rope_theta", hf.get("rope_theta", 10000.0))
    params.setdefault("rope_type", "default")
    return params


def _llama_rope(hf: Mapping[str, Any], head_dim: int, source: str) -> RopeConfig:
    params = _rope_parameters(hf)
    kind = params["rope_type"]
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"{source}: partial_rotary_factor is not implemented")
    known = {"rope_type", "rope_theta", "factor", "low_freq_factor", "high_freq_factor",
             "original_max_position_embeddings", "partial_rotary_factor"}
    if kind not in ("default", "linear", "llama3") or set(params) - known:
        raise ConfigError(
            f"{source}: rope scaling {dict(params)} is not implemented (supported types: "
            "default, linear, llama3)")
    extra = {}
    if kind in ("linear", "llama3"):
        extra["factor"] = float(params["factor"])
    if kind == "llama3":
        extra.update(
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_positions=int(params["original_max_position_embeddings"]))
    return RopeConfig(theta=float(params["rope_theta"]), rotary_dim=head_dim, style="half",
                      scaling=kind, **extra)


def _sliding_window(hf: Mapping[str, Any], source: str) -> int | None:
    """Mistral applies `sliding_window` whenever set; Qwen2 only with `use_sliding_window`."""
    window = hf.get("sliding_window")
    if hf["model_type"] == "qwen2":
        if not hf.get("use_sliding_window", False):
            return None
        if any(t != "sliding_attention" for t in hf.get("layer_types") or []):
            raise ConfigError(f"{source}: per-layer sliding windows are not implemented")
        return int(window)
    if hf["model_type"] == "llama" and window is not None:
        raise ConfigError(f"{source}: sliding_window is not a llama setting")
    return None if window is None else int(window)


def _llama_like(hf: Mapping[str, Any], source: str) -> ModelConfig:
    n_heads, d_model = (_size(hf, "num_attention_heads", source),
                        _size(hf, "hidden_size", source))
    head_dim = _size(hf, "head_dim", source, default=d_model // n_heads)
    is_qwen2 = hf["model_type"] == "qwen2"
    return ModelConfig(
        model_type=hf["model_type"], family="llama", vocab_size=_size(hf, "vocab_size", source),
        d_model=d_model, n_layers=_size(hf, "num_hidden_layers", source),
        n_heads=n_heads, n_kv_heads=_size(hf, "num_key_value_heads", source, default=n_heads),
        head_dim=head_dim, d_ff=_size(hf, "intermediate_size", source),
        max_positions=_size(hf, "max_position_embeddings", source, default=2048),
        norm="rms", norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        activation=_activation(hf.get("hidden_act", "silu"), source),
        rope=_llama_rope(hf, head_dim, source),
        qkv_bias=is_qwen2 or bool(hf.get("attention_bias", False)),
        o_bias=bool(hf.get("attention_bias", False)), mlp_bias=bool(hf.get("mlp_bias", False)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=_sliding_window(hf, source), bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf), pad_token_id=hf.get("pad_token_id"))


def _gpt2(hf: Mapping[str, Any], source: str) -> ModelConfig:
    d_model, n_heads = _size(hf, "n_embd", source), _size(hf, "n_head", source)
    return ModelConfig(
        model_type="gpt2", family="gpt2", vocab_size=_size(hf, "vocab_size", source),
        d_model=d_model, n_layers=_size(hf, "n_layer", source), n_heads=n_heads,
        n_kv_heads=n_heads, head_dim=d_model // n_heads,
        d_ff=_size(hf, "n_inner", source, default=4 * d_model),
        max_positions=_size(hf, "n_positions", source), norm="layer",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=_activation(hf.get("activation_function", "gelu_new"), source), rope=None,
        qkv_bias=True, o_bias=True, mlp_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"))


def _gptj(hf: Mapping[str, Any], source: str) -> ModelConfig:
    d_model, n_heads = _size(hf, "n_embd", source), _size(hf, "n_head", source)
    head_dim = d_model // n_heads
    rotary_dim = _size(hf, "rotary_dim", source, default=head_dim)
    return ModelConfig(
        model_type="gptj", family="gptj", vocab_size=_size(hf, "vocab_size", source),
        d_model=d_model, n_layers=_size(hf, "n_layer", source), n_heads=n_heads,
        n_kv_heads=n_heads, head_dim=head_dim,
        d_ff=_size(hf, "n_inner", source, default=4 * d_model),
        max_positions=_size(hf, "n_positions", source),
        norm="layer", norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        activation=_activation(hf.get("activation_function", "gelu_new"), source),
        rope=RopeConfig(theta=10000.0, rotary_dim=rotary_dim, style="interleaved"),
        mlp_bias=True, lm_head_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        bos_token_id=hf.get("bos_token_id"), eos_token_ids=_eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"))
