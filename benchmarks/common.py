"""Shared benchmark machinery: timing, the machine's limits, its description, the writers.

Every figure a benchmark reports sits beside a limit measured in the same run (the
jitted-matmul peak for compute, the copy bandwidth for memory traffic), because absolute
timings on a shared machine drift from minute to minute while ratios within one run hold.
`time_interleaved` goes one step further: it times the figures and the limits in alternating
rounds, so that a burst of load elsewhere slows all of them alike rather than one figure.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

Json = dict[str, Any]


# --- timing -------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Timing:
    """Seconds per call over `repeats` timed calls, the warm-up call kept apart.

    compile_s is the ahead-of-time lower + compile (None when the callable compiles lazily);
    warmup_s is the first call, which for a lazily compiled callable includes compilation.
    """

    compile_s: float | None
    warmup_s: float
    median_s: float
    min_s: float
    max_s: float
    repeats: int

    def to_json(self) -> Json:
        return dataclasses.asdict(self)


def log(message: str) -> None:
    """Progress on stderr, flushed: a run of minutes must show where it is."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def timed(call: Callable[[], Any]) -> float:
    """Seconds until every output of `call()` is ready (dispatch is asynchronous)."""
    start = time.perf_counter()
    jax.block_until_ready(call())
    return time.perf_counter() - start


def summarize(times: Sequence[float], warmup_s: float,
              compile_s: float | None = None) -> Timing:
    return Timing(compile_s=compile_s, warmup_s=warmup_s, median_s=statistics.median(times),
                  min_s=min(times), max_s=max(times), repeats=len(times))


def time_calls(call: Callable[[], Any], repeats: int, compile_s: float | None = None) -> Timing:
    """Time `call()`: one warm-up, then `repeats` calls."""
    _check_repeats(repeats)
    warmup_s = timed(call)
    return summarize([timed(call) for _ in range(repeats)], warmup_s, compile_s)


def time_interleaved(calls: Mapping[str, Callable[[], Any]], repeats: int,
                     compile_s: Mapping[str, float | None] | None = None,
                     progress: Callable[[str], None] = log) -> dict[str, Timing]:
    """Time several calls in rounds (a warm-up round, then `repeats` timed rounds), each call
    once per round, so that drifting load on a shared machine hits every call alike."""
    _check_repeats(repeats)
    compile_s = compile_s or {}
    warmup = {}
    for name, call in calls.items():
        warmup[name] = timed(call)
        progress(f"warm-up {name}: {seconds(warmup[name])}")
    times: dict[str, list[float]] = {name: [] for name in calls}
    for round_index in range(repeats):
        for name, call in calls.items():
            times[name].append(timed(call))
        progress(f"round {round_index + 1}/{repeats} done")
    return {name: summarize(times[name], warmup[name], compile_s.get(name)) for name in calls}


def _check_repeats(repeats: int) -> None:
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")


# For programs compiled only to be counted: XLA's cost analysis reads the optimised HLO,
# which the backend (LLVM) optimisation level does not change, and level 0 compiles ~2x faster.
COUNT_ONLY_OPTIONS: Json = {"xla_backend_optimization_level": 0}


def compile_aot(fn: Callable[..., Any], *args: Any, donate_argnums: tuple[int, ...] = (),
                options: Json | None = None) -> tuple[jax.stages.Compiled, float]:
    """jit, lower and compile `fn` for `args`; return the executable and the seconds it took.

    Compiling ahead of time keeps compilation out of every timed call and gives the exact
    program whose cost and memory analyses we report.
    """
    start = time.perf_counter()
    lowered = jax.jit(fn, donate_argnums=donate_argnums).lower(*args)
    compiled = lowered.compile(options) if options else lowered.compile()
    return compiled, time.perf_counter() - start


