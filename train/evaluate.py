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

from .fid import frechet_distance, gaussian_stats, inception_score, precision_recall
from .inception import FIDInception, InceptionWeightsError


class EvalError(ValueError):
    """Bad evaluation input; the message names the file and what is wrong."""


def npz_keys(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as zf:
            return [n.removesuffix(".npy") for n in zf.namelist()]
    except (OSError, zipfile.BadZipFile) as e:
        raise EvalError(f"{path}: not a readable .npz ({e})") from e


def iter_images(path: Path, batch: int, key: str = "arr_0") -> Iterator[np.ndarray]:
    """uint8 [b, H, W, 3] batches of an .npz array, read straight from the zip member."""
    with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
        version = np.lib.format.read_magic(f)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(f)
        if dtype != np.uint8 or len(shape) != 4 or shape[-1] != 3 or fortran:
            raise EvalError(f"{path}: {key} is {dtype} {shape}; expected uint8 images "
                            "[N, H, W, 3] (the ADM layout)")
        row = int(np.prod(shape[1:]))
        for start in range(0, shape[0], batch):
            n = min(batch, shape[0] - start)
            data = f.read(n * row)
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
    if not pools:
        raise EvalError(f"{path}: arr_0 holds no images")
    return np.concatenate(pools), np.concatenate(logits)


def evaluate_npz(samples: str | Path, ref: str | Path, *, inception: str | None = None,
                 random_weights: bool = False, batch_size: int = 100,
                 device: str | None = None, log=print) -> dict[str, Any]:
    samples, ref = Path(samples), Path(ref)
    for p in (samples, ref):
        if not p.is_file():
            raise EvalError(f"{p} not found")
    s_keys, r_keys = npz_keys(samples), npz_keys(ref)
    if "arr_0" not in s_keys:
        raise EvalError(f"{samples} has no arr_0 (it has {s_keys}); `train sample` writes it")
    has_stats = {"mu", "sigma"} <= set(r_keys)
    if not has_stats and "arr_0" not in r_keys:
        raise EvalError(f"{ref} has neither mu/sigma nor arr_0 images (it has {r_keys})")
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
    ref_pool = features(model, ref, batch_size, dev)[0] if "arr_0" in r_keys else None
    if has_stats:
        with np.load(ref) as z:
            mu_r, sigma_r = z["mu"], z["sigma"]
        res["reference"] = f"{ref.name} (mu, sigma)"
    else:
        mu_r, sigma_r = gaussian_stats(ref_pool)
        res["reference"] = f"{ref.name} ({len(ref_pool)} images)"
    if mu_r.shape != (pool.shape[1],):
        raise EvalError(f"{ref}: mu has shape {mu_r.shape}, not ({pool.shape[1]},): not "
                        "Inception pool_3 statistics")
    res["fid"] = frechet_distance(*gaussian_stats(pool), mu_r, sigma_r)
    res["inception_score"] = inception_score(logits)
    if ref_pool is not None:
        res["precision"], res["recall"] = precision_recall(ref_pool, pool)
    return res
