"""The Python editing API: what the command line runs, callable from a notebook.

    import keedit_jax as ke
    model = ke.load("organism:small")
    result = ke.edit(model, [{"prompt": "{} lives in", "subject": "Ada", "target": " Paris"}],
                     method="memit", layers="1,2", fact_token="last", mom2_update_weight=200)
    ke.evaluate(model, records, params=result.params)

Hyperparameters are the command-line flags of the method's groups (`StructuredFlags`,
`LongFormFlags`, `SequentialFlags`, `MetaKEFlags`, and `seed`), with the same names and the
same defaults (one source: the dataclasses in `keedit_jax.flags`); `hparams_from_flagfile`
reads them from a `configs/*.cfg`. The statistics are computed or read from the same cache
as the command line's, so an edit here and the same edit there give the same weights.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags as absl_flags
from absl import logging

from keedit_jax import downstream, flags, parallel, registry
from keedit_jax.data import LongFormRecord, Request, read_dataset, read_longform
from keedit_jax.intervene import with_codebook
from keedit_jax.models import LoadedModel, gguf, load_model
from keedit_jax.models.layers import codebook_of
from keedit_jax.models.params import Params, down_proj_path, set_layers
from keedit_jax.models.tokenizer import load_tokenizer
from keedit_jax.upstream import EncodingError

# The flag groups whose fields are hyperparameters of an edit (the others name files, the
# model, the mesh or the run's output).
HPARAM_GROUPS = (flags.StructuredFlags, flags.LongFormFlags, flags.SequentialFlags,
                 flags.MetaKEFlags)
RUN_HPARAMS = ("seed", "max_new_tokens")
# Where a stream checkpoint's metadata records its GRACE codebook's capacity.
CODEBOOK_CAPACITY = "codebook_capacity"


def resolve_checkpoint(model: str | Path) -> Path:
    """A checkpoint directory: the path itself, a GGUF file's or named real model's cached HF
    conversion, or the organism (`organism:small|tiny|medium`, trained and cached if absent)."""
    model = str(model)
    if gguf.is_gguf(model):
        return gguf.hf_directory(model)
    if not model.startswith(flags.ORGANISM_PREFIX):
        return Path(model)
    from keedit_jax.organism import ensure_organism  # noqa: PLC0415 (only for the organism)

    return ensure_organism(model.removeprefix(flags.ORGANISM_PREFIX), log=logging.info)


def load(model: str | Path, dtype: str = "float32") -> LoadedModel:
    """`load_model` of a path, a GGUF file, a named real model or the organism, with its
    parameters laid out on the current mesh (`parallel.use_mesh`), if any."""
    return load_model(resolve_checkpoint(model), jnp.dtype(dtype), parallel.model_shardings)


def as_model(model: LoadedModel | str | Path) -> LoadedModel:
    return model if isinstance(model, LoadedModel) else load(model)


# ---------------------------------------------------------------- hyperparameters


@dataclasses.dataclass(frozen=True)
class Settings:
    """The hyperparameter groups of one method, each a validated flags dataclass."""

    method: str
    structured: flags.StructuredFlags
    longform: flags.LongFormFlags
    sequential: flags.SequentialFlags
    metake: flags.MetaKEFlags
    seed: int = flags.RunFlags.seed
    max_new_tokens: int = flags.RunFlags.max_new_tokens


def settings(method: str, hparams: Mapping[str, Any]) -> Settings:
    """The method's settings: the flags' defaults with `hparams` (flag names) over them; an
    unknown name is a TypeError listing the known ones."""
    registry.method_record(method)
    flags.check_exclusive(set(hparams))
    by_group: dict[type, dict[str, Any]] = {group: {} for group in HPARAM_GROUPS}
    owner = {f.name: group for group in HPARAM_GROUPS for f in dataclasses.fields(group)}
    run = {}
    for name, value in hparams.items():
        if name in RUN_HPARAMS:
            run[name] = value
        elif name in owner:
            by_group[owner[name]][name] = value
        else:
            raise TypeError(f"unknown hyperparameter {name!r}; the hyperparameters are the "
                            f"flags {', '.join(sorted([*owner, *RUN_HPARAMS]))}")
    groups = [group(**by_group[group]) for group in HPARAM_GROUPS]
    return Settings(method, *groups, **run)


def hparams_from_flagfile(path: str | Path) -> dict[str, Any]:
    """The hyperparameters a flagfile sets (nested --flagfile lines included), by flag name:
    `edit(model, requests, method, **hparams_from_flagfile("configs/memit.cfg"))` edits as
    that flagfile's command does. Model, data and output flags are left out."""
    values = absl_flags.FlagValues()
    flags.define_flags(flags.FLAG_GROUPS, values)
    values(["keedit_jax", f"--flagfile={path}"])
    names = [f.name for group in HPARAM_GROUPS for f in dataclasses.fields(group)]
    return {name: values[name].value for name in [*names, *RUN_HPARAMS]
            if values[name].present}


