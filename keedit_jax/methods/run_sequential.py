"""The sequential (lifelong) editing protocol: a stream of edit batches, solver state carried.

    records -> batches of `edit_batch_size` -> for each batch: targets, multi-layer closed-form
    solve with the carried state (Grams, error terms, queues) -> every `eval_every` batches:
    the edits so far (efficacy, generalisation, specificity) and general capability
    (perplexity drift, GLUE-style tasks) -> every `checkpoint_every` batches: an orbax
    checkpoint of the edited layers, solver states, stream position and metrics.

A killed run started again with the same flags resumes at its last checkpoint (see
`keedit_jax.stream_checkpoint`). The editors (docs/references.md: ote_se §3, lyaplock §3):

| method | solver |
|---|---|
| memit | naive: each batch a one-time MEMIT edit of the current weights (§3.5) |
| memit_seq | MEMIT (aligned): the carried key Gram (§3.1) |
| memit_seq + --post_processing | PRUNE / RECT with Algorithm 1's correction (§3.3); \
--noerror_correction: without it (§3.4) |
| alphaedit | as published, Eq. 2 with its key cache (--noalphaedit_key_cache: naive) |
| alphaedit_aligned | the full target of Prop. 3.2: P(λC + G + KᵀK) + L2·I |
| memorize_latest | Eq. 32: fit [K₀ \\| K_t] only, forgetting earlier batches (§3.6) |
| lyaplock | the virtual-queue solve (lyaplock §2.5-2.6) |
| metake | AlphaEdit with its key cache, targets refined by `methods.metake` first |
| sphere | AlphaEdit with its key cache, each ΔW projected by SPHERE's P⊥ = I − αUUᵀ |
| grace --sequential | no solver: each batch into the codebook so far (`methods.grace`) |

`memit` with --post_processing=rect is naive RECT (per batch); with prune, naive PRUNE: one
log-compression of W_T − W₀ against σ_max(W₀) after the last batch (§3.5).
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from keedit_jax import downstream, interrupts, parallel
from keedit_jax.api import SequentialEditor, Settings
from keedit_jax.data import CounterFactRecord
from keedit_jax.eval.structured import (
    evaluate_counterfact,
    evaluate_zsre,
    model_score_fn,
    prefetched,
    summarize,
)
from keedit_jax.files import atomic_write
from keedit_jax.flags import (
    DataFlags,
    EditFlags,
    MetaKEFlags,
    ModelFlags,
    RunFlags,
    SequentialFlags,
    StructuredFlags,
)
from keedit_jax.methods.general_probe import GeneralProbe
from keedit_jax.methods.metake import MetaKEConfig
from keedit_jax.methods.run_structured import (
    EDITED_LAYERS,
    consistency_files,
    diagnostics_summary,
    encodable,
    greedy_generate_fn,
    layer_kernels,
    load_structured_run,
    log_batch,
    save_edited_layers,
    stats_source,
    unedited_neighbours,
)
from keedit_jax.models.checkpoint import export_gguf
from keedit_jax.models.params import Params, down_proj_path, get_path, set_layers, to_device
from keedit_jax.organism.build import cache_root
from keedit_jax.plots import CURVE_METRICS, plot_curves
from keedit_jax.registry import RECORDS, load_factory
from keedit_jax.stream_checkpoint import StreamCheckpoints, group_settings, run_fingerprint

# What each solver reads per layer: E[kkᵀ], the projector P, or both (OteStats).
StatsKind = str


@dataclasses.dataclass(frozen=True)
class Editor:
    """A sequential editor: the per-layer solver, the statistics it reads, and whether the
    naive PRUNE log-compression runs once after the stream. No solver: the method's
    structured batch editor edits each batch, its state in the parameters it returns
    (GRACE's codebook)."""

    solver: downstream.Solver | None
    stats_kind: StatsKind
    prune_at_end: bool = False
    metake: MetaKEConfig | None = None  # MetaKE: refine the targets before the AlphaEdit solve
    hparams: Any = None  # the solver's (MetaKE's gate and LyapLock's queue weights read them)


def params_state_editor(method: str, structured: StructuredFlags, seq: SequentialFlags,
                        metake: MetaKEFlags) -> Editor:
    """GRACE: no solver and no statistics; its stream state is its codebook."""
    return Editor(None, "none")


def lyaplock_editor(method: str, structured: StructuredFlags, seq: SequentialFlags,
                    metake: MetaKEFlags) -> Editor:
    queue = downstream.LyapLockHParams(
        mom2_update_weight=structured.mom2_update_weight, alpha=seq.lyaplock_alpha,
        control=seq.lyaplock_control, drift=seq.lyaplock_drift, dtype=structured.solve_dtype)
    return Editor(downstream.lyaplock(queue), "moment", hparams=queue)


def alphaedit_editor(method: str, structured: StructuredFlags, seq: SequentialFlags,
                     metake: MetaKEFlags) -> Editor:
    """AlphaEdit with its key cache; MetaKE refines its targets through the same solve."""
    meta = MetaKEConfig(
        steps=metake.metake_steps, meta_lr=metake.metake_lr, gate=metake.metake_gate,
        feedback=metake.metake_feedback) if method == "metake" else None
    hparams = downstream.AlphaEditHParams(l2=structured.alphaedit_l2,
                                          use_key_cache=seq.alphaedit_key_cache,
                                          dtype=structured.solve_dtype)
    return Editor(downstream.alphaedit(hparams), "projector", metake=meta, hparams=hparams)


def sphere_editor(method: str, structured: StructuredFlags, seq: SequentialFlags,
                  metake: MetaKEFlags) -> Editor:
    """AlphaEdit's editor with every update projected off the pretrained weights' principal
    directions (`downstream._sphere`)."""
    base = alphaedit_editor(method, structured, seq, metake)
    sparse = downstream.SphereHParams(cumulative_ratio=seq.sphere_cumulative_ratio,
                                      suppression=seq.sphere_suppression)
    return dataclasses.replace(base, solver=downstream.sphere(base.solver, sparse))


def aligned_alphaedit_editor(method: str, structured: StructuredFlags, seq: SequentialFlags,
                             metake: MetaKEFlags) -> Editor:
    return Editor(downstream.ote(downstream.OteHParams(
        mom2_update_weight=structured.mom2_update_weight, project=True,
        ridge=structured.alphaedit_l2, dtype=structured.solve_dtype), method), "ote")


def memorize_latest_editor(method: str, structured: StructuredFlags, seq: SequentialFlags,
                           metake: MetaKEFlags) -> Editor:
    return Editor(downstream.ote(downstream.OteHParams(
        mom2_update_weight=structured.mom2_update_weight, accumulate_keys=False,
        memorize_latest=True, dtype=structured.solve_dtype), method), "ote")


def memit_editor(method: str, structured: StructuredFlags, seq: SequentialFlags,
                 metake: MetaKEFlags) -> Editor:
    """Naive MEMIT or MEMIT-seq (aligned keys), with PRUNE/RECT post-processing: naive PRUNE
    once after the stream, the others per batch in the OTE family (with Algorithm 1's error
    correction when aligned)."""
    lam, post, aligned = structured.mom2_update_weight, seq.post_processing, method == "memit_seq"
    if post == "none" or (post == "prune" and not aligned):
        memit = downstream.MemitHParams(mom2_update_weight=lam, accumulate_keys=aligned,
                                        dtype=structured.solve_dtype)
        return Editor(downstream.memit(memit), "moment", prune_at_end=post == "prune",
                      hparams=memit)
    corrected = aligned and seq.error_correction
    family = downstream.OteHParams(
        mom2_update_weight=lam, accumulate_keys=aligned, post=post, rect_keep=seq.rect_keep,
        error_correction=corrected, ridge=seq.correction_ridge if corrected else 0.0,
        dtype=structured.solve_dtype)
    return Editor(downstream.ote(family, f"{method}_{post}"), "ote", hparams=family)


# Each method a sequential stream can run (its registry record's protocol is "sequential", or
# "by_dataset" with --sequential): its record's `sequential_editor` path.
SEQUENTIAL_EDITORS: dict[str, str] = {
    r.name: r.sequential_editor for r in RECORDS if r.sequential_editor}


def make_editor(method: str, structured: StructuredFlags, seq: SequentialFlags,
                metake: MetaKEFlags | None = None) -> Editor:
    """The solver of a sequential method from its flags."""
    if method not in SEQUENTIAL_EDITORS:
        raise ValueError(f"{method} has no sequential editor; sequential methods: "
                         f"{', '.join(SEQUENTIAL_EDITORS)}")
    return load_factory(SEQUENTIAL_EDITORS[method])(method, structured, seq,
                                                    metake or MetaKEFlags())


def prune_total_update(params: Params, original: Params, path: tuple[str, ...],
                       layers: Sequence[int]) -> Params:
    """Naive PRUNE (ote_se §3.5): W₀ + PRUNE(W_T − W₀) against σ_max(W₀), once per layer."""
    now, before = layer_kernels(params, path, layers), layer_kernels(original, path, layers)
    return set_layers(params, path, {
        layer: before[layer] + downstream.prune(now[layer] - before[layer], before[layer])
        for layer in layers})


def queue_weights(states: Mapping[int, Any], editor: Editor) -> dict[str, float]:
    """LyapLock's preservation weight w = a·Z/V per layer (1 while the constraint holds)."""
    if editor.solver is None or editor.solver.name != "lyaplock":
        return {}
    return {f"lyaplock_w_layer{layer}": round(float(downstream.preservation_weight(
        state, editor.hparams)), 4) for layer, state in states.items()}


def fact_key(record: Any) -> str:
    """A fact's identity: its subject in its relation's prompt (two edits of one fact share it)."""
    return record.request.filled_prompt


def latest_records(records: Sequence[Any]) -> list[Any]:
    """The last record of each fact: a fact edited again is judged on its latest target."""
    latest = {fact_key(r): r for r in records}
    return list(latest.values())


def forget_pairs(params: Params, states: dict[int, Any], stats: Mapping[int, jax.Array],
                 mom2_update_weight: float, path: tuple[str, ...],
                 pairs: Mapping[int, tuple[np.ndarray, np.ndarray]]) -> tuple[Params, dict]:
    """Remove earlier (key, value) pairs from MEMIT-seq layers (ote_se §2.9, a deletion): per
    layer, (λC + G − K_oᵀK_o) ΔW = −K_oᵀ(V'_o − K_o W) with the keys and values each layer was
    fitted to, and G −= K_oᵀK_o. The new values then enter as an ordinary batch, which is
    Prop. 3.5's replacement (deletion and insertion are both exact least-squares steps)."""
    states = dict(states)
    for layer, (old_keys, old_values) in pairs.items():
        kernel = get_path(params, path)[layer]
        k_o, v_o = to_device(old_keys), to_device(old_values)
        empty_k, empty_v = jnp.zeros((0, k_o.shape[1])), jnp.zeros((0, v_o.shape[1]))
        system = mom2_update_weight * stats[layer] + states[layer].key_gram
        delta, _ = downstream.resolve_conflicts(system, kernel, empty_k, empty_v, k_o, v_o)
        states[layer] = states[layer]._replace(key_gram=states[layer].key_gram - k_o.T @ k_o)
        params = downstream.add_layer_delta(params, path, layer, delta)
    return params, states


def edit_metrics(records: Sequence[Any], params: Params, cfg: Any, tokenizer: Any, *,
                 generate: bool = False, max_new_tokens: int = 32,
                 consistency: Mapping[str, Any] | None = None) -> dict[str, float]:
    """Efficacy, generalisation, specificity (and fluency when `generate`) of the records,
    means ×100, every prompt scored in a few batched calls."""
    if not records:
        return {}
    score = model_score_fn(params, cfg, tokenizer)
    if isinstance(records[0], CounterFactRecord):
        generate_fn = (greedy_generate_fn(params, cfg, tokenizer, max_new_tokens) if generate
                       else None)
        cases = prefetched(score, lambda fn: [evaluate_counterfact(
            r, fn, generate_fn=generate_fn, **(consistency or {})).metrics() for r in records])
    else:
        cases = prefetched(score, lambda fn: [evaluate_zsre(r, fn).metrics() for r in records])
    return {key: mean for key, (mean, _) in summarize(cases).items()}


HEADLINE = {"rewrite_success": "efficacy", "paraphrase_success": "generalisation",
            "neighborhood_success": "specificity", "rewrite_acc": "efficacy",
            "paraphrase_acc": "generalisation", "neighborhood_acc": "specificity",
            "ngram_entropy": "fluency", "reference_score": "consistency"}


def headline(metrics: Mapping[str, float]) -> dict[str, float]:
    """The papers' names for MEMIT's keys (CounterFact: *_success; ZsRE: *_acc)."""
    out = {}
    for key, name in HEADLINE.items():
        if key in metrics and name not in out:
            out[name] = round(metrics[key], 2)
    return out


@dataclasses.dataclass
class FactRegistry:
    """Per edited layer, the (key, value) each fact was last fitted with, in fixed slots (one
    per distinct fact of the stream; the slot map lives in the run's progress as JSON). This
    is the one O(facts) state, kept only under --resolve_conflicts (ote_se §2.11)."""

    keys: dict[int, np.ndarray]
    values: dict[int, np.ndarray]

    @classmethod
    def empty(cls, n_facts: int, layers: Sequence[int], d_ff: int, d_model: int) -> FactRegistry:
        return cls({layer: np.zeros((n_facts, d_ff), np.float32) for layer in layers},
                   {layer: np.zeros((n_facts, d_model), np.float32) for layer in layers})

    def arrays(self) -> dict[str, Any]:
        return {"keys": self.keys, "values": self.values}

    def load(self, arrays: Mapping[str, Any]) -> None:
        self.keys = {layer: np.array(a) for layer, a in arrays["keys"].items()}
        self.values = {layer: np.array(a) for layer, a in arrays["values"].items()}

    def pairs(self, slots: Sequence[int]) -> dict[int, tuple[np.ndarray, np.ndarray]]:
        return {layer: (self.keys[layer][slots], self.values[layer][slots])
                for layer in self.keys}

    def store(self, batch: Sequence[Any], fitted: Mapping[int, tuple[Any, Any]],
              progress: dict[str, Any]) -> None:
        slots = progress["slots"]
        for row, record in enumerate(batch):
            slot = slots.setdefault(fact_key(record), len(slots))
            for layer, (keys, values) in fitted.items():
                self.keys[layer][slot] = parallel.to_host(keys[row])
                self.values[layer][slot] = parallel.to_host(values[row])


def resolve_repeated_facts(params: Params, states: dict[int, Any], registry: FactRegistry,
                           batch: Sequence[Any], stats: Mapping[int, jax.Array],
                           mom2_update_weight: float, path: tuple[str, ...],
                           progress: Mapping[str, Any]) -> tuple[Params, dict[int, Any]]:
    """Before a batch: remove the earlier values of the facts it edits again."""
    slots = [progress["slots"][fact_key(r)] for r in batch if fact_key(r) in progress["slots"]]
    if not slots:
        return params, states
    logging.info("%d fact(s) of this batch were edited before: their earlier values are "
                 "removed (conflict resolution)", len(slots))
    return forget_pairs(params, states, stats, mom2_update_weight, path, registry.pairs(slots))


def run_sequential(*, checkpoint: Path, configs: dict[str, Any]) -> dict[str, Any]:
    model: ModelFlags = configs["ModelFlags"]
    data: DataFlags = configs["DataFlags"]
    edit: EditFlags = configs["EditFlags"]
    run: RunFlags = configs["RunFlags"]
    flags: StructuredFlags = configs["StructuredFlags"]
    seq: SequentialFlags = configs["SequentialFlags"]
    editor = make_editor(edit.method, flags, seq, configs["MetaKEFlags"])  # before loading
    # a solver streams MEMIT's targets at its layers; a batch editor reads its own config
    loaded = load_structured_run(checkpoint, model, data, flags,
                                 "memit" if editor.solver else edit.method)
    cfg, original, tokenizer = loaded.cfg, loaded.params, loaded.tokenizer
    chosen = Settings(edit.method, flags, configs["LongFormFlags"], seq, configs["MetaKEFlags"],
                      run.seed, run.max_new_tokens)
    stream = SequentialEditor.prepared(loaded.model, tokenizer, chosen, loaded.moments, editor)
    config, templates, stats = stream.config, stream.templates, stream.stats
    logging.info("context templates %s", templates)
    failed = dict(loaded.failed)
    records = encodable(loaded.records, tokenizer, templates, config.target, failed,
                        cfg.max_positions)
    records = unedited_neighbours([records])[0]  # the stream edits every subject
    drift_source = loaded.source or stats_source(checkpoint, flags, cache_root() / "stats")
    probe = GeneralProbe.build(original, cfg, tokenizer, seq, drift_source=drift_source,
                               skip=flags.stats_samples)
    path = down_proj_path(cfg)
    batches = [records[i:i + edit.edit_batch_size]
               for i in range(0, len(records), edit.edit_batch_size)]
    resolved, defaults = group_settings(configs)
    resolved["templates"] = {"texts": list(templates)}  # sampled: the flags alone do not fix them
    store = StreamCheckpoints(seq.checkpoint_dir or Path(run.output_dir) / "checkpoints",
                              run_fingerprint(resolved), settings=resolved, defaults=defaults)
    progress: dict[str, Any] = {"history": [], "applied": [], "seconds": [], "slots": {},
                                "diagnostics": []}
    registry = FactRegistry.empty(len({fact_key(r) for r in records}), config.layers,
                                  cfg.d_ff, cfg.d_model) if seq.resolve_conflicts else None

    def stream_state(state: dict[str, Any]) -> dict[str, Any]:
        return {**state, "registry": registry.arrays()} if registry else state

    restored = (store.restore(lambda meta: stream_state(stream.state_like(meta)))
                if seq.resume else None)
    if not seq.resume:
        store.clear()
    if restored is None:
        progress["pre"] = {**headline(edit_metrics(
            latest_records(records), original, cfg, tokenizer, generate=True,
            max_new_tokens=run.max_new_tokens, consistency=consistency_files(flags))),
            **probe(original)}
        progress["history"].append({"edits": 0, **progress["pre"]})
        position = 0
    else:
        position, state, progress = restored
        stream.load_state(position, state)
        if registry:
            registry.load(state["registry"])
        logging.info("resuming %s at batch %d/%d (%d edits done) from %s", edit.method,
                     position, len(batches), sum(map(len, progress["applied"])),
                     store.directory)
    for index in range(position, len(batches)):
        batch = batches[index]
        began = time.perf_counter()
        if seq.resolve_conflicts:
            stream.edited, stream.states = resolve_repeated_facts(
                stream.edited, stream.states, registry, batch, stats, flags.mom2_update_weight,
                path, progress)
        inserted = stream.edit([r.request for r in batch])
        if seq.resolve_conflicts:
            registry.store(batch, inserted["fitted"], progress)
        progress["seconds"].append(time.perf_counter() - began)
        progress["applied"].append([r.case_id for r in batch])
        progress["diagnostics"].extend(inserted["diagnostics"])
        done = sum(map(len, progress["applied"]))
        log_batch(index + 1, len(batches), inserted["diagnostics"], progress["seconds"][-1])
        logging.info("%s: %d edits done (%.2f edits/s)", edit.method, done,
                     len(batch) / progress["seconds"][-1])
        last = index + 1 == len(batches)
        if (index + 1) % seq.eval_every == 0 or last:
            point = {"edits": done, **headline(edit_metrics(latest_records(records[:done]),
                                                            stream.edited, cfg, tokenizer)),
                     **probe(stream.edited), **queue_weights(stream.states, editor)}
            progress["history"].append(point)
            logging.info("after %d edits: %s", done, point)
        if (index + 1) % seq.checkpoint_every == 0 or last:
            store.save(index + 1, stream_state(stream.stream_state()),
                       {**progress, **stream.state_metadata()})
        interrupts.raise_pending()  # after the batch's checkpoint
        save_progress(Path(run.output_dir), progress)
    store.close()
    params = stream.params  # naive PRUNE's once-at-the-end compression applied
    save_edited_layers(Path(run.output_dir) / EDITED_LAYERS, params, path, config.layers)
    if run.export_gguf:
        host_params = parallel.to_host(params)  # a collective: every process gathers
        if parallel.is_primary():
            export_gguf(run.export_gguf, cfg, host_params, dtype=run.export_gguf_dtype,
                        source=checkpoint)
    final = headline(edit_metrics(latest_records(records), params, cfg, tokenizer, generate=True,
                                  max_new_tokens=run.max_new_tokens,
                                  consistency=consistency_files(flags)))
    results = report(edit, seq, records, progress, final, probe(params))
    results.update(templates=list(templates), failed={str(k): v for k, v in failed.items()})
    metrics = CURVE_METRICS + tuple(f"{task}_f1" for task in probe.tasks)
    plot = plot_curves({edit.method: progress["history"]}, Path(run.output_dir) / "curves.png",
                       metrics, results["title"])
    results["plot"] = str(plot) if plot else None
    return results


def save_progress(output: Path, progress: Mapping[str, Any]) -> None:
    """The curve and batch times so far as partial.json, rewritten after each batch: a run
    stopped later keeps its figures readable without the checkpoints."""
    if parallel.is_primary():
        output.mkdir(parents=True, exist_ok=True)
        atomic_write(output / "partial.json", json.dumps(
            {"curve": progress["history"], "seconds_per_batch": progress["seconds"],
             "applied_case_ids": [c for batch in progress["applied"] for c in batch]},
            indent=1, default=str))


def report(edit: EditFlags, seq: SequentialFlags, records: Sequence[Any],
           progress: Mapping[str, Any], final: Mapping[str, float],
           general: Mapping[str, float]) -> dict:
    pre, post = progress["pre"], {**final, **general}
    rows = [{"metric": key, "pre": pre.get(key, math.nan), "post": post[key]} for key in post]
    applied = [case for batch in progress["applied"] for case in batch]
    seconds = progress["seconds"]
    return {"title": f"{edit.method} sequential: {len(records)} edits in batches of "
                     f"{edit.edit_batch_size}",
            "table": rows, "curve": progress["history"], "applied_case_ids": applied,
            "seconds_per_batch": seconds,
            "seconds_per_edit_steady": float(np.mean(seconds[1:] or seconds))
            / edit.edit_batch_size,
            "post_processing": seq.post_processing,
            "diagnostics": {"summary": diagnostics_summary(progress["diagnostics"]),
                            "requests": progress["diagnostics"]}}
