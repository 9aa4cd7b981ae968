"""Why long-form methods score as they do on the organism: teacher-forced NLL of the target and
argmax accuracy (the fraction of target tokens greedy decoding would reproduce, given the
right prefix) on the unedited model, with the optimised shifts injected (the upstream alone),
and after the weight update (what generation sees).

`--sub` measures instead where the sub-question damage comes from: the command line on a few
records per variant (the objective, K_p, λ, layers, windows, the end-of-turn window), and per
variant the Sub scores on the facts the edit changes and on those it keeps, and how many
sub-answers run on past their one sentence (the stop token lost).

Run:  python -m benchmarks.longform_diagnosis [--edits 6] [--mom2 20 200]
      python -m benchmarks.longform_diagnosis --sub [--edits 6]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import log
from keedit_jax.data import read_longform
from keedit_jax.flags import LongFormFlags, StructuredFlags
from keedit_jax.intervene import Shift, Taps, run
from keedit_jax.methods.run_structured import layer_statistics, stats_source
from keedit_jax.methods.run_unstructured import select_records, unstructured_config
from keedit_jax.methods.unstructured import edit_longform
from keedit_jax.models import load_model
from keedit_jax.models.tokenizer import load_tokenizer
from keedit_jax.organism import ensure_organism
from keedit_jax.organism.build import cache_root
from keedit_jax.results import markdown_table
from keedit_jax.stats import StatsConfig, default_cache_path
from keedit_jax.upstream.longform import EncodedEdit, encode_edits, pack_windows
from keedit_jax.upstream.windowed import optimise_windows

OUT = Path("benchmarks/results/longform_diagnosis")
VARIANTS = {"AnyEdit": {"upstream_strategy": "window"}, "μKE": {},
            "μKE released order": {"coefficient_order": "released"},
            "Matryoshka-vanilla": {"upstream_strategy": "matryoshka_vanilla"},
            "sequential-NLL": {"upstream_strategy": "sequential_nll"},
            "AnyEdit, no K_p": {"upstream_strategy": "window", "in_context_preservation": False},
            "μKE, no K_p": {"in_context_preservation": False}}


SUB_OUT = OUT / "sub"
SUB_VARIANTS = {
    "μKE": (),
    "windows of 8": ("--window_size=8",),
    "no K_p": ("--noin_context_preservation",),
    "λ=200": ("--mom2_update_weight=200",),
    "layer 1 only": ("--layers=1",),
    "AnyEdit objective": ("--upstream_strategy=window",),
}


def runs_on(answer: str) -> bool:
    """A sub-answer (one sentence in the target) that goes on past its first sentence."""
    return len([s for s in answer.split(".") if s.strip()]) > 1


def sub_summary(results: dict) -> dict[str, float]:
    """Sub scores ×100 of one run, pre and post: changed-fact efficacy, kept facts, ROUGE-1
    on the unchanged-fact sub-questions, and the share of sub-answers that run on."""
    out = {}
    for stage in ("pre", "post"):
        rows = [r for r in results["answers"][stage] if r["group"] == "Sub"]
        kept = [r for r in rows if "fact_kept" in r]
        changed = [r for r in rows if "fact_efficacy" in r]
        out |= {f"{stage} new stated": 100 * np.mean([r["fact_efficacy"] for r in changed]),
                f"{stage} old stated": 100 * np.mean([r["fact_leak"] for r in changed]),
                f"{stage} kept": 100 * np.mean([r["fact_kept"] for r in kept]),
                f"{stage} R-1 kept": 100 * np.mean([r["rouge1_recall"] for r in kept]),
                f"{stage} run on": 100 * np.mean([runs_on(r["answer"]) for r in rows])}
    return out


def sub_damage(edits: int) -> list[dict]:
    """Each SUB_VARIANTS run of configs/muke.cfg on `edits` records, summarised."""
    rows = []
    for name, extra in SUB_VARIANTS.items():
        out = SUB_OUT / name.replace(" ", "_").replace("=", "").replace("μ", "mu")
        if not (out / "results.json").exists():
            subprocess.run([sys.executable, "-m", "keedit_jax.main",
                            "--flagfile=configs/muke.cfg", f"--num_edits={edits}",
                            f"--output_dir={out}", "--overwrite", *extra], check=True)
        rows.append({"variant": name, **sub_summary(json.loads(
            (out / "results.json").read_text()))})
        log(f"{name}: {rows[-1]}")
    return rows


@partial(jax.jit, static_argnames=("cfg", "layer"))
def _log_probs(params, cfg, layer, ids, positions, deltas):
    shift = Shift(positions[None], deltas[None], layer)
    _, caps = run(params, cfg, tokens=ids[None], attention_mask=jnp.ones_like(ids)[None],
                  shifts=(shift,), taps=Taps(logits=True))
    return jax.nn.log_softmax(caps.logits[0], -1)


def target_fit(params, cfg, layer: int, edit: EncodedEdit, deltas) -> tuple[float, float]:
    """(mean NLL, argmax accuracy) of the target under teacher forcing, with `deltas` added."""
    ids = jnp.asarray(np.asarray(edit.prompt_ids + edit.target_ids[:-1], np.int32))
    positions = jnp.asarray(np.asarray(edit.shift_positions, np.int32))
    logp = np.asarray(_log_probs(params, cfg, layer, ids, positions, jnp.asarray(deltas)))
    at = len(edit.prompt_ids) - 1 + np.arange(len(edit.target_ids))
    target = np.asarray(edit.target_ids)
    return float(-logp[at, target].mean()), float((logp[at].argmax(-1) == target).mean())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=6)
    parser.add_argument("--mom2", type=float, nargs="+", default=[20.0, 200.0])
    parser.add_argument("--sub", action="store_true", help="the sub-question damage")
    args = parser.parse_args()
    if args.sub:
        table = markdown_table(sub_damage(args.edits))
        (SUB_OUT / "results.md").write_text(f"{args.edits} UnKEBench-format organism edits "
                                            f"(configs/muke.cfg), Sub scores ×100.\n\n{table}")
        print(table)
        return
    checkpoint = ensure_organism("small")
    lm = load_model(checkpoint)
    cfg, params = lm.config, lm.params
    tokenizer = load_tokenizer(checkpoint, cfg)
    records = select_records(read_longform(checkpoint / "benchmarks" / "unkebench.json"),
                             50)[: args.edits]
    rows = []
    for mom2 in args.mom2:
        structured = StructuredFlags(layers="0,1", v_lr=0.5, v_weight_decay=1e-3,
                                     clamp_norm_factor=4.0, mom2_update_weight=mom2)
        cache = cache_root() / "stats"
        stats_config = StatsConfig(source=str(stats_source(checkpoint, structured, cache)))
        stats = None
        for name, overrides in VARIANTS.items():
            flags = LongFormFlags(window_size=8, **overrides)
            config = unstructured_config("muke", structured, flags, cfg.n_layers)
            layer = config.target.layer
            if stats is None:
                stats = layer_statistics(params, cfg, tokenizer, config, stats_config, 2e-2,
                                         default_cache_path(cache, checkpoint.resolve().name,
                                                            config.layers, stats_config))
            edits, _ = encode_edits(tokenizer, records, config.window, cfg.max_positions)
            fits = []
            for edit in edits:
                n = len(edit.windows)
                zeros = np.zeros((n, cfg.d_model), np.float32)
                result = optimise_windows(params, cfg, pack_windows([edit], 0), config.target,
                                          config.window)
                edited, _, _ = edit_longform(params, cfg, [edit], stats, config, pad_id=0)
                fits.append(target_fit(params, cfg, layer, edit, zeros)
                            + target_fit(params, cfg, layer, edit, np.asarray(result.delta[0, :n]))
                            + target_fit(edited, cfg, layer, edit, zeros))
            mean = np.mean(fits, axis=0)
            rows.append({"λ": mom2, "variant": name, "pre NLL": mean[0], "pre acc": mean[1],
                         "shifts NLL": mean[2], "shifts acc": mean[3],
                         "edited NLL": mean[4], "edited acc": mean[5]})
            log(f"λ={mom2} {name}: {np.round(mean, 3)}")
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=2))
    table = markdown_table(rows)
    (OUT / "results.md").write_text(
        f"{args.edits} UnKEBench-format organism edits, windows of 8, layers 0,1 (δ at 1).\n\n"
        f"{table}")
    print(table)


if __name__ == "__main__":
    main()
