"""Checkpoints: what one holds, the only code that writes, reads and restores one, and the rules of a resume. The
live state they save is the run's (engine/run.py's RunState) and its schedule's (engine/schedule.py).

A checkpoint carries a format version and the run's identity (global batch, seed, optimizer, model, dataset);
a resume with another identity, or from another format, is refused with one line before anything is written.
Files are written atomically: a temporary file in the same folder, fsync, then rename over the old one, so a kill
at any moment leaves either the previous complete ``last.pt`` or the new one, never a torn file.
"""
from __future__ import annotations

import os
import random
import shutil
from pathlib import Path
from typing import NamedTuple

import torch

from .datasets import data_shape
from .distributed import unwrap
from .errors import ConfigError
from .models import check_model
from .records import RESUME_MAY_CHANGE, read_summary
from .seeds import rank_seed

FORMAT = 5  # 3: batch schedules (identity and state); 4: every rank's random generators (rng.ranks); 5: the
# schedule's state in one entry. Formats 2 to 4 load (migrate).
# What a resume must keep: the data order is a function of (seed, batch schedule), and the rest is the run itself.
# micro_batch, the number of ranks, threads, the logger and max_steps may change, except under batch_schedule=
# adaptive and scaling=adascale, whose decisions depend on gradients measured per micro-batch and rank.
IDENTITY = ("global_batch", "batch_schedule", "seed", "optimizer", "model", "dataset", "data")
# which images are trained on and evaluated: a resume that changed one would train on another set, or validate on
# images it trained on (data.root may change: paths differ between machines)
DATA_IDENTITY = ("train_size", "test_size", "val_split", "image_size", "channels", "shard_group")  # num_classes: the model's shape
MEASURED = ("micro_batch", "world_size")
RUN_FILES = ("checkpoints/last.pt", "summary.json", "metrics.jsonl")  # a folder with any of these holds a run


def identity(cfg, plan=None) -> dict:
    schedule = {k: v for k, v in cfg.batch_schedule.model_dump().items() if v is not None}
    ident = {"global_batch": cfg.batch, "batch_schedule": schedule, "seed": cfg.seed, "optimizer": cfg.optim.target,
             "model": cfg.model.name, "dataset": cfg.data.name,
             "data": {k: getattr(cfg.data, k) for k in DATA_IDENTITY if getattr(cfg.data, k) is not None}}
    if plan is not None:
        ident.update(micro_batch=plan.micro_batch, world_size=plan.world_size)
    return ident


def measured(cfg, plan) -> bool:
    """Whether the run's decisions depend on gradients measured per micro-batch and rank (or, with repeated
    augmentation, what each rank sees depends on the number of ranks)."""
    return plan.measures_noise or (cfg.data.repeated_aug or 0) > 1


def save_checkpoint(path: Path, *, state, schedule, model, optimizer, scaler, cfg, epoch: int, ema=None, plan=None,
                    rng: list | None = None) -> None:
    """Rank 0 writes the run (``state``: engine/run.py's RunState) and its schedule; ``rng`` is every rank's
    generators (gather_rng), rank 0's alone by default. ``state.improved``: best.pt too."""
    raw = unwrap(model)
    save_atomic({"format": FORMAT, "identity": identity(cfg, plan), "model": raw.state_dict(),
                 "schedule": schedule.state_dict(), "optimizer": optimizer.state_dict(),
                 "scaler": scaler.state_dict(), "step": schedule.step, "epoch": epoch, "images": schedule.images,
                 "rng": {"ranks": rng or [rng_state()]}, "wandb_id": state.wandb_id,
                 "best_val_acc": state.best_val_acc, "ema": ema.state_dict() if ema is not None else None,
                 "config": cfg.model_dump(mode="json", by_alias=True)}, path)
    if state.improved:  # best.pt: the same checkpoint, replaced atomically, and its weights for others
        tmp = path.with_name(f".best.pt.tmp-{os.getpid()}")
        shutil.copyfile(path, tmp)
        os.replace(tmp, path.with_name("best.pt"))
        export_weights(raw, path.with_name("best.safetensors"), ema)
        state.improved = False


