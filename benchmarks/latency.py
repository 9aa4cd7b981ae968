"""Per-edit latency of every method on the organism, and the naive variants of the edit loop.

- `method_edits`: one callable per (method, batch size) that inserts a fixed batch into the
  unedited model (fresh solver state) through the library's own pipeline (the flagfile's
  settings, `edit_requests` / `edit_longform`), evaluation left out. Structured methods edit
  CounterFact requests, long-form ones UnKEBench-format records. Timed by
  `common.time_interleaved`: the warm-up round compiles; the timed rounds repeat the same
  batch, so nothing recompiles.
- `stepped_shifts`: the reference's optimisation loop, one jitted step per Python iteration
  with a host round-trip for the stop test (`loop._step`, the library's own step), against
  `loop.optimise_shifts`, the same steps in one compiled `while_loop`.
- `affinity_variants`: μKE's affinity figure gradients vmap'd against one `jax.grad` per
  figure (`WindowConfig.affinity_gradients="loop"`).
- `reference_shifts`, `reference_windows`, `reference_affinities`: the upstream steps with
  every naive choice at once (no prefix cache, logits at every position, affinity gradients
  in a loop, Python-stepped where the loop is MEMIT's); `benchmarks.vs_reference` swaps
  them into the library's pipelines.
- `endtoend` (`memit_paths`, `muke_paths`): the library's upstream step as a user runs it
  against those, and the largest δ difference between the two. Each optimisation alone is
  bounded (the headline's other rows); the issue's ≥ 3× goal is about them together.

Called by `benchmarks.run` and `benchmarks.vs_reference`; not a command of its own.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import flags as absl_flags

from keedit_jax import downstream
from keedit_jax import flags as run_flags
from keedit_jax.api import resolve_checkpoint
from keedit_jax.data import read_longform
from keedit_jax.methods.metake import metake_refiner
from keedit_jax.methods.run_sequential import make_editor
from keedit_jax.methods.run_structured import (
    load_structured_run,
    solver_statistics,
    structured_config,
)
from keedit_jax.methods.run_unstructured import (
    ORGANISM_FILES,
    SAMPLE_SEED,
    alpaca_pool,
    preservation_contexts,
    unstructured_config,
)
from keedit_jax.methods.structured import edit_requests
from keedit_jax.methods.unstructured import edit_longform
from keedit_jax.upstream import context_templates, encode_requests, optimise_shifts
from keedit_jax.upstream.encode import read_every_position
from keedit_jax.upstream.longform import WindowBatch, encode_edits, pack_windows
from keedit_jax.upstream.loop import (
    LossTerms,
    ShiftResult,
    _Carry,
    _step,
    is_finite,
    prepare,
)
from keedit_jax.upstream.windowed import compute_affinities, optimise_windows

STRUCTURED = ("memit", "alphaedit", "memit_seq", "alphaedit_aligned", "memorize_latest",
              "lyaplock", "metake")
LONGFORM = ("unke", "anyedit", "anyedit_star", "muke", "muke_star")
SEQUENTIAL = ("memit_seq", "alphaedit_aligned", "memorize_latest", "lyaplock", "metake")


def flag_configs(flagfile: str, *overrides: str) -> dict[str, Any]:
    """Every flag group's config from a flagfile plus overrides (a fresh FlagValues each)."""
    values = absl_flags.FlagValues()
    run_flags.define_flags(flag_values=values)
    values(["bench", f"--flagfile={flagfile}", *overrides])
    return {group.__name__: run_flags.from_flags(group, values)
            for group in run_flags.FLAG_GROUPS}


@dataclasses.dataclass
class Loaded:
    """A model's pieces shared by every method that edits it (loaded once per layer set)."""

    checkpoint: Path
    runs: dict[tuple[int, ...], Any] = dataclasses.field(default_factory=dict)
    templates: list[str] | None = None

    def run(self, configs: dict[str, Any]) -> Any:
        """`load_structured_run` (model, CounterFact records, cached moments) per layer set."""
        structured = configs["StructuredFlags"]
        layers = structured.layer_tuple
        if layers not in self.runs:
            data = dataclasses.replace(configs["DataFlags"], dataset_format="counterfact",
                                       dataset="", num_edits=100)
            self.runs[layers] = load_structured_run(self.checkpoint, configs["ModelFlags"],
                                                    data, structured)
        return self.runs[layers]


