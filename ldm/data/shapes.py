"""The procedural shapes data set: one filled shape on a plain background, 64x64 RGB, deterministic from a seed.

Every caption follows one grammar, so that an evaluator can parse any prompt back into its attributes:

    "{size} {colour} {shape} on the {position}, {background} background"
    e.g. "large red circle on the left, blue background"

| attribute  | values                                                                    |
|------------|---------------------------------------------------------------------------|
| size       | small (bounding box 16 px), large (32 px), at 64x64                       |
| colour     | red, green, blue, yellow, purple, orange, white, black (see `COLOURS`)    |
| shape      | circle, square, triangle (upright isosceles: apex up, base = bbox width)  |
| position   | left, center, right: horizontal centre at 1/4, 1/2, 3/4 of the width      |
| background | any colour but the shape's own                                           |

That is 2 sizes x 8 colours x 3 shapes x 3 positions x 7 backgrounds = 1008 captions (`all_specs`). The
(colour, shape, background) triples of `HELD_OUT_TRIPLES` never appear in the train split: a model is scored on
them separately, to see whether it composes what it has not seen.

Rendering is exact area coverage: each pixel is the fraction of its area that the shape covers (4x4 sub-pixel
samples), mixed linearly between the two colours. Edges are therefore smooth, a sub-pixel jitter moves the shape
by less than a pixel instead of snapping, and every pixel is one of only 17 mixtures of the two palette colours.
A pixel with coverage above 1/2 is "in" the shape, so the counted area is the geometric area to within a
pixel row, which is what `ldm.demo.eval` relies on.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (230, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 90, 230),
    "yellow": (240, 210, 40),
    "purple": (150, 60, 190),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, int] = {"small": 16, "large": 32}  # bounding-box side in px at REFERENCE_SIZE
POSITIONS: dict[str, float] = {"left": 0.25, "center": 0.5, "right": 0.75}  # x of the centre / width
REFERENCE_SIZE = 64  # the image side that SIZES and JITTER are given for; other sides scale them
SUPERSAMPLE = 4  # sub-pixel samples per side when computing coverage

# Per-sample jitter of the training images: centre offset up to +-2 px in x and y, bbox side scaled by 0.9-1.1.
JITTER_PX = 2.0
JITTER_SCALE = 0.1

Split = Literal["train", "heldout", "all"]

# 16 of the 168 (colour, shape, background) triples (9.5%). Rule, with colours in `COLOURS` order
# c0..c7: colour c_i is held out on backgrounds c_(i+1) and c_(i+3) (mod 8), with the shapes cycled. So every
# colour is held out exactly twice as a shape (with two different shapes) and twice as a background, every shape
# 5-6 times, and no (colour, background) pair twice. Hence each part of each held-out triple is seen in training:
# the (colour, shape) pair on 6 other backgrounds, the (colour, background) pair with the 2 other shapes, and
# the (shape, background) pair with at least 5 other colours. 96 of the 1008 captions are held out.
HELD_OUT_TRIPLES: frozenset[tuple[str, str, str]] = frozenset({
    ("red", "circle", "green"), ("red", "triangle", "yellow"),
    ("green", "square", "blue"), ("green", "circle", "purple"),
    ("blue", "triangle", "yellow"), ("blue", "square", "orange"),
    ("yellow", "circle", "purple"), ("yellow", "triangle", "white"),
    ("purple", "square", "orange"), ("purple", "circle", "black"),
    ("orange", "triangle", "white"), ("orange", "square", "red"),
    ("white", "circle", "black"), ("white", "triangle", "green"),
    ("black", "square", "red"), ("black", "circle", "blue"),
})

_CAPTION = re.compile(r"(?P<size>\w+) (?P<colour>\w+) (?P<shape>\w+) on the (?P<position>\w+), "
                      r"(?P<background>\w+) background")


@dataclass(frozen=True)
class ShapeSpec:
    """One point of the grammar. Raises ValueError on a value outside it, or a colour equal to the background."""
    size: str
    colour: str
    shape: str
    position: str
    background: str

    def __post_init__(self):
        for field, value, allowed in (("size", self.size, SIZES), ("colour", self.colour, COLOURS),
                                      ("shape", self.shape, SHAPES), ("position", self.position, POSITIONS),
                                      ("background", self.background, COLOURS)):
            if value not in allowed:
                raise ValueError(f"{field} {value!r} is not one of {', '.join(allowed)}")
        if self.colour == self.background:
            raise ValueError(f"the shape and the background are both {self.colour}")

    @property
    def caption(self) -> str:
        return f"{self.size} {self.colour} {self.shape} on the {self.position}, {self.background} background"

    @property
    def triple(self) -> tuple[str, str, str]:
        return (self.colour, self.shape, self.background)

    @classmethod
    def parse(cls, caption: str) -> ShapeSpec:
        """The inverse of `.caption`; strict: no extra words, spaces, case changes or punctuation."""
        m = _CAPTION.fullmatch(caption)
        if m is None:
            raise ValueError(f"not a shapes caption: {caption!r} "
                             "(expected '{size} {colour} {shape} on the {position}, {background} background')")
        return cls(**m.groupdict())


def split(spec: ShapeSpec) -> Literal["train", "heldout"]:
    return "heldout" if spec.triple in HELD_OUT_TRIPLES else "train"


def all_specs(which: Split = "all") -> list[ShapeSpec]:
    """Every caption of the grammar (1008), or those of one split, in a fixed order."""
    if which not in ("train", "heldout", "all"):
        raise ValueError(f"split {which!r} is not one of train, heldout, all")
    specs = [ShapeSpec(size, colour, shape, position, background)
             for size in SIZES for colour in COLOURS for shape in SHAPES for position in POSITIONS
             for background in COLOURS if background != colour]
    return specs if which == "all" else [s for s in specs if split(s) == which]


def sample_jitter(rng: np.random.Generator) -> tuple[float, float, float]:
    """(dx, dy, scale) for `render`: offsets in reference pixels, scale of the bbox side."""
    dx, dy = rng.uniform(-JITTER_PX, JITTER_PX, size=2)
    scale = rng.uniform(1 - JITTER_SCALE, 1 + JITTER_SCALE)
    return float(dx), float(dy), float(scale)


def coverage(shape: str, cx: float, cy: float, side: float, image_size: int) -> np.ndarray:
    """(H, W) float fraction of each pixel covered by the shape whose bbox is side x side, centred at (cx, cy).

    Pixel (i, j) spans [j, j+1) x [i, i+1); the fraction is counted on SUPERSAMPLE^2 sample points per pixel.
    """
    n = image_size * SUPERSAMPLE
    t = (np.arange(n) + 0.5) / SUPERSAMPLE  # sample coordinates in pixels
    x, y = t[None, :] - cx, t[:, None] - cy  # (1, n), (n, 1) relative to the centre
    h = side / 2
    if shape == "circle":
        inside = x * x + y * y <= h * h
    elif shape == "square":
        inside = (np.abs(x) <= h) & (np.abs(y) <= h)
    elif shape == "triangle":  # apex (0, -h), base from (-h, h) to (h, h): half-width grows by 1/2 per unit of y
        inside = (y <= h) & (np.abs(x) <= (y + h) / 2)
    else:
        raise ValueError(f"shape {shape!r} is not one of {', '.join(SHAPES)}")
    inside = np.broadcast_to(inside, (n, n)).astype(np.float32)
    return inside.reshape(image_size, SUPERSAMPLE, image_size, SUPERSAMPLE).mean(axis=(1, 3))


def render(spec: ShapeSpec, image_size: int = REFERENCE_SIZE,
           jitter: tuple[float, float, float] | None = None) -> Image.Image:
    """The image of `spec`, optionally perturbed by `jitter` = (dx, dy, scale) (see `sample_jitter`).

    The shape is moved back inside the frame if the jitter would clip it (only large shapes on the left or right
    can reach the edge), so every shape is whole and its fill ratio exact.
    """
    dx, dy, scale = jitter if jitter is not None else (0.0, 0.0, 1.0)
    unit = image_size / REFERENCE_SIZE
    side = SIZES[spec.size] * scale * unit
    cx = float(np.clip(POSITIONS[spec.position] * image_size + dx * unit, side / 2, image_size - side / 2))
    cy = float(np.clip(image_size / 2 + dy * unit, side / 2, image_size - side / 2))
    c = coverage(spec.shape, cx, cy, side, image_size)[..., None]  # (H, W, 1)
    fg = np.array(COLOURS[spec.colour], dtype=np.float32)
    bg = np.array(COLOURS[spec.background], dtype=np.float32)
    pixels = np.rint(bg + c * (fg - bg)).astype(np.uint8)  # (H, W, 3)
    return Image.fromarray(pixels)


class ShapesDataset(torch.utils.data.Dataset):
    """Map-style data set of dict(image=(3, H, W) float tensor in [-1, 1], caption=str).

    The specs of the split are shuffled once by `seed`; sample i shows spec `i % len(specs)` of that order, so
    `n=None` gives each caption of the split once, and a larger n cycles through them. The jitter of sample i
    comes from a generator seeded by (seed, i) alone, so a sample does not depend on which others were read.
    """

    def __init__(self, split: Split = "train", n: int | None = None, seed: int = 0, jitter: bool = True,
                 image_size: int = REFERENCE_SIZE):
        self.specs = all_specs(split)
        order = np.random.default_rng(seed).permutation(len(self.specs))
        self.specs = [self.specs[k] for k in order]
        if n is not None and n < 0:
            raise ValueError(f"n must be >= 0, got {n}")
        self.n = len(self.specs) if n is None else n
        self.seed, self.jitter, self.image_size = seed, jitter, image_size

    def __len__(self) -> int:
        return self.n

    def sample(self, index: int) -> tuple[ShapeSpec, Image.Image]:
        if not 0 <= index < self.n:
            raise IndexError(f"index {index} out of range for {self.n} samples")
        spec = self.specs[index % len(self.specs)]
        jitter = sample_jitter(np.random.default_rng((self.seed, index))) if self.jitter else None
        return spec, render(spec, self.image_size, jitter)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor | str]:
        spec, image = self.sample(index)
        pixels = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, H, W) uint8
        return {"image": pixels.float() / 127.5 - 1.0, "caption": spec.caption}


_OUR_FILE = re.compile(r"\d{6,}\.(png|txt)|metadata\.jsonl")


def write_folder(out_dir: str | Path, split: Split = "train", n: int | None = None, seed: int = 0,
                 jitter: bool = True, overwrite: bool = False) -> int:
    """Write `ShapesDataset(split, n, seed, jitter)` as 000000.png + 000000.txt pairs and a metadata.jsonl.

    metadata.jsonl follows the Hugging Face imagefolder convention: one {"file_name": ..., "text": ...} per line.
    A folder that holds anything is refused unless `overwrite`; then the files this function writes (numbered
    .png/.txt and metadata.jsonl) are removed first, so no stale sample survives, and other files are kept.
    Returns the number of images written.
    """
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty; refusing to write into it without overwrite")
        for path in out.iterdir():
            if path.is_file() and _OUR_FILE.fullmatch(path.name):
                path.unlink()
    out.mkdir(parents=True, exist_ok=True)
    data = ShapesDataset(split, n, seed, jitter)
    width = max(6, len(str(len(data) - 1)))
    with open(out / "metadata.jsonl", "w") as meta:
        for i in range(len(data)):
            spec, image = data.sample(i)
            name = f"{i:0{width}d}"
            image.save(out / f"{name}.png")
            (out / f"{name}.txt").write_text(spec.caption)
            meta.write(json.dumps({"file_name": f"{name}.png", "text": spec.caption}) + "\n")
    return len(data)
