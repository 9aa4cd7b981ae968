"""Build the model organism: world -> tokenizer -> corpus -> trained Llama -> HF checkpoint.

`ensure_organism("small")` is how every command gets its default model: it returns a cached
build, or builds one (minutes on a laptop CPU) with progress on `log`. A build directory holds
an ordinary Hugging Face checkpoint, so `load_model` and `load_tokenizer` read it as they read
any other model, plus what the benchmarks and tests need:

    config.json, generation_config.json, model.safetensors    the model (eos = </s>, <|eot|>)
    tokenizer.json, tokenizer_config.json, chat_template.jinja
    world.json                                                `World.from_json` reads it
    benchmarks/                                               `write_benchmarks`
    report.json                                               spec, training, `report.measure`

A build is atomic (made in a hidden sibling directory, renamed into place) and deterministic:
two builds of one spec on one machine give byte-identical model, tokenizer and world files.

The `small` build ships with the package (`shipped/small/`, 6 MB, written by
`python -m keedit_jax.organism.build --ship small`): `ensure_organism` installs it into the
cache after checking every file's sha256 against its MANIFEST.json, so a first run takes
seconds instead of the minutes of training; the manifest's fingerprint ties it to one spec
and FORMAT_VERSION (anything else is built as before). Benchmark files are not shipped: they
are written from world.json, and rewritten in a cached build when BENCHMARKS_VERSION moves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from keedit_jax.files import staged_directory
from keedit_jax.models.checkpoint import CheckpointError, load_model, save_model
from keedit_jax.models.config import config_from_hf
from keedit_jax.models.tokenizer import load_tokenizer
from keedit_jax.organism import report
from keedit_jax.organism.benchmarks import BENCHMARKS_VERSION, VERSION_FILE, write_benchmarks
from keedit_jax.organism.corpus import Corpus, build_corpus
from keedit_jax.organism.tokenizer import DEFAULT_VOCAB_SIZE, train_tokenizer
from keedit_jax.organism.train import TrainConfig, train_lm
from keedit_jax.organism.world import World, build_world

# Bump when the world, corpus, tokenizer, training or file layout change what a spec builds:
# it is part of the cache key, so stale caches are rebuilt rather than silently reused.
FORMAT_VERSION = 2
BOS_ID, EOS_ID, EOT_ID, PAD_ID = 1, 2, 3, 0
REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                  "tokenizer_config.json", "world.json", "benchmarks/counterfact.json",
                  "report.json")

SHIPPED = Path(__file__).parent / "shipped"  # organisms shipped with the package, by size
SHIPPED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json",
                 "tokenizer_config.json", "chat_template.jinja", "world.json", "report.json")
MANIFEST = "MANIFEST.json"

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrganismSpec:
    """Everything that determines a build: world size, model shape, training, seed.

    `text_repeats` repeats every long-text sequence (its document and its chat exchanges) that
    many times per epoch: verbatim reproduction needs more passes than one-line facts.
    """

    name: str  # the size's name; the cache directory starts with it
    n_people: int  # editing subjects; places, organisations etc. add a fixed 151 entities
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    max_positions: int = 512  # the longest training sequence is about 170 tokens
    vocab_size: int = DEFAULT_VOCAB_SIZE
    tie_embeddings: bool = True
    rope_theta: float = 10_000.0
    text_repeats: int = 1
    train: TrainConfig = TrainConfig()
    seed: int = 0  # the world's seed; training has its own in `train`

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ValueError(f"{self.name}: hidden_size={self.hidden_size}, num_heads="
                             f"{self.num_heads}, num_kv_heads={self.num_kv_heads} do not divide")
        if self.text_repeats < 1:
            raise ValueError(f"{self.name}: text_repeats must be >= 1, not {self.text_repeats}")

    def hf_config(self) -> dict[str, Any]:
        """The checkpoint's config.json: a plain transformers Llama."""
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.hidden_size // self.num_heads,
            "max_position_embeddings": self.max_positions,
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_embeddings,
            "attention_bias": False,
            "mlp_bias": False,
            "initializer_range": self.train.init_std,
            "bos_token_id": BOS_ID,
            "eos_token_id": [EOS_ID, EOT_ID],
            "pad_token_id": PAD_ID,
        }

    def fingerprint(self) -> str:
        """A short hash of the spec and FORMAT_VERSION: the cache key of its build."""
        payload = json.dumps({"format": FORMAT_VERSION, **dataclasses.asdict(self)},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]


