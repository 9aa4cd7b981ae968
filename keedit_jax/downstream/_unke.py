"""UnKE's whole-layer regression (muke §2.7 Eq. 20 "As implemented", anyedit §2.4.3).

UnKE has no closed form: the key of layer ℓ is the hidden state entering it, the value map is
the whole decoder layer, and every parameter of the layer is fitted by AdamW. Per edited layer
ℓ (index i of n, increasing depth), under the params edited so far:

    H_in, H_out = input / output of layer ℓ on the edit contexts
    H_tgt       = H_out, plus (m* − Z_cur) / (n − i) at the edit positions
                  (Z_cur: the current output of the last edited layer there; MEMIT's spread)
    E_in, E_out = input / output of layer ℓ on the preservation contexts (Alpaca samples)
    θ_ℓ         ← argmin MSE(layer_θ(E_in), E_out) + MSE(layer_θ(H_in), H_tgt)

with AdamW (lr 2e-4, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 except on the norm
scales) for 50 steps, as one jitted `lax.scan`. Each MSE is the mean over all elements of the
real (non-pad) positions; the reference's `nn.MSELoss` also averages over its pads, which only
rescales each term by its batch's padding fraction, so we leave pads out on purpose.

The layer is optimised in float32 at least (a bf16 copy would round every 2e-4-sized step
away) and written back in the params' dtype. The preservation contexts are the caller's: the
reference draws 20 Alpaca samples per edit (chat template on instruction+input, then output).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from keedit_jax.downstream._layers import ordered_layers, spread_residual
from keedit_jax.downstream._linalg import SolveError, all_finite
from keedit_jax.intervene import Taps, run
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.family import get_family
from keedit_jax.models.layers import AttnInputs
from keedit_jax.models.params import Params, cast, layer, set_layers
from keedit_jax.models.transformer import prompt_inputs, run_block

Array = jax.Array


class NonFiniteRegressionError(SolveError):
    """The UnKE regression of a layer went NaN/inf; the message names the layer and the step."""


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnkeHParams:
    """UnKE's layer-regression hyperparameters (anyedit §2.4.3, muke §2.7; static under jit).

    lr, steps:     AdamW learning rate and number of updates (paper: 2e-4, 50).
    weight_decay:  decoupled decay on every layer weight except the norm scales (code: 0.01).
    b1, b2, eps:   Adam moments and epsilon (code: torch defaults).
    """

    lr: float = 2e-4
    steps: int = 50
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, not {self.steps}")


class Contexts(NamedTuple):
    """Left-padded token rows [B, T] int32 and their attention mask [B, T] (1 = real token)."""

    tokens: Array
    attention_mask: Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class UnkeLayerReport:
    """One layer's regression: the residual share added to H_out [B, P, D] (0 at invalid
    positions), the loss before each update [steps], and the loss of the written layer []."""

    resid: Array
    loss: Array
    final_loss: Array


class _Side(NamedTuple):
    """One MSE term: layer inputs, wanted outputs [B, T, D], the real-token mask [B, T] and the
    attention inputs derived from it (once, not at every step of the regression)."""

    inputs: Array
    targets: Array
    mask: Array
    attn: AttnInputs


def _side(cfg: ModelConfig, inputs: Array, targets: Array, mask: Array) -> _Side:
    return _Side(inputs, targets, mask, prompt_inputs(cfg, mask))


@partial(jax.jit, static_argnames=("cfg", "index", "last"))
def _layer_io(params: Params, cfg: ModelConfig, ctx: Contexts, index: int,
              last: int) -> tuple[Array, Array, Array]:
    """Hidden state entering layer `index`, its output, and the output of layer `last`."""
    h_in, _ = run(params, cfg, tokens=ctx.tokens, attention_mask=ctx.attention_mask, stop=index)
    _, caps = run(params, cfg, attention_mask=ctx.attention_mask, hidden=h_in, start=index,
                  stop=last + 1, taps=Taps(block_out=tuple(sorted({index, last}))))
    return h_in, caps.block_out[index], caps.block_out[last]


def _edit_targets(h_out: Array, z_last: Array, positions: Array, valid: Array, targets: Array,
                  index: int, n_layers: int) -> tuple[Array, Array]:
    """H_tgt = H_out + (m* − Z_cur)/(n − i) at the valid edit positions, and that share."""
    rows = jnp.arange(h_out.shape[0])[:, None]
    share = spread_residual(targets, z_last[rows, positions], index, n_layers)
    resid = jnp.where(valid[..., None], share, 0.0)  # padding slots add nothing, even if NaN
    return h_out.at[rows, positions].add(resid), resid


def _apply_layer(cfg: ModelConfig, theta: Params, h_btd: Array, inputs: AttnInputs) -> Array:
    """Layer θ alone on h (penzai's isolate-submodel): run_block on a one-layer stack, so the
    model's stack is neither copied nor updated inside the loop."""
    stack = jax.tree.map(lambda x: x[None], theta)
    for name in reversed(get_family(cfg).layers_path):
        stack = {name: stack}
    return run_block(stack, cfg, 0, h_btd, inputs).hidden


def _masked_mse(pred_btd: Array, target_btd: Array, mask_bt: Array) -> Array:
    """Mean squared error over every element of the real positions (pads excluded)."""
    err = jnp.where(mask_bt[..., None] > 0, jnp.square(pred_btd - target_btd), 0.0)
    count = jnp.maximum(jnp.sum(mask_bt > 0), 1) * pred_btd.shape[-1]
    return jnp.sum(err) / count


def _loss(cfg: ModelConfig, sides: tuple[_Side, ...], theta: Params) -> Array:
    """Σ over sides (preservation, edit) of MSE(layer_θ(inputs), targets)."""
    return sum(_masked_mse(_apply_layer(cfg, theta, s.inputs, s.attn), s.targets, s.mask)
               for s in sides)


def _decays(theta: Params) -> Params:
    """Weight-decay mask: every leaf but the norm scales (the reference exempts exactly
    input_layernorm.weight and post_attention_layernorm.weight, anyedit §2.4.3)."""
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key != "scale", theta)


