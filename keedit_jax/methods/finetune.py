"""FT-L and FT-M: fine-tuning the edited layers' MLP output weights on the requests.

The baselines every locate-and-edit paper reports, with no key statistics and no closed-form
solve: Adam on W_out of the chosen layers, everything else frozen.

- FT-L (Meng et al. 2022, "Locating and Editing Factual Associations in GPT", §3 baselines,
  "FT+L", after Zhu et al. 2020): the loss is read at the prompt's last token alone, the NLL of
  every target token there (the "prompt_last" objective), and after each step the weights are
  projected back into the L∞ ball ‖W − W₀‖∞ ≤ ε around the unedited ones.
- FT-M (Zhang et al. 2024, "A Comprehensive Study of Knowledge Editing for Large Language
  Models", §5): the teacher-forced NLL of the target tokens given the prompt, the prompt
  masked out of the loss (the "target_new" objective); no norm bound by default.

Both use the structured encoding of the other methods (`upstream.encode_requests` with the
bare "{}" template: X ⊕ Y[:-1], the target tokens weighted 1/M), so the loss of FT-M is
exactly the target loss MEMIT's δ optimises, here through the weights instead of a shift.
Each batch is fine-tuned from the weights it is given: one-time batches from the unedited
model, as the structured protocol applies every other method.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keedit_jax import parallel
from keedit_jax.data import Request
from keedit_jax.intervene import run
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.params import Params, down_proj_path, get_path, set_path
from keedit_jax.upstream import NonFiniteShiftError, TargetConfig
from keedit_jax.upstream.encode import ShiftBatch, encode_requests
from keedit_jax.upstream.loop import _flat, read, read_log_probs, token_nll, unshifted_target_prob

Array = jax.Array
Objective = Literal["prompt_last", "target_new"]
# Each fine-tuning method's objective (its registry record names the method).
OBJECTIVES: dict[str, Objective] = {"ft_l": "prompt_last", "ft_m": "target_new"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """The fine-tuned layers, the objective, Adam's steps and learning rate, and ε of the L∞
    bound (0: unbounded). `target` is the encoding of the requests (fact token, the target's
    leading space), shared with the other structured methods; its δ settings are unused.
    Defaults: FT-L's of ROME's GPT-2 XL setting (25 steps at 5e-4, ε = 5e-5)."""

    layers: tuple[int, ...]
    target: TargetConfig
    objective: Objective = "prompt_last"
    steps: int = 25
    lr: float = 5e-4
    norm_constraint: float = 5e-5

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be increasing and distinct, got {self.layers}")
        if self.objective not in ("prompt_last", "target_new"):
            raise ValueError(f"unknown fine-tuning objective {self.objective!r}")
        if self.steps < 1 or self.lr <= 0 or self.norm_constraint < 0:
            raise ValueError(f"fine-tuning needs steps >= 1, lr > 0 and norm_constraint >= 0, "
                             f"got {self.steps}, {self.lr}, {self.norm_constraint}")


def objective_loss(logp_brv: Array, batch: ShiftBatch, objective: Objective) -> Array:
    """Per-edit loss [E] from the log-probs at the read positions [E·S, R, V] (slot r: target
    token r; weights 1/M). target_new: Σ w·NLL(y_r at slot r); prompt_last: Σ w·NLL(y_r at
    slot 0), every target token scored at the prompt's last position."""
    reads = _flat(batch.read_pos)
    weights = jnp.where(reads >= 0, read(_flat(batch.weights), reads), 0.0)
    labels = read(_flat(batch.labels), reads)
    if objective == "prompt_last":
        logp_brv = jnp.broadcast_to(logp_brv[:, :1], logp_brv.shape)
    nll = token_nll(logp_brv, labels)
    e = batch.tokens.shape[0]
    return jnp.where(weights != 0, weights * nll, 0.0).reshape(e, -1).sum(1)


class Finetuned(NamedTuple):
    """The fine-tuned rows of W_out [len(layers), F, D] and the per-edit loss [E] before the
    first and after the last step."""

    kernels: Array
    loss_first: Array
    loss_last: Array


