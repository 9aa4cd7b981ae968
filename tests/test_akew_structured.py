"""AKEW MQuAKE-CF under the CounterFact protocol: cases, prompts, answers and neighbourhood
selection on a small file in the published record layout (invented values), malformed
entries, the long-form reading of the same file, and the real file when it is present."""

from __future__ import annotations

import copy
import json
import math
import os
import pathlib
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from keedit_jax.data import (
    CounterFactRecord,
    DatasetError,
    Request,
    detect_format,
    detect_longform_format,
    read_akew_mquake,
    read_akew_mquake_cf,
    read_dataset,
    without_edited_neighbours,
)
from keedit_jax.eval import structured as st
from keedit_jax.flags import DataFlags

REAL_FILE = pathlib.Path(os.environ.get("KEEDIT_REAL_DATA", "/work/shared/data"),
                         "akew_MQuAKE-CF.json")


def _hop(question: str, cloze: str, answer: str) -> dict[str, Any]:
    return {"question": question, "cloze": cloze, "answer": answer, "answer_alias": []}


def _rewrite(prompt: str, relation: str, subject: str, new: str, true: str,
             question: str) -> dict[str, Any]:
    """One `requested_rewrite` entry with every published field (anchors §8)."""
    fact = f"{prompt.format(subject)} {new}."
    return {"prompt": prompt, "relation_id": relation,
            "target_new": {"str": new, "id": f"Q{len(new)}"},
            "target_true": {"str": true, "id": f"Q{len(true)}"},
            "subject": subject, "question": question, "fact_new": fact,
            "fact_new_uns": f"{fact} Long text about {subject} and {new}.",
            "verify_unsfact_GPT": True,
            "unsfact_triplets_GPT": [{"subject": subject, "prompt": prompt, "target": new}]}


CITIZEN = "{} is a citizen of"
ALICE = _rewrite(CITIZEN, "P27", "Alice Vorn", "Freedonia", "Sylvania",
                 "What is the country of citizenship of Alice Vorn?")


def _record(case_id: int, rewrites: list[dict[str, Any]]) -> dict[str, Any]:
    """A record in the published layout: rewrites plus MQuAKE's multi-hop fields."""
    first = rewrites[0]
    return {
        "case_id": case_id, "requested_rewrite": rewrites,
        "questions": [f"Who leads the country of {first['subject']}?"] * 3,
        "answer": "Queen Mab", "answer_alias": ["Mab"], "new_answer": "Rufus T.",
        "new_answer_alias": ["Rufus"],
        "single_hops": [_hop(first["question"], first["prompt"].format(first["subject"]),
                             first["target_true"]["str"])],
        "new_single_hops": [_hop(first["question"], first["prompt"].format(first["subject"]),
                                 first["target_new"]["str"])],
        "orig": {"triples": [["Q1", first["relation_id"], "Q2"]],
                 "triples_labeled": [[first["subject"], "citizen", "Sylvania"]],
                 "new_triples": [["Q1", first["relation_id"], "Q3"]],
                 "new_triples_labeled": [[first["subject"], "citizen", "Freedonia"]],
                 "edit_triples": [["Q1", first["relation_id"], "Q3"]]},
    }


RECORDS = [
    _record(1, [ALICE, _rewrite("The head of state of {} is", "P35", "Freedonia", "Rufus T.",
                                "Queen Mab", "Who is the head of state of Freedonia?")]),
    _record(2, [copy.deepcopy(ALICE),  # MQuAKE chains share single-hop edits: dropped
                _rewrite(CITIZEN, "P27", "Bob Lenk", "Sylvania", "Freedonia",
                         "What is the country of citizenship of Bob Lenk?")]),
    _record(3, [_rewrite(CITIZEN, "P27", "Carla Munt", "Ruritania", "Sylvania",
                         "What is the country of citizenship of Carla Munt?"),
                _rewrite(CITIZEN, "P27", "Dan Oby", "Freedonia", "Ruritania",
                         "What is the country of citizenship of Dan Oby?"),
                _rewrite("{} was born in", "P19", "Alice Vorn", "Zenda", "Strelsau",
                         "Where was Alice Vorn born?")]),
]
# The distinct cases, in order: 0 Alice/P27, 1 Freedonia/P35, 2 Bob/P27, 3 Carla/P27,
# 4 Dan/P27, 5 Alice/P19. With 6 cases each walk starts 3 cases on.
IDS = ("1:0", "1:1", "2:1", "3:0", "3:1", "3:2")


def _write(path: pathlib.Path, records: Any) -> pathlib.Path:
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1), encoding="utf-8")
    return path


@pytest.fixture
def small_file(tmp_path: pathlib.Path) -> pathlib.Path:
    return _write(tmp_path / "MQuAKE-CF.json", RECORDS)


def _neighbours(record: CounterFactRecord) -> list[tuple[str, str, str]]:
    return list(zip(record.neighborhood_prompts, record.neighborhood_answers,
                    record.neighborhood_subjects, strict=True))


