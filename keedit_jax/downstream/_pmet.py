"""PMET's weight update (Li et al. 2024, "PMET: Precise Model Editing in a Transformer",
AAAI 2024, arXiv 2308.08742), written on MEMIT's closed form.

PMET's two changes to MEMIT (the paper's "Optimizing TC hidden states" and "Updating
weights"; its Figure 1 (b)):

1. Upstream, the last critical layer L gets two shifts instead of one on the residual stream:
   δ_a on the multi-head self-attention output and δ_m on the FFN output (the "TC", Transformer
   Component, hidden states), optimised jointly under MEMIT's objective (NLL of the target +
   KL on "{subject} is a" + weight decay, each δ with its own ‖δ‖/‖h‖² decay and its own
   norm clamp c·‖h‖). That is the shared loop with `TargetConfig.sites = ("attn_out",
   "mlp_out")` (the registry record's `sites`): nothing PMET-specific lives upstream.
2. Only the FFN target m* = m^L + δ_m is inserted: the MHSA weights are never changed (the
   paper finds MHSA encodes general knowledge-extraction patterns). Every critical layer l's
   FFN output weights solve MEMIT's normal equations with the key second moment C^l,

       (λ C^l + K^lᵀ K^l) ΔW^l = K^lᵀ R^l,     R^l = (M* − M^L) / √(n − i),

   in our orientation (W [F, D], keys rows K^l [E, F]; see `_memit`), where M^L is the FFN
   output of layer L at the lookup tokens under the weights edited so far, i the 0-based
   index of l among the n critical layers. MEMIT divides by n − i (the residual spread evenly
   over the remaining layers); PMET's square-root spread hands each earlier layer a larger
   share, and the last layer still takes what remains (√1 = 1).

Where the paper and the authors' code meet, the code decides the details (read for behaviour,
not translated): the residual is taken at the FFN output of the last critical layer L (not
at layer l), measured after the earlier layers' updates, and divided by √(n − i) with i
counted from 0 (xpq-tech/PMET and zjunlp/EasyEdit `pmet_main.py`). Because the earlier
layers' updates reach L's FFN output only through L's own MLP, M^L barely moves before L is
solved, and the earlier layers together add more than δ_m to the residual stream at L: that
over-insertion is PMET's, kept here.
"""

from __future__ import annotations

import math
from typing import Any

import jax

from keedit_jax.downstream._layers import Solver, in_solve_dtype, memit

Array = jax.Array


def sqrt_spread_residual(targets: Array, outputs: Array, index: int, n_layers: int) -> Array:
    """(targets − outputs) / √(n_layers − index): PMET's share of the remaining residual for
    the `index`-th (0-based) of `n_layers` critical layers (MEMIT's: / (n_layers − index))."""
    if not 0 <= index < n_layers:
        raise IndexError(f"layer index {index} is outside 0..{n_layers - 1}")
    return (targets - outputs) / math.sqrt(n_layers - index)


def pmet(solver: Solver) -> Solver:
    """A MEMIT-family solver inserting FFN-output targets with the square-root spread."""
    return solver._replace(name="pmet", spread=sqrt_spread_residual, target_site="mlp_out")


def structured_solver(config: Any) -> Solver:
    """PMET from a `methods.structured.StructuredConfig`: MEMIT's λ and solve dtype (its
    `memit` hyperparameters, --mom2_update_weight and --solve_dtype), FFN targets, √ spread."""
    return pmet(in_solve_dtype(memit(config.memit), config.memit.dtype))
