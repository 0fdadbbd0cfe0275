"""Checkpoints of the REPA family (REPA, HASTE) in `train sample`, `train convert` and
`model.init_from`: REPA-layout state dicts built here from our own SiT through the one key
map, identical velocities and samples after the round trip, refusals that name the keys,
and no pickled code ever run."""

import argparse
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from cache import CacheSpec
from cache.synthetic import write_synthetic_cache
from conftest import tiny_run_config
from pipeline.encoders import TINY_VAE_CONFIG
from train.checkpoint import CheckpointError, init_from_checkpoint, load_backbone, read_checkpoint
from train.cli import main as train_main
from train.models import Projector, build_model
from train.loop import train
from train.repa_format import rename, to_repa_layout
from train.vae import encoder_sha256

SPEC = CacheSpec(num_samples=32, shard_size=16, latent_size=8, tokens=16, token_dim=32)
TINY = dict(latent_size=8, in_channels=4, num_classes=1000)


def random_sit(seed=0, arch="sit-tiny/2"):
    """A tiny SiT and projector with every weight random (the zero-init layers too, so the
    velocity depends on all of them)."""
    g = torch.Generator().manual_seed(seed)
    net, proj = build_model(arch, **TINY), Projector(64, 32, 48)
    with torch.no_grad():
        for p in [*net.parameters(), *proj.parameters()]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval(), proj


def velocity(net, seed=1):
    g = torch.Generator().manual_seed(seed)
    x, t = torch.randn(5, 4, 8, 8, generator=g), torch.rand(5, generator=g)
    y = torch.tensor([0, 3, 999, 1000, 7])                 # 1000: the null class
    with torch.no_grad():
        return net(x, t, y)[0]


def repa_file(path, state, **extra):
    """A file as REPA's train.py writes one (its args are an argparse.Namespace)."""
    args = argparse.Namespace(model="SiT-XL/2", encoder_depth=1, proj_coeff=0.5,
                              resolution=None)          # not a plain value: not recorded
    torch.save({"model": state, "ema": state, "opt": {"state": {}, "param_groups": []},
                "args": args, "steps": 4000, **extra}, path)
    return path


def test_the_key_map_round_trip_gives_identical_velocities(tmp_path):
    net, proj = random_sit()
    state = to_repa_layout(net.state_dict(), 4, proj.state_dict())
    for key in ("x_embedder.proj.weight", "y_embedder.embedding_table.weight",
                "blocks.1.mlp.fc1.weight", "blocks.1.mlp.fc2.bias", "projectors.0.4.weight",
                "t_embedder.mlp.2.weight", "blocks.0.adaLN_modulation.1.weight",
                "final_layer.linear.weight", "pos_embed"):
        assert key in state, key
    assert "blocks.0.mlp.0.weight" not in state and "x_embedder.weight" not in state
    assert not any("embedding_table" in rename(k, "ours") for k in state)
    loaded, ck = load_backbone(repa_file(tmp_path / "repa.pt", state))
    assert (ck.format, ck.arch, ck.step) == ("repa", "sit-tiny/2", 4000)
    assert ck.model_kwargs() == TINY and ck.meta["latent_scale"] == 0.18215
    assert ck.meta["source_args"] == {"model": "SiT-XL/2", "encoder_depth": 1,
                                      "proj_coeff": 0.5}
    assert torch.equal(velocity(loaded), velocity(net))
    assert all(torch.equal(ck.projector[k], v) for k, v in proj.state_dict().items())
    # DDP / torch.compile prefixes, a bare state dict, --legacy decoder_blocks, safetensors
    legacy = {("decoder_blocks.0." + k[len("blocks.1."):] if k.startswith("blocks.1.") else k): v
              for k, v in state.items()}
    torch.save({f"module.{k}": v for k, v in legacy.items()}, tmp_path / "legacy.pt")
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    for name in ("legacy.pt", "w.safetensors"):
        other, ck = load_backbone(tmp_path / name)
        assert torch.equal(velocity(other), velocity(net)) and sorted(ck.states) == ["ema"]


