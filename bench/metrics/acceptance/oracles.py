"""Library-style Fréchet formulas, kept only as test oracles (docs/metrics.md §4.4).

They are deliberately the slow, general routes: the non-symmetric product Σ₁Σ₂ and either ``scipy.linalg.sqrtm``
(ADM / TTUR / clean-fid, without the ``disp`` argument that scipy >= 1.18 removed) or ``Σ Re √eigvals``
(torch-fidelity / torchmetrics).
"""

from __future__ import annotations

import numpy as np


def frechet_sqrtm(mu1, sigma1, mu2, sigma2) -> float:
    import scipy.linalg

    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    root = scipy.linalg.sqrtm(np.asarray(sigma1, np.float64) @ np.asarray(sigma2, np.float64))
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(root).real)


def frechet_eigvals(mu1, sigma1, mu2, sigma2) -> float:
    diff = np.asarray(mu1, np.float64) - np.asarray(mu2, np.float64)
    eigs = np.linalg.eigvals(np.asarray(sigma1, np.float64) @ np.asarray(sigma2, np.float64)).astype(np.complex128)
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.sqrt(eigs).real.sum())
