"""Per-device memory of the sharded programs at Llama-3-8B and Qwen2.5-7B shapes, measured
without allocating them: every parameter and batch is a shape-only `jax.ShapeDtypeStruct`
carrying its `NamedSharding` (parallel.param_shardings), each jitted program is lowered and
compiled ahead of time, and XLA's `memory_analysis()` of the compiled program gives the
bytes one device needs: arguments, outputs, temporaries, and the outputs aliased to donated
arguments.

Programs (the library's own jitted functions, as the μKE run calls them):
  stats 1k     the statistics step (stats._moments.accumulate_batch: forward to layer 8,
               Σ k kᵀ of layers 4..8 into the donated float32 accumulators) on a batch of
               the 1024-token bucket: 8 rows (8192 tokens), split over data × fsdp
  stats 8k     the same for the longest bucket: one 8192-token row, padded with empty rows
               to the data × fsdp axes (parallel.put_rows), so one row per fsdp shard
  affinities   μKE's up-front affinities (upstream.windowed.compute_affinities), one edit,
               every figure's gradient from one vmap'd backward (affinity_gradients
               "vmap", the most memory; the default "used" runs them in turn)
  affinities loop  the same with affinity_gradients="loop" (one jax.grad per figure)
  shifts       μKE's shift optimisation (upstream.windowed.optimise_windows, affinities
               given): 25 steps per window, δ at layer 8, loss at the last layer
  solve        MEMIT's closed-form solve of one layer (downstream.memit_update: the
               [d_ff, d_ff] system, Cholesky, float32), the statistics row-sharded
μKE's edit is one request (edit_batch_size 1) of a 30-token prompt and a 130-token target
in windows of 30 (Llama) or 20 (Qwen), layers 4..8: configs/presets/*_muke.cfg.

Targets, each compiled in its own process (the device count is fixed at start-up):
  tpu   a v5e-8 (2x4) topology from libtpu, compiled ahead of time without a TPU; skipped
        when libtpu cannot be imported (`pip install --target DIR libtpu`, then put DIR on
        PYTHONPATH: installed into the venv, libtpu makes every jax start probe for a TPU).
        A program over the chip's HBM is refused by the compiler, with the temporaries it
        would need; the solve is not compiled (TPU_SKIPPED).
  cpu8  8 forced XLA:CPU host devices with the same meshes (an estimate of the TPU figure)
  cpu1  one XLA:CPU device (the one-GPU case, estimated, when no GPU is at hand)
  gpu   the first local GPU, one device (for a GPU machine; not run yet)
Meshes: fsdp=8 and fsdp=4 × tensor=2 on 8 devices; one device otherwise. The SPMD
partitioner's "Involuntary full rematerialization" warnings are caught per program (XLA:CPU;
libtpu logs none to stderr).

Run: python -m benchmarks.parallel_memory [--targets tpu,cpu8,cpu1] [--programs ...]
     [--dtypes bfloat16,float32] [--quick] [--out DIR] [--merge --note TEXT]
Without --merge the run replaces DIR's results. With --merge it re-measures only what it is
asked for: rows of DIR/results.json keyed by (target, mesh, model, dtype, program) are
replaced by this run's and the others kept; every row names the run that measured it, and
results.md lists the runs with their dates and notes (why the rows were re-measured).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from benchmarks.common import (
    COUNT_ONLY_OPTIONS,
    log,
    machine,
    markdown_table,
    memory,
    write_json,
)
from keedit_jax import downstream, parallel
from keedit_jax.models.params import abstract_params
from keedit_jax.stats import StatsConfig
from keedit_jax.stats._moments import accumulate_batch
from keedit_jax.stats._texts import rows_per_batch
from keedit_jax.testing import published_config
from keedit_jax.upstream import TargetConfig
from keedit_jax.upstream.longform import EncodedEdit, WindowConfig, pack_windows
from keedit_jax.upstream.windowed import compute_affinities, optimise_windows
from keedit_jax.upstream.windows import window_bounds

OUT = Path("benchmarks/results/parallel_memory")
TARGETS = ("tpu", "cpu8", "cpu1", "gpu")
DTYPES = ("bfloat16", "float32")
PROGRAMS = ("stats 1k", "stats 8k", "affinities", "affinities loop", "shifts", "solve")
V5E_HBM = 15.75 * 2**30  # bytes of a v5e chip's HBM available to a program (libtpu's figure)
H200_HBM = 141e9  # bytes of one H200
GiB = 2**30

# published model (keedit_jax.testing) -> μKE window size: configs/presets/*_muke.cfg
MODELS = {"Llama-3-8B": 30, "Qwen2.5-7B": 20}
LAYERS = (4, 5, 6, 7, 8)
PROMPT_TOKENS, TARGET_TOKENS = 30, 130
STATS_LENGTHS = {"stats 1k": 1024, "stats 8k": 8192}  # bucket lengths, 8192 tokens a batch


@dataclasses.dataclass(frozen=True)
class Mesh:
    name: str
    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    @property
    def size(self) -> int:
        return self.data * self.fsdp * self.tensor


MESHES = {"tpu": (Mesh("v5e-8 fsdp=8", fsdp=8), Mesh("v5e-8 fsdp=4×tensor=2", fsdp=4, tensor=2)),
          "cpu8": (Mesh("8 devices fsdp=8", fsdp=8),
                   Mesh("8 devices fsdp=4×tensor=2", fsdp=4, tensor=2)),
          "cpu1": (Mesh("1 device"),),
          "gpu": (Mesh("1 device"),)}


# --- the worker: one process per target ---------------------------------------------------


def _devices(target: str) -> list[Any]:
    if target == "tpu":
        return list(topologies.get_topology_desc("v5e:2x4", "tpu").devices)
    if target == "gpu":
        return jax.devices("gpu")[:1]
    return jax.devices("cpu")


def _programs(cfg: Any, window_size: int, dtype: str, layout: Any
              ) -> dict[str, tuple[Any, tuple, dict]]:
    """name -> (jitted function, abstract positional args, static keyword args)."""
    mesh = layout.mesh

    def sds(shape: tuple[int, ...], dt: Any, spec: P | None = None) -> jax.ShapeDtypeStruct:
        return jax.ShapeDtypeStruct(shape, jnp.dtype(dt),
                                    sharding=NamedSharding(mesh, spec or P()))

    shardings = parallel.param_shardings(cfg, mesh)
    params = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract_params(cfg, jnp.dtype(dtype)), shardings)
    f, d = cfg.d_ff, cfg.d_model
    programs: dict[str, tuple[Any, tuple, dict]] = {}
    multiple = mesh.shape["data"] * mesh.shape["fsdp"]
    for name, length in STATS_LENGTHS.items():
        rows = rows_per_batch(length, StatsConfig().batch_tokens)
        rows += -rows % multiple  # parallel.put_rows pads the rows to the batch axes
        acc = {layer: {"ff": sds((f, f), jnp.float32, parallel.STATS_ROWS)} for layer in LAYERS}
        tokens = sds((rows, length), jnp.int32, parallel.BATCH)
        programs[name] = (accumulate_batch, (acc, params, tokens, tokens),
                          {"cfg": cfg, "layers": LAYERS, "with_values": False})
    rng = np.random.default_rng(0)
    ids = [int(x) for x in rng.integers(1000, 20000, PROMPT_TOKENS + TARGET_TOKENS)]
    edit = EncodedEdit(0, tuple(ids[:PROMPT_TOKENS]), tuple(ids[PROMPT_TOKENS:]),
                       tuple(window_bounds(TARGET_TOKENS, window_size)))
    batch = jax.tree.map(lambda x: sds(x.shape, x.dtype), pack_windows([edit], 0))
    hp = TargetConfig(layer=LAYERS[-1], v_loss_layer=cfg.n_layers - 1, fact_token="last",
                      v_num_grad_steps=25, v_lr=0.5, v_weight_decay=1e-3,
                      clamp_norm_factor=4.0, kl_factor=0.0, early_stop_loss=1e-2)
    wc = WindowConfig(strategy="matryoshka_affinity", window_size=window_size,
                      coefficient_order="paper", affinity_steps=3, affinity_lr=0.5,
                      affinity_gradients="vmap")
    e, n = batch.starts.shape
    programs["affinities"] = (compute_affinities, (params, cfg, batch, hp, wc), {})
    loop = dataclasses.replace(wc, affinity_gradients="loop")
    programs["affinities loop"] = (compute_affinities, (params, cfg, batch, hp, loop), {})
    programs["shifts"] = (optimise_windows,
                          (params, cfg, batch, hp, wc, sds((e, n, n), jnp.float32)), {})
    # MEMIT's solve of one layer as μKE calls it: keys and residuals at the windows' shift
    # positions, K_p the other tokens of the (8-padded) edit context.
    n_keys, context = len(edit.windows), 8 * -(-(PROMPT_TOKENS + TARGET_TOKENS) // 8)
    state = downstream.MemitState(key_gram=sds((f, f), jnp.float32))
    programs["solve"] = (downstream.memit_update,
                         (sds((f, f), jnp.float32, parallel.STATS_ROWS),
                          sds((n_keys, f), dtype), sds((n_keys, d), dtype), state,
                          downstream.MemitHParams(), sds((context, f), dtype)), {})
    return programs


@contextlib.contextmanager
def _stderr_captured() -> Iterator[dict[str, str]]:
    """XLA's C++ warnings (e.g. the SPMD partitioner's "Involuntary full rematerialization")
    go to file descriptor 2: catch them per program."""
    sys.stderr.flush()
    saved = os.dup(2)
    box: dict[str, str] = {}
    with tempfile.TemporaryFile() as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            box["text"] = tmp.read().decode(errors="replace")


REMAT = "Involuntary full rematerialization"


def _remat_ops(text: str) -> list[str]:
    """The HLO operations the partitioner had to replicate, deduplicated."""
    ops = []
    for line in text.splitlines():
        if REMAT in line and "for HLO operation %" in line:
            op = line.split("for HLO operation %", 1)[1].split("(", 1)[0].strip()
            name, _, shape = op.partition(" = ")
            op = f"{name.split('.')[0]} {shape}"
            if op not in ops:
                ops.append(op)
    return ops


def _compile(fn: Any, args: tuple, static: dict, layout: Any, options: dict | None
             ) -> dict[str, Any]:
    began = time.perf_counter()
    error = None
    with _stderr_captured() as stderr:
        try:
            with parallel.use_mesh(layout):
                compiled = fn.lower(*args, **static).compile(options)
        except Exception as err:  # noqa: BLE001 (a compiler's refusal is a result: report it)
            error = f"{type(err).__name__}: {str(err)[:2000]}"
    row: dict[str, Any] = {"compile_s": time.perf_counter() - began,
                           "full_rematerialization": _remat_ops(stderr["text"])}
    if error is not None:
        required = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", error)
        if required:  # the TPU compiler's refusal names what the program would need
            scale = 1024 ** ("KMGT".index(required.group(2)) + 1)
            row["temp_bytes_required"] = float(required.group(1)) * scale
        return {**row, "error": error}
    stats = memory(compiled)
    if stats is None:
        return {**row, "error": "no memory analysis"}
    total = (stats["argument_bytes"] + stats["output_bytes"] - stats["alias_bytes"]
             + stats["temp_bytes"])
    # jit drops the arguments a program never reads (the statistics step's lm_head, say),
    # but the run keeps every parameter on the device: add those bytes back.
    unused = max(0, _argument_bytes(args) - stats["argument_bytes"])
    return {**row, **stats, "total_bytes": total, "unused_argument_bytes": unused,
            "resident_total_bytes": total + unused}


def _argument_bytes(args: tuple) -> int:
    """Bytes of one device's shards of every array argument."""
    leaves = [x for x in jax.tree.leaves(args) if isinstance(x, jax.ShapeDtypeStruct)]
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in leaves)


