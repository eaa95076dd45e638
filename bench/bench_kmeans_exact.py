"""Benchmark of lcompress._kmeans_exact.kmeans_1d_exact (CPU, 2 threads).

Prints one JSON object: median wall time over a few runs for n in {1e5, 1e6}
and k in {2, 4, 8}, and the distortion relative to a Lloyd baseline (best of a
few restarts of Lloyd's algorithm, quantile initialisation + random
initialisations).  ratio_vs_lloyd <= 1 means the exact solution is at least as
good, as it must be.

Usage:  PYTHONPATH=src python bench/bench_kmeans_exact.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

from lcompress._kmeans_exact import kmeans_1d_exact


def distortion(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor) -> float:
    return float(((x.to(torch.float64) - c.to(torch.float64)[a]) ** 2).sum())


def lloyd_1d(x: torch.Tensor, k: int, restarts: int = 4, iters: int = 100, seed: int = 0) -> float:
    """Lloyd's algorithm in 1-D (nearest centroid via searchsorted on midpoints)."""
    g = torch.Generator().manual_seed(seed)
    x64 = torch.sort(x.to(torch.float64)).values
    n = x64.numel()
    best = float("inf")
    for r in range(restarts):
        if r == 0:  # quantile initialisation
            c = x64[((torch.arange(k, dtype=torch.float64) + 0.5) / k * n).long().clamp_max(n - 1)]
        else:
            c = torch.sort(x64[torch.randint(0, n, (k,), generator=g)]).values
        for _ in range(iters):
            mids = (c[1:] + c[:-1]) / 2
            a = torch.searchsorted(mids, x64)
            cnt = torch.bincount(a, minlength=k).to(torch.float64)
            s = torch.zeros(k, dtype=torch.float64).index_add_(0, a, x64)
            c_new = torch.sort(torch.where(cnt > 0, s / cnt.clamp_min(1), c)).values
            if torch.equal(c_new, c):
                break
            c = c_new
        # evaluate with float32 centroids, like the exact solver's codebook
        c32 = c.to(torch.float32).to(torch.float64)
        a = torch.searchsorted((c32[1:] + c32[:-1]) / 2, x64)
        best = min(best, float(((x64 - c32[a]) ** 2).sum()))
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    results = []
    for n in (100_000, 1_000_000):
        # Gaussian-like weights, float32
        x = (0.02 * torch.randn(n, generator=g)).to(torch.float32)
        for k in (2, 4, 8):
            kmeans_1d_exact(x, k)  # warm-up
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                c, a = kmeans_1d_exact(x, k)
                times.append(time.perf_counter() - t0)
            d = distortion(x, c, a)
            d_lloyd = lloyd_1d(x, k)
            results.append(
                {
                    "n": n,
                    "k": k,
                    "median_s": round(statistics.median(times), 4),
                    "min_s": round(min(times), 4),
                    "distortion": d,
                    "lloyd_distortion": d_lloyd,
                    "ratio_vs_lloyd": d / d_lloyd,
                }
            )
    out = {
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "repeats": args.repeats,
        "results": results,
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
