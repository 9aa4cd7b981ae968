"""The built organism: a real HF checkpoint that knows its world, built once, reproducibly.

The `tiny` organism is built once per session through `ensure_organism` into a temporary
cache (`KEEDIT_CACHE`), then read back through the real loaders. Thresholds sit below the
measured build (chat recall 97.3%, cloze 99.5%, BLEU-4 92.4%, truth more likely than the
counterfactual for 100% of facts): another machine rounds differently and trains a slightly
different model, while a broken build (no learning, wrong tokens, wrong stop ids) scores
far below them (6 epochs with a 1024-token batch already fall to 66% recall and 17% BLEU).
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from keedit_jax import organism
from keedit_jax.intervene import forward
from keedit_jax.models import load_model
from keedit_jax.models.checkpoint import CheckpointError
from keedit_jax.models.generate import GenerationConfig, generate
from keedit_jax.models.tokenizer import encode_prompts, load_tokenizer, stop_token_ids
from keedit_jax.organism import benchmarks, build

TINY_RECALL = 0.9  # measured: 0.973 (chat), 0.995 (cloze)
TINY_BLEU = 0.8  # measured: 0.924
SAMPLED_FACTS = 32


def _never(message: str) -> None:
    raise AssertionError(f"unexpected build: {message}")


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The tiny organism, built through the cache path that commands use.

    pytest-xdist workers share one cache directory of this session, so `ensure_organism`'s
    lock lets one of them build while the others wait.
    """
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "keedit-cache"
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("KEEDIT_CACHE", str(cache))
        path = organism.ensure_organism("tiny")
    assert path.parent == cache
    return path


@pytest.fixture(scope="module")
def model(tiny):
    return load_model(tiny)


@pytest.fixture(scope="module")
def tokenizer(tiny, model):
    return load_tokenizer(tiny, model.config)


