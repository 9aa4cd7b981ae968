"""Results on disk: results.json, a readable results.md, and the resolved config beside them.

Files are written to temporaries and renamed, so an interrupted run leaves either the previous
results or the new ones, never a half-written file.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from keedit_jax.files import atomic_write

SIGNED = frozenset({"Δ"})  # columns of differences, written with their sign


def _cell(value: Any, signed: bool) -> str:
    if isinstance(value, float):
        return f"{value:+.4g}" if signed else f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[Mapping[str, Any]]) -> str:
    """A markdown table of rows sharing their keys; floats to 4 significant digits, those of
    SIGNED columns with their sign."""
    if not rows:
        return ""
    columns = list(rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(row.get(c, ""), c in SIGNED) for c in columns) + " |"
              for row in rows]
    return "\n".join(lines) + "\n"


def _quoted(text: str) -> str:
    return "\n".join(f"> {line}" for line in (text or "(empty)").splitlines())


def markdown_report(results: Mapping[str, Any]) -> str:
    """results.md: title, table, the verdict lines and example answers where the run has them
    (long-form runs: `verdicts` and `examples` of question, target, pre and post)."""
    parts = [f"# {results.get('title', 'keedit_jax results')}\n", markdown_table(
        results.get("table", []))]
    if results.get("verdicts"):
        parts.append("".join(f"- {line}\n" for line in results["verdicts"]))
    for i, example in enumerate(results.get("examples", []), start=1):
        parts.append(f"### Example {i}: {example['question']}\n\n" + "\n\n".join(
            f"{label}:\n\n{_quoted(example[key])}" for key, label in
            (("target", "Target"), ("pre", "Before the edit"), ("post", "After the edit")))
            + "\n")
    return "\n".join(parts)


def write_results(directory: Path, config: Mapping[str, Any],
                  results: Mapping[str, Any]) -> list[Path]:
    """Write config.json, results.json and results.md (`markdown_report`)."""
    return [
        atomic_write(directory / "config.json", json.dumps(config, indent=2, sort_keys=True)),
        atomic_write(directory / "results.json", json.dumps(results, indent=2, sort_keys=True)),
        atomic_write(directory / "results.md", markdown_report(results)),
    ]
