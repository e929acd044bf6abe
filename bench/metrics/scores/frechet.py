"""Fréchet distance between two Gaussians, float64 and symmetric-eigen based (docs/metrics.md §4.2).

    d² = ‖μ₁−μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr √(Σ₁Σ₂)

The trace of the matrix square root is the sum of √λ over the eigenvalues λ of Σ₁Σ₂. Those are the eigenvalues
of any symmetric matrix congruent to it, so we never form the non-symmetric product and never call
``scipy.linalg.sqrtm`` (slow, and its ``disp`` argument is gone in scipy >= 1.18, pitfall P4):

* ``cholesky`` (default): Σ₁ = L Lᵀ, then eig(Σ₁Σ₂) = eig(Lᵀ Σ₂ L). One Cholesky and one ``eigvalsh``. If Σ₁ is
  only semidefinite (N ≤ d samples), the roles swap (tr √(Σ₁Σ₂) = tr √(Σ₂Σ₁)) and Σ₂ is factored instead.
* ``eigh`` (the textbook route, and the fallback when neither is positive definite): Σ₁ = V diag(w) Vᵀ with w
  clipped at 0, A = Σ₁^{1/2}, eig(Σ₁Σ₂) = eig(A Σ₂ A). About twice the cost of ``cholesky``.

Both clip eigenvalues below zero (rounding, rank deficiency; pitfall P6) and report the most negative one.
The library formulas (sqrtm, general ``eigvals``) live in ``frechet_oracles`` for tests only.
"""

from __future__ import annotations

import dataclasses
import warnings

import numpy as np

METHODS = ("cholesky", "eigh")


@dataclasses.dataclass(frozen=True)
class FrechetResult:
    """A Fréchet distance and the numbers that explain it."""

    value: float
    mean_term: float
    trace_sigma1: float
    trace_sigma2: float
    trace_sqrt_product: float
    method: str
    min_eig_product: float
    """Most negative raw eigenvalue of the symmetrised product before clipping (≈ 0 is healthy)."""
    min_eig_sigma1: float | None = None
    min_eig_sigma2: float | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def symmetrize(sigma: np.ndarray) -> np.ndarray:
    return (sigma + sigma.T) * 0.5


def _check_pair(mu1, sigma1, mu2, sigma2) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    mu1 = np.atleast_1d(np.asarray(mu1, dtype=np.float64))
    mu2 = np.atleast_1d(np.asarray(mu2, dtype=np.float64))
    sigma1 = np.atleast_2d(np.asarray(sigma1, dtype=np.float64))
    sigma2 = np.atleast_2d(np.asarray(sigma2, dtype=np.float64))
    d = mu1.shape[0]
    if mu1.ndim != 1 or mu2.shape != (d,):
        raise ValueError(f"mean vectors must be 1-D of equal length, got {mu1.shape} and {mu2.shape}")
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be {d}x{d} to match the means, got {sigma1.shape} and {sigma2.shape}")
    for name, arr in (("mu1", mu1), ("mu2", mu2), ("sigma1", sigma1), ("sigma2", sigma2)):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"{name} contains non-finite values")
    return mu1, symmetrize(sigma1), mu2, symmetrize(sigma2)


def _product_eigs_cholesky(sigma1: np.ndarray, sigma2: np.ndarray) -> np.ndarray:
    lower = np.linalg.cholesky(sigma1)  # raises LinAlgError unless Σ₁ is numerically positive definite
    congruent = lower.T @ sigma2 @ lower
    return np.linalg.eigvalsh(symmetrize(congruent))


def _product_eigs_eigh(sigma1: np.ndarray, sigma2: np.ndarray) -> tuple[np.ndarray, float]:
    w, v = np.linalg.eigh(sigma1)
    root = (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T
    congruent = root @ sigma2 @ root
    return np.linalg.eigvalsh(symmetrize(congruent)), float(w.min())


def min_eigenvalue(sigma: np.ndarray) -> float:
    """Smallest eigenvalue of a symmetric matrix (a diagnostic for rank deficiency, pitfall P6)."""
    return float(np.linalg.eigvalsh(symmetrize(np.asarray(sigma, dtype=np.float64)))[0])


def frechet_distance(
    mu1: np.ndarray,
    sigma1: np.ndarray,
    mu2: np.ndarray,
    sigma2: np.ndarray,
    *,
    method: str = "cholesky",
    sigma_eigs: bool | str = False,
    eps_fallback: float | None = None,
) -> FrechetResult:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2), all arithmetic in float64.

    ``method`` picks the congruence (module docstring); ``cholesky`` falls back to ``eigh`` when Σ₁ is not
    positive definite. ``sigma_eigs`` also reports the covariances' smallest eigenvalues: ``True``/``"both"``, or
    ``"first"`` for Σ₁ only (each costs an ``eigvalsh`` unless the eigh route already had it). ``eps_fallback``
    copies ADM's rule: only when the result is non-finite, add eps·I to both covariances and retry. No eps is ever
    added otherwise.
    """
    if method not in METHODS:
        raise ValueError(f"unknown Fréchet method {method!r}; choose one of {METHODS}")
    if sigma_eigs not in (False, True, "first", "both"):
        raise ValueError(f"sigma_eigs must be False, True, 'first' or 'both', got {sigma_eigs!r}")
    mu1, sigma1, mu2, sigma2 = _check_pair(mu1, sigma1, mu2, sigma2)
    used = method
    min_eig_sigma1 = None
    if method == "cholesky":
        try:
            eigs = _product_eigs_cholesky(sigma1, sigma2)
        except np.linalg.LinAlgError:
            try:
                eigs, used = _product_eigs_cholesky(sigma2, sigma1), "cholesky_swapped"
            except np.linalg.LinAlgError:
                used = "eigh"
    if used == "eigh":
        eigs, min_eig_sigma1 = _product_eigs_eigh(sigma1, sigma2)
    tr_sqrt = float(np.sqrt(np.clip(eigs, 0.0, None)).sum())
    diff = mu1 - mu2
    mean_term = float(diff @ diff)
    tr1, tr2 = float(np.trace(sigma1)), float(np.trace(sigma2))
    value = mean_term + tr1 + tr2 - 2.0 * tr_sqrt
    if not np.isfinite(value) and eps_fallback:
        warnings.warn(f"Fréchet distance is not finite; adding {eps_fallback}·I to both covariances (ADM rule)")
        offset = np.eye(len(mu1)) * eps_fallback
        return frechet_distance(mu1, sigma1 + offset, mu2, sigma2 + offset, method="eigh", sigma_eigs=sigma_eigs)
    if sigma_eigs and min_eig_sigma1 is None:
        min_eig_sigma1 = min_eigenvalue(sigma1)
    return FrechetResult(
        value=value,
        mean_term=mean_term,
        trace_sigma1=tr1,
        trace_sigma2=tr2,
        trace_sqrt_product=tr_sqrt,
        method=used,
        min_eig_product=float(eigs.min()),
        min_eig_sigma1=min_eig_sigma1 if sigma_eigs else None,
        min_eig_sigma2=min_eigenvalue(sigma2) if sigma_eigs in (True, "both") else None,
    )


def frechet_from_features(x: np.ndarray, y: np.ndarray, **kwargs) -> FrechetResult:
    """FD between two feature matrices (rows are samples), with np.mean / np.cov (ddof=1) in float64."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    return frechet_distance(x.mean(0), np.cov(x, rowvar=False), y.mean(0), np.cov(y, rowvar=False), **kwargs)
