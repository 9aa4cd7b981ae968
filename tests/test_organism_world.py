"""The model organism's world, tokenizer and benchmark files.

Checks are against independent truth: the lexicon's closed vocabularies, the published files in
the shared data directory (field names, types and nesting), and the format descriptions of
anchors §8 for the files that are not available here.
"""

from __future__ import annotations

import json
import os
import pathlib
import re

import pytest
import transformers

from keedit_jax import organism
from keedit_jax.organism import benchmarks, lexicon
from keedit_jax.organism.tokenizer import DEFAULT_VOCAB_SIZE

REAL_DATA = pathlib.Path(os.environ.get("KEEDIT_REAL_DATA", "/work/shared/data"))
SMALL = 60  # people in the worlds used only for determinism checks


@pytest.fixture(scope="module")
def world() -> organism.World:
    return organism.build_world(0)


@pytest.fixture(scope="module")
def tokenizer(world, tmp_path_factory) -> transformers.PreTrainedTokenizerBase:
    directory = organism.train_tokenizer(world, tmp_path_factory.mktemp("organism-tokenizer"))
    return transformers.AutoTokenizer.from_pretrained(directory)


def _words(text: str, name: str) -> bool:
    """Whether `name` occurs in `text` as whole words."""
    return re.search(rf"(?<!\w){re.escape(name)}(?!\w)", text) is not None


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


# ----------------------------------------------------------------------------- determinism


def test_same_seed_gives_byte_identical_world_and_tokenizer(tmp_path):
    first, second = organism.build_world(3, SMALL), organism.build_world(3, SMALL)
    assert first.to_json() == second.to_json()
    files_a = _files(organism.train_tokenizer(first, tmp_path / "a"))
    files_b = _files(organism.train_tokenizer(second, tmp_path / "b"))
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(files_a)
    for name in files_a:
        assert files_a[name] == files_b[name], f"{name} differs between two builds"
    assert benchmarks.zsre(first) == benchmarks.zsre(second)
    assert benchmarks.akew_mquake(first) == benchmarks.akew_mquake(second)


def test_different_seed_gives_different_world_and_tokenizer(tmp_path):
    first, second = organism.build_world(3, SMALL), organism.build_world(4, SMALL)
    assert first.to_json() != second.to_json()
    assert [e.name for e in first.of_kind("person")] != [e.name for e in second.of_kind("person")]
    tokenizer_a = organism.train_tokenizer(first, tmp_path / "a") / "tokenizer.json"
    tokenizer_b = organism.train_tokenizer(second, tmp_path / "b") / "tokenizer.json"
    assert tokenizer_a.read_bytes() != tokenizer_b.read_bytes()


def test_json_round_trip(world):
    text = world.to_json()
    assert text == json.dumps(json.loads(text), sort_keys=True, ensure_ascii=False, indent=1)
    assert organism.World.from_json(text) == world


# ----------------------------------------------------------------------------- facts


def test_world_sizes(world):
    people = world.of_kind("person")
    assert len(people) == 300
    assert len({p.name for p in people}) == 300
    assert len(world.of_kind("city")) == 30
    assert len([f for f in world.facts if f.subject_id.startswith("person/")]) == 300 * 7
    assert len(world.long_texts) == 600


def test_counterfactuals_differ_and_stay_in_the_relation_object_set(world):
    closed = {
        "P106": lexicon.PROFESSIONS,
        "P1303": lexicon.INSTRUMENTS,
        "P641": lexicon.SPORTS,
        "P452": lexicon.INDUSTRIES,
    }
    for fact in world.facts:
        relation = world.relation(fact.relation_id)
        assert fact.counterfactual_id != fact.object_id, fact.fact_id
        assert world.name(fact.counterfactual_id) != world.name(fact.object_id), fact.fact_id
        for object_id in (fact.object_id, fact.counterfactual_id):
            assert world.entity(object_id).kind == relation.object_kind, fact.fact_id
            if fact.relation_id in closed:
                assert world.name(object_id) in closed[fact.relation_id], fact.fact_id


def test_every_person_fact_has_neighbours(world):
    for fact in world.facts:
        if fact.subject_id.startswith("person/"):
            sharing = world.subjects_with(fact.relation_id, fact.object_id)
            assert fact.subject_id in sharing
            assert len(sharing) >= 10, fact.fact_id


