"""Report helpers of `tools/bench.py` (load, txt2img and train): result tables, output comparisons, the
machine and versions, and the sections of docs/benchmarks.md that `--write` replaces."""
from __future__ import annotations

import math
import os
import platform
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "benchmarks.md"
GB = 1e9


def load_table(rows: list[tuple[str, str, dict]]) -> str:
    lines = ["| loader | dtype | load s | CPU s | load + page in all weights s | weights GB | RSS before load GB "
             "| peak RSS GB | peak / weights |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for loader, dtype, r in rows:
        lines.append(f"| {loader} | {dtype} | {r['load_s']:.2f} | {r['cpu_s']:.2f} | {r['load_touch_s']:.2f} "
                     f"| {r['weights'] / GB:.2f} | {r['rss_before'] / GB:.2f} | {r['peak_touch'] / GB:.2f} "
                     f"| {r['peak_touch'] / r['weights']:.2f}x |")
    by = {(loader, dtype): r for loader, dtype, r in rows}
    ratios = []
    for dtype in ("fp16", "fp32"):
        a, b = by.get(("ldm", dtype)), by.get(("diffusers", dtype))
        if a and b:
            ratios.append(f"| {dtype} | {a['load_s'] / b['load_s']:.2f} | {a['cpu_s'] / b['cpu_s']:.2f} "
                          f"| {a['load_touch_s'] / b['load_touch_s']:.2f} | {a['peak_touch'] / b['peak_touch']:.2f} |")
    if ratios:
        lines += ["", "| ldm / diffusers | load time | CPU time | load + page-in time | peak RSS |",
                  "|---|---:|---:|---:|---:|", *ratios]
    return "\n".join(lines)


TXT2IMG_TIMES = (("load", "load_s"), ("text encode", "text_s"), ("UNet step", "unet_s"), ("VAE decode", "vae_s"),
                 ("first txt2img", "first_txt2img_s"), ("txt2img", "txt2img_s"))
ERRORS = (("text", "text rel err"), ("unet", "UNet step rel err"), ("vae", "VAE decode rel err"))
PARITY_TOLERANCE = 1e-4  # fp32, relative (the figure, as ldm.testing.reference)


@dataclass(frozen=True)
class Pair:
    """Variant `a` against variant `b` at one size: time and memory ratios a / b, and a's outputs against b's."""
    size: int
    a: str
    b: str
    ratios: dict[str, float]  # a key of TXT2IMG_TIMES or "memory" -> a / b
    errors: dict[str, float]  # text, unet, vae: max|a - b| / max|b|; pixel: max|a - b| of the images; psnr (dB)


def num(x: float) -> str:
    return f"{x:.3g}"


def peak_memory(r: dict) -> int:
    return r.get("peak_cuda", r["peak_rss"])


def compare(size: int, a: str, b: str, results: dict[tuple[int, str], dict], out_dir: Path) -> Pair:
    import numpy as np

    def load(name: str, output: str):
        return np.load(out_dir / f"{size}-{name}-{output}.npy").astype(np.float64)

    ra, rb = results[size, a], results[size, b]
    ratios = {key: ra[key] / rb[key] for _, key in TXT2IMG_TIMES} | {"memory": peak_memory(ra) / peak_memory(rb)}
    errors = {}
    for output, _ in ERRORS:
        ya, yb = load(a, output), load(b, output)
        errors[output] = float(np.abs(ya - yb).max() / np.abs(yb).max())
    ia, ib = load(a, "image"), load(b, "image")
    mse = float(((ia - ib) ** 2).mean())
    errors["pixel"] = float(np.abs(ia - ib).max())
    errors["psnr"] = 10 * math.log10(1 / mse) if mse > 0 else math.inf
    return Pair(size, a, b, ratios, errors)


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg())


def hardware() -> str:
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", lscpu).group(1).strip()
    except (OSError, AttributeError):
        model = platform.processor() or "unknown CPU"
    from ldm.accel.cpu import cpu_features

    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return (f"{model} (PyTorch CPU capability {cpu_features().describe()}), {os.cpu_count()} cores, {mem:.0f} GiB "
            f"RAM, {platform.system()} {platform.release()}")


def versions() -> str:
    import diffusers
    import safetensors
    import torch
    import transformers

    import ldm

    return (f"ldm {ldm.__version__}, torch {torch.__version__}, diffusers {diffusers.__version__}, "
            f"transformers {transformers.__version__}, safetensors {safetensors.__version__}, "
            f"Python {platform.python_version()}")


def publish(name: str, report: str, write: bool) -> None:
    """Print a benchmark's report and, with --write, put it in its section of docs/benchmarks.md."""
    print(report)
    if write:
        write_section(name, report)
        print(f"updated {DOCS}", file=sys.stderr)


def write_section(name: str, body: str, docs: Path = DOCS) -> None:
    """Replace (or append) the section between `<!-- bench:NAME -->` markers in docs/benchmarks.md."""
    start, end = f"<!-- bench:{name}:start -->", f"<!-- bench:{name}:end -->"
    text = docs.read_text() if docs.exists() else "# Benchmarks\n\nMeasured with `tools/bench.py`.\n"
    block = f"{start}\n{body.strip()}\n{end}"
    if start in text and end in text:
        text = text[:text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    docs.write_text(text)
