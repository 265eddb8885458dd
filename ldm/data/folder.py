"""Training data: captioned image folders and WebDataset tar shards, with bucketing, crops, flips and exact
rank/worker sharding.

Sources
    image folder   `x.png` + `x.txt`, or a `metadata.jsonl` of {"file_name": ..., "text": ...} (the Hugging Face
                   imagefolder convention; the caption column is configurable)
    tar shards     WebDataset layout: members `key.jpg|png|webp` + `key.txt|json`, streamed (local paths, http(s)
                   URLs or `pipe:COMMAND`), so the data set may be larger than the disk

Every randomness is a pure function of (seed, epoch, sample): the shuffle, the crop and the flip here, and the
noise, timestep and caption dropout in the training loop (`sample_seed` travels with each sample). Nothing is
carried from one step to the next, so resuming at a step boundary reproduces the uninterrupted run bit for bit,
and a sample gets the same noise whatever the number of ranks or the batch size.

How an epoch is split (map-style data: folders and latent caches)
    The epoch's samples are shuffled within each bucket and cut into *global batches* of
    G = batch_size x grad_accum x world_size samples, which are shuffled in turn. Optimizer step s uses global
    batch s; its G samples are split into grad_accum x world_size micro-batches and rank r takes micro-batches
    r, r + world, ... So every sample is used exactly once per epoch, on one rank. A bucket's last global batch
    may be short: its samples are spread evenly and an empty micro-batch becomes a weight-0 padding batch (its
    gradient is exactly zero), so no sample is repeated or dropped and every rank takes the same number of steps.
Streamed shards
    The epoch's shard list is shuffled, and shard i goes to the (rank, worker) slot i mod (world x workers).
    Ranks may run out at different steps: the training loop then pads the exhausted ranks with weight-0 batches
    until every rank is out. The position (batches consumed per worker) is saved in checkpoints.

A corrupt or unreadable image is skipped (never replaced by anything) and counted in the batch's `skipped`.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import math
import os
import re
import subprocess
import tarfile
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, IterableDataset, get_worker_info

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError)
Batch = dict[str, Any]  # pixels | latent_mean + latent_std (+ text_emb), captions, seeds, weights, ids, skipped
Size = tuple[int, int]  # (width, height) in pixels, or in latents for a latent cache


@dataclass(frozen=True)
class DataConfig:
    path: str | None = None          # image folder (x.png + x.txt, or metadata.jsonl)
    shards: str | tuple[str, ...] | None = None  # WebDataset tars: dir, glob, "a-{000..009}.tar", URLs, or a list
    cache: str | None = None         # a latents cache written by `ldm cache-latents`
    caption_column: str = "text"     # metadata.jsonl / .json field holding the caption
    resolution: int = 512            # side of the square training size (the bucket area with bucketing)
    center_crop: bool = True         # else a random crop
    random_flip: bool = False        # horizontal flip with probability 1/2
    bucketing: bool = False          # aspect-ratio buckets of about resolution**2 pixels
    bucket_step: int = 64            # bucket sides are multiples of this
    max_aspect: float = 2.0          # buckets span aspect ratios 1/max_aspect .. max_aspect
    caption_dropout: float = 0.1     # probability of training on the empty prompt (for classifier-free guidance)
    num_workers: int = 0             # DataLoader worker processes per rank
    shuffle_buffer: int = 1000       # samples in the streaming shuffle buffer (shards only)

    def check(self) -> None:
        sources = [name for name in ("path", "shards", "cache") if getattr(self, name)]
        if len(sources) != 1:
            raise ValueError(f"data: give exactly one of data.path, data.shards or data.cache "
                             f"(got {sources or 'none'})")
        if self.resolution % 8 or self.resolution <= 0:
            raise ValueError(f"data.resolution must be a positive multiple of 8, got {self.resolution}")
        if not 0.0 <= self.caption_dropout <= 1.0:
            raise ValueError(f"data.caption_dropout must be in [0, 1], got {self.caption_dropout}")


def derive_seed(*parts: object) -> int:
    """A 63-bit seed that is a pure function of `parts` (e.g. (seed, epoch, sample id, purpose))."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2 ** 63 - 1)


# --- buckets and transforms ----------------------------------------------------------------------------------------

