"""REG (train/methods/reg.py) and its composition urepa-reg, trained for real on the tiny
structured cache: their terms fall, a run resumes bit-exactly, `train sample` integrates
the CLS token with the latent, and the cache and option checks name what is wrong."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from cache import CacheSpec, open_cache
from cache.format import CLS, FieldSpec
from cache.synthetic import write_synthetic_cache
from conftest import tiny_run_config, write_structured_cache
from pipeline.encoders import TINY_VAE_CONFIG, build_vae, weights_sha256
from train.checkpoint import CheckpointError, load_backbone
from train.cli import main as train_main
from train.config import ConfigError, load_config
from train.data import check_cache
from train.generate import SampleSettings, block_generator
from train.loop import train
from train.methods import METHODS
from train.sampling import Guidance, sample_ode

ROOT = Path(__file__).resolve().parents[1]
SPEC = CacheSpec(num_samples=96, shard_size=32, latent_size=8, tokens=16, token_dim=32)
STEPS = 40      # the REG run (SiT-tiny/2 learns slower than SiT-down-tiny/2)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread; on a shared machine two threads spin-wait
    (40 steps: 1.8 s on one thread vs 15 s on two under load)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_structured_cache(tmp_path_factory.mktemp("cache") / "c", SPEC)


def tiny(cache, run_dir, method="reg", arch="sit-tiny/2", *extra):
    return tiny_run_config(cache, run_dir, f"align.method={method}", f"model.arch={arch}",
                           "data.shuffle_buffer=32", "batch_size=16", "optim.ema_decay=0.9",
                           "checkpoint_every=10", "keep_checkpoints=2", *extra)


def metrics(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def reg_run(cache, tmp_path_factory):
    """An uninterrupted STEPS-step REG run on SiT-tiny/2 (lambda 0.5, as the presets)."""
    run = tmp_path_factory.mktemp("reg") / "a"
    train(tiny(cache, run, "reg", "sit-tiny/2", "align.weight=0.5", f"max_steps={STEPS}"),
          log=lambda _: None)
    return run


def assert_falls(run_dir, terms, steps=STEPS):
    ms = metrics(run_dir)
    assert [m["step"] for m in ms] == list(range(1, steps + 1))
    for term in terms:
        first, last = np.mean([m[term] for m in ms[:5]]), np.mean([m[term] for m in ms[-5:]])
        assert last < first - 0.1 * abs(first), (term, first, last)


# ------------------------------------------------------------------ training
def test_reg_terms_fall_and_the_generator_keeps_the_cls_parts(reg_run):
    assert_falls(reg_run, ("loss", "loss_v", "loss_cls", "loss_repa"))
    assert "loss_ml" not in metrics(reg_run)[0]
    for name, pre in (("model.safetensors", "net."), ("ema.safetensors", "")):
        w = load_file(reg_run / "checkpoints" / f"step_{STEPS:08d}" / name)
        assert w[pre + "cls_embedder.0.weight"].shape == (64, 32)           # D_t -> D
        assert w[pre + "cls_embedder.1.weight"].shape == (64,)              # LayerNorm affine
        assert w[pre + "cls_head.weight"].shape == (32, 64)
        assert w[pre + "cls_head.weight"].abs().max() > 0                   # trained off zero


def test_urepa_reg_terms_fall_on_sit_down(cache, tmp_path):
    train(tiny(cache, tmp_path, "urepa-reg", "sit-down-tiny/2", "max_steps=30"),
          log=lambda _: None)
    assert_falls(tmp_path, ("loss", "loss_v", "loss_cls", "loss_repa"), steps=30)
    for m in metrics(tmp_path):   # L = L_v + beta L_v(cls) + lambda (L_REPA + w L_ML)
        assert m["loss_ml"] > 0
        assert m["loss"] == pytest.approx(m["loss_v"] + 0.03 * m["loss_cls"]
                                          + 0.25 * (m["loss_repa"] + 3 * m["loss_ml"]))
    cfg = tiny(cache, tmp_path, "urepa-reg", "sit-down-tiny/2")
    assert (cfg.align.weight, cfg.align.manifold_weight) == (0.25, 3.0)  # U-REPA's defaults


def test_reg_resumes_bit_exactly(cache, reg_run, tmp_path):
    b = tmp_path / "b"
    train(tiny(cache, b, "reg", "sit-tiny/2", "align.weight=0.5", "max_steps=12"),
          log=lambda _: None)                                            # "interrupted"
    msgs = []
    train(tiny(cache, b, "reg", "sit-tiny/2", "align.weight=0.5", f"max_steps={STEPS}"),
          log=msgs.append)
    assert any("resumed from" in m and "step_00000012" in m for m in msgs)
    ma, mb = metrics(reg_run), metrics(b)
    for term in ("loss", "loss_v", "loss_cls", "loss_repa"):
        assert [m[term] for m in mb] == [m[term] for m in ma], term
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        wa, wb = (load_file(d / "checkpoints" / f"step_{STEPS:08d}" / name) for d in (reg_run, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


def test_draws_and_terms_are_regs(cache, tmp_path):
    """The CLS noise comes after REPA's draws; token 0 is the embedded noisy CLS; the terms
    are REG's formulas, and the REPA target is [cls; patch tokens]."""
    import torch.nn.functional as F

    from cache.format import LABEL, MOMENTS, TOKENS
    from train.losses import interpolate
    from train.methods import step_draws
    from train.step import Student, build_generator
    cfg = tiny(cache, tmp_path, "reg", "sit-tiny/2", "align.weight=0.5")
    torch.manual_seed(0)
    net, method = build_generator(cfg)
    student = Student(net, method, latent_scale=0.18215)
    assert not net.cls_head.weight.any() and not net.cls_head.bias.any()   # zero head
    g = torch.Generator().manual_seed(5)
    d = method.draws(4, (8, 8, 8), generator=g)
    g.manual_seed(5)
    ref = step_draws(4, (8, 8, 8), 0.1, generator=g)
    assert all(torch.equal(d[k], ref[k]) for k in ref)                 # REPA's draws, then
    assert torch.equal(d["cls_noise"], torch.randn((4, 32), generator=g))  # the CLS's
    with torch.no_grad():
        net.cls_head.weight.normal_()                                 # a head that answers
    gen = torch.Generator().manual_seed(1)
    batch = {MOMENTS: torch.randn(4, 8, 8, 8, generator=gen),
             TOKENS: torch.randn(4, 16, 32, generator=gen).half(),
             CLS: torch.randn(4, 32, generator=gen).half(),
             LABEL: torch.tensor([0, 1, 2, 3])}
    out = student(batch, d)
    c = batch[CLS].float()
    ct, vc = interpolate(c, d["cls_noise"], d["t"])
    z = (batch[MOMENTS][:, :4] + batch[MOMENTS][:, 4:] * d["eps"]) * 0.18215
    xt, _ = interpolate(z, d["noise"], d["t"])
    v, hidden, pre = net(xt, d["t"], batch[LABEL], align_depth=1, label_drop=d["drop"],
                         prefix=net.cls_embedder(ct)[:, None])
    assert hidden.shape == (4, 17, 64)                                  # CLS + 16 tokens
    loss_cls = (net.cls_head(pre[:, 0]) - vc).pow(2).mean()
    y = torch.cat([c[:, None], batch[TOKENS].float()], dim=1)            # [4, 17, 32]
    repa = -F.cosine_similarity(student.projector(hidden, 17), y, dim=-1).mean()
    torch.testing.assert_close(out["loss_cls"], loss_cls)
    torch.testing.assert_close(out["loss_repa"], repa)
    torch.testing.assert_close(out["loss"], out["loss_v"] + 0.03 * loss_cls + 0.5 * repa)


