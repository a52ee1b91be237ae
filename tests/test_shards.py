"""ImageNet from WebDataset shards (scripts/make_shards.py, engine/shards.py): the folder reader's images, labels and
order at every (seed, epoch, index), refusals before any step, and a writer that resumes and refuses other content."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tests.helpers import ROOT, TINY, checks, run_train

SCRIPT = ROOT / "scripts" / "make_shards.py"


def write_folder(root, per_class=6, val_per_class=3):
    """Two classes of JPEGs of mixed sizes, with a greyscale one, a CMYK one and a PNG in each class."""
    from PIL import Image
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", per_class), ("val", val_per_class)):
        for c in ("n01", "n02"):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                arr = torch.randint(0, 256, (30 + 4 * i, 44 - 3 * i, 3), generator=g, dtype=torch.uint8).numpy()
                image = Image.fromarray(arr).convert({1: "L", 2: "CMYK"}.get(i, "RGB"))
                image.save(root / split / c / f"{c}_{i}{'.png' if i == 3 else '.JPEG'}")


def make_shards(src, dst, *extra):
    sys.path.insert(0, str(SCRIPT.parent))
    import make_shards as script
    return script.main([str(src), str(dst), *map(str, extra)])


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    base = tmp_path_factory.mktemp("imagenet")
    write_folder(base / "folder")
    assert make_shards(base / "folder", base / "shards", "--shard-size", 5) == 0
    return base / "folder", base / "shards"


def imagenet(root, fmt, **extra):
    from engine.datasets_disk import ImageFolderData
    return ImageFolderData(str(root), extra.pop("num_workers", 0), 32, format=fmt, **extra)


@pytest.mark.parametrize("decode", ["workers", "device"])
def test_shards_give_the_folder_readers_images_and_labels_bit_for_bit(dataset, decode):
    folders, shards = (imagenet(root, fmt, decode=decode) for root, fmt in zip(dataset, ("folder", "shards"), strict=True))
    assert shards.train_size == folders.train_size == 12 and shards.test_y == folders.test_y
    assert [label for _, label in shards.train.samples] == [label for _, label in folders.train.samples]
    for split in ("train", "val"):
        a, b = getattr(folders, split), getattr(shards, split)
        keys = [(i, 3, 7, 0) for i in range(len(a))] if split == "train" else list(range(len(a)))
        if decode == "device":
            (xa, ya), (xb, yb) = (d.decode_batch([d[k] for k in keys], "cpu") for d in (a, b))
        else:
            (xa, ya), (xb, yb) = (tuple(zip(*(d[k] for k in keys), strict=True)) for d in (a, b))
            xa, xb = torch.stack(xa), torch.stack(xb)
        assert torch.equal(xa, xb) and list(ya) == list(yb)


def test_two_ranks_with_two_workers_each_see_every_image_of_an_epoch_once(dataset):
    folder, root = dataset
    plan = SimpleNamespace(global_batch=6, micro_batch=3, accum_steps=1, world_size=2, steps_per_epoch=2)

    def epoch(data, rank):
        return [x for x, _ in data.train_micro_batches(1, 0, plan, rank, 5, None, "cpu")]
    ranks = [epoch(imagenet(root, "shards", num_workers=2), r) for r in (0, 1)]
    whole = imagenet(folder, "folder")
    from engine.sampling import epoch_order
    expected = torch.stack([whole.train[(i, 1, 5, 0)][0] for i in epoch_order(12, 5, 1).tolist()]).float()
    seen = torch.cat([torch.cat([ranks[0][s], ranks[1][s]]) for s in range(2)])  # step 0's 6 images, then step 1's
    from engine.datasets_disk import IMAGENET_MEAN, IMAGENET_STD
    from engine.transforms import normalize
    assert torch.equal(seen, normalize(expected, IMAGENET_MEAN, IMAGENET_STD))


def test_a_run_on_shards_trains_as_the_run_on_folders(dataset, tmp_path):
    base = [o for o in TINY if not o.startswith("data")] + ["data=imagenet", "data.num_workers=1", "model=resnet18",
                                                             "batch=6", "micro_batch=3", "epochs=1", "warmup=none"]
    folders, a = run_train(tmp_path, [*base, f"data.root={dataset[0]}"], "folders")
    shards, b = run_train(tmp_path, [*base, f"data.root={dataset[1]}", "data.format=shards"], "shards")
    wa, wb = (torch.load(d / "checkpoints" / "last.pt", weights_only=False)["model"] for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa) and folders["test_acc"] == shards["test_acc"]


@pytest.mark.slow  # the fast tests above: the same images at every key, and a reader with no state of its own
@pytest.mark.parametrize("ranks", [1, 2])
def test_a_run_on_shards_killed_and_resumed_ends_as_the_uninterrupted_one(dataset, tmp_path, ranks):
    run = [o for o in TINY if not o.startswith("data")] + [
        "data=imagenet", "data.format=shards", f"data.root={dataset[1]}", "data.num_workers=2", "model=resnet18",
        "batch=6", "micro_batch=3", "epochs=3", "warmup=none", "checkpoint.every_steps=1", "logger.every_steps=1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = [sys.executable] + (["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
                                 if ranks > 1 else []) + [str(ROOT / "train.py"), *run]
    straight = tmp_path / "straight"
    subprocess.run([*launch, f"hydra.run.dir={straight}"], env=env, check=True, capture_output=True, timeout=300)
    killed = tmp_path / "killed"
    proc = subprocess.Popen([*launch, f"hydra.run.dir={killed}"], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not (killed / "checkpoints" / "last.pt").exists():
        time.sleep(0.05)
    for pid in [proc.pid, *descendants(proc.pid)]:  # every process of the run at once, as a node's failure
        os.kill(pid, signal.SIGKILL)
    proc.wait(timeout=60)
    stopped = torch.load(killed / "checkpoints" / "last.pt", weights_only=False)["step"]
    r = subprocess.run([*launch, "resume=auto", f"hydra.run.dir={killed}"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    a, b = (torch.load(d / "checkpoints" / "last.pt", weights_only=False)["model"] for d in (straight, killed))
    assert stopped < 6 and all(torch.equal(a[k], b[k]) for k in a)


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (torchrun's ranks start their own process groups: a group kill misses them)."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def _damage(root, how):
    manifest = json.loads((root / "manifest.json").read_text())
    shard = root / "train-000001.tar"
    if how == "missing":
        shard.unlink()
    elif how == "truncated":
        shard.write_bytes(shard.read_bytes()[:-1024])
    elif how == "checksum":
        data = bytearray(shard.read_bytes())
        data[700] ^= 0xFF  # inside the first image, the size unchanged
        shard.write_bytes(bytes(data))
    elif how == "manifest":
        manifest["splits"]["train"]["shards"][1]["count"] += 1
        manifest["splits"]["train"]["count"] += 1
        manifest["splits"]["train"]["labels"].append(0)
        (root / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("how, said", [
    ("missing", "train-000001.tar is missing: the manifest lists it"),
    ("truncated", "bytes and the manifest says"),
    ("checksum", "its SHA-256 is not the manifest's"),
    ("manifest", "holds 5 samples and the manifest says 6"),
])
def test_damaged_shards_are_one_line_before_any_step(dataset, tmp_path, how, said):
    root = tmp_path / "shards"
    shutil.copytree(dataset[1], root)
    _damage(root, how)
    r = checks([*(o for o in TINY if not o.startswith("data")), "data=imagenet", "data.format=shards", f"data.root={root}",
                f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and said in r.stderr and r.stderr.count("\n") == 1, r.stderr
    assert not (tmp_path / "run").exists()


def test_make_shards_resumes_refuses_other_content_and_names_what_it_cannot_read(dataset, tmp_path, capsys):
    folder, whole = dataset
    dst = tmp_path / "shards"
    shutil.copytree(whole, dst)
    (dst / "manifest.json").unlink()  # stopped halfway: the last shards and the manifest not yet written
    (dst / "val-000001.tar").unlink()
    (dst / ".tmp-val-000001.tar").write_bytes(b"half a shard")
    assert make_shards(folder, dst, "--shard-size", 5) == 0
    assert {p.name: p.read_bytes() for p in dst.iterdir() if not p.name.startswith(".")} == {
        p.name: p.read_bytes() for p in whole.iterdir()}
    assert make_shards(folder, dst, "--shard-size", 4) == 2  # other shards: refused, nothing written
    assert "describes other shards" in capsys.readouterr().err
    (dst / "notes.txt").write_text("mine")
    assert make_shards(folder, dst, "--shard-size", 5) == 2 and "holds notes.txt" in capsys.readouterr().err
    broken = tmp_path / "broken"
    shutil.copytree(folder, broken)
    os.symlink(tmp_path / "nowhere.JPEG", broken / "train" / "n02" / "n02_9.JPEG")  # listed, unreadable
    assert make_shards(broken, tmp_path / "out", "--shard-size", 5) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: 1 file(s) could not be read") and "n02_9.JPEG" in err
    assert not (tmp_path / "out" / "manifest.json").exists() and (tmp_path / "out" / "train-000000.tar").exists()


def _components(order, shard_of):
    """The shards an order reads together: shards whose first-to-last positions overlap, in order of reading."""
    seen = {}
    for place, i in enumerate(order.tolist()):
        first, _ = seen.get(int(shard_of[i]), (place, place))
        seen[int(shard_of[i])] = (first, place)
    components, end = [], -1
    for shard, (first, last) in sorted(seen.items(), key=lambda kv: kv[1]):
        if first > end:
            components.append([])
        components[-1].append(shard)
        end = max(end, last)
    return components


@pytest.mark.parametrize("group, expected_groups", [(1, 7), (2, 4), (3, 3), (7, 1), (50, 1)])
def test_a_grouped_order_reads_that_many_shards_at_a_time(group, expected_groups):
    from engine.sampling import epoch_order, grouped_order
    shard_of = torch.arange(7).repeat_interleave(torch.tensor([5, 5, 5, 5, 5, 5, 2]))  # 7 shards, the last short
    order = grouped_order(shard_of, 7, group, seed=3, epoch=2)
    assert sorted(order.tolist()) == list(range(32))  # every image once
    components = _components(order, shard_of)
    assert len(components) == expected_groups and all(len(c) <= group for c in components)
    assert torch.equal(order, grouped_order(shard_of, 7, group, seed=3, epoch=2))  # a pure function of (seed, epoch)
    assert not torch.equal(order, grouped_order(shard_of, 7, group, seed=3, epoch=3))
    if group >= 7:
        assert torch.equal(order, epoch_order(32, 3, 2))  # one group: the folder reader's order


def test_shard_group_orders_the_run_and_needs_shards(dataset, tmp_path):
    from engine.sampling import grouped_order
    data = imagenet(dataset[1], "shards", shard_group=1)
    plan = SimpleNamespace(global_batch=6, micro_batch=6, accum_steps=1, world_size=1, steps_per_epoch=2)
    batches = data._epoch(plan.global_batch, 5, 0)
    expected = grouped_order(data.train.samples.shard_of_positions(), 3, 1, 5, 0)
    assert torch.equal(torch.cat([b for b, _ in batches]), expected[:12])
    r = checks([*(o for o in TINY if not o.startswith("data")), "data=imagenet", f"data.root={dataset[0]}",
                "data.shard_group=2", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and "data.shard_group=2 groups the order by shard: it needs data.format=shards" in r.stderr


def test_shards_at_a_url_are_fetched_into_the_cache_and_read_alike(dataset, tmp_path, monkeypatch):
    """data.root as a URL: wids' downloader fetches the manifest and each shard into $WIDS_CACHE once (file:// here;
    https:// and gs:// take the same path through wids, not tested here)."""
    monkeypatch.setenv("WIDS_CACHE", str(tmp_path / "cache"))
    from engine.shards import check_shards
    url = f"file://{dataset[1]}"
    check_shards(url)
    local, remote = imagenet(dataset[1], "shards"), imagenet(url, "shards")
    keys = [(i, 1, 2, 0) for i in range(12)]
    assert all(torch.equal(local.train[k][0], remote.train[k][0]) for k in keys) and local.test_y == remote.test_y
    cached = sorted(p.name for p in (tmp_path / "cache").rglob("*.tar"))
    assert cached == sorted(p.name for p in dataset[1].glob("*.tar"))
    r = checks([*(o for o in TINY if not o.startswith("data")), "data=imagenet", "data.format=shards",
                f"data.root=file://{tmp_path / 'nowhere'}", f"hydra.run.dir={tmp_path / 'run'}"])
    assert r.returncode == 2 and "manifest.json cannot be fetched" in r.stderr and r.stderr.count("\n") == 1, r.stderr


