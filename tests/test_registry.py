"""The method registry is the one table: flags, runners and long-form parts derive from it."""

import pytest

from keedit_jax import registry


def test_flags_and_runners_derive_from_the_records():
    from keedit_jax.flags import METHODS
    from keedit_jax.methods import PROTOCOLS, REGISTRY
    from keedit_jax.methods.unstructured import METHOD_PARTS

    assert METHODS == tuple(r.name for r in registry.RECORDS)
    assert all(REGISTRY[r.name] is PROTOCOLS[r.protocol] for r in registry.RECORDS)
    assert METHOD_PARTS == {r.name: (r.strategy, r.solver) for r in registry.RECORDS
                            if r.protocol in ("by_dataset", "longform")}


def test_structured_solvers_come_from_one_table():
    from keedit_jax import downstream
    from keedit_jax.methods.structured import StructuredConfig
    from keedit_jax.upstream import TargetConfig

    structured = [r for r in registry.RECORDS if r.protocol in ("by_dataset", "structured")]
    assert {r.solver for r in structured} <= set(downstream.STRUCTURED_SOLVERS)
    target = TargetConfig(layer=1, v_loss_layer=1)
    for record in structured:
        config = StructuredConfig(layers=(1,), solver=record.solver, target=target)
        assert config.make_solver().name == record.solver
        assert registry.SOLVER_STATISTICS[record.solver] == record.statistics
    with pytest.raises(ValueError, match="unknown structured solver 'nope'"):
        StructuredConfig(layers=(1,), solver="nope", target=target)


def test_a_structured_only_method_needs_no_strategy():
    record = registry.MethodRecord(name="x", protocol="structured", solver="memit",
                                   statistics="moment", paper="p")
    assert not record.longform
    with pytest.raises(ValueError, match="needs its strategy"):
        registry.MethodRecord(name="x", protocol="by_dataset", solver="memit",
                              statistics="moment", paper="p")
    with pytest.raises(ValueError, match="has no strategy"):
        registry.MethodRecord(name="x", protocol="structured", solver="memit",
                              statistics="moment", paper="p", strategy="window")


def test_structured_statistics_kind_is_the_records():
    assert registry.method_record("memit").statistics == "moment"
    assert registry.method_record("alphaedit").statistics == "projector"


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'nope'; methods: memit, alphaedit"):
        registry.method_record("nope")


def test_every_method_that_can_stream_has_a_sequential_editor_and_no_other_does():
    """Sequential records, and by_dataset ones (their --sequential stream), each build an
    editor whose statistic is what their record says; a structured-only method has none."""
    from keedit_jax.flags import SequentialFlags, StructuredFlags
    from keedit_jax.methods.run_sequential import SEQUENTIAL_EDITORS, make_editor

    streaming = {r.name for r in registry.RECORDS if r.protocol in ("sequential", "by_dataset")}
    assert set(SEQUENTIAL_EDITORS) == streaming
    for name in streaming:
        editor = make_editor(name, StructuredFlags(), SequentialFlags())
        assert editor.stats_kind == registry.method_record(name).statistics, name
    with pytest.raises(ValueError, match="rome has no sequential editor"):
        make_editor("rome", StructuredFlags(), SequentialFlags())