# ------------------------------------------------------------------ sampling
@pytest.fixture(scope="module")
def vae_run(tmp_path_factory):
    """A 4-step REG run on a cache that records a random tiny VAE (so `train sample` can
    decode), as `pipeline encode --vae tiny --random-weights --seed 3` would."""
    tmp = tmp_path_factory.mktemp("regsample")
    vae = {"weights_sha256": weights_sha256(build_vae("tiny", random_weights=True, seed=3)),
           "scaling_factor": 0.18215, "latent_channels": 4,
           "config": {k: list(v) if isinstance(v, tuple) else v
                      for k, v in TINY_VAE_CONFIG.items()}}
    spec = CacheSpec(num_samples=32, shard_size=16, latent_size=8, tokens=16, token_dim=32)
    cache = write_synthetic_cache(tmp / "cache", spec, provenance={
        "vae": vae, "command": {"vae": "tiny", "seed": 3}})
    train(tiny_run_config(cache, tmp / "run", "align.method=reg", "model.arch=sit-tiny/2",
                          "data.shuffle_buffer=16", "batch_size=8", "max_steps=4",
                          "optim.ema_decay=0.5"), log=lambda _: None)
    return tmp / "run"


def test_train_sample_writes_the_npz(vae_run, tmp_path):
    out = tmp_path / "s"
    assert train_main(["sample", str(vae_run), "--out", str(out), "--mode", "ode",
                       "--steps", "3", "--batch-size", "4", "--num", "6", "--cfg", "1.5",
                       "--cls-cfg", "2.0"]) == 0
    with np.load(out / "samples.npz") as z:
        assert z["arr_0"].shape == (6, 64, 64, 3) and z["arr_1"].shape == (6,)
    rec = json.loads((out / "sample.json").read_text())
    assert rec["method"] == "reg" and rec["cls_cfg"] == 2.0 and rec["interval"] == [0.0, 0.85]