def make_buckets(resolution: int, step: int, max_aspect: float) -> list[Size]:
    """(w, h) sizes, multiples of `step`: for each short side, the longest long side that keeps the area within
    resolution**2 and the aspect ratio within max_aspect; in both orientations."""
    area, buckets = resolution * resolution, set()
    for short in range(max(step, int(resolution / math.sqrt(max_aspect)) // step * step), resolution + 1, step):
        long = min(area // short, int(short * max_aspect)) // step * step
        if long >= short:
            buckets |= {(long, short), (short, long)}
    return sorted(buckets)


def nearest_bucket(width: int, height: int, buckets: list[Size]) -> Size:
    ratio = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[0] / b[1]) - ratio), -b[0] * b[1]))


def decode_image(source: str | Path | bytes) -> Image.Image | None:
    """An RGB image fully decoded, or None when the file is missing, truncated or not an image."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            img.load()
            rgb = img.convert("RGB")
        return rgb if min(rgb.size) > 0 else None
    except UNREADABLE:
        return None


def image_size(source: str | Path | bytes) -> Size | None:
    """(w, h) from the header alone, or None when it cannot be read."""
    try:
        with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
            return img.size if min(img.size) > 0 else None
    except UNREADABLE:
        return None


def to_training_tensor(img: Image.Image, size: Size, seed: int, center_crop: bool, random_flip: bool) -> Tensor:
    """Resize to cover `size`, crop (centre or random) and maybe flip: (3, h, w) in [-1, 1]."""
    w, h = size
    u = torch.rand(3, generator=torch.Generator().manual_seed(seed))  # flip coin, crop x, crop y: always drawn
    scale = max(w / img.width, h / img.height)
    new = (max(w, round(img.width * scale)), max(h, round(img.height * scale)))
    img = img.resize(new, Image.Resampling.BICUBIC)
    if center_crop:
        left, top = (new[0] - w) // 2, (new[1] - h) // 2
    else:
        left, top = int(u[1] * (new[0] - w + 1)), int(u[2] * (new[1] - h + 1))
    img = img.crop((left, top, left + w, top + h))
    if random_flip and u[0] < 0.5:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0


# --- image folders -------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Record:
    path: str
    caption: str
    size: Size  # the training size (bucket) of this image


def scan_folder(root: str | Path, cfg: DataConfig) -> tuple[list[Record], int]:
    """The folder's (image, caption) records, and how many listed images could not be read."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path: no such directory: {root}")
    meta = root / "metadata.jsonl"
    if meta.exists():
        pairs = []
        for n, line in enumerate(meta.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{meta}:{n} is not valid JSON ({e})") from None
            if "file_name" not in row or cfg.caption_column not in row:
                raise ValueError(f"{meta}:{n} has no 'file_name' or no caption column '{cfg.caption_column}' "
                                 f"(its fields: {sorted(row)}); set data.caption_column to the caption field")
            pairs.append((root / row["file_name"], str(row[cfg.caption_column])))
    else:
        images = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
        uncaptioned = [p for p in images if not p.with_suffix(".txt").exists()]
        if uncaptioned:
            raise ValueError(f"{len(uncaptioned)} of {len(images)} images in {root} have no caption file, e.g. "
                             f"{uncaptioned[0].relative_to(root)} (expected {uncaptioned[0].with_suffix('.txt').name});"
                             " add x.txt captions or a metadata.jsonl")
        pairs = [(p, p.with_suffix(".txt").read_text().strip()) for p in images]
    if not pairs:
        raise ValueError(f"the data set in {root} is empty: no images with captions (x.png + x.txt, or a "
                         "metadata.jsonl with file_name and text)")
    square = (cfg.resolution, cfg.resolution)
    buckets = make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect) if cfg.bucketing else None
    records, unreadable = [], 0
    for path, caption in pairs:
        size = image_size(path) if buckets else square
        if size is None or not path.exists():
            unreadable += 1
            continue
        records.append(Record(str(path), caption, nearest_bucket(*size, buckets) if buckets else square))
    if not records:
        raise ValueError(f"none of the {len(pairs)} images in {root} could be read")
    return records, unreadable


class ImageFolder(Dataset):
    """Map-style: item `(epoch, index, size)` is the transformed image `index` (index -1: padding of `size`)."""

    def __init__(self, root: str | Path, cfg: DataConfig, seed: int):
        self.cfg, self.seed = cfg, seed
        self.records, self.unreadable = scan_folder(root, cfg)
        self.sizes = [r.size for r in self.records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int, Size]) -> dict[str, Any]:
        epoch, index, size = key
        if index < 0:
            return padding_item({"pixels": torch.zeros(3, size[1], size[0])})
        rec = self.records[index]
        img = decode_image(rec.path)
        if img is None:
            return {"skipped": rec.path}
        pixels = to_training_tensor(img, rec.size, derive_seed(self.seed, epoch, index, "augment"),
                                    self.cfg.center_crop, self.cfg.random_flip)
        return {"pixels": pixels, "caption": rec.caption, "seed": derive_seed(self.seed, epoch, index), "id": index,
                "weight": 1.0}


