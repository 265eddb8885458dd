"""What the benchmark processes share (`tools/bench.py`, `tools/bench_sdxl.py`): this process's memory and CPU
time, median timings, paging weights in, and argparse's positive integers."""
from __future__ import annotations

import argparse
import os
import resource
import statistics
import time
from collections.abc import Callable
from pathlib import Path


def rss_now() -> int:
    """Resident set size of this process in bytes (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def cpu_s() -> float:
    """CPU seconds (user + system) of this process: less sensitive than wall time to a busy machine."""
    return sum(os.times()[:2])


def peak_rss() -> int:
    """Peak resident set size of this process in bytes: VmHWM (Linux), else ru_maxrss. Not ru_maxrss alone on
    Linux: exec() carries the parent's peak into it (a child of a parent that built the 4 GB model reports at
    least that)."""
    status = Path("/proc/self/status")
    for line in status.read_text().splitlines() if status.exists() else []:
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux


def reset_peak_rss() -> None:
    """Lower this process's peak RSS (VmHWM) to its current RSS (Linux >= 4.0), so that the next reading is the
    peak of what follows; a no-op where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


def touch(modules) -> None:
    """Read one byte of every 4 KiB page of every weight, so that lazily mapped weights are paged in as a first
    forward pass would page them in (a full reduction would mostly time the arithmetic)."""
    import torch

    for module in modules:
        for t in module.state_dict().values():
            if t.numel():
                t.detach().contiguous().reshape(-1).view(torch.uint8)[::4096].sum()


def median_time(fn: Callable[[], object], warmup: int, runs: int, sync: Callable[[], None],
                 first: list[float] | None = None) -> tuple[float, object]:
    """Median wall seconds of `fn()` over `runs` calls after `warmup` calls, and the last call's result. The
    first call's time (warm-up included: torch.compile compiles then) is appended to `first` if given."""
    times, out = [], None
    for i in range(warmup + runs):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    if first is not None:
        first.append(times[0])
    return statistics.median(times[warmup:]), out


def positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def median_of(results: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in results) for k in results[0]}
