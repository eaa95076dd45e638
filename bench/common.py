"""Shared helpers for the benchmark scripts: machine description, interleaved timing, summaries, JSON output.

The machine may be shared with other jobs, so every script records ``os.getloadavg()`` at its start and end and
times the variants it compares in turn within one loop (A, B, A, B, ...), so that every side sees the same load.
Summaries give the median (the headline figure) and the minimum (the least disturbed run).
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import sys
import time
from typing import Any, Callable, Sequence

import torch


def loadavg() -> list[float] | None:
    """1, 5 and 15 minute load averages (None where the platform has none)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def machine(threads: int) -> dict[str, Any]:
    """What the figures were measured on."""
    info: dict[str, Any] = {
        "platform": platform.platform(),
        "processor": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": threads,
        # libgomp's spin-waiting (the default) makes many small parallel ops very slow when the cores are
        # oversubscribed; OMP_WAIT_POLICY=PASSIVE avoids it (see bench/RESULTS.md)
        "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"),
    }
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except ImportError:  # pragma: no cover
        pass
    return info


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def header(name: str, threads: int, argv: Sequence[str] | None = None) -> dict[str, Any]:
    """The common head of a script's JSON output: name, date, machine, command and the starting load."""
    return {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["python"] + list(sys.argv if argv is None else argv)),
        "machine": machine(threads),
        "loadavg_start": loadavg(),
    }


def timed(fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """(wall seconds, process CPU seconds over all threads, result) of one call.

    On a loaded machine the wall time depends on what else runs; the CPU time is closer to the work done (with
    OMP_WAIT_POLICY=PASSIVE: with libgomp's default spin-waiting it also counts the threads' spinning).
    """
    c0 = time.process_time()
    t0 = time.perf_counter()
    out = fn()
    t1 = time.perf_counter()
    return t1 - t0, time.process_time() - c0, out


def summary_ms(seconds: Sequence[float], cpu_seconds: Sequence[float] | None = None, digits: int = 3) -> dict[str, Any]:
    """Median and minimum of a list of wall seconds (and the median CPU seconds), in milliseconds."""
    ms = [s * 1e3 for s in seconds]
    out = {
        "median_ms": round(statistics.median(ms), digits),
        "min_ms": round(min(ms), digits),
        "n_timed": len(ms),
    }
    if cpu_seconds:
        out["median_cpu_ms"] = round(statistics.median(cpu_seconds) * 1e3, digits)
    return out


def paired_ratio(num: Sequence[float], den: Sequence[float]) -> float:
    """Median of per-iteration ratios num[i] / den[i] (both measured in the same loop iteration)."""
    return statistics.median(a / b for a, b in zip(num, den))


def with_target(stats: dict[str, Any], target_ms: float | None) -> dict[str, Any]:
    """Add ``target_ms`` and ``meets_target`` (judged on the median; None when there is no target)."""
    stats = dict(stats)
    stats["target_ms"] = target_ms
    stats["meets_target"] = None if target_ms is None else bool(stats["median_ms"] <= target_ms)
    return stats


def emit(result: dict[str, Any]) -> None:
    """Record the final load and print the one JSON object on stdout."""
    result["loadavg_end"] = loadavg()
    json.dump(result, sys.stdout, indent=1)
    sys.stdout.write("\n")
    sys.stdout.flush()


def log(*args: Any) -> None:
    """Progress on stderr (stdout carries only the JSON)."""
    print(*args, file=sys.stderr, flush=True)
