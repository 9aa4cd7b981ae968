"""AlphaEdit's null-space projector P from the normalised second moment (anchors §4,
docs/references.md: ote_se §2.2).

P = U₀ U₀ᵀ, where U₀ holds the eigenvectors of E[k kᵀ] whose eigenvalue is below an
**absolute** threshold (2e-2 in every released config). The reference takes a full SVD of the
float32 moment; since E[k kᵀ] is symmetric PSD, `eigh` gives the same subspace more cheaply,
here in float64 on the host so that eigenvalues near the threshold are classified exactly.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from keedit_jax.stats._cache import Log, Metadata, load_arrays, save_arrays
from keedit_jax.stats._moments import SecondMoment

_README = ("layer_<l>.null_basis_fr: eigenvectors U0 of E[k k^T] = sum_ff / count with "
           "eigenvalue < threshold; AlphaEdit's projector is P = U0 U0^T. "
           "layer_<l>.eigenvalues_f: the full ascending spectrum.")
NULLSPACE_THRESHOLD = 2e-2  # AlphaEdit's nullspace_threshold for GPT-2 XL, GPT-J, Llama3, Qwen2.5


@dataclasses.dataclass(frozen=True, kw_only=True)
class NullSpace:
    """The eigenvectors of E[k kᵀ] kept for P (basis_fr [F, R]) and the full spectrum.

    Storing U₀ rather than P keeps R/F of the memory (~70% for Llama-3, issue AlphaEdit#12).
    """

    basis_fr: np.ndarray
    eigenvalues_f: np.ndarray
    threshold: float

    def projector(self, dtype: np.dtype | type = np.float32) -> np.ndarray:
        """P = U₀ U₀ᵀ [F, F]: symmetric, idempotent, zero on the preserved keys' subspace."""
        basis = self.basis_fr.astype(np.float64)
        return (basis @ basis.T).astype(dtype)


def null_space(moment: SecondMoment | np.ndarray,
               threshold: float = NULLSPACE_THRESHOLD) -> NullSpace:
    """Eigenvectors of the normalised moment (sum / count, or a given [F, F] mean) with
    eigenvalue < threshold."""
    mean = moment.mean() if isinstance(moment, SecondMoment) else np.asarray(moment)
    if mean.ndim != 2 or mean.shape[0] != mean.shape[1]:
        raise ValueError(f"the null space needs a square moment, got shape {mean.shape}")
    mean = mean.astype(np.float64)
    eigenvalues, vectors = np.linalg.eigh((mean + mean.T) / 2)  # ascending
    kept = eigenvalues < threshold
    return NullSpace(basis_fr=vectors[:, kept], eigenvalues_f=eigenvalues,
                     threshold=float(threshold))


def null_space_projector(moment: SecondMoment | np.ndarray,
                         threshold: float = NULLSPACE_THRESHOLD,
                         dtype: np.dtype | type = np.float32) -> np.ndarray:
    """AlphaEdit's P [F, F] for one layer."""
    return null_space(moment, threshold).projector(dtype)


def load_or_compute_null_spaces(moments: Mapping[int, SecondMoment], stats: Metadata, *,
                                path: str | Path, threshold: float = NULLSPACE_THRESHOLD,
                                log: Log = print) -> dict[int, NullSpace]:
    """Null spaces of every layer, cached at `path` with the statistics' metadata plus the
    threshold: P depends only on the base model, layers, text and threshold (EasyEdit #502)."""
    expected = {**stats, "kind": "null_space", "threshold": float(threshold),
                "normalisation": "sum_ff / count"}
    cached = load_arrays(path, expected, log)
    if cached is not None:
        arrays = cached[0]
        try:
            return {index: NullSpace(basis_fr=arrays[f"layer_{index}.null_basis_fr"],
                                     eigenvalues_f=arrays[f"layer_{index}.eigenvalues_f"],
                                     threshold=float(threshold)) for index in moments}
        except KeyError as error:
            log(f"cache file {path} lacks {error}; rebuilding")
    spaces = {index: null_space(moment, threshold) for index, moment in moments.items()}
    arrays = {}
    for index, space in spaces.items():
        arrays[f"layer_{index}.null_basis_fr"] = space.basis_fr
        arrays[f"layer_{index}.eigenvalues_f"] = space.eigenvalues_f
    save_arrays(path, arrays, expected, readme=_README)
    log(f"null spaces of layers {sorted(spaces)} saved to {path}")
    return spaces
