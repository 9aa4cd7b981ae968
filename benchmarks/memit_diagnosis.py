"""MEMIT on a real model, a few ZsRE edits, with the per-request diagnostics: does the target
optimisation reach its target (target prob with δ), and does the solve realise it (share of δ
at the lookup token, target prob of the edited weights)? Used to choose SmolLM2's settings.

Run:  python -m benchmarks.memit_diagnosis --model=DIR --dataset=zsre.json --stats_source=TEXT \
        [--layers 4,5,6,7,8 --lam 1600 --lr 0.5 --steps 25 --clamp 0.75 --edits 6 --batch 3
         --templates gen|bare] --out=diagnosis.json
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

from keedit_jax import downstream
from keedit_jax.data import read_dataset
from keedit_jax.eval.structured import evaluate_zsre, model_score_fn, summarize
from keedit_jax.methods.run_structured import solver_statistics
from keedit_jax.methods.structured import StructuredConfig, edit_requests
from keedit_jax.models import load_model
from keedit_jax.models.tokenizer import load_tokenizer
from keedit_jax.stats import StatsConfig, load_or_compute
from keedit_jax.upstream import TargetConfig, context_templates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for name in ("model", "dataset", "stats_source", "out"):
        parser.add_argument(f"--{name}", required=True)
    parser.add_argument("--layers", default="4,5,6,7,8")
    parser.add_argument("--lam", type=float, default=15000.0)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--clamp", type=float, default=0.75)
    parser.add_argument("--edits", type=int, default=5)
    parser.add_argument("--batch", type=int, default=0, help="0: all edits in one batch")
    parser.add_argument("--templates", choices=("gen", "bare"), default="gen")
    parser.add_argument("--stats_samples", type=int, default=500)
    parser.add_argument("--stats_layers", default="0-17", help="one cached pass, any subset")
    args = parser.parse_args()
    layers = tuple(int(x) for x in args.layers.split(","))
    lo, hi = (int(x) for x in args.stats_layers.split("-"))
    lm = load_model(args.model, jnp.float32)
    cfg, params = lm.config, lm.params
    tokenizer = load_tokenizer(args.model, cfg)
    records = list(read_dataset(args.dataset, "zsre"))[: args.edits]
    stats_config = StatsConfig(source=args.stats_source, n_samples=args.stats_samples,
                               max_length=256)
    moments = load_or_compute(params, cfg, tuple(range(lo, hi + 1)), tokenizer,
                              config=stats_config, path=f"{args.out}.stats.npz")
    stats = solver_statistics({layer: moments[layer] for layer in layers}, "moment", 2e-2)
    templates = (context_templates(params, cfg, tokenizer, jax.random.key(0))
                 if args.templates == "gen" else ("{}",))
    target = TargetConfig(layer=layers[-1], v_loss_layer=cfg.n_layers - 1,
                          v_num_grad_steps=args.steps, v_lr=args.lr, clamp_norm_factor=args.clamp)
    config = StructuredConfig(layers=layers, solver="memit", target=target,
                              memit=downstream.MemitHParams(mom2_update_weight=args.lam))
    pre = [evaluate_zsre(r, model_score_fn(params, cfg, tokenizer)).metrics() for r in records]
    size = args.batch or len(records)
    post, rows, seconds = [], [], []
    for start in range(0, len(records), size):
        batch = records[start:start + size]
        began = time.perf_counter()
        states = downstream.init_states(config.make_solver(), layers, cfg.d_ff, cfg.d_model)
        edited, _, diagnostics = edit_requests(params, cfg, tokenizer,
                                               [r.request for r in batch], templates, stats,
                                               states, config)
        jax.block_until_ready(edited)
        seconds.append(time.perf_counter() - began)
        score = model_score_fn(edited, cfg, tokenizer)
        post += [evaluate_zsre(r, score).metrics() for r in batch]
        rows += diagnostics["requests"]
    summary = {key: float(np.mean([r[key] for r in rows]))
               for key in ("target_prob_last", "target_prob_edited", "realised")}
    result = {"args": vars(args), "templates": templates, "pre": summarize(pre),
              "post": summarize(post), "diagnostics": rows, "summary": summary,
              "seconds": seconds}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1, default=str)
    print(json.dumps({"pre": result["pre"], "post": result["post"], **summary}))


if __name__ == "__main__":
    main()