@pytest.mark.parametrize("change, message", [
    ("arch", "does not fit sit-s/2:\n  missing (100): blocks.2.attn.qkv.weight, "),
    ("arch", "blocks.0.attn.qkv.weight: checkpoint [192, 64] vs model [1152, 384]"),
    ("qk_norm", "unexpected (2): blocks.0.attn.q_norm.weight, blocks.0.attn.k_norm.weight"),
    ("missing", "missing (1): blocks.1.mlp.fc2.weight"),
    ("pos_embed", "pos_embed [1, 16, 64] is not the fixed 2-D sin-cos table of a 4^2 grid"),
    ("depth", "a SiT of depth 3, width 64 and patch 2 is none of ours"),
    ("not_sit", "is not a REPA-layout SiT state dict: no x_embedder.proj.weight"),
    ("sit_down", "--arch sit-down-tiny/2: REPA-family checkpoints are SiT models"),
    ("no_weights", "has no 'ema' or 'model' state dict (top-level keys: ['args', 'steps'])"),
    ("garbage", "not a readable torch.save file"),
    ("nan", "1 tensor(s) hold NaN or Inf, e.g. blocks.0.attn.qkv.weight"),
    ("int8", "blocks.0.attn.qkv.weight is a torch.strided torch.int8 tensor"),
    ("no_tokens", "pos_embed [1, 0, 64] are not a SiT's shapes"),
    ("no_classes", "model.num_classes=0 is not an integer in [1, 100000]"),
    ("huge_index", "unexpected (1): blocks.123456789.x"),
    ("cosine", "was trained on the 'cosine' path"),
])
def test_checkpoints_that_do_not_fit_are_refused_naming_the_keys(tmp_path, change, message):
    net, proj = random_sit()
    state = to_repa_layout(net.state_dict(), 4, proj.state_dict())
    arch = {"arch": "sit-s/2", "sit_down": "sit-down-tiny/2"}.get(change)
    if change == "qk_norm":
        state["blocks.0.attn.q_norm.weight"] = state["blocks.0.attn.k_norm.weight"] = \
            torch.ones(32)
    elif change == "missing":
        del state["blocks.1.mlp.fc2.weight"]
    elif change == "pos_embed":
        state["pos_embed"] = state["pos_embed"] + 0.01
    elif change == "depth":
        state.update({k.replace("blocks.1.", "blocks.2."): v for k, v in state.items()
                      if k.startswith("blocks.1.")})
    elif change == "not_sit":
        state = {"encoder.weight": torch.zeros(2)}
    elif change == "nan":
        state["blocks.0.attn.qkv.weight"][0, 0] = float("nan")
    elif change == "int8":
        state["blocks.0.attn.qkv.weight"] = state["blocks.0.attn.qkv.weight"].to(torch.int8)
    elif change == "no_tokens":
        state["pos_embed"] = torch.zeros(1, 0, 64)
    elif change == "no_classes":
        state["y_embedder.embedding_table.weight"] = torch.zeros(1, 64)
    elif change == "huge_index":
        state["blocks.123456789.x"] = torch.zeros(1)
    path = repa_file(tmp_path / "c.pt", state,
                     **({"args": argparse.Namespace(path_type="cosine")}
                        if change == "cosine" else {}))
    if change == "no_weights":
        torch.save({"args": argparse.Namespace(), "steps": 1}, path)
    elif change == "garbage":
        path.write_bytes(b"not a checkpoint" * 100)
    with pytest.raises(CheckpointError) as e:
        load_backbone(path, arch=arch)
    assert message in str(e.value)
    # the same through the command line: exit 2, one message
    assert train_main(["sample", str(path), "--out", str(tmp_path / "o")]
                      + (["--arch", arch] if arch else [])) == 2
    assert not (tmp_path / "o").exists()


