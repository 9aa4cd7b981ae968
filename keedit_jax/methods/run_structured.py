"""The MEMIT protocol run: read requests, evaluate, edit in batches, evaluate again, report.

Non-sequential, as MEMIT's evaluate.py: each batch is applied to the unedited model, its own
cases are evaluated under that edit, and the model is restored (`--sequential` runs go to
`run_sequential`, which carries edits and solver state through the stream).
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from safetensors.numpy import save_file

from keedit_jax import downstream, interrupts, parallel, registry
from keedit_jax.api import PreparedStructured
from keedit_jax.data import (
    CounterFactRecord,
    read_context_templates,
    read_dataset,
    without_edited_neighbours,
)
from keedit_jax.downstream import SolveError
from keedit_jax.eval.structured import (
    evaluate_counterfact,
    evaluate_zsre,
    load_attribute_snippets,
    load_tfidf,
    model_score_fn,
    summarize,
)
from keedit_jax.files import atomic_write, staged_file
from keedit_jax.flags import DataFlags, EditFlags, ModelFlags, RunFlags, StructuredFlags
from keedit_jax.methods.finetune import OBJECTIVES, FinetuneConfig
from keedit_jax.methods.grace import GraceConfig
from keedit_jax.methods.structured import StructuredConfig
from keedit_jax.models import GenerationConfig, LoadedModel, generate, load_model
from keedit_jax.models.layers import codebook_of
from keedit_jax.models.params import Params, down_proj_path, get_path, to_device
from keedit_jax.models.tokenizer import encode_prompts, load_tokenizer, stop_token_ids
from keedit_jax.organism.build import cache_root
from keedit_jax.stats import (
    DEFAULT_SOURCE,
    StatsConfig,
    default_cache_path,
    load_or_compute,
    null_space_projector,
    resolve_source,
)
from keedit_jax.upstream import (
    ContextConfig,
    EncodingError,
    NonFiniteShiftError,
    TargetConfig,
    context_templates,
    encoding_failures,
)

ORGANISM_DATASETS = {"counterfact": "benchmarks/counterfact.json",
                     "zsre": "benchmarks/zsre_mend_edit.json",
                     "auto": "benchmarks/counterfact.json"}


def structured_config(method: str, flags: StructuredFlags,
                      n_layers: int) -> StructuredConfig | FinetuneConfig | GraceConfig:
    """The method's structured config: its registry record's solver and shift sites, the
    flags' layers, target step and solver hyperparameters, solved in --solve_dtype (a solver
    without flags takes its defaults, but the dtype); a fine-tuning method's
    `FinetuneConfig`; GRACE's `GraceConfig`."""
    layers = flags.layer_tuple
    target = TargetConfig(layer=layers[-1], v_loss_layer=n_layers - 1,
                          fact_token=flags.fact_token, v_num_grad_steps=flags.v_num_grad_steps,
                          v_lr=flags.v_lr, v_weight_decay=flags.v_weight_decay,
                          clamp_norm_factor=flags.clamp_norm_factor, kl_factor=flags.kl_factor,
                          sites=registry.method_record(method).sites)
    if registry.method_record(method).solver == "grace":
        return GraceConfig(layers=layers, target=target, epsilon=flags.grace_epsilon,
                           lr=flags.grace_lr, steps=flags.grace_steps)
    if registry.method_record(method).batch_editor:
        return FinetuneConfig(layers=layers, target=target, objective=OBJECTIVES[method],
                              steps=flags.ft_steps, lr=flags.ft_lr,
                              norm_constraint=flags.ft_norm_constraint)
    return StructuredConfig(
        layers=layers, solver=registry.method_record(method).solver, target=target,
        memit=downstream.MemitHParams(mom2_update_weight=flags.mom2_update_weight,
                                      dtype=flags.solve_dtype),
        alphaedit=downstream.AlphaEditHParams(l2=flags.alphaedit_l2, dtype=flags.solve_dtype),
        solve_dtype=flags.solve_dtype, targets=registry.method_record(method).targets)


