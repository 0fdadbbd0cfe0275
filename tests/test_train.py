"""The trainer end to end on small real caches: config errors, cache checks, loss going
down, exact resume, refusal of a changed config, the NaN stop, the no-teacher guarantee."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cache import CacheSpec
from conftest import tiny_run_config, write_structured_cache
from train.cli import main as train_main
from train.config import ConfigError, load_config
from train.data import check_cache
from train.checkpoint import checkpoints
from train.loop import train

ROOT = Path(__file__).resolve().parents[1]
SPEC = CacheSpec(num_samples=96, shard_size=32, latent_size=8, tokens=16, token_dim=32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_structured_cache(tmp_path_factory.mktemp("cache") / "c", SPEC)


def tiny(cache, run_dir, *extra):
    """A tiny U-REPA run: SiT-down-tiny on 8x8 latents (4x4 tokens, 2x2 middle stage)."""
    return tiny_run_config(cache, run_dir, "data.shuffle_buffer=32", "batch_size=16",
                           "optim.ema_decay=0.9", "checkpoint_every=5",
                           "keep_checkpoints=2", *extra)


def metrics(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------ configuration
@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = load_config(ROOT / "configs" / preset)
    assert cfg.run_dir and cfg.data.cache


@pytest.mark.parametrize("override, message", [
    ("optim.lrr=1", "unknown key 'optim.lrr'; valid keys under optim: optim.lr, optim.betas"),
    ("foo=1", "unknown key 'foo'; valid keys under the top level: run_dir, data"),
    ("optim.lr=fast", "optim.lr: Value 'fast'"),
    ("batch_size=1.5", "batch_size: Value '1.5'"),
    ("model.arch=sit-q/2", "model.arch='sit-q/2': choose one of"),
    ("align.method=repa2", "align.method='repa2'"),
    ("mixed_precision=fp8", "mixed_precision='fp8': choose one of"),
    ("optim.betas=[0.9]", "optim.betas=[0.9]"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        load_config(ROOT / "configs" / "demo.yaml", [override])
    assert message in str(e.value)


def test_missing_keys_files_and_batch_splits(tmp_path):
    with pytest.raises(ConfigError, match="required key.*data.cache"):
        load_config(None, ["run_dir=x"])
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(tmp_path / "bad.yaml")
    cfg = load_config(None, ["run_dir=x", "data.cache=y", "batch_size=256",
                             "micro_batch_size=32"])
    assert cfg.accumulation(4) == (32, 2)
    with pytest.raises(ConfigError, match="does not split over 3"):
        cfg.accumulation(3)
    with pytest.raises(ConfigError, match="must divide the per-device batch 128"):
        load_config(None, ["run_dir=x", "data.cache=y", "micro_batch_size=48"]).accumulation(2)


def test_cache_mismatches_name_both_sides(cache, tmp_path):
    from cache import open_cache
    ds = open_cache(cache)
    cfg = tiny(cache, tmp_path, "model.latent_size=16", "align.teacher_dim=768",
               "model.in_channels=3")
    with pytest.raises(ConfigError) as e:
        check_cache(ds, cfg)
    msg = str(e.value)
    assert "latent size: cache 8x8 vs model.latent_size=16" in msg
    assert "latent channels: cache 4 vs model.in_channels=3" in msg
    assert "teacher width: cache tokens are 32-d vs align.teacher_dim=768" in msg
    assert "teacher tokens: cache 16 per image vs the model's 8x8 token grid" in msg
    check = check_cache(ds, tiny(cache, tmp_path))
    assert check.latent_scale == pytest.approx(0.18215)
    assert any("RANDOM weights" in w for w in check.warnings)
    # without alignment the token grid does not matter
    check_cache(ds, tiny(cache, tmp_path, "align.method=none", "align.teacher_dim=768"))


def test_cli_reports_bad_config_and_dry_run(cache, tmp_path, capsys):
    assert train_main(["run", str(ROOT / "configs/demo.yaml"), "optim.lrr=1"]) == 2
    assert "unknown key 'optim.lrr'" in capsys.readouterr().err
    assert train_main(["run", str(ROOT / "configs/demo.yaml"), f"data.cache={tmp_path}"]) == 2
    assert "is not a urepa-cache: it has no manifest.json" in capsys.readouterr().err
    args = [f"{k}={v}" for k, v in [("run_dir", tmp_path / "r"), ("data.cache", cache),
                                     ("model.latent_size", 8), ("align.teacher_dim", 32)]]
    assert train_main(["run", str(ROOT / "configs/demo.yaml"), *args, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "96 samples" in out and "would train sit-down-tiny/2" in out
    assert not (tmp_path / "r").exists()


# ------------------------------------------------------------------ training
def test_tiny_run_learns_and_resumes_exactly(cache, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train(tiny(cache, a, "max_steps=30"), log=lambda _: None)
    la = metrics(a)
    assert [m["step"] for m in la] == list(range(1, 31))
    for term in ("loss", "loss_v", "loss_repa"):
        first, last = np.mean([m[term] for m in la[:5]]), np.mean([m[term] for m in la[-5:]])
        assert last < first - 0.1 * abs(first), (term, first, last)
    assert {"loss_v", "loss_repa", "loss_ml", "grad_norm", "img_per_s", "data_wait"} <= set(la[0])
    assert all(0 <= m["data_wait"] <= 1 for m in la)
    assert [p.name for p in checkpoints(a)] == ["step_00000025", "step_00000030"]  # keep 2

    train(tiny(cache, b, "max_steps=17"), log=lambda _: None)     # "interrupted" at 17
    (b / "checkpoints" / ".tmp_step_00000018").mkdir()            # a save killed midway
    with (b / "metrics.jsonl").open("a") as f:
        f.write('{"step": 18, "loss": 0.')                         # a line cut by the kill
    msgs = []
    train(tiny(cache, b, "max_steps=30"), log=msgs.append)         # rerun: resumes
    assert any("resumed from" in m and "step_00000017" in m for m in msgs)
    assert not (b / "checkpoints" / ".tmp_step_00000018").exists()
    assert [m["loss"] for m in metrics(b)] == [m["loss"] for m in la]  # bit-exact trajectory
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        wa, wb = (load_file(d / "checkpoints/step_00000030" / name) for d in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    meta = json.loads((a / "checkpoints/step_00000030/checkpoint.json").read_text())
    assert meta["arch"] == "sit-down-tiny/2" and meta["step"] == 30
    assert (a / "config.yaml").exists()


def test_resume_refuses_a_changed_recipe(cache, tmp_path):
    train(tiny(cache, tmp_path, "max_steps=2"), log=lambda _: None)
    with pytest.raises(ConfigError, match=r"optim.lr: saved 0.001 vs now 0.002"):
        train(tiny(cache, tmp_path, "max_steps=3", "optim.lr=2e-3"), log=lambda _: None)
    train(tiny(cache, tmp_path, "max_steps=3", "log_every=2"), log=lambda _: None)  # allowed


def test_trackers_log_the_scalars_and_the_preview_grids(cache, tmp_path, tiny_vae):
    """accelerate's TensorBoard tracker (a test dependency) gets every logged scalar of
    metrics.jsonl and each preview grid as an image, equal to the PNG beside the run."""
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    train(tiny(cache, tmp_path, "max_steps=4", "log_every=2", "trackers=[tensorboard]",
               "preview.every=2", "preview.num=4", "preview.steps=2",
               f"preview.vae={tiny_vae}"), log=lambda _: None)
    events = list((tmp_path / "urepa-cache").glob("events.out.tfevents*"))  # (hparams: a subdir)
    assert len(events) == 1
    ea = EventAccumulator(str(events[0].parent), size_guidance={"images": 0}).Reload()
    logged = metrics(tmp_path)
    assert [e.step for e in ea.Scalars("loss")] == [m["step"] for m in logged] == [2, 4]
    assert [e.value for e in ea.Scalars("loss")] == pytest.approx(
        [m["loss"] for m in logged], rel=1e-6)
    images = ea.Images("preview")
    assert [e.step for e in images] == [2, 4]
    png = np.asarray(Image.open(io.BytesIO(images[-1].encoded_image_string)).convert("RGB"))
    assert (png == np.asarray(Image.open(tmp_path / "samples" / "step_00000004.png"))).all()


def test_each_tracker_gets_the_preview_grid_as_its_log_images_takes_it(monkeypatch):
    """accelerate's own log_images of each tracker that takes images, on a stand-in run:
    wandb and swanlab take a list of images per name, aim and clearml one image (aim.Image
    and clearml's report_image refuse a list)."""
    import logging
    import types

    from accelerate import tracking

    from train.loop import log_image
    grid = np.zeros((6, 6, 3), np.uint8)
    got = []

    class One:   # aim.Image, clearml's report_image: one array or PIL image
        def __init__(self, image, **_):
            assert isinstance(image, np.ndarray), type(image)
            got.append(image)

    monkeypatch.setattr(tracking, "logger", logging.getLogger("test"))  # no accelerate state
    monkeypatch.setitem(sys.modules, "aim", types.SimpleNamespace(Image=One))
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(Image=One))
    monkeypatch.setitem(sys.modules, "swanlab", types.SimpleNamespace(Image=One))
    trackers = []
    for cls in (tracking.AimTracker, tracking.ClearMLTracker, tracking.WandBTracker,
                tracking.SwanLabTracker):
        t = object.__new__(cls)
        t.main_process_only = False
        t.writer = types.SimpleNamespace(track=lambda *a, **k: None)
        t.task = types.SimpleNamespace(get_logger=lambda: types.SimpleNamespace(
            report_image=lambda image=None, **k: One(image)))
        t.log = lambda values, **k: None
        trackers.append(t)
    log_image(types.SimpleNamespace(trackers=trackers), "preview", grid, 2)
    assert len(got) == 4 and all(g is grid for g in got)