def test_the_sampler_integrates_the_cls_token_jointly(reg_run):
    net, ck = load_backbone(reg_run)
    method = ck.method()
    settings = SampleSettings(cfg=1.5, cls_cfg=2.0, mode="ode", steps=2)
    sampling = method.sampling(net, settings, num_classes=1000, dtype=torch.float32)
    assert sampling.interval == (0.0, 0.85) and sampling.record() == {"cls_cfg": 2.0}
    none = method.sampling(net, SampleSettings(cfg=1.5), num_classes=1000,
                           dtype=torch.float32)
    assert none.record() == {"cls_cfg": 1.5}                          # None -> cfg
    k = 4 * 8 * 8

    gen = block_generator(0, 0, "cpu")
    cond = sampling.condition(gen, 3)
    x0 = sampling.initial(gen, (3, 4, 8, 8))
    ref = block_generator(0, 0, "cpu")
    torch.randint(1000, (3,), generator=ref)
    z_ref = torch.randn((3, 4, 8, 8), generator=ref)
    assert x0.shape == (3, k + 32)                                    # [n, C*h*w + D_t]
    assert torch.equal(x0[:, :k], z_ref.flatten(1))                   # latent noise first,
    assert torch.equal(x0[:, k:], torch.randn((3, 32), generator=ref))  # then the CLS's
    scale = sampling.scale(x0)
    assert scale.dtype == torch.float64
    assert (scale[..., :k] == 1.5).all() and (scale[..., k:] == 2.0).all()

    prefixes = []
    hook = net.register_forward_pre_hook(
        lambda _m, _a, kw: prefixes.append(kw.get("prefix")), with_kwargs=True)
    try:
        g = Guidance(scale=scale, null_label=sampling.null, interval=sampling.interval)
        x = sample_ode(sampling.velocity, x0, cond, steps=2, method="euler", guidance=g)
    finally:
        hook.remove()
    # step 1 (t = 1) unguided, step 2 (t = 0.5) guided: one batched call on [x; x]
    assert [None if p is None else tuple(p.shape) for p in prefixes] == [(3, 1, 64),
                                                                          (6, 1, 64)]
    assert (x[:, k:] - x0[:, k:]).abs().max() > 1e-3                  # the CLS moved
    assert torch.equal(sampling.latent(x), x[:, :k].reshape(3, 4, 8, 8))

    # the CLS scale acts on the CLS part only: the guided step's velocities are the same
    other = method.sampling(net, SampleSettings(cfg=1.5, cls_cfg=3.0), num_classes=1000,
                            dtype=torch.float32)
    g3 = Guidance(scale=other.scale(x0), null_label=other.null, interval=other.interval)
    x3 = sample_ode(other.velocity, x0, cond, steps=2, method="euler", guidance=g3)
    assert torch.equal(x3[:, :k], x[:, :k])
    assert (x3[:, k:] - x[:, k:]).abs().max() > 1e-4


# ------------------------------------------------------------------ checks
class WideClsSpec(CacheSpec):
    """A spec whose CLS width (48) differs from its patch-token width (32)."""

    @property
    def fields(self):
        return {**super().fields, CLS: FieldSpec((self.views, 48), "float16")}


def test_the_cls_width_is_checked(cache, tmp_path):
    cfg = tiny(cache, tmp_path, "reg", "sit-tiny/2", "align.teacher_dim=24")
    with pytest.raises(ConfigError) as e:
        check_cache(open_cache(cache), cfg)
    assert "CLS width: cache CLS tokens are 32-d vs align.teacher_dim=24" in str(e.value)
    check_cache(open_cache(cache), tiny(cache, tmp_path))                # fits
    wide = WideClsSpec(**{k: getattr(SPEC, k) for k in SPEC.__dataclass_fields__})
    for name in ("reg", "urepa-reg"):
        method = METHODS[name](cfg.align.__class__(teacher_dim=32), METHODS[name].Args(),
                               cfg.model)
        assert method.check_cache(wide, "sit-tiny/2", 8) == [
            "CLS width: cache CLS tokens are 48-d vs align.teacher_dim=32 "
            f"({name}'s CLS embedder input and head output); set align.teacher_dim to the "
            "cache's width"]


