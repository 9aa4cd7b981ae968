"""CounterFact and MultiCounterFact (MEMIT's `counterfact.json`, `multi_counterfact.json`).

Both files share one record layout (anchors §8):

    {"case_id", "pararel_idx",
     "requested_rewrite": {"prompt": "The mother tongue of {} is", "relation_id", "subject",
                           "target_new": {"str", "id"}, "target_true": {"str", "id"}},
     "paraphrase_prompts": [2], "neighborhood_prompts": [10], "attribute_prompts": [...],
     "generation_prompts": [...]}

Which answer each prompt list is scored against (the MEMIT protocol, anchors §7.1):
paraphrase prompts -> `target_new` (generalisation); neighbourhood prompts are other subjects
that share the true object -> `target_true` (specificity); attribute prompts are subjects that
already have the new object -> `target_new`; generation prompts are free-text prefixes for
fluency and consistency. Lists may be empty (the organism's small worlds have subjects without
neighbours); their metrics are then undefined for that case. `target_*.id` (a Wikidata id)
keys the attribute snippets used by the consistency metric.

Readers of files without neighbourhood prompts (`akew_structured`) build a proxy from other
cases' prompts, each with its own true object: `neighborhood_answers` then holds one answer per
neighbourhood prompt and `neighborhood_subjects` its subject (so a run can drop neighbours it
edits); both are empty for CounterFact, where every neighbour keeps `target_true`.
"""

from __future__ import annotations

import dataclasses
import pathlib

from keedit_jax.data._fields import FieldReader, load_records, read_all
from keedit_jax.data.requests import Request


@dataclasses.dataclass(frozen=True, kw_only=True)
class CounterFactRecord:
    """One CounterFact / MCF case: the edit request and its evaluation prompts."""

    request: Request
    relation_id: str
    pararel_idx: int | None
    target_new_id: str
    target_true_id: str
    paraphrase_prompts: tuple[str, ...]
    neighborhood_prompts: tuple[str, ...]
    attribute_prompts: tuple[str, ...]
    generation_prompts: tuple[str, ...]
    neighborhood_answers: tuple[str, ...] = ()
    neighborhood_subjects: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("neighborhood_answers", "neighborhood_subjects"):
            given = getattr(self, name)
            if given and len(given) != len(self.neighborhood_prompts):
                raise ValueError(f"case {self.case_id}: {len(given)} {name} for "
                                 f"{len(self.neighborhood_prompts)} neighbourhood prompts")

    @property
    def case_id(self) -> int | str:
        return self.request.case_id

    @property
    def neighborhood_answer(self) -> str:
        """The answer every neighbourhood prompt should keep: the edited fact's true object."""
        assert self.request.target_true is not None  # always set by the reader
        return self.request.target_true

    @property
    def neighborhood_targets(self) -> tuple[str, ...]:
        """The answer each neighbourhood prompt should keep: its own, else `target_true`."""
        if self.neighborhood_answers or not self.neighborhood_prompts:
            return self.neighborhood_answers
        return (self.neighborhood_answer,) * len(self.neighborhood_prompts)

    @property
    def attribute_answer(self) -> str:
        """The answer every attribute prompt has: the edit's new object."""
        return self.request.target_new


def _parse(reader: FieldReader) -> CounterFactRecord | None:
    """One record, or None once its problems are noted (the caller raises for them)."""
    rw = "requested_rewrite"
    case_id = reader.raw("case_id", int)
    pararel_idx = reader.raw("pararel_idx", int, optional=True)
    fields = {
        "prompt": reader.text(f"{rw}.prompt", template=True),
        "subject": reader.text(f"{rw}.subject"),
        "target_new": reader.text(f"{rw}.target_new.str"),
        "target_true": reader.text(f"{rw}.target_true.str"),
    }
    ids = {key: reader.text(f"{rw}.{key}.id") for key in ("target_new", "target_true")}
    relation_id = reader.text(f"{rw}.relation_id")
    prompts = {key: reader.texts(key) for key in (
        "paraphrase_prompts", "neighborhood_prompts", "attribute_prompts", "generation_prompts")}
    if reader.problems:
        return None
    return CounterFactRecord(
        request=Request(case_id=case_id, **fields), relation_id=relation_id,
        pararel_idx=pararel_idx, target_new_id=ids["target_new"],
        target_true_id=ids["target_true"], **prompts,
    )


def read_counterfact(path: str | pathlib.Path) -> tuple[CounterFactRecord, ...]:
    """Every record of a CounterFact or MCF file; DatasetError listing each malformed field."""
    return read_all(path, load_records(path), _parse, "case_id")
