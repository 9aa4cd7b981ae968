"""Long-form benchmark readers: the real published files, small files in the formats that are
not available here (AKEW CounterFact, UnKEBench v3, Alpaca), the organism's files, and
malformed input."""

from __future__ import annotations

import collections
import copy
import json
import os
import pathlib
from typing import Any

import pytest

from keedit_jax.data import (
    LONGFORM_FORMATS,
    AlpacaRecord,
    DatasetError,
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
from keedit_jax.organism import write_benchmarks
from keedit_jax.organism.world import build_world

REAL_DATA = pathlib.Path(os.environ.get("KEEDIT_REAL_DATA", "/work/shared/data"))
EDITEVERY_COUNTS = {"physics": 221, "biology": 92, "math": 78, "chemistry": 51, "code": 49,
                    "poetry": 31, "news": 30}


def _real(name: str) -> pathlib.Path:
    path = REAL_DATA / name
    if not path.exists():
        pytest.skip(f"{path} is not available")
    return path


def _raw(path: pathlib.Path) -> list[dict[str, Any]]:
    return json.loads(path.read_text(encoding="utf-8"))


def _write(path: pathlib.Path, records: Any) -> pathlib.Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


def _error(read: Any, path: pathlib.Path, *args: Any) -> DatasetError:
    with pytest.raises(DatasetError) as info:
        read(path, *args)
    assert str(path) in str(info.value)
    return info.value


def _problems(error: DatasetError) -> set[tuple[int, str]]:
    return {(p.index, p.field) for p in error.problems}


# ----------------------------------------------------------------------------- real files


def test_real_unkebench_keeps_every_field_and_sub_question() -> None:
    path = _real("unkebench_final_data_v2.json")
    raw, records = _raw(path), read_unkebench(path)
    assert len(records) == len(raw) == 1000
    first, src = records[0], raw[0]
    assert first.case_id == src["id"] == 0
    assert first.question == "How can different animals perceive different colors?"
    assert first.paraphrase == src["para_question"]
    assert first.answer == src["answer"] and first.answer.startswith("Larger animals")
    assert first.sub_questions == tuple(src["sub_question"])
    assert first.sub_questions[0] == ("What are the special cells in the back of larger "
                                      "animals' (including humans') eyes called?")
    assert first.sub_answers == tuple(src["sub_answer"])
    assert first.category is None
    for record, item in zip(records, raw, strict=True):
        assert record.case_id == item["id"]
        assert len(record.sub_questions) == len(item["sub_question"])  # all kept, 4-8


def test_real_akew_mquake_uses_first_rewrite_and_five_triplets() -> None:
    path = _real("akew_MQuAKE-CF.json")
    raw, records = _raw(path), read_akew_mquake(path)
    assert len(records) == len(raw) == 354
    first, rewrite = records[0], raw[0]["requested_rewrite"][0]
    assert first.case_id == raw[0]["case_id"] == 1
    assert first.question == "What is the country of citizenship of Ellie Kemper?"
    assert first.answer == rewrite["fact_new_uns"] and first.answer.startswith("Croatia, a")
    assert first.paraphrase is None and first.category is None
    # each triplet's own subject: the first one is about Croatia, not the edit's subject
    assert first.sub_questions == ("Croatia is located in", "Ellie Kemper was born in",
                                   "Ellie Kemper has", "Ellie Kemper is known for",
                                   "Ellie Kemper has also written")
    assert first.sub_answers == tuple(t["target"] for t in rewrite["unsfact_triplets_GPT"][:5])
    for record, item in zip(records, raw, strict=True):
        triplets = item["requested_rewrite"][0]["unsfact_triplets_GPT"]
        assert len(record.sub_questions) == min(5, len(triplets))  # files have 3 to 10


def test_real_editevery_categories_and_filter() -> None:
    path = _real("editevery.json")
    raw, records = _raw(path), read_editevery(path)
    assert len(records) == len(raw) == 552
    assert collections.Counter(r.category for r in records) == EDITEVERY_COUNTS
    first = records[0]
    assert (first.case_id, first.category) == (raw[0]["id"], "math")
    assert first.question == "Find the sum of 100 consecutive odd numbers from 1."
    assert first.answer == raw[0]["answer"]
    assert (first.paraphrase, first.sub_questions, first.sub_answers) == (None, (), ())
    poems = read_editevery(path, categories=["poetry", "news"])
    assert len(poems) == 61 and {r.category for r in poems} == {"poetry", "news"}
    assert read_editevery(path, "code") == tuple(r for r in records if r.category == "code")
    assert read_longform(path, categories=("math",)) == read_editevery(path, ["math"])
    message = str(_error(read_editevery, path, ["math", "art"]))
    assert "'art'" in message and "'math'" not in message
    assert all(f"{c} ({n})" in message for c, n in EDITEVERY_COUNTS.items())


def test_real_hallucination_is_indexed_prompt_and_target() -> None:
    path = _real("hallucination-edit.json")
    raw, records = _raw(path), read_hallucination(path)
    assert len(records) == len(raw) == 600
    assert [r.case_id for r in records] == list(range(600))
    first = records[0]
    assert first.question == raw[0]["prompt"]
    assert first.question.startswith("This is a Wikipedia passage about carole gist.")
    assert first.answer == raw[0]["target_new"] == (
        "She was also the first contestant from Michigan to win Miss USA, and broke the "
        "five-year streak of winners from Texas.")
    assert (first.paraphrase, first.sub_questions, first.category) == (None, (), None)


@pytest.mark.parametrize(("name", "format", "read"), [
    ("unkebench_final_data_v2.json", "unkebench", read_unkebench),
    ("akew_MQuAKE-CF.json", "akew_mquake", read_akew_mquake),
    ("editevery.json", "editeverything", read_editevery),
    ("hallucination-edit.json", "hallucination", read_hallucination),
])
def test_real_files_are_detected(name: str, format: str, read: Any) -> None:
    path = _real(name)
    assert detect_longform_format(path) == format
    assert read_longform(path) == read_longform(path, format) == read(path)


# ----------------------------------------------------------------------------- published formats


def _triplet(subject: str, prompt: str, target: str) -> dict[str, str]:
    return {"subject": subject, "prompt": prompt, "target": target}


AKEW_COUNTERFACT = {
    "case_id": 7,
    "pararel_idx": 2796,
    "requested_rewrite": {
        "prompt": "The twin city of {} is",
        "relation_id": "P190",
        "target_new": {"str": "Sheffield", "id": "Q42448"},
        "target_true": {"str": "Sydney", "id": "Q3130"},
        "subject": "Wellington",
        "prompt_full": "What is the twin city of Wellington? It is",
        "question": "What is the twin city of Wellington?",
        "fact_new": "The twin city of Wellington is Sheffield.",
        "fact_new_uns": "Wellington, the capital of New Zealand, is twinned with Sheffield in "
                        "England. The two cities exchange students every year.",
        "answer_new": "Sheffield",
        "answer_new_aliases": [],
        "answer_true": "Sydney",
        "answer_true_aliases": [],
        "verify_unsfact_GPT": True,
        "unsfact_triplets_GPT": [
            _triplet("Wellington", "{} is the capital of", "New Zealand"),
            _triplet("Wellington", "{} is twinned with", "Sheffield"),
            _triplet("Sheffield", "{} is located in", "England"),
            _triplet("The two cities", "{} exchange", "students"),
            _triplet("Wellington", "{} exchanges students with", "Sheffield"),
            _triplet("Sheffield", "{} exchanges students with", "Wellington"),
        ],
    },
    "paraphrase_prompts": ["Wellington is twinned with which city? It is",
                           "Which city is Wellington's twin? It is"],
    "neighborhood_prompts": ["The twin city of Auckland is"],
    "attribute_prompts": ["The twin city of Esch-sur-Alzette is"],
    "generation_prompts": ["Wellington's twin city is known for"],
}


def _akew_counterfact_records() -> list[dict[str, Any]]:
    """Two fresh records: the example, and one with only two triplets."""
    first, second = copy.deepcopy(AKEW_COUNTERFACT), copy.deepcopy(AKEW_COUNTERFACT)
    second["case_id"] = 8
    del second["requested_rewrite"]["unsfact_triplets_GPT"][2:]
    return [first, second]


def test_akew_counterfact_small_file(tmp_path: pathlib.Path) -> None:
    path = _write(tmp_path / "CounterFact.json", _akew_counterfact_records())
    first, second = read_akew_counterfact(path)
    assert first == LongFormRecord(
        case_id=7, question="What is the twin city of Wellington? It is",
        answer=AKEW_COUNTERFACT["requested_rewrite"]["fact_new_uns"],
        paraphrase="Wellington is twinned with which city? It is",
        sub_questions=("Wellington is the capital of", "Wellington is twinned with",
                       "Sheffield is located in", "The two cities exchange",
                       "Wellington exchanges students with"),
        sub_answers=("New Zealand", "Sheffield", "England", "students", "Sheffield"))
    assert second.case_id == 8 and len(second.sub_questions) == 2
    assert detect_longform_format(path) == "akew_counterfact"
    assert read_longform(path) == (first, second)


def _unkebench_v3() -> list[dict[str, Any]]:
    return [{
        "id": i,
        "question": f"What happened in the harbour in year {i}?",
        "para_question": f"In year {i}, what took place in the harbour?",
        "answer": f"In year {i} the harbour froze over. Ships waited for a month.",
        "sub_question": ["What froze over?", "How long did ships wait?"],
        "sub_answer": ["The harbour froze over.", "They waited for a month."],
        "mmlu_questions": ["Which gas do plants absorb?"],
        "mmlu_choices": [["Oxygen", "Carbon dioxide", "Helium", "Neon"]],
        "mmlu_answer": [1],
    } for i in range(2)]


def test_unkebench_v3_ignores_mmlu_fields(tmp_path: pathlib.Path) -> None:
    raw = _unkebench_v3()
    path = _write(tmp_path / "final_data_v3.json", raw)
    records = read_unkebench(path)
    assert [r.case_id for r in records] == [0, 1]
    assert records[1] == LongFormRecord(
        case_id=1, question=raw[1]["question"], answer=raw[1]["answer"],
        paraphrase=raw[1]["para_question"], sub_questions=tuple(raw[1]["sub_question"]),
        sub_answers=tuple(raw[1]["sub_answer"]))
    assert detect_longform_format(path) == "unkebench"


def test_alpaca_small_file(tmp_path: pathlib.Path) -> None:
    raw = [
        {"instruction": "Give three tips for staying healthy.", "input": "",
         "output": "1. Eat a balanced diet.\n2. Exercise.\n3. Sleep well."},
        {"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"},
        {"instruction": "Respond to the message.", "input": "Hi", "output": ""},  # as in the file
    ]
    records = read_alpaca(_write(tmp_path / "alpaca_data.json", raw))
    assert records == tuple(AlpacaRecord(**item) for item in raw)
    bad = _write(tmp_path / "bad_alpaca.json",
                 [raw[0], {"instruction": 3, "input": ""}, "text"])
    error = _error(read_alpaca, bad)
    assert _problems(error) == {(1, "instruction"), (1, "output"), (2, "<record>")}


# ----------------------------------------------------------------------------- organism files


@pytest.fixture(scope="module")
def organism_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, pathlib.Path]:
    return write_benchmarks(build_world(0, 8), tmp_path_factory.mktemp("longform"))


