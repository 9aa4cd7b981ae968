"""The organism's training corpus, generated from the world.

Plain documents teach the facts as text (every cloze template, and question-answer lines as
ZsRE's `src + " " + answer` prompts see them); chat exchanges teach the same facts and the long
texts behind the chat template, which is how the unstructured benchmarks ask (muke §5.4).
The model trains on every template and request: paraphrase prompts measure generalisation over
wordings the model knows, not over unseen ones. Counterfactual objects and texts never appear.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from keedit_jax.organism import lexicon
from keedit_jax.organism.world import World

_STREAM = 10  # the corpus's random stream; the world uses streams 0-4


@dataclasses.dataclass(frozen=True, kw_only=True)
class Exchange:
    """One user request and the assistant's reply."""

    user: str
    assistant: str

    def messages(self) -> list[dict[str, str]]:
        """The exchange as chat messages, for `tokenizer.apply_chat_template`."""
        return [
            {"role": "user", "content": self.user},
            {"role": "assistant", "content": self.assistant},
        ]


@dataclasses.dataclass(frozen=True, kw_only=True)
class Corpus:
    """Plain documents and chat exchanges, each in a seeded random order."""

    documents: tuple[str, ...]
    exchanges: tuple[Exchange, ...]


def fact_documents(world: World) -> list[str]:
    """Each fact under every cloze template, then as each question followed by its answer."""
    out = []
    for fact in world.facts:
        relation, obj = world.relation(fact.relation_id), world.name(fact.object_id)
        out += [f"{world.prompt(fact, i)} {obj}." for i in range(len(relation.templates))]
        out += [f"{world.question(fact, i)} {obj}." for i in range(len(relation.questions))]
    return out


def fact_exchanges(world: World) -> list[Exchange]:
    """Each question of each fact, answered with the fact's canonical sentence."""
    return [
        Exchange(user=world.question(fact, i), assistant=world.sentence(fact))
        for fact in world.facts
        for i in range(len(world.relation(fact.relation_id).questions))
    ]


def text_exchanges(world: World) -> list[Exchange]:
    """Each long text, as the reply to every request for its format."""
    return [
        Exchange(user=request.format(subject=world.name(text.subject_id)), assistant=text.text)
        for text in world.long_texts
        for request in lexicon.FORMAT_REQUESTS[text.format]
    ]


def build_corpus(world: World) -> Corpus:
    """The whole corpus, shuffled with the world's seed."""
    rng = np.random.default_rng([world.seed, _STREAM])
    documents = fact_documents(world) + [text.text for text in world.long_texts]
    exchanges = fact_exchanges(world) + text_exchanges(world)
    return Corpus(
        documents=tuple(documents[i] for i in rng.permutation(len(documents))),
        exchanges=tuple(exchanges[i] for i in rng.permutation(len(exchanges))),
    )
