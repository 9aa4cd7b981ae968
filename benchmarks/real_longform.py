"""The long-form methods on SmolLM2-135M-Instruct and a real long-form file (UnKEBench, the
hallucination set): the papers' metrics pre and post, each method's gain per record, the
papers' comparisons (μKE − AnyEdit, μKE* − AnyEdit*) per record with standard errors, and
where each edit stopped (the per-window diagnostics: the answer's probability unedited, with
the shifts, edited; the share of δ the update realises).

The runs are the command line itself (`configs/real/<method>_<dataset>.cfg`, the same 30
records per dataset, every method with such a flagfile); this reads their results.json, or a
stopped run's partial.json (its finished records, marked as such).

Run:      python -m benchmarks.real_longform [--dataset=hallucination]   (hours on 2 cores)
Summary:  python -m benchmarks.real_longform --summary_only [--dataset=...]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from benchmarks.longform import paired_difference, per_record
from keedit_jax.methods.run_unstructured import window_summary
from keedit_jax.results import markdown_table

OUT = Path("benchmarks/results/real_smollm2")
SLUGS = {"μKE": "muke", "AnyEdit": "anyedit", "MEMIT": "memit", "AlphaEdit": "alphaedit",
         "UnKE": "unke", "AnyEdit*": "anyedit_star", "μKE*": "muke_star"}
DATASETS = ("unkebench", "hallucination")
COMPARISONS = (("μKE", "AnyEdit"), ("μKE*", "AnyEdit*"), ("μKE", "MEMIT"), ("AnyEdit", "MEMIT"),
               ("μKE", "AlphaEdit"), ("μKE", "UnKE"))
METRICS = ("bleu_char", "bert_score", "rougeL_recall")
GROUPS = ("Ori.", "Para.", "Sub")


def runs(dataset: str) -> dict[str, str]:
    """Each method with a flagfile for the dataset: its run's name."""
    return {label: f"{slug}_{dataset}" for label, slug in SLUGS.items()
            if Path(f"configs/real/{slug}_{dataset}.cfg").exists()}


def run(name: str) -> None:
    out = OUT / name
    if not (out / "results.json").exists():
        subprocess.run([sys.executable, "-m", "keedit_jax.main",
                        f"--flagfile=configs/real/{name}.cfg", f"--output_dir={out}"],
                       check=True)


def load(name: str) -> dict | None:
    """A run's results.json, else its partial.json (status "partial"), else None."""
    directory = OUT / name
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


def diagnosis_row(label: str, results: dict) -> dict[str, object] | None:
    """Medians over the edits of the answer's teacher-forced probability unedited, with every
    δ* injected and edited, and the mean share of δ realised (runs with diagnostics only)."""
    rows = results.get("diagnostics")
    if not rows:
        return None
    s = window_summary(rows)
    return {"method": label, "edits": s["edits"], "windows": s["windows"],
            "answer prob unedited": s["answer_prob_before"],
            "with δ*": s["answer_prob_with_delta"], "edited": s["answer_prob_edited"],
            "realised": s["realised"], "at clamp": s["at_clamp"]}


def answer_probs(results: dict) -> dict[str, dict[str, float]]:
    """Per record: the answer's probability with the shifts and edited (window diagnostics)."""
    return {key: {r["case_id"]: r[key] for r in results["diagnostics"]}
            for key in ("answer_prob_with_delta", "answer_prob_edited")}


def paired_row(a: dict[int, float], b: dict[int, float], label: str, group: str,
               metric: str) -> dict[str, object] | None:
    difference = paired_difference(a, b)
    return difference and {"comparison": label, "group": group, "metric": metric, **difference}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary_only", action="store_true")
    parser.add_argument("--dataset", choices=DATASETS, default="unkebench")
    args = parser.parse_args()
    named = runs(args.dataset)
    if not args.summary_only:
        for name in named.values():
            run(name)
    results = {label: r for label, name in named.items() if (r := load(name)) is not None}
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
    for a, b in COMPARISONS:  # the teacher-forced answer probability, per record
        if results.get(a, {}).get("diagnostics") and results.get(b, {}).get("diagnostics"):
            first, second = (answer_probs(results[name]) for name in (a, b))
            pairs += [row for key in first if (row := paired_row(
                first[key], second[key], f"{a} − {b}", "target", key))]
    diagnosis = [row for name, r in results.items() if (row := diagnosis_row(name, r))]
    summary = OUT / f"longform_summary_{args.dataset}"
    summary.with_suffix(".json").write_text(json.dumps(
        {"table": table, "paired": pairs, "diagnosis": diagnosis}, indent=2))
    text = "\n".join(markdown_table(rows) for rows in (table, pairs, diagnosis) if rows)
    summary.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
