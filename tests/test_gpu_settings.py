"""What the first GPU run depends on, checked on the CPU: TF32 and determinism settings, the steady-state images/s,
the gradient norm computed once. (tests/test_cuda.py holds what needs a GPU.)"""
import pytest
import torch

from engine import distributed, loop
from engine.errors import ConfigError
from engine.run import RunState
from tests.helpers import TINY, load_cfg, run_train


@pytest.fixture
def numerics():
    saved = (torch.get_float32_matmul_precision(), torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark,
             torch.are_deterministic_algorithms_enabled())
    yield
    torch.set_float32_matmul_precision(saved[0])
    torch.backends.cudnn.allow_tf32, torch.backends.cudnn.benchmark = saved[1], saved[2]
    torch.use_deterministic_algorithms(saved[3])


@pytest.mark.parametrize("device, tf32, deterministic, precision, allow_tf32, cudnn_benchmark", [
    ("cuda", True, False, "high", True, True),
    ("cuda", False, False, "highest", False, True),
    ("cuda", True, True, "high", True, False),
    ("cpu", True, False, None, None, True),      # the CPU's matmul precision is left alone
])
def test_tf32_and_determinism_are_set_together(numerics, device, tf32, deterministic, precision, allow_tf32,
                                               cudnn_benchmark):
    torch.set_float32_matmul_precision("medium")
    torch.backends.cudnn.allow_tf32 = before = not allow_tf32 if allow_tf32 is not None else not tf32
    distributed.set_numerics(torch.device(device), tf32, deterministic)
    assert torch.get_float32_matmul_precision() == (precision or "medium")
    assert torch.backends.cudnn.allow_tf32 == (allow_tf32 if allow_tf32 is not None else before)
    assert torch.backends.cudnn.benchmark is cudnn_benchmark
    assert torch.are_deterministic_algorithms_enabled() is deterministic


@pytest.mark.parametrize("overrides, ok", [(["tf32=false", "deterministic=true", "compile_mode=max-autotune"], True),
                                           (["compile_mode=reduce-overhead"], True), (["compile_mode=fast"], False),
                                           (["tf32=maybe"], False)])
def test_settings_the_reference_trainers_use(overrides, ok):
    if ok:
        load_cfg([*TINY, *overrides])
    else:
        with pytest.raises(ConfigError):
            load_cfg([*TINY, *overrides])


def _ddp_steps(ddp: torch.nn.Module, accum_steps: int, steps: int = 3) -> None:
    import contextlib
    for _ in range(steps):
        for i in range(accum_steps):
            with ddp.no_sync() if i < accum_steps - 1 else contextlib.nullcontext():
                ddp(torch.randn(5, 4)).sum().backward()


@pytest.mark.parametrize("accum_steps, batch_varies, static", [(1, False, True), (2, False, False),
                                                               (1, True, False), (4, True, False)])
def test_ddp_takes_a_static_graph_only_where_it_trains(tmp_path, accum_steps, batch_varies, static):
    """Where the rule says yes DDP runs with ``static_graph``; where it says no, forcing it would fail (the reason
    for the rule): one gloo rank in this process."""
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert distributed.static_graph_valid(accum_steps, batch_varies) is static
        model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
        _ddp_steps(distributed.wrap_ddp(model, static), accum_steps)
        if accum_steps > 1:
            with pytest.raises(RuntimeError, match="expect_autograd_hooks_"):
                _ddp_steps(distributed.wrap_ddp(model, static_graph=True), accum_steps)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("seconds, batches, expected", [
    ([10.0, 0.1, 0.1, 0.1], [64, 64, 64, 64], 64 / 0.1),   # the first step's set-up is left out
    ([5.0], [64], 64 / 5.0),                                # a run of one step has only that
    ([2.0, 0.5, 0.25], [32, 64, 64], 128 / 0.75),            # a changing batch: images over seconds
])
def test_images_per_s_is_the_steady_state(seconds, batches, expected):
    state = RunState()
    for s, b in zip(seconds, batches, strict=True):
        state.count(b, s, loss=1.0)
    assert state.images_per_s == pytest.approx(expected)


def test_a_clipped_gradient_norm_is_computed_once(tmp_path, monkeypatch):
    """clip_grad_norm_ returns the norm before clipping: the loop takes it instead of a second pass."""
    def second_pass(params):
        raise AssertionError("the norm was computed twice")
    monkeypatch.setattr(loop, "grad_norm", second_pass)
    summary, run_dir = run_train(tmp_path, [*TINY, "batch=32", "max_steps=2", "grad_clip=0.01"])
    rows = [r for r in map(__import__("json").loads, (run_dir / "metrics.jsonl").read_text().splitlines())
            if "grad_norm" in r]
    assert rows and all(r["grad_norm"] > 0.01 for r in rows)  # the norm before clipping is what is logged


