"""The training configuration: one typed tree, loaded from a YAML preset plus overrides.

    train run configs/urepa.yaml optim.lr=2e-4 run_dir=runs/try1

OmegaConf merges the preset and the `key=value` overrides onto these dataclasses, so an
unknown key or a value of the wrong type is an error naming the key (and the valid keys
at that level); the dataclasses' `__post_init__` then check ranges and combinations.
Defaults are the U-REPA / REPA recipe (methods.md sections 3-4).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from .archs import ARCH_NAMES, UPSAMPLE_MODES

PRECISIONS = ("no", "fp16", "bf16")
# accelerate's trackers (its `log_with` names) and the package each one needs
TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow",
                    "aim": "aim", "trackio": "trackio", "comet_ml": "comet_ml",
                    "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


class ConfigError(ValueError):
    """A bad configuration: the message names the key, the value and what is allowed."""


def _bad(group: str, name: str, value: Any, why: str) -> ConfigError:
    return ConfigError(f"{group + '.' if group else ''}{name}={value!r}: {why}")


@dataclass
class ModelConfig:
    arch: str = "sit-down-xl/2"
    latent_size: int = 32            # resolution / 8; checked against the cache
    in_channels: int = 4             # SD-VAE latent channels; checked against the cache
    num_classes: int = 1000          # label `num_classes` is the null class (CFG)
    label_dropout: float = 0.1
    checkpointing: bool = False      # activation checkpointing: memory for ~30% more compute
    compile: bool = False            # torch.compile the model
    init_from: Optional[str] = None  # start (step 0 only) from a checkpoint's weights: one of
    #                                  ours, `train convert`'s output, or a REPA-family .pt
    #                                  (REPA's, HASTE's SiT). Weights, EMA, projector; the
    #                                  optimizer starts fresh

    def __post_init__(self) -> None:
        if self.arch not in ARCH_NAMES:
            raise _bad("model", "arch", self.arch, f"choose one of {sorted(ARCH_NAMES)}")
        if not 0 <= self.label_dropout < 1:  # also false for NaN
            raise _bad("model", "label_dropout", self.label_dropout, "must be in [0, 1)")
        for name in ("latent_size", "in_channels", "num_classes"):
            if getattr(self, name) < 1:
                raise _bad("model", name, getattr(self, name), "must be >= 1")


@dataclass
class AlignConfig:
    method: str = "urepa"            # a recipe of train/methods/: urepa (REPA + manifold
    #                                  loss), repa, reg, erw, gmem, none (plain SiT), ...
    depth: Optional[int] = None      # block k (1-indexed) whose output is aligned; None:
    #                                  REPA's 8 (L/XL) or 4 (B), U-REPA's middle-stage centre
    weight: float = 0.25             # lambda: L = L_v + lambda * (L_REPA + w * L_ML);
    #                                  U-REPA 0.25 (fitted to its Table 15), REPA 0.5
    manifold_weight: float = 3.0     # w (U-REPA ablation: 0 / 2 / 3 / 4 -> 6.25 / 5.81 / 5.72 / 5.79)
    manifold_pooled: bool = False    # compare per-sample mean tokens (B x B) instead
    projector_dim: int = 2048        # hidden width of the projector MLP
    upsample: str = "bilinear"       # U-REPA: MLP on the 8x8 tokens, then this x2 resize
    teacher_dim: int = 768           # projector output; must equal the cache's token width

    def __post_init__(self) -> None:
        # the method's name is checked by method_args (it needs the registry, and torch)
        if self.upsample not in UPSAMPLE_MODES:
            raise _bad("align", "upsample", self.upsample, f"choose one of {UPSAMPLE_MODES}")
        if self.depth is not None and self.depth < 1:
            raise _bad("align", "depth", self.depth, "blocks are counted from 1")
        for name in ("weight", "manifold_weight"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise _bad("align", name, v, "must be a finite number >= 0")
        for name in ("projector_dim", "teacher_dim"):
            if getattr(self, name) < 1:
                raise _bad("align", name, getattr(self, name), "must be >= 1")


@dataclass
class DataConfig:
    cache: str = MISSING             # a cache written by `pipeline encode`: a directory or an
    #                                  fsspec URL (s3://bucket/in1k-256, gs://..., file://...)
    backend: Optional[str] = None    # zarr or wds when the cache has both
    view: str = "random"             # with flipped copies stored: a random view per sample
    num_workers: int = 4             # loader processes per rank
    block_size: int = 8              # contiguous samples per read
    shuffle_buffer: int = 4096       # samples per in-memory shuffle window, per stream
    streams: Optional[int] = None    # the data order's virtual ranks (None: the number of
    #                                  processes at the start); a multiple of the process
    #                                  count that divides batch_size. The same streams give
    #                                  the same global batches and draws on 1 or N processes
    resolution: Optional[int] = None  # when set, must match the cache's image resolution
    verify_reads: bool = True        # check each chunk read against its recorded CRC32C:
    #                                  damage stops the run naming the file (costs one
    #                                  CRC32C pass per chunk and loader process,
    #                                  docs/performance.md)

    def __post_init__(self) -> None:
        if self.view not in ("random", "first"):
            raise _bad("data", "view", self.view, "choose 'random' or 'first'")
        if self.num_workers < 0 or self.block_size < 1 or self.shuffle_buffer < 1:
            raise ConfigError("data.num_workers must be >= 0, data.block_size and "
                              "data.shuffle_buffer >= 1")
        if self.streams is not None and self.streams < 1:
            raise _bad("data", "streams", self.streams, "must be >= 1 (or null)")


@dataclass
class OptimConfig:
    lr: float = 1e-4                 # AdamW, constant (REPA, U-REPA)
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    grad_clip: float = 1.0           # max global grad norm; 0 turns clipping off
    ema_decay: float = 0.9999        # EMA of the weights after every step (sampling uses it)

    def __post_init__(self) -> None:
        for name in ("lr", "eps"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v > 0):
                raise _bad("optim", name, v, "must be a finite number > 0")
        if not (math.isfinite(self.grad_clip) and math.isfinite(self.weight_decay)):
            raise ConfigError("optim.grad_clip and optim.weight_decay must be finite")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise _bad("optim", "betas", self.betas, "two numbers in [0, 1)")
        if not 0 <= self.ema_decay < 1:
            raise _bad("optim", "ema_decay", self.ema_decay, "must be in [0, 1)")
        if self.grad_clip < 0 or self.weight_decay < 0:
            raise ConfigError("optim.grad_clip and optim.weight_decay must be >= 0")


@dataclass
class PreviewConfig:
    """Sample grids of the EMA model during training, to watch a run (not for metrics)."""
    every: int = 0                   # steps between run_dir/samples/step_N.png; 0: off
    num: int = 16                    # images per grid, the same noise and labels each time
    mode: str = "ode"                # ode (Heun) or sde
    steps: int = 50
    cfg: float = 1.0                 # guidance scale (interval [0, 0.7] when > 1)
    vae: Optional[str] = None        # decoder: None = the cache's (train/vae.py), hub id,
    #                                  local directory, or "random"

    def __post_init__(self) -> None:
        if self.every < 0 or self.num < 1 or self.steps < 2:
            raise ConfigError("preview.every must be >= 0, preview.num >= 1, "
                              "preview.steps >= 2")
        if self.mode not in ("ode", "sde"):
            raise _bad("preview", "mode", self.mode, "choose 'ode' or 'sde'")
        if not (math.isfinite(self.cfg) and self.cfg >= 1):
            raise _bad("preview", "cfg", self.cfg, "must be >= 1")


@dataclass
class TrainConfig:
    run_dir: str = MISSING           # checkpoints, metrics.jsonl, config.yaml; rerun resumes
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    align: AlignConfig = field(default_factory=AlignConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    preview: PreviewConfig = field(default_factory=PreviewConfig)
    method_args: dict[str, Any] = field(default_factory=dict)  # align.method's own options
    #                                  (its Args dataclass in train/methods/), e.g. REG's
    #                                  cls_weight; unset ones take the method's defaults
    seed: int = 0                    # model init, data order, and each step's draws
    batch_size: int = 256            # global batch per optimizer step
    micro_batch_size: Optional[int] = None  # per device per forward; None: batch / devices
    #                                  (smaller => gradient accumulation keeps the global batch)
    max_steps: int = 400_000         # U-REPA's headline numbers: 400K steps at batch 256
    mixed_precision: str = "bf16"    # no, fp16 or bf16 autocast
    tf32: bool = True                # TF32 matmuls on Ampere+ for the fp32 parts
    log_every: int = 100             # steps between metrics.jsonl lines
    checkpoint_every: int = 10_000   # steps between checkpoints (and one at the end)
    keep_checkpoints: int = 3        # the newest K are kept
    trackers: list[str] = field(default_factory=list)  # also log scalars and preview grids
    #                                  through accelerate's trackers, e.g. [wandb] (REPA's),
    #                                  [tensorboard, mlflow]; metrics.jsonl is always written
    tracker_project: str = "urepa-cache"  # wandb/aim/mlflow/... project; run: run_dir's name
    tensorboard: bool = False        # the same as tensorboard in trackers (older configs)
    progress: bool = True            # progress bar on the main process
    log_samples: bool = False        # samples.jsonl: every step's sample indices per rank

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_steps", "log_every", "checkpoint_every",
                     "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise _bad("", name, getattr(self, name), "must be >= 1")
        if self.seed < 0:
            raise _bad("", "seed", self.seed, "must be >= 0")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise _bad("", "micro_batch_size", self.micro_batch_size, "must be >= 1")
        if str(self.mixed_precision).lower() in ("false", "fp32", "none"):
            self.mixed_precision = "no"  # YAML reads a bare `no` as False
        if self.mixed_precision not in PRECISIONS:
            raise _bad("", "mixed_precision", self.mixed_precision,
                       f"choose one of {PRECISIONS}")
        unknown = [t for t in self.trackers if t not in TRACKER_PACKAGES]
        if unknown or len(set(self.trackers)) != len(self.trackers):
            raise _bad("", "trackers", list(self.trackers),
                       f"a list of distinct names from {sorted(TRACKER_PACKAGES)}")

    def all_trackers(self) -> list[str]:
        """`trackers`, plus tensorboard when the older `tensorboard: true` asks for it."""
        return [*self.trackers, *(["tensorboard"] if self.tensorboard
                                  and "tensorboard" not in self.trackers else [])]

    def accumulation(self, world_size: int) -> tuple[int, int]:
        """(micro batch per device, accumulation steps) that make up the global batch."""
        per_device, rest = divmod(self.batch_size, world_size)
        if rest:
            raise ConfigError(f"batch_size={self.batch_size} does not split over "
                              f"{world_size} processes")
        streams = self.data.streams or world_size
        if streams % world_size or self.batch_size % streams:
            raise ConfigError(f"data.streams={streams} must be a multiple of the "
                              f"{world_size} process(es) and divide batch_size="
                              f"{self.batch_size}")
        micro = self.micro_batch_size or per_device
        if per_device % micro:
            raise ConfigError(f"micro_batch_size={micro} must divide the per-device batch "
                              f"{per_device} (batch_size {self.batch_size} / {world_size})")
        return micro, per_device // micro


def model_geometry(cfg: TrainConfig) -> dict[str, int]:
    """The build_model arguments that fix the weights' shapes besides the arch."""
    m = cfg.model
    return {"latent_size": m.latent_size, "in_channels": m.in_channels,
            "num_classes": m.num_classes}


