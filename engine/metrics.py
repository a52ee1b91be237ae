"""The run's own lines (say, log, ProgressBar) and its numbers: metrics.jsonl always (rank 0), plus the sinks of
engine/sinks.py that conf/logger/ names. Logging never kills training: a sink that fails is dropped with one warning.
"""
from __future__ import annotations

import json
import logging
import math
import os
import sys
from pathlib import Path

from hydra.utils import get_class

from .records import read_metrics

# The run's own lines (plan, progress, evaluations, warnings): Hydra's job logging sends them to the console and
# to the run dir's train.log (conf/hydra/job_logging/run_log.yaml).
log = logging.getLogger("train")


class BelowWarning(logging.Filter):
    """stdout gets info; warnings and errors go to stderr alone."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < logging.WARNING


def say(text: str) -> None:
    log.info(text)


def _jsonable(v):
    if hasattr(v, "item"):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the information as text
    return v


class RunLogger:
    """``metrics.jsonl`` on rank 0, the authoritative record, plus the sinks conf/logger/ names (engine/sinks.py).
    ``sinks=None`` (ranks other than 0) writes nothing at all.

    On resume from step N the rows after N (steps a killed run logged past its last checkpoint, which the resumed run
    replays) are dropped from metrics.jsonl, so every step appears once. A sink that fails to start or to write is
    dropped with one warning: logging never stops training.
    """

    def __init__(self, run_dir: Path, sinks: dict[str, dict] | None, *, config: dict | None = None,
                 name: str = "", group: str | None = None, run_id: str | None = None,
                 resume_step: int | None = None):
        self.run_dir = run_dir
        self.jsonl = None
        self.sinks: dict[str, object] = {}
        if sinks is None:
            return
        path = run_dir / "metrics.jsonl"
        if path.exists():
            keep = self._rows_through(path, resume_step) if resume_step is not None else []
            tmp = path.with_name(".metrics.jsonl.tmp")
            tmp.write_text("".join(ln + "\n" for ln in keep))
            os.replace(tmp, path)
        self.jsonl = open(path, "a")
        common = dict(config=config or {}, name=name, group=group, resume_step=resume_step, run_id=run_id)
        for key, node in sinks.items():
            own = {k: v for k, v in node.items() if k != "_target_"}
            try:
                self.sinks[key] = get_class(node["_target_"])(run_dir, **common, **own)
            except Exception as e:
                self._warn(f"{key} could not start ({type(e).__name__}: {e}); logging goes on without it")

    def _rows_through(self, path: Path, step: int) -> list[str]:
        """The rows of ``path`` up to ``step``, as lines. A torn last line (a kill or a full disk mid-write) is
        dropped with a warning; a damaged line before it is one error naming it (engine/records.py)."""
        return [json.dumps(row) for row in read_metrics(path, warn=self._warn) if row.get("step", 0) <= step]

    @property
    def run_id(self) -> str | None:
        """The first sink's remote run id (wandb's), kept in checkpoints so that a resume continues that run."""
        return next((s.run_id for s in self.sinks.values() if getattr(s, "run_id", None)), None)

    @staticmethod
    def _warn(msg: str) -> None:
        log.warning(f"warning: {msg}")

    def _each(self, method: str, *args) -> None:
        for key, sink in list(self.sinks.items()):
            call = getattr(sink, method, None)
            if call is None:
                continue
            try:
                call(*args)
            except Exception as e:
                self._warn(f"{key}: {method} failed ({type(e).__name__}: {e}); continuing without it")
                del self.sinks[key]

    def log(self, step: int, values: dict) -> None:
        if self.jsonl is None:
            return
        row = {k: _jsonable(v) for k, v in values.items()}
        self._reopen_if_gone(step)
        self.jsonl.write(json.dumps({"step": step, **row}) + "\n")
        self.jsonl.flush()
        self._each("log", step, row)

    def _reopen_if_gone(self, step: int) -> None:
        """metrics.jsonl deleted (or moved away) under a running run: writing on to the unlinked file would lose every
        row without a word. One warning, and a new file from this step."""
        path = self.run_dir / "metrics.jsonl"
        try:
            here = os.path.samestat(os.fstat(self.jsonl.fileno()), os.stat(path))
        except FileNotFoundError:
            here = False
        if not here:
            self._warn(f"{path} was deleted or moved during the run; its earlier rows are not in the new "
                       f"metrics.jsonl, which starts at step {step}")
            self.jsonl.close()
            self.jsonl = open(path, "a")

    def histogram(self, step: int, name: str, values) -> None:
        """Per-layer values as a histogram (metrics.jsonl gets their summary statistics instead)."""
        self._each("histogram", step, name, values)

    def per_layer(self, step: int, prefix: str, values: dict[str, float]) -> None:
        """One series per layer (``prefix/<parameter name>``); metrics.jsonl keeps the summary statistics."""
        self._each("per_layer", step, prefix, values)

    def mark_preempting(self) -> None:
        self._each("mark_preempting")

    def summary(self, values: dict) -> None:
        self._each("summary", {k: _jsonable(v) for k, v in values.items()})

    def finish(self, exit_code: int = 0) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        self._each("finish", exit_code)
        self.sinks = {}


class ProgressBar:
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
