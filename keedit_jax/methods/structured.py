"""MEMIT and AlphaEdit as compositions of the shared parts (docs/references.md: anchors §1, §4).

targets (upstream.compute_targets: m* at the last edited layer)
  -> keys at each edited layer, averaged over the context templates
  -> downstream.edit_layers: per layer in increasing depth, residual spread R/(L-i),
     closed-form solve (MEMIT: λC + KKᵀ; AlphaEdit: projected, with the previous-edit cache)
A new structured method is a new solver and its registry record (whose `solver_factory`
builds the solver from a `StructuredConfig`), not a new copy of this pipeline nor an edit here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keedit_jax import downstream, parallel, registry
from keedit_jax.compile_cache import exported_jit
from keedit_jax.data import Request
from keedit_jax.intervene import Taps, run
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.generate import bucket
from keedit_jax.models.params import Params, down_proj_path, to_device
from keedit_jax.upstream import (
    TargetConfig,
    check_finite,
    encode_requests,
    optimise_shifts,
    prompt_and_lookup,
    shift_diagnostics,
    unshifted_target_prob,
)

Array = jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredConfig:
    """Which layers to edit and how: the target step, then one closed-form solver, named by
    its registry record's `solver` (built by the record's `solver_factory`). MEMIT and
    AlphaEdit read their own hparams field; any other solver reads `solver_hparams` (when
    None, its default hyperparameters solved in `solve_dtype`). `targets` is the record's
    schedule (`registry.TargetSchedule`): one target at the last layer, spread (MEMIT), or
    one per layer (BLUE, `edit_each_layer`)."""

    layers: tuple[int, ...]
    solver: str
    target: TargetConfig
    memit: downstream.MemitHParams = downstream.MemitHParams()
    alphaedit: downstream.AlphaEditHParams = downstream.AlphaEditHParams()
    solver_hparams: Any = None
    solve_dtype: str = "float32"
    targets: registry.TargetSchedule = "last_layer"

    def __post_init__(self) -> None:
        registry.structured_solver_factory(self.solver)  # ValueError naming the solvers
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be increasing and distinct, got {self.layers}")
        if self.target.layer != self.layers[-1]:
            raise ValueError(f"the target layer ({self.target.layer}) must be the last edited "
                             f"layer ({self.layers[-1]}), as in MEMIT (anchors §1)")
        downstream.check_layer_count(self.make_solver(), self.layers)

    def target_index(self, solver: downstream.Solver | None = None) -> int:
        """Which of the target step's shifts (one position: one per site) the solver inserts;
        a ValueError when the target step does not shift that site."""
        solver = solver or self.make_solver()
        if solver.target_site not in self.target.sites:
            raise ValueError(f"{solver.name} inserts targets at {solver.target_site}, which the "
                             f"target step does not shift (sites {self.target.sites})")
        return self.target.sites.index(solver.target_site)

    def make_solver(self) -> downstream.Solver:
        return registry.structured_solver_factory(self.solver)(self)


def memit_solver(config: Any) -> downstream.Solver:
    """MEMIT from its config's `memit` hyperparameters, in their dtype (x64 on for float64)."""
    return downstream.in_solve_dtype(downstream.memit(config.memit), config.memit.dtype)


def alphaedit_solver(config: Any) -> downstream.Solver:
    """AlphaEdit from its config's `alphaedit` hyperparameters, in their dtype."""
    return downstream.in_solve_dtype(downstream.alphaedit(config.alphaedit),
                                     config.alphaedit.dtype)


@dataclasses.dataclass(frozen=True)
class LookupRows:
    """Left-padded prompts [N, T] and the lookup index of each row."""

    tokens: np.ndarray
    mask: np.ndarray
    lookup: np.ndarray


