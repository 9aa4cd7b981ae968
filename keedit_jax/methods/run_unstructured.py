"""The long-form protocol run (docs/references.md: muke §5.2-5.3; anyedit §6).

Read records -> generate answers on the unedited model -> per edit batch: edit, generate for
the question, its paraphrase and the sub-questions, restore (unless --sequential) -> score
against the target answer: the papers' character BLEU, ROUGE-1/2/L recall and MiniLM cosine
("BERTScore", with --sentence_encoder), and beside them sacreBLEU and ROUGE-L F1. Groups:
Ori., Para., Sub (ROUGE recall against the short sub-answers); EditEverything per category.
Where the dataset has a fact side file (`<name>.facts.json`, the organism's), every answer
also gets the fact-level scores of `eval.fact_metrics` (new facts stated, old facts leaked,
unchanged facts kept; a sub-question about the one fact it asks), and "Sub, unchanged facts"
is Sub restricted to the sub-questions about facts the edit keeps. The headline table leads
with the fact scores, has a Δ column and one verdict line per group.

An edit that cannot run (a target shorter than one window, a prompt longer than the context,
a non-finite shift loss) is reported under "failed" with its reason; the others go on.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from keedit_jax import downstream, interrupts, parallel, registry, stats
from keedit_jax.api import PreparedLongForm
from keedit_jax.data import (
    AlpacaRecord,
    DatasetError,
    LongFormRecord,
    read_alpaca,
    read_longform,
)
from keedit_jax.eval.fact_metrics import (
    FACT_KEYS,
    FactChange,
    fact_scores,
    mean_available,
    read_fact_sheets,
    side_file,
)
from keedit_jax.eval.longform_metrics import EMBEDDING_KEY, score_pairs
from keedit_jax.files import atomic_write, staged_file
from keedit_jax.flags import (
    DataFlags,
    EditFlags,
    LongFormFlags,
    ModelFlags,
    RunFlags,
    StructuredFlags,
)
from keedit_jax.methods.run_structured import (
    EDITED_LAYERS,
    layer_moments,
    save_edited_layers,
    solver_statistics,
    warn_if_fewer,
)
from keedit_jax.methods.unstructured import METHOD_PARTS, UnstructuredConfig
from keedit_jax.models import GenerationConfig, generate, load_model
from keedit_jax.models.generate import bucket, left_pad
from keedit_jax.models.params import Params, down_proj_path, to_device
from keedit_jax.models.tokenizer import encode_prompts, load_tokenizer, stop_token_ids
from keedit_jax.organism.build import cache_root
from keedit_jax.stream_checkpoint import (
    PartialMismatchError,
    group_settings,
    setting_changes,
)
from keedit_jax.upstream import EncodingError, TargetConfig
from keedit_jax.upstream.longform import EncodedEdit, WindowConfig, encode_edits, pack_windows
from keedit_jax.upstream.windowed import compute_affinities

ORGANISM_FILES = {"unkebench": "unkebench.json", "auto": "unkebench.json",
                  "akew_counterfact": "akew_CounterFact.json",
                  "akew_mquake": "akew_MQuAKE-CF.json", "editeverything": "editevery.json"}
SAMPLE_SEED = 2024  # the reference's dataset_size_limit shuffle and Alpaca draws (muke §5.1)
PAPER_METRICS = ("bleu_char", EMBEDDING_KEY, "rougeL_recall", "rouge1_recall", "rouge2_recall")
STANDARD_METRICS = ("sacrebleu", "rougeL_f1")
SUB_METRICS = ("rouge1_recall", "rouge2_recall", "rougeL_recall")
KEPT_SUB = "Sub, unchanged facts"
FACT_NAMES = {"fact_efficacy": "new facts stated", "fact_leak": "old facts still stated",
              "fact_kept": "unchanged facts kept"}
N_EXAMPLES = 3


def unstructured_config(method: str, structured: StructuredFlags, flags: LongFormFlags,
                        n_layers: int) -> UnstructuredConfig:
    strategy, solver = METHOD_PARTS[method]
    layers = structured.layer_tuple
    target = TargetConfig(layer=layers[-1], v_loss_layer=n_layers - 1, fact_token="last",
                          v_num_grad_steps=structured.v_num_grad_steps, v_lr=structured.v_lr,
                          v_weight_decay=structured.v_weight_decay,
                          clamp_norm_factor=structured.clamp_norm_factor, kl_factor=0.0,
                          early_stop_loss=flags.early_stop_loss)
    window = WindowConfig(strategy=flags.upstream_strategy or strategy,
                          window_size=flags.window_size, overlap=flags.window_overlap,
                          coefficient_order=flags.coefficient_order,
                          affinity_context=flags.affinity_context,
                          affinity_steps=flags.affinity_steps, affinity_lr=flags.affinity_lr,
                          affinity_gradients=flags.affinity_gradients,
                          float16_coefficients=flags.float16_coefficients,
                          double_bos=flags.double_bos)
    return UnstructuredConfig(
        layers=layers, solver=solver, target=target, window=window,
        in_context_preservation=flags.in_context_preservation,
        memit=downstream.MemitHParams(mom2_update_weight=structured.mom2_update_weight,
                                      dtype=structured.solve_dtype),
        alphaedit=downstream.AlphaEditHParams(l2=structured.alphaedit_l2, use_key_cache=False,
                                              dtype=structured.solve_dtype),
        unke=downstream.UnkeHParams(lr=flags.unke_lr, steps=flags.unke_steps,
                                    weight_decay=flags.unke_weight_decay))


def select_records(records: Sequence[LongFormRecord], n: int) -> list[LongFormRecord]:
    """The first n after the reference's seeded shuffle, or all in file order (muke §5.1)."""
    if n >= len(records):
        return list(records)
    order = np.random.default_rng(SAMPLE_SEED).permutation(len(records))[:n]
    return [records[i] for i in sorted(order)]


