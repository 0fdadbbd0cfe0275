"""The demo's VAE: a diffusers AutoencoderKL whose weights are set, not learned, so that it
encodes an image as its 8x8 block-average colours and decodes a latent by repeating each
of them over its 8x8 block.

Why: the demo runs on CPUs with no pretrained weights, and a random-init VAE decodes
every latent to the same speckle, so nothing the model learned can be seen. Fitting a
small VAE to the demo images was measured first (issue 17): 300 steps (~80 s on 2 cores)
still reproduced neither the shapes nor the colours. This one is exact at its resolution
(the latent *is* a 16x16 picture at 128 px), costs nothing to make, is the same on every
machine, and runs through the unchanged encode, train and sample code as any
AutoencoderKL (a local directory for `--vae` and `preview.vae`).

How (every other block is an identity):
- resnets: their second convolution is zero, so each returns its input;
- down-samplers: a 2x2 average (taps (0,0), (0,1), (1,0), (1,1) of the stride-2 conv);
  up-samplers: nearest 2x (the conv's centre tap);
- the one nonlinear spot, GroupNorm -> SiLU before each conv_out: every colour c is
  carried as the pair (c, -c), next to two constant channels (+K, -K). The group's mean
  is then 0 and its variance K^2/4 up to a 1e-4 relative error, so the norm is a fixed
  scale (undone by its weight); and SiLU(a) - SiLU(-a) = a exactly, so conv_out reads each
  colour back as the difference of its pair.

Latent channels: 0-2 the block-average R, G, B in [-1, 1] (as the VAE's input), channel 3
is always 0; the posterior std is exp(LOGVAR / 2). `scaling_factor` brings the demo set's
latents near unit variance, as SD-VAE's 0.18215 does for its own.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

# 8 channels everywhere: (R, G, B, -R, -G, -B, +K, -K); one group, so GroupNorm sees all 8
CHANNELS = 8
DEMO_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=1,
    block_out_channels=(CHANNELS,) * 4, norm_num_groups=1, act_fn="silu",
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    mid_block_add_attention=False, sample_size=128, scaling_factor=1.6)
K = 100.0           # the constant channels; their variance swamps the colours' (<= 3 / 4)
LOGVAR = -12.0      # posterior std 2.5e-3 (a third of one grey level)
_MARK = "pooling-vae-v1"   # written into the saved config's _name_or_path: what it is


def _pairs_in(conv: torch.nn.Conv2d, colours: int) -> None:
    """conv_in: channel c = x_c, channel 3 + c = -x_c (centre tap); channels 6, 7 = +K, -K."""
    for c in range(colours):
        conv.weight[c, c, 1, 1] = 1.0
        conv.weight[3 + c, c, 1, 1] = -1.0
    conv.bias[6], conv.bias[7] = K, -K


def _pairs_out(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d, colours: int) -> None:
    """GroupNorm scaled back to the input's units, then colour c = SiLU(c) - SiLU(-c)."""
    norm.weight.fill_(K / 2)      # the group's std is K / 2 (4 channels at +-K of 8 -> K^2/4)
    for c in range(colours):
        conv.weight[c, c, 1, 1] = 1.0
        conv.weight[c, 3 + c, 1, 1] = -1.0


def _identity(module: torch.nn.Module) -> None:
    """Samplers average (down) or repeat (up) each channel; resnets, whose second
    convolution stays zero, return their input."""
    from diffusers.models.resnet import Downsample2D, Upsample2D
    for m in module.modules():
        if isinstance(m, Downsample2D):
            for c in range(CHANNELS):
                m.conv.weight[c, c, :2, :2] = 0.25
        elif isinstance(m, Upsample2D):
            for c in range(CHANNELS):
                m.conv.weight[c, c, 1, 1] = 1.0


@torch.no_grad()
def pooling_vae():
    """The AutoencoderKL described above (fp32, eval mode)."""
    from diffusers import AutoencoderKL
    vae = AutoencoderKL(**DEMO_VAE_CONFIG)
    for p in vae.parameters():   # zero, then set what is used: the rest (the resnets'
        p.zero_()                # branches...) is zero, so the file and its hash never vary
    _identity(vae)
    enc, dec = vae.encoder, vae.decoder
    _pairs_in(enc.conv_in, 3)
    _pairs_out(enc.conv_norm_out, enc.conv_out, 3)   # rows 0-2: the means of R, G, B
    enc.conv_out.bias[4:] = LOGVAR                     # rows 4-7: the log-variances
    for conv in (vae.quant_conv, vae.post_quant_conv):
        conv.weight.copy_(torch.eye(conv.out_channels)[:, :, None, None])
    _pairs_in(dec.conv_in, 3)
    _pairs_out(dec.conv_norm_out, dec.conv_out, 3)
    return vae.eval().requires_grad_(False)


def block_average(x: torch.Tensor, block: int = 8) -> torch.Tensor:
    """What the decoder returns for an encoded x [B, 3, H, W]: each block's mean colour."""
    pooled = torch.nn.functional.avg_pool2d(x, block)
    return pooled.repeat_interleave(block, 2).repeat_interleave(block, 3)


def describe_vae(name: str | None, provenance: dict) -> str:
    """How the demo figure names a decoder: the pooling VAE by what it is, others by name."""
    command = provenance.get("command")   # a damaged manifest may hold anything here
    name = name or str(command.get("vae") if isinstance(command, dict) else None)[:4096]
    if is_pooling_vae(name):
        return (f"{name}, the demo's pooling VAE (8x8 block averages, weights set, not "
                "learned: pipeline/demo_vae.py)")
    return name


def is_pooling_vae(folder: str | Path) -> bool:
    """Whether `folder` holds the VAE that write_pooling_vae saves (its config says so)."""
    try:
        config = json.loads((Path(folder) / "config.json").read_text())
    except (OSError, ValueError):
        return False   # a hub id, a damaged file or another kind of directory
    return isinstance(config, dict) and config.get("_name_or_path") == _MARK


def write_pooling_vae(out: str | Path) -> Path:
    """Save it as a diffusers directory (config.json + safetensors) that `--vae`,
    `preview.vae` and `train sample --vae` load; kept if already there and current."""
    import shutil
    out = Path(out)
    vae = pooling_vae()
    if is_pooling_vae(out) and _same_weights(out, vae.state_dict()):
        return out
    vae.register_to_config(_name_or_path=_MARK)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    vae.save_pretrained(tmp, safe_serialization=True)
    if out.is_dir():
        shutil.rmtree(out)
    elif out.exists() or out.is_symlink():
        out.unlink()
    tmp.rename(out)
    return out


def _same_weights(folder: Path, state: dict[str, torch.Tensor]) -> bool:
    """The saved weights equal `state` (a damaged or missing file does not)."""
    from safetensors.torch import load_file
    try:
        saved = load_file(str(folder / "diffusion_pytorch_model.safetensors"))
    except Exception:   # SafetensorError, OSError: not the file we write
        return False
    return saved.keys() == state.keys() and all(torch.equal(saved[k], v)
                                                for k, v in state.items())
