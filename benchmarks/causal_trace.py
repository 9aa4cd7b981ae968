"""Where a real model stores subject facts: causal tracing (Meng et al., 2022, ROME §2.1).

For each fact prompt the model knows, the subject's token embeddings are corrupted with
Gaussian noise (3× the embedding std, 3 samples); then the clean output of one layer at the
subject's last token is restored and p(answer) measured. The average indirect effect per layer
(restored − corrupted, over the facts the model knows: clean p > 0.1) says which layers carry
the subject's fact at that token: MEMIT's edited layers on a new model are chosen there.

Run:  python -m benchmarks.causal_trace --model=/path/to/checkpoint
"""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from keedit_jax.intervene import Shift, Taps, run
from keedit_jax.models import load_model
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.params import Params
from keedit_jax.models.tokenizer import load_tokenizer
from keedit_jax.models.transformer import embed, head, prompt_inputs
from keedit_jax.upstream import prompt_and_lookup

OUT = Path("benchmarks/results/real_smollm2/causal_trace.json")
# Well-known facts (prompt, subject, first word of the answer); multi-token subjects are the
# informative ones (a one-token subject is restored whole at any layer).
FACTS = (("The capital of {} is", "France", "Paris"), ("The capital of {} is", "Japan", "Tokyo"),
         ("The capital of {} is", "Italy", "Rome"), ("The capital of {} is", "Germany", "Berlin"),
         ("The mother tongue of {} is", "Danielle Darrieux", "French"),
         ("{} is located in the city of", "The Eiffel Tower", "Paris"),
         ("{} is located in the city of", "The Colosseum", "Rome"),
         ("{} was written by", "Romeo and Juliet", "William"),
         ("{} was developed by", "The iPhone", "Apple"), ("{} was founded by", "Microsoft", "Bill"),
         ("{} plays the sport of", "Lionel Messi", "football"),
         ("The official language of {} is", "Brazil", "Portuguese"),
         ("{} is the capital of", "Madrid", "Spain"), ("{} is a city in", "Toronto", "Canada"),
         ("The headquarters of {} are in", "Toyota", "Japan"),
         ("{} was born in the country of", "Albert Einstein", "Germany"),
         ("{} is a professional", "Roger Federer", "tennis"),
         ("The currency of {} is the", "Japan", "yen"), ("{} is the CEO of", "Tim Cook", "Apple"),
         ("{} was painted by", "The Mona Lisa", "Leonardo"))


@partial(jax.jit, static_argnames="cfg")
def restored_probs(params: Params, cfg: ModelConfig, tokens: jax.Array, subject: jax.Array,
                   last: jax.Array, noise: jax.Array, answer: jax.Array) -> jax.Array:
    """p(answer) [L + 2]: clean, corrupted, then corrupted with layer l's clean output at the
    subject's last token restored (one row per layer, one program)."""
    n = cfg.n_layers
    mask = jnp.ones_like(tokens)
    clean = embed(params, cfg, tokens, prompt_inputs(cfg, mask).positions)
    corrupt = clean + noise[None] * subject[None, :, None]
    every = Taps(block_out=tuple(range(n)))
    _, good = run(params, cfg, attention_mask=mask, hidden=clean, taps=every)
    _, bad = run(params, cfg, attention_mask=mask, hidden=corrupt, taps=every)
    rows = n + 2
    shifts = tuple(
        Shift(jnp.full((rows, 1), last),
              (jnp.arange(rows) == layer + 2)[:, None, None]
              * (good.block_out[layer][:, last] - bad.block_out[layer][:, last])[:, None], layer)
        for layer in range(n))
    out, _ = run(params, cfg, attention_mask=jnp.repeat(mask, rows, 0),
                 hidden=jnp.concatenate([clean, jnp.repeat(corrupt, rows - 1, 0)]),
                 shifts=shifts)
    logp = jax.nn.log_softmax(head(params, cfg, out[:, -1]).astype(jnp.float32), -1)
    return jnp.exp(logp[:, answer])


def trace_fact(params: Params, cfg: ModelConfig, tokenizer, prompt: str, subject: str,
               answer: str, std: float, rng: np.random.Generator, samples: int) -> dict:
    ids, last = prompt_and_lookup(tokenizer, "{}", prompt, subject, "subject_last", prompt)
    start = prompt.index("{}")
    spans = tokenizer(prompt.format(subject), return_offsets_mapping=True)["offset_mapping"]
    mask = np.array([a < start + len(subject) and b > start for a, b in spans], np.float32)
    target = tokenizer(" " + answer, add_special_tokens=False)["input_ids"][0]
    probs = np.mean([np.asarray(restored_probs(
        params, cfg, jnp.asarray([ids]), jnp.asarray(mask), last,
        jnp.asarray(rng.normal(0, 3 * std, (len(ids), cfg.d_model)), jnp.float32), target))
        for _ in range(samples)], axis=0)
    return {"prompt": prompt.format(subject), "answer": answer, "subject_tokens": int(mask.sum()),
            "clean": float(probs[0]), "corrupt": float(probs[1]),
            "restored": probs[2:].tolist()}


def embedding_table(params: Params) -> jax.Array:
    """The token embedding (the first leaf whose path names an embedding)."""
    return next(leaf for path, leaf in jax.tree_util.tree_leaves_with_path(params)
                if "embed" in jax.tree_util.keystr(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    lm = load_model(args.model, jnp.float32)
    tokenizer = load_tokenizer(args.model, lm.config)
    std = float(np.std(np.asarray(embedding_table(lm.params))))
    rng = np.random.default_rng(0)
    rows = [trace_fact(lm.params, lm.config, tokenizer, *fact, std, rng, args.samples)
            for fact in FACTS]
    known = [r for r in rows if r["clean"] > 0.1 and r["subject_tokens"] > 1]
    effect = np.mean([np.subtract(r["restored"], r["corrupt"]) for r in known], axis=0)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"facts": rows, "known_multi_token": len(known),
                                    "average_indirect_effect": effect.tolist()}, indent=1))
    print("average indirect effect per layer:", np.round(effect, 3).tolist())


if __name__ == "__main__":
    main()
