"""Dataset readers on small files written here in exactly the standard on-disk formats."""
import gzip
import pickle
import re
import struct
import subprocess
import sys

import pytest
import torch

from engine.config import DataConfig
from engine.datasets import check_data_available, load_data
from engine.errors import ConfigError
from engine.fashion_mnist import load_fashion_mnist, read_idx
from engine.transforms import Augment
from tests.helpers import ROOT, TINY, checks, load_cfg, run_train


def write_cifar(root, name="cifar10", n_train=40, n_test=20, bad_label=False):
    g = torch.Generator().manual_seed(0)
    classes = 10 if name == "cifar10" else 100
    folder = root / ("cifar-10-batches-py" if name == "cifar10" else "cifar-100-python")
    folder.mkdir(parents=True)
    key = b"labels" if name == "cifar10" else b"fine_labels"
    files = [f"data_batch_{i}" for i in range(1, 6)] if name == "cifar10" else ["train"]
    per = n_train // len(files)
    truth = {}
    for f, n in [(f, per) for f in files] + [("test_batch" if name == "cifar10" else "test", n_test)]:
        data = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy()
        labels = torch.randint(0, classes, (n,), generator=g).tolist()
        if bad_label:
            labels[0] = classes
        with open(folder / f, "wb") as fh:
            pickle.dump({b"data": data, key: labels, b"batch_label": b"x"}, fh)
        truth[f] = (data, labels)
    return truth


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_pickles_load_exactly(tmp_path, name):
    truth = write_cifar(tmp_path, name)
    data = load_data(DataConfig(name=name, val_split=0, root=str(tmp_path)))
    assert data.train_x.shape == (40, 3, 32, 32) and data.train_x.dtype == torch.uint8
    assert data.num_classes == (10 if name == "cifar10" else 100)
    first = "data_batch_1" if name == "cifar10" else "train"
    raw, labels = truth[first]
    assert torch.equal(data.train_x[0].reshape(-1), torch.as_tensor(raw[0]))  # channel-major rows, as released
    assert data.train_y[: len(labels)].tolist() == labels


def test_cifar_bad_labels_and_missing_folder(tmp_path):
    write_cifar(tmp_path / "a", bad_label=True)
    with pytest.raises(ConfigError, match="labels must lie in 0..9"):
        load_data(DataConfig(name="cifar10", val_split=0, root=str(tmp_path / "a")))
    with pytest.raises(ConfigError, match="holds no cifar-10-batches-py"):
        load_data(DataConfig(name="cifar10", val_split=0, root=str(tmp_path / "nothing")))


@pytest.mark.parametrize("model", ["resnet18", "vit_tiny"])
def test_cifar_trains_a_step(tmp_path, model):
    write_cifar(tmp_path / "data", n_train=80)
    summary, _ = run_train(tmp_path, [o for o in TINY if not o.startswith("data")] + [
        "data=cifar10", f"data.root={tmp_path / 'data'}", "data.val_split=16", f"model={model}", "batch=16",
        "max_steps=1", "micro_batch=8"])
    assert summary["steps"] == 1 and summary["global_batch"] == 16
    assert 0 <= summary["val_acc"] <= 1 and 0 <= summary["test_acc"] <= 1


def write_imagenet(root, classes=("n01", "n02"), per_class=3, size=40):
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(per_class):
                arr = torch.randint(0, 256, (size, size + 7, 3), generator=g, dtype=torch.uint8).numpy()
                Image.fromarray(arr).save(root / split / c / f"{c}_{i}.JPEG", quality=90)


def test_imagenet_folders_train_a_step(tmp_path):
    write_imagenet(tmp_path / "imagenet")
    summary, _ = run_train(tmp_path, [o for o in TINY if not o.startswith("data")] + [
        "data=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.num_workers=1", "model=resnet18", "batch=6",
        "micro_batch=3", "epochs=2", "warmup=none"])  # one worker, kept across both epochs
    assert summary["steps"] == 2 and summary["micro_batch"] == 3 and summary["accum_steps"] == 2
    assert summary["epochs"] == 2 and 0 <= summary["test_acc"] <= 1 and summary["val_acc"] is None  # val/: test


