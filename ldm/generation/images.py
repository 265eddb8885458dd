"""Images in and out: tensor <-> PIL, PNG files with reproducible metadata, safe file naming.

Every PNG carries two text chunks:
- `parameters`: AUTOMATIC1111's infotext (prompt, `Negative prompt:`, then `Steps: .., Sampler: .., ...`), which
  A1111, ComfyUI and most image browsers parse;
- `ldm`: JSON with every parameter needed for an exact replay (`ldm txt2img --from-png`).

Files are written atomically and never overwrite: the PNG is written to a temporary file in the output folder,
then hard-linked to the first free name (a link fails if the name exists, so two writers cannot collide), and
the temporary name is removed. An interrupted run leaves only complete files.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor

LDM_CHUNK = "ldm"
A1111_CHUNK = "parameters"


# --- tensors <-> PIL -----------------------------------------------------------------------------------------

def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] -> RGB PIL images (rounded to the nearest 8-bit value)."""
    x = ((images.detach().float().cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).numpy()) for a in x]


def from_pil(image: Image.Image) -> Tensor:
    """An RGB PIL image -> (1, 3, H, W) float32 in [-1, 1]."""
    a = np.asarray(image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(a).permute(2, 0, 1)[None] / 127.5 - 1.0


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully (so a truncated file fails here), as RGB."""
    with load_image_raw(path) as im:
        return im.convert("RGB")


def init_image_size(size: tuple[int, int], width: int | None, height: int | None,
                    multiple: int = 8) -> tuple[int, int]:
    """img2img sizing of an image of `size` (w, h): its own size rounded down to a multiple of 8 (a crop of at most
    7 px at the right and bottom), unless width/height ask for another size (the other side keeping the aspect)."""
    if width is None and height is None:
        w, h = size[0] // multiple * multiple, size[1] // multiple * multiple
        if w == 0 or h == 0:
            raise ValueError(f"init image is {size[0]}x{size[1]}; it must be at least {multiple}x{multiple}")
        return w, h
    w = width if width is not None else round(size[0] * height / size[1] / multiple) * multiple
    h = height if height is not None else round(size[1] * width / size[0] / multiple) * multiple
    return w, h


def fit_init_image(image: Image.Image, width: int | None, height: int | None, multiple: int = 8) -> Image.Image:
    """The init image at `init_image_size`: cropped when no size is asked for, else resized with Lanczos."""
    w, h = init_image_size(image.size, width, height, multiple)
    if width is None and height is None:
        return image.crop((0, 0, w, h)) if (w, h) != image.size else image
    return image.resize((w, h), Image.Resampling.LANCZOS)


def make_grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (all the size of the first) into a near-square grid, row by row."""
    cols = cols or max(1, int(len(images) ** 0.5 + 0.999))
    rows = (len(images) + cols - 1) // cols
    w, h = images[0].size
    grid = Image.new("RGB", (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


# --- metadata ------------------------------------------------------------------------------------------------

def infotext(p: dict[str, Any]) -> str:
    """A1111's `parameters` text for one image."""
    lines = [p.get("prompt", "")]
    if p.get("negative_prompt"):
        lines.append(f"Negative prompt: {p['negative_prompt']}")
    fields = [("Steps", p.get("steps")), ("Sampler", p.get("sampler_display")), ("Schedule type", p.get("schedule")),
              ("CFG scale", p.get("guidance")), ("Seed", p.get("seed")),
              ("Size", f"{p['width']}x{p['height']}" if "width" in p else None),
              ("Model hash", (p.get("model_sha256") or "")[:10] or None), ("Model", p.get("model")),
              ("Denoising strength", p.get("strength", p.get("hires_denoise"))), ("Clip skip", p.get("clip_skip") if p.get("clip_skip", 1) != 1 else None),
              ("Mask blur", p.get("mask_blur")), ("Masked content", p.get("masked_content")),
              ("Inpaint area", {"whole": "Whole picture", "masked": "Only masked"}.get(p.get("inpaint_area", "whole"))
               if "mask_blur" in p else None), ("Masked area padding", p.get("inpaint_padding")),
              ("Hires upscale", p.get("hires_scale")), ("Hires steps", p.get("hires_steps") or None),
              ("Hires upscaler", p.get("hires_upscaler")),
              ("Refiner", f"{p['refiner_model']} [{(p.get('refiner_sha256') or '')[:10]}]".replace(" []", "")
               if p.get("refiner_model") else None), ("Refiner switch at", p.get("refiner_switch")),
              ("Lora hashes", _hashes(f"{name}: {h}" for name, _, h in p.get("lora_hashes") or [])),
              ("TI hashes", _hashes(f"{name}: {h}" for name, h in p.get("ti_hashes") or [])),
              ("Version", f"ldm {p['version']}" if "version" in p else None)]
    lines.append(", ".join(f"{k}: {_quote(v)}" for k, v in fields if v is not None))
    return "\n".join(lines)


def _hashes(entries) -> str | None:
    """A1111's "name: hash, name: hash" list, None when empty."""
    return ", ".join(entries) or None


def _quote(value: Any) -> str:
    """A1111 quotes a value that holds a separator, so that parsing splits it correctly."""
    text = str(value)
    return json.dumps(text) if any(c in text for c in ',:"\n') else text


_FIELD = re.compile(r'\s*([\w ]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')


def parse_infotext(text: str) -> dict[str, str]:
    """Parse A1111 infotext into {"prompt", "negative_prompt", "Steps", "Sampler", ...} (the way A1111 does)."""
    lines = text.strip().split("\n")
    last = lines.pop() if lines and _FIELD.match(lines[-1]) and "Steps:" in lines[-1] else ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        if line.startswith("Negative prompt:"):
            in_negative = True
            line = line[len("Negative prompt:"):].strip()
        (negative if in_negative else prompt).append(line)
    out = {"prompt": "\n".join(prompt), "negative_prompt": "\n".join(negative)}
    for key, value in _FIELD.findall(last):
        value = value.strip()
        out[key.strip()] = json.loads(value) if value.startswith('"') else value
    return out


def read_png_params(path: str | Path) -> dict[str, Any]:
    """The `ldm` replay parameters stored in a PNG written by ldm."""
    image = load_image_raw(path)
    text = image.info.get(LDM_CHUNK) if hasattr(image, "info") else None
    if not text:
        raise ValueError(f"{path} has no ldm metadata (was it written by ldm? A1111 infotext alone is not enough "
                         "for an exact replay)")
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: the ldm metadata is not valid JSON ({e})") from None


def load_image_raw(path: str | Path) -> Image.Image:
    """Open an image file fully, in its own mode; a missing, unreadable, truncated or oversized file raises
    FileNotFoundError or ValueError with one line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image not found: {path}")
    try:
        im = Image.open(path)
        im.load()
        return im
    except Image.DecompressionBombError as e:  # PIL's guard against images that unpack to gigabytes
        raise ValueError(f"cannot read image {path}: {e} Resize it below that first.") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image {path}: {e}") from None


# --- writing -------------------------------------------------------------------------------------------------

def check_outdir(outdir: str | Path) -> Path:
    """Check, before any work is done, that the output folder exists and is writable or can be created; nothing
    is created here (`save_png` creates it with the first image), so a run that fails leaves no empty folder."""
    outdir = Path(outdir)
    if outdir.exists() and not outdir.is_dir():
        raise ValueError(f"output path {outdir} exists and is not a folder; choose another with --outdir")
    existing = outdir
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"output folder {outdir} is not writable: {existing} is a file; choose another with --outdir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"output folder {outdir} is not writable; choose another with --outdir")
    return outdir


_NUMBERED = re.compile(r"^(\d{5})-")


def next_index(outdir: Path) -> int:
    """1 + the highest `NNNNN-` prefix in the folder (A1111's numbering)."""
    indices = [int(m.group(1)) for p in outdir.iterdir() if (m := _NUMBERED.match(p.name))]
    return max(indices, default=-1) + 1


def png_metadata(params: dict[str, Any]) -> PngImagePlugin.PngInfo:
    """Both metadata chunks of an image made with `params`: A1111's infotext and ldm's JSON."""
    info = PngImagePlugin.PngInfo()
    info.add_text(A1111_CHUNK, infotext(params))
    info.add_text(LDM_CHUNK, json.dumps(params, sort_keys=True))
    return info


def png_bytes(image: Image.Image, params: dict[str, Any]) -> bytes:
    """`image` as PNG bytes with its metadata chunks (what the web API sends)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=png_metadata(params))
    return buffer.getvalue()


def read_png_text(image: Image.Image) -> tuple[str, dict[str, Any]]:
    """The A1111 infotext of an image ("" if none) and its parsed fields."""
    text = image.info.get(A1111_CHUNK, "")
    return text, (parse_infotext(text) if text else {})


def save_png(image: Image.Image, outdir: str | Path, stem: str, params: dict[str, Any]) -> Path:
    """Write `image` with both metadata chunks as `NNNNN-{stem}.png`, atomically, never overwriting."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    info = png_metadata(params)
    fd, tmp = tempfile.mkstemp(prefix=".ldm-", suffix=".png.tmp", dir=outdir)
    try:
        os.chmod(tmp, default_file_mode())  # mkstemp makes 0600; give the PNG the mode of any new file
        with os.fdopen(fd, "wb") as f:
            image.save(f, format="PNG", pnginfo=info)
            f.flush()
            os.fsync(f.fileno())
        index = next_index(outdir)
        while True:
            target = outdir / f"{index:05d}-{stem}.png"
            try:
                os.link(tmp, target)  # atomic, and fails if `target` exists: never overwrites
                return target
            except FileExistsError:
                index += 1
    finally:
        os.unlink(tmp)


def default_file_mode() -> int:
    """The mode `open()` gives a new file under the current umask (mkstemp and safetensors use 0600)."""
    mask = os.umask(0)  # the only portable way to read the umask is to set it
    os.umask(mask)
    return 0o666 & ~mask


def file_sha256(path: str | Path, chunk: int = 1 << 24) -> str:
    """sha256 of a file, cached by (path, size, mtime) in ~/.cache/ldm/hashes.json (hashing 4 GB takes seconds)."""
    path = Path(path).resolve()
    st = path.stat()
    cache_file = Path(os.environ.get("LDM_CACHE", Path.home() / ".cache" / "ldm")) / "hashes.json"
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}"
    try:
        cache = json.loads(cache_file.read_text())
    except (OSError, json.JSONDecodeError):
        cache = {}
    if key in cache:
        return cache[key]
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    cache[key] = h.hexdigest()
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        os.replace(tmp, cache_file)
    except OSError:
        pass  # a read-only home only costs re-hashing next time
    return cache[key]
