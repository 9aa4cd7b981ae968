"""Readers of the long-form (unstructured) editing benchmarks, all returning `LongFormRecord`.

Field mappings follow the reference code (muke §5.1, anyedit §5, anchors §8):

- UnKEBench v2/v3: `question`, `para_question`, `answer`; all `sub_question` / `sub_answer`.
- AKEW CounterFact: question `requested_rewrite.prompt_full`, paraphrase
  `paraphrase_prompts[0]`, answer `requested_rewrite.fact_new_uns`; the first 5 triplets.
- AKEW MQuAKE-CF: question `requested_rewrite[0].question`, answer
  `requested_rewrite[0].fact_new_uns`, no paraphrase; the first 5 triplets of that rewrite.
- EditEverything: `question`, `answer`, `category`; no paraphrase, no sub-questions.
- hallucination (μKE, SelfCheckGPT): question `prompt` (a passage), answer `target_new`.

A triplet of `unsfact_triplets_GPT` is {subject, prompt, target}: its sub-question is
`prompt.format(subject)` with the triplet's own subject (not always the edit's: MQuAKE case 1
asks "{} is located in" of "Croatia"), and its answer is `target`. Only the first five triplets
are read and validated, since the reference code drops the rest. UnKEBench v3's MMLU fields
are ignored (they feed UnKE's MMLU check, not the edit).

Case ids are the file's `id` / `case_id` (the record index for the hallucination file, which
has none) and must be unique. Each reader validates the whole file first and raises one
`DatasetError` naming the file and every malformed record field, duplicates included.
"""

from __future__ import annotations

import collections
import dataclasses
import pathlib
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from keedit_jax.data._fields import (
    DatasetError,
    FieldReader,
    load_records,
    read_all,
    read_case_id,
    read_nested,
)

LONGFORM_FORMATS: tuple[str, ...] = (
    "auto", "unkebench", "akew_counterfact", "akew_mquake", "editeverything", "hallucination")
AKEW_SUB_QUESTIONS = 5  # triplets turned into sub-questions (AnyEdit/μKE `[:5]`)

T = TypeVar("T")
Parse = Callable[[FieldReader], T | None]
SubQuestions = tuple[tuple[str, ...], tuple[str, ...]]  # (sub-questions, sub-answers)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LongFormRecord:
    """One long-form edit: a question whose answer should become the long `answer` text.

    One type for every long-form benchmark, so that the editing methods and the evaluation
    (Ori. / Para. / Sub, per category) have one code path. What a benchmark lacks is empty:
    `paraphrase` None means no Para. score, empty `sub_questions` no Sub score; `category` is
    set only by EditEverything, whose results are reported per category.
    """

    case_id: int | str
    question: str
    answer: str
    paraphrase: str | None = None
    sub_questions: tuple[str, ...] = ()
    sub_answers: tuple[str, ...] = ()
    category: str | None = None

    def __post_init__(self) -> None:
        if not self.question.strip() or not self.answer.strip():
            raise ValueError(f"long-form record {self.case_id}: empty question or answer")
        if len(self.sub_questions) != len(self.sub_answers):
            raise ValueError(f"long-form record {self.case_id}: {len(self.sub_questions)} "
                             f"sub-questions but {len(self.sub_answers)} sub-answers")


@dataclasses.dataclass(frozen=True, kw_only=True)
class AlpacaRecord:
    """One Stanford Alpaca sample; UnKE's preservation data (20 random ones per edit)."""

    instruction: str
    input: str
    output: str


# ----------------------------------------------------------------------------- field helpers


def _triplet(reader: FieldReader) -> tuple[str, str]:
    """(sub-question, sub-answer) of one `unsfact_triplets_GPT` entry."""
    subject, prompt = reader.text("subject"), reader.text("prompt", template=True)
    target = reader.text("target")
    if reader.problems:
        return "", target
    return prompt.format(subject), target


def _triplet_questions(reader: FieldReader, field: str) -> SubQuestions:
    """(sub-questions, sub-answers) from the first AKEW_SUB_QUESTIONS triplets at `field`."""
    triplets = reader.raw(field, list) or []
    pairs = [read_nested(reader, f"{field}[{i}]", triplet, _triplet)
             for i, triplet in enumerate(triplets[:AKEW_SUB_QUESTIONS])]
    valid = [pair for pair in pairs if pair is not None]
    return tuple(q for q, _ in valid), tuple(a for _, a in valid)


