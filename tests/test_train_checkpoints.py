"""A run's checkpoints hold no pickle and are checked before a resume trusts them (issue
14): planted pickles never run, the earlier pickled layout is refused in one line, a
damaged newest checkpoint is skipped for the previous one (and the run then writes the
same bits again), a full disk loses nothing. Real tiny runs through `train run`."""

import errno
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from cache import CacheSpec
from conftest import write_structured_cache
from train.checkpoint import CHECKPOINT_FILES, checkpoints
from train.cli import main as train_main

ROOT = Path(__file__).resolve().parents[1]
SPEC = CacheSpec(num_samples=48, shard_size=16, latent_size=8, tokens=16, token_dim=32)
# every name a run's checkpoint directory held when accelerate wrote it
PICKLED = ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl", "random_states_0.pkl",
           "optimizer.bin", "scaler.pt")


class Plant:
    """Unpickling this creates the file `marker` (open(marker, "w")): a harmless stand-in
    for the code a crafted checkpoint could run."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def plant(path: Path, marker: Path) -> None:
    """A pickle as torch.save writes one, which torch.load(weights_only=False) runs."""
    torch.save({"state": Plant(marker)}, path)


def cli_run(cache, run_dir, steps, *extra) -> int:
    return train_main(["run", str(ROOT / "configs/demo.yaml"), f"run_dir={run_dir}",
                       f"data.cache={cache}", "model.latent_size=8", "align.teacher_dim=32",
                       "align.projector_dim=64", "batch_size=8", "data.shuffle_buffer=8",
                       f"max_steps={steps}", "checkpoint_every=5", "keep_checkpoints=3",
                       "log_every=1", "progress=false", *extra])


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_structured_cache(tmp_path_factory.mktemp("cache") / "c", SPEC)


@pytest.fixture(scope="module")
def base(cache, tmp_path_factory):
    """A 10-step run with checkpoints at 5 and 10 (each test works on a copy)."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert cli_run(cache, run, 10) == 0
    assert [p.name for p in checkpoints(run)] == ["step_00000005", "step_00000010"]
    return run


def copy_run(base, tmp_path) -> Path:
    return Path(shutil.copytree(base, tmp_path / "run"))


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def same_file(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


def test_the_plant_is_live(tmp_path):
    """The payload the tests below plant does run when unpickled."""
    pickle.loads(pickle.dumps(Plant(tmp_path / "m")))
    assert (tmp_path / "m").exists()


def test_planted_pickles_never_run(base, cache, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = copy_run(base, tmp_path)
    ckpts = run / "checkpoints"
    # accelerate's EMA and train-state pickles, which the earlier version loaded with
    # weights_only=False, beside the real files: never read
    for name in ("custom_checkpoint_0.pkl", "custom_checkpoint_1.pkl"):
        plant(ckpts / "step_00000010" / name, marker)
    try:
        assert cli_run(cache, run, 12) == 0
    finally:
        assert not marker.exists(), "a planted pickle ran"
    assert f"resumed from {ckpts / 'step_00000010'} (step 10)" in capsys.readouterr().out
    for name in PICKLED:                               # every pickled name at once
        plant(ckpts / "step_00000012" / name, marker)
    assert cli_run(cache, run, 13) == 0
    assert f"resumed from {ckpts / 'step_00000012'} (step 12)" in capsys.readouterr().out
    assert not marker.exists()

    # the weight files themselves replaced by pickles: sample and convert refuse them in
    # one line; a resume skips that checkpoint (its sizes differ) for the previous one
    newest = ckpts / "step_00000013"
    for name in ("model.safetensors", "ema.safetensors"):
        (newest / name).write_bytes(pickle.dumps({"ema": Plant(marker)}))
    for cmd in (["sample", str(newest), "--out", str(tmp_path / "o")],
                ["sample", str(newest), "--weights", "model", "--out", str(tmp_path / "o")],
                ["convert", str(newest), str(tmp_path / "x.pt")]):
        assert train_main(cmd) == 2, cmd
        assert "safetensors" in one_line(capsys.readouterr().err)
    assert cli_run(cache, run, 14) == 0
    out = capsys.readouterr().out
    assert "skipping checkpoints/step_00000013: model.safetensors has" in out
    assert f"resumed from {ckpts / 'step_00000012'} (step 12)" in out
    assert not marker.exists()


def to_old_layout(ckpt: Path, marker: Path) -> None:
    """`ckpt` as the earlier version wrote it (accelerate's save_state), its pickles
    planted."""
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    for key in ("layout", "processes", "train", "optimizer", "scaler", "contents"):
        meta.pop(key, None)
    meta["files"] = {"model": "model.safetensors", "ema": "custom_checkpoint_0.pkl"}
    for name in ("ema.safetensors", "optimizer.safetensors", "rng_0.json"):
        (ckpt / name).unlink(missing_ok=True)
    for name in PICKLED:
        plant(ckpt / name, marker)
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))


