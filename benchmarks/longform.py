"""Long-form editing on the organism: every method on UnKEBench- and EditEverything-format files,
and μKE's objective ablation (docs/references.md: muke Table 1, Fig. 4, Fig. 5-6).

Each run is the command line itself (`configs/<method>.cfg`, with `--num_edits=50`), so the
tables measure what a user runs. Scores are ×100: the fact-level scores (new facts stated, old
facts leaked, unchanged facts kept; `eval.fact_metrics`), the papers' character BLEU, ROUGE-L
recall ("BERTScore" needs the all-MiniLM-L6-v2 weights, absent here), and standard sacreBLEU
beside them; `paired` compares two methods per record with a standard error.

Run:      python -m benchmarks.longform [--methods μKE AnyEdit] [--datasets unkebench]
Summary:  python -m benchmarks.longform --summary_only  (from the recorded results)
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from pathlib import Path

from keedit_jax.results import markdown_table

OUT = Path("benchmarks/results/longform_organism")
CONFIGS = {"MEMIT": "configs/longform/memit.cfg", "AlphaEdit": "configs/longform/alphaedit.cfg",
           "AnyEdit": "configs/anyedit.cfg", "μKE": "configs/muke.cfg",
           "UnKE": "configs/unke.cfg", "AnyEdit*": "configs/anyedit_star.cfg",
           "μKE*": "configs/muke_star.cfg"}
DATASETS = {"unkebench": "unkebench", "editeverything": "editeverything"}
ABLATIONS = ("parallel_nll", "sequential_nll", "matryoshka_vanilla", "matryoshka_affinity")
NUM_EDITS = 50
FACTS = ("fact_efficacy", "fact_leak", "fact_kept")
METRICS = (*FACTS, "bleu_char", "rougeL_recall", "sacrebleu")
SUB_METRICS = (*FACTS, "rougeL_recall")  # the sub-answers are short: the papers score ROUGE
KEPT_SUB = "Sub, unchanged facts"
GROUP_METRICS = {"Sub": SUB_METRICS, KEPT_SUB: ("fact_kept", "rougeL_recall")}
PAIRS = (("μKE", "AnyEdit"), ("μKE*", "AnyEdit*"))


def run_dir(dataset: str, name: str) -> Path:
    return OUT / dataset / name.replace("*", "_star").replace("μ", "mu")


def run(config: str, dataset: str, name: str, *extra: str, num_edits: int = NUM_EDITS) -> None:
    out = run_dir(dataset, name)
    if (out / "results.json").exists():
        return
    subprocess.run([sys.executable, "-m", "keedit_jax.main", f"--flagfile={config}",
                    f"--dataset_format={dataset}", f"--output_dir={out}",
                    f"--num_edits={num_edits}", *extra], check=True)


def rows_of(dataset: str, names: list[str], groups: tuple[str, ...]) -> list[dict]:
    """One row per method (and a pre-edit row from the first run), group × metric columns."""
    rows = []
    for i, name in enumerate(names):
        path = run_dir(dataset, name) / "results.json"
        if not path.exists():
            continue
        results = json.loads(path.read_text())
        for stage, label in (("pre", "pre-edit"), ("post", name)):
            if stage == "pre" and i:
                continue
            row: dict[str, object] = {"method": label}
            for group in groups:
                for metric in GROUP_METRICS.get(group, METRICS):
                    value = results[stage].get(group, {}).get(metric)
                    row[f"{group} {metric}"] = None if value is None else 100 * value
            row["s/edit"] = results["seconds_per_edit_steady"] if stage == "post" else None
            row["failed"] = len(results["failed"]) if stage == "post" else None
            rows.append(row)
    return rows


def per_record(results: dict, group: str, metric: str, stage: str = "post") -> dict[int, float]:
    """A run's `metric` per record at `stage` (pre or post; Sub: the mean of its sub-questions)."""
    values: dict[int, list[float]] = {}
    for row in results["answers"][stage]:
        if row["group"] == group and metric in row:
            values.setdefault(row["record"], []).append(row[metric])
    return {record: sum(v) / len(v) for record, v in values.items()}


def paired_difference(first: dict[int, float], second: dict[int, float]) -> dict | None:
    """Mean per-record difference first − second (×100), its standard error and the number of
    shared records; None below two."""
    diffs = [100 * (first[r] - second[r]) for r in first if r in second]
    if len(diffs) < 2:
        return None
    mean = sum(diffs) / len(diffs)
    se = math.sqrt(sum((d - mean) ** 2 for d in diffs) / (len(diffs) - 1) / len(diffs))
    return {"mean difference": mean, "SE": se, "records": len(diffs)}


def paired(dataset: str, a: str, b: str, group: str, metric: str) -> dict | None:
    """`paired_difference` of two runs' post-edit `metric`."""
    paths = [run_dir(dataset, name) / "results.json" for name in (a, b)]
    if not all(p.exists() for p in paths):
        return None
    first, second = (per_record(json.loads(p.read_text()), group, metric) for p in paths)
    difference = paired_difference(first, second)
    return difference and {"comparison": f"{a} − {b}", "group": group, "metric": metric,
                           **difference}


def comparisons(dataset: str, groups: tuple[str, ...]) -> list[dict]:
    rows = [paired(dataset, a, b, group, metric) for a, b in PAIRS for group in groups
            for metric in ("fact_efficacy", "fact_leak", "fact_kept", "bleu_char")]
    return [row for row in rows if row]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary_only", action="store_true")
    parser.add_argument("--methods", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=list(DATASETS))
    parser.add_argument("--ablations", action="store_true", help="also μKE's objectives")
    parser.add_argument("--num_edits", type=int, default=NUM_EDITS)
    args = parser.parse_args()
    if not args.summary_only:
        for dataset in args.datasets:
            for name in args.methods:
                run(CONFIGS[name], dataset, name, num_edits=args.num_edits)
        for strategy in ABLATIONS if args.ablations else ():
            run(CONFIGS["μKE"], "unkebench", f"ablation_{strategy}",
                f"--upstream_strategy={strategy}", num_edits=args.num_edits)
    tables = {
        "unkebench": rows_of("unkebench", list(CONFIGS), ("Ori.", "Para.", "Sub", KEPT_SUB)),
        "editeverything": rows_of("editeverything", list(CONFIGS),
                                  ("Ori. code", "Ori. news", "Ori. poetry")),
        "ablation": rows_of("unkebench", [f"ablation_{s}" for s in ABLATIONS],
                            ("Ori.", "Para.", "Sub")),
        "paired (unkebench)": comparisons("unkebench", ("Ori.", "Para.", "Sub")),
        "paired (editeverything)": comparisons("editeverything", ("Ori.",)),
    }
    (OUT / "summary.json").write_text(json.dumps(tables, indent=2))
    text = "".join(f"## {name}\n\n{markdown_table(rows)}\n" for name, rows in tables.items())
    (OUT / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
