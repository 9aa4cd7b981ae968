"""Hugging Face safetensors checkpoints <-> our parameter pytree, in both directions.

One rule maps every leaf: its path joined with dots is the HF key (the layer index inserted
after the layers path), `kernel`/`embedding`/`scale` are HF's `weight`, and kernels are
transposed except for GPT-2's Conv1D. The same rule, run backwards, writes an edited model that
transformers loads unchanged. Pickle checkpoints are refused; nothing is ever unpickled and
no remote code is run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import logging
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

from keedit_jax.files import staged_directory
from keedit_jax.models import gguf
from keedit_jax.models.config import ModelConfig, config_from_hf, read_hf_config
from keedit_jax.models.family import get_family
from keedit_jax.models.params import Params, abstract_params, get_path, to_device

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
HF_LEAF_NAME = {"kernel": "weight", "embedding": "weight", "scale": "weight", "bias": "bias"}
_NP_DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
# Files copied next to an exported checkpoint so that it is complete (tokenizer, generation).
_SIDECAR_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "chat_template.jinja", "tokenizer.model",
                  "vocab.json", "merges.txt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as it is; the message names the file and tensor."""


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """Where one HF tensor goes: our leaf `path`, at `layer` of the stack (or None), transposed?"""

    path: tuple[str, ...]
    layer: int | None
    transpose: bool
    shape: tuple[int, ...]  # the HF tensor's shape


@dataclasses.dataclass(frozen=True)
class LoadedModel:
    """A checkpoint loaded for computation: config, parameters, and where it came from."""

    config: ModelConfig
    params: Params
    hf_config: dict[str, Any]
    path: Path


def tensor_rules(cfg: ModelConfig) -> dict[str, TensorRule]:
    """HF key -> rule for every tensor the model needs (the family's conversion table)."""
    family = get_family(cfg)
    abstract = abstract_params(cfg)
    rules = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(abstract)[0]:
        path = tuple(k.key for k in key_path)
        transpose = path[-1] == "kernel" and not family.conv1d
        hf_leaf = HF_LEAF_NAME[path[-1]]
        stacked = path[: len(family.layers_path)] == family.layers_path
        if not stacked:
            shape = leaf.shape[::-1] if transpose else leaf.shape
            rules[".".join(path[:-1] + (hf_leaf,))] = TensorRule(path, None, transpose, shape)
            continue
        inner = ".".join(path[len(family.layers_path):-1] + (hf_leaf,))
        shape = leaf.shape[1:][::-1] if transpose else leaf.shape[1:]
        for index in range(cfg.n_layers):
            key = f"{'.'.join(family.layers_path)}.{index}.{inner}"
            rules[key] = TensorRule(path, index, transpose, shape)
    return rules


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory; pickle-only checkpoints are refused."""
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint directory {directory} does not exist")
    index = directory / INDEX_FILE
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise CheckpointError(f"{index}: not a safetensors index ({err})") from err
        files = [directory / name for name in sorted(set(weight_map.values()))]
        missing = [f.name for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{index} names shard files that are missing: {missing}")
        return files
    if (directory / SINGLE_FILE).exists():
        return [directory / SINGLE_FILE]
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise CheckpointError(
            f"{directory} holds only pickle weights {pickles}; keedit_jax loads safetensors "
            "only and never unpickles. Convert it once where you trust the file, e.g. "
            "`AutoModelForCausalLM.from_pretrained(dir).save_pretrained(out, "
            "safe_serialization=True)`.")
    raise CheckpointError(f"{directory}: no {SINGLE_FILE} or {INDEX_FILE}")


def _resolve_key(key: str, rules: dict[str, TensorRule]) -> str | None:
    """Accept keys saved from the base model (GPT-2 hub files lack the `transformer.` prefix)."""
    if key in rules:
        return key
    for prefix in ("transformer.", "model."):
        if prefix + key in rules:
            return prefix + key
    return None


@dataclasses.dataclass(frozen=True)
class TensorSource:
    """Where one rule's tensor is stored: the file and the key it has there."""

    file: Path
    key: str


