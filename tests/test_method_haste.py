"""HASTE from the cache (issue 16): the stored q, k rebuild the teacher's own attention; the
loss from the cache is the cross-entropy against the teacher module's attention; the
attention term falls, ends at tau with the loader's teacher columns, and a resume across
tau is exact; U-REPA + HASTE where the maps correspond, refused where they do not."""

import json
import math

import numpy as np
import pytest
import torch

from cache import CacheLoader, CacheSpec, LoaderConfig, create_cache, finalize_cache
from cache.format import ATTN, CacheMismatchError
from conftest import tiny_run_config, write_structured_cache
from pipeline.encoders import Encoder, build_teacher, build_vae
from train.config import ConfigError
from train.losses import attention_loss

RES = 64   # 4x4 teacher grid: 16 patch tokens


def smooth_images(n: int, res: int, seed: int = 0) -> np.ndarray:
    """uint8 [n, res, res, 3]: smooth random images (attention has structure to follow)."""
    g = torch.Generator().manual_seed(seed)
    x = sum(w * torch.nn.functional.interpolate(torch.randn(n, 3, s, s, generator=g),
                                                size=(res, res), mode="bicubic")
            for s, w in ((4, 1.0), (8, 0.5)))
    return (127.5 + 60 * x).clamp(0, 255).round().permute(0, 2, 3, 1).to(torch.uint8).numpy()


def sharpen(teacher, factor: float) -> None:
    """Multiply every block's q and k projections by sqrt(factor): logits x factor (random
    weights give near-uniform attention, which would flatter any storage)."""
    for blk in teacher.blocks:
        lin, c = blk.attn.qkv, blk.attn.qkv.out_features // 3
        with torch.no_grad():
            lin.weight[:2 * c] *= math.sqrt(factor)
            lin.bias[:2 * c] *= math.sqrt(factor)


def teacher_own_attention(teacher, images: np.ndarray, resolution: int,
                          blocks: tuple[int, ...]) -> torch.Tensor:
    """The teacher module's own softmax (its non-fused path, read at attn_drop's input),
    restricted to the patch tokens and renormalised: float64 [n, L, H, T, T]."""
    from pipeline.encoders import (IMAGENET_MEAN, IMAGENET_STD, teacher_input_size,
                                   teacher_pixels)
    got, hooks = {}, []
    for b in blocks:
        attn = teacher.blocks[b].attn
        attn.fused_attn = False
        hooks.append(attn.attn_drop.register_forward_hook(
            lambda _m, inp, _o, b=b: got.__setitem__(b, inp[0].double())))
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    try:
        with torch.inference_mode():
            teacher.forward_features(teacher_pixels(x, mean, std,
                                                    teacher_input_size(resolution)))
    finally:
        for h in hooks:
            h.remove()
        for b in blocks:
            teacher.blocks[b].attn.fused_attn = True
    p = teacher.num_prefix_tokens
    out = torch.stack([got[b][:, :, p:, p:] for b in blocks], 1)
    return out / out.sum(-1, keepdim=True)


def rebuilt(qk) -> torch.Tensor:
    qk = torch.as_tensor(qk).double()
    return (qk[..., 0, :, :, :] @ qk[..., 1, :, :, :].transpose(-1, -2)).softmax(-1)


