"""AKEW MQuAKE-CF read under the CounterFact protocol: each rewrite a `CounterFactRecord`.

The file (`AnyEdit/data/AKEW/MQuAKE-CF.json`, anchors §8) holds real CounterFact-format edits
in each record's `requested_rewrite` list: {"prompt": "{} is a citizen of", "relation_id",
"subject", "target_new": {"str", "id"}, "target_true": {"str", "id"}, "question", "fact_new",
"fact_new_uns", ...}. `longform.read_akew_mquake` reads the same file in the long-form setting
(the first rewrite's `question` -> `fact_new_uns`); this module reads every rewrite as a short
structured edit (`--dataset_format=akew_mquake_cf`):

- Cases: one per distinct rewrite, in file order, id "<case_id>:<index in requested_rewrite>".
  MQuAKE's multi-hop records share single-hop edits (the real file: 436 entries, 337 distinct
  (subject, prompt, target_new)); a repeat is dropped, since it would count one edit twice
  and, in one batch, weigh its key twice in the solve.
- Efficacy: the rewrite prompt -> `target_new` (vs `target_true`), as CounterFact.
- Generalisation: the entry's `question` (the prompt asked as a question) is the one
  paraphrase prompt, scored as CounterFact's paraphrases (EasyEdit's reading of this file also
  uses `question` as the paraphrase; anchors §8).
- Specificity: the file has no neighbourhood prompts, so the proxy is the rewrite prompts of
  `NEIGHBOURS` other cases, each scored against *its own* `target_true` versus this case's
  `target_new` (CounterFact's test: does the new object leak onto unrelated subjects?).
  Neighbours are chosen deterministically: walking the cases cyclically from the one half the
  file away (so the first half of the file, which a run edits, takes its neighbours from the
  other half), take cases of the same relation first, then of any relation, skipping this
  case's subject, subjects already taken, and cases whose true object is this case's new
  object (the comparison would be a tie). `without_edited_neighbours` then drops, per run,
  neighbours whose subject is edited together with the case.
- Fluency: the filled rewrite prompt is the one generation prompt. No attribute prompts and
  no consistency (the snippets are keyed by CounterFact's relation/target ids only).
"""

from __future__ import annotations

import dataclasses
import pathlib
from collections.abc import Callable, Iterable, Sequence

from keedit_jax.data._fields import (
    FieldReader,
    load_records,
    read_all,
    read_case_id,
    read_nested,
)
from keedit_jax.data.counterfact import CounterFactRecord
from keedit_jax.data.requests import Request

NEIGHBOURS = 5  # neighbourhood prompts per case (CounterFact has 10; the file has 337 cases)


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Rewrite:
    """One validated `requested_rewrite` entry, before neighbours are chosen."""

    request: Request
    relation_id: str
    target_new_id: str
    target_true_id: str
    question: str


def _rewrite(case_id: str) -> Callable[[FieldReader], _Rewrite | None]:
    """Parser of one `requested_rewrite` entry (its problems are prefixed by the caller)."""

    def parse(reader: FieldReader) -> _Rewrite | None:
        prompt = reader.text("prompt", template=True)
        fields = {"subject": reader.text("subject"),
                  "target_new": reader.text("target_new.str"),
                  "target_true": reader.text("target_true.str")}
        ids = {key: reader.text(f"{key}.id") for key in ("target_new", "target_true")}
        relation_id, question = reader.text("relation_id"), reader.text("question")
        if reader.problems:
            return None
        return _Rewrite(request=Request(case_id=case_id, prompt=prompt, **fields),
                        relation_id=relation_id, target_new_id=ids["target_new"],
                        target_true_id=ids["target_true"], question=question)

    return parse


def _record(reader: FieldReader) -> list[_Rewrite] | None:
    """Every rewrite of one record, or None once its problems are noted."""
    case_id = read_case_id(reader, "case_id")
    entries = reader.raw("requested_rewrite", list)
    if entries == []:
        reader.note("requested_rewrite", "expected at least 1 item(s), got 0")
    rewrites = [read_nested(reader, f"requested_rewrite[{i}]", entry, _rewrite(f"{case_id}:{i}"))
                for i, entry in enumerate(entries or [])]
    if reader.problems:
        return None
    return [r for r in rewrites if r is not None]


def distinct(rewrites: Iterable[_Rewrite]) -> list[_Rewrite]:
    """The first of each (subject, prompt, target_new): MQuAKE chains repeat single-hop edits."""
    seen: set[tuple[str, str, str]] = set()
    out = []
    for r in rewrites:
        key = (r.request.subject, r.request.prompt, r.request.target_new)
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def neighbour_indices(rewrites: Sequence[_Rewrite], index: int, count: int) -> list[int]:
    """The cases whose prompts are case `index`'s neighbourhood proxy (module docstring)."""
    me = rewrites[index]
    n = len(rewrites)
    order = [(index + n // 2 + step) % n for step in range(n)]
    taken: list[int] = []
    subjects = {me.request.subject.casefold()}
    for same_relation in (True, False):
        for j in order:
            other = rewrites[j]
            if (len(taken) == count or j == index or j in taken
                    or (other.relation_id == me.relation_id) != same_relation
                    or other.request.subject.casefold() in subjects
                    or other.request.target_true == me.request.target_new):
                continue
            taken.append(j)
            subjects.add(other.request.subject.casefold())
    return taken


def _case(rewrites: Sequence[_Rewrite], index: int, count: int) -> CounterFactRecord:
    r = rewrites[index]
    neighbours = [rewrites[j].request for j in neighbour_indices(rewrites, index, count)]
    return CounterFactRecord(
        request=r.request, relation_id=r.relation_id, pararel_idx=None,
        target_new_id=r.target_new_id, target_true_id=r.target_true_id,
        paraphrase_prompts=(r.question,),
        neighborhood_prompts=tuple(q.filled_prompt for q in neighbours),
        neighborhood_answers=tuple(str(q.target_true) for q in neighbours),
        neighborhood_subjects=tuple(q.subject for q in neighbours),
        attribute_prompts=(), generation_prompts=(r.request.filled_prompt,))


def read_akew_mquake_cf(path: str | pathlib.Path,
                        neighbours: int = NEIGHBOURS) -> tuple[CounterFactRecord, ...]:
    """Every distinct rewrite of an AKEW MQuAKE-CF file as a CounterFact case (module table);
    one DatasetError naming the file and each malformed record field or duplicate case_id."""
    per_record = read_all(path, load_records(path), _record, "case_id")
    rewrites = distinct(r for rs in per_record for r in rs)
    return tuple(_case(rewrites, i, neighbours) for i in range(len(rewrites)))


def without_edited_neighbours(record: CounterFactRecord,
                              edited: Iterable[str]) -> CounterFactRecord:
    """`record` without the neighbourhood prompts about an `edited` subject: a neighbour edited
    in the same run (batch, or stream when sequential) is no longer an unrelated fact. Records
    without neighbour subjects (MEMIT's CounterFact) are returned unchanged."""
    subjects = {s.casefold() for s in edited}
    keep = [i for i, s in enumerate(record.neighborhood_subjects)
            if s.casefold() not in subjects]
    if len(keep) == len(record.neighborhood_subjects):
        return record
    return dataclasses.replace(
        record, neighborhood_prompts=tuple(record.neighborhood_prompts[i] for i in keep),
        neighborhood_answers=tuple(record.neighborhood_answers[i] for i in keep),
        neighborhood_subjects=tuple(record.neighborhood_subjects[i] for i in keep))
