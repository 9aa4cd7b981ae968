"""Tokenizers through transformers (local files only, no remote code) and chat prompts."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from keedit_jax.models import gguf
from keedit_jax.models.config import ModelConfig

END_OF_TURN_TOKENS = ("<|eot_id|>", "<|im_end|>", "<|eot|>", "<|end_of_turn|>")


class TokenizerMismatchError(ValueError):
    """A tokenizer that does not belong to the checkpoint, or that would need its own code."""


def load_tokenizer(path: str | os.PathLike, cfg: ModelConfig | None = None,
                   checkpoint: str | os.PathLike | None = None) -> Any:
    """Load a local HF tokenizer (of a GGUF file or named real model: its cached HF
    conversion's); with `cfg`, refuse one whose ids overflow the embedding."""
    from transformers import AutoTokenizer  # noqa: PLC0415 (slow import, only when needed)

    if gguf.is_gguf(path):
        path = gguf.hf_directory(path)
    refuse_remote_code(Path(path))
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True,
                                              trust_remote_code=False)
    if cfg is not None:
        check_tokenizer_fits(tokenizer, cfg, Path(path), Path(checkpoint or path))
    return tokenizer


def refuse_remote_code(path: Path) -> None:
    """A tokenizer_config.json with `auto_map` names Python classes shipped beside the
    weights; this library never runs code from a checkpoint, so it says so itself."""
    config = path / "tokenizer_config.json"
    if not config.is_file():
        return
    try:
        declared = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise TokenizerMismatchError(f"{config}: not readable JSON ({err})") from err
    if isinstance(declared, dict) and declared.get("auto_map"):
        raise TokenizerMismatchError(
            f"{config}: field 'auto_map' declares custom tokenizer code "
            f"({declared['auto_map']}); keedit_jax never runs code shipped with a checkpoint: "
            "use a checkpoint whose tokenizer the tokenizers library reads on its own")


def check_tokenizer_fits(tokenizer: Any, cfg: ModelConfig, tokenizer_path: Path,
                         checkpoint_path: Path) -> None:
    """Every token id must index a row of the embedding, or lookups would silently clamp;
    and a tokenizer of another checkpoint whose ids happen to fit is told by its BOS id,
    which every prompt starts with."""
    largest = max(tokenizer.get_vocab().values())
    if largest >= cfg.vocab_size:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_path} has token ids up to {largest}, but the embedding "
            f"in {checkpoint_path} ({_embedding_name(cfg)}) has only {cfg.vocab_size} rows: "
            "this tokenizer does not belong to this checkpoint")
    bos = tokenizer.bos_token_id
    if None not in (bos, cfg.bos_token_id) and bos != cfg.bos_token_id:
        raise TokenizerMismatchError(
            f"tokenizer {tokenizer_path} begins sequences with id {bos} "
            f"({tokenizer.bos_token!r}), but {checkpoint_path}/config.json has bos_token_id="
            f"{cfg.bos_token_id}: this tokenizer does not belong to this checkpoint")


def _embedding_name(cfg: ModelConfig) -> str:
    return "model.embed_tokens.weight" if cfg.family == "llama" else "transformer.wte.weight"


def encode_prompts(tokenizer: Any, prompts: Sequence[str], chat: bool = True) -> list[list[int]]:
    """Token ids of user prompts, through the chat template when the tokenizer has one."""
    if not chat or not getattr(tokenizer, "chat_template", None):
        return [tokenizer(p, add_special_tokens=True)["input_ids"] for p in prompts]
    return [list(tokenizer.apply_chat_template([{"role": "user", "content": p}],
                                               add_generation_prompt=True, tokenize=True,
                                               return_dict=False)) for p in prompts]


def stop_token_ids(tokenizer: Any, cfg: ModelConfig,
                   checkpoint: str | os.PathLike | None = None) -> tuple[int, ...]:
    """End-of-sequence and end-of-turn ids: config, generation_config.json and tokenizer."""
    ids = set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    generation_file = Path(checkpoint or ".") / "generation_config.json"
    if checkpoint and generation_file.exists():
        eos = json.loads(generation_file.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [] if eos is None else [eos])
    for token in END_OF_TURN_TOKENS:
        token_id = tokenizer.get_vocab().get(token)
        if token_id is not None:
            ids.add(token_id)
    return tuple(sorted(ids))


def end_of_turn_token(tokenizer: Any) -> str:
    """The chat end-of-turn token that ends an assistant answer (Llama-3 `<|eot_id|>`, Qwen
    `<|im_end|>`, ...; muke §5.4), or the eos token of a tokenizer without one."""
    vocab = tokenizer.get_vocab()
    for token in END_OF_TURN_TOKENS:
        if token in vocab:
            return token
    if tokenizer.eos_token is None:
        raise ValueError("the tokenizer has neither an end-of-turn nor an eos token to end "
                         "the edit target with")
    return tokenizer.eos_token
