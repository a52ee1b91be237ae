"""The settings' types and allowed ranges, checked over the composed config before any work starts.

The YAML files under conf/ hold every default; this module holds none of them. It declares, next to each setting,
its type and range (pydantic field constraints), so a setting cannot be added without one. Names of options come
from the code that implements them (the registries ``optim.WARMUPS``, ``optim.DECAYS``, ``optim.RULES``,
``engine.models.MODELS``, ``engine.datasets.DATASETS``) and from conf/'s file names, which a test keeps equal.
A setting an option does not use is None here ("not set by this option"), never a second default.

The optimizer group is the constructor: ``_target_`` names any ``torch.optim.Optimizer`` class and every key other
than the plan's (``lr`` at ``ref_batch``, ``weight_decay``) is a keyword of that class, checked by building it.
"""
from __future__ import annotations

import difflib
import importlib
import re
from typing import Annotated, Any, Literal, Optional, Union

from omegaconf import OmegaConf
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    ValidationError,
    field_validator,
    model_validator,
)

from optim import BATCH_SCHEDULES, DECAYS, RULES, WARMUPS

from .datasets import DATASETS
from .errors import ConfigError
from .models import MODELS

Pos = Annotated[int, Field(gt=0)]
NonNeg = Annotated[int, Field(ge=0)]
PosFloat = Annotated[float, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[float, Field(ge=0, allow_inf_nan=False)]
Unit = Annotated[float, Field(ge=0, le=1)]          # a fraction, ends included
UnitOpen = Annotated[float, Field(ge=0, lt=1)]      # momentum-like: 1 excluded


class Group(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=False)


def Option(group: str, registry):
    """A setting whose value must name an entry of ``registry`` (the code that implements the options)."""
    def check(value: str) -> str:
        if value not in registry:
            raise ValueError(f"{group}={value!r} is not an option: choose one of {', '.join(registry)}")
        return value
    return Annotated[str, AfterValidator(check)]


class OptimConfig(BaseModel):
    """``_target_`` plus the plan's keys; the other keys (``model_extra``) go to the constructor."""
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    target: str = Field(alias="_target_", min_length=1)
    lr: PosFloat                                   # base LR at ref_batch (or the global LR under scaling=none)
    ref_batch: Pos = 256                           # SPEC: optional in an optimizer file
    weight_decay: NonNegFloat = 0.0                # SPEC: optional; on tensors with ndim > 1 only

    @property
    def kwargs(self) -> dict:
        return dict(self.model_extra or {})


class WarmupConfig(Group):
    name: Option("warmup", WARMUPS)
    epochs: Optional[NonNegFloat] = None           # length in epochs (fractions allowed) ...
    steps: Optional[NonNeg] = None                 # ... or in optimizer steps (wins when both are set)
    start_factor: Optional[Unit] = None            # linear: LR at the start as a fraction of the peak
    start_at_ref_lr: Optional[StrictBool] = None   # linear starts at / constant stays at the unscaled base LR
    factor: Optional[Annotated[float, Field(gt=0, le=1)]] = None  # constant: the flat fraction of the peak
    ratio: Optional[Annotated[float, Field(ge=1, allow_inf_nan=False)]] = None  # exponential: starts at peak/r
    scale_with_batch: Optional[StrictBool] = None  # lengthen the warmup by batch / ref_batch (MLPerf LARS)


class ScheduleConfig(Group):
    name: Option("schedule", DECAYS)
    min_factor: Optional[Unit] = None              # cosine/poly floor as a fraction of the peak
    milestones: Optional[Annotated[list[Annotated[float, Field(gt=0, lt=1)]], Field(min_length=1)]] = None  # step:
    #                                                                   fractions of the run ...
    milestone_epochs: Optional[Annotated[list[PosFloat], Field(min_length=1)]] = None  # ... or epochs (wins when set)
    gamma: Optional[Annotated[float, Field(gt=0, le=1)]] = None
    power: Optional[PosFloat] = None
    pct_start: Optional[Annotated[float, Field(gt=0, lt=1)]] = None
    div_factor: Optional[Annotated[float, Field(ge=1, allow_inf_nan=False)]] = None
    final_div_factor: Optional[Annotated[float, Field(ge=1, allow_inf_nan=False)]] = None
    cycle_momentum: Optional[StrictBool] = None
    base_momentum: Optional[UnitOpen] = None
    max_momentum: Optional[UnitOpen] = None

    @model_validator(mode="after")
    def _ordered(self):
        for key in ("milestones", "milestone_epochs"):
            v = getattr(self, key)
            if v is not None and list(v) != sorted(v):
                raise ValueError(f"schedule.{key}={list(v)} must be increasing")
        if self.base_momentum is not None and self.max_momentum is not None and self.base_momentum > self.max_momentum:
            raise ValueError(f"schedule.base_momentum={self.base_momentum} must be <= schedule.max_momentum="
                             f"{self.max_momentum}")
        return self


class ScalingConfig(Group):
    rule: Option("scaling", RULES)
    ref_batch: Pos


class BatchScheduleConfig(Group):
    name: Option("batch_schedule", BATCH_SCHEDULES)
    start: Optional[Pos] = None                    # the first global batch (ramp, step, adaptive)
    increment: Optional[Pos] = None                # ramp: batch increment per stage; null = start
    epochs: Optional[PosFloat] = None              # ramp: its length in epochs of images (0 would be `constant`)
    factor: Optional[Annotated[float, Field(gt=1, allow_inf_nan=False)]] = None  # step: batch x factor per milestone
    milestones: Optional[Annotated[list[Annotated[float, Field(gt=0, lt=1)]], Field(min_length=1)]] = None  # step:
    # fractions of the run's images (at least one: without, the batch never grows)
    k: Optional[PosFloat] = None                   # adaptive: B = k * B_simple
    every: Optional[Pos] = None                    # adaptive: steps between decisions
    multiple: Optional[Pos] = None                 # adaptive: batches are multiples of this
    probe: Optional[Pos] = None                    # adaptive: images per rank in the small-batch gradient

    @field_validator("start", "increment", "multiple", mode="before")
    @classmethod
    def _batch_sized(cls, v, info):  # batch sizes take the k suffix, as `batch` does
        return parse_batch(v, f"batch_schedule.{info.field_name}") if isinstance(v, str) else v

    @model_validator(mode="after")
    def _ordered(self):
        if self.milestones is not None and list(self.milestones) != sorted(self.milestones):
            raise ValueError(f"batch_schedule.milestones={list(self.milestones)} must be increasing")
        return self


class ModelConfig(Group):
    """A model of MODELS by name, of timm or torchvision by name (``library``), or any class by ``_target_``: then
    the keys that are not settings here (``model_extra``) go to its constructor."""
    model_config = ConfigDict(extra="allow", strict=False, populate_by_name=True)
    name: Optional[str] = None                     # one of MODELS; with library, a name of that library
    target: Optional[str] = Field(None, alias="_target_", min_length=1)  # a class (or function) by import path
    library: Optional[Literal["timm", "torchvision"]] = None  # model=timm|torchvision: any model of theirs
    width: Optional[Pos] = None                    # resnet_small: channels of the first stage
    blocks: Optional[Annotated[list[NonNeg], Field(min_length=3, max_length=3)]] = None  # resnet_small: per stage
    zero_init_residual: Optional[StrictBool] = None
    sync_bn: Optional[StrictBool] = None
    patch_size: Optional[Pos] = None               # ViT: null = 4 for images <= 64 px, else 16
    dropout: Optional[UnitOpen] = None
    init: Optional[str] = None                     # warm start from these weights (engine/warm_start.py)
    init_ema: StrictBool = False                   # from a checkpoint of ours: its EMA weights
    init_skip: list[str] = []                      # key patterns left initialised (fnmatch)

    @property
    def kwargs(self) -> dict:
        """A model by _target_: its constructor's keywords, the file's own keys and the shape settings it sets."""
        shape = {k: getattr(self, k) for k in ("width", "patch_size", "dropout") if getattr(self, k) is not None}
        return shape | dict(self.model_extra or {})

    @model_validator(mode="after")
    def _known(self):
        if self.target is not None:
            self.name = self.name or self.target.rsplit(".", 1)[-1]
            return self
        if self.model_extra:
            raise ValueError(f"model.{next(iter(self.model_extra))} is not a setting of model={self.name} (only a "
                             f"model by _target_ takes keywords of its own)")
        if self.name is None:
            raise ValueError("model.name is missing: name one of the models, or give model._target_")
        if self.library is None and self.name not in MODELS:
            raise ValueError(f"model={self.name!r} is not an option: choose one of {', '.join(MODELS)}, or any model "
                             f"of timm or torchvision by name (model=timm model.name=NAME)")
        return self


class DataConfig(Group):
    name: Option("data", DATASETS)
    root: Optional[str] = None
    augment: Optional[StrictBool] = None           # random crop with padding + flip, per batch on the device
    crop_padding: Optional[NonNeg] = None
    hflip: Optional[StrictBool] = None
    eval_hflip: Optional[StrictBool] = None        # evaluation averages each image's logits with its mirror's
    num_workers: Optional[NonNeg] = None           # imagenet: DataLoader workers
    train_size: Optional[Pos] = None               # synthetic only
    test_size: Optional[Pos] = None
    image_size: Optional[Annotated[int, Field(ge=4)]] = None
    channels: Optional[Pos] = None
    num_classes: Optional[Annotated[int, Field(ge=2)]] = None
    val_split: NonNeg                              # training images held out for val_*; 0 = evaluate on test_*
    repeated_aug: Optional[NonNeg] = None         # imagenet: DeiT's repeated augmentation, N copies per image; 0 = off
    auto_augment: Optional[Literal["ra", "ta_wide"]] = None  # imagenet: RandAugment / TrivialAugmentWide per image
    format: Optional[Literal["folder", "shards"]] = None  # imagenet: ImageFolder tree or WebDataset shards (same order)
    shard_group: Optional[Pos] = None              # imagenet shards: read this many shards at a time (null: all)
    decode: Optional[Literal["workers", "device"]] = None  # imagenet: JPEG decoding in the workers or batched on device
    device_crop: Optional[Literal["per_image", "batched"]] = None  # imagenet, decode=device: resize crops one by one
    #                                                            or together (roi_align, within a tolerance)
    mixup_alpha: Optional[NonNegFloat] = None      # MixUp's Beta(alpha, alpha); 0 = off (torchvision.transforms.v2)
    cutmix_alpha: Optional[NonNegFloat] = None     # CutMix's Beta(alpha, alpha); 0 = off; both > 0: one per step

    @model_validator(mode="after")
    def _shard_group_of_shards(self):
        if self.shard_group is not None and self.format != "shards":
            raise ValueError(f"data.shard_group={self.shard_group} groups the order by shard: it needs "
                             f"data.format=shards (got data.format={self.format})")
        return self

    @model_validator(mode="after")
    def _batched_crop_on_the_device(self):
        if self.device_crop == "batched" and self.decode != "device":
            raise ValueError(f"data.device_crop=batched crops the images the training device decoded: it needs "
                             f"data.decode=device (got data.decode={self.decode})")
        return self


class LoggerConfig(Group):
    every_steps: Pos                               # train metrics every N optimizer steps
    mode: Optional[Literal["offline", "online", "disabled"]] = None  # wandb
    project: Optional[str] = None                  # wandb
    group: Optional[str] = None                    # null: a sweep's folder name (set by train.py)
    run_name: Optional[str] = None                 # null: a sweep job's folder; a single run's overrides and folder
    sinks: dict[str, dict[str, Any]] = {}          # each names its class by _target_ (engine/sinks.py)

    @model_validator(mode="before")
    @classmethod
    def _stored_before_sinks(cls, data):
        """Configs stored before sinks named the logger by ``name``; a resume or eval takes the command's logger."""
        if isinstance(data, dict) and "name" in data and "sinks" not in data:
            data = {k: v for k, v in data.items() if k != "name"}
        return data

    @field_validator("sinks")
    @classmethod
    def _importable(cls, sinks):
        for key, node in sinks.items():
            target = node.get("_target_")
            if not isinstance(target, str):
                raise ValueError(f"logger.sinks.{key} has no _target_: name its class (engine/sinks.py)")
            module, _, name = target.rpartition(".")
            try:
                getattr(importlib.import_module(module), name)
            except Exception as e:
                raise ValueError(f"logger.sinks.{key}._target_={target!r} is not a class that can be imported "
                                 f"({e}): check the module path") from None
        return sinks


class CheckpointConfig(Group):
    enabled: StrictBool
    every_steps: Optional[Pos] = None              # null = at epoch ends only
    keep_steps: list[Pos]                          # kept beside last.pt as checkpoints/step-N.pt
    max_requeues: NonNeg = 3                       # the default also reads configs saved before this setting


class EvalConfig(Group):
    every_steps: Optional[Pos] = None              # null = at epoch ends only
    every_epochs: Optional[PosFloat] = None        # also every this many epochs' images (0.25: 4 a pass, any batch)


class EmaConfig(Group):
    enabled: StrictBool
    decay: Annotated[float, Field(gt=0, lt=1)]
    every_steps: Pos


class DiagnosticsConfig(Group):
    every: NonNeg                                  # trust / update ratios every N steps; 0 = off
    noise_scale: StrictBool
    noise_ema: UnitOpen                            # AdaScale, adaptive batch: per step, of |G|^2 and tr(Sigma)
    noise_trace_ema: UnitOpen = 0.9                # noise_scale/b_simple: per micro-batch, of tr(Sigma)


class Config(Group):
    optim: OptimConfig
    warmup: WarmupConfig
    schedule: ScheduleConfig
    scaling: ScalingConfig
    batch_schedule: BatchScheduleConfig
    model: ModelConfig
    data: DataConfig
    logger: LoggerConfig
    checkpoint: CheckpointConfig
    eval: EvalConfig
    ema: EmaConfig
    diagnostics: DiagnosticsConfig
    recipe: Any = None                             # the selected recipe's name lands here only as a record
    hparams_search: Any = None
    batch: int                                     # the global batch, parsed from 256 / 4k / 32k
    micro_batch: Optional[Union[Pos, Literal["auto"]]] = None  # null: largest divisor <= 256; auto: CUDA halves on OOM
    seed: Annotated[int, Field(ge=0, lt=2**63)]
    epochs: PosFloat
    max_steps: Optional[Pos] = None
    label_smoothing: UnitOpen
    device: Literal["auto", "cpu", "cuda"]
    precision: Literal["fp32", "bf16", "fp16", "auto"]
    tf32: StrictBool = True                        # the defaults also read configs saved before these settings
    deterministic: StrictBool = False
    compile: StrictBool
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    channels_last: StrictBool
    grad_clip: Optional[PosFloat] = None
    resume: Optional[str] = None
    eval_only: StrictBool
    threads: Optional[Pos] = None

    @field_validator("batch", mode="before")
    @classmethod
    def _batch(cls, v):
        return parse_batch(v)


_BATCH = re.compile(r"^\s*([0-9]+)\s*([kK]?)\s*$")


def parse_batch(value: Any, name: str = "batch") -> int:
    """256 -> 256, '4k' -> 4096, '32k' -> 32768, '32768' -> 32768; anything else is a ConfigError naming ``name``."""
    m = _BATCH.match(str(value)) if not isinstance(value, (bool, float)) else None
    if m is None or int(m.group(1)) == 0:
        raise ConfigError(f"{name}={value!r} is not a valid {'global batch' if name == 'batch' else 'batch size'}: "
                          f"use a positive integer, k = x1024 (256, 4k, 32k)")
    return int(m.group(1)) * (1024 if m.group(2) else 1)


def load_config(cfg) -> Config:
    """The composed Hydra config, typed and range-checked; the first problem becomes one ConfigError line."""
    data = OmegaConf.to_container(cfg, resolve=True) if not isinstance(cfg, dict) else cfg
    data.pop("hydra", None)
    try:
        return Config.model_validate(data)
    except ConfigError:
        raise
    except ValidationError as e:
        raise ConfigError(_one_line(e, data)) from None


def _holds(data: dict, loc: tuple) -> bool:
    """Whether the config ``data`` has a setting at ``loc`` (pydantic also puts a union member's tag in the path)."""
    for p in loc:
        if isinstance(data, dict) and p in data or isinstance(data, list) and isinstance(p, int) and p < len(data):
            data = data[p]
        else:
            return False
    return True


def _one_line(e: ValidationError, data: dict) -> str:
    err = e.errors()[0]
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        parent = data
        for p in loc[:-1]:
            parent = parent.get(p, {}) if isinstance(parent, dict) else {}
        known = list(parent) if isinstance(parent, dict) else []
        close = difflib.get_close_matches(loc[-1], [k for k in known if k != loc[-1]], n=1)
        hint = f" (did you mean {'.'.join(loc[:-1] + close)}?)" if close else ""
        return f"{key} is not a setting of this project{hint}: check the spelling against conf/"
    if err["type"] == "missing":
        return f"{key} is missing: the option's YAML file must set it"
    msg = err["msg"].removeprefix("Value error, ")
    if len(loc) > 1 and not _holds(data, err["loc"]):  # a union's member tag (micro_batch: int | 'auto'): name the setting
        key = ".".join(loc[:-1])
        parts = [x["msg"].split(",")[0] for x in e.errors() if [str(p) for p in x["loc"]][:-1] == loc[:-1]]
        msg = " or ".join(dict.fromkeys(m[:1].lower() + m[1:] for m in parts))
    if msg.startswith(("warmup", "schedule", "scaling", "model", "data", "batch_schedule", "logger.sinks", f"{key}=")):  # one line
        return msg
    return f"{key}={err.get('input')!r} is invalid: {msg[0].lower()}{msg[1:]}"
