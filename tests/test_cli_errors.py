"""Bad inputs to the command lines end in one `error: ...` line naming the file or key and
a non-zero exit code, never a traceback (issue 14): config files and overrides of
`train run` (with and without --dry-run), --dry-run's start checks, the files of
`train eval` (--inception, --ref, the samples) and `pipeline encode --teacher-weights`.
Every bad file is a real one; pickles are refused without running anything in them."""

import fractions
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import CacheSpec
from conftest import write_jpeg_folder, write_structured_cache
from pipeline.cli import main as pipeline_main
from train.cli import main as train_main
from train.config import load_config

ROOT = Path(__file__).resolve().parents[1]
DEMO = str(ROOT / "configs" / "demo.yaml")


def one_error_line(capsys, *names: str) -> str:
    """The single stderr line, which starts with `error:` and names each of `names`."""
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: "), lines[0]
    for name in names:
        assert name in lines[0], (name, lines[0])
    return lines[0]


class _Marker:
    """Unpickling this object would create a file (open(path, "w")): the proof that a
    loader ran pickled code."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


PICKLES = ("harmless.pkl", "marker-p2.pkl", "marker-newest.pkl")


def bad_pickles(tmp_path) -> dict[str, Path]:
    """PICKLES: a harmless non-tensor object, and two that would create tmp_path/MARKER
    (protocol 2, whose loader reaches the GLOBAL before failing, and the newest)."""
    marker = _Marker(tmp_path / "MARKER")
    out = dict(zip(PICKLES, (pickle.dumps(fractions.Fraction(1, 3)),
                             pickle.dumps(marker, protocol=2),
                             pickle.dumps(marker, protocol=pickle.HIGHEST_PROTOCOL))))
    for name, data in out.items():
        (tmp_path / name).write_bytes(data)
    return {name: tmp_path / name for name in out}


def object_npz(path: Path, *keys: str) -> Path:
    """An .npz of object arrays: numpy pickles them, np.load(allow_pickle=False) refuses."""
    np.savez(path, **{k: np.array([{"a": 1}, None], dtype=object) for k in keys or ["arr_0"]})
    return path


def truncated(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[:len(data) // 2])
    return dst


# ------------------------------------------------------------------ train run: the config
CONFIG_FILES = {   # name: (file content, what the line must say besides the file name)
    "list.yaml": (b"- run_dir: x\n- seed: 1\n", "the top level is a list"),
    "scalar.yaml": (b"42\n", "the top level is the single value '42'"),
    "words.yaml": (b"hello world\n", "the top level is the single value 'hello world'"),
    "empty.yaml": (b"# nothing yet\n", "is empty"),
    "model-list.yaml": (b"model: [1, 2]\n", "model=[1, 2]: expected a mapping"),
    "data-scalar.yaml": (b"data: 5\n", "data=5: expected a mapping of the keys data.cache"),
    "betas-map.yaml": (b"optim:\n  betas: {a: 1}\n", "optim.betas={'a': 1}: expected a list"),
    "lr-list.yaml": (b"optim:\n  lr: [1, 2]\n", "optim.lr=[1, 2]: expected a single float"),
    "latin1.yaml": ("run_dir: caf\u00e9\n".encode("latin-1"), "not UTF-8 text"),
    "syntax.yaml": (b"model: [unclosed\n", "not valid YAML at line 2"),
    "interp.yaml": (b"run_dir: ${oops\n", "run_dir"),
}


@pytest.mark.parametrize("dry_run", [True, False], ids=["dry-run", "run"])
@pytest.mark.parametrize("name", sorted(CONFIG_FILES))
def test_a_bad_config_file_is_one_line(tmp_path, capsys, name, dry_run):
    content, says = CONFIG_FILES[name]
    path = tmp_path / name
    path.write_bytes(content)
    argv = ["run", str(path), *(["--dry-run"] if dry_run else [])]
    assert train_main(argv) == 2
    one_error_line(capsys, name, says)


@pytest.mark.parametrize("make, says", [
    (lambda p: p, "not found"),
    (lambda p: p.mkdir() or p, "is a directory"),
], ids=["missing", "directory"])
def test_a_config_path_that_is_no_file_is_one_line(tmp_path, capsys, make, says):
    path = make(tmp_path / "preset.yaml")
    assert train_main(["run", str(path), "--dry-run"]) == 2
    one_error_line(capsys, "preset.yaml", says)


@pytest.mark.parametrize("override, says", [
    ("model=[1,2]", "model=[1, 2]: expected a mapping of the keys model.arch"),
    ("optim.betas={a: 1}", "optim.betas={'a': 1}: expected a list of floats"),
    ("optim.lr=[unclosed", "override 'optim.lr=[unclosed': not valid YAML"),
    ("run_dir=${x", "override 'run_dir=${x'"),
    ("=5", "key=value, got ['=5']"),
])
def test_a_bad_override_is_one_line(capsys, override, says):
    assert train_main(["run", DEMO, override, "--dry-run"]) == 2
    one_error_line(capsys, says)


def test_the_command_line_itself_prints_one_line(tmp_path):
    """The real entry point in a fresh interpreter: no traceback reaches the terminal."""
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    out = subprocess.run([sys.executable, "-m", "train.cli", "run", "list.yaml", "--dry-run"],
                         cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [
        "error: list.yaml: the top level is a list; a config is a mapping of keys "
        "(run_dir: ..., data: {cache: ...}, optim: {lr: ...}), as in configs/*.yaml"]


# ------------------------------------------------------------------ train run --dry-run
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    spec = CacheSpec(num_samples=32, shard_size=16, latent_size=8, tokens=16, token_dim=32)
    return write_structured_cache(tmp_path_factory.mktemp("cache") / "c", spec)


def demo_args(cache, run_dir, *extra) -> list[str]:
    """`train run` of the demo preset on the test cache: batch 32 on 1 process."""
    return ["run", DEMO, f"run_dir={run_dir}", f"data.cache={cache}", "model.latent_size=8",
            "align.teacher_dim=32", *extra]


@pytest.mark.parametrize("extra, says", [
    ("micro_batch_size=7", "micro_batch_size=7 must divide the per-device batch 32"),
    ("data.streams=3", "data.streams=3 must be a multiple of the 1 process(es)"),
])
def test_dry_run_refuses_what_the_run_refuses(cache, tmp_path, capsys, extra, says):
    assert train_main(demo_args(cache, tmp_path / "r", extra, "--dry-run")) == 2
    dry = one_error_line(capsys, says)
    assert train_main(demo_args(cache, tmp_path / "r", extra)) == 2     # the real run
    assert one_error_line(capsys) == dry


@pytest.mark.parametrize("argv", [["--help"], ["sample", "--help"], ["run", "--help"]])
def test_help_imports_no_torch(argv):
    """`train --help` answers without importing torch (it took ~5 s; issue 17, point 5)."""
    script = ("import sys\nfrom train.cli import main\ntry:\n    main(sys.argv[1:])\n"
              "except SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script, *argv], capture_output=True,
                         text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert "usage:" in out.stdout and "TORCH False" in out.stdout, out.stdout + out.stderr


@pytest.mark.parametrize("override, says", [
    ("optim.lrr=1", "unknown key 'optim.lrr'"), ("batch_size=0", "batch_size=0: must be >= 1"),
    ("model.arch=sit-q/2", "model.arch='sit-q/2': choose one of"),
    ("trackers=[wandbb]", "trackers=['wandbb']")])
def test_a_config_typo_is_reported_before_torch_loads(override, says):
    """A typo in a preset or an override is one line in about a second: the config is
    checked before torch and the models are imported (it took 5-6 s; issue 17, point 5)."""
    script = ("import sys\nfrom train.cli import main\nrc = main(sys.argv[1:])\n"
              "print('RC', rc, 'TORCH', 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script, "run", "configs/demo.yaml", override],
                         capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1])
    assert "RC 2 TORCH False" in out.stdout, out.stdout + out.stderr
    err = out.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0], out.stderr


def test_the_documented_launch_works_inside_a_repa_checkout(cache, tmp_path):
    """A REPA or DiT checkout has its own train.py: `python -m train.cli` there imports it
    instead of this package; the installed `train` script, which the README launches, does
    not (issue 17, point 9)."""
    checkout = tmp_path / "REPA"
    checkout.mkdir()
    (checkout / "train.py").write_text("raise SystemExit('REPA train.py ran')\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    hijacked = subprocess.run([sys.executable, "-m", "train.cli", "--help"], cwd=checkout,
                              capture_output=True, text=True, timeout=120, env=env)
    assert "REPA train.py ran" in hijacked.stderr        # why the README does not use -m
    script = Path(sys.executable).with_name("train")
    launched = subprocess.run(
        [str(Path(sys.executable).with_name("accelerate")), "launch", "--cpu",
         "--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(script), *demo_args(cache, tmp_path / "r"),
         "--dry-run"], cwd=checkout, capture_output=True, text=True, timeout=300, env=env)
    assert launched.returncode == 0 and "would train" in launched.stdout, \
        launched.stdout[-2000:] + launched.stderr[-2000:]


def test_a_run_without_a_cache_says_how_to_get_one(tmp_path, capsys):
    """No cache at data.cache: one line naming the option and the command that builds one
    (issue 17, point 8), from the dry run and the run alike."""
    missing = tmp_path / "nowhere"
    for extra in (("--dry-run",), ()):
        assert train_main(demo_args(missing, tmp_path / "r", *extra)) == 2
        line = one_error_line(capsys, "no such directory")
        assert line.startswith("error: data.cache: ") and "data.cache=" in line \
            and "pipeline encode" in line and "make demo" in line


def test_dry_run_splits_the_batch_over_the_launchers_processes(cache, tmp_path, capsys,
                                                                monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")           # torchrun --nproc-per-node 3
    assert train_main(demo_args(cache, tmp_path / "r", "--dry-run")) == 2
    line = one_error_line(capsys, "batch_size=32 does not split over 3 processes")
    assert line == f"error: {_accumulation_error(3)}"
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert train_main(demo_args(cache, tmp_path / "r", "micro_batch_size=8", "--dry-run")) == 0
    assert "= 2 process(es) x 8 x 2 accumulation, 2 data streams" in capsys.readouterr().out
    monkeypatch.setenv("WORLD_SIZE", "two")
    assert train_main(demo_args(cache, tmp_path / "r", "--dry-run")) == 2
    one_error_line(capsys, "WORLD_SIZE='two'")


def _accumulation_error(world: int) -> str:
    from train.config import ConfigError
    cfg = load_config(DEMO, ["run_dir=x", "data.cache=y"])
    with pytest.raises(ConfigError) as e:
        cfg.accumulation(world)
    return str(e.value)


@pytest.mark.skipif(__import__("importlib.util").util.find_spec("swanlab") is not None,
                    reason="swanlab is installed here")
def test_dry_run_checks_that_each_tracker_is_installed(cache, tmp_path, capsys):
    args = demo_args(cache, tmp_path / "r", "trackers=[tensorboard,swanlab]", "--dry-run")
    assert train_main(args) == 2
    one_error_line(capsys, "trackers: swanlab needs the swanlab package, which is not "
                           "installed here: pip install swanlab")


def test_dry_run_refuses_to_resume_another_recipe(cache, tmp_path, capsys):
    from train.config import to_yaml
    run_dir = tmp_path / "r"
    (run_dir / "checkpoints" / "step_00000005").mkdir(parents=True)
    saved = load_config(DEMO, [f"run_dir={run_dir}", f"data.cache={cache}",
                               "model.latent_size=8", "align.teacher_dim=32",
                               "data.streams=1"])
    (run_dir / "config.yaml").write_text(to_yaml(saved))
    assert train_main(demo_args(cache, run_dir, "optim.lr=3e-3", "--dry-run")) == 2
    err = capsys.readouterr().err   # the listing of differences takes a line each
    assert err.startswith("error: ") and "Traceback" not in err
    assert "holds a run with another config" in err and "optim.lr: saved 0.002 vs now 0.003" in err


# ------------------------------------------------------------------ train eval
@pytest.fixture(scope="module")
def evalfiles(tmp_path_factory) -> Path:
    """images.npz (four 16 px images: enough for FID and precision/recall, k = 3, against
    themselves) and every bad file of the eval tests below."""
    from torchvision.models.inception import Inception3
    root = tmp_path_factory.mktemp("eval")
    rng = np.random.default_rng(0)
    np.savez(root / "images.npz", rng.integers(0, 256, (4, 16, 16, 3), dtype=np.uint8))
    bad_pickles(root)
    object_npz(root / "object.npz")
    object_npz(root / "object-stats.npz", "mu", "sigma")
    names = Inception3(num_classes=1008, aux_logits=False, init_weights=False).state_dict()
    torch.save({"fc.weight": torch.zeros(2)}, root / "keys.pth")
    torch.save({k: torch.zeros(1) for k in names}, root / "shape.pth")    # 566 names
    truncated(root / "shape.pth", root / "cut.pth")
    mu, sigma = np.zeros(2048), np.eye(2048)
    for name, arrays in REF_ARRAYS.items():
        np.savez(root / name, **{k: v(mu, sigma) for k, v in arrays.items()})
    truncated(root / "mu-int.npz", root / "cut.npz")
    np.savez(root / "one.npz", np.zeros((1, 8, 8, 3), np.uint8))
    np.savez(root / "header.npz", np.zeros((4, 8, 8, 3), np.uint8))
    data = (root / "header.npz").read_bytes()   # the .npy magic, in place: the zip stays whole
    at = data.index(b"\x93NUMPY")
    (root / "header.npz").write_bytes(data[:at] + b"\x93NUMPX" + data[at + 6:])
    return root


def no_marker(root: Path) -> None:
    assert not (root / "MARKER").exists(), "a pickled object was run"


INCEPTION_CASES = {   # --inception FILE: what the line must say besides the file name
    **{name: "nothing in it was run" for name in PICKLES},
    "object.npz": "not a readable torch.save file",
    "keys.pth": "not the Inception port's keys: 471 missing ['Conv2d_1a_3x3.conv.weight'",
    "shape.pth": "Conv2d_1a_3x3.conv.weight is torch.float32 [1], expected torch.float32 "
                 "[32, 3, 3, 3]",
    "cut.pth": "not a readable torch.save file",
}


@pytest.mark.parametrize("name", sorted(INCEPTION_CASES))
def test_bad_inception_weights_are_one_line_and_never_run(evalfiles, capsys, name):
    images = str(evalfiles / "images.npz")
    assert train_main(["eval", images, "--ref", images,
                       "--inception", str(evalfiles / name)]) == 2
    one_error_line(capsys, name, INCEPTION_CASES[name], "pt_inception-2015-12-05")
    no_marker(evalfiles)


REF_ARRAYS = {   # ADM reference batches hold mu [2048], sigma [2048, 2048]
    "sigma-only.npz": {"sigma": lambda m, s: s},
    "small.npz": {"mu": lambda m, s: m[:3], "sigma": lambda m, s: s[:3, :3]},
    "sigma-shape.npz": {"mu": lambda m, s: m, "sigma": lambda m, s: s[:, :3]},
    "sigma-text.npz": {"mu": lambda m, s: m, "sigma": lambda m, s: np.array(["x"] * 4)},
    "mu-int.npz": {"mu": lambda m, s: m.astype(np.int64), "sigma": lambda m, s: s},
    "mu-nan.npz": {"mu": lambda m, s: np.full(2048, np.nan), "sigma": lambda m, s: s},
}
REF_CASES = {   # --ref FILE: what the line must say besides the file name
    **{name: "not a readable .npz (File is not a zip file); expected an .npz"
       for name in PICKLES},
    "object-stats.npz": "mu is an array of pickled Python objects (refused",
    "sigma-only.npz": "has neither mu/sigma nor arr_0 images (it has ['sigma']); expected an "
                      "ADM reference batch (mu, sigma[, arr_0])",
    "small.npz": "mu is float64 [3]; expected float [2048]",
    "sigma-shape.npz": "sigma is float64 [2048, 3]; expected float [2048, 2048]",
    "sigma-text.npz": "sigma is <U1 [4]; expected float [2048, 2048]",
    "mu-int.npz": "mu is int64 [2048]; expected float [2048]",
    "mu-nan.npz": "mu holds 2048 NaN/Inf values",
    "cut.npz": "not a readable .npz (File is not a zip file); expected an .npz",
}


@pytest.mark.parametrize("name", sorted(REF_CASES))
def test_bad_reference_batches_are_one_line(evalfiles, capsys, name):
    images = str(evalfiles / "images.npz")
    assert train_main(["eval", images, "--ref", str(evalfiles / name),
                       "--random-weights"]) == 2
    one_error_line(capsys, name, REF_CASES[name])
    no_marker(evalfiles)


SAMPLE_CASES = {   # (samples, extra arguments): what the line must say
    ("one.npz", ()): ("one.npz", "holds 1 image(s)"),
    ("header.npz", ()): ("header.npz", "arr_0 is not a readable .npy array"),
    ("images.npz", ("--batch-size", "0")): ("--batch-size 0", "must be >= 1"),
    ("images.npz", ("--out", "{root}/images.npz/r.json")): ("r.json", "images.npz is a file"),
    (".", ()): ("samples", "is a directory"),
}


@pytest.mark.parametrize("samples, extra", sorted(SAMPLE_CASES))
def test_bad_samples_and_options_are_one_line(evalfiles, capsys, samples, extra):
    argv = [a.format(root=evalfiles) for a in extra]
    assert train_main(["eval", str(evalfiles / samples), "--ref",
                       str(evalfiles / "images.npz"), "--random-weights", *argv]) == 2
    one_error_line(capsys, *SAMPLE_CASES[samples, extra])


# ------------------------------------------------------------------ pipeline encode
@pytest.fixture(scope="module")
def encode_inputs(tmp_path_factory):
    """An image folder, a local tiny VAE (`pipeline encode --dry-run` reaches the
    teacher's weights offline) and the bad weight files."""
    from diffusers import AutoencoderKL

    from pipeline.encoders import TINY_VAE_CONFIG
    root = tmp_path_factory.mktemp("encode")
    write_jpeg_folder(root / "images", classes=1, per_class=1)
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(root / "vae")
    bad_pickles(root)
    object_npz(root / "object.npz")
    torch.save({"cls_token": torch.zeros(1, 1, 64)}, root / "whole.pth")
    truncated(root / "whole.pth", root / "cut.pth")
    return root


@pytest.mark.parametrize("weights, says", [
    (["--vae", "stabilityai/sd-vae-ft-mse"], "cannot load the VAE 'stabilityai/sd-vae-ft-mse'"),
    (["--teacher", "dinov2-b"], "cannot load teacher dinov2-b"),
])
def test_weights_missing_offline_fail_fast_in_one_line(encode_inputs, tmp_path, capsys,
                                                       monkeypatch, weights, says):
    """Offline (HF_HUB_OFFLINE, or no route to the hub) and not in the local cache: one
    line saying so, without the hub downloader's retries (~25 s of them; issue 17, point
    4); `train sample`'s decoder the same."""
    from train.vae import DecoderError, _pretrained_vae
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    args = {"--vae": str(encode_inputs / "vae"), "--teacher": "dinov2-tiny",
            "--random-weights": None}
    args.update(dict(zip(weights[::2], weights[1::2])))
    if "--teacher" in weights or "--vae" in weights:
        args.pop("--random-weights")
    argv = [a for k, v in args.items() for a in ((k,) if v is None else (k, v))]
    assert pipeline_main(["encode", "--dataset", "imagefolder", "--data-dir",
                          str(encode_inputs / "images"), "--out", str(tmp_path / "out"),
                          "--resolution", "64", *argv, "--dry-run"]) == 2
    out = capsys.readouterr()
    # the dry run shows the plan all the same (the architectures fix its shapes)
    assert "plan: 1 images" in out.out and "moments [8, 8, 8]" in out.out
    assert "their weights are not here" in out.out
    err = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith("error: ") and says in err[0]
    assert "not in the local Hugging Face cache" in err[0] and "HF_HUB_OFFLINE is set" in err[0]
    with pytest.raises(DecoderError, match=r"sd-vae-ft-ema.*not in the local Hugging Face "
                                           r"cache .* HF_HUB_OFFLINE is set"):
        _pretrained_vae("stabilityai/sd-vae-ft-ema")


@pytest.mark.parametrize("name", [*PICKLES, "object.npz", "cut.pth"])
def test_bad_teacher_weights_are_one_line_and_never_run(encode_inputs, tmp_path, capsys, name):
    path = encode_inputs / name
    assert pipeline_main([
        "encode", "--dataset", "imagefolder", "--data-dir", str(encode_inputs / "images"),
        "--out", str(tmp_path / "out"), "--vae", str(encode_inputs / "vae"),
        "--teacher", "dinov2-tiny", "--teacher-weights", str(path), "--resolution", "64",
        "--dry-run"]) == 2
    # names the file and the formats that are read
    one_error_line(capsys, f"--teacher-weights {path}", "torch.save", ".safetensors")
    no_marker(encode_inputs)


@pytest.mark.parametrize("extra, says", [
    # int8 storage of an attention that was not asked for: a cache without attn_qk would
    # be encoded (hours on ImageNet) and only `train run ... haste` would say so
    (["--attn-dtype", "int8"], ["--attn-dtype 'int8'", "--teacher-attn"]),
    (["--teacher-attn", "2"], ["--teacher-attn 2", "blocks 0..1"]),   # dinov2-tiny: 2 blocks
])
def test_teacher_attention_options_are_one_line(encode_inputs, tmp_path, capsys, extra, says):
    assert pipeline_main([
        "encode", "--dataset", "imagefolder", "--data-dir", str(encode_inputs / "images"),
        "--out", str(tmp_path / "out"), "--vae", str(encode_inputs / "vae"),
        "--teacher", "dinov2-tiny", "--random-weights", "--resolution", "64",
        "--dry-run", *extra]) == 2
    one_error_line(capsys, *says)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--random-teacher", "--random-weights"])
def test_teacher_weights_with_a_random_teacher_is_one_line(encode_inputs, tmp_path, capsys,
                                                           flag):
    """--teacher-weights would be loaded by nothing (the teacher is random-init): refused
    before the plan, not recorded as if it had been used."""
    weights = tmp_path / "teacher.pth"
    weights.write_bytes(b"unused")
    assert pipeline_main([
        "encode", "--dataset", "imagefolder", "--data-dir", str(encode_inputs / "images"),
        "--out", str(tmp_path / "out"), "--vae", str(encode_inputs / "vae"),
        "--teacher", "dinov2-tiny", flag, "--teacher-weights", str(weights),
        "--resolution", "64", "--dry-run"]) == 2
    one_error_line(capsys, f"--teacher-weights '{weights}'", "--random-teacher")
    assert not (tmp_path / "out").exists()
