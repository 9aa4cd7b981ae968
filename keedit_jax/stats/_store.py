"""load_or_compute: second moments from the cache when it fits, else one pass over the text."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from keedit_jax.files import check_writable_directory
from keedit_jax.models import ModelConfig
from keedit_jax.models.params import Params
from keedit_jax.stats._cache import (
    Log,
    Metadata,
    config_fingerprint,
    load_arrays,
    save_arrays,
    source_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from keedit_jax.stats._config import StatsConfig
from keedit_jax.stats._moments import SecondMoment, check_layers, second_moments
from keedit_jax.stats._texts import length_batches, read_texts, tokenize_texts

_FIELDS = ("sum_ff", "sum_df", "sum_dd")


def stats_metadata(params: Params, cfg: ModelConfig, layers: tuple[int, ...], tokenizer: Any,
                   config: StatsConfig) -> Metadata:
    """Everything the statistics depend on, as JSON: a cache built otherwise is rebuilt."""
    return {
        "kind": "second_moments",
        "model_config_sha256": config_fingerprint(cfg),
        "model_weights_sha256": weights_fingerprint(params, cfg, max(layers) + 1),
        "layers": list(layers),
        "n_samples": config.n_samples,
        "max_length": config.resolved_max_length(cfg),
        "add_special_tokens": config.add_special_tokens,
        "accumulate_dtype": config.accumulate_dtype,
        "with_values": config.with_values,
        "tokenizer_sha256": tokenizer_fingerprint(tokenizer),
        "source": source_fingerprint(config.source),
        "text_field": config.text_field,
        "plain_text_documents": config.plain_text_documents,
    }


def default_cache_path(cache_dir: str | Path, model_name: str, layers: Iterable[int],
                       config: StatsConfig) -> Path:
    """<cache_dir>/<model>/second_moments_<source>_layers<l..>_n<N>_len<T>_<dtype>.npz: a
    readable name; the metadata inside, not the name, decides whether the file is used."""
    model = model_name.strip("/").replace("/", "_")
    source = Path(config.source).stem or "texts"
    layer_tag = "-".join(str(index) for index in sorted(set(layers)))
    max_length = "model" if config.max_length is None else config.max_length
    name = (f"second_moments_{source}_layers{layer_tag}_n{config.n_samples}_len{max_length}"
            f"_{config.accumulate_dtype}.npz")
    return Path(cache_dir) / model / name


def moments_to_arrays(moments: dict[int, SecondMoment]) -> dict[str, np.ndarray]:
    counts = {moment.count for moment in moments.values()}
    if len(counts) != 1:
        raise ValueError(f"layers of one pass must share a token count, got {sorted(counts)}")
    arrays = {"count": np.array(counts.pop(), np.int64)}
    for index, moment in moments.items():
        for field in _FIELDS:
            if getattr(moment, field) is not None:
                arrays[f"layer_{index}.{field}"] = getattr(moment, field)
    return arrays


def arrays_to_moments(arrays: dict[str, np.ndarray], layers: tuple[int, ...],
                      cfg: ModelConfig, with_values: bool) -> dict[int, SecondMoment]:
    """Moments of `layers` from a cache file's arrays, checking every shape (KeyError or
    ValueError when the file lacks a layer or holds the wrong shapes)."""
    f, d = cfg.mlp_key_dim, cfg.d_model
    shapes = {"sum_ff": (f, f), "sum_df": (d, f), "sum_dd": (d, d)}
    fields = _FIELDS if with_values else _FIELDS[:1]
    count = int(arrays["count"])
    moments = {}
    for index in layers:
        values = {field: arrays[f"layer_{index}.{field}"] for field in fields}
        for field, value in values.items():
            if value.shape != shapes[field]:
                raise ValueError(f"layer_{index}.{field} has shape {value.shape}, "
                                 f"expected {shapes[field]}")
        moments[index] = SecondMoment(count=count, **values)
    return moments


def compute_from_source(params: Params, cfg: ModelConfig, layers: tuple[int, ...],
                        tokenizer: Any, config: StatsConfig,
                        log: Log) -> dict[int, SecondMoment]:
    """One pass over config.source: read, tokenise, pack or bucket by length, accumulate."""
    max_length = config.resolved_max_length(cfg)
    texts = read_texts(config.source, text_field=config.text_field,
                       plain_text_documents=config.plain_text_documents)
    ids = tokenize_texts(texts, tokenizer, max_length=max_length, n_samples=config.n_samples,
                         add_special_tokens=config.add_special_tokens)
    batches = length_batches(ids, batch_tokens=config.batch_tokens,
                             min_bucket=config.min_bucket, max_length=max_length,
                             pack_length=config.pack_length)
    return second_moments(params, cfg, batches, layers, config=config, log=log)


def load_or_compute(params: Params, cfg: ModelConfig, layers: Iterable[int], tokenizer: Any, *,
                    config: StatsConfig, path: str | Path,
                    log: Log = print) -> dict[int, SecondMoment]:
    """Second moments of `layers` from the cache file `path` if it was built with the same
    model, tokenizer, text and settings; otherwise computed in one pass and saved there."""
    layers = check_layers(cfg, layers)
    expected = stats_metadata(params, cfg, layers, tokenizer, config)
    cached = load_arrays(path, expected, log)
    if cached is not None:
        try:
            moments = arrays_to_moments(cached[0], layers, cfg, config.with_values)
            log(f"statistics of layers {list(layers)} loaded from {path}")
            return moments
        except (KeyError, ValueError) as error:
            log(f"cache file {path} is inconsistent ({type(error).__name__}: {error}); "
                "rebuilding")
    check_writable_directory(Path(path).parent, "the statistics cache directory",
                             "set KEEDIT_CACHE to a writable directory")
    log(f"computing statistics of layers {list(layers)} from {config.source} into {path}")
    moments = compute_from_source(params, cfg, layers, tokenizer, config, log)
    save_arrays(path, moments_to_arrays(moments), expected)
    return moments


def load_reference_moment(path: str | Path) -> SecondMoment:
    """One layer's statistics from a MEMIT / EasyEdit / AlphaEdit `.npz` (keys `mom2.mom2`,
    the SUM, and `mom2.count`; anchors §3), for parity checks against published files."""
    with np.load(path, allow_pickle=False) as data:
        missing = {"mom2.mom2", "mom2.count"} - set(data.files)
        if missing:
            raise KeyError(f"{path} is not a MEMIT statistics file: no {sorted(missing)}")
        return SecondMoment(sum_ff=data["mom2.mom2"], count=int(data["mom2.count"]))