def restore_checkpoint(ckpt: dict, *, state, schedule, model, optimizer, scaler, ema=None, rank: int = 0,
                       seed: int = 0, device=None) -> None:
    """The run as ``ckpt`` saved it (to_resume has refused a checkpoint without the EMA ema.enabled asks for)."""
    model.load_state_dict(ckpt["model"])
    configured = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    for group, settings in zip(optimizer.param_groups, configured, strict=True):
        group.update(settings)  # the command's optimizer settings apply (the resume line lists the changes)
    scaler.load_state_dict(ckpt["scaler"])
    ranks = ckpt["rng"]["ranks"]
    if rank < len(ranks):
        set_rng_state(ranks[rank], device)
    else:  # a resume onto more ranks than wrote the checkpoint: the new ranks start their own streams
        seed_rank(seed, rank, ckpt["step"])
    schedule.load_state_dict(ckpt["schedule"])
    state.wandb_id = ckpt.get("wandb_id")
    state.best_val_acc = ckpt.get("best_val_acc", -1.0)
    if ema is not None:
        ema.load_state_dict(ckpt["ema"])


class Resume(NamedTuple):
    ckpt: dict   # the checkpoint, migrated to this version's format
    path: Path   # the file it was read from


def to_resume(cfg, run_dir: Path, plan=None) -> Resume | None:
    """The checkpoint this run continues from (None for a fresh run), after every refusal: a run dir that already
    holds a run needs resume=auto; a checkpoint of another format or another run's identity is refused."""
    last = run_dir / "checkpoints" / "last.pt"
    check_record_paths(run_dir, cfg.logger.sinks)
    if cfg.eval_only:  # evaluates a checkpoint into a new run dir: none of the resume rules apply
        if cfg.resume in (None, "auto"):
            raise ConfigError(f"eval_only=true needs resume=PATH, the checkpoint to evaluate (got resume={cfg.resume})")
        ckpt = migrate(load(Path(cfg.resume)))
        if "config" not in ckpt or ckpt.get("format") != FORMAT:
            raise ConfigError(f"resume={cfg.resume}: this checkpoint does not record its settings (an older "
                              f"format), so eval_only cannot rebuild its model")
        if held := [f for f in RUN_FILES if (run_dir / f).exists()]:
            raise ConfigError(f"{run_dir} already holds a run ({held[0]}): choose a new hydra.run.dir for the "
                              f"evaluation")
        return None
    if cfg.resume is None:
        held = [f for f in RUN_FILES if (run_dir / f).exists()]
        if held:
            raise ConfigError(f"{run_dir} already holds a run ({held[0]}): pass resume=auto to continue it, or "
                              f"choose another hydra.run.dir")
        return None
    path = last if cfg.resume == "auto" else Path(cfg.resume)
    if cfg.resume == "auto" and not os.path.lexists(last):  # a link that leads nowhere is read, and refused
        return None
    check_link(path)
    held = [f for f in RUN_FILES if (run_dir / f).exists()]
    if held and path.resolve().parent.parent != run_dir.resolve():  # another run's checkpoint into this run
        raise ConfigError(f"resume={path} continues another run, and {run_dir} already holds one ({held[0]}): "
                          f"resume into an empty hydra.run.dir, or into that checkpoint's own run dir")
    ckpt = _HANDED.pop(_file_key(path), None) or migrate(load(path))
    check_resumable(ckpt, cfg, path, plan)
    check_same_model(ckpt, cfg, path)
    return Resume(ckpt, path)


_HANDED: dict[tuple, dict] = {}  # a checkpoint the preflight read, for the run in the same process


