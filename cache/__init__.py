"""urepa-cache storage: the on-disk contract between `pipeline` (writes) and `train` (reads).

This package knows nothing of Ray, timm or diffusers: it stores and serves arrays plus a
manifest. See cache/format.py for the layout.
"""

from .format import (BACKENDS, FORMAT_VERSION, LATENT_SCALE, CacheError, CacheMismatchError,
                     CacheSpec, DamagedCacheError, FailedSampleError, FieldSpec, FormatVersionError,
                     IncompleteCacheError, NotACacheError)
from .loader import CacheLoader, LoaderConfig, epoch_plan
from .quant import dequantize_tokens, quantize_tokens
from .reader import CacheDataset, VerifyReport, open_cache
from .writer import CacheWriter, create_cache, finalize_cache

__all__ = [
    "BACKENDS", "FORMAT_VERSION", "LATENT_SCALE", "CacheError", "CacheMismatchError",
    "CacheSpec", "DamagedCacheError", "FailedSampleError", "FieldSpec", "FormatVersionError",
    "IncompleteCacheError", "NotACacheError", "CacheLoader", "LoaderConfig", "epoch_plan",
    "dequantize_tokens", "quantize_tokens", "CacheDataset", "VerifyReport", "open_cache",
    "CacheWriter", "create_cache", "finalize_cache",
]
