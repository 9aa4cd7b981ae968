"""GRACE: a discrete key-value codebook at one layer, with a deferral radius per key.

Hartvigsen et al. 2023, "Aging with GRACE: Lifelong Model Editing with Discrete Key-Value
Adaptors" (NeurIPS), §2. No weight changes: a GRACE adaptor wraps layer l with a codebook
C = {(k_i, v_i, ε_i, y_i)}. At inference the layer's input h is compared with the keys; if the
nearest key i* = argmin_i d(h, k_i) has d(h, k_i*) ≤ ε_i*, the layer outputs v_i*, otherwise
it runs unchanged (the deferral, Eq. 1). d is the Euclidean distance.

Editing an input x with label y (§2, codebook maintenance) reads h at the last token of x:
- the codebook is empty, or d(h, k_i*) > ε_i* + ε_init: ADD (h, v, ε_init, y);
- y_i* = y: EXPAND ε_i* to cover h (ε_i* = max(ε_i*, d)), and keep training v_i*;
- y_i* ≠ y: SPLIT, both radii set to d/2 so the two balls no longer overlap, and add
  (h, v, d/2, y). Ours caps each at its previous size (min(ε_i*, d/2), min(ε_init, d/2)), so
  a split never grows a ball. A conflicting key at distance 0 (the same input, a new label)
  cannot be split: its entry is OVERWRITTEN with the new label and value (the latest edit
  wins), a case the paper does not discuss.
The value v of an edited entry is learned by gradient steps on the edit's loss through the
codebook itself (the released settings: plain SGD, learning rate 1.0, 100 steps, ε_init 1.0,
Euclidean distance; the paper sweeps ε_init). New values start at the layer's own output
("warm"; the released default draws them at random), so step 0 is the unedited model.

In this library the adapted layer is the down projection of layer l's MLP: keys live at the
seam's mlp_key site [F], values replace its mlp_out [D] (`models.layers.Codebook`). Every
position queries the codebook with its own activation; a key is written from the prompt's
last token, which is therefore where an edited prompt is routed, in teacher-forced scoring and
in generation alike (cached or not: each new token is the last token of its prefix). The loss
is the target's teacher-forced NLL given the prompt (FT-M's "target_new", `finetune`), summed
over the batch's edits, so each entry's value follows its own edits' gradient.
"""

from __future__ import annotations

import dataclasses
import zlib
from collections.abc import Sequence
from functools import partial
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keedit_jax import parallel
from keedit_jax.data import Request
from keedit_jax.intervene import run, with_codebook
from keedit_jax.methods.finetune import objective_loss
from keedit_jax.methods.structured import read_sites
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.generate import bucket
from keedit_jax.models.layers import Codebook, codebook_of
from keedit_jax.models.params import Params
from keedit_jax.upstream import NonFiniteShiftError, TargetConfig
from keedit_jax.upstream.encode import ShiftBatch, encode_requests
from keedit_jax.upstream.loop import _flat, read_log_probs

Array = jax.Array
Op = Literal["add", "expand", "split", "overwrite"]
MIN_CAPACITY = 16  # the smallest codebook; it doubles when an edit batch would not fit


@dataclasses.dataclass(frozen=True, kw_only=True)
class GraceConfig:
    """The adapted layer (`layers`, exactly one), ε_init, and SGD's learning rate and steps
    on the values. `target` is the shared encoding of the requests; GRACE's key is the last
    prompt token, so its fact_token must be "last". Defaults: the released GRACE settings."""

    layers: tuple[int, ...]
    target: TargetConfig
    epsilon: float = 1.0
    lr: float = 1.0
    steps: int = 100

    def __post_init__(self) -> None:
        if len(self.layers) != 1:
            raise ValueError(f"--layers: GRACE adapts exactly one layer, got {self.layers}")
        if self.target.fact_token != "last":
            raise ValueError(f"--fact_token={self.target.fact_token}: GRACE's key is the "
                             "prompt's last token (--fact_token=last)")
        for flag, value, ok in (("grace_epsilon", self.epsilon, self.epsilon > 0),
                                ("grace_lr", self.lr, self.lr > 0),
                                ("grace_steps", self.steps, self.steps >= 1)):
            if not ok:
                raise ValueError(f"--{flag}={value}: must be positive")

    @property
    def layer(self) -> int:
        return self.layers[0]


class Entries(NamedTuple):
    """A codebook on the host (numpy), as maintenance reads and writes it."""

    keys: np.ndarray  # [N, F]
    values: np.ndarray  # [N, D]
    radii: np.ndarray  # [N]
    used: np.ndarray  # [N] bool
    labels: np.ndarray  # [N] int32


