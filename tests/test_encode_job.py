"""`pipeline encode` end to end on real (local) Ray, real JPEG folders and real models."""

import io
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import write_bad_folder, write_jpeg_folder

from cache import CacheMismatchError, open_cache
from cache.format import read_done_marker, read_manifest
from pipeline import cli
from pipeline.encoders import Encoder, build_teacher, build_vae, weights_sha256
from pipeline.job import EncodeConfig, build_dataset, make_plan, plan_encoders, run_encode
from pipeline.preprocess import decode_items
from pipeline.sources import list_source
from train.config import load_config

TINY = dict(dataset="imagefolder", resolution=64, vae="tiny", teacher="dinov2-tiny",
            random_weights=True, shard_size=4, batch_size=3, progress=False)


@pytest.fixture(scope="module")
def ray_local():
    import ray
    # 4 logical CPUs on a 2-core machine: two CPU encoders plus decode and write tasks
    ray.init(num_cpus=4, include_dashboard=False, logging_level="WARNING")
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_jpeg_folder(tmp_path_factory.mktemp("img") / "data", classes=3, per_class=5)


def _cfg(out, data, **kw):
    return EncodeConfig(out=str(out), data_dir=str(data), **{**TINY, **kw})


def _reference(data, views=1, resolution=64):
    """The expected fields, computed without Ray: decode, then the same encoders."""
    src = list_source("imagefolder", data)
    imgs, failures = decode_items(src.items, resolution, views)
    enc = Encoder(build_vae("tiny", random_weights=True),
                  build_teacher("dinov2-tiny", resolution=resolution, random_weights=True),
                  resolution=resolution, batch_size=3).encode_shard(imgs, set(failures))
    return src, enc


def _file_hashes(root):
    m = read_manifest(root)
    return {b: [s["files"] for s in table] for b, table in m["shards"].items()}


def test_encode_end_to_end_resume_and_refusal(ray_local, images, tmp_path):
    out = tmp_path / "cache"
    summary = run_encode(_cfg(out, images, format="both", token_dtype="int8"), log=lambda s: None)
    assert summary["images"] == 15 and summary["shards_encoded"] == 4
    src, ref = _reference(images)
    for backend in ("zarr", "wds"):
        ds = open_cache(out, backend=backend)
        assert ds.verify().ok and len(ds) == 15
        assert ds.keys(range(15)) == [it.key for it in src.items]
        for i in range(15):
            s = ds[i]
            assert s["label"] == src.items[i].label
            np.testing.assert_allclose(s["moments"], ref["moments"][i], rtol=2e-3, atol=2e-3)
            cos = (s["tokens"].astype(np.float32) * ref["tokens"][i]).sum(-1) / (
                np.linalg.norm(s["tokens"], axis=-1) * np.linalg.norm(ref["tokens"][i], axis=-1))
            assert cos.min() > 0.999   # int8 tokens
            np.testing.assert_allclose(s["cls"], ref["cls"][i], rtol=2e-3, atol=2e-3)
    m = read_manifest(out)
    prov = m["provenance"]
    assert m["status"] == "complete" and prov["random_weights"] is True
    assert prov["source"]["sha256"] == src.sha256() and prov["source"]["num_classes"] == 3
    assert prov["teacher"]["input_size"] == 56 and len(prov["teacher"]["weights_sha256"]) == 64
    assert len(m["latent"]["channel_stats"]["mean"]) == 4
    # the same command again: nothing to do, nothing rewritten
    before = _file_hashes(out)
    said = []
    again = run_encode(_cfg(out, images, format="both", token_dtype="int8"), log=said.append)
    assert again["shards_encoded"] == 0 and _file_hashes(out) == before
    assert said[-1].startswith("done: nothing to encode, all 4 shards were already written, "
                               "15 valid")   # not "0 images ... 0.0 img/s" (issue 17)
    # parameters that change the content are refused, naming what differs
    with pytest.raises(CacheMismatchError, match="latent_size"):
        run_encode(_cfg(out, images, format="both", token_dtype="int8", resolution=128))
    with pytest.raises(CacheMismatchError, match="teacher"):
        run_encode(_cfg(out, images, format="both", token_dtype="int8", seed=1))
    with pytest.raises(CacheMismatchError, match="source"):   # another list of images
        run_encode(_cfg(out, images, format="both", token_dtype="int8", limit=10))
    with pytest.raises(CacheMismatchError, match=r"(?s)attn_blocks.*field be added"):
        run_encode(_cfg(out, images, format="both", token_dtype="int8", teacher_attn=(1,)))
    assert m["provenance"]["precision"] == "fp32"            # resolved, not "auto"
    assert m["provenance"]["command"]["encoders"] == "1 x cpu"