# ---------------------------------------------------------------- requests


def as_request(item: Any, index: int) -> Request | LongFormRecord:
    """A dataset record (its `.request`), a Request or LongFormRecord, or a dict: prompt
    (with "{}" for the subject), subject and target (or target_new); or question and answer
    (long form, with optional paraphrase, sub_questions, sub_answers). case_id defaults to
    the position."""
    if isinstance(item, Request | LongFormRecord):
        return item
    if hasattr(item, "request"):
        return item.request
    if not isinstance(item, Mapping):
        raise TypeError(f"request {index}: a dict, Request, LongFormRecord or dataset record, "
                        f"not {type(item).__name__}")
    fields = dict(item)
    case_id = fields.pop("case_id", index)
    if "question" in fields:
        for name in ("sub_questions", "sub_answers"):
            fields[name] = tuple(fields.get(name, ()))
        return LongFormRecord(case_id=case_id, **fields)
    if "target" in fields:
        fields["target_new"] = fields.pop("target")
    missing = {"prompt", "subject", "target_new"} - set(fields)
    if missing:
        raise ValueError(f"request {index}: missing {', '.join(sorted(missing))} (a structured "
                         "edit needs prompt, subject and target; a long-form one question "
                         "and answer)")
    return Request(case_id=case_id, **fields)


def as_requests(items: Sequence[Any]) -> list[Any]:
    requests = [as_request(item, i) for i, item in enumerate(items)]
    if not requests:
        raise ValueError("no requests to edit")
    kinds = {type(r) for r in requests}
    if len(kinds) > 1:
        raise ValueError("a batch mixes structured and long-form requests; edit them apart")
    return requests


def read_records(path: str | Path, dataset_format: str = "auto") -> list[Any]:
    """The records of an edit dataset (structured or long form), for `edit` and `evaluate`."""
    from keedit_jax.methods import LONGFORM_FORMATS, is_longform_file  # noqa: PLC0415

    if dataset_format in LONGFORM_FORMATS or (dataset_format == "auto"
                                              and is_longform_file(path)):
        return list(read_longform(path, dataset_format))
    return list(read_dataset(path, dataset_format))


def encodable_requests(tokenizer: Any, requests: Sequence[Request], templates: Sequence[str],
                       target: Any, max_positions: int) -> tuple[list[Request], dict[str, str]]:
    """The requests that encode under every template, and why each other one does not;
    none left is an EncodingError naming them all."""
    from keedit_jax.upstream import encoding_failures  # noqa: PLC0415 (heavy)

    failed = encoding_failures(tokenizer, requests, templates, target, max_positions)
    kept = [r for r in requests if r.case_id not in failed]
    if not kept:
        raise EncodingError("none of the requests can be edited: " + "; ".join(failed.values()))
    return kept, failed


# ---------------------------------------------------------------- one-time edits


@dataclasses.dataclass(frozen=True)
class EditResult:
    """The edited parameters, the solvers' states per layer (what a next batch would carry)
    and the report: per-request diagnostics, the requests that could not be edited and why."""

    params: Params
    state: Mapping[int, Any]
    report: dict[str, Any]


def edit(model: LoadedModel | str | Path, requests: Sequence[Any], method: str = "memit",
         **hparams: Any) -> EditResult:
    """Edit `model` with one batch of `requests` by `method` (a structured or long-form
    method of `keedit_jax.registry`); the model itself is not changed. Requests that cannot
    be encoded are reported under report["failed"]; none left is an EncodingError."""
    lm, chosen = as_model(model), settings(method, hparams)
    record = registry.method_record(method)
    if record.protocol == "sequential":
        raise ValueError(f"{method} is a sequential editor: use SequentialEditor(model, "
                         f"method={method!r})")
    items = as_requests(requests)
    if isinstance(items[0], LongFormRecord):
        if not record.longform:
            raise ValueError(f"{method} edits structured requests (prompt, subject, target), "
                             "not long-form texts")
        return _edit_longform(lm, items, chosen)
    if record.protocol == "longform":
        raise ValueError(f"{method} edits long-form texts: give question/answer requests")
    return _edit_structured(lm, items, chosen)