def test_cases_prompts_and_answers(small_file: pathlib.Path) -> None:
    cases = read_akew_mquake_cf(small_file, neighbours=2)
    assert tuple(c.case_id for c in cases) == IDS
    first = cases[0]
    assert first.request == Request(case_id="1:0", prompt=CITIZEN, subject="Alice Vorn",
                                    target_new="Freedonia", target_true="Sylvania")
    assert (first.relation_id, first.target_new_id, first.target_true_id) == ("P27", "Q9", "Q8")
    assert first.paraphrase_prompts == ("What is the country of citizenship of Alice Vorn?",)
    assert first.generation_prompts == ("Alice Vorn is a citizen of",)
    assert first.attribute_prompts == () and first.pararel_idx is None
    assert cases[5].request.filled_prompt == "Alice Vorn was born in"
    assert cases[5].paraphrase_prompts == ("Where was Alice Vorn born?",)


def test_neighbourhood_selection(small_file: pathlib.Path) -> None:
    cases = {c.case_id: c for c in read_akew_mquake_cf(small_file, neighbours=2)}
    # same relation first, from 3 cases on: Carla, Dan
    assert _neighbours(cases["1:0"]) == [
        ("Carla Munt is a citizen of", "Sylvania", "Carla Munt"),
        ("Dan Oby is a citizen of", "Ruritania", "Dan Oby")]
    # Bob -> Sylvania: Alice and Carla are truly Sylvanian (a tie), so Dan, then any relation
    assert _neighbours(cases["2:1"]) == [
        ("Dan Oby is a citizen of", "Ruritania", "Dan Oby"),
        ("Alice Vorn was born in", "Strelsau", "Alice Vorn")]
    # no other case has P35: any relation, in walk order
    assert [s for _, _, s in _neighbours(cases["1:1"])] == ["Dan Oby", "Alice Vorn"]
    # Dan -> Freedonia: Bob is truly Freedonian (skipped); the walk wraps round to Alice
    assert [s for _, _, s in _neighbours(cases["3:1"])] == ["Carla Munt", "Alice Vorn"]
    # Alice's other edit never takes Alice's prompts
    assert [s for _, _, s in _neighbours(cases["3:2"])] == ["Bob Lenk", "Carla Munt"]
    # a subject is taken once: Alice's second prompt is passed over for Bob
    wide = {c.case_id: c for c in read_akew_mquake_cf(small_file, neighbours=3)}
    assert [s for _, _, s in _neighbours(wide["1:1"])] == ["Dan Oby", "Alice Vorn", "Bob Lenk"]
    for case in read_akew_mquake_cf(small_file):  # default 5: as many as the rules allow
        subjects = [s.casefold() for s in case.neighborhood_subjects]
        assert case.request.subject.casefold() not in subjects
        assert len(set(subjects)) == len(subjects)
        assert case.request.target_new not in case.neighborhood_answers
        assert case.neighborhood_targets == case.neighborhood_answers


def test_edited_neighbours_are_dropped(small_file: pathlib.Path) -> None:
    case = read_akew_mquake_cf(small_file, neighbours=2)[0]
    kept = without_edited_neighbours(case, ["dan oby", "Bob Lenk"])
    assert _neighbours(kept) == [("Carla Munt is a citizen of", "Sylvania", "Carla Munt")]
    assert without_edited_neighbours(case, ["Zed"]) is case
    from keedit_jax.methods.run_structured import unedited_neighbours

    cases = list(read_akew_mquake_cf(small_file, neighbours=2))
    batches = unedited_neighbours([cases[:4], cases[4:]])
    assert [s for _, _, s in _neighbours(batches[0][0])] == ["Dan Oby"]  # Carla edited with it
    assert [s for _, _, s in _neighbours(batches[1][0])] == ["Carla Munt"]  # Alice edited too
    assert batches[1][1] == cases[5]  # Alice/P19's neighbours Bob, Carla are not edited with it


def test_formats_and_the_long_form_reading(small_file: pathlib.Path) -> None:
    assert detect_format(small_file) == "akew_mquake_cf"
    assert read_dataset(small_file) == read_dataset(small_file, "akew_mquake_cf")
    assert read_dataset(small_file, "akew_mquake_cf") == read_akew_mquake_cf(small_file)
    # the same file still reads long-form, and --dataset_format=auto still sends it there
    assert detect_longform_format(small_file) == "akew_mquake"
    assert [r.question for r in read_akew_mquake(small_file)] == [
        ALICE["question"], ALICE["question"], RECORDS[2]["requested_rewrite"][0]["question"]]
    from keedit_jax.methods import _is_longform

    assert _is_longform(DataFlags(dataset=str(small_file)))
    assert not _is_longform(DataFlags(dataset=str(small_file), dataset_format="akew_mquake_cf"))


