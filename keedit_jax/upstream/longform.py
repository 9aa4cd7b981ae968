"""Long-form requests -> the windowed shift problem (muke §1.3, §3; anyedit §2.1-2.2; see
docs/references.md).

For one request, X = the chat-templated question (no system prompt, muke §5.4) and Y = the
answer + the end-of-turn token, tokenised without special tokens (muke §1.3: a leading BOS is
stripped). The optimisation sequence is X ⊕ Y[:-1]; the logits at P − 1 + u predict y_u; shift
δ_i sits at p_i = P − 1 + s_i, the token before window i (muke footnote 3).

Choices where the reference differs (muke §7.11, anyedit §9.11):
- one id sequence X ⊕ Y serves the shift optimisation and the weight update, never
  re-tokenised from the joined string, so every p_i lines up exactly;
- AnyEdit's growing context X ⊕ Y[:e_i − 1] is the full sequence here: by causal masking the
  positions that carry loss see the same tokens, so the losses are equal (tests check this).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Literal, Protocol

import jax
import numpy as np

from keedit_jax.models.generate import fine_bucket
from keedit_jax.models.tokenizer import encode_prompts, end_of_turn_token
from keedit_jax.upstream.encode import EncodingError, ShiftBatch, read_pos_array
from keedit_jax.upstream.windows import CoefficientOrder, Strategy, is_sequential, window_bounds

Array = jax.Array
AffinityContext = Literal["upfront", "in_loop"]
# Window counts are padded to a multiple of this, so edits of similar length share a compiled
# program; a padded stage stops at its first step (its loss is 0).
WINDOW_BUCKET = 4


class LongFormRequest(Protocol):
    """What the encoder reads of a record (keedit_jax.data.longform.LongFormRecord)."""

    case_id: int | str
    question: str
    answer: str


@dataclasses.dataclass(frozen=True, kw_only=True)
class WindowConfig:
    """The upstream strategy and its windows (static under jit).

    Attributes:
      strategy: the token-weight scheme (keedit_jax.upstream.windows).
      window_size, overlap: w and o of the windows (μKE 30/20, AnyEdit 40/50, no overlap; §4).
      coefficient_order: λ assignment of Eq. 12 ("paper") or the released code's reversed one.
      affinity_context: "upfront" = on the unedited model, before any shift is optimised, as
        the released code (and its cache) does; "in_loop" = just before δ_i, with δ*_<i
        injected, as Eq. 12's "…" suggests (muke §7.2).
      affinity_steps, affinity_lr: T_aff and its Adam learning rate (3, 0.5; muke A.2).
      affinity_gradients: the figures' gradients from one forward and a backward for each
        figure that exists, in turn ("used"), or for all N padded figures vmap'd ("vmap": more
        work, fewer kernels), or one jax.grad per figure ("loop": less memory, more time).
      float16_coefficients: accumulate the Matryoshka coefficients in float16 as the released
        get_token_coeffs does (`windows.float16_figure_sum`; δ moves by ~1e-4 relative).
      double_bos: encode the prompt as the released long-form code does: the chat-template
        text tokenised again by a tokenizer that prepends BOS, so a Llama-3 prompt starts
        with two (`released_prompt_ids`); every position, the shift sites and the solve's
        contexts move by one. Ours has one BOS, the intended use of the template.
    """

    strategy: Strategy = "matryoshka_affinity"
    window_size: int = 30
    overlap: int = 0
    coefficient_order: CoefficientOrder = "paper"
    affinity_context: AffinityContext = "upfront"
    affinity_steps: int = 3
    affinity_lr: float = 0.5
    affinity_gradients: Literal["used", "vmap", "loop"] = "used"
    float16_coefficients: bool = False
    double_bos: bool = False

    def __post_init__(self) -> None:
        is_sequential(self.strategy)  # validates the name
        window_bounds(1, self.window_size, self.overlap)  # validates size and overlap
        if self.coefficient_order not in ("paper", "released"):
            raise ValueError(f"coefficient_order must be 'paper' or 'released', got "
                             f"{self.coefficient_order!r}")
        if self.affinity_context not in ("upfront", "in_loop"):
            raise ValueError(f"affinity_context must be 'upfront' or 'in_loop', got "
                             f"{self.affinity_context!r}")
        if self.affinity_gradients not in ("used", "vmap", "loop"):
            raise ValueError(f"affinity_gradients must be 'used', 'vmap' or 'loop', got "
                             f"{self.affinity_gradients!r}")
        if self.affinity_steps < 1:
            raise ValueError(f"affinity_steps must be >= 1, got {self.affinity_steps}")

    @property
    def uses_affinity(self) -> bool:
        return self.strategy == "matryoshka_affinity"


@dataclasses.dataclass(frozen=True)
class EncodedEdit:
    """Host-side ids of one request: prompt X, target Y and the windows over Y."""

    case_id: int | str
    prompt_ids: tuple[int, ...]
    target_ids: tuple[int, ...]
    windows: tuple[tuple[int, int], ...]

    @property
    def shift_positions(self) -> tuple[int, ...]:
        """p_i = P − 1 + s_i in the unpadded sequence X ⊕ Y."""
        return tuple(len(self.prompt_ids) - 1 + s for s, _ in self.windows)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class WindowBatch:
    """E edits padded to T tokens and N windows, S = 1 sequence each (X ⊕ Y[:-1]).

    shift.weights is a placeholder: each stage sets its own (windows.stage_token_weights).
    Windows beyond an edit's n_windows start and end at its n_target (weight 0) and repeat
    the position of window 0 with a zero δ.
    """

    shift: ShiftBatch
    token_index: Array  # [E, T] int32, target index u of the label at t, −1 for none
    starts: Array  # [E, N] int32
    ends: Array  # [E, N] int32
    n_windows: Array  # [E] int32
    n_target: Array  # [E] int32


def released_prompt_ids(tokenizer: Any, question: str) -> list[int]:
    """The prompt ids of the released long-form code: the chat template rendered as text,
    then tokenised with the tokenizer's special tokens (a BOS-prepending tokenizer adds a
    second BOS before the template's own); without a chat template, the plain question."""
    if not getattr(tokenizer, "chat_template", None):
        return encode_prompts(tokenizer, [question], chat=False)[0]
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}],
                                         add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def encode_edit(tokenizer: Any, request: LongFormRequest, config: WindowConfig,
                max_positions: int, eot: str | None = None) -> EncodedEdit:
    """Ids and windows of one request; EncodingError names the case and what is wrong."""
    case = request.case_id
    if not request.question.strip() or not request.answer.strip():
        field = "question" if not request.question.strip() else "answer"
        raise EncodingError(f"request {case}: the {field} is empty")
    prompt = (released_prompt_ids(tokenizer, request.question) if config.double_bos
              else encode_prompts(tokenizer, [request.question])[0])
    eot = end_of_turn_token(tokenizer) if eot is None else eot
    target = list(tokenizer(request.answer + eot, add_special_tokens=False)["input_ids"])
    if tokenizer.bos_token_id is not None and target and target[0] == tokenizer.bos_token_id:
        target = target[1:]
    total = len(prompt) + len(target)
    if total > max_positions:
        raise EncodingError(f"request {case}: prompt ({len(prompt)} tokens) + target "
                            f"({len(target)} tokens) = {total} tokens, longer than the model's "
                            f"context of {max_positions} positions")
    if config.strategy == "one_for_all":
        windows = [(0, len(target))]
    elif len(target) <= config.window_size:
        raise EncodingError(f"request {case}: the target has {len(target)} tokens, not more "
                            f"than one window of {config.window_size}: windowed editing "
                            f"({config.strategy}) would be One-for-All; use a smaller "
                            "--window_size or a One-for-All method")
    else:
        windows = window_bounds(len(target), config.window_size, config.overlap)
    return EncodedEdit(case, tuple(prompt), tuple(target), tuple(windows))