@dataclasses.dataclass(frozen=True)
class PreparedStructured:
    """A structured method made ready on one model: its config, context templates and solver
    statistics, computed once; `apply` edits one batch. The command line's one-time protocol
    applies each batch to the unedited model with it, as `edit` applies its one batch."""

    model: LoadedModel
    tokenizer: Any
    config: Any  # methods.structured.StructuredConfig
    templates: tuple[str, ...]
    stats: Mapping[int, Any]
    batch_editor: str = ""  # the record's, for a method with no closed-form solve

    @classmethod
    def build(cls, lm: LoadedModel, tokenizer: Any, method: str,
              structured: flags.StructuredFlags, seed: int,
              moments: Mapping[int, Any] | None = None) -> PreparedStructured:
        """`moments`: the edited layers' second moments when the caller has read them."""
        from keedit_jax.methods.run_structured import (  # noqa: PLC0415 (heavy)
            layer_moments,
            run_templates,
            solver_statistics,
            structured_config,
        )

        config = structured_config(method, structured, lm.config.n_layers)
        record = registry.method_record(method)
        if record.batch_editor:  # fine-tuning: no templates, no statistics
            return cls(lm, tokenizer, config, ("{}",), {}, record.batch_editor)
        templates = run_templates(lm.params, lm.config, tokenizer, structured, seed)
        if moments is None:
            _, moments = layer_moments(lm.params, lm.config, tokenizer, lm.path, structured,
                                       config.layers)
        stats = solver_statistics(moments, registry.method_record(method).statistics,
                                  structured.nullspace_threshold)
        return cls(lm, tokenizer, config, tuple(templates), stats)

    def apply(self, requests: Sequence[Request], params: Params | None = None) -> EditResult:
        """One batch into `params` (default: the unedited model), from fresh solver states;
        requests that do not encode are reported under report["failed"]."""
        from keedit_jax.methods.structured import edit_requests  # noqa: PLC0415 (heavy)

        cfg = self.model.config
        kept, failed = encodable_requests(self.tokenizer, requests, self.templates,
                                          self.config.target, cfg.max_positions)
        report = {"templates": list(self.templates),
                  "failed": {str(k): v for k, v in failed.items()}}
        current = self.model.params if params is None else params
        if self.batch_editor:
            edited, rows = registry.load_factory(self.batch_editor)(
                current, cfg, self.tokenizer, kept, self.config)
            return EditResult(edited, {}, {"diagnostics": rows, **report})
        states = downstream.init_states(self.config.make_solver(), self.config.layers,
                                        cfg.d_ff, cfg.d_model)
        edited, states, diagnostics = edit_requests(
            current, cfg, self.tokenizer, kept, self.templates, self.stats, states, self.config)
        return EditResult(edited, states, {"diagnostics": diagnostics["requests"], **report})


def _edit_structured(lm: LoadedModel, requests: list[Request], chosen: Settings) -> EditResult:
    tokenizer = load_tokenizer(lm.path, lm.config)
    return PreparedStructured.build(lm, tokenizer, chosen.method, chosen.structured,
                                    chosen.seed).apply(requests)


