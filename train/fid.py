"""Frechet distance between Gaussian fits of Inception features (FID), and the ADM
reference batches' statistics (methods.md section 5). The Inception network itself
arrives with `train eval` (issue 5).

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))

Tr((S_1 S_2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
symmetric PSD matrix S_1^(1/2) S_2 S_1^(1/2) (same spectrum as S_1 S_2), in float64:
no complex parts to discard, unlike a general matrix square root.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean [D] and covariance [D, D] (unbiased, as the ADM suite) of features [N, D]."""
    f = np.asarray(features, dtype=np.float64)
    if f.ndim != 2 or len(f) < 2:
        raise ValueError(f"need features [N >= 2, D], got shape {f.shape}")
    return f.mean(axis=0), np.cov(f, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh(s)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray,
                     sigma2: np.ndarray) -> float:
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
        raise ValueError(f"shape mismatch: mu {mu1.shape} vs {mu2.shape}, "
                         f"sigma {s1.shape} vs {s2.shape}")
    a = _sqrt_psd((s1 + s1.T) / 2)
    m = a @ s2 @ a
    tr_covmean = np.sqrt(np.clip(np.linalg.eigvalsh((m + m.T) / 2), 0, None)).sum()
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean)


def reference_stats(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """`mu`, `sigma` of an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled.npz)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"reference batch {p} not found; the ADM suite's ImageNet 256 batch is "
            "VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion's evaluations")
    with np.load(p) as z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{p} has no {missing} (it has {z.files}); pass a reference "
                             "batch with Inception statistics, or images to compute them")
        return z["mu"], z["sigma"]
