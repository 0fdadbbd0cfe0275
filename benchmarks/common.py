"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import torch

# dense bf16 peak, TFLOP/s (vendor datasheets); the first name found in the device's name
# counts, so the PCIe and NVL parts come before the plain (SXM) names
PEAK_BF16 = {"H100 PCIe": 756.0, "H100 NVL": 835.0, "H200 NVL": 835.0, "H100": 989.4,
             "H200": 989.4, "A100": 312.0, "L40S": 362.1}


def peak_tflops() -> float | None:
    if not torch.cuda.is_available():
        return None
    name = torch.cuda.get_device_name()
    return next((v for k, v in PEAK_BF16.items() if k in name), None)


def in_processes(fn, items: list, workers: int, *args) -> None:
    """fn(share, *args) for `workers` round-robin shares of `items`, each in a process of
    its own (inline for one worker)."""
    from concurrent.futures import ProcessPoolExecutor
    workers = max(1, min(workers, len(items)))
    shares = [items[k::workers] for k in range(workers)]
    if workers == 1:
        fn(items, *args)
        return
    with ProcessPoolExecutor(workers) as pool:
        list(pool.map(fn, shares, *([a] * workers for a in args)))


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
