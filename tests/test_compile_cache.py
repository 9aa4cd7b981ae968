"""The persistent compilation cache: on under the project cache, overridable, off on request."""

from __future__ import annotations

import jax
import pytest

from keedit_jax.compile_cache import enable_compilation_cache


@pytest.fixture
def unset_cache():
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", None)
    yield
    jax.config.update("jax_compilation_cache_dir", before)


def test_default_is_under_the_project_cache(tmp_path, monkeypatch, unset_cache):
    monkeypatch.setenv("KEEDIT_CACHE", str(tmp_path))
    monkeypatch.delenv("KEEDIT_JAX_CACHE", raising=False)
    assert enable_compilation_cache() == tmp_path / "jax"
    assert jax.config.jax_compilation_cache_dir == str(tmp_path / "jax")


def test_environment_overrides_and_off_leaves_it_off(tmp_path, monkeypatch, unset_cache):
    monkeypatch.setenv("KEEDIT_JAX_CACHE", "off")
    assert enable_compilation_cache() is None and jax.config.jax_compilation_cache_dir is None
    monkeypatch.setenv("KEEDIT_JAX_CACHE", str(tmp_path / "mine"))
    assert enable_compilation_cache() == tmp_path / "mine"
    monkeypatch.setenv("KEEDIT_JAX_CACHE", "off")
    assert enable_compilation_cache() == tmp_path / "mine"  # one already configured is kept
    assert enable_compilation_cache(tmp_path / "other") == tmp_path / "other"