@dataclasses.dataclass
class PreparedLongForm:
    """A long-form method made ready on one model: its config and solver inputs (statistics,
    or UnKE's preservation pool), computed once; `apply` edits one batch of encoded edits.
    The preservation samples are drawn from one generator across batches, as the command
    line's protocol draws them."""

    model: LoadedModel
    config: Any  # methods.unstructured.UnstructuredConfig
    stats: Mapping[int, Any]
    preservation: Any  # () -> downstream.Contexts | None
    pad_id: int

    @classmethod
    def build(cls, lm: LoadedModel, tokenizer: Any, config: Any,
              structured: flags.StructuredFlags,
              longform: flags.LongFormFlags) -> PreparedLongForm:
        """`config`: the method's `methods.unstructured.UnstructuredConfig` (its windows
        encode the edits, before anything expensive)."""
        from keedit_jax.methods.run_unstructured import (  # noqa: PLC0415 (heavy)
            SAMPLE_SEED,
            preservation_contexts,
            solver_inputs,
        )

        pad_id = tokenizer.pad_token_id or 0
        stats, pool = solver_inputs(lm.params, lm.config, tokenizer, lm.path, config,
                                    structured, longform)
        rng = np.random.default_rng(SAMPLE_SEED)

        def preservation() -> Any:
            return (preservation_contexts(tokenizer, pool, longform.preservation_samples, rng,
                                          pad_id) if pool else None)

        return cls(lm, config, stats, preservation, pad_id)

    def apply(self, edits: Sequence[Any], params: Params | None = None,
              upfront_affinity: bool = True) -> EditResult:
        """One batch of `upstream.longform.EncodedEdit`s into `params` (default: the unedited
        model). `upfront_affinity`: μKE's affinities of the unedited model, from the cache
        (a sequential stream, which edits the model, computes them inside the edit)."""
        from keedit_jax.methods.run_unstructured import batch_affinity  # noqa: PLC0415
        from keedit_jax.methods.unstructured import edit_longform  # noqa: PLC0415

        current = self.model.params if params is None else params
        cfg = self.model.config
        affinity = batch_affinity(current, cfg, edits, self.config, self.pad_id,
                                  self.model.path) if upfront_affinity else None
        edited, dropped, diagnostics = edit_longform(
            current, cfg, edits, self.stats, self.config, pad_id=self.pad_id,
            preservation=self.preservation(), affinity=affinity)
        return EditResult(edited, {}, {"diagnostics": diagnostics,
                                       "failed": {str(k): v for k, v in dropped.items()}})


def _edit_longform(lm: LoadedModel, records: list[LongFormRecord],
                   chosen: Settings) -> EditResult:
    from keedit_jax.methods.run_unstructured import unstructured_config  # noqa: PLC0415
    from keedit_jax.upstream.longform import encode_edits  # noqa: PLC0415

    tokenizer = load_tokenizer(lm.path, lm.config)
    config = unstructured_config(chosen.method, chosen.structured, chosen.longform,
                                 lm.config.n_layers)
    edits, failed = encode_edits(tokenizer, records, config.window, lm.config.max_positions)
    if not edits:
        raise EncodingError("none of the requests can be edited: " + "; ".join(failed.values()))
    prepared = PreparedLongForm.build(lm, tokenizer, config, chosen.structured, chosen.longform)
    result = prepared.apply(edits)
    result.report["failed"] = {**{str(k): v for k, v in failed.items()},
                               **result.report["failed"]}
    return result


# ---------------------------------------------------------------- sequential editing


