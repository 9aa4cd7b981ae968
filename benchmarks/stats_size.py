"""Does MEMIT's edit on SmolLM2 still depend on how much text its statistics saw?

The same real ZsRE edits (`configs/real/memit_zsre.cfg`, the first N records in batches of
10) with E[kkᵀ] from 250, 500 (the flagfile's) and 2000 documents of the default corpus
(wikipedia-vital, at most 256 tokens each: about 25k, 50k and 200k tokens). Each run is
the command line itself; a size whose results.json exists is not run again, and the
statistics are cached per size.

Run:      python -m benchmarks.stats_size [--num_edits 30]   (about 15 minutes on 2 cores)
Summary:  python -m benchmarks.stats_size --summary_only
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from keedit_jax.organism.build import cache_root
from keedit_jax.results import markdown_table

OUT = Path("benchmarks/results/real_smollm2/stats_size")
FLAGFILE = "configs/real/memit_zsre.cfg"
DOCUMENTS = (250, 500, 2000)
METRICS = {"efficacy": "rewrite_acc", "generalisation": "paraphrase_acc",
           "specificity": "neighborhood_acc"}


def run(documents: int, num_edits: int) -> None:
    if (OUT / f"docs{documents}" / "results.json").exists():
        return
    subprocess.run([sys.executable, "-m", "keedit_jax.main", f"--flagfile={FLAGFILE}",
                    f"--stats_samples={documents}", f"--num_edits={num_edits}",
                    f"--output_dir={OUT / f'docs{documents}'}"], check=True)


def statistic_tokens(documents: int) -> int:
    """The token count stored in the cached statistic of that many documents."""
    pattern = f"*/second_moments_wikipedia-vital-*_layers4-5-6-7-8_n{documents}_len256_float32.npz"
    files = list((cache_root() / "stats").glob(pattern))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one cached statistic of {documents} documents, "
                                f"found {[str(f) for f in files]}")
    return int(np.load(files[0])["count"])


def summary_row(documents: int) -> dict[str, object]:
    results = json.loads((OUT / f"docs{documents}" / "results.json").read_text())
    row: dict[str, object] = {"documents": documents, "tokens": statistic_tokens(documents),
                              "edits": len(results["diagnostics"]["requests"])}
    for name, key in METRICS.items():
        row[f"{name} pre"] = results["pre"][key][0]
        row[f"{name} post"] = results["post"][key][0]
    summary = results["diagnostics"]["summary"]
    row["realised share of δ"] = summary["realised"]
    row["edited target prob"] = summary["target_prob_edited"]
    row["s/edit steady"] = results["seconds_per_edit_steady"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num_edits", type=int, default=30)
    parser.add_argument("--summary_only", action="store_true")
    args = parser.parse_args()
    if not args.summary_only:
        for documents in DOCUMENTS:
            run(documents, args.num_edits)
    rows = [summary_row(d) for d in DOCUMENTS]
    (OUT / "summary.json").write_text(json.dumps(rows, indent=2))
    (OUT / "summary.md").write_text(markdown_table(rows))
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
