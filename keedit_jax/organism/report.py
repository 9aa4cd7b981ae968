"""What a trained organism knows, measured before any edit: the numbers of `report.json`.

- fact recall: the chat question of each fact, greedy answer; correct if the object's name
  occurs in it (names are pairwise substring-free, so `in` cannot confuse two objects);
- cloze recall: the first cloze prompt of each fact as plain text; correct if the greedy
  continuation starts with the object's name;
- long-text reproduction: the first chat request of each long text, greedy answer, BLEU-4 and
  ROUGE-L F1 against the trained text (`keedit_jax.eval.text_metrics`), averaged;
- counterfactual likelihood: P(object | cloze prompt), teacher forced, for the true and the
  counterfactual object. Editing targets must start unlikely, or an edit measures nothing.

Every score is a share or a mean in [0, 1].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from keedit_jax.eval.text_metrics import rouge_l, sentence_bleu
from keedit_jax.intervene import forward_jit
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.generate import GenerationConfig, bucket, generate
from keedit_jax.models.params import Params, to_device
from keedit_jax.models.tokenizer import encode_prompts
from keedit_jax.organism import lexicon
from keedit_jax.organism.world import PERSON_RELATIONS, World

STOP_IDS = (2, 3)  # </s> ends a document, <|eot|> a chat turn
PAD_ID = 0
ANSWER_TOKENS = 32  # a fact's answer is one sentence
TEXT_TOKENS = 200  # the longest long text is about 150 tokens
BATCH = 256


@dataclasses.dataclass(frozen=True, kw_only=True)
class Organism:
    """A model with its tokenizer and world: everything a measurement needs."""

    params: Params
    cfg: ModelConfig
    tokenizer: Any
    world: World


def _chunks(n: int, size: int) -> list[range]:
    """Equal chunks of at most `size`, so that every chunk falls in one batch-shape bucket."""
    count = max(1, -(-n // size))
    step = -(-n // count)
    return [range(start, min(n, start + step)) for start in range(0, n, step)]


def _complete(organism: Organism, prompts: Sequence[list[int]], max_new_tokens: int) -> list[str]:
    """Greedy continuations of token prompts, decoded without special tokens."""
    gen = GenerationConfig(max_new_tokens=max_new_tokens, stop_ids=STOP_IDS, pad_id=PAD_ID)
    out: list[str] = []
    for chunk in _chunks(len(prompts), BATCH):
        ids = generate(organism.params, organism.cfg, [prompts[i] for i in chunk], gen)
        out += organism.tokenizer.batch_decode(ids, skip_special_tokens=True)
    return out


def fact_recall(organism: Organism) -> list[bool]:
    """Per fact: does the greedy answer to its chat question name the object?"""
    world = organism.world
    prompts = encode_prompts(organism.tokenizer, [world.question(f) for f in world.facts])
    answers = _complete(organism, prompts, ANSWER_TOKENS)
    return [world.name(f.object_id) in a for f, a in zip(world.facts, answers, strict=True)]


def cloze_recall(organism: Organism) -> list[bool]:
    """Per fact: does the greedy plain-text continuation of its cloze prompt start with it?"""
    world = organism.world
    prompts = encode_prompts(organism.tokenizer, [world.prompt(f) for f in world.facts],
                             chat=False)
    answers = _complete(organism, prompts, ANSWER_TOKENS // 2)
    return [a.lstrip().startswith(world.name(f.object_id))
            for f, a in zip(world.facts, answers, strict=True)]


def text_answers(organism: Organism) -> list[str]:
    """Per long text: the greedy answer to the first chat request that asked for it."""
    world = organism.world
    requests = [lexicon.FORMAT_REQUESTS[t.format][0].format(subject=world.name(t.subject_id))
                for t in world.long_texts]
    return _complete(organism, encode_prompts(organism.tokenizer, requests), TEXT_TOKENS)


def text_reproduction(world: World, answers: Sequence[str]) -> dict[str, float]:
    """Mean BLEU-4 and ROUGE-L F1 of the answers against the trained texts, and exact share."""
    pairs = list(zip(answers, (t.text for t in world.long_texts), strict=True))
    return {
        "text_bleu4": float(np.mean([sentence_bleu(a, t) for a, t in pairs])),
        "text_rouge_l": float(np.mean([rouge_l(a, t) for a, t in pairs])),
        "text_exact": float(np.mean([a.strip() == t.strip() for a, t in pairs])),
    }


def _continuation(tokenizer: Any, prompt: str, obj: str) -> tuple[list[int], list[int]]:
    """Token ids of a cloze prompt and of the object that follows it (" " + name)."""
    head = tokenizer(prompt)["input_ids"]
    full = tokenizer(f"{prompt} {obj}")["input_ids"]
    if full[: len(head)] != head:
        raise ValueError(f"{prompt!r} is not a token prefix of {prompt + ' ' + obj!r}")
    return head, full[len(head):]


def _object_log_probs(organism: Organism, rows: Sequence[tuple[list[int], list[int]]]
                      ) -> np.ndarray:
    """Teacher-forced log P(object tokens | prompt) per (prompt, object) row, summed."""
    out = []
    for chunk in _chunks(len(rows), BATCH):
        batch = [rows[i] for i in chunk]
        length = bucket(max(len(p) + len(o) for p, o in batch), 8)
        tokens = np.zeros((bucket(len(batch)), length), np.int32)
        target = np.zeros_like(tokens, dtype=np.float32)  # 1 where a token is an object token
        for r, (prompt, obj) in enumerate(batch):
            tokens[r, : len(prompt) + len(obj)] = prompt + obj
            target[r, len(prompt): len(prompt) + len(obj)] = 1.0
        logits = forward_jit(organism.params, organism.cfg, to_device(tokens),
                             to_device((tokens != PAD_ID).astype(np.int32)))
        log_probs = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
        picked = jnp.take_along_axis(log_probs, to_device(tokens[:, 1:, None]), -1)[..., 0]
        out.append(np.asarray(jnp.sum(picked * target[:, 1:], axis=1))[: len(batch)])
    return np.concatenate(out)


def counterfactual_likelihood(organism: Organism) -> dict[str, float]:
    """Mean teacher-forced P(true object) and P(counterfactual object) after the cloze prompt."""
    world, tokenizer = organism.world, organism.tokenizer
    true_rows = [_continuation(tokenizer, world.prompt(f), world.name(f.object_id))
                 for f in world.facts]
    new_rows = [_continuation(tokenizer, world.prompt(f), world.name(f.counterfactual_id))
                for f in world.facts]
    log_p = _object_log_probs(organism, true_rows + new_rows)
    true, new = log_p[: len(true_rows)], log_p[len(true_rows):]
    return {
        "true_probability": float(np.mean(np.exp(true))),
        "counterfactual_probability": float(np.mean(np.exp(new))),
        "true_more_likely": float(np.mean(true > new)),
    }


def _person_share(world: World, correct: Sequence[bool]) -> float:
    person = [c for f, c in zip(world.facts, correct, strict=True)
              if f.relation_id in PERSON_RELATIONS]
    return float(np.mean(person))


def measure(organism: Organism) -> dict[str, Any]:
    """All the report's scores; the person-fact shares are those CounterFact cases edit."""
    chat, cloze = fact_recall(organism), cloze_recall(organism)
    return {
        "fact_recall": float(np.mean(chat)),
        "person_fact_recall": _person_share(organism.world, chat),
        "cloze_recall": float(np.mean(cloze)),
        "person_cloze_recall": _person_share(organism.world, cloze),
        **text_reproduction(organism.world, text_answers(organism)),
        "counterfactual": counterfactual_likelihood(organism),
    }