# ---------------------------------------------------------------- affinity cache


def model_fingerprint(checkpoint: Path) -> str:
    """Changes whenever the weights or config change: names, sizes and mtimes of the files."""
    files = sorted(checkpoint.glob("*.safetensors")) + [checkpoint / "config.json"]
    stamp = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.exists()]
    return hashlib.sha256(json.dumps(stamp).encode()).hexdigest()[:16]


def affinity_key(fingerprint: str, edit: EncodedEdit, target: TargetConfig,
                 window: WindowConfig) -> str:
    """Per sample and window size (muke §2.5 step 5), and everything else the rows depend on."""
    parts = [fingerprint, edit.prompt_ids, edit.target_ids, edit.windows, target.layer,
             target.v_loss_layer, target.v_weight_decay, window.affinity_steps,
             window.affinity_lr]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]


def cached_row(path: Path, windows: int) -> np.ndarray | None:
    """A cached [K, K] affinity row, or None (with a warning) when it is absent, unreadable
    (empty, truncated, not .npy), of another shape or not finite: then it is recomputed."""
    if not path.exists():
        return None
    try:
        row = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as err:
        logging.warning("affinity cache %s is unreadable (%s); recomputing", path, err or "empty")
        return None
    if row.shape != (windows, windows):
        logging.warning("affinity cache %s has shape %s; recomputing", path, row.shape)
        return None
    if not np.isfinite(row).all():
        logging.warning("affinity cache %s holds non-finite values; recomputing", path)
        return None
    return row


def cached_affinities(params: Params, cfg: Any, edits: Sequence[EncodedEdit], batch: Any,
                      config: UnstructuredConfig, directory: Path, fingerprint: str) -> Any:
    """[E, N, N] up-front affinities from the cache, computing (and storing) any missing."""
    n = batch.starts.shape[1]
    paths = [directory / f"{affinity_key(fingerprint, x, config.target, config.window)}.npy"
             for x in edits]
    rows = [cached_row(path, len(edit.windows)) for path, edit in zip(paths, edits, strict=True)]
    if any(row is None for row in rows):
        fresh = parallel.to_host(compute_affinities(params, cfg, parallel.put_batch(batch),
                                                    config.target, config.window))
        directory.mkdir(parents=True, exist_ok=True)
        for i, (path, edit) in enumerate(zip(paths, edits, strict=True)):
            k = len(edit.windows)
            rows[i] = fresh[i, :k, :k]
            with staged_file(path) as temporary:  # processes may share the cache
                np.save(temporary, rows[i])
    padded = np.ones((len(edits), n, n), np.float32)
    for i, row in enumerate(rows):
        padded[i, : len(row), : len(row)] = row
    return to_device(padded)