class HostTraffic:
    """Counts, per optimizer step, what becomes a host-device transfer or a blocking read on a GPU: tensors built from
    Python data (aten.lift_fresh: a host-to-device copy), reads of a tensor's value (aten._local_scalar_dense) and
    copies that change device. torchvision's MixUp/CutMix (and RandomChoice between them) draw from CPU generators
    with CPU tensors: those stay on the host and are not counted."""

    def __init__(self, monkeypatch):
        from torch.utils._python_dispatch import TorchDispatchMode

        from engine.transforms import Mix
        self.steps, in_transform = [], [False]
        counts = self.steps

        class Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                name = str(func)
                kwargs = kwargs or {}
                moved = (name == "aten._to_copy.default" and "device" in kwargs
                         and torch.device(kwargs["device"]) != args[0].device)
                if moved or name in ("aten.lift_fresh.default", "aten._local_scalar_dense.default") and not (
                        in_transform[0] and name != "aten._to_copy.default"):
                    counts[-1][name] = counts[-1].get(name, 0) + 1
                return func(*args, **kwargs)

        original_step, original_apply = loop.train_step, Mix.apply

        def counted_step(*a, **k):
            counts.append({})
            with Mode():
                return original_step(*a, **k)

        def apply(self_, *a, **k):
            transform = self_.transform

            def drawn(*ta):
                in_transform[0] = True
                try:
                    return transform(*ta)
                finally:
                    in_transform[0] = False
            self_.transform = drawn
            try:
                return original_apply(self_, *a, **k)
            finally:
                self_.transform = transform
        monkeypatch.setattr(loop, "train_step", counted_step)
        monkeypatch.setattr(Mix, "apply", apply)


@pytest.mark.parametrize("extra", [
    [],                                                    # one micro-batch per step
    ["micro_batch=8"],                                     # accumulation over 4
    ["micro_batch=8", "data.augment=true"],                # crops and flips
    ["micro_batch=8", "data.augment=true", "data.mixup_alpha=0.2"],
    ["micro_batch=16", "data.cutmix_alpha=1.0", "data.mixup_alpha=0.2"],
    ["micro_batch=8", "grad_clip=1.0"],
])
def test_a_step_builds_no_tensor_from_host_data_and_reads_none(tmp_path, monkeypatch, extra):
    """Steps 2-4 of the in-memory path: nothing per step that would stall a GPU (the step's one read, the loss and
    gradient norm, is a .tolist() of a CPU tensor here and is counted by test_host_reads_once_per_optimizer_step)."""
    traffic = HostTraffic(monkeypatch)
    run_train(tmp_path, [*TINY, "batch=32", "max_steps=4", "diagnostics.every=0", "checkpoint.enabled=false", *extra])
    assert len(traffic.steps) == 4 and traffic.steps[1:] == [{}, {}, {}], traffic.steps


def test_the_gpu_check_runs_every_part_on_the_cpu(tmp_path):
    """scripts/gpu_check.sh --dry-run: the same code as on a GPU, at tiny sizes: the machine, the cuda-marked
    tests' line, one row per measurement and one per whole run of train.py, written to --out."""
    import subprocess
    from pathlib import Path
    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "check.md"
    r = subprocess.run(["bash", str(root / "scripts/gpu_check.sh"), "--dry-run", "--out", str(out)], cwd=root,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    rows = [ln.split("|")[1:-1] for ln in out.read_text().splitlines()[2:]]
    parts = [c[0].strip() for c in rows]
    assert parts == ["machine", "cuda tests"] + ["optim"] * 6 + ["loop"] * 8 + ["decode"] * 3 + ["train"] * 2, rows
    assert "stopped" not in out.read_text() and "skipped" in rows[1][-1]
    assert all(float(c[2].replace(",", "")) > 0 for c in rows[2:])
    assert all("test acc" in c[-1] for c in rows[-2:]), rows


def test_evaluation_runs_the_uncompiled_model(monkeypatch):
    """Through torch.compile, switching to eval mode and the last partial batch each compile another graph."""
    from types import SimpleNamespace
    seen = []
    monkeypatch.setattr(loop, "evaluate", lambda model, *a, **k: seen.append(model) or {"acc": 0.5, "loss": 1.0})
    plain = torch.nn.Linear(2, 2)
    run = SimpleNamespace(model=torch.compile(plain), data=None, device=torch.device("cpu"), ema=None,
                          cfg=SimpleNamespace(precision="fp32", channels_last=False, data=SimpleNamespace(val_split=0, eval_hflip=False)), dist=SimpleNamespace(is_main=False),
                          state=RunState(), schedule=SimpleNamespace(epoch=0.0, step=0),
                          progress=SimpleNamespace(write=lambda text: None))
    loop.run_eval(run)
    assert seen == [plain]