def hand_over(resume: Resume) -> None:
    """The preflight's checkpoint, kept for the run that follows in this process (train.py): a resume reads its
    checkpoint once. Keyed by the file's path, size and modification time, so a file changed since is read again."""
    _HANDED.clear()
    _HANDED[_file_key(resume.path)] = resume.ckpt


def _file_key(path: Path) -> tuple:
    try:
        stat = path.stat()
    except OSError:
        return (str(path),)
    return str(path.resolve()), stat.st_size, stat.st_mtime_ns


def record_paths(sinks: dict | None) -> dict[str, str]:
    """What a run writes in its folder, each a "file" or a "folder": its records, Hydra's log (train.py's job is
    named train) and each configured sink's own (``records`` in engine/sinks.py)."""
    from hydra.utils import get_class
    paths = {"checkpoints": "folder", ".hydra": "folder", "train.log": "file", "model.safetensors": "file",
             "model_ema.safetensors": "file", **{f: "file" for f in RUN_FILES}}
    for node in (sinks or {}).values():
        try:
            paths |= getattr(get_class(node["_target_"]), "records", {})
        except Exception:  # a sink that cannot be imported warns when the run starts, and logging goes on
            continue
    return paths


def check_record_paths(run_dir: Path, sinks: dict | None = None) -> None:
    """Each record path is absent or what the run writes there. A file where a folder goes (or the reverse), or
    a link to a device such as /dev/full or to nothing (a purged scratch folder), would make the run fail at its
    first save after training, lose its records with exit 0, or make resume=auto start over and overwrite them."""
    for name, kind in record_paths(sinks).items():
        path = run_dir / name
        if not os.path.lexists(path) or (path.is_file() if kind == "file" else path.is_dir()):
            continue
        if path.is_symlink():
            raise ConfigError(f"{path} is a link to {os.readlink(path)}, which is not a {kind} (deleted or "
                              f"purged?): the run's record is written there; restore it, or choose another "
                              f"hydra.run.dir")
        raise ConfigError(f"{path} is not a {kind}: the run's record is written there; move it away, or choose "
                          f"another hydra.run.dir")


def check_same_model(ckpt: dict, cfg, path) -> None:
    """The model this command builds holds the checkpoint's tensors, shape for shape (the identity names the
    model; model.width, data.num_classes or the image size change its shape), and EMA weights where ema.enabled
    asks for them: refused here, before any run dir or record is written."""
    shapes = check_model(cfg.model, *data_shape(cfg.data), cfg.data.name)
    stored = {k: tuple(v.shape) for k, v in ckpt["model"].items()}
    for name in sorted(set(shapes) | set(stored)):
        if shapes.get(name) != stored.get(name):
            raise ConfigError(f"resume={path}: the model differs from the checkpoint's ({name}: "
                              f"{_shape(stored.get(name))} in the checkpoint, {_shape(shapes.get(name))} now); "
                              f"model.*, data.num_classes or the image size changed: resume with the checkpoint's "
                              f"settings, or start a new run")
    if cfg.ema.enabled and ckpt.get("ema") is None:
        raise ConfigError(f"resume={path}: ema.enabled=true, but the checkpoint holds no EMA weights (the run was "
                          f"started without EMA): resume with ema.enabled=false, or start a new run")


def _shape(shape) -> str:
    return "absent" if shape is None else "x".join(map(str, shape)) or "a scalar"


