"""Editing benchmarks generated from the world, in the published file formats (anchors §8).

The readers of the real files read these too, so every field has the real name, type and
nesting; only the content is synthetic. Edit targets are the world's counterfactuals.

| file | format | records |
|---|---|---|
| counterfact.json | CounterFact / MCF (MEMIT) | one per person fact |
| zsre_mend_edit.json | ZsRE, MEND split (μKE) | one per person fact |
| unkebench.json | UnKEBench v2 | one per `prose` or `bullets` text |
| unkebench.facts.json | side file (ours) | the facts each UnKEBench answer changes |
| akew_CounterFact.json | AKEW CounterFact | one per `prose` text |
| akew_MQuAKE-CF.json | AKEW MQuAKE-CF | one per person with a usable chain |
| editevery.json | EditEverything | one per `record`, `news` or `verse` text |
| editevery.facts.json | side file (ours) | the facts each EditEverything answer changes |

Choices where the formats leave room:
- EditEverything categories: `record` (JSON / YAML / Python) -> "code", `news` -> "news",
  `verse` -> "poetry". Prose and bullet lists have no EditEverything category; they go to
  UnKEBench, whose answers are prose.
- UnKEBench / EditEverything answers are rewrites of a learned text that change most of its
  facts (all but `kept_count(n)` of the n it states, each to the fact's counterfactual), so the
  unedited model's answer differs from the target in most of its facts and the papers' text
  metrics can show an edit. Which facts changed, with old and new values, is in the side file
  `<name>.facts.json` (`fact_sheets`), which the fact-level metric reads; the published
  formats have no field for it. AKEW's `fact_new_uns` changes only the requested rewrite, as
  its single `target_new` implies (the world's own `counterfactual_text` changes 2-3 facts).
- ZsRE keeps the real semantics: `answers` and `pred` are the true object (the organism knows
  it), `alt` the counterfactual. MEMIT's reader edits towards `answers[0]` (anchors §7.2),
  which for the organism is a no-op; EasyEdit's reader edits towards `alt`.
- CounterFact `pararel_idx` is the fact's index in `World.facts` (there is no ParaRel here).
- AKEW MQuAKE: one rewrite per record, always the first hop (a person fact); chains go through
  cities, organisations and countries, 2-4 hops.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from keedit_jax.organism import lexicon
from keedit_jax.organism.world import PERSON_RELATIONS, Fact, LongText, World

N_NEIGHBOURS = 10  # neighborhood and attribute prompts per CounterFact case, as in the real file
UNKE_FORMATS = ("prose", "bullets")
EDITEVERY_CATEGORIES = {"record": "code", "news": "news", "verse": "poetry"}
MQUAKE_CHAINS = (
    ("P19", "P17"),
    ("P19", "P17", "P37"),
    ("P19", "P17", "P35"),
    ("P108", "P159"),
    ("P108", "P159", "P17"),
    ("P108", "P159", "P17", "P35"),
)
# Random streams, apart from the world's and corpus's.
_ZSRE_STREAM, _MQUAKE_STREAM, _REWRITE_STREAM = 20, 21, 22
# Bump when a benchmark file's content changes: `ensure_organism` rewrites stale benchmark
# files of a cached build from its world.json (no retraining; the model does not see them).
BENCHMARKS_VERSION = 2
VERSION_FILE = "VERSION"

Record = dict[str, Any]


def _person_facts(world: World) -> list[tuple[int, Fact]]:
    """The person facts with their index in `World.facts`; CounterFact cases are these.

    Ordered relation by relation, so that consecutive cases (one edit batch) have distinct
    subjects, as in CounterFact: two edits of one subject share a MEMIT key (the subject's last
    token) and cannot both be satisfied by one least-squares update.
    """
    facts = [(i, f) for i, f in enumerate(world.facts) if f.relation_id in PERSON_RELATIONS]
    return sorted(facts, key=lambda item: (PERSON_RELATIONS.index(item[1].relation_id),
                                           item[0]))


def _target(world: World, entity_id: str) -> dict[str, str]:
    return {"str": world.name(entity_id), "id": entity_id}


def _brace_prompt(world: World, fact: Fact, template: int) -> str:
    """A cloze template with "{}" for the subject, as CounterFact's `prompt` is written."""
    return world.relation(fact.relation_id).templates[template].replace("{subject}", "{}")


