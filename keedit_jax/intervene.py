"""The functional seam: run a layer range, add memory shifts, return the captures asked for.

Every method in the library reaches the model through `run`. A memory shift δ is an argument
(`Shift`), so `jax.grad` with respect to it is an ordinary gradient; captures are a static
request (`Taps`) answered by a pytree (`Captures`). No hooks, no mutable state (DESIGN.md).

Sites, per layer l (HF names for a Llama):
  block_out  the residual stream after layer l (where shifts are added by default), [B, T, D]
  mlp_key    the down-projection input of layer l (the MEMIT key), [B, T, F]
  mlp_out    the down-projection output of layer l (MEMIT's value site), [B, T, D]
  attn_out   the attention output projection's output of layer l (o_proj), [B, T, D]
A shift names its site (`Shift.site`): at block_out it is added after the block, after
mlp_key/mlp_out are read; at attn_out or mlp_out it is added to that sublayer's output inside
the block (`models.layers.SublayerShifts`), so what reads that output downstream sees it (a
Llama or GPT-2 MLP reads the shifted attention output; GPT-J's parallel MLP does not). A tap
at attn_out / mlp_out reads what the weights compute there, before that site's own shift.

A replacement, GRACE's codebook (`Codebook`, Hartvigsen et al. 2023), is data too: keys at a
layer's mlp_key, values that replace its mlp_out where a key is within its deferral radius.
It belongs to the edited model rather than to one call (it must act in every evaluation and
in generation), so it travels in the parameter tree (`with_codebook`) and the layer loop hands
it to its block as an argument (`models.layers.SublayerShifts.mlp_codebook`), never a hook.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from keedit_jax.models.config import ModelConfig
from keedit_jax.models.layers import CODEBOOK, Codebook, SublayerShifts
from keedit_jax.models.params import Params
from keedit_jax.models.transformer import embed, head, prompt_inputs, run_block, run_layers

Array = jax.Array
# Where a Shift is added (module docstring).
SITES = ("block_out", "attn_out", "mlp_out")


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Shift:
    """Add `delta` [B, P, D] to `site` of `layer` at sequence indices `positions` [B, P].

    Indices address the (left-padded) sequence axis. A row that needs fewer than P shifts can
    repeat an index with a zero delta. `site` (static) is one of `SITES`: the block output
    (the residual stream, every method's default), or inside the block the attention output
    or the MLP output (PMET's two "TC hidden states", Li et al. 2024).
    """

    positions: Array
    delta: Array
    layer: int = dataclasses.field(metadata={"static": True})
    site: str = dataclasses.field(default="block_out", metadata={"static": True})


@dataclasses.dataclass(frozen=True, kw_only=True)
class Taps:
    """Which sites to capture, at which layers (static: part of the compiled program)."""

    block_out: tuple[int, ...] = ()
    mlp_key: tuple[int, ...] = ()
    mlp_out: tuple[int, ...] = ()
    logits: bool = False
    attn_out: tuple[int, ...] = ()

    def layers(self) -> frozenset[int]:
        return frozenset(self.block_out + self.mlp_key + self.mlp_out + self.attn_out)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Captures:
    """What `run` captured: per-site dicts keyed by layer; `logits` [B, T, V] or None."""

    block_out: dict[int, Array]
    mlp_key: dict[int, Array]
    mlp_out: dict[int, Array]
    logits: Array | None
    attn_out: dict[int, Array] = dataclasses.field(default_factory=dict)


def run(params: Params, cfg: ModelConfig, *, attention_mask: Array, tokens: Array | None = None,
        hidden: Array | None = None, start: int = 0, stop: int | None = None,
        shifts: tuple[Shift, ...] = (), taps: Taps = Taps(), remat: bool = False,
        segment_ids: Array | None = None) -> tuple[Array, Captures]:
    """Run layers [start, stop) from tokens (start must be 0) or from the hidden state entering
    layer `start`; add `shifts`; return (hidden after layer stop-1, Captures).

    attention_mask [B, T] is 1 on real tokens, 0 on left padding; positions and the causal
    mask are derived from it; `segment_ids` [B, T] marks documents packed into one row
    (`transformer.prompt_inputs`). `taps.logits` needs stop == n_layers.
    """
    stop = cfg.n_layers if stop is None else stop
    _validate(cfg, start, stop, shifts, taps, tokens, hidden)
    inputs = prompt_inputs(cfg, attention_mask, segment_ids)
    h = embed(params, cfg, tokens, inputs.positions) if hidden is None else hidden
    shifts_at: dict[int, dict[str, Shift]] = {}
    for s in shifts:
        shifts_at.setdefault(s.layer, {})[s.site] = s
    captured: dict[str, dict[int, Array]] = {"block_out": {}, "mlp_key": {}, "mlp_out": {},
                                             "attn_out": {}}
    cursor = start
    for index in sorted(taps.layers() | shifts_at.keys()):
        h, _ = run_layers(params, cfg, h, inputs, cursor, index, remat=remat)
        here = shifts_at.get(index, {})
        out = run_block(params, cfg, index, h, inputs, adds=_sublayer_adds(h, here))
        h = out.hidden if "block_out" not in here else _add_shift(out.hidden, here["block_out"])
        for site, value in (("mlp_key", out.mlp_key), ("mlp_out", out.mlp_out),
                            ("attn_out", out.attn_out), ("block_out", h)):
            if index in getattr(taps, site):
                captured[site][index] = value
        cursor = index + 1
    h, _ = run_layers(params, cfg, h, inputs, cursor, stop, remat=remat)
    logits = head(params, cfg, h) if taps.logits else None
    return h, Captures(logits=logits, **captured)


def _add_shift(h_btd: Array, shift: Shift) -> Array:
    rows = jnp.arange(h_btd.shape[0])[:, None]
    return h_btd.at[rows, shift.positions].add(shift.delta.astype(h_btd.dtype))


def _sublayer_adds(h_btd: Array, here: dict[str, Shift]) -> SublayerShifts:
    """The attn_out / mlp_out shifts of one layer as dense [B, T, D] additions (zero elsewhere;
    none when the layer has no such shift, so the block computes exactly what it did)."""
    def dense(site: str) -> Array | None:
        return _add_shift(jnp.zeros_like(h_btd), here[site]) if site in here else None

    return SublayerShifts(attn_out=dense("attn_out"), mlp_out=dense("mlp_out"))


def _validate(cfg: ModelConfig, start: int, stop: int, shifts: tuple[Shift, ...], taps: Taps,
              tokens: Array | None, hidden: Array | None) -> None:
    """Static checks, raised at trace time with the offending layer named."""
    if (tokens is None) == (hidden is None):
        raise ValueError("give exactly one of tokens (run from the embedding) or hidden")
    if tokens is not None and start != 0:
        raise ValueError(f"running from tokens starts at layer 0, not {start}")
    if not 0 <= start <= stop <= cfg.n_layers:
        raise IndexError(f"layer range [{start}, {stop}) is outside 0..{cfg.n_layers}")
    for what, layers in (("shift layer", [s.layer for s in shifts]),
                         ("tapped layer", sorted(taps.layers()))):
        for index in layers:
            cfg.check_layer(index, what)
            if not start <= index < stop:
                raise IndexError(f"{what} {index} is outside the run range [{start}, {stop})")
    for s in shifts:
        if s.site not in SITES:
            raise ValueError(f"Shift at layer {s.layer}: unknown site {s.site!r}; sites: "
                             f"{', '.join(SITES)}")
    if len({(s.layer, s.site) for s in shifts}) != len(shifts):
        raise ValueError("at most one Shift per layer and site: merge positions of one layer "
                         "and site into one")
    if taps.logits and stop != cfg.n_layers:
        raise ValueError(f"logits need the run to reach the last layer (stop={stop})")


def with_codebook(params: Params, book: Codebook) -> Params:
    """The model `params` with GRACE's `book` at its layer (a new tree; params unchanged)."""
    return {**params, CODEBOOK: book}


def forward(params: Params, cfg: ModelConfig, tokens: Array, attention_mask: Array) -> Array:
    """Logits [B, T, V] of a left-padded batch."""
    return run(params, cfg, tokens=tokens, attention_mask=attention_mask,
               taps=Taps(logits=True))[1].logits


forward_jit = jax.jit(forward, static_argnames=("cfg",))
