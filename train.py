"""Train a ResNet or ViT at any global batch: `python train.py optim=lars batch=32k`.

The whole story, top to bottom: compose the config (Hydra, conf/), type and range-check it (engine/config.py),
find the checkpoint to resume from (engine/checkpoint.py), build data -> plan (engine/plan.py: batch split, scaling
rule, the optimizer named by conf/optim's _target_, the LR schedule) -> model -> optimizer, run the loop
(engine/loop.py), and write summary.json. Bad input stops here with one line on stderr, before any work and before anything is written.
"""
from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
import warnings
from pathlib import Path


def interrupted(signum, frame) -> None:
    """Ctrl-C or a closed terminal outside the training steps (while torch loads, the data is read, or the result is
    reported): one line. The training steps and the final evaluation handle signals themselves (engine/loop.py's
    StopFlag)."""
    name = signal.Signals(signum).name
    print(f"interrupted ({name}) outside the training steps: what the run dir holds is kept; resume=auto continues "
          "from its last checkpoint, if it has one", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(128 + signum)  # not SystemExit: an import in progress may catch that and go on


EARLY_WARNING = []  # Slurm's time-limit warning (SIGUSR2) that came before the training steps


def warned_early(signum, frame) -> None:
    EARLY_WARNING.append(signal.Signals(signum).name)  # the loop stops after its first step, saves and requeues


if __name__ == "__main__":
    signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    signal.signal(signal.SIGUSR2, warned_early)

import hydra  # after the handler: importing torch takes seconds
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from engine import distributed, slurm
from engine.checkpoint import (
    already_done,
    changed_settings,
    export_weights,
    read_summary,
    restore_checkpoint,
    seed_rank,
    to_resume,
)
from engine.checkpoint import load as load_checkpoint
from engine.cli import fail, lock_run_dir, preflight
from engine.config import load_config
from engine.datasets import eval_split, load_data
from engine.diagnostics import noise_scale_for
from engine.ema import make_ema
from engine.errors import ConfigError, RunError
from engine.loop import EvaluationStopped, StopFlag, evaluate, fit, measure
from engine.metrics import ProgressBar, RunLogger, log, say
from engine.micro_batch import choose_micro_batch
from engine.models import build_model
from engine.optimizer_class import build_optimizer
from engine.plan import make_plan
from engine.plan_text import plural
from engine.run import Run, RunState
from engine.sweep import FAILED_JOBS, record_job_failure
from engine.warm_start import Match, warm_start


def train(cfg, run_dir: Path) -> dict:
    """One training run into ``run_dir``; returns the summary (also written to run_dir/summary.json)."""
    started = time.time()
    cfg = load_config(cfg)
    device = distributed.resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = distributed.init(device)
    if cfg.precision == "auto":
        cfg.precision = distributed.resolve_precision(cfg.precision, device)
        if dist.is_main:
            say(f"precision=auto: {cfg.precision}, as this {device.type} " + (
                "has bf16 units (precision=fp32 for full precision)" if cfg.precision == "bf16" else "has no bf16 units"))
    distributed.set_numerics(device, cfg.tf32, cfg.deterministic)
    cfg.resume = slurm.resume_mode(cfg.resume)
    if cfg.eval_only:
        return evaluate_checkpoint(cfg, run_dir, device, dist)
    data = load_data(cfg.data)
    plan = make_plan(cfg, data.train_size, dist.world_size)
    resume = to_resume(cfg, run_dir, plan)
    if (resume is not None or cfg.resume == "auto") and (done := already_done(run_dir, resume and resume.ckpt, plan)):
        if dist.is_main:
            say(done)  # a sweep re-run with resume=auto skips its finished and diverged jobs
        return read_summary(run_dir)
    if resume is None and cfg.resume == "auto" and (run_dir / "metrics.jsonl").exists() and dist.is_main:
        say(f"{run_dir} has no checkpoint (stopped before its first one, or checkpoint.enabled=false): it starts "
            f"again from step 0 and its metrics.jsonl starts over")

    run, warm = build_run(cfg, data, plan, resume, device, dist, run_dir)
    announce(run, resume, warm)
    with StopFlag() as late:  # a signal after the last step waits until the result is written
        try:
            fit(run, warned=bool(EARLY_WARNING))
            finish_evaluation(run)
        except EvaluationStopped as e:  # the final evaluation: its checkpoint is written; resume=auto evaluates
            run.state.stopped_by = e.signal_name
        finally:
            run.progress.close()
            summary = write_summary(run, started)
            run.logger.finish(exit_code=0 if not run.state.diverged and run.state.stopped_by is None else 1)
    report(run, summary)
    exit_if_signalled(run, late.signal_name)
    return summary


def build_run(cfg, data, plan, resume, device, dist, run_dir: Path) -> tuple[Run, Match | None]:
    """Everything one run holds, built in the order the seeds need: the model (and its warm start), optimizer,
    scaler, EMA and schedule, the checkpoint's state restored into them, the DDP/compiled wrapper, the logger
    (continuing the checkpoint's wandb run) and the progress bar. Also the warm start's match, for announce()."""
    torch.manual_seed(cfg.seed)
    model = build_model_on(cfg, data, device, sync_bn=dist.enabled and bool(cfg.model.sync_bn))
    warm = warm_start(model, cfg.model) if cfg.model.init is not None and resume is None else None
    optimizer = build_optimizer(model, plan.optimizer_cls, plan.optimizer_kwargs, plan.peak_lr, plan.weight_decay)
    seed_rank(cfg.seed, dist.rank)  # after the model: every rank builds the same one, then draws its own dropout
    scaler = torch.amp.GradScaler(device.type, enabled=cfg.precision == "fp16")
    ema = make_ema(model, cfg, plan)
    if cfg.micro_batch == "auto" and device.type == "cuda":  # on CPU, auto keeps the rule micro_batch=null uses
        plan = choose_micro_batch(plan, model, optimizer, data, cfg, device, dist)
    state, schedule = RunState(), plan.schedule_class(plan, noise_scale_for(plan.measures_noise, cfg.diagnostics))
    if resume is not None:
        restore_checkpoint(resume.ckpt, state=state, schedule=schedule, model=model, optimizer=optimizer,
                           scaler=scaler, ema=ema, rank=dist.rank, seed=cfg.seed, device=device)
    train_model = (distributed.wrap_ddp(model, distributed.static_graph_valid(plan.accum_steps, plan.batches.varies))
                   if dist.enabled else model)
    if cfg.compile:
        train_model = torch.compile(train_model, mode=cfg.compile_mode)
    logger = RunLogger(run_dir, cfg.logger.sinks if dist.is_main else None,
                       config=cfg.model_dump(mode="json", by_alias=True), group=cfg.logger.group,
                       name=cfg.logger.run_name or run_dir.name,
                       run_id=state.wandb_id, resume_step=schedule.step if resume is not None else None)
    state.wandb_id = logger.run_id or state.wandb_id  # kept in every checkpoint: a resume continues this run
    progress = ProgressBar(plan.run_steps, initial=schedule.step, enabled=dist.is_main)
    run = Run(train_model, optimizer, scaler, data.to(device), plan, schedule, cfg, device, dist, logger, progress,
              state, run_dir, ema)
    return run, warm


def exit_if_signalled(run: Run, late: str | None) -> None:
    """A run stopped by a signal exits 128 + its number, after its checkpoint and summary (resume=auto goes on); one
    warned of its time limit requeues itself first. ``late``: a signal after the last step, which waited."""
    stopped_by = run.state.stopped_by
    if stopped_by == "SIGUSR2":
        requeue_warned_job(run)
    if stopped_by is not None:
        sys.exit(128 + signal.Signals[stopped_by].value)
    if late is not None:
        if run.dist.is_main:
            say(f"{late} came after the last step: the final evaluation and summary.json were finished first")
        sys.exit(128 + signal.Signals[late].value)


def finish_evaluation(run: Run) -> None:
    """The final numbers of a run that trained to its end: the test split once (with data.val_split), and for a
    run resumed at its last step (stopped, or killed, while its result was being written) the evaluation again;
    then its final weights as model.safetensors (and model_ema.safetensors)."""
    state = run.state
    if state.stopped_by is not None or state.diverged:
        return
    if not state.last_eval:
        state.last_eval = measure(run, run.data, eval_split(run.cfg.data))
    if run.data.test_split is not None:  # read once, here: val_* selected, test_* reports
        state.test_eval = measure(run, run.data.test_split.to(run.device), "test")
        if run.dist.is_main:
            run.logger.log(run.schedule.step, state.test_eval)
    if run.dist.is_main:
        export_weights(run.model, run.run_dir / "model.safetensors", run.ema)


def requeue_warned_job(run: Run) -> None:
    """Near its time limit (SIGUSR2) a Slurm job requeues itself, after its checkpoint and summary are written;
    Slurm's SIGTERM to the requeued job is ignored from here on. Under Hydra's submitit launcher, submitit's own
    handler requeues (it counts hydra.launcher.max_num_timeout); from an sbatch script, ``scontrol requeue``, at most
    checkpoint.max_requeues times."""
    if not run.dist.is_main or not slurm.in_job():
        return
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    handler = signal.getsignal(signal.SIGUSR2)
    if slurm.submitit_job() and callable(handler):
        say("SIGUSR2: handing the requeue to submitit")
        handler(signal.SIGUSR2, None)  # requeues and exits, or raises when max_num_timeout is spent
    else:
        say(f"SIGUSR2: {slurm.requeue(run.cfg.checkpoint.max_requeues)}")


def build_model_on(cfg, data, device, sync_bn: bool = False) -> torch.nn.Module:
    model = build_model(cfg.model, data.image_shape, data.num_classes).to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    return torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) if sync_bn else model


