"""Multi-process training on CPU (gloo) under `accelerate launch`, against one process:
the global batches, the draws and so the weights are the same; ranks see disjoint, equal
shares; killing one rank ends the job, and the rerun resumes from the last checkpoint."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_structured_cache
from safetensors.torch import load_file

from cache import CacheSpec
from train.checkpoint import checkpoints

ROOT = Path(__file__).resolve().parents[1]
SPEC = CacheSpec(num_samples=96, shard_size=32, latent_size=8, tokens=16, token_dim=32)
# one thread per process: 1 and 2 processes then sum in the same order within each op
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_structured_cache(tmp_path_factory.mktemp("cache") / "c", SPEC)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _accelerate(n: int) -> list[str]:
    return [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu",
            "--num_processes", str(n), "--num_machines", "1", "--mixed_precision", "no",
            "--dynamo_backend", "no", "--main_process_port", str(_free_port())]


def _args(cache, run_dir, steps, *extra):
    return ["-m", "train.cli", "run", str(ROOT / "configs/demo.yaml"), f"run_dir={run_dir}",
            f"data.cache={cache}", "model.latent_size=8", "align.teacher_dim=32",
            "batch_size=16", "micro_batch_size=8", "data.shuffle_buffer=8", "data.block_size=2",
            f"max_steps={steps}", "checkpoint_every=2", "log_every=1", "progress=false",
            "log_samples=true", *extra]


def _jsonl(path):
    return [json.loads(ln) for ln in Path(path).read_text().splitlines()]


def _weights(ckpt):
    state = load_file(ckpt / "model.safetensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def test_two_processes_follow_one_process_with_the_same_streams(cache, tmp_path):
    two, one = tmp_path / "two", tmp_path / "one"
    out = subprocess.run(_accelerate(2) + _args(cache, two, 6), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "2 process(es) x 8 x 1 accumulation, 2 data streams" in out.stdout
    out = subprocess.run([sys.executable] + _args(cache, one, 6, "data.streams=2"), cwd=ROOT,
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "1 process(es) x 8 x 2 accumulation, 2 data streams" in out.stdout

    # equal shares, disjoint ranks, every valid sample once in the epoch (6 steps x 16)
    steps2, steps1 = _jsonl(two / "samples.jsonl"), _jsonl(one / "samples.jsonl")
    assert [s["step"] for s in steps2] == [1, 2, 3, 4, 5, 6]
    for s2, s1 in zip(steps2, steps1, strict=True):
        r0, r1 = s2["indices"]
        assert len(r0) == len(r1) == 8 and not set(r0) & set(r1)
        assert s1["indices"] == [r0 + r1]              # the same global batch on 1 process
    seen = [i for s in steps2 for r in s["indices"] for i in r]
    assert sorted(seen) == list(range(96))

    # the same losses and weights, to floating-point tolerance
    m2, m1 = _jsonl(two / "metrics.jsonl"), _jsonl(one / "metrics.jsonl")
    for key in ("loss", "loss_v", "loss_repa", "loss_ml", "grad_norm"):
        np.testing.assert_allclose([m[key] for m in m2], [m[key] for m in m1], rtol=1e-4,
                                   err_msg=key)
    c2, c1 = checkpoints(two)[-1], checkpoints(one)[-1]
    meta = json.loads((c2 / "checkpoint.json").read_text())
    hashes = meta["weights_sha256_per_process"]
    assert len(hashes) == 2 and hashes[0] == hashes[1]    # the replicas never drifted apart
    w2, w1 = _weights(c2), _weights(c1)
    assert w2.keys() == w1.keys()
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-4, atol=1e-5, msg=k)


def _rank_pids(marker: str) -> dict[int, int]:
    """{rank: pid} of the training processes whose command line contains `marker`."""
    found = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            if marker not in (p / "cmdline").read_bytes().decode(errors="replace"):
                continue
            env = dict(kv.split("=", 1) for kv in
                       (p / "environ").read_bytes().decode(errors="replace").split("\0")
                       if "=" in kv)
        except OSError:
            continue
        if "RANK" in env and "LOCAL_RANK" in env:
            found[int(env["RANK"])] = int(p.name)
    return found


def test_a_killed_rank_ends_the_job_and_the_rerun_resumes(cache, tmp_path):
    run = tmp_path / "run"
    job = subprocess.Popen(_accelerate(2) + _args(cache, run, 100_000), cwd=ROOT, env=ENV,
                           stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                           start_new_session=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and len(checkpoints(run)) < 2 and job.poll() is None:
            time.sleep(0.2)
        assert len(checkpoints(run)) >= 2, job.stdout.read() if job.poll() is not None else ""
        pids = _rank_pids(str(run))
        assert sorted(pids) == [0, 1], pids
        os.kill(pids[1], signal.SIGKILL)
        job.wait(timeout=120)          # the launcher notices, stops rank 0 and exits
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
            job.wait()
    assert job.returncode != 0
    for pid in pids.values():          # no process of the job is left behind
        assert not Path(f"/proc/{pid}").exists() or \
            "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]
    last = int(checkpoints(run)[-1].name.split("_")[1])
    out = subprocess.run(_accelerate(2) + _args(cache, run, last + 3), cwd=ROOT, env=ENV,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"resumed from {run / 'checkpoints' / f'step_{last:08d}'}" in out.stdout
    steps = [m["step"] for m in _jsonl(run / "metrics.jsonl")]
    assert steps == list(range(1, last + 4))   # lines after the checkpoint were dropped
    assert [s["step"] for s in _jsonl(run / "samples.jsonl")] == steps