def test_imagenet_val_split_holds_images_of_train_out_and_keeps_val_for_the_test(tmp_path):
    """data.val_split on the folders: the same fixed held-out draw as the in-memory data (data.held_out), evaluated
    with val/'s resize and centre crop; val/ itself is the test split."""
    from engine.data import held_out
    write_imagenet(tmp_path / "imagenet", per_class=4)
    cfg = load_cfg(["data=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.val_split=3", "data.num_workers=0"])
    data = load_data(cfg.data)
    whole = data.test_split
    train, val = held_out(8, 3)
    assert data.train.samples == [whole.train.samples[i] for i in train.tolist()] and data.train_size == 5
    assert data.val.samples == [whole.train.samples[i] for i in val.tolist()] and len(data.test_y) == 3
    assert data.val.transform is whole.val.transform and data.train.transform is whole.train.transform
    assert all("/val/" in path for path, _ in whole.val.samples) and whole.test_split is None
    x, _ = next(data.test_batches(0, 1, torch.device("cpu")))
    assert x.shape == (3, 3, 224, 224)  # resized and centre-cropped as val/ is


def test_imagenet_missing_split_is_named(tmp_path):
    (tmp_path / "train" / "n01").mkdir(parents=True)
    with pytest.raises(ConfigError, match="no val/ folder"):
        check_data_available(DataConfig(name="imagenet", num_workers=0, val_split=0, root=str(tmp_path)))


def write_idx(path, tensor):
    header = struct.pack(">BBBB", 0, 0, 8, tensor.ndim) + struct.pack(f">{tensor.ndim}I", *tensor.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + tensor.numpy().tobytes())


def test_fashion_mnist_idx_from_data_root(tmp_path):
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (7, 28, 28), generator=g, dtype=torch.uint8)
    y = torch.randint(0, 10, (7,), generator=g, dtype=torch.uint8)
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", y)
    data = load_fashion_mnist(str(tmp_path))
    assert torch.equal(data.train_x[:, 0], x) and torch.equal(data.train_y, y.long())
    (tmp_path / "bad-idx.gz").write_bytes(gzip.compress(b"\x00\x00\x08\x03" + b"\x00" * 5))
    with pytest.raises(ConfigError, match="truncated or malformed"):
        read_idx(tmp_path / "bad-idx.gz")


def test_fashion_mnist_is_read_once_while_its_files_stay_the_same(tmp_path):
    """The preflight's read and the run's are one (the same tensors); a file rewritten since is read again."""
    from engine.fashion_mnist import load_fashion_mnist_once
    x, y = torch.zeros(5, 28, 28, dtype=torch.uint8), torch.arange(5, dtype=torch.uint8)
    for split in ("train", "t10k"):
        write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", x)
        write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", y)
    first = load_fashion_mnist_once(str(tmp_path))
    assert load_fashion_mnist_once(str(tmp_path)) is first
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", y.flip(0))
    again = load_fashion_mnist_once(str(tmp_path))
    assert again is not first and torch.equal(again.train_y, y.flip(0).long())


def test_augmentation_keeps_labels_aligned_and_is_exact():
    """Each image is cropped/flipped by its own drawn parameters; image i stays image i."""
    x = torch.arange(4 * 1 * 5 * 5, dtype=torch.uint8).view(4, 1, 5, 5)
    aug = Augment(padding=1, hflip=True)
    params = torch.tensor([[1, 1, 0], [1, 1, 1], [0, 2, 0], [2, 0, 1]])  # (dy, dx, flip); (1, 1, 0) = identity
    out = aug.apply(x, params)
    assert torch.equal(out[0], x[0])
    assert torch.equal(out[1], x[1].flip(-1))
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    assert torch.equal(out[2], padded[2, :, 0:5, 2:7])
    assert torch.equal(out[3], padded[3, :, 2:7, 0:5].flip(-1))
    drawn = aug.draw(8, seed=0, step=3)
    assert torch.equal(drawn, aug.draw(8, seed=0, step=3)) and not torch.equal(drawn, aug.draw(8, seed=0, step=4))