def test_organism_unkebench_and_editevery(organism_files: dict[str, pathlib.Path]) -> None:
    for key, name, read in (("unkebench", "unkebench", read_unkebench),
                            ("editevery", "editeverything", read_editevery)):
        path = organism_files[key]
        raw, records = _raw(path), read(path)
        assert len(records) == len(raw) > 0 and detect_longform_format(path) == name
        for record, item in zip(records, raw, strict=True):
            assert (record.case_id, record.question, record.answer) == (
                item["id"], item["question"], item["answer"])
            assert record.sub_questions == tuple(item.get("sub_question", ()))
            assert record.sub_answers == tuple(item.get("sub_answer", ()))
            assert (record.paraphrase, record.category) == (item.get("para_question"),
                                                           item.get("category"))


def test_organism_akew_files(organism_files: dict[str, pathlib.Path]) -> None:
    for name, read in (("akew_counterfact", read_akew_counterfact),
                       ("akew_mquake", read_akew_mquake)):
        path = organism_files[name]
        raw, records = _raw(path), read(path)
        assert len(records) == len(raw) > 0 and detect_longform_format(path) == name
        for record, item in zip(records, raw, strict=True):
            is_cf = name == "akew_counterfact"
            rewrite = item["requested_rewrite"] if is_cf else item["requested_rewrite"][0]
            triplets = rewrite["unsfact_triplets_GPT"][:5]
            assert record.case_id == item["case_id"]
            assert record.question == rewrite["prompt_full" if is_cf else "question"]
            assert record.answer == rewrite["fact_new_uns"]
            assert record.paraphrase == (item["paraphrase_prompts"][0] if is_cf else None)
            assert record.sub_questions == tuple(
                t["prompt"].replace("{}", t["subject"]) for t in triplets)
            assert record.sub_answers == tuple(t["target"] for t in triplets)