def index_tensors(files: list[Path], rules: Mapping[str, TensorRule],
                  resolve: Callable[[str], str | None],
                  ignored: Callable[[str], bool]) -> dict[str, TensorSource]:
    """Rule key -> where its tensor is, from the files' headers alone (no tensor is read);
    every unexpected, duplicated, mis-shaped or missing tensor is collected into one
    CheckpointError.

    resolve maps a file's key to a key of `rules` (None: no rule); ignored says which keys
    without a rule are expected (buffers, tied heads) rather than errors.
    """
    found: dict[str, TensorSource] = {}
    errors: list[str] = []
    for file in files:
        try:
            with safe_open(str(file), framework="np") as handle:
                shapes = {k: tuple(handle.get_slice(k).get_shape()) for k in handle.keys()}  # noqa: SIM118
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise CheckpointError(f"{file}: not a readable safetensors file ({err})") from err
        for raw_key, shape in shapes.items():
            key = resolve(raw_key)
            if key is None:
                if not ignored(raw_key):
                    errors.append(f"{file.name}: unexpected tensor {raw_key!r} {shape}")
            elif key in found:
                errors.append(f"{file.name}: tensor {raw_key!r} duplicated (also in "
                              f"{found[key].file.name})")
            elif shape != rules[key].shape:
                errors.append(f"{file.name}: tensor {raw_key!r} has shape {shape}, "
                              f"config.json implies {rules[key].shape}")
            else:
                found[key] = TensorSource(file, raw_key)
    missing = sorted(set(rules) - set(found))
    if missing:
        names = ", ".join(missing[:8]) + (f" and {len(missing) - 8} more" if len(missing) > 8
                                          else "")
        errors.append(f"missing tensors (searched {[f.name for f in files]}): {names}")
    if errors:
        raise CheckpointError(f"{files[0].parent}:\n  " + "\n  ".join(errors))
    return found


class _OpenFiles:
    """safetensors handles opened once per file for the many slice reads of one load; each
    block is checked finite unless `check_finite` is off (a NaN weight would otherwise
    surface only as a non-finite loss, far from the tensor that holds it)."""

    def __init__(self, stack: contextlib.ExitStack, check_finite: bool = True) -> None:
        self._stack = stack
        self._handles: dict[Path, Any] = {}
        self.values_read = 0
        self.check_finite = check_finite

    def slice(self, source: TensorSource, index: tuple[slice, ...]) -> np.ndarray:
        try:
            if source.file not in self._handles:
                self._handles[source.file] = self._stack.enter_context(
                    safe_open(str(source.file), framework="np"))
            block = self._handles[source.file].get_slice(source.key)[index]
        except (OSError, ValueError, RuntimeError, SafetensorError) as err:
            raise CheckpointError(f"{source.file}: tensor {source.key!r} is not readable "
                                  f"({err})") from err
        if self.check_finite and not np.isfinite(block).all():
            bad = int(block.size - np.isfinite(block).sum())
            raise CheckpointError(f"{source.file}: tensor {source.key!r} holds {bad} non-finite "
                                  "value(s) (NaN or inf): the checkpoint is damaged")
        self.values_read += block.size
        return block


def load_model(path: str | os.PathLike, dtype: jnp.dtype = jnp.float32,
               shardings: Callable[[ModelConfig], Params | None] | None = None, *,
               check_finite: bool = True) -> LoadedModel:
    """Load an HF checkpoint directory (single-file or sharded safetensors, any float dtype),
    a GGUF file or a named real model (`gguf.NAMED_MODELS`, through its cached HF
    conversion), casting every parameter to `dtype`. All problems are collected and raised
    together.

    shardings(cfg) gives each parameter's NamedSharding (`parallel.model_shardings`); every
    device's block is then read straight from the files, so no host holds the whole model.
    `check_finite=False` skips the NaN/inf check of every tensor (a pass over the weights).
    """
    directory = gguf.hf_directory(path) if gguf.is_gguf(path) else Path(path)
    hf_config = read_hf_config(directory)
    cfg = config_from_hf(hf_config, str(directory / "config.json"))
    files = checkpoint_files(directory)
    placement = shardings(cfg) if shardings else None
    params = _read_params(cfg, files, np.dtype(dtype), placement, check_finite)
    return LoadedModel(cfg, params, hf_config, directory)


