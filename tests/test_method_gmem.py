"""GMem (train/methods/gmem.py, cache/bank.py) on the structured cache: the losses fall,
the condition is the sample's CLS token (not its label), resume is bit-exact, `pipeline
bank` writes the cache's CLS column and damaged banks are refused in one line, and `train
sample` draws its conditions from a bank file or the training cache."""

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from cache import CacheSpec, open_cache
from cache.bank import BankError, open_bank
from cache.format import CLS, LABEL, MOMENTS, TOKENS
from conftest import tiny_run_config, write_structured_cache
from pipeline.cli import main as pipeline_main
from train.checkpoint import load_backbone
from train.cli import main as train_main
from train.generate import block_generator
from train.loop import train
from train.methods.gmem import ClsEmbedder
from train.step import Student, build_generator

ROOT = Path(__file__).resolve().parents[1]
SPEC = CacheSpec(num_samples=96, shard_size=32, latent_size=8, tokens=16, token_dim=32)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return write_structured_cache(tmp_path_factory.mktemp("cache") / "c", SPEC)


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    """A random tiny VAE as a local directory (the structured cache records none)."""
    from diffusers import AutoencoderKL

    from pipeline.encoders import TINY_VAE_CONFIG
    torch.manual_seed(3)
    out = tmp_path_factory.mktemp("vae") / "tiny"
    AutoencoderKL(**TINY_VAE_CONFIG).save_pretrained(out)
    return out


def tiny(cache, run_dir, *extra):
    return tiny_run_config(cache, run_dir, "align.method=gmem", "model.arch=sit-tiny/2",
                           "align.weight=0.5", "optim.lr=3e-3", "data.shuffle_buffer=32",
                           "batch_size=16", "optim.ema_decay=0.9", "checkpoint_every=5",
                           "keep_checkpoints=10", *extra)