def test_the_old_pickled_layout_is_refused_in_one_line(base, cache, tmp_path, capsys):
    marker = tmp_path / "pwned"
    run = copy_run(base, tmp_path)
    for ckpt in checkpoints(run):
        to_old_layout(ckpt, marker)
    capsys.readouterr()
    assert cli_run(cache, run, 12) == 2
    err = one_line(capsys.readouterr().err)
    assert "holds no checkpoint to resume from: step_00000010: written by an earlier " \
           "version of train run" in err and "never unpickles" in err
    ckpt = run / "checkpoints" / "step_00000010"
    for cmd in (["sample", str(run), "--out", str(tmp_path / "o")],
                ["sample", str(ckpt), "--out", str(tmp_path / "o")],
                ["convert", str(ckpt), str(tmp_path / "x.pt")]):
        assert train_main(cmd) == 2, cmd
        assert "written by an earlier version" in one_line(capsys.readouterr().err)
    assert not marker.exists()
    assert [p.name for p in checkpoints(run)] == ["step_00000005", "step_00000010"]


def _file(ckpt: Path, prefix: str) -> Path:
    """The file of `ckpt` whose name starts with `prefix` (any layout)."""
    return next(p for p in sorted(ckpt.iterdir()) if p.name.startswith(prefix))


@pytest.mark.parametrize("damage, reason", [
    ("delete optimizer", "optimizer.safetensors missing"),
    ("truncate model", "model.safetensors has 1000 bytes, checkpoint.json records"),
    ("flip a byte of the EMA", "ema.safetensors differs from its recorded sha256"),
    ("delete rng", "rng_0.json missing"),
])
def test_a_damaged_newest_checkpoint_is_skipped(base, cache, tmp_path, capsys, damage, reason):
    run = copy_run(base, tmp_path)
    newest = run / "checkpoints" / "step_00000010"
    if damage == "delete optimizer":
        _file(newest, "optimizer").unlink()
    elif damage == "truncate model":
        with open(newest / "model.safetensors", "r+b") as f:
            f.truncate(1000)
    elif damage == "flip a byte of the EMA":
        ema = newest / CHECKPOINT_FILES["ema"]
        data = bytearray(ema.read_bytes())
        data[-5] ^= 1                                   # the same size: only a hash sees it
        ema.write_bytes(bytes(data))
    else:
        _file(newest, "r").unlink()                    # rng_0.json (or random_states_0.pkl)
    capsys.readouterr()
    assert cli_run(cache, run, 10) == 0
    out = capsys.readouterr().out
    assert f"skipping checkpoints/step_00000010: {reason}" in out
    assert "moved step_00000010 to step_00000010.incomplete" in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000005'} (step 5)" in out
    assert (run / "checkpoints" / "step_00000010.incomplete").is_dir()   # kept, not read
    # steps 6-10 again, written again: the same bits as the first time
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        assert same_file(newest / name, base / "checkpoints" / "step_00000010" / name), name
    assert [m["step"] for m in map(json.loads, (run / "metrics.jsonl").read_text()
                                   .splitlines())] == list(range(1, 11))


