"""C step of a quantization + ℓ0 pruning sum against its parts' C steps, and against alternating the parts.

For each weight count and sum ``AdaptiveQuantization(k) + ConstraintL0Pruning(fraction)`` it times, interleaved
in every repeat (rotating order, so all see the same load):

* ``sum``: ``AdditiveCombination.compress`` as shipped (trimmed k-means, :mod:`lcompress._trimmed_kmeans`);
* ``alternating``: the same sum through block coordinate descent (each part's C step on its residual in turn,
  the algorithm every sum used before);
* ``quantization`` and ``pruning``: each part's C step alone.

Each is timed *cold* (a fresh object, as in direct compression) and *warm* (the same object again after the
weights took a random-walk step of 1e-3 relative noise, as after an L step). Prints one JSON object: per case
the median / min ms, ``sum_over_slower_part`` (median of per-repeat ratios sum ÷ max(quantization, pruning);
target ≤ 3), ``alternating_over_sum`` (speed-up) and ``objective_sum_over_alternating`` (‖w − Δ‖² of the sum
over that of the alternation on the same weights; ≤ 1 is better).

Usage:  python bench/bench_additive.py [--repeats 7] [--sizes 8192 266200 1000000] [--threads 2]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, header, log, timed  # noqa: E402

import lcompress as lc  # noqa: E402
from lcompress.compressions.additive import AdditiveCombination  # noqa: E402

TARGET = 3.0
SUMS = [(2, 0.01), (4, 0.05), (16, 0.01)]


def sq(w: torch.Tensor, d: torch.Tensor) -> float:
    return float(((w - d).double() ** 2).sum())


class Alternating(AdditiveCombination):
    """The sum solved by plain alternation (the generic path), for comparison."""

    def _trimmed_pair(self, n: int):
        return None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 266_200, 1_000_000])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--std", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    result = header("additive", args.threads)
    result["config"] = {"sizes": args.sizes, "sums": SUMS, "repeats": args.repeats, "seed": args.seed,
                        "dist": f"Laplace, std {args.std}"}
    torch.manual_seed(args.seed)
    cases: dict[str, Any] = {}
    for n in args.sizes:
        w0 = torch.distributions.Laplace(0.0, args.std / math.sqrt(2.0)).sample((n,)).float()
        for k, frac in SUMS:
            name = f"AdaptiveQuantization({k}) + ConstraintL0Pruning({frac:g}), n={n}"
            makers = {
                "sum": lambda: lc.AdaptiveQuantization(k) + lc.ConstraintL0Pruning(fraction=frac),
                "alternating": lambda: Alternating(lc.AdaptiveQuantization(k), lc.ConstraintL0Pruning(fraction=frac)),
                "quantization": lambda: lc.AdaptiveQuantization(k),
                "pruning": lambda: lc.ConstraintL0Pruning(fraction=frac),
            }
            warm = {v: m() for v, m in makers.items()}
            w = w0.clone()
            for c in warm.values():
                c.compress(w)
            times: dict[str, list[float]] = {}
            objective: dict[str, list[float]] = {"sum_cold": [], "alternating_cold": [], "sum_warm": [],
                                                 "alternating_warm": []}
            order = list(makers)
            for rep in range(args.repeats):
                w = w + 1e-3 * args.std * torch.randn(n)
                rot = order[rep % len(order):] + order[: rep % len(order)]
                for v in rot:
                    fresh = makers[v]()
                    dt, _, out = timed(lambda: fresh.compress(w))
                    times.setdefault(f"{v}_cold", []).append(dt)
                    if v in ("sum", "alternating"):
                        objective[f"{v}_cold"].append(sq(w, out))
                    dt, _, out = timed(lambda: warm[v].compress(w))
                    times.setdefault(f"{v}_warm", []).append(dt)
                    if v in ("sum", "alternating"):
                        objective[f"{v}_warm"].append(sq(w, out))
            row: dict[str, Any] = {
                f"{key}_ms": {"median": round(1e3 * statistics.median(t), 2), "min": round(1e3 * min(t), 2)}
                for key, t in times.items()
            }
            for mode in ("cold", "warm"):
                slower = [max(a, b) for a, b in zip(times[f"quantization_{mode}"], times[f"pruning_{mode}"])]
                row[f"sum_over_slower_part_{mode}"] = round(
                    statistics.median(s / p for s, p in zip(times[f"sum_{mode}"], slower)), 2)
                row[f"alternating_over_sum_{mode}"] = round(
                    statistics.median(a / s for a, s in zip(times[f"alternating_{mode}"], times[f"sum_{mode}"])), 2)
                ratios = [s / a for s, a in zip(objective[f"sum_{mode}"], objective[f"alternating_{mode}"])]
                row[f"objective_sum_over_alternating_{mode}"] = {
                    "median": round(statistics.median(ratios), 6), "max": round(max(ratios), 6)}
            row["meets_target"] = max(row["sum_over_slower_part_cold"], row["sum_over_slower_part_warm"]) <= TARGET
            cases[name] = row
            log(f"{name}: sum/slower part cold {row['sum_over_slower_part_cold']}, "
                f"warm {row['sum_over_slower_part_warm']}")
    result["cases"] = cases
    result["target_sum_over_slower_part"] = TARGET
    result["missed"] = [k for k, r in cases.items() if not r["meets_target"]]
    emit(result)


if __name__ == "__main__":
    main()
