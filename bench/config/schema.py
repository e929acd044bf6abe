"""The typed config tree: one source of truth for every run.

Precedence is CLI > config file > defaults (lm-eval). A config file (TOML) only overrides defaults; dotted CLI
overrides (``--optim.lr=2e-4``) come last and are type-checked against the default (nanoGPT's configurator).
Unknown keys and wrong types are errors with a one-line message, never silently ignored. The resolved config is
saved with every run and hashed into its id; the DeepSpeed JSON is *generated* from it (``bench.run.engine``), so no
second copy of a learning rate or batch size can drift.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench.config.toml import tomllib
from bench.records.atomic import atomic_path

if TYPE_CHECKING:  # types only: a config does not need the method contract to load
    from methods.base import ArchSpec


class ConfigError(ValueError):
    """A config file or override is malformed; the message names the key and the problem."""


# --------------------------------------------------------------------------------------------------------------
#                                                 Sections
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    arch: str = "DiT-T/2"
    """DiT flavour (``bench.models.dit.DIT_FLAVOURS``): DiT-S/B/L/XL with patch 2/4/8, or the CPU debug sizes T and M;
    a ``-d<depth>``/``-w<width>`` suffix makes a depth/width variant (``DiT-B/2-d6``) for size-transfer tasks."""
    input_size: int = 32
    """Spatial size the DiT sees: latent size (image/8) for VAE latents, image size in pixel space."""
    in_channels: int = 4
    """4 for SD-VAE latents, 3 for pixel space (the embedded synthetic suite)."""
    learn_sigma: bool = True
    """Predict the variance interpolation too (DiT's learned Sigma; doubles the output channels)."""
    class_dropout_prob: float = 0.1
    """Label dropout for classifier-free guidance (DiT: 0.1)."""
    gelu: str = "tanh"
    """The MLP's GELU: ``tanh`` (DiT's; its released weights need it) or ``exact`` (the erf form: at most 5e-4 apart,
    about 3x faster on a CPU; the embedded suites use it, ``bench.models.dit.GELU_FORMS``)."""

    def __post_init__(self) -> None:
        from bench.models.dit import GELU_FORMS, parse_flavour

        try:
            parse_flavour(self.arch)
        except ValueError as err:
            raise ConfigError(f"model.arch: {err}") from None
        _check(self.input_size > 0, "model.input_size must be positive")
        _check(self.in_channels > 0, "model.in_channels must be positive")
        _check(0.0 <= self.class_dropout_prob < 1.0, "model.class_dropout_prob must be in [0, 1)")
        _check(self.gelu in GELU_FORMS, f"model.gelu must be one of {', '.join(GELU_FORMS)}, got {self.gelu!r}")

    def arch_spec(self) -> ArchSpec:
        """The method contract's view of this section (``methods.base.ArchSpec``): the one conversion between them."""
        from methods.base import ArchSpec

        return ArchSpec(self.arch, self.input_size, self.in_channels, self.learn_sigma, self.class_dropout_prob,
                        self.gelu)


@dataclass
class MethodSection:
    name: str = "scratch"
    """Registry key of the method (``kindbench methods`` lists them)."""
    stage: str = "transfer"
    """Which stage this run trains: ``ancestry`` (pre-train what a method transfers from) or
    ``transfer``/``descend``/``domain``."""
    options: dict[str, Any] = field(default_factory=dict)
    """The method's own ``Config`` fields; validated by that dataclass, so an unknown option is an error there."""

    def __post_init__(self) -> None:
        _check(self.stage in STAGES, f"method.stage must be one of {sorted(STAGES)}, got {self.stage!r}")


STAGES = frozenset({"ancestry", "transfer", "descend", "domain"})


@dataclass
class DataConfig:
    source: str = "synthetic"
    """``synthetic`` (embedded, generated), ``imagefolder`` (pixels from ``root``) or
    ``latents`` (a VAE latent cache)."""
    split: str = "pretrain"
    """Synthetic class split (``pretrain``, ``novel``, ``all``), or ignored for other sources."""
    domain: str = "natural"
    """Synthetic domain (``natural`` or a shifted one, for domain-shift tasks)."""
    per_class: int = 64
    """Synthetic images per class."""
    image_size: int = 32
    """Image resolution in pixels (synthetic generation or ImageFolder centre crop)."""
    root: str = ""
    """ImageFolder root directory (``source = imagefolder``). May reference env vars as ``${VAR}``."""
    class_list: str = ""
    """Class-list file for ImageFolder (one merged class per line: ``name folder [folder ...]``)."""
    latent_dir: str = ""
    """Latent cache directory (``source = latents``)."""
    random_flip: bool = True
    """Horizontal flip augmentation."""
    seed: int = 0
    """Seed of the synthetic generator (the dataset content, not the training order)."""
    num_workers: int = 0
    """DataLoader worker processes (0 = load in the training process; enough for in-memory synthetic data)."""
    subset_fraction: float = 1.0
    """Train on a fixed, class-balanced fraction of the data (per class ``ceil(fraction * n)`` evenly spaced items;
    FINE's Sigma-only phase uses a small subset of the target data)."""

    def __post_init__(self) -> None:
        _check(self.source in {"synthetic", "imagefolder", "latents"},
               f"data.source must be synthetic, imagefolder or latents, got {self.source!r}")
        _check(self.per_class > 0 and self.image_size > 0, "data.per_class and data.image_size must be positive")
        _check(self.num_workers >= 0, "data.num_workers must be >= 0")
        _check(0.0 < self.subset_fraction <= 1.0, "data.subset_fraction must be in (0, 1]")


@dataclass
class DiffusionConfig:
    num_timesteps: int = 1000
    """Training diffusion steps T (DiT: 1000)."""
    beta_schedule: str = "linear"
    """Noise schedule (DiT: linear beta from 1e-4 to 0.02 at T=1000)."""

    def __post_init__(self) -> None:
        _check(self.num_timesteps > 1, "diffusion.num_timesteps must be > 1")


@dataclass
class OptimConfig:
    lr: float = 1e-4
    """AdamW learning rate (DiT: constant 1e-4)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    weight_decay: float = 0.0
    """AdamW weight decay, applied only to tensors with >= 2 dims (DiT: 0)."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 0.0
    """Gradient-norm clip; 0 disables (DiT never clipped). Always written explicitly into the DeepSpeed config."""
    warmup_steps: int = 0
    """Linear learning-rate warm-up steps (DiT: none)."""
    decay: str = "constant"
    """After the warm-up: ``constant`` (DiT) or ``cosine`` (half cosine to 0 at ``schedule.steps``)."""

    def __post_init__(self) -> None:
        self.betas = tuple(self.betas)  # TOML gives lists
        _check(self.lr > 0, "optim.lr must be positive")
        _check(len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas),
               "optim.betas must be two numbers in [0, 1)")
        _check(self.grad_clip >= 0 and self.weight_decay >= 0 and self.warmup_steps >= 0,
               "optim.grad_clip, optim.weight_decay and optim.warmup_steps must be >= 0")
        _check(self.decay in {"constant", "cosine"}, f"optim.decay must be constant or cosine, got {self.decay!r}")


