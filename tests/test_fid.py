"""The evaluation: Frechet distance, IS and precision/recall against closed forms; the
ADM-style Inception (TF1 resize, the port's layout); `train eval` end to end."""

import numpy as np
import pytest
import torch

from train.cli import main as train_main
from train.fid import (frechet_distance, gaussian_stats, inception_score, precision_recall,
                       reference_stats)
from train.inception import FIDInception, resize_bilinear_tf1


def test_diagonal_and_rotated_gaussians_match_the_closed_form():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    v1, v2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    # diagonal: ||mu1 - mu2||^2 + sum (sqrt v1 - sqrt v2)^2
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(v1) - np.sqrt(v2)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(want, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))          # the distance is rotation-invariant
    got = frechet_distance(q @ mu1, q @ np.diag(v1) @ q.T, q @ mu2, q @ np.diag(v2) @ q.T)
    assert got == pytest.approx(want, rel=1e-8)
    s = np.cov(rng.normal(size=(50, 6)), rowvar=False)
    assert frechet_distance(mu1, s, mu1, s) == pytest.approx(0, abs=1e-8)


def test_stats_from_features_and_reference_files(tmp_path):
    rng = np.random.default_rng(1)
    f = rng.normal(size=(20000, 4)) * [1, 2, 3, 4] + [1, 0, -1, 2]
    mu, sigma = gaussian_stats(f)
    np.testing.assert_allclose(mu, [1, 0, -1, 2], atol=0.1)
    np.testing.assert_allclose(np.diag(sigma), [1, 4, 9, 16], rtol=0.05)
    np.savez(tmp_path / "ref.npz", mu=mu, sigma=sigma)
    m2, s2 = reference_stats(tmp_path / "ref.npz")
    assert frechet_distance(mu, sigma, m2, s2) == pytest.approx(0, abs=1e-8)
    np.savez(tmp_path / "imgs.npz", arr_0=np.zeros((1, 2, 2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"no \['mu', 'sigma'\]"):
        reference_stats(tmp_path / "imgs.npz")
    with pytest.raises(FileNotFoundError, match="VIRTUAL_imagenet256_labeled"):
        reference_stats(tmp_path / "nope.npz")
    with pytest.raises(ValueError, match="shape mismatch"):
        frechet_distance(mu, sigma, mu[:3], sigma[:3, :3])


# ------------------------------------------------------------------ IS, precision, recall
def test_inception_score_closed_forms():
    k = 8
    confident = np.full((k, k), -50.0)
    np.fill_diagonal(confident, 50.0)               # one sure, distinct class per image
    assert inception_score(confident) == pytest.approx(k, rel=1e-9)
    assert inception_score(np.zeros((k, k))) == pytest.approx(1.0)   # all uniform
    # splits are scored separately: two splits of one class each score 1, not 2
    two = np.repeat(confident[:2], 4, axis=0)
    assert inception_score(two) == pytest.approx(2.0)
    assert inception_score(two, split_size=4) == pytest.approx(1.0)


def test_precision_and_recall_on_points_with_known_neighbours():
    real = np.arange(10.0)[:, None]                 # k = 3: each ball has radius 3 (ends 3)
    assert precision_recall(real, real) == (1.0, 1.0)
    assert precision_recall(real, real + 100) == (0.0, 0.0)
    # five fakes on [0, 2] (inside) and five at 100..102: precision 1/2. The fakes' balls
    # (radius to their 3rd neighbour: 1 to 1.5) cover the reals 0, 1, 2, 3: recall 4/10
    fake = np.concatenate([np.linspace(0, 2, 5), np.linspace(100, 102, 5)])[:, None]
    p, r = precision_recall(real, fake)
    assert p == 0.5 and r == pytest.approx(0.4)
    with pytest.raises(ValueError, match="more than k=3"):
        precision_recall(real[:3], real)


# ------------------------------------------------------------------ the network
def test_tf1_bilinear_resize_samples_at_i_times_in_over_out():
    x = torch.tensor([[[[1.0, 3.0]]]])
    assert resize_bilinear_tf1(x, 4)[0, 0, 0].tolist() == [1.0, 2.0, 3.0, 3.0]
    y = torch.arange(16.0).reshape(1, 1, 4, 4)      # down by 2: pixels 0 and 2, no blur
    assert torch.equal(resize_bilinear_tf1(y, 2), y[..., ::2, ::2])
    z = torch.rand(2, 3, 6, 6)
    assert torch.equal(resize_bilinear_tf1(z, 6), z)


def test_the_network_loads_the_ports_layout_and_finds_weights(tmp_path, monkeypatch):
    from torchvision.models.inception import Inception3
    ours = FIDInception(random_weights=True)
    port = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    assert ours.net.state_dict().keys() == port.state_dict().keys()
    path = tmp_path / "weights.pth"
    torch.save(ours.net.state_dict(), path)
    monkeypatch.setenv("UREPA_INCEPTION_WEIGHTS", str(path))
    loaded = FIDInception()                         # found through the setting
    assert "not pt_inception-2015-12-05" in loaded.warning
    images = torch.randint(0, 256, (3, 40, 40, 3), dtype=torch.uint8)
    pool, logits = loaded(images)
    assert pool.shape == (3, 2048) and logits.shape == (3, 1008)
    assert torch.equal(pool, ours(images)[0])
    # TF pooling: the padded border does not dilute the average (torchvision's would)
    block = ours.net.Mixed_5b
    x = torch.ones(1, 192, 5, 5)
    pooled = block.branch_pool(torch.nn.functional.avg_pool2d(x, 3, 1, 1,
                                                              count_include_pad=False))
    assert torch.equal(block(x)[:, -32:], pooled)


# ------------------------------------------------------------------ train eval
def _npz(path, images, **extra):
    np.savez(path, images, **extra)
    return path


def test_train_eval_end_to_end(tmp_path, capsys, monkeypatch):
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) // 2 + 60, 0, 255).astype(np.uint8)
    sa, sb = _npz(tmp_path / "a.npz", a), _npz(tmp_path / "b.npz", b)
    out = tmp_path / "r.json"
    assert train_main(["eval", str(sa), "--ref", str(sa), "--random-weights",
                       "--batch-size", "7", "--out", str(out)]) == 0
    import json
    same = json.loads(out.read_text())
    assert same["fid"] == pytest.approx(0, abs=1e-6) and same["samples"] == 24
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    assert "random-init Inception" in capsys.readouterr().out
    # a reference batch with statistics only: FID from them, no precision/recall
    model = FIDInception(random_weights=True)
    mu, sigma = gaussian_stats(model(torch.from_numpy(b))[0].double().numpy())
    stats = tmp_path / "ref.npz"
    np.savez(stats, mu=mu, sigma=sigma)
    assert train_main(["eval", str(sa), "--ref", str(stats), "--random-weights",
                       "--out", str(out)]) == 0
    vs_stats = json.loads(out.read_text())
    assert "precision" not in vs_stats and vs_stats["fid"] > 0.01
    assert train_main(["eval", str(sa), "--ref", str(sb), "--random-weights",
                       "--out", str(out)]) == 0
    assert json.loads(out.read_text())["fid"] == pytest.approx(vs_stats["fid"], rel=1e-6)
    # clear errors: missing weights, float images, no images at all, a missing file
    monkeypatch.delenv("UREPA_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    capsys.readouterr()
    assert train_main(["eval", str(sa), "--ref", str(sb)]) == 2
    assert "FID Inception weights not found" in capsys.readouterr().err
    bad = _npz(tmp_path / "f.npz", a.astype(np.float32))
    assert train_main(["eval", str(bad), "--ref", str(sb), "--random-weights"]) == 2
    assert "expected uint8 images" in capsys.readouterr().err
    np.savez(tmp_path / "x.npz", x=np.zeros(3))
    assert train_main(["eval", str(tmp_path / "x.npz"), "--ref", str(sb)]) == 2
    assert "has no arr_0" in capsys.readouterr().err
    assert train_main(["eval", str(tmp_path / "nope.npz"), "--ref", str(sb)]) == 2