def structured_edit(loaded: Loaded, method: str, batch: int, model: str) -> Callable[[], Any]:
    """Insert `batch` CounterFact requests with `method`'s pipeline, from the unedited model."""
    configs = flag_configs(f"configs/{method}.cfg", f"--model={model}")
    flags, run = configs["StructuredFlags"], loaded.run(configs)
    cfg, params = run.cfg, run.params
    if loaded.templates is None:
        seed = configs["RunFlags"].seed
        loaded.templates = context_templates(params, cfg, run.tokenizer, jax.random.key(seed))
    requests = [r.request for r in run.records[:batch]]
    if len(requests) < batch:
        raise ValueError(f"{method}: only {len(requests)} CounterFact records, need {batch}")
    refine = None
    if method in SEQUENTIAL:
        editor = make_editor(method, flags, configs["SequentialFlags"], configs["MetaKEFlags"])
        solver = downstream.in_solve_dtype(editor.solver, flags.solve_dtype)
        config = structured_config("memit", flags, cfg.n_layers)
        stats = solver_statistics(run.moments, editor.stats_kind, flags.nullspace_threshold)
        if editor.metake is not None:
            refine = metake_refiner(editor.metake, cfg, config.target, stats, config.layers,
                                    editor.hparams)
    else:
        config = structured_config(method, flags, cfg.n_layers)
        solver = config.make_solver()
        stats = solver_statistics(run.moments, "moment" if method == "memit" else "projector",
                                  flags.nullspace_threshold)

    def edit() -> Any:
        states = downstream.init_states(solver, config.layers, cfg.d_ff, cfg.d_model)
        return edit_requests(params, cfg, run.tokenizer, requests, loaded.templates, stats,
                             states, config, solver=solver, refine=refine)[0]

    return edit


def longform_edit(loaded: Loaded, method: str, batch: int, model: str) -> Callable[[], Any]:
    """Insert `batch` UnKEBench-format records with `method`'s pipeline (affinities, where μKE
    uses them, computed inside the edit: the cost of a first run, before any cache)."""
    configs = flag_configs(f"configs/{method}.cfg", f"--model={model}")
    structured, longform = configs["StructuredFlags"], configs["LongFormFlags"]
    run = loaded.run(configs)
    cfg, params, tokenizer = run.cfg, run.params, run.tokenizer
    config = unstructured_config(method, structured, longform, cfg.n_layers)
    records = read_longform(loaded.checkpoint / "benchmarks" / ORGANISM_FILES["unkebench"])
    edits, _ = encode_edits(tokenizer, records, config.window, cfg.max_positions)
    if len(edits) < batch:
        raise ValueError(f"{method}: only {len(edits)} encodable records, need {batch}")
    edits = edits[:batch]
    pad_id = tokenizer.pad_token_id or 0
    stats, preservation = {}, None
    if config.solver == "unke":
        preservation = preservation_contexts(
            tokenizer, alpaca_pool(loaded.checkpoint, longform), longform.preservation_samples,
            np.random.default_rng(SAMPLE_SEED), pad_id)
    else:
        stats = solver_statistics(run.moments, "moment" if config.solver == "memit"
                                  else "projector", structured.nullspace_threshold)

    def edit() -> Any:
        return edit_longform(params, cfg, edits, stats, config, pad_id=pad_id,
                             preservation=preservation)[0]

    return edit


def method_edits(model: str, batches: dict[str, Sequence[int]]) -> dict[str, Callable[[], Any]]:
    """{"<method> @<batch>": edit callable} for each method and its batch sizes."""
    loaded = Loaded(resolve_checkpoint(run_flags.ModelFlags(model=model).model))
    calls = {}
    for method, sizes in batches.items():
        build = longform_edit if method in LONGFORM else structured_edit
        for size in sizes:
            calls[f"{method} @{size}"] = build(loaded, method, size, model)
    return calls


# --- the naive variants of the loop -------------------------------------------------------


@partial(jax.jit, static_argnames=("cfg", "hp"))
def _jit_prepare(params: Any, cfg: Any, batch: Any, hp: Any) -> Any:
    return prepare(params, cfg, batch, hp)


@partial(jax.jit, static_argnames=("cfg", "hp"))
def _jit_step(params: Any, cfg: Any, batch: Any, hp: Any, problem: Any, carry: _Carry,
              step: jax.Array) -> tuple[_Carry, tuple[LossTerms, jax.Array]]:
    trainable = jnp.ones(problem.h.shape[:2], bool)
    return _step(params, cfg, batch, hp, problem, False, trainable, carry, step)


