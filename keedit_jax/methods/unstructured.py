"""Long-form editing: UnKE, AnyEdit(*), μKE(*), and MEMIT/AlphaEdit One-for-All, as one pipeline.

requests -> windows (upstream.longform) -> shifts δ_i of every window under the strategy's
token weights (upstream.windowed) -> m*_i = h_i + δ_i -> one weight update for all windows of
all requests of the batch (muke §2.8; anyedit §2.4):
  memit / alphaedit: MEMIT's multi-layer closed form, keys at the shift positions of X ⊕ Y,
    with the other positions of the same sequence as in-context preservation keys K_p
    (MEMIT_ARE form, muke §2.7); One-for-All reads its one key on X alone and has no K_p.
  unke: the whole-layer regression (downstream.unke_edit) on X ⊕ Y, or on X for One-for-All
    (muke §3.3), with Alpaca-format preservation samples.

| method       | strategy            | solver | paper                       |
|--------------|---------------------|--------|-----------------------------|
| memit        | one_for_all         | memit  | MEMIT on long targets       |
| alphaedit    | one_for_all         | alpha  | AlphaEdit on long targets   |
| unke         | one_for_all         | unke   | UnKE                        |
| anyedit      | window              | memit  | AnyEdit (MEMIT+)            |
| anyedit_star | window              | unke   | AnyEdit* (UnKE+)            |
| muke         | matryoshka_affinity | memit  | μKE                         |
| muke_star    | matryoshka_affinity | unke   | μKE*                        |
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from keedit_jax import downstream, parallel, registry
from keedit_jax.methods.structured import read_sites
from keedit_jax.models.config import ModelConfig
from keedit_jax.models.generate import bucket, left_pad
from keedit_jax.models.params import Params, down_proj_path, to_device
from keedit_jax.upstream import TargetConfig
from keedit_jax.upstream.longform import EncodedEdit, WindowBatch, WindowConfig, pack_windows
from keedit_jax.upstream.windowed import (
    WindowResult,
    check_windows_finite,
    optimise_windows,
    window_readings,
)

Array = jax.Array
SolverName = Literal["memit", "alphaedit", "unke"]
# (strategy, solver) of every method that edits long form, from the registry's records.
# A window's shift optimisation stops below this loss: the MEMIT-based long-form references'
# 1e-2 (muke §2.6; UnKE-based code uses 5e-3), not MEMIT's own 5e-2 (TargetConfig's default).
LONGFORM_EARLY_STOP_LOSS = 1e-2
METHOD_PARTS: dict[str, tuple[str, SolverName]] = {
    r.name: (r.strategy, r.solver) for r in registry.RECORDS if r.longform}


@dataclasses.dataclass(frozen=True, kw_only=True)
class UnstructuredConfig:
    """Layers, the shift optimisation, its windows, and one downstream solver."""

    layers: tuple[int, ...]
    solver: SolverName
    target: TargetConfig
    window: WindowConfig
    in_context_preservation: bool = True
    memit: downstream.MemitHParams = downstream.MemitHParams()
    alphaedit: downstream.AlphaEditHParams = downstream.AlphaEditHParams(use_key_cache=False)
    unke: downstream.UnkeHParams = downstream.UnkeHParams()

    def __post_init__(self) -> None:
        if not self.layers or list(self.layers) != sorted(set(self.layers)):
            raise ValueError(f"layers must be increasing and distinct, got {self.layers}")
        if self.target.layer != self.layers[-1]:
            raise ValueError(f"the shifted layer l_WM ({self.target.layer}) must be the last "
                             f"edited layer ({self.layers[-1]}) (muke §1.6)")
        if self.solver not in ("memit", "alphaedit", "unke"):
            raise ValueError(f"unknown solver {self.solver!r}")

    @property
    def one_for_all(self) -> bool:
        return self.window.strategy == "one_for_all"


@dataclasses.dataclass(frozen=True)
class KeySites:
    """The update's contexts, left-padded [E, T], and the edit positions [E, N] (valid [E, N])."""

    tokens: np.ndarray
    mask: np.ndarray
    positions: np.ndarray
    valid: np.ndarray