class Placement(NamedTuple):
    """What one edit does to the codebook: the operation, the entry whose value it trains
    (`slot`) and that entry's radius, the nearest used entry before it (-1: none), the
    distance to it, and that entry's radius after the edit."""

    op: Op
    slot: int
    radius: float
    nearest: int
    distance: float
    nearest_radius: float


def label_id(target: str) -> int:
    """A stable int32 id of a target text: the label maintenance compares (CRC-32)."""
    return zlib.crc32(target.encode("utf-8")) & 0x7FFFFFFF


def place(entries: Entries, query: np.ndarray, label: int, epsilon: float) -> Placement:
    """GRACE's codebook maintenance for one edit (module docstring), read-only."""
    free = int(np.argmin(entries.used)) if not entries.used.all() else -1
    if not entries.used.any():
        return Placement("add", free, epsilon, -1, float("inf"), 0.0)
    distances = np.linalg.norm(entries.keys.astype(np.float64) - query, axis=-1)
    distances = np.where(entries.used, distances, np.inf)
    nearest = int(np.argmin(distances))
    d, radius = float(distances[nearest]), float(entries.radii[nearest])
    if d > radius + epsilon:
        return Placement("add", free, epsilon, nearest, d, radius)
    if entries.labels[nearest] == label:
        return Placement("expand", nearest, max(radius, d), nearest, d, max(radius, d))
    if d == 0.0:
        return Placement("overwrite", nearest, radius, nearest, d, radius)
    return Placement("split", free, min(epsilon, d / 2), nearest, d, min(radius, d / 2))


def apply_placement(entries: Entries, placement: Placement, query: np.ndarray,
                    value: np.ndarray, label: int) -> None:
    """Write a placement into `entries` (in place): a new or overwritten entry gets the key,
    the initial value and the label; the nearest entry gets its new radius."""
    if placement.nearest >= 0:
        entries.radii[placement.nearest] = placement.nearest_radius
    if placement.op in ("add", "split", "overwrite"):
        if placement.slot < 0:
            raise ValueError("the codebook is full (maintain_batch grows it first)")
        entries.keys[placement.slot] = query
        entries.values[placement.slot] = value
        entries.labels[placement.slot] = label
        entries.used[placement.slot] = True
    entries.radii[placement.slot] = placement.radius


def grown(entries: Entries, capacity: int) -> Entries:
    """A copy of `entries` with `capacity` slots (the new ones unused)."""
    pad = capacity - entries.used.shape[0]
    if pad < 0:
        raise ValueError(f"cannot shrink a codebook of {entries.used.shape[0]} to {capacity}")
    return Entries(*(np.concatenate([a, np.zeros((pad,) + a.shape[1:], a.dtype)])
                     for a in entries))


def maintain_batch(entries: Entries, queries: np.ndarray, values: np.ndarray,
                   labels: Sequence[int], epsilon: float) -> tuple[Entries, list[Placement]]:
    """The edits of a batch in order (the paper streams them one at a time), each against the
    codebook its predecessors left; capacity doubles first if every edit could add. Returns
    the new entries (the given ones are unchanged) and each edit's placement."""
    need = int(entries.used.sum()) + len(labels)
    out = grown(entries, max(entries.used.shape[0], bucket(need, MIN_CAPACITY)))
    placements = []
    for query, value, label in zip(queries, values, labels, strict=True):
        placement = place(out, query, label, epsilon)
        apply_placement(out, placement, query, value, label)
        placements.append(placement)
    return out, placements


def empty_entries(cfg: ModelConfig) -> Entries:
    return Entries(np.zeros((0, cfg.d_ff), np.float32), np.zeros((0, cfg.d_model), np.float32),
                   np.zeros((0,), np.float32), np.zeros((0,), bool), np.zeros((0,), np.int32))


def blank_codebook(cfg: ModelConfig, layer: int, capacity: int) -> Codebook:
    """A codebook of `capacity` unused slots: the structure a stream checkpoint of a codebook
    that size restores into (capacity doubles along a stream)."""
    return to_device(grown(empty_entries(cfg), capacity), layer)


def to_host(book: Codebook) -> Entries:
    return Entries(*(np.array(a) for a in parallel.to_host(
        (book.keys, book.values, book.radii, book.used, book.labels))))


