"""Typed config schema (Hydra structured configs) and the checks that run before any work starts.

The dataclasses mirror conf/: Hydra merges each group's YAML into them, so a misspelt key or a wrong type fails at
composition. Value ranges and cross-field rules (batch divisibility, warmup shorter than the run) are checked by
``validate()``, which raises ``ConfigError`` with one line naming the value and what is allowed.
"""
from __future__ import annotations

import enum
import math
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore


class ConfigError(ValueError):
    """Invalid user input; the message is one line: what was wrong and what is allowed."""


class OptimName(enum.Enum):
    sgd = "sgd"
    adamw = "adamw"
    lars = "lars"
    lamb = "lamb"


class WarmupName(enum.Enum):
    none = "none"
    constant = "constant"
    linear = "linear"
    exponential = "exponential"
    cosine = "cosine"


class ScheduleName(enum.Enum):
    constant = "constant"
    cosine = "cosine"
    step = "step"
    poly = "poly"
    inverse_sqrt = "inverse_sqrt"
    onecycle = "onecycle"


class ScalingRule(enum.Enum):
    none = "none"
    linear = "linear"
    sqrt = "sqrt"
    adam_sde = "adam_sde"


class DataName(enum.Enum):
    fashion_mnist = "fashion_mnist"
    cifar10 = "cifar10"
    cifar100 = "cifar100"
    imagenet = "imagenet"
    synthetic = "synthetic"


class ModelName(enum.Enum):
    resnet_small = "resnet_small"
    resnet18 = "resnet18"
    resnet50 = "resnet50"
    vit_tiny = "vit_tiny"
    vit_small = "vit_small"
    vit_b16 = "vit_b16"


class LoggerName(enum.Enum):
    wandb = "wandb"
    csv = "csv"
    none = "none"


