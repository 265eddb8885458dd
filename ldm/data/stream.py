"""The training step stream of a data config, from whichever source it names: an image folder, a latents cache
(both map-style, `PlannedStream`) or streamed tar shards (`ShardStream`)."""
from __future__ import annotations

from torch.utils.data import Dataset

from ldm.data.cache import CachedLatents
from ldm.data.folder import DataConfig, ImageFolder, PlannedStream, ShardStream


def open_stream(cfg: DataConfig, seed: int, rank: int, world: int, batch_size: int, accum: int):
    """The step stream of the configured source: a PlannedStream (folder, cache) or a ShardStream (tar shards)."""
    cfg.check()
    if cfg.shards:
        return ShardStream(cfg.shards, cfg, seed, rank, world, batch_size, accum)
    if cfg.cache:
        dataset: Dataset = CachedLatents(cfg.cache, cfg, seed)
    else:
        dataset = ImageFolder(cfg.path, cfg, seed)
    return PlannedStream(dataset, seed, rank, world, batch_size, accum, cfg.num_workers)
