"""benchmarks/gpu_suite.py (issue 19): the GPU suite runs on CPU with --smoke, so it cannot
rot; a phase over its cap is killed and reported, and the phases' shared imports leave
CUDA untouched (a forked phase could not use it otherwise)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"


def suite(tmp_path: Path, *argv: str) -> tuple[subprocess.CompletedProcess, dict]:
    out = tmp_path / "suite.json"
    p = subprocess.run([sys.executable, str(SUITE), "--smoke", "--dir", str(tmp_path),
                        "--json", str(out), *argv], capture_output=True, text=True,
                       timeout=600)
    return p, (json.loads(out.read_text()) if out.exists() else {})


def test_smoke_runs_every_phase(tmp_path):
    p, report = suite(tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr
    phases = report["phases"]
    assert list(phases) == ["card", "loader", "encode", "train-urepa", "train-repa",
                            "decode-encode", "pipeline", "encode-compile",
                            "train-urepa-compile", "train-repa-compile"]
    bad = {n: r["status"] for n, r in phases.items() if r["status"] != "ok"}
    assert not bad, bad
    assert phases["card"]["matmul_tflops"] > 0 and phases["card"]["copy_read_write_gbs"] > 0
    assert phases["loader"]["equal"] is True and phases["loader"]["batches"] == 24
    assert phases["loader"]["pinned_buffers"] == 0   # no CUDA here: nothing to pin
    for name in ("encode", "encode-compile", "decode-encode"):
        assert phases[name]["img_s"] > 0, name
    assert phases["encode-compile"]["compile"] is True
    for name in ("train-urepa", "train-repa", "train-urepa-compile", "train-repa-compile"):
        r = phases[name]
        assert r["cached_img_s"] > 0 and r["online_img_s"] > 0 and 0 <= r["data_wait"] < 1
        assert r["cached_over_online"] > 0 and r["cached_mfu_measured_matmul"] > 0, (name, r)
    assert phases["train-urepa"]["arch"] == "sit-down-tiny/2"
    assert phases["train-repa"]["method"] == "repa"
    assert phases["pipeline"]["images"] == 16 and phases["pipeline"]["img_s_steady"] > 0
    assert phases["decode-encode"]["cores_to_feed_encoder"] > 0
    logs = tmp_path / "suite-logs"
    assert sorted(p.stem for p in logs.glob("*.log")) == sorted(phases)
    text = p.stdout
    assert "phase" in text and "train-repa-compile" in text and "written:" in text


def test_a_phase_over_its_cap_is_killed_and_reported(tmp_path):
    t = time.perf_counter()
    p, report = suite(tmp_path, "--phases", "card,train-repa,encode", "--cap", "train-repa=3",
                      "--budget", "40", "--cap", "encode=0.5")
    assert time.perf_counter() - t < 60
    assert p.returncode == 1
    phases = report["phases"]
    assert phases["card"]["status"] == "ok"
    assert phases["train-repa"]["status"] == "timed out at 3 s"
    assert phases["train-repa"]["batch"] == 4     # what it measured before the cap
    assert phases["encode"]["status"] == "timed out at 0.5 s"
    assert "timed out at 3 s" in p.stdout
    # nothing the killed phases started is left running (their whole session is killed)
    left = subprocess.run(["pgrep", "-f", str(tmp_path)], capture_output=True, text=True)
    assert left.stdout.strip() == "", left.stdout
    p, report = suite(tmp_path, "--phases", "card,encode", "--budget", "0")
    assert p.returncode == 1
    assert {r["status"] for r in report["phases"].values()} == {
        "not run: the budget was spent"}


def test_bad_arguments_are_refused(tmp_path):
    p, _ = suite(tmp_path, "--phases", "card,trian")
    assert p.returncode == 2 and "unknown ['trian']" in p.stderr
    for cap in ("card", "card=0", "card=-1", "card=abc", "nope=3"):
        p, _ = suite(tmp_path, "--cap", cap)
        assert p.returncode == 2 and "PHASE=SECONDS" in p.stderr, (cap, p.stderr)
    for phases in ("", "card,card"):
        p, _ = suite(tmp_path, "--phases", phases)
        assert p.returncode == 2 and "empty or repeated" in p.stderr, (phases, p.stderr)
    p, _ = suite(tmp_path, "--steps", "0")
    assert p.returncode == 2 and "must be > 0" in p.stderr


def test_shared_imports_leave_cuda_alone():
    code = f"""
import sys, torch
calls = []
real = torch._C._cuda_getDeviceCount
torch._C._cuda_getDeviceCount = lambda *a: calls.append(1) or real(*a)
sys.path.insert(0, {str(SUITE.parent)!r})
import gpu_suite
gpu_suite._preload()
assert not calls, "a preloaded module asked for CUDA's device count"
assert not torch.cuda.is_initialized()
"""
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