def announce(run: Run, resume, warm: Match | None = None) -> None:
    if not run.dist.is_main:
        return
    data, cfg = run.data, run.cfg
    numerics = f", tf32 {'on' if cfg.tf32 else 'off'}" if run.device.type == "cuda" else ""
    splits = (f"{len(data.test_y)} val / {len(data.test_split.test_y)} test" if data.test_split is not None
              else f"{len(data.test_y)} test")
    say(f"data: {data.source} ({data.train_size} train / {splits}, {data.image_shape}), "
        f"device {run.device}, {cfg.precision}{numerics}" + (", deterministic" if cfg.deterministic else ""))
    say(run.plan.describe())
    say(param_groups_line(run.optimizer))
    if warm is not None:
        say(warm.describe(cfg.model.init))
    if run.ema is not None:
        say(f"      EMA of the weights: decay {run.ema.decay:.6g} every {cfg.ema.every_steps} steps (ema.decay "
            f"{cfg.ema.decay:g} x batch {run.plan.global_batch} x {cfg.ema.every_steps} / {cfg.epochs:g} epochs)")
    if resume is not None:
        say(f"resuming from step {run.schedule.step} of {run.plan.run_steps} ({resume.path})")
        if changed := changed_settings(resume.ckpt, cfg):
            say(f"      changed since that checkpoint: {', '.join(changed)}")
        if cfg.model.init is not None:
            say(f"      model.init={cfg.model.init} is not loaded: a resume keeps its own weights")


