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
                            if r.protocol != "sequential"}


def test_structured_statistics_kind_is_the_records():
    assert registry.method_record("memit").statistics == "moment"
    assert registry.method_record("alphaedit").statistics == "projector"


def test_unknown_method_names_the_known_ones():
    with pytest.raises(ValueError, match="unknown method 'nope'; methods: memit, alphaedit"):
        registry.method_record("nope")
