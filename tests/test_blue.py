"""BLUE (Li et al. 2025, the Boundary Layer UpdatE strategy): a target per edited layer and no
residual distribution.

Truth: with one context template and λ -> 0 each one-layer solve is the minimum-norm solution
of K ΔW = R, so after the edit each edited layer's output at the lookup token equals the target
optimised at that layer, on the model as it was when that layer was edited (the shallower
layers already edited): z_0 on the unedited model, z_1 on the model with layer 0 edited.
MEMIT's schedule, one target at the last layer spread R/(L − i), writes another layer 0.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from transformers import AutoTokenizer

from keedit_jax import downstream, registry, testing
from keedit_jax.flags import StructuredFlags
from keedit_jax.methods.run_structured import structured_config
from keedit_jax.methods.structured import StructuredConfig, edit_requests, lookup_rows, read_sites
from keedit_jax.models import down_proj_path, get_path, set_path
from keedit_jax.upstream import compute_targets
from tests.test_structured import REQUESTS, TARGET


@pytest.fixture(scope="module")
def model(tiny_checkpoint, tiny_tokenizer_dir):
    loaded = testing.cached_model(tiny_checkpoint("llama"))
    return loaded.params, loaded.config, AutoTokenizer.from_pretrained(tiny_tokenizer_dir)


def edit(params, cfg, tok, targets):
    config = StructuredConfig(layers=(0, 1), solver="memit", target=TARGET, targets=targets,
                              memit=downstream.MemitHParams(mom2_update_weight=1e-9,
                                                            dtype="float64"))
    stats = {layer: jnp.eye(cfg.d_ff) for layer in config.layers}
    states = downstream.init_states(config.make_solver(), config.layers, cfg.d_ff, cfg.d_model)
    with jax.enable_x64(True):
        return edit_requests(params, cfg, tok, REQUESTS, ("{}",), stats, states, config)


def output_at(params, cfg, tok, layer):
    rows = lookup_rows(tok, REQUESTS, ("{}",), "subject_last", 0)
    return read_sites(params, cfg, rows.tokens, rows.mask, layer, layer, rows.lookup)[1]


def relative_gap(got, want, start):
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(start - want))


def test_each_layer_reaches_its_own_target(model):
    params, cfg, tok = model
    edited, _, diag = edit(params, cfg, tok, "each_layer")
    path = down_proj_path(cfg)
    kernels = get_path(params, path)
    layer0_only = set_path(edited, path, get_path(edited, path).at[1].set(kernels[1]))
    with jax.enable_x64(True):  # the edit's own compiled target steps, not two more
        z0 = compute_targets(params, cfg, tok, REQUESTS, ("{}",),
                             dataclasses.replace(TARGET, layer=0)).targets[:, 0]
        z1 = compute_targets(layer0_only, cfg, tok, REQUESTS, ("{}",), TARGET).targets[:, 0]
    assert relative_gap(output_at(edited, cfg, tok, 0), z0, output_at(params, cfg, tok, 0)) < 1e-3
    assert relative_gap(output_at(edited, cfg, tok, 1), z1,
                        output_at(layer0_only, cfg, tok, 1)) < 1e-3
    np.testing.assert_array_equal(get_path(edited, path)[2], kernels[2])  # not edited
    assert sorted(diag["relative_residual"]) == [0, 1] and sorted(diag["fitted"]) == [0, 1]
    assert all(abs(row["realised"] - 1) < 1e-3 for row in diag["requests"])  # the deepest's


def test_memits_spread_writes_another_first_layer(model):
    params, cfg, tok = model
    blue, memit = (edit(params, cfg, tok, targets)[0] for targets in ("each_layer", "last_layer"))
    change = [get_path(p, down_proj_path(cfg))[0] - get_path(params, down_proj_path(cfg))[0]
              for p in (blue, memit)]
    assert float(jnp.linalg.norm(change[0] - change[1])) > 0.1 * float(jnp.linalg.norm(change[1]))


@pytest.mark.parametrize(("method", "solver"), [("memit_blue", "memit"),
                                                ("alphaedit_blue", "alphaedit")])
def test_the_blue_records_build_their_base_solver_with_a_target_per_layer(method, solver):
    config = structured_config(method, StructuredFlags(layers="1,2"), n_layers=4)
    assert (config.solver, config.targets, config.layers) == (solver, "each_layer", (1, 2))
    assert structured_config(solver, StructuredFlags(layers="1,2"), 4).targets == "last_layer"


def test_targets_at_each_layer_are_structured_only():
    with pytest.raises(ValueError, match="structured-only"):
        registry.MethodRecord(name="x", protocol="sequential", solver="memit",
                              statistics="moment", sequential_editor="m:f",
                              targets="each_layer", paper="")