def key_sites(edits: Sequence[EncodedEdit], prompt_only: bool, pad_id: int) -> KeySites:
    """X ⊕ Y with every shift position, or X alone with its last token (One-for-All)."""
    rows = [list(x.prompt_ids) if prompt_only else list(x.prompt_ids + x.target_ids)
            for x in edits]
    width = bucket(max(map(len, rows)), 8)
    tokens, mask = left_pad(rows, width, len(rows), pad_id)
    n = max(len(x.windows) for x in edits)
    positions = np.zeros((len(edits), n), np.int32)
    valid = np.zeros((len(edits), n), bool)
    for i, (edit, row) in enumerate(zip(edits, rows, strict=True)):
        at = width - len(row) + np.asarray(
            [len(edit.prompt_ids) - 1] if prompt_only else edit.shift_positions)
        positions[i] = at[0]  # padded slots repeat a real position (never read: valid False)
        positions[i, : len(at)] = at
        valid[i, : len(at)] = True
    return KeySites(tokens, mask, positions, valid)


def closed_form_readout(cfg: ModelConfig, sites: KeySites, out_layer: int,
                        preserve: bool):
    """The per-layer readout of downstream.edit_layers: keys and outputs at the valid edit
    positions (rows in edit-major, window order), and K_p = the keys at every other real
    position of the same contexts (zero rows elsewhere)."""
    rows, slots = np.nonzero(sites.valid)
    columns = sites.positions[rows, slots]
    others = sites.mask.astype(bool)
    others[rows, columns] = False

    def readout(current: Params, layer: int) -> downstream.Readout:
        keys, outputs = read_sites(current, cfg, sites.tokens, sites.mask, layer,
                                           out_layer)
        kept = None
        if preserve:
            kept = jnp.where(to_device(others)[..., None], keys, 0.0)
            kept = kept.reshape(-1, keys.shape[-1])
        return downstream.Readout(keys=keys[rows, columns], outputs=outputs[rows, columns],
                                  preserve=kept)

    return readout


def edit_longform(params: Params, cfg: ModelConfig, edits: Sequence[EncodedEdit],
                  stats: Mapping[int, Array], config: UnstructuredConfig, *, pad_id: int,
                  preservation: downstream.Contexts | None = None,
                  affinity: Array | None = None
                  ) -> tuple[Params, dict[int | str, str], dict[str, Any]]:
    """Insert one batch of long-form edits.

    stats[layer] is E[kkᵀ] (MEMIT) or P (AlphaEdit); UnKE needs `preservation` instead.
    Returns (edited params, {case_id: message} of edits dropped because their shift loss went
    non-finite, diagnostics). A failed solve raises, naming the layer and the requests.
    """
    batch = parallel.put_batch(pack_windows(edits, pad_id))
    result = parallel.to_host(optimise_windows(params, cfg, batch, config.target, config.window,
                                               affinity))
    failures = check_windows_finite(result, tuple(x.case_id for x in edits))
    kept = [i for i, x in enumerate(edits) if x.case_id not in failures]
    diagnostics = shift_diagnostics(result, kept)
    if not kept:
        return params, failures, diagnostics
    edited, residuals = _update(params, cfg, [edits[i] for i in kept],
                                np.asarray(result.targets)[kept], stats, config, pad_id,
                                preservation)
    if residuals:
        diagnostics["relative_residual"] = residuals
    diagnostics["windows"] = window_diagnostics(params, edited, cfg, batch, result, config,
                                                [edits[i] for i in kept], kept)
    return edited, failures, diagnostics