# libtpu's compile time of a Cholesky grows steeply with its size: [1024, 1024] took 3 s and
# [4096, 4096] 91 s for v5e on this machine, so [14336, 14336] would outlast the whole run.
TPU_SKIPPED = {"solve": "not compiled for TPU: libtpu's compile time of the [d_ff, d_ff] "
                        "Cholesky (1024²: 3 s, 4096²: 91 s)"}


def worker(target: str, out: Path, programs: tuple[str, ...], dtypes: tuple[str, ...]) -> None:
    if target == "cpu8":
        jax.config.update("jax_num_cpu_devices", 8)  # before anything touches a device
    devices = _devices(target)
    # XLA:CPU's buffer assignment (the memory analysis) comes before LLVM: the backend's
    # optimisation level leaves it unchanged (checked: equal figures) and compiles ~3x faster.
    options = COUNT_ONLY_OPTIONS if target.startswith("cpu") else None
    rows = []
    for mesh_spec in MESHES[target]:
        config = parallel.MeshConfig(data=mesh_spec.data, fsdp=mesh_spec.fsdp,
                                     tensor=mesh_spec.tensor)
        layout = parallel.make_mesh(config, devices[: mesh_spec.size])
        for model, window_size in MODELS.items():
            cfg = published_config(model)
            parallel.check_mesh(cfg, dict(layout.mesh.shape))
            for dtype in dtypes:
                built = _programs(cfg, window_size, dtype, layout)
                for program in programs:
                    fn, args, static = built[program]
                    head = {"target": target, "device_kind": devices[0].device_kind,
                            "mesh": mesh_spec.name, "model": model, "dtype": dtype,
                            "program": program}
                    if target == "tpu" and program in TPU_SKIPPED:
                        rows.append({**head, "skipped": TPU_SKIPPED[program]})
                        continue
                    result = _compile(fn, args, static, layout, options)
                    remat = len(result["full_rematerialization"])
                    total = result.get("resident_total_bytes")
                    log(f"{target} {mesh_spec.name} {model} {dtype} {program}: "
                        + (f"{total / GiB:.2f} GiB" if total is not None
                           else result["error"][:300])
                        + f" ({result['compile_s']:.1f} s"
                        + (f", {remat} op(s) fully rematerialised)" if remat else ")"))
                    rows.append({**head, **result})
    write_json(out, {"rows": rows, "machine": machine()})


