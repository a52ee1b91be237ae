"""Command-line checks that run before Hydra starts a job: bad input is one line on stderr and exit code 2,
before any run dir exists, so nothing is created or overwritten."""
from __future__ import annotations

import copy
import difflib
import errno
import fcntl
import itertools
import os
import re
import shutil
import sys
import time
from pathlib import Path
from typing import NamedTuple

from hydra import compose, initialize_config_dir
from hydra._internal.utils import get_args_parser
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import OverrideType
from omegaconf import DictConfig, OmegaConf, open_dict

from . import slurm
from .checkpoint import RUN_FILES, already_done, hand_over, to_resume
from .checkpoint import load as load_checkpoint
from .compose import CONF_DIR
from .config import load_config
from .datasets import check_data_available, data_shape, train_size_of
from .distributed import env_rank, env_world_size, resolve_device, torchrun_problem
from .errors import ConfigError
from .models import check_model
from .plan import make_plan
from .records import RESUME_MAY_CHANGE, forget_job_folders, job_identity
from .warm_start import check_init


def fail(message: str) -> None:
    """One line on stderr and exit 2. Under torchrun or srun every rank runs the same checks: only rank 0 prints,
    so the line appears once, before the launcher's own report of the failed workers."""
    if env_rank() == 0:
        print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(2)


def group_options(group: str, conf_dir: Path = CONF_DIR, *more_dirs: Path) -> list[str]:
    folders = [d / group for d in (conf_dir, *more_dirs)]
    return sorted({p.stem for f in folders if f.is_dir() for p in f.glob("*.yaml")})


_NOT_IN_STRUCT = re.compile(r"Could not override '([\w.]+)'")


def _unknown_key(exc: Exception, overrides: list[str]) -> str | None:
    """Hydra's 'Could not override X ... not in struct' as one line, with a did-you-mean from the keys the
    selected options do have."""
    m = _NOT_IN_STRUCT.search(str(exc))
    if m is None:
        return None
    key = m.group(1)
    parent, _, leaf = key.rpartition(".")
    try:
        cfg = compose("config", overrides=[o for o in overrides if not o.startswith(f"{key}=")])
        node = OmegaConf.select(cfg, parent) if parent else cfg
        known = [str(k) for k in node.keys()] if node is not None else []
    except Exception:
        known = []
    close = difflib.get_close_matches(leaf, known, n=1)
    hint = f" (did you mean {'.'.join(filter(None, [parent, close[0]]))}?)" if close else ""
    where = f"'{parent}' as selected" if parent else "the config"
    advice = (f"a keyword of the optimizer class that its file lacks is added with +{key}=VALUE"
              if parent == "optim" else "the settings of each option are the keys of its file in conf/")
    return f"{key} is not a setting of {where}{hint}: {advice}"


def condense(exc: Exception) -> str:
    """Hydra and OmegaConf errors span many lines (search paths, hints) and hide the reason in their cause;
    keep the lines that say what is wrong, the cause's first."""
    text = str(exc)
    if exc.__cause__ is not None:
        text = f"{exc.__cause__}\n{text}"
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    keep = []
    for ln in lines:
        if ln.startswith(("Config search path", "provider=", "Set the environment", "object_type=",
                          "reference_type=", "To append", "child_node", "ref_type", "parent_node")):
            continue
        if ln.startswith(("full_key:",)):
            keep.append(f"({ln})")
            continue
        keep.append(ln)
    return " ".join(keep)[:600] or type(exc).__name__


def _jobs(args: list[str]) -> list[list[str]] | None:
    """The override lists of every job the command line describes (a sweep expands to its grid)."""
    parsed = OverridesParser.create().parse_overrides(args)
    choices = []
    for o in parsed:
        key = o.get_key_element()
        if o.is_sweep_override():
            if o.is_discrete_sweep():
                choices.append([f"{key}={v}" for v in o.sweep_string_iterator()])
            else:
                return None  # range/interval sweeps (optuna): each job is checked when it starts
        else:
            choices.append([o.input_line])
    return [list(j) for j in itertools.product(*choices)]