def stepped_shifts(params: Any, cfg: Any, batch: Any, hp: Any,
                   prefix_cache: bool = True) -> ShiftResult:
    """The reference's loop: one jitted step per Python iteration, the early stop read on the
    host after each step (torch's `loss.item()`), the same Adam steps as `optimise_shifts`.
    prefix_cache=False drops the cached prefix after `prepare`, so every step runs every layer
    from the tokens (`loop.shifted_log_probs`), as the reference does. Returns the
    `ShiftResult` a pipeline reads (its trace ends at the step that stopped, where the
    compiled loop's repeats that step to v_num_grad_steps)."""
    problem = _jit_prepare(params, cfg, batch, hp)
    if not prefix_cache:
        problem = problem._replace(prefix=None)
    delta = jnp.zeros(problem.h.shape, jnp.float32)
    carry = _Carry(delta, optax.adam(hp.v_lr).init(delta), jnp.zeros(delta.shape[0], bool),
                   jnp.zeros(delta.shape[0], jnp.int32))
    terms, norms = [], []
    for step in range(hp.v_num_grad_steps):
        carry, (term, norm) = _jit_step(params, cfg, batch, hp, problem, carry,
                                        jnp.asarray(step))
        terms.append(term)
        norms.append(norm)
        if bool(jnp.all(carry.stopped)):
            break
    trace = LossTerms(*(jnp.stack(field, axis=1) for field in zip(*terms, strict=True)))
    return ShiftResult(carry.delta, problem.h, problem.h + carry.delta, trace,
                       jnp.stack(norms, axis=1), carry.updates, is_finite(trace, carry.delta))


def delta_agreement(optimised: jax.Array, naive: jax.Array) -> dict[str, float]:
    """max |Δδ| and that over max |δ|: a speed-up counts only if both paths compute the same δ."""
    diff = jnp.max(jnp.abs(optimised - naive))
    return {"max_abs_diff": float(diff), "relative": float(diff / jnp.max(jnp.abs(optimised)))}


def memit_batches(model: str, sizes: Sequence[int]) -> tuple[Any, Any, dict[int, Any]]:
    """(run, target config, {size: ShiftBatch}) of the first CounterFact requests, encoded with
    memit.cfg's target settings and the model's context templates."""
    configs = flag_configs("configs/memit.cfg", f"--model={model}")
    run = Loaded(resolve_checkpoint(configs["ModelFlags"].model)).run(configs)
    target = structured_config("memit", configs["StructuredFlags"], run.cfg.n_layers).target
    templates = context_templates(run.params, run.cfg, run.tokenizer, jax.random.key(0))
    return run, target, {size: encode_requests(run.tokenizer,
                                               [r.request for r in run.records[:size]],
                                               templates, target).batch for size in sizes}


def loop_variants(model: str, sizes: Sequence[int]) -> tuple[dict[str, Callable[[], Any]],
                                                             dict[str, float]]:
    """Compiled against Python-stepped shift optimisation on CounterFact requests (memit.cfg's
    target settings), per batch size; and the largest |δ| difference between the two."""
    run, target, batches = memit_batches(model, sizes)
    calls, diffs = {}, {}
    for size, batch in batches.items():
        compiled = partial(optimise_shifts, run.params, run.cfg, batch, target)
        stepped = partial(stepped_shifts, run.params, run.cfg, batch, target)
        diffs[f"@{size}"] = float(jnp.max(jnp.abs(compiled().delta - stepped().delta)))
        calls[f"loop compiled @{size}"] = lambda c=compiled: c().delta
        calls[f"loop python-stepped @{size}"] = lambda s=stepped: s().delta
    return calls, diffs


def muke_batches(model: str, n_edits: int) -> tuple[Any, Any, list[WindowBatch]]:
    """(run, μKE's config from configs/muke.cfg, one WindowBatch per edit): the first
    `n_edits` UnKEBench-format records, one at a time as in the papers."""
    configs = flag_configs("configs/muke.cfg", f"--model={model}")
    loaded = Loaded(resolve_checkpoint(configs["ModelFlags"].model))
    run = loaded.run(configs)
    config = unstructured_config("muke", configs["StructuredFlags"], configs["LongFormFlags"],
                                 run.cfg.n_layers)
    records = read_longform(loaded.checkpoint / "benchmarks" / ORGANISM_FILES["unkebench"])
    edits, _ = encode_edits(run.tokenizer, records[:n_edits], config.window,
                            run.cfg.max_positions)
    return run, config, [pack_windows([edit], 0) for edit in edits]


