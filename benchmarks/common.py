"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import torch

# dense bf16 peak, TFLOP/s (vendor datasheets, SXM parts)
PEAK_BF16 = {"H100": 989.4, "H200": 989.4, "A100": 312.0, "L40S": 362.1}


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
