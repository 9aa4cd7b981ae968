"""Long-form costs as ratios in one run (docs/references.md: muke Table 11): μKE against
AnyEdit per edit, with and without cached affinities; the affinity gradients vmap'd against a
per-figure loop; the shift loop with the prefix cache against running every layer at every step.

Every figure is timed in interleaved rounds (`common.time_interleaved`) on the organism with
its UnKEBench-format edits (configs/muke.cfg's layers and windows), compilation left out.

Run:  python -m benchmarks.longform_speed [--edits 4] [--repeats 5]
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import jax

from benchmarks.common import log, machine, markdown_table, seconds, time_interleaved, write_json
from keedit_jax.data import read_longform
from keedit_jax.flags import StructuredFlags
from keedit_jax.methods.run_structured import layer_statistics, stats_source
from keedit_jax.methods.unstructured import UnstructuredConfig, edit_longform
from keedit_jax.models import config_from_hf, init_params, load_model
from keedit_jax.models.tokenizer import load_tokenizer
from keedit_jax.organism import ensure_organism
from keedit_jax.organism.build import cache_root
from keedit_jax.stats import StatsConfig, default_cache_path
from keedit_jax.upstream import TargetConfig
from keedit_jax.upstream.longform import WindowConfig, encode_edits, pack_windows
from keedit_jax.upstream.windowed import compute_affinities, optimise_windows

OUT = Path("benchmarks/results/longform_speed_cpu")
LAYERS = (0, 1)
WINDOW = 8
# A deeper random Llama (organism vocabulary) with δ at a quarter of its depth, as Llama3-8B's
# layer 8 of 32: the organism's 4 layers leave the prefix cache only layer 0 to save.
DEEP = {"model_type": "llama", "vocab_size": 2048, "hidden_size": 256,
        "intermediate_size": 1024, "num_hidden_layers": 16, "num_attention_heads": 8,
        "num_key_value_heads": 4, "max_position_embeddings": 512, "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0, "tie_word_embeddings": False}
DEEP_LAYER = 4


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--edits", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    checkpoint = ensure_organism("small")
    lm = load_model(checkpoint)
    cfg, params = lm.config, lm.params
    tokenizer = load_tokenizer(checkpoint, cfg)
    records = read_longform(checkpoint / "benchmarks" / "unkebench.json")[: args.edits]
    hp = TargetConfig(layer=LAYERS[-1], v_loss_layer=cfg.n_layers - 1, fact_token="last",
                      v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0, kl_factor=0.0,
                      early_stop_loss=1e-2)
    muke = WindowConfig(strategy="matryoshka_affinity", window_size=WINDOW)
    anyedit = dataclasses.replace(muke, strategy="window")
    loop = dataclasses.replace(muke, affinity_gradients="loop")
    edits, failed = encode_edits(tokenizer, records, muke, cfg.max_positions)
    assert not failed, failed
    batches = [pack_windows([edit], 0) for edit in edits]  # batch size 1, as in the papers
    affinities = [compute_affinities(params, cfg, b, hp, muke) for b in batches]
    config = UnstructuredConfig(layers=LAYERS, solver="memit", target=hp, window=muke)
    cache = cache_root() / "stats"
    stats_config = StatsConfig(source=str(stats_source(checkpoint, StructuredFlags(), cache)))
    stats = layer_statistics(params, cfg, tokenizer, config, stats_config, 2e-2,
                             default_cache_path(cache, checkpoint.resolve().name, LAYERS,
                                                stats_config))

    deep_cfg = config_from_hf(DEEP)
    deep_params = init_params(deep_cfg, jax.random.key(0))
    deep_hp = dataclasses.replace(hp, layer=DEEP_LAYER, v_loss_layer=deep_cfg.n_layers - 1,
                                  early_stop_loss=0.0)

    def each(call):
        return lambda: [call(i) for i in range(len(edits))]

    def full_edit(window, with_affinity):
        run = dataclasses.replace(config, window=window)

        def call(i):
            affinity = affinities[i] if with_affinity else None
            return edit_longform(params, cfg, [edits[i]], stats, run, pad_id=0,
                                 affinity=affinity)[0]
        return each(call)

    calls = {
        "AnyEdit edit": full_edit(anyedit, False),
        "μKE edit, cached affinities": full_edit(muke, True),
        "μKE edit, affinities computed": full_edit(muke, False),
        "affinities, vmap'd figures": each(
            lambda i: compute_affinities(params, cfg, batches[i], hp, muke)),
        "affinities, per-figure loop": each(
            lambda i: compute_affinities(params, cfg, batches[i], hp, loop)),
        "AnyEdit shifts, prefix cache": each(
            lambda i: optimise_windows(params, cfg, batches[i], hp, anyedit)),
        "AnyEdit shifts, no prefix cache": each(
            lambda i: optimise_windows(params, cfg, batches[i], hp, anyedit,
                                       prefix_cache=False)),
        "deep model: AnyEdit shifts, prefix cache": each(
            lambda i: optimise_windows(deep_params, deep_cfg, batches[i], deep_hp, anyedit)),
        "deep model: AnyEdit shifts, no prefix cache": each(
            lambda i: optimise_windows(deep_params, deep_cfg, batches[i], deep_hp, anyedit,
                                       prefix_cache=False)),
    }
    timings = time_interleaved(calls, args.repeats)
    per_edit = {name: t.median_s / len(edits) for name, t in timings.items()}
    ratios = {
        "μKE (cached) / AnyEdit": per_edit["μKE edit, cached affinities"]
        / per_edit["AnyEdit edit"],
        "μKE (computed) / AnyEdit": per_edit["μKE edit, affinities computed"]
        / per_edit["AnyEdit edit"],
        "affinity loop / vmap": per_edit["affinities, per-figure loop"]
        / per_edit["affinities, vmap'd figures"],
        "no prefix cache / prefix cache": per_edit["AnyEdit shifts, no prefix cache"]
        / per_edit["AnyEdit shifts, prefix cache"],
        "deep model: no prefix cache / prefix cache":
            per_edit["deep model: AnyEdit shifts, no prefix cache"]
            / per_edit["deep model: AnyEdit shifts, prefix cache"],
    }
    windows = [len(e.windows) for e in edits]
    rows = [[name, seconds(value)] for name, value in per_edit.items()]
    table = markdown_table(["per edit (median)", "seconds"], rows) + "\n\n" + markdown_table(
        ["ratio", "value"], [[k, f"{v:.3f}"] for k, v in ratios.items()])
    log("\n" + table)
    write_json(OUT / "results.json", {"machine": machine(), "edits": len(edits),
                                      "windows": windows, "window_size": WINDOW,
                                      "timings": {k: t.to_json() for k, t in timings.items()},
                                      "per_edit_s": per_edit, "ratios": ratios})
    (OUT / "results.md").write_text(
        f"{len(edits)} UnKEBench-format edits of the organism, windows {windows} of {WINDOW} "
        f"tokens, layers {LAYERS}, batch size 1; the deep model is a random 16-layer d=256 "
        f"Llama with δ at layer {DEEP_LAYER}; medians of {args.repeats} interleaved rounds."
        f"\n\n{table}\n")


if __name__ == "__main__":
    main()