def test_a_run_whose_only_checkpoint_is_damaged_stops_in_one_line(base, cache, tmp_path,
                                                                 capsys):
    run = copy_run(base, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    _file(run / "checkpoints" / "step_00000005", "optimizer").unlink()
    capsys.readouterr()
    assert cli_run(cache, run, 10) == 2
    err = one_line(capsys.readouterr().err)
    assert "holds no checkpoint to resume from: step_00000005: optimizer.safetensors " \
           "missing. Restore the files, or move the step_N directories out of" in err
    assert [p.name for p in checkpoints(run)] == ["step_00000005"]   # left as it was
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 10


def test_a_full_disk_while_checkpointing_loses_nothing(base, cache, tmp_path, capsys,
                                                       monkeypatch):
    """The disk fills while step 10 is written (os.write, through which every byte of a
    checkpoint goes, fails with ENOSPC inside .tmp_step_00000010): the run stops with one
    line, the partial directory is gone, step 5 is intact, and the rerun resumes."""
    run = copy_run(base, tmp_path)
    shutil.rmtree(run / "checkpoints" / "step_00000010")
    before = {p.name: p.read_bytes() for p in (run / "checkpoints/step_00000005").iterdir()}
    real_write = os.write

    def full_disk(fd, data):
        if ".tmp_step_00000010" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full_disk)
    capsys.readouterr()
    assert cli_run(cache, run, 15) == 2
    err = one_line(capsys.readouterr().err)
    assert f"cannot write checkpoint {run / 'checkpoints' / 'step_00000010'}: No space " \
           "left on device" in err
    assert f"Nothing was lost: the partial checkpoint was removed and the newest " \
           f"checkpoint, {run / 'checkpoints' / 'step_00000005'}, is intact" in err
    assert "Free disk space and rerun the same command" in err
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000005"]
    assert {p.name: p.read_bytes()
            for p in (run / "checkpoints/step_00000005").iterdir()} == before
    monkeypatch.undo()                                  # space freed: the rerun resumes
    assert cli_run(cache, run, 10) == 0
    assert "resumed from" in capsys.readouterr().out
    for name in ("model.safetensors", "ema.safetensors"):
        assert same_file(run / "checkpoints/step_00000010" / name,
                         base / "checkpoints/step_00000010" / name), name


def test_train_sample_and_convert_refuse_a_pickle_in_one_line(tmp_path):
    """A plain pickle (with a payload, or of a list) given to train sample or convert: one
    line on stderr each, nothing run. In a fresh interpreter, where warnings print (torch
    warns in three lines about a pickle it did not write)."""
    marker = tmp_path / "pwned"
    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"ema": Plant(marker)}, f)
    with open(tmp_path / "list.pkl", "wb") as f:
        pickle.dump([1, 2, 3], f)
    cmds = [["sample", str(tmp_path / "evil.pkl"), "--out", str(tmp_path / "o")],
            ["sample", str(tmp_path / "list.pkl"), "--out", str(tmp_path / "o")],
            ["convert", str(tmp_path / "evil.pkl"), str(tmp_path / "c")]]
    script = ("import sys\nfrom train.cli import main\n"
              f"for cmd in {cmds!r}:\n"
              "    rc = main(cmd)\n    print(f'@@ {rc}', file=sys.stderr, flush=True)\n")
    out = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    parts = out.stderr.split("@@ ")
    assert len(parts) == 4 and out.returncode == 0, out.stderr
    for part in parts[1:]:
        assert part.startswith("2\n"), out.stderr          # each command's exit code
    for part in [parts[0]] + [p[2:] for p in parts[1:-1]]:
        assert "nothing in it was run" in one_line(part)
    assert not marker.exists() and not (tmp_path / "o").exists()