def lookup_rows(tokenizer: Any, requests: Sequence[Request], templates: Sequence[str],
                fact_token: str, pad_id: int) -> LookupRows:
    """Every request in every template (request-major), padded to a power-of-two width."""
    rows = [prompt_and_lookup(tokenizer, context, r.prompt, r.subject, fact_token, r.case_id)
            for r in requests for context in templates]
    width = bucket(max(len(ids) for ids, _ in rows), 8)
    tokens = np.full((len(rows), width), pad_id, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    lookup = np.zeros((len(rows),), np.int32)
    for i, (ids, index) in enumerate(rows):
        tokens[i, width - len(ids):], mask[i, width - len(ids):] = ids, 1
        lookup[i] = width - len(ids) + index
    return LookupRows(tokens, mask, lookup)


@partial(exported_jit, static_argnames=("cfg", "key_layer", "out_layer", "out_site"))
def read_sites(params: Params, cfg: ModelConfig, tokens: Array, mask: Array, key_layer: int,
               out_layer: int, lookup: Array | None = None,
               out_site: str = "block_out") -> tuple[Array, Array]:
    """In one forward: the MEMIT key (down-projection input) of `key_layer` and the output of
    `out_layer` (its block output, or the seam site `out_site`: PMET reads the MLP output),
    at each row's lookup token ([N, F], [N, D]) or, without `lookup`, at every position
    ([N, T, F], [N, T, D])."""
    _, captures = run(params, cfg, tokens=tokens, attention_mask=mask,
                      stop=max(key_layer, out_layer) + 1,
                      taps=Taps(**{"mlp_key": (key_layer,), out_site: (out_layer,)}))
    keys, outputs = captures.mlp_key[key_layer], getattr(captures, out_site)[out_layer]
    if lookup is None:
        return keys, outputs
    rows = jnp.arange(tokens.shape[0])
    return keys[rows, lookup], outputs[rows, lookup]


def template_weights(n_templates: int) -> np.ndarray:
    """Key-averaging weights: the bare "{}" and the generated prefixes are two context groups,
    each averaged, then the groups averaged (matches the released compute_ks, anchors §1)."""
    if n_templates == 1:
        return np.ones(1, np.float32)
    generated = np.full(n_templates - 1, 0.5 / (n_templates - 1), np.float32)
    return np.concatenate([[0.5], generated]).astype(np.float32)


@partial(jax.tree_util.register_dataclass,
         data_fields=["tokens", "mask", "lookup", "weights"],
         meta_fields=["cfg", "last_layer", "out_site"])
@dataclasses.dataclass(frozen=True)
class BatchReadout:
    """The readout of `downstream.edit_layers` for a batch: each layer's keys averaged over the
    templates, and the last edited layer's outputs from the clean rows (template 0) of the same
    forward, so each layer costs one pass. A pytree (arrays traced, cfg static), so jitted and
    differentiated programs take it as an argument and compile once per shape (MetaKE)."""

    tokens: Array  # [E·C, T] the requests in every template, request-major
    mask: Array
    lookup: Array
    weights: Array  # [C] template weights
    cfg: ModelConfig
    last_layer: int
    out_site: str = "block_out"  # where the last layer's outputs are read (Solver.target_site)

    def __call__(self, current: Params, layer: int) -> downstream.Readout:
        keys, outputs = read_sites(current, self.cfg, self.tokens, self.mask, layer,
                                   self.last_layer, self.lookup, self.out_site)
        per_request = (keys.shape[0] // self.weights.shape[0], self.weights.shape[0])
        keys = jnp.einsum("ecf,c->ef", keys.reshape(*per_request, -1), self.weights)
        return downstream.Readout(keys=keys, outputs=outputs.reshape(*per_request, -1)[:, 0])


def batch_readout(cfg: ModelConfig, tokenizer: Any, requests: Sequence[Request],
                  templates: Sequence[str], fact_token: str, last_layer: int,
                  pad_id: int = 0, out_site: str = "block_out") -> BatchReadout:
    rows = lookup_rows(tokenizer, requests, templates, fact_token, pad_id)
    return BatchReadout(to_device(rows.tokens), to_device(rows.mask),
                        to_device(rows.lookup), to_device(template_weights(len(templates))),
                        cfg, last_layer, out_site)


def edit_requests(params: Params, cfg: ModelConfig, tokenizer: Any,
                  requests: Sequence[Request], templates: Sequence[str],
                  stats: Mapping[int, Array], states: Mapping[int, Any],
                  config: StructuredConfig, pad_id: int = 0,
                  solver: downstream.Solver | None = None, refine: Any = None
                  ) -> tuple[Params, dict[int, Any], dict[str, Any]]:
    """Insert one batch of requests. stats[layer] is what the solver reads: E[kkᵀ] (MEMIT,
    LyapLock), P (AlphaEdit) or `OteStats`; `solver` defaults to the config's. `refine`
    (MetaKE's, `keedit_jax.methods.metake.metake_refiner`) turns Stage I's targets into the
    targets inserted, given the params, the encoded batch, the readout and the states.

    Returns (edited params, new solver states, diagnostics). Nothing is changed when a target
    loss goes non-finite or a solve fails: the error names the request ids and the layer.
    """
    for layer in config.layers:
        cfg.check_layer(layer, "edited layer")
    if config.targets == "each_layer" and len(config.layers) > 1:
        return edit_each_layer(params, cfg, tokenizer, requests, templates, stats, states,
                               config, pad_id, solver, refine)
    if templates[0] != "{}":
        raise ValueError(f"the first context template must be the bare '{{}}' (the clean "
                         f"prompt MEMIT reads its outputs from), got {templates[0]!r}")
    solver = solver or config.make_solver()
    encoded = encode_requests(tokenizer, requests, templates, config.target)
    result = optimise_shifts(params, cfg, encoded.batch, config.target)
    check_finite(result, encoded.case_ids)
    readout = batch_readout(cfg, tokenizer, requests, templates, config.target.fact_token,
                            config.layers[-1], pad_id, solver.target_site)
    column = config.target_index(solver)
    targets, refined = result.targets[:, column], {}
    if refine is not None:
        targets, refined = refine(params, targets, encoded.batch, readout, states)
    params, states, reports = downstream.edit_layers(
        params, down_proj_path(cfg), solver, stats, states,
        targets, readout, layers=config.layers, request_ids=[r.case_id for r in requests])
    rows = edit_diagnostics(params, cfg, encoded, readout, result, targets, config, column)
    for row, moved in zip(rows, refined["moved"], strict=True) if "moved" in refined else ():
        row["target_moved"] = moved  # MetaKE: ‖V − V⁽⁰⁾‖ / ‖δ‖
    diagnostics = {"requests": rows,
                   "relative_residual": {layer: float(r.solve.rel_residual)
                                         for layer, r in reports.items()},
                   "fitted": {layer: (r.keys, r.values) for layer, r in reports.items()},
                   "refined": refined}
    return params, states, diagnostics


def edit_each_layer(params: Params, cfg: ModelConfig, tokenizer: Any,
                    requests: Sequence[Request], templates: Sequence[str],
                    stats: Mapping[int, Array], states: Mapping[int, Any],
                    config: StructuredConfig, pad_id: int = 0,
                    solver: downstream.Solver | None = None, refine: Any = None
                    ) -> tuple[Params, dict[int, Any], dict[str, Any]]:
    """BLUE (Li et al. 2025, "Rethinking Residual Distribution in Locate-then-Edit Model
    Editing", the Boundary Layer UpdatE strategy): no residual distribution. Each edited layer,
    in increasing depth, is a one-layer edit of its own: its target optimised at its own
    output, on the model with the shallower layers already edited, and the whole residual
    fitted there (R/1, where MEMIT gives layer i of L the share R/(L − i) of one target at the
    last layer). The paper edits the two boundary layers of a MEMIT range ([4, 8] for 4..8 on
    Llama3-8B); the flagfile names them. Diagnostics are the deepest layer's; the solve
    residuals and fitted pairs are every layer's."""
    states, relative, fitted = dict(states), {}, {}
    for layer in config.layers:
        one = dataclasses.replace(config, layers=(layer,), targets="last_layer",
                                  target=dataclasses.replace(config.target, layer=layer))
        params, new_states, diagnostics = edit_requests(
            params, cfg, tokenizer, requests, templates, {layer: stats[layer]},
            {layer: states[layer]}, one, pad_id, solver, refine)
        states.update(new_states)
        relative.update(diagnostics["relative_residual"])
        fitted.update(diagnostics["fitted"])
    return params, states, {**diagnostics, "relative_residual": relative, "fitted": fitted}


def edit_diagnostics(edited: Params, cfg: ModelConfig, encoded: Any, readout: BatchReadout,
                     result: Any, targets: Array, config: StructuredConfig, column: int = 0
                     ) -> list[dict[str, Any]]:
    """Per request: the target optimisation's `shift_diagnostics`, then, under the edited
    weights alone, the target probability on the same prompts ("target_prob_edited") and
    the share of δ the last edited layer now realises at the lookup token ("realised":
    ⟨h_edited − h, δ⟩/‖δ‖²; 1 when the solve wrote all of z, 0 when it changed nothing), at
    the site the solver inserts (the shift `column` of the target step: PMET's MLP output)."""
    rows = shift_diagnostics(result, config.target, encoded.case_ids)
    h, delta = result.h[:, column], targets - result.h[:, column]
    moved = readout(edited, config.layers[-1]).outputs - h
    realised = jnp.sum(moved * delta, -1) / jnp.maximum(jnp.sum(delta * delta, -1), 1e-30)
    prob = unshifted_target_prob(edited, cfg, encoded.batch, config.target)
    realised, prob = parallel.to_host((realised, prob))
    for row, r, p in zip(rows, realised, prob, strict=True):
        row.update(target_prob_edited=float(p), realised=float(r))
    return rows