def stats_source(checkpoint: Path, flags: StructuredFlags, cache: Path) -> Path:
    """The statistics text: the flag's file or named corpus; else the organism's corpus
    written as jsonl, or for any other model the default corpus (Wikipedia's Vital Articles)."""
    if flags.stats_source or not (checkpoint / "world.json").exists():
        return resolve_source(flags.stats_source or DEFAULT_SOURCE, cache)
    from keedit_jax.organism import World, build_corpus  # noqa: PLC0415

    world = World.from_json((checkpoint / "world.json").read_text())
    path = cache / f"{checkpoint.name}_corpus.jsonl"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        atomic_write(path, "".join(json.dumps({"text": d}) + "\n"
                                   for d in build_corpus(world).documents))
    return path


def solver_statistics(moments: Mapping[int, Any], kind: str,
                      threshold: float) -> dict[int, Any]:
    """Each layer's statistic in the form its solver reads: E[kkᵀ] ("moment": MEMIT,
    LyapLock), the null-space projector ("projector": AlphaEdit) or both ("ote": OteStats);
    nothing for a method that reads none (fine-tuning)."""
    out = {}
    if kind == "none":
        return out
    for layer, moment in moments.items():
        c = jnp.asarray(moment.mean(), jnp.float32)
        p = to_device(null_space_projector(moment, threshold)) if kind != "moment" else None
        out[layer] = {"moment": c, "projector": p,
                      "ote": downstream.OteStats(moment=c, projector=p)}[kind]
    return out


def layer_statistics(params: Params, cfg: Any, tokenizer: Any, config: StructuredConfig,
                     stats: StatsConfig, threshold: float, cache_file: Path) -> dict[int, Any]:
    """Per layer, the statistic the config's solver reads (`registry.SOLVER_STATISTICS`):
    E[kkᵀ] (MEMIT) or the null-space projector P (AlphaEdit)."""
    moments = load_or_compute(params, cfg, config.layers, tokenizer, config=stats,
                              log=logging.info, path=cache_file)
    kind = registry.SOLVER_STATISTICS[config.solver]
    return solver_statistics(moments, kind, threshold)


@dataclasses.dataclass(frozen=True)
class StructuredRun:
    """What every structured run loads: the model, its tokenizer, the records to edit (those
    that encode), the reason each other record is skipped, the statistics text and the edited
    layers' second moments (cached)."""

    model: LoadedModel
    tokenizer: Any
    records: list[Any]
    failed: dict[int | str, str]
    source: Path | None  # None: the method reads no statistics
    moments: dict[int, Any]

    @property
    def cfg(self) -> Any:
        return self.model.config

    @property
    def params(self) -> Params:
        return self.model.params


def encodable(records: Sequence[Any], tokenizer: Any, templates: Sequence[str],
              target: TargetConfig, failed: dict[int | str, str],
              max_positions: int | None = None) -> list[Any]:
    """The records whose requests encode under every template; the others go into `failed`
    (with a warning each) and are skipped."""
    found = encoding_failures(tokenizer, [r.request for r in records], templates, target,
                              max_positions)
    for reason in found.values():
        logging.warning("skipping %s", reason)
    failed.update(found)
    return [r for r in records if r.case_id not in found]


def layer_kernels(params: Params, path: tuple[str, ...], layers: Sequence[int]) -> dict:
    """The [F, D] down-projection kernels of `layers`, by layer."""
    stacked = get_path(params, path)
    return {layer: stacked[layer] for layer in layers}


EDITED_LAYERS = "edited_layers.safetensors"


def save_edited_layers(file: Path, params: Params, path: tuple[str, ...],
                       layers: Sequence[int]) -> Path:
    """The edited down-projection kernels [F, D] as `layer_<i>` tensors (our orientation, see
    keedit_jax.downstream), staged and renamed into place. A GRACE edit leaves the kernels
    as they were: its codebook is the edit, written beside them as `grace_<field>` tensors
    (the layer in the metadata)."""
    tensors = {f"layer_{layer}": k
               for layer, k in parallel.to_host(layer_kernels(params, path, layers)).items()}
    metadata = {"kernel_path": "/".join(path)}
    book = codebook_of(params)
    if book is not None:
        tensors |= {f"grace_{name}": np.asarray(getattr(book, name))
                    for name in ("keys", "values", "radii", "used", "labels")}
        metadata["grace_layer"] = str(book.layer)
    with staged_file(file) as temporary:
        save_file(tensors, temporary, metadata=metadata)
    return file