def test_multi_hop_facts_are_consistent(world):
    """A country's capital lies in that country; heads of state are people of the world."""
    for country in world.of_kind("country"):
        capital = world.fact(f"{country.entity_id}:P36").object_id
        assert world.fact(f"{capital}:P17").object_id == country.entity_id
        head = world.fact(f"{country.entity_id}:P35").object_id
        assert world.entity(head).kind == "person"


def test_templates_render_with_the_subject(world):
    person = world.of_kind("person")[0].name
    for relation in world.relations:
        phrases = relation.templates + relation.questions + relation.noun_phrases
        assert len(relation.templates) >= 3 and len(relation.questions) == 3
        for phrase in phrases:
            assert phrase.count("{subject}") == 1, phrase
            assert person in phrase.format(subject=person)
        for template in relation.templates:
            assert template == template.strip() and template[-1].isalpha(), template
        for question in relation.questions:
            assert question.endswith("?"), question


def test_names_are_not_substrings_of_each_other(world):
    suffixes = {s.lower() for s in lexicon.ORGANISATION_SUFFIXES + lexicon.SCHOOL_SUFFIXES}
    words = {w.lower() for e in world.entities for w in e.name.split()} - suffixes
    for a in words:
        for b in words:
            assert a == b or a not in b, (a, b)


# ----------------------------------------------------------------------------- long texts


def test_long_texts_state_their_facts(world):
    for text in world.long_texts:
        subject = world.entity(text.subject_id)
        assert _words(text.text, subject.name), text.text_id
        assert text.format in organism.FORMATS
        assert 2 <= len(text.edited_fact_ids) <= 3
        assert set(text.edited_fact_ids) <= set(text.fact_ids)
        for fact_id in text.fact_ids:
            fact = world.fact(fact_id)
            assert fact.subject_id == text.subject_id
            true, new = world.name(fact.object_id), world.name(fact.counterfactual_id)
            assert _words(text.text, true), (text.text_id, true)
            if fact_id in text.edited_fact_ids:
                assert _words(text.counterfactual_text, new), (text.text_id, new)
                assert not _words(text.counterfactual_text, true), (text.text_id, true)
            else:
                assert _words(text.counterfactual_text, true), (text.text_id, true)


def test_long_texts_come_in_every_format_and_json_records_parse(world):
    formats = {t.format for t in world.long_texts}
    assert formats == {"prose", "bullets", "verse", "record", "news"}
    records = [t for t in world.long_texts if t.format == "record" and t.text.startswith("{")]
    assert records
    for text in records:
        fields = json.loads(text.counterfactual_text)
        assert fields["name"] == world.name(text.subject_id)


def test_long_texts_fit_the_length_bounds(world, tokenizer):
    lengths = []
    for text in world.long_texts:
        for version in (text.text, text.counterfactual_text):
            n_tokens = len(tokenizer(version, add_special_tokens=False).input_ids)
            assert 40 <= n_tokens <= 200, (text.text_id, n_tokens)
            assert 40 <= len(version.split()) <= 200, text.text_id
            lengths.append(n_tokens)
    assert 60 <= sum(lengths) / len(lengths) <= 150


# ----------------------------------------------------------------------------- tokenizer


