"""μKE and AnyEdit on SmolLM2-135M-Instruct and the real UnKEBench file: the papers' metrics
pre and post, each method's gain per record and μKE − AnyEdit per record, with standard errors.

The runs are the command line itself (`configs/real/{muke,anyedit}_unkebench.cfg`, the same
records); this reads their results.json files.

Run:      python -m benchmarks.real_longform            (about 3 hours on 2 cores: 30 records each)
Summary:  python -m benchmarks.real_longform --summary_only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from benchmarks.longform import paired_difference, per_record
from keedit_jax.results import markdown_table

OUT = Path("benchmarks/results/real_smollm2")
RUNS = {"μKE": "muke_unkebench", "AnyEdit": "anyedit_unkebench"}
METRICS = ("bleu_char", "bert_score", "rougeL_recall")
GROUPS = ("Ori.", "Para.", "Sub")


def run(name: str) -> None:
    out = OUT / RUNS[name]
    if not (out / "results.json").exists():
        subprocess.run([sys.executable, "-m", "keedit_jax.main",
                        f"--flagfile=configs/real/{RUNS[name]}.cfg", f"--output_dir={out}"],
                       check=True)


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
    results = {name: json.loads((OUT / run / "results.json").read_text())
               for name, run in RUNS.items()}
    table, pairs = [], []
    for i, (name, r) in enumerate(results.items()):
        stages = (("pre", "pre-edit"), ("post", name)) if i == 0 else (("post", name),)
        for stage, label in stages:
            row: dict[str, object] = {"method": label}
            for group in GROUPS:
                for metric in METRICS:
                    value = r[stage].get(group, {}).get(metric)
                    if value is not None:
                        row[f"{group} {metric}"] = 100 * value
            row["s/edit"] = r["seconds_per_edit_steady"] if stage == "post" else None
            table.append(row)
    for group in GROUPS:
        for metric in METRICS:
            post = {name: per_record(r, group, metric) for name, r in results.items()}
            if not all(post.values()):
                continue
            rows = [paired_row(post[name], per_record(r, group, metric, "pre"),
                               f"{name} post − pre", group, metric) for name, r in results.items()]
            rows.append(paired_row(post["μKE"], post["AnyEdit"], "μKE − AnyEdit", group, metric))
            pairs += [row for row in rows if row]
    (OUT / "longform_summary.json").write_text(json.dumps({"table": table, "paired": pairs},
                                                          indent=2))
    text = markdown_table(table) + "\n" + markdown_table(pairs)
    (OUT / "longform_summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