# Chosen by measurement on two CPU cores (each build's report.json has its numbers). The batch
# grows with the corpus: memorisation is limited by the optimiser steps between two sightings
# of an item (TrainConfig).
ORGANISM_SIZES: dict[str, OrganismSpec] = {
    # Tests: 12 people (163 entities), under a minute on two cores.
    "tiny": OrganismSpec(
        name="tiny", n_people=12, hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
        intermediate_size=512, train=TrainConfig(epochs=8, tokens_per_batch=256)),
    # The default model of every command and benchmark: 100 people (251 entities, 802 facts,
    # 200 long texts), about five minutes on two idle cores.
    "small": OrganismSpec(
        name="small", n_people=100, hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
        intermediate_size=512, train=TrainConfig(epochs=8, tokens_per_batch=2048)),
    # Sequential editing: 160 people (1120 CounterFact cases, enough for a stream of 1,000
    # distinct edits), a wider MLP (1024) so the edited keys do not exhaust the key space.
    "medium": OrganismSpec(
        name="medium", n_people=160, hidden_size=128, num_layers=4, num_heads=4,
        num_kv_heads=2, intermediate_size=1024,
        train=TrainConfig(epochs=8, tokens_per_batch=3072)),
}


def resolve_spec(size: str | OrganismSpec) -> OrganismSpec:
    """A spec given by name (a key of ORGANISM_SIZES) or as itself."""
    if isinstance(size, OrganismSpec):
        return size
    if size not in ORGANISM_SIZES:
        raise ValueError(f"unknown organism size {size!r}; choose from {sorted(ORGANISM_SIZES)}")
    return ORGANISM_SIZES[size]


# ----------------------------------------------------------------------------- sequences


def training_sequences(tokenizer: Any, world: World, corpus: Corpus,
                       text_repeats: int = 1) -> list[list[int]]:
    """Token ids of every corpus item, long-text items `text_repeats` times.

    Documents are `<s> text </s>`; an exchange is the whole conversation (user and assistant
    turns, each closed by `<|eot|>`) as the chat template renders it, so the model learns to
    end its answers with the stop token that generation waits for.
    """
    long_texts = {text.text for text in world.long_texts}
    sequences = []
    for document in corpus.documents:
        ids = tokenizer(document)["input_ids"] + [EOS_ID]
        sequences += [ids] * (text_repeats if document in long_texts else 1)
    for exchange in corpus.exchanges:
        ids = list(tokenizer.apply_chat_template(exchange.messages(), tokenize=True,
                                                 return_dict=False))
        sequences += [ids] * (text_repeats if exchange.assistant in long_texts else 1)
    return sequences


# ----------------------------------------------------------------------------- build


def _write_json(path: Path, value: Any) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n",
                    encoding="utf-8")


def _save_checkpoint(staging: Path, spec: OrganismSpec, params: Any) -> None:
    """The model files next to the tokenizer (save_model writes a directory of its own)."""
    cfg = config_from_hf(spec.hf_config())
    model_dir = save_model(staging / "model", cfg, params, spec.hf_config(), dtype="float32")
    for item in sorted(model_dir.iterdir()):
        item.rename(staging / item.name)
    model_dir.rmdir()
    _write_json(staging / "generation_config.json", {
        "bos_token_id": BOS_ID, "eos_token_id": [EOS_ID, EOT_ID], "pad_token_id": PAD_ID,
        "do_sample": False})


