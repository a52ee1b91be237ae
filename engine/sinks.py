"""Where a run's numbers go besides metrics.jsonl: one class per sink, named by `_target_` in conf/logger/*.yaml.

A sink is built on rank 0 only, with the keywords of `Sink.__init__` plus its own YAML keys. Every method may be left
out; `RunLogger` (engine/metrics.py) calls what a sink has and drops a sink that raises, with one warning, so logging
never stops training. A user's own sink is its class plus one YAML file under conf/logger/ (tests/test_record.py).
"""
from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from .metrics import say
from .records import read_metrics


class Sink:
    """The interface, with do-nothing defaults. ``resume_step``: the step a resumed run restarts after (rows past it
    were logged by the killed run and are replayed); None for a fresh run. ``run_id``: what ``run_id`` returned in the
    run being resumed."""

    run_id: str | None = None  # kept in every checkpoint, so a resume continues the same remote run
    records: dict[str, str] = {}  # what it writes in the run dir, "file" or "folder": checked before the run starts

    def __init__(self, run_dir: Path, *, config: dict, name: str, group: str | None, resume_step: int | None,
                 run_id: str | None):
        self.run_dir = run_dir

    def log(self, step: int, row: dict) -> None: ...

    def histogram(self, step: int, name: str, values) -> None: ...

    def per_layer(self, step: int, prefix: str, values: dict[str, float]) -> None: ...

    def summary(self, values: dict) -> None: ...

    def mark_preempting(self) -> None: ...

    def finish(self, exit_code: int) -> None: ...


class WandbSink(Sink):
    """wandb (https://docs.wandb.ai): offline by default; ``mode=online`` streams, bounded by ``init_timeout``.
    wandb cannot rewind, so a resumed run keeps what it had and wandb ignores the replayed steps."""
    records = {"wandb": "folder"}

    def __init__(self, run_dir, *, config, name, group, resume_step, run_id, mode: str = "offline",
                 project: str = "large-batch", init_timeout: float = 30):
        super().__init__(run_dir, config=config, name=name, group=group, resume_step=resume_step, run_id=run_id)
        import wandb
        if mode == "online":
            say(f"wandb: connecting to the server (up to {init_timeout:g} s, logger.sinks.wandb.init_timeout)")
        self.wandb = wandb
        self.run = wandb.init(project=project, group=group, name=name, config=config, mode=mode, dir=str(run_dir),
                              reinit="finish_previous", id=run_id, resume="allow" if run_id else None,
                              settings=wandb.Settings(silent=True, console="off", init_timeout=init_timeout))
        self.run_id = self.run.id

    def log(self, step, row):
        self.run.log(row, step=step)

    def histogram(self, step, name, values):
        self.run.log({name: self.wandb.Histogram(values.detach().cpu().double().numpy())}, step=step)

    def per_layer(self, step, prefix, values):
        if values:
            self.run.log({f"{prefix}/{k}": v for k, v in values.items()}, step=step)

    def summary(self, values):
        for k, v in values.items():
            self.run.summary[k] = v

    def mark_preempting(self):
        self.run.mark_preempting()

    def finish(self, exit_code):
        self.run.finish(exit_code=exit_code)


class TensorBoardSink(Sink):
    """TensorBoard event files in ``<run dir>/tensorboard`` (torch.utils.tensorboard). On resume the writer purges
    the steps the killed run logged past its checkpoint (``purge_step``), so each step appears once."""
    records = {"tensorboard": "folder"}

    def __init__(self, run_dir, *, config, name, group, resume_step, run_id):
        super().__init__(run_dir, config=config, name=name, group=group, resume_step=resume_step, run_id=run_id)
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(run_dir / "tensorboard"),
                                    purge_step=resume_step + 1 if resume_step is not None else None)
        self.step = resume_step or 0
        if resume_step is None:
            self.writer.add_text("config", f"```\n{json.dumps(config, indent=2)}\n```")

    def log(self, step, row):
        self.step = step
        for k, v in row.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(k, v, step)

    def histogram(self, step, name, values):
        self.writer.add_histogram(name, values.detach().cpu().double(), step)

    def per_layer(self, step, prefix, values):
        for k, v in values.items():
            self.writer.add_scalar(f"{prefix}/{k}", v, step)

    def summary(self, values):
        for k, v in values.items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                self.writer.add_scalar(f"summary/{k}", v, self.step)
        self.writer.flush()

    def finish(self, exit_code):
        self.writer.close()


class CsvSink(Sink):
    """``metrics.csv``: a view of metrics.jsonl, rewritten from it whenever a new column appears, so no row is lost.
    Built after metrics.jsonl is cut back to the resume step, so it starts from the kept rows."""
    records = {"metrics.csv": "file"}

    def __init__(self, run_dir, *, config, name, group, resume_step, run_id):
        super().__init__(run_dir, config=config, name=name, group=group, resume_step=resume_step, run_id=run_id)
        self.path = run_dir / "metrics.csv"
        self.keys: list[str] = []
        self._rewrite()

    def log(self, step, row):
        row = {"step": step, **row}
        if any(k not in self.keys for k in row):
            self._rewrite()  # a new column: the whole file again, from metrics.jsonl (which holds this row)
            return
        with open(self.path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.keys).writerow(row)

    def _rewrite(self):
        rows = read_metrics(self.run_dir / "metrics.jsonl", warn=lambda message: None)  # RunLogger warns
        self.keys = list(dict.fromkeys(k for r in rows for k in r)) or ["step"]
        tmp = self.path.with_name(".metrics.csv.tmp")
        try:
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=self.keys)
                writer.writeheader()
                writer.writerows(rows)
            os.replace(tmp, self.path)
        except BaseException:
            tmp.unlink(missing_ok=True)  # no debris: the sink is dropped with one warning
            raise