def warn_if_fewer(dataset: str | Path, available: int, requested: int) -> None:
    """--num_edits beyond the file's records runs them all, and says so."""
    if requested > available:
        logging.warning("--num_edits=%d but %s holds %d records: all %d are edited",
                        requested, dataset, available, available)


def load_structured_run(checkpoint: Path, model: ModelFlags, data: DataFlags,
                        flags: StructuredFlags, method: str = "memit") -> StructuredRun:
    """Load everything; the method's config (its layers) and the records (against the bare
    prompt) are checked before the statistics pass, so a refused one costs nothing."""
    lm = load_model(checkpoint, jnp.dtype(model.dtype), parallel.model_shardings)
    tokenizer = load_tokenizer(checkpoint, lm.config)
    dataset = data.dataset or str(checkpoint / ORGANISM_DATASETS.get(data.dataset_format, ""))
    records = list(read_dataset(dataset, data.dataset_format))
    warn_if_fewer(dataset, len(records), data.num_edits)
    records = records[: data.num_edits]
    failed: dict[int | str, str] = {}
    records = encodable(records, tokenizer, ("{}",),
                        structured_config(method, flags, lm.config.n_layers).target, failed,
                        lm.config.max_positions)
    if not records:
        raise EncodingError(f"none of the {len(failed)} records can be edited: "
                            + "; ".join(failed.values()))
    if registry.method_record(method).statistics == "none":  # fine-tuning reads none
        return StructuredRun(lm, tokenizer, records, failed, None, {})
    source, moments = layer_moments(lm.params, lm.config, tokenizer, checkpoint, flags,
                                    flags.layer_tuple)
    return StructuredRun(lm, tokenizer, records, failed, source, moments)


def layer_moments(params: Params, cfg: Any, tokenizer: Any, checkpoint: Path,
                  flags: StructuredFlags, layers: Sequence[int]) -> tuple[Path, dict[int, Any]]:
    """The statistics text and the second moments of `layers` (cached under the project
    cache, shared by runs: they depend on the model and the text only)."""
    cache = cache_root() / "stats"
    source = stats_source(checkpoint, flags, cache)
    stats_config = StatsConfig(source=str(source), n_samples=flags.stats_samples,
                               max_length=flags.stats_max_length or None,
                               accumulate_dtype=flags.stats_accumulate_dtype)
    moments = load_or_compute(params, cfg, layers, tokenizer, config=stats_config,
                              log=logging.info, path=default_cache_path(
                                  cache, checkpoint.resolve().name, layers, stats_config))
    return source, moments


def greedy_generate_fn(params: Params, cfg: Any, tokenizer: Any,
                       max_new_tokens: int) -> Callable[[Sequence[str]], list[str]]:
    """Prompt + greedy continuation, for fluency (n-gram entropy). MEMIT samples top-k 5 for
    100 tokens; greedy is deterministic and applied alike before and after editing."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens,
                           stop_ids=stop_token_ids(tokenizer, cfg),
                           pad_id=tokenizer.pad_token_id or 0)

    def generate_fn(prompts: Sequence[str]) -> list[str]:
        outputs = generate(params, cfg, encode_prompts(tokenizer, prompts, chat=False), gen)
        return [p + tokenizer.decode(o, skip_special_tokens=True)
                for p, o in zip(prompts, outputs, strict=True)]

    return generate_fn


def consistency_files(flags: StructuredFlags) -> dict[str, Any]:
    """MEMIT's attribute snippets and TF-IDF files, when given (anchors §7.1, §8)."""
    if not flags.attribute_snippets:
        return {}
    tfidf = Path(flags.tfidf_dir)
    return {"snippets": load_attribute_snippets(flags.attribute_snippets),
            "tfidf": load_tfidf(tfidf / "idf.npy", tfidf / "tfidf_vocab.json")}


def evaluate(records: Sequence[Any], params: Params, cfg: Any, tokenizer: Any,
             max_new_tokens: int, consistency: dict[str, Any]) -> list[dict]:
    score = model_score_fn(params, cfg, tokenizer)
    if isinstance(records[0], CounterFactRecord):
        generate_fn = greedy_generate_fn(params, cfg, tokenizer, max_new_tokens)
        return [evaluate_counterfact(r, score, generate_fn=generate_fn, **consistency).metrics()
                for r in records]
    return [evaluate_zsre(r, score).metrics() for r in records]


