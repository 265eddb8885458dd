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
    return _sha256(path, after_header=Path(path).suffix == ".safetensors")


def file_hash(path: str | Path) -> str:
    """A1111's textual inversion hash ("TI hashes"): the first 12 hex digits of the sha256 of the whole file."""
    return _sha256(path, after_header=False)


# (resolved path, inode, size, modification and change times, after_header) -> hash: a file is hashed once while
# it is unchanged (sha256 of a 150 MB LoRA: 0.12 s on 2 cores; a server hashes the file of every request naming it)
_HASHES: dict[tuple, str] = {}


def _sha256(path: str | Path, after_header: bool) -> str:
    stat = Path(path).stat()
    key = (str(Path(path).resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, after_header)
    if key not in _HASHES:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            if after_header:
                f.seek(8 + int.from_bytes(f.read(8), "little"))
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        _HASHES[key] = h.hexdigest()[:12]
    return _HASHES[key]


def find_by_hash(folder: str | Path, wanted: str) -> Path | None:
    """The LoRA file in `folder` whose `short_hash` is `wanted`, if any."""
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in EXTENSIONS and path.is_file() and short_hash(path) == wanted:
            return path
    return None
