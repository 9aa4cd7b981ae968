"""float32 against float64 MEMIT solves at Llama-3-8B's down-projection shapes (issue 19).

MEMIT's system (λC + KᵀK) ΔW = KᵀR at d_ff F = 14336, d_model D = 4096, n = 50 edit keys,
λ = 15000 (MEMIT's Llama-3-8B mom2_update_weight), solved by `downstream.memit_update` once with
MemitHParams(dtype="float32") and once with dtype="float64" (x64 on, as `downstream.in_float64`
runs every float64 solve of the library).

The keys are drawn from the second moment they are solved against: C = Q diag(σ) Qᵀ with σ_i =
(i + 1)^-α (a power-law spectrum, α = `--decay`, cond(C) = F^α) and Q the orthonormal DCT-II
basis (a dense orthogonal matrix applied in O(F² log F), where a random orthogonal one would need
an F³ QR), and k = Q (√σ ⊙ z), z ~ N(0, I), so E[kkᵀ] = C. The overall scale of the keys and of
R does not matter (the system is homogeneous in both). C enters both solves in float32, as the
library hands statistics to its solvers (`run_structured.solver_statistics`), so the figure is
the solve's precision alone. R [n, D] ~ N(0, 1).

Reported: ‖ΔW32 − ΔW64‖/‖ΔW64‖; the same difference in what the layer writes at the edit keys,
‖K(ΔW32 − ΔW64)‖/‖KΔW64‖, and at 256 fresh keys from the same distribution (the inputs the
edit should leave alone, where C-weighted errors show); each solve's own relative residual
(the solver report's ‖AX − Kᵀ‖/‖Kᵀ‖ in its dtype); the float64 residual of each ΔW,
‖AΔW − KᵀR‖/‖KᵀR‖ with A in float64, estimated on `--probes` random directions of R's columns
(‖(AΔW − KᵀR)V‖/‖KᵀRV‖, V [D, probes] Gaussian, so no F×F×D product is needed); and each
solve's seconds (compiled ahead, compile excluded).
F×F float64 is 1.6 GB; the run holds a few such arrays at a time (about 6 GB peak).

Run:  python -m benchmarks.solve_precision                    (Llama-3-8B shapes, CPU: minutes)
      python -m benchmarks.solve_precision --d_ff 2048 --d_model 512     (a quick check)
      python -m benchmarks.solve_precision --spectra <stats cache .npz>    (a real model's α)
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import scipy.fft

from keedit_jax import downstream


def second_moment_and_keys(d_ff: int, n: int, decay: float, seed: int, moment: bool = True
                           ) -> tuple[np.ndarray | None, np.ndarray]:
    """C = Q diag(σ) Qᵀ [F, F] in float32 (None without `moment`) and keys K [n, F] ~ N(0, C)
    in float64."""
    sigma = (np.arange(d_ff, dtype=np.float64) + 1.0) ** -decay
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d_ff))
    keys = scipy.fft.dct(z * np.sqrt(sigma), axis=1, norm="ortho")  # rows Q(√σ ⊙ z)
    if not moment:
        return None, keys
    c = scipy.fft.dct(np.diag(sigma), axis=0, norm="ortho")          # Q diag(σ)
    c = scipy.fft.dct(c, axis=1, norm="ortho").astype(np.float32)   # Q diag(σ) Qᵀ
    return c, keys


def solve(c: np.ndarray, keys: np.ndarray, resid: np.ndarray, lam: float,
          dtype: str) -> tuple[np.ndarray, float, float]:
    """ΔW [F, D] as float64 numpy, the solver report's relative residual, and the seconds of
    the solve: `memit_update` jitted with an empty key Gram (MEMIT's one-time edit), x64 on
    for float64; only ΔW and the report are returned, so XLA keeps two F×F arrays live, not
    the five an eager call would."""
    hparams = downstream.MemitHParams(mom2_update_weight=lam, dtype=dtype)

    def update(c: jax.Array, k: jax.Array, r: jax.Array) -> tuple[jax.Array, jax.Array]:
        state = downstream.memit_init(c.shape[0], jnp.dtype(dtype))
        delta, _, report = downstream.memit_update(c, k, r, state, hparams)
        return delta, report.rel_residual

    with jax.enable_x64(dtype == "float64"):
        dt = np.float64 if dtype == "float64" else np.float32
        args = (jnp.asarray(c), jnp.asarray(keys.astype(dt)), jnp.asarray(resid.astype(dt)))
        compiled = jax.jit(update).lower(*args).compile()
        began = time.perf_counter()
        delta, rel_residual = jax.block_until_ready(compiled(*args))
        seconds = time.perf_counter() - began
    return np.asarray(delta, np.float64), float(rel_residual), seconds


def float64_residual(c: np.ndarray, keys: np.ndarray, resid: np.ndarray, lam: float,
                     deltas: dict[str, np.ndarray], probes: int, seed: int) -> dict[str, float]:
    """‖(AΔW − KᵀR)V‖/‖KᵀRV‖ with A = λC + KᵀK in float64, for each ΔW."""
    v = np.random.default_rng(seed + 1).standard_normal((resid.shape[1], probes))
    a = lam * c.astype(np.float64)
    a += keys.T @ keys
    rhs = keys.T @ (resid @ v)
    out = {name: float(np.linalg.norm(a @ (d @ v) - rhs) / np.linalg.norm(rhs))
           for name, d in deltas.items()}
    del a
    return out


def measure(d_ff: int, d_model: int, n: int, lam: float, decay: float, probes: int,
            seed: int) -> dict[str, Any]:
    c, keys = second_moment_and_keys(d_ff, n, decay, seed)
    resid = np.random.default_rng(seed + 2).standard_normal((n, d_model))
    timings, reports, deltas = {}, {}, {}
    for dtype in ("float32", "float64"):
        deltas[dtype], reports[dtype], timings[dtype] = solve(c, keys, resid, lam, dtype)
    d32, d64 = deltas["float32"], deltas["float64"]
    written = keys @ (d32 - d64), keys @ d64
    _, fresh = second_moment_and_keys(d_ff, 256, decay, seed + 3, moment=False)
    elsewhere = fresh @ (d32 - d64), fresh @ d64
    return {
        "shapes": {"d_ff": d_ff, "d_model": d_model, "n": n},
        "lambda": lam, "decay": decay, "cond_C": float((d_ff) ** decay), "seed": seed,
        "rel_diff_delta": float(np.linalg.norm(d32 - d64) / np.linalg.norm(d64)),
        "rel_diff_written_at_keys": float(np.linalg.norm(written[0])
                                          / np.linalg.norm(written[1])),
        "rel_diff_on_fresh_keys": float(np.linalg.norm(elsewhere[0])
                                        / np.linalg.norm(elsewhere[1])),
        "report_rel_residual": reports,
        "float64_rel_residual": float64_residual(c, keys, resid, lam, deltas, probes, seed),
        "seconds": timings, "backend": jax.default_backend(),
    }


def moment_spectra(path: Path) -> dict[str, dict[str, float]]:
    """For a statistics cache file (`keedit_jax.stats`, `second_moments_*.npz`): each layer's
    cond(C) and the power-law α fitted to its eigenvalues between the 10th and the 90% one,
    the two numbers that place a real model among the `--decay` settings."""
    arrays = np.load(path)
    count = float(np.ravel(arrays["count"])[0])
    out = {}
    for name in sorted(k for k in arrays if k.endswith(".sum_ff")):
        eig = np.sort(np.linalg.eigvalsh(arrays[name].astype(np.float64) / count))[::-1]
        index = np.arange(1, len(eig) + 1)
        part = slice(10, int(0.9 * len(eig)))
        alpha = -np.polyfit(np.log(index[part]), np.log(eig[part]), 1)[0]
        out[name.removesuffix(".sum_ff")] = {"d_ff": len(eig), "cond_C": float(eig[0] / eig[-1]),
                                             "alpha": float(alpha)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--d_ff", type=int, default=14336)
    parser.add_argument("--d_model", type=int, default=4096)
    parser.add_argument("--n", type=int, default=50)
    parser.add_argument("--lam", type=float, default=15000.0)
    parser.add_argument("--decay", type=float, default=1.0,
                        help="α of the spectrum σ_i = (i + 1)^-α of C (cond(C) = d_ff^α)")
    parser.add_argument("--probes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    parser.add_argument("--spectra", type=Path, default=None,
                        help="only report cond(C) and α of a statistics cache file's layers")
    args = parser.parse_args()
    if args.spectra is not None:
        print(json.dumps(moment_spectra(args.spectra), indent=1))
        return
    result = measure(args.d_ff, args.d_model, args.n, args.lam, args.decay, args.probes,
                     args.seed)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
