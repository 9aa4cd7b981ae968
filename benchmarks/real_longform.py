"""The long-form methods on SmolLM2-135M-Instruct and the real UnKEBench file: the papers'
metrics pre and post, each method's gain per record, and the papers' comparisons (μKE −
AnyEdit, μKE* − AnyEdit*) per record, with standard errors.

The runs are the command line itself (`configs/real/<method>_unkebench.cfg`, the same 30
records); this reads their results.json, or a stopped run's partial.json (its finished
records, marked as such).

Run:      python -m benchmarks.real_longform            (hours on 2 cores: 30 records each)
Summary:  python -m benchmarks.real_longform --summary_only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.longform import paired_difference, per_record
from keedit_jax.results import markdown_table

OUT = Path("benchmarks/results/real_smollm2")
RUNS = {"μKE": "muke_unkebench", "AnyEdit": "anyedit_unkebench",
        "MEMIT": "memit_unkebench", "AlphaEdit": "alphaedit_unkebench",
        "UnKE": "unke_unkebench", "AnyEdit*": "anyedit_star_unkebench",
        "μKE*": "muke_star_unkebench"}
COMPARISONS = (("μKE", "AnyEdit"), ("μKE*", "AnyEdit*"), ("μKE", "MEMIT"), ("μKE", "UnKE"))
METRICS = ("bleu_char", "bert_score", "rougeL_recall")
GROUPS = ("Ori.", "Para.", "Sub")


def run(name: str) -> None:
    out = OUT / RUNS[name]
    if not (out / "results.json").exists():
        subprocess.run([sys.executable, "-m", "keedit_jax.main",
                        f"--flagfile=configs/real/{RUNS[name]}.cfg", f"--output_dir={out}"],
                       check=True)


def load(name: str) -> dict | None:
    """A run's results.json, else its partial.json (status "partial"), else None."""
    directory = OUT / RUNS[name]
    for file, status in (("results.json", "complete"), ("partial.json", "partial")):
        if (directory / file).exists():
            return {**json.loads((directory / file).read_text()), "status": status}
    return None


def method_row(label: str, results: dict, stage: str) -> dict[str, object]:
    """The mean over records of each group's metric (Sub within a record first), as the
    protocol's table, from the per-record answers."""
    row: dict[str, object] = {"method": label}
    for group in GROUPS:
        for metric in METRICS:
            values = per_record(results, group, metric, stage)
            if values:
                row[f"{group} {metric}"] = 100 * float(np.mean(list(values.values())))
    row["records"] = len(per_record(results, "Ori.", METRICS[0], stage))
    seconds = results["seconds_per_batch"] if stage == "post" else None
    row["s/edit"] = seconds and float(np.mean(seconds[1:] or seconds))
    row["status"] = results["status"] if stage == "post" else ""
    return row


def paired_row(a: dict[int, float], b: dict[int, float], label: str, group: str,
               metric: str) -> dict[str, object] | None:
    difference = paired_difference(a, b)
    return difference and {"comparison": label, "group": group, "metric": metric, **difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary_only", action="store_true")
    args = parser.parse_args()
    if not args.summary_only:
        for name in RUNS:
            run(name)
    results = {name: r for name in RUNS if (r := load(name)) is not None}
    complete = next(r for r in results.values() if r["status"] == "complete")
    table = [method_row("pre-edit", complete, "pre")]
    table += [method_row(name, r, "post") for name, r in results.items()]
    pairs = []
    for group in GROUPS:
        for metric in METRICS:
            post = {name: per_record(r, group, metric) for name, r in results.items()}
            rows = [paired_row(post[name], per_record(r, group, metric, "pre"),
                               f"{name} post − pre", group, metric)
                    for name, r in results.items()]
            rows += [paired_row(post[a], post[b], f"{a} − {b}", group, metric)
                     for a, b in COMPARISONS if a in post and b in post]
            pairs += [row for row in rows if row]
    (OUT / "longform_summary.json").write_text(json.dumps({"table": table, "paired": pairs},
                                                          indent=2))
    text = markdown_table(table) + "\n" + markdown_table(pairs)
    (OUT / "longform_summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