def check_grammar(overrides: list[str]) -> None:
    """An override Hydra's grammar cannot read is one line that says how to write it."""
    parser = OverridesParser.create()
    for o in overrides:
        if not o.strip():
            fail(f"an argument is empty ({o!r}): an unset shell variable, or a stray pair of quotes? Give key=value, "
                 f"or leave the argument out")
        try:
            parser.parse_overrides([o])
        except Exception:
            key, _, value = o.partition("=")
            fixed = f"{key}={hydra_quoted(value)}" if value[:1] not in "'\"" else o
            fail(f"{o}: Hydra's grammar reads this value only in quotes (it holds '=', ',', a space, a bracket or a "
                 f"non-ASCII character): write \"{fixed}\" (https://hydra.cc/docs/advanced/override_grammar/basic/)")


def sweep_overrides(args: list[str]) -> list[str]:
    """The overrides that list several values (a sweep), as Hydra's grammar reads them."""
    return [o for o in args if o not in _fixed([o])]


def _fixed(args: list[str]) -> list[str]:
    """The overrides that are not sweeps."""
    return [o.input_line for o in OverridesParser.create().parse_overrides(args) if not o.is_sweep_override()]


def _library_hint(name: str) -> str:
    """model=convnext_tiny: the library that has it, as the setting that builds it."""
    from .models import LIBRARIES, library_models
    for library in LIBRARIES:
        if name in library_models(library):
            return f" (it is a {library} model: model={library} model.name={name})"
    return " (or any timm or torchvision model: model=timm model.name=NAME)"


def _check_group_options(args: list[str], conf_dirs: list[Path]) -> None:
    for a in args:
        key, _, value = a.partition("=")
        key = key.lstrip("+~")
        if "." in key or not value or not any((d / key).is_dir() for d in conf_dirs):
            continue
        options = group_options(key, *conf_dirs)
        for v in value.strip("[]").split(","):  # a sweep (a,b) or a list of options merged into one ([a,b])
            if v not in options and v != "null":
                fail(f"{key}={v} is not an option of '{key}': choose one of {', '.join(options)}"
                     + (_library_hint(v) if key == "model" else ""))


def check_threads(threads: int | None) -> None:
    """More threads than this process may run on is a 100x slowdown from oversubscription, not a speedup."""
    allowed = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    if threads is not None and threads > allowed:
        raise ConfigError(f"threads={threads} is more than the {allowed} CPUs this process may use: use 1..{allowed} "
                          f"(or null = all of them)")


_LOCKS = []  # open lock files: held for the life of the process


def _release_locks_in_child() -> None:
    """A forked child (a DataLoader worker) shares the lock's open file: it closes its copy, so a run killed with
    SIGKILL frees its folder at once, not when its orphaned workers notice and exit."""
    for handle in _LOCKS:
        handle.close()
    _LOCKS.clear()


os.register_at_fork(after_in_child=_release_locks_in_child)


