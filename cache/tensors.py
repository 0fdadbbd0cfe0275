"""torch.save files a user passes on the command line (teacher weights, the Inception
port, REPA-family checkpoints): read as tensors and plain containers only, never by
running pickled code, and refused in one line otherwise. Files the project writes itself
are never pickles (safetensors and JSON: docs/trust.md). Also the header of an .npy array
(a .npz member, a webdataset member), read without loading the array."""

from __future__ import annotations

import pickle
import re
import warnings
from pathlib import Path
from typing import Any, Sequence


class RefusedFileError(ValueError):
    """The file is no torch.save file of tensors; the message says why in one line.
    Callers add the path and what they expected."""


def read_npy_header(f) -> tuple[tuple[int, ...], bool, Any]:
    """(shape, fortran_order, dtype) of the .npy stream `f`, left at its first data byte.
    The header is parsed by numpy's own reader (never evaluated as code); raises
    ValueError for a bad magic or a format version other than 1.0 and 2.0."""
    import numpy as np
    version = np.lib.format.read_magic(f)
    if version == (1, 0):
        return np.lib.format.read_array_header_1_0(f)
    if version == (2, 0):
        return np.lib.format.read_array_header_2_0(f)
    raise ValueError(f"an .npy format version {version} (1.0 and 2.0 are read)")


def first_line(e: BaseException, limit: int = 200) -> str:
    """`Type: first line of the message`, cut to `limit` characters."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:limit]}"


def load_torch_file(path: str | Path, *, allow: Sequence[type] = (), mmap: bool = False
                    ) -> Any:
    """torch.load(weights_only=True): tensors, numbers, strings and containers, plus the
    classes in `allow` (e.g. argparse.Namespace for REPA's `args`). `mmap` maps a zip
    file's tensors lazily (an old non-zip file is read whole). Raises RefusedFileError."""
    import torch

    def load(**kw: Any) -> Any:
        with torch.serialization.safe_globals(list(allow)), warnings.catch_warnings():
            # a plain pickle (not torch.save's) draws a 3-line warning before the one-line
            # refusal below, which says it all
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True, **kw)
    try:
        if mmap:
            try:
                return load(mmap=True)
            except RuntimeError as e:  # an old, non-zip torch.save file cannot be mapped
                if "mmap" not in str(e):
                    raise
        return load()
    except pickle.UnpicklingError as e:
        needed = re.search(r"GLOBAL ([\w.]+)", str(e))
        if needed:
            raise RefusedFileError(
                f"refused: rebuilding it needs the Python object {needed.group(1)}, which "
                "only running pickled code could make; nothing in it was run") from None
        detail = str(e).split("WeightsUnpickler error:")[-1].strip().split("\n")[0][:200]
        if _is_pickle(path):   # a pickle that torch.save did not write
            raise RefusedFileError("refused: a plain pickle, not a torch.save file of "
                                   "tensors; nothing in it was run") from None
        raise RefusedFileError(f"not a readable torch.save file ({detail})") from None
    except Exception as e:  # truncated, an .npz, text, ...: torch raises many types
        raise RefusedFileError(f"not a readable torch.save file ({first_line(e)})") from None


def _is_pickle(path: str | Path) -> bool:
    """Starts as a pickle of protocol 2 or later does (the PROTO opcode)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5
