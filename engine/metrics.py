"""Where a run's numbers go: metrics.jsonl always (rank 0), plus wandb (offline by default) or a CSV file.

Logging never kills training: if wandb fails to start or to write, the run goes on with the local files and one
warning line.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as text
    return v


class RunLogger:
    """``backend=None`` (ranks other than 0) writes nothing at all."""

    def __init__(self, run_dir: Path, backend: str | None = "none", config: dict | None = None, *,
                 mode: str = "offline", project: str = "large-batch", group: str | None = None,
                 name: str | None = None):
        self.run_dir = run_dir
        self.jsonl = open(run_dir / "metrics.jsonl", "a") if backend is not None else None
        self.csv_file = self.csv_writer = None
        self.csv_keys: list[str] = []
        self.wandb_run = None
        if backend == "csv":
            self.csv_file = open(run_dir / "metrics.csv", "a", newline="")
        elif backend == "wandb":
            self._start_wandb(config, mode, project, group, name)

    def _start_wandb(self, config, mode, project, group, name):
        try:
            import wandb
            self.wandb_run = wandb.init(project=project, group=group, name=name, config=config, mode=mode,
                                        dir=str(self.run_dir), reinit="finish_previous",
                                        settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:
            self._warn(f"wandb could not start ({type(e).__name__}: {e}); logging to metrics.jsonl only")

    @staticmethod
    def _warn(msg: str) -> None:
        print(f"warning: {msg}", file=sys.stderr, flush=True)

    def log(self, step: int, values: dict) -> None:
        if self.jsonl is None:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.csv_file is not None:
            self._log_csv(row)
        if self.wandb_run is not None:
            try:
                self.wandb_run.log({k: v for k, v in row.items() if k != "step"}, step=step)
            except Exception as e:
                self._warn(f"wandb.log failed ({type(e).__name__}: {e}); continuing with metrics.jsonl only")
                self.wandb_run = None

    def histogram(self, step: int, name: str, values) -> None:
        """Per-layer values as a wandb histogram (metrics.jsonl gets their summary statistics instead)."""
        if self.wandb_run is not None:
            try:
                import wandb
                self.wandb_run.log({name: wandb.Histogram(values.detach().cpu().double().numpy())}, step=step)
            except Exception as e:
                self._warn(f"wandb histogram failed ({type(e).__name__}: {e})")

    def _log_csv(self, row: dict) -> None:
        new = [k for k in row if k not in self.csv_keys]
        if new:  # rows may carry different keys (train vs eval): rewrite the header as columns appear
            self.csv_keys += new
            self.csv_file.seek(0)
            old = list(csv.DictReader(self.csv_file)) if self.csv_file.tell() else []
            self.csv_file.seek(0)
            self.csv_file.truncate()
            self.csv_writer = csv.DictWriter(self.csv_file, fieldnames=self.csv_keys)
            self.csv_writer.writeheader()
            self.csv_writer.writerows(old)
        self.csv_writer.writerow(row)
        self.csv_file.flush()

    def summary(self, values: dict) -> None:
        if self.wandb_run is not None:
            try:
                for k, v in values.items():
                    self.wandb_run.summary[k] = _jsonable(v)
            except Exception as e:
                self._warn(f"wandb summary failed ({type(e).__name__}: {e})")

    def finish(self, exit_code: int = 0) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.csv_file is not None:
            self.csv_file.close()
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish(exit_code=exit_code)
            except Exception as e:
                self._warn(f"wandb.finish failed ({type(e).__name__}: {e})")
            self.wandb_run = None


class Progress:
    """A tqdm bar on a terminal; plain periodic lines when stdout is not one (CI logs, multirun)."""

    def __init__(self, total: int, initial: int = 0, every: int = 50, enabled: bool = True):
        self.total, self.every, self.enabled = total, every, enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, text: str, images_per_s: float = 0.0, seconds_per_step: float = 0.0) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            eta = f", ETA {_duration(seconds_per_step * (self.total - step))}" if seconds_per_step else ""
            print(f"step {step}/{self.total} {text}, {images_per_s:,.0f} images/s{eta}", flush=True)

    def write(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