class SequentialEditor:
    """A lifelong editor: each `edit(batch)` inserts into the model edited so far, carrying
    the solver state (MEMIT-seq's key Gram, AlphaEdit's key cache, LyapLock's queue, ...),
    as the sequential command line does; `save` / `restore` write and read an orbax
    checkpoint of the edited layers and the state. A method with no solver (GRACE) edits each
    batch by its structured batch editor into the model so far: its state is what that
    returns beside the weights (GRACE's codebook), checkpointed with them."""

    def __init__(self, model: LoadedModel | str | Path, method: str = "memit_seq",
                 **hparams: Any) -> None:
        lm, chosen = as_model(model), settings(method, hparams)
        if chosen.sequential.resolve_conflicts:
            raise ValueError("resolve_conflicts keeps a registry of the stream's facts: run it "
                             "through the command line (run_sequential)")
        self._prepare(lm, load_tokenizer(lm.path, lm.config), chosen)

    @classmethod
    def prepared(cls, lm: LoadedModel, tokenizer: Any, chosen: Settings,
                 moments: Mapping[int, Any] | None = None,
                 editor: Any = None) -> SequentialEditor:
        """The editor of the sequential command line, from what it has loaded: the tokenizer,
        the edited layers' second moments and its `run_sequential.Editor` (checked before
        anything was loaded)."""
        stream = cls.__new__(cls)
        stream._prepare(lm, tokenizer, chosen, moments, editor)
        return stream

    def _prepare(self, lm: LoadedModel, tokenizer: Any, chosen: Settings,
                 moments: Mapping[int, Any] | None = None, editor: Any = None) -> None:
        from keedit_jax.methods.metake import metake_refiner  # noqa: PLC0415 (heavy)
        from keedit_jax.methods.run_sequential import make_editor  # noqa: PLC0415
        from keedit_jax.methods.run_structured import (  # noqa: PLC0415
            layer_moments,
            run_templates,
            solver_statistics,
            structured_config,
        )

        cfg, structured = lm.config, chosen.structured
        self.model, self.method, self.tokenizer = lm, chosen.method, tokenizer
        self.settings = chosen
        self.editor = editor or make_editor(chosen.method, structured, chosen.sequential,
                                            chosen.metake)
        self.edited, self.batches = lm.params, 0
        self.prepared = None  # the batch editor of a method with no solver (GRACE)
        if self.editor.solver is None:
            self.prepared = PreparedStructured.build(lm, tokenizer, chosen.method, structured,
                                                     chosen.seed)
            self.config, self.templates = self.prepared.config, self.prepared.templates
            self.solver, self.stats, self.refine, self.states = None, {}, None, {}
            return
        self.solver = downstream.in_solve_dtype(self.editor.solver, structured.solve_dtype)
        self.config = structured_config("memit", structured, cfg.n_layers)
        self.templates = run_templates(lm.params, cfg, tokenizer, structured, chosen.seed)
        if moments is None:
            _, moments = layer_moments(lm.params, cfg, tokenizer, lm.path, structured,
                                       self.config.layers)
        self.stats = solver_statistics(moments, self.editor.stats_kind,
                                       structured.nullspace_threshold)
        self.refine = None if self.editor.metake is None else metake_refiner(
            self.editor.metake, cfg, self.config.target, self.stats, self.config.layers,
            self.editor.hparams)
        self.states = downstream.init_states(self.solver, self.config.layers, cfg.d_ff,
                                             cfg.d_model)

    @property
    def params(self) -> Params:
        """The edited parameters (naive PRUNE's once-at-the-end compression applied)."""
        if not self.editor.prune_at_end:
            return self.edited
        from keedit_jax.methods.run_sequential import prune_total_update  # noqa: PLC0415

        return prune_total_update(self.edited, self.model.params,
                                  down_proj_path(self.model.config), self.config.layers)

    def edit(self, batch: Sequence[Any]) -> dict[str, Any]:
        """Insert one batch; returns its report (per-request diagnostics, the (keys, values)
        each layer was fitted to, failed requests). A batch whose optimisation or solve
        fails changes nothing and raises."""
        from keedit_jax.methods.structured import edit_requests  # noqa: PLC0415

        requests = as_requests(batch)
        if isinstance(requests[0], LongFormRecord):
            raise ValueError("SequentialEditor edits structured requests (prompt, subject, "
                             "target)")
        if self.prepared is not None:
            result = self.prepared.apply(requests, self.edited)
            report = {"diagnostics": result.report["diagnostics"], "fitted": {},
                      "failed": result.report["failed"]}
            self.edited = result.params
        else:
            cfg = self.model.config
            kept, failed = encodable_requests(self.tokenizer, requests, self.templates,
                                              self.config.target, cfg.max_positions)
            self.edited, self.states, diagnostics = edit_requests(
                self.edited, cfg, self.tokenizer, kept, self.templates, self.stats,
                self.states, self.config, solver=self.solver, refine=self.refine)
            report = {"diagnostics": diagnostics["requests"], "fitted": diagnostics["fitted"],
                      "failed": {str(k): v for k, v in failed.items()}}
        jax.block_until_ready(self.edited)
        self.batches += 1
        return report

    def _checkpoints(self, directory: str | Path) -> Any:
        from keedit_jax.stream_checkpoint import (  # noqa: PLC0415
            StreamCheckpoints,
            group_settings,
            run_fingerprint,
        )

        groups, defaults = group_settings({name: getattr(self.settings, name)
                                           for name in ("structured", "sequential", "metake")})
        settings = {"method": {"name": self.method}, "model": {"path": str(self.model.path)},
                    "templates": {"texts": list(self.templates)}, **groups}
        return StreamCheckpoints(directory, run_fingerprint(settings), settings=settings,
                                 defaults=defaults)

    def stream_state(self) -> dict[str, Any]:
        """What a checkpoint holds: the edited layers' kernels, the solver states and, once
        the edited model has one, GRACE's codebook."""
        book = codebook_of(self.edited)
        return self._weights_state() if book is None else {**self._weights_state(),
                                                           "codebook": book}

    def state_metadata(self) -> dict[str, Any]:
        """The codebook's capacity, which a checkpoint's metadata records: it doubles along
        the stream, so a restore reads the shapes from the step (`state_like`)."""
        book = codebook_of(self.edited)
        return {} if book is None else {CODEBOOK_CAPACITY: book.capacity}

    def state_like(self, meta: Mapping[str, Any]) -> dict[str, Any]:
        """The structure of the `stream_state` a step with metadata `meta` holds."""
        from keedit_jax.methods.grace import blank_codebook  # noqa: PLC0415 (heavy)

        if CODEBOOK_CAPACITY not in meta:
            return self._weights_state()
        book = blank_codebook(self.model.config, self.config.layer, meta[CODEBOOK_CAPACITY])
        return {**self._weights_state(), "codebook": book}

    def load_state(self, batches: int, state: Mapping[str, Any]) -> None:
        """Continue after `batches` batches from a checkpoint's `stream_state`."""
        edited = set_layers(self.model.params, down_proj_path(self.model.config),
                            state["kernels"])
        self.edited = (with_codebook(edited, state["codebook"]) if "codebook" in state
                       else edited)
        self.states, self.batches = state["solver"], batches

    def _weights_state(self) -> dict[str, Any]:
        from keedit_jax.methods.run_structured import layer_kernels  # noqa: PLC0415

        return {"kernels": layer_kernels(self.edited, down_proj_path(self.model.config),
                                         self.config.layers), "solver": self.states}

    def save(self, directory: str | Path) -> None:
        """An orbax checkpoint of the edited layers and solver state after `self.batches`."""
        store = self._checkpoints(directory)
        store.save(self.batches, self.stream_state(),
                   {"batches": self.batches, **self.state_metadata()})
        store.close()

    def restore(self, directory: str | Path) -> None:
        """The latest checkpoint `save` wrote with the same model and settings (another
        configuration's is refused: CheckpointMismatchError)."""
        store = self._checkpoints(directory)
        restored = store.restore(self.state_like)
        store.close()
        if restored is None:
            raise FileNotFoundError(f"{directory}: no checkpoint of a SequentialEditor")
        batches, state, _ = restored
        self.load_state(batches, state)


