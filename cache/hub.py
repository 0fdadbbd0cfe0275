"""Pretrained weights from the Hugging Face hub without the long wait offline: the local
cache first, then a 3 s reachability check, and only then the hub's own downloader (whose
retries take ~25 s and print a line each when there is no network).

Shared by the encoder (pipeline/encoders.py: the VAE, the DINOv2 teacher) and the trainer's
decoder (train/vae.py), so both fail in one line and within seconds offline.
"""

from __future__ import annotations

import functools
import os
import socket
import warnings
from typing import Any, Callable
from urllib.parse import urlparse

_TRUE = ("1", "true", "yes", "on")


def hub_unreachable() -> str | None:
    """Why the hub cannot be reached now, or None when it can: HF_HUB_OFFLINE set, or no
    TCP connection to HF_ENDPOINT's host within 3 s (checked once per process)."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE:
        return "HF_HUB_OFFLINE is set"
    return _probe(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))


@functools.lru_cache(maxsize=4)
def _probe(endpoint: str) -> str | None:
    url = urlparse(endpoint)
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http"
                                                                 else 443)
    try:
        socket.create_connection((host, port), timeout=3).close()
        return None
    except OSError as e:
        return f"{host} cannot be reached ({e.strerror or type(e).__name__})"


def cache_dir() -> str:
    """Where the hub's files are looked for (HF_HUB_CACHE, HF_HOME/hub, or the default)."""
    from huggingface_hub import constants
    return str(constants.HF_HUB_CACHE)


def from_pretrained_local_first(load: Callable[..., Any], name: str, **kwargs) -> Any:
    """`load(name, **kwargs)` (a diffusers/transformers `from_pretrained`) from the local
    cache or directory first, then from the hub if it can be reached. Raises OfflineError
    when the weights are neither here nor reachable; the hub's own error otherwise."""
    with warnings.catch_warnings():   # diffusers passes a deprecated hub argument
        warnings.simplefilter("ignore", UserWarning)
        try:
            return load(name, local_files_only=True, **kwargs)
        except Exception:   # not in the local cache (its errors take many types)
            if os.path.exists(name):
                raise        # a local directory: its own error says what is wrong
        why = hub_unreachable()
        if why:
            raise OfflineError(f"not in the local Hugging Face cache ({cache_dir()}) and "
                               f"{why}")
        return load(name, **kwargs)


def cached_file(repo_id: str, filename: str) -> str | None:
    """The local path of a hub file already in the cache, or None."""
    from huggingface_hub import try_to_load_from_cache
    path = try_to_load_from_cache(repo_id, filename)
    return path if isinstance(path, str) and os.path.isfile(path) else None


class OfflineError(OSError):
    """The weights are not here and the hub cannot be reached; the message says why."""
