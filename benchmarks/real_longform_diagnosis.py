"""Where each long-form method's edit of SmolLM2 stops on real UnKEBench records: per record,
the answer's teacher-forced probability on the unedited model, with the method's shifts δ*
injected (what the upstream reached) and under the edited weights (what generation sees), and
the share of δ the update realises at each window's position. Edits only (no generation), each
record alone on the unedited model, as `configs/real/<method>_unkebench.cfg` does.

Run:  python -m benchmarks.real_longform_diagnosis [--records 3] [--methods memit muke anyedit]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import keedit_jax as ke
from benchmarks.common import log, write_summary
from keedit_jax.data import read_longform
from keedit_jax.methods.run_unstructured import select_records, window_summary
from keedit_jax.models import LoadedModel

OUT = Path("benchmarks/results/real_smollm2/longform_diagnosis_unkebench")
DATASET = "../shared/data/unkebench_final_data_v2.json"


def diagnose(model: LoadedModel, method: str, records: list) -> list[dict]:
    """Each record's window diagnostics under the method's real-model flagfile."""
    hparams = ke.hparams_from_flagfile(f"configs/real/{method}_unkebench.cfg")
    rows = []
    for record in records:
        result = ke.edit(model, [record], method=method, **hparams)
        rows += result.report["diagnostics"]["windows"]
        log(f"{method} record {record.case_id}: answer prob {rows[-1]['answer_prob_before']:.3f}"
            f" -> {rows[-1]['answer_prob_with_delta']:.3f} with δ -> "
            f"{rows[-1]['answer_prob_edited']:.3f} edited")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["memit", "muke", "anyedit"])
    args = parser.parse_args()
    model = ke.load("smollm2-135m-instruct")
    records = select_records(read_longform(DATASET, "unkebench"), 30)[: args.records]
    raw = {method: diagnose(model, method, records) for method in args.methods}
    rows = [{"method": method, **window_summary(diagnostics)}
            for method, diagnostics in raw.items()]
    write_summary(OUT, rows, raw, records=[str(r.case_id) for r in records])


if __name__ == "__main__":
    main()
