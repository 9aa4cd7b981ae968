r"""General-capability ("GLUE") tasks of the sequential-editing papers, as 0-shot prompts.

The files are the AlphaEdit `glue_eval/dataset/*.pkl` subsets converted unchanged to JSON lists
(ote_se §5.4, lyaplock §5.3, metake §5.4). As in that harness, the first `n_reserved`
(10) records of a file are kept for few-shot exemplars and the test examples are the next
`n_tests` (100); the whole file is still validated, so a malformed record anywhere is reported.

Prompts follow the harness's 0-shot prompts (no few-shot context, no chat template) and the
answer is parsed from a greedy continuation (`keedit_jax.eval.general`). An example's `label`
indexes its `label_names`, the answer words. Per task: the record fields read, the prompt
(`PROMPT_TEMPLATES`, placeholders in braces, "\n" a newline) and each label's answer word.
- sst2 {sentence, label int, idx}: "Review :{sentence}\nSentiment :"; 0 negative, 1 positive.
- sentiment_analysis {sentence, label "0"/"1"}: "For each snippet of text,label the sentiment
  ... 'positive' or 'negative'. text: {sentence} answer:"; "0" negative, "1" positive.
- cola {sentence, label int, idx}: "Is this sentence linguistically acceptable?\nSentence:
  {sentence}\nAnswer: " (trailing space kept); 0 No, 1 Yes.
- mrpc {sentence1, sentence2, label int, idx}: "Are the sentences paraphrases of each
  other.\nSentence 1: {sentence1}\nSentence 2: {sentence2}\nAnswer:"; 0 No, 1 Yes.
- rte {sentence1, sentence2, label int, idx}: "{sentence1}\nquestion: {sentence2} True or
  False?\nanswer:"; 0 True, 1 False (`rte_labels="glue"`, see below).
- nli {index, sentence1, sentence2, label str}: "{sentence1} entails the {sentence2} True or
  False? Answer:"; "entailment" True, "not_entailment" False.
- mmlu {question, subject, choices[4], answer int}: "Question: {question}\n(A) {choice_a}\n
  (B) {choice_b}\n(C) {choice_c}\n(D) {choice_d}\nAnswer:"; 0..3 -> A..D.
- dialogue {article, options[4], answers "A".."D", id}: "Q: Given the following:
  {article}\nWhich choice is correct?\n(A){option_a}\n(B)..(D){option_d}\nAnswer:"; A..D.

Label meanings were checked on the files: SST-2 label 1 records are positive reviews, CoLA label
0 sentences are ungrammatical ("Sam gave the ball out of the basket."), MRPC label 1 pairs are
paraphrases. RTE is GLUE's coding, 0 = entailment and 1 = not_entailment: the label-0 pairs
we read are entailed ("P. Prayong ... belongs to the Theravada sect" -> "P. Prayong is a member of
Theravada.") and the label-1 pairs are not ("... home to the Dalai Lama and to more than 10,000
Tibetans living in exile." -> "The Dalai Lama has been living in exile since 10,000."). The
AlphaEdit harness instead reads RTE label 0 as "False" (its few-shot answers and its parser map
"false" to 0), i.e. it scores RTE against inverted labels; this matches the published RTE F1s
(LLaMA-3 0.284, Qwen2.5 0.226) sitting far below NLI (0.666, 0.809), a task of the same kind
(ote_se Table 11). `rte_labels="alphaedit"` reproduces that convention (0 -> False,
1 -> True) for comparison with the papers; the default "glue" is the correct one.

Prompt templates are the harness's strings. The spec quotes CoLA as
"Is this sentence linguistically acceptable?\n<s>\nAnswer: "; the harness puts "Sentence: "
before the sentence, which we keep. A template can be replaced with `template=` (placeholders as
listed above).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from keedit_jax.data._fields import DatasetError, FieldReader, load_records, read_all

RteLabels = Literal["glue", "alphaedit"]
RTE_LABEL_CONVENTIONS: tuple[str, ...] = ("glue", "alphaedit")

GENERAL_TASKS: dict[str, str] = {
    "sst2": "sst2.json", "mrpc": "mrpc.json", "cola": "cola.json", "rte": "rte.json",
    "nli": "nli.json", "mmlu": "mmlu.json", "sentiment_analysis": "sentiment_analysis.json",
    "dialogue": "dialogue.json",
}
SPEC_GENERAL_TASKS: tuple[str, ...] = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")  # §5.4
FEW_SHOT_RESERVED = 10  # the harness's FEW_SHOT_TEST_SPLIT
DEFAULT_N_TESTS = 100  # number_of_tests

_SENTIMENT = ("negative", "positive")
_YES_NO = ("No", "Yes")
_TRUE_FALSE = ("True", "False")  # class 0 = entailment (GLUE's RTE coding)
_LETTERS = ("A", "B", "C", "D")

PROMPT_TEMPLATES: dict[str, str] = {
    "sst2": "Review :{sentence}\nSentiment :",
    "sentiment_analysis": ("For each snippet of text,label the sentiment of the text as positive "
                           "or negative.The answer should be exact 'positive' or 'negative'. "
                           "text: {sentence} answer:"),
    "cola": "Is this sentence linguistically acceptable?\nSentence: {sentence}\nAnswer: ",
    "mrpc": ("Are the sentences paraphrases of each other.\nSentence 1: {sentence1}\n"
             "Sentence 2: {sentence2}\nAnswer:"),
    "rte": "{sentence1}\nquestion: {sentence2} True or False?\nanswer:",
    "nli": "{sentence1} entails the {sentence2} True or False? Answer:",
    "mmlu": ("Question: {question}\n(A) {choice_a}\n(B) {choice_b}\n(C) {choice_c}\n"
             "(D) {choice_d}\nAnswer:"),
    "dialogue": ("Q: Given the following: {article}\nWhich choice is correct?\n(A){option_a}\n"
                 "(B){option_b}\n(C){option_c}\n(D){option_d}\nAnswer:"),
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class GeneralExample:
    """One test example: the prompt to continue and the gold class.

    `label_names[label]` is the expected answer word; a parsed answer is the index of the
    name found in the continuation, so labels and predictions share one class space.
    `index` is the record's position in the file, to trace a prediction back to its record.
    """

    task: str
    index: int
    prompt: str
    label: int
    label_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not 0 <= self.label < len(self.label_names):
            raise ValueError(f"{self.task} record {self.index}: label {self.label} outside "
                             f"{self.label_names}")


# ----------------------------------------------------------------------------- record parsers

Fields = dict[str, str]
Parse = Callable[[FieldReader], tuple[Fields, int] | None]


def _label(reader: FieldReader, field: str, kind: type, classes: Mapping[Any, int]) -> int:
    """The class of a label field whose value must be one of `classes` (-1 after a problem)."""
    value = reader.raw(field, kind)
    if value is None:
        return -1
    if value not in classes:
        reader.note(field, f"unknown label {value!r}; expected one of {list(classes)}")
        return -1
    return classes[value]


def _four(reader: FieldReader, field: str, prefix: str) -> Fields:
    """A list of exactly four answer options as {prefix_a: .., .., prefix_d: ..}."""
    options = reader.texts(field)
    value = reader.record.get(field)
    if isinstance(value, list) and len(value) != 4:
        reader.note(field, f"expected 4 options, got {len(value)}")
        return {}
    return {f"{prefix}_{letter.lower()}": text for letter, text in zip(_LETTERS, options,
                                                                       strict=False)}


def _single(label_kind: type, classes: Mapping[Any, int]) -> Parse:
    """Parser of a one-sentence record (SST-2, sentiment_analysis, CoLA)."""

    def parse(reader: FieldReader) -> tuple[Fields, int] | None:
        sentence = reader.text("sentence")
        label = _label(reader, "label", label_kind, classes)
        return None if reader.problems else ({"sentence": sentence}, label)

    return parse


def _pair(label_kind: type, classes: Mapping[Any, int]) -> Parse:
    """Parser of a sentence-pair record (MRPC, RTE, NLI)."""

    def parse(reader: FieldReader) -> tuple[Fields, int] | None:
        fields = {"sentence1": reader.text("sentence1"), "sentence2": reader.text("sentence2")}
        label = _label(reader, "label", label_kind, classes)
        return None if reader.problems else (fields, label)

    return parse


def _mmlu(reader: FieldReader) -> tuple[Fields, int] | None:
    fields = {"question": reader.text("question"), **_four(reader, "choices", "choice")}
    reader.raw("subject", str)  # part of the format; not in the 0-shot prompt
    label = _label(reader, "answer", int, {i: i for i in range(4)})
    return None if reader.problems else (fields, label)


def _dialogue(reader: FieldReader) -> tuple[Fields, int] | None:
    fields = {"article": reader.text("article"), **_four(reader, "options", "option")}
    label = _label(reader, "answers", str, {letter: i for i, letter in enumerate(_LETTERS)})
    return None if reader.problems else (fields, label)


_BINARY_INT = {0: 0, 1: 1}


def _task_format(task: str, rte_labels: RteLabels) -> tuple[Parse, tuple[str, ...]]:
    """(record parser, label names) of a task."""
    if task == "rte":
        return _pair(int, _BINARY_INT), (_TRUE_FALSE if rte_labels == "glue"
                                         else _TRUE_FALSE[::-1])
    formats: dict[str, tuple[Parse, tuple[str, ...]]] = {
        "sst2": (_single(int, _BINARY_INT), _SENTIMENT),
        "sentiment_analysis": (_single(str, {"0": 0, "1": 1}), _SENTIMENT),
        "cola": (_single(int, _BINARY_INT), _YES_NO),
        "mrpc": (_pair(int, _BINARY_INT), _YES_NO),
        "nli": (_pair(str, {"entailment": 0, "not_entailment": 1}), _TRUE_FALSE),
        "mmlu": (_mmlu, _LETTERS),
        "dialogue": (_dialogue, _LETTERS),
    }
    return formats[task]


# ----------------------------------------------------------------------------- readers


def _check_template(task: str, template: str, fields: Fields) -> None:
    """A template may only name the task's fields (else `format` fails mid-way, unnamed)."""
    try:
        template.format(**fields)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"{task} prompt template {template!r}: {error!r}; its placeholders "
                         f"must be among {sorted(fields)}") from error