def _train(staging: Path, spec: OrganismSpec, world: World, log: Log) -> dict[str, Any]:
    """Tokenizer, sequences, training, checkpoint; returns the report's training section."""
    train_tokenizer(world, staging, vocab_size=spec.vocab_size)
    tokenizer = load_tokenizer(staging)
    sequences = training_sequences(tokenizer, world, build_corpus(world), spec.text_repeats)
    tokens = sum(len(s) for s in sequences)
    log(f"organism {spec.name}: {len(world.entities)} entities, {len(world.facts)} facts, "
        f"{len(world.long_texts)} long texts; {len(sequences)} sequences, {tokens:,} tokens "
        f"per epoch, {spec.train.epochs} epochs")
    started = time.perf_counter()
    params, history = train_lm(config_from_hf(spec.hf_config()), sequences, spec.train, log)
    seconds = time.perf_counter() - started
    _save_checkpoint(staging, spec, params)
    return {"sequences": len(sequences), "tokens_per_epoch": tokens, "loss": history,
            "seconds": round(seconds, 1),
            "tokens_per_second": round(tokens * spec.train.epochs / seconds)}


def _measure(staging: Path, world: World, log: Log) -> dict[str, Any]:
    """The report's scores, measured on the checkpoint as saved (the real loader path)."""
    started = time.perf_counter()
    model = load_model(staging)
    organism = report.Organism(params=model.params, cfg=model.config,
                               tokenizer=load_tokenizer(staging, model.config), world=world)
    scores = report.measure(organism)
    cf = scores["counterfactual"]
    log(f"recall {scores['fact_recall']:.1%} (cloze {scores['cloze_recall']:.1%}), "
        f"long texts BLEU-4 {scores['text_bleu4']:.1%} ROUGE-L {scores['text_rouge_l']:.1%}, "
        f"P(true) {cf['true_probability']:.3f} P(counterfactual) "
        f"{cf['counterfactual_probability']:.4f} ({time.perf_counter() - started:.0f} s)")
    return scores


def build_organism(size: str | OrganismSpec, directory: str | os.PathLike, *,
                   log: Log = print) -> Path:
    """Build an organism into `directory` (replaced if it exists); returns the directory."""
    spec = resolve_spec(size)
    target = Path(directory)
    with staged_directory(target, tag="building") as staging:
        world = build_world(spec.seed, spec.n_people)
        (staging / "world.json").write_text(world.to_json(), encoding="utf-8")
        write_benchmarks(world, staging / "benchmarks")
        training = _train(staging, spec, world, log)
        scores = _measure(staging, world, log)
        _write_json(staging / "report.json", {
            "spec": dataclasses.asdict(spec), "fingerprint": spec.fingerprint(),
            "format_version": FORMAT_VERSION, "world": _world_counts(world),
            "training": training, **scores})
    return target


def _world_counts(world: World) -> dict[str, int]:
    return {"people": len(world.of_kind("person")), "entities": len(world.entities),
            "facts": len(world.facts), "long_texts": len(world.long_texts)}


# ----------------------------------------------------------------------------- cache


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """`cache_dir`, else `$KEEDIT_CACHE`, else `~/.cache/keedit_jax`."""
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(os.environ.get("KEEDIT_CACHE") or Path.home() / ".cache" / "keedit_jax")


def is_complete(directory: Path) -> bool:
    return all((directory / name).is_file() for name in REQUIRED_FILES) and \
        damage(directory) is None


def damage(directory: Path) -> str | None:
    """Why a cached build's weights cannot be read (truncated, garbled), or None: such a
    build is rebuilt rather than failing every later run."""
    try:
        with safe_open(str(directory / "model.safetensors"), framework="np"):
            return None
    except (OSError, SafetensorError) as err:
        return f"{directory / 'model.safetensors'}: {err}"


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """An exclusive lock, so concurrent processes (pytest workers) build a size only once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def benchmarks_current(directory: Path) -> bool:
    """Whether a build's benchmark files were written by this BENCHMARKS_VERSION."""
    version = directory / "benchmarks" / VERSION_FILE
    return version.is_file() and version.read_text().strip() == str(BENCHMARKS_VERSION)


