"""Where a run's numbers go: metrics.jsonl always (rank 0), plus wandb (offline by default) or a CSV file.

Logging never kills training: if wandb fails to start or to write, the run goes on with the local files and one
warning line.
"""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import sys
from pathlib import Path

from .distributed import env_rank

# The run's own lines (plan, progress, evaluations, warnings): Hydra's job logging sends them to the console and
# to the run dir's train.log (conf/hydra/job_logging/run_log.yaml).
log = logging.getLogger("train")


class BelowWarning(logging.Filter):
    """stdout gets info; warnings and errors go to stderr alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def say(text: str) -> None:
    log.info(text)


FAILED_JOBS: list[str] = []  # this sweep's jobs that ended in an error (divergence is a result, not a failure)


def record_job_failure(run_dir: Path, error: str, **details) -> dict:
    """A sweep job's error, in its own summary.json (keeping what the run wrote there) and in the list the launching
    command reports before it exits 1. In the job's process only rank 0 writes; the Slurm launcher records the jobs
    that Slurm killed (they cannot write their own)."""
    if env_rank() != 0:
        return {"error": error}
    path = run_dir / "summary.json"
    try:
        before = json.loads(path.read_text()) if path.exists() else {"diverged": False}
    except (OSError, ValueError):
        before = {"diverged": False}
    summary = {**(before if isinstance(before, dict) else {}), "error": error, **details}
    run_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(summary, indent=2) + "\n")
    log.error(f"error in job {run_dir}: {error}")
    FAILED_JOBS.append(str(run_dir))
    return summary


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as text
    return v


class RunLogger:
    """``backend=None`` (ranks other than 0) writes nothing at all.

    ``metrics.jsonl`` is the authoritative record. On resume from step N its rows after N (steps a killed run
    logged past its last checkpoint, which the resumed run replays) are dropped, so every step appears once; wandb
    cannot rewind, so a resumed wandb run keeps what it had and ignores replayed steps. ``metrics.csv`` is a view
    of ``metrics.jsonl``, rewritten from it whenever a new column appears, so no row is ever lost.
    """

    def __init__(self, run_dir: Path, backend: str | None = "none", config: dict | None = None, *,
                 mode: str = "offline", project: str = "large-batch", group: str | None = None,
                 name: str | None = None, run_id: str | None = None, resume_step: int | None = None):
        self.run_dir = run_dir
        self.jsonl = None
        self.csv_path = run_dir / "metrics.csv" if backend == "csv" else None
        self.csv_keys: list[str] = []
        self.wandb_run = None
        if backend is None:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            keep = [ln for ln in path.read_text().splitlines()
                    if ln.strip() and (resume_step is not None and json.loads(ln)["step"] <= resume_step)]
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)
        self.jsonl = open(path, "a")
        if self.csv_path is not None:
            self._rewrite_csv()
        if backend == "wandb":
            self._start_wandb(config, mode, project, group, name, run_id)

    def _start_wandb(self, config, mode, project, group, name, run_id):
        try:
            import wandb
            self.wandb_run = wandb.init(project=project, group=group, name=name, config=config, mode=mode,
                                        dir=str(self.run_dir), reinit="finish_previous", id=run_id,
                                        resume="allow" if run_id else None,
                                        settings=wandb.Settings(silent=True, console="off"))
        except Exception as e:
            self._warn(f"wandb could not start ({type(e).__name__}: {e}); logging to metrics.jsonl only")

    @property
    def wandb_id(self) -> str | None:
        return self.wandb_run.id if self.wandb_run is not None else None

    @staticmethod
    def _warn(msg: str) -> None:
        log.warning(f"warning: {msg}")

    def log(self, step: int, values: dict) -> None:
        if self.jsonl is None:
            return
        row = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
        self.jsonl.write(json.dumps(row) + "\n")
        self.jsonl.flush()
        if self.csv_path is not None:
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

    def per_layer(self, step: int, prefix: str, values: dict[str, float]) -> None:
        """One wandb metric per layer (``prefix/<parameter name>``); metrics.jsonl keeps the summary statistics."""
        if self.wandb_run is not None and values:
            try:
                self.wandb_run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)
            except Exception as e:
                self._warn(f"wandb per-layer log failed ({type(e).__name__}: {e})")

    def _log_csv(self, row: dict) -> None:
        if any(k not in self.csv_keys for k in row):
            self._rewrite_csv()  # a new column: the whole file again, from metrics.jsonl (which holds this row)
            return
        with open(self.csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.csv_keys).writerow(row)

    def _rewrite_csv(self) -> None:
        rows = [json.loads(ln) for ln in (self.run_dir / "metrics.jsonl").read_text().splitlines() if ln.strip()]
        self.csv_keys = list(dict.fromkeys(k for r in rows for k in r)) or ["step"]
        tmp = self.csv_path.with_name(".metrics.csv.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.csv_keys)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.csv_path)

    def mark_preempting(self) -> None:
        if self.wandb_run is not None:
            try:
                self.wandb_run.mark_preempting()
            except Exception as e:
                self._warn(f"wandb mark_preempting failed ({type(e).__name__}: {e})")

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
        if self.wandb_run is not None:
            try:
                self.wandb_run.finish(exit_code=exit_code)
            except Exception as e:
                self._warn(f"wandb.finish failed ({type(e).__name__}: {e})")
            self.wandb_run = None


class Progress:
    """A tqdm bar on a terminal; plain periodic lines when stdout is not one (CI logs, multirun)."""

    def __init__(self, total: int, initial: int = 0, every: int = 50, enabled: bool = True):
        self.total, self.initial, self.every, self.enabled = total, initial, every, enabled
        # the one-line estimate of the run's training time: timed over the steps after the first (whose one-time
        # set-up made it 3x too long), 1 % of the run, at least 3 steps and at most 20
        self.window = min(20, max(3, (total - initial) // 100))
        self.first_step_s = 0.0
        self.bar = None
        if enabled and sys.stdout.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True)

    def update(self, step: int, text: str, images_per_s: float = 0.0, train_time: float = 0.0) -> None:
        """``train_time``: seconds this process has trained so far. The ETA and the estimate leave the first step
        out (its one-time set-up made a run's estimate 3x too long)."""
        done = step - self.initial
        if done == 1:
            self.first_step_s = train_time
        rate = (train_time - self.first_step_s) / (done - 1) if done > 1 else train_time
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.enabled and (step % self.every == 0 or step == self.total):
            eta = f", ETA {_duration(rate * (self.total - step))}" if rate else ""
            say(f"step {step}/{self.total} {text}, {images_per_s:,.0f} images/s{eta}")
        if done == 1 + self.window and step < self.total and rate:
            steps = self.total - self.initial
            self.write(f"estimate: {_duration(rate * steps)} of training for {steps:,} steps at {rate:.3g} s/step "
                       f"(timed over steps {step - self.window + 1}-{step}; evaluation not included)")

    def write(self, text: str) -> None:
        if self.enabled:
            if self.bar is None:
                say(text)
                return
            from tqdm.contrib.logging import logging_redirect_tqdm
            with logging_redirect_tqdm(loggers=[logging.getLogger()]):  # above the bar, not through it
                say(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rest = divmod(seconds, 3600)
    m, s = divmod(rest, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"
