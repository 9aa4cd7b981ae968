"""How much of a short run is compiling, first run against later ones (the persistent cache).

The README's main command cut to one edit (`configs/muke.cfg --num_edits=1`) is run `--runs`
times in fresh processes that share one new, empty JAX compilation cache
(`KEEDIT_JAX_CACHE`); the model, statistics and other caches are the usual ones, warmed by an
untimed run first so that only compilation differs between the runs. Each process sums JAX's
own monitoring durations: tracing to a jaxpr, lowering to MLIR, and the backend compile (which
on a persistent-cache hit is the cache read), and counts the cache hits. The share of wall
time is a ratio within one process, so the machine's load cancels out of it.

Run:  python -m benchmarks.compile_cache [--runs 2] [--flagfile configs/muke.cfg]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from keedit_jax.results import markdown_table

OUT = Path("benchmarks/results/compile_cache")
EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace_s",
          "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower_s",
          "/jax/core/compile/backend_compile_duration": "backend_compile_s"}
CACHE_HITS = "/jax/compilation_cache/cache_hits"

# Runs the command line in this process with JAX's monitoring listeners summing the compile
# events; the totals are written to argv[1] when the process exits (absl exits via SystemExit).
PROBE = """
import atexit, json, runpy, sys, collections
import jax.monitoring as monitoring
totals = collections.Counter()
monitoring.register_event_duration_secs_listener(
    lambda event, seconds, **_: totals.update({event: seconds}))
monitoring.register_event_listener(lambda event, **_: totals.update({event: 1}))
out = sys.argv[1]
atexit.register(lambda: open(out, "w").write(json.dumps(totals)))
sys.argv = ["keedit_jax.main", *sys.argv[2:]]
runpy.run_module("keedit_jax.main", run_name="__main__")
"""


def timed_run(args: list[str], jax_cache: Path, events: Path) -> dict[str, float]:
    """One command-line run in a fresh process: wall seconds and the compile totals."""
    env_cache = {"KEEDIT_JAX_CACHE": str(jax_cache)}
    began = time.perf_counter()
    subprocess.run([sys.executable, "-c", PROBE, str(events), *args], check=True,
                   env={**os.environ, **env_cache})
    wall = time.perf_counter() - began
    totals = json.loads(events.read_text())
    row = {"wall_s": round(wall, 1)}
    for event, name in EVENTS.items():
        row[name] = round(totals.get(event, 0.0), 1)
    compiling = sum(row[name] for name in EVENTS.values())
    row["compiling_s"] = round(compiling, 1)
    row["share_of_wall"] = round(compiling / wall, 3)
    row["cache_hits"] = int(totals.get(CACHE_HITS, 0))
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--flagfile", default="configs/muke.cfg")
    parser.add_argument("--num_edits", type=int, default=1)
    parser.add_argument("--runs", type=int, default=2)
    options = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        base = [f"--flagfile={options.flagfile}", f"--num_edits={options.num_edits}",
                f"--output_dir={Path(scratch) / 'out'}", "--overwrite"]
        subprocess.run([sys.executable, "-m", "keedit_jax.main", *base], check=True,
                       env={**os.environ, "KEEDIT_JAX_CACHE": "off"})  # warms the other caches
        jax_cache = Path(scratch) / "jax"
        rows = [{"run": number, **timed_run(base, jax_cache, Path(scratch) / f"{number}.json")}
                for number in range(1, options.runs + 1)]
    summary = {"command": f"python -m keedit_jax.main {' '.join(base[:2])}", "runs": rows,
               "second_to_first_compiling": round(rows[1]["compiling_s"]
                                                  / rows[0]["compiling_s"], 3)
               if len(rows) > 1 else None}
    (OUT / "summary.json").write_text(json.dumps(summary, indent=1))
    table = markdown_table(rows)
    (OUT / "summary.md").write_text(f"`{summary['command']}`, fresh JAX cache\n\n{table}\n")
    print(table)


if __name__ == "__main__":
    main()
