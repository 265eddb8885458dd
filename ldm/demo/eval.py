"""Read the attributes of a shapes image back from its pixels, and score a model on the shapes grammar.

`classify(image)` inverts `ldm.data.shapes.render` without knowing the caption, with numpy alone:

1. background: the palette colour nearest to the per-channel median of a 2-px border ring. The median ignores
   the part of the ring that a large shape at the edge covers (at most 1/8 of it).
2. rough shape: pixels farther than half the smallest palette distance (yellow-orange, 71) from the measured
   background colour, largest 4-connected component (drops noise specks and stray blobs).
3. core: the projection t of each pixel onto the line from the measured background colour to the median
   colour of the rough shape; t > 1/2 means that more than half the pixel is shape (renders mix linearly), and
   the largest component of those pixels is the core. This is as strict for yellow on orange as for white on
   black, where a fixed distance threshold would count every blurred edge pixel of high-contrast pairs. Shape
   colour: the palette colour, other than the background, nearest to the median of the purer half of the core
   (the pixels with the higher t), which a blurred rim cannot pull towards the background.
4. outline: t within 2 px of the core, upsampled 4x bilinearly and cut at 1/2, gives the area, the bbox and
   the centroid to a quarter pixel. Pixel-level bboxes are too coarse for 16-px shapes: a 1-px error in each
   side moves the fill ratio of a circle by 13%, and thin tips (the triangle's apex) fall below 1/2 coverage.
5. shape, from the fill ratio area / bbox area: triangle 1/2, circle pi/4, square 1; thresholds at the midpoints
   (0.64, 0.89). Blur pulls squares (rounded corners) and triangles (blunted apex) towards circles; under a 3x3
   box blur and N(0, 8) noise the ranges stay apart (tests/test_shapes.py).
6. size, from the area: the bbox side implied by it, sqrt(area / ideal fill ratio of the shape found), against
   the geometric mean of the small and large sides (22.6 px at 64x64). Jitter scales sides by 0.9-1.1, so each
   class keeps a factor of 1.28 of margin.
7. position, from the centroid x / width: left below 0.375, right above 0.625, the midpoints between the centres
   at 1/4, 1/2, 3/4. Jitter moves centres by at most 2 px (0.03), so the margin is 0.09 of the width.

`score` turns (spec, prediction) pairs into accuracy per attribute, `report_table` into markdown.
"""
from __future__ import annotations

import itertools
import math
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from ldm.data.shapes import COLOURS, POSITIONS, REFERENCE_SIZE, SIZES, ShapeSpec, all_specs

ATTRIBUTES = ("colour", "background", "shape", "size", "position")
GOALS = {"colour": 0.95, "background": 0.95, "shape": 0.90, "size": 0.90, "position": 0.90}  # from the issue

BORDER_PX = 2
NEAR_PX = 2  # how far outside the core pixels the outline is looked for
UPSAMPLE = 4  # sub-pixel factor of the outline
_PALETTE_NAMES = list(COLOURS)
_PALETTE = np.array([COLOURS[c] for c in _PALETTE_NAMES], dtype=np.float32)  # (8, 3)
ROUGH_DISTANCE = 0.5 * min(math.dist(a, b) for a, b in itertools.combinations(COLOURS.values(), 2))
FILL = {"triangle": 0.5, "circle": math.pi / 4, "square": 1.0}  # area / bbox area of the ideal shapes
# thresholds between consecutive fill ratios (triangle < circle < square) and positions (left < center < right)
_FILL_ORDER = sorted(FILL, key=FILL.get)
_FILL_CUTS = [(FILL[a] + FILL[b]) / 2 for a, b in zip(_FILL_ORDER, _FILL_ORDER[1:])]
_POSITION_ORDER = sorted(POSITIONS, key=POSITIONS.get)
_POSITION_CUTS = [(POSITIONS[a] + POSITIONS[b]) / 2 for a, b in zip(_POSITION_ORDER, _POSITION_ORDER[1:])]
SIZE_CUT = math.sqrt(SIZES["small"] * SIZES["large"])  # bbox side in px at REFERENCE_SIZE


@dataclass(frozen=True)
class Measurement:
    """What `measure` reads from an image, in pixels of the image; `classify` turns it into names."""
    background_rgb: tuple[float, float, float]
    shape_rgb: tuple[float, float, float] | None  # None: no shape stands out from the background
    area: float
    bbox: tuple[float, float, float, float]  # (x0, y0, x1, y1), sub-pixel
    centroid_x: float  # fraction of the width
    width: int  # of the image

    @property
    def fill(self) -> float:
        x0, y0, x1, y1 = self.bbox
        return self.area / max(1e-6, (x1 - x0) * (y1 - y0))


def _nearest_colour(rgb: np.ndarray, exclude: str | None = None) -> str:
    d = np.linalg.norm(_PALETTE - rgb, axis=1)
    if exclude is not None:
        d[_PALETTE_NAMES.index(exclude)] = np.inf
    return _PALETTE_NAMES[int(np.argmin(d))]


def largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected component of a boolean (H, W) mask (breadth-first search; scipy is not a
    dependency). Ties go to the component found first in row-major order."""
    h, w = mask.shape
    flat = mask.ravel()
    label = np.zeros(h * w, dtype=np.int32)
    best, best_size, current = 0, 0, 0
    for start in np.flatnonzero(flat):
        if label[start]:
            continue
        current += 1
        label[start] = current
        queue, size = deque([int(start)]), 0
        while queue:
            p = queue.popleft()
            size += 1
            y, x = divmod(p, w)
            for q, ok in ((p - w, y > 0), (p + w, y < h - 1), (p - 1, x > 0), (p + 1, x < w - 1)):
                if ok and flat[q] and not label[q]:
                    label[q] = current
                    queue.append(q)
        if size > best_size:
            best, best_size = current, size
    return (label == best).reshape(h, w) if best else np.zeros(mask.shape, dtype=bool)


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    """4-neighbour dilation, `steps` times."""
    out = mask.copy()
    for _ in range(steps):
        grown = out.copy()
        grown[1:] |= out[:-1]
        grown[:-1] |= out[1:]
        grown[:, 1:] |= out[:, :-1]
        grown[:, :-1] |= out[:, 1:]
        out = grown
    return out


def _upsample(a: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling of a (H, W) array, pixel centres aligned and edges clamped (as PIL's resize).
    Gathers and weights rows, then columns: no BLAS call, whose thread start-up costs more than this."""
    def taps(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        u = np.clip((np.arange(n * factor) + 0.5) / factor - 0.5, 0, n - 1)
        lo = np.floor(u).astype(int)
        return lo, np.minimum(lo + 1, n - 1), (u - lo).astype(a.dtype)

    lo, hi, f = taps(a.shape[0])
    a = a[lo] * (1 - f)[:, None] + a[hi] * f[:, None]  # (kH, W)
    lo, hi, f = taps(a.shape[1])
    return a[:, lo] * (1 - f) + a[:, hi] * f  # (kH, kW)


def measure(image: Image.Image | np.ndarray) -> Measurement:
    """Background colour, shape colour, area, bbox and centroid of a shapes image (PIL or uint8 (H, W, 3))."""
    px = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    if px.ndim != 3 or px.shape[2] != 3:
        raise ValueError(f"expected an RGB image of shape (H, W, 3), got {px.shape}")
    h, w, _ = px.shape
    ring = np.ones((h, w), dtype=bool)
    ring[BORDER_PX:h - BORDER_PX, BORDER_PX:w - BORDER_PX] = False
    bg = np.median(px[ring], axis=0)  # (3,)
    rough = largest_component(np.linalg.norm(px - bg, axis=-1) > ROUGH_DISTANCE)
    if not rough.any():
        return Measurement(tuple(bg.tolist()), None, 0.0, (0.0, 0.0, 0.0, 0.0), 0.5, w)
    axis = np.median(px[rough], axis=0) - bg
    t = (px - bg) @ axis / float(axis @ axis)  # (H, W): 0 at the background colour, 1 at the shape colour
    core = largest_component(t > 0.5)
    if not core.any():  # the rough pixels have t > 1/2 unless the median is far off; keep measure total
        core = rough
    fg = np.median(px[core & (t >= np.median(t[core]))], axis=0)  # the purer half: blur mixes the rim
    # Sub-pixel outline: t near the shape (outside it is zeroed, which drops specks), upsampled, cut at 1/2.
    near = np.where(_dilate(core, NEAR_PX), t, 0.0).astype(np.float32)
    fine, k = _upsample(near, UPSAMPLE) > 0.5, UPSAMPLE  # (kH, kW)
    if not fine.any():  # a faint speck of a pixel or two vanishes when upsampled: take it whole
        fine, k = core, 1
    ys, xs = np.nonzero(fine)
    bbox = (xs.min() / k, ys.min() / k, (xs.max() + 1) / k, (ys.max() + 1) / k)
    return Measurement(tuple(bg.tolist()), tuple(fg.tolist()), len(xs) / k**2, tuple(float(v) for v in bbox),
                       float((xs.mean() + 0.5) / (k * w)), w)


def classify(image: Image.Image | np.ndarray) -> dict[str, str | None]:
    """dict(size, colour, shape, position, background) read from the pixels; the first four are None when no
    shape stands out from the background."""
    m = measure(image)
    background = _nearest_colour(np.array(m.background_rgb))
    if m.shape_rgb is None:
        return {"size": None, "colour": None, "shape": None, "position": None, "background": background}
    shape = _FILL_ORDER[int(np.searchsorted(_FILL_CUTS, m.fill))]
    side = math.sqrt(m.area / FILL[shape]) * REFERENCE_SIZE / m.width  # implied bbox side at REFERENCE_SIZE
    return {
        "size": "small" if side < SIZE_CUT else "large",
        "colour": _nearest_colour(np.array(m.shape_rgb), exclude=background),
        "shape": shape,
        "position": _POSITION_ORDER[int(np.searchsorted(_POSITION_CUTS, m.centroid_x))],
        "background": background,
    }


# ----------------------------------------------------------------------------------------------- scoring


def score(results: Iterable[Sequence]) -> dict[str, float]:
    """Accuracy per attribute, and of all five at once ("all"), over (spec, prediction, ...) records; "n" is
    their number. Accuracies are nan when there are none."""
    results = list(results)
    hits = {a: 0 for a in (*ATTRIBUTES, "all")}
    for spec, pred, *_ in results:
        right = [getattr(spec, a) == pred.get(a) for a in ATTRIBUTES]
        for a, ok in zip(ATTRIBUTES, right):
            hits[a] += ok
        hits["all"] += all(right)
    n = len(results)
    return {"n": n, **{a: (k / n if n else math.nan) for a, k in hits.items()}}


def report_table(seen: dict[str, float], heldout: dict[str, float]) -> str:
    """Markdown table of two `score` results against the goals of the issue."""
    def pct(x: float) -> str:
        return "-" if math.isnan(x) else f"{100 * x:.1f}%"

    rows = ["| attribute | seen | held-out | goal | met |", "|---|---|---|---|---|"]
    for a in ATTRIBUTES:
        met = all(not math.isnan(s[a]) and s[a] >= GOALS[a] for s in (seen, heldout))
        rows.append(f"| {a} | {pct(seen[a])} | {pct(heldout[a])} | >= {100 * GOALS[a]:.0f}% | "
                    f"{'yes' if met else 'no'} |")
    rows.append(f"| all five | {pct(seen['all'])} | {pct(heldout['all'])} | | |")
    rows.append(f"| images | {seen['n']} | {heldout['n']} | | |")
    return "\n".join(rows)


# -------------------------------------------------------------------------------------------- evaluation

Generate = Callable[[list[str], list[int]], list[Image.Image]]  # (prompts, seeds) -> one image per prompt


def eval_specs(n_seen: int, seed: int = 0) -> tuple[list[ShapeSpec], list[ShapeSpec]]:
    """(seen, held-out): `n_seen` train specs drawn without replacement by `seed`, and every held-out spec."""
    train = all_specs("train")
    if not 0 <= n_seen <= len(train):
        raise ValueError(f"n_seen must be in [0, {len(train)}], got {n_seen}")
    pick = np.random.default_rng(seed).choice(len(train), size=n_seen, replace=False)
    return [train[k] for k in sorted(pick)], all_specs("heldout")


def evaluate(generate: Generate, specs: list[ShapeSpec], seeds: list[int], batch_size: int = 16,
             ) -> list[tuple[ShapeSpec, dict[str, str | None], Image.Image]]:
    """Generate an image for each spec's caption (image k with seeds[k]) in batches, and classify it."""
    if len(seeds) != len(specs):
        raise ValueError(f"{len(specs)} specs but {len(seeds)} seeds")
    records = []
    for start in range(0, len(specs), batch_size):
        batch = specs[start:start + batch_size]
        images = generate([s.caption for s in batch], seeds[start:start + batch_size])
        if len(images) != len(batch):
            raise ValueError(f"generate returned {len(images)} images for {len(batch)} prompts")
        records += [(spec, classify(image), image) for spec, image in zip(batch, images)]
    return records


def make_grid(records: Sequence[tuple[ShapeSpec, dict, Image.Image]], columns: int = 12,
              zoom: int = 2) -> Image.Image:
    """A contact sheet: each image (scaled by `zoom`) over its caption and, in red, what the classifier read
    where it disagrees with the caption ("bg" marks the background)."""
    font = ImageFont.load_default()
    line = 11
    size = REFERENCE_SIZE * zoom
    tile_w, tile_h = size + 8, size + 3 * line + 8
    rows = max(1, math.ceil(len(records) / columns))
    sheet = Image.new("RGB", (columns * tile_w, rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for k, (spec, pred, image) in enumerate(records):
        x, y = (k % columns) * tile_w + 4, (k // columns) * tile_h + 4
        sheet.paste(image.convert("RGB").resize((size, size), Image.NEAREST), (x, y))
        wrong = [("bg " if a == "background" else "") + str(pred.get(a))
                 for a in ATTRIBUTES if getattr(spec, a) != pred.get(a)]
        text = [f"{spec.size} {spec.colour} {spec.shape}", f"{spec.position}, bg {spec.background}",
                ("read: " + ", ".join(wrong)) if wrong else "ok"]
        for j, t in enumerate(text):
            draw.text((x, y + size + 2 + j * line), t, fill=(200, 0, 0) if wrong else (0, 0, 0), font=font)
    return sheet