def imagenet_epoch(data, micro_batch, accum, world_size=1, seed=3, epoch=1):
    from types import SimpleNamespace
    plan = SimpleNamespace(micro_batch=micro_batch, accum_steps=accum, global_batch=micro_batch * accum * world_size,
                           world_size=world_size, steps_per_epoch=1)
    xs = []
    for rank in range(world_size):
        xs += [x for x, _ in data.train_micro_batches(epoch, 0, plan, rank, seed, None, "cpu")]
    return torch.cat(xs)


@pytest.mark.parametrize("policy", [None, "ra", "ta_wide"])
def test_imagenet_augmentation_is_a_function_of_seed_epoch_and_image(tmp_path, policy):
    """RandomResizedCrop, flip (and RandAugment / TrivialAugment) drawn from (seed, epoch, index): the same images
    with 0 or 2 workers, any micro-batch, 1 or 2 ranks (what README promises for every dataset); another epoch
    crops differently."""
    from engine.datasets_disk import ImageFolderData
    write_imagenet(tmp_path / "imagenet", per_class=4)
    root = str(tmp_path / "imagenet")
    data = ImageFolderData(root, num_workers=0, image_size=32, auto_augment=policy)
    reference = imagenet_epoch(data, 4, 2)
    assert torch.equal(imagenet_epoch(ImageFolderData(root, num_workers=2, image_size=32, auto_augment=policy), 2, 4),
                       reference)
    assert torch.equal(imagenet_epoch(data, 2, 2, world_size=2), reference)
    assert not torch.equal(imagenet_epoch(data, 4, 2, epoch=2), reference)
    if policy is not None:  # the policy does act
        assert not torch.equal(imagenet_epoch(ImageFolderData(root, num_workers=0, image_size=32), 4, 2), reference)


@pytest.mark.parametrize("policy", [None, "ra"])
def test_decoding_on_the_device_gives_the_images_the_workers_give(tmp_path, policy):
    """data.decode=device: the workers only read the files; the training process decodes each batch with one
    decode_jpeg call on the device (the CPU here: the same libjpeg-turbo), then transforms each image under its own
    key: bit for bit the workers' images, for training and validation. A PNG under a .JPEG name (ImageNet's train set
    has one) makes the batched call fail, and that batch is decoded image by image instead."""
    from PIL import Image

    from engine.datasets_disk import ImageFolderData
    write_imagenet(tmp_path / "imagenet", per_class=4)
    png = tmp_path / "imagenet" / "train" / "n01" / "n01_2.JPEG"
    Image.open(png).save(png, format="PNG")
    root = str(tmp_path / "imagenet")
    workers = ImageFolderData(root, num_workers=2, image_size=32, auto_augment=policy)
    on_device = ImageFolderData(root, num_workers=1, image_size=32, auto_augment=policy, decode="device")
    assert torch.equal(imagenet_epoch(on_device, 2, 4), imagenet_epoch(workers, 4, 2))
    assert torch.equal(imagenet_epoch(on_device, 2, 2, world_size=2), imagenet_epoch(workers, 4, 2))

    def val(data):
        return torch.cat([x for x, _ in data.test_batches(0, 1, "cpu", chunk=3)])
    assert torch.equal(val(on_device), val(workers))
    setting = DataConfig(name="imagenet", num_workers=0, val_split=0, root=root, decode="device")
    assert load_data(setting).train.on_device  # and the setting reaches the loader


