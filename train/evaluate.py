"""`train eval SAMPLES.npz --ref REFERENCE.npz`: FID, IS, precision and recall.

The samples are an .npz with `arr_0` uint8 [N, H, W, 3] (what `train sample` writes, and
what the ADM suite reads). The reference is either an ADM reference batch (e.g.
VIRTUAL_imagenet256_labeled.npz: `mu`, `sigma` of the 50K-image ImageNet statistics plus
`arr_0`, 10K images for precision/recall) or any .npz of images (`arr_0`), whose
statistics are then computed here. Images are streamed from the zip in batches: 50K
samples at 256 px are 9.8 GB and never sit in memory at once.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from cache.tensors import read_npy_header

from .fid import (frechet_distance, gaussian_stats, inception_score, precision_recall,
                  reference_stats)
from .inception import FIDInception, InceptionWeightsError


FEATURES = 2048   # Inception pool_3: the width of every reference batch's mu and sigma
K = 3             # precision/recall's neighbour (ADM): more than K images on each side


class EvalError(ValueError):
    """Bad evaluation input; the message names the file and what is wrong."""


def npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist()]
    except (OSError, zipfile.BadZipFile) as e:
        raise EvalError(f"{path}: not a readable .npz ({e}); expected an .npz written by "
                        "numpy.savez (train sample writes one)") from e


def _read_header(f, path: Path, key: str) -> tuple[int, ...]:
    """The shape of the .npy member `f` after checking it holds C-order uint8 images
    [N >= 1, H >= 1, W >= 1, 3]; `f` is left at the first data byte."""
    try:
        shape, fortran, dtype = read_npy_header(f)
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
        raise EvalError(f"{path}: {key} is not a readable .npy array ({type(e).__name__}: "
                        f"{(str(e).splitlines() or [''])[0][:200]})") from None
    if (dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran
            or min(shape[1:3], default=0) < 1):
        raise EvalError(f"{path}: {key} is {dtype} {shape}; expected uint8 images "
                        "[N, H, W, 3] (the ADM layout)")
    if shape[0] == 0:
        raise EvalError(f"{path}: {key} holds no images")
    return shape


def image_count(path: Path, key: str = "arr_0") -> int:
    """N of the images [N, H, W, 3] in `key`, checked from the header alone."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        return _read_header(f, path, key)[0]


def iter_images(path: Path, batch: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """uint8 [b, H, W, 3] batches of an .npz array, read straight from the zip member."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        shape = _read_header(f, path, key)
        row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            try:
                data = f.read(n * row)
            except (OSError, EOFError, zipfile.BadZipFile) as e:   # a damaged member
                raise EvalError(f"{path}: {key} is damaged at image {start} "
                                f"({type(e).__name__}: {e})") from None
            if len(data) != n * row:
                raise EvalError(f"{path}: {key} is truncated at image {start}")
            yield np.frombuffer(data, np.uint8).reshape(n, *shape[1:])


@torch.no_grad()
def features(model: FIDInception, path: Path, batch: int,
             device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    pools, logits = [], []
    for images in iter_images(path, batch):
        p, lg = model(torch.from_numpy(images.copy()).to(device))
        pools.append(p.double().cpu().numpy())
        logits.append(lg.double().cpu().numpy())
    return np.concatenate(pools), np.concatenate(logits)


def _check_file(p: Path, what: str) -> None:
    if p.is_dir():
        raise EvalError(f"{what} {p} is a directory; expected an .npz file")
    if not p.is_file():
        raise EvalError(f"{what} {p} not found")


def evaluate_npz(samples: str | Path, ref: str | Path, *, inception: str | None = None,
                 random_weights: bool = False, batch_size: int = 100,
                 device: str | None = None, log=print) -> dict[str, Any]:
    """Every input is checked (names, shapes, dtypes, counts, the reference statistics)
    before the Inception network runs: a bad reference fails in seconds, not after 50K
    samples."""
    samples, ref = Path(samples), Path(ref)
    if batch_size < 1:
        raise EvalError(f"--batch-size {batch_size}: must be >= 1")
    _check_file(samples, "samples")
    _check_file(ref, "reference")
    s_keys, r_keys = npz_keys(samples), npz_keys(ref)
    if "arr_0" not in s_keys:
        raise EvalError(f"{samples} has no arr_0 (it has {s_keys}); `train sample` writes it")
    has_stats = {"mu", "sigma"} <= set(r_keys)
    if not has_stats and "arr_0" not in r_keys:
        raise EvalError(f"{ref} has neither mu/sigma nor arr_0 images (it has {r_keys}); "
                        "expected an ADM reference batch (mu, sigma[, arr_0]) or images")
    n_samples = image_count(samples)
    n_ref = image_count(ref) if "arr_0" in r_keys else None
    # precision/recall (whenever the reference has images) need more than K images on
    # each side; FID's covariance needs 2
    need, why = ((K + 1, f"precision/recall (k={K}) need at least {K + 1}") if n_ref
                 else (2, "FID's covariance needs at least 2"))
    for p, n in ((samples, n_samples), (ref, n_ref)):
        if n is not None and n < need:
            raise EvalError(f"{p}: arr_0 holds {n} image(s); {why}")
    mu_r = sigma_r = None
    if has_stats:
        try:
            mu_r, sigma_r = reference_stats(ref, dim=FEATURES)
        except (ValueError, FileNotFoundError) as e:
            raise EvalError(str(e)) from None
    try:
        model = FIDInception(inception, random_weights=random_weights)
    except InceptionWeightsError as e:
        raise EvalError(str(e)) from e
    if model.warning:
        log(f"WARNING: {model.warning}")
    if random_weights:
        log("WARNING: random-init Inception (--random-weights): the numbers mean nothing")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(dev)

    pool, logits = features(model, samples, batch_size, dev)
    res: dict[str, Any] = {"samples": len(pool), "inception": model.source}
    ref_pool = features(model, ref, batch_size, dev)[0] if n_ref is not None else None
    if has_stats:
        res["reference"] = f"{ref.name} (mu, sigma)"
    else:
        mu_r, sigma_r = gaussian_stats(ref_pool)
        res["reference"] = f"{ref.name} ({len(ref_pool)} images)"
    res["fid"] = frechet_distance(*gaussian_stats(pool), mu_r, sigma_r)
    res["inception_score"] = inception_score(logits)
    if ref_pool is not None:
        res["precision"], res["recall"] = precision_recall(ref_pool, pool, k=K)
    return res