def test_random_states_and_the_scaler_round_trip_through_json():
    """What the tiny runs above do not draw from: Python's and numpy's generators (with a
    cached gaussian each), and an enabled fp16 loss scaler. Damaged values are refused
    before anything is set."""
    import random

    import numpy as np

    from train.checkpoint import CheckpointError
    from train.state import load_rng, load_scaler, rng_state, scaler_state

    random.seed(1), random.gauss(0, 1)             # leaves gauss_next set
    np.random.seed(2), np.random.standard_normal()  # leaves a cached gaussian
    torch.manual_seed(3)
    saved = json.loads(json.dumps(rng_state()))     # through JSON, as on disk
    draws = lambda: (random.gauss(0, 1), random.random(), np.random.standard_normal(3).tolist(),
                     torch.rand(3).tolist())
    first = draws()
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    load_rng(saved, "rng_0.json")
    assert draws() == first
    for bad in ({**saved, "torch": saved["torch"][:-2]},
                {**saved, "numpy": {**saved["numpy"], "pos": 625}},
                {**saved, "python": {**saved["python"], "state": [2 ** 32] * 625}}, [], None):
        with pytest.raises(CheckpointError, match="rng_0.json: damaged random state"):
            load_rng(bad, "rng_0.json")
    assert draws() != first                         # nothing was set by a refused state

    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0, growth_interval=7)
    scaler._lazy_init_scale_growth_tracker(torch.device("cpu"))
    scaler.update(512.0)
    state = json.loads(json.dumps(scaler_state(scaler)))
    fresh = torch.amp.GradScaler("cpu")
    load_scaler(fresh, state, "checkpoint.json")
    assert fresh.get_scale() == 512.0 and scaler_state(fresh) == state
    with pytest.raises(CheckpointError, match="scaler is not a mapping of names to numbers"):
        load_scaler(fresh, {"scale": "big"}, "checkpoint.json")
    assert scaler_state(None) is None and scaler_state(torch.amp.GradScaler(enabled=False)) is None


def test_optimizer_state_round_trips_and_refuses_what_does_not_fit(tmp_path):
    from safetensors.torch import load_file, save_file

    from train.checkpoint import CheckpointError
    from train.state import load_optimizer, optimizer_state

    def adamw(seed):
        torch.manual_seed(seed)
        params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
        opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.8, 0.95))
        for _ in range(2):
            sum((p ** 2).sum() for p in params).backward()
            opt.step()
        return opt

    tensors, info = optimizer_state(adamw(0))
    assert sorted(tensors) == [f"state.{i}.{n}" for i in (0, 1)
                               for n in ("exp_avg", "exp_avg_sq", "step")]
    save_file(tensors, tmp_path / "o.safetensors")
    info = json.loads(json.dumps(info))
    other = adamw(1)
    load_optimizer(other, load_file(tmp_path / "o.safetensors"), info, "o")
    mine, theirs = adamw(0).state_dict(), other.state_dict()
    assert mine["param_groups"] == theirs["param_groups"]      # betas a tuple again
    assert all(torch.equal(mine["state"][i][k], theirs["state"][i][k])
               for i in (0, 1) for k in mine["state"][i])
    for change, message in [
        (lambda t, g: t.update({"state.0.exp_avg": torch.zeros(2, 3)}),
         r"o: state.0.exp_avg is \[2, 3\], its parameter \[3, 2\]"),
        (lambda t, g: t.update({"state.7.exp_avg": torch.zeros(1)}),
         "'state.7.exp_avg' names no parameter"),
        (lambda t, g: g["param_groups"][0].update(params=[0]), "param group 0 holds other"),
        (lambda t, g: g["param_groups"][0].update(lr={"x": 1}), r"\['lr'\] are not plain"),
        (lambda t, g: g.pop("param_groups"), "param_groups/scalars are not 1 group"),
    ]:
        t, g = dict(tensors), json.loads(json.dumps(info))
        change(t, g)
        with pytest.raises(CheckpointError, match=message):
            load_optimizer(other, t, g, "o")