def check_writable(folder: Path, setting: str) -> Path:
    """The folder, or the nearest parent that exists (returned), is writable by this process."""
    existing = next(p for p in [folder, *folder.parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"{setting}={folder}: {existing} is not writable; choose a folder you can write to")
    return existing


def lock_run_dir(run_dir: Path) -> None:
    """One run per folder: a second run started into a folder another process is using is refused. Also
    refuses a folder (or the nearest existing parent) this process cannot write to, and removes checkpoint
    temporaries a killed run left behind."""
    if run_dir.is_symlink() and not run_dir.exists():
        raise ConfigError(f"hydra.run.dir={run_dir} is a link to {os.readlink(run_dir)}, which does not exist (a "
                          f"purged scratch folder?): create it, or choose another hydra.run.dir")
    existing = check_writable(run_dir, "hydra.run.dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        handle = open(run_dir / ".lock", "a")  # not "w": the holder's pid stays until the lock is ours
    except OSError as e:
        raise ConfigError(f"hydra.run.dir={run_dir}: cannot write there ({e.strerror})") from None
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise ConfigError(f"hydra.run.dir={run_dir} is in use by another running train.py; wait for it, or "
                              f"choose another folder") from None
        raise
    try:  # a few bytes on disk now: a full disk is this one line, not Hydra's traceback writing .hydra/
        handle.truncate(0)
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        os.fsync(handle.fileno())
    except OSError as e:
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        if existing != run_dir:  # this call made the folder: leave nothing behind
            handle.close()
            shutil.rmtree(existing / run_dir.relative_to(existing).parts[0], ignore_errors=True)
        raise ConfigError(f"hydra.run.dir={run_dir}: cannot write there ({why}); free space or choose another "
                          f"folder") from None
    _LOCKS.append(handle)
    for stale in (run_dir / "checkpoints").glob(".*.tmp-*"):
        stale.unlink(missing_ok=True)


def check_sweep_dir(sweep_dir: str | None) -> None:
    """A sweep launched again into a folder whose jobs hold runs, without resume=auto, is refused before any job
    starts, whatever the launcher (otherwise each job would refuse inside itself, next to a finished run)."""
    if sweep_dir is None or "${" in sweep_dir or not Path(sweep_dir).is_dir():
        return
    root = Path(sweep_dir)
    held = sorted(p for f in RUN_FILES for p in root.glob(f"*/{f}"))
    if held:
        raise ConfigError(f"hydra.sweep.dir={sweep_dir} already holds the runs of a sweep ({held[0]}): pass "
                          f"resume=auto to continue its jobs, or choose another hydra.sweep.dir")


class Command(NamedTuple):
    """What ``python train.py ARGV`` asks of Hydra, read by Hydra's own argument parser."""
    overrides: list[str]     # the job's own (a sweep's a,b lists included)
    hydra: list[str]         # hydra.* and hydra/* overrides
    config_name: str
    config_dirs: list[Path]  # conf/, then --config-dir's (searched by Hydra too)
    multirun: bool
    info_only: bool          # --help, --cfg, --info ...: Hydra prints and runs nothing


def read_command(argv: list[str], conf_dir: Path = CONF_DIR) -> Command:
    args = get_args_parser().parse_args(argv)
    conf_dir = Path(conf_dir)
    if args.config_path:
        conf_dir = (conf_dir.parent / args.config_path).resolve()
    dirs = [conf_dir] + ([Path(args.config_dir).resolve()] if args.config_dir else [])
    info = bool(args.help or args.hydra_help or args.cfg or args.info or args.shell_completion)
    task = [o for o in args.overrides if not o.lstrip("+~").startswith(("hydra.", "hydra/"))]
    return Command(task, [o for o in args.overrides if o not in task], args.config_name or "config", dirs,
                   bool(args.multirun), info)


def hydra_quoted(value: str) -> str:
    """A value as Hydra's override grammar reads it back unchanged: quoted when it holds a space, a non-ASCII
    character or any other character the grammar gives a meaning."""
    if re.fullmatch(r"[\w/.\-:+@%~]+", value, flags=re.ASCII):
        return value
    return "'" + value.replace("'", "\\'") + "'"


class Folders(NamedTuple):
    run_dir: str | None    # resolved (${now:...} included) as Hydra would; None where it cannot be known yet
    sweep_dir: str | None
    given: bool            # the command (or the config) names the folder: it is not the default time stamp
    sweeper: str           # the sweeper's class
    chdir: bool            # hydra.job.chdir: the job runs inside its folder

    def of(self, cmd: "Command") -> tuple[str, str | None]:
        """The setting that names the command's folder, and the folder: the sweep's under -m, else the run's."""
        return ("hydra.sweep.dir", self.sweep_dir) if cmd.multirun else ("hydra.run.dir", self.run_dir)


def check_folders(cmd: Command, folders: Folders) -> None:
    """What the run or sweep folder allows: a sweep's is writable and holds no finished sweep unless resumed
    (optuna's trials each get a new folder: a search continues); resume=auto into a new folder says so."""
    key, folder = folders.of(cmd)
    if "resume=auto" in cmd.overrides and not folders.given and not (folder and Path(folder).exists()):
        if env_rank() == 0:
            print(f"resume=auto without {key}: the folder is a new one, named by the time, so this starts from step "
                  f"0 (to continue a run, give its {key})", flush=True)
    if not cmd.multirun:
        return
    if folders.sweep_dir:
        check_writable(Path(folders.sweep_dir).absolute(), "hydra.sweep.dir")
        if "${" not in folders.sweep_dir and (held := [f for f in RUN_FILES if (Path(folders.sweep_dir) / f).exists()]):
            raise ConfigError(f"hydra.sweep.dir={folders.sweep_dir} holds a single run ({held[0]}): a sweep would "
                              f"write its jobs' folders inside it; choose another hydra.sweep.dir")
    resumed = any(a.split("=", 1)[0] == "resume" and a != "resume=null" for a in cmd.overrides)
    if not resumed and "optuna" not in folders.sweeper:
        check_sweep_dir(folders.sweep_dir)


def _resolved(node, key: str) -> str | None:
    try:
        value = OmegaConf.select(node, key, throw_on_resolution_failure=True)
    except Exception:  # refers to what only a running job knows (hydra.job.*): Hydra resolves it itself
        return None
    return None if value is None else str(value)


def hydra_folders(cmd: Command, first_job: list[str]) -> tuple[Folders, DictConfig]:
    """The run and sweep folders as Hydra will make them, from the same composition (config, --config-dir,
    hydra overrides), each resolved once here: train.py hands the resolved path on to Hydra, so the folder this
    preflight checks and locks is the one the run uses. Also returns the first job's config, as compose() without
    the hydra node gives it (hydra.* overrides change only that node): a second composition costs 0.1-0.2 s."""
    # job_name: Hydra names the job after the script that runs it, train.py (${hydra.job.name} in a folder)
    with initialize_config_dir(str(cmd.config_dirs[0]), version_base=None, job_name="train"):
        cfg = compose(cmd.config_name, overrides=[*first_job, *cmd.hydra, *_search_path(cmd)],
                      return_hydra_config=True)
    check_launcher(cfg)
    default = "${now:" in str(OmegaConf.to_container(cfg.hydra, resolve=False)[
        "sweep" if cmd.multirun else "run"]["dir"])
    folders = Folders(_resolved(cfg, "hydra.run.dir"), _resolved(cfg, "hydra.sweep.dir"), not default,
                      str(OmegaConf.select(cfg, "hydra.sweeper._target_") or ""), bool(cfg.hydra.job.chdir))
    job_cfg = copy.deepcopy(cfg)
    with open_dict(job_cfg):
        del job_cfg["hydra"]
    return folders, job_cfg


def check_launcher(cfg: DictConfig) -> None:
    """What the launcher's settings allow (they live in the hydra node this preflight composes once)."""
    gpus = OmegaConf.select(cfg, "hydra.launcher.ray.remote.num_gpus", default=None)
    if gpus is not None and float(gpus) > 1 and float(gpus) != int(float(gpus)):
        raise ConfigError(f"hydra.launcher.ray.remote.num_gpus={gpus}: a job over several GPUs runs one rank per "
                          f"GPU: give it a whole number of them (a fraction below 1 shares one GPU between jobs)")


_UNSET = object()


def job_composer(cmd: Command):
    """compose() of each job of a sweep, as Hydra makes it, at the cost of one composition per distinct choice of
    config groups: jobs that differ in plain values only (batch=8k seed=1) get their groups' composition with those
    values set, as Hydra sets them after merging the groups (0.14 s a job composed in full). A value no interpolation
    reads is set in a copy of the resolved config (a plain dict, 0.1 ms: a grid of 10,000 is checked in seconds);
    one that some ``${...}`` reads is set in a copy of the composition, then resolved. Anything else (a +, ~ or @
    override, a group, a list, a value that replaces a node or names a key that does not exist) is composed in full,
    so Hydra's own errors stay as they are. tests/test_cli.py checks the two against each other."""
    parser, shared = OverridesParser.create(), {}

    def composed(groups: tuple[str, ...]) -> tuple[DictConfig, dict, str]:
        if groups not in shared:
            cfg = compose(cmd.config_name, overrides=[*groups, *_search_path(cmd)])
            raw = OmegaConf.to_container(cfg, resolve=False)
            shared[groups] = cfg, OmegaConf.to_container(cfg, resolve=True), " ".join(_interpolations(raw))
        return shared[groups]

    def compose_job(job: list[str]) -> DictConfig | dict:
        groups, values = [], []
        for o in parser.parse_overrides(job):
            value = o.value() if o.type == OverrideType.CHANGE and o.package is None else _UNSET
            plain = value is None or isinstance(value, (bool, int, float, str))
            if plain and not any((d / o.key_or_group).is_dir() for d in cmd.config_dirs):
                values.append((o.key_or_group, value))
            else:
                groups.append(o.input_line)
        cfg, resolved, read = composed(tuple(groups))
        if not any(key in read for key, _ in values):
            out = _with_values(resolved, values)
            return out if out is not None else compose(cmd.config_name, overrides=[*job, *_search_path(cmd)])
        cfg = copy.deepcopy(cfg)
        for key, value in values:
            now = OmegaConf.select(cfg, key, default=_UNSET, throw_on_missing=False,
                                   throw_on_resolution_failure=False)
            if now is _UNSET or OmegaConf.is_config(now):
                return compose(cmd.config_name, overrides=[*job, *_search_path(cmd)])
            OmegaConf.update(cfg, key, value, merge=True)  # as Hydra applies a value override
        return cfg

    return compose_job


def _with_values(resolved: dict, values: list[tuple[str, object]]) -> dict | None:
    """A copy of a resolved config with each (dotted key, value) set, or None where a key is not an existing plain
    value (Hydra's composition in full then says what is wrong)."""
    out = copy.deepcopy(resolved)
    for key, value in values:
        *path, leaf = key.split(".")
        node = out
        for part in path:
            node = node.get(part) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node or isinstance(node[leaf], (dict, list)):
            return None
        node[leaf] = value
    return out


def _interpolations(node) -> list[str]:
    """Every ``${...}`` string of a config (unresolved): what a value override may change besides its own key."""
    if isinstance(node, dict):
        return [s for v in node.values() for s in _interpolations(v)]
    if isinstance(node, list):
        return [s for v in node for s in _interpolations(v)]
    return [node] if isinstance(node, str) and "${" in node else []


def _search_path(cmd: Command) -> list[str]:
    extra = [f"file://{d}" for d in cmd.config_dirs[1:]]
    return [f"hydra.searchpath=[{','.join(hydra_quoted(e) for e in extra)}]"] if extra else []


def _absolute_paths(overrides: list[str], chdir: bool) -> list[str]:
    """With hydra.job.chdir=true the job runs inside its folder: a relative resume= or data.root= is made absolute
    from where the command was given, which is what the checks here read and what the user meant."""
    if not chdir:
        return overrides
    out = []
    for o in overrides:
        key, eq, value = o.partition("=")
        if (eq and key in ("resume", "data.root") and value not in ("auto", "null", "") and not value.startswith("/")
                and "://" not in value):  # a URL (data.format=shards) stays one
            o = f"{key}={hydra_quoted(str(Path(value).resolve()))}"
        out.append(o)
    return out


WANDB_MODES = ("online", "offline", "disabled", "shared", "dryrun", "run")  # wandb.Settings.mode's values


def check_wandb_environment(sinks: dict) -> None:
    """wandb reads WANDB_MODE from the environment over the sink's mode: a bad one was a pydantic dump at start,
    and the run went on without wandb."""
    mode = os.environ.get("WANDB_MODE")
    if mode is None or mode in WANDB_MODES:
        return
    if any(str(node.get("_target_", "")).endswith("WandbSink") for node in sinks.values()):
        raise ConfigError(f"WANDB_MODE={mode} (from the environment) is not a mode of wandb: use one of "
                          f"{', '.join(WANDB_MODES[:3])}, or unset it (logger.sinks.wandb.mode sets one run's)")


EVAL_MAY_SET = ("root", "num_workers", "decode", "device_crop")  # where and how the images are read


def check_eval_only_settings(cfg, overrides: list[str]) -> None:
    """eval_only evaluates the checkpoint's own model on its own data: a model or data setting of the command that
    differs from the checkpoint's would be recorded in .hydra/config.yaml beside a result it did not produce."""
    touched = {o.lstrip("+~").split("=")[0].split(".")[0] for o in overrides}
    if not touched & {"model", "data"}:
        return
    stored = load_config(load_checkpoint(Path(cfg.resume))["config"])
    for section in ("model", "data"):
        now, then = (getattr(c, section).model_dump(exclude=set(EVAL_MAY_SET)) for c in (cfg, stored))
        if section in touched and now != then:
            key = next(k for k in now if now[k] != then.get(k))
            fail(f"eval_only=true evaluates the checkpoint's own {section} ({section}.{key}={then.get(key)} in "
                 f"{cfg.resume}); the command's {section}.{key}={now[key]} would be recorded but not used: drop it")


_DONE: dict[tuple, object] = {}  # once()'s results, for one preflight


def once(check, *settings):
    """``check(*settings)``, once per distinct value of ``settings`` (config sections or plain values) in a
    preflight: a sweep's jobs share their model and data, and building the model on the meta device is most of a
    job's check."""
    key = (check.__code__, *(s.model_dump_json() if hasattr(s, "model_dump_json") else s for s in settings))
    if key not in _DONE:
        _DONE[key] = check(*settings)
    return _DONE[key]


def check_job(cfg, job: list[str], run_dir: str | None, check_files: bool) -> None:
    """One job's config and plan; with ``check_files``, its machine, data, resume and warm start too. A single run
    that is already finished exits 0 here, untouched."""
    cfg.resume = slurm.resume_mode(cfg.resume)
    plan = make_plan(cfg, train_size_of(cfg.data), env_world_size())
    model_shapes = once(check_model, cfg.model, *data_shape(cfg.data), cfg.data.name)
    if not check_files:
        return
    resolve_device(cfg.device)
    check_threads(cfg.threads)
    check_wandb_environment(cfg.logger.sinks)
    once(check_data_available, cfg.data)
    resume = None
    if run_dir is not None or cfg.resume not in (None, "auto"):
        resume = to_resume(cfg, Path(run_dir or "."), plan)  # refusals happen here, before Hydra writes
        if resume is not None:
            hand_over(resume)  # train.py, next in this process, reads it from here
    if resume is None and not cfg.eval_only:  # a resume keeps its own weights
        once(lambda model, data: check_init(model, model_shapes), cfg.model, cfg.data)
    if cfg.eval_only:
        check_eval_only_settings(cfg, job)
    if run_dir is not None and env_rank() == 0:
        lock_run_dir(Path(run_dir))
    if run_dir and (resume or cfg.resume == "auto") and (
            done := already_done(Path(run_dir), resume and resume.ckpt, plan)):
        if env_rank() == 0:
            print(done, flush=True)
        sys.exit(0)  # a finished run stays exactly as it was


def check_distinct(jobs: list[list[str]]) -> None:
    """Two jobs of a sweep that are one run (``job_identity``: they differ only in settings a resume may change, or
    not at all, as ``seed=0,0``) would share a folder: refused."""
    first: dict[tuple[str, ...], int] = {}
    for num, job in enumerate(jobs):
        if (same := first.setdefault(job_identity(job), num)) != num:
            fail(f"jobs {same} and {num} of this sweep are one run ({' '.join(job_identity(job)) or 'the defaults'}): "
                 f"they differ at most in {', '.join(RESUME_MAY_CHANGE)}, which a resume may change, so they would "
                 f"share one folder (compare them in sweeps of their own: hydra.sweep.dir=...)")


def preflight(argv: list[str], check_files: bool = True, conf_dir: Path = CONF_DIR) -> list[str]:
    """Compose and check every job's config as Hydra will, and the run plan (batch split, warmup length);
    with ``check_files``, also that the dataset and a resume checkpoint exist (the preview needs neither).
    Returns the command line to hand to Hydra: its run (or sweep) folder resolved, as checked and locked here."""
    cmd = read_command(argv, conf_dir)
    _DONE.clear()  # files may have changed since an earlier preflight of this process
    forget_job_folders()
    if cmd.info_only:
        return argv
    if (stray := torchrun_problem()) is not None:  # before any other line: only a real rank 0 would print those
        fail(stray)
    for d in cmd.config_dirs:
        if not d.is_dir():
            fail(f"--config-dir={d} is not a folder")
    _check_group_options(cmd.overrides, cmd.config_dirs)
    check_grammar(cmd.overrides + cmd.hydra)
    if not cmd.multirun and (sweeps := sweep_overrides(cmd.overrides)):
        fail(f"{sweeps[0]} lists several values, which only a sweep runs: add -m (--multirun), or quote a value "
             f"that holds a comma (key='a,b')")

    try:
        jobs = _jobs(cmd.overrides)
        first_job = jobs[0] if jobs else _fixed(cmd.overrides)
        folders, first_cfg = hydra_folders(cmd, first_job)
        if cmd.multirun and "optuna" in folders.sweeper.lower() and not OmegaConf.select(first_cfg, "data.val_split"):
            raise ConfigError("an optuna search maximizes val_acc, and data.val_split=0 holds no images out of training "
                              "for it: set data.val_split to a count of images (selecting on the test split would "
                              "make its number optimistic)")
        if check_files:
            check_folders(cmd, folders)
    except ConfigError as e:
        fail(str(e))
    except Exception as e:
        with initialize_config_dir(str(cmd.config_dirs[0]), version_base=None):
            fail(_unknown_key(e, cmd.overrides) or condense(e))
    overrides = _absolute_paths(cmd.overrides, folders.chdir)
    run_dir = None if cmd.multirun else folders.run_dir
    key, folder = folders.of(cmd)
    handed_on = [a for a in argv if a not in cmd.overrides and not (folder and a.startswith(f"{key}="))]
    handed_on += overrides + ([f"{key}={hydra_quoted(folder)}"] if folder else [])
    if jobs is None:
        return handed_on
    if overrides != cmd.overrides:  # hydra.job.chdir made a path absolute
        jobs = _jobs(overrides)
    check_distinct(jobs)
    compose_job, progress = job_composer(cmd), CheckProgress(len(jobs))
    with initialize_config_dir(str(cmd.config_dirs[0]), version_base=None):
        for job in jobs:
            progress.tick()
            try:
                check_job(load_config(first_cfg if job == first_job else compose_job(job)), job, run_dir,
                          check_files)
            except ConfigError as e:
                fail(str(e) + (f" [job: {' '.join(job)}]" if len(jobs) > 1 else ""))
            except Exception as e:
                fail(_unknown_key(e, job) or condense(e))
    progress.done()
    return handed_on


class CheckProgress:
    """A sweep of thousands of jobs is checked in seconds, every job before any starts: a line every 5 s says how far
    (rank 0, on stdout; a refusal stays one line on stderr)."""

    def __init__(self, total: int, every_s: float = 5.0):
        self.total, self.every_s, self.count = total, every_s, 0
        self.started = self.last = time.monotonic()

    def tick(self) -> None:
        self.count += 1
        if time.monotonic() - self.last >= self.every_s and env_rank() == 0:
            self.last = time.monotonic()
            print(f"checking the sweep's jobs: {self.count - 1:,} of {self.total:,} passed", flush=True)

    def done(self) -> None:
        if self.last != self.started and env_rank() == 0:
            print(f"checked all {self.total:,} jobs in {time.monotonic() - self.started:.0f} s", flush=True)
