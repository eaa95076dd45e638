"""C-step math against independent references: brute force on tiny inputs, closed forms, optimality conditions."""
import itertools
import math

import pytest
import torch

from lcompress import functional as F


def sq(x, y):
    return float(((x.double() - y.double()) ** 2).sum())


def weightlike(n, kind, g=None):
    if kind == "gauss":
        return torch.randn(n, generator=g) * 0.05
    if kind == "laplace":
        u = torch.rand(n, generator=g) - 0.5
        return -0.03 * torch.sign(u) * torch.log1p(-2 * u.abs())
    if kind == "student":
        return 0.02 * torch.distributions.StudentT(3.0).sample((n,))
    if kind == "bimodal":
        return torch.cat([torch.randn(n // 2) * 0.02 - 0.1, torch.randn(n - n // 2) * 0.03 + 0.05])
    raise ValueError(kind)


# ---- nearest codebook entry ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 7, 16, 300])
def test_nearest_in_codebook_matches_argmin(k):
    c = torch.sort(torch.randn(k)).values
    x = torch.randn(5000) * 2
    idx = F.nearest_in_codebook(x, c).long()
    ref = torch.argmin((x[:, None] - c[None, :]).abs(), dim=1)
    # equal distances (ties) may pick either: compare the distances, which must match exactly
    assert torch.equal((x - c[idx]).abs(), (x - c[ref]).abs())


# ---- k-means ------------------------------------------------------------------------------------------------
def brute_kmeans(x, k):
    """Optimal 1-D k-means by enumerating every contiguous partition of the sorted values."""
    xs = sorted(x.tolist())
    n = len(xs)
    best = math.inf
    for cuts in itertools.combinations(range(1, n), k - 1):
        b = (0,) + cuts + (n,)
        d = 0.0
        for lo, hi in zip(b[:-1], b[1:]):
            seg = xs[lo:hi]
            m = sum(seg) / len(seg)
            d += sum((v - m) ** 2 for v in seg)
        best = min(best, d)
    return best


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_kmeans_exact_matches_brute_force(seed, k):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(9, generator=g)
    if seed % 2:
        x[3] = x[5]  # duplicates
    c, a = F.kmeans_1d_exact(x, k)
    assert sq(x, c[a.long()]) == pytest.approx(brute_kmeans(x, k), rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("kind", ["gauss", "laplace", "student", "bimodal"])
@pytest.mark.parametrize("k", [2, 4, 8, 16])
def test_kmeans_cold_within_2_percent_of_optimum(kind, k):
    x = weightlike(20000, kind)
    c, a = F.kmeans_1d(x, k)
    _, _ = c, a
    c_opt, a_opt = F.kmeans_1d_exact(x, k)
    assert sq(x, c[a.long()]) <= 1.02 * sq(x, c_opt[a_opt.long()])


@pytest.mark.parametrize("k", [2, 4, 16])
def test_kmeans_warm_start_tracks_the_optimum(k):
    x = weightlike(20000, "laplace")
    c, _ = F.kmeans_1d(x, k)
    for _ in range(5):  # weights drift as in an L step; warm starts follow
        x = x + 0.003 * torch.randn_like(x)
        c, a = F.kmeans_1d(x, k, init=c)
        c_opt, a_opt = F.kmeans_1d_exact(x, k)
        assert sq(x, c[a.long()]) <= 1.02 * sq(x, c_opt[a_opt.long()])


def test_kmeans_fixed_point_conditions():
    x = weightlike(5000, "bimodal")
    c, a = F.kmeans_1d(x, 4)
    a = a.long()
    # every centroid is the mean of its cluster; every point is at its nearest centroid
    for j in range(4):
        assert float(c[j]) == pytest.approx(float(x[a == j].double().mean()), abs=1e-6)
    d_assigned = (x - c[a]).abs()
    d_best = (x[:, None] - c[None]).abs().min(1).values
    assert torch.all(d_assigned <= d_best + 1e-6)


def test_kmeans_never_worse_than_its_warm_start():
    x = weightlike(10000, "student")
    init = torch.tensor([-0.5, -0.01, 0.02, 0.3])
    c, a = F.kmeans_1d(x, 4, init=init)
    a0 = F.nearest_in_codebook(x, init).long()
    assert sq(x, c[a.long()]) <= sq(x, init[a0])


def test_kmeans_degenerate_inputs():
    x = torch.full((100,), 0.25)
    c, a = F.kmeans_1d(x, 4)
    assert torch.allclose(c[a.long()], x)
    c, a = F.kmeans_1d(torch.tensor([1.0, 2.0]), 4)  # more centroids than points
    assert torch.allclose(c[a.long()], torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="k=0"):
        F.kmeans_1d(x, 0)


# ---- binary / ternary / powers of two -------------------------------------------------------------------------
def test_scaled_binary_is_optimal():
    x = torch.randn(7)
    a, pos = F.scaled_binary(x)
    got = sq(x, torch.where(pos, a, -a))
    best = min(
        sq(x, s * float((x * s).sum()) / len(s))
        for s in (torch.tensor(v, dtype=torch.float32) for v in itertools.product([-1, 1], repeat=7))
    )
    assert got == pytest.approx(best, rel=1e-6)


def brute_scaled_ternary(x):
    best = float((x.double() ** 2).sum())
    for s in itertools.product([-1, 0, 1], repeat=x.numel()):
        s = torch.tensor(s, dtype=torch.float64)
        nz = int((s != 0).sum())
        if nz:
            a = float((x.double() * s).sum()) / nz  # best scale for this sign pattern
            best = min(best, float(((x.double() - a * s) ** 2).sum()))
    return best


@pytest.mark.parametrize("seed", range(25))
def test_scaled_ternary_matches_all_supports(seed):
    g = torch.Generator().manual_seed(seed)
    n = 1 + seed % 8
    x = torch.randn(n, generator=g) * (0.1 + seed)
    if seed % 5 == 0:
        x = x.abs() ** 3  # skewed magnitudes
    a, s = F.scaled_ternary(x, bins=3 + seed % 4)  # few bins so the within-bin search is exercised
    assert s.dtype == torch.int8 and s.shape == x.shape
    assert sq(x, a * s.float()) == pytest.approx(brute_scaled_ternary(x), rel=1e-5, abs=1e-9)


def test_scaled_ternary_large_matches_sorted_scan():
    x = weightlike(200000, "laplace")
    a, s = F.scaled_ternary(x)
    v = torch.sort(x.abs().double(), descending=True).values
    t = torch.arange(1, v.numel() + 1, dtype=torch.float64)
    obj = torch.cumsum(v, 0) ** 2 / t
    best = float((x.double() ** 2).sum() - obj.max())
    assert sq(x, a * s.float()) == pytest.approx(best, rel=1e-5)


def test_ternary_and_powers_of_two_nearest():
    x = torch.randn(1000) * 0.7
    t = F.ternary(x)
    cb = torch.tensor([-1.0, 0.0, 1.0])
    assert torch.equal((x - t).abs(), (x[:, None] - cb).abs().min(1).values)
    cb = F.powers_of_two_codebook(3)
    assert cb.tolist() == [-1, -0.5, -0.25, -0.125, 0, 0.125, 0.25, 0.5, 1]


# ---- pruning ----------------------------------------------------------------------------------------------------
def test_topk_magnitude_is_best_support():
    x = torch.randn(8)
    for kappa in range(9):
        idx = F.topk_magnitude(x, kappa)
        assert idx.numel() == kappa
        theta = torch.zeros_like(x)
        theta[idx] = x[idx]
        best = min(
            sq(x, x * torch.isin(torch.arange(8), torch.tensor(sup, dtype=torch.long)))
            for sup in itertools.combinations(range(8), kappa)
        )
        assert sq(x, theta) == pytest.approx(best, abs=1e-9)


def l1_reference(x, radius):
    """Sort-based projection onto the l1 ball (Duchi et al. 2008), in float64."""
    v = x.double()
    if float(v.abs().sum()) <= radius:
        return v
    if radius == 0:
        return torch.zeros_like(v)
    u = torch.sort(v.abs(), descending=True).values
    css = torch.cumsum(u, 0)
    j = torch.arange(1, len(u) + 1, dtype=torch.float64)
    rho = int(torch.nonzero(u - (css - radius) / j > 0).max())
    tau = (css[rho] - radius) / (rho + 1)
    return torch.sign(v) * (v.abs() - tau).clamp_min(0)


@pytest.mark.parametrize("radius", [0.0, 0.01, 1.0, 10.0, 1e6])
def test_project_l1_ball_matches_sort_reference(radius):
    x = weightlike(50000, "laplace")
    p = F.project_l1_ball(x, radius)
    ref = l1_reference(x, radius)
    assert torch.allclose(p.double(), ref, atol=1e-6)
    assert float(p.abs().sum()) <= radius * (1 + 1e-5) + 1e-6


def test_thresholds_minimize_their_objectives_elementwise():
    x = torch.linspace(-2, 2, 401)
    grid = torch.linspace(-2.5, 2.5, 5001)
    for alpha, mu in [(0.1, 1.0), (0.5, 3.0)]:
        # α‖θ‖₀ + μ/2(x − θ)²: brute force over a grid of θ (0 included)
        obj0 = alpha * (grid != 0) + 0.5 * mu * (x[:, None] - grid) ** 2
        obj1 = alpha * grid.abs() + 0.5 * mu * (x[:, None] - grid) ** 2
        h = F.hard_threshold(x, alpha, mu)
        s = F.soft_threshold(x, alpha, mu)
        val0 = alpha * (h != 0) + 0.5 * mu * (x - h) ** 2
        val1 = alpha * s.abs() + 0.5 * mu * (x - s) ** 2
        assert torch.all(val0 <= obj0.min(1).values + 1e-6)
        assert torch.all(val1 <= obj1.min(1).values + 1e-6)
    assert torch.count_nonzero(F.hard_threshold(x, 0.1, 0.0)) == 0  # μ → 0⁺ prunes everything


# ---- low-rank ---------------------------------------------------------------------------------------------------
def test_truncated_svd_eckart_young():
    w = torch.randn(30, 20)
    s = torch.linalg.svdvals(w.double())
    for r in (1, 5, 20):
        a, b = F.truncated_svd(w, r)
        assert a.shape == (30, r) and b.shape == (r, 20)
        assert sq(w, a @ b) == pytest.approx(float((s[r:] ** 2).sum()), rel=1e-4, abs=1e-6)
        assert int(torch.linalg.matrix_rank(a @ b)) == r


def test_rank_select_brute_force():
    s = torch.sort(torch.rand(12) * 3, descending=True).values
    for alpha, mu, c in [(1e-3, 1.0, 50), (0.1, 0.5, 10), (1.0, 100.0, 3), (0.05, 1e-6, 20)]:
        r = F.rank_select(s, alpha, mu, c)
        objs = [alpha * c * q + 0.5 * mu * float((s[q:].double() ** 2).sum()) for q in range(13)]
        assert objs[r] == pytest.approx(min(objs), rel=1e-6, abs=1e-9)
    assert F.rank_select(s, 1.0, 0.0, 10) == 0


@pytest.mark.parametrize("kind", ["gauss", "laplace", "student", "bimodal"])
@pytest.mark.parametrize("k", [8, 16, 255])
def test_nearest_by_bins_equals_direct_comparison(kind, k):
    x = weightlike(200000, kind)
    cnt, sm, lo, width, b = F._histogram(x, 1 << 12)
    c = torch.sort(x[torch.randperm(x.numel())[:k]]).values
    c[k // 2] = c[k // 2 - 1]  # a duplicated entry: a zero-width cell
    got = F._nearest_by_bins(x, b, c, lo, width, 1 << 12)
    want = F.nearest_in_codebook(x, c)
    assert torch.equal(got, want)


@pytest.mark.parametrize("k", [2, 5])
def test_group_means_are_accurate_for_large_groups(k):
    """2^18+ float32 values per group: the means within a few ulps of float64 ones (bincount's sequential
    float32 sum alone was off by ~1e-3 relative here)."""
    g = torch.Generator().manual_seed(k)
    n = k * (1 << 18) + 123
    x = 0.05 * torch.randn(n, generator=g) + 0.3
    idx = torch.randint(k, (n,), generator=g).to(torch.uint8)
    means, counts = F.group_means(x, idx, k)
    ref = torch.zeros(k, dtype=torch.float64).index_add_(0, idx.long(), x.double())
    ref /= torch.bincount(idx.long(), minlength=k).double()
    assert means.dtype == torch.float32 and counts.sum() == n
    assert torch.allclose(means.double(), ref, rtol=4e-7, atol=0)
