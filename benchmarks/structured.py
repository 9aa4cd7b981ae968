"""MEMIT, AlphaEdit, PMET, BLUE and GRACE on the organism: 100 CounterFact edits at batch
sizes 1, 10, 100.

Each run is the command line itself (`configs/<method>.cfg` with `--edit_batch_size`), so the
table measures what a user runs. Per-edit time is the steady state: the first batch, which
compiles, is left out.

Run:      python -m benchmarks.structured                 (about 15 minutes on 2 cores)
Summary:  python -m benchmarks.structured --summary_only  (from the recorded results)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from keedit_jax.results import markdown_table

OUT = Path("benchmarks/results/structured_organism")
METHODS = ("memit", "alphaedit", "pmet", "memit_blue", "alphaedit_blue", "grace")
BATCH_SIZES = (1, 10, 100)
METRICS = {"efficacy": "rewrite_success", "generalisation": "paraphrase_success",
           "specificity": "neighborhood_success", "fluency": "ngram_entropy"}


def run(method: str, batch_size: int) -> None:
    subprocess.run([sys.executable, "-m", "keedit_jax.main", f"--flagfile=configs/{method}.cfg",
                    f"--edit_batch_size={batch_size}",
                    f"--output_dir={OUT / f'{method}_bs{batch_size}'}", "--overwrite"], check=True)


def summary_row(method: str, batch_size: int) -> dict[str, object]:
    results = json.loads((OUT / f"{method}_bs{batch_size}" / "results.json").read_text())
    row: dict[str, object] = {"method": method, "batch": batch_size}
    for name, key in METRICS.items():
        row[f"{name} pre"] = results["pre"][key][0]
        row[f"{name} post"] = results["post"][key][0]
    row["s/edit"] = results["seconds_per_edit_steady"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary_only", action="store_true")
    parser.add_argument("--methods", nargs="*", default=METHODS, choices=METHODS,
                        help="run only these (the summary reads every method's results)")
    args = parser.parse_args()
    for method in args.methods:
        for batch_size in BATCH_SIZES:
            if not args.summary_only:
                run(method, batch_size)
    rows = [summary_row(m, b) for m in METHODS for b in BATCH_SIZES]
    (OUT / "summary.json").write_text(json.dumps(rows, indent=2))
    (OUT / "summary.md").write_text(markdown_table(rows))
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