# Keys that may change when a run is resumed: they do not change what is computed.
RESUMABLE_CHANGES = {
    "run_dir", "max_steps", "log_every", "checkpoint_every", "keep_checkpoints",
    "trackers", "tracker_project", "tensorboard", "progress", "log_samples", "data.cache",
    "data.num_workers", "data.backend", "data.verify_reads",
    "model.checkpointing",  # recomputes the same values; compile changes numerics
    *(f"preview.{f.name}" for f in dataclasses.fields(PreviewConfig)),  # read-only of the run
}


def _valid_keys(node_type: type) -> list[str]:
    return [f.name for f in dataclasses.fields(node_type)]


def _schema_at(path: str) -> type:
    node: type = TrainConfig
    for part in filter(None, path.split(".")):
        hint = typing.get_type_hints(node).get(part)
        if not dataclasses.is_dataclass(hint):
            break
        node = hint
    return node


def _explain(e: OmegaConfBaseException, source: str) -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    msg = str(e).splitlines()[0]
    if isinstance(e, ConfigKeyError):
        parent = key.rpartition(".")[0]
        where = f"{parent}." if parent else ""
        return ConfigError(f"{source}: unknown key {key!r}; valid keys under "
                           f"{parent or 'the top level'}: "
                           + ", ".join(where + k for k in _valid_keys(_schema_at(parent))))
    return ConfigError(f"{source}: {key}: {msg}")