def test_a_refused_resume_says_so_before_ray_starts(images, tmp_path, monkeypatch):
    """The differences come one key per line (nested keys dotted), before Ray would start
    (~20 s; issue 17, point 8)."""
    from cache import CacheSpec
    from cache.synthetic import write_synthetic_cache
    from pipeline import job
    out = tmp_path / "c"
    write_synthetic_cache(out, CacheSpec(num_samples=15, shard_size=8, chunk_size=4,
                                         latent_size=8, tokens=16, token_dim=64))
    monkeypatch.setattr(job, "_init_ray", lambda cfg: pytest.fail("Ray was started"))
    with pytest.raises(CacheMismatchError) as e:
        run_encode(_cfg(out, images), log=lambda s: None)
    lines = str(e.value).splitlines()
    assert "  shard_size: existing 8 vs requested 4" in lines
    assert "  dataset: existing 'synthetic' vs requested None" in lines
    assert all(len(ln) < 200 for ln in lines), lines      # whole objects are cut short


def test_two_views_encode_the_flipped_image(ray_local, images, tmp_path):
    """...with the teacher attention of both blocks (--teacher-attn 0,1) for both views."""
    run_encode(_cfg(tmp_path / "c", images, views=2, limit=6, teacher_attn=(1, 0)),
               log=lambda s: None)
    ds = open_cache(tmp_path / "c")
    src = list_source("imagefolder", images, limit=6)
    imgs, _ = decode_items(src.items, 64, 1)
    flipped = np.ascontiguousarray(imgs[:, 0, :, ::-1])
    enc = Encoder(build_vae("tiny", random_weights=True),
                  build_teacher("dinov2-tiny", resolution=64, random_weights=True),
                  resolution=64, attn_blocks=(0, 1)).encode(flipped)
    both = ds.gather(range(6), ("moments", "tokens", "attn_qk"))
    assert both["moments"].shape == (6, 2, 8, 8, 8)
    np.testing.assert_allclose(both["moments"][:, 1], enc["moments"], rtol=2e-3, atol=2e-3)
    np.testing.assert_allclose(both["tokens"][:, 1], enc["tokens"], rtol=2e-3, atol=2e-3)
    assert both["attn_qk"].shape == (6, 2, 2, 2, 2, 16, 32)   # [n, V, L, q|k, H, T, d]
    np.testing.assert_allclose(both["attn_qk"][:, 1], enc["attn_qk"], rtol=2e-3, atol=2e-3)
    attention = read_manifest(tmp_path / "c")["attention"]
    assert attention["teacher_blocks"] == [0, 1] and attention["dtype"] == "float16"
    assert ds.verify().ok
    # the flip is encoded for real: its latent is not the mirrored latent of view 0
    assert not np.allclose(both["moments"][:, 1], both["moments"][:, 0, ..., ::-1], atol=1e-2)


