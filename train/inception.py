"""The Inception network of FID, as the ADM evaluation suite runs it, in PyTorch.

The ADM suite (guided-diffusion's evaluator, which every REPA / U-REPA number uses) runs
TensorFlow's 2015 Inception graph: images in [0, 255] are resized to 299 x 299 by TF1's
bilinear resize (align_corners=False, no half-pixel centres), mapped by (x - 128) / 128,
and the 2048-d pool_3 activations feed FID and precision/recall; IS uses softmax(pool_3 W)
with the logits layer's matrix W and no bias (improved-GAN's recipe, kept by ADM).

The weights are pytorch-fid's port of that graph, `pt_inception-2015-12-05-6726825d.pth`
(the name carries its sha256 prefix), loaded into torchvision's Inception3 after the port's
four differences from torchvision: 1008 classes, and in the mixed blocks the pooling branch
averages without counting the padding, except the last block, which max-pools.

Not reproduced here: sFID (ADM's spatial features); use the suite on the samples .npz for
it. Features agree with the TF graph to float tolerance, not bit for bit.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from cache.tensors import RefusedFileError, load_torch_file

WEIGHTS_NAME = "pt_inception-2015-12-05-6726825d.pth"
WEIGHTS_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               + WEIGHTS_NAME)
WEIGHTS_ENV = "UREPA_INCEPTION_WEIGHTS"
INPUT_SIZE = 299
_LAYERS = ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1",
           "Conv2d_4a_3x3", "maxpool2", "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a",
           "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e", "Mixed_7a", "Mixed_7b",
           "Mixed_7c", "avgpool")


class InceptionWeightsError(RuntimeError):
    """The FID Inception weights are not here or not these; the message says how to
    provide them."""


class _TFPooling:
    """The TF graph's pooling branch: 3x3 average pooling that ignores the padding (or
    max pooling). torchvision's blocks pool inline, so the branch is recomputed from the
    block input (a 1x1 conv: ~1% of the network's FLOPs)."""

    pool_max = False

    def _forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        out = super()._forward(x)
        pooled = (F.max_pool2d(x, 3, stride=1, padding=1) if self.pool_max
                  else F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False))
        out[-1] = self.branch_pool(pooled)
        return out


def _blocks():
    from torchvision.models import inception as tv
    return [tv.BasicConv2d,
            type("InceptionA", (_TFPooling, tv.InceptionA), {}), tv.InceptionB,
            type("InceptionC", (_TFPooling, tv.InceptionC), {}), tv.InceptionD,
            type("InceptionE", (_TFPooling, tv.InceptionE), {}), tv.InceptionAux]


def resize_bilinear_tf1(x: torch.Tensor, size: int) -> torch.Tensor:
    """TF1 ResizeBilinear (align_corners=False, half_pixel_centers=False) of [B, C, H, W]:
    output pixel i samples the input at i * (in / out), clamped at the last pixel."""
    def axis(n_in: int):
        src = torch.arange(size, device=x.device, dtype=torch.float64) * (n_in / size)
        lo = src.floor().long().clamp(max=n_in - 1)
        hi = (lo + 1).clamp(max=n_in - 1)
        return lo, hi, (src - lo).to(x.dtype)
    lo, hi, w = axis(x.shape[-2])
    x = x[..., lo, :] * (1 - w)[:, None] + x[..., hi, :] * w[:, None]
    lo, hi, w = axis(x.shape[-1])
    return x[..., lo] * (1 - w) + x[..., hi] * w


