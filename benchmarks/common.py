"""Helpers shared by the benchmark scripts: timing, memory readings, atomic results files."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path


def timed(fn):
    """``(wall seconds, CPU seconds of this process, fn())``."""
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return time.perf_counter() - w, time.process_time() - c, out


def vm(field: str) -> float:
    """A ``/proc/self/status`` memory field (VmRSS, VmHWM) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> float:
    """Reset the peak resident size (VmHWM) to the current one; returns the current RSS in MiB."""
    Path("/proc/self/clear_refs").write_text("5")
    return vm("VmRSS")


def write_results(results: dict, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    os.replace(tmp, path)
    return path