def test_chat_template_ends_turns_with_eot(world, tokenizer):
    question = world.question(world.facts[0])
    answer = world.sentence(world.facts[0])
    messages = [{"role": "user", "content": question}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == f"<s>user:\n{question}<|eot|>assistant:\n"
    full = messages + [{"role": "assistant", "content": answer}]
    full_text = tokenizer.apply_chat_template(full, tokenize=False)
    assert full_text == f"<s>user:\n{question}<|eot|>assistant:\n{answer}<|eot|>"
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    full_ids = tokenizer(full_text, add_special_tokens=False).input_ids
    assert full_ids[: len(prompt_ids)] == prompt_ids  # the prompt ends on a token boundary
    eot = tokenizer.convert_tokens_to_ids("<|eot|>")
    assert full_ids.count(eot) == 2 and full_ids[-1] == eot
    assert full_ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.decode(full_ids, skip_special_tokens=True).endswith(answer)


def test_tokenizer_special_tokens(tokenizer):
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<pad>", "<s>", "</s>", "<|eot|>")]
    assert ids == [0, 1, 2, 3]
    named = (tokenizer.pad_token, tokenizer.bos_token, tokenizer.eos_token)
    assert named == ("<pad>", "<s>", "</s>")
    assert tokenizer("Hello").input_ids[0] == tokenizer.bos_token_id
    assert len(tokenizer) <= DEFAULT_VOCAB_SIZE


# ----------------------------------------------------------------------------- benchmarks


def _assert_same_shape(ours: object, real: object, path: str) -> None:
    """Same keys and value types, recursively; list items are compared with the first real one."""
    assert type(ours) is type(real), f"{path}: {type(ours).__name__} vs {type(real).__name__}"
    if isinstance(real, dict):
        assert sorted(ours) == sorted(real), f"{path}: keys {sorted(ours)} vs {sorted(real)}"
        for key in real:
            _assert_same_shape(ours[key], real[key], f"{path}.{key}")
    elif isinstance(real, list) and real:
        for i, item in enumerate(ours):
            _assert_same_shape(item, real[0], f"{path}[{i}]")


REAL_FILES = {
    "unkebench": "unkebench_final_data_v2.json",
    "akew_mquake": "akew_MQuAKE-CF.json",
    "editevery": "editevery.json",
    "zsre": "zsre_mend_edit.json",
}


@pytest.mark.parametrize("name", sorted(REAL_FILES))
def test_generated_records_match_the_published_files(world, name):
    path = REAL_DATA / REAL_FILES[name]
    if not path.exists():
        pytest.skip(f"{path} is not available")
    real = json.loads(path.read_text(encoding="utf-8"))[0]
    ours = benchmarks.WRITERS[name][1](world)
    assert ours
    for i, record in enumerate(ours):
        _assert_same_shape(record, real, f"{name}[{i}]")


# The formats of the files that are not available here, as anchors §8 describes them (and,
# for the AKEW fields shared with MQuAKE-CF, as akew_MQuAKE-CF.json has them).
_TARGET = {"str": "", "id": ""}
COUNTERFACT_SHAPE = {
    "case_id": 0,
    "pararel_idx": 0,
    "requested_rewrite": {
        "prompt": "",
        "relation_id": "",
        "target_new": _TARGET,
        "target_true": _TARGET,
        "subject": "",
    },
    "paraphrase_prompts": [""],
    "neighborhood_prompts": [""],
    "attribute_prompts": [""],
    "generation_prompts": [""],
}
AKEW_COUNTERFACT_SHAPE = COUNTERFACT_SHAPE | {
    "requested_rewrite": COUNTERFACT_SHAPE["requested_rewrite"]
    | {
        "prompt_full": "",
        "question": "",
        "fact_new": "",
        "fact_new_uns": "",
        "answer_new": "",
        "answer_new_aliases": [""],
        "answer_true": "",
        "answer_true_aliases": [""],
        "verify_unsfact_GPT": True,
        "unsfact_triplets_GPT": [{"subject": "", "prompt": "", "target": ""}],
    }
}


@pytest.mark.parametrize(
    ("name", "shape"),
    [("counterfact", COUNTERFACT_SHAPE), ("akew_counterfact", AKEW_COUNTERFACT_SHAPE)],
)
def test_generated_records_match_the_documented_formats(world, name, shape):
    ours = benchmarks.WRITERS[name][1](world)
    assert ours
    for i, record in enumerate(ours):
        _assert_same_shape(record, shape, f"{name}[{i}]")


def test_counterfact_cases_target_counterfactuals_and_real_neighbours(world):
    by_name = {e.name: e.entity_id for e in world.of_kind("person")}
    for record in benchmarks.counterfact(world)[::50]:
        rewrite = record["requested_rewrite"]
        assert "{}" in rewrite["prompt"]
        subject_id = by_name[rewrite["subject"]]
        fact = world.fact(f"{subject_id}:{rewrite['relation_id']}")
        assert rewrite["target_true"]["id"] == fact.object_id
        assert rewrite["target_new"]["id"] == fact.counterfactual_id
        assert len(record["paraphrase_prompts"]) == 2
        assert len(record["neighborhood_prompts"]) == benchmarks.N_NEIGHBOURS
        assert len(set(record["neighborhood_prompts"])) == benchmarks.N_NEIGHBOURS
        groups = [
            ("neighborhood_prompts", fact.object_id),
            ("attribute_prompts", fact.counterfactual_id),
        ]
        for key, object_id in groups:
            for prompt in record[key]:
                (other,) = [p for name, p in by_name.items() if name in prompt]
                assert other != subject_id, prompt
                assert world.fact(f"{other}:{fact.relation_id}").object_id == object_id, prompt


def test_zsre_and_unkebench_records_carry_the_edit(world):
    for record in benchmarks.zsre(world)[::100]:
        assert record["alt"] != record["pred"] == record["answers"][0]
        assert record["loc"].startswith("nq question: ") and record["subject"] not in record["loc"]
        assert record["cond"] == f"{record['pred']} >> {record['alt']} || {record['src']}"
    unke = [t for t in world.long_texts if t.format in benchmarks.UNKE_FORMATS]
    sheets = benchmarks.unkebench_facts(world)
    for record, text, sheet in zip(benchmarks.unkebench(world), unke, sheets, strict=True):
        assert record["id"] == sheet["id"] and sheet["subject"] == world.name(text.subject_id)
        assert len(record["sub_question"]) == len(record["sub_answer"]) == len(text.fact_ids)
        _check_rewrite(world, text, record["answer"], sheet)
        for fact, answer in zip(sheet["facts"], record["sub_answer"], strict=True):
            assert _words(answer, fact["new"]) and (fact["old"] == fact["new"]
                                                    or not _words(answer, fact["old"])), answer


def _check_rewrite(world, text, answer: str, sheet: dict) -> None:
    """A benchmark rewrite changes all but kept_count(n) facts, each to its counterfactual,
    in the learned text's wording; the side file lists them in text order."""
    facts = sheet["facts"]
    assert [f["fact_id"] for f in facts] == list(text.fact_ids)
    changed = [f for f in facts if f["old"] != f["new"]]
    assert len(facts) - len(changed) == benchmarks.kept_count(len(facts)) >= 1
    for f in facts:
        fact = world.fact(f["fact_id"])
        assert f["old"] == world.name(fact.object_id)
        assert f["new"] in (f["old"], world.name(fact.counterfactual_id))
        assert _words(answer, f["new"]), (text.text_id, f)
        if f in changed:
            assert not _words(answer, f["old"]), (text.text_id, f)
    objects = {f["fact_id"]: world.fact(f["fact_id"]).counterfactual_id for f in changed}
    assert answer == world.render(text, objects) != text.text


def test_editevery_rewrites_follow_their_side_file(world):
    chosen = [t for t in world.long_texts if t.format in benchmarks.EDITEVERY_CATEGORIES]
    sheets = benchmarks.editevery_facts(world)
    for record, text, sheet in zip(benchmarks.editevery(world), chosen, sheets, strict=True):
        assert record["id"] == sheet["id"]
        _check_rewrite(world, text, record["answer"], sheet)


def test_akew_mquake_chains_follow_the_world(world):
    records = benchmarks.akew_mquake(world)
    assert len(records) >= 200
    for record in records:
        (rewrite,) = record["requested_rewrite"]
        assert _words(rewrite["fact_new_uns"], rewrite["target_new"]["str"])
        assert not _words(rewrite["fact_new_uns"], rewrite["target_true"]["str"])
        assert record["new_answer"] != record["answer"]
        for key, hops in (("triples", "single_hops"), ("new_triples", "new_single_hops")):
            triples = record["orig"][key]
            assert 2 <= len(triples) <= 4
            for i, (subject_id, relation_id, object_id) in enumerate(triples):
                assert record[hops][i]["answer"] == world.name(object_id)
                if i > 0:  # later hops are true facts of the world
                    assert world.fact(f"{subject_id}:{relation_id}").object_id == object_id
        assert record["orig"]["edit_triples"] == record["orig"]["new_triples"][:1]
        assert record["single_hops"][-1]["answer"] == record["answer"]
        assert record["new_single_hops"][-1]["answer"] == record["new_answer"]
        assert all(rewrite["subject"] in q for q in record["questions"])


def test_editevery_categories_follow_the_text_formats(world):
    documented = {"record": "code", "news": "news", "verse": "poetry"}
    chosen = [t for t in world.long_texts if t.format in documented]
    records = benchmarks.editevery(world)
    assert {r["category"] for r in records} == set(documented.values())
    for record, text in zip(records, chosen, strict=True):
        assert documented[text.format] == record["category"]


def test_write_benchmarks_writes_json_lists(world, tmp_path):
    paths = organism.write_benchmarks(world, tmp_path)
    assert set(paths) == set(benchmarks.WRITERS)
    for name, path in paths.items():
        records = json.loads(path.read_text(encoding="utf-8"))
        assert isinstance(records, list) and records, name