def encode_edits(tokenizer: Any, requests: Sequence[LongFormRequest], config: WindowConfig,
                 max_positions: int) -> tuple[list[EncodedEdit], dict[int | str, str]]:
    """Every request that encodes, and a message per request that does not (the run goes on
    without it, and reports it)."""
    eot = end_of_turn_token(tokenizer)
    edits, failures = [], {}
    for request in requests:
        try:
            edits.append(encode_edit(tokenizer, request, config, max_positions, eot))
        except EncodingError as error:
            failures[request.case_id] = str(error)
    return edits, failures


def pack_windows(edits: Sequence[EncodedEdit], pad_id: int,
                 width: int | None = None) -> WindowBatch:
    """Left-pad X ⊕ Y[:-1] of every edit to a shape bucket (`fine_bucket`: 159 tokens to 160;
    or to `width` tokens, e.g. a power of two as before), and the windows to the largest N
    rounded up to WINDOW_BUCKET. Left padding changes no loss (positions count from the
    first real token), so δ does not depend on the width."""
    if not edits:
        raise EncodingError("no long-form requests to encode")
    e = len(edits)
    longest = max(len(x.prompt_ids) + len(x.target_ids) - 1 for x in edits)
    width = fine_bucket(longest, 8) if width is None else width
    if width < longest:
        raise EncodingError(f"width {width} is shorter than the longest sequence ({longest})")
    n = -(-max(len(x.windows) for x in edits) // WINDOW_BUCKET) * WINDOW_BUCKET
    tokens = np.full((e, 1, width), pad_id, np.int32)
    mask = np.zeros((e, 1, width), np.int32)
    labels = np.zeros((e, 1, width), np.int32)
    token_index = np.full((e, width), -1, np.int32)
    shift_pos = np.zeros((e, 1, n), np.int32)
    starts = np.zeros((e, n), np.int32)
    ends = np.zeros((e, n), np.int32)
    reads = []
    for row, edit in enumerate(edits):
        ids = edit.prompt_ids + edit.target_ids[:-1]
        pad = width - len(ids)
        tokens[row, 0, pad:], mask[row, 0, pad:] = ids, 1
        at = pad + len(edit.prompt_ids) - 1 + np.arange(len(edit.target_ids))
        reads.append(at.tolist())
        labels[row, 0, at] = edit.target_ids
        token_index[row, at] = np.arange(len(edit.target_ids))
        m, k = len(edit.target_ids), len(edit.windows)
        starts[row], ends[row] = m, m
        starts[row, :k], ends[row, :k] = np.asarray(edit.windows).T
        positions = pad + np.asarray(edit.shift_positions)
        shift_pos[row, 0] = positions[0]
        shift_pos[row, 0, :k] = positions
    shift = ShiftBatch(tokens=tokens, attention_mask=mask, shift_pos=shift_pos, labels=labels,
                       weights=np.zeros((e, 1, width), np.float32),
                       kl_pos=np.zeros((e, 1), np.int32), kl_weight=np.zeros((e, 1), np.float32),
                       read_pos=read_pos_array(reads, (e, 1), width))
    return WindowBatch(shift, token_index, starts, ends,
                       np.asarray([len(x.windows) for x in edits], np.int32),
                       np.asarray([len(x.target_ids) for x in edits], np.int32))
