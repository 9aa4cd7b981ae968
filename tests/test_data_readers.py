"""Readers of CounterFact/MCF and ZsRE: organism files, the real ZsRE file, malformed records."""

from __future__ import annotations

import copy
import json
import os
import pathlib
from typing import Any

import pytest

from keedit_jax.data import (
    CounterFactRecord,
    DatasetError,
    Request,
    ZsreRecord,
    detect_format,
    read_counterfact,
    read_dataset,
    read_zsre,
)
from keedit_jax.organism import write_benchmarks
from keedit_jax.organism.world import build_world

REAL_ZSRE = pathlib.Path(os.environ.get("KEEDIT_REAL_DATA", "/work/shared/data"),
                         "zsre_mend_edit.json")


@pytest.fixture(scope="module")
def organism_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    return write_benchmarks(build_world(0, 8), tmp_path_factory.mktemp("benchmarks"))


def _raw(path: pathlib.Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


def _check_strings(values: tuple[str, ...]) -> None:
    assert isinstance(values, tuple) and all(isinstance(v, str) and v for v in values)


def test_organism_counterfact_parses(organism_files: dict[str, pathlib.Path]) -> None:
    path = organism_files["counterfact"]
    raw, records = _raw(path), read_counterfact(path)
    assert len(records) == len(raw) > 0
    for rec, src in zip(records, raw, strict=True):
        rw = src["requested_rewrite"]
        assert isinstance(rec, CounterFactRecord) and isinstance(rec.request, Request)
        assert rec.request == Request(case_id=src["case_id"], prompt=rw["prompt"],
                                      subject=rw["subject"], target_new=rw["target_new"]["str"],
                                      target_true=rw["target_true"]["str"])
        assert (rec.relation_id, rec.pararel_idx) == (rw["relation_id"], src["pararel_idx"])
        assert (rec.target_new_id, rec.target_true_id) == (rw["target_new"]["id"],
                                                           rw["target_true"]["id"])
        assert rec.paraphrase_prompts == tuple(src["paraphrase_prompts"])
        assert rec.neighborhood_prompts == tuple(src["neighborhood_prompts"])
        assert rec.neighborhood_answer == rw["target_true"]["str"]
        for prompts in (rec.paraphrase_prompts, rec.neighborhood_prompts,
                        rec.attribute_prompts, rec.generation_prompts):
            _check_strings(prompts)


def test_organism_zsre_edits_towards_alt(organism_files: dict[str, pathlib.Path]) -> None:
    path = organism_files["zsre"]
    raw, records = _raw(path), read_zsre(path)
    assert len(records) == len(raw) > 0
    for index, (rec, src) in enumerate(zip(records, raw, strict=True)):
        assert isinstance(rec, ZsreRecord)
        assert rec.request.case_id == index
        assert rec.request.filled_prompt == src["src"]
        assert (rec.request.target_new, rec.request.target_true) == (src["alt"],
                                                                     src["answers"][0])
        assert (rec.rephrase, rec.loc, rec.loc_ans) == (src["rephrase"], src["loc"],
                                                        src["loc_ans"])
        assert rec.loc_prompt == src["loc"] + "?" and rec.answers == tuple(src["answers"])


def test_zsre_memit_target_is_first_answer(organism_files: dict[str, pathlib.Path]) -> None:
    path = organism_files["zsre"]
    for rec, src in zip(read_zsre(path, target="answers"), _raw(path), strict=True):
        assert (rec.request.target_new, rec.request.target_true) == (src["answers"][0], None)
    with pytest.raises(ValueError, match="zsre target"):
        read_zsre(path, target="pred")  # type: ignore[arg-type]


def test_auto_detection(organism_files: dict[str, pathlib.Path]) -> None:
    assert detect_format(organism_files["counterfact"]) == "counterfact"
    assert detect_format(organism_files["zsre"]) == "zsre"
    assert read_dataset(organism_files["counterfact"]) == read_counterfact(
        organism_files["counterfact"])
    assert read_dataset(organism_files["counterfact"], "mcf") == read_counterfact(
        organism_files["counterfact"])
    assert read_dataset(organism_files["zsre"], zsre_target="answers") == read_zsre(
        organism_files["zsre"], target="answers")
    with pytest.raises(DatasetError, match="cannot detect"):
        read_dataset(organism_files["unkebench"])
    with pytest.raises(ValueError, match="dataset format"):
        read_dataset(organism_files["zsre"], "wiki")


@pytest.mark.skipif(not REAL_ZSRE.exists(), reason=f"{REAL_ZSRE} absent")
def test_real_zsre_file_parses() -> None:
    records = read_dataset(REAL_ZSRE)
    assert len(records) == 1037 and all(isinstance(r, ZsreRecord) for r in records)
    first = read_zsre(REAL_ZSRE, target="answers")[0]
    assert first.request.prompt == "When was the inception of {}?"
    assert first.request.target_new == "1998" and first.alt == "2006"


def _write(tmp_path: pathlib.Path, records: list[Any]) -> pathlib.Path:
    path = tmp_path / "broken.json"
    path.write_text(json.dumps(records), encoding="utf-8")
    return path


def _pop(record: dict[str, Any], dotted: str) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        record = record[key]
    del record[last]


def _set(record: dict[str, Any], dotted: str, value: Any) -> None:
    *parents, last = dotted.split(".")
    for key in parents:
        record = record[key]
    record[last] = value


CF_BREAKS = [
    ("missing", "requested_rewrite.subject", None, "missing"),
    ("wrong type", "case_id", "seven", "expected an integer"),
    ("wrong type", "paraphrase_prompts", "a prompt", "expected a list"),
    ("no braces", "requested_rewrite.prompt", "The mother tongue is", "exactly one '{}'"),
    ("stray braces", "requested_rewrite.prompt", "{} speaks {lang}", "braces besides"),
    ("empty target", "requested_rewrite.target_new.str", "  ", "empty string"),
    ("empty target", "requested_rewrite.target_true.str", "", "empty string"),
]


@pytest.mark.parametrize(("kind", "field", "value", "message"), CF_BREAKS)
def test_malformed_counterfact_names_file_index_field(
        organism_files: dict[str, pathlib.Path], tmp_path: pathlib.Path, kind: str, field: str,
        value: Any, message: str) -> None:
    records = copy.deepcopy(_raw(organism_files["counterfact"]))
    (_pop if kind == "missing" else _set)(records[3], field, *([] if kind == "missing" else
                                                               [value]))
    path = _write(tmp_path, records)
    with pytest.raises(DatasetError) as error:
        read_dataset(path)
    text = str(error.value)
    assert str(path) in text and f"record 3, field {field!r}" in text and message in text
    assert [(p.index, p.field) for p in error.value.problems] == [(3, field)]


ZSRE_BREAKS = [
    ("missing", "loc_ans", None, "missing"),
    ("wrong type", "answers", "1998", "expected a list"),
    ("wrong type", "rephrase", 5, "expected a string"),
    ("no braces", "src", "A question without its subject?", "exactly once"),
    ("empty target", "alt", "", "empty string"),
    ("empty target", "answers", [], "at least 1"),
]


@pytest.mark.parametrize(("kind", "field", "value", "message"), ZSRE_BREAKS)
def test_malformed_zsre_names_file_index_field(
        organism_files: dict[str, pathlib.Path], tmp_path: pathlib.Path, kind: str, field: str,
        value: Any, message: str) -> None:
    records = copy.deepcopy(_raw(organism_files["zsre"]))
    (_pop if kind == "missing" else _set)(records[5], field, *([] if kind == "missing" else
                                                               [value]))
    path = _write(tmp_path, records)
    with pytest.raises(DatasetError) as error:
        read_zsre(path)
    text = str(error.value)
    assert str(path) in text and f"record 5, field {field!r}" in text and message in text


def test_every_problem_is_collected_before_raising(
        organism_files: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    records = copy.deepcopy(_raw(organism_files["counterfact"]))
    del records[1]["requested_rewrite"]["prompt"]
    records[4]["generation_prompts"] = ["fine", 7]
    records[6] = "not an object"
    with pytest.raises(DatasetError) as error:
        read_counterfact(_write(tmp_path, records))
    assert [(p.index, p.field) for p in error.value.problems] == [
        (1, "requested_rewrite.prompt"), (4, "generation_prompts[1]"), (6, "<record>")]


def test_unreadable_files(tmp_path: pathlib.Path) -> None:
    (tmp_path / "dict.json").write_text('{"a": 1}', encoding="utf-8")
    (tmp_path / "bad.json").write_text("[{", encoding="utf-8")
    with pytest.raises(DatasetError, match="dict.json: expected a JSON list"):
        read_zsre(tmp_path / "dict.json")
    with pytest.raises(DatasetError, match="bad.json: cannot read JSON"):
        read_counterfact(tmp_path / "bad.json")


@pytest.mark.parametrize("fmt", ["counterfact", "zsre", "akew_mquake_cf"])
def test_an_empty_file_is_refused_by_name(tmp_path: pathlib.Path, fmt: str) -> None:
    with pytest.raises(DatasetError, match=r"empty\.json: the file holds no records"):
        read_dataset(_write(tmp_path, []).rename(tmp_path / "empty.json"), fmt)


def test_a_repeated_counterfact_case_id_names_both_records(
        organism_files: dict[str, pathlib.Path], tmp_path: pathlib.Path) -> None:
    records = copy.deepcopy(_raw(organism_files["counterfact"]))[:5]
    records[3]["case_id"] = records[1]["case_id"]
    records[4]["requested_rewrite"]["subject"] = 5  # reported with it, in record order
    with pytest.raises(DatasetError) as error:
        read_counterfact(_write(tmp_path, records))
    assert [(p.index, p.field) for p in error.value.problems] == [
        (3, "case_id"), (4, "requested_rewrite.subject")]
    assert f"duplicate id {records[1]['case_id']!r} (first in record 1)" in str(error.value)