def _bounded(w: Array, w0: Array, epsilon: float) -> Array:
    """W projected into the L∞ ball ‖W − W₀‖∞ ≤ ε (no bound when ε is 0)."""
    return w if epsilon == 0 else w0 + jnp.clip(w - w0, -epsilon, epsilon)


@partial(jax.jit, static_argnames=("cfg", "config"))
def finetune(params: Params, cfg: ModelConfig, batch: ShiftBatch,
             config: FinetuneConfig) -> Finetuned:
    """Adam on the W_out rows of config.layers for config.steps full-batch steps (the mean of
    the edits' losses), as one program; the layers below the first one run once."""
    path, layers = down_proj_path(cfg), jnp.asarray(config.layers)
    stack = get_path(params, path)
    w0 = stack[layers].astype(jnp.float32)
    mask = _flat(batch.attention_mask)
    first = config.layers[0]
    prefix, _ = run(params, cfg, tokens=_flat(batch.tokens), attention_mask=mask, stop=first)

    def losses(w: Array) -> Array:
        tuned = set_path(params, path, stack.at[layers].set(w.astype(stack.dtype)))
        top, _ = run(tuned, cfg, attention_mask=mask, hidden=prefix, start=first)
        return objective_loss(read_log_probs(tuned, cfg, top, batch), batch, config.objective)

    def mean_loss(w: Array) -> tuple[Array, Array]:
        per_edit = losses(w)
        return per_edit.mean(), per_edit

    optimizer = optax.adam(config.lr)

    def step(carry: tuple[Array, Any], _: None) -> tuple[tuple[Array, Any], Array]:
        w, state = carry
        (_, per_edit), grad = jax.value_and_grad(mean_loss, has_aux=True)(w)
        updates, state = optimizer.update(grad, state, w)
        return (_bounded(optax.apply_updates(w, updates), w0, config.norm_constraint),
                state), per_edit

    (w, _), trace = jax.lax.scan(step, (w0, optimizer.init(w0)), None, length=config.steps)
    return Finetuned(w, trace[0], losses(w))


def finetune_requests(params: Params, cfg: ModelConfig, tokenizer: Any,
                      requests: Sequence[Request], config: FinetuneConfig
                      ) -> tuple[Params, list[dict[str, Any]]]:
    """Fine-tune on one batch of requests: (edited params, per-request diagnostics: the
    objective's loss before and after, the teacher-forced target probability of the unedited
    and the fine-tuned model, and the largest weight change against ε)."""
    encoded = encode_requests(tokenizer, requests, ("{}",), config.target)
    batch = parallel.put_batch(encoded.batch)
    result = finetune(params, cfg, batch, config)
    path = down_proj_path(cfg)
    stack = get_path(params, path)
    edited = set_path(params, path, stack.at[jnp.asarray(config.layers)].set(
        result.kernels.astype(stack.dtype)))
    before, after = (unshifted_target_prob(p, cfg, batch, config.target)
                     for p in (params, edited))
    change = jnp.max(jnp.abs(result.kernels - stack[jnp.asarray(config.layers)]))
    loss_first, loss_last, before, after, change = parallel.to_host(
        (result.loss_first, result.loss_last, before, after, change))
    if not (np.isfinite(loss_last).all() and np.isfinite(change)):  # the batch is skipped
        bad = [str(c) for c, ok in zip(encoded.case_ids, np.isfinite(loss_last), strict=True)
               if not ok] or list(map(str, encoded.case_ids))
        raise NonFiniteShiftError(f"requests {', '.join(bad)}: the fine-tuning loss went "
                                     "non-finite (model weights are unchanged)")
    return edited, [{"case_id": case_id, "loss_first": float(a), "loss_last": float(b),
                     "target_prob_first": float(p), "target_prob_edited": float(q),
                     "stopped_at_step": config.steps, "weight_change": float(change)}
                    for case_id, a, b, p, q in zip(encoded.case_ids, loss_first, loss_last,
                                                   before, after, strict=True)]