# ------------------------------------------------------------------------ hostile files
# (review of how resume, sample and convert read a run directory) Each variant is a copy
# of the base run's step_00000010 (its weights hard-linked: a variant's changed files are
# written anew, never in place) with one thing made hostile.

def _link_or_copy(src, dst):
    return os.link(src, dst) if src.endswith(".safetensors") else shutil.copy2(src, dst)


def variant(base: Path, root: Path, name: str) -> Path:
    """A copy of the base run's newest checkpoint as root/name/checkpoints/step_00000010
    (so that it can be sampled as a checkpoint or as a run directory)."""
    ckpt = root / name / "checkpoints" / "step_00000010"
    shutil.copytree(base / "checkpoints" / "step_00000010", ckpt, copy_function=_link_or_copy)
    return ckpt


def put(path: Path, data: bytes) -> None:
    """`data` as a new file `path` (a hard-linked original is left as it is)."""
    path.unlink(missing_ok=True)
    path.write_bytes(data)


def edit_meta(ckpt: Path, change) -> None:
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    change(meta)
    put(ckpt / "checkpoint.json", json.dumps(meta).encode())


def rehash(ckpt: Path) -> None:
    """checkpoint.json's contents made to agree with the files again (a crafted file)."""
    import hashlib

    def change(meta):
        for name in meta["contents"]:
            data = (ckpt / name).read_bytes()
            meta["contents"][name] = {"bytes": len(data),
                                      "sha256": hashlib.sha256(data).hexdigest()}
    edit_meta(ckpt, change)


