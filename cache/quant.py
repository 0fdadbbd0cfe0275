"""Symmetric int8 quantization of teacher tokens with one fp16 scale per token.

    scale = max(|x|) / 127 over the token's D channels;  q = round(x / scale)
    x_hat = q * scale

DINOv2 final-norm tokens have a few large-magnitude channels, but per-token abs-max
keeps the cosine similarity between x and x_hat above 0.999 (tests/test_quant.py). Bytes
per token go from 2 * D to D + 2 (768 -> 770 for D = 768 instead of 1536: 49.9% saved).
"""

from __future__ import annotations

import numpy as np
import torch


def quantize_tokens(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Quantize [..., D] float tokens to (int8 [..., D], float16 scale [...])."""
    x32 = np.asarray(x, dtype=np.float32)
    amax = np.abs(x32).max(axis=-1)
    # The scale is stored in fp16: quantize against the rounded scale so that
    # dequantization uses exactly the value we divided by.
    scale = (np.maximum(amax, 1e-12) / 127.0).astype(np.float16)
    scale = np.where(scale == 0, np.float16(6e-8), scale)  # fp16 underflow of tiny tokens
    q = np.rint(x32 / scale.astype(np.float32)[..., None])
    return np.clip(q, -127, 127).astype(np.int8), scale


def dequantize_tokens(q: np.ndarray | torch.Tensor, scale: np.ndarray | torch.Tensor,
                      dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """int8 [..., D] and scale [...] back to float tokens (on q's device)."""
    q = torch.as_tensor(q)
    scale = torch.as_tensor(scale, device=q.device)
    if q.device.type == "cpu":
        # fp16 arithmetic is slow on CPU: compute in fp32, cast once.
        return (q.to(torch.float32) * scale.to(torch.float32).unsqueeze(-1)).to(dtype)
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)
