"""MetaKE (docs/references.md: metake): refine AlphaEdit's targets with feedback from its own solve.

Stage I gives the semantic plan V⁽⁰⁾ [B, D] (AlphaEdit's targets). Before the standard
multi-layer AlphaEdit insertion, T steps of plain gradient descent (metake Eq. 82) refine V on
the virtual look-ahead objective (Eqs. 79-81), in our orientation (see keedit_jax.downstream):

    X   = (P(C_p + KᵀK) + L2·I)⁻¹ P Kᵀ          [F, B]  the frozen Structural Gate G_Lᵀ (Eq. 8)
    ΔŴ(V) = X (V − H)                            [F, D]  the virtual update of layer L only
    F_VL(V) = L_edit(W_L + ΔŴ) + L_loc(W_L + ΔŴ) + ‖V − V⁽⁰⁾‖²       (Eq. 7, unit weights)

K, H are the keys and the layer-L outputs of the batch at the last edited layer L under the
current model, C_p AlphaEdit's previous-edit Gram, L_edit the target NLL over the context
templates (compute_z's token weights), L_loc = KL(p_post ‖ p_pre) on "{subject} is a", both
summed over the batch (metake §7 A3). Because X is frozen, jax.grad of F_VL *is* the
Structural Gradient Proxy (Eq. 9): Xᵀ·(∂L/∂W_L) + 2(V − V⁽⁰⁾).

The exact hypergradient differentiates the outer objective through the whole multi-layer
realization instead (metake §3 "Exact multi-layer hypergradient"): every edited layer in turn,
keys and outputs recomputed under the layers already edited, residual spread (V − h)/(L − i),
AlphaEdit's solve. `feedback="exact"` descends on it; it also validates the proxy.

Ablations (metake §3): `steps=0` (w/o bi-level optimisation: AlphaEdit), `gate="key"`
(K(KᵀK + L2·I)⁻¹ with no P or C_p), `feedback="stop_grad"` (the virtual update detached: only
the anchor's gradient, zero at V⁽⁰⁾, remains, so V stays V⁽⁰⁾).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Literal

import jax
import jax.numpy as jnp

from keedit_jax import downstream
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.params import Params, down_proj_path
from keedit_jax.upstream import ShiftBatch, TargetConfig
from keedit_jax.upstream.loop import Problem, loss_terms, prepare, shifted_log_probs

Array = jax.Array
Readout = Callable[[Params, int], downstream.Readout]


@dataclasses.dataclass(frozen=True, kw_only=True)
class MetaKEConfig:
    """steps T (15 in the paper), the meta learning rate η (lost from the paper; chosen on the
    organism, see configs/metake.cfg), the gate, and where the feedback comes from."""

    steps: int = 15
    meta_lr: float = 0.1
    gate: Literal["structural", "key"] = "structural"
    feedback: Literal["proxy", "exact", "stop_grad"] = "proxy"

    def __post_init__(self) -> None:
        if self.steps < 0 or self.meta_lr <= 0:
            raise ValueError(f"MetaKE needs steps >= 0 and meta_lr > 0 (got {self.steps}, "
                             f"{self.meta_lr})")
        if self.gate not in ("structural", "key"):
            raise ValueError(f"gate must be structural or key, not {self.gate!r}")
        if self.feedback not in ("proxy", "exact", "stop_grad"):
            raise ValueError(f"feedback must be proxy, exact or stop_grad, not {self.feedback!r}")


@partial(jax.tree_util.register_dataclass, data_fields=["batch", "problem"],
         meta_fields=["hp"])
@dataclasses.dataclass(frozen=True)
class Lookahead:
    """What the outer objective is evaluated on, fixed for the batch (metake §7 A10)."""

    batch: ShiftBatch
    problem: Problem  # prefix below layer L, h, and the pre-edit KL reference
    hp: TargetConfig


def structural_gate(projector: Array, keys: Array, state: downstream.AlphaEditState,
                    hparams: downstream.AlphaEditHParams, kind: str = "structural") -> Array:
    """X = G_Lᵀ [F, B]: AlphaEdit's own system solved with the residual replaced by the
    identity, so that AlphaEdit's ΔW = X R; `key` drops P and C_p (the ablation's gate)."""
    if kind == "key":
        k = keys.astype(jnp.float32)
        return jnp.linalg.solve(k.T @ k + hparams.l2 * jnp.eye(k.shape[1], dtype=k.dtype), k.T)
    a = downstream.alphaedit_system(projector, keys, state, hparams)
    return jnp.linalg.solve(a, projector.astype(a.dtype) @ keys.astype(a.dtype).T)


def outer_losses(params: Params, cfg: ModelConfig, look: Lookahead, *,
                 full_forward: bool = False) -> Array:
    """L_edit + L_loc summed over the batch, under `params` (no shift). The layers below L are
    read from the cached prefix unless `full_forward` (when they were edited too)."""
    problem = look.problem._replace(prefix=None) if full_forward else look.problem
    zero = jnp.zeros_like(problem.h)
    logp = shifted_log_probs(params, cfg, look.batch, look.hp, problem, zero, remat=False)
    terms = loss_terms(logp, problem.kl_ref, look.batch, zero, problem.h,
                       dataclasses.replace(look.hp, kl_factor=1.0, v_weight_decay=0.0))
    return jnp.sum(terms.total)


def with_virtual_update(params: Params, cfg: ModelConfig, layer: int, delta: Array) -> Params:
    return downstream.add_layer_delta(params, down_proj_path(cfg), layer, delta)


def lookahead_objective(v: Array, v0: Array, outputs: Array, gate: Array, params: Params,
                        cfg: ModelConfig, look: Lookahead, *, stop_grad: bool = False) -> Array:
    """F_VL(V) (metake Eqs. 79-81): the outer objective with only layer L virtually edited."""
    resid = v - outputs
    delta = gate @ (jax.lax.stop_gradient(resid) if stop_grad else resid)
    virtual = with_virtual_update(params, cfg, look.hp.layer, delta)
    return outer_losses(virtual, cfg, look) + jnp.sum((v - v0) ** 2)


def realize(v: Array, params: Params, cfg: ModelConfig, readout: Readout,
            stats: Mapping[int, Array], states: Mapping[int, Any], layers: Sequence[int],
            hparams: downstream.AlphaEditHParams) -> Params:
    """The multi-layer AlphaEdit insertion of targets V, differentiable in V: per layer in
    increasing depth, keys and outputs under the layers edited so far, (V − h)/(L − i), the
    projected solve (metake Eqs. 99-102). No host checks: this is traced."""
    for index, layer in enumerate(layers):
        sites = readout(params, layer)
        resid = downstream.spread_residual(v, sites.outputs, index, len(layers))
        a = downstream.alphaedit_system(stats[layer], sites.keys, states[layer], hparams)
        delta = jnp.linalg.solve(a, stats[layer] @ sites.keys.T) @ resid
        params = with_virtual_update(params, cfg, layer, delta)
    return params


def exact_objective(v: Array, v0: Array, params: Params, cfg: ModelConfig, look: Lookahead,
                    realization: Callable[[Array], Params]) -> Array:
    """F(V): the outer objective on W + Δ*(V), the full multi-layer realization."""
    return outer_losses(realization(v), cfg, look, full_forward=True) + jnp.sum((v - v0) ** 2)


@partial(jax.jit, static_argnames=("cfg", "hp"))
def prepare_lookahead(params: Params, cfg: ModelConfig, batch: ShiftBatch,
                      hp: TargetConfig) -> Lookahead:
    return Lookahead(batch, prepare(params, cfg, batch, hp), hp)


def _exact_value_and_grad(v: Array, v0: Array, params: Params, cfg: ModelConfig,
                          look: Lookahead, readout: Readout, stats: Mapping[int, Array],
                          states: Mapping[int, Any], layers: tuple[int, ...],
                          hparams: downstream.AlphaEditHParams) -> tuple[Array, Array]:
    def objective(v: Array) -> Array:
        realization = partial(realize, params=params, cfg=cfg, readout=readout, stats=stats,
                              states=states, layers=layers, hparams=hparams)
        return exact_objective(v, v0, params, cfg, look, realization)

    return jax.value_and_grad(objective)(v)


@partial(jax.jit, static_argnames=("cfg", "layers", "hparams"))
def exact_value_and_grad(v: Array, v0: Array, params: Params, cfg: ModelConfig,
                         look: Lookahead, readout: Readout, stats: Mapping[int, Array],
                         states: Mapping[int, Any], layers: tuple[int, ...],
                         hparams: downstream.AlphaEditHParams) -> tuple[Array, Array]:
    """F(V) and the exact hypergradient ∇F(V), one compiled program per batch shape."""
    return _exact_value_and_grad(v, v0, params, cfg, look, readout, stats, states, layers,
                                 hparams)


@partial(jax.jit, static_argnames=("cfg", "layers", "hparams", "steps"))
def descend_exact(v0: Array, params: Params, cfg: ModelConfig, look: Lookahead,
                  readout: Readout, stats: Mapping[int, Array], states: Mapping[int, Any],
                  layers: tuple[int, ...], hparams: downstream.AlphaEditHParams,
                  meta_lr: float, steps: int) -> tuple[Array, Array]:
    """T steps of V ← V − η ∇F(V) on the exact objective in one compiled loop; (V*, F)."""

    def step(v: Array, _: None) -> tuple[Array, Array]:
        value, g = _exact_value_and_grad(v, v0, params, cfg, look, readout, stats, states,
                                         layers, hparams)
        return v - meta_lr * g, value

    return jax.lax.scan(step, v0, None, length=steps)


@partial(jax.jit, static_argnames=("cfg", "steps", "stop_grad"))
def descend_lookahead(v0: Array, outputs: Array, gate: Array, params: Params, cfg: ModelConfig,
                      look: Lookahead, meta_lr: float, steps: int,
                      stop_grad: bool = False) -> tuple[Array, Array]:
    """T steps of V ← V − η ∇F_VL(V) from V⁽⁰⁾ in one compiled loop; (V*, F_VL per step)."""
    grad = jax.value_and_grad(lookahead_objective)

    def step(v: Array, _: None) -> tuple[Array, Array]:
        value, g = grad(v, v0, outputs, gate, params, cfg, look, stop_grad=stop_grad)
        return v - meta_lr * g, value

    return jax.lax.scan(step, v0, None, length=steps)


def refine_targets(v0: Array, params: Params, cfg: ModelConfig, look: Lookahead,
                   readout: Readout, stats: Mapping[int, Array], states: Mapping[int, Any],
                   layers: Sequence[int], hparams: downstream.AlphaEditHParams,
                   config: MetaKEConfig) -> tuple[Array, dict[str, Any]]:
    """V* after T steps of gradient descent on F_VL (proxy, stop_grad) or on F (exact), and
    what they did: the objective per step and each target's move (`target_move`)."""
    if config.steps == 0:
        return v0, {"objective": []}
    last = layers[-1]
    sites = readout(params, last)
    if config.feedback == "exact":
        v, values = descend_exact(v0, params, cfg, look, readout, dict(stats), dict(states),
                                  tuple(layers), hparams, config.meta_lr, config.steps)
    else:
        gate = structural_gate(stats[last], sites.keys, states[last], hparams, config.gate)
        v, values = descend_lookahead(v0, sites.outputs, gate, params, cfg, look,
                                      config.meta_lr, config.steps,
                                      stop_grad=config.feedback == "stop_grad")
    return v, {"objective": [float(x) for x in values],
               "moved": target_move(v, v0, sites.outputs)}