def read_tensors(files: list[Path], rules: Mapping[str, TensorRule],
                 resolve: Callable[[str], str | None], ignored: Callable[[str], bool],
                 write: Callable[[TensorRule, np.ndarray], None]) -> None:
    """Hand every tensor of `files` to `write` with its rule, already transposed, after
    `index_tensors` has checked them all."""
    sources = index_tensors(files, rules, resolve, ignored)
    with contextlib.ExitStack() as stack:
        opened = _OpenFiles(stack)
        for key, source in sources.items():
            tensor = opened.slice(source, (slice(None),) * len(rules[key].shape))
            write(rules[key], tensor.T if rules[key].transpose else tensor)


def _read_params(cfg: ModelConfig, files: list[Path], dtype: np.dtype,
                 shardings: Params | None, check_finite: bool = True) -> Params:
    """Each leaf as one jax.Array built from the blocks its devices hold (the whole leaf on
    the default device when `shardings` is None)."""
    rules = tensor_rules(cfg)
    ignored = [re.compile(p) for p in get_family(cfg).ignored_keys]
    if cfg.tie_embeddings:  # some tied checkpoints also store the head; it is the embedding
        ignored.append(re.compile(r"^lm_head\.weight$"))
    sources = index_tensors(files, rules, lambda raw: _resolve_key(raw, rules),
                            lambda raw: any(p.search(raw) for p in ignored))
    by_leaf: dict[tuple[str, ...], dict[int | None, str]] = {}
    for key, rule in rules.items():
        by_leaf.setdefault(rule.path, {})[rule.layer] = key
    with contextlib.ExitStack() as stack:
        opened = _OpenFiles(stack, check_finite)

        def block(leaf_path: tuple[str, ...], index: tuple[slice, ...]) -> np.ndarray:
            """The block `index` of our leaf, read from the HF tensors it comes from."""
            keys = by_leaf[leaf_path]
            if None in keys:
                return _read_block(opened, sources[keys[None]], rules[keys[None]], index)
            layers = range(*index[0].indices(len(keys)))
            return np.stack([_read_block(opened, sources[keys[i]], rules[keys[i]], index[1:])
                             for i in layers])

        flat = {}
        for path, leaf in _flat_abstract(cfg).items():
            if shardings is None:  # uncommitted: free to join any mesh later
                whole = tuple(slice(None) for _ in leaf.shape)
                flat[path] = to_device(block(path, whole).astype(dtype, copy=False))
                continue
            flat[path] = jax.make_array_from_callback(
                leaf.shape, get_path(shardings, path),
                lambda index, path=path: block(path, index).astype(dtype, copy=False))
    stored = sum(math.prod(rule.shape) for rule in rules.values())
    logging.info("process %d read %d of the checkpoint's %d values (its devices' blocks)",
                 jax.process_index(), opened.values_read, stored)
    return _unflatten(flat)


def _read_block(opened: _OpenFiles, source: TensorSource, rule: TensorRule,
                index: tuple[slice, ...]) -> np.ndarray:
    """Our [d_in, d_out] block of an HF tensor stored [d_out, d_in] when transposed."""
    index = tuple(index) + (slice(None),) * (len(rule.shape) - len(index))
    if rule.transpose:
        return opened.slice(source, index[::-1]).T
    return opened.slice(source, index)


def _flat_abstract(cfg: ModelConfig) -> dict[tuple[str, ...], jax.ShapeDtypeStruct]:
    flat = jax.tree_util.tree_flatten_with_path(abstract_params(cfg))[0]
    return {tuple(k.key for k in path): leaf for path, leaf in flat}


def _unflatten(flat: dict[tuple[str, ...], Any]) -> Params:
    tree: Params = {}
    for path, value in flat.items():
        node = tree
        for name in path[:-1]:
            node = node.setdefault(name, {})
        node[path[-1]] = value
    return tree