def _smooth_images(sizes, seed=0):
    """Photo-like uint8 images: smooth colour fields plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for h, w in sizes:
        low = torch.rand(1, 3, max(h // 8, 2), max(w // 8, 2), generator=g) * 255
        image = torch.nn.functional.interpolate(low, size=(h, w), mode="bicubic") + torch.randn(1, 3, h, w,
                                                                                                 generator=g) * 8
        out.append(image.clamp(0, 255).round().to(torch.uint8)[0])
    return out


@pytest.mark.parametrize("size, budget, mean_at_most, p99_at_most", [
    (224, 2 ** 27, 0.5, 6), (224, 3 * 200 * 200, 0.5, 6),   # one canvas, or many small groups: the same crops
    (32, 2 ** 27, 3.5, 18),                                  # strong downscaling: box and triangle filters part more
])
def test_batched_crops_are_torchvisions_within_the_stated_tolerance(size, budget, mean_at_most, p99_at_most):
    """data.device_crop=batched resizes crops with roi_align; the reference is torchvision's
    resized_crop(antialias=True), image by image (|difference| on the 0..255 scale; docs/data.md states it)."""
    from torchvision.transforms.v2 import functional as F

    from engine.transforms import resized_crops
    g = torch.Generator().manual_seed(1)
    sizes = [tuple(torch.randint(40, 400, (2,), generator=g).tolist()) for _ in range(24)]
    images, boxes = _smooth_images(sizes), []
    for h, w in sizes:
        bh, bw = (torch.randint(4, n + 1, (1,), generator=g).item() for n in (h, w))
        boxes.append((torch.randint(0, h - bh + 1, (1,), generator=g).item(),
                      torch.randint(0, w - bw + 1, (1,), generator=g).item(), bh, bw))
    reference = torch.stack([F.resized_crop(i, *b, size=[size, size], antialias=True)
                             for i, b in zip(images, boxes, strict=True)])
    diff = (resized_crops(images, boxes, size, budget=budget).float() - reference.float()).abs()
    assert diff.mean() <= mean_at_most and diff.flatten().quantile(0.99) <= p99_at_most


@pytest.mark.parametrize("policy", [None, "ra"])
def test_batched_crops_take_the_per_image_paths_boxes_flips_and_policy(tmp_path, policy):
    """The batched path draws each image's box, flip and policy from its key in the per-image path's order, so a
    run's images are the per-image run's up to the resize (a different box or flip would differ by far more)."""
    from PIL import Image

    from engine.datasets_disk import ImageFolderData
    for c in ("n01", "n02"):
        for split in ("train", "val"):
            (tmp_path / split / c).mkdir(parents=True)
        for i, image in enumerate(_smooth_images([(120 + 9 * i, 90 + 13 * i) for i in range(4)], seed=int(c[1:]))):
            for split in ("train", "val"):
                Image.fromarray(image.permute(1, 2, 0).numpy()).save(tmp_path / split / c / f"{c}_{i}.JPEG",
                                                                     quality=95)
    per_image = imagenet_epoch(ImageFolderData(str(tmp_path), 0, 64, auto_augment=policy, decode="device"), 4, 2)
    batched = imagenet_epoch(ImageFolderData(str(tmp_path), 0, 64, auto_augment=policy, decode="device",
                                             device_crop="batched"), 4, 2)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1) * 255  # back to the 0..255 scale
    diff = ((batched - per_image) * std).abs()
    assert diff.mean() <= (1.0 if policy is None else 2.0), diff.mean()
    flipped = ((batched.flip(-1) - per_image) * std).abs()
    assert diff.mean() < flipped.mean() / 4  # flips agree


def test_imagenet_under_a_changing_batch_sees_the_same_images_at_any_micro_batch_or_ranks(tmp_path):
    """A batch schedule walks the image stream (a step may straddle two epochs): each step's images, crops and
    MixUp/CutMix pairs are the same for micro-batches 6, 3 (decoded on the device) and 1 rank or 2."""
    from engine.datasets_disk import ImageFolderData
    from engine.sampling import stream_indices
    from engine.transforms import Mix
    write_imagenet(tmp_path / "imagenet", per_class=4)
    root = str(tmp_path / "imagenet")
    index = stream_indices(8, seed=3, start=5, count=6)  # images 5..10 of the stream: the end of epoch 0, then 1

    def step(data, micro, ranks, mix=None):
        return torch.cat([x for r in range(ranks)
                          for x, _ in data.one_step_micro_batches(index, 7, micro, ranks, r, 3, None, "cpu", mix)])
    data = ImageFolderData(root, num_workers=0, image_size=32)
    for mix in (None, Mix(0.2, 1.0, 2)):
        reference = step(data, 6, 1, mix)
        assert torch.equal(step(ImageFolderData(root, 2, 32, decode="device"), 3, 1, mix), reference)
        assert torch.equal(step(data, 3, 2, mix), reference)
    assert not torch.equal(step(data, 6, 1), torch.cat([x for x, _ in data.one_step_micro_batches(
        index, 8, 6, 1, 0, 3, None, "cpu")]))  # another step, other crops
    # steps known ahead (a ramp) pass through the workers in one go: the same images as one step at a time
    steps = [(7, index), (8, stream_indices(8, seed=3, start=11, count=4))]
    workers = ImageFolderData(root, num_workers=2, image_size=32)
    for mix in (None, Mix(0.2, 1.0, 2)):
        together = torch.cat([x for x, _ in workers.stream_micro_batches(steps, 2, 1, 0, 3, None, "cpu", mix)])
        apart = torch.cat([x for s, i in steps for x, _ in data.one_step_micro_batches(i, s, 2, 1, 0, 3, None, "cpu", mix)])
        assert torch.equal(together, apart)


def test_an_imagenet_batch_ramp_resumes_bit_exact(tmp_path):
    write_imagenet(tmp_path / "imagenet", per_class=4)
    run = [o for o in TINY if not o.startswith("data")] + [
        "data=imagenet", f"data.root={tmp_path / 'imagenet'}", "data.num_workers=1", "model=resnet18", "batch=8",
        "batch_schedule=ramp", "batch_schedule.start=4", "batch_schedule.epochs=1", "micro_batch=4", "epochs=2",
        "warmup=none"]
    straight, straight_dir = run_train(tmp_path, run, "straight")
    assert straight["steps"] == 3 and straight["images"] == 16  # 4, 4, then 8
    run_train(tmp_path, run + ["max_steps=1"], "resumed")  # inside the first epoch's steps, read ahead together
    resumed, resumed_dir = run_train(tmp_path, run + ["resume=auto"], "resumed")
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=False)["model"] for d in (straight_dir, resumed_dir))
    assert resumed["steps"] == 3 and all(torch.equal(a[k], b[k]) for k in a)
    r = checks([*run, "data.repeated_aug=2", f"hydra.run.dir={tmp_path / 'ra'}"])  # its copies need a constant batch
    assert r.returncode == 2 and r.stderr.startswith("error: data.repeated_aug=2 deals each global batch"), r.stderr
    assert r.stderr.count("\n") == 1 and not (tmp_path / "ra").exists()


def test_auto_augment_is_refused_for_in_memory_data(tmp_path):
    r = checks([*TINY, "data.auto_augment=ra", f"hydra.run.dir={tmp_path / 'r'}"])
    assert r.returncode == 2 and r.stderr.startswith("error: data.auto_augment=ra runs per image"), r.stderr
    assert not (tmp_path / "r").exists()


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_an_undecodable_image_stops_the_run_with_one_line_naming_it(tmp_path, decode):
    write_imagenet(tmp_path / "imagenet")
    bad = tmp_path / "imagenet" / "train" / "n02" / "n02_1.JPEG"
    bad.write_bytes(bad.read_bytes()[:200])  # truncated mid-scan
    r = subprocess.run([sys.executable, "train.py", *[o for o in TINY if not o.startswith("data")], "data=imagenet",
                        f"data.root={tmp_path / 'imagenet'}", "data.num_workers=1", "model=resnet18", "batch=6",
                        "micro_batch=3", "epochs=2", "warmup=none", f"data.decode={decode}",
                        f"hydra.run.dir={tmp_path / 'run'}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 1 and r.stderr.count("\n") == 1, r.stderr[-3000:]
    assert r.stderr.startswith(f"error: {bad} cannot be decoded") and "resume=auto" in r.stderr


def test_an_empty_class_folder_is_one_line(tmp_path):
    write_imagenet(tmp_path / "imagenet")
    (tmp_path / "imagenet" / "val" / "n03").mkdir()
    with pytest.raises(ConfigError, match="n03 holds no image"):
        check_data_available(DataConfig(name="imagenet", num_workers=0, val_split=0, root=str(tmp_path / "imagenet")))


def _save_image(path):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()).save(path)


@pytest.mark.parametrize("damage,message", [
    (lambda r: _save_image(r / "val" / "n03" / "a.JPEG"), "val/n03 has no class folder in train/"),
    (lambda r: _save_image(r / "train" / "n00" / "a.JPEG"), "train/n00 has no class folder in val/"),
    (lambda r: _save_image(r / "train" / "n01" / "x.bmp"), "x.bmp: a .bmp image cannot be decoded here"),
    (lambda r: _save_image(r / "val" / "n02" / "x.tif"), "x.tif: a .tif image cannot be decoded here"),
])
def test_imagenet_folders_that_would_fail_mid_run_are_refused_first(tmp_path, damage, message):
    """A class only in val/ (its labels would shift) and a .bmp that ImageFolder lists but decode_image cannot read
    were found after the run dir existed (the .bmp mid-run); both are now the preflight's one line."""
    write_imagenet(tmp_path / "imagenet", per_class=1)
    damage(tmp_path / "imagenet")
    with pytest.raises(ConfigError, match=re.escape(message)):
        check_data_available(DataConfig(name="imagenet", num_workers=0, val_split=0, root=str(tmp_path / "imagenet")))


