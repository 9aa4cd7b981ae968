"""Shared fixtures: tiny checkpoints and the tiny tokenizer, built once per test session.

Parity tests compare float32 logits at 1e-5, so matmuls run at full float32 precision (this
matters on GPU and TPU, where the default is bf16-based). float64 is not enabled globally:
tests that need it use `jax.enable_x64(True)` as a context manager, locally.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable

import jax
import pytest

from keedit_jax import testing

jax.config.update("jax_default_matmul_precision", "highest")

_SHARD_SIZE = "20KB"  # small enough to split every tiny model into many shards


@pytest.fixture(scope="session")
def tiny_checkpoint(
    tmp_path_factory: pytest.TempPathFactory,
) -> Callable[..., pathlib.Path]:
    """Factory `tiny_checkpoint(family, dtype="float32", sharded=False) -> Path`.

    Each (family, dtype, sharded) checkpoint is saved once per session with seed 0 and shared
    by every test that asks for it, so treat the directory as read-only.
    """
    pytest.importorskip("torch")
    cache: dict[tuple[str, str, bool], pathlib.Path] = {}

    def make(family: str, dtype: str = "float32", sharded: bool = False) -> pathlib.Path:
        key = (family, dtype, sharded)
        if key not in cache:
            layout = "sharded" if sharded else "single"
            directory = tmp_path_factory.mktemp(f"{family}-{dtype}-{layout}")
            cache[key] = testing.save_tiny_hf_model(
                family, directory, dtype=dtype, max_shard_size=_SHARD_SIZE if sharded else None
            )
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The tiny tokenizer saved once per session (read-only); load it with AutoTokenizer."""
    return testing.save_tiny_tokenizer(tmp_path_factory.mktemp("tokenizer"))


@pytest.fixture(scope="session")
def model(tiny_checkpoint):
    """The tiny llama checkpoint as a LoadedModel, read-only (a module may define its own)."""
    return testing.cached_model(tiny_checkpoint("llama"))


@pytest.fixture(scope="session")
def tok(tiny_tokenizer_dir):
    """The tiny tokenizer loaded with AutoTokenizer."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_tokenizer_dir))