def batch_affinity(params: Params, cfg: Any, edits: Sequence[EncodedEdit],
                   config: UnstructuredConfig, pad_id: int, checkpoint: Path) -> Any:
    """μKE's up-front affinities of the unedited model from the cache (computed and stored
    when missing), or None: computed inside the edit program (in-loop affinities, or a
    strategy without them)."""
    if not (config.window.uses_affinity and config.window.affinity_context == "upfront"):
        return None
    directory = cache_root() / "affinity" / f"win{config.window.window_size}"
    return cached_affinities(params, cfg, edits, pack_windows(edits, pad_id), config,
                             directory, model_fingerprint(checkpoint))


def solver_inputs(params: Params, cfg: Any, tokenizer: Any, checkpoint: Path,
                  config: UnstructuredConfig, structured: StructuredFlags,
                  flags: LongFormFlags) -> tuple[dict[int, Any], list[AlpacaRecord]]:
    """What the long-form solver reads: each layer's statistic (MEMIT, AlphaEdit), or UnKE's
    pool of preservation samples."""
    if config.solver == "unke":
        return {}, alpaca_pool(checkpoint, flags)
    _, moments = layer_moments(params, cfg, tokenizer, checkpoint, structured, config.layers)
    kind = registry.SOLVER_STATISTICS[config.solver]
    return solver_statistics(moments, kind, structured.nullspace_threshold), []


# ---------------------------------------------------------------- preservation and generation


def preservation_contexts(tokenizer: Any, pool: Sequence[AlpacaRecord], n: int,
                          rng: np.random.Generator, pad_id: int) -> downstream.Contexts:
    """n Alpaca samples: chat template of instruction (+ input), then the output appended."""
    chosen = [pool[i] for i in rng.choice(len(pool), size=min(n, len(pool)), replace=False)]
    prompts = encode_prompts(tokenizer, [
        r.instruction + ("\n" + r.input if r.input else "") for r in chosen])
    rows = [p + tokenizer(r.output, add_special_tokens=False)["input_ids"]
            for p, r in zip(prompts, chosen, strict=True)]
    tokens, mask = left_pad(rows, bucket(max(map(len, rows)), 8), len(rows), pad_id)
    return downstream.Contexts(to_device(tokens), to_device(mask))


def alpaca_pool(checkpoint: Path, flags: LongFormFlags) -> list[AlpacaRecord]:
    """UnKE's preservation samples: an Alpaca file, a named corpus's instruction pairs, or the
    organism's own."""
    if flags.alpaca == stats.WIKIPEDIA_VITAL:
        return [AlpacaRecord(instruction=instruction, input="", output=output)
                for instruction, output in stats.vital_instructions()]
    if flags.alpaca:
        return list(read_alpaca(flags.alpaca))
    if not (checkpoint / "world.json").exists():
        raise FileNotFoundError(f"UnKE needs preservation samples: give --alpaca for "
                                f"{checkpoint}, which is not the organism")
    from keedit_jax.organism import World  # noqa: PLC0415
    from keedit_jax.organism.benchmarks import alpaca  # noqa: PLC0415

    world = World.from_json((checkpoint / "world.json").read_text())
    return [AlpacaRecord(**r) for r in alpaca(world)]


@dataclasses.dataclass(frozen=True)
class Query:
    """One generation: the record, its group (Ori./Para./Sub), the prompt and the reference."""

    record: int
    group: str
    prompt: str
    reference: str
    sub_index: int = -1  # which sub-question (and fact) of the record; -1 for Ori. and Para.


