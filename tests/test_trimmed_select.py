"""The shortcuts of the quantization + ℓ0-pruning sum's C step against plain references: nearest codes from
histogram bins, the top-κ errors ranked above a bound, the bound itself, and the whole C step against the
rounds written out with the parts' own C steps."""
import pytest
import torch

import lcompress as lc
from lcompress import functional as F
from lcompress._trimmed_kmeans import WeightedPoints, _Trimmed, fit, top_errors, trimmed_kmeans_1d

N = 70_000  # above 2^16: the points are a histogram


def laplace(n, seed, scale=0.03):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, generator=g) - 0.5
    return (-scale * torch.sign(u) * torch.log1p(-2 * u.abs())).float()


def nearest_reference(x, c):
    """Code = how many midpoints x lies above (ties to the lower entry), by broadcasting."""
    mids = (c[1:] + c[:-1]) * 0.5
    return (x[:, None] > mids[None, :]).sum(1)


@pytest.mark.parametrize("k", [8, 16, 40])
def test_nearest_from_bins_matches_reference(k):
    x = laplace(N, k)
    pts = WeightedPoints(x)
    assert not pts.unit
    g = torch.Generator().manual_seed(100 + k)
    c = torch.sort(torch.randn(k, generator=g) * 0.04).values
    # adversarial values: every midpoint and centre itself, and its float neighbours, and bin edges
    mids = (c[1:] + c[:-1]) * 0.5
    special = torch.cat([mids, c, torch.nextafter(mids, torch.full_like(mids, 1.0)),
                         torch.nextafter(mids, torch.full_like(mids, -1.0))])
    x[: special.numel()] = special
    edges = pts.lo + pts.width * torch.arange(1, 200, dtype=torch.float32)
    x[special.numel(): special.numel() + edges.numel()] = edges
    pts = WeightedPoints(x)
    codes = pts.nearest(x, c)
    assert codes.dtype == torch.uint8
    assert torch.equal(codes.long(), nearest_reference(x, c))
    assert torch.equal(codes, F.nearest_in_codebook(x, c))
    # where one centre is clearly nearer, it is the nearest by distance
    dist = (x[:, None] - c[None, :]).abs()
    top2 = torch.topk(dist, 2, largest=False).values
    clear = top2[:, 1] - top2[:, 0] > 1e-6
    assert torch.equal(codes.long()[clear], dist.argmin(1)[clear])


def test_nearest_from_bins_odd_codebooks():
    x = laplace(N, 1)
    pts = WeightedPoints(x)
    lo, hi = float(x.min()), float(x.max())
    cases = [
        torch.linspace(lo - 5.0, hi + 5.0, 12),  # midpoints beyond the range of x
        torch.tensor([-1e30, -1e29] + torch.linspace(-0.05, 0.05, 8).tolist() + [1e29, 3e38]),  # far outside
        torch.tensor([-3e38] + torch.linspace(-0.05, 0.05, 8).tolist() + [3e38]),  # quotients overflow
        torch.tensor(torch.linspace(-0.05, 0.05, 9).tolist() + [2e10]),  # quotient beyond int32
        torch.sort(torch.cat([torch.linspace(-0.05, 0.05, 9), torch.tensor([0.05 + 1e-9])])).values,  # one bin
        torch.tensor([-0.02] * 4 + [0.0] * 3 + [0.03] * 5),  # repeated centres
    ]
    for c in cases:
        c = c.float()
        assert torch.equal(pts.nearest(x, c).long(), nearest_reference(x, c)), c
    # exact points (up to 2^16 values) and small codebooks use the compares
    y = x[:5000]
    c = torch.linspace(-0.05, 0.05, 16)
    assert torch.equal(WeightedPoints(y).nearest(y, c).long(), nearest_reference(y, c))
    assert torch.equal(pts.nearest(x, c[:4]).long(), nearest_reference(x, c[:4]))


def check_top(e, kappa, idx):
    assert idx.numel() == kappa
    assert torch.all(idx[1:] > idx[:-1])  # ascending, no repeats
    ref = torch.topk(e, kappa).values
    assert torch.equal(torch.sort(e[idx], descending=True).values, ref)