def target_move(v: Array, v0: Array, outputs: Array) -> list[float]:
    """‖V − V⁽⁰⁾‖ / ‖V⁽⁰⁾ − H‖ per request: how far the refinement moved each target, as a
    share of its Stage-I shift δ (near 0, MetaKE inserts what AlphaEdit would)."""
    shift = jnp.maximum(jnp.linalg.norm(v0 - outputs, axis=-1), 1e-12)
    return [float(x) for x in jnp.linalg.norm(v - v0, axis=-1) / shift]


Refine = Callable[[Params, Array, ShiftBatch, Readout, Mapping[int, Any]],
                  tuple[Array, dict[str, Any]]]


def metake_refiner(config: MetaKEConfig, cfg: ModelConfig, target: TargetConfig,
                   stats: Mapping[int, Array], layers: Sequence[int],
                   hparams: downstream.AlphaEditHParams) -> Refine:
    """The hook `edit_requests` calls between Stage I and the insertion (metake Algorithm 1)."""

    def refine(params: Params, v0: Array, batch: ShiftBatch, readout: Readout,
               states: Mapping[int, Any]) -> tuple[Array, dict[str, Any]]:
        look = prepare_lookahead(params, cfg, batch, target)
        return refine_targets(v0, params, cfg, look, readout, stats, states, layers, hparams,
                              config)

    return refine