# ---------------------------------------------------------------- evaluation


def evaluate(model: LoadedModel | str | Path, records: Sequence[Any], *,
             params: Params | None = None, dataset: str | Path | None = None,
             **hparams: Any) -> dict[str, Any]:
    """The protocol's metrics of `records` under `params` (default: the unedited model).
    Structured records (CounterFact, ZsRE, AKEW rewrites): efficacy, generalisation,
    specificity and fluency, ×100. Long-form records: per group (Ori., Para., Sub) the
    papers' metrics of the generated answers (and the answers); with `dataset`, the file
    the records came from, its fact side file (the organism's) adds the fact scores."""
    from keedit_jax.methods.run_sequential import edit_metrics, headline  # noqa: PLC0415

    lm = as_model(model)
    chosen = settings("memit", hparams)
    params = lm.params if params is None else params
    tokenizer = load_tokenizer(lm.path, lm.config)
    if not records:
        raise ValueError("no records to evaluate")
    if isinstance(records[0], LongFormRecord):
        return _evaluate_longform(lm, params, tokenizer, list(records), chosen, dataset)
    return headline(edit_metrics(list(records), params, lm.config, tokenizer, generate=True,
                                 max_new_tokens=chosen.max_new_tokens))


def _evaluate_longform(lm: LoadedModel, params: Params, tokenizer: Any,
                       records: list[LongFormRecord], chosen: Settings,
                       dataset: str | Path | None) -> dict[str, Any]:
    from keedit_jax.eval.sentence_encoder import load_sentence_encoder  # noqa: PLC0415
    from keedit_jax.methods.run_unstructured import (  # noqa: PLC0415
        FactSheets,
        answerable,
        generate_answers,
        group_means,
        queries,
        score,
    )
    from keedit_jax.organism.build import cache_root  # noqa: PLC0415

    encoder = load_sentence_encoder(chosen.longform.sentence_encoder,
                                    cache_root() / "sentence_encoders", logging.info)
    asked = answerable(tokenizer, lm.config, queries(records))
    answers = generate_answers(params, lm.config, tokenizer, asked, chosen.max_new_tokens,
                               chosen.longform.temperature, jax.random.key(chosen.seed))
    sheets = None if dataset is None else FactSheets.for_dataset(str(dataset), records)
    scored = score(asked, answers, None if encoder is None else encoder.embed, sheets)
    return {"groups": group_means(scored, records, set(range(len(records)))),
            "answers": scored}

