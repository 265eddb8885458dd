"""The short hashes AUTOMATIC1111 writes into an image's infotext to name the adapter files it used, and the search
for a file by its hash (a replayed image whose LoRA was renamed). No torch: the command line uses it before loading
anything."""
from __future__ import annotations

import hashlib
from pathlib import Path

EXTENSIONS = (".safetensors", ".pt", ".ckpt", ".bin")


def short_hash(path: str | Path) -> str:
    """A1111's LoRA hash ("Lora hashes" in its infotext): the first 12 hex digits of the sha256 of a safetensors
    file after its header (so that editing the metadata keeps it), of the whole file for other formats."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        if Path(path).suffix == ".safetensors":
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def file_hash(path: str | Path) -> str:
    """A1111's textual inversion hash ("TI hashes"): the first 12 hex digits of the sha256 of the whole file."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:12]


def find_by_hash(folder: str | Path, wanted: str) -> Path | None:
    """The LoRA file in `folder` whose `short_hash` is `wanted`, if any."""
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in EXTENSIONS and path.is_file() and short_hash(path) == wanted:
            return path
    return None