def changed_settings(ckpt: dict, cfg) -> list[str]:
    """Settings a resume changes against the checkpoint's own (what may change and did, e.g. micro_batch, max_steps,
    or an LR a user raised by hand): said when the run resumes, so a change of course is on the record."""
    def flat(d: dict, prefix: str = "") -> dict:
        out = {}
        for k, v in d.items():
            out.update(flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
        return out
    if "config" not in ckpt:
        return []
    before, now = flat(ckpt["config"]), flat(cfg.model_dump(mode="json", by_alias=True))
    ignored = {"resume", "logger.run_name", "logger.group"}  # the resume itself, and names derived from the command
    return [f"{k} {before.get(k)} -> {now.get(k)}" for k in sorted(set(before) | set(now))
            if k not in ignored and before.get(k) != now.get(k)]


def already_done(run_dir: Path, ckpt: dict | None, plan) -> str | None:
    """Why resuming this run dir has nothing to do (finished with its result written, or diverged), or None: a run
    that trained to its end but was stopped or killed before its summary.json was written is resumed at its last
    step, which evaluates and writes the summary (train.py's finish_evaluation). Without a checkpoint
    (checkpoint.enabled=false, or killed before the first one) only the summary can say how the run ended: one
    that ended on its own is left alone; one stopped by a signal, or killed, starts again from step 0."""
    summary = read_summary(run_dir)
    if summary.get("diverged"):
        return f"{run_dir} diverged at step {summary.get('steps')}; nothing to resume (start a new run to retry)"
    if ckpt is None:
        if summary and not summary.get("stopped_by") and not summary.get("error"):
            return (f"{run_dir} ended at step {summary.get('steps')} and has no checkpoint to continue from; "
                    f"nothing to do (choose a new hydra.run.dir to train again)")
        return None
    written = summary.get("steps") == ckpt["step"] and not summary.get("stopped_by") and not summary.get("error")
    schedule = plan.schedule_class(plan)
    schedule.load_state_dict(ckpt["schedule"])
    if schedule.finished and written:
        of = f" of {plan.run_steps}" if schedule.fixed_batch else f", {ckpt.get('images', 0):,} images"
        return f"{run_dir} is finished (step {ckpt['step']}{of}); nothing to do"
    return None


def migrate(ckpt: dict) -> dict:
    """A format-2 checkpoint is a constant-batch run: it gains format 3's batch-schedule fields. A format-3 one
    holds rank 0's generators, its CUDA states one per visible GPU: rank 0 keeps the first (its own device). A
    format-4 one keeps the schedule's state in four entries, format 5 in one."""
    if ckpt.get("format") == 2 and isinstance(ckpt.get("identity"), dict):
        ckpt["identity"].setdefault("batch_schedule", {"name": "constant"})
        ckpt["format"] = 3
    if ckpt.get("format") == 3:
        old = ckpt.get("rng")
        if isinstance(old, dict) and "ranks" not in old:
            cuda = old.get("cuda")
            ckpt["rng"] = {"ranks": [{"torch": old["torch"], "python": old["python"],
                                      "cuda": cuda[0] if isinstance(cuda, (list, tuple)) and cuda else None}]}
        ckpt["format"] = 4
    if ckpt.get("format") == 4:
        batch_state = ckpt.pop("batch_state", None) or {}
        step = ckpt.get("step", 0)
        ckpt["schedule"] = {"step": step, "images": ckpt.get("images", 0),
                            "tau": batch_state.get("tau", float(step)), "batch": batch_state.get("batch"),
                            "gain": batch_state.get("gain", 1.0), "noise_scale": ckpt.pop("noise_scale", None) or {}}
        ckpt["format"] = 5
    return ckpt


def check_resumable(ckpt: dict, cfg, path, plan=None) -> None:
    """Refuse, with one line naming the setting and both values, a resume that would continue a different run."""
    ckpt = migrate(ckpt)
    if ckpt.get("format") != FORMAT:
        raise ConfigError(f"resume={path}: checkpoint format {ckpt.get('format', 1)} is not this version's "
                          f"({FORMAT}) and cannot be continued: start a new run, or resume with the version "
                          f"that wrote it")
    now_identity = identity(cfg, plan)
    keys = IDENTITY + (MEASURED if plan is not None and measured(cfg, plan) else ())
    for key in keys:
        then, now = ckpt["identity"].get(key), now_identity[key]
        if key == "data" and then is not None and then != now:
            field = next(k for k in DATA_IDENTITY if then.get(k) != now.get(k))
            raise ConfigError(f"resume={path}: data.{field} was {then.get(field)} in the checkpoint and is "
                              f"{now.get(field)} now; it changes which images the run trains on or evaluates, so "
                              f"a resume keeps it: start a new run dir to change it")
        if then is not None and then != now:
            setting = {"global_batch": "batch", "optimizer": "optim", "model": "model", "dataset": "data",
                       "world_size": "ranks"}.get(key, key)
            if key in MEASURED:
                raise ConfigError(f"resume={path}: {setting} was {then} in the checkpoint and is {now} now; under "
                                  f"batch_schedule=adaptive, scaling=adascale and data.repeated_aug the run depends "
                                  f"on the micro-batches and ranks, so a resume keeps both")
            raise ConfigError(f"resume={path}: {setting} was {then} in the checkpoint and is {now} now; a resume "
                              f"keeps {', '.join(IDENTITY)} ({', '.join(RESUME_MAY_CHANGE)} and the ranks may "
                              f"change): start a new run dir to change it")


def rng_state(device=None) -> dict:
    """This process's generators: CPU, Python's, and its own GPU's (only that one: a checkpoint must restore on a
    machine that sees fewer GPUs)."""
    cuda = device is not None and getattr(device, "type", None) == "cuda"
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state(device) if cuda else None}