def hf_tensors(cfg: ModelConfig, params: Params, dtype: str) -> dict[str, np.ndarray]:
    """Our pytree as HF-named numpy tensors (layers unstacked, kernels transposed back)."""
    np_dtype = _NP_DTYPES[dtype]
    tensors = {}
    for key, rule in tensor_rules(cfg).items():
        value = np.asarray(get_path(params, rule.path))
        value = value if rule.layer is None else value[rule.layer]
        value = value.T if rule.transpose else value
        tensors[key] = np.ascontiguousarray(value.astype(np_dtype))
    return tensors


def save_model(directory: str | os.PathLike, cfg: ModelConfig, params: Params,
               hf_config: dict[str, Any], *, dtype: str = "float32",
               max_shard_bytes: int | None = None, copy_from: str | os.PathLike | None = None,
               overwrite: bool = False, format: str = "safetensors") -> Path:
    """Write an HF checkpoint (config.json + safetensors, sharded above `max_shard_bytes`),
    or with format="gguf" one GGUF file at `directory` that llama.cpp runs (dtype float32,
    float16, bfloat16 or q8_0; metadata and tokenizer from `copy_from`, see gguf.write_gguf).

    The output appears complete or not at all: it is written beside its target and renamed
    into place. `copy_from` copies tokenizer/generation files.
    """
    target = Path(directory)
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists; pass overwrite=True to replace it")
    if format == "gguf":
        return export_gguf(target, cfg, params, dtype=dtype, source=copy_from)
    if format != "safetensors":
        raise ValueError(f"format must be safetensors or gguf, not {format!r}")
    if dtype not in _NP_DTYPES:
        raise ValueError(f"dtype must be one of {sorted(_NP_DTYPES)}, not {dtype!r}")
    with staged_directory(target) as staging:
        write_tensors(staging, hf_tensors(cfg, params, dtype).items(), max_shard_bytes)
        config = {**hf_config, "dtype": dtype}
        config.pop("torch_dtype", None)
        (staging / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        for name in _SIDECAR_FILES if copy_from else ():
            source = Path(copy_from) / name
            if source.exists():
                shutil.copy2(source, staging / name)
    return target


def export_gguf(file: str | os.PathLike, cfg: ModelConfig, params: Params, *,
                dtype: str = "float16", source: str | os.PathLike | None = None) -> Path:
    """The (edited) model as one GGUF file for llama.cpp: dtype float32, float16, bfloat16 or
    q8_0; metadata and tokenizer from the checkpoint directory `source` (gguf.write_gguf)."""
    if dtype not in gguf.GGUF_TYPES:
        raise ValueError(f"GGUF dtype must be one of {sorted(gguf.GGUF_TYPES)}, not {dtype!r}")
    gguf.check_exportable(cfg)
    return gguf.write_gguf(file, cfg, hf_tensors(cfg, params, "float32"),
                           tensor_type=gguf.GGUF_TYPES[dtype], source=source)


def write_tensors(directory: Path, tensors: Iterable[tuple[str, np.ndarray]],
                  max_shard_bytes: int | None) -> None:
    """safetensors files of `tensors` in order (HF naming, an index when there are several),
    each shard written before the next would pass `max_shard_bytes`, so a lazily produced
    stream is held one shard at a time."""
    metadata = {"format": "pt"}
    written: list[tuple[Path, list[str]]] = []
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush() -> None:
        file = directory / f".shard-{len(written):05d}.safetensors"
        save_file(shard, str(file), metadata=metadata)
        written.append((file, list(shard)))

    for key, value in tensors:
        if max_shard_bytes and shard and size + value.nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[key] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    if len(written) == 1:
        written[0][0].rename(directory / SINGLE_FILE)
        return
    weight_map = {}
    for number, (file, keys) in enumerate(written, start=1):
        name = f"model-{number:05d}-of-{len(written):05d}.safetensors"
        file.rename(directory / name)
        weight_map.update(dict.fromkeys(keys, name))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (directory / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True))
