"""On-disk cache of second moments and projectors: explicit names, metadata, atomic writes.

A file holds, per layer, `layer_<l>.sum_ff` (Σ k kᵀ, never the mean: the reference's bare
`mom2.mom2` was mistaken for the covariance, anchors §10) and one `count`, plus a JSON
metadata record saying what produced it. A file whose metadata differs from the request, or
that cannot be read, is reported (file and fields named) and rebuilt. `np.load` runs with
allow_pickle=False, so a cache file can never execute code.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from keedit_jax import parallel
from keedit_jax.files import staged_file
from keedit_jax.models import ModelConfig
from keedit_jax.models.family import get_family
from keedit_jax.models.params import Params

FORMAT = "keedit_jax.stats/1"
README = ("layer_<l>.sum_ff is the SUM of k k^T over `count` tokens (k: the down-projection "
          "input); E[k k^T] = sum_ff / count. sum_df = sum of v k^T, sum_dd = sum of v v^T.")
Log = Callable[[str], None]
Metadata = dict[str, Any]
_SAMPLES_PER_LEAF = 4096
_SOURCE_PROBE_BYTES = 1 << 20
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def _sha256(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()


def config_fingerprint(cfg: ModelConfig) -> str:
    """Hash of the model config: the architecture the statistics were computed with."""
    return _sha256(json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=str).encode())


@functools.partial(jax.jit, static_argnames=("limit", "stride"))
def _strided_sample(x: jax.Array, limit: int, stride: int) -> jax.Array:
    return x.reshape(-1)[:limit:stride]


def weights_fingerprint(params: Params, cfg: ModelConfig, stop: int) -> str:
    """Hash of a strided sample (4096 entries) of every leaf the keys of layers < stop depend
    on: the non-layer leaves and layers [0, stop) of each stacked leaf.

    Why a sample: hashing all weights below the edited layers of an 8B model reads ~8 GB on
    every load; a sample costs milliseconds. Why it is meaningful: what must be caught is
    statistics of another checkpoint (fine-tuned: every entry differs) or of an already
    edited model (ΔW = R Kᵀ is dense, so nearly every sampled entry of the edited
    down-projection moves). Layers at or above `stop` cannot change the keys and are left out.
    """
    layers_path = get_family(cfg).layers_path
    parts = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        names = tuple(getattr(p, "key", str(p)) for p in path)
        stacked = names[:len(layers_path)] == layers_path
        limit = leaf.size // leaf.shape[0] * min(stop, leaf.shape[0]) if stacked else leaf.size
        sample = _strided_sample(leaf, limit, max(1, limit // _SAMPLES_PER_LEAF))
        parts += ["/".join(names).encode(), str((leaf.shape, str(leaf.dtype))).encode(),
                  parallel.to_host(sample).tobytes()]
    return _sha256(*parts)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Hash of the full tokenizer definition (vocab, merges, normaliser, BOS post-processor)
    when it is a fast tokenizer, else of its vocabulary and special tokens."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return _sha256(backend.to_str().encode())
    vocab = sorted(tokenizer.get_vocab().items())
    special = sorted(getattr(tokenizer, "special_tokens_map", {}).items())
    return _sha256(json.dumps([vocab, special], default=str).encode())


def source_fingerprint(path: str | Path) -> Metadata:
    """File name, size and a hash of its first and last MiB: cheap on a 20 GB dump, and it
    changes when the dump does; the directory and mtime are left out so caches can move."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"statistics text source {str(path)!r} does not exist "
                                "(set StatsConfig.source to a local .jsonl/.parquet/.txt)")
    size = path.stat().st_size
    with path.open("rb") as file:
        head = file.read(_SOURCE_PROBE_BYTES)
        file.seek(max(0, size - _SOURCE_PROBE_BYTES))
        tail = file.read(_SOURCE_PROBE_BYTES)
    return {"name": path.name, "bytes": size, "head_tail_sha256": _sha256(head, tail)}


def metadata_differences(found: Mapping[str, Any], expected: Mapping[str, Any]) -> list[str]:
    """Human-readable 'field: cached X, requested Y' lines; empty when the cache fits.

    Cached layers may be a superset of the requested ones (the extra layers are ignored)."""
    lines = []
    for key in sorted(set(found) | set(expected)):
        cached, wanted = found.get(key), expected.get(key)
        if key == "layers" and isinstance(cached, list) and isinstance(wanted, list):
            if set(wanted) <= set(cached):
                continue
        if cached != wanted:
            lines.append(f"{key}: cached {_short(cached)}, requested {_short(wanted)}")
    return lines


def _short(value: Any) -> str:
    text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= 80 else text[:77] + "..."


def save_arrays(path: str | Path, arrays: Mapping[str, np.ndarray], metadata: Metadata,
                readme: str = README) -> None:
    """Write an .npz atomically (`files.staged_file`: a shared cache gets ordinary modes)."""
    payload = {**arrays, "metadata_json": np.array(json.dumps(metadata, sort_keys=True)),
               "readme": np.array(readme), "format": np.array(FORMAT)}
    with staged_file(path) as temporary, temporary.open("wb") as file:
        np.savez(file, **payload)


def load_arrays(path: str | Path, expected: Metadata,
                log: Log) -> tuple[dict[str, np.ndarray], Metadata] | None:
    """The arrays and metadata of a cache file, or None (logging why) when it is missing,
    unreadable, of another format, or produced by other settings than `expected`."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with np.load(path, allow_pickle=False) as data:
            arrays = {name: data[name] for name in data.files}
        arrays.pop("readme", None)
        if str(arrays.pop("format")) != FORMAT:
            raise ValueError("not a keedit_jax statistics file")
        metadata = json.loads(str(arrays.pop("metadata_json")))
    except _READ_ERRORS as error:
        log(f"cache file {path} is unreadable ({type(error).__name__}: {error}); rebuilding")
        return None
    differences = metadata_differences(metadata, expected)
    if differences:
        log(f"cache file {path} was built with other settings; rebuilding. Differences: "
            + "; ".join(differences))
        return None
    return arrays, metadata
