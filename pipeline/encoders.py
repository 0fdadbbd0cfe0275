"""The encoders (the GPU stage): SD-VAE posterior moments and DINOv2 tokens of a batch.

    vae = build_vae("stabilityai/sd-vae-ft-mse")       # diffusers AutoencoderKL
    teacher = build_teacher("dinov2-b", resolution=256) # timm ViT, pos-embed at 16x16
    enc = Encoder(vae, teacher, resolution=256, device="cuda")
    out = enc.encode(images_uint8_nhwc)                 # moments, tokens, cls as numpy

Exactness (methods.md section 1): VAE input x/127.5 - 1, the posterior mean and std are
kept (not a sample, not scaled); teacher input x/255, ImageNet mean/std, then a bicubic
resize to (R/16)*14 px (224 at 256, 448 at 512) without antialias; the teacher's
positional embedding is resampled once at load to the (R/16)^2 grid (bicubic with
antialias, as timm's loader and REPA do); outputs are the final-norm patch tokens and CLS.
"""

from __future__ import annotations

import contextlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cache.format import state_sha256
from cache.hub import (OfflineError, cache_dir, cached_file, from_pretrained_local_first,
                       hub_unreachable)
from cache.tensors import RefusedFileError, first_line, load_torch_file

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_VAE = "stabilityai/sd-vae-ft-mse"
DEFAULT_TEACHER = "dinov2-b"

# stabilityai/sd-vae-ft-mse's config.json: 83.7M parameters, 34.2M in the encoder;
# 272.7 GFLOPs per 256 px image for the encoder (methods.md section 7)
SD_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
    block_out_channels=(128, 256, 512, 512), norm_num_groups=32, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    sample_size=256)
# the same structure, small enough for CPU tests and the demo (random weights only)
TINY_VAE_CONFIG: dict[str, Any] = {**SD_VAE_CONFIG, "block_out_channels": (16, 32, 32, 32),
                                   "layers_per_block": 1, "norm_num_groups": 8}
VAES = {"sd-vae": SD_VAE_CONFIG, "tiny": TINY_VAE_CONFIG}


@dataclass(frozen=True)
class TeacherSpec:
    arch: str                 # timm architecture
    registers: int = 0
    pretrained_tag: str | None = "lvd142m"
    kwargs: dict = field(default_factory=dict)   # architecture overrides (tiny test model)


TEACHERS: dict[str, TeacherSpec] = {
    "dinov2-s": TeacherSpec("vit_small_patch14_dinov2"),
    "dinov2-b": TeacherSpec("vit_base_patch14_dinov2"),      # REPA's default, 86.6M
    "dinov2-l": TeacherSpec("vit_large_patch14_dinov2"),
    "dinov2-g": TeacherSpec("vit_giant_patch14_dinov2"),
    "dinov2-s-reg": TeacherSpec("vit_small_patch14_reg4_dinov2", 4),
    "dinov2-b-reg": TeacherSpec("vit_base_patch14_reg4_dinov2", 4),
    "dinov2-l-reg": TeacherSpec("vit_large_patch14_reg4_dinov2", 4),
    "dinov2-g-reg": TeacherSpec("vit_giant_patch14_reg4_dinov2", 4),
    # a 2-block, 64-wide DINOv2-structured ViT for tests and the CPU demo (random weights)
    "dinov2-tiny": TeacherSpec("vit_small_patch14_dinov2", pretrained_tag=None,
                               kwargs=dict(embed_dim=64, depth=2, num_heads=2)),
    "dinov2-tiny-reg": TeacherSpec("vit_small_patch14_reg4_dinov2", 4, pretrained_tag=None,
                                   kwargs=dict(embed_dim=64, depth=2, num_heads=2)),
}
PATCH = 14


class WeightsError(RuntimeError):
    """Pretrained weights cannot be loaded; the message says how to provide them."""


def token_grid(resolution: int) -> int:
    """Teacher tokens per side: one per 16 px, as SiT/2 has one token per 2x2 latent."""
    if resolution % 16:
        raise ValueError(f"resolution must be a multiple of 16, got {resolution}")
    return resolution // 16