def run_templates(params: Params, cfg: Any, tokenizer: Any, flags: StructuredFlags,
                  seed: int) -> tuple[str, ...]:
    """The --context_templates file's templates when given; else "{}" and one generated
    template per --context_seeds word, sampled with --context_top_k (none: "{}" alone)."""
    if flags.context_templates:
        return read_context_templates(flags.context_templates)
    if not flags.context_seeds:
        return ("{}",)
    return context_templates(params, cfg, tokenizer, jax.random.key(seed),
                             ContextConfig(seeds=tuple(flags.context_seeds.split(",")),
                                           top_k=flags.context_top_k))


def run_structured(*, checkpoint: Path, configs: dict[str, Any]) -> dict[str, Any]:
    model: ModelFlags = configs["ModelFlags"]
    data: DataFlags = configs["DataFlags"]
    edit: EditFlags = configs["EditFlags"]
    run: RunFlags = configs["RunFlags"]
    flags: StructuredFlags = configs["StructuredFlags"]
    loaded = load_structured_run(checkpoint, model, data, flags, edit.method)
    cfg, tokenizer, failed = loaded.cfg, loaded.tokenizer, dict(loaded.failed)
    prepared = PreparedStructured.build(loaded.model, tokenizer, edit.method, flags, run.seed,
                                        loaded.moments)
    config, templates = prepared.config, prepared.templates
    logging.info("context templates %s", templates)
    records = encodable(loaded.records, tokenizer, templates, config.target, failed,
                        cfg.max_positions)
    batches = unedited_neighbours([records[i:i + edit.edit_batch_size]
                                   for i in range(0, len(records), edit.edit_batch_size)])
    records = [r for batch in batches for r in batch]
    consistency = consistency_files(flags)
    pre = evaluate(records, loaded.params, cfg, tokenizer, run.max_new_tokens, consistency)
    done: dict[str, Any] = {"pre": [], "post": [], "diagnostics": [], "seconds": []}
    for number, batch in enumerate(batches, 1):
        began = time.perf_counter()
        try:
            result = prepared.apply([r.request for r in batch])
            edited, diagnostics = result.params, result.report["diagnostics"]
            jax.block_until_ready(edited)
        except (NonFiniteShiftError, SolveError) as error:  # the batch is skipped, not the run
            logging.warning("skipping batch %d: %s", number, error)
            failed.update({r.case_id: str(error) for r in batch})
            save_partial(Path(run.output_dir), done, failed)
            continue
        done["seconds"].append(time.perf_counter() - began)
        if len(batches) == 1:  # the one edited model of the run: keep it
            save_edited_layers(Path(run.output_dir) / EDITED_LAYERS, edited,
                               down_proj_path(cfg), config.layers)
        done["pre"] += [pre[records.index(r)] for r in batch]
        done["post"] += evaluate(batch, edited, cfg, tokenizer, run.max_new_tokens, consistency)
        done["diagnostics"] += diagnostics
        log_batch(number, len(batches), diagnostics, done["seconds"][-1])
        save_partial(Path(run.output_dir), done, failed)
        interrupts.raise_pending()  # after the batch is kept
    if not done["post"]:
        raise EncodingError(f"no batch could be edited: {'; '.join(failed.values())}")
    results = report(edit, len(done["post"]), summarize(done["pre"]), summarize(done["post"]),
                     done["seconds"], done["diagnostics"], failed)
    results["cases"] = case_metrics(done["diagnostics"], done["pre"], done["post"])
    return results


def unedited_neighbours(batches: Sequence[Sequence[Any]]) -> list[list[Any]]:
    """Each batch with the neighbourhood prompts about its own edited subjects dropped (only
    proxy neighbourhoods know their subjects, `without_edited_neighbours`): a batch is
    evaluated under its own edit, so those prompts are no longer unrelated facts."""
    out = []
    for batch in batches:
        subjects = [r.request.subject for r in batch]
        out.append([without_edited_neighbours(r, subjects) if isinstance(r, CounterFactRecord)
                    else r for r in batch])
    return out


