"""The encoders: exact preprocessing, official DINOv2 checkpoints, clear weight errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from timm.layers import resample_abs_pos_embed

from pipeline.encoders import (Encoder, WeightsError, build_teacher, build_vae,
                               weights_sha256)


@pytest.fixture(scope="module")
def tiny():
    return (build_vae("tiny", random_weights=True),
            build_teacher("dinov2-tiny", resolution=64, random_weights=True))


def test_encode_matches_the_recipe(tiny):
    vae, teacher = tiny
    images = np.random.default_rng(0).integers(0, 256, (5, 64, 64, 3), dtype=np.uint8)
    out = Encoder(vae, teacher, resolution=64, batch_size=2).encode(images)
    assert out["moments"].shape == (5, 8, 8, 8) and out["moments"].dtype == np.float32
    assert out["tokens"].shape == (5, 16, 64) and out["tokens"].dtype == np.float16
    assert out["cls"].shape == (5, 64)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        post = vae.encode(x / 127.5 - 1).latent_dist
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        t = F.interpolate((x / 255 - mean) / std, size=(56, 56), mode="bicubic",
                          align_corners=False)   # 64 px -> 4x4 tokens of 14 px
        feats = teacher.forward_features(t)
    np.testing.assert_allclose(out["moments"][:, :4], post.mean.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["moments"][:, 4:], post.std.numpy(), atol=1e-5)
    np.testing.assert_allclose(out["tokens"], feats[:, 1:].numpy(), atol=2e-3, rtol=2e-3)
    np.testing.assert_allclose(out["cls"], feats[:, 0].numpy(), atol=1e-5)
    # a shard: failed rows stay zero, the others equal the plain encode
    shard = np.stack([images, images[:, :, ::-1]], axis=1)          # [5, 2, 64, 64, 3]
    enc = Encoder(vae, teacher, resolution=64, batch_size=3).encode_shard(shard, {1})
    assert enc["tokens"].shape == (5, 2, 16, 64) and not enc["tokens"][1].any()
    np.testing.assert_allclose(enc["moments"][[0, 2, 3, 4], 0], out["moments"][[0, 2, 3, 4]],
                               atol=1e-5)


def test_read_only_images_encode_without_a_warning(tiny):
    """Ray hands a shard's images over read-only: encoding them is silent (issue 17)."""
    import warnings
    vae, teacher = tiny
    images = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    ref = Encoder(vae, teacher, resolution=64).encode(images)
    images.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = Encoder(vae, teacher, resolution=64).encode(images)
    np.testing.assert_array_equal(out["tokens"], ref["tokens"])


def test_random_weights_are_reproducible():
    a = build_teacher("dinov2-tiny", resolution=64, random_weights=True, seed=3)
    b = build_teacher("dinov2-tiny", resolution=64, random_weights=True, seed=3)
    c = build_teacher("dinov2-tiny", resolution=64, random_weights=True, seed=4)
    assert weights_sha256(a) == weights_sha256(b) != weights_sha256(c)


def _official_state_dict(timm_model, registers: bool):
    """The layout of Meta's dinov2_vit*14[_reg4]_pretrain.pth, built from a timm model at
    the native 518 px: a cls position inside pos_embed, mask_token, register_tokens."""
    sd = {k: v.clone() for k, v in timm_model.state_dict().items()}
    dim = sd["cls_token"].shape[-1]
    sd["mask_token"] = torch.zeros(1, dim)
    if registers:
        pos0 = torch.randn(1, 1, dim)
        sd["register_tokens"] = sd.pop("reg_token")
        sd["cls_token"] = sd["cls_token"] - pos0
        sd["pos_embed"] = torch.cat([pos0, sd["pos_embed"]], dim=1)
    return sd


@pytest.mark.parametrize("name", ["dinov2-tiny", "dinov2-tiny-reg"])
def test_official_checkpoint_loads(tmp_path, name):
    import timm

    from pipeline.encoders import TEACHERS
    spec = TEACHERS[name]
    native = timm.create_model(spec.arch, img_size=518, num_classes=0, **spec.kwargs).eval()
    official = _official_state_dict(native, registers=spec.registers > 0)
    assert official["pos_embed"].shape[1] == 1 + 37 * 37
    torch.save(official, tmp_path / "dinov2_pretrain.pth")
    torch.save({"teacher": {"backbone." + k: v for k, v in official.items()},
                "dino_head.x": torch.zeros(1)}, tmp_path / "train_ckpt.pth")
    loaded = build_teacher(name, resolution=256, weights=tmp_path / "dinov2_pretrain.pth")
    # REPA's recipe: resample the official pos_embed (cls position kept) to 16x16
    want = resample_abs_pos_embed(official["pos_embed"], [16, 16], num_prefix_tokens=1)
    got = loaded.pos_embed if not spec.registers else torch.cat(
        [official["pos_embed"][:, :1], loaded.pos_embed], dim=1)
    torch.testing.assert_close(got, want)
    # same function as the native model where the grids agree (at 518 px the grid is 37)
    at518 = build_teacher(name, resolution=592, weights=tmp_path / "dinov2_pretrain.pth")
    x = torch.randn(2, 3, 518, 518)
    with torch.no_grad():
        # (reg4: cls_token absorbs the cls position, equal up to float rounding)
        torch.testing.assert_close(at518.forward_features(x), native.forward_features(x),
                                   atol=1e-3, rtol=1e-3)
    from_train = build_teacher(name, resolution=256, weights=tmp_path / "train_ckpt.pth")
    assert weights_sha256(from_train) == weights_sha256(loaded)


def test_weight_errors_say_what_to_do(tmp_path):
    with pytest.raises(WeightsError, match="no such file"):
        build_teacher("dinov2-b", weights=tmp_path / "missing.pth")
    small = build_teacher("dinov2-tiny-reg", resolution=64, random_weights=True)
    torch.save(small.state_dict(), tmp_path / "reg.pth")
    with pytest.raises(WeightsError, match="does not fit"):
        build_teacher("dinov2-s", weights=tmp_path / "reg.pth")
    # offline with an empty cache (tests/conftest.py): the hub cannot be reached
    with pytest.raises(WeightsError, match="--teacher-weights"):
        build_teacher("dinov2-b")
    with pytest.raises(WeightsError, match="--random-weights"):
        build_vae("stabilityai/sd-vae-ft-mse")
    with pytest.raises(WeightsError, match="no published weights"):
        build_teacher("dinov2-tiny")
    (tmp_path / "notavae").mkdir()
    with pytest.raises(WeightsError, match="config.json"):
        build_vae(str(tmp_path / "notavae"))


def test_official_giant_swiglu_keys_load(tmp_path):
    """ViT-g's official checkpoint names its SwiGLU w12/w3 (timm: fc1/fc2)."""
    import timm

    from pipeline.encoders import load_teacher_weights
    # width 96: SwiGLU's hidden size (x 2.667) must be even
    kw = dict(img_size=518, num_classes=0, embed_dim=96, depth=2, num_heads=2)
    native = timm.create_model("vit_giant_patch14_dinov2", **kw)
    official = {k.replace("mlp.fc1", "mlp.w12").replace("mlp.fc2", "mlp.w3"): v
                for k, v in _official_state_dict(native, registers=False).items()}
    assert any(".mlp.w12." in k for k in official)
    torch.save(official, tmp_path / "g.pth")
    fresh = timm.create_model("vit_giant_patch14_dinov2", **kw)
    load_teacher_weights(fresh, tmp_path / "g.pth")
    assert weights_sha256(fresh) == weights_sha256(native)
