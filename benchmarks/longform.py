"""Long-form editing on the organism: every method on UnKEBench- and EditEverything-format files,
and μKE's objective ablation (specs/muke.md Table 1, Fig. 4, Fig. 5-6).

Each run is the command line itself (`configs/<method>.cfg`), so the tables measure what a
user runs. Scores are ×100: the papers' character BLEU, ROUGE-L recall ("BERTScore" needs the
all-MiniLM-L6-v2 weights, absent here), and standard sacreBLEU beside them.

Run:      python -m benchmarks.longform                 (about an hour on 2 cores)
Summary:  python -m benchmarks.longform --summary_only  (from the recorded results)
"""

from __future__ import annotations

import argparse
import json
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
METRICS = ("bleu_char", "rougeL_recall", "sacrebleu")
SUB_METRICS = ("rougeL_recall",)  # the sub-answers are short: the papers score ROUGE only


def run_dir(dataset: str, name: str) -> Path:
    return OUT / dataset / name.replace("*", "_star").replace("μ", "mu")


def run(config: str, dataset: str, name: str, *extra: str) -> None:
    out = run_dir(dataset, name)
    if (out / "results.json").exists():
        return
    subprocess.run([sys.executable, "-m", "keedit_jax.main", f"--flagfile={config}",
                    f"--dataset_format={dataset}", f"--output_dir={out}", *extra], check=True)


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
                for metric in (SUB_METRICS if group == "Sub" else METRICS):
                    value = results[stage].get(group, {}).get(metric)
                    row[f"{group} {metric}"] = None if value is None else 100 * value
            row["s/edit"] = results["seconds_per_edit_steady"] if stage == "post" else None
            row["failed"] = len(results["failed"]) if stage == "post" else None
            rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary_only", action="store_true")
    args = parser.parse_args()
    if not args.summary_only:
        for dataset in DATASETS:
            for name, config in CONFIGS.items():
                run(config, dataset, name)
        for strategy in ABLATIONS:
            run(CONFIGS["μKE"], "unkebench", f"ablation_{strategy}",
                f"--upstream_strategy={strategy}")
    tables = {
        "unkebench": rows_of("unkebench", list(CONFIGS), ("Ori.", "Para.", "Sub")),
        "editeverything": rows_of("editeverything", list(CONFIGS),
                                  ("Ori. code", "Ori. news", "Ori. poetry")),
        "ablation": rows_of("unkebench", [f"ablation_{s}" for s in ABLATIONS],
                            ("Ori.", "Para.", "Sub")),
    }
    (OUT / "summary.json").write_text(json.dumps(tables, indent=2))
    text = "".join(f"## {name}\n\n{markdown_table(rows)}\n" for name, rows in tables.items())
    (OUT / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