def to_device(entries: Entries, layer: int) -> Codebook:
    return Codebook(keys=jnp.asarray(entries.keys, jnp.float32),
                    values=jnp.asarray(entries.values, jnp.float32),
                    radii=jnp.asarray(entries.radii, jnp.float32),
                    used=jnp.asarray(entries.used), labels=jnp.asarray(entries.labels),
                    layer=layer)


class Trained(NamedTuple):
    """The codebook's values [N, D] after training, and the per-edit loss [E] before the
    first and after the last step."""

    values: Array
    loss_first: Array
    loss_last: Array


@partial(jax.jit, static_argnames=("cfg", "config"))
def train_values(params: Params, cfg: ModelConfig, book: Codebook, trained: Array,
                 batch: ShiftBatch, config: GraceConfig) -> Trained:
    """SGD on the values of the `trained` entries [N] (the others are frozen) for
    config.steps steps on the edits' summed target NLL through the codebook, as one program;
    the layers below the codebook's run once."""
    tokens, mask = _flat(batch.tokens), _flat(batch.attention_mask)
    prefix, _ = run(params, cfg, tokens=tokens, attention_mask=mask, stop=book.layer)

    def losses(values: Array) -> Array:
        edited = with_codebook(params, dataclasses.replace(book, values=values))
        top, _ = run(edited, cfg, attention_mask=mask, hidden=prefix, start=book.layer)
        return objective_loss(read_log_probs(params, cfg, top, batch), batch, "target_new")

    def total(values: Array) -> tuple[Array, Array]:
        per_edit = losses(values)
        return per_edit.sum(), per_edit

    optimizer = optax.sgd(config.lr)

    def step(carry: tuple[Array, Any], _: None) -> tuple[tuple[Array, Any], Array]:
        values, state = carry
        (_, per_edit), grad = jax.value_and_grad(total, has_aux=True)(values)
        updates, state = optimizer.update(jnp.where(trained[:, None], grad, 0.0), state)
        return (optax.apply_updates(values, updates), state), per_edit

    init = (book.values, optimizer.init(book.values))
    (values, _), trace = jax.lax.scan(step, init, None, length=config.steps)
    return Trained(values, trace[0], losses(values))


def grace_requests(params: Params, cfg: ModelConfig, tokenizer: Any,
                   requests: Sequence[Request], config: GraceConfig
                   ) -> tuple[Params, list[dict[str, Any]]]:
    """Insert one batch of requests into the codebook of `params` (a new one when it has
    none): (params with the updated codebook, per-request diagnostics: the placement, the
    loss before the first and after the last step and the target probability exp(−loss) at
    both: at the first, new values are the layer's own outputs, so it is the given model's
    wherever only the batch's own entries route; at the last, the edited model's)."""
    cfg.check_layer(config.layer, "GRACE layer")
    encoded = encode_requests(tokenizer, requests, ("{}",), config.target)
    batch = parallel.put_batch(encoded.batch)
    queries, outputs = read_sites(params, cfg, batch.tokens[:, 0], batch.attention_mask[:, 0],
                                  config.layer, config.layer, batch.shift_pos[:, 0, 0],
                                  "mlp_out")
    book = codebook_of(params)
    labels = [label_id(r.target_new) for r in requests]
    entries, placements = maintain_batch(
        empty_entries(cfg) if book is None else to_host(book),
        np.asarray(parallel.to_host(queries), np.float32),
        np.asarray(parallel.to_host(outputs), np.float32), labels, config.epsilon)
    book = to_device(entries, config.layer)
    trained = jnp.zeros(book.capacity, bool).at[jnp.asarray([p.slot for p in placements])
                                                ].set(True)
    result = train_values(params, cfg, book, trained, batch, config)
    edited = with_codebook(params, dataclasses.replace(book, values=result.values))
    first, last = parallel.to_host((result.loss_first, result.loss_last))
    if not np.isfinite(last).all():
        bad = [str(c) for c, ok in zip(encoded.case_ids, np.isfinite(last), strict=True)
               if not ok]
        raise NonFiniteShiftError(f"requests {', '.join(bad)}: GRACE's value loss went "
                                  "non-finite (the codebook is unchanged)")
    size = int(entries.used.sum())
    return edited, [{"case_id": case_id, "loss_first": float(a), "loss_last": float(b),
                     "target_prob_first": float(np.exp(-a)),
                     "target_prob_edited": float(np.exp(-b)), "stopped_at_step": config.steps,
                     "weight_change": 0.0, "op": s.op,
                     "distance": s.distance if s.nearest >= 0 else None, "radius": s.radius,
                     "codebook_entries": size}
                    for case_id, a, b, s in zip(encoded.case_ids, first, last, placements,
                                                strict=True)]
