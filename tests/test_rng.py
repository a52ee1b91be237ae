"""Random generators across ranks and resumes: each rank draws its own stream (dropout must not repeat across
ranks), a checkpoint holds every rank's, each rank restores its own, new ranks start from (seed, rank, step), and a
checkpoint of the previous format (rank 0's generators only) still resumes bit for bit."""
import random

import pytest
import torch

from engine.checkpoint import FORMAT, migrate, restore_checkpoint, rng_state, seed_rank
from engine.run import RunState
from engine.schedule import StepSchedule
from tests.helpers import TINY, run_train


def draws(n=5):
    return torch.rand(n), random.random()


@pytest.mark.parametrize("seed, rank, step", [(0, 1, 0), (0, 7, 0), (3, 1, 0), (0, 1, 40)])
def test_ranks_above_0_draw_their_own_streams_and_rank_0_keeps_the_single_process_one(seed, rank, step):
    torch.manual_seed(seed)
    random.seed(seed)
    single = draws()
    torch.manual_seed(seed)
    random.seed(seed)
    seed_rank(seed, 0, step)
    assert torch.equal(draws()[0], single[0])  # rank 0 = one process, bit for bit
    torch.manual_seed(seed)
    seed_rank(seed, rank, step)
    own = draws()
    assert not torch.equal(own[0], single[0])
    others = set()
    for r in (1, 2, 3):
        seed_rank(seed, r, step)
        others.add(tuple(torch.rand(3).tolist()))
    assert len(others) == 3  # every rank differs from every other


def restore_into(ckpt, rank, seed=0):
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    full = {"model": model.state_dict(), "optimizer": opt.state_dict(), "scaler": scaler.state_dict(), "step": 12,
            "images": 0, "schedule": {"step": 12, "images": 0, "tau": 12.0, "batch": None, "gain": 1.0,
                                      "noise_scale": {}}, **ckpt}
    restore_checkpoint(full, state=RunState(), schedule=StepSchedule(plan=None), model=model, optimizer=opt,
                       scaler=scaler, rank=rank, seed=seed)


@pytest.mark.parametrize("rank", [0, 1, 2])
def test_each_rank_restores_its_own_generators_and_new_ranks_are_reseeded(rank):
    states = []
    for r in range(2):
        torch.manual_seed(100 + r)
        random.seed(100 + r)
        states.append(rng_state())
    expected = {}
    for r in range(3):
        if r < 2:
            torch.set_rng_state(states[r]["torch"])
        else:
            seed_rank(0, r, 12)  # the step of the checkpoint
        expected[r] = torch.rand(4)
    torch.manual_seed(999)
    restore_into({"rng": {"ranks": states}}, rank)
    assert torch.equal(torch.rand(4), expected[rank])


def test_a_previous_format_checkpoint_keeps_rank_0s_generators_and_drops_other_gpus():
    torch.manual_seed(5)
    old = {"format": 3, "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                                "cuda": [torch.zeros(16, dtype=torch.uint8)] * 8}}  # 8 GPUs' states
    new = migrate(old)
    assert new["format"] == FORMAT == 5 and len(new["rng"]["ranks"]) == 1
    assert new["rng"]["ranks"][0]["cuda"].shape == (16,)  # its own device's state, whatever this machine sees
    expected = torch.rand(3)
    torch.manual_seed(0)
    restore_into(new, 0)
    assert torch.equal(torch.rand(3), expected)


def test_a_format_3_checkpoint_resumes_bit_for_bit(tmp_path):
    """Written as the previous version wrote it (format 3, rank 0's generators at the top of rng), it resumes and
    ends where the uninterrupted run ends."""
    args = [*TINY, "batch=64", "checkpoint.every_steps=1", "data.augment=true"]
    run_train(tmp_path, [*args, "max_steps=4"], name="whole")
    _, part = run_train(tmp_path, [*args, "max_steps=2"], name="part")
    path = part / "checkpoints" / "last.pt"
    ckpt = torch.load(path, weights_only=False)
    (state,) = ckpt["rng"]["ranks"]
    ckpt.update(format=3, rng={"torch": state["torch"], "python": state["python"]})
    torch.save(ckpt, path)
    run_train(tmp_path, [*args, "max_steps=4", "resume=auto"], name="part")
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=False)
    b = torch.load(path, weights_only=False)
    assert b["format"] == 5 and b["step"] == 4
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