def _update(params: Params, cfg: ModelConfig, edits: Sequence[EncodedEdit], targets: np.ndarray,
            stats: Mapping[int, Array], config: UnstructuredConfig, pad_id: int,
            preservation: downstream.Contexts | None) -> tuple[Params, dict[int, float]]:
    """The weight update writing m* [E, N, D] of the edits' windows: (edited params, the
    relative residual of each layer's solve; none for UnKE's regression)."""
    targets = targets[:, :max(len(x.windows) for x in edits)]
    sites = key_sites(edits, config.one_for_all, pad_id)
    ids = [x.case_id for x in edits]
    if config.solver == "unke":
        if preservation is None:
            raise ValueError("UnKE's regression needs preservation contexts (Alpaca samples)")
        params, _ = downstream.unke_edit(
            params, cfg, layers=config.layers,
            edit=downstream.Contexts(to_device(sites.tokens), to_device(sites.mask)),
            positions=to_device(sites.positions), valid=to_device(sites.valid),
            targets=to_device(targets), preserve=preservation, hparams=config.unke,
            request_ids=ids)
        return params, {}
    solver = registry.structured_solver_factory(config.solver)(config)
    readout = closed_form_readout(cfg, sites, config.layers[-1],
                                  config.in_context_preservation and not config.one_for_all)
    states = downstream.init_states(solver, config.layers, cfg.d_ff, cfg.d_model)
    flat_targets = to_device(targets[np.nonzero(sites.valid)])
    params, _, reports = downstream.edit_layers(
        params, down_proj_path(cfg), solver, stats, states, flat_targets, readout,
        layers=config.layers, request_ids=ids)
    return params, {layer: float(r.solve.rel_residual) for layer, r in reports.items()}


def _window_probs(nll_r: np.ndarray, bounds: Sequence[tuple[int, int]]) -> list[float]:
    """exp(−mean token NLL) over each [start, end) of the target."""
    return [float(np.exp(-nll_r[a:b].mean())) for a, b in bounds]


def window_diagnostics(params: Params, edited: Params, cfg: ModelConfig, batch: WindowBatch,
                       result: WindowResult, config: UnstructuredConfig,
                       edits: Sequence[EncodedEdit], rows: Sequence[int]) -> list[dict[str, Any]]:
    """Per edit, per window (teacher-forced on the target; "prob": exp(−mean token NLL)):
    the probability the unedited model gives ("prob_before"), with every δ* injected ("prob_
    with_delta", what the shifts reached together), under the edited weights alone
    ("prob_edited"); ‖δ‖ against its clamp radius; and the share of δ the edited layer l_WM
    now realises at the window's position ("realised": ⟨h_edited − h, δ⟩/‖δ‖²; 1 when the
    update wrote all of m*, 0 when it changed nothing there). The same three probabilities
    over the whole target ("answer_prob_*") tell "the shifts never reached the answer" from
    "the update did not carry them" (One-for-All has one window: the whole target)."""
    hp = config.target
    _, before = window_readings(params, cfg, batch, hp)
    _, with_delta = window_readings(params, cfg, batch, hp, to_device(result.delta))
    h_edited, after = window_readings(edited, cfg, batch, hp)
    before, with_delta, h_edited, after = parallel.to_host(
        (before, with_delta, h_edited, after))
    h, delta = np.asarray(result.h), np.asarray(result.delta)
    out = []
    for edit, e in zip(edits, rows, strict=True):
        n, m = len(edit.windows), len(edit.target_ids)
        d, moved = delta[e, :n], h_edited[e, :n] - h[e, :n]
        realised = (moved * d).sum(-1) / np.maximum((d * d).sum(-1), 1e-30)
        out.append({
            "case_id": edit.case_id, "windows": n,
            "prob_before": _window_probs(before[e], edit.windows),
            "prob_with_delta": _window_probs(with_delta[e], edit.windows),
            "prob_edited": _window_probs(after[e], edit.windows),
            "answer_prob_before": _window_probs(before[e], [(0, m)])[0],
            "answer_prob_with_delta": _window_probs(with_delta[e], [(0, m)])[0],
            "answer_prob_edited": _window_probs(after[e], [(0, m)])[0],
            "delta_norm": np.linalg.norm(d, axis=-1).tolist(),
            "clamp_radius": (hp.clamp_norm_factor * np.linalg.norm(h[e, :n], axis=-1)).tolist(),
            "realised": realised.tolist()})
    return out


def shift_diagnostics(result: WindowResult, rows: Sequence[int]) -> dict[str, Any]:
    """Per edit: the loss of every stage at its first and last step, and the Adam updates."""
    total = np.asarray(result.trace.total)
    return {"shift_loss_first": total[rows, :, 0].tolist(),
            "shift_loss_last": total[rows, :, -1].tolist(),
            "updates": np.asarray(result.updates)[rows].tolist()}
