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

from keedit_jax import downstream, parallel
from keedit_jax.data import CounterFactRecord, read_dataset
from keedit_jax.eval.structured import (
    evaluate_counterfact,
    evaluate_zsre,
    load_attribute_snippets,
    load_tfidf,
    model_score_fn,
    summarize,
)
from keedit_jax.files import atomic_write
from keedit_jax.flags import DataFlags, EditFlags, ModelFlags, RunFlags, StructuredFlags
from keedit_jax.methods.structured import StructuredConfig, edit_requests
from keedit_jax.models import GenerationConfig, generate, load_model
from keedit_jax.models.params import Params
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
from keedit_jax.upstream import TargetConfig, context_templates

ORGANISM_DATASETS = {"counterfact": "benchmarks/counterfact.json",
                     "zsre": "benchmarks/zsre_mend_edit.json",
                     "auto": "benchmarks/counterfact.json"}


def structured_config(method: str, flags: StructuredFlags, n_layers: int) -> StructuredConfig:
    layers = flags.layer_tuple
    target = TargetConfig(layer=layers[-1], v_loss_layer=n_layers - 1,
                          fact_token=flags.fact_token, v_num_grad_steps=flags.v_num_grad_steps,
                          v_lr=flags.v_lr, v_weight_decay=flags.v_weight_decay,
                          clamp_norm_factor=flags.clamp_norm_factor, kl_factor=flags.kl_factor)
    return StructuredConfig(
        layers=layers, solver=method, target=target,
        memit=downstream.MemitHParams(mom2_update_weight=flags.mom2_update_weight),
        alphaedit=downstream.AlphaEditHParams(l2=flags.alphaedit_l2))


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
    LyapLock), the null-space projector ("projector": AlphaEdit) or both ("ote": OteStats)."""
    out = {}
    for layer, moment in moments.items():
        c = jnp.asarray(moment.mean(), jnp.float32)
        p = jnp.asarray(null_space_projector(moment, threshold)) if kind != "moment" else None
        out[layer] = {"moment": c, "projector": p,
                      "ote": downstream.OteStats(moment=c, projector=p)}[kind]
    return out


def layer_statistics(params: Params, cfg: Any, tokenizer: Any, config: StructuredConfig,
                     stats: StatsConfig, threshold: float, cache_file: Path) -> dict[int, Any]:
    """MEMIT: E[kkᵀ] per layer; AlphaEdit: the null-space projector P per layer."""
    moments = load_or_compute(params, cfg, config.layers, tokenizer, config=stats,
                              log=logging.info, path=cache_file)
    kind = "moment" if config.solver == "memit" else "projector"
    return solver_statistics(moments, kind, threshold)


@dataclasses.dataclass(frozen=True)
class StructuredRun:
    """What every structured run loads: the model, its tokenizer, the records to edit, the
    statistics text and the edited layers' second moments (cached)."""

    cfg: Any
    params: Params
    tokenizer: Any
    records: list[Any]
    source: Path
    moments: dict[int, Any]


def load_structured_run(checkpoint: Path, model: ModelFlags, data: DataFlags,
                        flags: StructuredFlags) -> StructuredRun:
    lm = load_model(checkpoint, jnp.dtype(model.dtype), parallel.model_shardings)
    tokenizer = load_tokenizer(checkpoint, lm.config)
    dataset = data.dataset or str(checkpoint / ORGANISM_DATASETS.get(data.dataset_format, ""))
    records = list(read_dataset(dataset, data.dataset_format)[: data.num_edits])
    cache = cache_root() / "stats"  # shared by runs: statistics depend on model and text only
    source = stats_source(checkpoint, flags, cache)
    stats_config = StatsConfig(source=str(source), n_samples=flags.stats_samples,
                               max_length=flags.stats_max_length or None)
    moments = load_or_compute(lm.params, lm.config, flags.layer_tuple, tokenizer,
                              config=stats_config, log=logging.info, path=default_cache_path(
                                  cache, checkpoint.resolve().name, flags.layer_tuple,
                                  stats_config))
    return StructuredRun(lm.config, lm.params, tokenizer, records, source, moments)


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


def run_structured(*, checkpoint: Path, configs: dict[str, Any]) -> dict[str, Any]:
    model: ModelFlags = configs["ModelFlags"]
    data: DataFlags = configs["DataFlags"]
    edit: EditFlags = configs["EditFlags"]
    run: RunFlags = configs["RunFlags"]
    flags: StructuredFlags = configs["StructuredFlags"]
    loaded = load_structured_run(checkpoint, model, data, flags)
    cfg, params, tokenizer, records = (loaded.cfg, loaded.params, loaded.tokenizer,
                                       loaded.records)
    config = structured_config(edit.method, flags, cfg.n_layers)
    stats = solver_statistics(loaded.moments, "moment" if edit.method == "memit"
                              else "projector", flags.nullspace_threshold)
    templates = context_templates(params, cfg, tokenizer, jax.random.key(run.seed))
    logging.info("context templates %s", templates)
    consistency = consistency_files(flags)
    pre = evaluate(records, params, cfg, tokenizer, run.max_new_tokens, consistency)
    post, seconds = [], []
    states = downstream.init_states(config.make_solver(), config.layers, cfg.d_ff, cfg.d_model)
    for start in range(0, len(records), edit.edit_batch_size):
        batch = records[start:start + edit.edit_batch_size]
        began = time.perf_counter()
        edited, _, _ = edit_requests(params, cfg, tokenizer, [r.request for r in batch],
                                     templates, stats, states, config)
        jax.block_until_ready(edited)
        seconds.append(time.perf_counter() - began)
        post += evaluate(batch, edited, cfg, tokenizer, run.max_new_tokens, consistency)
        logging.info("edited %d/%d requests (%.1f s for this batch)", start + len(batch),
                     len(records), seconds[-1])
    return report(edit, len(records), summarize(pre), summarize(post), seconds)


def report(edit: EditFlags, n: int, pre: dict, post: dict, seconds: list[float]) -> dict:
    rows = [{"metric": key, "pre": pre[key][0], "post": post[key][0]}
            for key in sorted(post) if key in pre]
    steady = seconds[1:] or seconds
    return {"title": f"{edit.method} on {n} requests, batch size {edit.edit_batch_size}",
            "table": rows, "pre": pre, "post": post,
            "seconds_per_batch": seconds,
            "seconds_per_edit_steady": float(np.mean(steady)) / edit.edit_batch_size}