def _yaml_error(source: str | Path, e: Exception, where_in_file: bool = True) -> ConfigError:
    """One line for a YAML error (PyYAML's own text spans four lines)."""
    if isinstance(e, yaml.MarkedYAMLError):
        mark = (e.problem_mark or e.context_mark) if where_in_file else None
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        what = e.problem or e.context or type(e).__name__
        if e.problem and e.context:
            what += f" ({e.context})"
        return ConfigError(f"{source}: not valid YAML{where}: {what}")
    first = (str(e).splitlines() or [type(e).__name__])[0]
    return ConfigError(f"{source}: not valid YAML: {first}")


def _read_yaml(p: Path) -> DictConfig | None:
    """The mapping a config file holds, or None for an empty file. Raises ConfigError."""
    if p.is_dir():
        raise ConfigError(f"config file {p} is a directory; pass a YAML file (presets are "
                          "in configs/)")
    if not p.is_file():
        raise ConfigError(f"config file {p} not found (presets are in configs/)")
    try:
        raw = p.read_bytes()
    except OSError as e:
        raise ConfigError(f"config file {p}: cannot read it ({e.strerror or e})") from e
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise ConfigError(f"{p}: not UTF-8 text (byte {raw[e.start]:#04x} on line {line}); "
                          "save the config as UTF-8") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)   # the shape, nothing built
        if root is None or root.tag == "tag:yaml.org,2002:null":
            return None
        if not isinstance(root, yaml.MappingNode):
            what = ("a list" if isinstance(root, yaml.SequenceNode)
                    else f"the single value {root.value!r}")
            raise ConfigError(f"{p}: the top level is {what}; a config is a mapping of keys "
                              "(run_dir: ..., data: {cache: ...}, optim: {lr: ...}), as in "
                              "configs/*.yaml")
        return OmegaConf.load(io.StringIO(text))   # OmegaConf's loader: 1e-4 is a float
    except yaml.YAMLError as e:
        raise _yaml_error(p, e) from None
    except OmegaConfBaseException as e:   # e.g. an unclosed ${...}
        raise _explain(e, str(p)) from None