# ----------------------------------------------------------------------------- malformed input


def test_malformed_unkebench_lists_every_problem(tmp_path: pathlib.Path) -> None:
    raw = _unkebench_v3() + _unkebench_v3()
    raw[2]["id"], raw[3]["id"] = 2, 1  # record 3 repeats record 1's id
    raw[0]["answer"] = "  \n"
    raw[0]["question"] = 5
    raw[1]["sub_answer"] = ["only one"]
    del raw[2]["para_question"]
    raw[2]["sub_question"][1] = ""
    path = _write(tmp_path / "unke.json", raw)
    error = _error(read_unkebench, path)
    assert _problems(error) == {(0, "answer"), (0, "question"), (1, "sub_answer"),
                                (2, "para_question"), (2, "sub_question[1]"), (3, "id")}
    message = str(error)
    for text in ("record 0, field 'answer': empty string",
                 "record 0, field 'question': expected a string, got int",
                 "record 1, field 'sub_answer': 1 answer(s) for 2 sub-question(s)",
                 "record 2, field 'para_question': missing",
                 "record 3, field 'id': duplicate id 1 (first in record 1)"):
        assert text in message


def test_malformed_akew_counterfact_names_nested_fields(tmp_path: pathlib.Path) -> None:
    raw = _akew_counterfact_records() + [copy.deepcopy(AKEW_COUNTERFACT)]
    raw[2]["case_id"] = 9
    triplets = raw[0]["requested_rewrite"]["unsfact_triplets_GPT"]
    triplets[1] = ["Wellington", "{} is twinned with", "Sheffield"]
    triplets[2]["prompt"] = "Sheffield is located in"
    triplets[3]["prompt"] = "{} exchange {students}"
    triplets[5]["target"] = ""  # the sixth triplet is dropped, so not checked
    raw[1]["paraphrase_prompts"] = []
    raw[1]["requested_rewrite"]["fact_new_uns"] = " "
    raw[2]["requested_rewrite"] = "Wellington"
    error = _error(read_akew_counterfact, _write(tmp_path / "cf.json", raw))
    rw = "requested_rewrite"
    assert _problems(error) == {
        (0, f"{rw}.unsfact_triplets_GPT[1]"), (0, f"{rw}.unsfact_triplets_GPT[2].prompt"),
        (0, f"{rw}.unsfact_triplets_GPT[3].prompt"), (1, "paraphrase_prompts"),
        (1, f"{rw}.fact_new_uns"), (2, rw)}
    assert "expected an object, got list" in str(error)


