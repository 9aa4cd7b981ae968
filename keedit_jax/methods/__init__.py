"""Method registry: a method name -> the function that runs it."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from keedit_jax.registry import RECORDS, method_record

LONGFORM_FORMATS = ("unkebench", "akew_counterfact", "akew_mquake", "editeverything",
                    "hallucination")


def _structured(**kwargs: Any) -> dict[str, Any]:
    from keedit_jax.methods.run_structured import run_structured  # noqa: PLC0415 (heavy)

    return run_structured(**kwargs)


def _unstructured(**kwargs: Any) -> dict[str, Any]:
    from keedit_jax.methods.run_unstructured import run_unstructured  # noqa: PLC0415 (heavy)

    return run_unstructured(**kwargs)


def _sequential(**kwargs: Any) -> dict[str, Any]:
    from keedit_jax.methods.run_sequential import run_sequential  # noqa: PLC0415 (heavy)

    return run_sequential(**kwargs)


def is_longform_file(path: str | Path) -> bool:
    """Whether a dataset file holds long-form records (by its fields)."""
    from keedit_jax.data import DatasetError, detect_longform_format  # noqa: PLC0415

    try:
        detect_longform_format(path)
    except DatasetError:
        return False
    return True


def _is_longform(data: Any) -> bool:
    """A long-form dataset by its format flag, or by its fields when the flag is auto."""
    if data.dataset_format != "auto" or not data.dataset:
        return data.dataset_format in LONGFORM_FORMATS
    return is_longform_file(data.dataset)


def _by_dataset(**kwargs: Any) -> dict[str, Any]:
    """MEMIT/AlphaEdit: the structured protocol, its sequential stream with --sequential, or
    One-for-All on a long-form dataset."""
    if _is_longform(kwargs["configs"]["DataFlags"]):
        return _unstructured(**kwargs)
    if kwargs["configs"]["EditFlags"].sequential:
        return _sequential(**kwargs)
    return _structured(**kwargs)


def structured_only_refusal(method: str, data: Any, sequential: bool) -> str:
    """Why a structured-only method cannot run on these flags ("" when it can)."""
    if _is_longform(data):
        what = (f"--dataset_format={data.dataset_format}" if data.dataset_format != "auto"
                else f"--dataset={data.dataset}")
        return (f"--method={method} edits structured (subject, relation, object) requests "
                f"only: {what} is long form (long-form methods: "
                f"{', '.join(r.name for r in RECORDS if r.longform)})")
    if sequential and not method_record(method).sequential_editor:
        return f"--method={method} has no sequential protocol: drop --sequential"
    return ""


def _structured_only(**kwargs: Any) -> dict[str, Any]:
    """A structured method: the structured protocol (ROME: nothing else), or with --sequential
    the stream of one whose record has a sequential editor (GRACE)."""
    configs = kwargs["configs"]
    refusal = structured_only_refusal(configs["EditFlags"].method, configs["DataFlags"],
                                      configs["EditFlags"].sequential)
    if refusal:
        raise ValueError(refusal)
    return (_sequential if configs["EditFlags"].sequential else _structured)(**kwargs)


PROTOCOLS: dict[str, Callable[..., dict[str, Any]]] = {
    "by_dataset": _by_dataset, "structured": _structured_only, "longform": _unstructured,
    "sequential": _sequential}
# Each method's runner, from its registry record's protocol.
REGISTRY: dict[str, Callable[..., dict[str, Any]]] = {
    record.name: PROTOCOLS[record.protocol] for record in RECORDS}

# The methods whose streams --post_processing (PRUNE, RECT) applies to, from their records.
POST_PROCESSED = tuple(r.name for r in RECORDS if r.post_processing)


def check_method_flags(configs: dict[str, Any]) -> None:
    """Flags that only some methods read, refused (ValueError) for the others before any work."""
    method = configs["EditFlags"].method
    post = configs["SequentialFlags"].post_processing
    if post != "none" and method not in POST_PROCESSED:
        raise ValueError(f"--post_processing={post} applies to {' and '.join(POST_PROCESSED)} "
                         f"(naive and aligned), not {method}")
    if configs["SequentialFlags"].resolve_conflicts and (method != "memit_seq" or post != "none"):
        raise ValueError("--resolve_conflicts applies to memit_seq without post-processing "
                         "(its carried system λC + G is what a removal corrects)")
    data, record = configs["DataFlags"], method_record(method)
    if record.protocol == "longform" and data.dataset_format not in ("auto", *LONGFORM_FORMATS):
        raise ValueError(f"--method={method} edits long-form texts: --dataset_format="
                         f"{data.dataset_format} is a structured format (long-form formats: "
                         f"{', '.join(LONGFORM_FORMATS)})")
    if record.protocol == "structured":
        refusal = structured_only_refusal(method, data, configs["EditFlags"].sequential)
        if refusal:
            raise ValueError(refusal)
    if (REGISTRY[method] is _structured_only and not record.batch_editor) or (
            REGISTRY[method] is _by_dataset and not configs["EditFlags"].sequential
            and not _is_longform(data)):
        check_structured_layers(record.solver, configs["StructuredFlags"].layer_tuple)
    if configs["LongFormFlags"].categories and data.dataset_format not in ("auto",
                                                                           "editeverything"):
        raise ValueError(f"--categories selects EditEverything categories; --dataset_format="
                         f"{data.dataset_format} has none")
    sequential = REGISTRY[method] is _sequential or (
        REGISTRY[method] in (_by_dataset, _structured_only) and configs["EditFlags"].sequential
        and not _is_longform(configs["DataFlags"]))
    if configs["RunFlags"].export_gguf and record.batch_editor and sequential:
        raise ValueError(f"--export_gguf: the stream of --method={method} keeps its edit "
                         "beside the weights (GRACE's codebook), which a GGUF file cannot hold")
    if configs["RunFlags"].export_gguf and not sequential:
        raise ValueError("--export_gguf applies to sequential runs (memit_seq, ..., or --method="
                         "memit/alphaedit --sequential): the other protocols edit the unedited "
                         "model once per batch, so no single edited model exists")


def check_structured_layers(solver: str, layers: tuple[int, ...]) -> None:
    """--layers the structured solver cannot edit (ROME: more than one) refused before any
    work: a ValueError naming the layers."""
    from keedit_jax.methods.structured import StructuredConfig  # noqa: PLC0415 (jax)
    from keedit_jax.upstream import TargetConfig  # noqa: PLC0415

    StructuredConfig(layers=layers, solver=solver,
                     target=TargetConfig(layer=layers[-1], v_loss_layer=layers[-1]))


def get_method(name: str) -> Callable[..., dict[str, Any]]:
    return PROTOCOLS[method_record(name).protocol]
