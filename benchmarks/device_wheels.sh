#!/bin/sh
# Wheels of the packages the lent GPU machine's image lacks (it has torch, timm,
# accelerate, safetensors, huggingface_hub, pillow, numpy; nothing can be installed there
# from a registry), at the versions of this checkout's .venv, for Python 3.12 x86-64.
# Ray (~70 MB) stays out: over the device's 64 MiB carry. See docs/performance.md, "GPU suite".
#   sh benchmarks/device_wheels.sh [DEST=.whl]
set -eu
dest=${1:-.whl}
py=${PYTHON:-.venv/bin/python}
pins=$("$py" - <<'PY'
import importlib.metadata as m
names = ["zarr", "numcodecs", "donfig", "google-crc32c", "msgspec", "diffusers",
         "importlib-metadata", "lazy-importer", "webdataset", "braceexpand",
         "typing-extensions"]
print(" ".join(f"{n}=={m.version(n)}" for n in names))
PY
)
mkdir -p "$dest"
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_5_x86_64 --platform any \
    -d "$dest" $pins
du -sh "$dest"