def set_rng_state(state: dict, device=None) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if state.get("cuda") is not None and device is not None and getattr(device, "type", None) == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def seed_rank(seed: int, rank: int, step: int = 0) -> None:
    """Ranks >= 1 draw dropout, drop-path and the like from their own generators, seeded by (seed, rank, step); rank 0
    keeps the stream torch.manual_seed(seed) began, so a single process trains exactly as it always has."""
    if rank == 0:
        return
    own = rank_seed(seed, rank, step)
    torch.manual_seed(own)  # CPU and every CUDA generator of this process
    random.seed(own)


def export_weights(model: torch.nn.Module, path: Path, ema=None) -> None:
    """The weights alone as safetensors (the safetensors library), keys of the unwrapped model (no ``module.`` or
    ``_orig_mod.``), so that timm, torchvision or any code loads them with ``strict=True``; the EMA's beside them
    (``NAME_ema.safetensors``). Written atomically, as checkpoints are."""
    from safetensors.torch import save_file
    weights = [(path, unwrap(model))] + ([(path.with_name(f"{path.stem}_ema{path.suffix}"), ema.module)] if ema is not None
                                 else [])
    for target, module in weights:
        tensors = {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}  # no sharing
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        try:
            save_file(tensors, str(tmp))
            os.replace(tmp, target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise


def save_atomic(obj: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk or a kill mid-write leaves no partial file behind
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)


def check_link(path: Path) -> None:
    if path.is_symlink() and not path.exists():  # dangling, or a loop
        raise ConfigError(f"resume={path}: a link to {os.readlink(path)}, which leads to no file; the run dir is left "
                          f"as it is: restore the checkpoint, or resume=PATH from another one")


def load(path: Path, setting: str | None = "resume") -> dict:
    """A checkpoint train.py wrote; each refusal one line that names ``setting=path`` (or the path alone)."""
    check_link(path)
    name = f"{setting}={path}" if setting else str(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such checkpoint file") from None
    except Exception as e:
        raise ConfigError(f"{name}: not a readable checkpoint ({type(e).__name__}); use a checkpoints/last.pt "
                          f"written by train.py") from None
    missing = {"model", "optimizer", "step", "epoch"} - set(ckpt) if isinstance(ckpt, dict) else {"model"}
    if missing:
        raise ConfigError(f"{name}: checkpoint lacks {sorted(missing)}; use a checkpoints/last.pt written by "
                          f"train.py")
    return ckpt
