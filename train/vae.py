"""The VAE decoder that turns sampled latents into images (methods.md section 5).

    x = VAE.decode(z / scale);  image = uint8(clamp(255 * (x + 1) / 2, 0, 255)), truncated

Which decoder (`--vae` of `train sample`, `sample.vae` of the training previews):
  auto (default)  the cache's own VAE when it was random-init (rebuilt from the config and
                  seed the manifest records, so it decodes what it encoded), else
                  stabilityai/sd-vae-ft-ema, the decoder every REPA / U-REPA number uses
  ID_OR_DIR       a diffusers hub id or a local directory (a VAE, or a pipeline with vae/)
  random          random init of the cache's recorded VAE config (smoke tests)

The decoder's encoder half is hashed and compared with the hash the cache recorded: the
SD-VAE fine-tunes changed only the decoder, so a match means the latents came from this
VAE's encoder; a mismatch is reported, not refused.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path

import torch

from cache.format import state_sha256
from cache.hub import from_pretrained_local_first

DEFAULT_DECODER = "stabilityai/sd-vae-ft-ema"
_DECODER_ONLY = ("decoder.", "post_quant_conv.")


class DecoderError(RuntimeError):
    """The decoder cannot be built; the message says how to provide it."""


def encoder_sha256(vae: torch.nn.Module) -> str:
    """The hash the encode job records for a VAE (its state dict without the decoder)."""
    return state_sha256({k: v for k, v in vae.state_dict().items()
                         if not k.startswith(_DECODER_ONLY)})


# What a recorded VAE config (a cache's manifest provenance, a checkpoint's "cache") may
# hold to be rebuilt: AutoencoderKL's keys, each with its kind and bounds. SD-VAE is 4
# blocks of <= 512 channels, 2 layers each, 4 latent channels, sample_size 256-1024.
_INT, _FLOAT, _BOOL, _STR = "int", "float", "bool", "str"
VAE_CONFIG_LIMITS: dict[str, tuple] = {
    "in_channels": (_INT, 1, 16), "out_channels": (_INT, 1, 16),
    "down_block_types": ([_STR], 1, 8), "up_block_types": ([_STR], 1, 8),
    "block_out_channels": ([_INT], 1, 8, 1, 1024),   # <= 8 blocks of <= 1024 channels
    "layers_per_block": (_INT, 1, 8), "act_fn": (_STR,), "latent_channels": (_INT, 1, 64),
    "norm_num_groups": (_INT, 1, 1024), "sample_size": (_INT, 1, 4096),
    "scaling_factor": (_FLOAT, 1e-6, 1e6), "shift_factor": (_FLOAT, -1e6, 1e6, None),
    "latents_mean": ([_FLOAT], 1, 64, None), "latents_std": ([_FLOAT], 1, 64, None),
    "force_upcast": (_BOOL,), "use_quant_conv": (_BOOL,), "use_post_quant_conv": (_BOOL,),
    "mid_block_add_attention": (_BOOL,),
}
# and in all at most this many parameters (SD-VAE: 84M), counted on the meta device
VAE_MAX_PARAMS = 400_000_000


def _fits(v, kind, *bounds) -> bool:
    if v is None:
        return None in bounds
    if isinstance(kind, list):      # [element kind], min length, max length, element bounds
        return (isinstance(v, list) and bounds[0] <= len(v) <= bounds[1]
                and all(_fits(x, kind[0], *bounds[2:4]) for x in v))
    if kind == _BOOL:
        return type(v) is bool
    if kind == _STR:
        return isinstance(v, str) and len(v) <= 64
    ok = type(v) is int if kind == _INT else type(v) in (int, float) and math.isfinite(v)
    return ok and (len(bounds) < 2 or bounds[0] <= v <= bounds[1])


def random_vae(cache: dict, where: str = "the training cache's record"):
    """The random-init AutoencoderKL that a cache's recorded VAE config and seed give
    (`cache`: a checkpoint's "cache", or cache_info of a cache's manifest), after checking
    the config: only AutoencoderKL's keys, each of its type and within
    VAE_CONFIG_LIMITS, at most VAE_MAX_PARAMS parameters. Raises DecoderError (one line)."""
    from diffusers import AutoencoderKL
    vae_info = cache.get("vae", {}) if isinstance(cache, dict) else None
    if not isinstance(vae_info, dict):
        raise DecoderError(f"{where}: cache={str(cache)[:60]} is not a mapping with a mapping "
                           "\"vae\": damaged; pass --vae with a hub id or a local VAE directory")
    config, seed = vae_info.get("config"), vae_info.get("seed") or 0
    if not config:
        raise DecoderError("the training cache records no VAE config to rebuild a random "
                           "decoder from (a synthetic or older cache); pass --vae with a "
                           "hub id or a local VAE directory")
    if not isinstance(config, dict) or type(seed) is not int or not 0 <= seed < 2 ** 63:
        raise DecoderError(f"{where}: the VAE config {str(config)[:60]} is not a mapping or "
                           f"its seed {str(seed)[:30]} is not an integer >= 0: damaged; pass "
                           "--vae with a hub id or a local VAE directory")
    bad = [f"{str(k)[:30]}={str(v)[:40]}" for k, v in config.items()
           if k not in VAE_CONFIG_LIMITS or not _fits(v, *VAE_CONFIG_LIMITS[k])]
    if bad:
        raise DecoderError(f"{where}: VAE config {', '.join(bad[:4])}: not an AutoencoderKL "
                           "key within the bounds of train/vae.py VAE_CONFIG_LIMITS; pass "
                           "--vae with a hub id or a local VAE directory")
    try:
        with torch.random.fork_rng(devices=[]):
            with torch.device("meta"):   # the size first: no memory, no init
                n = sum(p.numel() for p in AutoencoderKL(**config).parameters())
            if n > VAE_MAX_PARAMS:
                raise DecoderError(f"{where}: the VAE config gives {n / 1e6:.0f}M parameters, "
                                   f"more than {VAE_MAX_PARAMS / 1e6:.0f}M (SD-VAE has 84M): "
                                   "damaged; pass --vae with a hub id or a local VAE "
                                   "directory")
            torch.manual_seed(seed)   # the encode job's seed: the same weights it encoded with
            return AutoencoderKL(**config)
    except DecoderError:
        raise
    except Exception as e:  # diffusers' own checks: unknown block types, groups, sizes
        first = (str(e).splitlines() or [""])[0][:200]
        raise DecoderError(f"{where}: cannot build the VAE from its config "
                           f"({type(e).__name__}: {first}); pass --vae with a hub id or a "
                           "local VAE directory") from None


def _pretrained_vae(name: str):
    from diffusers import AutoencoderKL
    path = Path(name)
    kwargs = {"subfolder": "vae"} if (path / "vae" / "config.json").is_file() else {}
    try:   # the local cache first; the hub only when it can be reached (fast offline)
        return from_pretrained_local_first(AutoencoderKL.from_pretrained, name, **kwargs)
    except Exception as e:  # hub, network and file errors: all mean "not available here"
        first = (str(e).splitlines() or [""])[0]
        raise DecoderError(
            f"cannot load the VAE decoder {name!r} ({type(e).__name__}: {first}). Download "
            f"it where there is network (`hf download {name}`; point HF_HOME at that cache), "
            "or pass --vae /local/vae_dir, or --vae random for a smoke test") from e


class Decoder:
    """Latents [B, C, h, w] (scaled, as the model samples them) -> uint8 [B, H, W, 3]."""

    def __init__(self, choice: str | None, cache: dict, *, scale: float,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 where: str = "the training cache's record"):
        choice = choice or "auto"
        vae_info = cache.get("vae", {}) if isinstance(cache, dict) else None
        if not (isinstance(vae_info, dict)
                and isinstance(vae_info.get("weights_sha256"), (str, type(None)))):
            raise DecoderError(f"{where}: {str(cache)[:60]} is not a mapping with a mapping "
                               "\"vae\" (weights_sha256 a string or null): damaged")
        if choice == "auto":
            choice = "random" if cache.get("random_weights") else DEFAULT_DECODER
        if choice == "random":
            vae, self.source = random_vae(cache, where), "random init (--vae random)"
            if cache.get("random_weights"):
                self.source = "the cache's own random-init VAE (rebuilt from its seed)"
        else:
            vae, self.source = _pretrained_vae(choice), choice
        self.scale, self.dtype = scale, dtype
        self.warnings: list[str] = []
        recorded = vae_info.get("weights_sha256")
        if recorded and encoder_sha256(vae) != recorded:
            self.warnings.append(
                f"the decoder {self.source}: its encoder half differs from the VAE that "
                f"encoded the cache (sha256 {recorded[:12]}...): images may not match the "
                "latents")
        vae = vae.to(device)  # bf16 runs under autocast: the weights stay fp32
        self.vae = vae.eval().requires_grad_(False)
        self.vae.encoder = None  # only the decoder half runs here

    @torch.no_grad()
    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        dev = next(self.vae.parameters()).device
        ctx = (torch.autocast(dev.type, dtype=self.dtype) if self.dtype != torch.float32
               else contextlib.nullcontext())
        with ctx:
            x = self.vae.decode(z.to(dev, torch.float32) / self.scale).sample
        return to_uint8(x).permute(0, 2, 3, 1).cpu()


def to_uint8(x: torch.Tensor) -> torch.Tensor:
    """Decoded pixels in [-1, 1] -> uint8 as REPA's generate.py (and HASTE's, REG's): 255 *
    (x + 1) / 2 clamped and truncated, so 0.0 -> 127. DiT's sampler adds 0.5 before the
    truncation (rounds; 0.0 -> 128): images 0.5 levels brighter on average."""
    return (255.0 * ((x.float() + 1) / 2)).clamp(0, 255).to(torch.uint8)