@pytest.mark.parametrize("seed", [0, 1])
def test_top_errors_against_topk(seed):
    g = torch.Generator().manual_seed(seed)
    e = torch.randint(0, 50, (20_000,), generator=g).float()  # many ties
    for kappa in (0, 1, 7, 400, 401, 19_999, 20_000):
        kth = float(torch.topk(e, kappa).values[-1]) if kappa else 0.0
        for below in (None, float("-inf"), kth - 0.5, kth, kth + 0.5, 1e9):
            idx, cand = top_errors(e, kappa, below)
            check_top(e, kappa, idx)
            if cand is not None and 0 < kappa < e.numel():  # what was ranked: every value above the bound
                assert torch.equal(cand, torch.nonzero(e > below).reshape(-1))
    # a bound that exactly κ values exceed: those are the answer
    f = torch.rand(5000, generator=g)
    kth = float(torch.topk(f, 30).values[-1])
    check_top(f, 30, top_errors(f, 30, float(torch.topk(f, 31).values[-1]))[0])
    check_top(f, 30, top_errors(f, 30, kth)[0])
    # within a set outside which every value is at most the bound: ranked there only, or None when too few
    below = float(torch.topk(f, 200).values[-1])
    within = torch.nonzero(f > below).reshape(-1)
    check_top(f, 30, top_errors(f, 30, below, within=within)[0])
    check_top(f, 30, top_errors(f, 30, kth - 1e-7, within=within)[0])
    assert top_errors(f, 30, float(torch.topk(f, 10).values[-1]), within=within) == (None, None)


@pytest.mark.parametrize("n", [3000, N])
def test_lower_bound_more_than_kappa_exceed_it(n):
    x = laplace(n, 3)
    x[:20] *= 30  # outliers
    for k, kappa in ((2, 30), (5, n // 20), (16, n // 100)):
        pts = WeightedPoints(x)
        c, bound = fit(pts, k, kappa)
        e = (x - c[F.nearest_in_codebook(x, c).long()]).abs()
        above = int((e > bound).sum())
        assert above > kappa
        # and close: not many more than κ (else the shortcut would rank nearly everything)
        assert above <= kappa + max(20, n // 200), (k, kappa, above)
        # the same bound for any codebook, from _Trimmed directly
        c2 = torch.sort(c + 0.003 * torch.randn(k)).values
        b2 = _Trimmed(pts, kappa).lower_bound(c2.double())
        e2 = (x - c2[F.nearest_in_codebook(x, c2).long()]).abs()
        assert int((e2 > b2).sum()) > kappa
    assert torch.equal(fit(WeightedPoints(x), 4, 50)[0], trimmed_kmeans_1d(x, 4, 50))


def reference_rounds(w, k, kappa, value_dtype, rounds=10, tol=1e-6):
    """The C step after the trimmed k-means, written out with the parts' own C steps: nearest codes and the
    top-κ magnitudes of the residual, then a Lloyd step of the codebook on its own residual, per round."""
    c = trimmed_kmeans_1d(w, k, kappa)
    best, prev = None, None
    codes = F.nearest_in_codebook(w, c)
    for r in range(rounds):
        if r > 0:
            rq = w - dp
            codes = F.nearest_in_codebook(rq, c)
            c, _ = F.group_means(rq, codes, k, fallback=c)
        dq = c[codes.long()]
        resid = w - dq
        idx = torch.sort(torch.topk(resid.abs(), kappa).indices).values
        dp = torch.zeros_like(w)
        dp[idx] = resid[idx].to(value_dtype).float()
        d = float(torch.sum((w - dq - dp) ** 2))
        state = (d, c, codes, idx)
        if best is None or d < best[0]:
            best = state
        if prev is not None and prev - d <= tol * max(prev, 1e-30):
            break
        prev = d
    return state if best[0] >= d else best


@pytest.mark.parametrize("k,fraction,value_dtype", [(16, 0.01, "float32"), (4, 0.05, "float16"),
                                                    (2, 0.01, "float32")])
def test_sum_equals_rounds_of_the_parts_own_c_steps(k, fraction, value_dtype):
    w = laplace(N, 10 + k)
    w[:30] += 0.5  # a few outliers
    kappa = round(fraction * N)
    q, p = lc.AdaptiveQuantization(k), lc.ConstraintL0Pruning(fraction=fraction, value_dtype=value_dtype)
    out = (q + p).compress(w)
    d, c, codes, idx = reference_rounds(w, k, kappa, getattr(torch, value_dtype))
    assert torch.equal(q.theta["codebook"], c)
    assert torch.equal(q.theta["codes"].long(), codes.long())
    # the support may differ only between equal residuals
    resid = (w - c[codes.long()]).abs()
    assert torch.equal(torch.sort(resid[p.theta["indices"]]).values, torch.sort(resid[idx]).values)
    assert float(torch.sum((w - out) ** 2)) == pytest.approx(d, rel=1e-6)
    assert torch.equal(out, q.decompress() + p.decompress())