# --- the driver ----------------------------------------------------------------------------


def _run_worker(target: str, programs: tuple[str, ...], dtypes: tuple[str, ...]
                ) -> dict[str, Any] | None:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "rows.json"
        command = [sys.executable, "-m", "benchmarks.parallel_memory", "--worker", target,
                   "--worker_out", str(out), "--programs", ",".join(programs),
                   "--dtypes", ",".join(dtypes)]
        env = dict(os.environ)
        if target != "gpu":
            env["JAX_PLATFORMS"] = "cpu"  # the TPU target compiles through libtpu directly
        done = subprocess.run(command, env=env, check=False)
        if done.returncode or not out.exists():
            log(f"{target}: the worker failed (exit {done.returncode}); no rows")
            return None
        return json.loads(out.read_text())


def _gib(value: float | None) -> str:
    return "n/a" if value is None else f"{value / GiB:.2f}"


def _temp(row: dict[str, Any]) -> str:
    if "temp_bytes_required" in row:
        return f"{_gib(row['temp_bytes_required'])} (required)"
    return _gib(row.get("temp_bytes"))


def _fits(row: dict[str, Any]) -> str:
    if "skipped" in row:
        return "not compiled"
    if "total_bytes" not in row:
        refused = any(x in row["error"] for x in ("RESOURCE_EXHAUSTED", "out of memory"))
        return "**no** (compiler: out of memory)" if refused else "error"
    limit = V5E_HBM if row["mesh"].startswith(("v5e", "8 devices")) else H200_HBM
    return "yes" if row["resident_total_bytes"] <= limit else "**no**"