# ----------------------------------------------------------------------------- record parsers


def _unkebench(reader: FieldReader) -> LongFormRecord | None:
    case_id = read_case_id(reader, "id")
    question, paraphrase = reader.text("question"), reader.text("para_question")
    answer = reader.text("answer")
    sub_questions, sub_answers = reader.texts("sub_question"), reader.texts("sub_answer")
    listed = [reader.record.get(key) for key in ("sub_question", "sub_answer")]
    if all(isinstance(items, list) for items in listed) and len(listed[0]) != len(listed[1]):
        reader.note("sub_answer", f"{len(listed[1])} answer(s) for {len(listed[0])} "
                                  "sub-question(s)")
    if reader.problems:
        return None
    return LongFormRecord(case_id=case_id, question=question, answer=answer,
                          paraphrase=paraphrase, sub_questions=sub_questions,
                          sub_answers=sub_answers)


def _akew_rewrite(question_field: str) -> Parse[tuple[str, str, SubQuestions]]:
    """Parser of an AKEW `requested_rewrite` entry: (question, answer, (sub-Qs, sub-As))."""

    def parse(reader: FieldReader) -> tuple[str, str, SubQuestions]:
        return (reader.text(question_field), reader.text("fact_new_uns"),
                _triplet_questions(reader, "unsfact_triplets_GPT"))

    return parse


def _akew_counterfact(reader: FieldReader) -> LongFormRecord | None:
    case_id = read_case_id(reader, "case_id")
    paraphrases = reader.texts("paraphrase_prompts", minimum=1)
    value = reader.raw("requested_rewrite", dict)
    rewrite = (None if value is None else
               read_nested(reader, "requested_rewrite", value, _akew_rewrite("prompt_full")))
    if reader.problems or rewrite is None:
        return None
    question, answer, (sub_questions, sub_answers) = rewrite
    return LongFormRecord(case_id=case_id, question=question, answer=answer,
                          paraphrase=paraphrases[0], sub_questions=sub_questions,
                          sub_answers=sub_answers)


def _akew_mquake(reader: FieldReader) -> LongFormRecord | None:
    case_id = read_case_id(reader, "case_id")
    rewrites = reader.raw("requested_rewrite", list)
    if rewrites == []:
        reader.note("requested_rewrite", "expected at least 1 item(s), got 0")
    rewrite = (read_nested(reader, "requested_rewrite[0]", rewrites[0], _akew_rewrite("question"))
               if rewrites else None)
    if reader.problems or rewrite is None:
        return None
    question, answer, (sub_questions, sub_answers) = rewrite
    return LongFormRecord(case_id=case_id, question=question, answer=answer,
                          sub_questions=sub_questions, sub_answers=sub_answers)


def _editevery(reader: FieldReader) -> LongFormRecord | None:
    case_id = read_case_id(reader, "id")
    question, answer = reader.text("question"), reader.text("answer")
    category = reader.text("category")
    if reader.problems:
        return None
    return LongFormRecord(case_id=case_id, question=question, answer=answer, category=category)


def _hallucination(reader: FieldReader) -> LongFormRecord | None:
    question, answer = reader.text("prompt"), reader.text("target_new")
    if reader.problems:
        return None
    return LongFormRecord(case_id=reader.index, question=question, answer=answer)


def _alpaca(reader: FieldReader) -> AlpacaRecord | None:
    """Type checks only: the real file has 28 empty outputs (stanford_alpaca issue #265)."""
    fields = {key: reader.raw(key, str) for key in ("instruction", "input", "output")}
    if reader.problems:
        return None
    return AlpacaRecord(**fields)


# (parser, id field checked for duplicates; None where the id is the record index)
_PARSERS: dict[str, tuple[Parse[LongFormRecord], str | None]] = {
    "unkebench": (_unkebench, "id"),
    "akew_counterfact": (_akew_counterfact, "case_id"),
    "akew_mquake": (_akew_mquake, "case_id"),
    "editeverything": (_editevery, "id"),
    "hallucination": (_hallucination, None),
}


# ----------------------------------------------------------------------------- file readers


def _read(path: str | pathlib.Path, records: list[Any],
          format: str) -> tuple[LongFormRecord, ...]:
    """Every record parsed; one DatasetError with the field problems and duplicate ids."""
    parse, id_field = _PARSERS[format]
    return read_all(path, records, parse, id_field)