def _optimizer(hp: UnkeHParams) -> optax.GradientTransformation:
    """torch AdamW: optax applies the same decoupled decay lr·wd·θ_t with the same moments."""
    return optax.adamw(hp.lr, b1=hp.b1, b2=hp.b2, eps=hp.eps, weight_decay=hp.weight_decay,
                       mask=_decays)


@partial(jax.jit, static_argnames=("cfg", "hp"))
def _regress(cfg: ModelConfig, theta: Params, sides: tuple[_Side, ...],
             hp: UnkeHParams) -> tuple[Params, Array, Array, Array]:
    """hp.steps AdamW updates of one layer in one scan: (θ, loss before each update [steps],
    loss of θ, whether all of them are finite)."""
    opt = _optimizer(hp)
    loss_fn = partial(_loss, cfg, sides)

    def step(carry: tuple[Params, optax.OptState], _: None) -> tuple[tuple, Array]:
        params, state = carry
        loss, grad = jax.value_and_grad(loss_fn)(params)
        updates, state = opt.update(grad, state, params)
        return (optax.apply_updates(params, updates), state), loss

    (theta, _), trace = jax.lax.scan(step, (theta, opt.init(theta)), length=hp.steps)
    final = loss_fn(theta)
    return theta, trace, final, all_finite(trace, final, *jax.tree.leaves(theta))


def _check_finite(finite: Array, trace: Array, *, index: int,
                  request_ids: Sequence[object]) -> None:
    """Raise on the host, naming the layer and the first step whose loss was not finite."""
    if bool(finite):
        return
    trace_np = np.asarray(trace)
    bad = np.flatnonzero(~np.isfinite(trace_np))
    where = f"step {bad[0]} of {trace_np.size}" if bad.size else f"the end ({trace_np.size} steps)"
    ids = ", ".join(str(i) for i in request_ids) or "(no ids given)"
    raise NonFiniteRegressionError(
        f"UnKE regression of layer {index} for requests [{ids}]: non-finite loss at {where}. "
        f"No weights were changed.")


def _write_layer(params: Params, cfg: ModelConfig, index: int, theta: Params) -> Params:
    """A copy of params with layer `index` of every stacked leaf replaced by θ (cast back)."""
    return set_layers(params, get_family(cfg).layers_path, {index: theta})


def _check_sites(cfg: ModelConfig, edit: Contexts, positions: Array, valid: Array,
                 targets: Array) -> None:
    """Refuse mismatched sites up front, before any layer is run."""
    b = edit.tokens.shape[0]
    if positions.shape[0] != b or positions.shape != valid.shape or \
            targets.shape != (*positions.shape, cfg.d_model):
        raise ValueError(f"edit sites do not match {b} edit rows and d_model {cfg.d_model}: "
                         f"positions {positions.shape}, valid {valid.shape}, "
                         f"targets {targets.shape} (want [B, P], [B, P], [B, P, D])")


def unke_edit(params: Params, cfg: ModelConfig, *, layers: Sequence[int], edit: Contexts,
              positions: Array, valid: Array, targets: Array, preserve: Contexts,
              hparams: UnkeHParams = UnkeHParams(), request_ids: Sequence[object] = ()
              ) -> tuple[Params, dict[int, UnkeLayerReport]]:
    """Write the memories m* into whole decoder layers by UnKE's regression, layer by layer.

    edit: the edit contexts (question + answer); positions [B, P] index their sequence axis,
    valid [B, P] marks real slots (a padded slot may repeat any index; valid positions of a
    row must be distinct); targets [B, P, D] = m* at the output of the last edited layer.
    preserve: the preservation contexts. Returns the edited params and per-layer reports. A
    non-finite loss raises NonFiniteRegressionError naming the layer and the step; nothing is
    returned, so the caller's params stand.
    """
    order = ordered_layers(layers)
    if not order:
        raise ValueError("UnKE needs at least one layer to edit")
    for index in order:
        cfg.check_layer(index, "edited layer")
    _check_sites(cfg, edit, positions, valid, targets)
    reports: dict[int, UnkeLayerReport] = {}
    for i, index in enumerate(order):
        theta = layer(params, cfg, index)
        dtype = jnp.promote_types(jax.tree.leaves(theta)[0].dtype, jnp.float32)
        h_in, h_out, z_last = _layer_io(params, cfg, edit, index, order[-1])
        h_tgt, resid = _edit_targets(h_out.astype(dtype), z_last.astype(dtype), positions,
                                     valid, targets.astype(dtype), i, len(order))
        e_in, e_out, _ = _layer_io(params, cfg, preserve, index, index)
        sides = (_side(cfg, e_in.astype(dtype), e_out.astype(dtype), preserve.attention_mask),
                 _side(cfg, h_in.astype(dtype), h_tgt, edit.attention_mask))
        theta, trace, final, finite = _regress(cfg, cast(theta, dtype), sides, hparams)
        _check_finite(finite, trace, index=index, request_ids=request_ids)
        params = _write_layer(params, cfg, index, theta)
        reports[index] = UnkeLayerReport(resid=resid, loss=trace, final_loss=final)
    return params, reports
