"""Dataset readers and the request types the methods consume.

- `read_counterfact`: CounterFact / MCF -> `CounterFactRecord` (anchors §8, §7.1).
- `read_zsre`: ZsRE (MEND split) -> `ZsreRecord`; the edit target convention is a choice
  (`target="alt"` EasyEdit, `"answers"` MEMIT; anchors §7.2).
- `read_akew_mquake_cf`: AKEW MQuAKE-CF's rewrites as CounterFact cases, with a neighbourhood
  proxy from other cases (`akew_structured`); `without_edited_neighbours` drops edited ones.
- `read_dataset(path, format)`: the `--dataset_format` dispatcher, with "auto" detection.
- `read_longform(path, format)`: UnKEBench (v2/v3), AKEW-CounterFact, AKEW-MQuAKE,
  EditEverything and the hallucination set -> `LongFormRecord` (muke §5.1); `read_alpaca`
  -> `AlpacaRecord` (UnKE's preservation samples).
- `read_context_templates`: MEMIT-family context-template files (`--context_templates`).
- `read_general_task(s)`: the GLUE-style general-capability subsets (SST-2, MRPC, CoLA, RTE,
  NLI, MMLU, ...) -> `GeneralExample` 0-shot prompts with labels (ote_se §5.4).
Every reader validates the whole file first and raises one `DatasetError` naming the file and
each malformed record field.
"""

from keedit_jax.data._fields import DatasetError, FieldProblem
from keedit_jax.data.akew_structured import read_akew_mquake_cf, without_edited_neighbours
from keedit_jax.data.counterfact import CounterFactRecord, read_counterfact
from keedit_jax.data.formats import DATASET_FORMATS, StructuredRecord, detect_format, read_dataset
from keedit_jax.data.general import (
    GENERAL_TASKS,
    PROMPT_TEMPLATES,
    SPEC_GENERAL_TASKS,
    GeneralExample,
    read_general_task,
    read_general_tasks,
)
from keedit_jax.data.longform import (
    LONGFORM_FORMATS,
    AlpacaRecord,
    LongFormRecord,
    detect_longform_format,
    read_akew_counterfact,
    read_akew_mquake,
    read_alpaca,
    read_editevery,
    read_hallucination,
    read_longform,
    read_unkebench,
)
from keedit_jax.data.requests import Request
from keedit_jax.data.templates import read_context_templates
from keedit_jax.data.zsre import ZSRE_TARGETS, ZsreRecord, ZsreTarget, read_zsre

__all__ = [
    "DATASET_FORMATS",
    "ZSRE_TARGETS",
    "CounterFactRecord",
    "DatasetError",
    "FieldProblem",
    "Request",
    "StructuredRecord",
    "ZsreRecord",
    "ZsreTarget",
    "detect_format",
    "read_counterfact",
    "read_dataset",
    "read_akew_mquake_cf",
    "without_edited_neighbours",
    "read_zsre",
    "LONGFORM_FORMATS",
    "AlpacaRecord",
    "LongFormRecord",
    "detect_longform_format",
    "read_akew_counterfact",
    "read_akew_mquake",
    "read_alpaca",
    "read_editevery",
    "read_hallucination",
    "read_longform",
    "read_unkebench",
    "GENERAL_TASKS",
    "PROMPT_TEMPLATES",
    "SPEC_GENERAL_TASKS",
    "GeneralExample",
    "read_general_task",
    "read_general_tasks",
    "read_context_templates",
]
