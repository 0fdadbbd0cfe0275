"""Every method through the same doors: presets that load, say their source and fit a cache
of the paper's shapes; `train run` of every preset without a teacher; the method registry
and its options' checks. (Each method's own behaviour: tests/test_method_<name>.py.)"""

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import CacheSpec
from cache.synthetic import write_synthetic_cache
from conftest import write_structured_cache
from train.cli import main as train_main
from train.config import ConfigError, load_config
from train.methods import METHODS

ROOT = Path(__file__).resolve().parents[1]
PRESETS = sorted(p.name for p in (ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_states_its_source(preset):
    """A preset says where its numbers come from (paper and table, or that it is ours)."""
    text = (ROOT / "configs" / preset).read_text()
    assert re.search(r"^# Source: \S", text, re.M), f"{preset}: no '# Source: ...' comment"
    cfg = load_config(ROOT / "configs" / preset)
    assert cfg.align.method in METHODS


@pytest.fixture(scope="module")
def paper_cache(tmp_path_factory):
    """The shapes of an ImageNet 256 px cache with DINOv2-B: 32x32 latents, 256 tokens of
    768, CLS 768, q, k of blocks 7-11 (4 samples: the dry run reads the manifest only)."""
    spec = CacheSpec(num_samples=4, shard_size=4, chunk_size=4, latent_size=32, tokens=256,
                     token_dim=768, attn_blocks=(7, 8, 9, 10, 11), attn_heads=12,
                     attn_head_dim=64)   # HASTE's blocks for B (7, 9, 11) and L/XL (8-11)
    return write_synthetic_cache(tmp_path_factory.mktemp("paper") / "c", spec)


@pytest.mark.parametrize("preset", [p for p in PRESETS if p != "demo.yaml"])
def test_every_preset_dry_runs_against_a_cache_of_the_papers_shapes(preset, paper_cache,
                                                                    tmp_path, capsys):
    rc = train_main(["run", str(ROOT / "configs" / preset), f"data.cache={paper_cache}",
                     f"run_dir={tmp_path / 'run'}", "--dry-run"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "would train" in captured.out and not (tmp_path / "run").exists()


# The tiny stand-in of each preset's model: the same family, 8x8 latents, 32-d teacher
TINY = {"sit": "sit-tiny/2", "sit-down": "sit-down-tiny/2"}


def tiny_overrides(preset: str, cache: Path, run_dir: Path) -> list[str]:
    cfg = load_config(ROOT / "configs" / preset)
    family = "sit-down" if cfg.model.arch.startswith("sit-down") else "sit"
    extra = []
    if cfg.align.method == "erw":   # both phases in two steps, within the tiny model
        extra = ["method_args.warmup_steps=1", "method_args.l2r_depth=1"]
    if cfg.align.method == "haste":  # the tiny teacher's two blocks; tau between the steps
        extra = ["method_args.teacher_blocks=[0,1]", "method_args.student_blocks=[0,1]",
                 "method_args.tau=1"]
    return [f"run_dir={run_dir}", f"data.cache={cache}", f"model.arch={TINY[family]}",
            "model.latent_size=8", "model.num_classes=1000", "align.teacher_dim=32",
            "align.projector_dim=64", "align.depth=null", "data.num_workers=0",
            "data.shuffle_buffer=8", "data.resolution=null", "batch_size=8",
            "micro_batch_size=null", "max_steps=2", "checkpoint_every=2", "log_every=1",
            "mixed_precision=no", "progress=false", "preview.every=0", *extra]


def test_no_preset_loads_a_teacher(tmp_path):
    """`train run` of every preset (tiny stand-ins, two steps each) in one fresh
    interpreter: no pipeline code (where the teacher and VAE live), no timm, no
    diffusers is imported; every method's teacher signal comes from the cache."""
    cache = write_structured_cache(tmp_path / "c", CacheSpec(
        num_samples=32, shard_size=16, latent_size=8, tokens=16, token_dim=32,
        attn_blocks=(0, 1), attn_heads=2, attn_head_dim=8))
    runs = {p: tiny_overrides(p, cache, tmp_path / p) for p in PRESETS}
    script = f"""
import sys
from train.cli import main
for preset, overrides in {runs!r}.items():
    rc = main(["run", "configs/" + preset, *overrides])
    print("PRESET", preset, "RC", rc)
bad = sorted(m for m in sys.modules if m.split(".")[0] in ("pipeline", "timm", "diffusers"))
print("IMPORTED", bad)
"""
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=600)
    for preset in PRESETS:
        assert f"PRESET {preset} RC 0" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
    assert "IMPORTED []" in out.stdout, out.stdout[-2000:]


def test_method_options_are_checked_by_the_method():
    base = ["run_dir=x", "data.cache=y"]
    with pytest.raises(ConfigError, match=r"method_args.foo: align.method=repa has no such "
                                          r"option; it has none"):
        load_config(None, [*base, "align.method=repa", "method_args.foo=1"])
    with pytest.raises(ConfigError, match=r"method_args=3: expected a mapping"):
        load_config(None, [*base, "method_args=3"])
    with pytest.raises(ConfigError, match=r"align.method='nope': choose one of \[.*'repa'"):
        load_config(None, [*base, "align.method=nope"])
    cfg = load_config(None, [*base, "align.method=none"])
    assert cfg.method_args == {}


# ---------------------------------------------------------------- the refactored three
@pytest.fixture(scope="module")
def learnable(tmp_path_factory):
    return write_structured_cache(tmp_path_factory.mktemp("learn") / "c", CacheSpec(
        num_samples=96, shard_size=32, latent_size=8, tokens=16, token_dim=32))


def _losses(run_dir: Path) -> list[dict]:
    import json
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method, arch, terms", [
    ("repa", "sit-tiny/2", ("loss_v", "loss_repa")),
    ("urepa", "sit-down-tiny/2", ("loss_v", "loss_repa", "loss_ml")),
    ("urepa-reg", "sit-down-tiny/2", ("loss_v", "loss_cls", "loss_repa", "loss_ml")),
    ("none", "sit-tiny/2", ("loss_v",)),
])
def test_own_terms_fall_a_resume_is_exact_and_it_samples(method, arch, terms, learnable,
                                                          tiny_vae, tmp_path):
    """Each method's own terms fall over 30 steps; a run stopped at 17 and rerun follows
    the uninterrupted one bit for bit (losses, weights, EMA, optimizer); `train sample`
    makes images from its checkpoint. (reg, erw, gmem: their own test files.)"""
    from safetensors.torch import load_file

    from conftest import tiny_run_config
    from train.loop import train

    def cfg(run_dir, steps):
        return tiny_run_config(learnable, run_dir, f"align.method={method}",
                               f"model.arch={arch}", "data.shuffle_buffer=32",
                               "batch_size=16", "optim.ema_decay=0.9",
                               "checkpoint_every=17", f"max_steps={steps}")
    a, b = tmp_path / "a", tmp_path / "b"
    train(cfg(a, 30), log=lambda _: None)
    la = _losses(a)
    assert {*terms, "loss"} <= set(la[0]) and ("loss_repa" in la[0]) == (method != "none")
    for term in terms:
        first, last = np.mean([m[term] for m in la[:5]]), np.mean([m[term] for m in la[-5:]])
        assert last < first - 0.05 * abs(first), (term, first, last)   # >= 5% down
    train(cfg(b, 17), log=lambda _: None)
    train(cfg(b, 30), log=lambda _: None)
    assert [m["loss"] for m in _losses(b)] == [m["loss"] for m in la]
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        wa, wb = (load_file(d / "checkpoints/step_00000030" / name) for d in (a, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
    out = tmp_path / "samples"
    assert train_main(["sample", str(a), "--out", str(out), "--mode", "ode", "--steps", "3",
                       "--batch-size", "4", "--num", "4", "--cfg", "1.5", "--grid", "0",
                       "--vae", str(tiny_vae)]) == 0
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape[0] == 4 and z["arr_0"].dtype == np.uint8


# ---------------------------------------------------------------- fields that end
@pytest.fixture
def repa_that_stops():
    """A method registered for the test: REPA whose alignment ends at step `stop_at`
    (HASTE's termination, in miniature): from then on it reads no teacher field."""
    from dataclasses import dataclass

    from cache.format import LABEL, MOMENTS, TOKENS
    from train.losses import flow_loss, interpolate
    from train.methods.base import posterior_sample
    from train.methods.repa import REPA

    @dataclass
    class StopArgs:
        stop_at: int = 6

    class RepaStops(REPA):
        name = "test-repa-stops"
        Args = StopArgs

        def fields_at(self, step):
            return self.fields if step < self.args.stop_at else ()

        def loss(self, student, batch, d, step):
            if step < self.args.stop_at:
                return super().loss(student, batch, d, step)
            assert TOKENS not in batch, f"step {step}: teacher tokens read after the end"
            x0 = posterior_sample(batch[MOMENTS], d["eps"], student.latent_scale)
            xt, v = interpolate(x0, d["noise"], d["t"])
            v_pred, _ = student.net(xt, d["t"], batch[LABEL], label_drop=d["drop"])
            loss = flow_loss(v_pred, v)
            return {"loss_v": loss, "loss": loss}

    METHODS[RepaStops.name] = RepaStops
    yield RepaStops.name
    del METHODS[RepaStops.name]


def test_the_loader_stops_reading_what_a_method_no_longer_uses(repa_that_stops, learnable,
                                                             tmp_path):
    """At the method's step the loader is replaced by one without the teacher field, at
    the same position; a run resumed before or after that step follows the
    uninterrupted one bit for bit."""
    from safetensors.torch import load_file

    from conftest import tiny_run_config
    from train.loop import train

    def run(run_dir, steps):
        msgs = []
        train(tiny_run_config(learnable, run_dir, f"align.method={repa_that_stops}",
                              "model.arch=sit-tiny/2", "data.shuffle_buffer=32",
                              "batch_size=16", "checkpoint_every=1", f"max_steps={steps}",
                              "data.num_workers=1"), log=msgs.append)
        return [m for m in msgs if "the loader reads" in m]
    a = tmp_path / "a"
    switched = run(a, 10)
    assert switched == ["step 7: the loader reads moments, label, index (no longer tokens)"]
    la = _losses(a)
    assert "loss_repa" in la[5] and "loss_repa" not in la[6]
    for stop, name in ((4, "b"), (8, "c")):          # interrupted before and after
        d = tmp_path / name
        run(d, stop)
        first = 7 if stop < 6 else stop + 1           # the first step the rerun computes
        assert run(d, 10) == [f"step {first}: the loader reads moments, label, index "
                              "(no longer tokens)"]
        assert [m["loss"] for m in _losses(d)] == [m["loss"] for m in la], name
        for f in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
            wa, wd = (load_file(r / "checkpoints/step_00000010" / f) for r in (a, d))
            assert all(torch.equal(wa[k], wd[k]) for k in wa), (name, f)
