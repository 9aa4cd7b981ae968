"""Steady state of one long-form edit at a realistic size (issue 20), today against a baseline.

A random Llama (default: 16 layers, d_model 512, d_ff 1408, 8 heads, vocabulary 32000; δ at
layer 4, the loss at the last) edits one request of a 30-token prompt and a 129-token target
(159 tokens) in windows of 30 (5 windows), 25 steps, lr 0.5, clamp 4, wd 1e-3, 3 affinity
steps. The stages of an edit are timed for this tree and for a baseline commit of the library
(`git archive` of keedit_jax, imported beside it as keedit_jax_old), alternated in rounds
(`common.time_interleaved`), compilation left out:

  affinities      μKE's up-front affinities (compute_affinities)
  μKE δ loop      optimise_windows, matryoshka_affinity, the affinities given
  AnyEdit δ loop  optimise_windows, window

and δ (and the affinities) of both are compared: max |Δ| / max |δ|. `--variants` adds this
tree with one change undone at a time (power-of-two padding, all padded figure gradients
vmap'd, every target position read by AnyEdit's stages), to attribute the gain.

Run:  python -m benchmarks.longform_steady [--layers 16] [--rounds 2] [--variants]
      (one thread: XLA_FLAGS="--xla_cpu_multi_thread_eigen=false
      intra_op_parallelism_threads=1"; the benchmark sets it when --threads 1, the default)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import subprocess
import sys
import tempfile
from pathlib import Path

OUT = Path("benchmarks/results/longform_steady_cpu")


def baseline_package(commit: str, root: Path) -> None:
    """keedit_jax at `commit`, renamed keedit_jax_old, under root (put on sys.path)."""
    target = root / "keedit_jax_old"
    archive = subprocess.run(["git", "archive", commit, "keedit_jax"], check=True,
                             capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(root)], input=archive, check=True)
    (root / "keedit_jax").rename(target)
    for path in target.rglob("*.py"):
        text = path.read_text()
        path.write_text(text.replace("keedit_jax", "keedit_jax_old"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--d_model", type=int, default=512)
    parser.add_argument("--d_ff", type=int, default=1408)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--delta_layer", type=int, default=None,
                        help="δ's layer (default: a quarter of the depth)")
    parser.add_argument("--prompt", type=int, default=30)
    parser.add_argument("--target", type=int, default=129)
    parser.add_argument("--window", type=int, default=30)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--baseline", default="bcb15f9")
    parser.add_argument("--variants", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--only", nargs="*", default=None,
                        help="time only the stages whose names contain one of these")
    args = parser.parse_args()
    if args.threads == 1:
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "")
                                   + " --xla_cpu_multi_thread_eigen=false"
                                   " intra_op_parallelism_threads=1")
    root = Path(tempfile.mkdtemp(prefix="keedit_baseline_"))
    baseline_package(args.baseline, root)
    sys.path.insert(0, str(root))

    import jax
    import numpy as np

    from benchmarks.common import (
        log,
        machine,
        markdown_table,
        seconds,
        time_interleaved,
        write_json,
    )

    def library(name: str):
        mod = {m: importlib.import_module(f"{name}.{m}") for m in
               ("models", "upstream", "upstream.encode", "upstream.longform",
                "upstream.windowed", "upstream.windows")}
        return mod

    new, old = library("keedit_jax"), library("keedit_jax_old")
    hf = {"model_type": "llama", "vocab_size": args.vocab, "hidden_size": args.d_model,
          "intermediate_size": args.d_ff, "num_hidden_layers": args.layers,
          "num_attention_heads": 8, "num_key_value_heads": 8,
          "max_position_embeddings": 512, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
          "tie_word_embeddings": False}
    layer = args.layers // 4 if args.delta_layer is None else args.delta_layer
    rng = np.random.default_rng(0)
    prompt = tuple(int(x) for x in rng.integers(1, args.vocab, args.prompt))
    target = tuple(int(x) for x in rng.integers(1, args.vocab, args.target))

    def setup(lib):
        cfg = lib["models"].config_from_hf(hf)
        params = lib["models"].init_params(cfg, jax.random.key(0))
        hp = lib["upstream"].TargetConfig(
            layer=layer, v_loss_layer=args.layers - 1, fact_token="last", v_lr=0.5,
            v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0, early_stop_loss=1e-2,
            v_num_grad_steps=args.steps)
        lf = lib["upstream.longform"]
        muke = lf.WindowConfig(strategy="matryoshka_affinity", window_size=args.window)
        anyedit = dataclasses.replace(muke, strategy="window")
        windows = tuple(lib["upstream.windows"].window_bounds(len(target), args.window))
        edit = lf.EncodedEdit(0, prompt, target, windows)
        return cfg, params, hp, muke, anyedit, edit

    cfg_o, params_o, hp_o, muke_o, any_o, edit_o = setup(old)
    cfg_n, params_n, hp_n, muke_n, any_n, edit_n = setup(new)
    for a, b in zip(jax.tree.leaves(params_o), jax.tree.leaves(params_n), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    batch_o = old["upstream.longform"].pack_windows([edit_o], 0)
    batch_n = new["upstream.longform"].pack_windows([edit_n], 0)
    wo, wn = old["upstream.windowed"], new["upstream.windowed"]
    log(f"model: {hf}; δ at {layer}; sequence {len(prompt) + len(target) - 1} tokens, width "
        f"{batch_o.shift.tokens.shape[-1]} (baseline) / {batch_n.shift.tokens.shape[-1]} (now), "
        f"reads {batch_o.shift.read_pos.shape[-1]} / {batch_n.shift.read_pos.shape[-1]}, "
        f"{len(edit_n.windows)} windows (padded to {batch_n.starts.shape[1]})")

    aff_o = wo.compute_affinities(params_o, cfg_o, batch_o, hp_o, muke_o)
    aff_n = wn.compute_affinities(params_n, cfg_n, batch_n, hp_n, muke_n)
    calls = {
        "affinities, baseline": lambda: wo.compute_affinities(params_o, cfg_o, batch_o, hp_o,
                                                              muke_o),
        "affinities, now": lambda: wn.compute_affinities(params_n, cfg_n, batch_n, hp_n,
                                                         muke_n),
        "μKE δ loop, baseline": lambda: wo.optimise_windows(params_o, cfg_o, batch_o, hp_o,
                                                            muke_o, aff_o).delta,
        "μKE δ loop, now": lambda: wn.optimise_windows(params_n, cfg_n, batch_n, hp_n,
                                                       muke_n, aff_n).delta,
        "AnyEdit δ loop, baseline": lambda: wo.optimise_windows(params_o, cfg_o, batch_o,
                                                                hp_o, any_o).delta,
        "AnyEdit δ loop, now": lambda: wn.optimise_windows(params_n, cfg_n, batch_n, hp_n,
                                                           any_n).delta,
    }
    if args.variants:
        wide = new["upstream.longform"].pack_windows(
            [edit_n], 0, width=batch_o.shift.tokens.shape[-1])
        wide = dataclasses.replace(wide, shift=dataclasses.replace(
            wide.shift, read_pos=np.asarray(batch_o.shift.read_pos)))
        vmapped = dataclasses.replace(muke_n, affinity_gradients="vmap")
        calls |= {
            "affinities, now but padded to the power of two": lambda: wn.compute_affinities(
                params_n, cfg_n, wide, hp_n, muke_n),
            "affinities, now but all figures vmap'd": lambda: wn.compute_affinities(
                params_n, cfg_n, batch_n, hp_n, vmapped),
            "μKE δ loop, now but padded to the power of two": lambda: wn.optimise_windows(
                params_n, cfg_n, wide, hp_n, muke_n, aff_n).delta,
            "AnyEdit δ loop, now but padded to the power of two": lambda: wn.optimise_windows(
                params_n, cfg_n, wide, hp_n, any_n).delta,
            "AnyEdit δ loop, now but every target position read": lambda: wn.optimise_windows(
                params_n, cfg_n, batch_n, hp_n, any_n, window_reads=False).delta,
        }
    if args.only:
        calls = {k: v for k, v in calls.items() if any(x in k for x in args.only)}
    outputs = {}

    def keeping(name, call):
        def run():
            outputs[name] = call()
            return outputs[name]
        return run

    timings = time_interleaved({k: keeping(k, v) for k, v in calls.items()}, args.rounds)
    median = {name: t.median_s for name, t in timings.items()}

    def relative(a, b):
        a, b = np.asarray(a), np.asarray(b)
        return float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))

    agreement = {"affinities": relative(aff_o, aff_n)}
    for stage in ("μKE", "AnyEdit"):  # each δ loop with its own affinities
        if f"{stage} δ loop, now" in outputs:
            agreement[f"{stage} δ"] = relative(outputs[f"{stage} δ loop, baseline"],
                                               outputs[f"{stage} δ loop, now"])
    for name, value in outputs.items():
        if ", now but " in name and "δ loop" in name:
            agreement[name.replace(" loop", "")] = relative(
                outputs[name.split(", now but ")[0] + ", baseline"], value)
    if args.variants:  # the rounding floor: the baseline's own code at this tree's width
        shift = old["upstream.encode"].ShiftBatch(**{
            f.name: getattr(batch_n.shift, f.name) for f in dataclasses.fields(batch_n.shift)})
        narrow = old["upstream.longform"].WindowBatch(
            shift, batch_n.token_index, batch_n.starts, batch_n.ends, batch_n.n_windows,
            batch_n.n_target)
        for stage, wc, aff in (("μKE", muke_o, aff_o), ("AnyEdit", any_o, None)):
            agreement[f"{stage} δ, baseline's code at this width (rounding floor)"] = relative(
                outputs[f"{stage} δ loop, baseline"],
                wo.optimise_windows(params_o, cfg_o, narrow, hp_o, wc, aff).delta)
    per_edit, ratios = {}, {}
    if "affinities, now" in median and "μKE δ loop, now" in median:
        for side in ("baseline", "now"):
            per_edit[f"μKE edit (affinities + δ loop), {side}"] = (
                median[f"affinities, {side}"] + median[f"μKE δ loop, {side}"])
    for stage in ("affinities", "μKE δ loop", "μKE edit (affinities + δ loop)",
                  "AnyEdit δ loop"):
        times = {**median, **per_edit}
        if f"{stage}, now" in times:
            ratios[stage] = times[f"{stage}, baseline"] / times[f"{stage}, now"]
    for name in median:
        if ", now but " in name:
            stage = name.split(", now but ")[0]
            ratios[f"{stage}: ({name.split(', now but ')[1]}) / now"] = (
                median[name] / median[f"{stage}, now"])
    rows = [[name, seconds(value)] for name, value in {**median, **per_edit}.items()]
    table = (markdown_table(["stage (median)", "seconds"], rows) + "\n\n"
             + markdown_table(["speed-up (baseline / now) or cost", "ratio"],
                              [[k, f"{v:.2f}"] for k, v in ratios.items()]) + "\n\n"
             + markdown_table(["agreement", "max |Δ| / max |baseline|"],
                              [[k, f"{v:.1e}"] for k, v in agreement.items()]))
    log("\n" + table)
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(args.out / "results.json", {
        "machine": machine(), "model": hf, "delta_layer": layer, "args": {
            k: str(v) for k, v in vars(args).items()},
        "timings": {k: t.to_json() for k, t in timings.items()}, "per_edit_s": per_edit,
        "ratios": ratios, "agreement": agreement})
    (args.out / "results.md").write_text(
        f"Random Llama {args.layers} layers, d {args.d_model}, d_ff {args.d_ff}, vocabulary "
        f"{args.vocab}, δ at {layer}; prompt {args.prompt} + target {args.target} tokens, "
        f"windows of {args.window}, {args.steps} steps; baseline {args.baseline}; medians of "
        f"{args.rounds} interleaved rounds, {args.threads} thread(s); load "
        f"{machine()['load_average']}.\n\n{table}\n")


if __name__ == "__main__":
    main()