def queries(records: Sequence[LongFormRecord], first: int = 0) -> list[Query]:
    out = []
    for i, r in enumerate(records, start=first):
        out.append(Query(i, "Ori.", r.question, r.answer))
        if r.paraphrase:
            out.append(Query(i, "Para.", r.paraphrase, r.answer))
        out += [Query(i, "Sub", q, a, j) for j, (q, a) in enumerate(
            zip(r.sub_questions, r.sub_answers, strict=True))]
    return out


def answerable(tokenizer: Any, cfg: Any, asked: Sequence[Query]) -> list[Query]:
    """The queries whose prompt leaves room to answer; the others are logged and not scored."""
    lengths = [len(ids) for ids in encode_prompts(tokenizer, [q.prompt for q in asked])]
    kept = [q for q, n in zip(asked, lengths, strict=True) if n < cfg.max_positions]
    for q, n in zip(asked, lengths, strict=True):
        if n >= cfg.max_positions:
            logging.warning("not asking record %d's %s prompt: %d tokens leave no room in the "
                            "model's %d positions", q.record, q.group, n, cfg.max_positions)
    return kept


def generate_answers(params: Params, cfg: Any, tokenizer: Any, asked: Sequence[Query],
                     max_new_tokens: int, temperature: float, key: Any) -> list[str]:
    """Answers to the chat-templated prompts; max_new_tokens is cut to fit the context.
    Logged with their time and rate: on a real model this is minutes of a run."""
    prompts = encode_prompts(tokenizer, [q.prompt for q in asked])
    room = cfg.max_positions - max(map(len, prompts))
    gen = GenerationConfig(max_new_tokens=max(1, min(max_new_tokens, room)),
                           temperature=temperature, stop_ids=stop_token_ids(tokenizer, cfg),
                           pad_id=tokenizer.pad_token_id or 0)
    began = time.perf_counter()
    outputs = generate(params, cfg, prompts, gen, key)
    seconds = time.perf_counter() - began
    tokens = sum(map(len, outputs))
    logging.info("generated %d answers (%d tokens, at most %d each) in %.1f s: %.0f tokens/s",
                 len(outputs), tokens, gen.max_new_tokens, seconds, tokens / max(seconds, 1e-9))
    return [tokenizer.decode(o, skip_special_tokens=True) for o in outputs]


def cached_answers(path: Path, n: int) -> list[str] | None:
    """The n answers a cache file holds, or None when it is absent or holds anything else
    (warned: it is then regenerated)."""
    if not path.exists():
        return None
    try:
        answers = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        answers = error
    if isinstance(answers, list) and len(answers) == n and all(isinstance(a, str)
                                                               for a in answers):
        return answers
    logging.warning("regenerating the pre-edit answers: %s does not hold %d answers (%s)",
                    path, n, answers if isinstance(answers, Exception) else
                    type(answers).__name__)
    return None


def pre_edit_answers(params: Params, cfg: Any, tokenizer: Any, checkpoint: Path,
                     asked: Sequence[Query], max_new_tokens: int, temperature: float,
                     seed: int) -> list[str]:
    """The unedited model's answers, cached by weights, dtype, the encoded prompts (so the
    tokenizer and chat template too), stop tokens and generation settings: every method run on
    the same records asks the same questions, and on a real model the answers are a quarter
    hour of each run. A cache file that does not read back as the expected answers is
    regenerated (with a warning), never trusted."""
    parts = [model_fingerprint(checkpoint), str(jax.tree.leaves(params)[0].dtype),
             encode_prompts(tokenizer, [q.prompt for q in asked]),
             sorted(stop_token_ids(tokenizer, cfg)), max_new_tokens, temperature, seed]
    digest = hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:24]
    path = cache_root() / "answers" / f"{digest}.json"
    cached = cached_answers(path, len(asked))
    if cached is not None:
        logging.info("pre-edit answers read from %s", path)
        return cached
    answers = generate_answers(params, cfg, tokenizer, asked, max_new_tokens, temperature,
                               jax.random.key(seed))
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(answers))
    return answers


