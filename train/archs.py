"""The model sizes and the names a config may use, without torch: `train run` checks a
config (and reports a typo) before the models and torch are imported (issue 17)."""

from __future__ import annotations

SIT_SIZES: dict[str, dict] = {
    # align_depth: REPA's block k (1-indexed) for its projector: 8 for L and XL, 4 for B
    "sit-xl/2": dict(depth=28, dim=1152, heads=16, align_depth=8),  # 675M, 118.6 GMACs
    "sit-l/2": dict(depth=24, dim=1024, heads=16, align_depth=8),   # 458M, 80.8
    "sit-b/2": dict(depth=12, dim=768, heads=12, align_depth=4),    # 130M, 23.0
    "sit-s/2": dict(depth=12, dim=384, heads=6, align_depth=4),     # 33M
    "sit-tiny/2": dict(depth=2, dim=64, heads=2, align_depth=1),    # tests and the CPU demo
}

SIT_DOWN_SIZES: dict[str, dict] = {
    "sit-down-xl/2": dict(stages=(10, 16, 10), dim=1152, heads=16),  # 955.4M, 110.4 GMACs
    "sit-down-l/2": dict(stages=(9, 14, 9), dim=1024, heads=16),     # 681.6M, 79.5
    "sit-down-b/2": dict(stages=(5, 5, 5), dim=768, heads=12),       # 201.9M, 25.5
    "sit-down-s/2": dict(stages=(4, 4, 4), dim=384, heads=6),        # 42.8M, 5.5
    "sit-down-tiny/2": dict(stages=(1, 2, 1), dim=64, heads=2),      # tests and the CPU demo
}

ARCH_NAMES = (*SIT_SIZES, *SIT_DOWN_SIZES)
UPSAMPLE_MODES = ("bilinear", "nearest", "bicubic")   # U-REPA's projector resize
