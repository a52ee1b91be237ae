"""What happens to a batch on the training device: per-step augmentation (crop, flip), MixUp/CutMix, normalisation.
Every random draw is a pure function of (seed, step), made for the whole global batch and sliced, so what a run
sees does not depend on ``micro_batch`` or the number of ranks."""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from .seeds import augment_seed, mix_seed


@dataclass
class Augment:
    """Random crop with zero padding and horizontal flip, drawn for a whole global batch at once."""
    padding: int = 2
    hflip: bool = True

    def draw(self, size: int, seed: int, step: int) -> torch.Tensor:
        """(size, 3) int64 rows of (dy, dx, flip) for global step ``step``: a pure function of (seed, step)."""
        g = torch.Generator().manual_seed(augment_seed(seed, step))
        shifts = torch.randint(0, 2 * self.padding + 1, (size, 2), generator=g)
        flips = torch.randint(0, 2, (size, 1), generator=g) if self.hflip else torch.zeros(size, 1, dtype=torch.long)
        return torch.cat([shifts, flips], dim=1)

    def apply(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        """Crop every image at its own offset and flip where asked: one gather, no Python loop over images."""
        n, c, h, w = x.shape
        p = self.padding
        params = params.to(x.device)
        if p:
            padded = torch.nn.functional.pad(x, (p, p, p, p))
            rows = params[:, 0:1] + torch.arange(h, device=x.device)          # (n, h)
            cols = params[:, 1:2] + torch.arange(w, device=x.device)          # (n, w)
            cols = torch.where(params[:, 2:3].bool(), cols.flip(1), cols)     # a flip reverses the column order
            idx_n = torch.arange(n, device=x.device)[:, None, None]
            x = padded[idx_n, :, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
        elif self.hflip:
            x = torch.where(params[:, 2].bool()[:, None, None, None], x.flip(3), x)
        return x.contiguous()


class Mix:
    """MixUp (Zhang et al. 2018) / CutMix (Yun et al. 2019) from torchvision.transforms.v2, on soft targets.

    torchvision mixes each image with its neighbour in the batch it is given, drawing lambda (and CutMix's box, and
    which of the two) from torch's global generator. To keep what a run sees independent of micro_batch and ranks,
    each image's partner is drawn from the whole global batch (a permutation, a pure function of seed and step), the
    pair is handed to torchvision interleaved (partner, image), and torchvision runs under a generator seeded by
    (seed, step): every micro-batch of a step shares one lambda and one box, as one big batch would.
    """

    def __init__(self, mixup_alpha: float, cutmix_alpha: float, num_classes: int):
        from torchvision.transforms import v2
        choices = ([v2.MixUp(alpha=mixup_alpha, num_classes=num_classes)] if mixup_alpha > 0 else []) + (
            [v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes)] if cutmix_alpha > 0 else [])
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)

    def partners(self, size: int, seed: int, step: int) -> torch.Tensor:
        return torch.randperm(size, generator=torch.Generator().manual_seed(mix_seed(seed, step)))

    def apply(self, x, y, x_partner, y_partner, seed: int, step: int):
        pairs = torch.stack([x_partner, x], 1).flatten(0, 1)   # p0, x0, p1, x1, ...: x_i's neighbour is p_i
        labels = torch.stack([y_partner, y], 1).flatten(0, 1)
        with torch.random.fork_rng(devices=[]):  # the CPU generator only: torch.manual_seed would also reseed CUDA's,
            torch.default_generator.manual_seed(mix_seed(seed, step) + 1)  # and every rank's dropout would repeat
            mixed, soft = self.transform(pairs, labels)
        return mixed[1::2].contiguous(), soft[1::2]


def resized_crops(images: list[torch.Tensor], boxes: list[tuple[int, int, int, int]], size: int,
                  budget: int = 2 ** 27) -> torch.Tensor:
    """uint8 (C, H, W) images of any sizes, each cropped to its (top, left, height, width) box and resized to
    ``size`` x ``size``: one ``torchvision.ops.roi_align`` call per group of similar-sized images (sorted by area,
    zero-padded onto one canvas of at most ``budget`` elements) instead of a resize per image. roi_align averages
    bilinear samples over each output pixel's footprint (a box filter) where RandomResizedCrop(antialias=True)
    weighs them by a triangle, so the two differ a little (data.device_crop=batched; tolerance in
    tests/test_datasets.py)."""
    from torchvision.ops import roi_align
    device, channels = images[0].device, images[0].shape[0]
    out = torch.empty(len(images), channels, size, size, dtype=torch.uint8, device=device)
    order = sorted(range(len(images)), key=lambda k: images[k].shape[-2] * images[k].shape[-1])
    while order:
        group = [order.pop(0)]
        # +1: a replicated last row and column, so samples at a box's far edge never blend in the padding
        h, w = images[group[0]].shape[-2] + 1, images[group[0]].shape[-1] + 1
        while order and (len(group) + 1) * channels * max(h, images[order[0]].shape[-2] + 1) * max(
                w, images[order[0]].shape[-1] + 1) <= budget:
            k = order.pop(0)
            group.append(k)
            h, w = max(h, images[k].shape[-2] + 1), max(w, images[k].shape[-1] + 1)
        canvas = torch.zeros(len(group), channels, h, w, device=device)
        for n, k in enumerate(group):
            padded = torch.nn.functional.pad(images[k][None].float(), (0, 1, 0, 1), mode="replicate")[0]
            canvas[n, :, :padded.shape[-2], :padded.shape[-1]] = padded
        rois = torch.tensor([[n, left, top, left + width, top + height]
                             for n, (top, left, height, width) in enumerate(boxes[k] for k in group)],
                            dtype=torch.float32)
        crops = roi_align(canvas, to_device(rois, device), output_size=size, spatial_scale=1.0, sampling_ratio=-1,
                          aligned=True)
        out[to_device(torch.tensor(group), device)] = crops.round_().clamp_(0, 255).to(torch.uint8)
    return out


def make_mix(cfg_data, num_classes: int) -> Mix | None:
    mixup, cutmix = cfg_data.mixup_alpha or 0.0, cfg_data.cutmix_alpha or 0.0
    return Mix(mixup, cutmix, num_classes) if mixup > 0 or cutmix > 0 else None


def normalize(x: torch.Tensor, mean, std, dtype=torch.float32) -> torch.Tensor:
    """uint8 images -> normalised float, on whatever device x is on."""
    mean, std = _norm_constants(tuple(mean), tuple(std), x.device, dtype)
    return (x.to(dtype) - mean) / std


@functools.lru_cache(maxsize=16)
def _norm_constants(mean: tuple, std: tuple, device: torch.device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Built once per device: a tensor made from Python numbers is a host-to-device copy on a GPU."""
    return (torch.tensor(mean, device=device, dtype=dtype).view(1, -1, 1, 1) * 255,
            torch.tensor(std, device=device, dtype=dtype).view(1, -1, 1, 1) * 255)


def to_device(t: torch.Tensor | None, device) -> torch.Tensor | None:
    """A step's small CPU tensor (indices, augmentation draws) onto the GPU without stalling it: pinned, then
    copied asynchronously (a copy from pageable memory waits for the GPU's queue to drain)."""
    if t is None:
        return None
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
