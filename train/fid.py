"""The metrics of the ADM evaluation suite on Inception features (methods.md section 5);
the network is in train/inception.py, the command in train/evaluate.py.

    FID = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2))      (pool_3 features)
    IS  = exp E_x KL(p(y|x) || p(y)), averaged over splits of 5000 (as ADM)
    precision / recall (Kynkaenniemi et al. 2019, k = 3 as ADM): the fraction of samples
        inside the reference manifold (the union of balls reaching each reference point's
        3rd nearest reference neighbour), and of references inside the samples' manifold

Tr((S_1 S_2)^(1/2)) is computed as the sum of square roots of the eigenvalues of the
symmetric PSD matrix S_1^(1/2) S_2 S_1^(1/2) (same spectrum as S_1 S_2), in float64:
no complex parts to discard, unlike a general matrix square root.
"""

from __future__ import annotations

import zipfile
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
    fid = ((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_covmean
    return max(float(fid), 0.0)  # >= 0; rounding can leave -1e-12 for identical inputs


def _read_array(z, p: Path, key: str, want: str) -> np.ndarray:
    """z[key] of an open .npz, never unpickled: object arrays are refused."""
    try:
        return z[key]
    except ValueError as e:
        if "allow_pickle" in str(e):
            raise ValueError(f"{p}: {key} is an array of pickled Python objects (refused: "
                             f"loading it could run code); expected {want}") from None
        raise ValueError(f"{p}: {key} is unreadable ({e}); expected {want}") from None
    except (OSError, EOFError, zipfile.BadZipFile) as e:   # a damaged member
        raise ValueError(f"{p}: {key} is unreadable ({type(e).__name__}: {e}); expected "
                         f"{want}") from None


def reference_stats(path: str | Path, dim: int | None = None
                    ) -> tuple[np.ndarray, np.ndarray]:
    """`mu` [D], `sigma` [D, D] of an ADM reference batch (e.g. VIRTUAL_imagenet256_labeled
    .npz: D = 2048, Inception pool_3), finite floats, each checked before use (D = `dim`
    when given). Raises FileNotFoundError or ValueError naming the file and the key."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(
            f"reference batch {p} not found; the ADM suite's ImageNet 256 batch is "
            "VIRTUAL_imagenet256_labeled.npz from openai/guided-diffusion's evaluations")
    n = dim or "D"
    want = {"mu": f"float [{n}]", "sigma": f"float [{n}, {n}]"}
    try:
        z = np.load(p, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise ValueError(f"{p}: not a readable .npz ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:200]}); expected an ADM reference "
                         "batch with mu and sigma") from None
    if not isinstance(z, np.lib.npyio.NpzFile):   # np.load also reads .npy and pickles
        raise ValueError(f"{p}: a single .npy array, not an .npz; expected an ADM reference "
                         "batch with mu and sigma")
    with z:
        missing = [k for k in ("mu", "sigma") if k not in z.files]
        if missing:
            raise ValueError(f"{p} has no {missing} (it has {z.files}); pass a reference "
                             "batch with Inception statistics, or images to compute them")
        mu, sigma = (_read_array(z, p, k, want[k]) for k in ("mu", "sigma"))
    d = dim or (mu.shape[0] if mu.ndim == 1 else None)   # sigma is checked against mu
    want["sigma"] = f"float [{d or 'D'}, {d or 'D'}]"
    for key, a, shape in (("mu", mu, (d,)), ("sigma", sigma, (d, d))):
        if a.dtype.kind != "f" or a.shape != shape:
            raise ValueError(f"{p}: {key} is {a.dtype} {list(a.shape)}; expected {want[key]}"
                             + (" (Inception pool_3 statistics)" if dim else ""))
    for key, a in (("mu", mu), ("sigma", sigma)):
        if not np.isfinite(a).all():
            raise ValueError(f"{p}: {key} holds {int((~np.isfinite(a)).sum())} NaN/Inf "
                             "values; expected finite statistics")
    return mu, sigma


def inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """Mean over consecutive splits of exp(mean KL(p(y|x) || p(y)))."""
    x = np.asarray(logits, np.float64)
    p = np.exp(x - x.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    scores = []
    for i in range(0, len(p), split_size):
        part = p[i:i + split_size]
        marginal = part.mean(axis=0, keepdims=True)
        kl = (part * (np.log(part + 1e-30) - np.log(marginal + 1e-30))).sum(axis=1)
        scores.append(float(np.exp(kl.mean())))
    return float(np.mean(scores))


def _kth_radii(feats, k: int, chunk: int):
    """Squared distance from each point to its k-th nearest other point."""
    import torch
    radii = []
    for i in range(0, len(feats), chunk):
        d = torch.cdist(feats[i:i + chunk], feats).square()
        radii.append(d.kthvalue(k + 1, dim=1).values)   # the 1st is the point itself
    return torch.cat(radii)


def _inside(points, centres, radii, chunk: int):
    import torch
    hits = []
    for i in range(0, len(points), chunk):
        d = torch.cdist(points[i:i + chunk], centres).square()
        hits.append((d <= radii[None]).any(dim=1))
    return torch.cat(hits)


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = 3,
                     chunk: int = 2048) -> tuple[float, float]:
    """Improved precision and recall of `fake` features against `real` ones (float64,
    chunked cdist: 50K x 10K features need no more than chunk x N distances at once)."""
    import torch
    r = torch.as_tensor(np.asarray(real), dtype=torch.float64)
    f = torch.as_tensor(np.asarray(fake), dtype=torch.float64)
    if min(len(r), len(f)) <= k:
        raise ValueError(f"precision/recall need more than k={k} points on each side, got "
                         f"{len(r)} reference and {len(f)} samples")
    precision = _inside(f, r, _kth_radii(r, k, chunk), chunk).double().mean()
    recall = _inside(r, f, _kth_radii(f, k, chunk), chunk).double().mean()
    return float(precision), float(recall)