def _cycled_prompts(world: World, fact: Fact, subjects: Sequence[str], first: int) -> list[str]:
    """Up to N_NEIGHBOURS distinct (subject, template) prompts, templates rotating."""
    templates = world.relation(fact.relation_id).templates
    n = min(N_NEIGHBOURS, len(subjects) * len(templates))
    pairs = [(j % len(subjects), first + j % len(subjects) + j // len(subjects)) for j in range(n)]
    return [templates[t % len(templates)].format(subject=world.name(subjects[s])) for s, t in pairs]


def counterfact_record(world: World, fact: Fact, case_id: int, pararel_idx: int) -> Record:
    """One CounterFact case: edit `fact` to its counterfactual (MEMIT `counterfact.json`)."""
    templates = world.relation(fact.relation_id).templates
    main = case_id % len(templates)
    subject = world.name(fact.subject_id)
    others = [(main + k) % len(templates) for k in range(1, len(templates))]
    neighbours = [
        s for s in world.subjects_with(fact.relation_id, fact.object_id) if s != fact.subject_id
    ]
    attribute_subjects = world.subjects_with(fact.relation_id, fact.counterfactual_id)
    return {
        "case_id": case_id,
        "pararel_idx": pararel_idx,
        "requested_rewrite": {
            "prompt": _brace_prompt(world, fact, main),
            "relation_id": fact.relation_id,
            "target_new": _target(world, fact.counterfactual_id),
            "target_true": _target(world, fact.object_id),
            "subject": subject,
        },
        "paraphrase_prompts": [templates[i].format(subject=subject) for i in others[:2]],
        "neighborhood_prompts": _cycled_prompts(world, fact, neighbours, main),
        "attribute_prompts": _cycled_prompts(world, fact, attribute_subjects, main),
        "generation_prompts": [t.format(subject=subject) for t in templates],
    }


def counterfact(world: World) -> list[Record]:
    return [
        counterfact_record(world, fact, case_id, index)
        for case_id, (index, fact) in enumerate(_person_facts(world))
    ]


def _portability(world: World, fact: Fact, other: Fact) -> dict[str, str]:
    """A question about another fact of the subject that mentions the new object (μKE ZsRE)."""
    subject = world.name(fact.subject_id)
    clause = lexicon.PHRASINGS[fact.relation_id].clause.format(
        object=world.name(fact.counterfactual_id)
    )
    question = world.relation(other.relation_id).questions[0]
    recalled = world.relation(other.relation_id).name
    return {
        "Recalled Relation": f"({subject}, {recalled}, {world.name(other.object_id)})",
        "New Question": question.format(subject=f"{subject}, {clause},").replace(",?", "?"),
        "New Answer": world.name(other.object_id),
    }


def zsre(world: World) -> list[Record]:
    """ZsRE records; `loc` is a question about another person, written as the NQ ones are."""
    rng = np.random.default_rng([world.seed, _ZSRE_STREAM])
    facts = [fact for _, fact in _person_facts(world)]
    records = []
    for fact in facts:
        pred, alt = world.name(fact.object_id), world.name(fact.counterfactual_id)
        src = world.question(fact, 0)
        loc = facts[rng.integers(len(facts))]
        while loc.subject_id == fact.subject_id:
            loc = facts[rng.integers(len(facts))]
        own = [f for f in world.facts_of(fact.subject_id) if f != fact]
        records.append(
            {
                "subject": world.name(fact.subject_id),
                "src": src,
                "pred": pred,
                "rephrase": world.question(fact, 1),
                "alt": alt,
                "answers": [pred],
                "loc": f"nq question: {world.question(loc, 0).rstrip('?')}",
                "loc_ans": world.name(loc.object_id),
                "cond": f"{pred} >> {alt} || {src}",
                "portability": _portability(world, fact, own[rng.integers(len(own))]),
            }
        )
    return records


def _requests(world: World, text: LongText) -> tuple[str, ...]:
    subject = world.name(text.subject_id)
    return tuple(r.format(subject=subject) for r in lexicon.FORMAT_REQUESTS[text.format])


def kept_count(n_stated: int) -> int:
    """How many of a text's stated facts a benchmark rewrite keeps: a third, at least one (so
    that the fact metric can measure what the edit preserves)."""
    return max(1, n_stated // 3)


def rewrites(world: World) -> dict[str, dict[str, str]]:
    """Per long text (text id), the facts its benchmark rewrite changes: fact id -> new object.

    Every text is drawn in world order from one stream, so the UnKEBench and EditEverything
    rewrites do not depend on each other. New objects are the facts' counterfactuals.
    """
    rng = np.random.default_rng([world.seed, _REWRITE_STREAM])
    out = {}
    for text in world.long_texts:
        n = len(text.fact_ids)
        changed = sorted(int(i) for i in rng.permutation(n)[: n - kept_count(n)])
        out[text.text_id] = {text.fact_ids[i]: world.fact(text.fact_ids[i]).counterfactual_id
                             for i in changed}
    return out


def _new_objects(world: World, text: LongText, objects: dict[str, str]) -> list[str]:
    """The object of each stated fact in the rewritten text."""
    return [objects.get(fact_id, world.fact(fact_id).object_id) for fact_id in text.fact_ids]


def fact_sheet(world: World, text: LongText, objects: dict[str, str]) -> list[Record]:
    """The stated facts of a rewrite in text order: relation, old and new value (equal when
    the rewrite keeps the fact)."""
    return [{"fact_id": fact_id, "relation": world.fact(fact_id).relation_id,
             "old": world.name(world.fact(fact_id).object_id), "new": world.name(new)}
            for fact_id, new in zip(text.fact_ids, _new_objects(world, text, objects),
                                    strict=True)]


def _longform_texts(world: World, formats: Sequence[str]) -> list[tuple[LongText, dict]]:
    changes = rewrites(world)
    return [(t, changes[t.text_id]) for t in world.long_texts if t.format in formats]


def unkebench(world: World) -> list[Record]:
    """UnKEBench v2: answer = the rewritten text; sub-questions ask each stated fact."""
    records = []
    for text, objects in _longform_texts(world, UNKE_FORMATS):
        facts = [world.fact(fact_id) for fact_id in text.fact_ids]
        question, para_question = _requests(world, text)[:2]
        records.append(
            {
                "id": len(records),
                "question": question,
                "para_question": para_question,
                "answer": world.render(text, objects),
                "sub_question": [world.question(f) for f in facts],
                "sub_answer": [
                    world.sentence(f, obj)
                    for f, obj in zip(facts, _new_objects(world, text, objects), strict=True)
                ],
            }
        )
    return records


def editevery(world: World) -> list[Record]:
    """EditEverything: answer = the rewritten text, category from EDITEVERY_CATEGORIES."""
    return [
        {
            "id": i,
            "question": _requests(world, text)[0],
            "answer": world.render(text, objects),
            "category": EDITEVERY_CATEGORIES[text.format],
        }
        for i, (text, objects) in enumerate(_longform_texts(world, EDITEVERY_CATEGORIES))
    ]


def fact_sheets(world: World, formats: Sequence[str]) -> list[Record]:
    """The side file of `unkebench` / `editevery` (records in the same order, same ids): per
    record its subject and `fact_sheet`; UnKEBench's i-th sub-question asks the i-th fact."""
    return [{"id": i, "subject": world.name(text.subject_id),
             "facts": fact_sheet(world, text, objects)}
            for i, (text, objects) in enumerate(_longform_texts(world, formats))]


def unkebench_facts(world: World) -> list[Record]:
    return fact_sheets(world, UNKE_FORMATS)


def editevery_facts(world: World) -> list[Record]:
    return fact_sheets(world, tuple(EDITEVERY_CATEGORIES))


def _triplets(world: World, text: LongText, rewrite: Fact) -> list[dict[str, str]]:
    """`unsfact_triplets_GPT`: the facts the rewritten text states, in text order."""
    facts = [world.fact(fact_id) for fact_id in text.fact_ids]
    return [
        {
            "subject": world.name(f.subject_id),
            "prompt": _brace_prompt(world, f, 0),
            "target": world.name(f.counterfactual_id if f == rewrite else f.object_id),
        }
        for f in facts
    ]


def _akew_rewrite(world: World, text: LongText, fact: Fact) -> Record:
    """The AKEW fields shared by CounterFact and MQuAKE-CF `requested_rewrite` entries."""
    return {
        "question": world.question(fact),
        "fact_new": world.sentence(fact, fact.counterfactual_id),
        "fact_new_uns": world.render(text, {fact.fact_id: fact.counterfactual_id}),
        "verify_unsfact_GPT": True,
        "unsfact_triplets_GPT": _triplets(world, text, fact),
    }


def akew_counterfact(world: World) -> list[Record]:
    """AKEW CounterFact: a CounterFact case per prose text, for its first edited fact."""
    cases = {f.fact_id: (case_id, i) for case_id, (i, f) in enumerate(_person_facts(world))}
    records = []
    for text in world.long_texts:
        if text.format != "prose":
            continue
        fact = world.fact(text.edited_fact_ids[0])
        record = counterfact_record(world, fact, *cases[fact.fact_id])
        rewrite = record["requested_rewrite"]
        rewrite |= {
            "prompt_full": rewrite["prompt"].format(rewrite["subject"]),
            "answer_new": world.name(fact.counterfactual_id),
            "answer_new_aliases": list(world.entity(fact.counterfactual_id).aliases),
            "answer_true": world.name(fact.object_id),
            "answer_true_aliases": list(world.entity(fact.object_id).aliases),
        } | _akew_rewrite(world, text, fact)
        records.append(record)
    return records


def _chain(world: World, first: Fact, object_id: str, relations: Sequence[str]) -> list[Fact]:
    """The hops of a chain that starts with `first` pointing at `object_id`."""
    hops = [first]
    for relation_id in relations[1:]:
        hops.append(world.fact(f"{object_id}:{relation_id}"))
        object_id = hops[-1].object_id
    return hops


def _hop_objects(hops: Sequence[Fact], first_object: str) -> list[str]:
    return [first_object] + [h.object_id for h in hops[1:]]


def _single_hops(world: World, hops: Sequence[Fact], objects: Sequence[str]) -> list[Record]:
    subjects = [hops[0].subject_id, *objects[:-1]]
    out = []
    for hop, subject_id, object_id in zip(hops, subjects, objects, strict=True):
        relation = world.relation(hop.relation_id)
        subject = world.name(subject_id)
        out.append(
            {
                "question": relation.questions[0].format(subject=subject),
                "cloze": relation.templates[0].format(subject=subject),
                "answer": world.name(object_id),
                "answer_alias": list(world.entity(object_id).aliases),
            }
        )
    return out


def _multi_hop_questions(world: World, subject_id: str, relations: Sequence[str]) -> list[str]:
    """Three phrasings; inner hops become nested noun phrases ("the birthplace of X")."""
    questions = []
    for i in range(3):
        phrase = world.name(subject_id)
        for relation_id in relations[:-1]:
            phrase = world.relation(relation_id).noun_phrases[i].format(subject=phrase)
        questions.append(world.relation(relations[-1]).questions[i].format(subject=phrase))
    return questions


def _triples(
    world: World, hops: Sequence[Fact], objects: Sequence[str]
) -> tuple[list[list[str]], list[list[str]]]:
    """MQuAKE `triples` (ids) and `triples_labeled` (names) of a chain."""
    subjects = [hops[0].subject_id, *objects[:-1]]
    ids = [[s, h.relation_id, o] for s, h, o in zip(subjects, hops, objects, strict=True)]
    labeled = [[world.name(s), world.relation(r).name, world.name(o)] for s, r, o in ids]
    return ids, labeled


def _mquake_record(world: World, text: LongText, relations: Sequence[str], case_id: int) -> Record:
    first = world.fact(f"{text.subject_id}:{relations[0]}")
    old_hops = _chain(world, first, first.object_id, relations)
    new_hops = _chain(world, first, first.counterfactual_id, relations)
    old_objects = _hop_objects(old_hops, first.object_id)
    new_objects = _hop_objects(new_hops, first.counterfactual_id)
    triples, triples_labeled = _triples(world, old_hops, old_objects)
    new_triples, new_triples_labeled = _triples(world, new_hops, new_objects)
    rewrite = {
        "prompt": _brace_prompt(world, first, 0),
        "relation_id": first.relation_id,
        "target_new": _target(world, first.counterfactual_id),
        "target_true": _target(world, first.object_id),
        "subject": world.name(first.subject_id),
    } | _akew_rewrite(world, text, first)
    return {
        "case_id": case_id,
        "requested_rewrite": [rewrite],
        "questions": _multi_hop_questions(world, first.subject_id, relations),
        "answer": world.name(old_objects[-1]),
        "answer_alias": list(world.entity(old_objects[-1]).aliases),
        "new_answer": world.name(new_objects[-1]),
        "new_answer_alias": list(world.entity(new_objects[-1]).aliases),
        "single_hops": _single_hops(world, old_hops, old_objects),
        "new_single_hops": _single_hops(world, new_hops, new_objects),
        "orig": {
            "triples": triples,
            "triples_labeled": triples_labeled,
            "new_triples": new_triples,
            "new_triples_labeled": new_triples_labeled,
            "edit_triples": [new_triples[0]],
        },
    }


def _usable_chains(world: World, text: LongText) -> list[tuple[str, ...]]:
    """Chains whose first hop the text states and whose final answer the edit changes."""
    usable = []
    for relations in MQUAKE_CHAINS:
        fact_id = f"{text.subject_id}:{relations[0]}"
        if fact_id not in text.fact_ids:
            continue
        first = world.fact(fact_id)
        old = _chain(world, first, first.object_id, relations)[-1].object_id
        new = _chain(world, first, first.counterfactual_id, relations)[-1].object_id
        if old != new:
            usable.append(relations)
    return usable


def akew_mquake(world: World) -> list[Record]:
    """AKEW MQuAKE-CF: a multi-hop case per prose text that has a usable chain."""
    rng = np.random.default_rng([world.seed, _MQUAKE_STREAM])
    records = []
    for text in world.long_texts:
        chains = _usable_chains(world, text) if text.format == "prose" else []
        if chains:
            relations = chains[rng.integers(len(chains))]
            records.append(_mquake_record(world, text, relations, len(records)))
    return records


WRITERS: dict[str, tuple[str, Callable[[World], list[Record]]]] = {
    "counterfact": ("counterfact.json", counterfact),
    "zsre": ("zsre_mend_edit.json", zsre),
    "unkebench": ("unkebench.json", unkebench),
    "akew_counterfact": ("akew_CounterFact.json", akew_counterfact),
    "akew_mquake": ("akew_MQuAKE-CF.json", akew_mquake),
    "editevery": ("editevery.json", editevery),
    "unkebench_facts": ("unkebench.facts.json", unkebench_facts),
    "editevery_facts": ("editevery.facts.json", editevery_facts),
}


def write_benchmarks(world: World, directory: str | pathlib.Path) -> dict[str, pathlib.Path]:
    """Writes every benchmark file into `directory`; returns {benchmark name: path}."""
    directory = pathlib.Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, (filename, build) in WRITERS.items():
        paths[name] = directory / filename
        paths[name].write_text(
            json.dumps(build(world), ensure_ascii=False, indent=1) + "\n", encoding="utf-8"
        )
    (directory / VERSION_FILE).write_text(f"{BENCHMARKS_VERSION}\n", encoding="utf-8")
    return paths


def alpaca(world: World) -> list[Record]:
    """Alpaca-format instruction data (instruction, input, output) of the world's true facts:
    UnKE's preservation samples for the organism, which has no Alpaca (anyedit §2.4.3)."""
    return [{"instruction": world.question(fact), "input": "", "output": world.sentence(fact)}
            for _, fact in _person_facts(world)]