def param_groups_line(optimizer) -> str:
    """What the param groups hold: weight decay (and LARS/LAMB's trust ratio) on weights, none on biases, norms and
    the model's own no_weight_decay() names."""
    def count(groups) -> str:
        params = [p for g in groups for p in g["params"]]
        return f"{plural(len(params), 'tensor')} ({sum(p.numel() for p in params):,} elements)"
    decayed = [g for g in optimizer.param_groups if g.get("weight_decay", 0) > 0]
    others = [g for g in optimizer.param_groups if not g.get("weight_decay", 0) > 0]
    return (f"      param groups: weight decay {decayed[0]['weight_decay']:g} on {count(decayed)}, none on "
            f"{count(others)} (biases, norms, no_weight_decay())" if decayed and others else
            f"      param groups: one, {count(optimizer.param_groups)}, weight decay "
            f"{optimizer.param_groups[0].get('weight_decay', 0):g}")


def report(run: Run, summary: dict) -> None:
    state = run.state
    if not run.dist.is_main:
        return
    if state.stopped_by is not None:
        status = f"stopped by {state.stopped_by} at step {run.schedule.step}" + (
            " (resume=auto continues)" if run.cfg.checkpoint.enabled else " (no checkpoint: checkpoint.enabled=false)")
    elif state.diverged:
        status = f"DIVERGED at step {run.schedule.step}"
    else:
        status = f"final test accuracy {summary['test_acc']:.4f}" + (
            f" (validation {summary['val_acc']:.4f})" if summary["val_acc"] is not None else "")
    say(f"{status} ({plural(summary['steps'], 'step')}, {summary['wall_s']:.0f} s, "
        f"{summary['images_per_s']:.0f} images/s) -> {run.run_dir}")


