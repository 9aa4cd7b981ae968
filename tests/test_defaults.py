"""One value per default: a command-line flag that sets a library field takes that field's
default from the library (`flags.mirror`), so the command line, the Python API (which takes
the flags' defaults) and a direct library call agree, and no default is written twice. These
tests check the three ways that can break: a flag left with its own copy of a library
default, a mirror naming a field the flag does not set, and a listed exception that no
longer differs."""

from __future__ import annotations

import dataclasses
from typing import Any, get_type_hints

import pytest

from keedit_jax import downstream, flags, parallel, stats
from keedit_jax.methods import unstructured
from keedit_jax.methods.metake import MetaKEConfig
from keedit_jax.methods.run_structured import structured_config
from keedit_jax.methods.run_unstructured import unstructured_config
from keedit_jax.upstream import ContextConfig, TargetConfig
from keedit_jax.upstream.longform import WindowConfig

LIBRARY_CONFIGS = (TargetConfig, ContextConfig, WindowConfig, unstructured.UnstructuredConfig,
                   downstream.MemitHParams, downstream.AlphaEditHParams, downstream.UnkeHParams,
                   downstream.OteHParams, downstream.LyapLockHParams, MetaKEConfig,
                   parallel.MeshConfig, parallel.DistributedConfig, stats.StatsConfig)
# Flags that share a field name with a library config but mean something else there.
OTHER_MEANING = {(flags.ModelFlags, "dtype"): "the parameters' dtype, not a solve's"}
# Flags whose library field has another default on purpose, and why.
DISTINCT = {
    (flags.SequentialFlags, "error_correction"): (
        downstream.OteHParams, "error_correction",
        "the flag asks for Algorithm 1's correction whenever an aligned editor post-processes; "
        "OteHParams is also the uncorrected family member, which make_editor builds for "
        "--noerror_correction and for the naive editors"),
}


def _mirrors() -> dict[tuple[type, str], tuple[Any, str]]:
    return {(group, f.name): f.metadata["mirrors"] for group in flags.FLAG_GROUPS
            for f in dataclasses.fields(group) if "mirrors" in f.metadata}


def test_a_mirrored_default_has_the_flags_declared_type():
    """The library's value must be of the type the flag declares (absl defines the flag by
    that type): an int flag mirroring a float field, or a str flag mirroring a tuple without
    a conversion, fails here, not at the first run."""
    for (group, name), (source, field) in _mirrors().items():
        declared = get_type_hints(group)[name]
        flag_value = {f.name: f for f in dataclasses.fields(group)}[name].default
        assert type(flag_value) is declared, (group.__name__, name, declared, flag_value)
        value = flags.library_default(source, field)
        assert flag_value == (",".join(value) if isinstance(value, tuple) else value)


def test_no_flag_keeps_its_own_copy_of_a_library_default():
    """Every flag named like a field of a library config mirrors a library default, is
    listed as meaning something else, or as distinct on purpose."""
    fields = {f.name for cls in LIBRARY_CONFIGS for f in dataclasses.fields(cls)
              if f.default is not dataclasses.MISSING
              or f.default_factory is not dataclasses.MISSING}
    mirrored = {(group, name) for group, name in _mirrors()}
    for group in flags.FLAG_GROUPS:
        for f in dataclasses.fields(group):
            key = (group, f.name)
            if f.name in fields and key not in mirrored | set(OTHER_MEANING) | set(DISTINCT):
                pytest.fail(f"--{f.name} has its own default {f.default!r}; mirror the "
                            "library field it sets (flags.mirror)")


def test_the_distinct_defaults_are_still_distinct():
    for (group, name), (library, field, _) in DISTINCT.items():
        assert getattr(group(), name) != flags.library_default(library, field), (group, name)


# Values other than the defaults, valid for each flag (strings are choices).
OTHER_CHOICE = {"fact_token": "last", "solve_dtype": "float64", "coefficient_order": "released",
                "affinity_context": "in_loop", "affinity_gradients": "vmap",
                "context_seeds": "The,I", "stats_accumulate_dtype": "float64"}


def _other(group: type, name: str) -> Any:
    value = getattr(group(), name)
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return OTHER_CHOICE[name]
    return value + 1 if isinstance(value, int) else value * 2 + 0.25


def _instances(config: Any, cls: type) -> list[Any]:
    """Every instance of `cls` in a tree of dataclasses."""
    if not dataclasses.is_dataclass(config):
        return []
    found = [config] if isinstance(config, cls) else []
    for f in dataclasses.fields(config):
        found += _instances(getattr(config, f.name), cls)
    return found


# What each protocol builds from the flags; the long form fixes the lookup token (the last
# prompt token) and has no KL term.
BUILDERS = {
    "structured": (lambda s, lf: structured_config("memit", s, 12), set()),
    "longform": (lambda s, lf: unstructured_config("muke", s, lf, 12),
                 {"fact_token", "kl_factor"}),
}


@pytest.mark.parametrize("builder", sorted(BUILDERS))
def test_a_mirrored_flag_sets_the_field_it_mirrors(builder):
    """Each flag given a non-default value reaches the library field its mirror names, in
    the config the protocol builds (the mirror says where the flag goes)."""
    build, fixed = BUILDERS[builder]
    checked = 0
    for (group, name), (source, field) in _mirrors().items():
        if group not in (flags.StructuredFlags, flags.LongFormFlags) or name in fixed:
            continue
        value = _other(group, name)
        structured = flags.StructuredFlags(**({name: value} if group is flags.StructuredFlags
                                               else {}))
        longform = flags.LongFormFlags(**({name: value} if group is flags.LongFormFlags
                                          else {}))
        config = build(structured, longform)
        targets = _instances(config, source) if isinstance(source, type) else []
        if not targets:
            continue  # read elsewhere (statistics, context templates, the module constant)
        assert any(getattr(t, field) == value for t in targets), (
            f"--{name}={value!r} did not reach {source.__name__}.{field} in the {builder} "
            "config")
        checked += 1
    assert checked >= 8


def test_a_library_literal_is_the_flags_choices_on_the_command_line_and_in_the_api():
    """--fact_token's choices come from TargetConfig's Literal type: absl refuses another
    value naming them, and so does the dataclass the Python API builds."""
    from absl import flags as absl_flags

    values = absl_flags.FlagValues()
    flags.define_flags(flags.FLAG_GROUPS, values)
    with pytest.raises(absl_flags.IllegalFlagValueError, match="subject_last|last"):
        values(["prog", "--fact_token=first"])
    with pytest.raises(ValueError, match="--fact_token='first': one of subject_last, last"):
        flags.StructuredFlags(fact_token="first")
    choices = {f.name: f.metadata.get("choices") for f in dataclasses.fields(flags.LongFormFlags)}
    assert choices["affinity_gradients"] == ("used", "vmap", "loop")