class Payload:
    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


class System:
    def __reduce__(self):
        import os
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("payload", [Payload, System])
def test_a_planted_pickle_is_refused_and_never_runs(tmp_path, capsys, payload):
    marker = tmp_path / "pwned"
    payload.marker = str(marker)
    net, _ = random_sit()
    path = tmp_path / "evil.pt"
    torch.save({"ema": to_repa_layout(net.state_dict(), 4), "args": payload()}, path)
    assert train_main(["sample", str(path), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "refused: rebuilding it needs the Python object" in err
    assert ("getattr" if payload is Payload else "system") in err and not marker.exists()
    with open(path.with_suffix(".pkl"), "wb") as f:                   # a plain pickle too
        pickle.dump({"ema": Payload()}, f)
    with pytest.raises(CheckpointError, match="refused|not a readable"):
        read_checkpoint(path.with_suffix(".pkl"))
    assert not marker.exists()


# ------------------------------------------------------------------ end to end
@pytest.fixture(scope="module")
def sit_run(tmp_path_factory):
    """A 4-step tiny SiT + REPA run (checkpoints at 2 and 4) on a cache that records a
    random tiny VAE, and that VAE saved as a directory (what --vae takes)."""
    from diffusers import AutoencoderKL
    tmp = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(3)
    vae = AutoencoderKL(**TINY_VAE_CONFIG)                 # encoder and decoder
    vae.save_pretrained(tmp / "vae")
    info = {"weights_sha256": encoder_sha256(vae), "scaling_factor": 0.18215,
            "latent_channels": 4, "config": {k: list(v) if isinstance(v, tuple) else v
                                             for k, v in TINY_VAE_CONFIG.items()}}
    cache = write_synthetic_cache(tmp / "cache", SPEC, provenance={
        "vae": info, "command": {"vae": "tiny", "seed": 3}})
    train(run_config(cache, tmp / "run"), log=lambda _m: None)
    return tmp


def run_config(cache, run_dir, *extra):
    return tiny_run_config(cache, run_dir, "model.arch=sit-tiny/2", "align.method=repa",
                           "align.weight=0.5", "data.shuffle_buffer=16", "batch_size=8",
                           "optim.ema_decay=0.5", "max_steps=4", "checkpoint_every=2", *extra)


def sample(source, out, vae, *extra) -> int:
    return train_main(["sample", str(source), "--out", str(out), "--num", "6", "--steps", "4",
                       "--batch-size", "3", "--cfg", "1.8", "--vae", str(vae), *extra])


def images(out) -> np.ndarray:
    with np.load(Path(out) / "samples.npz") as z:
        return z["arr_0"]


def test_a_repa_file_samples_identically_through_train_sample(sit_run, tmp_path, capsys):
    run, vae = sit_run / "run", sit_run / "vae"
    # ours -> a REPA-family .pt (what their generate.py loads) -> ours again
    assert train_main(["convert", str(run), str(tmp_path / "repa.pt")]) == 0
    assert train_main(["convert", str(tmp_path / "repa.pt"), str(tmp_path / "back")]) == 0
    assert "(repa, sit-tiny/2, step 4, weights: ema, model, projector)" in \
        capsys.readouterr().out
    payload = torch.load(tmp_path / "repa.pt", weights_only=True)
    assert sorted(payload) == ["ema", "model", "projector_placeholder", "steps"]
    assert payload["steps"] == 4 and payload["projector_placeholder"] is False
    assert "projectors.0.0.weight" in payload["model"] and "pos_embed" in payload["ema"]

    for name, source in {"ours": run, "repa": tmp_path / "repa.pt",
                         "back": tmp_path / "back"}.items():
        for weights in ("ema", "model"):
            assert sample(source, tmp_path / f"{name}-{weights}", vae,
                          "--weights", weights) == 0, (name, weights)
    log = capsys.readouterr().out
    assert "REPA-format checkpoint, step 4, ema weights, sit-tiny/2" in log
    for weights in ("ema", "model"):
        first = images(tmp_path / f"ours-{weights}")
        assert first.std() > 0
        for name in ("repa", "back"):
            assert np.array_equal(images(tmp_path / f"{name}-{weights}"), first), name
    assert not np.array_equal(images(tmp_path / "ours-ema"), images(tmp_path / "ours-model"))
    rec = json.loads((tmp_path / "repa-ema" / "sample.json").read_text())
    assert rec["checkpoint_format"] == "repa" and rec["arch"] == "sit-tiny/2"
    back = json.loads((tmp_path / "back" / "checkpoint.json").read_text())
    assert back["converted_from"]["format"] == "repa" and len(back["converted_from"]["sha256"]) == 64
    # a file as our format, our directory as REPA's, an existing output: one line each
    assert train_main(["sample", str(tmp_path / "repa.pt"), "--checkpoint-format", "ours"]) == 2
    assert train_main(["sample", str(run), "--checkpoint-format", "repa"]) == 2
    assert train_main(["convert", str(run), str(tmp_path / "repa.pt")]) == 2
    err = capsys.readouterr().err
    assert "our checkpoints are directories" in err and "is not a file" in err
    assert "exists; choose a new output file" in err


def test_convert_writes_only_what_the_source_has(sit_run, tmp_path, capsys):
    net, _ = random_sit()
    torch.save(to_repa_layout(net.state_dict(), 4), tmp_path / "ema-only.pt")
    assert train_main(["convert", str(tmp_path / "ema-only.pt"), str(tmp_path / "c")]) == 0
    meta = json.loads((tmp_path / "c" / "checkpoint.json").read_text())
    assert meta["files"] == {"ema": "ema.safetensors"}
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "checkpoint.json", "ema.safetensors"]
    assert train_main(["sample", str(tmp_path / "c"), "--weights", "model"]) == 2
    assert "holds no 'model' weights (it has ['ema']); choose --weights ema" in \
        capsys.readouterr().err
    # a name a run would resume from, a path under a file: refused, nothing left behind
    for out in (tmp_path / "checkpoints" / "step_00000009", tmp_path / "ema-only.pt" / "x"):
        assert train_main(["convert", str(tmp_path / "ema-only.pt"), str(out)]) == 2
    err = capsys.readouterr().err
    assert "must not be named like a run's step_N" in err and "cannot write" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "ema-only.pt"]
    # ours -> REPA without a projector: a zero placeholder, so that their strict load works
    assert train_main(["convert", str(tmp_path / "c"), str(tmp_path / "r.pt")]) == 0
    payload = torch.load(tmp_path / "r.pt", weights_only=True)
    assert payload["projector_placeholder"] is True and sorted(payload) == [
        "ema", "projector_placeholder", "steps"]
    assert not payload["ema"]["projectors.0.4.weight"].any()


