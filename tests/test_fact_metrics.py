"""The fact-level long-form metric on hand-made answers, and the organism's side files it reads."""

from __future__ import annotations

import json
import pathlib

import pytest

from keedit_jax.data import DatasetError, read_editevery, read_unkebench
from keedit_jax.eval.fact_metrics import (
    FactChange,
    fact_scores,
    mean_available,
    read_fact_sheets,
    side_file,
    states,
)
from keedit_jax.organism import build_world, write_benchmarks

FACTS = (FactChange("P106", "teacher", "tailor"), FactChange("P19", "Hatais", "Tarkindwick"),
         FactChange("P1303", "cello", "cello"))


def test_states_whole_words_case_insensitively() -> None:
    assert states("By profession, Thorkin is a Tailor.", "tailor")
    assert not states("Thorkin is a tailorsmith.", "tailor")
    assert not states("Born in Kara.", "Karaport") and not states("Born in Karaport.", "Kara")
    assert states("Lives in Port Mira", "Port Mira")


def test_a_value_inside_a_longer_value_is_not_stated() -> None:
    vocabulary = {"Mira", "Port Mira"}
    assert not states("She moved to Port Mira.", "Mira", vocabulary)
    assert states("She moved to Port Mira, then to Mira.", "Mira", vocabulary)
    assert states("She moved to Port Mira.", "Port Mira", vocabulary)
    assert states("She moved to Port Mira.", "Mira")  # without the vocabulary it is


def test_new_value_stated_old_leaked_unchanged_kept() -> None:
    answer = "Thorkin is a tailor, was born in Hatais and plays the cello."
    assert fact_scores(answer, FACTS) == {"fact_efficacy": 0.5, "fact_leak": 0.5,
                                          "fact_kept": 1.0}
    assert fact_scores("Thorkin is a teacher.", FACTS) == {
        "fact_efficacy": 0.0, "fact_leak": 0.5, "fact_kept": 0.0}
    both = "Thorkin was a teacher and is now a tailor, from Tarkindwick; plays the cello."
    assert fact_scores(both, FACTS) == {"fact_efficacy": 1.0, "fact_leak": 0.5,
                                        "fact_kept": 1.0}


def test_empty_fact_sets_are_absent_and_means_skip_them() -> None:
    assert fact_scores("plays the cello", FACTS[2:]) == {"fact_kept": 1.0}
    assert fact_scores("a tailor", FACTS[:1]) == {"fact_efficacy": 1.0, "fact_leak": 0.0}
    assert fact_scores("anything", ()) == {}
    rows = [{"fact_kept": 1.0}, {"fact_efficacy": 1.0, "fact_leak": 0.0},
            {"fact_efficacy": 0.0, "fact_leak": 1.0, "fact_kept": 0.0}]
    assert mean_available(rows) == {"fact_kept": 0.5, "fact_efficacy": 0.5, "fact_leak": 0.5}
    with pytest.raises(ValueError, match="no scores"):
        mean_available([])


def test_organism_side_files_match_their_records(tmp_path: pathlib.Path) -> None:
    world = build_world(0, 8)
    paths = write_benchmarks(world, tmp_path)
    for name, read in (("unkebench", read_unkebench), ("editevery", read_editevery)):
        records = read(paths[name])  # the published format, through the project's readers
        sheets = read_fact_sheets(side_file(paths[name]))
        assert side_file(paths[name]) == paths[f"{name}_facts"]
        assert set(sheets) == {r.case_id for r in records}
        for record in records:
            facts = sheets[record.case_id]
            changed = [f for f in facts if f.changed]
            assert len(changed) > len(facts) - len(changed) >= 1  # mostly new, some kept
            scores = fact_scores(record.answer, facts)
            assert scores == {"fact_efficacy": 1.0, "fact_leak": 0.0, "fact_kept": 1.0}
            for i, sub_answer in enumerate(record.sub_answers):
                assert states(sub_answer, facts[i].new)


def test_malformed_side_file_names_file_and_record(tmp_path: pathlib.Path) -> None:
    path = tmp_path / "x.facts.json"
    path.write_text(json.dumps([{"id": 0, "facts": []}, {"id": 1, "facts": [{"old": "a"}]}]))
    with pytest.raises(DatasetError, match=r"x\.facts\.json.*record 1"):
        read_fact_sheets(path)