def test_repeated_augmentation_puts_an_images_copies_on_different_ranks(tmp_path):
    """DeiT's RASampler (data.repeated_aug=2) over 2 ranks: each image of a global batch appears once on each rank,
    with its own crop; the epoch then covers half the images, each twice."""
    from engine.datasets_disk import ImageFolderData
    write_imagenet(tmp_path / "imagenet", per_class=4)
    data = ImageFolderData(str(tmp_path / "imagenet"), num_workers=0, image_size=32, repeated_aug=2)
    (index, copies), = data._epoch(8, seed=3, epoch=1)
    rank0, rank1 = (index[data._rank_positions(r, 2, 4)] for r in (0, 1))
    assert sorted(rank0.tolist()) == sorted(rank1.tolist()) and len(set(rank0.tolist())) == 4
    assert sorted(copies[data._rank_positions(0, 2, 4)].tolist()) == [0] * 4
    x = imagenet_epoch(data, 2, 2, world_size=2)  # rank 0's 4 images, then rank 1's: the same images, other crops
    assert not torch.equal(x[:4], x[4:])
    r = checks([*TINY, "data.repeated_aug=3", f"hydra.run.dir={tmp_path / 'r'}"])
    assert r.returncode == 2 and "data.repeated_aug is not a setting of 'data' as selected" in r.stderr  # imagenet's


