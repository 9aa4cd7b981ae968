"""Run in a subprocess with several CPU devices (the device count is fixed when JAX starts):
the same forward, statistics pass and μKE edit on one device and sharded over a mesh, and
their largest differences written as JSON for tests/test_parallel.py to judge.

python -m tests.parallel_worker MODEL_DIR OUT_JSON --devices=8 --mesh=2,2,2
"""

from __future__ import annotations

import argparse
import json
import sys

import jax

if __name__ == "__main__":
    _args = argparse.ArgumentParser()
    _args.add_argument("model")
    _args.add_argument("out")
    _args.add_argument("--devices", type=int, default=8)
    _args.add_argument("--mesh", default="2,2,2")
    _args.add_argument("--partitioner", default="gspmd")
    ARGS = _args.parse_args()
    jax.config.update("jax_num_cpu_devices", ARGS.devices)  # before any device is touched
    jax.config.update("jax_default_matmul_precision", "highest")

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

from keedit_jax import downstream, parallel, upstream  # noqa: E402
from keedit_jax.intervene import Taps, run  # noqa: E402
from keedit_jax.methods.unstructured import UnstructuredConfig, edit_longform  # noqa: E402
from keedit_jax.models import down_proj_path, get_path, load_model  # noqa: E402
from keedit_jax.stats import second_moments  # noqa: E402
from keedit_jax.stats._texts import pad_left  # noqa: E402
from keedit_jax.upstream.longform import WindowConfig, encode_edits  # noqa: E402

TEXTS = ["The Eiffel Tower is located in Paris, the capital of France.",
         "The Colosseum is an ancient amphitheatre in the centre of Rome.",
         "Marie Curie was a physicist and chemist who won two Nobel Prizes.",
         "Tokyo is the capital of Japan, and Berlin is the capital of Germany.",
         "Water boils at one hundred degrees."]


def requests() -> list:
    from tests.test_windowed import REQUESTS  # noqa: PLC0415

    extra = (REQUESTS[0]._replace(case_id="c", question="Where is the Colosseum?",
                                  answer="The Colosseum is an amphitheatre in Rome, Italy."),
             REQUESTS[1]._replace(case_id="d", question="What is Tokyo?",
                                  answer="Tokyo is the capital of Japan and a large city."))
    return [*REQUESTS, *extra]  # four edits: their rows split over data × fsdp = 4


def muke_config(n_layers: int) -> UnstructuredConfig:
    target = upstream.TargetConfig(layer=1, v_loss_layer=n_layers - 1, fact_token="last",
                                   v_lr=0.5, v_weight_decay=1e-3, clamp_norm_factor=4.0,
                                   early_stop_loss=1e-2, kl_factor=0.0)
    return UnstructuredConfig(layers=(0, 1), solver="memit", target=target,
                              window=WindowConfig(strategy="matryoshka_affinity", window_size=6),
                              memit=downstream.MemitHParams(mom2_update_weight=1.0))


def everything(model_dir: str, tokenizer, shardings) -> dict[str, np.ndarray]:
    """Logits of a batch, Σ k kᵀ of layers 0 and 1, and the μKE-edited down projections."""
    lm = load_model(model_dir, jnp.float32, shardings)
    cfg, params = lm.config, lm.params
    ids = [tokenizer(t)["input_ids"] for t in TEXTS]
    batch = pad_left(ids, max(map(len, ids)), 8)
    _, captures = run(params, cfg, tokens=parallel.put_rows(batch.tokens_bt),
                      attention_mask=parallel.put_rows(batch.segments_bt), taps=Taps(logits=True))
    moments = second_moments(params, cfg, iter([batch]), (0, 1), log=lambda _: None)
    stats = {layer: jnp.asarray(m.mean(), jnp.float32) for layer, m in moments.items()}
    config = muke_config(cfg.n_layers)
    edits, failed = encode_edits(tokenizer, requests(), config.window, cfg.max_positions)
    assert not failed, failed
    edited, dropped, _ = edit_longform(params, cfg, edits, stats, config, pad_id=0)
    assert not dropped, dropped
    kernel = get_path(edited, down_proj_path(cfg))
    return {"logits": parallel.to_host(captures.logits)[: len(TEXTS)],
            "sum_ff_0": moments[0].sum_ff, "sum_ff_1": moments[1].sum_ff,
            "down_proj": parallel.to_host(kernel),
            "delta": parallel.to_host(kernel - get_path(params, down_proj_path(cfg)))}


def layout_report(model_dir: str) -> dict[str, list]:
    """Per parameter: its spec and the block shape each device holds."""
    lm = load_model(model_dir, jnp.float32, parallel.model_shardings)
    flat = jax.tree_util.tree_flatten_with_path(lm.params)[0]
    return {"/".join(k.key for k in path): [str(x.sharding.spec),
                                            sorted({s.data.shape for s in x.addressable_shards})]
            for path, x in flat}


def main() -> None:
    tokenizer = AutoTokenizer.from_pretrained(ARGS.model)
    single = everything(ARGS.model, tokenizer, None)
    data, fsdp, tensor = map(int, ARGS.mesh.split(","))
    layout = parallel.make_mesh(parallel.MeshConfig(data=data, fsdp=fsdp, tensor=tensor,
                                                    partitioner=ARGS.partitioner))
    with parallel.use_mesh(layout):
        sharded = everything(ARGS.model, tokenizer, parallel.model_shardings)
        layouts = layout_report(ARGS.model)
    report = {"devices": len(jax.devices()), "mesh": dict(layout.mesh.shape), "layouts": layouts,
              "max_abs": {k: float(np.max(np.abs(single[k] - sharded[k]))) for k in single},
              "scale": {k: float(np.max(np.abs(single[k]))) for k in single}}
    with open(ARGS.out, "w") as handle:
        json.dump(report, handle, indent=1)


if __name__ == "__main__":
    main()
    sys.exit(0)
