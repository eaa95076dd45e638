"""How many torch threads a C step runs with.

A C step is a chain of many small tensor ops (k-means iterations on a histogram, dynamic programmes over a few
hundred bins, thresholds, sorts). With libgomp's default wait policy an OpenMP worker that finishes its share of
a parallel op spins until its partner thread has finished too. When the machine is oversubscribed (other
processes keep the cores busy) that partner is often descheduled, so every parallel op can cost a scheduler time
slice: measured on 2 cores beside two busy processes, C steps ran 10-60× slower with 2 threads than with 1
(``bench/RESULTS.md``, ``bench/bench_cstep_loaded.py``). On small tasks a second thread does not pay even on a
quiet machine.

So :func:`c_step_threads` runs a C step single-threaded when its task is small (fewer than
:data:`SMALL_TASK` weights) or when the other processes' runnable threads leave fewer CPUs free than torch is set
to use; large tasks on a quiet machine keep the user's setting. The user's ``torch.get_num_threads()`` is put
back afterwards, also on an error. Only CPU tensors are affected.

``torch.set_num_threads`` is process-wide: another Python thread running torch ops during a C step sees the
smaller count too.
"""
from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from typing import Iterator

import torch

__all__ = ["SMALL_TASK", "c_step_threads", "free_cpus"]

logger = logging.getLogger(__name__)

#: tasks with fewer weights than this always run their C step on one thread (see bench/RESULTS.md)
SMALL_TASK = 1 << 18

_state = threading.local()


def _cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _read(path: str) -> bytes:
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 4096)
    finally:
        os.close(fd)


def _own_running_threads() -> int:
    """Threads of this process that are runnable right now (this one included)."""
    n = 0
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return 1
    for tid in tids:
        try:
            s = _read(f"/proc/self/task/{tid}/stat")
        except OSError:  # the thread ended meanwhile
            continue
        # "pid (comm) S ...": the state follows the last ')' (comm may hold spaces and parentheses)
        i = s.rfind(b")")
        if s[i + 2 : i + 3] == b"R":
            n += 1
    return max(n, 1)


def free_cpus() -> int | None:
    """CPUs this process may use that other processes' runnable threads do not occupy right now.

    Reads the instantaneous count of runnable threads from ``/proc/loadavg`` (Linux) and subtracts this
    process's own runnable threads. Returns None where that is not available.
    """
    try:
        running = int(_read("/proc/loadavg").split()[3].split(b"/")[0])
    except (OSError, ValueError, IndexError):
        return None
    others = max(0, running - _own_running_threads())
    return max(0, _cpus() - others)


def _threads_for(numel: int, current: int) -> int:
    if numel < SMALL_TASK:
        return 1
    free = free_cpus()
    if free is None:
        return current
    return max(1, min(current, free))


@contextmanager
def c_step_threads(numel: int, device: torch.device | str = "cpu") -> Iterator[int]:
    """Run the block with the number of torch threads that suits a C step of ``numel`` weights.

    Yields the thread count in force. Nested uses (the parts of an additive combination) keep what the
    outermost one chose. Tensors on other devices than the CPU leave the setting alone.
    """
    current = torch.get_num_threads()
    if getattr(_state, "depth", 0) or torch.device(device).type != "cpu" or current <= 1:
        _state.depth = getattr(_state, "depth", 0) + 1
        try:
            yield current
        finally:
            _state.depth -= 1
        return
    want = _threads_for(int(numel), current)
    if want != current:
        logger.debug("C step of %d weights on %d of %d torch threads", numel, want, current)
        torch.set_num_threads(want)
    _state.depth = 1
    try:
        yield want
    finally:
        _state.depth = 0
        if want != current:
            torch.set_num_threads(current)
