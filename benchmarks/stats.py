"""Covariance-statistics benchmark: one pass over all edited layers vs one pass per layer.

The reference collects E[k kᵀ] with one forward per edited layer, each stopping at its layer
(anchors §3); `keedit_jax.stats.second_moments` taps every edited layer in one forward that
stops after the last. Both run here on the same batches of a random Llama-shaped model, timed
in interleaved rounds (benchmarks/common.py), and the figure of merit is their ratio of
tokens/s, which holds on a shared machine where absolute timings drift.

Run: python -m benchmarks.stats --preset default --out benchmarks/results/stats_cpu

With --model (a local checkpoint directory) it instead times the statistics pass as a run
makes it, on the real text of --stats_source (default wikipedia-vital), for the first
--tokens tokens: tokens/s, padded-token fill, and the XLA compilations per row shape (packed
rows, length buckets) counted by jax.monitoring (each must compile once), and the pass's
FLOP/s (analytic, benchmarks/flops.py) against a jitted matmul timed between its batches in
the same process (--pack_length=0 batches one document a row, as before packing):

    XLA_FLAGS='--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1' taskset -c 1 \
    python -m benchmarks.stats --model DIR --tokens 50000 --out benchmarks/results/real_stats
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import common, flops
from benchmarks.common import Json, log
from keedit_jax.models import config_from_hf, init_params, load_model
from keedit_jax.models.tokenizer import load_tokenizer
from keedit_jax.organism.build import cache_root
from keedit_jax.stats import (
    DEFAULT_SOURCE,
    StatsConfig,
    TokenBatch,
    compile_time,
    length_batches,
    read_texts,
    resolve_source,
    second_moments,
    tokenize_texts,
)

_LLAMA = {"model_type": "llama", "max_position_embeddings": 2048, "rms_norm_eps": 1e-5,
          "rope_theta": 500000.0, "num_attention_heads": 8, "num_key_value_heads": 2}


@dataclasses.dataclass(frozen=True, kw_only=True)
class Preset:
    """A model shape, its edited layers and the documents run through it."""

    hf_config: Mapping[str, Any]
    layers: tuple[int, ...]  # MEMIT/AlphaEdit edit five consecutive layers (4-8 on Llama3)
    n_docs: int
    doc_lengths: tuple[int, int]  # uniform in [low, high]
    batch_tokens: int
    repeats: int


PRESETS: dict[str, Preset] = {
    # Llama-shaped, 10 layers, five edited in the middle: about a minute on two CPU cores.
    "default": Preset(
        hf_config={**_LLAMA, "vocab_size": 4096, "hidden_size": 256, "intermediate_size": 1024,
                   "num_hidden_layers": 10},
        layers=(2, 3, 4, 5, 6), n_docs=48, doc_lengths=(40, 128), batch_tokens=1024,
        repeats=3),
    # The same in miniature, for a smoke run.
    "small": Preset(
        hf_config={**_LLAMA, "vocab_size": 512, "hidden_size": 64, "intermediate_size": 128,
                   "num_hidden_layers": 4},
        layers=(1, 2), n_docs=8, doc_lengths=(8, 32), batch_tokens=128, repeats=2),
}


def make_batches(preset: Preset, vocab: int) -> list[TokenBatch]:
    """Random documents, packed and bucketed exactly as the statistics pass batches text."""
    rng = np.random.default_rng(0)
    low, high = preset.doc_lengths
    docs = [list(rng.integers(1, vocab, rng.integers(low, high + 1)))
            for _ in range(preset.n_docs)]
    return list(length_batches(docs, batch_tokens=preset.batch_tokens, min_bucket=16,
                               max_length=high, pack_length=StatsConfig().pack_length))


def passes(preset: Preset) -> tuple[dict[str, Callable[[], Any]], int]:
    """The two ways to collect the same statistics, and the real tokens each call covers."""
    cfg = config_from_hf(preset.hf_config)
    params = init_params(cfg, jax.random.key(0))
    batches = make_batches(preset, cfg.vocab_size)
    config = StatsConfig(flush_every=len(batches) + 1, log_every_s=1e9)

    def one_pass() -> Any:
        return second_moments(params, cfg, batches, preset.layers, config=config,
                              log=lambda _: None)

    def per_layer() -> Any:
        return [second_moments(params, cfg, batches, (index,), config=config,
                               log=lambda _: None) for index in preset.layers]

    return {"one_pass": one_pass, "per_layer": per_layer}, sum(b.n_tokens for b in batches)


def run(preset: Preset) -> Json:
    calls, n_tokens = passes(preset)
    timings = common.time_interleaved(calls, preset.repeats)
    figures = {name: {**t.to_json(), "tokens": n_tokens, "tokens_per_s": n_tokens / t.median_s}
               for name, t in timings.items()}
    ratio = figures["one_pass"]["tokens_per_s"] / figures["per_layer"]["tokens_per_s"]
    return {"preset": dataclasses.asdict(preset), "machine": common.machine(),
            "figures": figures, "one_pass_over_per_layer_tokens_per_s": ratio}


def report(results: Json) -> str:
    rows = [[name, f"{f['tokens_per_s']:,.0f}", common.seconds(f["median_s"]),
             common.seconds(f["warmup_s"])] for name, f in results["figures"].items()]
    table = common.markdown_table(["pass", "tokens/s", "median", "warm-up (compile)"], rows)
    ratio = results["one_pass_over_per_layer_tokens_per_s"]
    return f"{table}\n\none pass / per-layer passes, tokens/s: {ratio:.2f}x\n"


def first_tokens(texts: Iterable[str], tokenizer: Any, max_length: int,
                 n_tokens: int) -> list[list[int]]:
    """Documents from the start of the text until they hold at least n_tokens tokens."""
    docs, total = [], 0
    for ids in tokenize_texts(texts, tokenizer, max_length=max_length, n_samples=10**9):
        if total >= n_tokens:
            break
        docs.append(ids)
        total += len(ids)
    return docs


def real_pass(model: Path, source: str, n_tokens: int, layers: tuple[int, ...],
              config: StatsConfig, probe_seconds: float) -> Json:
    """One statistics pass on a real checkpoint, with per-bucket compilations and timings, and
    a matmul probe timed before every batch (the device idle), so that the pass and the peak
    see the same load; the probe's seconds are taken out of the pass's wall time."""
    lm = load_model(model)
    tokenizer = load_tokenizer(lm.path, lm.config)
    text = resolve_source(source, cache_root() / "stats")
    max_length = config.resolved_max_length(lm.config)
    docs = first_tokens(read_texts(text), tokenizer, max_length, n_tokens)
    probe = common.matmul_probe((512, 1024, 2048), jnp.float32, min_seconds=probe_seconds)
    shapes: list[tuple[int, int]] = []
    probe_s: list[float] = []
    resumed: list[float] = []  # when the pass asked for each batch, the probe done
    compiles: collections.Counter = collections.Counter()

    def listen(event: str, duration: float, fun_name: str = "", **_: Any) -> None:
        if event.endswith("backend_compile_duration") and "accumulate_batch" in fun_name:
            compiles[shapes[-1]] += 1

    def tracked(batches: Iterable[TokenBatch]) -> Iterator[TokenBatch]:
        for batch in batches:
            probe_s.append(common.timed(probe.call))
            resumed.append(time.perf_counter())
            shapes.append(batch.tokens_bt.shape)
            yield batch

    batches = length_batches(docs, batch_tokens=config.batch_tokens,
                             min_bucket=config.min_bucket, max_length=max_length,
                             pack_length=config.pack_length)
    load_before = os.getloadavg()
    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        with compile_time() as compiled:
            began = time.perf_counter()
            second_moments(lm.params, lm.config, tracked(batches), layers, config=config,
                           log=log)
            ended = time.perf_counter()
            wall = ended - began - sum(probe_s)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    real = sum(len(d) for d in docs)
    padded = sum(rows * length for rows, length in shapes)
    buckets = {f"{rows}x{length}": {"batches": shapes.count((rows, length)),
                                    "compiles": compiles[(rows, length)]}
               for rows, length in sorted(set(shapes), key=lambda s: s[1])}
    return {"model": str(model), "source": source, "text_file": str(text),
            "layers": list(layers), "documents": len(docs), "tokens": real,
            "padded_tokens": padded, "fill": real / padded, "batches": len(shapes),
            "buckets": buckets, "batch_s": batch_seconds(resumed, probe_s[1:], ended),
            "max_compiles_per_bucket": max(compiles.values(), default=0),
            "wall_s": wall, "tokens_per_s": real / wall, "compile_s": compiled.seconds,
            "programs_compiled": compiled.programs, "compile_share": compiled.seconds / wall,
            "tokens_per_s_without_compile": real / (wall - compiled.seconds),
            "compute": pass_flops(lm.config, layers, shapes, [len(d) for d in docs],
                                  wall, compiled.seconds, probe, probe_s),
            "config": dataclasses.asdict(config), "machine": common.machine(),
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "load_average_before": load_before, "load_average_after": os.getloadavg()}


def batch_seconds(resumed: Sequence[float], probe_s: Sequence[float],
                  ended: float) -> list[float]:
    """Seconds from asking for each batch to asking for the next (its step, first calls
    compiling), the next batch's probe taken out."""
    return [after - before - probe for before, after, probe
            in zip(resumed, [*resumed[1:], ended], [*probe_s, 0.0], strict=True)]