def xla_cost(compiled: jax.stages.Compiled) -> Json:
    """XLA's own flop and byte counts of a compiled program (0.0 where XLA gives none).

    cost_analysis() is a dict in jax 0.10, a list with one dict per program in older
    versions. XLA counts the body of a while loop once, whatever its trip count, so a
    program with a `fori_loop` over layers is undercounted: compare with an unrolled twin.
    """
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    cost = cost or {}
    return {"flops": float(cost.get("flops", 0.0)),
            "bytes_accessed": float(cost.get("bytes accessed", 0.0))}


def memory(compiled: jax.stages.Compiled) -> Json | None:
    """Bytes the compiled program needs: arguments, outputs, temporaries (None if unknown)."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, AttributeError, RuntimeError):
        return None
    if stats is None:
        return None
    fields = ("argument", "output", "temp", "alias", "generated_code")
    return {f"{name}_bytes": int(getattr(stats, f"{name}_size_in_bytes", 0)) for name in fields}


# --- the machine's limits -----------------------------------------------------------------


@dataclasses.dataclass(frozen=True, kw_only=True)
class Probe:
    """A call that measures one limit of the machine, and the work one call does.

    unit is "FLOP" (compute limits) or "B" (bytes moved: memory limits). One call runs the
    kernel `inner` times back to back, so that it lasts about as long as the figures beside
    it and samples the machine's load over a comparable window.
    """

    call: Callable[[], Any]
    work: float
    unit: str
    compile_s: float
    detail: Json
    inner: int = 1

    def result(self, timing: Timing) -> Json:
        """The limit: work per second at the median call, and at the fastest call."""
        return {**self.detail, "unit": f"{self.unit}/s", "work": self.work,
                "inner": self.inner, "per_s": self.work / timing.median_s,
                "best_per_s": self.work / timing.min_s, "timing": timing.to_json()}

    def measure(self, repeats: int) -> Json:
        return self.result(time_calls(self.call, repeats, self.compile_s))


def _probe(kernel: Callable[[], Any], work: float, unit: str, compile_s: float, detail: Json,
           min_seconds: float) -> Probe:
    """Repeat `kernel` enough times per call to last `min_seconds` (timed once, warm)."""
    jax.block_until_ready(kernel())
    inner = max(1, math.ceil(min_seconds / max(timed(kernel), 1e-9)))

    def call() -> Any:
        for _ in range(inner):
            out = jax.block_until_ready(kernel())
        return out

    return Probe(call=call, work=inner * work, unit=unit, compile_s=compile_s, detail=detail,
                 inner=inner)


def matmul_probe(sizes: Sequence[int], dtype: jnp.dtype, min_seconds: float = 0.0) -> Probe:
    """Compute limit: a jitted square matmul big enough to saturate the machine.

    The fastest of `sizes` (each timed a few times, warm) becomes the probe: on a CPU a
    2048² matmul can fall out of cache and run slower than the model's own matmuls, so one
    fixed size is not the peak (use 4096-8192 on accelerators).
    """
    candidates = {size: _square_matmul(size, dtype) for size in sizes}
    rates = {size: 2.0 * size**3 / min(timed(c[0]) for _ in range(3))
             for size, c in candidates.items()}
    size = max(rates, key=rates.get)
    kernel, compile_s = candidates[size]
    detail = {"size": size, "dtype": jnp.dtype(dtype).name,
              "sweep_flop_per_s": {str(k): v for k, v in rates.items()}}
    return _probe(kernel, 2.0 * size**3, "FLOP", compile_s, detail, min_seconds)


def _square_matmul(size: int, dtype: jnp.dtype) -> tuple[Callable[[], Any], float]:
    a, b = _normal((size, size), dtype, seed=1), _normal((size, size), dtype, seed=2)
    compiled, compile_s = compile_aot(jnp.matmul, a, b)
    jax.block_until_ready(compiled(a, b))
    return (lambda: compiled(a, b)), compile_s


def copy_probe(n_bytes: int, min_seconds: float = 0.0) -> Probe:
    """Memory limit: bytes read + written by a jitted elementwise update of a donated array.

    Donation avoids page-faulting a fresh output buffer in every call (which would measure
    the kernel, not the memory), and `1 - x` stays bounded with no denormals however often
    it is applied.
    """
    n = n_bytes // 4
    state = {"x": jnp.zeros((n,), jnp.float32)}
    compiled, compile_s = compile_aot(lambda x: 1.0 - x, state["x"], donate_argnums=(0,))

    def step() -> jax.Array:
        state["x"] = compiled(state["x"])
        return state["x"]

    return _probe(step, 2.0 * n * 4, "B", compile_s, {"bytes": n * 4}, min_seconds)


def matvec_probe(rows: int, n_bytes: int, dtype: jnp.dtype = jnp.float32,
                 min_seconds: float = 0.0) -> Probe:
    """Memory limit as a decoder sees it: a few rows times a big weight matrix, whose bytes
    must all be read. On CPU, XLA's small-row matmuls reach less than the copy bandwidth."""
    cols = 2048
    depth = max(1, n_bytes // (cols * jnp.dtype(dtype).itemsize))
    x = jnp.ones((rows, depth), dtype)
    w = _normal((depth, cols), dtype, seed=3)
    compiled, compile_s = compile_aot(jnp.matmul, x, w)
    detail = {"rows": rows, "shape": [depth, cols], "dtype": jnp.dtype(dtype).name}
    return _probe(lambda: compiled(x, w), float(w.size * w.dtype.itemsize), "B", compile_s,
                  detail, min_seconds)


def _normal(shape: tuple[int, ...], dtype: jnp.dtype, seed: int) -> jax.Array:
    """Random operands from numpy: jax.random would compile a kernel per shape (~1 s each)."""
    values = np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)
    return jnp.asarray(values).astype(dtype)


