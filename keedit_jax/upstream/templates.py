"""Context templates: "{}" plus short model-generated prefixes (anchors §1, lyaplock §2.7).

The reference samples one continuation of each seed word ("The", "Therefore", "Because", "I",
"You") with the unedited model, `max_out_len=10` tokens in total, and uses
`text.replace("{", " ").replace("}", " ") + ". {}"`; its samples are unseeded and cached per
process. Here the PRNG key is explicit, so the same key gives the same templates (anchors §11.5).

As the reference, each token is drawn at temperature 1 among the `ContextConfig.top_k` (5) most
likely ones (top_k=0: the full distribution). Sampled templates still differ from a reference
run's (another PRNG); to reproduce one, pass its templates (`--context_templates`,
`keedit_jax.data.read_context_templates`).
"""

from __future__ import annotations

from typing import Any

import jax

from keedit_jax.models.config import ModelConfig
from keedit_jax.models.generate import GenerationConfig, generate
from keedit_jax.models.params import Params
from keedit_jax.upstream.config import ContextConfig
from keedit_jax.upstream.encode import encode_ids


def context_templates(params: Params, cfg: ModelConfig, tokenizer: Any, key: jax.Array,
                      contexts: ContextConfig | None = None) -> tuple[str, ...]:
    """("{}", "<generated>. {}", ...): one prefix per seed, `contexts.length` tokens in all.

    As in the reference's padded batch, every row gets `length` minus the longest seed's
    length new tokens; no stop token ends a prefix early.
    """
    contexts = ContextConfig() if contexts is None else contexts
    prompts = [encode_ids(tokenizer, seed) for seed in contexts.seeds]
    new_tokens = contexts.length - max(len(p) for p in prompts)
    if new_tokens < 1:
        raise ValueError(f"ContextConfig.length={contexts.length} leaves no room to generate "
                         f"after the seeds {contexts.seeds}")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    gen = GenerationConfig(max_new_tokens=new_tokens, temperature=1.0, top_k=contexts.top_k,
                           pad_id=pad_id)
    outputs = generate(params, cfg, prompts, gen, key)
    texts = [tokenizer.decode(p + out, skip_special_tokens=True)
             for p, out in zip(prompts, outputs, strict=True)]
    return ("{}",) + tuple(t.replace("{", " ").replace("}", " ") + ". {}" for t in texts)