def pass_flops(cfg: Any, layers: tuple[int, ...], shapes: Sequence[tuple[int, int]],
               doc_lengths: list[int], wall_s: float, compile_s: float, probe: common.Probe,
               probe_s: Sequence[float]) -> Json:
    """FLOP/s of the pass, as computed (padded slots) and as useful (real tokens, causal
    keys), with and without compile time, against the interleaved probe.

    The peak is the probe's total work over its total seconds: like the pass's own rate, a
    time average over the same minutes, which a burst of load elsewhere slows alike. The
    median call (reported beside it) skips those bursts, which the pass cannot."""
    stop, n = max(layers) + 1, len(layers)
    padded = sum(flops.stats_batch(cfg, rows=rows, length=length, stop=stop, layers=n)
                 for rows, length in shapes)
    useful = flops.stats_useful(cfg, doc_lengths, stop=stop, layers=n)
    peak = probe.work * len(probe_s) / sum(probe_s)
    compute_s = wall_s - compile_s
    rates = {"padded_flop_per_s": padded / compute_s, "useful_flop_per_s": useful / compute_s,
             "padded_flop_per_s_with_compile": padded / wall_s,
             "useful_flop_per_s_with_compile": useful / wall_s}
    return {"padded_flops": padded, "useful_flops": useful, "peak_flop_per_s": peak,
            "median_probe_flop_per_s": probe.work / float(np.median(probe_s)),
            "probe": {**probe.detail, "inner": probe.inner, "seconds": list(probe_s)},
            **rates, **{name.replace("flop_per_s", "of_peak"): rate / peak
                        for name, rate in rates.items()},
            "padded_of_median_probe": rates["padded_flop_per_s"] * float(np.median(probe_s))
            / probe.work}


