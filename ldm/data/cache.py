"""Reading a latents cache (written by `ldm cache-latents`, `ldm.training.latents_cache`): the map-style training source
whose items are the VAE posteriors of a data set, so that training never runs the VAE.

The cache is a directory:
    cache.json                     format, VAE fingerprint, scale factor, resolution, whether text/flips are stored
    index.jsonl                    one line per sample: {"shard", "row", "caption", "size": [w, h] (latent), "id"}
    latents-00000.safetensors ...  per sample row r: "r.mean", "r.std" (the VAE posterior, unscaled latents,
                                   so training still samples z = mean + std * noise), "r.mean_flip" and
                                   "r.std_flip" when data.random_flip is on, "r.text" (77, D) with --text
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ldm.data.folder import DataConfig, derive_seed, padding_item

CACHE_FORMAT = "ldm-latents-cache"
CACHE_VERSION = 1


def module_fingerprint(module: nn.Module) -> str:
    """A short digest of a module's weights (float64 sums per tensor): equal weights, equal fingerprint."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if t.is_floating_point():
            t = t.double()
            h.update(f"{name}:{tuple(t.shape)}:{t.sum().item():.12e}:{t.abs().sum().item():.12e}".encode())
    return h.hexdigest()[:16]


class CachedLatents(Dataset):
    """Map-style: item `(epoch, index, size)` is the cached posterior of sample `index` (-1: zero padding)."""

    def __init__(self, root: str | Path, cfg: DataConfig, seed: int):
        self.root, self.cfg, self.seed = Path(root), cfg, seed
        meta_path = self.root / "cache.json"
        if not meta_path.exists():
            raise FileNotFoundError(f"data.cache: {self.root} is not a latents cache (no cache.json); write one "
                                    "with `ldm cache-latents`")
        self.meta = json.loads(meta_path.read_text())
        if self.meta.get("format") != CACHE_FORMAT:
            raise ValueError(f"{meta_path} is not an ldm latents cache")
        self.index = [json.loads(line) for line in (self.root / "index.jsonl").read_text().splitlines() if line.strip()]
        if not self.index:
            raise ValueError(f"the latents cache {self.root} is empty")
        if cfg.random_flip and not self.meta["flip"]:
            raise ValueError(f"data.random_flip is on but {self.root} has no flipped latents; set "
                             "data.random_flip=false or rebuild the cache with it on")
        if cfg.resolution != self.meta["resolution"]:
            raise ValueError(f"{self.root} was encoded at data.resolution={self.meta['resolution']}, the config says "
                             f"{cfg.resolution}")
        self.sizes = [tuple(rec["size"]) for rec in self.index]
        self._files: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.index)

    def __getstate__(self) -> dict:  # open safetensors handles stay in their process
        return {**self.__dict__, "_files": {}}

    def check_model(self, sd, clip_skip: int) -> None:
        """The cache must come from this model's VAE (and text encoder, for stored embeddings)."""
        if self.meta["vae_fingerprint"] != module_fingerprint(sd.first_stage_model):
            raise ValueError(f"the latents cache {self.root} was made with a different VAE than the model's; "
                             "rebuild it with `ldm cache-latents` for this model")
        if self.meta["text"] and (self.meta["text_fingerprint"] != module_fingerprint(sd.cond_stage_model)
                                  or self.meta["clip_skip"] != clip_skip):
            raise ValueError(f"the text embeddings in {self.root} come from another text encoder or clip_skip; "
                             "rebuild the cache, or rebuild it without --text")

    def _open(self, shard: str):
        if shard not in self._files:
            from safetensors import safe_open

            self._files[shard] = safe_open(str(self.root / shard), "pt")
        return self._files[shard]

    def __getitem__(self, key: tuple[int, int, tuple[int, int]]) -> dict[str, Any]:
        epoch, index, (w, h) = key
        c = self.meta["latent_channels"]
        if index < 0:
            pad = {"latent_mean": torch.zeros(c, h, w), "latent_std": torch.zeros(c, h, w)}
            if self.meta["text"]:
                pad["text_emb"] = torch.zeros(*self.meta["text_shape"])
            return padding_item(pad)
        rec = self.index[index]
        f, row = self._open(rec["shard"]), rec["row"]
        u = torch.rand(3, generator=torch.Generator().manual_seed(derive_seed(self.seed, epoch, index, "augment")))
        suffix = "_flip" if self.cfg.random_flip and u[0] < 0.5 else ""  # the image path's flip coin
        item = {"latent_mean": f.get_tensor(f"{row}.mean{suffix}").float(),
                "latent_std": f.get_tensor(f"{row}.std{suffix}").float(),
                "caption": rec["caption"], "seed": derive_seed(self.seed, epoch, index), "id": index, "weight": 1.0}
        if self.meta["text"]:
            item["text_emb"] = f.get_tensor(f"{row}.text").float()
        return item
