"""C-step timings on a million weight-like float32 values (CPU), against targets and a NumPy/scikit-learn reference.

Prints one JSON object on stdout:

* ``cases``: per C step, ``median_ms`` / ``min_ms`` of ``Compression.compress`` (the public call, input checks
  included), ``target_ms`` and ``meets_target`` (judged on the median; null where there is no target), plus what
  the C step produced (nonzero fraction, selected rank, distortion). ``AdaptiveQuantization(k)`` is timed
  *cold* (a fresh object) and *warm* (the same object again after the weights took a random-walk step of ~1e-3
  relative noise, as after an L step). Two ``threads=1`` cases, timed in the same loop, show how sensitive the
  2-thread figures are to a loaded machine.
* ``kmeans_reference``: our k-means against a plain vectorized NumPy Lloyd (float64, k-means++ init, the
  scikit-learn stopping rule) and, when installed, ``sklearn.cluster.KMeans(n_init=1)`` on the (n, 1) float64
  array, cold and warm-started from the previous centres, with speed ratios from the same loop iterations.
* ``kmeans_distortion``: the distortion of every k-means result relative to the global optimum
  (:func:`lcompress.functional.kmeans_1d_exact`); ours should be ≤ 1.02.

Every repeat runs every case once (the case order rotates between repeats), so all cases see the same load.

Usage:  python bench/bench_cstep.py [--repeats 11] [--ref-repeats 5] [--exact-repeats 5] [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, header, log, paired_ratio, summary_ms, timed, with_target  # noqa: E402

import lcompress as lc  # noqa: E402
from lcompress import functional as F  # noqa: E402

WARM_MS, COLD_MS, EXACT_MS, FAST_MS = 20.0, 200.0, 2000.0, 30.0


# ---- reference k-means ---------------------------------------------------------------------------------------
def kmeans_pp(x: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k-means++ seeding (D² sampling), one pass over the data per centre."""
    c = [x[rng.integers(x.size)]]
    d2 = (x - c[0]) ** 2
    for _ in range(1, k):
        cum = np.cumsum(d2)
        i = int(np.searchsorted(cum, rng.random() * cum[-1]))
        c.append(x[min(i, x.size - 1)])
        np.minimum(d2, (x - c[-1]) ** 2, out=d2)
    return np.sort(np.asarray(c))


def numpy_lloyd(x: np.ndarray, k: int, init: np.ndarray | None = None, seed: int = 0,
                max_iter: int = 300, tol: float = 1e-4) -> tuple[np.ndarray, np.ndarray, int]:
    """Plain vectorized Lloyd's algorithm in float64, as a typical NumPy reference implementation writes it.

    (n, k) distance matrix and argmin for the assignment, bincount for the means; stops when the squared centre
    shift falls below ``tol`` × var(x) (scikit-learn's rule) or after ``max_iter`` iterations.
    """
    c = kmeans_pp(x, k, np.random.default_rng(seed)) if init is None else np.array(init, dtype=np.float64)
    stop = tol * x.var()
    it = 0
    for it in range(1, max_iter + 1):
        a = np.abs(x[:, None] - c[None, :]).argmin(1)
        cnt = np.bincount(a, minlength=k)
        s = np.bincount(a, weights=x, minlength=k)
        new = np.where(cnt > 0, s / np.maximum(cnt, 1), c)
        shift = float(((new - c) ** 2).sum())
        c = new
        if shift <= stop:
            break
    a = np.abs(x[:, None] - c[None, :]).argmin(1)
    return c, a, it


def sse(x64: torch.Tensor, y: torch.Tensor) -> float:
    return float(((x64 - y.double()) ** 2).sum())