def test_cls_weight_is_checked_and_the_presets_load(cache, tmp_path):
    with pytest.raises(ConfigError, match=r"method_args.cls_weight=-1"):
        tiny(cache, tmp_path, "reg", "sit-tiny/2", "method_args.cls_weight=-1")
    assert tiny(cache, tmp_path, "reg", "sit-tiny/2",
                "method_args.cls_weight=0.05").method_args == {"cls_weight": 0.05}
    for preset, arch, depth in (("reg-xl", "sit-xl/2", 8), ("reg-b", "sit-b/2", 4)):
        cfg = load_config(ROOT / "configs" / f"{preset}.yaml")
        assert (cfg.model.arch, cfg.align.method, cfg.align.depth, cfg.align.weight,
                cfg.method_args) == (arch, "reg", depth, 0.5, {"cls_weight": 0.03})


# ------------------------------------------------------------------ read from disk (review)
def _tampered(run_dir, tmp_path, **config):
    """A copy of the run's newest checkpoint whose checkpoint.json config says otherwise."""
    import shutil

    from train.checkpoint import checkpoints
    ckpt = tmp_path / "ckpt"
    shutil.copytree(checkpoints(run_dir)[-1], ckpt)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    meta["config"].update(config)
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    return ckpt


def test_a_checkpoint_whose_method_parts_do_not_fit_is_refused_before_building(
        reg_run, tmp_path, capsys):
    """A recorded align.teacher_dim sizes REG's CLS embedder and head: 10^9 must be refused
    from the weights' shapes, not by trying to allocate 256 GB."""
    ckpt = _tampered(reg_run, tmp_path, **{"align.teacher_dim": 10**9})
    assert train_main(["sample", str(ckpt), "--out", str(tmp_path / "s"), "--num", "1",
                       "--mode", "ode", "--steps", "2", "--vae", "random"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "align.method=reg" in err, err
    assert "cls_embedder.0.weight: checkpoint [64, 32] vs model [64, 1000000000]" in err, err


def test_convert_refuses_a_generator_that_is_not_a_plain_sit(reg_run, tmp_path, capsys):
    """REPA's layout has no place for REG's CLS embedder and head: `train convert` must not
    write a .pt that neither REPA's generate.py nor `train sample` can load."""
    out = tmp_path / "reg.pt"
    assert train_main(["convert", str(reg_run), str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "align.method=reg" in err and "cls_embedder" in err, err
    assert not out.exists()
    # a config whose method does not load is refused too (what are these weights?)
    ckpt = _tampered(reg_run, tmp_path, **{"align.method": "bogus"})
    assert train_main(["convert", str(ckpt), str(tmp_path / "b.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "align.method='bogus'" in err, err


def test_a_recorded_option_name_with_newlines_stays_one_line(reg_run, tmp_path, capsys):
    ckpt = _tampered(reg_run, tmp_path, **{"method_args.a\nb": 1})
    assert train_main(["sample", str(ckpt), "--out", str(tmp_path / "s"), "--num", "1",
                       "--mode", "ode", "--steps", "2", "--vae", "random"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "method_args.'a\\nb'" in err, err


def test_a_sampling_flag_of_another_method_is_refused(reg_run, tmp_path, capsys):
    """--bank is GMem's: on a REG checkpoint it would be recorded in sample.json and do
    nothing; refused in one line before any sample."""
    out = tmp_path / "s"
    assert train_main(["sample", str(reg_run), "--out", str(out), "--num", "1", "--mode",
                       "ode", "--steps", "2", "--vae", "random", "--bank", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --bank ") and "reg" in err, err
    assert "gmem" in err and not out.exists(), err


def test_init_from_a_checkpoint_of_another_method_names_both(cache, reg_run, tmp_path):
    """A REPA run started from a REG checkpoint: its CLS parts are no geometry mismatch;
    the refusal says which methods differ."""
    cfg = tiny(cache, tmp_path / "r", "repa", "sit-tiny/2", f"model.init_from={reg_run}",
               "max_steps=1")
    with pytest.raises(CheckpointError) as e:
        train(cfg, log=lambda _m: None)
    text = str(e.value)
    assert "unexpected (6): cls_embedder" in text, text
    assert "trained with align.method=reg" in text and "this run's align.method=repa" in text


@pytest.mark.parametrize("key, value, message", [
    ("align.weight", "x", "align.weight='x': expected float"),
    ("align.depth", [3], "align.depth=[3]: expected int or null"),
    ("model.checkpointing", "yes", "model.checkpointing='yes': expected bool"),
    ("method_args.cls_weight", "${oc.env:HOME}", "holds an interpolation"),
])
def test_a_recorded_config_value_of_the_wrong_type_is_named(reg_run, tmp_path, capsys, key,
                                                            value, message):
    ckpt = _tampered(reg_run, tmp_path, **{key: value})
    assert train_main(["convert", str(ckpt), str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
