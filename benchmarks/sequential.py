"""Sequential editing on the organism: 1,000 CounterFact edits in batches of 100, per editor.

Each run is the command line itself (`configs/memit_seq.cfg` and the flagfiles that include
it), so the curves measure what a user runs: efficacy, generalisation and specificity of the
edits so far, perplexity drift and top-1 agreement on the organism's text, every 2 batches;
the final table evaluates every edit on the final model (with fluency). The time per batch
comes from the same runs (the first, which compiles, left out).

Run:      python -m benchmarks.sequential                 (about 1 hour on 2 cores)
          python -m benchmarks.sequential --editors MEMIT-seq,LyapLock
Summary:  python -m benchmarks.sequential --summary_only  (from the recorded results)
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

from keedit_jax.plots import plot_curves
from keedit_jax.results import markdown_table

OUT = Path("benchmarks/results/sequential_organism")
EDITORS = {  # label -> flagfile
    "MEMIT (naive)": "configs/sequential/memit.cfg",
    "MEMIT-seq": "configs/memit_seq.cfg",
    "AlphaEdit": "configs/sequential/alphaedit.cfg",
    "AlphaEdit-aligned": "configs/alphaedit_aligned.cfg",
    "LyapLock": "configs/lyaplock.cfg",
    "RECT (aligned)": "configs/sequential/rect.cfg",
    "RECT (no correction)": "configs/sequential/rect_no_correction.cfg",
    "Memorize-the-latest": "configs/memorize_latest.cfg",
    "MetaKE": "configs/metake.cfg",
    "SPHERE": "configs/sphere.cfg",
    "GRACE": "configs/grace_seq.cfg",
}
COLUMNS = ("efficacy", "generalisation", "specificity", "fluency", "perplexity",
           "top1_agreement")


def directory(label: str, root: Path = OUT) -> Path:
    """configs/x.cfg -> root/x; configs/sequential/x.cfg -> root/sequential_x."""
    flagfile = Path(EDITORS[label])
    prefix = "sequential_" if flagfile.parent.name == "sequential" else ""
    return root / f"{prefix}{flagfile.stem}"


def run(label: str, root: Path) -> None:
    out = directory(label, root)
    subprocess.run([sys.executable, "-m", "keedit_jax.main", f"--flagfile={EDITORS[label]}",
                    f"--output_dir={out}", "--noresume", "--overwrite"], check=True)
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # tens of MB; not a record
    (out / "edited_layers.safetensors").unlink(missing_ok=True)


def summary_row(label: str, results: dict) -> dict[str, object]:
    post = {row["metric"]: row["post"] for row in results["table"]}
    seconds = results["seconds_per_batch"][1:]
    row: dict[str, object] = {"editor": label}
    row.update({c: post.get(c) for c in COLUMNS})
    row["s/batch first"] = float(np.mean(seconds[:2]))
    row["s/batch last"] = float(np.mean(seconds[-2:]))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--summary_only", action="store_true")
    parser.add_argument("--editors", default=",".join(EDITORS),
                        help="comma-separated labels of EDITORS to run")
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    root = Path(args.out)
    labels = [label for label in args.editors.split(",") if label]
    unknown = sorted(set(labels) - set(EDITORS))
    if unknown:
        raise SystemExit(f"unknown editors {unknown}; choose from {list(EDITORS)}")
    if not args.summary_only:
        for label in labels:
            run(label, root)
    results = {label: json.loads((directory(label, root) / "results.json").read_text())
               for label in EDITORS if (directory(label, root) / "results.json").exists()}
    pre = {row["metric"]: row["pre"] for row in next(iter(results.values()))["table"]}
    rows = [{"editor": "pre-edit", **{c: pre.get(c) for c in COLUMNS},
             "s/batch first": "", "s/batch last": ""}]
    rows += [summary_row(label, r) for label, r in results.items()]
    (root / "summary.json").write_text(json.dumps(rows, indent=2))
    (root / "summary.md").write_text(markdown_table(rows))
    plot_curves({label: r["curve"] for label, r in results.items()}, root / "curves.png",
                title="1,000 sequential CounterFact edits on the organism (batches of 100)")
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