# ---- the loop ------------------------------------------------------------------------------------------------
@dataclass
class Case:
    name: str
    fn: Callable[[], Any]
    target_ms: float | None = None
    repeats: int | None = None  # None: every repeat
    group: str = "cases"
    times: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    rep_index: list[int] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000, help="number of weights")
    ap.add_argument("--repeats", type=int, default=11, help="timed repeats of the fast cases")
    ap.add_argument("--ref-repeats", type=int, default=5, help="timed repeats of the NumPy/scikit-learn references")
    ap.add_argument("--exact-repeats", type=int, default=5, help="timed repeats of the exact k-means cases")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dist", choices=("laplace", "gaussian"), default="laplace")
    ap.add_argument("--std", type=float, default=0.05)
    ap.add_argument("--noise", type=float, default=1e-3, help="relative noise of the random walk between repeats")
    ap.add_argument("--matrix", type=int, default=1000, help="side of the low-rank test matrix")
    ap.add_argument("--no-sklearn", action="store_true")
    ap.add_argument("--quick", action="store_true", help="3 repeats, 1 reference/exact repeat, no scikit-learn")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.quick:
        args.repeats, args.ref_repeats, args.exact_repeats, args.no_sklearn = 3, 1, 1, True
    torch.set_num_threads(args.threads)
    result = header("cstep", args.threads)
    torch.manual_seed(args.seed)
    n = args.n
    if args.dist == "laplace":
        w0 = torch.distributions.Laplace(0.0, args.std / math.sqrt(2.0)).sample((n,))
    else:
        w0 = args.std * torch.randn(n)
    w0 = w0.float()
    m = args.matrix
    W = (args.std * torch.randn(m, m)).float()

    sk = None
    if not args.no_sklearn:
        try:
            import sklearn
            from sklearn.cluster import KMeans
            from threadpoolctl import threadpool_limits

            sk = (KMeans, threadpool_limits, sklearn.__version__)
        except ImportError:
            log("scikit-learn not installed: the sklearn reference is skipped")
    result["machine"]["sklearn"] = None if sk is None else sk[2]
    result["config"] = {
        "n": n, "dist": args.dist, "std": args.std, "noise": args.noise, "matrix": [m, m],
        "repeats": args.repeats, "ref_repeats": args.ref_repeats, "exact_repeats": args.exact_repeats,
        "warmup": args.warmup, "seed": args.seed,
    }

    # The weights take a random-walk step before every repeat (outside the timed region): warm cases see weights
    # that moved a little since their last C step, the way they do after an L step.
    state: dict[str, Any] = {"w": w0.clone()}
    state["x64"] = state["w"].double().numpy()

    def step_weights() -> None:
        w = state["w"]
        state["w"] = w + args.noise * args.std * torch.randn(n)
        state["x64"] = state["w"].double().numpy()

    # thresholds for ~5% nonzeros
    absw = w0.abs()
    tau = float(torch.quantile(absw[torch.randperm(n)[:200_000]], 0.95))
    l1_radius = float((absw - tau).clamp_min(0).sum())
    _, s_all, _ = torch.linalg.svd(W)
    rs_alpha = 0.5 * float(s_all[50]) ** 2 / (2 * m)  # α such that rank ≈ 50 at μ = 1

    cases: list[Case] = []
    results_store: dict[str, Any] = {}

    def add(name, fn, target=None, repeats=None, group="cases"):
        cases.append(Case(name, fn, target, repeats, group))

    # adaptive quantization: ours cold/warm, references cold/warm
    ours_warm: dict[int, lc.AdaptiveQuantization] = {}
    np_warm: dict[int, np.ndarray] = {}
    sk_warm: dict[int, np.ndarray] = {}
    for k in (2, 4, 16):
        q = lc.AdaptiveQuantization(k)
        q.compress(state["w"])
        ours_warm[k] = q
        np_warm[k] = numpy_lloyd(state["x64"], k)[0]

        def cold(k=k):
            q = lc.AdaptiveQuantization(k)
            out = q.compress(state["w"])
            results_store[f"ours_cold_{k}"] = (out, state["w"])

        def warm(k=k):
            out = ours_warm[k].compress(state["w"])
            results_store[f"ours_warm_{k}"] = (out, state["w"])

        def np_cold(k=k):
            c, a, it = numpy_lloyd(state["x64"], k, seed=0)
            results_store[f"numpy_cold_{k}"] = (c, a, it, state["w"])

        def np_warm_fn(k=k):
            c, a, it = numpy_lloyd(state["x64"], k, init=np_warm[k])
            np_warm[k] = c
            results_store[f"numpy_warm_{k}"] = (c, a, it, state["w"])

        add(f"AdaptiveQuantization(k={k}) cold", cold, COLD_MS)
        add(f"AdaptiveQuantization(k={k}) warm", warm, WARM_MS)
        add(f"numpy_lloyd(k={k}) cold", np_cold, None, args.ref_repeats, "reference")
        add(f"numpy_lloyd(k={k}) warm", np_warm_fn, None, args.ref_repeats, "reference")
        if sk is not None:
            KMeans, limits, _ = sk
            with limits(args.threads):
                sk_warm[k] = KMeans(n_clusters=k, n_init=1, random_state=0).fit(
                    state["x64"].reshape(-1, 1)).cluster_centers_

            def sk_cold(k=k):
                with limits(args.threads):
                    km = KMeans(n_clusters=k, n_init=1, random_state=0).fit(state["x64"].reshape(-1, 1))
                results_store[f"sklearn_cold_{k}"] = (km, state["w"])

            def sk_warm_fn(k=k):
                with limits(args.threads):
                    km = KMeans(n_clusters=k, n_init=1, init=sk_warm[k]).fit(state["x64"].reshape(-1, 1))
                sk_warm[k] = km.cluster_centers_
                results_store[f"sklearn_warm_{k}"] = (km, state["w"])

            add(f"sklearn_KMeans(k={k}) cold", sk_cold, None, args.ref_repeats, "reference")
            add(f"sklearn_KMeans(k={k}) warm", sk_warm_fn, None, args.ref_repeats, "reference")

    def exact(k):
        def fn():
            out = lc.AdaptiveQuantization(k, exact=True).compress(state["w"])
            results_store[f"exact_{k}"] = (out, state["w"])
        return fn

    add("AdaptiveQuantization(k=4, exact=True)", exact(4), EXACT_MS, args.exact_repeats)
    add("AdaptiveQuantization(k=2, exact=True)", exact(2), None, args.exact_repeats)

    def one_thread(fn):
        def run():
            torch.set_num_threads(1)
            try:
                fn()
            finally:
                torch.set_num_threads(args.threads)
        return run

    add("AdaptiveQuantization(k=4, exact=True) threads=1", one_thread(exact(4)), EXACT_MS, args.exact_repeats,
        "threads")
    add("AdaptiveQuantization(k=4) cold threads=1",
        one_thread(lambda: lc.AdaptiveQuantization(4).compress(state["w"])), COLD_MS, None, "threads")

    kappa = int(round(0.05 * n))
    simple = [
        ("ConstraintL0Pruning(kappa=5%)", lambda: lc.ConstraintL0Pruning(kappa=kappa), 0.0, FAST_MS),
        ("ConstraintL1Pruning(kappa=radius for 5%)", lambda: lc.ConstraintL1Pruning(kappa=l1_radius), 0.0, FAST_MS),
        ("PenaltyL0Pruning(alpha for 5%, mu=1)", lambda: lc.PenaltyL0Pruning(alpha=0.5 * tau * tau), 1.0, FAST_MS),
        ("PenaltyL1Pruning(alpha for 5%, mu=1)", lambda: lc.PenaltyL1Pruning(alpha=tau), 1.0, FAST_MS),
        ("ScaledTernaryQuantization", lc.ScaledTernaryQuantization, 0.0, FAST_MS),
        ("BinaryQuantization", lc.BinaryQuantization, 0.0, None),
        ("ScaledBinaryQuantization", lc.ScaledBinaryQuantization, 0.0, None),
        ("PowersOfTwoQuantization(c=4)", lambda: lc.PowersOfTwoQuantization(c=4), 0.0, None),
    ]
    objs: dict[str, Any] = {}
    for name, make, mu, target in simple:
        def fn(name=name, make=make, mu=mu):
            c = make()
            c.compress(state["w"], mu)
            objs[name] = c
        add(name, fn, target)

    def lowrank():
        objs["LowRank"] = c = lc.LowRank(rank=50)
        c.compress(W)

    def ranksel():
        objs["RankSelection"] = c = lc.RankSelection(alpha=rs_alpha)
        c.compress(W, 1.0)

    add(f"LowRank(rank=50) {m}x{m}", lowrank)
    add(f"RankSelection(alpha for rank~50, mu=1) {m}x{m}", ranksel)

    # ---- run: every repeat runs every case once, in a rotating order -------------------------------------------
    total = args.warmup + max(args.repeats, args.ref_repeats, args.exact_repeats)
    for rep in range(total):
        step_weights()
        r = rep - args.warmup
        order = cases[rep % len(cases):] + cases[: rep % len(cases)]
        for c in order:
            limit = args.repeats if c.repeats is None else c.repeats
            if r >= limit:
                continue
            dt, dc, _ = timed(c.fn)
            if r >= 0:
                c.times.append(dt)
                c.cpu.append(dc)
                c.rep_index.append(r)
        log(f"repeat {r + 1}/{total - args.warmup} done")

    # ---- what the C steps produced -----------------------------------------------------------------------------
    infos: dict[str, dict[str, Any]] = {}
    for name, *_ in simple:
        c = objs[name]
        if hasattr(c, "nnz"):
            infos[name] = {"nonzero_fraction": round(c.nnz / n, 4)}
    infos[f"LowRank(rank=50) {m}x{m}"] = {"rank": objs["LowRank"].selected_rank}
    infos[f"RankSelection(alpha for rank~50, mu=1) {m}x{m}"] = {
        "alpha": rs_alpha, "selected_rank": objs["RankSelection"].selected_rank}

    result["cases"] = {
        c.name: {**with_target(summary_ms(c.times, c.cpu), c.target_ms), **infos.get(c.name, {})}
        for c in cases if c.group in ("cases", "threads")
    }
    result["thread_sensitivity"] = {
        "note": "same C step with 1 and 2 torch threads, timed in the same loop; on a loaded 2-core machine "
                "OpenMP barriers in many small parallel ops can make 2 threads far slower than 1",
        "exact_k4_ratio_2threads_over_1thread": _ratio(cases, "AdaptiveQuantization(k=4, exact=True)",
                                                       "AdaptiveQuantization(k=4, exact=True) threads=1"),
        "cold_k4_ratio_2threads_over_1thread": _ratio(cases, "AdaptiveQuantization(k=4) cold",
                                                      "AdaptiveQuantization(k=4) cold threads=1"),
    }

    # ---- reference comparison (paired per repeat) --------------------------------------------------------------
    byname = {c.name: c for c in cases}
    ref: dict[str, Any] = {
        "note": "reference time / our time: *_over_ours is the median of the ratios within one loop iteration, "
                "*_over_ours_medians the ratio of the medians (ours over all its repeats), *_over_ours_min the "
                "ratio of the fastest runs; references get float64 NumPy arrays prepared outside the timed region",
    }
    for k in (2, 4, 16):
        row: dict[str, Any] = {}
        for mode in ("cold", "warm"):
            ours = byname[f"AdaptiveQuantization(k={k}) {mode}"]
            row[f"ours_{mode}"] = summary_ms(ours.times, ours.cpu)
            for refname in ("numpy_lloyd", "sklearn_KMeans"):
                c = byname.get(f"{refname}(k={k}) {mode}")
                if c is None or not c.times:
                    continue
                paired = [ours.times[ours.rep_index.index(i)] for i in c.rep_index]
                row[f"{refname}_{mode}"] = summary_ms(c.times, c.cpu)
                row[f"{refname}_{mode}_over_ours"] = round(paired_ratio(c.times, paired), 2)
                med_ratio = statistics.median(c.times) / statistics.median(ours.times)
                row[f"{refname}_{mode}_over_ours_medians"] = round(med_ratio, 2)
                row[f"{refname}_{mode}_over_ours_min"] = round(min(c.times) / min(ours.times), 2)
        ref[f"k={k}"] = row
    result["kmeans_reference"] = ref

    # ---- distortion relative to the exact optimum (untimed; 1 thread, which is faster on a busy machine) -------
    dist: dict[str, Any] = {}
    exact_cache: dict[tuple[int, int], float] = {}
    torch.set_num_threads(1)
    try:
        for k in (2, 4, 16):
            row = {}
            for key, val in results_store.items():
                if not key.endswith(f"_{k}"):
                    continue
                kind = key[: -len(f"_{k}")]
                if kind.startswith("exact"):
                    continue
                if kind.startswith("ours"):
                    out, w = val
                    d = sse(w.double(), out)
                elif kind.startswith("numpy"):
                    c, a, it, w = val
                    d = float(((w.double().numpy() - c[a]) ** 2).sum())
                    row[f"{kind}_iterations"] = it
                else:
                    km, w = val
                    d = float(km.inertia_)
                    row[f"{kind}_iterations"] = int(km.n_iter_)
                if (id(w), k) not in exact_cache:
                    ce, ae = F.kmeans_1d_exact(w, k)
                    exact_cache[(id(w), k)] = sse(w.double(), ce[ae])
                d_exact = exact_cache[(id(w), k)]
                row[f"{kind}_over_exact"] = round(d / d_exact, 5)
            dist[f"k={k}"] = row
    finally:
        torch.set_num_threads(args.threads)
    dist["target_ours_over_exact"] = 1.02
    dist["meets_target"] = all(
        v <= 1.02 for row in dist.values() if isinstance(row, dict)
        for key, v in row.items() if key.startswith("ours") and key.endswith("_over_exact")
    )
    result["kmeans_distortion"] = dist

    tgt = [(name, c) for name, c in result["cases"].items() if c["meets_target"] is not None]
    result["targets_missed"] = [name for name, c in tgt if not c["meets_target"]]
    emit(result)


def _ratio(cases: list[Case], a: str, b: str) -> float | None:
    ca = next(c for c in cases if c.name == a)
    cb = next(c for c in cases if c.name == b)
    if not ca.times or not cb.times:
        return None
    return round(statistics.median(ca.times) / statistics.median(cb.times), 2)


if __name__ == "__main__":
    main()
