"""Frechet distance against closed forms; ADM reference statistics."""

import numpy as np
import pytest

from train.fid import frechet_distance, gaussian_stats, reference_stats


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
