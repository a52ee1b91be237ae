"""Short trainings in-process, from the same composition train.py uses (engine.compose)."""
from pathlib import Path

from engine.compose import CONF_DIR as CONF
from engine.compose import TINY, compose_cfg, load_cfg

__all__ = ["CONF", "TINY", "compose_cfg", "load_cfg", "run_train"]


def run_train(tmp_path: Path, overrides=(), name="run"):
    import train
    run_dir = tmp_path / name
    run_dir.mkdir(parents=True, exist_ok=True)
    return train.train(compose_cfg(list(overrides)), run_dir), run_dir