def affinity_variants(model: str, n_edits: int) -> dict[str, Callable[[], Any]]:
    """μKE's up-front affinities of `n_edits` records, one at a time as in the papers: figure
    gradients as the library computes them (affinity_gradients "used") against one jax.grad
    per figure (the reference)."""
    run, config, batches = muke_batches(model, n_edits)
    looped = dataclasses.replace(config.window, affinity_gradients="loop")

    def each(window: Any) -> Callable[[], Any]:
        return lambda: [compute_affinities(run.params, run.cfg, b, config.target, window)
                        for b in batches]

    return {"affinity vmap": each(config.window), "affinity loop": each(looped)}


# --- end to end: every optimisation against every naive choice at once --------------------


Paths = tuple[dict[str, Callable[[], Any]], dict[str, dict[str, float]]]


def reference_shifts(params: Any, cfg: Any, batch: Any, hp: Any) -> ShiftResult:
    """MEMIT's target step the reference's way: Python-stepped, every layer at every step,
    logits at every position (`stepped_shifts`)."""
    return stepped_shifts(params, cfg, read_every_position(batch), hp, prefix_cache=False)


def every_position(batch: WindowBatch) -> WindowBatch:
    """The windows with logits read at every position (the reference's cost)."""
    return dataclasses.replace(batch, shift=read_every_position(batch.shift))


def reference_windows(params: Any, cfg: Any, batch: WindowBatch, hp: Any, wc: Any,
                      affinity: jax.Array | None = None) -> Any:
    """`optimise_windows` the reference's way: every layer at every step, logits at every
    position (AnyEdit's stages too: no window-only reads). Compiled: there is no
    Python-stepped windowed loop (`reference_shifts` has MEMIT's)."""
    return optimise_windows(params, cfg, every_position(batch), hp, wc, affinity,
                            prefix_cache=False, window_reads=False)


def reference_affinities(params: Any, cfg: Any, batch: WindowBatch, hp: Any,
                         wc: Any) -> jax.Array:
    """μKE's up-front affinities the reference's way: one jax.grad per figure, logits at
    every position. They still start from the cached prefix (the library has no uncached
    affinity path), so this understates the reference's cost a little."""
    looped = dataclasses.replace(wc, affinity_gradients="loop")
    return compute_affinities(params, cfg, every_position(batch), hp, looped)


def memit_paths(params: Any, cfg: Any, target: Any, batches: dict[int, Any]) -> Paths:
    """MEMIT's target step (compute_z) per batch size: `optimise_shifts` (one compiled loop,
    prefix cache, logits at the read positions) against `reference_shifts`; and their δ
    agreement."""
    calls, agreement = {}, {}
    for size, batch in batches.items():
        optimised = partial(optimise_shifts, params, cfg, batch, target)
        naive = partial(reference_shifts, params, cfg, batch, target)
        agreement[f"memit @{size}"] = delta_agreement(optimised().delta, naive().delta)
        calls[f"memit optimised @{size}"] = lambda c=optimised: c().delta
        calls[f"memit naive @{size}"] = lambda c=naive: c().delta
    return calls, agreement


def muke_paths(params: Any, cfg: Any, target: Any, window: Any, batch: WindowBatch) -> Paths:
    """μKE's upstream for one batch: affinities (the library's default), then
    `optimise_windows` with the prefix cache and logits at the read positions, against
    `reference_affinities` then `reference_windows`; and their δ agreement."""
    def optimised() -> jax.Array:
        affinity = compute_affinities(params, cfg, batch, target, window)
        return optimise_windows(params, cfg, batch, target, window, affinity).delta

    def naive() -> jax.Array:
        affinity = reference_affinities(params, cfg, batch, target, window)
        return reference_windows(params, cfg, batch, target, window, affinity).delta

    size = batch.starts.shape[0]
    return ({f"muke optimised @{size}": optimised, f"muke naive @{size}": naive},
            {f"muke @{size}": delta_agreement(optimised(), naive())})


def endtoend(model: str, memit_sizes: Sequence[int]) -> Paths:
    """Both methods' paths on `model`: MEMIT at each of `memit_sizes`, μKE on one edit (as the
    papers run it)."""
    run, target, batches = memit_batches(model, memit_sizes)
    memit_calls, memit_agreement = memit_paths(run.params, run.cfg, target, batches)
    run, config, (batch, *_) = muke_batches(model, 1)
    muke_calls, muke_agreement = muke_paths(run.params, run.cfg, config.target, config.window,
                                            batch)
    return {**memit_calls, **muke_calls}, {**memit_agreement, **muke_agreement}
