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
import warnings
from pathlib import Path

import torch

from cache.format import state_sha256

DEFAULT_DECODER = "stabilityai/sd-vae-ft-ema"
_DECODER_ONLY = ("decoder.", "post_quant_conv.")


class DecoderError(RuntimeError):
    """The decoder cannot be built; the message says how to provide it."""


def encoder_sha256(vae: torch.nn.Module) -> str:
    """The hash the encode job records for a VAE (its state dict without the decoder)."""
    return state_sha256({k: v for k, v in vae.state_dict().items()
                         if not k.startswith(_DECODER_ONLY)})


def _random_vae(cache: dict):
    from diffusers import AutoencoderKL
    vae_info = cache.get("vae", {})
    config, seed = vae_info.get("config"), vae_info.get("seed") or 0
    if not config:
        raise DecoderError("the training cache records no VAE config to rebuild a random "
                           "decoder from (a synthetic or older cache); pass --vae with a "
                           "hub id or a local VAE directory")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)   # the encode job's seed: the same weights it encoded with
        return AutoencoderKL(**config)


def _pretrained_vae(name: str):
    from diffusers import AutoencoderKL
    path = Path(name)
    kwargs = {"subfolder": "vae"} if (path / "vae" / "config.json").is_file() else {}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return AutoencoderKL.from_pretrained(name, **kwargs)
    except Exception as e:  # hub, network and file errors: all mean "not available here"
        first = (str(e).splitlines() or [""])[0]
        raise DecoderError(
            f"cannot load the VAE decoder {name!r} ({type(e).__name__}: {first}). Download "
            f"it where there is network (`hf download {name}`; point HF_HOME at that cache), "
            "or pass --vae /local/vae_dir, or --vae random for a smoke test") from e


class Decoder:
    """Latents [B, C, h, w] (scaled, as the model samples them) -> uint8 [B, H, W, 3]."""

    def __init__(self, choice: str | None, cache: dict, *, scale: float,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32):
        choice = choice or "auto"
        if choice == "auto":
            choice = "random" if cache.get("random_weights") else DEFAULT_DECODER
        if choice == "random":
            vae, self.source = _random_vae(cache), "random init (--vae random)"
            if cache.get("random_weights"):
                self.source = "the cache's own random-init VAE (rebuilt from its seed)"
        else:
            vae, self.source = _pretrained_vae(choice), choice
        self.scale, self.dtype = scale, dtype
        self.warnings: list[str] = []
        recorded = cache.get("vae", {}).get("weights_sha256")
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
