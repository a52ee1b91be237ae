"""Compose the config exactly as train.py does, from Python (tests, benchmarks, the schedule preview), and the
one tiny-run setting they share."""
from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir

from . import resolvers  # noqa: F401  (registers conf/'s resolvers)
from .config import Config, load_config

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"

# A run of a few seconds on any machine: 512 synthetic images, no logger, fp32 (the same numbers on every CPU, where
# precision=auto would be bf16 on some). Tests and scripts/ start from this.
TINY = ["data=synthetic", "data.train_size=512", "data.test_size=128", "logger=none", "epochs=2", "warmup.steps=2",
        "threads=1", "precision=fp32"]


def compose_cfg(overrides=(), conf_dir: Path = CONF_DIR):
    """The composed (untyped) Hydra config for these command-line overrides."""
    with initialize_config_dir(str(Path(conf_dir).resolve()), version_base=None):
        return compose("config", overrides=list(overrides))


def load_cfg(overrides=(), conf_dir: Path = CONF_DIR) -> Config:
    """The typed, range-checked config train.py runs with."""
    return load_config(compose_cfg(overrides, conf_dir))