class Device(enum.Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"


class Precision(enum.Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"


@dataclass
class OptimConfig:
    name: OptimName = OptimName.sgd
    lr: float = 0.1                 # base LR at the reference batch (scaling.ref_batch); the rule scales it
    ref_batch: int = 256            # the batch `lr` was tuned at; scaling.ref_batch defaults to it
    weight_decay: float = 0.0       # on tensors with ndim > 1 only (biases and norm layers get none)
    momentum: float = 0.9           # sgd, lars
    nesterov: bool = False          # sgd, lars
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # adamw, lamb
    eps: float = 1e-8
    eta: float = 0.001              # lars trust coefficient
    trust_clip: bool = False        # lars: LARC clipping, layer LR = min(lr * trust, lr)
    trust_bounds: Optional[list[float]] = None  # lamb: clamp of the trust ratio, [lo, hi]
    variant: str = "paper"          # lars: paper | seed
    lr_in_momentum: bool = True     # lars: the paper's Algorithm 1 (LR inside the momentum buffer)
    bias_correction: bool = True    # lamb


@dataclass
class WarmupConfig:
    name: WarmupName = WarmupName.linear
    epochs: Optional[float] = None  # length in epochs (fractions allowed) ...
    steps: Optional[int] = None     # ... or in optimizer steps; steps wins when both are set
    start_factor: float = 0.0       # linear: LR at step 0 as a fraction of the peak
    start_at_ref_lr: bool = False   # linear starts at / constant stays at the unscaled base LR (Goyal et al.)
    factor: float = 0.1             # constant: the flat fraction of the peak
    ratio: float = 100.0            # exponential: r, the LR starts at peak / r
    scale_with_batch: bool = False  # lengthen the warmup (in epochs) by batch / ref_batch, as MLPerf LARS runs do


@dataclass
class ScheduleConfig:
    name: ScheduleName = ScheduleName.cosine
    min_factor: float = 0.0         # cosine/poly floor as a fraction of the peak LR
    milestones: Optional[list[float]] = None  # step: fractions of the run (0..1) ...
    milestone_epochs: Optional[list[float]] = None  # ... or epochs (wins when set)
    gamma: float = 0.1
    power: float = 2.0
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    cycle_momentum: bool = False    # onecycle: momentum / beta1 from max_momentum down to base_momentum and back
    base_momentum: float = 0.85
    max_momentum: float = 0.95


@dataclass
class ScalingConfig:
    rule: ScalingRule = ScalingRule.linear
    ref_batch: int = 256


@dataclass
class ModelConfig:
    name: ModelName = ModelName.resnet_small
    width: int = 16                 # resnet_small: channels of the first stage (x2 per stage)
    zero_init_residual: bool = True  # last BN gamma of each residual block = 0 (Goyal et al. 2017)
    sync_bn: bool = False           # SyncBatchNorm under DDP
    patch_size: Optional[int] = None  # ViT: null = 4 for images <= 64 px, else 16
    dropout: float = 0.0


@dataclass
class DataConfig:
    name: DataName = DataName.fashion_mnist
    root: Optional[str] = None
    augment: bool = True            # random crop with padding + horizontal flip, per batch on the device
    crop_padding: int = 2
    hflip: bool = True
    num_workers: int = 4            # imagenet only: DataLoader workers
    # synthetic only
    train_size: int = 4096
    test_size: int = 1024
    image_size: int = 28
    channels: int = 1
    num_classes: int = 10


@dataclass
class LoggerConfig:
    name: LoggerName = LoggerName.wandb
    mode: str = "offline"           # wandb: offline | online | disabled
    project: str = "large-batch"
    group: Optional[str] = None
    every_steps: int = 10           # log train metrics every N optimizer steps


@dataclass
class CheckpointConfig:
    enabled: bool = True
    every_steps: Optional[int] = None  # null = at epoch ends only


@dataclass
class DiagnosticsConfig:
    every: int = 50                 # log trust ratios and update ratios every N optimizer steps; 0 = off
    noise_scale: bool = True        # gradient noise scale from micro-batch vs global gradients (needs accum >= 2)
    noise_ema: float = 0.99         # EMA decay of the noise-scale estimates (each step's estimate is very noisy)


@dataclass
class Config:
    optim: OptimConfig = field(default_factory=OptimConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    recipe: Optional[Any] = None    # the selected recipe file's name lands here only as a record
    hparams_search: Optional[Any] = None
    batch: Any = 256                # global batch: 256, 4k (= 4096), 32k, 32768
    micro_batch: Optional[int] = None
    seed: int = 0
    epochs: float = 10
    max_steps: Optional[int] = None
    label_smoothing: float = 0.0
    device: Device = Device.auto
    precision: Precision = Precision.fp32
    compile: bool = False
    channels_last: bool = False
    grad_clip: Optional[float] = None
    resume: Optional[str] = None
    threads: Optional[int] = None   # CPU threads (null = all cores)


def register_schema() -> None:
    ConfigStore.instance().store(name="schema", node=Config)


def reject_unknown_keys(cfg) -> None:
    """``+key=value`` adds keys that the schema lacks (Hydra opens the struct for it); a typo there would be
    silently ignored, so every key must be one the schema knows."""
    from omegaconf import OmegaConf
    from omegaconf.errors import ConfigKeyError
    try:
        OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.to_container(cfg))
    except ConfigKeyError as e:
        raise ConfigError(f"{e.full_key} is not a setting of this project: check the spelling against conf/ "
                          f"(python train.py --cfg job prints every setting)") from None


_BATCH = re.compile(r"^\s*([0-9]+)\s*([kK]?)\s*$")


def parse_batch(value: Any) -> int:
    """256 -> 256, '4k' -> 4096, '32k' -> 32768, '32768' -> 32768; anything else is a ConfigError."""
    m = _BATCH.match(str(value)) if not isinstance(value, (bool, float)) else None
    if m is None or int(m.group(1)) == 0:
        raise ConfigError(f"batch={value!r} is not a valid global batch: use a positive integer, optionally with "
                          f"a k suffix meaning x1024 (256, 4k, 32k, 32768)")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def _positive(name: str, value, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if value is None or not ok or (isinstance(value, float) and not math.isfinite(value)):
        raise ConfigError(f"{name}={value} is invalid: it must be {'>= 0' if allow_zero else '> 0'}")


def validate_values(cfg) -> None:
    """Range checks that need no data sizes (the plan checks the rest)."""
    _positive("optim.lr", cfg.optim.lr)
    _positive("optim.weight_decay", cfg.optim.weight_decay, allow_zero=True)
    _positive("optim.eps", cfg.optim.eps, allow_zero=True)
    _positive("optim.eta", cfg.optim.eta)
    _positive("epochs", cfg.epochs)
    _positive("scaling.ref_batch", cfg.scaling.ref_batch)
    if not 0 <= cfg.optim.momentum < 1:
        raise ConfigError(f"optim.momentum={cfg.optim.momentum} is invalid: it must be in [0, 1)")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas={list(cfg.optim.betas)} is invalid: two values in [0, 1)")
    if cfg.optim.variant not in ("paper", "seed"):
        raise ConfigError(f"optim.variant={cfg.optim.variant!r} is invalid: use paper or seed")
    sc = cfg.schedule
    if not 0 <= sc.base_momentum <= sc.max_momentum < 1:
        raise ConfigError(f"schedule.base_momentum={sc.base_momentum}, schedule.max_momentum={sc.max_momentum} are "
                          f"invalid: they need 0 <= base_momentum <= max_momentum < 1")
    if cfg.max_steps is not None:
        _positive("max_steps", cfg.max_steps)
    if cfg.threads is not None:
        _positive("threads", cfg.threads)
    if cfg.micro_batch is not None:
        _positive("micro_batch", cfg.micro_batch)
    if cfg.grad_clip is not None:
        _positive("grad_clip", cfg.grad_clip)
    if cfg.checkpoint.every_steps is not None:
        _positive("checkpoint.every_steps", cfg.checkpoint.every_steps)
    if cfg.warmup.epochs is not None:
        _positive("warmup.epochs", cfg.warmup.epochs, allow_zero=True)
    if cfg.warmup.steps is not None:
        _positive("warmup.steps", cfg.warmup.steps, allow_zero=True)
    if not 0 <= cfg.label_smoothing < 1:
        raise ConfigError(f"label_smoothing={cfg.label_smoothing} is invalid: it must be in [0, 1)")
    if cfg.logger.mode not in ("offline", "online", "disabled"):
        raise ConfigError(f"logger.mode={cfg.logger.mode!r} is invalid: use offline, online or disabled")
    _positive("logger.every_steps", cfg.logger.every_steps)
    _positive("diagnostics.every", cfg.diagnostics.every, allow_zero=True)
    if not 0 <= cfg.diagnostics.noise_ema < 1:
        raise ConfigError(f"diagnostics.noise_ema={cfg.diagnostics.noise_ema} is invalid: it must be in [0, 1)")
    parse_batch(cfg.batch)