def teacher_input_size(resolution: int) -> int:
    return token_grid(resolution) * PATCH


def weights_sha256(module: torch.nn.Module) -> str:
    """The identity of a module's weights (cache.format.state_sha256 of its state dict)."""
    return state_sha256(module.state_dict())


@contextlib.contextmanager
def _seeded(seed: int):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _drop_decoder(vae: torch.nn.Module) -> torch.nn.Module:
    # only the encoder half is used here; the decoder is half the weights
    vae.decoder = None
    vae.post_quant_conv = None
    return vae.eval().requires_grad_(False)


def build_vae(vae: str = DEFAULT_VAE, *, random_weights: bool = False,
              seed: int = 0) -> torch.nn.Module:
    """A diffusers AutoencoderKL (encoder only). `vae` is a hub id or a local directory
    (a VAE directory or a pipeline directory with vae/); "tiny" is a small random VAE."""
    from diffusers import AutoencoderKL
    if random_weights or vae == "tiny":
        if vae != "tiny" and not random_weights:
            raise WeightsError("--vae tiny exists only with --random-weights")
        with _seeded(seed):
            return _drop_decoder(AutoencoderKL(**VAES["tiny" if vae == "tiny" else "sd-vae"]))
    path = Path(vae)
    kwargs = {"subfolder": "vae"} if (path / "vae" / "config.json").is_file() else {}
    if path.exists() and not kwargs and not (path / "config.json").is_file():
        raise WeightsError(f"--vae {vae}: no config.json (a diffusers AutoencoderKL "
                           "directory, or a pipeline directory with vae/, is expected)")
    try:   # the local cache first; the hub only when it can be reached (fast offline)
        return _drop_decoder(from_pretrained_local_first(AutoencoderKL.from_pretrained, vae,
                                                         **kwargs))
    except Exception as e:  # hub/network/file errors come in many types; all mean the same
        raise WeightsError(
            f"cannot load the VAE {vae!r} ({first_line(e)}). "
            f"Download it where there is network (`hf download {vae}`; point HF_HOME at the "
            "shared cache), or pass --vae /local/dir, or --random-weights for a smoke "
            "test") from e


TEACHER_FORMATS = ("an official dinov2_*_pretrain.pth, a DINOv2 training checkpoint or timm "
                   "weights: a torch.save state dict (.pth/.pt, read as tensors only) or "
                   ".safetensors")


def _load_tensors(path: Path) -> Any:
    """torch.load / safetensors of a user's file that runs no pickled code: weights_only
    rebuilds tensors and plain containers, and refuses (never runs) anything else."""
    where = f"--teacher-weights {path}"
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # SafetensorError, OSError: all mean "not this format"
            raise WeightsError(f"{where}: not a readable .safetensors file "
                               f"({first_line(e)}); expected "
                               f"{TEACHER_FORMATS}") from None
    try:
        return load_torch_file(path)
    except RefusedFileError as e:
        raise WeightsError(f"{where}: {e}. Expected {TEACHER_FORMATS}") from None


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """The teacher's tensors by name: the file's state dict, unwrapped from a DINOv2
    training checkpoint ("teacher": backbone.*) or a {"model"/"state_dict": ...} wrapper."""
    sd = _load_tensors(path)
    where = f"--teacher-weights {path}"
    if isinstance(sd, dict) and "teacher" in sd:   # a DINOv2 training checkpoint
        if not isinstance(sd["teacher"], dict):
            raise WeightsError(f"{where}: 'teacher' is a {type(sd['teacher']).__name__}, not "
                               "a state dict")
        sd = {k.removeprefix("backbone."): v for k, v in sd["teacher"].items()
              if isinstance(k, str) and k.startswith("backbone.")}
    for wrapper in ("model", "state_dict"):
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict):
        raise WeightsError(f"{where}: not a state dict (found {type(sd).__name__}); expected "
                           f"{TEACHER_FORMATS}")
    bad = [k for k, v in sd.items() if not (isinstance(k, str) and torch.is_tensor(v))]
    if bad:
        raise WeightsError(f"{where}: not a state dict of tensors ({len(bad)} entries are "
                           f"not, e.g. {bad[0]!r}: {type(sd[bad[0]]).__name__}); expected "
                           f"{TEACHER_FORMATS}")
    if not sd:
        raise WeightsError(f"{where}: holds no teacher weights; expected {TEACHER_FORMATS}")
    return sd


