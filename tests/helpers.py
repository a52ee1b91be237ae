"""Compose configs exactly as train.py does, and run short trainings in-process."""
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from engine.config import register_schema

CONF = Path(__file__).resolve().parent.parent / "conf"
register_schema()

TINY = ["data=synthetic", "data.train_size=512", "data.test_size=128", "logger=none", "epochs=2",
        "warmup.steps=2", "threads=2"]


def compose_cfg(overrides=(), structured=False):
    with initialize_config_dir(str(CONF), version_base=None):
        cfg = compose("config", overrides=list(overrides))
    return cfg


def run_train(tmp_path: Path, overrides=(), name="run"):
    import train
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return train.train(compose_cfg(list(overrides)), run_dir), run_dir