@pytest.mark.parametrize("trackers, message", [
    ("[swanlab]", "trackers: swanlab needs the swanlab package, which is not installed "
                  "here: pip install swanlab (or remove swanlab from trackers)"),
    ("[wandbb]", "trackers=['wandbb']: a list of distinct names from"),
    ("[wandb,wandb]", "trackers=['wandb', 'wandb']: a list of distinct names"),
])
def test_a_tracker_that_cannot_run_is_a_clear_error(cache, tmp_path, trackers, message):
    import importlib.util
    if importlib.util.find_spec("swanlab") is not None:
        pytest.skip("swanlab is installed here")
    with pytest.raises(ConfigError) as e:
        train(tiny(cache, tmp_path, "max_steps=1", f"trackers={trackers}"), log=lambda _: None)
    assert str(e.value).startswith(message)


def test_cpu_processes_share_the_cores():
    """CPU training threads: OMP_NUM_THREADS wins; else the node's cores split over the
    launcher's local processes (issue 17, point 2)."""
    from train.loop import cpu_threads
    assert cpu_threads({}, 16, 16) == 16
    assert cpu_threads({"LOCAL_WORLD_SIZE": "2"}, 16, 16) == 8
    assert cpu_threads({"LOCAL_WORLD_SIZE": "4"}, 2, 2) == 1
    assert cpu_threads({"LOCAL_WORLD_SIZE": "2", "OMP_NUM_THREADS": "3"}, 16, 3) == 3
    assert cpu_threads({"LOCAL_WORLD_SIZE": "x"}, 8, 8) == 8