def diagnostics_summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    """Means over requests of the per-request target and edit diagnostics (those every row
    has: fine-tuning has no shift, so no δ norm, clamp or realised share)."""
    keys = ("target_prob_first", "target_prob_last", "target_prob_edited", "realised",
            "loss_first", "loss_last", "stopped_at_step", "target_moved", "weight_change")
    out = {key: float(np.mean([r[key] for r in rows])) for key in keys
           if all(key in r for r in rows)}
    if all("early_stop" in r for r in rows):
        out["early_stopped"] = float(np.mean([r["early_stop"] for r in rows]))
    if all("delta_norm" in r for r in rows):
        out["at_clamp"] = float(np.mean([r["delta_norm"] >= 0.999 * r["clamp_radius"]
                                         for r in rows]))
    return out


def log_batch(number: int, total: int, rows: Sequence[Mapping[str, Any]],
              seconds: float) -> None:
    """One line per batch (is the target reached? does the edit realise it?), and one per
    request at --verbosity=1."""
    s = diagnostics_summary(rows)
    if "realised" not in s:  # fine-tuned: the loss and the edited model's probability
        logging.info("batch %d/%d (%.1f s): loss %.3f -> %.3f, target prob %.3f -> %.3f "
                     "fine-tuned, largest weight change %.2g", number, total, seconds,
                     s["loss_first"], s["loss_last"], s["target_prob_first"],
                     s["target_prob_edited"], s["weight_change"])
        return
    logging.info("batch %d/%d (%.1f s): target prob %.3f -> %.3f with δ (%d/%d stopped early, "
                 "%d/%d at the clamp) -> %.3f edited; the edit realises %.2f of δ",
                 number, total, seconds, s["target_prob_first"], s["target_prob_last"],
                 round(s["early_stopped"] * len(rows)), len(rows),
                 round(s["at_clamp"] * len(rows)), len(rows), s["target_prob_edited"],
                 s["realised"])
    if "target_moved" in s:
        logging.info("batch %d/%d: MetaKE moved the targets by %.3f of |δ| (mean)", number,
                     total, s["target_moved"])
    for r in rows:
        logging.debug("request %s: loss %.3f -> %.3f (step %d), target prob %.3f -> %.3f -> "
                      "%.3f edited, |δ| %.2f of clamp %.2f, realised %.2f", r["case_id"],
                      r["loss_first"], r["loss_last"], r["stopped_at_step"],
                      r["target_prob_first"], r["target_prob_last"], r["target_prob_edited"],
                      r["delta_norm"], r["clamp_radius"], r["realised"])


def save_partial(output: Path, done: Mapping[str, Any], failed: Mapping[Any, str]) -> None:
    """What the finished batches measured, rewritten after each one: a run stopped later
    keeps them."""
    atomic_write(output / "partial.json", json.dumps(
        {"pre": summarize(done["pre"]), "post": summarize(done["post"]),
         "diagnostics": list(done["diagnostics"]), "seconds_per_batch": done["seconds"],
         "failed": {str(k): v for k, v in failed.items()}}, indent=1, default=str))


def report(edit: EditFlags, n: int, pre: dict, post: dict, seconds: list[float],
           diagnostics: Sequence[Mapping[str, Any]] = (),
           failed: Mapping[Any, str] | None = None) -> dict:
    rows = [{"metric": key, "pre": pre[key][0], "post": post[key][0]}
            for key in sorted(post) if key in pre]
    steady = seconds[1:] or seconds
    out = {"title": f"{edit.method} on {n} requests, batch size {edit.edit_batch_size}",
           "table": rows, "pre": pre, "post": post,
           "seconds_per_batch": seconds,
           "seconds_per_edit_steady": float(np.mean(steady)) / edit.edit_batch_size,
           "failed": {str(k): v for k, v in (failed or {}).items()}}
    if diagnostics:
        out["diagnostics"] = {"summary": diagnostics_summary(diagnostics),
                              "requests": list(diagnostics)}
    return out


def case_metrics(diagnostics: Sequence[Mapping[str, Any]], pre: Sequence[Mapping],
                 post: Sequence[Mapping]) -> list[dict[str, Any]]:
    """Each edited case's metrics before and after, beside its diagnostics (same order), so
    a summary can be split by any property of the cases."""
    return [{"case_id": d["case_id"], "pre": dict(a), "post": dict(b)}
            for d, a, b in zip(diagnostics, pre, post, strict=True)]
