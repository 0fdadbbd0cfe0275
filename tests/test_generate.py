"""`train sample` and `train plot` on a real (tiny) trained run: PNGs, grid, the ADM npz
layout, resume, refusal of other settings, independence of the process count, the
decoder being the cache's own random VAE, and clear errors."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import pytest
from PIL import Image

from cache import CacheSpec
from cache.synthetic import write_synthetic_cache
from conftest import tiny_run_config
from pipeline.encoders import TINY_VAE_CONFIG, build_vae, weights_sha256
from train.cli import main as train_main
from train.config import load_config
from train.generate import block_generator
from train.loop import train
from train.vae import DecoderError

ROOT = Path(__file__).resolve().parents[1]
SPEC = CacheSpec(num_samples=32, shard_size=16, latent_size=8, tokens=16, token_dim=32)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A 6-step tiny U-REPA run on a cache that records a random tiny VAE, as
    `pipeline encode --vae tiny --random-weights --seed 3` would."""
    tmp = tmp_path_factory.mktemp("gen")
    vae = {"weights_sha256": weights_sha256(build_vae("tiny", random_weights=True, seed=3)),
           "scaling_factor": 0.18215, "latent_channels": 4,
           "config": {k: list(v) if isinstance(v, tuple) else v
                      for k, v in TINY_VAE_CONFIG.items()}}
    cache = write_synthetic_cache(tmp / "cache", SPEC, provenance={
        "vae": vae, "command": {"vae": "tiny", "seed": 3}})
    train(tiny_config(cache, tmp / "run", "preview.every=3", "preview.num=4",
                      "preview.steps=3"), log=lambda _m: None)
    return tmp / "run"


def tiny_config(cache, run_dir, *extra):
    return tiny_run_config(cache, run_dir, "data.shuffle_buffer=16", "batch_size=8",
                           "optim.ema_decay=0.5", "max_steps=6", "checkpoint_every=3",
                           *extra)


def sample(source, out, *extra) -> int:
    return train_main(["sample", str(source), "--out", str(out), "--mode", "ode",
                       "--steps", "3", "--batch-size", "4", *extra])


def images(out) -> np.ndarray:
    with np.load(Path(out) / "samples.npz") as z:
        return z["arr_0"]