def _select(path: str | pathlib.Path, items: tuple[LongFormRecord, ...],
            categories: Iterable[str]) -> tuple[LongFormRecord, ...]:
    """The records of `categories`; DatasetError naming the file's categories if one is absent."""
    wanted = (categories,) if isinstance(categories, str) else tuple(categories)
    if not wanted:
        raise ValueError("categories: expected at least one category, got none")
    counts = collections.Counter(item.category for item in items)
    unknown = [c for c in wanted if c not in counts]
    if unknown:
        available = ", ".join(f"{c} ({n})" for c, n in counts.most_common())
        raise DatasetError(path, message=f"unknown categor{'y' if len(unknown) == 1 else 'ies'} "
                                         f"{unknown}; the file has: {available}")
    return tuple(item for item in items if item.category in wanted)


def read_unkebench(path: str | pathlib.Path) -> tuple[LongFormRecord, ...]:
    """UnKEBench v2 or v3 (v3's MMLU fields ignored), with all sub-questions."""
    return _read(path, load_records(path), "unkebench")


def read_akew_counterfact(path: str | pathlib.Path) -> tuple[LongFormRecord, ...]:
    """AKEW CounterFact, unstructured setting (module table)."""
    return _read(path, load_records(path), "akew_counterfact")


def read_akew_mquake(path: str | pathlib.Path) -> tuple[LongFormRecord, ...]:
    """AKEW MQuAKE-CF: the first rewrite of each case, without paraphrase (module table)."""
    return _read(path, load_records(path), "akew_mquake")


def read_editevery(path: str | pathlib.Path,
                   categories: Iterable[str] | None = None) -> tuple[LongFormRecord, ...]:
    """EditEverything, optionally only `categories` (results are reported per category)."""
    items = _read(path, load_records(path), "editeverything")
    return items if categories is None else _select(path, items, categories)


def read_hallucination(path: str | pathlib.Path) -> tuple[LongFormRecord, ...]:
    """μKE's SelfCheckGPT hallucination edits: the passage `prompt` continued by `target_new`."""
    return _read(path, load_records(path), "hallucination")


def read_alpaca(path: str | pathlib.Path) -> tuple[AlpacaRecord, ...]:
    """Stanford Alpaca's JSON list; the preservation samples of UnKE-style editing."""
    return read_all(path, load_records(path), _alpaca)


def _detect(path: str | pathlib.Path, records: list[Any]) -> str:
    """The long-form format from the first record's fields (anchors §8)."""
    if not records or not isinstance(records[0], dict):
        raise DatasetError(path, message="cannot detect the format: no record object first")
    first = records[0]
    rewrite = first.get("requested_rewrite")
    if isinstance(rewrite, list):
        return "akew_mquake"
    if isinstance(rewrite, dict):
        if "fact_new_uns" in rewrite:
            return "akew_counterfact"
        raise DatasetError(path, message="'requested_rewrite' without 'fact_new_uns' is "
                                         "structured CounterFact: read it with read_dataset")
    if {"sub_question", "para_question"} & set(first):
        return "unkebench"
    if "category" in first:
        return "editeverything"
    if {"prompt", "target_new"} <= set(first):
        return "hallucination"
    raise DatasetError(path, message=(
        f"cannot detect the long-form format from fields {sorted(first)}; expected "
        "'requested_rewrite' (AKEW), 'sub_question'/'para_question' (UnKEBench), "
        "'category' (EditEverything) or 'prompt'+'target_new' (hallucination)"))


def detect_longform_format(path: str | pathlib.Path) -> str:
    """The long-form format of a file, as `read_longform(format="auto")` detects it."""
    return _detect(path, load_records(path))


def read_longform(path: str | pathlib.Path, format: str = "auto",
                  categories: Iterable[str] | None = None) -> tuple[LongFormRecord, ...]:
    """All records of a long-form benchmark in one of LONGFORM_FORMATS, validated.

    `categories` filters EditEverything (read_editevery); other formats have none.
    """
    if format not in LONGFORM_FORMATS:
        raise ValueError(f"long-form format {format!r}: expected one of {LONGFORM_FORMATS}")
    records = load_records(path)
    if format == "auto":
        format = _detect(path, records)
    if categories is not None and format != "editeverything":
        raise ValueError(f"categories apply to editevery only, not to {format!r}")
    items = _read(path, records, format)
    return items if categories is None else _select(path, items, categories)
