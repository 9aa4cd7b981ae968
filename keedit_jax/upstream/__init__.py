"""Upstream: memory-shift objectives and the one optimisation loop (DESIGN "One edit, as data").

- `TargetConfig`: the `compute_z` hyperparameters (anchors §2.1 defaults).
- `ContextConfig`: seeds and length of the generated context prefixes (anchors §1).
- `context_templates`: "{}" plus seeded, model-generated prefixes (anchors §1).
- `encode_requests`: requests -> `ShiftBatch` (tokens, lookup positions, token weights, KL rows).
- `optimise_shifts`: the compiled loop -> `ShiftResult` (δ, h, m* = h + δ, per-step trace).
- `shift_diagnostics`: per request, loss and target probability first/last, stop step,
  ‖δ‖ against its clamp; `unshifted_target_prob`: the same probability after an edit.
- `check_finite`: raise on the host, naming the request and step, if a loss went non-finite.
- `compute_targets`: MEMIT's target step, all of the above in one call.

Long-form (UnKE, AnyEdit, μKE): `windows` (window bounds and every strategy's token weights),
`longform` (requests -> `WindowBatch`), `affinity` (μKE's Eq. 12 with vmap'd figure
gradients), `windowed.optimise_windows` (the strategies on the shared loop, one program).
"""

from keedit_jax.upstream.config import ContextConfig, TargetConfig
from keedit_jax.upstream.encode import (
    EncodedRequests,
    EncodingError,
    ShiftBatch,
    encode_requests,
    encoding_failures,
    prompt_and_lookup,
    target_ids,
)
from keedit_jax.upstream.loop import (
    LossTerms,
    NonFiniteShiftError,
    ShiftResult,
    check_finite,
    evaluate_shift,
    optimise_shifts,
    safe_norm,
    shift_diagnostics,
    unshifted_target_prob,
)
from keedit_jax.upstream.memit import compute_targets
from keedit_jax.upstream.templates import context_templates

__all__ = [
    "ContextConfig",
    "EncodedRequests",
    "EncodingError",
    "LossTerms",
    "NonFiniteShiftError",
    "ShiftBatch",
    "ShiftResult",
    "TargetConfig",
    "check_finite",
    "compute_targets",
    "context_templates",
    "encode_requests",
    "encoding_failures",
    "evaluate_shift",
    "optimise_shifts",
    "prompt_and_lookup",
    "safe_norm",
    "shift_diagnostics",
    "target_ids",
    "unshifted_target_prob",
]