def evaluate_checkpoint(cfg, run_dir: Path, device, dist) -> dict:
    """eval_only=true resume=PATH: the checkpoint's model (and EMA) with the model and data settings stored in it
    (data.root from the command line where given: paths differ between machines); a summary in this run dir."""
    path = Path(cfg.resume)
    ckpt = load_checkpoint(path)
    stored = load_config(ckpt["config"])
    if cfg.data.root is not None:
        stored.data.root = cfg.data.root
    stored.channels_last, stored.precision = cfg.channels_last, cfg.precision
    stored.data.val_split = 0  # evaluate on the test split
    data = load_data(stored.data)
    model = build_model_on(stored, data, device)
    model.load_state_dict(ckpt["model"])
    data = data.to(device)
    models = {"": model}
    if ckpt.get("ema") is not None:
        models["_ema"] = torch.optim.swa_utils.AveragedModel(model, use_buffers=True)
        models["_ema"].load_state_dict(ckpt["ema"])
    summary = {f"test_{k}{suffix}": v for suffix, m in models.items()
               for k, v in evaluate(m, data, device, cfg.precision, dist, cfg.channels_last,
                                    bool(stored.data.eval_hflip)).items()}
    summary |= {"checkpoint": str(path), "steps": ckpt["step"], "global_batch": ckpt["identity"]["global_batch"]}
    if dist.is_main:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        say(f"evaluated {path} (step {ckpt['step']}): test accuracy {summary['test_acc']:.4f}"
            + (f", EMA {summary['test_acc_ema']:.4f}" if "test_acc_ema" in summary else "") + f" -> {run_dir}")
    return summary


def write_summary(run: Run, started: float) -> dict:
    state, plan, schedule = run.state, run.plan, run.schedule
    summary = {**state.last_eval, **state.test_eval, "train_loss": state.train_loss,
               "epochs": schedule.epoch, "steps": schedule.step, "images": schedule.images,
               "global_batch": plan.global_batch, "batch_schedule": run.cfg.batch_schedule.name,
               "micro_batch": plan.micro_batch, "accum_steps": plan.accum_steps, "world_size": plan.world_size,
               "peak_lr": plan.peak_lr, "base_lr": plan.base_lr, "scaling_rule": plan.rule,
               "optimizer": plan.optimizer_name, "diverged": state.diverged, "stopped_by": state.stopped_by,
               "noise_scale_b_simple": schedule.noise_scale.b_simple, "wall_s": time.time() - started,
               "images_per_s": state.images_per_s}  # steady state: each process's first step left out
    summary.update(schedule.record())
    if run.device.type == "cuda":
        summary["cuda_peak_mb"] = torch.cuda.max_memory_allocated(run.device) / 2**20
    summary = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
    summary.setdefault("val_acc", None)
    summary.setdefault("val_loss", None)
    if run.dist.is_main:
        (run.run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
        run.logger.summary(summary)
    return summary


# conf/hydra/launcher/submitit_slurm.yaml and ray.yaml take the plugins' names; Hydra checks each against the
# plugin's schema of that name, as wanted, and warns that it does so
warnings.filterwarnings("ignore", message=r"\s*.hydra/launcher/(submitit_slurm|ray). is validated against ConfigStore "
                                          r"schema")


def single_run_name(run_dir: Path) -> str:
    """What the command line changed, and the run dir's name (a time, or the user's own name for it)."""
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("resume=")]
    return f"{' '.join(overrides) or 'defaults'} ({run_dir.name})"


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    with open_dict(cfg):  # one logger group per sweep: its folder; each job is named by its own folder
        if multirun and not cfg.logger.get("group"):
            cfg.logger.group = Path(HydraConfig.get().sweep.dir).name
        if not cfg.logger.get("run_name"):
            cfg.logger.run_name = run_dir.name if multirun else single_run_name(run_dir)
    try:
        if multirun and distributed.env_rank() == 0:
            lock_run_dir(run_dir)  # a single run's folder is locked in the preflight; a sweep's job's here
        summary = train(cfg, run_dir)
    except (ConfigError, RunError) as e:
        if not multirun:
            log.error(f"error: {e}")
            sys.exit(2 if isinstance(e, ConfigError) else 1)
        summary = record_job_failure(run_dir, str(e), refused=isinstance(e, ConfigError))
    except Exception as e:  # in a sweep one failing job must not stop the others
        if not multirun:
            raise
        summary = record_job_failure(run_dir, f"{type(e).__name__}: {e}")
    finally:
        distributed.cleanup()
    if not multirun and summary.get("diverged"):
        sys.exit(1)  # after the summary is written: a diverged run is a result, but not a successful one
    acc = summary.get("val_acc")
    return acc if isinstance(acc, float) and math.isfinite(acc) else float("nan")  # what an optuna sweep maximizes


if __name__ == "__main__":
    try:
        if ((distributed.env_world_size() > 1 or slurm.in_job()) and "-m" not in sys.argv
                and not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:])):
            sys.argv.append(f"hydra.run.dir={distributed.shared_run_dir()}")  # one folder for all ranks and requeues
    except ConfigError as e:
        fail(str(e))
    sys.argv[1:] = preflight(sys.argv[1:], conf_dir=Path(__file__).resolve().parent / "conf")
    main()
    if failed := FAILED_JOBS.report():
        print(f"error: {failed}", file=sys.stderr)
        sys.exit(1)