def test_stored_qk_rebuild_dinov2_b_attention_within_the_documented_error():
    """Real DINOv2-B architecture (random weights, logits sharpened x8 as in
    docs/cache-format.md), 256 px, blocks 8-11, 2 images and their flips: the fp16 q, k the
    encoder stores (same forward as the tokens) give the teacher's own attention
    probabilities to a mean KL < 1e-6 and no probability off by more than 2e-3
    (documented: 2.1e-7 and 6.5e-4)."""
    res, blocks = 256, (8, 9, 10, 11)
    teacher = build_teacher("dinov2-b", resolution=res, random_weights=True)
    sharpen(teacher, 8.0)
    enc = Encoder(build_vae("tiny", random_weights=True), teacher, resolution=res,
                  attn_blocks=blocks, batch_size=4)
    images = smooth_images(2, res)
    images = np.stack([images, images[:, :, ::-1]], 1)               # [2, 2 views, ...]
    out = enc.encode_shard(images, failed=set())
    qk = out["attn_qk"]
    assert qk.shape == (2, 2, 4, 2, 12, 256, 64) and qk.dtype == np.float16
    own = teacher_own_attention(teacher, images.reshape(-1, res, res, 3), res, blocks)
    got = rebuilt(qk.reshape(4, *qk.shape[2:]))
    kl = (own * (own.clamp_min(1e-300).log() - got.log())).sum(-1)
    assert kl.mean() < 1e-6 and (own - got).abs().max() < 2e-3, (kl.mean(), kl.max())
    assert own.amax(-1).mean() > 0.05   # not near-uniform (1/256): the test has teeth
    # the tokens are those of the same forward, unchanged by the hooks
    plain = Encoder(build_vae("tiny", random_weights=True), teacher, resolution=res,
                    batch_size=4).encode_shard(images, failed=set())
    assert np.array_equal(plain["tokens"], out["tokens"])


@pytest.fixture(scope="module")
def tiny_teacher_cache(tmp_path_factory):
    """A cache encoded from 8 images by the tiny DINOv2 (2 blocks, 2 heads) with both
    blocks' attention, int8 and fp16 both tried by the tests through the loader."""
    teacher = build_teacher("dinov2-tiny", resolution=RES, random_weights=True)
    sharpen(teacher, 64.0)
    enc = Encoder(build_vae("tiny", random_weights=True), teacher, resolution=RES,
                  attn_blocks=(0, 1), batch_size=8)
    images = smooth_images(8, RES, seed=1)
    out = enc.encode_shard(images[:, None], failed=set())
    root = tmp_path_factory.mktemp("haste") / "c"
    spec = CacheSpec(num_samples=8, shard_size=8, latent_size=RES // 8, tokens=16,
                     token_dim=64, attn_blocks=(0, 1), attn_heads=2, attn_head_dim=32)
    w = create_cache(root, spec, {"random_weights": True})
    w.write_shard(0, {**out, "label": np.zeros(8, np.int64),
                      "key": [f"k{i}" for i in range(8)]})
    finalize_cache(root)
    return root, teacher, images


def test_haste_loss_from_the_cache_equals_the_cross_entropy_of_the_teachers_attention(
        tiny_teacher_cache):
    """What the trainer computes from a batch of the cache equals -sum p log softmax(s)
    with p the teacher module's own attention on the same images (cache = online)."""
    root, teacher, images = tiny_teacher_cache
    batch = next(iter(CacheLoader(root, LoaderConfig(batch_size=8, shuffle=False,
                                                     fields=(ATTN, "index"),
                                                     shuffle_buffer=8))))
    qk = batch[ATTN]                                              # [8, 2, 2, 2, 16, 32]
    assert batch["index"].tolist() == list(range(8)) and qk.dtype == torch.float16
    student = torch.randn(8, 2, 2, 16, 16, dtype=torch.float64, generator=torch.Generator()
                          .manual_seed(0)) * 2
    from_cache = attention_loss(student, qk[:, :, 0], qk[:, :, 1])
    p = teacher_own_attention(teacher, images, RES, (0, 1))
    online = -(p * student.log_softmax(-1)).sum(-1).mean()
    assert from_cache.item() == pytest.approx(online.item(), rel=2e-4)
    assert p.amax(-1).mean() > 0.15   # sharp rows (uniform: 1/16)