def load_teacher_weights(model: torch.nn.Module, path: str | Path) -> None:
    """Load official DINOv2 `.pth` checkpoints (dinov2_vitb14_pretrain.pth and the reg4
    ones) or timm-format weights (.pth/.safetensors) into a timm model: timm's filter
    converts the official keys (register tokens, SwiGLU w12/w3) and resamples the
    positional embedding to the model's grid. Raises WeightsError (one line)."""
    from timm.models.vision_transformer import checkpoint_filter_fn
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"--teacher-weights {path}: no such file")
    hint = "is it the right size (s/b/l/g) and variant (with/without registers)?"
    sd = _read_state_dict(path)
    try:
        sd = checkpoint_filter_fn(sd, model)
    except (RuntimeError, KeyError, ValueError, IndexError, TypeError) as e:
        raise WeightsError(f"--teacher-weights {path} does not fit this teacher "
                           f"({first_line(e)}); {hint}") from None
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}
    own = model.state_dict()
    wrong = [k for k, v in sd.items() if k in own and (
        v.shape != own[k].shape or v.is_floating_point() != own[k].is_floating_point())]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected or wrong:
        raise WeightsError(f"--teacher-weights {path} does not fit this teacher: missing "
                           f"{missing[:4]}, unexpected {unexpected[:4]}, wrong shapes or "
                           f"dtypes {wrong[:4]}; {hint}")
    model.load_state_dict(sd)


def build_teacher(name: str = DEFAULT_TEACHER, *, resolution: int = 256,
                  weights: str | Path | None = None, random_weights: bool = False,
                  seed: int = 0) -> torch.nn.Module:
    """A frozen timm DINOv2 at input (R/16)*14 px, head removed, pos-embed on the grid."""
    import timm
    if name not in TEACHERS:
        raise ValueError(f"unknown teacher {name!r}; choose from {sorted(TEACHERS)}")
    spec = TEACHERS[name]
    kw = dict(img_size=teacher_input_size(resolution), num_classes=0, **spec.kwargs)
    if spec.pretrained_tag is None and not random_weights and weights is None:
        raise WeightsError(f"teacher {name} has no published weights: use it only with "
                           "--random-weights, --random-teacher or --teacher-weights")
    if random_weights or weights is not None:
        with _seeded(seed + 1):
            model = timm.create_model(spec.arch, pretrained=False, **kw)
        if weights is not None and not random_weights:
            load_teacher_weights(model, weights)
    else:
        hub = f"{spec.arch}.{spec.pretrained_tag}"
        local = cached_file(f"timm/{hub}", "model.safetensors")
        try:   # from the local cache without asking the hub; else the hub if reachable
            why = None if local else hub_unreachable()
            if why:
                raise OfflineError(f"not in the local Hugging Face cache ({cache_dir()}) "
                                   f"and {why}")
            overlay = {"pretrained_cfg_overlay": {"file": local}} if local else {}
            model = timm.create_model(hub, pretrained=True, **kw, **overlay)
        except Exception as e:  # hub/network errors come in many types; all mean the same
            raise WeightsError(
                f"cannot load teacher {name} ({hub}: {first_line(e)}). "
                f"Download it where there is "
                f"network (`hf download timm/{hub}`; point HF_HOME at the shared cache), or "
                "pass --teacher-weights PATH (official dinov2_*_pretrain.pth or timm "
                "weights), or --random-weights for a smoke test") from e
    return model.eval().requires_grad_(False)


