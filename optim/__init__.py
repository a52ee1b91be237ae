"""Large-batch optimizers, schedules and scaling rules in plain PyTorch (no Hydra imports)."""
from ._helpers import LayerwiseOptimizer, param_groups
from .batch_schedules import (
    BATCH_SCHEDULES,
    AdaptiveBatch,
    BatchSchedule,
    ConstantBatch,
    RampBatch,
    StepBatch,
)
from .lamb import LAMB
from .lars import LARS
from .scaling import MEASURES_GAIN, RESCALES_ADAM, RULES, UNSCALED, adascale_gain, lr_multiplier, scale_adam
from .schedules import DECAYS, WARMUPS, LRSchedule, apply_lr

__all__ = ["LARS", "LAMB", "LayerwiseOptimizer", "param_groups", "LRSchedule", "apply_lr", "WARMUPS", "DECAYS",
           "RULES", "RESCALES_ADAM", "MEASURES_GAIN", "UNSCALED", "lr_multiplier", "scale_adam", "adascale_gain", "BatchSchedule", "BATCH_SCHEDULES",
           "ConstantBatch", "RampBatch", "StepBatch", "AdaptiveBatch"]