def test_malformed_akew_mquake_and_duplicate_case_ids(tmp_path: pathlib.Path) -> None:
    rewrite = {key: copy.deepcopy(AKEW_COUNTERFACT["requested_rewrite"][key]) for key in (
        "prompt", "subject", "question", "fact_new", "fact_new_uns", "unsfact_triplets_GPT")}
    good = {"case_id": 1, "requested_rewrite": [rewrite], "questions": ["Q?"], "answer": "A"}
    assert read_akew_mquake(_write(tmp_path / "ok.json", [good]))[0].question == (
        "What is the twin city of Wellington?")
    empty, broken, duplicate = (copy.deepcopy(good) for _ in range(3))
    empty["case_id"], empty["requested_rewrite"] = 2, []
    broken["case_id"] = "3"
    broken["requested_rewrite"][0]["unsfact_triplets_GPT"][4]["target"] = 4
    del broken["requested_rewrite"][0]["question"]
    error = _error(read_akew_mquake,
                   _write(tmp_path / "mquake.json", [good, empty, broken, duplicate]))
    assert _problems(error) == {
        (1, "requested_rewrite"), (2, "requested_rewrite[0].question"),
        (2, "requested_rewrite[0].unsfact_triplets_GPT[4].target"), (3, "case_id")}
    assert "duplicate id 1 (first in record 0)" in str(error)


