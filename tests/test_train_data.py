"""Training data: folder conventions, clear errors, exact rank/worker sharding, buckets, transforms, corrupt files."""
import io
import json
import tarfile
from collections import Counter
from pathlib import Path

import pytest
import torch
from PIL import Image

from ldm.data.folder import (DataConfig, ImageFolder, PlannedStream, ShardStream, make_buckets, nearest_bucket,
                             to_training_tensor)
from ldm.data.stream import open_stream

COLOURS = {"red": (230, 40, 40), "green": (40, 170, 60), "blue": (40, 90, 230), "yellow": (240, 210, 40)}


def square(colour: str, size=(64, 64)) -> Image.Image:
    img = Image.new("RGB", size, (20, 20, 20))
    img.paste(COLOURS[colour], (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
    return img


def write_folder(root: Path, n: int, sizes=((64, 64),), metadata: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        colour = list(COLOURS)[i % 4]
        square(colour, sizes[i % len(sizes)]).save(root / f"{i:03d}.png")
        if metadata:
            rows.append({"file_name": f"{i:03d}.png", "text": f"a {colour} square"})
        else:
            (root / f"{i:03d}.txt").write_text(f"a {colour} square")
    if metadata:
        (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def write_shards(root: Path, counts: list[int], corrupt: set[str] = frozenset()) -> list[str]:
    root.mkdir(parents=True, exist_ok=True)
    names = []
    for s, count in enumerate(counts):
        path = root / f"shard-{s:03d}.tar"
        with tarfile.open(path, "w") as tar:
            for i in range(count):
                key = f"s{s}-{i:03d}"
                colour = list(COLOURS)[i % 4]
                data = b"not an image" if key in corrupt else png_bytes(square(colour, (64 + 32 * (i % 2), 64)))
                for name, payload in ((f"{key}.png", data), (f"{key}.txt", f"a {colour} square".encode())):
                    info = tarfile.TarInfo(name)
                    info.size = len(payload)
                    tar.addfile(info, io.BytesIO(payload))
        names.append(str(path))
    return names


def cfg(**kw) -> DataConfig:
    return DataConfig(**{"resolution": 64, **kw})


def epoch_ids(streams, epoch: int) -> tuple[list, list[int]]:
    """All real sample ids the ranks see in one epoch, and each rank's number of steps."""
    ids, steps = [], []
    for stream in streams:
        n = 0
        for batches, _ in stream.steps(epoch):
            n += 1
            for b in batches:
                ids += [i for i, w in zip(b["ids"], b["weights"].tolist()) if w > 0]
                assert b["pixels"].shape[0] == len(b["ids"])
        steps.append(n)
    return ids, steps


# --- folders -----------------------------------------------------------------------------------------------------

def test_txt_captions_and_metadata_jsonl(tmp_path):
    a = ImageFolder(write_folder(tmp_path / "a", 5), cfg(), seed=0)
    b = ImageFolder(write_folder(tmp_path / "b", 5, metadata=True), cfg(), seed=0)
    assert [r.caption for r in a.records] == [r.caption for r in b.records] == [
        "a red square", "a green square", "a blue square", "a yellow square", "a red square"]
    item = a[(0, 2, (64, 64))]
    assert item["pixels"].shape == (3, 64, 64) and item["caption"] == "a blue square"
    assert -1.0 <= item["pixels"].min() and item["pixels"].max() <= 1.0


def test_clear_errors_before_training(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        ImageFolder(tmp_path / "empty", cfg(), 0)
    root = write_folder(tmp_path / "meta", 3, metadata=True)
    with pytest.raises(ValueError, match="caption column 'caption'"):
        ImageFolder(root, cfg(caption_column="caption"), 0)
    root = write_folder(tmp_path / "nocap", 3)
    (root / "001.txt").unlink()
    with pytest.raises(ValueError, match="no caption file, e.g. 001.png"):
        ImageFolder(root, cfg(), 0)
    with pytest.raises(FileNotFoundError):
        ImageFolder(tmp_path / "missing", cfg(), 0)
    with pytest.raises(ValueError, match="exactly one of"):
        open_stream(cfg(path=str(root), shards=str(root)), 0, 0, 1, 1, 1)


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    root = write_folder(tmp_path / "d", 8)
    (root / "002.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")  # a PNG signature, then nothing decodable
    good = (root / "005.png").read_bytes()
    (root / "005.png").write_bytes(good[: len(good) // 2])      # truncated
    stream = open_stream(cfg(path=str(root)), seed=0, rank=0, world=1, batch_size=4, accum=1)
    seen, skipped = [], []
    for batches, _ in stream.steps(0):
        for b in batches:
            seen += b["ids"]
            skipped += b["skipped"]
            assert torch.isfinite(b["pixels"]).all()
    assert sorted(seen) == [0, 1, 3, 4, 6, 7]
    assert sorted(Path(p).name for p in skipped) == ["002.png", "005.png"]


# --- sharding ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world,batch,accum,workers,bucketing", [
    (1, 4, 1, 0, False), (2, 2, 1, 0, False), (3, 2, 2, 2, False), (2, 3, 2, 0, True)])
def test_each_epoch_is_partitioned_across_ranks_and_workers(tmp_path, world, batch, accum, workers, bucketing):
    n = 23  # not a multiple of any global batch: the last batches are short and padded with weight 0
    root = write_folder(tmp_path / "d", n, sizes=((64, 64), (96, 64), (64, 128)))
    c = cfg(path=str(root), num_workers=workers, bucketing=bucketing, bucket_step=32, max_aspect=3.0)
    if bucketing:
        assert len({tuple(s) for s in ImageFolder(root, c, 0).sizes}) == 2
    streams = [open_stream(c, seed=3, rank=r, world=world, batch_size=batch, accum=accum) for r in range(world)]
    ids, steps = epoch_ids(streams, epoch=0)
    assert sorted(ids) == list(range(n))            # every sample once: none repeated, none dropped
    assert len(set(steps)) == 1                     # every rank takes the same number of steps
    ids1, _ = epoch_ids(streams, epoch=1)
    assert sorted(ids1) == list(range(n)) and ids1 != ids  # a new order every epoch


def test_plan_is_a_function_of_seed_and_epoch_and_global_batch(tmp_path):
    ds = ImageFolder(write_folder(tmp_path / "d", 10), cfg(), seed=0)
    one = PlannedStream(ds, seed=5, rank=0, world=1, batch_size=4, accum=1)
    two = [PlannedStream(ds, seed=5, rank=r, world=2, batch_size=2, accum=1) for r in range(2)]
    assert one.plan(0) == two[0].plan(0) == two[1].plan(0)  # same global batch: same steps, split differently
    assert one.plan(0) != one.plan(1)
    for gb in one.plan(0):
        parts = two[0].micro_batches(gb) + two[1].micro_batches(gb)
        assert sorted(i for p in parts for i in p) == sorted(gb)


@pytest.mark.parametrize("workers", [0, 2])
def test_shards_are_partitioned_across_ranks_and_workers(tmp_path, workers):
    counts = [5, 3, 7, 4, 6]
    shards = write_shards(tmp_path / "tars", counts, corrupt={"s2-004"})
    c = cfg(shards=str(tmp_path / "tars"), num_workers=workers, shuffle_buffer=4)
    streams = [ShardStream(shards, c, seed=1, rank=r, world=2, batch_size=2, accum=2) for r in range(2)]
    ids, _ = epoch_ids(streams, epoch=0)
    expected = [f"shard-{s:03d}.tar/s{s}-{i:03d}" for s, n in enumerate(counts) for i in range(n)]
    expected.remove("shard-002.tar/s2-004")         # the corrupt sample is skipped...
    assert sorted(ids) == sorted(expected)
    skipped = [s for st in streams for batches, _ in st.steps(0) for b in batches for s in b["skipped"]]
    assert skipped == ["shard-002.tar/s2-004"]       # ...and counted once


def test_shard_stream_resumes_at_its_position(tmp_path):
    write_shards(tmp_path / "tars", [5, 6, 4, 7])
    c = cfg(shards=str(tmp_path / "tars"), num_workers=2, shuffle_buffer=3, bucketing=True, bucket_step=32,
            max_aspect=3.0)
    stream = ShardStream(c.shards, c, seed=2, rank=0, world=1, batch_size=2, accum=1)
    full = [(b[0]["ids"], pos) for b, pos in stream.steps(0)]
    for k in (1, 3, len(full) - 2):
        rest = [b[0]["ids"] for b, _ in stream.steps(0, full[k - 1][1])]
        assert rest == [ids for ids, _ in full[k:]]


def test_shards_without_captions_give_a_clear_error(tmp_path):
    path = tmp_path / "x.tar"
    with tarfile.open(path, "w") as tar:
        data = png_bytes(square("red"))
        info = tarfile.TarInfo("a.png")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ValueError, match="no caption"):
        ShardStream(str(path), cfg(shards=str(path)), 0, 0, 1, 1, 1)
    with pytest.raises(FileNotFoundError):
        ShardStream(str(tmp_path / "none-{000..003}.tar"), cfg(), 0, 0, 1, 1, 1)


# --- buckets and transforms --------------------------------------------------------------------------------------

def test_buckets():
    buckets = make_buckets(512, 64, 2.0)
    assert buckets == [(320, 640), (384, 640), (448, 576), (512, 512), (576, 448), (640, 320), (640, 384)]
    for w, h in buckets:
        assert w % 64 == 0 and h % 64 == 0 and w * h <= 512 * 512 and max(w / h, h / w) <= 2.0
    assert nearest_bucket(1920, 1080, buckets) == (640, 384)
    assert nearest_bucket(1000, 1000, buckets) == (512, 512)


def test_transforms_are_deterministic_per_seed():
    img = Image.new("RGB", (100, 80), (20, 20, 20))
    img.paste(COLOURS["red"], (5, 20, 40, 60))  # left of centre: a flip shows
    a = to_training_tensor(img, (64, 64), seed=1, center_crop=False, random_flip=True)
    b = to_training_tensor(img, (64, 64), seed=1, center_crop=False, random_flip=True)
    assert a.shape == (3, 64, 64) and torch.equal(a, b)
    flips = Counter(bool(torch.equal(to_training_tensor(img, (64, 64), s, True, True),
                                     to_training_tensor(img, (64, 64), s, True, False))) for s in range(40))
    assert 8 < flips[False] < 32  # about half of the seeds flip
    centre = to_training_tensor(square("blue", (64, 64)), (64, 64), 0, True, False)
    assert torch.allclose(centre, centre.flip(-1), atol=1e-6)  # a centred symmetric square