# --- the machine --------------------------------------------------------------------------


def machine() -> Json:
    """What the figures were measured on: software versions, devices, cores, load."""
    devices = jax.devices()
    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    return {
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in devices],
        "device_kind": devices[0].device_kind,
        "device_count": len(devices),
        "cpu_count": os.cpu_count(),
        "usable_cpus": len(affinity) if affinity is not None else None,
        "platform": platform.platform(),
        "processor": _cpu_model() or platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "load_average": load_average(),
    }


def _cpu_model() -> str | None:
    """The CPU's marketing name from /proc/cpuinfo (Linux), which `platform` does not give."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return None
    names = [line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")]
    return names[0] if names else None


def load_average() -> list[float] | None:
    """1/5/15-minute load: other work on a shared machine is what makes timings noisy."""
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


# --- writers ------------------------------------------------------------------------------


def write_json(path: Path, data: Json) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n")


def write_results(out: Path, data: Json, table: str) -> None:
    """results.json and its readable results.md under `out`, and the table on stdout."""
    write_json(out / "results.json", data)
    (out / "results.md").write_text(table)
    print(table)


def write_summary(out: Path, rows: Sequence[Json], raw: Json, **settings: Any) -> str:
    """summary.json (the machine, the run's settings, the rows and the raw timings) and
    summary.md (the settings line and the rows' table) under `out`; returns the table."""
    from keedit_jax.results import markdown_table as rows_table  # noqa: PLC0415

    header = {**machine(), **settings}
    write_json(out / "summary.json", {"machine": header, "rows": list(rows), "raw": raw})
    table = rows_table(list(rows))
    (out / "summary.md").write_text(f"{json.dumps(header)}\n\n{table}")
    return table


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A GitHub markdown table; cells are already formatted strings."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def si(value: float | None, unit: str = "", digits: int = 3) -> str:
    """1.23e10 -> '12.3 G<unit>': figures span many orders of magnitude."""
    if value is None or not math.isfinite(value):
        return "n/a"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.{digits}g} {prefix}{unit}".rstrip()
    return f"{value:.{digits}g} {unit}".rstrip()


def seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1e3:.3g} ms" if value < 1 else f"{value:.3g} s"
