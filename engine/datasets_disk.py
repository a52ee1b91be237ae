"""Readers for datasets in their standard on-disk formats.

CIFAR-10/100: the python-pickle release (``cifar-10-batches-py/data_batch_1..5, test_batch``;
``cifar-100-python/train, test``), read straight into uint8 tensors and validated by shape and label range (no md5
check, so repacked copies load). Downloaded through torchvision when online and absent.
ImageNet: ``root/train`` and ``root/val`` in ImageFolder layout (one folder of JPEGs per class), decoded by
DataLoader workers with the standard recipe transforms.
"""
from __future__ import annotations

import pickle
from pathlib import Path

import torch

from .config import ConfigError
from .data import DOWNLOAD_CACHE, TensorData, global_batches

CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key=b"labels", classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    tv="CIFAR10"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], label_key=b"fine_labels",
                     classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), tv="CIFAR100"),
}
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _cifar_folder(name: str, root: str | None) -> Path | None:
    spec = CIFAR[name]
    for base in ([Path(root)] if root else []) + [DOWNLOAD_CACHE]:
        if (base / spec["folder"]).is_dir():
            return base / spec["folder"]
    return None


def _read_cifar_files(folder: Path, files: list[str], spec: dict) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = [], []
    for f in files:
        path = folder / f
        if not path.is_file():
            raise ConfigError(f"{path} is missing: a CIFAR folder holds {', '.join(spec['train'] + spec['test'])}")
        try:
            with open(path, "rb") as fh:
                batch = pickle.load(fh, encoding="bytes")
            data, labels = batch[b"data"], batch[spec["label_key"]]
        except Exception as e:
            raise ConfigError(f"{path} is not a CIFAR python-pickle batch ({type(e).__name__}: {e})") from None
        x = torch.as_tensor(data)
        if x.dtype != torch.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32 or len(labels) != len(x):
            raise ConfigError(f"{path}: expected uint8 data of shape (N, 3072) and N labels, got {tuple(x.shape)} "
                              f"{x.dtype} and {len(labels)} labels")
        y = torch.as_tensor(labels, dtype=torch.long)
        if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec["classes"]):
            raise ConfigError(f"{path}: labels must lie in 0..{spec['classes'] - 1}, found {int(y.min())}.."
                              f"{int(y.max())}")
        xs.append(x.view(-1, 3, 32, 32))
        ys.append(y)
    return torch.cat(xs), torch.cat(ys)


def load_cifar(name: str, root: str | None) -> TensorData:
    spec = CIFAR[name]
    folder = _cifar_folder(name, root)
    if folder is None:
        if root is not None:
            raise ConfigError(f"data.root={root} holds no {spec['folder']}/ folder (the python-pickle CIFAR release)")
        try:
            import torchvision
            getattr(torchvision.datasets, spec["tv"])(str(DOWNLOAD_CACHE), download=True)
        except Exception as e:
            raise ConfigError(f"{name} not found: set data.root to the folder holding {spec['folder']}/ "
                              f"(download failed: {type(e).__name__})") from None
        folder = DOWNLOAD_CACHE / spec["folder"]
    train_x, train_y = _read_cifar_files(folder, spec["train"], spec)
    test_x, test_y = _read_cifar_files(folder, spec["test"], spec)
    return TensorData(train_x, train_y, test_x, test_y, num_classes=spec["classes"], mean=spec["mean"],
                      std=spec["std"], source=str(folder))


# --- ImageNet (ImageFolder of JPEGs) --------------------------------------------------------------------------------

class ImageFolderData:
    """ImageNet-style folders, decoded by DataLoader workers (pinned memory, workers kept across epochs).

    The batch order is the same pure function of (seed, epoch) as for in-memory data; RandomResizedCrop and flip
    are drawn in the workers (not tied to the step, unlike the in-memory augmentation).
    """

    def __init__(self, root: str, num_workers: int, image_size: int = 224):
        from torchvision import datasets, transforms
        normalize = transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)
        self.train = datasets.ImageFolder(str(Path(root) / "train"), transforms.Compose([
            transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(), transforms.ToTensor(),
            normalize]))
        self.val = datasets.ImageFolder(str(Path(root) / "val"), transforms.Compose([
            transforms.Resize(int(image_size * 256 / 224)), transforms.CenterCrop(image_size), transforms.ToTensor(),
            normalize]))
        if self.train.classes != self.val.classes:
            raise ConfigError(f"data.root={root}: train/ and val/ have different class folders "
                              f"({len(self.train.classes)} vs {len(self.val.classes)})")
        self.num_workers = num_workers
        self.num_classes = len(self.train.classes)
        self.image_shape = (3, image_size, image_size)
        self.train_size = len(self.train)
        self.source = root
        self.test_y = self.val.targets
        self._train_batches, self._train_loader, self._val_loader = _Batches(), None, None

    def to(self, device):
        return self

    def _loader(self, dataset, batches: "_Batches") -> torch.utils.data.DataLoader:
        """One loader per split for the whole run: its workers persist across epochs, and each epoch only swaps
        the list of index batches they are fed (the batch sampler is iterated in this process)."""
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                                           pin_memory=torch.cuda.is_available(),
                                           persistent_workers=self.num_workers > 0)

    def train_micro_batches(self, epoch, first_step, plan, rank, seed, augment, device):
        per_rank = plan.micro_batch * plan.accum_steps
        self._train_batches.batches = [
            part.tolist() for index in global_batches(self.train_size, plan.global_batch, seed, epoch)[first_step:]
            for part in index[rank * per_rank:(rank + 1) * per_rank].split(plan.micro_batch)]
        if self._train_loader is None:
            self._train_loader = self._loader(self.train, self._train_batches)
        for x, y in self._train_loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)

    def test_batches(self, rank, world_size, device, chunk: int = 256):
        if self._val_loader is None:
            idx = torch.arange(rank, len(self.val), world_size)
            self._val_loader = self._loader(self.val, _Batches([p.tolist() for p in idx.split(chunk)]))
        for x, y in self._val_loader:
            yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class _Batches:
    """A batch sampler whose list of index batches can be replaced between epochs."""

    def __init__(self, batches=()):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def _check_imagenet(root: str | None) -> Path:
    if root is None:
        raise ConfigError("data=imagenet needs data.root: the folder holding train/ and val/ class folders")
    for split in ("train", "val"):
        folder = Path(root) / split
        if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
            raise ConfigError(f"data.root={root} has no {split}/ folder of class folders (ImageFolder layout: "
                              f"{split}/<class>/<image>.JPEG)")
    return Path(root)


def check(name: str, cfg_data) -> None:
    if name == "imagenet":
        _check_imagenet(cfg_data.root)
    elif cfg_data.root is not None and _cifar_folder(name, cfg_data.root) is None:
        raise ConfigError(f"data.root={cfg_data.root} holds no {CIFAR[name]['folder']}/ folder "
                          f"(the python-pickle CIFAR release)")


def load(name: str, cfg_data):
    if name == "imagenet":
        return ImageFolderData(str(_check_imagenet(cfg_data.root)), cfg_data.num_workers)
    return load_cifar(name, cfg_data.root)
