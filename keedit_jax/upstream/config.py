"""Hyperparameters of the memory-shift (target) optimisation, MEMIT's `compute_z`.

Defaults are the structured-editing values for Llama3-8B (docs/references.md: anchors §2.1,
identical in the MEMIT, AlphaEdit and LyapLock files). Unstructured presets (AnyEdit, μKE) override
v_lr / v_weight_decay / clamp_norm_factor / kl_factor / early_stop_loss (anchors §2.2,
muke §2.6).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from keedit_jax.intervene import SITES

FactToken = Literal["subject_last", "last"]


@dataclasses.dataclass(frozen=True, kw_only=True)
class TargetConfig:
    """One field per hparam of the reference `compute_z`; static under `jit`.

    Attributes:
      layer: l_WM, the decoder layer whose output is shifted: MEMIT's z_layer = layers[-1],
        layer 8 of [4..8] (anchors §1, §2.1).
      fact_token: lookup position: last subject token, or last prompt token (anchors §1).
      v_num_grad_steps: forward passes of the loop; at most v_num_grad_steps - 1 Adam updates,
        because the reference breaks on the last iteration before stepping (muke §2.6).
      v_lr: Adam learning rate (anchors §2.1).
      v_loss_layer: the layer whose output, through the final norm and the unembedding, gives
        the log-probs; the last layer in every reference config (anchors §2.1, §2.2).
      v_weight_decay: coefficient of ‖δ‖ / ‖h‖² (the norm, not its square: anchors §1).
      clamp_norm_factor: δ is projected onto the ball of radius c·‖h‖ after every step (§1).
      kl_factor: weight of the KL term on the "{} is a" prompt (anchors §1, §2.1).
      early_stop_loss: stop once the total loss is below this (MEMIT 5e-2, anchors §1;
        μKE / AnyEdit use 1e-2, muke §2.6).
      kl_prompt: the essence prompt, "{} is a" (anchors §1).
      prepend_space: give target_new a leading space when it lacks one (anchors §1).
      sites: where at `layer` the shifts are added (`keedit_jax.intervene.SITES`), one shift
        per site and position, optimised jointly; the result's shifts are site-major
        (`ShiftResult.targets[:, i·P + p]`: site i, position p). MEMIT and every other method:
        the block output alone; PMET (Li et al. 2024, "Optimizing TC hidden states"): the
        attention output and the MLP output, each under its own weight decay and clamp.
    """

    layer: int = 8
    fact_token: FactToken = "subject_last"
    v_num_grad_steps: int = 25
    v_lr: float = 1e-1
    v_loss_layer: int = 31
    v_weight_decay: float = 0.5
    clamp_norm_factor: float = 0.75
    kl_factor: float = 0.0625
    early_stop_loss: float = 5e-2
    kl_prompt: str = "{} is a"
    prepend_space: bool = True
    sites: tuple[str, ...] = ("block_out",)

    def __post_init__(self) -> None:
        if not self.sites or len(set(self.sites)) != len(self.sites) or not set(
                self.sites) <= set(SITES):
            raise ValueError(f"sites must be distinct, from {', '.join(SITES)}; got "
                             f"{self.sites}")
        if self.fact_token not in ("subject_last", "last"):
            raise ValueError(f"fact_token must be 'subject_last' or 'last', got "
                             f"{self.fact_token!r}")
        if self.v_num_grad_steps < 1:
            raise ValueError(f"v_num_grad_steps must be >= 1, got {self.v_num_grad_steps}")
        if self.v_loss_layer < self.layer:
            raise ValueError(f"v_loss_layer={self.v_loss_layer} is below the shifted layer "
                             f"{self.layer}: the shift could not reach the loss")
        if self.clamp_norm_factor <= 0:
            raise ValueError(f"clamp_norm_factor must be > 0, got {self.clamp_norm_factor}")
        if self.kl_prompt.count("{}") != 1:
            raise ValueError(f"kl_prompt {self.kl_prompt!r} must contain exactly one '{{}}'")


@dataclasses.dataclass(frozen=True, kw_only=True)
class ContextConfig:
    """The generated context prefixes, shared by the targets and MEMIT's keys (anchors §1).

    Separate from TargetConfig: the templates are text, made once per run, and changing them
    must not recompile the loop.

    Attributes:
      seeds: first words of the prefixes, one prefix each (anchors §1).
      length: total tokens of each prefix, seed (and BOS) included: the reference's
        `max_out_len=10` counts the prompt (anchors §1).
      top_k: each token is sampled among the k most likely at temperature 1, as the
        reference's generate_fast (top_k=5); 0 samples the full distribution.
    """

    seeds: tuple[str, ...] = ("The", "Therefore", "Because", "I", "You")
    length: int = 10
    top_k: int = 5

    def __post_init__(self) -> None:
        if not self.seeds:
            raise ValueError("ContextConfig.seeds is empty")
        if self.top_k < 0:
            raise ValueError(f"ContextConfig.top_k must be >= 0 (0: the full distribution), "
                             f"got {self.top_k}")