def read_general_task(path: str | pathlib.Path, task: str,
                      n_tests: int | None = DEFAULT_N_TESTS,
                      n_reserved: int = FEW_SHOT_RESERVED, *, rte_labels: RteLabels = "glue",
                      template: str | None = None) -> tuple[GeneralExample, ...]:
    """The test examples of one task file: records [n_reserved, n_reserved + n_tests).

    `n_tests=None` takes every record after the reserved ones. The whole file is validated
    first (DatasetError naming the file, record and field); a file with too few records for
    the requested split is an error, as in the harness, rather than a silently smaller test.
    """
    if task not in GENERAL_TASKS:
        raise ValueError(f"unknown general task {task!r}: expected one of {list(GENERAL_TASKS)}")
    if rte_labels not in RTE_LABEL_CONVENTIONS:
        raise ValueError(f"rte_labels {rte_labels!r}: expected one of {RTE_LABEL_CONVENTIONS}")
    if n_reserved < 0 or (n_tests is not None and n_tests < 1):
        raise ValueError(f"need n_reserved >= 0 and n_tests >= 1 (or None), got {n_reserved}, "
                         f"{n_tests}")
    parse, names = _task_format(task, rte_labels)
    parsed = read_all(path, load_records(path), parse)
    available = len(parsed) - n_reserved
    n = available if n_tests is None else n_tests
    if available < max(n, 1):
        raise DatasetError(path, message=f"{len(parsed)} records cannot give {n_reserved} "
                                         f"reserved + {n_tests} test examples")
    template = PROMPT_TEMPLATES[task] if template is None else template
    _check_template(task, template, parsed[0][0])
    return tuple(
        GeneralExample(task=task, index=index, prompt=template.format(**fields), label=label,
                       label_names=names)
        for index, (fields, label) in enumerate(parsed[n_reserved:n_reserved + n],
                                                start=n_reserved))


def read_general_tasks(directory: str | pathlib.Path,
                       tasks: Iterable[str] = SPEC_GENERAL_TASKS,
                       n_tests: int | None = DEFAULT_N_TESTS,
                       n_reserved: int = FEW_SHOT_RESERVED, *,
                       rte_labels: RteLabels = "glue") -> dict[str, tuple[GeneralExample, ...]]:
    """Every task's examples from `directory/<GENERAL_TASKS[task]>`, keyed by task."""
    directory = pathlib.Path(directory)
    return {task: read_general_task(directory / GENERAL_TASKS.get(task, f"{task}.json"), task,
                                    n_tests, n_reserved, rte_labels=rte_labels)
            for task in tasks}
