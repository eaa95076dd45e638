"""Tests for the exact (globally optimal) 1-D k-means, lcompress._kmeans_exact."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lcompress._kmeans_exact import kmeans_1d_exact

# --------------------------------------------------------------------------
# Independent references (float64, plain Python on tiny inputs)
# --------------------------------------------------------------------------


def _sse(values: list[float]) -> float:
    if not values:
        return 0.0
    mu = sum(values) / len(values)
    return sum((v - mu) ** 2 for v in values)


def brute_contiguous(x: list[float], k: int) -> float:
    """Optimal SSE over all partitions of sorted x into k nonempty contiguous groups."""
    xs = sorted(x)
    n = len(xs)
    k_eff = min(k, n)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), k_eff - 1):
        b = (0, *cuts, n)
        best = min(best, sum(_sse(xs[b[t] : b[t + 1]]) for t in range(k_eff)))
    return best


def brute_labels(x: list[float], k: int) -> float:
    """Optimal SSE over ALL assignments of points to k labels (no contiguity assumed)."""
    best = math.inf
    for labels in itertools.product(range(k), repeat=len(x)):
        groups: list[list[float]] = [[] for _ in range(k)]
        for v, lab in zip(x, labels):
            groups[lab].append(v)
        best = min(best, sum(_sse(g) for g in groups))
    return best


def distortion(x: torch.Tensor, c: torch.Tensor, a: torch.Tensor) -> float:
    x64 = x.reshape(-1).to(torch.float64)
    return float(((x64 - c.to(torch.float64)[a]) ** 2).sum())


def lloyd(x: torch.Tensor, k: int, restarts: int, iters: int, gen: torch.Generator) -> float:
    """Plain Lloyd with random-sample initialisation; best distortion over restarts."""
    x64 = x.reshape(-1).to(torch.float64)
    best = math.inf
    for _ in range(restarts):
        c = x64[torch.randperm(x64.numel(), generator=gen)[:k]].clone()
        for _ in range(iters):
            a = (x64[:, None] - c[None, :]).abs().argmin(1)
            cnt = torch.bincount(a, minlength=k).to(torch.float64)
            s = torch.zeros(k, dtype=torch.float64).index_add_(0, a, x64)
            c = torch.where(cnt > 0, s / cnt.clamp_min(1), c)
        a = (x64[:, None] - c[None, :]).abs().argmin(1)
        best = min(best, float(((x64 - c[a]) ** 2).sum()))
    return best


def _close(got: float, ref: float, rel: float = 1e-9) -> bool:
    return abs(got - ref) <= rel * max(abs(ref), 1.0) + 1e-12


def _gen_data(kind: str, n: int, g: torch.Generator) -> torch.Tensor:
    if kind == "gauss":
        return torch.randn(n, generator=g)
    if kind == "dups":
        return torch.randint(0, 3, (n,), generator=g).to(torch.float32) * 0.5
    if kind == "laplace":
        u = torch.rand(n, generator=g, dtype=torch.float64) - 0.5
        return (-torch.sign(u) * torch.log1p(-2 * u.abs())).to(torch.float32)
    if kind == "student_t":  # t with 2 degrees of freedom: z / sqrt(chi2_2 / 2)
        z = torch.randn(n, generator=g, dtype=torch.float64)
        chi2 = -2 * torch.log(torch.rand(n, generator=g, dtype=torch.float64).clamp_min(1e-300))
        return (z / torch.sqrt(chi2 / 2)).to(torch.float32)
    if kind == "clustered":
        centers = torch.tensor([-5.0, 0.0, 0.3, 7.0])
        idx = torch.randint(0, 4, (n,), generator=g)
        return centers[idx] + 0.05 * torch.randn(n, generator=g)
    raise AssertionError(kind)


KINDS = ["gauss", "dups", "laplace", "student_t", "clustered"]


def _check_valid(x: torch.Tensor, k: int, c: torch.Tensor, a: torch.Tensor) -> None:
    assert c.shape == (k,) and c.dtype == torch.float32 and c.device == x.device
    assert a.shape == (x.numel(),) and a.dtype == torch.int64 and a.device == x.device
    assert int(a.min()) >= 0 and int(a.max()) < k
    assert bool((c[1:] >= c[:-1]).all()), "codebook must be sorted ascending"


# --------------------------------------------------------------------------
# Exactness on tiny inputs
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_matches_contiguous_bruteforce(kind):
    g = torch.Generator().manual_seed(1234 + KINDS.index(kind))
    for trial in range(12):
        n = 1 + trial % 10
        x = _gen_data(kind, n, g)
        xl = x.to(torch.float64).tolist()
        for k in range(1, 5):
            c, a = kmeans_1d_exact(x, k)
            _check_valid(x, k, c, a)
            ref = brute_contiguous(xl, k)
            got = distortion(x, c, a)
            assert _close(got, ref), (kind, n, k, got, ref, xl)


@pytest.mark.parametrize("kind", KINDS)
def test_matches_all_assignments_bruteforce(kind):
    """Does not assume contiguity: enumerate every labelling (n <= 7)."""
    g = torch.Generator().manual_seed(99 + KINDS.index(kind))
    for n in (1, 3, 5, 7):
        x = _gen_data(kind, n, g)
        xl = x.to(torch.float64).tolist()
        for k in range(1, 5):
            if k**n > 20000:
                continue
            c, a = kmeans_1d_exact(x, k)
            ref = brute_labels(xl, k)
            got = distortion(x, c, a)
            assert _close(got, ref), (kind, n, k, got, ref, xl)


def test_random_seeds_many_small():
    for seed in range(40):
        g = torch.Generator().manual_seed(seed)
        n = int(torch.randint(2, 11, (1,), generator=g))
        x = torch.randn(n, generator=g) * float(torch.rand(1, generator=g) * 10 + 0.01)
        xl = x.to(torch.float64).tolist()
        for k in range(1, 5):
            c, a = kmeans_1d_exact(x, k)
            assert _close(distortion(x, c, a), brute_contiguous(xl, k)), (seed, k)


# --------------------------------------------------------------------------
# Larger inputs: vs Lloyd and optimality conditions
# --------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["gauss", "laplace", "clustered"])
@pytest.mark.parametrize("k", [2, 3, 5])
def test_beats_lloyd_and_local_optimality(kind, k):
    g = torch.Generator().manual_seed(7 * k + KINDS.index(kind))
    x = _gen_data(kind, 2000, g)
    c, a = kmeans_1d_exact(x, k)
    _check_valid(x, k, c, a)
    got = distortion(x, c, a)
    ref = lloyd(x, k, restarts=20, iters=30, gen=g)
    assert got <= ref * (1 + 1e-9) + 1e-9, (got, ref)

    x64 = x.to(torch.float64)
    c64 = c.to(torch.float64)
    # each centroid is the mean of its cluster
    cnt = torch.bincount(a, minlength=k)
    assert bool((cnt > 0).all())
    means = torch.zeros(k, dtype=torch.float64).index_add_(0, a, x64) / cnt
    scale = float(x64.abs().max())
    assert torch.allclose(c64, means, rtol=1e-5, atol=1e-6 * scale)
    # each point is assigned to its nearest centroid (up to ties)
    dist = (x64[:, None] - c64[None, :]) ** 2
    assigned = dist.gather(1, a[:, None]).squeeze(1)
    assert bool((assigned <= dist.min(1).values + 1e-6 * scale**2).all())


def test_exact_vs_dp_medium():
    """n=300: compare with a straightforward O(k n^2) float64 DP."""
    g = torch.Generator().manual_seed(5)
    for kind in ("gauss", "student_t", "dups"):
        x = _gen_data(kind, 300, g)
        xs = sorted(x.to(torch.float64).tolist())
        n = len(xs)
        pre = [0.0]
        pre2 = [0.0]
        for v in xs:
            pre.append(pre[-1] + v)
            pre2.append(pre2[-1] + v * v)

        def cost(m, i):
            s = pre[i] - pre[m]
            return max(pre2[i] - pre2[m] - s * s / (i - m), 0.0)

        for k in (2, 4, 6):
            D = [cost(0, i) if i else math.inf for i in range(n + 1)]
            for j in range(2, k + 1):
                D = [
                    min((D[m] + cost(m, i) for m in range(j - 1, i)), default=math.inf)
                    for i in range(n + 1)
                ]
            c, a = kmeans_1d_exact(x, k)
            got = distortion(x, c, a)
            assert _close(got, D[n], rel=1e-7), (kind, k, got, D[n])


def _dp_reference_torch(x: torch.Tensor, k: int) -> float:
    """O(k n^2) float64 DP, fully materialised cost matrix (independent of the D&C)."""
    xs = torch.sort(x.reshape(-1).to(torch.float64)).values
    xs = xs - xs.mean()
    n = xs.numel()
    S = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(xs, 0)])
    Q = torch.cat([torch.zeros(1, dtype=torch.float64), torch.cumsum(xs * xs, 0)])
    m = torch.arange(n + 1)[:, None]
    i = torch.arange(n + 1)[None, :]
    ln = (i - m).to(torch.float64)
    cost = (Q[None, :] - Q[:, None]) - (S[None, :] - S[:, None]) ** 2 / ln
    cost = torch.where(i > m, cost, torch.full_like(cost, math.inf))  # cost[m, i] of block x[m:i]
    D = cost[0].clone()
    for _ in range(2, k + 1):
        D = (D[:, None] + cost).min(0).values
    return float(D[n])


@pytest.mark.parametrize("kind", ["gauss", "laplace", "student_t", "clustered"])
def test_exact_vs_full_dp_n1500(kind):
    """Deeper recursion (and width bucketing) against the full O(k n^2) DP."""
    g = torch.Generator().manual_seed(11 + KINDS.index(kind))
    x = _gen_data(kind, 1500, g)
    for k in (3, 5, 8):
        c, a = kmeans_1d_exact(x, k)
        ref = _dp_reference_torch(x, k)
        got = distortion(x, c, a)
        assert _close(got, ref, rel=1e-9), (kind, k, got, ref)


def test_large_offset_partition_is_optimal():
    """Data = 1000 + 1e-3 * noise: the float64 prefix sums are taken on centred
    data, so the *partition* stays exactly optimal.  (The float32 codebook
    itself cannot resolve centroids finer than ~6e-5 at 1000, so the
    distortion is compared with per-cluster float64 means.)"""
    g = torch.Generator().manual_seed(21)
    x = 1000 + 1e-3 * torch.randn(1500, generator=g)
    x64 = x.to(torch.float64)
    for k in (2, 5, 9):
        _, a = kmeans_1d_exact(x, k)
        cnt = torch.bincount(a, minlength=k).to(torch.float64)
        mu = torch.zeros(k, dtype=torch.float64).index_add_(0, a, x64) / cnt
        got = float(((x64 - mu[a]) ** 2).sum())
        ref = _dp_reference_torch(x, k)
        assert abs(got - ref) <= 1e-9 * ref, (k, got, ref)


# --------------------------------------------------------------------------
# Edge cases and validation
# --------------------------------------------------------------------------


def test_k_at_least_distinct_values():
    x = torch.tensor([3.0, 1.0, 3.0, 2.0, 1.0])
    for k in (3, 4, 7):
        c, a = kmeans_1d_exact(x, k)
        _check_valid(x, k, c, a)
        assert distortion(x, c, a) == 0.0
        assert set(c.tolist()) == {1.0, 2.0, 3.0}
        assert torch.equal(c[a], x)


def test_k_equals_one_and_n_equals_one():
    x = torch.tensor([1.0, 2.0, 6.0])
    c, a = kmeans_1d_exact(x, 1)
    assert torch.allclose(c, torch.tensor([3.0])) and torch.equal(a, torch.zeros(3, dtype=torch.int64))
    c, a = kmeans_1d_exact(torch.tensor([2.5]), 3)
    _check_valid(torch.tensor([2.5]), 3, c, a)
    assert c[a].item() == 2.5
    c, a = kmeans_1d_exact(torch.tensor([2.5]), 1)
    assert c.tolist() == [2.5] and a.tolist() == [0]


def test_all_equal_values():
    x = torch.full((50,), -1.25)
    c, a = kmeans_1d_exact(x, 4)
    _check_valid(x, 4, c, a)
    assert torch.all(c == -1.25) and distortion(x, c, a) == 0.0


def test_shape_and_dtypes_preserved():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 5, 6, generator=g, dtype=torch.float64)
    c, a = kmeans_1d_exact(x, 3)
    assert c.dtype == torch.float32 and a.dtype == torch.int64 and a.shape == (120,)
    for dt in (torch.float16, torch.bfloat16):
        c, a = kmeans_1d_exact(x.to(dt), 3)
        _check_valid(x, 3, c, a)
    # assignments refer to the original order
    xf = x.reshape(-1)
    dist = (xf[:, None] - c.double()[None, :]) ** 2
    assert bool((dist.gather(1, a[:, None]).squeeze(1) <= dist.min(1).values + 1e-6).all())


def test_invalid_inputs():
    with pytest.raises(ValueError):
        kmeans_1d_exact(torch.tensor([]), 2)
    with pytest.raises(ValueError, match="k"):
        kmeans_1d_exact(torch.tensor([1.0, 2.0]), 0)
    with pytest.raises(TypeError):
        kmeans_1d_exact(torch.tensor([1, 2, 3]), 2)
    with pytest.raises(ValueError, match="finite"):
        kmeans_1d_exact(torch.tensor([1.0, float("nan")]), 2)
    with pytest.raises(ValueError, match="finite"):
        kmeans_1d_exact(torch.tensor([1.0, float("inf")]), 2)
    with pytest.raises(TypeError):
        kmeans_1d_exact(torch.tensor([1.0, 2.0]), 2.5)


def test_moderate_size_runs_and_is_consistent():
    """n = 20000, k = 8: output is a fixed point of Lloyd (local optimality)."""
    g = torch.Generator().manual_seed(3)
    x = _gen_data("student_t", 20000, g)
    c, a = kmeans_1d_exact(x, 8)
    _check_valid(x, 8, c, a)
    x64 = x.to(torch.float64)
    c64 = c.to(torch.float64)
    d_nearest = ((x64[:, None] - c64[None, :]) ** 2).min(1).values.sum()
    assert float(d_nearest) == pytest.approx(distortion(x, c, a), rel=1e-9)
