"""ZsRE in the MEND split (`zsre_mend_eval.json`, μKE's `zsre_mend_edit.json`; anchors §8).

Record: {"subject", "src", "pred", "rephrase", "alt", "answers": [..], "loc": "nq question: …",
"loc_ans", "cond", ["portability"]}. The request prompt is `src` with the subject replaced by
"{}", exactly as MEMIT's `dsets/zsre.py` builds it (anchors §7.2).

Which answer is the edit target is where the reference code bases disagree (anchors §7.2):
- `target="alt"` (default; EasyEdit, and the MEMIT forks that comment `answers[0]` out): edit
  towards `alt`, with `answers[0]` as the true object. In the organism's files `alt` is the
  counterfactual and `answers` the truth the model already knows, so this is the only choice
  that makes an organism edit measure anything.
- `target="answers"` (MEMIT `kmeng01/memit@80426fd9` and its AlphaEdit/LyapLock forks, and
  the published MEMIT/AlphaEdit ZsRE tables): edit towards `answers[0]`; MEMIT's `target_true`
  is the placeholder "<|endoftext|>", which no ZsRE metric reads, so ours is None.

Specificity prompts (anchors §7.2): MEMIT scores `loc + "?"` followed by " " + `loc_ans`,
one teacher-forced token at a time (`loc_prompt`, `loc_ans`); the question keeps its
"nq question: " prefix, as in MEMIT.
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable
from typing import Literal

from keedit_jax.data._fields import FieldReader, load_records, read_all
from keedit_jax.data.requests import Request

ZsreTarget = Literal["alt", "answers"]
ZSRE_TARGETS: tuple[str, ...] = ("alt", "answers")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZsreRecord:
    """One ZsRE case: the edit request (`case_id` = index in the file, as MEMIT numbers them),
    the paraphrased question and the unrelated NQ question with its answer."""

    request: Request
    rephrase: str
    loc: str
    loc_ans: str
    alt: str
    answers: tuple[str, ...]
    pred: str | None

    @property
    def case_id(self) -> int | str:
        return self.request.case_id

    @property
    def loc_prompt(self) -> str:
        """The specificity prompt, MEMIT's `record["loc"] + "?"`."""
        return self.loc + "?"


def _prompt(reader: FieldReader, src: str, subject: str) -> str:
    """`src` with its subject replaced by "{}"; the subject must occur exactly once."""
    if src and subject and src.count(subject) != 1:
        reader.note("src", f"{src!r} must contain the subject {subject!r} exactly once")
    elif "{" in src or "}" in src:
        reader.note("src", f"{src!r} contains braces, which would break prompt.format")
    return src.replace(subject, "{}")


def _parser(target: ZsreTarget) -> Callable[[FieldReader], ZsreRecord | None]:
    """The record parser for one target convention (module docstring)."""

    def parse(reader: FieldReader) -> ZsreRecord | None:
        subject, src = reader.text("subject"), reader.text("src")
        prompt = _prompt(reader, src, subject)
        alt, answers = reader.text("alt"), reader.texts("answers", minimum=1)
        rephrase, loc, loc_ans = reader.text("rephrase"), reader.text("loc"), reader.text(
            "loc_ans")
        pred = reader.raw("pred", str, optional=True)
        if reader.problems:
            return None
        new, true = (alt, answers[0]) if target == "alt" else (answers[0], None)
        request = Request(case_id=reader.index, prompt=prompt, subject=subject, target_new=new,
                          target_true=true)
        return ZsreRecord(request=request, rephrase=rephrase, loc=loc, loc_ans=loc_ans,
                          alt=alt, answers=answers, pred=pred)

    return parse


def read_zsre(path: str | pathlib.Path, target: ZsreTarget = "alt") -> tuple[ZsreRecord, ...]:
    """Every record of a ZsRE file; DatasetError listing each malformed field.

    `target` picks the edit target convention (see the module docstring): "alt" (EasyEdit,
    default) or "answers" (MEMIT's `answers[0]`).
    """
    if target not in ZSRE_TARGETS:
        raise ValueError(f"zsre target {target!r}: expected one of {ZSRE_TARGETS}")
    return read_all(path, load_records(path), _parser(target))