def teacher_pixels(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor,
                   size: int) -> torch.Tensor:
    """REPA's teacher input: float pixels [B, 3, R, R] in 0..255 -> / 255, ImageNet
    mean/std ([1, 3, 1, 1] tensors), bicubic resize to size x size (no antialias)."""
    t = (x / 255.0 - mean) / std
    return F.interpolate(t, size=(size, size), mode="bicubic", align_corners=False,
                         antialias=False)


def check_attn_blocks(teacher: torch.nn.Module, blocks) -> tuple[int, ...]:
    """`--teacher-attn` blocks (0-indexed) as a sorted tuple, each a block of `teacher`."""
    blocks = tuple(sorted(set(int(b) for b in blocks)))
    depth = len(teacher.blocks)
    bad = [b for b in blocks if not 0 <= b < depth]
    if bad:
        raise ValueError(f"--teacher-attn {','.join(map(str, bad))}: the teacher has blocks "
                         f"0..{depth - 1} (0-indexed; HASTE's are 8,9,10,11 of DINOv2-B)")
    return blocks


PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


class Encoder:
    """VAE + teacher on one device; `encode` maps uint8 images to the cache's fields.

    Work is split into fixed mini-batches of `batch_size` in input order, so a sample's
    result depends only on its own batch, which a shard fixes (CPU runs are bitwise
    reproducible whatever the number of workers)."""

    def __init__(self, vae: torch.nn.Module, teacher: torch.nn.Module, *, resolution: int,
                 device: str | torch.device = "cpu", precision: str = "fp32",
                 batch_size: int = 64, compile: bool = False,
                 attn_blocks: tuple[int, ...] = ()):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {list(PRECISIONS)}, got {precision!r}")
        self.device = torch.device(device)
        self.resolution = resolution
        self.teacher_size = teacher_input_size(resolution)
        self.batch_size = batch_size
        self.amp_dtype = PRECISIONS[precision]
        fmt = torch.channels_last if self.device.type == "cuda" else torch.contiguous_format
        self.vae = vae.to(self.device, memory_format=fmt)
        self.teacher = teacher.to(self.device)
        self.prefix = int(getattr(teacher, "num_prefix_tokens", 1))
        self.mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._vae_encoder, self._teacher_fwd = self.vae.encoder, self.teacher.forward_features
        self.attn_blocks = check_attn_blocks(teacher, attn_blocks)
        self._qk: dict[int, torch.Tensor] = {}
        self._armed = False   # the hooks keep q, k only inside this encoder's forward
        for b in self.attn_blocks:   # before compile: the hooks are traced with the forward
            teacher.blocks[b].attn.qkv.register_forward_hook(self._keep_qk(b))
        if compile:
            self._vae_encoder = torch.compile(self._vae_encoder)
            self._teacher_fwd = torch.compile(self._teacher_fwd)

    def _keep_qk(self, block: int):
        """A forward hook on teacher block `block`'s qkv projection: keeps q * head_dim^-0.5
        and k of the patch tokens [B, H, T, d], as the block's attention uses them (after
        its q/k norm), in fp16: the logits the block softmaxes are their product."""
        attn = self.teacher.blocks[block].attn

        def hook(_module, _inputs, out: torch.Tensor) -> None:
            if not self._armed:   # another user of the same teacher module
                return
            n, tokens, _ = out.shape
            qkv = out.view(n, tokens, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
            q, k = attn.q_norm(qkv[0]), attn.k_norm(qkv[1])              # [B, H, N, d]
            p = self.prefix                                       # CLS (+ registers)
            self._qk[block] = torch.stack([q[:, :, p:].float() * attn.scale,
                                           k[:, :, p:].float()], 1).half()  # [B, 2, H, T, d]
        return hook

    def _autocast(self):
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    @torch.inference_mode()
    def _encode_batch(self, x8: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution
        x = x8.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # [B,3,R,R]
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with self._autocast():
            h = self._vae_encoder(x / 127.5 - 1.0)                       # [B, 2C, R/8, R/8]
        if self.vae.quant_conv is not None:
            h = self.vae.quant_conv(h.float())
        post = DiagonalGaussianDistribution(h.float())
        moments = torch.cat([post.mean, post.std], dim=1)                # [B, 2C, R/8, R/8]
        t = teacher_pixels(x, self.mean, self.std, self.teacher_size)    # [B, 3, 224, 224]
        self._qk.clear()
        self._armed = bool(self.attn_blocks)
        try:
            with self._autocast():
                feats = self._teacher_fwd(t.contiguous())                # [B, 1+reg+T, D]
        finally:
            self._armed = False
        feats = feats.float()
        out = (moments, feats[:, self.prefix:], feats[:, 0])             # [B,T,D], [B,D]
        if self.attn_blocks:   # the hooks filled _qk in this same forward
            out += (torch.stack([self._qk.pop(b) for b in self.attn_blocks], 1),)
        return out                                                # + [B, L, 2, H, T, d]

    def output_shapes(self) -> dict[str, tuple[tuple[int, ...], type]]:
        """Per-image shape and dtype of each output."""
        c, g = self.vae.config.latent_channels, token_grid(self.resolution)
        lat = self.resolution // 8
        out = {"moments": ((2 * c, lat, lat), np.float32),
               "tokens": ((g * g, self.teacher.embed_dim), np.float16),
               "cls": ((self.teacher.embed_dim,), np.float32)}
        if self.attn_blocks:
            attn = self.teacher.blocks[0].attn
            out["attn_qk"] = ((len(self.attn_blocks), 2, attn.num_heads, g * g,
                               attn.head_dim), np.float16)
        return out

    def encode(self, images: np.ndarray) -> dict[str, np.ndarray]:
        """uint8 [n, R, R, 3] -> moments float32 [n, 2C, R/8, R/8], tokens float16
        [n, T, D] (the stored dtype; int8 quantization of fp16 values moves a value by at
        most one int8 step, and rarely), cls float32 [n, D]; with attn_blocks also attn_qk
        float16 [n, L, 2, H, T, d]: q * d^-0.5 and k per chosen block and head."""
        n = len(images)
        if images.dtype != np.uint8 or images.shape[1:] != (self.resolution,) * 2 + (3,):
            raise ValueError(f"expected uint8 [n, {self.resolution}, {self.resolution}, 3], "
                             f"got {images.dtype} {images.shape}")
        out = {k: np.empty((n, *shape), dtype) for k, (shape, dtype)
               in self.output_shapes().items()}
        with warnings.catch_warnings():   # Ray hands over read-only arrays; only read here
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            src = torch.from_numpy(np.ascontiguousarray(images))  # uint8: 4x less to copy
        for lo in range(0, n, self.batch_size):
            parts = self._encode_batch(src[lo:lo + self.batch_size])
            for a, t in zip(out.values(), parts):   # moments, tokens, cls[, attn_qk]
                # cast on the device: fp16 tokens cross to the host at half the bytes
                t = t.to(torch.float16 if a.dtype == np.float16 else torch.float32)
                a[lo:lo + len(t)] = t.cpu().numpy()
        return out

    def encode_shard(self, images: np.ndarray, failed: set[int]) -> dict[str, np.ndarray]:
        """uint8 [n, V, R, R, 3] with `failed` rows skipped -> moments [n, V, ...],
        tokens [n, V, T, D], cls [n, V, D]; failed rows are zero."""
        n, v = images.shape[:2]
        ok = np.ones(n, dtype=bool)
        ok[sorted(failed)] = False
        todo = images if ok.all() else images[ok]          # no copy of a clean shard
        enc = self.encode(todo.reshape(-1, *images.shape[2:]))  # s0v0, s0v1, s1v0, ...
        out = {}
        for name, a in enc.items():
            a = a.reshape(-1, v, *a.shape[1:])
            if ok.all():
                out[name] = a
                continue
            out[name] = np.zeros((n, *a.shape[1:]), dtype=a.dtype)
            out[name][ok] = a
        return out