def test_int8_attention_reads_back_close_to_fp16(tmp_path, tiny_teacher_cache):
    """--attn-dtype int8: stored with a scale per (token, head), dequantised by the loader;
    the rebuilt attention stays within the documented int8 error of the fp16 one."""
    root, _, _ = tiny_teacher_cache
    full = CacheLoader(root, LoaderConfig(batch_size=8, shuffle=False, fields=(ATTN,),
                                          shuffle_buffer=8))
    qk16 = next(iter(full))[ATTN]
    spec = CacheSpec(num_samples=8, shard_size=8, latent_size=RES // 8, tokens=16,
                     token_dim=64, attn_blocks=(0, 1), attn_heads=2, attn_head_dim=32,
                     attn_dtype="int8")
    assert spec.fields["attn_qk_scale"].shape == (1, 2, 2, 2, 16)
    w = create_cache(tmp_path / "i8", spec)
    ds = full.ds
    raw = ds.gather(np.arange(8), ["moments", "tokens", "cls"])
    w.write_shard(0, {**raw, "attn_qk": qk16.numpy()[:, None], "label": np.zeros(8),
                      "key": [str(i) for i in range(8)]})
    finalize_cache(tmp_path / "i8")
    qk8 = next(iter(CacheLoader(tmp_path / "i8", LoaderConfig(
        batch_size=8, shuffle=False, fields=(ATTN,), shuffle_buffer=8))))[ATTN]
    a, b = rebuilt(qk16), rebuilt(qk8)
    kl = (a * (a.log() - b.log())).sum(-1)
    assert 0 < kl.mean() < 2e-3 and (a - b).abs().max() < 0.1


def test_the_attention_field_cannot_be_added_to_an_existing_cache(tmp_path):
    spec = CacheSpec(num_samples=4, shard_size=4, chunk_size=4, latent_size=4, tokens=4, token_dim=8)
    create_cache(tmp_path / "c", spec)
    with_attn = CacheSpec(num_samples=4, shard_size=4, chunk_size=4, latent_size=4, tokens=4, token_dim=8,
                          attn_blocks=(1,), attn_heads=2, attn_head_dim=4)
    with pytest.raises(CacheMismatchError, match=r"(?s)attn_blocks: existing None vs "
                                                  r"requested \[1\].*field be added"):
        create_cache(tmp_path / "c", with_attn)
    # a cache without the field keeps the manifest it had before the field existed
    m = json.loads((tmp_path / "c" / "manifest.json").read_text())
    assert not any(k.startswith("attn") for k in m["spec"]) and "attention" not in m


# ---------------------------------------------------------------- training
@pytest.fixture(scope="module")
def learnable_attn(tmp_path_factory):
    return write_structured_cache(tmp_path_factory.mktemp("learn-attn") / "c", CacheSpec(
        num_samples=96, shard_size=32, latent_size=8, tokens=16, token_dim=32,
        attn_blocks=(0, 1), attn_heads=2, attn_head_dim=8))