def _type_name(hint: Any) -> str:
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) is typing.Union and len(args) == 1:
        return f"{_type_name(args[0])} or null"
    return getattr(hint, "__name__", str(hint))


def _default(node: type, key: str) -> Any:
    f = next(f for f in dataclasses.fields(node) if f.name == key)
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default


def _check_shapes(data: dict, node: type, prefix: str, source: str) -> None:
    """Sections must be mappings, lists lists and values single values: OmegaConf's own
    messages for these are a traceback (a mapping onto a list) or its internal names."""
    hints = typing.get_type_hints(node)
    for key, value in data.items():
        hint, name = hints.get(key), f"{prefix}{key}"
        if hint is None or (isinstance(value, str) and value.startswith("${")):
            continue  # unknown keys: OmegaConf names the valid ones; interpolations resolve later
        if typing.get_origin(hint) is dict:   # method_args: its method checks the keys
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name}={value!r}: expected a mapping of the "
                                  "method's options")
        elif dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"{source}: {name}={value!r}: expected a mapping of the keys "
                                  + ", ".join(f"{name}.{k}" for k in _valid_keys(hint)))
            _check_shapes(value, hint, name + ".", source)
        elif typing.get_origin(hint) is list:
            if not isinstance(value, list) or any(isinstance(v, (dict, list)) for v in value):
                example = _default(node, key)
                raise ConfigError(f"{source}: {name}={value!r}: expected a list of "
                                  f"{_type_name(typing.get_args(hint)[0])}s"
                                  + (f", e.g. {example}" if example else ""))
        elif isinstance(value, (dict, list)):
            kind = "mapping" if isinstance(value, dict) else "list"
            raise ConfigError(f"{source}: {name}={value!r}: expected a single "
                              f"{_type_name(hint)}, not a {kind}")


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
                ) -> TrainConfig:
    """Schema <- YAML preset <- `key=value` overrides, validated. Raises ConfigError."""
    schema = OmegaConf.structured(TrainConfig)
    layers, empty = [], None
    if path is not None:
        layer = _read_yaml(Path(path))
        if layer is None:
            empty = Path(path)
        else:
            layers.append((str(path), layer))
    bad = [o for o in overrides if "=" not in o or not o.partition("=")[0].strip()]
    if bad:
        raise ConfigError(f"overrides must be key=value, got {bad}")
    for o in overrides:   # one at a time, so that an error names the override
        try:
            OmegaConf.from_dotlist([o])
        except yaml.YAMLError as e:
            raise _yaml_error(f"override {o!r}", e, where_in_file=False) from None
        except OmegaConfBaseException as e:
            raise _explain(e, f"override {o!r}") from None
    layers.append(("overrides", OmegaConf.from_dotlist(list(overrides))))
    cfg = schema
    for source, layer in layers:
        try:
            _check_shapes(OmegaConf.to_container(layer, resolve=False), TrainConfig, "", source)
            cfg = OmegaConf.merge(cfg, layer)
        except OmegaConfBaseException as e:
            raise _explain(e, source) from None
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"required key(s) not set: {', '.join(missing)} "
                              + (f"({empty} is empty; " if empty else "(")
                              + "set them in the YAML or as key=value)")
        cfg = OmegaConf.to_object(cfg)
    except OmegaConfBaseException as e:
        raise _explain(e, "config") from None
    cfg.method_args = method_args(cfg.align.method, cfg.method_args)
    return cfg