# ---------------------------------------------------------------- scoring and report


@dataclasses.dataclass(frozen=True)
class FactSheets:
    """Per record (index into the run's records), the facts its target changes and keeps."""

    facts: dict[int, tuple[FactChange, ...]]
    vocabulary: frozenset[str]

    @classmethod
    def for_dataset(cls, dataset: str, records: Sequence[LongFormRecord]) -> FactSheets:
        """From the dataset's side file, if it has one (else empty: no fact scores)."""
        path = side_file(dataset)
        sheets = read_fact_sheets(path) if path.is_file() else {}
        facts = {i: sheets[r.case_id] for i, r in enumerate(records) if r.case_id in sheets}
        for i, fs in facts.items():
            if records[i].sub_questions and len(records[i].sub_questions) != len(fs):
                raise DatasetError(path, message=f"record {records[i].case_id} has {len(fs)} "
                                   f"facts for {len(records[i].sub_questions)} sub-questions")
        values = {v for fs in sheets.values() for f in fs for v in (f.old, f.new)}
        return cls(facts, frozenset(values))

    def about(self, q: Query) -> tuple[FactChange, ...]:
        """The facts a query's answer should state: the text's, or the one a sub-question
        asks (the i-th sub-question asks the i-th fact)."""
        facts = self.facts.get(q.record, ())
        return facts[q.sub_index:q.sub_index + 1] if q.group == "Sub" else facts


def score(asked: Sequence[Query], answers: Sequence[str], embed: Any,
          sheets: FactSheets | None = None) -> list[dict]:
    metrics = score_pairs(answers, [q.reference for q in asked], embed)
    out = []
    for q, a, m in zip(asked, answers, metrics, strict=True):
        facts = sheets.about(q) if sheets else ()
        out.append({"record": q.record, "group": q.group, "answer": a, **m,
                    **(fact_scores(a, facts, sheets.vocabulary) if facts else {})})
    return out


def _in_group(s: dict, group: str) -> bool:
    if group == KEPT_SUB:
        return s["group"] == "Sub" and "fact_kept" in s
    return s["group"] == group


def group_means(scored: Sequence[dict], records: Sequence[LongFormRecord],
                keep: set[int]) -> dict[str, dict[str, float]]:
    """Per group (and EditEverything category), the mean over records of each metric; Sub is
    averaged within a record first (muke §5.3). Fact scores are averaged where defined."""
    groups: dict[str, list[dict]] = {}
    for group in ("Ori.", "Para.", "Sub", KEPT_SUB):
        per_record: dict[int, list[dict]] = {}
        for s in scored:
            if _in_group(s, group) and s["record"] in keep:
                per_record.setdefault(s["record"], []).append(s)
        rows = [mean_available([{k: v for k, v in x.items() if isinstance(v, float)}
                                for x in xs]) for xs in per_record.values()]
        if rows:
            groups[group] = rows
            for record, row in zip(per_record, rows, strict=True):
                category = records[record].category
                if group == "Ori." and category:
                    groups.setdefault(f"Ori. {category}", []).append(row)
    return {name: mean_available(rows) for name, rows in groups.items()}


def _metrics(group: str) -> tuple[str, ...]:
    if group == KEPT_SUB:
        return ("fact_kept", *SUB_METRICS)
    return FACT_KEYS + (SUB_METRICS if group == "Sub" else PAPER_METRICS + STANDARD_METRICS)


def table(pre: dict, post: dict) -> list[dict]:
    """Rows of (group, metric, pre, post, Δ) ×100; fact scores first in each group."""
    rows = []
    for group in post:
        for metric in _metrics(group):
            if metric in post[group] and metric in pre.get(group, {}):
                before, after = 100 * pre[group][metric], 100 * post[group][metric]
                rows.append({"group": group, "metric": metric, "pre": before, "post": after,
                             "Δ": after - before})
    return rows