def _metrics(run_dir) -> list[dict]:
    return [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _config(cache, run_dir, *extra):
    return tiny_run_config(cache, run_dir, "align.method=haste", "model.arch=sit-tiny/2",
                           "data.shuffle_buffer=32", "batch_size=16",
                           "method_args.teacher_blocks=[0,1]",
                           "method_args.student_blocks=[0,1]", *extra)


def test_attention_term_falls_ends_at_tau_with_the_teacher_columns_and_resumes_exactly(
        learnable_attn, tiny_vae, tmp_path):
    from safetensors.torch import load_file

    from train.cli import main as train_main

    from train.loop import train

    def run(run_dir, steps):
        msgs = []
        train(_config(learnable_attn, run_dir, "method_args.tau=24", "checkpoint_every=20",
                      f"max_steps={steps}"), log=msgs.append)
        return [m for m in msgs if "the loader reads" in m]
    a = tmp_path / "a"
    assert run(a, 30) == ["step 25: the loader reads moments, label, index (no longer "
                          "tokens, attn_qk)"]
    la = _metrics(a)
    attn = [m["loss_attn"] for m in la if "loss_attn" in m]
    assert len(attn) == 24 and not any("loss_repa" in m for m in la[24:])
    assert np.mean(attn[-5:]) < np.mean(attn[:5]) - 0.05, attn   # the term falls
    assert all(m["loss"] == m["loss_v"] for m in la[24:])          # nothing else after tau
    b = tmp_path / "b"
    run(b, 20)                                                     # stopped before tau
    assert run(b, 30) == ["step 25: the loader reads moments, label, index (no longer "
                          "tokens, attn_qk)"]
    assert [m["loss"] for m in _metrics(b)] == [m["loss"] for m in la]
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        wa, wb = (load_file(d / "checkpoints/step_00000030" / name) for d in (a, b))
        assert all(torch.equal(wa[k], wb[k]) for k in wa), name
    out = tmp_path / "samples"   # the checkpoint rebuilds its method (list options too)
    assert train_main(["sample", str(a), "--out", str(out), "--mode", "ode", "--steps", "2",
                       "--batch-size", "4", "--num", "4", "--grid", "0",
                       "--vae", str(tiny_vae)]) == 0
    assert json.loads((out / "sample.json").read_text())["interval"] == [0.01, 0.72]


def test_after_tau_a_step_reads_no_teacher_and_leaves_the_projector_without_gradient(
        learnable_attn):
    """After tau the loss is the flow loss of a batch without teacher columns: no gradient
    reaches the alignment heads (there is no teacher anywhere to reach)."""
    from train.step import Student, build_generator
    cfg = _config(learnable_attn, "unused", "method_args.tau=5")
    net, method = build_generator(cfg)
    student = Student(net, method, latent_scale=0.18215)
    loader = CacheLoader(learnable_attn, LoaderConfig(batch_size=8, shuffle_buffer=8,
                                                      fields=("moments", "label")))
    batch = next(iter(loader))
    d = method.draws(8, tuple(batch["moments"].shape[1:]))
    out = method.loss(student, batch, d, step=5)
    out["loss"].backward()
    assert set(out) == {"loss", "loss_v"}
    assert all(p.grad is None for p in student.projector.parameters())
    assert method.fields_at(4) == ("tokens", ATTN) and method.fields_at(5) == ()


def test_urepa_haste_distils_onto_sit_down_outer_stages_and_refuses_the_middle(
        learnable_attn, tmp_path):
    from train.loop import train
    base = ["model.arch=sit-down-tiny/2", "align.method=urepa-haste",
            "method_args.tau=null", "max_steps=12", "checkpoint_every=12"]
    train(tiny_run_config(learnable_attn, tmp_path / "u", *base, "data.shuffle_buffer=32",
                          "batch_size=16", "method_args.teacher_blocks=[0,1]",
                          "method_args.student_blocks=[0,3]"), log=lambda _: None)
    m = _metrics(tmp_path / "u")
    assert {"loss_v", "loss_repa", "loss_ml", "loss_attn"} <= set(m[-1])
    with pytest.raises(ConfigError, match=r"student_blocks \[1\]: sit-down-tiny/2's blocks "
                                          r"1..2 \(0-indexed\) form its middle stage"):
        train(tiny_run_config(learnable_attn, tmp_path / "v", *base,
                              "method_args.teacher_blocks=[0,1]",
                              "method_args.student_blocks=[0,1]"), log=lambda _: None)


def test_haste_on_a_cache_without_attention_says_how_to_encode_one(tmp_path):
    from train.loop import train
    cache = write_structured_cache(tmp_path / "c", CacheSpec(
        num_samples=32, shard_size=16, latent_size=8, tokens=16, token_dim=32))
    with pytest.raises(ConfigError, match=r"does not hold: encode one with `pipeline encode "
                                          r"\.\.\. --teacher-attn 0,1`"):
        train(_config(cache, tmp_path / "r"), log=lambda _: None)