def test_imagenet_mixup_pairs_do_not_depend_on_micro_batch_workers_or_ranks(tmp_path):
    from engine.datasets_disk import ImageFolderData
    from engine.transforms import Mix
    write_imagenet(tmp_path / "imagenet", per_class=4)
    root, mix = str(tmp_path / "imagenet"), Mix(0.2, 1.0, 2)

    def epoch(data, micro, accum, world_size=1):
        from types import SimpleNamespace
        plan = SimpleNamespace(micro_batch=micro, accum_steps=accum, global_batch=micro * accum * world_size,
                               world_size=world_size, steps_per_epoch=1)
        return torch.cat([x for r in range(world_size)
                          for x, _ in data.train_micro_batches(1, 0, plan, r, 3, None, "cpu", mix)])
    reference = epoch(ImageFolderData(root, 0, 32), 8, 1)
    assert torch.equal(epoch(ImageFolderData(root, 2, 32), 2, 4), reference)
    assert torch.equal(epoch(ImageFolderData(root, 0, 32), 2, 2, world_size=2), reference)
    assert not torch.equal(imagenet_epoch(ImageFolderData(root, 0, 32), 8, 1), reference)  # the mixing does act


def test_workers_ship_uint8_and_the_training_process_normalises(tmp_path):
    """8 workers x 2 prefetched batches of float32 ImageNet images is about 2.5 GB of /dev/shm per rank (a container
    without --ipc=host dies with a bus error): the workers' batches are uint8, a quarter of that, and what the loop
    receives is normalised float32 (ImageNet's mean and std)."""
    from engine.datasets_disk import IMAGENET_MEAN, IMAGENET_STD, ImageFolderData
    write_imagenet(tmp_path / "imagenet", per_class=4)
    data = ImageFolderData(str(tmp_path / "imagenet"), num_workers=1, image_size=32)
    image, _ = data.train[(0, 0, 3, 0)]
    assert image.dtype == torch.uint8 and image.shape == (3, 32, 32)
    loader = data._loader(data.train, type(data._train_batches)([[(0, 0, 3, 0), (1, 0, 3, 0)]]))
    (x, y), = list(loader)
    assert x.dtype == torch.uint8 and x.shape == (2, 3, 32, 32)
    (ready, _), = list(__import__("engine.datasets_disk", fromlist=["_batches"])._batches(loader, "cpu"))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    assert ready.dtype == torch.float32
    torch.testing.assert_close(ready, (x.float() / 255 - mean) / std, rtol=1e-5, atol=1e-5)


