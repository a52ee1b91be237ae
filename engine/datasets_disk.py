"""Readers for datasets in their standard on-disk formats.

CIFAR-10/100: the python-pickle release (``cifar-10-batches-py/data_batch_1..5, test_batch``;
``cifar-100-python/train, test``), read straight into uint8 tensors and validated by shape and label range (no md5
check, so repacked copies load). Downloaded through torchvision when online and absent.
ImageNet: ``root/train`` and ``root/val`` in ImageFolder layout (one folder of JPEGs per class), decoded by
DataLoader workers with torchvision.io and the standard recipe transforms (transforms.v2), deterministically.
"""
from __future__ import annotations

import copy
import pickle
import warnings
from pathlib import Path

import torch

from .data import DOWNLOAD_CACHE, TensorData, held_out
from .errors import ConfigError, RunError
from .sampling import epoch_order, global_batches, grouped_order
from .seeds import image_seed
from .shards import ShardFiles, check_shards, read_manifest
from .transforms import normalize, resized_crops, to_device

CIFAR = {
    "cifar10": dict(folder="cifar-10-batches-py", train=[f"data_batch_{i}" for i in range(1, 6)], test=["test_batch"],
                    label_key=b"labels", classes=10, mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616),
                    tv="CIFAR10"),
    "cifar100": dict(folder="cifar-100-python", train=["train"], test=["test"], label_key=b"fine_labels",
                     classes=100, mean=(0.5071, 0.4865, 0.4409), std=(0.2673, 0.2564, 0.2762), tv="CIFAR100"),
}
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")  # what torchvision.io.decode_image reads
UNREADABLE_IMAGES = (".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".gif")  # ImageFolder lists them; decode_image cannot
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


def _find_cifar(name: str, root: str | None) -> Path:
    """data.root's CIFAR folder, or torchvision's download cache (downloading into it when online)."""
    spec = CIFAR[name]
    folder = _cifar_folder(name, root)
    if folder is not None:
        return folder
    if root is not None:
        raise ConfigError(f"data.root={root} holds no {spec['folder']}/ folder (the python-pickle CIFAR release)")
    try:
        import torchvision
        getattr(torchvision.datasets, spec["tv"])(str(DOWNLOAD_CACHE), download=True)
    except Exception as e:
        raise ConfigError(f"{name} not found: set data.root to the folder holding {spec['folder']}/ "
                          f"(download failed: {type(e).__name__})") from None
    return DOWNLOAD_CACHE / spec["folder"]


def load_cifar(name: str, root: str | None) -> TensorData:
    spec = CIFAR[name]
    folder = _find_cifar(name, root)
    train_x, train_y = _read_cifar_files(folder, spec["train"], spec)
    test_x, test_y = _read_cifar_files(folder, spec["test"], spec)
    return TensorData(train_x, train_y, test_x, test_y, num_classes=spec["classes"], mean=spec["mean"],
                      std=spec["std"], source=str(folder))


# --- ImageNet (ImageFolder of JPEGs) --------------------------------------------------------------------------------

class FolderFiles(list):
    """ImageFolder's ``(path, label)`` samples, and ``read`` for a file's bytes (engine/shards.py's ShardFiles is the
    same for shards)."""

    def read(self, i: int) -> bytes:
        return Path(self[i][0]).read_bytes()

    def subset(self, positions: list[int]) -> "FolderFiles":
        return FolderFiles(self[p] for p in positions)

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self]