def test_bad_inputs_listed_and_budget_enforced(ray_local, tmp_path, capsys):
    root, cases = write_bad_folder(tmp_path / "bad")
    args = ["encode", "--dataset", "imagefolder", "--data-dir", str(root), "--resolution",
            "64", "--vae", "tiny", "--teacher", "dinov2-tiny", "--random-weights",
            "--shard-size", "4", "--no-progress", "--format", "both"]
    # default budget (0.1% of 15 images = 0): non-zero exit that says why; done shards kept
    assert cli.main(args + ["--out", str(tmp_path / "c")]) == 3
    err = capsys.readouterr().err
    assert "--max-failures" in err and "failed to decode" in err
    assert read_manifest(tmp_path / "c")["status"] == "incomplete"
    # accepting them: the rerun resumes and finalizes
    assert cli.main(args + ["--out", str(tmp_path / "c"), "--max-failures", "10"]) == 0
    m = read_manifest(tmp_path / "c")
    bad = {f["key"].split("/")[-1]: f["reason"] for f in m["failures"]}
    want_bad = {n: r for n, (_, r) in cases.items() if r is not None}
    assert set(bad) == set(want_bad)
    assert all(want_bad[n] in bad[n] for n in bad)
    ds = open_cache(tmp_path / "c")
    assert ds.num_valid == len(cases) - len(want_bad) and ds.verify().ok
    assert open_cache(tmp_path / "c", backend="wds").num_valid == ds.num_valid


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert cli.main(["encode", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "x"),
                     "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "does not exist" in err
    write_jpeg_folder(tmp_path / "d", classes=1, per_class=1)
    assert cli.main(["encode", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "d"),
                     "--out", str(tmp_path / "o")]) == 2   # offline, no weights
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: cannot load the VAE") and "--random-weights" in err
    assert cli.main(["encode", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "d"),
                     "--out", str(tmp_path / "o"), "--teacher", "dinov2-xl"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "--teacher 'dinov2-xl': choose one of" in err
    (tmp_path / "notcache").mkdir()
    (tmp_path / "notcache" / "x.txt").write_text("x")
    assert cli.main(["encode", "--dataset", "imagefolder", "--data-dir", str(tmp_path / "d"),
                     "--out", str(tmp_path / "notcache")]) == 2
    assert "is not a cache" in capsys.readouterr().err


def test_same_bytes_whatever_the_number_of_encoders(ray_local, images, tmp_path):
    run_encode(_cfg(tmp_path / "one", images, cpu_encoders=1), log=lambda s: None)
    run_encode(_cfg(tmp_path / "two", images, cpu_encoders=2), log=lambda s: None)
    assert _file_hashes(tmp_path / "one") == _file_hashes(tmp_path / "two")


def test_encode_to_an_fsspec_url_writes_the_same_cache(ray_local, images, tmp_path):
    """--out file://...: the Ray workers write through fsspec (no local fast paths); the
    cache equals the one written to a plain directory and streams from DataLoader worker
    processes that reopen the URL themselves."""
    from cache import CacheLoader, LoaderConfig
    run_encode(_cfg(tmp_path / "plain", images, format="both"), log=lambda s: None)
    url = f"file://{tmp_path}/url"
    run_encode(_cfg(url, images, format="both"), log=lambda s: None)
    assert _file_hashes(url) == _file_hashes(tmp_path / "plain")
    assert open_cache(url).verify().ok
    cfg = LoaderConfig(batch_size=4, shuffle_buffer=8, num_workers=1, backend="wds")
    a = [b["tokens"] for b in CacheLoader(url, cfg)]
    b = [b["tokens"] for b in CacheLoader(tmp_path / "plain", cfg)]
    assert len(a) == 3 and all((x == y).all() for x, y in zip(a, b, strict=True))


def test_killed_job_reruns_to_the_same_cache(ray_local, tmp_path):
    data = write_jpeg_folder(tmp_path / "data", classes=4, per_class=20)
    run_encode(_cfg(tmp_path / "ref", data, shard_size=2), log=lambda s: None)
    out = tmp_path / "killed"
    # the console script: its sys.path[0] is bin/, so only Ray's insertion brings the cwd
    cmd = [str(Path(sys.executable).with_name("pipeline")), "encode", "--dataset", "imagefolder",
           "--data-dir", str(data), "--out", str(out), "--resolution", "64", "--vae", "tiny",
           "--teacher", "dinov2-tiny", "--random-weights", "--shard-size", "2",
           "--batch-size", "3", "--num-cpus", "2", "--no-progress"]
    proc = subprocess.Popen(cmd, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (out / "_done").exists() and any((out / "_done").rglob("*.json")):
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)   # the driver, its embedded Ray and every worker
    proc.wait()
    done = [k for k in range(40) if read_done_marker(out, "zarr", k)]
    assert 0 < len(done) < 40, f"kill landed outside the job ({len(done)} shards done)"
    assert read_manifest(out)["status"] == "incomplete"
    summary = run_encode(_cfg(out, data, shard_size=2), log=lambda s: None)
    # at most the missing shards are redone; fewer when a Ray worker of the killed job
    # (they notice their raylet's death a moment later) finished one more after the count
    assert 0 < summary["shards_encoded"] <= 40 - len(done)
    assert _file_hashes(out) == _file_hashes(tmp_path / "ref")
    assert open_cache(out).verify().ok


def test_true_architectures_shapes_and_dtypes(ray_local, images, tmp_path):
    """SD-VAE (ft-mse config) and DINOv2-B/14 at their real sizes, random weights, 2 images."""
    cfg = _cfg(tmp_path / "real", images, vae="stabilityai/sd-vae-ft-mse", teacher="dinov2-b",
               resolution=256, limit=2, shard_size=2, batch_size=2, encoder_threads=2,
               format="both")
    run_encode(cfg, log=lambda s: None)
    m = read_manifest(tmp_path / "real")
    assert m["provenance"]["vae"]["scaling_factor"] == m["latent"]["scale"] == 0.18215
    fields = {k: (tuple(f["shape"]), f["dtype"]) for k, f in m["fields"].items()}
    assert fields["moments"] == ((1, 8, 32, 32), "float16")
    assert fields["tokens"] == ((1, 256, 768), "float16")
    assert fields["cls"] == ((1, 768), "float16")
    assert fields["label"] == ((), "int64")
    for backend in ("zarr", "wds"):
        s = open_cache(tmp_path / "real", backend=backend)[1]
        assert s["moments"].shape == (1, 8, 32, 32) and s["moments"].dtype == np.float16
        assert s["tokens"].shape == (1, 256, 768) and s["tokens"].dtype == np.float16
        assert s["cls"].shape == (1, 768) and s["label"] == 1
        assert (s["moments"][:, 4:] > 0).all()        # a posterior std, not a sample


def test_encoder_placement_and_defaults(tmp_path):
    def plan(gpus, cpus, **kw):
        kw = {"batch_size": None, "resolution": 256, **kw}
        return plan_encoders(_cfg(tmp_path, tmp_path, **kw), gpus, cpus)
    assert plan(8, 64) == plan(8, 64, num_gpus=8)
    e = plan(8, 64)
    assert (e.size, e.num_gpus, e.device, e.precision, e.batch_size) == (8, 1, "cuda", "bf16", 256)
    assert plan(8, 64, resolution=512).batch_size == 64          # same pixels per batch
    e = plan(8, 64, num_gpus=0)                                  # CPU even where GPUs are
    assert (e.device, e.num_gpus, e.precision, e.batch_size) == ("cpu", 0, "fp32", 8)
    with pytest.raises(ValueError, match="has 2 GPU"):
        plan(2, 8, num_gpus=4)
    with pytest.raises(ValueError, match="no GPU right now"):
        plan(0, 8, address="ray://head:10001")
    assert plan(0, 8, address="ray://head:10001", num_gpus=4).size == 4   # autoscaling
    with pytest.raises(ValueError, match="leave none for decoding"):
        plan(0, 4, cpu_encoders=2, encoder_threads=2)


def test_decode_is_not_fused_into_the_encoders(ray_local, images, tmp_path, capsys):
    cfg = _cfg(tmp_path / "c", images)
    build_dataset(make_plan(cfg), plan_encoders(cfg, 0, 4), str(tmp_path / "c")).explain()
    physical = capsys.readouterr().out.split("Physical Plan (Optimized)")[1]
    assert "ActorPoolMapOperator[MapBatches(EncodeStage)]" in physical
    assert "Map(decode_stage)->MapBatches" not in physical


def test_webdataset_source_encodes_like_the_folder(ray_local, images, tmp_path):
    src = list_source("imagefolder", images)
    tars = tmp_path / "tars"
    tars.mkdir()
    for t in range(2):
        with tarfile.open(tars / f"part-{t:04d}.tar", "w") as tf:
            for i, it in enumerate(src.items[t::2]):
                for ext, data in (("jpg", open(it.path, "rb").read()),
                                  ("cls", str(it.label).encode())):
                    info = tarfile.TarInfo(f"{2 * i + t:06d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
    run_encode(_cfg(tmp_path / "w", tars, dataset="wds"), log=lambda s: None)
    run_encode(_cfg(tmp_path / "f", images), log=lambda s: None)
    w, f = open_cache(tmp_path / "w"), open_cache(tmp_path / "f")
    order = [src.items.index(src.items[t::2][i]) for t in range(2)
             for i in range(len(src.items[t::2]))]             # tar order -> folder order
    a = w.gather(range(15), ("moments", "tokens", "label"))
    b = f.gather(order, ("moments", "tokens", "label"))
    np.testing.assert_array_equal(a["label"], b["label"])
    # same pixels; other batch neighbours, so CPU kernels may round the last bits differently
    for k in ("moments", "tokens"):
        np.testing.assert_allclose(a[k].astype(np.float32), b[k], rtol=5e-3, atol=1e-3)
    assert w.keys([0])[0] == "part-0000.tar/000000"


def test_local_weights_resume_from_other_paths(ray_local, images, tmp_path):
    """Real (non-random) loading from local files; the same weights from another path, and
    another batch size, resume the cache instead of being refused."""
    import torch
    from diffusers import AutoencoderKL

    from pipeline.encoders import TINY_VAE_CONFIG
    torch.manual_seed(5)
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(tmp_path / "vae")
    teacher = build_teacher("dinov2-tiny", resolution=64, random_weights=True, seed=5)
    torch.save(teacher.state_dict(), tmp_path / "teacher.pth")
    cfg = dict(random_weights=False, vae=str(tmp_path / "vae"),
               teacher_weights=str(tmp_path / "teacher.pth"), limit=8)
    run_encode(_cfg(tmp_path / "c", images, **cfg), log=lambda s: None)
    assert read_manifest(tmp_path / "c")["provenance"]["random_weights"] is False
    shutil.copytree(tmp_path / "vae", tmp_path / "vae2")
    shutil.copy(tmp_path / "teacher.pth", tmp_path / "teacher2.pth")
    (tmp_path / "c" / "_done" / "zarr" / "000001.json").unlink()   # one shard to redo
    summary = run_encode(_cfg(tmp_path / "c", images, **{
        **cfg, "vae": str(tmp_path / "vae2"), "teacher_weights": str(tmp_path / "teacher2.pth"),
        "batch_size": 5}), log=lambda s: None)
    assert summary["shards_encoded"] == 1 and open_cache(tmp_path / "c").verify().ok


def test_the_demo_encode_pooling_vae_and_random_teacher(ray_local, images, tmp_path):
    """What make demo encodes: a local VAE directory (the demo's pooling VAE) with only the
    teacher random-init (--random-teacher): the latents are the crops' 8x8 block averages,
    the teacher is the seeded random one, and the manifest and the trainer say so."""
    import torch

    from pipeline.demo_vae import write_pooling_vae
    from train.data import check_cache
    vae = write_pooling_vae(tmp_path / "vae")
    run_encode(_cfg(tmp_path / "c", images, random_weights=False, random_teacher=True,
                    vae=str(vae), seed=3, limit=8), log=lambda s: None)
    prov = read_manifest(tmp_path / "c")["provenance"]
    assert prov["random_weights"] is False and prov["random_teacher"] is True
    assert prov["command"]["seed"] == 3
    ds = open_cache(tmp_path / "c")
    src = list_source("imagefolder", images, limit=8)
    crops, _ = decode_items(src.items, 64, 1)
    x = torch.from_numpy(np.asarray(crops)[:, 0]).permute(0, 3, 1, 2).float() / 127.5 - 1
    moments = np.stack([ds[i]["moments"][0] for i in range(len(ds))]).astype(np.float32)
    np.testing.assert_allclose(moments[:, :3], torch.nn.functional.avg_pool2d(x, 8).numpy(),
                               atol=2e-3)   # fp16 storage
    teacher = build_teacher("dinov2-tiny", resolution=64, random_weights=True, seed=3)
    assert prov["teacher"]["weights_sha256"] == weights_sha256(teacher)
    cfg = load_config(None, [f"data.cache={tmp_path / 'c'}", "run_dir=r", "model.latent_size=8",
                             "model.arch=sit-down-tiny/2", f"align.teacher_dim={ds.spec.token_dim}",
                             "model.num_classes=3"])
    warnings = check_cache(ds, cfg).warnings
    assert any("RANDOM-init teacher (--random-teacher)" in w for w in warnings)


def test_a_folder_named_like_a_package_in_the_working_directory(images, tmp_path):
    """Ray puts the driver's working directory on its workers' sys.path; a `cache/` there
    (say, the output of an earlier run) must not replace the `cache` package in them."""
    (tmp_path / "cache").mkdir()
    # the console script: its sys.path[0] is bin/, so only Ray's insertion brings the cwd
    cmd = [str(Path(sys.executable).with_name("pipeline")), "encode", "--dataset", "imagefolder",
           "--data-dir", str(images), "--out", str(tmp_path / "out"), "--resolution", "64",
           "--vae", "tiny", "--teacher", "dinov2-tiny", "--random-weights", "--limit", "4",
           "--shard-size", "2", "--num-cpus", "2", "--no-progress"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=240,
                         env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    assert open_cache(tmp_path / "out").verify().ok