def test_device_decoding_sends_a_batch_of_files_as_one_tensor():
    """One shared-memory tensor per batch, not one per file (each costs a file descriptor: "received 0 items of
    ancdata" at the common limit of 1,024)."""
    from engine.datasets_disk import packed_files, unpacked_files
    files = [torch.randint(0, 256, (n,), dtype=torch.uint8) for n in (5, 17, 1, 9)]
    items = [((i, 0, 3, 0), f, i % 2) for i, f in enumerate(files)]
    batch = packed_files(items)
    assert sum(torch.is_tensor(part) for part in batch) == 1 and batch[1].numel() == 32
    back = unpacked_files(batch)
    assert [k for k, _, _ in back] == [k for k, _, _ in items] and [lab for *_, lab in back] == [0, 1, 0, 1]
    assert all(torch.equal(a, b) for (_, a, _), (_, b, _) in zip(back, items, strict=True))


def test_synthetic_images_are_the_int64_draws_of_their_seed():
    """make_synthetic draws uint8 (faster); the images are those of the int64 formula at the same seed."""
    from engine.data import make_synthetic
    data = make_synthetic(64, 16, 8, 3, 10)
    g = torch.Generator().manual_seed(12345)
    y = torch.randint(0, 10, (64,), generator=g)
    x = torch.randint(0, 64, (64, 3, 8, 8), generator=g) + (y * 191 // 9)[:, None, None, None]
    assert torch.equal(data.train_y, y) and torch.equal(data.train_x, x.to(torch.uint8))
