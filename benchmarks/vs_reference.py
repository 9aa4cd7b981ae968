"""Side by side with the reference: our API's and command line's time per edit against a
reference-style variant of the same edit that we control.

The authors' code is not vendored (benchmarks/README.md says how to run it beside this). What
we reproduce of it is the edit loop's choices (`latency.reference_shifts`,
`reference_windows`, `reference_affinities`: Python-stepped with a host read per step where
the loop is MEMIT's, every layer at every step, logits at every position, μKE's affinity
gradients one per figure). They are swapped into the library's own pipelines for the time of
one `keedit_jax.edit` call, so both variants make the same call, share everything else
(templates, statistics, the solve) and must give the same δ and edited weights (checked).
μKE's affinity cache is bypassed in both: each edit computes them, as for a record not seen
before (a repeated record would read them).

Per method, in one process: a warm-up `keedit_jax.edit` as shipped (it compiles and warms the
statistics and affinity caches the command line reads), then the two variants in interleaved
rounds (`common.time_interleaved`). Then the same edit through the command line in fresh
processes (`compile_cache.timed_run`): first with an empty JAX compilation cache, then warm.

Run (one thread, as the recorded figures):
  XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' \\
    taskset -c 1 python -m benchmarks.vs_reference --out benchmarks/results/vs_reference_cpu
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import jax
import numpy as np

import keedit_jax as ke
from benchmarks import common, compile_cache, latency
from keedit_jax.data import LongFormRecord
from keedit_jax.methods import run_unstructured, structured, unstructured
from keedit_jax.models import down_proj_path, get_path
from keedit_jax.upstream import optimise_shifts
from keedit_jax.upstream.longform import pack_windows
from keedit_jax.upstream.windowed import compute_affinities, optimise_windows

Json = dict[str, Any]
THREAD_FLAGS = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


@dataclasses.dataclass(frozen=True)
class Setup:
    """One method's edit: its shipped flagfile, the organism file whose records the command
    line picks (the first ones, or long form's seeded choice), how many go in one batch, and
    the flags that cut the flagfile down (stated in the output)."""

    flagfile: str
    dataset: str
    edits: int
    reductions: tuple[str, ...] = ()


SETUPS = {
    "memit": Setup("configs/memit.cfg", "counterfact.json", 4),
    "anyedit": Setup("configs/anyedit.cfg", "unkebench.json", 1),
    "muke": Setup("configs/muke.cfg", "unkebench.json", 1),
}
# The command line evaluates after editing; a short generation keeps its wall about the edit.
CLI_FLAGS = ("--max_new_tokens=16",)


def hparams(setup: Setup, scratch: Path) -> dict[str, Any]:
    """The API's keyword arguments: the flagfile's with the reductions over them, read by the
    flag parser as the command line reads them (a flagfile that includes the shipped one)."""
    reduced = scratch / "reduced.cfg"
    reduced.write_text("\n".join([f"--flagfile={Path(setup.flagfile).resolve()}",
                                  *setup.reductions]) + "\n")
    return ke.hparams_from_flagfile(reduced)


def chosen_records(lm: Any, setup: Setup) -> list[Any]:
    """The records the command line edits with --num_edits=setup.edits."""
    records = ke.read_records(lm.path / "benchmarks" / setup.dataset)
    if isinstance(records[0], LongFormRecord):
        return run_unstructured.select_records(records, setup.edits)
    return records[: setup.edits]


@dataclasses.dataclass
class Last:
    """A variant's last δ and edited parameters, for the agreement check."""

    delta: jax.Array | None = None
    params: Any = None


def keeping(step: Callable[..., Any], last: Last) -> Callable[..., Any]:
    """`step` (an upstream optimisation) that keeps its result's δ in `last`."""
    def call(*args: Any, **kwargs: Any) -> Any:
        result = step(*args, **kwargs)
        last.delta = result.delta
        return result

    return call


def fresh_affinity(reference: bool) -> Callable[..., Any]:
    """`run_unstructured.batch_affinity` without its cache: μKE's up-front affinities computed
    in every edit, the library's way or the reference's."""
    def batch_affinity(params: Any, cfg: Any, edits: Sequence[Any], config: Any, pad_id: int,
                       checkpoint: Path) -> jax.Array | None:
        del checkpoint  # names the cache entry, which is bypassed
        if not (config.window.uses_affinity and config.window.affinity_context == "upfront"):
            return None
        compute = latency.reference_affinities if reference else compute_affinities
        return compute(params, cfg, pack_windows(edits, pad_id), config.target, config.window)

    return batch_affinity


@contextlib.contextmanager
def upstream(reference: bool, last: Last) -> Iterator[None]:
    """The library's pipelines with the reference-style upstream steps swapped in (or their
    own, `reference` False), μKE's affinity cache bypassed, and each δ kept in `last`."""
    shifts = latency.reference_shifts if reference else optimise_shifts
    windows = latency.reference_windows if reference else optimise_windows
    with (mock.patch.object(structured, "optimise_shifts", keeping(shifts, last)),
          mock.patch.object(unstructured, "optimise_windows", keeping(windows, last)),
          mock.patch.object(run_unstructured, "batch_affinity", fresh_affinity(reference))):
        yield


def edit_call(lm: Any, records: list[Any], method: str, chosen: dict[str, Any],
              reference: bool, last: Last) -> Callable[[], Any]:
    """One `keedit_jax.edit` of `records` through the variant; returns the edited params."""
    def call() -> Any:
        with upstream(reference, last):
            last.params = ke.edit(lm, records, method=method, **chosen).params
        return last.params

    return call


def kernels(params: Any, cfg: Any) -> np.ndarray:
    return np.asarray(get_path(params, down_proj_path(cfg)))


def weight_agreement(edited: Any, other: Any, lm: Any) -> dict[str, float]:
    """max |ΔW| between two edits of the down-projections, and that over the largest change
    the first made (its max |W_edited − W|)."""
    first, second = kernels(edited, lm.config), kernels(other, lm.config)
    diff = float(np.max(np.abs(first - second)))
    return {"max_abs_diff": diff,
            "relative": diff / float(np.max(np.abs(first - kernels(lm.params, lm.config))))}


def compare(model: str, method: str, setup: Setup, rounds: int) -> Json:
    """The API's edit and the reference-style one, timed in interleaved rounds after the
    warm-up edit; seconds per edit, their ratio, and how far δ and the weights differ."""
    lm = ke.load(model)
    with tempfile.TemporaryDirectory() as scratch:
        chosen = hparams(setup, Path(scratch))
    records = chosen_records(lm, setup)
    shipped = ke.edit(lm, records, method=method, **chosen).params
    last = {"api": Last(), "reference-style": Last()}
    calls = {name: edit_call(lm, records, method, chosen, name != "api", kept)
             for name, kept in last.items()}
    timings = common.time_interleaved(calls, rounds)
    fast, slow = (timings[name].median_s / len(records) for name in last)
    api, reference = last.values()
    return {"method": method, "edits": len(records), "flagfile": setup.flagfile,
            "reductions": list(setup.reductions),
            "timings": {name: t.to_json() for name, t in timings.items()},
            "api_s_per_edit": fast, "reference_style_s_per_edit": slow, "ratio": slow / fast,
            "delta_agreement": latency.delta_agreement(api.delta, reference.delta),
            "weight_agreement": weight_agreement(api.params, reference.params, lm),
            "api_against_shipped": weight_agreement(api.params, shipped, lm)}


def cli_args(model: str, setup: Setup, out: Path) -> list[str]:
    """The command line of the same edit, in one batch."""
    return [f"--flagfile={setup.flagfile}", f"--model={model}", f"--num_edits={setup.edits}",
            f"--edit_batch_size={setup.edits}", *setup.reductions, *CLI_FLAGS,
            f"--output_dir={out}", "--overwrite"]


def cli_runs(model: str, setup: Setup) -> list[Json]:
    """Whole-process wall time and compile seconds of the command line, twice, sharing one
    new JAX compilation cache (the first run fills it); the statistics and affinity caches
    are warm from `compare`'s warm-up edit."""
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        args = cli_args(model, setup, root / "out")
        return [{"run": run, **compile_cache.timed_run(args, root / "jax", root / f"{run}.json")}
                for run in ("empty JAX cache", "warm")]


def threads() -> Json:
    """What the timed process may use: XLA's thread flags and the CPUs it is pinned to."""
    affinity = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {"XLA_FLAGS": os.environ.get("XLA_FLAGS", ""), "cpu_affinity": affinity,
            "one_thread": THREAD_FLAGS in os.environ.get("XLA_FLAGS", "")}


def agreement_cell(agreement: dict[str, float]) -> str:
    return f"{agreement['max_abs_diff']:.1e} ({agreement['relative']:.1e})"


def cli_cell(run: Json) -> str:
    return f"{run['wall_s']:.1f} s ({run['share_of_wall']:.0%} compiling)"


def report(results: Json) -> str:
    """results.md: the settings line and one row per method."""
    machine, rows = results["machine"], results["methods"]
    head = (f"Model {results['model']}, {results['rounds']} interleaved rounds; jax "
            f"{machine['jax']}, {machine['processor']}, {machine['usable_cpus']} usable CPUs; "
            f"threads {json.dumps(results['threads'])}; load average "
            f"{machine['load_average']} at the start, {results['load_average_end']} at the "
            f"end; command line with {' '.join(CLI_FLAGS)}.")
    table = common.markdown_table(
        ["method", "edits", "reductions", "API s/edit", "reference-style s/edit", "ratio",
         "CLI, empty JAX cache", "CLI, warm", "max abs Δδ (rel.)", "max abs ΔW (rel.)"],
        [[r["method"], str(r["edits"]), " ".join(r["reductions"]) or "none",
          common.seconds(r["api_s_per_edit"]), common.seconds(r["reference_style_s_per_edit"]),
          f"{r['ratio']:.2f}×", *(cli_cell(run) for run in r["cli"]),
          agreement_cell(r["delta_agreement"]), agreement_cell(r["weight_agreement"])]
         for r in rows])
    return f"{head}\n\n{table}\n"


def main(argv: Sequence[str] | None = None) -> Json:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/vs_reference_cpu"))
    parser.add_argument("--methods", default=",".join(SETUPS),
                        help=f"comma-separated, of {', '.join(SETUPS)}")
    parser.add_argument("--model", default="organism:small")
    parser.add_argument("--rounds", type=int, default=2)
    options = parser.parse_args(argv)
    machine = common.machine()
    rows = []
    for method in options.methods.split(","):
        common.log(f"{method}: API and reference-style, in this process")
        row = compare(options.model, method, SETUPS[method], options.rounds)
        common.log(f"{method}: the command line, twice")
        rows.append({**row, "cli": cli_runs(options.model, SETUPS[method])})
    results = {"machine": machine, "load_average_end": common.load_average(),
               "threads": threads(), "model": options.model, "rounds": options.rounds,
               "cli_flags": list(CLI_FLAGS), "methods": rows}
    common.write_results(options.out, results, report(results))
    return results


if __name__ == "__main__":
    main()