def test_accumulation_and_plain_sit(cache, tmp_path):
    cfg = tiny(cache, tmp_path, "max_steps=3", "micro_batch_size=8", "align.method=none",
               "model.arch=sit-tiny/2")
    lines = []
    last = train(cfg, log=lines.append)
    assert last["step"] == 3 and "loss_repa" not in last
    assert last["session_steps"] == 3 and last["session_img_per_s"] > 0   # the whole run's
    assert "global batch 16 = 1 process(es) x 8 x 2 accumulation, 1 data streams" in "".join(lines)
    meta = json.loads((tmp_path / "checkpoints/step_00000003/checkpoint.json").read_text())
    state = meta["train"]
    assert state["loader"]["batch_size"] == 16              # the loader hands out whole steps
    assert state["loader"]["batch_in_epoch"] == 3


def test_nonfinite_loss_stops_and_keeps_the_last_checkpoint(cache, tmp_path, capsys):
    """A diverging run (absurd learning rate) stops at the first non-finite step with a
    diagnostic; the update is not applied and the last good checkpoint stays the newest."""
    run = tmp_path / "run"
    rc = train_main(["run", str(ROOT / "configs/demo.yaml"), f"run_dir={run}",
                     f"data.cache={cache}", "model.latent_size=8", "align.teacher_dim=32",
                     "batch_size=8", "data.shuffle_buffer=8", "max_steps=50",
                     "checkpoint_every=1", "optim.lr=1e30", "optim.grad_clip=0",
                     "progress=false"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "non-finite value at step" in err and "last good one is" in err
    bad = sorted(run.glob("nonfinite-step_*.json"))
    assert len(bad) == 1
    info = json.loads(bad[0].read_text())
    assert len(info["sample_indices_main_process"]) == 8
    names = [p.name for p in checkpoints(run)]
    assert f"step_{info['step']:08d}" not in names            # nothing saved past the bad step
    if info["step"] > 1:
        assert names[-1] == f"step_{info['step'] - 1:08d}"
        assert info["last_checkpoint"].endswith(names[-1])


def test_the_trainer_never_loads_a_teacher(cache, tmp_path):
    """Train in a fresh interpreter and list what got imported: no pipeline code (where the
    teacher and VAE live), no timm, no diffusers; the teacher tokens come from the cache."""
    script = f"""
import sys
from train.cli import main
rc = main(["run", {str(ROOT / 'configs/demo.yaml')!r}, "run_dir={tmp_path / 'r'}",
           "data.cache={cache}", "model.latent_size=8", "align.teacher_dim=32",
           "batch_size=8", "data.shuffle_buffer=8", "max_steps=2", "progress=false"])
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "timm", "diffusers"))
print("RC", rc, "IMPORTED", bad)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert "RC 0 IMPORTED []" in out.stdout, out.stdout + out.stderr


def test_two_processes_train_and_resume_with_torchrun(cache, tmp_path):
    """DDP on CPU (gloo): 2 ranks x micro-batch 4 x 2 accumulation = global batch 16,
    one checkpoint with both ranks' RNG states, then a resume. (Issue 6 checks the
    numerics against one process.)"""
    def launch(steps):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc_per_node", "2", "-m", "train.cli", "run",
               str(ROOT / "configs/demo.yaml"), f"run_dir={tmp_path}", f"data.cache={cache}",
               "model.latent_size=8", "align.teacher_dim=32", "batch_size=16",
               "micro_batch_size=4", "data.shuffle_buffer=8", f"max_steps={steps}",
               "checkpoint_every=2", "log_every=1", "progress=false"]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    out = launch(2)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es) x 4 x 2 accumulation" in out.stdout
    assert out.stdout.count("done: step 2") == 1                   # the main process reports
    ckpt = tmp_path / "checkpoints" / "step_00000002"
    assert (ckpt / "rng_0.json").exists() and (ckpt / "rng_1.json").exists()
    out = launch(4)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resumed from" in out.stdout and [m["step"] for m in metrics(tmp_path)] == [1, 2, 3, 4]