def find_weights(path: str | os.PathLike | None = None) -> Path:
    """--inception PATH, else $UREPA_INCEPTION_WEIGHTS, else the torch hub cache (where
    pytorch-fid and torchmetrics download it)."""
    candidates = [Path(path)] if path else []
    if not path and os.environ.get(WEIGHTS_ENV):
        candidates.append(Path(os.environ[WEIGHTS_ENV]))
    if not candidates:
        candidates.append(Path(torch.hub.get_dir()) / "checkpoints" / WEIGHTS_NAME)
    for c in candidates:
        if c.is_file():
            return c
        if c.is_dir():
            raise InceptionWeightsError(f"FID Inception weights: {c} is a directory; expected "
                                        f"the file {WEIGHTS_NAME} ({WEIGHTS_URL})")
    raise InceptionWeightsError(
        f"FID Inception weights not found (looked at {', '.join(map(str, candidates))}). "
        f"Download {WEIGHTS_URL} where there is network and pass --inception PATH or set "
        f"{WEIGHTS_ENV}; --random-weights runs the evaluation with random init (smoke "
        "tests only)")


def read_weights(path: Path, expected: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The port's state dict from `path`, every name, shape and dtype checked against
    `expected` (the network's own state dict). torch.load(weights_only=True) rebuilds
    tensors and plain containers only: any other pickled object is refused, never run.
    Raises InceptionWeightsError (one line naming the file)."""
    want = (f"expected {WEIGHTS_NAME}: a torch.save state dict of the Inception3 port's "
            f"{len(expected)} tensors ({WEIGHTS_URL})")
    try:
        sd = load_torch_file(path)
    except RefusedFileError as e:
        raise InceptionWeightsError(f"{path}: {e}; {want}") from None
    if not isinstance(sd, dict):
        raise InceptionWeightsError(f"{path}: holds a {type(sd).__name__}, not a state dict; "
                                    f"{want}")
    for k in expected:   # older torch.save files have no BatchNorm counters (unused here)
        if k.endswith(".num_batches_tracked") and k not in sd:
            sd[k] = expected[k]
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise InceptionWeightsError(
            f"{path}: not the Inception port's keys: {len(missing)} missing {missing[:3]}, "
            f"{len(unexpected)} unexpected {[str(k) for k in unexpected[:3]]}; {want}")
    for k, ref in expected.items():
        v = sd[k]
        if not (torch.is_tensor(v) and v.shape == ref.shape
                and v.is_floating_point() == ref.is_floating_point()):
            got = (f"{v.dtype} {list(v.shape)}" if torch.is_tensor(v)
                   else f"a {type(v).__name__}")
            raise InceptionWeightsError(f"{path}: {k} is {got}, expected {ref.dtype} "
                                        f"{list(ref.shape)}; {want}")
    return sd


class FIDInception(nn.Module):
    """uint8 images [B, H, W, 3] -> (pool_3 features [B, 2048], IS logits [B, 1008])."""

    def __init__(self, weights: str | os.PathLike | None = None, *, random_weights=False):
        super().__init__()
        from torchvision.models.inception import Inception3
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # random mode is the same network every time
            self.net = Inception3(num_classes=1008, aux_logits=False, init_weights=False,
                                  inception_blocks=_blocks())
            if random_weights:    # variance-preserving, so features stay O(1)
                for m in self.net.modules():
                    if isinstance(m, (nn.Conv2d, nn.Linear)):
                        nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
        self.net.Mixed_7c.pool_max = True
        self.source, self.warning = "random init", None
        if not random_weights:
            path = find_weights(weights)
            self.net.load_state_dict(read_weights(path, self.net.state_dict()))
            self.source = str(path)
            digest = hashlib.sha256(path.read_bytes()).hexdigest()
            if not digest.startswith(WEIGHTS_NAME.rsplit("-", 1)[1].split(".")[0]):
                self.warning = (f"{path} is not {WEIGHTS_NAME} (sha256 {digest[:8]}...): its "
                                "numbers are not comparable with published FIDs")
        self.eval().requires_grad_(False)

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = images.permute(0, 3, 1, 2).float()
        if x.shape[-2:] != (INPUT_SIZE, INPUT_SIZE):
            x = resize_bilinear_tf1(x, INPUT_SIZE)
        x = (x - 128.0) / 128.0
        for name in _LAYERS:
            x = getattr(self.net, name)(x)
        pool = x.flatten(1)                                                # [B, 2048]
        return pool, pool @ self.net.fc.weight.T                           # no bias (ADM)