def padding_item(tensors: dict[str, Tensor]) -> dict[str, Any]:
    return {**tensors, "caption": "", "seed": 0, "id": -1, "weight": 0.0}


def collate(items: list[dict[str, Any]]) -> Batch:
    """Stack the readable items; unreadable ones are counted in `skipped`. A micro-batch left with no readable
    item becomes one weight-0 padding item, shaped like the first planned one."""
    skipped = [it["skipped"] for it in items if "skipped" in it]
    real = [it for it in items if "skipped" not in it]
    if not real:
        raise RuntimeError("collate: a micro-batch with no readable item and no padding shape")  # see PlannedStream
    tensor_keys = [k for k, v in real[0].items() if isinstance(v, Tensor)]
    batch: Batch = {k: torch.stack([it[k] for it in real]) for k in tensor_keys}
    batch["captions"] = [it["caption"] for it in real]
    batch["seeds"] = torch.tensor([it["seed"] for it in real], dtype=torch.int64)
    batch["weights"] = torch.tensor([it["weight"] for it in real], dtype=torch.float32)
    batch["ids"] = [it["id"] for it in real]
    batch["skipped"] = skipped
    return batch


class _Collate:
    """Collate with a padding fallback: the last key of each planned micro-batch is a padding key of its size,
    used only when every real item in it was unreadable."""

    def __call__(self, items: list[dict[str, Any]]) -> Batch:
        fallback, items = items[-1], items[:-1]
        if all("skipped" in it for it in items):
            batch = collate([fallback])
            batch["skipped"] = [it["skipped"] for it in items]
            return batch
        return collate(items)