def verdicts(rows: Sequence[dict]) -> list[str]:
    """One line per group of `table` rows: the fact scores in words, then its first text
    metric, e.g. "Ori.: new facts stated 4% → 87%, ...; bleu_char 62.1 → 90.3 (+28.2)"."""
    lines = []
    for group in dict.fromkeys(r["group"] for r in rows):
        mine = [r for r in rows if r["group"] == group]
        facts = [f"{FACT_NAMES[r['metric']]} {r['pre']:.0f}% → {r['post']:.0f}%"
                 for r in mine if r["metric"] in FACT_NAMES]
        text = [f"{r['metric']} {r['pre']:.1f} → {r['post']:.1f} ({r['Δ']:+.1f})"
                for r in mine if r["metric"] not in FACT_NAMES][:1]
        lines.append(f"{group}: " + "; ".join(filter(None, [", ".join(facts), *text])))
    return lines


def window_summary(rows: Sequence[dict]) -> dict[str, float]:
    """Over the edits' `window_diagnostics`: the median answer probability unedited, with
    every δ* injected and under the edited weights; the mean share of δ realised over all
    windows and the share of windows whose δ is at its clamp."""
    windows = [(r, i) for r in rows for i in range(r["windows"])]
    return {**{key: float(np.median([r[key] for r in rows]))
               for key in ("answer_prob_before", "answer_prob_with_delta", "answer_prob_edited")},
            "realised": float(np.mean([r["realised"][i] for r, i in windows])),
            "at_clamp": float(np.mean([r["delta_norm"][i] >= 0.999 * r["clamp_radius"][i]
                                       for r, i in windows])),
            "edits": len(rows), "windows": len(windows)}


def window_verdict(rows: Sequence[dict]) -> str:
    """The verdict line of `window_summary`: where an edit that did not take stopped."""
    s = window_summary(rows)
    return (f"target (teacher-forced answer probability, median of {s['edits']} edits): "
            f"{s['answer_prob_before']:.3f} unedited → {s['answer_prob_with_delta']:.3f} with "
            f"the shifts δ* → {s['answer_prob_edited']:.3f} edited; the update realises "
            f"{s['realised']:.2f} of δ (mean of {s['windows']} windows, "
            f"{s['at_clamp']:.0%} of them at the clamp)")


def log_windows(rows: Sequence[dict]) -> None:
    """One line per edit: its answer probability through the edit, and each window's share."""
    for r in rows:
        logging.info("record %s: %d windows; answer prob %.3f -> %.3f with δ -> %.3f edited; "
                     "realised %s", r["case_id"], r["windows"], r["answer_prob_before"],
                     r["answer_prob_with_delta"], r["answer_prob_edited"],
                     " ".join(f"{x:.2f}" for x in r["realised"]))


def examples(records: Sequence[LongFormRecord], pre: Sequence[dict], post: Sequence[dict],
             n: int = N_EXAMPLES) -> list[dict]:
    """The question, target and answers before and after of the first n edited records."""
    before = {s["record"]: s["answer"] for s in pre if s["group"] == "Ori."}
    after = [s for s in post if s["group"] == "Ori."][:n]
    return [{"question": records[s["record"]].question, "target": records[s["record"]].answer,
             "pre": before.get(s["record"], ""), "post": s["answer"]} for s in after]


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class Progress:
    """What the finished batches of a run produced, kept in partial.json after each batch so
    that the same command run again resumes after them (`resumed_progress`)."""

    post: list[dict] = dataclasses.field(default_factory=list)
    seconds: list[float] = dataclasses.field(default_factory=list)
    failed: dict[str, str] = dataclasses.field(default_factory=dict)
    edited: set[int] = dataclasses.field(default_factory=set)  # record indices
    diagnostics: list[dict] = dataclasses.field(default_factory=list)

    def finished(self, batch: Sequence[EncodedEdit], index: dict[Any, int]) -> bool:
        """Whether every edit of the batch was edited or dropped by an earlier run."""
        return all(index[x.case_id] in self.edited or str(x.case_id) in self.failed
                   for x in batch)