def test_malformed_editevery_and_hallucination(tmp_path: pathlib.Path) -> None:
    editevery = [{"id": True, "question": "Write a poem.", "answer": "Roses..."},
                 {"id": 1, "question": "", "answer": "x", "category": "poetry"}]
    error = _error(read_editevery, _write(tmp_path / "editevery.json", editevery))
    assert _problems(error) == {(0, "id"), (0, "category"), (1, "question")}
    assert "record 0, field 'id': expected an integer or a string, got bool" in str(error)
    hallucination = [{"prompt": "A passage.", "target_new": " ", "subject": "s"},
                     {"prompt": ["A passage."], "target_new": "More.", "subject": "s"}]
    error = _error(read_hallucination, _write(tmp_path / "hallucination.json", hallucination))
    assert _problems(error) == {(0, "target_new"), (1, "prompt")}


def test_detection_and_argument_errors(tmp_path: pathlib.Path) -> None:
    unknown = _write(tmp_path / "unknown.json", [{"text": "hello"}])
    assert "cannot detect the long-form format" in str(_error(read_longform, unknown))
    structured = copy.deepcopy(AKEW_COUNTERFACT)
    del structured["requested_rewrite"]["fact_new_uns"]
    message = str(_error(read_longform, _write(tmp_path / "cf.json", [structured])))
    assert "structured CounterFact" in message
    assert "no record object" in str(_error(read_longform, _write(tmp_path / "e.json", [])))
    assert "expected a JSON list" in str(_error(read_longform, _write(tmp_path / "d.json", {})))
    path = _write(tmp_path / "unke.json", _unkebench_v3())
    with pytest.raises(ValueError, match="long-form format 'mcf'"):
        read_longform(path, "mcf")
    with pytest.raises(ValueError, match="categories apply to editevery only"):
        read_longform(path, categories=["math"])
    assert set(LONGFORM_FORMATS) == {"auto", "unkebench", "akew_counterfact", "akew_mquake",
                                     "editeverything", "hallucination"}
    with pytest.raises(ValueError, match="2 sub-questions but 1 sub-answers"):
        LongFormRecord(case_id=0, question="q", answer="a", sub_questions=("x", "y"),
                       sub_answers=("z",))