@dataclass
class ScheduleConfig:
    steps: int = 1000
    """Optimizer steps to train (not micro-steps)."""
    global_batch: int = 256
    """Images per optimizer step over all ranks; fixed across world sizes (gradient accumulation fills the gap)."""
    micro_batch: int = 0
    """Images per rank per forward; 0 = global_batch / world_size (no accumulation)."""
    ema_decay: float = 0.9999
    """EMA decay per optimizer step (fp32, over the trainable parameters only)."""
    log_every: int = 10
    """Optimizer steps between all-reduced loss logs."""
    ckpt_every: int = 500
    """Optimizer steps between checkpoints (the last step always checkpoints)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep on disk."""

    def __post_init__(self) -> None:
        _check(self.steps > 0 and self.global_batch > 0, "schedule.steps and schedule.global_batch must be positive")
        _check(self.micro_batch >= 0, "schedule.micro_batch must be >= 0")
        _check(0.0 <= self.ema_decay < 1.0, "schedule.ema_decay must be in [0, 1)")
        _check(self.log_every > 0 and self.ckpt_every > 0 and self.keep_checkpoints > 0,
               "schedule.log_every, ckpt_every and keep_checkpoints must be positive")


@dataclass
class EngineConfig:
    backend: str = "ddp"
    """``ddp`` (torch DistributedDataParallel; a plain module at world size 1) or ``deepspeed``."""
    zero_stage: int = 0
    """DeepSpeed ZeRO stage 0-3 (``backend = deepspeed`` only)."""
    precision: str = "fp32"
    """``fp32`` or ``bf16`` (autocast under DDP, bf16 weights + fp32 master under DeepSpeed). fp16 is not offered."""
    dist_backend: str = "auto"
    """torch.distributed backend: ``auto`` (nccl on GPU, gloo on CPU), ``gloo`` or ``nccl``."""
    seed: int = 0
    """Global seed; each rank derives its own stream from (seed, rank, step), so results do not depend
    on world size."""
    tf32: bool = False
    """Allow TF32 matmuls on Ampere+ GPUs (recorded; DiT's reproduction numbers were measured with it off)."""
    cpu_threads: int = 0
    """torch threads per process on CPU; 0 = torch's default. Tiny models run several times faster on 1 thread (no
    OpenMP barrier waits, measured 6x on a busy 2-core machine); does not change results, so not hashed."""

    def __post_init__(self) -> None:
        _check(self.backend in {"ddp", "deepspeed"}, f"engine.backend must be ddp or deepspeed, got {self.backend!r}")
        _check(self.zero_stage in (0, 1, 2, 3), f"engine.zero_stage must be 0-3, got {self.zero_stage}")
        _check(self.precision in {"fp32", "bf16"}, f"engine.precision must be fp32 or bf16, got {self.precision!r}")
        _check(self.dist_backend in {"auto", "gloo", "nccl"}, "engine.dist_backend must be auto, gloo or nccl")
        _check(self.cpu_threads >= 0, "engine.cpu_threads must be >= 0")