@pytest.fixture(scope="module")
def world(tiny) -> organism.World:
    return organism.World.from_json((tiny / "world.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def report(tiny) -> dict:
    return json.loads((tiny / "report.json").read_text())


def test_loads_as_a_hugging_face_llama(tiny, model, tokenizer):
    spec = organism.ORGANISM_SIZES["tiny"]
    config = json.loads((tiny / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (
        1, [2, 3], 0)
    generation = json.loads((tiny / "generation_config.json").read_text())
    assert (generation["eos_token_id"], generation["pad_token_id"]) == ([2, 3], 0)
    cfg = model.config
    assert (cfg.family, cfg.d_model, cfg.n_layers, cfg.max_positions) == (
        "llama", spec.hidden_size, spec.num_layers, spec.max_positions)
    assert stop_token_ids(tokenizer, cfg, tiny) == (2, 3)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<s>", "</s>", "<|eot|>"]
    assert (tiny / "benchmarks" / "counterfact.json").is_file()


def test_world_file_is_the_seeded_world(world):
    spec = organism.ORGANISM_SIZES["tiny"]
    assert world.to_json() == organism.build_world(spec.seed, spec.n_people).to_json()


def test_report_fields(report, world):
    spec = organism.ORGANISM_SIZES["tiny"]
    assert report["fingerprint"] == spec.fingerprint()
    assert report["world"]["facts"] == len(world.facts)
    assert len(report["training"]["loss"]) == spec.train.epochs
    assert report["training"]["loss"][-1] < report["training"]["loss"][0]
    for key in ("fact_recall", "person_fact_recall", "cloze_recall", "text_bleu4",
                "text_rouge_l", "text_exact"):
        assert 0.0 <= report[key] <= 1.0, key
    assert set(report["counterfactual"]) == {
        "true_probability", "counterfactual_probability", "true_more_likely"}


def test_tiny_knows_its_world(report):
    assert report["fact_recall"] >= TINY_RECALL, report["fact_recall"]
    assert report["cloze_recall"] >= TINY_RECALL, report["cloze_recall"]
    assert report["text_bleu4"] >= TINY_BLEU, report["text_bleu4"]


def test_recall_rechecked_outside_the_report(tiny, model, tokenizer, world):
    """Chat questions answered through the public loaders and `generate` (not report.py)."""
    facts = world.facts[:: max(1, len(world.facts) // SAMPLED_FACTS)]
    prompts = encode_prompts(tokenizer, [world.question(f) for f in facts])
    gen = GenerationConfig(max_new_tokens=32, stop_ids=stop_token_ids(tokenizer, model.config,
                                                                       tiny), pad_id=0)
    answers = tokenizer.batch_decode(generate(model.params, model.config, prompts, gen),
                                     skip_special_tokens=True)
    hits = [world.name(f.object_id) in a for f, a in zip(facts, answers, strict=True)]
    assert np.mean(hits) >= TINY_RECALL, list(zip(answers, hits, strict=True))


def _first_object_token(tokenizer, prompt: str, obj: str) -> int:
    head = tokenizer(prompt)["input_ids"]
    return tokenizer(f"{prompt} {obj}")["input_ids"][len(head)]


def test_counterfactuals_are_less_likely_than_truths(report, model, tokenizer, world):
    cf = report["counterfactual"]
    assert cf["counterfactual_probability"] < 0.1 < cf["true_probability"]
    assert cf["true_more_likely"] >= TINY_RECALL
    person = [f for f in world.facts if f.relation_id in organism.world.PERSON_RELATIONS]
    checked = 0
    for fact in person[:8]:  # the first object token alone, from the logits, by hand
        prompt = world.prompt(fact)
        true = _first_object_token(tokenizer, prompt, world.name(fact.object_id))
        new = _first_object_token(tokenizer, prompt, world.name(fact.counterfactual_id))
        if true == new:  # names can share a first token; such a pair says nothing here
            continue
        tokens = jnp.asarray([tokenizer(prompt)["input_ids"]])
        logits = np.asarray(forward(model.params, model.config, tokens, jnp.ones_like(tokens)))
        assert logits[0, -1, true] > logits[0, -1, new], fact.fact_id
        checked += 1
    assert checked >= 4


def test_cached_build_is_reused(tiny):
    assert organism.ensure_organism("tiny", tiny.parent, log=_never) == tiny


def _files(directory: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_second_build_is_byte_identical(tiny, tmp_path):
    again = organism.build_organism("tiny", tmp_path / "again", log=lambda _: None)
    first, second = _files(tiny), _files(again)
    assert set(first) == set(second)
    for name in sorted(first):
        if name != "report.json":
            assert first[name] == second[name], f"{name} differs between two builds"
    reports = [json.loads(files["report.json"]) for files in (first, second)]
    for content in reports:  # only the timings may differ
        del content["training"]["seconds"], content["training"]["tokens_per_second"]
    assert reports[0] == reports[1]


# ----------------------------------------------------------------------------- cache mechanics


def test_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(build, "write_benchmarks", interrupt)
    with pytest.raises(KeyboardInterrupt):
        organism.build_organism("tiny", tmp_path / "organism")
    assert list(tmp_path.iterdir()) == []


def test_incomplete_cache_entries_are_rebuilt(tmp_path, monkeypatch):
    built = []

    monkeypatch.setattr(build, "build_organism", _fake_build(built := []))
    spec = organism.ORGANISM_SIZES["tiny"]
    target = tmp_path / f"organism-tiny-v{build.FORMAT_VERSION}-{spec.fingerprint()}"
    (target / "benchmarks").mkdir(parents=True)  # a directory without its files
    (tmp_path / f".{target.name}.building.abc").mkdir()  # left by a killed build
    assert organism.ensure_organism("tiny", tmp_path, log=lambda _: None) == target
    assert built == [target]
    assert not list(tmp_path.glob(f".{target.name}.building.*"))
    assert organism.ensure_organism("tiny", tmp_path, log=_never) == target
    assert built == [target]


def test_a_truncated_cached_checkpoint_is_rebuilt_with_a_word(tmp_path, monkeypatch):
    monkeypatch.setattr(build, "build_organism", _fake_build(built := []))
    target = organism.ensure_organism("tiny", tmp_path, log=lambda _: None)
    weights = target / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    messages: list[str] = []
    assert organism.ensure_organism("tiny", tmp_path, log=messages.append) == target
    assert built == [target, target]
    assert any("damaged" in m and "model.safetensors" in m for m in messages), messages
    assert build.is_complete(target)


def _fake_build(built: list):
    """build_organism's stand-in: every required file, the weights a readable safetensors."""

    def fake_build(spec, target, *, log):
        for name in build.REQUIRED_FILES:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            (target / name).write_text("{}")
        save_file({"w": np.zeros((4, 4), np.float32)}, target / "model.safetensors")
        (target / "benchmarks" / benchmarks.VERSION_FILE).write_text(
            f"{benchmarks.BENCHMARKS_VERSION}\n")
        built.append(target)
        return target

    return fake_build


def test_shipped_build_installs_verified_and_damage_is_refused(tiny, tmp_path):
    shipped = tmp_path / "shipped"
    build.ship_organism(tiny, shipped / "tiny")
    installed = organism.ensure_organism("tiny", tmp_path / "cache", shipped=shipped,
                                         log=lambda _: None)
    assert installed.name == tiny.name and build.is_complete(installed)
    assert _files(installed) == _files(tiny)  # benchmarks rewritten from world.json, equal
    spec = organism.ORGANISM_SIZES["tiny"]
    assert build.shipped_for(organism.ORGANISM_SIZES["small"], shipped) is None
    assert build.shipped_for(spec, shipped) == shipped / "tiny"
    damaged = bytearray((shipped / "tiny" / "model.safetensors").read_bytes())
    damaged[-1] ^= 1
    (shipped / "tiny" / "model.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: sha256 .* damaged"):
        organism.ensure_organism("tiny", tmp_path / "other", shipped=shipped,
                                 log=lambda _: None)
    assert not list((tmp_path / "other").glob("organism-*"))


def test_the_package_ships_the_small_organism():
    assert build.shipped_for(organism.ORGANISM_SIZES["small"]) == build.SHIPPED / "small"


def test_stale_benchmark_files_are_rewritten_without_training(tiny, tmp_path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny, cache / tiny.name)
    (cache / tiny.name / "benchmarks" / "VERSION").write_text("1\n")
    (cache / tiny.name / "benchmarks" / "unkebench.json").write_text("[]")
    logged = []
    assert organism.ensure_organism("tiny", cache, log=logged.append) == cache / tiny.name
    assert len(logged) == 1 and "rewriting the benchmark files" in logged[0]
    assert _files(cache / tiny.name) == _files(tiny)


def test_unknown_size_is_refused():
    with pytest.raises(ValueError, match="unknown organism size"):
        organism.ensure_organism("huge")
