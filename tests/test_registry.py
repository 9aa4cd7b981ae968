"""The method registry is the one table: flags, runners and long-form parts derive from it."""

import pathlib
import re

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


def test_structured_solvers_come_from_the_records():
    from keedit_jax.methods.structured import StructuredConfig
    from keedit_jax.upstream import TargetConfig

    structured = [r for r in registry.RECORDS if r.structured and not r.batch_editor]
    assert {r.solver for r in structured} == set(registry.SOLVER_FACTORIES)
    target = TargetConfig(layer=1, v_loss_layer=1)
    for record in structured:
        config = StructuredConfig(layers=(1,), solver=record.solver, target=target)
        assert config.make_solver().name == record.solver
        assert registry.SOLVER_STATISTICS[record.solver] == record.statistics
    with pytest.raises(ValueError, match="unknown structured solver 'nope'; solvers: memit"):
        StructuredConfig(layers=(1,), solver="nope", target=target)


def test_a_structured_solver_without_a_factory_or_with_two_is_refused():
    plain = {"protocol": "structured", "statistics": "moment", "paper": "p"}
    with pytest.raises(ValueError, match="x: structured solver 'new' has no solver_factory"):
        registry._solver_factories((registry.MethodRecord(name="x", solver="new", **plain),))
    with pytest.raises(ValueError, match="y: solver 'new' is built by a:f, not b:g"):
        registry._solver_factories((
            registry.MethodRecord(name="x", solver="new", solver_factory="a:f", **plain),
            registry.MethodRecord(name="y", solver="new", solver_factory="b:g", **plain)))


def test_batch_editors_resolve_and_claim_no_solver_or_statistics():
    editors = [r for r in registry.RECORDS if r.batch_editor]
    assert {r.name for r in editors} == {"ft_l", "ft_m", "grace"}
    assert all(callable(registry.load_factory(r.batch_editor)) for r in editors)
    plain = {"name": "x", "protocol": "structured", "solver": "s", "paper": "p",
             "batch_editor": "a:f"}
    with pytest.raises(ValueError, match="x: a batch editor is a structured method"):
        registry.MethodRecord(statistics="moment", **plain)
    with pytest.raises(ValueError, match="x: a batch editor is a structured method"):
        registry.MethodRecord(statistics="none", solver_factory="a:g", **plain)


def test_shift_sites_other_than_the_block_output_are_structured_only():
    """PMET shifts the attention and MLP outputs; every other record the block output, and
    only a structured record may shift elsewhere (the other runners shift the block)."""
    assert registry.method_record("pmet").sites == ("attn_out", "mlp_out")
    assert all(r.sites == ("block_out",) for r in registry.RECORDS if r.name != "pmet")
    with pytest.raises(ValueError, match=r"x: shifts at \('mlp_out',\) are structured-only"):
        registry.MethodRecord(name="x", protocol="by_dataset", strategy="one_for_all",
                              solver="memit", statistics="moment", paper="p",
                              sequential_editor="m:f", sites=("mlp_out",))


def test_every_record_has_its_flagfile_and_that_flagfile_selects_it():
    root = pathlib.Path(__file__).resolve().parents[1]
    for record in registry.RECORDS:
        lines = (root / record.flagfile).read_text().splitlines()
        assert f"--method={record.name}" in lines, record.flagfile


def test_rome_lives_in_its_solver_file_and_its_record_only():
    """The registry's claim: a new structured method is its solver file, one record, its
    flagfile and its tests. No other library file names ROME's solver or its parts."""
    package = pathlib.Path(registry.__file__).parent
    naming = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                    if re.search(r"\b_?rome\b|Rome(HParams|State)|\"rome\"",
                                 p.read_text()))
    assert naming == ["downstream/_rome.py", "registry.py"]


def test_a_structured_only_method_needs_no_strategy():
    record = registry.MethodRecord(name="x", protocol="structured", solver="memit",
                                   statistics="moment", paper="p")
    assert not record.longform
    with pytest.raises(ValueError, match="needs its strategy"):
        registry.MethodRecord(name="x", protocol="by_dataset", solver="memit",
                              statistics="moment", paper="p", sequential_editor="m:f")
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
    assert set(SEQUENTIAL_EDITORS) == streaming | {"grace"}  # a batch editor's stream
    assert make_editor("grace", StructuredFlags(), SequentialFlags()).solver is None
    for name in streaming:
        editor = make_editor(name, StructuredFlags(), SequentialFlags())
        assert editor.stats_kind == registry.method_record(name).statistics, name
    with pytest.raises(ValueError, match="rome has no sequential editor"):
        make_editor("rome", StructuredFlags(), SequentialFlags())


def test_streaming_and_editor_go_together():
    plain = {"solver": "memit", "statistics": "moment", "paper": "p"}
    with pytest.raises(ValueError, match="x: a sequential method needs sequential editor"):
        registry.MethodRecord(name="x", protocol="sequential", **plain)
    with pytest.raises(ValueError, match="x: a structured method has no sequential editor"):
        registry.MethodRecord(name="x", protocol="structured", sequential_editor="m:f", **plain)
    batch = {**plain, "statistics": "none", "batch_editor": "a:f"}  # its state in the params
    assert registry.MethodRecord(name="x", protocol="structured", sequential_editor="m:f",
                                 **batch).sequential_editor == "m:f"
    with pytest.raises(ValueError, match="post-processing applies to streams only"):
        registry.MethodRecord(name="x", protocol="structured", post_processing=True, **plain)
