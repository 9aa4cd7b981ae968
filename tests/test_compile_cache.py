"""The persistent compilation cache: on under the project cache, overridable, off on request;
exported programs: reused across processes without tracing, keyed by all they depend on,
re-exported when damaged, plain jit where they cannot apply."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from keedit_jax import compile_cache
from keedit_jax.compile_cache import enable_compilation_cache, exported_jit
from keedit_jax.intervene import Shift
from keedit_jax.upstream.loop import LossTerms


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


# ---------------------------------------------------------------- exported programs

TRACES: list[int] = []


def _program(shift: Shift, x: jax.Array, power: int) -> LossTerms:
    """A program over a pytree with static fields, returning a NamedTuple; counts its traces."""
    TRACES.append(power)
    moved = x.at[shift.positions].add(shift.delta) ** power
    return LossTerms(moved.sum(), moved.mean(), jnp.float32(shift.layer), moved.max(), moved)


@pytest.fixture
def cache_dir(tmp_path):
    before = jax.config.jax_compilation_cache_dir
    jax.config.update("jax_compilation_cache_dir", str(tmp_path))
    yield tmp_path
    jax.config.update("jax_compilation_cache_dir", before)


def _inputs(n: int = 6) -> tuple[Shift, jax.Array]:
    shift = Shift(positions=jnp.array([1, 3]), delta=jnp.array([0.5, -2.0]), layer=3,
                  site="mlp_out")
    return shift, jnp.linspace(0.0, 1.0, n)


def test_an_exported_program_is_reused_by_a_new_process_without_tracing(cache_dir):
    shift, x = _inputs()
    expected = jax.jit(_program, static_argnames="power")(shift, x, power=3)
    TRACES.clear()
    first = exported_jit(_program, static_argnames=("power",))(shift, x, power=3)
    assert len(list((cache_dir / "export").glob("_program-*.jaxexport"))) == 1
    assert TRACES == [3]
    fresh = exported_jit(_program, static_argnames=("power",))  # a new process's memo
    again = fresh(shift, x, 3)
    assert TRACES == [3]  # read from disk: not traced again
    for a, b, c in zip(expected, first, again, strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)
    assert type(again) is LossTerms
    fresh(shift, x, power=2)  # another static value, another program
    fresh(*_inputs(7), power=3)  # another shape
    assert TRACES == [3, 2, 3]
    assert len(list((cache_dir / "export").glob("*.jaxexport"))) == 3


def test_a_damaged_or_foreign_artifact_is_exported_again(cache_dir, caplog):
    shift, x = _inputs()
    program = exported_jit(_program, static_argnames=("power",))
    expected = program(shift, x, power=3)
    (path,) = (cache_dir / "export").glob("*.jaxexport")
    for damage in (b"\x00garbage", b'{"types": ["os:system"]}\n' + path.read_bytes()[40:]):
        path.write_bytes(damage)
        TRACES.clear()
        with caplog.at_level("WARNING"):
            got = exported_jit(_program, static_argnames=("power",))(shift, x, power=3)
        assert "unreadable" in caplog.text and TRACES == [3]
        np.testing.assert_array_equal(got.total, expected.total)


def test_other_source_code_is_another_program(cache_dir, monkeypatch):
    shift, x = _inputs()
    exported_jit(_program, static_argnames=("power",))(shift, x, power=3)
    monkeypatch.setattr(compile_cache, "source_digest", lambda: "edited")
    TRACES.clear()
    exported_jit(_program, static_argnames=("power",))(shift, x, power=3)
    assert TRACES == [3]
    assert len(list((cache_dir / "export").glob("*.jaxexport"))) == 2


def test_inside_a_trace_without_a_cache_or_unexportable_it_is_plain_jit(cache_dir, caplog,
                                                                        unset_cache):
    shift, x = _inputs()
    program = exported_jit(_program, static_argnames=("power",))
    expected = jax.jit(_program, static_argnames="power")(shift, x, power=2)
    np.testing.assert_array_equal(program(shift, x, power=2).total, expected.total)
    assert not (cache_dir / "export").exists()  # no compilation cache: no artifacts
    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    inner = jax.jit(lambda s, v: program(s, v, power=2).total)(shift, x)
    np.testing.assert_array_equal(inner, expected.total)
    assert not (cache_dir / "export").exists()  # inlined into the outer program
    unstable = Shift(positions=shift.positions, delta=shift.delta, layer=3, site=object())
    got = program(unstable, x, power=2)  # a static field whose text holds an address
    np.testing.assert_array_equal(got.total, expected.total)
    assert not (cache_dir / "export").exists()  # an artifact no other process would find
    odd = Shift(positions=shift.positions, delta=shift.delta, layer=3, site=frozenset("a"))
    with caplog.at_level("WARNING"):
        got = program(odd, x, power=2)  # a static field JSON cannot hold
    assert "without an exported copy" in caplog.text
    np.testing.assert_array_equal(got.total, expected.total)
    assert not list((cache_dir / "export").glob("*.jaxexport"))