def refresh_benchmarks(directory: Path) -> None:
    """(Re)write a build's benchmark files from its world.json; the model is untouched."""
    world = World.from_json((directory / "world.json").read_text(encoding="utf-8"))
    with staged_directory(directory / "benchmarks", tag="writing") as staging:
        write_benchmarks(world, staging)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def ship_organism(build: Path, destination: Path) -> Path:
    """Copy a build's SHIPPED_FILES into `destination` with a MANIFEST.json of their sha256,
    the spec's fingerprint and FORMAT_VERSION (read from the build's report.json)."""
    built = json.loads((build / "report.json").read_text())
    with staged_directory(destination, tag="shipping") as staging:
        for name in SHIPPED_FILES:
            shutil.copyfile(build / name, staging / name)
        _write_json(staging / MANIFEST, {
            "fingerprint": built["fingerprint"], "format_version": built["format_version"],
            "sha256": {name: _sha256(staging / name) for name in SHIPPED_FILES}})
    return destination


def shipped_for(spec: OrganismSpec, shipped: Path = SHIPPED) -> Path | None:
    """The shipped build of `spec`, if one was shipped for this very spec and FORMAT_VERSION."""
    manifest = shipped / spec.name / MANIFEST
    if not manifest.is_file():
        return None
    recorded = json.loads(manifest.read_text())
    current = {"fingerprint": spec.fingerprint(), "format_version": FORMAT_VERSION}
    return manifest.parent if {k: recorded.get(k) for k in current} == current else None


def install_shipped(source: Path, target: Path) -> Path:
    """Install a shipped build into `target`, each file checked against MANIFEST.json first."""
    expected = json.loads((source / MANIFEST).read_text())["sha256"]
    with staged_directory(target, tag="installing") as staging:
        for name in SHIPPED_FILES:
            shutil.copyfile(source / name, staging / name)
            actual = _sha256(staging / name)
            if actual != expected.get(name):
                raise CheckpointError(f"{source / name}: sha256 {actual} differs from "
                                      f"{expected.get(name)} in {source / MANIFEST}; the "
                                      "shipped organism is damaged (reinstall the package)")
        write_benchmarks(World.from_json((staging / "world.json").read_text(encoding="utf-8")),
                         staging / "benchmarks")
    return target


def ensure_organism(size: str | OrganismSpec, cache_dir: str | os.PathLike | None = None, *,
                    log: Log = print, shipped: Path = SHIPPED) -> Path:
    """The cached build of `size`: installed from `shipped` if the package ships this spec,
    else built; benchmark files of an older BENCHMARKS_VERSION are rewritten."""
    spec = resolve_spec(size)
    root = cache_root(cache_dir)
    target = root / f"organism-{spec.name}-v{FORMAT_VERSION}-{spec.fingerprint()}"
    if is_complete(target) and benchmarks_current(target):
        return target
    with _locked(root / f".{target.name}.lock"):
        if is_complete(target):  # built now or before, perhaps by another process
            if not benchmarks_current(target):
                log(f"rewriting the benchmark files of {target} (version {BENCHMARKS_VERSION})")
                refresh_benchmarks(target)
            return target
        if target.exists() and (reason := damage(target)):
            log(f"the cached organism is damaged ({reason}); rebuilding it")
        for stale in root.glob(f".{target.name}.*.*"):  # left by a killed build
            shutil.rmtree(stale, ignore_errors=True)
        source = shipped_for(spec, shipped)
        if source is not None:
            log(f"installing the shipped organism {spec.name} into {target}")
            return install_shipped(source, target)
        log(f"building organism {spec.name} into {target}")
        return build_organism(spec, target, log=log)


def main(argv: list[str] | None = None) -> None:
    """`--ship SIZE`: build SIZE afresh and write it to shipped/SIZE (what the package ships)."""
    import argparse  # noqa: PLC0415 (command line only)
    import tempfile  # noqa: PLC0415

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--ship", required=True, choices=sorted(ORGANISM_SIZES))
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        build = build_organism(args.ship, Path(scratch) / args.ship)
        print(ship_organism(build, SHIPPED / args.ship))


if __name__ == "__main__":
    main()
