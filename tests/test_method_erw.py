"""ERW (train/methods/erw.py) on a learnable cache: phase 1 on clean latents at t = 0
trains only the first blocks (the projection loss falls, later blocks and the final
layer stay bit-identical to their init), phase 2 learns the velocity; at the boundary
the optimizer starts over and the EMA equals the weights; a run interrupted in phase 1,
exactly at the boundary and in phase 2 resumes bit-exactly; the weight schedule; the
preset; `train sample` on an ERW run."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.utils import set_seed
from safetensors.torch import load_file

from cache import CacheSpec
from cache.format import LABEL, MOMENTS, TOKENS
from conftest import tiny_run_config, write_structured_cache
from train.cli import main as train_main
from train.config import ConfigError, load_config
from train.losses import repa_loss
from train.loop import train
from train.methods import PhaseChange, build_method
from train.methods.base import posterior_sample, step_draws
from train.step import Student, build_generator

ROOT = Path(__file__).resolve().parents[1]
SPEC = CacheSpec(num_samples=96, shard_size=32, latent_size=8, tokens=16, token_dim=32)
W, STEPS = 6, 28               # warm-up steps, steps in all
STOPS = (3, W, W + 1)          # run "b" is interrupted in phase 1, at the boundary, after it
DECAY = 0.9


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_structured_cache(tmp_path_factory.mktemp("cache") / "c", SPEC)


def erw(cache, run_dir, *extra):
    """sit-tiny/2 (2 blocks): the warm-up trains block 1, phase 2 aligns block 2."""
    return tiny_run_config(cache, run_dir, "align.method=erw", "model.arch=sit-tiny/2",
                           "align.depth=2", "align.weight=0.5", "method_args.l2r_depth=1",
                           f"method_args.warmup_steps={W}", "optim.lr=6e-3",
                           "data.shuffle_buffer=32", "batch_size=16",
                           f"optim.ema_decay={DECAY}", "checkpoint_every=1000",
                           "keep_checkpoints=10", f"max_steps={STEPS}", *extra)


@pytest.fixture(scope="module")
def runs(cache, tmp_path_factory):
    """"a" uninterrupted; "b" stopped at each of STOPS (a checkpoint there) and rerun."""
    tmp = tmp_path_factory.mktemp("erw")
    logs = {"a": [], "b": []}
    train(erw(cache, tmp / "a"), log=logs["a"].append)
    for stop in (*STOPS, STEPS):
        train(erw(cache, tmp / "b", f"max_steps={stop}"), log=logs["b"].append)
    return tmp / "a", tmp / "b", logs


def metrics(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def ckpt(run_dir, step, name):
    return load_file(Path(run_dir) / "checkpoints" / f"step_{step:08d}" / f"{name}.safetensors")


# ------------------------------------------------------------------ the two phases
def test_phase_one_trains_only_the_first_blocks_then_phase_two_learns(cache, runs):
    a, b, logs = runs
    lines = metrics(a)
    assert [m["step"] for m in lines] == list(range(1, STEPS + 1))
    one, two = lines[:W], lines[W:]
    assert all(set(m) >= {"loss", "loss_repa"} and "loss_v" not in m for m in one)
    assert all("loss_v" in m for m in two)
    assert all(m["loss"] == pytest.approx(0.5 * m["loss_repa"], rel=1e-6) for m in one)
    repa = [m["loss_repa"] for m in one]
    assert repa[-1] < repa[0] - 0.3, repa                  # cosine similarity -> 0.7
    v = [m["loss_v"] for m in two]
    assert np.mean(v[-5:]) < 0.95 * np.mean(v[:5]), v
    # block 2 and the final layer are the init's, bit for bit, after the warm-up; the
    # embedders and block 1 have moved
    cfg = erw(cache, a)
    set_seed(cfg.seed)                                     # as train() builds the model
    init = build_generator(cfg)[0].state_dict()
    model, ema = ckpt(b, W, "model"), ckpt(b, W, "ema")
    frozen = [k for k in init if k.startswith(("blocks.1.", "final_layer."))]
    trained = [k for k in init if k.startswith(("blocks.0.", "x_embedder.", "t_embedder.",
                                                "y_embedder."))]
    assert len(frozen) > 10 and len(trained) > 10
    assert all(torch.equal(model["net." + k], init[k]) and torch.equal(ema[k], init[k])
               for k in frozen)
    assert all(not torch.equal(model["net." + k], init[k]) for k in trained)
    assert sum("phase full training" in m for m in logs["a"]) == 1


def test_the_boundary_restarts_the_optimizer_and_the_ema(cache, runs):
    _, b, logs = runs
    cfg = erw(cache, b)
    net, method = build_generator(cfg)
    names = [n for n, _ in Student(net, method, latent_scale=1.0).named_parameters()]

    def steps(opt):   # parameter name -> AdamW's step count
        return {names[int(k.split(".")[1])]: v.item() for k, v in opt.items()
                if k.endswith(".step")}

    # the warm-up's optimizer knows only the parameters phase 1 reaches
    before = steps(ckpt(b, W, "optimizer"))
    assert set(before) == {n for n in names
                           if not n.startswith(("net.blocks.1.", "net.final_layer."))}
    assert set(before.values()) == {W}
    # one step later: every parameter has one step of a fresh AdamW
    after = steps(ckpt(b, W + 1, "optimizer"))
    assert set(after) == set(names) and set(after.values()) == {1}
    # the EMA restarted from the weights at W: ema(W+1) = lerp(w(W), w(W+1), 1 - decay)
    model_w, model_w1, ema_w, ema_w1 = (ckpt(b, W, "model"), ckpt(b, W + 1, "model"),
                                        ckpt(b, W, "ema"), ckpt(b, W + 1, "ema"))
    assert not torch.equal(ema_w["blocks.0.mlp.0.weight"],
                           model_w["net.blocks.0.mlp.0.weight"])   # the reset matters
    for k, e in ema_w1.items():
        want = torch.lerp(model_w["net." + k], model_w1["net." + k], 1 - DECAY)
        torch.testing.assert_close(e, want, rtol=0, atol=1e-6, msg=k)
    assert any("resumed from" in m and f"step_{W:08d}" in m for m in logs["b"])
    assert sum("phase full training" in m for m in logs["b"]) == 1   # the resume from W


def test_interrupted_in_phase_one_at_the_boundary_and_after_resumes_exactly(runs):
    a, b, logs = runs
    for stop in STOPS:
        assert any("resumed from" in m and f"step_{stop:08d}" in m for m in logs["b"]), stop
    la, lb = metrics(a), metrics(b)
    assert [m["step"] for m in lb] == [m["step"] for m in la]
    for term in ("loss", "loss_repa", "loss_v", "grad_norm"):
        assert [m.get(term) for m in lb] == [m.get(term) for m in la], term
    for name in ("model", "ema", "optimizer"):
        wa, wb = ckpt(a, STEPS, name), ckpt(b, STEPS, name)
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_no_metrics_line_averages_the_two_phases(cache, runs, tmp_path):
    """A log window that spans the boundary is cut there: phase 1's loss (w_1 * L_REPA at
    block l, negative) and phase 2's (L_v + ...) are different quantities, and so are
    their loss_repa (block l vs block k)."""
    a, _, _ = runs
    every = metrics(a)                                   # log_every=1: one line per step
    run = tmp_path / "r"
    train(erw(cache, run, "log_every=4", f"max_steps={W + 3}"), log=lambda _m: None)
    lines = metrics(run)
    assert [m["step"] for m in lines] == [4, W, 8, W + 3]
    for m, (lo, hi) in zip(lines, [(1, 4), (5, W), (W + 1, 8), (W + 3, W + 3)]):
        window = every[lo - 1:hi]
        for term in ("loss", "loss_repa", "loss_v"):
            have = [e[term] for e in window if term in e]
            assert (term in m) == bool(have), (m["step"], term)
            if have:
                assert m[term] == pytest.approx(np.mean(have), rel=1e-6), (m["step"], term)


def test_erw_checkpoint_samples(runs, tmp_path):
    from diffusers import AutoencoderKL
    from pipeline.encoders import TINY_VAE_CONFIG
    a, _, _ = runs
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(tmp_path / "vae")  # the cache has none
    out = tmp_path / "s"
    assert train_main(["sample", str(a), "--out", str(out), "--mode", "ode", "--steps", "3",
                       "--batch-size", "4", "--num", "4", "--vae", str(tmp_path / "vae")]) == 0
    with np.load(out / "samples.npz") as z:
        arr = z["arr_0"]
    assert arr.shape[0] == 4 and arr.std() > 0


# ------------------------------------------------------------------ the objective
def test_phase_one_sees_the_clean_latent_at_t0_and_phase_two_is_repa(cache, tmp_path):
    cfg = erw(cache, tmp_path)
    set_seed(0)
    net, method = build_generator(cfg)
    student = Student(net, method, latent_scale=0.18215)
    torch.manual_seed(1)
    with torch.no_grad():     # SiT's init zeroes adaLN (t and y would not matter) and the head
        for p in net.parameters():
            p.add_(0.05 * torch.randn_like(p))
    n = 6
    batch = {MOMENTS: torch.randn(n, 8, 8, 8), LABEL: torch.randint(4, (n,)),
             TOKENS: torch.randn(n, 16, 32)}
    d = step_draws(n, (8, 8, 8), 0.1, generator=torch.Generator().manual_seed(2))
    other = {**d, "t": torch.rand(n), "noise": torch.randn(n, 4, 8, 8)}
    out = student(batch, d, 0)
    assert set(out) == {"loss", "loss_repa"}
    z = posterior_sample(batch[MOMENTS], d["eps"], 0.18215)
    _, h = net(z, torch.zeros(n), batch[LABEL], align_depth=1, stop_after=1,
               label_drop=d["drop"])
    want = repa_loss(student.projector(h, out_tokens=16), batch[TOKENS])
    assert torch.equal(out["loss_repa"], want) and torch.equal(out["loss"], 0.5 * want)
    assert torch.equal(student(batch, other, W - 1)["loss"], out["loss"])  # t, noise unused
    # phase 2: L_v + c0 * 2^(-(s - W) / T) * L_REPA at block 2, on the noisy path
    for step, weight in ((W, 0.5), (W + 50_000, 0.25)):
        two = student(batch, d, step)
        assert set(two) == {"loss", "loss_v", "loss_repa"}
        assert two["loss"].item() == pytest.approx(
            (two["loss_v"] + weight * two["loss_repa"]).item(), rel=1e-6)
    assert not torch.equal(student(batch, other, W)["loss_v"], student(batch, d, W)["loss_v"])


def test_schedule_phase_change_and_options(cache, tmp_path):
    cfg = load_config(ROOT / "configs" / "erw-xl.yaml", [f"data.cache={cache}"])
    assert (cfg.model.arch, cfg.align.method, cfg.align.depth, cfg.align.weight) == (
        "sit-xl/2", "erw", 14, 6.0)
    assert cfg.method_args == {"warmup_steps": 100_000, "l2r_depth": 4,
                               "warmup_weight": 0.5, "half_life": 50_000.0}
    assert cfg.max_steps == 300_000
    method = build_method(cfg.align, cfg.method_args, cfg.model)
    assert method.partial_graph and method.guidance_interval == (0.0, 0.95)
    for step, weight in ((0, 0.5), (99_999, 0.5), (100_000, 6.0), (125_000, 6 / math.sqrt(2)),
                         (150_000, 3.0), (200_000, 1.5), (300_000, 0.375)):
        assert method.align_weight(step) == pytest.approx(weight, rel=1e-12), step
    assert method.phase_change(100_000) == PhaseChange("full training", True, True)
    assert [method.phase_change(s) for s in (0, 99_999, 100_001)] == [None] * 3
    spec = CacheSpec(num_samples=8, shard_size=8, latent_size=32, tokens=256, token_dim=768)
    assert method.check_cache(spec, "sit-xl/2", 32) == []
    assert "l2r_depth=4: sit-tiny/2 has 2 blocks" in " ".join(
        method.check_cache(spec, "sit-tiny/2", 32))
    text = method.describe(None)
    assert "warm-up for 100000 steps" in text and "blocks 1-4" in text and "block 14" in text
    none = build_method(cfg.align, {**cfg.method_args, "warmup_steps": 0}, cfg.model)
    assert none.phase_change(0) is None and none.align_weight(0) == 6.0
    assert "no warm-up" in none.describe(None)
    for key, value in (("warmup_steps", -1), ("l2r_depth", 0), ("half_life", 0),
                       ("warmup_weight", float("nan"))):
        with pytest.raises(ConfigError, match=key):
            erw(cache, tmp_path, f"method_args.{key}={value}")