@dataclass
class SampleConfig:
    """How a trained model is sampled (``[protocol.sample]``, ``--set sample.*``, ``kindbench sample``): the sample
    job's own settings, never part of a training config."""

    scheduler: str = "ddpm"
    """Sampler: ``ddpm`` (learned range), ``ddim`` or ``dpm++``."""
    num_steps: int = 250
    """Sampling steps (DiT: 250 DDPM)."""
    cfg_scale: float = 1.5
    """Classifier-free guidance scale; 1 disables guidance."""
    num_samples: int = 50_000
    """Samples to draw for evaluation."""
    per_proc_batch: int = 32
    """Samples per rank per forward."""
    seed: int = 0
    """Base seed; sample i uses its own generator seeded by (seed, i), independent of world size and batch."""
    label_mode: str = "uniform"
    """Class of sample i: ``uniform`` (drawn at random per sample, the DiT/ADM protocol) or ``balanced`` (i mod C)."""
    guide_channels: int = 0
    """Output channels classifier-free guidance applies to; 0 = all (DiT's release used 3 for JAX parity)."""
    vae_dir: str = ""
    """Local diffusers AutoencoderKL directory to decode latents (empty: ``$KINDBENCH_VAE_DIR``);
    unused in pixel space."""
    clip_denoised: str = "auto"
    """Clip each step's predicted x_0 to [-1, 1]: ``auto`` = in pixel space only (ADM's ``clip_denoised`` for
    images; DiT samples latents unclipped), ``true`` or ``false``. Without it, deterministic samplers (DDIM,
    DPM-Solver++) of an undertrained pixel model diverge far outside the image range."""

    def __post_init__(self) -> None:
        from bench.diffusion.schedulers import SCHEDULERS

        _check(self.scheduler in SCHEDULERS, f"sample.scheduler must be one of {', '.join(SCHEDULERS)}, "
                                             f"got {self.scheduler!r}")
        _check(self.clip_denoised in {"auto", "true", "false"}, "sample.clip_denoised must be auto, true or false")
        _check(self.label_mode in {"uniform", "balanced"}, "sample.label_mode must be uniform or balanced")
        _check(self.guide_channels >= 0, "sample.guide_channels must be >= 0")
        _check(self.num_steps > 0 and self.num_samples > 0 and self.per_proc_batch > 0,
               "sample.num_steps, num_samples and per_proc_batch must be positive")
        _check(self.cfg_scale >= 1.0, "sample.cfg_scale must be >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class EvalConfig:
    """How a suite scores its samples (``[protocol.eval]``, ``--set eval.*``): the evaluate and prepare jobs' own
    settings, never part of a training config."""

    extractor: str = "synthetic"
    """Feature space: ``synthetic`` (the embedded domain extractor, for the synthetic data) or ``inception``
    (Inception-V3, ADM's protocol: FID, sFID, IS, precision/recall; plus FDD with DINOv2)."""
    ref_per_class: int = 64
    """Held-out real images per class in a synthetic task's reference (``extractor = synthetic``)."""
    cache_dir: str = ""
    """Where the synthetic domain extractor is cached (empty: ``$KINDBENCH_CACHE_DIR`` or ``~/.cache/kindbench``)."""
    reference: str = ""
    """ADM-style reference batch (``extractor = inception``), e.g.
    ``${KINDBENCH_REFS}/VIRTUAL_imagenet256_labeled.npz``."""
    weights_dir: str = ""
    """Inception/DINOv2 weights (empty: ``$KINDBENCH_WEIGHTS_DIR``)."""
    fdd: str = "auto"
    """FDD (DINOv2 Frechet distance): ``auto`` (when its weights and reference are present), ``true`` (an error when
    they are missing) or ``false``."""
    fdd_reference: str = ""
    """DINOv2 reference statistics FDD compares against (``kindbench metrics build-ref --extractor dinov2``); empty:
    the ImageNet-train one in the weights folder (``refs/fdd_imagenet256_train_dinov2_vitl14.npz``), right for
    ImageNet tasks only."""

    def __post_init__(self) -> None:
        _check(self.extractor in {"synthetic", "inception"},
               f"eval.extractor must be synthetic or inception, got {self.extractor!r}")
        _check(self.ref_per_class > 0, "eval.ref_per_class must be positive")
        _check(self.fdd in {"auto", "true", "false"}, f"eval.fdd must be auto, true or false, got {self.fdd!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class RunConfig:
    """The whole resolved configuration of one run."""

    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodSection = field(default_factory=MethodSection)
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    run: RunSection = field(default_factory=lambda: RunSection())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def config_hash(self, length: int = 8) -> str:
        """Content hash of what changes the trained model. Left out: bookkeeping (logging and checkpoint cadence,
        loader workers, ``run.*`` but the name and ancestry), and machine paths (the same experiment keeps its id on
        another cluster). Sampling and scoring settings are not part of a training config at all: they belong to
        the sample and evaluate jobs (``SampleConfig``, ``EvalConfig``)."""
        data = self.to_dict()
        data["run"] = {k: v for k, v in data["run"].items() if k in RunSection.HASHED}
        for section, key in UNHASHED:
            data[section].pop(key, None)
        canonical = json.dumps(data, sort_keys=True, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()[:length]

    def run_id(self) -> str:
        """Readable prefix + config hash, e.g. ``scratch--ancestry-dense--DiT-T-2--s0--3f9a1c2e``
        (docs/harness.md §2.2)."""
        if self.run.id:
            return self.run.id
        arch = self.model.arch.replace("/", "-")
        name = re.sub(r"[^A-Za-z0-9._-]+", "-", self.run.name or self.data.split)  # a name is never a path
        return f"{self.method.name}--{name}--{arch}--s{self.engine.seed}--{self.config_hash()}"


#: Fields that do not change the trained model (see ``RunConfig.config_hash``).
UNHASHED = (("schedule", "log_every"), ("schedule", "ckpt_every"), ("schedule", "keep_checkpoints"),
            ("data", "num_workers"), ("data", "root"), ("data", "latent_dir"), ("engine", "cpu_threads"))


@dataclass
class RunSection:
    out_dir: str = "runs"
    """Root folder of run directories (checkpoints, logs, records); ``<out_dir>/<run_id>/``."""
    id: str = ""
    """Explicit run id; empty = derived from the config (readable prefix + hash)."""
    name: str = ""
    """Readable experiment/task name used in the run id prefix (default: the data split)."""
    ancestry: str = ""
    """Path of the ancestry export (``export.safetensors``) a transfer run starts from;
    empty for scratch/ancestry runs."""
    resume: bool = True
    """Resume from the newest valid checkpoint in the run directory if one exists."""
    max_wall_minutes: float = 0.0
    """Checkpoint and exit with the requeue code after this many minutes (0 = no limit); for walltime-limited jobs."""
    stop_after_steps: int = 0
    """Checkpoint and exit with the requeue code after this many steps in this process (0 = no limit); splits a run
    into chunks (short partitions, tests of exact resume). Not part of the run's identity."""

    def __post_init__(self) -> None:
        _check(self.max_wall_minutes >= 0 and self.stop_after_steps >= 0,
               "run.max_wall_minutes and run.stop_after_steps must be >= 0")
        # an id is a directory name under run.out_dir: never a path that leaves it
        _check(not self.id or (re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._=+-]*", self.id) is not None
                               and ".." not in self.id and len(self.id) <= 200),
               f"run.id {self.id!r} must be a plain name (letters, digits and ._=+-, no '/', no '..')")

    HASHED: typing.ClassVar[frozenset[str]] = frozenset({"name", "ancestry"})


# --------------------------------------------------------------------------------------------------------------
#                                       Loading, overrides and type checks
# --------------------------------------------------------------------------------------------------------------


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> RunConfig:
    """Defaults, then the TOML file at ``path``, then ``key=value`` dotted overrides. Raises ConfigError."""
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as err:
            raise ConfigError(f"config file {path} is not valid TOML: {err}") from None
    for item in overrides:
        key, value = parse_override(item)
        _set_dotted(data, key, _CliValue(item.split("=", 1)[1], value))
    return from_dict(data)


def parse_override(item: str) -> tuple[str, Any]:
    """``'optim.lr=2e-4'`` or ``'--optim.lr=2e-4'`` -> (``'optim.lr'``, 2e-4);
    the value is read as a TOML literal, else a string."""
    text = item[2:] if item.startswith("--") else item
    if "=" not in text:
        raise ConfigError(f"override {item!r} must look like --section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw  # bare words are strings (paths, flavour names)
    return key.strip(), value


@dataclass(frozen=True)
class _CliValue:
    """An override as typed: its TOML reading, and the raw text for fields that are strings (``--run.name=123``)."""

    text: str
    parsed: Any


def _set_dotted(data: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {key!r}: {part!r} is not a section")
    node[parts[-1]] = value


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Build a RunConfig from nested dicts, rejecting unknown keys and wrong types."""
    return _build(RunConfig, data, prefix="")


def section_from_overrides(cls: type, section: str, overrides: typing.Sequence[str]) -> Any:
    """One section from ``--<section>.key=value`` overrides over its defaults; any other key is an error."""
    data: dict[str, Any] = {}
    for item in overrides:
        key, value = parse_override(item)
        head, _, rest = key.partition(".")
        if head != section or not rest or "." in rest:
            raise ConfigError(f"expected --{section}.key=value, got {item!r}")
        data[rest] = _CliValue(item.split("=", 1)[1], value)
    return _build(cls, data, prefix=f"{section}.")


def section_from_dict(cls: type, data: dict[str, Any], section: str) -> Any:
    """One section (``SampleConfig``, ``EvalConfig``) from a table, checked like ``from_dict`` (keys named
    ``<section>.<key>`` in errors, with the did-you-mean)."""
    return _build(cls, data, prefix=f"{section}.")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config key {prefix.rstrip('.') or '<root>'!r} must be a table/section")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in fields:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{prefix}{close[0]}'?)" if close else f" (valid: {', '.join(fields)})"
            raise ConfigError(f"unknown config key {prefix + key!r}{hint}")
        kwargs[key] = _coerce(hints[key], value, prefix + key)
    return cls(**kwargs)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    if isinstance(value, _CliValue):
        value = value.text if hint is str else value.parsed
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, key + ".")
    origin = typing.get_origin(hint)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"config key {key!r} expects a table, got {type(value).__name__} {value!r}")
        return {k: (v.parsed if isinstance(v, _CliValue) else v) for k, v in value.items()}
    if origin is tuple:
        args = typing.get_args(hint)
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"config key {key!r} expects a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, key) for a, v in zip(args, value))
    if origin in (typing.Union, types.UnionType):
        raise ConfigError(f"config key {key!r} has an unsupported union type")  # keep the tree simple
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str, bool) and (type(value) is not hint):
        raise ConfigError(f"config key {key!r} expects {hint.__name__}, got {type(value).__name__} {value!r}")
    return value


def save_resolved(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as JSON (atomic: temp file + rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(config.to_dict(), indent=2, sort_keys=True, default=str))