def save_partial(output: Path, pre: Sequence[dict], progress: Progress,
                 settings: dict[str, Any], case_ids: Sequence[str]) -> None:
    """The edited records' scored answers and diagnostics so far, rewritten after each batch:
    a long run stopped later keeps them (read as results.json's "answers" are), with the
    run's settings and records, which a resumed run must match."""
    atomic_write(output / "partial.json", json.dumps(
        {"answers": {"pre": list(pre), "post": progress.post},
         "seconds_per_batch": progress.seconds, "failed": progress.failed,
         "diagnostics": progress.diagnostics, "edited": sorted(progress.edited),
         "settings": settings, "case_ids": list(case_ids)}, indent=1, default=str))


def resumed_progress(path: Path, settings: dict[str, Any], defaults: dict[str, Any],
                     case_ids: Sequence[str], sequential: bool) -> Progress:
    """The progress an interrupted run of the same settings and records left in `path`
    (empty when there is none). Each edit of a one-time run starts from the unedited model
    and draws its generation key from its batch, so resuming gives what one uninterrupted
    run gives. Refused (PartialMismatchError, naming the file): a file that does not read,
    other settings or records, and a --sequential run, whose edited weights are not kept."""
    if not path.exists():
        return Progress()
    advice = "; use another --output_dir, or --noresume to start over in it"
    try:
        saved = json.loads(path.read_text())
        post, edited = saved["answers"]["post"], saved["edited"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise PartialMismatchError(f"{path} holds no resumable run ({type(err).__name__}: "
                                   f"{err}){advice}") from err
    changes = setting_changes(saved.get("settings", {}), settings, defaults)
    if changes:
        raise PartialMismatchError(f"{path} was written by a run with another configuration: "
                                   + "; ".join(changes[:5]) + advice)
    if saved.get("case_ids") != list(case_ids):
        raise PartialMismatchError(f"{path} was written for other records of the dataset"
                                   + advice)
    if sequential:
        raise PartialMismatchError(f"{path} is from a --sequential run, which keeps no "
                                   "edited weights to continue from" + advice)
    progress = Progress(post, saved["seconds_per_batch"], saved["failed"], set(edited),
                        saved["diagnostics"])
    logging.info("resuming from %s: %d of %d records already edited, %d failed", path,
                 len(progress.edited), len(case_ids), len(progress.failed))
    return progress


def run_unstructured(*, checkpoint: Path, configs: dict[str, Any]) -> dict[str, Any]:
    model: ModelFlags = configs["ModelFlags"]
    data: DataFlags = configs["DataFlags"]
    edit: EditFlags = configs["EditFlags"]
    run: RunFlags = configs["RunFlags"]
    structured: StructuredFlags = configs["StructuredFlags"]
    flags: LongFormFlags = configs["LongFormFlags"]
    lm = load_model(checkpoint, jnp.dtype(model.dtype), parallel.model_shardings)
    cfg, params = lm.config, lm.params
    tokenizer = load_tokenizer(checkpoint, cfg)
    if not data.dataset and data.dataset_format not in ORGANISM_FILES:
        raise FileNotFoundError(f"the organism has no {data.dataset_format} file: give "
                                "--dataset")
    dataset = data.dataset or str(checkpoint / "benchmarks" / ORGANISM_FILES[data.dataset_format])
    categories = [c for c in flags.categories.split(",") if c] or None
    records = read_longform(dataset, data.dataset_format, categories)
    warn_if_fewer(dataset, len(records), data.num_edits)
    records = select_records(records, data.num_edits)
    config = unstructured_config(edit.method, structured, flags, cfg.n_layers)
    edits, failed = encode_edits(tokenizer, records, config.window, cfg.max_positions)
    for message in failed.values():
        logging.warning("skipping %s", message)
    index = {r.case_id: i for i, r in enumerate(records)}
    if not edits:
        raise EncodingError(f"none of the {len(records)} records can be edited: "
                            + "; ".join(failed.values()))
    case_ids = [str(r.case_id) for r in records]
    settings, defaults = group_settings(configs)
    output = Path(run.output_dir)
    # results.json marks a finished run, which --overwrite (checked before) runs again whole
    interrupted = configs["SequentialFlags"].resume and not (output / "results.json").exists()
    progress = (resumed_progress(output / "partial.json", settings, defaults, case_ids,
                                 edit.sequential) if interrupted else Progress())
    prepared = PreparedLongForm.build(lm, tokenizer, config, structured, flags)
    from keedit_jax.eval.sentence_encoder import load_sentence_encoder  # noqa: PLC0415

    encoder = load_sentence_encoder(flags.sentence_encoder, cache_root() / "sentence_encoders",
                                    logging.info)
    embed = None if encoder is None else encoder.embed
    key = jax.random.key(run.seed)
    encoded = {index[x.case_id] for x in edits}
    asked = answerable(tokenizer, cfg, [q for q in queries(records) if q.record in encoded])
    logging.info("pre-edit answers")
    pre_answers = pre_edit_answers(params, cfg, tokenizer, checkpoint, asked,
                                   run.max_new_tokens, flags.temperature, run.seed)
    sheets = FactSheets.for_dataset(dataset, records)
    pre = score(asked, pre_answers, embed, sheets)
    progress.failed = {str(k): v for k, v in failed.items()} | progress.failed
    current, edited = params, None
    for start in range(0, len(edits), edit.edit_batch_size):
        batch_edits = edits[start:start + edit.edit_batch_size]
        if progress.finished(batch_edits, index):
            continue
        began = time.perf_counter()
        # the cache holds affinities of the unedited model: sequential runs edit it
        result = prepared.apply(batch_edits, current, upfront_affinity=not edit.sequential)
        edited, dropped = result.params, result.report["failed"]
        jax.block_until_ready(edited)
        progress.seconds.append(time.perf_counter() - began)
        progress.failed.update(dropped)
        windows = result.report["diagnostics"].get("windows", [])
        log_windows(windows)
        progress.diagnostics += windows
        done = [index[x.case_id] for x in batch_edits if str(x.case_id) not in dropped]
        progress.edited.update(done)
        batch_asked = [q for q in asked if q.record in done]
        if batch_asked:
            answers = generate_answers(edited, cfg, tokenizer, batch_asked, run.max_new_tokens,
                                       flags.temperature, jax.random.fold_in(key, start + 1))
            progress.post += score(batch_asked, answers, embed, sheets)
        current = edited if edit.sequential else params
        logging.info("edited %d/%d (%.1f s for this batch of %d)", start + len(batch_edits),
                     len(edits), progress.seconds[-1], len(batch_edits))
        save_partial(output, [row for row in pre if row["record"] in progress.edited],
                     progress, settings, case_ids)
        interrupts.raise_pending()
    post, seconds, edited_ids = progress.post, progress.seconds, progress.edited
    diagnostics, failed = progress.diagnostics, progress.failed
    if config.solver != "unke" and (edit.sequential or len(edits) <= edit.edit_batch_size):
        # the run's one edited model (UnKE's regression changes whole layers: not written)
        if edited is None:
            logging.warning("the one edit batch was finished by an earlier run: its edited "
                            "layers are not written")
        else:
            save_edited_layers(output / EDITED_LAYERS, edited, down_proj_path(cfg),
                               config.layers)
    pre_means = group_means(pre, records, edited_ids)
    post_means = group_means(post, records, edited_ids)
    steady = seconds[1:] or seconds
    rows = table(pre_means, post_means)
    return {"title": f"{edit.method} ({config.window.strategy}, {config.solver}) on "
                     f"{len(edited_ids)} long-form edits, batch size {edit.edit_batch_size}",
            "table": rows,
            "verdicts": verdicts(rows) + ([window_verdict(diagnostics)] if diagnostics else []),
            "examples": examples(records, pre, post), "pre": pre_means, "post": post_means,
            "failed": failed, "case_ids": case_ids,
            "seconds_per_batch": seconds,
            "seconds_per_edit_steady": float(np.mean(steady)) / edit.edit_batch_size
            if seconds else None,
            "answers": {"pre": pre, "post": post},
            "diagnostics": diagnostics,
            "diagnostics_summary": window_summary(diagnostics) if diagnostics else None}