def test_neighbourhood_proxy_is_scored_against_each_prompts_answer(
        small_file: pathlib.Path) -> None:
    case = read_akew_mquake_cf(small_file, neighbours=2)[0]  # new object Freedonia

    def score(pairs: Sequence[tuple[str, str]]) -> list[st.TargetScore]:
        # the neighbour's own true object beats Freedonia on Carla's prompt, not on Dan's
        probs = {("Carla Munt is a citizen of", " Sylvania"): 0.6,
                 ("Dan Oby is a citizen of", " Ruritania"): 0.1}
        return [st.TargetScore(target_ids=np.array([1]),
                               logprobs=np.log([probs.get(pair, 0.3)]),
                               predicted=np.array([1])) for pair in pairs]

    metrics = st.evaluate_counterfact(case, score).metrics()
    assert metrics["neighborhood_success"] == 0.5
    assert metrics["neighborhood_diff"] == pytest.approx(((0.6 - 0.3) + (0.1 - 0.3)) / 2)
    assert not math.isnan(metrics["rewrite_success"])


def test_malformed_entries_name_file_record_and_field(tmp_path: pathlib.Path) -> None:
    bad = copy.deepcopy(RECORDS)
    del bad[1]["requested_rewrite"][1]["target_true"]["str"]
    bad[2]["requested_rewrite"][0]["prompt"] = "Carla Munt is a citizen of"
    bad[2]["requested_rewrite"][2]["question"] = 7
    bad.append({**copy.deepcopy(RECORDS[0]), "case_id": 3})
    bad.append({**copy.deepcopy(RECORDS[0]), "case_id": 9, "requested_rewrite": []})
    bad.append({**copy.deepcopy(RECORDS[0]), "case_id": 10, "requested_rewrite": ALICE})
    path = _write(tmp_path / "bad.json", bad)
    with pytest.raises(DatasetError) as info:
        read_akew_mquake_cf(path)
    error = info.value
    assert {(p.index, p.field) for p in error.problems} == {
        (1, "requested_rewrite[1].target_true.str"), (2, "requested_rewrite[0].prompt"),
        (2, "requested_rewrite[2].question"), (3, "case_id"), (4, "requested_rewrite"),
        (5, "requested_rewrite")}
    message = str(error)
    assert str(path) in message
    assert "record 1, field 'requested_rewrite[1].target_true.str': missing" in message
    assert "duplicate id 3 (first in record 2)" in message
    with pytest.raises(ValueError, match="neighbourhood prompts"):
        CounterFactRecord(request=Request(case_id=0, prompt=CITIZEN, subject="A",
                                          target_new="B"),
                          relation_id="P27", pararel_idx=None, target_new_id="Q1",
                          target_true_id="Q2", paraphrase_prompts=(),
                          neighborhood_prompts=("x",), neighborhood_answers=("a", "b"),
                          attribute_prompts=(), generation_prompts=())


def test_real_file_reads_into_its_distinct_rewrites() -> None:
    if not REAL_FILE.exists():
        pytest.skip(f"{REAL_FILE} is not available")
    raw = json.loads(REAL_FILE.read_text(encoding="utf-8"))
    cases = read_akew_mquake_cf(REAL_FILE)
    assert len(raw) == 354 and sum(len(r["requested_rewrite"]) for r in raw) == 436
    assert len(cases) == 337 and len({c.case_id for c in cases}) == 337
    assert all(len(c.neighborhood_prompts) == 5 for c in cases)
    first = cases[0]
    assert first.case_id == "1:0" and first.request.filled_prompt == "Ellie Kemper is a citizen of"
    assert (first.request.target_new, first.request.target_true) == (
        "Croatia", "United States of America")
    assert first.paraphrase_prompts == ("What is the country of citizenship of Ellie Kemper?",)
    assert len(read_akew_mquake(REAL_FILE)) == 354  # the long-form reading is unchanged


@pytest.mark.slow
def test_structured_run_on_the_small_file(tmp_path: pathlib.Path, small_file: pathlib.Path,
                                          tiny_checkpoint: Any, tiny_tokenizer_dir: Any) -> None:
    from test_main import model_directory, run_main, varied_text

    model = model_directory(tmp_path, tiny_checkpoint("llama"), tiny_tokenizer_dir)
    text = varied_text(tmp_path, "Alice Bob Carla Dan is a citizen of born in "
                                 "Freedonia Sylvania the head")
    out = tmp_path / "out"
    result = run_main(f"--model={model}", "--method=memit", f"--dataset={small_file}",
                      "--dataset_format=akew_mquake_cf", "--num_edits=4",
                      "--edit_batch_size=2", "--layers=0,1", "--v_num_grad_steps=3",
                      f"--stats_source={text}", "--stats_samples=64", "--max_new_tokens=4",
                      f"--output_dir={out}", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [c["case_id"] for c in results["cases"]] == list(IDS[:4])
    post = results["cases"][0]["post"]
    assert {"rewrite_success", "paraphrase_success", "neighborhood_success",
            "ngram_entropy"} <= set(post)