def recorded_section(node: type, values: dict[str, Any], group: str) -> Any:
    """The config section `node` (ModelConfig, AlignConfig) from values a file recorded
    (a checkpoint's flat config), each checked to be of its field's type first, so that
    a damaged one is named (the dataclass then checks ranges). Raises ConfigError."""
    hints = typing.get_type_hints(node)
    for key, v in values.items():
        hint = hints[key]
        args = typing.get_args(hint)
        base = next((a for a in args if a is not type(None)), hint)
        ok = ((v is None and type(None) in args) or type(v) is base
              or (base is float and type(v) is int))
        if not ok:
            raise ConfigError(f"{group}.{key}={repr(v)[:60]}: expected {_type_name(hint)} "
                              "(the recorded config is damaged)")
    return node(**values)


def method_args(method: str, given: dict[str, Any]) -> dict[str, Any]:
    """`given` checked against the Args dataclass of `method` (its keys, types and
    ranges), with every default filled in, so that config.yaml records them all."""
    from .methods import METHODS
    if method not in METHODS:
        raise _bad("align", "method", method, f"choose one of {sorted(METHODS)}")
    schema = METHODS[method].Args
    valid = _valid_keys(schema)
    unknown = sorted(str(k) for k in given if k not in valid)
    if unknown:   # a name read from a checkpoint.json may hold anything: one line, short
        name = unknown[0] if unknown[0].isidentifier() else repr(unknown[0][:80])
        raise ConfigError(f"method_args.{name}: align.method={method} has no such "
                          "option; " + (f"its options: {', '.join('method_args.' + k for k in valid)}"
                                        if valid else "it has none"))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), given)
        return dataclasses.asdict(OmegaConf.to_object(merged))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or ""
        raise ConfigError(f"method_args.{key}: {str(e).splitlines()[0]}") from None
    except ValueError as e:   # the Args dataclass's own range checks
        raise ConfigError(f"method_args ({method}): {e}") from None