def _remat_count(row: dict[str, Any]) -> str:
    if row["target"] == "tpu":
        return "n/a"  # libtpu's partitioner logs nothing to stderr
    return str(len(row.get("full_rematerialization", [])))


def table(rows: list[dict[str, Any]]) -> str:
    headers = ["target", "mesh", "model", "dtype", "program", "arguments GiB", "temp GiB",
               "total GiB / device", "fits (v5e 15.75 GiB, H200 141 GB)", "full remat ops",
               "run"]
    body = [[r["target"], r["mesh"], r["model"], r["dtype"], r["program"],
             _gib(r.get("argument_bytes")), _temp(r), _gib(r.get("resident_total_bytes")), _fits(r),
             _remat_count(r), str(r.get("run", ""))] for r in rows]
    return markdown_table(headers, body)


def _cell(row: dict[str, Any] | None) -> str:
    """'total (temp)' in GiB, marked when it does not fit; what the compiler said otherwise."""
    if row is None:
        return ""
    if "skipped" in row:
        return "not compiled"
    if "temp_bytes_required" in row:
        return f"**refused**: temp {row['temp_bytes_required'] / GiB:.0f}"
    if "resident_total_bytes" not in row:
        return "error"
    fits = _fits(row) == "yes"
    text = f"{row['resident_total_bytes'] / GiB:.1f} ({row['temp_bytes'] / GiB:.1f})"
    return text if fits else f"**{text}** ✗"


