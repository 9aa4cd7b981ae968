"""The long-form headline: fact scores first, a Δ column, one verdict per group, examples."""

from __future__ import annotations

from keedit_jax.data import LongFormRecord
from keedit_jax.eval.fact_metrics import FactChange
from keedit_jax.methods.run_unstructured import (
    KEPT_SUB,
    FactSheets,
    Query,
    examples,
    group_means,
    queries,
    score,
    table,
    verdicts,
)
from keedit_jax.results import markdown_report, markdown_table

RECORD = LongFormRecord(case_id=7, question="Tell me about Thorkin.",
                        answer="Thorkin is a tailor. Thorkin plays the cello.",
                        paraphrase="Describe Thorkin.",
                        sub_questions=("What does Thorkin work as?", "What does Thorkin play?"),
                        sub_answers=("Thorkin is a tailor.", "Thorkin plays the cello."))
SHEETS = FactSheets({0: (FactChange("P106", "teacher", "tailor"),
                         FactChange("P1303", "cello", "cello"))}, frozenset())
PRE = ["Thorkin is a teacher. Thorkin plays the cello.", "Thorkin is a teacher.",
       "Thorkin is a teacher.", "Thorkin plays the cello."]
POST = ["Thorkin is a tailor. Thorkin plays the cello.", "Thorkin is a tailor, he plays.",
        "Thorkin is a teacher.", "Thorkin plays the drum."]


def _scored(answers: list[str]) -> list[dict]:
    return score(queries([RECORD]), answers, None, SHEETS)


def test_sub_questions_are_scored_on_the_fact_they_ask() -> None:
    asked = queries([RECORD])
    assert [(q.group, q.sub_index) for q in asked] == [("Ori.", -1), ("Para.", -1), ("Sub", 0),
                                                      ("Sub", 1)]
    assert SHEETS.about(asked[3]) == SHEETS.facts[0][1:]
    rows = _scored(POST)
    assert (rows[0]["fact_efficacy"], rows[0]["fact_leak"], rows[0]["fact_kept"]) == (1, 0, 1)
    assert (rows[2]["fact_efficacy"], rows[2]["fact_leak"]) == (0, 1) and "fact_kept" not in rows[2]
    assert rows[3]["fact_kept"] == 0 and "fact_efficacy" not in rows[3]
    means = group_means(rows, [RECORD], {0})
    assert means["Sub"]["fact_efficacy"] == 0 and means["Sub"]["fact_kept"] == 0
    assert means[KEPT_SUB]["fact_kept"] == 0 and "fact_efficacy" not in means[KEPT_SUB]
    assert means["Sub"]["rouge1_recall"] == (rows[2]["rouge1_recall"]
                                             + rows[3]["rouge1_recall"]) / 2


def test_table_leads_with_fact_scores_has_delta_and_verdicts() -> None:
    pre = group_means(_scored(PRE), [RECORD], {0})
    post = group_means(_scored(POST), [RECORD], {0})
    rows = table(pre, post)
    assert rows[0] == {"group": "Ori.", "metric": "fact_efficacy", "pre": 0.0, "post": 100.0,
                       "Δ": 100.0}
    assert [r["metric"] for r in rows[:4]] == ["fact_efficacy", "fact_leak", "fact_kept",
                                               "bleu_char"]
    assert all(abs(r["Δ"] - (r["post"] - r["pre"])) < 1e-9 for r in rows)
    lines = verdicts(rows)
    assert len(lines) == len({r["group"] for r in rows}) == 4
    assert lines[0].startswith("Ori.: new facts stated 0% → 100%, old facts still stated "
                               "100% → 0%, unchanged facts kept 100% → 100%; bleu_char ")
    assert lines[3].startswith(f"{KEPT_SUB}: unchanged facts kept 100% → 0%; rouge1_recall")
    assert "| group | metric | pre | post | Δ |" in markdown_table(rows)
    assert "| +100 |" in markdown_table(rows) and "| -" in markdown_table(rows)


def test_report_shows_verdicts_and_examples_before_and_after() -> None:
    pre, post = _scored(PRE), _scored(POST)
    shown = examples([RECORD], pre, post)
    assert shown == [{"question": RECORD.question, "target": RECORD.answer, "pre": PRE[0],
                      "post": POST[0]}]
    text = markdown_report({"title": "t", "table": [{"a": 1.0}], "verdicts": ["Ori.: x"],
                            "examples": shown})
    assert text.startswith("# t\n") and "- Ori.: x\n" in text
    assert f"Before the edit:\n\n> {PRE[0]}" in text and f"After the edit:\n\n> {POST[0]}" in text
    assert markdown_report({"table": []}).startswith("# keedit_jax results")


def test_no_side_file_means_no_fact_scores() -> None:
    rows = score([Query(0, "Ori.", "q", "a b")], ["a b"], None, FactSheets({}, frozenset()))
    assert not {"fact_efficacy", "fact_leak", "fact_kept"} & set(rows[0])