@pytest.mark.parametrize("edit, message", [
    (("files", {"ema": "../../etc/passwd"}), "files.ema='../../etc/passwd' is not a plain"),
    (("arch", ["sit-tiny/2"]), "unknown architecture ['sit-tiny/2']"),
    (("config.model.latent_size", 10 ** 7), "model.latent_size=10000000 is not an integer"),
    (("config.model.latent_size", 8.5), "model.latent_size=8.5 is not an integer"),
    (("config", None), "checkpoint.json is damaged (TypeError"),
])
def test_a_damaged_checkpoint_json_is_one_line(sit_run, tmp_path, capsys, edit, message):
    import shutil
    ckpt = tmp_path / "step"
    shutil.copytree(sit_run / "run" / "checkpoints" / "step_00000004", ckpt)
    meta = json.loads((ckpt / "checkpoint.json").read_text())
    key, value = edit
    node = meta
    *parents, last = key.split(".", 1) if key.startswith("config.") else [key]
    for p in parents:
        node = node[p]
    node[last] = value
    (ckpt / "checkpoint.json").write_text(json.dumps(meta))
    assert train_main(["sample", str(ckpt), "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err


def test_init_from_starts_a_run_from_any_checkpoint(sit_run, tmp_path, capsys):
    run = sit_run / "run"
    assert train_main(["convert", str(run), str(tmp_path / "repa.pt")]) == 0
    src = load_backbone(run, weights="model")[0].state_dict()
    src_ema = load_backbone(run)[0].state_dict()
    for source in (run / "checkpoints" / "step_00000004", tmp_path / "repa.pt"):
        net, proj = random_sit(seed=5)
        ema, _ = random_sit(seed=6)
        line = init_from_checkpoint(source, net, ema, Projector(64, 32, 64), "sit-tiny/2",
                                    **TINY)
        assert "weights from its model weights, EMA from its ema; projector from it" in line
        assert all(torch.equal(net.state_dict()[k], v) for k, v in src.items())
        assert all(torch.equal(ema.state_dict()[k], v) for k, v in src_ema.items())
    # a projector of another shape starts new; another architecture is refused
    line = init_from_checkpoint(run, net, ema, Projector(64, 16, 64), "sit-tiny/2", **TINY)
    assert "projector: new (the checkpoint has one of other shapes)" in line
    with pytest.raises(CheckpointError, match="holds a sit-tiny/2 model; this run's "
                                              "model.arch is sit-s/2"):
        init_from_checkpoint(run, net, ema, None, "sit-s/2", **TINY)
    with pytest.raises(CheckpointError, match=r"wrong shape \(1\): y_embedder.table.weight"):
        init_from_checkpoint(run, net, ema, None, "sit-tiny/2", latent_size=8,
                             in_channels=4, num_classes=10)

    # in train run: --dry-run checks it; a run starts from it; a resume ignores it
    cache = json.loads((run / "checkpoints" / "step_00000004" / "checkpoint.json")
                       .read_text())["config"]["data.cache"]
    over = ["model.arch=sit-tiny/2", "align.method=repa", "align.depth=1", "model.latent_size=8",
            "align.teacher_dim=32", "align.projector_dim=64", "data.num_workers=0",
            "mixed_precision=no", "progress=false", f"data.cache={cache}",
            f"run_dir={tmp_path / 'ft'}", "batch_size=8", "max_steps=2",
            f"model.init_from={tmp_path / 'repa.pt'}"]
    assert train_main(["run", "configs/repa-b.yaml", *over, "--dry-run"]) == 0
    assert "would start from" in capsys.readouterr().out
    logs = []
    train(run_config(cache, tmp_path / "ft", "max_steps=2",
                     f"model.init_from={tmp_path / 'repa.pt'}"), log=logs.append)
    assert any(m.startswith("initialised from") for m in logs)
    logs.clear()
    train(run_config(cache, tmp_path / "ft", "max_steps=4",
                     f"model.init_from={tmp_path / 'repa.pt'}"), log=logs.append)
    assert not any(m.startswith("initialised from") for m in logs)
    assert any("resumed from" in m for m in logs)
    capsys.readouterr()
    assert train_main(["run", str(tmp_path / "ft" / "config.yaml"), "--dry-run"]) == 0
    assert "model.init_from is not used" in capsys.readouterr().out     # a resume
    # another recipe on that run_dir: --dry-run refuses it as the run would
    assert train_main(["run", "configs/repa-b.yaml", *over, "--dry-run"]) == 2
    assert "holds a run with another config" in capsys.readouterr().err
    assert train_main(["run", "configs/repa-b.yaml", *over, f"run_dir={tmp_path / 'new'}",
                       f"model.init_from={tmp_path / 'none.pt'}", "--dry-run"]) == 2
    assert "neither a run directory nor a checkpoint" in capsys.readouterr().err
