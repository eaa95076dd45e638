"""C steps on a quiet and on a loaded machine, with and without the library's C-step thread choice.

The bench starts its own load: ``--busy`` processes (default: one per CPU) that spin in a Python loop. They are
paused (SIGSTOP) for the quiet phases and resumed (SIGCONT) for the loaded ones, and killed when the bench ends.
Every repeat runs every case in both phases (switched case by case) and both variants, in alternating order, so
all four see the same background:

* ``library``: ``Compression.compress`` as shipped, which picks the torch thread count for the C step
  (:mod:`lcompress._threads`);
* ``baseline``: the same call with that choice switched off (the user's thread count throughout, as before).

Run it without ``OMP_WAIT_POLICY`` set: libgomp's default spin-waiting is what a user gets, and what makes
2-thread C steps slow beside busy processes. Prints one JSON object: per case the median / min wall ms of the
four combinations, and the ratios ``loaded_over_quiet`` (library loaded ÷ library quiet),
``loaded_over_quiet_baseline`` (library loaded ÷ baseline quiet: against the speed the library had on a quiet
machine before), ``baseline_loaded_over_quiet`` and ``quiet_library_over_baseline`` (< 1: faster on a quiet
machine too). Ratios are medians of per-repeat ratios. Target: loaded ÷ quiet ≤ 2.

Usage:  python bench/bench_cstep_loaded.py [--repeats 5] [--threads 2] [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import signal
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, header, log, loadavg, timed  # noqa: E402

import lcompress as lc  # noqa: E402
from lcompress import _threads  # noqa: E402

TARGET = 2.0


class Load:
    """Busy processes that can be paused and resumed; killed on exit."""

    def __init__(self, n: int) -> None:
        self.procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
        self.on = True
        self.set(False)

    def set(self, on: bool) -> None:
        if on != self.on:
            for p in self.procs:
                os.kill(p.pid, signal.SIGCONT if on else signal.SIGSTOP)
            self.on = on
            time.sleep(0.05)  # let the scheduler settle

    def close(self) -> None:
        for p in self.procs:
            try:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):  # pragma: no cover
                pass


def make_cases(n: int, m: int, small: int) -> list[tuple[str, Callable[[], Callable[[], Any]], int]]:
    """(name, factory, repeats divisor): a factory makes one variant's callable (its own warm-start state)."""
    torch.manual_seed(0)
    w = torch.distributions.Laplace(0.0, 0.05 / math.sqrt(2.0)).sample((n,)).float()
    ws = w[:small].clone()
    W = (0.05 * torch.randn(m, m)).float()
    absw = w.abs()
    tau = float(torch.quantile(absw[torch.randperm(n)[:200_000]], 0.95))
    l1_radius = float((absw - tau).clamp_min(0).sum())
    _, s_all, _ = torch.linalg.svd(W)
    rs_alpha = 0.5 * float(s_all[50]) ** 2 / (2 * m)
    kappa = int(round(0.05 * n))

    def once(make, x, mu=0.0):
        def factory():
            return lambda: make().compress(x, mu)
        return factory

    def warm(k, x):
        def factory():
            q = lc.AdaptiveQuantization(k)
            q.compress(x)
            state = {"x": x}

            def run():
                state["x"] = state["x"] + 1e-3 * 0.05 * torch.randn_like(state["x"])
                return q.compress(state["x"])
            return run
        return factory

    cases = []
    for k in (2, 4, 16):
        cases.append((f"AdaptiveQuantization(k={k}) cold", once(lambda k=k: lc.AdaptiveQuantization(k), w), 1))
        cases.append((f"AdaptiveQuantization(k={k}) warm", warm(k, w), 1))
    cases += [
        ("AdaptiveQuantization(k=4, exact=True)", once(lambda: lc.AdaptiveQuantization(4, exact=True), w), 3),
        ("ConstraintL0Pruning(kappa=5%)", once(lambda: lc.ConstraintL0Pruning(kappa=kappa), w), 1),
        ("ConstraintL1Pruning(kappa=radius for 5%)", once(lambda: lc.ConstraintL1Pruning(kappa=l1_radius), w), 1),
        ("PenaltyL0Pruning(alpha for 5%, mu=1)", once(lambda: lc.PenaltyL0Pruning(alpha=0.5 * tau * tau), w, 1.0), 1),
        ("PenaltyL1Pruning(alpha for 5%, mu=1)", once(lambda: lc.PenaltyL1Pruning(alpha=tau), w, 1.0), 1),
        ("ScaledTernaryQuantization", once(lc.ScaledTernaryQuantization, w), 1),
        ("BinaryQuantization", once(lc.BinaryQuantization, w), 1),
        ("ScaledBinaryQuantization", once(lc.ScaledBinaryQuantization, w), 1),
        ("PowersOfTwoQuantization(c=4)", once(lambda: lc.PowersOfTwoQuantization(c=4), w), 1),
        (f"LowRank(rank=50) {m}x{m}", once(lambda: lc.LowRank(rank=50), W), 1),
        (f"RankSelection(alpha for rank~50, mu=1) {m}x{m}", once(lambda: lc.RankSelection(alpha=rs_alpha), W, 1.0), 1),
        (f"AdaptiveQuantization(k=4) cold, n={small}", once(lambda: lc.AdaptiveQuantization(4), ws), 1),
        (f"AdaptiveQuantization(k=2) + ConstraintL0Pruning(1%), n={small}",
         once(lambda: lc.AdaptiveQuantization(2) + lc.ConstraintL0Pruning(fraction=0.01), ws), 1),
    ]
    return cases


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="number of weights of the vector cases")
    ap.add_argument("--matrix", type=int, default=1000, help="side of the low-rank test matrix")
    ap.add_argument("--small", type=int, default=8192, help="number of weights of the small-task cases")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--busy", type=int, default=None, help="busy processes in the loaded phase (default: CPUs)")
    ap.add_argument("--only", default=None, help="run only cases whose name contains this")
    ap.add_argument("--quick", action="store_true", help="2 repeats")
    args = ap.parse_args()
    if args.quick:
        args.repeats = 2
    torch.set_num_threads(args.threads)
    busy = args.busy if args.busy is not None else (os.cpu_count() or 2)
    result = header("cstep_loaded", args.threads)
    result["config"] = {"n": args.n, "matrix": [args.matrix, args.matrix], "small": args.small,
                        "repeats": args.repeats, "busy_processes": busy, "small_task": _threads.SMALL_TASK}
    if os.environ.get("OMP_WAIT_POLICY"):
        log(f"note: OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']} is set; users get libgomp's default")

    cases = make_cases(args.n, args.matrix, args.small)
    if args.only:
        cases = [c for c in cases if args.only in c[0]]
    real_threads_for = _threads._threads_for

    def baseline_threads_for(numel: int, current: int) -> int:
        return current

    variants = {"library": real_threads_for, "baseline": baseline_threads_for}
    fns = {(name, v): factory() for name, factory, _ in cases for v in variants}
    times: dict[tuple[str, str, str], list[float]] = {}
    load = Load(busy)
    try:
        for rep in range(args.repeats):
            # phases switch case by case (not in blocks), so that other jobs' load falls on both alike
            for ci, (name, _, div) in enumerate(cases):
                if rep % div:
                    continue
                phases = ("quiet", "loaded") if (rep + ci) % 2 == 0 else ("loaded", "quiet")
                for phase in phases:
                    load.set(phase == "loaded")
                    order = ("library", "baseline") if (rep + ci // 2) % 2 == 0 else ("baseline", "library")
                    for v in order:
                        _threads._threads_for = variants[v]
                        try:
                            dt, _, _ = timed(fns[(name, v)])
                        finally:
                            _threads._threads_for = real_threads_for
                        times.setdefault((name, phase, v), []).append(dt)
            log(f"repeat {rep + 1}/{args.repeats} done, load {loadavg()}")
    finally:
        load.close()
        _threads._threads_for = real_threads_for

    out: dict[str, Any] = {}
    worst = 0.0
    for name, _, _ in cases:
        t = {(p, v): times[(name, p, v)] for p in ("quiet", "loaded") for v in variants}

        def ratio(a, b):
            return round(statistics.median(x / y for x, y in zip(t[a], t[b])), 2)

        row: dict[str, Any] = {
            f"{p}_{v}_ms": {"median": round(1e3 * statistics.median(t[(p, v)]), 2),
                            "min": round(1e3 * min(t[(p, v)]), 2)}
            for p in ("quiet", "loaded") for v in variants
        }
        row["loaded_over_quiet"] = ratio(("loaded", "library"), ("quiet", "library"))
        row["loaded_over_quiet_baseline"] = ratio(("loaded", "library"), ("quiet", "baseline"))
        row["baseline_loaded_over_quiet"] = ratio(("loaded", "baseline"), ("quiet", "baseline"))
        row["quiet_library_over_baseline"] = ratio(("quiet", "library"), ("quiet", "baseline"))
        row["n_timed"] = len(t[("quiet", "library")])
        worst = max(worst, row["loaded_over_quiet"])
        out[name] = row
    result["cases"] = out
    result["target_loaded_over_quiet"] = TARGET
    result["worst_loaded_over_quiet"] = worst
    result["meets_target"] = worst <= TARGET
    result["missed"] = [k for k, r in out.items() if r["loaded_over_quiet"] > TARGET]
    emit(result)


if __name__ == "__main__":
    main()