def test_sample_writes_pngs_grid_and_the_adm_npz(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert sample(run_dir, out, "--num", "10", "--cfg", "1.5", "--grid", "9") == 0
    log = capsys.readouterr().out
    assert "WARNING" not in log            # the decoder is the cache's own VAE (hash match)
    assert "step_00000006" in log and "the cache's own random-init VAE" in log
    with np.load(out / "samples.npz") as z:
        arr, labels = z["arr_0"], z["arr_1"]
    assert arr.shape == (10, 64, 64, 3) and arr.dtype == np.uint8
    assert labels.dtype == np.int64 and labels.min() >= 0 and labels.max() < 1000
    # block b's labels: the first draw of its generator, uniform over the classes
    drawn = [torch.randint(1000, (4,), generator=block_generator(0, b, "cpu")) for b in range(3)]
    assert np.array_equal(labels, torch.cat(drawn)[:10].numpy())
    assert sorted(p.name for p in (out / "images").iterdir()) == [
        f"{i:06d}.png" for i in range(10)]
    assert np.array_equal(np.asarray(Image.open(out / "images" / "000007.png")), arr[7])
    assert Image.open(out / "grid.png").size == (3 * 66 + 2, 3 * 66 + 2)
    assert arr.std() > 0 and not np.array_equal(arr[0], arr[1])
    rec = json.loads((out / "sample.json").read_text())
    assert rec["step"] == 6 and rec["cfg"] == 1.5 and rec["weights"] == "ema"


def test_sample_resumes_grows_and_refuses_other_settings(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert sample(run_dir, out, "--num", "10") == 0
    first = images(out)
    kept = (out / "images" / "000001.png").stat().st_mtime_ns
    for i in (2, 9):                       # lost from blocks 0 and 2: both are redone
        (out / "images" / f"{i:06d}.png").unlink()
    (out / "samples.npz").unlink()
    assert sample(run_dir, out, "--num", "10") == 0
    assert np.array_equal(images(out), first)
    assert (out / "images" / "000005.png").exists()
    assert (out / "images" / "000001.png").stat().st_mtime_ns != kept       # block 0 redone
    assert sample(run_dir, out, "--num", "13") == 0   # more samples: the first 10 stay
    assert np.array_equal(images(out)[:10], first)
    capsys.readouterr()
    assert sample(run_dir, out, "--num", "10", "--cfg", "2") == 2
    err = capsys.readouterr().err
    assert "cfg: saved 1.0 vs now 2.0" in err and "new --out" in err


def test_guidance_sde_and_raw_weights_change_the_samples(run_dir, tmp_path):
    base = tmp_path / "a"
    assert sample(run_dir, base, "--num", "4") == 0
    for name, extra in {"cfg": ["--cfg", "3"], "model": ["--weights", "model"],
                        "sde": ["--mode", "sde", "--steps", "4"],
                        "seed": ["--seed", "1"]}.items():
        assert sample(run_dir, tmp_path / name, "--num", "4", *extra) == 0
        assert not np.array_equal(images(tmp_path / name), images(base)), name
    # a checkpoint directory works as the source, and an earlier one gives other samples
    assert sample(run_dir / "checkpoints" / "step_00000003", tmp_path / "c3", "--num", "4") == 0
    assert not np.array_equal(images(tmp_path / "c3"), images(base))


def test_sample_errors_are_one_clear_line(run_dir, tmp_path, capsys):
    assert sample(tmp_path, tmp_path / "o") == 2
    assert "neither a run directory nor a checkpoint" in capsys.readouterr().err
    assert sample(run_dir, tmp_path / "o", "--vae", str(tmp_path / "no-vae")) == 2
    err = capsys.readouterr().err
    assert "cannot load the VAE decoder" in err and "--vae random" in err
    assert sample(run_dir, tmp_path / "o", "--cfg", "0.5") == 2
    assert "cfg=0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sample(run_dir, tmp_path / "o", "--interval", "0.7")
    # a training run whose preview decoder cannot be had stops before its first step
    cache = load_config(run_dir / "config.yaml").data.cache
    with pytest.raises(DecoderError, match="cannot load the VAE decoder"):
        train(tiny_config(cache, tmp_path / "r", "preview.every=2",
                          f"preview.vae={tmp_path / 'none'}"), log=lambda _m: None)
    assert not (tmp_path / "r" / "checkpoints").exists() or not any(
        (tmp_path / "r" / "checkpoints").iterdir())


def test_two_processes_make_the_same_samples_as_one(run_dir, tmp_path):
    # both as subprocesses with one thread each: thread counts change float reductions
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = ["-m", "train.cli", "sample", str(run_dir), "--num-samples", "10", "--grid", "0",
            "--mode", "ode", "--steps", "3", "--batch-size", "4", "--out"]
    torchrun = [str(Path(sys.executable).with_name("torchrun")), "--standalone",
                "--nproc_per_node", "2"]
    for launcher, out in (([sys.executable], "one"), (torchrun, "two")):
        subprocess.run(launcher + args + [str(tmp_path / out)], cwd=ROOT, env=env,
                       check=True, capture_output=True, timeout=300)
    assert np.array_equal(images(tmp_path / "one"), images(tmp_path / "two"))


def test_preview_grids_leave_the_training_trajectory_alone(run_dir, tmp_path):
    grids = sorted(p.name for p in (run_dir / "samples").iterdir())
    assert grids == ["step_00000003.png", "step_00000006.png"]
    assert Image.open(run_dir / "samples" / grids[0]).size == (2 * 66 + 2, 2 * 66 + 2)
    cache = load_config(run_dir / "config.yaml").data.cache
    train(tiny_config(cache, tmp_path / "plain"), log=lambda _m: None)
    with_grids = (run_dir / "metrics.jsonl").read_text().splitlines()
    plain = (tmp_path / "plain" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(a)["loss"] for a in with_grids] == [json.loads(b)["loss"] for b in plain]


def test_plot_draws_the_run_and_reports_a_missing_one(run_dir, tmp_path, capsys):
    assert train_main(["plot", str(run_dir), "--out", str(tmp_path / "m.png")]) == 0
    assert Image.open(tmp_path / "m.png").size[0] > 800
    (tmp_path / "empty").mkdir()
    assert train_main(["plot", str(tmp_path / "empty")]) == 2
    assert "metrics.jsonl not found" in capsys.readouterr().err


def test_decoded_pixels_are_quantized_as_repa_samples_them():
    """REPA's generate.py (HASTE's, REG's): uint8(clamp(255 (x + 1) / 2)), truncated, so
    0.0 -> 127 (DiT's +0.5 would give 128)."""
    import torch

    from train.vae import to_uint8
    x = torch.tensor([-1.5, -1.0, -0.999, 0.0, 0.999, 1.0, 2.0])
    assert to_uint8(x).tolist() == [0, 0, 0, 127, 254, 255, 255]
