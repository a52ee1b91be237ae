"""Every seed a run derives from its ``seed`` setting, in one place: each random draw is a pure function of the run's
seed and where it is (epoch, step, rank, image), so it is the same whatever the micro-batch, the ranks or the
resumes. Distinct large primes keep the streams apart; every value is reduced to torch's 63-bit seed range."""
from __future__ import annotations

_SEED_RANGE = 2 ** 63


def epoch_order_seed(seed: int, epoch: int) -> int:
    """The permutation of the training set in ``epoch`` (engine/sampling.py)."""
    return (seed * 1_000_003 + epoch) % _SEED_RANGE


def augment_seed(seed: int, step: int) -> int:
    """A global step's crops and flips (engine/transforms.py's Augment)."""
    return (seed * 7_919 + step * 104_729 + 1) % _SEED_RANGE


def mix_seed(seed: int, step: int) -> int:
    """A global step's MixUp/CutMix partners and draw (engine/transforms.py's Mix)."""
    return (seed * 7_919 + step * 104_729 + 2) % _SEED_RANGE


def image_seed(seed: int, epoch: int, index: int, copy: int) -> int:
    """One image's transforms in one epoch (``copy``: its repeat under repeated augmentation), in a loader worker
    (engine/datasets_disk.py)."""
    return (((seed * 1_000_003 + epoch) * 1_000_003 + index) * 17 + copy) % _SEED_RANGE


def rank_seed(seed: int, rank: int, step: int = 0) -> int:
    """The dropout and drop-path stream of rank >= 1 from ``step`` on (engine/checkpoint.py's seed_rank)."""
    return (seed * 1_000_003 + rank * 7_919 + step * 104_729) % _SEED_RANGE
