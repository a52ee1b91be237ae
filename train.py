"""Train a ResNet or ViT at any global batch: `python train.py optim=lars batch=32k`.

The whole story, top to bottom: compose the config (Hydra, conf/), check it, build data -> model -> optimizer ->
LR schedule from the plan (engine/plan.py: batch split and scaling rule), run the loop (engine/loop.py), and
write summary.json. Bad input stops here with one line on stderr, before any work and before anything is written.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from engine import checkpoint, distributed
from engine.cli import fail, preflight
from engine.config import ConfigError, register_schema, reject_unknown_keys, validate_values
from engine.data import load_data
from engine.loop import fit
from engine.metrics import Progress, RunLogger
from engine.models import build_model
from engine.plan import make_plan
from optim import create_optimizer, param_groups

register_schema()


def train(cfg: DictConfig, run_dir: Path) -> dict:
    """One training run into ``run_dir``; returns the summary (also written to run_dir/summary.json)."""
    started = time.time()
    reject_unknown_keys(cfg)
    cfg = OmegaConf.to_object(cfg)  # typed dataclasses: enums and ints, no more interpolation
    validate_values(cfg)
    device = distributed.resolve_device(cfg.device.value)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    dist = distributed.init(device.type)
    last = run_dir / "checkpoints" / "last.pt"
    if cfg.resume is None and last.exists():
        raise ConfigError(f"{run_dir} already holds a run (checkpoints/last.pt): pass resume=auto to continue it, "
                          f"or choose another hydra.run.dir")
    resume_from = None
    if cfg.resume == "auto" and last.exists():
        resume_from = checkpoint.load(last)
    elif cfg.resume not in (None, "auto"):
        resume_from = checkpoint.load(Path(cfg.resume))

    data = load_data(cfg.data)
    plan = make_plan(cfg, data.train_size, dist.world_size)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, data.image_shape, data.num_classes)
    if resume_from is not None:
        model.load_state_dict(resume_from["model"])
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    if dist.enabled and cfg.model.sync_bn:
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    data = data.to(device)

    o = cfg.optim
    optimizer = create_optimizer(o.name.value, param_groups(model, o.weight_decay), lr=plan.peak_lr,
                                 momentum=o.momentum, nesterov=o.nesterov, betas=plan.betas, eps=plan.eps, eta=o.eta,
                                 trust_clip=o.trust_clip, trust_bounds=o.trust_bounds, variant=o.variant,
                                 bias_correction=o.bias_correction, lr_in_momentum=o.lr_in_momentum)
    scaler = torch.amp.GradScaler(device.type) if cfg.precision.value == "fp16" else None
    if resume_from is not None:
        optimizer.load_state_dict(resume_from["optimizer"])
        if scaler is not None and resume_from.get("scaler"):
            scaler.load_state_dict(resume_from["scaler"])
        checkpoint.set_rng_state(resume_from["rng"])
    train_model = torch.nn.parallel.DistributedDataParallel(model) if dist.enabled else model
    if cfg.compile:
        train_model = torch.compile(train_model)

    if dist.is_main:
        print(f"data: {data.source} ({data.train_size} train / {len(data.test_y)} test, {data.image_shape}), "
              f"device {device}, {cfg.precision.value}", flush=True)
        print(plan.describe(o.name.value), flush=True)
    logger = RunLogger(run_dir, cfg.logger.name.value if dist.is_main else None,
                       config=OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True, enum_to_str=True),
                       mode=cfg.logger.mode, project=cfg.logger.project, group=cfg.logger.group,
                       name=run_dir.name)
    progress = Progress(plan.run_steps, initial=resume_from["step"] if resume_from else 0, enabled=dist.is_main)
    state = None
    try:
        state = fit(model=train_model, optimizer=optimizer, data=data, plan=plan, cfg=cfg, device=device,
                    run_dir=run_dir, logger=logger, dist=dist, progress=progress, resume_from=resume_from,
                    scaler=scaler)
    finally:
        progress.close()
        summary = None
        if state is not None:
            summary = {**state.last_eval, "train_loss": state.train_loss, "epochs": state.step / plan.steps_per_epoch,
                       "steps": state.step, "global_batch": plan.global_batch, "micro_batch": plan.micro_batch,
                       "accum_steps": plan.accum_steps, "world_size": plan.world_size, "peak_lr": plan.peak_lr,
                       "base_lr": plan.base_lr, "scaling_rule": plan.rule, "optimizer": o.name.value,
                       "diverged": state.diverged, "stopped_by": state.stopped_by,
                       "noise_scale_b_simple": state.noise_scale.b_simple,
                       "wall_s": time.time() - started,
                       "images_per_s": state.images / state.train_time if state.train_time else 0.0}
            if device.type == "cuda":
                summary["cuda_peak_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            summary = {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()}
            summary.setdefault("val_acc", None)
            summary.setdefault("val_loss", None)
            if dist.is_main:
                (run_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
                logger.summary(summary)
        logger.finish(exit_code=0 if state is not None and not state.diverged else 1)
    if dist.is_main:
        if state.stopped_by is not None:
            status = f"stopped by {state.stopped_by} at step {state.step} (resume=auto continues)"
        elif state.diverged:
            status = f"DIVERGED at step {state.step}"
        else:
            status = f"final test accuracy {summary['val_acc']:.4f}"
        print(f"{status} ({summary['steps']} steps, {summary['wall_s']:.0f} s, "
              f"{summary['images_per_s']:.0f} images/s) -> {run_dir}", flush=True)
    if state.stopped_by is not None:
        sys.exit(128 + {"SIGTERM": 15, "SIGINT": 2}[state.stopped_by])  # checkpoint is saved; resume=auto goes on
    return summary


@hydra.main(version_base=None, config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        summary = train(cfg, run_dir)
    except ConfigError as e:
        if not multirun:
            fail(str(e))
        summary = {"error": str(e), "diverged": False}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"error: {e}", file=sys.stderr)
    except Exception as e:  # in a sweep one failing job must not stop the others
        if not multirun:
            raise
        summary = {"error": f"{type(e).__name__}: {e}", "diverged": False}
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        print(f"error in job {run_dir}: {summary['error']}", file=sys.stderr)
    finally:
        distributed.cleanup()
    acc = summary.get("val_acc")
    return acc if isinstance(acc, float) and math.isfinite(acc) else float("nan")  # what an optuna sweep maximizes


if __name__ == "__main__":
    if distributed.env_world_size() > 1 and not any(a.startswith("hydra.run.dir=") for a in sys.argv[1:]):
        sys.argv.append(f"hydra.run.dir={distributed.shared_run_dir()}")
    preflight(sys.argv[1:])
    main()