def metrics(run_dir):
    return [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run(cache, vae_dir, tmp_path_factory):
    """30 uninterrupted steps, with a preview grid at the end (bank: the training cache)."""
    run_dir = tmp_path_factory.mktemp("gmem") / "a"
    train(tiny(cache, run_dir, "max_steps=30", "preview.every=30", "preview.num=4",
               "preview.steps=3", f"preview.vae={vae_dir}"), log=lambda _m: None)
    return run_dir


# ------------------------------------------------------------------ training
def test_losses_fall_and_the_preview_samples_from_the_training_cache(run):
    m = metrics(run)
    assert [r["step"] for r in m] == list(range(1, 31))
    for term in ("loss_v", "loss_repa"):
        first, last = np.mean([r[term] for r in m[:5]]), np.mean([r[term] for r in m[-5:]])
        assert last < first - 0.1 * abs(first), (term, first, last)
    assert (run / "samples" / "step_00000030.png").is_file()
    cfg = json.loads((run / "checkpoints/step_00000030/checkpoint.json").read_text())["config"]
    assert cfg["align.method"] == "gmem" and cfg["method_args.cond_dropout"] == 0.4


def test_the_condition_is_the_cls_token_not_the_label(cache, run, tmp_path):
    net, _ck = load_backbone(run)                        # trained EMA, eval mode
    assert isinstance(net.y_embedder, ClsEmbedder)
    ds = open_cache(cache)
    rows = ds.gather(np.arange(8), [MOMENTS, TOKENS, CLS, LABEL])
    batch = {k: torch.from_numpy(v[:, 0] if k != LABEL else v) for k, v in rows.items()}
    cls = torch.nn.functional.normalize(batch[CLS].float(), dim=1)
    x, t = torch.randn(8, 4, 8, 8), torch.full((8,), 0.5)
    v = net(x, t, cls)[0]
    assert not torch.allclose(v, net(x, t, cls.roll(1, 0))[0], atol=1e-4)  # other CLS
    with pytest.raises(ValueError, match=r"condition is \[B, 32\] CLS tokens"):
        net(x, t, batch[LABEL])                          # a label cannot even be passed

    # the training objective: a batch whose labels are permuted gives the same terms; one
    # whose CLS tokens are permuted does not; the dropout mask comes from the draws
    cfg = tiny(cache, tmp_path, "max_steps=1")
    torch.manual_seed(0)
    gen_net, method = build_generator(cfg)
    gen_net.load_state_dict(net.state_dict())
    student = Student(gen_net, method, latent_scale=0.18215).train()
    draws = method.draws(8, (8, 8, 8), generator=torch.Generator().manual_seed(1))
    base = student(batch, draws)
    same = student({**batch, LABEL: batch[LABEL].flip(0)}, draws)
    assert all(torch.equal(base[k], same[k]) for k in base)
    scaled = student({**batch, CLS: batch[CLS].float() * 4}, draws)   # L2-normalised
    assert all(torch.equal(base[k], scaled[k]) for k in base)
    other = student({**batch, CLS: batch[CLS].roll(1, 0)}, draws)
    assert not torch.equal(base["loss_v"], other["loss_v"])
    masked = student(batch, {**draws, "cond_drop": ~draws["cond_drop"]})
    assert not torch.equal(base["loss_v"], masked["loss_v"])


def test_draws_and_the_dropout_formula():
    from train.config import AlignConfig, ModelConfig
    from train.methods import build_method
    from train.methods.base import step_draws
    method = build_method(AlignConfig(method="gmem", teacher_dim=32), {},
                          ModelConfig(arch="sit-tiny/2"))
    d = method.draws(64, (8, 8, 8), generator=torch.Generator().manual_seed(5))
    common = step_draws(64, (8, 8, 8), 0.1, generator=torch.Generator().manual_seed(5))
    assert all(torch.equal(d[k], common[k]) for k in common)      # the common draws first
    assert d["cond_drop"].shape == (64, 32) and d["cond_drop"].dtype == torch.bool
    assert abs(d["cond_drop"].float().mean().item() - 0.4) < 0.03
    emb = ClsEmbedder(32, 16, 0.4)
    y = torch.nn.functional.normalize(torch.randn(64, 32), dim=1)
    want = emb.linear(torch.where(d["cond_drop"], 0.0, y) / 0.6)   # inverted dropout
    assert torch.allclose(emb(y, True, d["cond_drop"]), want, atol=1e-6)
    assert torch.equal(emb(y, False, d["cond_drop"]), emb.linear(y))  # nothing at eval


def test_resume_is_bit_exact(cache, run, tmp_path):
    """Interrupted at 6 and rerun to 10 vs the uninterrupted run's step 10 (the module's
    30-step run passes it: the trajectory does not depend on max_steps)."""
    b = tmp_path / "b"
    train(tiny(cache, b, "max_steps=6"), log=lambda _m: None)       # "interrupted" at 6
    msgs = []
    train(tiny(cache, b, "max_steps=10"), log=msgs.append)
    assert any("resumed from" in m and "step_00000006" in m for m in msgs)
    ref = metrics(run)[:10]
    for key in ("loss", "loss_v", "loss_repa", "grad_norm"):
        assert [m[key] for m in metrics(b)] == [m[key] for m in ref], key
    for name in ("model.safetensors", "ema.safetensors", "optimizer.safetensors"):
        wa, wb = (load_file(d / "checkpoints/step_00000010" / name) for d in (run, b))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name


# ------------------------------------------------------------------ the bank
def test_pipeline_bank_writes_the_cls_column_in_valid_order(make_cache, tmp_path, capsys):
    path, spec = make_cache("holes", failures={3: "corrupt image", 20: "empty file"})
    out = tmp_path / "bank.safetensors"
    assert pipeline_main(["bank", str(path), str(out), "--chunk", "16"]) == 0
    assert "68 rows x 24" in capsys.readouterr().out
    ds = open_cache(path)
    z = load_numpy(out)                                   # the safetensors library reads it
    assert np.array_equal(z["index"], ds.valid_indices) and 3 not in z["index"]
    assert np.array_equal(z["cls"], ds.gather(ds.valid_indices, [CLS])[CLS][:, 0])
    assert np.array_equal(z["label"], ds.gather(ds.valid_indices, [LABEL])[LABEL])
    assert z["cls"].dtype == np.float16 and z["label"].dtype == np.int64
    bank, from_cache = open_bank(out), open_bank(path)
    rows = np.array([0, 67, 3, 3, 40])
    assert np.array_equal(bank.cls(rows), from_cache.cls(rows))
    assert np.array_equal(bank.labels(rows), from_cache.labels(rows))
    assert bank.cache_manifest_sha256 == ds.manifest["sha256"] == from_cache.sha256

    for args, message in [
        ([str(tmp_path / "nope"), str(tmp_path / "x.safetensors")], "no such directory"),
        ([str(tmp_path), str(tmp_path / "x.safetensors")], "is not a urepa-cache"),
        ([str(path), str(tmp_path)], "is a directory: name the bank file"),
    ]:
        assert pipeline_main(["bank", *args]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.safetensors").exists()


def _damaged(good: Path, tmp: Path) -> dict[str, tuple[Path, str]]:
    """Bank files broken in different ways, each with the refusal's expected text."""
    data = good.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    cases = {}

    def write(name, blob):
        cases[name] = tmp / f"{name}.safetensors"
        cases[name].write_bytes(blob)
        return cases[name]

    def with_header(h):
        head = json.dumps(h).encode()
        return struct.pack("<Q", len(head)) + head + data[8 + n:]
    write("truncated", data[:-100])
    write("wrong_shape", with_header({**header, "cls": {**header["cls"],
                                      "shape": [header["cls"]["shape"][0], 33]}}))
    write("rank", with_header({**header, "cls": {**header["cls"], "shape": [96 * 32]}}))
    write("row_counts", with_header({**header, "label": {**header["label"], "shape": [95]}}))
    write("not_a_bank", with_header({k: v for k, v in header.items() if k != "__metadata__"}))
    write("header_length", struct.pack("<Q", 1 << 40) + data[8:])
    write("empty", b"")
    write("appended", data + b"\0" * 8)
    return {k: (cases[k], msg) for k, msg in [
        ("truncated", "truncated"), ("wrong_shape", "truncated or damaged"),
        ("rank", "expected F16 of rank 2"), ("row_counts", "row counts differ"),
        ("not_a_bank", "not a file of `pipeline bank`"),
        ("header_length", "does not fit the file"), ("empty", "not a safetensors file"),
        ("appended", "do not tile")]}


def test_damaged_banks_are_refused_in_one_line(cache, run, tmp_path, capsys):
    good = tmp_path / "good.safetensors"
    assert pipeline_main(["bank", str(cache), str(good)]) == 0
    capsys.readouterr()
    for name, (path, message) in _damaged(good, tmp_path).items():
        with pytest.raises(BankError, match=message) as e:
            open_bank(path)
        assert "\n" not in str(e.value), name
    with pytest.raises(BankError, match="no such file or directory"):
        open_bank(tmp_path / "missing.safetensors")
    # through `train sample`: exit 2 and one line, before any sample is made
    for name in ("truncated", "wrong_shape"):
        out = tmp_path / f"s-{name}"
        assert train_main(["sample", str(run), "--out", str(out), "--bank",
                           str(tmp_path / f"{name}.safetensors"), "--num", "2"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: --bank") and err.count("\n") == 1, err
        assert not (out / "images").exists() or not any((out / "images").iterdir())


# ------------------------------------------------------------------ sampling
def test_train_sample_draws_conditions_from_the_bank(cache, run, vae_dir, tmp_path, capsys):
    bank = tmp_path / "bank.safetensors"
    assert pipeline_main(["bank", str(cache), str(bank)]) == 0

    def sample(out, *extra):
        return train_main(["sample", str(run), "--out", str(out), "--mode", "ode",
                           "--steps", "3", "--batch-size", "4", "--num", "10", "--cfg", "1.5",
                           "--grid", "0", "--vae", str(vae_dir), *extra])
    assert sample(tmp_path / "f", "--bank", str(bank)) == 0
    assert sample(tmp_path / "c") == 0                    # default: the training cache
    capsys.readouterr()
    npz = {k: np.load(tmp_path / k / "samples.npz") for k in ("f", "c")}
    # block b's conditions: the first draw of its generator, uniform over the bank rows
    rows = torch.cat([torch.randint(96, (4,), generator=block_generator(0, b, "cpu"))
                      for b in range(3)])[:10].numpy()
    ds = open_cache(cache)
    want = ds.gather(ds.valid_indices, [LABEL])[LABEL][rows]
    assert np.array_equal(want, rows % 4)                 # the structured cache's labels
    for z in npz.values():
        assert z["arr_1"].dtype == np.int64 and np.array_equal(z["arr_1"], want)
        assert z["arr_0"].shape == (10, 64, 64, 3)
    assert np.array_equal(npz["f"]["arr_0"], npz["c"]["arr_0"])  # same rows, same images
    rec = json.loads((tmp_path / "c" / "sample.json").read_text())
    assert rec["bank"] == str(cache) and rec["bank_identity"]["kind"] == "cache"
    assert json.loads((tmp_path / "f" / "sample.json").read_text())["bank_identity"][
        "sha256"] == open_bank(bank).sha256
    # the conditions: L2-normalised bank rows; CFG's null: the all-zero vector
    from train.generate import SampleSettings
    net, ck = load_backbone(run)
    sampling = ck.method().sampling(net, SampleSettings(bank=str(bank)), num_classes=1000,
                                    dtype=torch.float32)
    cond = sampling.condition(block_generator(0, 1, "cpu"), 4)
    drawn = torch.randint(96, (4,), generator=block_generator(0, 1, "cpu"))
    assert torch.equal(cond[:, 0].long(), drawn)
    want_cls = torch.nn.functional.normalize(
        torch.from_numpy(open_bank(bank).cls(drawn.numpy())).float(), dim=1)
    assert torch.equal(cond[:, 1:].float(), want_cls)
    assert not sampling.null(cond)[:, 1:].any()
    # a rerun into the same directory with another bank is refused
    assert sample(tmp_path / "f") == 2
    assert "holds samples made with other settings" in capsys.readouterr().err


def test_cls_cfg_is_refused_on_a_gmem_checkpoint(run, tmp_path, capsys):
    out = tmp_path / "s"
    assert train_main(["sample", str(run), "--out", str(out), "--num", "1", "--mode", "ode",
                       "--steps", "2", "--cls-cfg", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --cls-cfg 2.0: ") and "gmem" in err
    assert "reg, urepa-reg" in err and not out.exists(), err