def run_limited(script: str, timeout: int = 240) -> subprocess.CompletedProcess:
    """`script` in a fresh interpreter under a 6 GB address-space limit and a timeout: a
    reader that hangs on a FIFO or reads /dev/zero without end fails the test, not the
    machine."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (6 << 30, 6 << 30))
    return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, preexec_fn=limit)


FILE_ATTACKS = {
    # name (see make_file_attack): the reason `incomplete` gives
    "processes_huge": "checkpoint.json: processes=10000000000 is not an integer in [1, 65536]",
    "json_devzero": "checkpoint.json is a symbolic link, not a regular file",
    "json_fifo": "checkpoint.json is a FIFO, not a regular file",
    "rng_devzero": "rng_0.json is not a regular file",
    "rng_fifo": "rng_0.json is not a regular file",
    "extra_fifo": "extra is not a regular file",
    "extra_devzero": "extra is not a regular file",
}


def make_file_attack(ckpt: Path, name: str) -> None:
    meta = ckpt / "checkpoint.json"
    if name == "processes_huge":
        edit_meta(ckpt, lambda m: m.update(processes=10 ** 10))
    elif name.startswith("json_"):
        meta.unlink()
        meta.symlink_to("/dev/zero") if name == "json_devzero" else os.mkfifo(meta)
    elif name.startswith("rng_"):
        rng = ckpt / "rng_0.json"
        rng.unlink()
        rng.symlink_to("/dev/zero") if name == "rng_devzero" else os.mkfifo(rng)
    else:                                   # a file listed in contents besides the layout's
        extra = ckpt / "extra"
        extra.symlink_to("/dev/zero") if name == "extra_devzero" else os.mkfifo(extra)
        edit_meta(ckpt, lambda m: m["contents"].update(extra={"bytes": 0, "sha256": "x"}))


def test_links_fifos_and_a_huge_process_count_are_refused_unread(base, tmp_path):
    """Every file of a checkpoint must be a regular file (os.lstat, before it is opened)
    and checkpoint.json's process count is bounded: `incomplete` (resume, and sampling a
    run directory) names the reason, reading the checkpoint itself (sample, convert) fails
    in one line; nothing reads without end or blocks."""
    for name in FILE_ATTACKS:
        make_file_attack(variant(base, tmp_path, name), name)
    script = (
        "import json\nfrom pathlib import Path\n"
        "from train.checkpoint import CheckpointError, incomplete, newest_complete, "
        "read_checkpoint, read_run_checkpoint\n"
        f"root, names = Path({str(tmp_path)!r}), {list(FILE_ATTACKS)!r}\n"
        "out = {}\n"
        "for n in names:\n"
        "    ckpt = root / n / 'checkpoints' / 'step_00000010'\n"
        "    found, skipped = newest_complete(root / n, hashes=False)\n"
        "    try:\n"
        "        read_run_checkpoint(ckpt, 0, 1); read_checkpoint(ckpt); err = None\n"
        "    except CheckpointError as e:\n"
        "        err = str(e)\n"
        "    out[n] = [incomplete(ckpt), [w for _, w in skipped], err]\n"
        "print(json.dumps(out))\n")
    done = run_limited(script)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.splitlines()[-1])
    for name, reason in FILE_ATTACKS.items():
        why, skipped, err = got[name]
        assert why is not None and why.startswith(reason), (name, why)
        assert skipped == [why], name                    # a run directory falls back
        if name.startswith(("json_", "rng_")):           # read directly: refused
            assert err is not None and "not a regular file" in err and "\n" not in err, name


def test_a_fifo_checkpoint_json_is_skipped_on_resume(base, cache, tmp_path, capsys):
    """End to end: the newest checkpoint's checkpoint.json is a FIFO; the run skips it
    with one line and resumes from the previous one (before the fix: blocked forever)."""
    import signal

    def hung(*_):
        raise TimeoutError("train run blocked on the FIFO")
    run = copy_run(base, tmp_path)
    make_file_attack(run / "checkpoints" / "step_00000010", "json_fifo")
    capsys.readouterr()
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(120)
    try:
        assert cli_run(cache, run, 10) == 0
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    out = capsys.readouterr().out
    assert "skipping checkpoints/step_00000010: checkpoint.json is a FIFO, not a regular " \
           "file" in out
    assert f"resumed from {run / 'checkpoints' / 'step_00000005'} (step 5)" in out


@pytest.mark.parametrize("change, message", [
    (lambda t: t["loader"].update(epoch=float("inf")), "loader epoch=inf is not an integer"),
    (lambda t: t["loader"].update(epoch=-3), "loader epoch=-3 is not an integer >= 0"),
    (lambda t: t["loader"].update(epoch=True), "loader epoch=True is not an integer"),
    (lambda t: t["loader"].update(batch_in_epoch=-7),
     "loader batch_in_epoch=-7 is not an integer in [0, "),
    (lambda t: t["loader"].update(batch_in_epoch=10 ** 6),
     "loader batch_in_epoch=1000000 is not an integer in [0, "),
    (lambda t: t.update(step=10 ** 30), "train.step=1000000000000000000000000000000 is not "
     "the step of its directory (10)"),
], ids=["epoch-inf", "epoch-neg", "epoch-bool", "batch-neg", "batch-huge", "step-huge"])
def test_a_train_state_out_of_range_stops_the_resume_in_one_line(base, cache, tmp_path,
                                                                capsys, change, message):
    """checkpoint.json's step and loader position (hashed with nothing: a crafted or
    hand-edited file) are checked before the run trains: an integer epoch >= 0, a batch
    within the epoch, the step of the directory. Before: OverflowError, numpy's
    ValueError, IndexError, or a resume at step 10^30 that trained nothing."""
    ckpt = variant(base, tmp_path, "run")              # only step 10: no fall back
    run = tmp_path / "run"
    shutil.copy2(base / "config.yaml", run / "config.yaml")
    edit_meta(ckpt, lambda m: change(m["train"]))
    capsys.readouterr()
    assert cli_run(cache, run, 11) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"error: {ckpt}/checkpoint.json: ") and message in err, err


def test_optimizer_state_must_be_exactly_adamws():
    """load_optimizer refuses what AdamW's first step would crash on (or silently
    misuse): a 0-dim exp_avg, a missing one, a step of the parameter's shape, a tensor
    replaced by a plain value, hyperparameters of another type or missing, a tensor
    AdamW does not keep, float8."""
    from train.checkpoint import CheckpointError
    from train.state import load_optimizer, optimizer_state

    params = [torch.nn.Parameter(torch.randn(3, 2)), torch.nn.Parameter(torch.randn(4))]
    opt = torch.optim.AdamW(params, lr=1e-3)
    sum((p ** 2).sum() for p in params).backward()
    opt.step()
    tensors, info = optimizer_state(opt)
    info = json.loads(json.dumps(info))
    load_optimizer(opt, dict(tensors), info, "o")      # as saved: fine
    for change, message in [
        (lambda t, g: t.update({"state.0.exp_avg": torch.zeros(())}),
         r"o: state.0.exp_avg is \[\], its parameter \[3, 2\]"),
        (lambda t, g: t.pop("state.0.exp_avg"),
         r"parameter 0 has \['exp_avg_sq', 'step'\] but not \['exp_avg'\]"),
        (lambda t, g: t.update({"state.0.step": torch.zeros(3, 2)}),
         r"state.0.step is \[3, 2\], not a 0-dim step count"),
        (lambda t, g: t.update({"state.0.step": torch.tensor(-1.0)}), "not a step count"),
        (lambda t, g: t.update({"state.1.momentum": torch.zeros(4)}),
         "'state.1.momentum' is none of AdamW's state"),
        (lambda t, g: t.update({"state.1.exp_avg": torch.zeros(4, dtype=torch.float8_e4m3fn)}),
         "not dense float16, bfloat16, float32 or float64"),
        (lambda t, g: g["param_groups"][0].update(lr="abc"),
         r"param group 0 does not match this run's AdamW: of another type \[\"lr='abc'\"\]"),
        (lambda t, g: g["param_groups"][0].pop("lr"), r"missing \['lr'\]"),
        (lambda t, g: g["param_groups"][0].update(betas=[0.9]), r"betas=\[0.9\]"),
        (lambda t, g: g["param_groups"][0].update(amsgrad=1), "amsgrad=1"),
        (lambda t, g: g["param_groups"][0].update(momentum=0.9), r"unknown \['momentum'\]"),
        (lambda t, g: g["scalars"].update({"0": {"exp_avg": 1.0}}),
         "scalars.'0'. = {'exp_avg': 1.0}: AdamW keeps no plain per-parameter values"),
    ]:
        t, g = dict(tensors), json.loads(json.dumps(info))
        change(t, g)
        with pytest.raises(CheckpointError, match=message):
            load_optimizer(opt, t, g, "o")
    opt.step()                                          # the live state was never touched


def test_a_torch_rng_state_torch_refuses_is_a_damaged_state():
    """A torch CPU generator state of the right length but invalid content: refused as a
    damaged state (before: RuntimeError from torch.set_rng_state), nothing set."""
    import random

    from train.checkpoint import CheckpointError
    from train.state import load_rng, rng_state

    saved = json.loads(json.dumps(rng_state()))
    bad = {**saved, "torch": "ff" * (len(saved["torch"]) // 2)}   # the python part is fine
    random.seed(7)
    before, torch_before = random.getstate(), torch.get_rng_state()
    with pytest.raises(CheckpointError, match="rng_0.json: damaged random state: torch: "
                                              "not a valid mt19937 generator state"):
        load_rng(bad, "rng_0.json")
    assert random.getstate() == before and torch.equal(torch.get_rng_state(), torch_before)


SAMPLE_ATTACKS = {
    # name: (change to checkpoint.json, extra sample arguments, the one line's text)
    "latent_scale": (lambda m: m.update(latent_scale="abc"), [],
                     "checkpoint.json: latent_scale='abc' is not a finite positive number"),
    "latent_scale_0": (lambda m: m.update(latent_scale=0), [],
                       "latent_scale=0 is not a finite positive number"),
    "label_dropout": (lambda m: m["config"].update({"model.label_dropout": "x"}),
                      ["--cfg", "1.5"], "config model.label_dropout='x' is not a number"),
    "cache_list": (lambda m: m.update(cache=[1]), [], "cache=[1] is not a mapping"),
    "vae_list": (lambda m: m.update(cache={"vae": [1]}), [], "is not a mapping"),
    "vae_bogus": (lambda m: m.update(cache={"random_weights": True,
                                            "vae": {"config": {"bogus": 1}}}), [],
                  "checkpoint.json cache: VAE config bogus=1: not an AutoencoderKL key"),
    "vae_huge": (lambda m: m.update(cache={"random_weights": True, "vae": {"config": {
        "block_out_channels": [16384] * 4, "down_block_types": ["DownEncoderBlock2D"] * 4,
        "up_block_types": ["UpDecoderBlock2D"] * 4, "layers_per_block": 8}}}), [],
        "VAE config block_out_channels=[16384, 16384, 16384, 16384]: not an AutoencoderKL"),
    "vae_many": (lambda m: m.update(cache={"random_weights": True, "vae": {"config": {
        "block_out_channels": [1024] * 8, "down_block_types": ["DownEncoderBlock2D"] * 8,
        "up_block_types": ["UpDecoderBlock2D"] * 8, "layers_per_block": 8}}}), [],
        "parameters, more than 400M"),
    "vae_groups": (lambda m: m.update(cache={"random_weights": True, "vae": {"config": {
        "norm_num_groups": 7}}}), [], "cannot build the VAE from its config (ValueError: "),
}


def test_sample_and_convert_check_what_checkpoint_json_says(base, tmp_path):
    """`train sample` and `train convert` on crafted checkpoint.json fields and weights
    of a dtype that cannot be checked: one error: line each, exit 2 (before: ValueError,
    AttributeError, TypeError tracebacks, a 9.6 GB allocation for the huge VAE). In a
    fresh interpreter under a memory limit."""
    cmds = []
    for name, (change, extra, _) in SAMPLE_ATTACKS.items():
        ckpt = variant(base, tmp_path, name)
        edit_meta(ckpt, change)
        cmds.append(["sample", str(ckpt), "--num", "2", "--steps", "2", "--vae", "random",
                     "--out", str(tmp_path / f"{name}.out"), *extra])
    fp8 = variant(base, tmp_path, "fp8")
    from safetensors.torch import load_file, save_file
    for name in ("model.safetensors", "ema.safetensors"):
        state = load_file(fp8 / name)
        (fp8 / name).unlink()
        save_file({k: v.to(torch.float8_e4m3fn) for k, v in state.items()}, fp8 / name)
    rehash(fp8)
    cmds += [["sample", str(fp8), "--out", str(tmp_path / "fp8.out")],
             ["convert", str(fp8), str(tmp_path / "fp8.pt")]]
    script = ("import sys\nfrom train.cli import main\n"
              f"for cmd in {cmds!r}:\n"
              "    rc = main(cmd)\n    print(f'@@ {rc}', file=sys.stderr, flush=True)\n")
    done = run_limited(script)
    parts = done.stderr.split("@@ ")
    assert len(parts) == len(cmds) + 1 and done.returncode == 0, done.stderr[-3000:]
    errs = [parts[0]] + [p[2:] for p in parts[1:-1]]
    wants = [want for _, _, want in SAMPLE_ATTACKS.values()] + [
        "fp8/checkpoints/step_00000010/ema.safetensors: "] * 2
    for cmd, rc, err, want in zip(cmds, parts[1:], errs, wants):
        assert rc.startswith("2\n"), (cmd, done.stderr[-3000:])
        line = one_line(err)
        assert line.startswith("error: ") and want in line, (cmd, line)
    assert "float8_e4m3fn tensor on cpu, not dense float16" in errs[-1]
