"""Roofline of one μKE edit and one statistics pass at Llama-3-8B shapes (issue 9).

Analytic, no device needed, runs in seconds. FLOPs come from `benchmarks.flops` (matmuls only);
bytes are the weights each part must read from HBM (activations and logits add a few percent,
so this is a lower bound). Each part's best time is max(FLOPs / peak, bytes / bandwidth) at
the peak of its matmul precision; an edit's parts run one after another, so they add up.
What is counted follows what our code executes (benchmarks/README.md "Roofline"):

- prefix: `upstream.loop.prepare`, layers 0..l_WM−1 once, then layers l_WM..31 and the head
  once more for h and the reference log-probs: one full forward;
- affinities: `upstream.windowed._upfront`, T_aff Adam steps vmap'd over all N stages, each
  one forward and a backward vmap'd over all N figures: N forwards + N² backwards per step,
  the weights read once per step;
- δ loop: N stages in a `lax.scan`, each up to 25 steps of forward (layers l_WM..31 + head)
  and backward for δ only (layers l_WM+1..31 + head), batch 1, padded to a power of two;
- MEMIT keys: `methods.structured.read_sites`, one forward of layers 0..8 per edited
  layer; solves: `downstream.memit_update`, K_pᵀK_p + KᵀK, a float32 Cholesky of the
  d_ff × d_ff system and two triangular solves, replicated on every device;
- statistics: `stats.batch_sums`, one forward of layers 0..8 per token and KᵀK per edited
  layer at Precision.HIGHEST in float32.

Run: python -m benchmarks.roofline --out benchmarks/results/roofline
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from benchmarks import flops
from benchmarks.common import Json, markdown_table, seconds, si, write_results
from keedit_jax.models import ModelConfig
from keedit_jax.models.generate import bucket
from keedit_jax.testing import published_config

LLAMA3_8B = published_config("Llama-3-8B")


@dataclasses.dataclass(frozen=True)
class Protocol:
    """μKE's Llama-3-8B protocol (configs/presets/llama3-8b-instruct_muke.cfg) and the
    statistics pass (docs/references.md: anchors §3). prompt_tokens and tokens_per_article are
    assumptions, not read from data."""

    prompt_tokens: int = 30  # a chat-templated UnKEBench question
    target_tokens: int = 130  # answer + end-of-turn token
    window: int = 30
    steps: int = 25  # v_num_grad_steps, no early stop (the worst case)
    affinity_steps: int = 3
    layers: tuple[int, ...] = (4, 5, 6, 7, 8)  # edited; δ at the last
    articles: int = 100_000  # mom2_n_samples
    tokens_per_article: int = 700  # mean after truncation to 8192 (assumption)
    max_length: int = 8192  # max_position_embeddings
    batch_tokens: int = 8192  # StatsConfig.batch_tokens

    @property
    def windows(self) -> int:
        return math.ceil(self.target_tokens / self.window)

    @property
    def sequence(self) -> int:
        """X ⊕ Y[:-1], real tokens."""
        return self.prompt_tokens + self.target_tokens - 1


@dataclasses.dataclass(frozen=True)
class Device:
    """Vendor peaks (dense, all chips together) by matmul precision, and HBM bandwidth.

    bf16: bfloat16 inputs; f32: float32 at Precision.DEFAULT (TF32 on H100/H200, one bf16
    pass on TPU); f32_highest: float32 at Precision.HIGHEST (CUDA-core fp32 on H100/H200, six
    bf16 passes on TPU, the usual 3–6× emulation taken at its slow end)."""

    name: str
    chips: int
    peak: dict[str, float]
    bandwidth: float
    source: str


DEVICES = (
    Device("H100 SXM", 1, {"bf16": 989e12, "f32": 495e12, "f32_highest": 67e12}, 3.35e12,
           "NVIDIA H100 SXM5 datasheet: 989 TFLOP/s bf16 dense, 495 TF32, 67 FP32; 3.35 TB/s"),
    Device("H200", 1, {"bf16": 989e12, "f32": 495e12, "f32_highest": 67e12}, 4.8e12,
           "NVIDIA H200 SXM datasheet: the H100's compute, 4.8 TB/s HBM3e"),
    Device("TPU v5e-8", 8, {"bf16": 8 * 197e12, "f32": 8 * 197e12,
                            "f32_highest": 8 * 197e12 / 6}, 8 * 819e9,
           "Google Cloud TPU v5e: 197 TFLOP/s bf16 and 819 GB/s HBM (16 GB) per chip"),
)


@dataclasses.dataclass(frozen=True)
class Part:
    """One piece of work: its FLOPs, the bytes it must read, its matmul precision, and
    whether it spreads over all chips (False: replicated, one chip's peak)."""

    name: str
    flops: float
    bytes: float
    precision: str
    sharded: bool = True

    def bound(self, device: Device) -> Json:
        share = 1 if self.sharded else device.chips
        compute = self.flops / (device.peak[self.precision] / share)
        memory = self.bytes / (device.bandwidth / share)
        return {"seconds": max(compute, memory), "compute_s": compute, "memory_s": memory,
                "bound": "compute" if compute >= memory else "memory"}


def layer_bytes(cfg: ModelConfig, layers: int, heads: int, itemsize: int) -> float:
    """Weights read by `layers` decoder layers and `heads` passes through the unembedding."""
    return float(itemsize * (layers * flops.layer_matmul_params(cfg)
                             + heads * cfg.d_model * cfg.vocab_size))


def step(cfg: ModelConfig, tokens: int, above: int, copies: int = 1,
         cotangents: int = 1) -> float:
    """FLOPs of `copies` forwards over the `above` layers from l_WM (and the head) and
    copies·cotangents backwards for δ only (one layer fewer: δ enters after l_WM)."""
    fwd = flops.forward(cfg, tokens=tokens, key_len=tokens, layers=above, logit_tokens=tokens)
    bwd = flops.backward_inputs(cfg, tokens=tokens, key_len=tokens, layers=above - 1,
                                logit_tokens=tokens)
    return copies * fwd + copies * cotangents * bwd


def solve_flops(d_ff: int, keys: int, preserved: int) -> float:
    """memit_update: KᵀK + K_pᵀK_p, Cholesky (F³/3), two triangular solves and the residual
    check A·X (2F² per key each)."""
    return 2.0 * d_ff**2 * (keys + preserved) + d_ff**3 / 3 + 2 * 2.0 * d_ff**2 * keys


def loop_step(cfg: ModelConfig, p: Protocol, tokens: int, itemsize: int = 2,
              precision: str = "bf16") -> Part:
    """One δ step at batch 1: the weights are read by the forward and again by the backward."""
    above = cfg.n_layers - p.layers[-1]
    return Part(f"one δ step, {tokens} tokens", step(cfg, tokens, above),
                layer_bytes(cfg, 2 * above - 1, 2, itemsize), precision)


def tensor_parallel_ici(cfg: ModelConfig, p: Protocol, tokens: int, chips: int = 8,
                        link: float = 200e9) -> float:
    """Seconds per δ step of the activation all-reduces that sharding the weights over
    `chips` needs (two per layer and pass, ring, bf16) at `link` bytes/s per chip (v5e ICI:
    1,600 Gbps); not part of the roofline."""
    above = cfg.n_layers - p.layers[-1]
    per_reduce = 2 * (chips - 1) / chips * tokens * cfg.d_model * 2
    return 2 * (2 * above - 1) * per_reduce / link


def muke_parts(cfg: ModelConfig, p: Protocol, itemsize: int, precision: str,
               tokens: int | None = None) -> list[Part]:
    """One μKE edit at batch 1, every window running all its steps."""
    t = tokens or bucket(p.sequence, 8)  # a power of two, as pack_windows padded before
    # issue 20 (now generate.fine_bucket: 159 -> 160, the "unpadded" row within 1%)
    shift = p.layers[-1]
    above, n = cfg.n_layers - shift, p.windows
    one = loop_step(cfg, p, t, itemsize, precision)
    key_layers = shift + 1
    f2 = 4.0 * cfg.d_ff**2  # one float32 d_ff × d_ff matrix
    return [
        Part("prefix + reference forward", flops.forward(
            cfg, tokens=t, key_len=t, layers=cfg.n_layers, logit_tokens=t),
            layer_bytes(cfg, cfg.n_layers, 1, itemsize), precision),
        Part(f"affinities ({p.affinity_steps} steps × {n} stages × {n} figures)",
             p.affinity_steps * step(cfg, t, above, copies=n, cotangents=n),
             p.affinity_steps * one.bytes, precision),
        Part(f"δ loop ({n} windows × {p.steps} steps)", n * p.steps * one.flops,
             n * p.steps * one.bytes, precision),
        Part(f"MEMIT keys ({len(p.layers)} forwards, layers 0–{shift})",
             len(p.layers) * flops.forward(cfg, tokens=t, key_len=t, layers=key_layers,
                                           logit_tokens=0),
             len(p.layers) * layer_bytes(cfg, key_layers, 0, itemsize), precision),
        Part(f"MEMIT solves ({len(p.layers)} × fp32 Cholesky, d_ff {cfg.d_ff})",
             len(p.layers) * solve_flops(cfg.d_ff, n, t), len(p.layers) * 3 * f2,
             "f32_highest", sharded=False),
    ]


def stats_parts(cfg: ModelConfig, p: Protocol, tokens: float, key_len: int,
                gram_precision: str = "f32_highest") -> list[Part]:
    """The statistics pass over `tokens` real tokens in bfloat16, buckets of `key_len`."""
    stop, n = max(p.layers) + 1, len(p.layers)
    batches = tokens / p.batch_tokens
    return [
        Part(f"forward, layers 0–{stop - 1}", flops.forward(
            cfg, tokens=tokens, key_len=key_len, layers=stop, logit_tokens=0),
            batches * layer_bytes(cfg, stop, 0, 2), "bf16"),
        # per batch: the batch's KᵀK written, the accumulator read and written
        Part(f"KᵀK, {n} layers", tokens * n * 2.0 * cfg.d_ff**2,
             batches * n * 3 * 4.0 * cfg.d_ff**2, gram_precision),
    ]


def evaluate(parts: list[Part]) -> Json:
    rows = {part.name: {"flops": part.flops, "bytes": part.bytes, "precision": part.precision,
                        "sharded": part.sharded,
                        **{d.name: part.bound(d) for d in DEVICES}} for part in parts}
    total: Json = {"flops": sum(x.flops for x in parts), "bytes": sum(x.bytes for x in parts)}
    for d in DEVICES:
        bounds = [part.bound(d) for part in parts]
        memory = sum(b["seconds"] for b in bounds if b["bound"] == "memory")
        time = sum(b["seconds"] for b in bounds)
        total[d.name] = {"seconds": time, "memory_bound_share": memory / time,
                         "bound": "memory" if memory > time / 2 else "compute"}
    return {"parts": rows, "total": total}


def measured_solve(p: Protocol, cfg: ModelConfig, path: Path) -> Json | None:
    """The one figure measured at a real shape: MEMIT's per-layer solve on an H200
    (benchmarks/results/sequential_solvers_gpu), against its bound."""
    if not path.exists():
        return None
    summary = json.loads(path.read_text())
    row = next(r for r in summary["rows"] if r["solver"] == "memit (naive)")
    keys = summary["machine"]["batch"]
    part = Part("solve", solve_flops(cfg.d_ff, keys, 0), 3 * 4.0 * cfg.d_ff**2, "f32_highest")
    bound = part.bound(DEVICES[1])["seconds"]
    measured = row["s/batch (last quarter)"]
    return {"what": f"MEMIT solve, one layer, d_ff {cfg.d_ff}, {keys} keys, H200",
            "measured_s": measured, "bound_s": bound, "ratio": measured / bound,
            "source": str(path)}


def report(p: Protocol, cfg: ModelConfig, solver_summary: Path) -> Json:
    t_mean = bucket(p.tokens_per_article, 16)
    tokens = p.articles * p.tokens_per_article
    sections = {
        "muke_bf16": evaluate(muke_parts(cfg, p, 2, "bf16")),
        "muke_f32": evaluate(muke_parts(cfg, p, 4, "f32")),
        "muke_bf16_unpadded": evaluate(muke_parts(cfg, p, 2, "bf16", tokens=p.sequence)),
        "stats": evaluate(stats_parts(cfg, p, tokens, t_mean)),
        "stats_default_precision": evaluate(stats_parts(cfg, p, tokens, t_mean, "f32")),
        "stats_all_maxlen": evaluate(stats_parts(cfg, p, p.articles * p.max_length,
                                                 p.max_length)),
    }
    padded = bucket(p.sequence, 8)
    steps = {str(t): {"flops": x.flops, "bytes": x.bytes,
                      **{d.name: x.bound(d) for d in DEVICES}}
             for t, x in ((t, loop_step(cfg, p, t)) for t in (padded, p.sequence))}
    return {
        "model": "Llama-3-8B", "config": dataclasses.asdict(cfg),
        "protocol": {**dataclasses.asdict(p), "windows": p.windows, "sequence": p.sequence,
                     "sequence_padded": padded, "stats_tokens": tokens,
                     "stats_bucket": t_mean},
        "devices": [dataclasses.asdict(d) for d in DEVICES],
        "loop_step_bf16": steps,
        "tpu_ici_per_step_s": tensor_parallel_ici(cfg, p, padded),
        "sections": sections,
        "goals": goals(sections, steps[str(padded)], tokens),
        "measured": measured_solve(p, cfg, solver_summary),
    }


def goals(sections: Json, step_bf16: Json, tokens: float) -> Json:
    """Issue 9's goals per device: a bf16 μKE edit (and one δ step) within 2× of its
    memory-bandwidth bound, the statistics pass within 2× of its compute bound (tokens/s)."""
    edit_bytes = sections["muke_bf16"]["total"]["bytes"]
    out = {}
    for d in DEVICES:
        stats_s = sections["stats"]["total"][d.name]["seconds"]
        out[d.name] = {"muke_memory_bound_s": edit_bytes / d.bandwidth,
                       "muke_goal_s": 2 * edit_bytes / d.bandwidth,
                       "step_goal_s": 2 * step_bf16["bytes"] / d.bandwidth,
                       "stats_bound_tokens_per_s": tokens / stats_s,
                       "stats_goal_tokens_per_s": tokens / stats_s / 2}
    return out


def _amount(value: float, unit: str = "") -> str:
    """si() with peta and exa: the statistics pass runs to 10¹⁸ FLOPs."""
    for factor, prefix in ((1e18, "E"), (1e15, "P")):
        if value >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return si(value, unit)


def _cell(bound: Json) -> str:
    time = bound["seconds"]
    text = (seconds(time) if time < 120 else f"{time / 60:.3g} min" if time < 7200
            else f"{time / 3600:.3g} h")
    return f"{text} ({bound['bound'][0].upper()})"


def markdown(data: Json) -> str:
    p = data["protocol"]
    titles = {
        "muke_bf16": f"**μKE edit, bf16** (padded to {p['sequence_padded']} tokens)",
        "muke_f32": "**μKE edit, float32 weights** (our `--dtype` default)",
        "muke_bf16_unpadded": f"μKE edit, bf16, unpadded ({p['sequence']} tokens)",
        "stats": f"**statistics pass** ({si(p['stats_tokens'])} tokens)",
        "stats_default_precision": "statistics pass, KᵀK at DEFAULT precision",
        "stats_all_maxlen": f"statistics pass, every article at {p['max_length']} tokens",
    }
    names = [d["name"] for d in data["devices"]]
    rows = []
    for key, section in data["sections"].items():
        if key in ("muke_bf16", "stats"):
            for name, part in section["parts"].items():
                rows.append([name, _amount(part["flops"]), _amount(part["bytes"], "B"),
                             *(_cell(part[n]) for n in names)])
        total = section["total"]
        rows.append([titles[key], _amount(total["flops"]), _amount(total["bytes"], "B"),
                     *(_cell(total[n]) for n in names)])
    table = markdown_table(["work", "FLOPs", "bytes", *names], rows)
    lines = [table, "", "C / M: compute- / memory-bound (totals: which bound most of the "
             "time is spent under)."]
    for t, x in data["loop_step_bf16"].items():
        cells = ", ".join(f"{n} {_cell(x[n])}" for n in names)
        lines.append(f"One δ step (bf16, {t} tokens): {_amount(x['flops'])}FLOP, "
                     f"{_amount(x['bytes'], 'B')}: {cells}.")
    lines.append(f"TPU v5e-8 with the weights sharded 8 ways: activation all-reduces add "
                 f"{seconds(data['tpu_ici_per_step_s'])} of ICI traffic per δ step "
                 "(not in the bound).")
    for name, g in data["goals"].items():
        lines.append(f"Goals on {name}: μKE edit ≤ {seconds(g['muke_goal_s'])} (2× its "
                     f"memory bound {seconds(g['muke_memory_bound_s'])}), δ step ≤ "
                     f"{seconds(g['step_goal_s'])}; statistics ≥ "
                     f"{si(g['stats_goal_tokens_per_s'])} tokens/s (bound "
                     f"{si(g['stats_bound_tokens_per_s'])}).")
    if data["measured"]:
        m = data["measured"]
        lines.append(f"Measured: {m['what']}: {seconds(m['measured_s'])} against a bound of "
                     f"{seconds(m['bound_s'])} ({m['ratio']:.2f}×).")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> Any:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/roofline"))
    parser.add_argument("--solver_summary", type=Path,
                        default=Path("benchmarks/results/sequential_solvers_gpu/summary.json"))
    args = parser.parse_args(argv)
    data = report(Protocol(), LLAMA3_8B, args.solver_summary)
    write_results(args.out, data, markdown(data))
    return data


if __name__ == "__main__":
    main()
