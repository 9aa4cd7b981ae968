"""Sequential editing on SmolLM2-135M-Instruct with the real ZsRE file: the summary of the runs.

Each run is one command (`configs/real/seq/<method>_zsre.cfg`: 300 ZsRE edits in batches of 50,
evaluated after every batch), run by hand one at a time on the CPU, e.g.

    nice /usr/bin/time -v -o benchmarks/results/real_smollm2/seq/memit_seq/time.txt \
        python -m keedit_jax.main --flagfile=configs/real/seq/memit_seq_zsre.cfg \
        --dataset=/path/to/zsre_mend_edit.json --general_tasks=/path/to/glue

This script only reads what the runs left in benchmarks/results/real_smollm2/seq/<method>/:
results.json of a finished run or, for a run stopped early, its partial.json (the curve and
batch times, rewritten after every batch), and `time.txt` (GNU time -v: wall time, peak RSS).
It writes summary.{json,md} (the final table: the edits so far after the last batch done, per
method, and s/edit; then every evaluation point) and curves.png.

Run:  python -m benchmarks.real_sequential
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any

import numpy as np

from keedit_jax.plots import CURVE_METRICS, plot_curves
from keedit_jax.results import markdown_table

OUT = Path("benchmarks/results/real_smollm2/seq")
METHODS = {  # directory (and configs/real/seq/<dir>_zsre.cfg) -> label
    "memit_seq": "MEMIT-seq",
    "alphaedit": "AlphaEdit",
    "memit": "MEMIT (naive)",
    "alphaedit_aligned": "AlphaEdit-aligned",
    "rect": "RECT (aligned)",
    "lyaplock": "LyapLock",
    "metake": "MetaKE",
}
EDIT_METRICS = ("efficacy", "generalisation", "specificity")
DRIFT_METRICS = ("perplexity", "top1_agreement")
TASKS = ("sst2", "mrpc", "cola", "rte", "nli", "mmlu")
BATCH = 50
EDITS = 300


def gnu_time(file: Path) -> dict[str, Any]:
    """Wall seconds and peak RSS (GiB) from `/usr/bin/time -v`'s report."""
    if not file.exists():
        return {}
    text = file.read_text()
    out: dict[str, Any] = {}
    wall = re.search(r"Elapsed \(wall clock\) time.*: ([\d:.]+)", text)
    if wall:
        seconds = 0.0
        for part in wall.group(1).split(":"):
            seconds = seconds * 60 + float(part)
        out["wall_s"] = round(seconds)
    rss = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    if rss:
        out["peak_rss_gib"] = round(int(rss.group(1)) / 2**20, 2)
    killed = re.search(r"Command terminated by signal (\d+)", text)
    status = re.search(r"Exit status: (\d+)", text)
    if killed:  # GNU time then reports "Exit status: 0"
        out["ended"] = f"signal {killed.group(1)}"
    elif status:
        out["ended"] = f"exit {status.group(1)}"
    return out


def load(directory: Path) -> dict[str, Any] | None:
    """{curve, seconds_per_batch, complete} of a finished or stopped run; None if nothing."""
    results = directory / "results.json"
    if results.exists():
        data = json.loads(results.read_text())
        return {"curve": data["curve"], "seconds": data["seconds_per_batch"], "complete": True}
    partial = directory / "partial.json"
    if not partial.exists():
        return None
    data = json.loads(partial.read_text())
    return {"curve": data["curve"], "seconds": data["seconds_per_batch"], "complete": False}


def rounded(value: Any) -> Any:
    return round(value, 4) if isinstance(value, float) else value


def summary(root: Path) -> tuple[list[dict], list[dict], dict[str, list]]:
    finals, points, curves = [], [], {}
    pre_row = None
    for name, label in METHODS.items():
        run = load(root / name)
        if run is None:
            continue
        curve = run["curve"]
        curves[label] = curve
        if pre_row is None:
            pre_row = {"method": "pre-edit", "edits": 0,
                       **{m: curve[0].get(m) for m in EDIT_METRICS + DRIFT_METRICS},
                       **{f"{t}_f1": curve[0].get(f"{t}_f1") for t in TASKS}}
        last = curve[-1]
        seconds = run["seconds"]
        steady = seconds[1:] or seconds
        finals.append({
            "method": label, "edits": last["edits"],
            **{m: last.get(m) for m in EDIT_METRICS + DRIFT_METRICS},
            **{f"{t}_f1": last.get(f"{t}_f1") for t in TASKS},
            "s/edit": round(float(np.mean(steady)) / BATCH, 2),
            "s/edit first batch": round(seconds[0] / BATCH, 2) if seconds else None,
            **gnu_time(root / name / "time.txt"),
            "status": "complete" if run["complete"] else
                      f"partial: {len(seconds)} of {EDITS // BATCH} batches"})
        points += [{"method": label, **{k: rounded(v) for k, v in p.items()},
                    "batch_s": round(seconds[p["edits"] // BATCH - 1], 1)
                    if 0 < p["edits"] <= BATCH * len(seconds) else ""} for p in curve]
    rows = ([pre_row] if pre_row else []) + finals
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return [{c: row.get(c, "") for c in columns} for row in rows], points, curves


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=str(OUT))
    args = parser.parse_args()
    root = Path(args.out)
    finals, points, curves = summary(root)
    if not finals:
        raise SystemExit(f"no results under {root}")
    (root / "summary.json").write_text(json.dumps({"final": finals, "curve": points},
                                                  indent=2))
    columns = ["method", "edits", *EDIT_METRICS, *DRIFT_METRICS]
    curve_rows = [{c: p.get(c, "") for c in columns + [f"{t}_f1" for t in TASKS] + ["batch_s"]}
                  for p in points]
    text = ("# Sequential ZsRE editing on SmolLM2-135M-Instruct (batches of 50)\n\n"
            "Final: the edits so far after the last batch done (metrics ×100; perplexity and "
            "top-1 agreement on 64 held-out wikipedia-vital documents; GLUE-style weighted F1 on "
            "25 examples per task). The pre-edit row scores all 300 requests on the unedited "
            "model; the other rows score the edits applied so far (the first `edits` records). "
            "s/edit: mean time of a batch after the first (which compiles), over 50; wall and "
            "peak RSS from GNU time -v (whole run, evaluations included).\n\n"
            + markdown_table(finals)
            + "\n## After every batch\n\n" + markdown_table(curve_rows))
    (root / "summary.md").write_text(text)
    try:
        plot_curves(curves, root / "curves.png",
                    CURVE_METRICS + tuple(f"{t}_f1" for t in TASKS),
                    "SmolLM2-135M-Instruct: sequential ZsRE edits, batches of 50")
    except ImportError:
        print("matplotlib not installed: no curves.png")
    print(text)


if __name__ == "__main__":
    main()