class DecodedImages(torch.utils.data.Dataset):
    """ImageFolder samples decoded with ``torchvision.io`` (libjpeg-turbo) and ``transforms.v2``.

    Training keys are (index, epoch, seed, copy), with the step in place of the epoch under a batch schedule:
    RandomResizedCrop and the flip run under a generator seeded by the key, so an image's augmentation is a pure
    function of the key, the same in any worker, on any rank, at any micro_batch, and after a resume. An image that
    cannot be decoded stops the run with one line naming it.
    With ``on_device`` the workers only read the files, and ``decode_batch`` decodes a whole batch in the training
    process on the training device (batched nvjpeg on CUDA), then transforms each image there under the same key: the
    same crops and flips as decoding in the workers (bit for bit on CPU, where both use libjpeg-turbo; tested).
    """

    def __init__(self, samples: "FolderFiles | ShardFiles", transform, train: bool, on_device: bool = False,
                 batched_crop: bool = False):
        self.samples, self.transform, self.train, self.on_device = samples, transform, train, on_device
        self.batched_crop = batched_crop and train and on_device

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        index = self._index(key)
        path, label = self.samples[index]
        try:  # not torchvision.io.read_file: its tensor, sent from a worker, never arrives (torch 2.14, tv 0.29)
            data = torch.frombuffer(bytearray(self.samples.read(index)), dtype=torch.uint8)
        except Exception as e:  # removed, unreadable or empty since the run started
            raise _undecodable(path, e) from None
        if self.on_device:
            return key, data, label
        return self._transformed(_decode_on_cpu(path, data), key), label

    def decode_batch(self, items: list, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(key, file bytes, label) items from the workers -> a batch of transformed images on ``device``."""
        keys, files, labels = zip(*items)
        paths = [self.samples[self._index(k)][0] for k in keys]
        images = _decode_batch_on(device, paths, list(files))
        if self.batched_crop:
            x = self._crops_of_batch(images, keys)
        else:
            x = torch.stack([self._transformed(image, k) for image, k in zip(images, keys)])
        return normalize(x, IMAGENET_MEAN, IMAGENET_STD), torch.tensor(labels).to(device, non_blocking=True)

    def _crops_of_batch(self, images: list[torch.Tensor], keys: list) -> torch.Tensor:
        """data.device_crop=batched: each image's crop box, flip and policy draws as ``_transformed`` makes them
        (same generator, same order: RandomResizedCrop's parameters, the flip's coin, then the policy's), but the
        crops resized together (``resized_crops``) and flipped as one batch; a policy still runs per image."""
        crop, flip, *policy = self.transform.transforms
        boxes, flips, states = [], [], []
        for image, key in zip(images, keys):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(_key_seed(key))
                box = crop.make_params([image])
                boxes.append((box["top"], box["left"], box["height"], box["width"]))
                flips.append(bool(torch.rand(1) < flip.p))
                if policy:  # where the policy's draws start
                    states.append(torch.default_generator.get_state())
        x = resized_crops(images, boxes, crop.size[0])
        x = torch.where(to_device(torch.tensor(flips), x.device)[:, None, None, None], x.flip(-1), x)
        for n, state in enumerate(states):
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.set_state(state)
                for transform in policy:
                    x[n] = transform(x[n])
        return x

    def _index(self, key) -> int:
        return key[0] if self.train else key

    def _transformed(self, image: torch.Tensor, key) -> torch.Tensor:
        if not self.train:
            return self.transform(image)
        # transforms.v2 draws its parameters from the CPU generator whatever the image's device: seed only that one
        # (torch.manual_seed would also reseed CUDA's, which dropout in the training process draws from)
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_key_seed(key))
            return self.transform(image)


def _key_seed(key: tuple) -> int:
    index, epoch, seed, copy = key
    return image_seed(seed, epoch, index, copy)


def _undecodable(path: str, error: Exception) -> RunError:
    return RunError(f"{path} cannot be decoded ({type(error).__name__}: {str(error).splitlines()[0][:120]}); "
                    f"replace it with a readable copy (removing it would shift every later image's index and so the "
                    f"data order) and continue with resume=auto")


def _decode_on_cpu(path: str, data: torch.Tensor) -> torch.Tensor:
    from torchvision.io import ImageReadMode, decode_image
    try:
        with warnings.catch_warnings():  # torchvision 0.29 points to torchcodec; these decoders still ship
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(data, mode=ImageReadMode.RGB)
    except Exception as e:
        raise _undecodable(path, e) from None


def _decode_batch_on(device, paths: list[str], files: list[torch.Tensor]) -> list[torch.Tensor]:
    """One batched ``decode_jpeg`` call on ``device``. If the batch holds a file it cannot take (ImageNet's train set
    has a PNG and some CMYK JPEGs under .JPEG names), each image is decoded by itself and those that still fail
    on the CPU (decode_image, as the workers do), then moved to ``device``."""
    from torchvision.io import ImageReadMode, decode_jpeg
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            return decode_jpeg(files, mode=ImageReadMode.RGB, device=device)
        except (RuntimeError, ValueError):
            images = []
            for path, data in zip(paths, files):
                try:
                    images.append(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
                except (RuntimeError, ValueError):
                    images.append(_decode_on_cpu(path, data).to(device))
            return images


def _first_line_of(error: Exception) -> str:
    """A DataLoader worker's exception arrives with the worker's traceback: keep our own one line."""
    last = str(error).strip().splitlines()[-1]
    return last.split("RunError: ", 1)[1] if "RunError: " in last else last


class ImageFolderData:
    """ImageNet-style folders, decoded by DataLoader workers (pinned memory, workers kept across epochs).

    The batch order is the same pure function of (seed, epoch) as for in-memory data, and each image's
    RandomResizedCrop and flip a pure function of (seed, epoch, image index) (``DecodedImages``).
    """

    def __init__(self, root: str, num_workers: int, image_size: int = 224, auto_augment: str | None = None,
                 repeated_aug: int = 0, decode: str | None = None, device_crop: str | None = None,
                 format: str | None = None, shard_group: int | None = None):
        from torchvision.transforms import v2
        policy = {None: [], "ra": [v2.RandAugment()], "ta_wide": [v2.TrivialAugmentWide()]}[auto_augment]
        train, val, classes = _shard_files(root) if format == "shards" else _folder_files(root)
        self.train = DecodedImages(train, v2.Compose([
            v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *policy]),
            train=True, on_device=decode == "device", batched_crop=device_crop == "batched")
        # torchvision's reference order: crop, flip, policy
        self.val = DecodedImages(val, v2.Compose([
            v2.Resize(int(image_size * 256 / 224), antialias=True), v2.CenterCrop(image_size)]),
            train=False, on_device=decode == "device")
        # images stay uint8 until they are on the training device (a quarter of float32's shared memory between the
        # workers and this process, and of the host-to-device copy); normalised there (_batches)
        self.num_workers, self.repeats = num_workers, max(repeated_aug or 0, 1)
        self.num_classes = len(classes)
        self.image_shape = (3, image_size, image_size)
        self.train_size = len(self.train)
        self.source = root + (f" ({str(root).rstrip('/')}/manifest.json)" if format == "shards" else "")
        self.test_y = val.labels
        self.test_split = None  # with split_validation: this data as it was, val/ for the final test_*
        self.shard_group = shard_group  # shards: the epoch's order reads this many shards at a time (null: all)
        self._orders: dict = {}
        self._train_batches, self._train_loader, self._val_loader = _Batches(), None, None

    def to(self, device):
        return self

    def split_validation(self, n: int) -> "ImageFolderData":
        """The same folders with ``n`` images of train/ held out (``held_out``, as for the in-memory datasets) and
        evaluated as val/ is, resized and centre-cropped; val/ stays aside as ``test_split``."""
        train, val = held_out(self.train_size, n)
        held = copy.copy(self)
        held.train, held.val = copy.copy(self.train), copy.copy(self.val)
        held.train.samples = self.train.samples.subset(train.tolist())
        held.val.samples = self.train.samples.subset(val.tolist())
        held.train_size, held.test_y = len(held.train), held.val.samples.labels
        held.source, held.test_split = f"{self.source}, {n} images of train/ held out", self
        held._train_batches, held._train_loader, held._val_loader, held._orders = _Batches(), None, None, {}
        return held

    def _loader(self, dataset, batches: "_Batches") -> torch.utils.data.DataLoader:
        """One loader per split for the whole run: its workers persist across epochs, and each epoch only swaps
        the list of index batches they are fed (the batch sampler is iterated in this process)."""
        return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=self.num_workers,
                                           collate_fn=packed_files if dataset.on_device else None,
                                           pin_memory=torch.cuda.is_available() and not dataset.on_device,
                                           persistent_workers=self.num_workers > 0)

    def train_micro_batches(self, epoch, first_step, plan, rank, seed, augment, device, mix=None):
        """This rank's micro-batches from ``first_step`` of ``epoch``. With MixUp/CutMix each micro-batch also
        loads its images' partners (drawn from the whole global batch, so the pairs do not depend on micro_batch or
        ranks): twice the decoding, the price of exactness."""
        per_rank = plan.micro_batch * plan.accum_steps
        batches, steps = [], []
        for j, (index, copies) in enumerate(self._epoch(plan.global_batch, seed, epoch)[first_step:]):
            step = epoch * plan.steps_per_epoch + first_step + j
            partner = mix.partners(len(index), seed, step) if mix else None
            for mine in self._rank_positions(rank, plan.world_size, per_rank).split(plan.micro_batch):
                at = torch.cat([mine, partner[mine]]) if mix else mine
                batches.append([(i, epoch, seed, c) for i, c in zip(index[at].tolist(), copies[at].tolist())])
                steps.append(step)
        yield from self._load(batches, steps, plan.micro_batch, seed, device, mix)

    def stream_micro_batches(self, steps, micro_batch, world_size, rank, seed, augment, device, mix=None):
        """This rank's micro-batches of the ``(step, index)`` given, each step's global batch the images ``index``:
        a changing batch (batch_schedule), which walks the image stream. Each image appears once per step, so its
        crop is drawn from (seed, step, image index). The steps pass through the workers in one go, so their queue
        runs on across the steps' boundaries; the training loop hands over as many steps as are known ahead (one
        under batch_schedule=adaptive, whose next batch depends on this step's gradients)."""
        batches, owners = [], []
        for step, index in steps:
            per_rank = len(index) // world_size
            partner = mix.partners(len(index), seed, step) if mix else None
            for mine in torch.arange(rank * per_rank, (rank + 1) * per_rank).split(micro_batch):
                at = torch.cat([mine, partner[mine]]) if mix else mine
                batches.append([(i, step, seed, 0) for i in index[at].tolist()])
                owners.append(step)
        yield from self._load(batches, owners, micro_batch, seed, device, mix)

    def one_step_micro_batches(self, index, step, micro_batch, world_size, rank, seed, augment, device, mix=None):
        """This rank's micro-batches of one step (``stream_micro_batches`` of that step alone)."""
        yield from self.stream_micro_batches([(step, index)], micro_batch, world_size, rank, seed, augment, device,
                                            mix)

    def _load(self, batches: list, steps: list[int], micro_batch: int, seed: int, device, mix):
        """Decode ``batches`` of keys through the run's one training loader (its workers persist), then mix each
        micro-batch with its partners (the second half of each batch) at its step."""
        self._train_batches.batches = batches
        if self._train_loader is None:
            self._train_loader = self._loader(self.train, self._train_batches)
        for step, (x, y) in zip(steps, _batches(self._train_loader, device)):
            if mix is not None:
                x, y = mix.apply(x[:micro_batch], y[:micro_batch], x[micro_batch:], y[micro_batch:], seed, step)
            yield x, y

    def _epoch(self, global_batch: int, seed: int, epoch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(image index, copy number) of every global batch of the epoch. With repeated augmentation (DeiT's
        RASampler), the first N/r images of the epoch's permutation, each r times in a row, copies 0..r-1."""
        if self.repeats == 1:
            return [(b, torch.zeros_like(b))
                    for b in global_batches(self.train_size, global_batch, seed, epoch, self.order)]
        n, r = self.train_size, self.repeats
        order = self.order(n, seed, epoch)[:-(-n // r)].repeat_interleave(r)[:n]
        copies = torch.arange(r).repeat(-(-n // r))[:n]
        usable = (n // global_batch) * global_batch
        return list(zip(order[:usable].split(global_batch), copies[:usable].split(global_batch)))

    def order(self, n: int, seed: int, epoch: int) -> torch.Tensor:
        """The epoch's order: a permutation of (seed, epoch), or with ``shard_group`` grouped by shard (the last
        epoch's kept: each step of a batch schedule asks again)."""
        if not self.shard_group:
            return epoch_order(n, seed, epoch)
        if (seed, epoch) not in self._orders:
            files = self.train.samples
            self._orders = {(seed, epoch): grouped_order(files.shard_of_positions(), len(files.names),
                                                         self.shard_group, seed, epoch)}
        return self._orders[(seed, epoch)]

    def _rank_positions(self, rank: int, world_size: int, per_rank: int) -> torch.Tensor:
        """Positions of this rank's images in each global batch: a contiguous slice, or with repeated augmentation
        every world_size-th position, so an image's copies land on different ranks (as DeiT's sampler)."""
        if self.repeats == 1:
            return torch.arange(rank * per_rank, (rank + 1) * per_rank)
        return torch.arange(rank, per_rank * world_size, world_size)

    def test_batches(self, rank, world_size, device, chunk: int = 256):
        if self._val_loader is None:
            idx = torch.arange(rank, len(self.val), world_size)
            self._val_loader = self._loader(self.val, _Batches([p.tolist() for p in idx.split(chunk)]))
        yield from _batches(self._val_loader, device)


def _batches(loader, device):
    """The loader's batches on ``device``: moved there, or with on-device decoding decoded there; on CUDA one batch
    ahead, on a side stream (``_ahead_on_side_stream``)."""
    dataset = loader.dataset

    def on_device():
        for batch in loader:
            if dataset.on_device:
                yield dataset.decode_batch(unpacked_files(batch), device)
            else:
                x, y = batch
                x = normalize(x.to(device, non_blocking=True), IMAGENET_MEAN, IMAGENET_STD)
                yield x, y.to(device, non_blocking=True)
    try:
        yield from _ahead_on_side_stream(on_device(), torch.device(device))
    except RunError as e:
        raise RunError(_first_line_of(e)) from None


def _ahead_on_side_stream(batches, device: torch.device):
    """On CUDA, the next batch's copy, decoding and crops are queued on a side stream before this one is handed
    over (timm's PrefetchLoader), so they run beside the training kernels instead of after them; the training
    stream waits for a batch only when it takes it. Elsewhere the batches as they come."""
    if device.type != "cuda":
        yield from batches
        return
    side, batches = torch.cuda.Stream(device), iter(batches)

    def queued():
        with torch.cuda.stream(side):
            return next(batches, None)
    ahead = queued()
    while ahead is not None:
        current = torch.cuda.current_stream(device)
        current.wait_stream(side)
        for t in ahead:
            t.record_stream(current)  # made on the side stream: not to be reused while training still reads it
        batch, ahead = ahead, queued()
        yield batch


def packed_files(items: list) -> tuple:
    """collate_fn for on-device decoding: a batch's files, of different lengths, travel as one tensor of their
    bytes and their sizes (a tensor per file would cost a shared-memory file descriptor each: a worker's 2
    prefetched batches of 512 would meet the common limit of 1,024 open files)."""
    keys, files, labels = zip(*items)
    return list(keys), torch.cat(files), [len(f) for f in files], list(labels)


def unpacked_files(batch: tuple) -> list:
    """(key, file bytes, label) items again, the bytes as views of the one tensor."""
    keys, data, sizes, labels = batch
    return list(zip(keys, data.split(sizes), labels))


def _folder_files(root: str) -> tuple[FolderFiles, FolderFiles, list[str]]:
    train, val = (image_folder(Path(root) / split) for split in ("train", "val"))
    if train.classes != val.classes:
        raise ConfigError(f"data.root={root}: train/ and val/ have different class folders "
                          f"({len(train.classes)} vs {len(val.classes)})")
    return FolderFiles(train.samples), FolderFiles(val.samples), train.classes


def _shard_files(root: str) -> tuple[ShardFiles, ShardFiles, list[str]]:
    manifest = read_manifest(root)
    return ShardFiles(root, "train", manifest), ShardFiles(root, "val", manifest), manifest["classes"]


def image_folder(folder: Path):
    """torchvision's ImageFolder for the file list and classes only (it decodes nothing here): the order of the
    samples is the images' index, in folders and in shards (scripts/make_shards.py)."""
    from torchvision import datasets
    try:
        return datasets.ImageFolder(str(folder), is_valid_file=lambda p: p.lower().endswith(IMAGE_SUFFIXES))
    except (FileNotFoundError, OSError) as e:
        raise ConfigError(f"{folder}: {str(e).splitlines()[0]} (every class folder needs at least one image)") from None


class _Batches:
    """A batch sampler whose list of index batches can be replaced between epochs."""

    def __init__(self, batches=()):
        self.batches = list(batches)

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


def check_imagenet(root: str | None) -> Path:
    if root is None:
        raise ConfigError("data=imagenet needs data.root: the folder holding train/ and val/ class folders")
    for split in ("train", "val"):
        folder = Path(root) / split
        if not folder.is_dir() or not any(p.is_dir() for p in folder.iterdir()):
            raise ConfigError(f"data.root={root} has no {split}/ folder of class folders (ImageFolder layout: "
                              f"{split}/<class>/<image>.JPEG)")

    classes = {}
    for split in ("train", "val"):
        classes[split] = sorted(p for p in (Path(root) / split).iterdir() if p.is_dir())
        for cls in classes[split]:
            files = list(cls.iterdir())
            if odd := next((f for f in files if f.suffix.lower() in UNREADABLE_IMAGES), None):
                raise ConfigError(f"{odd}: a {odd.suffix} image cannot be decoded here (torchvision.io reads "
                                  f"{', '.join(IMAGE_SUFFIXES)}): convert it, e.g. to .png")
            if not any(f.suffix.lower() in IMAGE_SUFFIXES for f in files):
                raise ConfigError(f"{cls} holds no image ({', '.join(IMAGE_SUFFIXES)}): every class folder needs "
                                  f"at least one, or remove the folder from train/ and val/ alike")
    train, val = ({p.name for p in classes[s]} for s in ("train", "val"))
    if only := sorted(val - train) or sorted(train - val):
        where, other = ("val", "train") if only[0] in val else ("train", "val")
        raise ConfigError(f"data.root={root}: {where}/{only[0]} has no class folder in {other}/: both need the same "
                          f"class folders (a label is the class's place in their sorted list)")
    return Path(root)


def check_cifar(name: str, cfg_data) -> None:
    _find_cifar(name, cfg_data.root)  # before any run dir exists: a missing dataset is one line


def load_imagenet(cfg_data) -> ImageFolderData:
    shards = cfg_data.format == "shards"
    root = cfg_data.root if shards else str(check_imagenet(cfg_data.root))
    if shards and root is None:
        check_shards(root)  # its one line
    return ImageFolderData(root, cfg_data.num_workers, auto_augment=cfg_data.auto_augment,
                           repeated_aug=cfg_data.repeated_aug, decode=cfg_data.decode,
                           device_crop=cfg_data.device_crop, format=cfg_data.format,
                           shard_group=cfg_data.shard_group)