def real_report(results: Json) -> str:
    rows = [[name, str(b["batches"]), str(b["compiles"])]
            for name, b in results["buckets"].items()]
    table = common.markdown_table(["bucket (rows x length)", "batches", "compiles"], rows)
    c = results["compute"]
    return (f"{results['tokens']:,} tokens ({results['documents']} documents, fill "
            f"{results['fill']:.0%}) in {results['wall_s']:.1f} s: "
            f"{results['tokens_per_s']:,.0f} tokens/s; compiling {results['compile_s']:.1f} s "
            f"({results['compile_share']:.0%}), {results['tokens_per_s_without_compile']:,.0f} "
            f"tokens/s without it; load average {results['load_average_before'][0]:.1f} "
            f"before, {results['load_average_after'][0]:.1f} after\n\n"
            f"computed (padded) {c['padded_flop_per_s'] / 1e9:.1f} GFLOP/s = "
            f"{c['padded_of_peak']:.0%} of the matmul peak ({c['peak_flop_per_s'] / 1e9:.1f} "
            f"GFLOP/s, timed between batches; {c['padded_of_median_probe']:.0%} of its median "
            f"call); useful (real tokens) "
            f"{c['useful_flop_per_s'] / 1e9:.1f} GFLOP/s = {c['useful_of_peak']:.0%}; with "
            f"compile time {c['padded_of_peak_with_compile']:.0%} and "
            f"{c['useful_of_peak_with_compile']:.0%}\n\n{table}\n")


def main(argv: Sequence[str] | None = None) -> Json:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stats_cpu"))
    parser.add_argument("--model", type=Path, help="a checkpoint: time its statistics pass")
    parser.add_argument("--stats_source", default=DEFAULT_SOURCE)
    parser.add_argument("--tokens", type=int, default=50_000)
    parser.add_argument("--layers", default="4,5,6,7,8")
    parser.add_argument("--max_length", type=int, help="tokens kept per document (--model)")
    parser.add_argument("--probe_seconds", type=float, default=1.0,
                        help="seconds of each matmul probe between batches (--model)")
    parser.add_argument("--tag", default="", help="suffix of the --model results file")
    parser.add_argument("--pack_length", type=int, default=StatsConfig().pack_length,
                        help="rows of packed documents (--model; 0: one document a row)")
    args = parser.parse_args(argv)
    if args.model:
        layers = tuple(int(part) for part in args.layers.split(","))
        results = real_pass(args.model, args.stats_source, args.tokens, layers,
                            StatsConfig(log_every_s=30.0, max_length=args.max_length,
                                        pack_length=args.pack_length or None),
                            args.probe_seconds)
        name = "_".join(filter(None, (args.model.name, str(args.tokens), args.tag)))
        common.write_json(args.out / f"{name}.json", results)
        print(real_report(results))
        return results
    log(f"statistics benchmark, preset {args.preset}")
    results = run(PRESETS[args.preset])
    common.write_json(args.out / "results.json", results)
    (args.out / "results.md").write_text(report(results))
    print(report(results))
    return results


if __name__ == "__main__":
    main()