def compact_table(rows: list[dict[str, Any]]) -> str:
    """One line per program × model × dtype, one column per target and mesh."""
    columns = list(dict.fromkeys((r["target"], r["mesh"]) for r in rows))
    keys = list(dict.fromkeys((r["program"], r["model"], r["dtype"]) for r in rows))
    index = {(r["program"], r["model"], r["dtype"], r["target"], r["mesh"]): r for r in rows}
    headers = ["program", "model", "dtype"] + [f"{t}: {m}" for t, m in columns]
    body = [[*key, *(_cell(index.get((*key, *column))) for column in columns)]
            for key in sorted(keys, key=lambda k: (PROGRAMS.index(k[0]), k[1], k[2]))]
    return markdown_table(headers, body)


def _choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    chosen = tuple(x.strip() for x in text.split(",") if x.strip())
    unknown = sorted(set(chosen) - set(allowed))
    if unknown or not chosen:
        raise SystemExit(f"--{what}: unknown or empty {unknown}; choose from {allowed}")
    return chosen


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--targets", default="tpu,cpu8,cpu1", help=f"comma-separated: {TARGETS}")
    parser.add_argument("--programs", default=",".join(PROGRAMS),
                        help=f"comma-separated: {PROGRAMS}")
    parser.add_argument("--dtypes", default=",".join(DTYPES), help=f"comma-separated: {DTYPES}")
    parser.add_argument("--quick", action="store_true",
                        help="cpu8 and cpu1, bfloat16, stats 1k and solve only (~1 min)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--merge", action="store_true",
                        help="keep OUT's rows this run does not re-measure (key: target, mesh, "
                             "model, dtype, program); replace those it does")
    parser.add_argument("--note", default="",
                        help="why this run was made (recorded with the run in results.md)")
    parser.add_argument("--worker", choices=TARGETS, help=argparse.SUPPRESS)
    parser.add_argument("--worker_out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.targets, args.programs, args.dtypes = "cpu8,cpu1", "stats 1k,solve", "bfloat16"
    targets = _choices(args.targets, TARGETS, "targets")
    programs = _choices(args.programs, PROGRAMS, "programs")
    dtypes = _choices(args.dtypes, DTYPES, "dtypes")
    if args.worker:
        worker(args.worker, Path(args.worker_out), programs, dtypes)
        return {}
    rows, machines, skipped = [], {}, []
    for target in targets:
        if target == "tpu" and not _has_libtpu():
            log("tpu: libtpu is not installed (pip install libtpu); skipped")
            skipped.append(target)
            continue
        began = time.perf_counter()
        result = _run_worker(target, programs, dtypes)
        if result is None:
            skipped.append(target)
            continue
        rows += result["rows"]
        machines[target] = {**result["machine"], "wall_s": time.perf_counter() - began}
        log(f"{target}: {machines[target]['wall_s']:.0f} s")
    out = Path(args.out)
    run = {"date": time.strftime("%Y-%m-%d"), "targets": list(machines),
           "programs": list(programs), "dtypes": list(dtypes), "note": args.note,
           "machines": machines}
    runs: list[dict[str, Any]] = []
    if args.merge and (out / "results.json").exists():
        earlier = json.loads((out / "results.json").read_text())
        rows, runs, machines = merge(earlier, rows, machines)
    run["run"] = len(runs) + 1
    runs.append(run)
    for row in rows:
        row.setdefault("run", run["run"])
    results = {"machines": machines, "skipped_targets": skipped,
               "limits_bytes": {"v5e": V5E_HBM, "h200": H200_HBM}, "layers": LAYERS,
               "prompt_tokens": PROMPT_TOKENS, "target_tokens": TARGET_TOKENS,
               "stats_lengths": STATS_LENGTHS, "runs": runs, "rows": rows}
    write_results(out, results)
    return results


def write_results(out: Path, results: dict[str, Any]) -> None:
    """results.json and results.md (the runs, the compact table, every row) under `out`."""
    write_json(out / "results.json", results)
    rows = results["rows"]
    text = compact_table(rows)
    (out / "results.md").write_text(
        "Per-device GiB from XLA's memory_analysis() of each compiled program, parameters "
        "and batches shape-only (nothing allocated): total = arguments + outputs − aliased "
        "(donated) + temporaries + parameters the program does not read (they stay on the "
        "device); temporaries in brackets; ✗: over 15.75 GiB (a v5e chip's HBM as libtpu "
        "counts it; 8-device meshes) or 141 GB (one H200; one device). tpu: libtpu's "
        "ahead-of-time compiler for a v5e 2x4 topology; cpu8 / cpu1: XLA:CPU buffer "
        "assignments of the same sharded programs (estimates).\n\n"
        f"{runs_text(results['runs'])}\n\n{text}\n\nEvery row:\n\n{table(rows)}\n")
    log("\n" + text)


def _key(row: dict[str, Any]) -> tuple[str, ...]:
    return (row["target"], row["mesh"], row["model"], row["dtype"], row["program"])


def merge(earlier: dict[str, Any], rows: list[dict[str, Any]],
          machines: dict[str, Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                             dict[str, Any]]:
    """Earlier results with this run's rows in place of the ones they re-measure: (rows in
    the earlier order, new keys last; the earlier runs; each target's latest machine)."""
    new = {_key(r): r for r in rows}
    kept = [new.pop(_key(r), r) for r in earlier["rows"]]
    return kept + list(new.values()), earlier["runs"], {**earlier["machines"], **machines}


def runs_text(runs: list[dict[str, Any]]) -> str:
    """One line per run: its number (the "run" column of every row), date, what and why."""
    lines = []
    for run in runs:
        what = "; ".join(f"{k} {', '.join(run[k])}" for k in ("targets", "programs", "dtypes")
                         if run.get(k))
        line = f"- run {run['run']}" + (f" ({run['date']})" if run.get("date") else "")
        line += f": {what}" if what else ""
        lines.append(line + (f". {run['note']}" if run.get("note") else ""))
    return "Runs (each row's `run`):\n\n" + "\n".join(lines)


def _has_libtpu() -> bool:
    return importlib.util.find_spec("libtpu") is not None


if __name__ == "__main__":
    main()