def test_val_split_holds_out_the_same_images_of_the_shards_as_of_the_folders(dataset):
    folders, shards = (imagenet(root, fmt).split_validation(5) for root, fmt in zip(dataset, ("folder", "shards"),
                                                                                    strict=True))
    assert shards.train_size == folders.train_size == 7 and shards.test_y == folders.test_y
    for split in ("train", "val"):
        a, b = getattr(folders, split), getattr(shards, split)
        keys = [(i, 0, 1, 0) for i in range(len(a))] if split == "train" else list(range(len(a)))
        assert all(torch.equal(a[k][0], b[k][0]) and a[k][1] == b[k][1] for k in keys)
    assert shards.test_split.test_y == folders.test_split.test_y  # val/ stays aside as the test split


@pytest.mark.parametrize("local_rank, refused", [("0", True), ("1", False)])
def test_one_process_per_machine_reads_the_shards_for_their_checksums(dataset, tmp_path, monkeypatch, local_rank,
                                                                      refused):
    """Under torchrun every rank runs the checks; hashing every shard once per machine is enough (local rank 0),
    the others check sizes and sample counts."""
    from engine.datasets import DATASETS
    from engine.errors import ConfigError
    root = tmp_path / "shards"
    shutil.copytree(dataset[1], root)
    _damage(root, "checksum")
    for key, value in {"RANK": local_rank, "WORLD_SIZE": "2", "LOCAL_RANK": local_rank, "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}.items():
        monkeypatch.setenv(key, value)
    cfg = SimpleNamespace(name="imagenet", format="shards", root=str(root))
    if refused:
        with pytest.raises(ConfigError, match="SHA-256"):
            DATASETS["imagenet"].check(cfg)
    else:
        DATASETS["imagenet"].check(cfg)