def process_count() -> int:
    """The processes a launch starts: WORLD_SIZE (set by torchrun and accelerate launch
    for every process), else 1 (a plain `train run`)."""
    text = os.environ.get("WORLD_SIZE", "").strip()
    if not text:
        return 1
    if not text.isdigit() or int(text) < 1:
        raise ConfigError(f"WORLD_SIZE={text!r} (from the launcher's environment) is not a "
                          "process count >= 1; unset it for a single process")
    return int(text)


def check_start(cfg: TrainConfig, world_size: int) -> tuple[int, int]:
    """Every check of a run's start that needs only the config, the run directory and the
    process count (train() and `train run --dry-run` both call it): data.streams resolved
    (a resumed run keeps the streams it started with, else one per process), the batch
    split over the processes, each tracker's package installed, and a resume that
    would not mix two recipes. Returns (micro batch per process, accumulation steps).
    Raises ConfigError."""
    saved = Path(cfg.run_dir) / "config.yaml"
    if not cfg.data.streams and saved.exists():
        cfg.data.streams = load_config(saved).data.streams
    cfg.data.streams = cfg.data.streams or world_size
    micro_accum = cfg.accumulation(world_size)
    method_args(cfg.align.method, cfg.method_args)   # a config built in code: checked here
    for name in cfg.all_trackers():
        package = TRACKER_PACKAGES[name]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"trackers: {name} needs the {package} package, which is not "
                              f"installed here: pip install {package} (or remove {name} "
                              "from trackers)")
    check_resume(cfg)
    return micro_accum


def check_resume(cfg: TrainConfig) -> None:
    """A run directory with checkpoints resumes only the recipe it holds: the saved
    config.yaml may differ from this one in RESUMABLE_CHANGES only."""
    from .checkpoint import checkpoints   # models and torch: only when there is a run
    run_dir = Path(cfg.run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.exists():
        return
    saved = load_config(saved_path)
    diff = [k for k in changed_keys(saved, cfg) if k not in RESUMABLE_CHANGES]
    if diff and checkpoints(run_dir):
        a, b = flatten(saved), flatten(cfg)
        raise ConfigError(
            f"{run_dir} holds a run with another config; resuming would mix two runs:\n  "
            + "\n  ".join(f"{k}: saved {a.get(k)!r} vs now {b.get(k)!r}" for k in diff)
            + "\nUse a new run_dir, or restore these values.")


def to_yaml(cfg: TrainConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def flatten(cfg: TrainConfig) -> dict[str, Any]:
    """{"optim.lr": 1e-4, ...}: the config as dotted keys (for diffs and trackers)."""
    def walk(d: dict, prefix: str) -> dict[str, Any]:
        out = {}
        for k, v in d.items():
            out.update(walk(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k: v})
        return out
    return walk(dataclasses.asdict(cfg), "")


def changed_keys(saved: TrainConfig, now: TrainConfig) -> list[str]:
    """Dotted keys whose values differ between two configs."""
    a, b = flatten(saved), flatten(now)
    return sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