class PlannedStream:
    """This rank's micro-batches for every optimizer step of an epoch, planned from (seed, epoch); see above."""

    def __init__(self, dataset: Dataset, seed: int, rank: int, world: int, batch_size: int, accum: int,
                 num_workers: int = 0):
        self.dataset, self.seed, self.rank, self.world = dataset, seed, rank, world
        self.batch_size, self.accum, self.num_workers = batch_size, accum, num_workers
        self.global_batch = batch_size * accum * world

    def plan(self, epoch: int) -> list[list[int]]:
        """The epoch's global batches (dataset indices sharing one size), in order."""
        g = torch.Generator().manual_seed(derive_seed(self.seed, epoch, "plan"))
        by_size: dict[Size, list[int]] = {}
        for i, size in enumerate(self.dataset.sizes):
            by_size.setdefault(tuple(size), []).append(i)
        batches = []
        for size in sorted(by_size):
            idx = by_size[size]
            order = [idx[j] for j in torch.randperm(len(idx), generator=g).tolist()]
            batches += [order[k:k + self.global_batch] for k in range(0, len(order), self.global_batch)]
        return [batches[j] for j in torch.randperm(len(batches), generator=g).tolist()]

    def micro_batches(self, global_batch: list[int]) -> list[list[int]]:
        """This rank's `accum` slices of one global batch (slot m * world + rank), sizes differing by at most 1."""
        slots = self.accum * self.world
        n = len(global_batch)
        bounds = [k * (n // slots) + min(k, n % slots) for k in range(slots + 1)]
        return [global_batch[bounds[s]:bounds[s + 1]] for s in range(self.rank, slots, self.world)]

    def steps(self, epoch: int, position: dict | None = None) -> Iterator[tuple[list[Batch], dict]]:
        plan = self.plan(epoch)
        start = (position or {}).get("step_in_epoch", 0)
        keys = []
        for gb in plan[start:]:
            size = tuple(self.dataset.sizes[gb[0]])
            for mb in self.micro_batches(gb):
                keys.append([(epoch, i, size) for i in mb] + [(epoch, -1, size)])
        loader = DataLoader(self.dataset, batch_sampler=keys, collate_fn=_Collate(), num_workers=self.num_workers)
        it = iter(loader)
        for s in range(start, len(plan)):
            yield [next(it) for _ in range(self.accum)], {"step_in_epoch": s + 1}

    def padding_batch(self) -> Batch:
        return _Collate()([self.dataset[(0, -1, tuple(self.dataset.sizes[0]))]])


# --- WebDataset tar shards -------------------------------------------------------------------------------------------

def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard names from a list, a directory (its *.tar), a glob, a brace range `a-{000..009}.tar` or URLs."""
    if isinstance(spec, (list, tuple)):
        return [s for item in spec for s in expand_shards(item)]
    match = re.search(r"\{(\d+)\.\.(\d+)\}", spec)
    if match:
        lo, hi = match.group(1), match.group(2)
        names = [spec[:match.start()] + str(i).zfill(len(lo)) + spec[match.end():] for i in range(int(lo), int(hi) + 1)]
        return [s for name in names for s in expand_shards(name)]
    if spec.startswith(("http://", "https://", "pipe:")):
        return [spec]
    if os.path.isdir(spec):
        found = sorted(glob.glob(os.path.join(spec, "*.tar")))
    elif any(c in spec for c in "*?["):
        found = sorted(glob.glob(spec))
    else:
        found = [spec] if os.path.exists(spec) else []
    if not found:
        raise FileNotFoundError(f"data.shards: no tar shards found for {spec!r}")
    return found


def open_shard(name: str):
    if name.startswith(("http://", "https://")):
        return urllib.request.urlopen(name)  # noqa: S310 - a URL the user configured
    if name.startswith("pipe:"):
        return subprocess.Popen(name[5:], shell=True, stdout=subprocess.PIPE).stdout  # noqa: S602 - user's command
    return open(name, "rb")


def tar_samples(name: str, caption_column: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard in order: {"key", "image": bytes | None, "caption": str | None}."""
    current: dict[str, Any] | None = None
    with open_shard(name) as stream, tarfile.open(fileobj=stream, mode="r|*") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = os.path.basename(member.name)
            if "." not in base or base.startswith("."):
                continue
            key = os.path.join(os.path.dirname(member.name), base.split(".", 1)[0])
            ext = base.split(".", 1)[1].lower()
            if current is None or current["key"] != key:
                if current is not None:
                    yield current
                current = {"key": key, "image": None, "caption": None}
            data = tar.extractfile(member).read()
            if "." + ext in IMAGE_EXTENSIONS:
                current["image"] = data
            elif ext in ("txt", "caption"):
                current["caption"] = data.decode("utf-8", "replace").strip()
            elif ext == "json" and current["caption"] is None:
                try:
                    value = json.loads(data).get(caption_column)
                except (json.JSONDecodeError, AttributeError):
                    value = None
                current["caption"] = None if value is None else str(value)
    if current is not None:
        yield current


class ShardSamples(IterableDataset):
    """One rank's part of an epoch of tar shards, as whole micro-batches. Worker w of rank r reads the shards
    i with i mod (world x workers) = r x workers + w. Logical worker ids are rotated by `position["next_worker"]`
    on resume, so that the DataLoader's round robin continues where it stopped."""

    def __init__(self, shards: list[str], cfg: DataConfig, seed: int, epoch: int, rank: int, world: int,
                 batch_size: int, position: dict | None):
        self.shards, self.cfg, self.seed, self.epoch = shards, cfg, seed, epoch
        self.rank, self.world, self.batch_size = rank, world, batch_size
        self.position = position or {}
        self.buckets = (make_buckets(cfg.resolution, cfg.bucket_step, cfg.max_aspect) if cfg.bucketing
                        else [(cfg.resolution, cfg.resolution)])

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        workers = info.num_workers if info else 1
        worker = ((info.id if info else 0) + self.position.get("next_worker", 0)) % workers
        skip = self.position.get("consumed", [0] * workers)[worker]
        slots = self.world * workers
        order = torch.randperm(len(self.shards), generator=torch.Generator().manual_seed(
            derive_seed(self.seed, self.epoch, "shards"))).tolist()
        mine = [self.shards[j] for n, j in enumerate(order) if n % slots == self.rank * workers + worker]
        for n, (samples, skipped) in enumerate(self._batches(mine, worker)):
            if n >= skip:  # batches before the resume position are re-planned from headers, not decoded
                yield self._decode(samples, skipped, worker, n)

    def _batches(self, shards: list[str], worker: int) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
        """(samples of one size, ids skipped since the last batch), through a seeded shuffle buffer. Sizes come
        from the image headers, so replaying this to a resume position decodes nothing."""
        rng = torch.Generator().manual_seed(derive_seed(self.seed, self.epoch, self.rank, worker, "buffer"))
        pending: dict[Size, list[dict[str, Any]]] = {}
        buffer: list[dict[str, Any]] = []
        skipped: list[str] = []

        def route(sample: dict[str, Any]) -> list[dict[str, Any]] | None:
            size = image_size(sample["image"]) if sample["image"] is not None else None
            if size is None or sample["caption"] is None:
                skipped.append(sample["id"])
                return None
            bucket = nearest_bucket(*size, self.buckets)
            pending.setdefault(bucket, []).append({**sample, "size": bucket})
            return pending.pop(bucket) if len(pending[bucket]) == self.batch_size else None

        def drain(keep: int) -> Iterator[tuple[list[dict[str, Any]], list[str]]]:
            while len(buffer) > keep:
                out = route(buffer.pop(int(torch.randint(len(buffer), (1,), generator=rng))))
                if out:
                    yield out, skipped[:]
                    skipped.clear()

        for shard in shards:
            for sample in tar_samples(shard, self.cfg.caption_column):
                buffer.append({**sample, "id": f"{os.path.basename(shard)}/{sample['key']}"})
                yield from drain(self.cfg.shuffle_buffer)
        yield from drain(0)
        for bucket in sorted(pending):
            yield pending[bucket], skipped[:]
            skipped.clear()
        if skipped:  # unreadable samples after the last batch are reported on a padding batch
            yield [], skipped

    def _decode(self, samples: list[dict[str, Any]], skipped: list[str], worker: int, n: int) -> Batch:
        items: list[dict[str, Any]] = []
        skipped = list(skipped)
        for s in samples:
            img = decode_image(s["image"])
            if img is None:
                skipped.append(s["id"])
                continue
            pixels = to_training_tensor(img, s["size"], derive_seed(self.seed, self.epoch, s["id"], "augment"),
                                        self.cfg.center_crop, self.cfg.random_flip)
            items.append({"pixels": pixels, "caption": s["caption"], "id": s["id"], "weight": 1.0,
                          "seed": derive_seed(self.seed, self.epoch, s["id"])})
        w, h = samples[0]["size"] if samples else self.buckets[0]
        batch = collate(items or [padding_item({"pixels": torch.zeros(3, h, w)})])
        batch.update(skipped=skipped, worker=worker, worker_batch=n)
        return batch


class ShardStream:
    """Steps of `accum` micro-batches from this rank's share of the shards. The stream ends when this rank's
    shards are exhausted; the training loop pads it until every rank is (see `padding_batch`)."""

    def __init__(self, shards: str | list[str], cfg: DataConfig, seed: int, rank: int, world: int,
                 batch_size: int, accum: int):
        self.shards = expand_shards(shards)
        self.cfg, self.seed, self.rank, self.world = cfg, seed, rank, world
        self.batch_size, self.accum = batch_size, accum
        self.workers = max(cfg.num_workers, 1)
        if len(self.shards) < world * self.workers:
            warnings.warn(f"{len(self.shards)} shards for {world} ranks x {self.workers} workers: some workers "
                          "get no data (use at least as many shards as ranks x workers)", stacklevel=2)
        samples = tar_samples(self.shards[0], cfg.caption_column)
        first = next(samples, None)
        samples.close()
        if first is None:
            raise ValueError(f"data.shards: the first shard {self.shards[0]} holds no samples")
        if first["caption"] is None:
            raise ValueError(f"data.shards: sample {first['key']!r} of {self.shards[0]} has no caption (.txt, or "
                             f".json with field '{cfg.caption_column}'); set data.caption_column")

    def steps(self, epoch: int, position: dict | None = None) -> Iterator[tuple[list[Batch], dict]]:
        position = dict(position or {"consumed": [0] * self.workers, "next_worker": 0})
        if len(position["consumed"]) != self.workers:
            raise ValueError(f"the checkpoint's data position is for {len(position['consumed'])} workers per rank; "
                             f"resume streamed shards with data.num_workers={len(position['consumed'])}")
        dataset = ShardSamples(self.shards, self.cfg, self.seed, epoch, self.rank, self.world, self.batch_size,
                               position)
        loader = DataLoader(dataset, batch_size=None, num_workers=self.cfg.num_workers)
        consumed, step = list(position["consumed"]), []
        for batch in loader:
            consumed[batch["worker"]] = batch["worker_batch"] + 1
            step.append(batch)
            if len(step) == self.accum:
                yield step, {"consumed": consumed[:], "next_worker": (batch["worker"] + 1) % self.workers}
                step = []
        if step:
            yield step, {"consumed": consumed[:], "next_worker": (step[-1]["worker"] + 1) % self.workers}

    def padding_batch(self) -> Batch:
        r = self.cfg.resolution
        return collate([padding_item({"pixels": torch.zeros(3, r, r)})])
