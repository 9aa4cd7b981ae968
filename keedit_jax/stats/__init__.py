"""Second-moment statistics of the edited layers and AlphaEdit's null-space projectors.

E[k kᵀ] of the down-projection input ("MLP key") of every edited layer comes from one
streaming pass that stops after the last edited layer (docs/references.md: anchors §3); sums, counts
and metadata are cached on disk under explicit names; P = U₀U₀ᵀ over the eigenvalues of the
normalised moment below 2e-2 (anchors §4).

    moments = load_or_compute(params, cfg, layers, tokenizer, config=StatsConfig(
        source="wiki.jsonl", n_samples=100_000), path=default_cache_path(...))

`resolve_source("wikipedia-vital", cache)` is the default text of a real model: Wikipedia's
Vital Articles from an installed package (stats/_corpus.py).
    C = moments[layer].mean()
    P = null_space_projector(moments[layer])
"""

from keedit_jax.stats._cache import (
    config_fingerprint,
    load_arrays,
    save_arrays,
    source_fingerprint,
    tokenizer_fingerprint,
    weights_fingerprint,
)
from keedit_jax.stats._config import StatsConfig
from keedit_jax.stats._corpus import (
    DEFAULT_SOURCE,
    SOURCE_NAMES,
    WIKIPEDIA_VITAL,
    resolve_source,
    vital_instructions,
)
from keedit_jax.stats._moments import (
    CompileTime,
    SecondMoment,
    accumulate_batch,
    batch_sums,
    compile_time,
    second_moments,
)
from keedit_jax.stats._projector import (
    NULLSPACE_THRESHOLD,
    NullSpace,
    load_or_compute_null_spaces,
    null_space,
    null_space_projector,
)
from keedit_jax.stats._store import (
    compute_from_source,
    default_cache_path,
    load_or_compute,
    load_reference_moment,
    stats_metadata,
)
from keedit_jax.stats._texts import (
    TextSourceError,
    TokenBatch,
    bucket_length,
    length_batches,
    pad_left,
    read_texts,
    tokenize_texts,
)

__all__ = [
    "DEFAULT_SOURCE", "NULLSPACE_THRESHOLD", "SOURCE_NAMES", "WIKIPEDIA_VITAL", "CompileTime",
    "NullSpace",
    "SecondMoment", "StatsConfig", "TextSourceError", "TokenBatch", "accumulate_batch",
    "batch_sums", "bucket_length", "compile_time", "compute_from_source", "config_fingerprint",
    "default_cache_path", "length_batches", "load_arrays", "load_or_compute",
    "load_or_compute_null_spaces", "load_reference_moment", "null_space", "null_space_projector",
    "pad_left", "read_texts", "resolve_source", "save_arrays", "second_moments",
    "source_fingerprint", "stats_metadata", "tokenize_texts", "tokenizer_fingerprint",
    "vital_instructions", "weights_fingerprint",
]
