"""Pure tensor math behind the C steps: tensors in, tensors out, on the input's device.

Every function here solves one projection exactly (or, for :func:`kmeans_1d`, to a local optimum of Lloyd's
algorithm) without Python loops over weights. Loops over a handful of codebook entries or boundaries are fine.
Compression classes in :mod:`lcompress.compressions` call these and keep the results as Θ.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


__all__ = [
    "nearest_in_codebook",
    "kmeans_1d",
    "kmeans_1d_exact",
    "kmeans_1d_exact_rows",
    "distortion",
    "group_means",
    "scaled_binary",
    "scaled_ternary",
    "ternary",
    "powers_of_two_codebook",
    "topk_magnitude",
    "sparse_codebook",
    "project_l1_ball",
    "hard_threshold",
    "soft_threshold",
    "truncated_svd",
    "rank_select",
]


def kmeans_1d_exact(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Globally optimal 1-D k-means (dynamic programming over the sorted values).

    See :mod:`lcompress._kmeans_exact`. Returns (codebook (k,) sorted ascending, int64 assignments).
    """
    from ._kmeans_exact import kmeans_1d_exact as _exact

    return _exact(x, k)


def kmeans_1d_exact_rows(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Globally optimal 1-D k-means of every row of a matrix, each row its own codebook, all rows at once.

    See :mod:`lcompress._kmeans_rows`. Returns (codebooks (rows, k) float32, each row sorted ascending; int64
    codes of ``x``'s shape).
    """
    from ._kmeans_rows import kmeans_1d_exact_rows as _rows

    return _rows(x, k)


def distortion(x: Tensor, y: Tensor) -> Tensor:
    """Squared Euclidean distance ‖x − y‖² as a 0-d tensor (no host sync)."""
    d = (x - y).reshape(-1)
    return torch.dot(d, d)


def nearest_in_codebook(x: Tensor, codebook: Tensor) -> Tensor:
    """Index of the nearest codebook entry for every element of ``x``.

    ``codebook`` must be sorted ascending (length K ≤ 256). Ties go to the lower entry. The comparison runs
    against the K − 1 midpoints in uint8, which on CPU is several times faster than ``torch.bucketize``
    for K ≤ 16.

    Returns:
        uint8 tensor (int64 if K > 256) with the shape of ``x``.
    """
    k = codebook.numel()
    mids = (codebook[1:] + codebook[:-1]) * 0.5
    if k > 256:
        return torch.bucketize(x, mids, right=False)
    idx = torch.zeros(x.shape, dtype=torch.uint8, device=x.device)
    # K − 1 fused compare-and-add passes; x > mid means "at least the next entry"
    for j in range(k - 1):
        idx.add_(x > mids[j])
    return idx


#: group_means sums in float64 chunks of this many values
_SUM_CHUNK = 1 << 16


def group_means(x: Tensor, idx: Tensor, k: int, fallback: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Per-group mean of ``x`` for integer labels ``idx`` in [0, k).

    Args:
        x: flat float tensor.
        idx: integer labels, same length as ``x``.
        k: number of groups.
        fallback: value for empty groups (default 0).

    Returns:
        (means (k,), counts (k,)) in x's dtype.
    """
    idx = idx.reshape(-1)
    x = x.reshape(-1)
    counts = torch.bincount(idx, minlength=k)[:k].to(x.dtype)
    if x.device.type == "mps":  # no float64 there
        sums = torch.bincount(idx, weights=x, minlength=k)[:k]
    elif x.dtype == torch.float64 or x.numel() <= _SUM_CHUNK:  # .double() is x itself for float64
        sums = torch.bincount(idx, weights=x.double(), minlength=k)[:k]
    else:
        # bincount adds a group's members one after another in its weights' dtype: at 2^18 float32 values per group
        # the mean would be off by ~1e-3 relative. Each chunk is summed in float64 instead (a chunk-sized float64
        # temporary, never a copy of the whole tensor), and the chunks' sums are added in float64.
        sums = torch.zeros(k, dtype=torch.float64, device=x.device)
        for xs, ids in zip(x.split(_SUM_CHUNK), idx.split(_SUM_CHUNK)):
            sums += torch.bincount(ids, weights=xs.double(), minlength=k)[:k]
    sums = sums.to(x.dtype)
    means = sums / counts.clamp_min(1)
    if fallback is None:
        fallback = torch.zeros_like(means)
    means = torch.where(counts > 0, means, fallback)
    return means, counts


def _pow2_shift(value: float, budget: float) -> int:
    """The least s ≥ 0 with value · 2⁻ˢ ≤ budget.

    Multiplying by 2⁻ˢ is exact in floating point (down to the subnormal range), and the C steps that use this
    (k-means, scaled binary/ternary, group means) commute with it: run on x·2⁻ˢ, they give the same codes and
    2⁻ˢ times the values. So a C step whose sums would overflow float32 (weights near its range) runs on scaled
    weights instead; values below 2⁻¹²⁶⁺ˢ, far below the precision of the result, are the only ones rounded.
    """
    if not value > budget:
        return 0
    return max(0, math.ceil(math.log2(value / budget)))


def _sums_budget(dtype: torch.dtype, n: int) -> float:
    """Largest |x| for which sums of n values, differences and midpoints of two stay finite in ``dtype``."""
    return torch.finfo(dtype).max / (2.0 * (n + 4))


def _histogram(
    xf: Tensor, bins: int, lo_hi: tuple[Tensor, Tensor] | None = None
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Counts and sums of ``xf`` over ``bins`` equal-width bins spanning [min, max], and each value's bin."""
    lo, hi = torch.aminmax(xf) if lo_hi is None else lo_hi
    width = (hi - lo).clamp_min(torch.finfo(xf.dtype).tiny) / bins
    b = ((xf - lo) / width).to(torch.int32).clamp_(0, bins - 1)
    cnt = torch.bincount(b, minlength=bins).to(xf.dtype)
    sm = torch.bincount(b, weights=xf, minlength=bins).to(xf.dtype)
    return cnt, sm, lo, width, b


def _nearest_by_bins(xf: Tensor, b: Tensor, c: Tensor, lo: Tensor, width: Tensor, bins: int) -> Tensor:
    """:func:`nearest_in_codebook` for K ≤ 255 through the histogram's bins: every bin that no midpoint cuts
    (nor its neighbours', which absorbs the rounding in the bin index) maps to one code by a table lookup; only the
    values in the few cut bins are compared with the midpoints. One gather instead of K − 1 compare passes."""
    mids = (c[1:] + c[:-1]) * 0.5
    edges = lo + torch.arange(bins + 1, device=xf.device, dtype=xf.dtype) * width
    below = torch.searchsorted(mids, edges)  # midpoints strictly below each edge
    cut = below[:-1] != below[1:]
    near = cut.clone()
    near[1:] |= cut[:-1]
    near[:-1] |= cut[1:]
    table = torch.where(near, torch.full_like(below[:-1], 255), below[:-1]).to(torch.uint8)
    idx = table[b]
    fix = idx == 255
    idx[fix] = nearest_in_codebook(xf[fix], c)
    return idx


def _lloyd_hist(cnt: Tensor, sm: Tensor, lo: Tensor, width: Tensor, c: Tensor, iters: int, tol: float) -> Tensor:
    """Lloyd iterations on a histogram: O(K log B) per iteration via prefix sums over bins.

    Each bin is treated as a point mass at its mean, so this is Lloyd's algorithm on data rounded to within one
    bin width; the caller finishes with passes over the real data. The prefix sums are over B bins, not over the
    weights, so they are accumulated in float64 for accuracy at no real cost.
    """
    nb = cnt.numel()
    ccum = torch.cat([cnt.new_zeros(1, dtype=torch.float64), torch.cumsum(cnt, 0, dtype=torch.float64)])
    scum = torch.cat([sm.new_zeros(1, dtype=torch.float64), torch.cumsum(sm, 0, dtype=torch.float64)])
    centers = lo + (torch.arange(nb, device=cnt.device, dtype=cnt.dtype) + 0.5) * width
    c = c.to(torch.float64)
    for _ in range(iters):
        mids = ((c[1:] + c[:-1]) * 0.5).to(cnt.dtype)
        # bins whose centre lies above a midpoint go to the next cluster
        cut = torch.searchsorted(centers, mids, right=True)
        lo_i = torch.cat([cut.new_zeros(1), cut])
        hi_i = torch.cat([cut, cut.new_full((1,), nb)])
        n = ccum[hi_i] - ccum[lo_i]
        new = torch.where(n > 0, (scum[hi_i] - scum[lo_i]) / n.clamp_min(1), c)
        new, _ = torch.sort(new)
        moved = float((new - c).abs().max())
        c = new
        if moved <= tol:
            break
    return c.to(cnt.dtype)


def _coarse_optimal_codebook(cnt: Tensor, sm: Tensor, lo: Tensor, width: Tensor, k: int, coarse: int = 256) -> Tensor:
    """Globally optimal k-means of a coarse histogram (each fine bin a point mass at its mean): a cold start.

    Lloyd's algorithm alone can stall in a poor local optimum on multimodal data; starting it from the exact
    optimum of the data rounded to ``coarse`` bins avoids that. The dynamic programme over bins,
    D_j(i) = min_m D_{j−1}(m) + cost(m, i), costs O(k · coarse²) on tiny arrays (float64 for the prefix-sum
    differences; these arrays have ``coarse`` entries, not one per weight).
    """
    nb = cnt.numel()
    g = max(1, nb // coarse)
    cnt_c = cnt.reshape(-1, g).sum(1).double()
    sm_c = sm.reshape(-1, g).sum(1).double()
    # Σ x² of a coarse bin, from its fine bins' means (within-fine-bin spread is negligible)
    sq_c = (sm.double() ** 2 / cnt.double().clamp_min(1)).reshape(-1, g).sum(1)
    z = cnt_c.new_zeros(1)
    N, S1, S2 = (torch.cat([z, torch.cumsum(v, 0)]) for v in (cnt_c, sm_c, sq_c))
    dn = N[None, :] - N[:, None]  # [m, i]: points in coarse bins m..i−1
    ds = S1[None, :] - S1[:, None]
    cost = (S2[None, :] - S2[:, None]) - ds * ds / dn.clamp_min(1)
    cost = torch.where(dn > 0, cost.clamp_min(0), torch.zeros_like(cost))
    m_idx = torch.arange(N.numel(), device=cnt.device)
    cost = torch.where(m_idx[:, None] <= m_idx[None, :], cost, torch.full_like(cost, float("inf")))
    # more clusters than occupied coarse bins: each occupied bin alone is already optimal (zero cost), so the DP
    # stops there and the rest of the codebook repeats values (O(occupied · coarse²), not O(k · coarse²))
    k_dp = min(k, max(1, int((cnt_c > 0).sum())))
    D = cost[0]
    arg = []
    for _ in range(1, k_dp):
        tot = D[:, None] + cost
        D, a = tot.min(0)
        arg.append(a)
    # backtrack the k − 1 cut points (in coarse-bin units) from the end
    cuts = [N.numel() - 1]
    for a in reversed(arg):
        cuts.append(int(a[cuts[-1]]))
    cuts = torch.tensor(cuts[::-1], device=cnt.device)
    starts = torch.cat([cuts.new_zeros(1), cuts[:-1]])
    n_seg = N[cuts] - N[starts]
    mean = (S1[cuts] - S1[starts]) / n_seg.clamp_min(1)
    # an empty cluster (more clusters than occupied bins) sits on its neighbour's value
    mean = torch.where(n_seg > 0, mean, torch.full_like(mean, float("nan")))
    valid = torch.nonzero(n_seg > 0).reshape(-1)
    if valid.numel() < k_dp:
        fill = mean[valid][torch.clamp(torch.searchsorted(valid, torch.arange(k_dp, device=cnt.device)), max=valid.numel() - 1)]
        mean = torch.where(torch.isnan(mean), fill, mean)
    if k_dp < k:
        mean = torch.sort(torch.cat([mean, mean[-1:].expand(k - k_dp)])).values
    return mean.to(cnt.dtype)


def _companded_codebook(cnt: Tensor, lo: Tensor, width: Tensor, k: int, coarse: int = 256) -> Tensor:
    """A cold start for large K: K points spread with density ∝ p(x)^⅓, p the data's density on a coarse histogram.

    That is the asymptotically optimal spacing of a K-level quantizer (Panter–Dite), so Lloyd starts near a
    good optimum with K distinct values, where the coarse dynamic programme could only give ``coarse``.
    """
    nb = cnt.numel()
    g = max(1, nb // coarse)
    lam = cnt.reshape(-1, g).sum(1).double().pow(1.0 / 3.0)
    cum = torch.cat([lam.new_zeros(1), torch.cumsum(lam, 0)])
    targets = (torch.arange(k, device=cnt.device, dtype=torch.float64) + 0.5) * (float(cum[-1]) / k)
    j = torch.searchsorted(cum[1:], targets).clamp_(max=lam.numel() - 1)
    frac = ((targets - cum[j]) / lam[j].clamp_min(1e-300)).clamp_(0.0, 1.0)
    return (lo.double() + (j.double() + frac) * (g * width.double())).to(cnt.dtype)


def _hist_distortion(cnt: Tensor, sm: Tensor, c: Tensor) -> float:
    """k-means distortion of the histogram's bin means (up to a constant that does not depend on c)."""
    occupied = cnt > 0
    n, mean = cnt[occupied], sm[occupied] / cnt[occupied]
    d = mean - c[nearest_in_codebook(mean, c).long()]
    return float((n * d * d).sum())


def kmeans_1d(
    x: Tensor,
    k: int,
    init: Tensor | None = None,
    max_iter: int = 1000,
    bins: int = 1 << 16,
    tol: float = 1e-7,
) -> tuple[Tensor, Tensor]:
    """1-D k-means: min over codebook c and assignments a of Σᵢ (xᵢ − c[aᵢ])².

    Lloyd's algorithm, made cheap by running its iterations on a fine histogram of the data (2¹⁶ equal-width
    bins by default): building the histogram is two passes over the weights, each Lloyd iteration then costs
    O(K log B) regardless of n. Lloyd starts from the exact optimum of a coarse (256-bin) histogram, found by
    dynamic programming, which keeps it out of poor local optima on multimodal data. For K > 256, more values
    than that optimum has, it starts instead from K points spaced with density ∝ p(x)^⅓ (the asymptotically
    optimal spacing of a K-level quantizer). Given ``init`` (a warm start, e.g. the previous C step's codebook)
    it also runs from ``init`` and keeps whichever is better. A final pass over the real data assigns every
    weight to its nearest centroid and sets each centroid to the mean of its weights, so the returned pair is a
    Lloyd step on the exact data. Tested to land within 2% of :func:`kmeans_1d_exact` on weight-like and bimodal
    data for K ≤ 256; for larger K (clusters of a few weights each) measured within 1.2–1.9× of it, below the
    Panter–Dite estimate n/(12K²)·(∫p^⅓)³.

    Empty clusters keep their previous centroid.

    Args:
        x: floating tensor, any shape (flattened).
        k: codebook size, ≥ 1.
        init: optional (k,) initial codebook.
        max_iter: maximum Lloyd iterations on the histogram.
        bins: histogram resolution.
        tol: stop when no centroid moves more than ``tol`` × (max x − min x).

    Returns:
        (codebook (k,) sorted ascending, assignments (uint8 for k ≤ 256, else int64) with x's flat length).
    """
    if k < 1:
        raise ValueError(f"k={k} must be an integer >= 1")
    xf = x.reshape(-1)
    n = xf.numel()
    if n == 0:
        raise ValueError("kmeans_1d needs at least one value")
    lo_hi = torch.aminmax(xf)
    if xf.dtype in (torch.float32, torch.float64):
        shift = _pow2_shift(max(-float(lo_hi[0]), float(lo_hi[1])), _sums_budget(xf.dtype, n))
        if shift:  # weights near the dtype's range: cluster x·2⁻ˢ (exact, see _pow2_shift) and scale back
            down = 2.0 ** -shift
            c, idx = kmeans_1d(xf * down, k, None if init is None else init * down, max_iter, bins, tol)
            return c * 2.0 ** shift, idx
    cnt, sm, lo, width, b = _histogram(xf, bins, lo_hi)
    stop = float(tol) * float(width) * bins
    # the coarse optimum has at most 256 distinct values; beyond that a companded spacing gives K distinct ones
    cold = _coarse_optimal_codebook(cnt, sm, lo, width, k) if k <= 256 else _companded_codebook(cnt, lo, width, k)
    c = _lloyd_hist(cnt, sm, lo, width, cold, max_iter, stop)
    if init is not None:
        if init.numel() != k:
            raise ValueError(f"init has {init.numel()} entries but k={k}")
        warm = torch.sort(init.reshape(-1).to(device=x.device, dtype=xf.dtype)).values
        warm = _lloyd_hist(cnt, sm, lo, width, warm, max_iter, stop)
        # keep the warm solution unless the fresh start found a better optimum (the warm one may have drifted
        # into a poor local optimum as the weights moved)
        if _hist_distortion(cnt, sm, warm) <= _hist_distortion(cnt, sm, c):
            c = warm
    # for larger K the per-bin table beats K − 1 compare passes (measured crossover around K = 8)
    idx = _nearest_by_bins(xf, b, c, lo, width, bins) if 8 <= k <= 255 else nearest_in_codebook(xf, c)
    c, _ = group_means(xf, idx, k, fallback=c)
    # group means of sorted, nearest-assigned clusters stay sorted, so idx still indexes c
    return c, idx


def powers_of_two_codebook(c: int, device=None, dtype=torch.float32) -> Tensor:
    """Sorted codebook {0, ±1, ±2⁻¹, …, ±2⁻ᶜ} (2c + 3 values)."""
    pos = torch.pow(2.0, -torch.arange(c + 1, dtype=dtype, device=device))
    return torch.cat([-pos, torch.zeros(1, dtype=dtype, device=device), pos.flip(0)])


def scaled_binary(x: Tensor) -> tuple[Tensor, Tensor]:
    """Best {−a, +a} approximation: a = mean |x|, sign with sign(0) = +1.

    Returns:
        (a as 0-d tensor, signs as bool tensor, True meaning +a).
    """
    a = x.abs().mean()
    if not bool(torch.isfinite(a)):  # the sum overflowed (weights near the dtype's range): average x·2⁻ˢ instead
        shift = x.numel().bit_length() + 1
        a = (x * 2.0 ** -shift).abs().mean() * 2.0 ** shift
    return a, x >= 0


def ternary(x: Tensor) -> Tensor:
    """Nearest point of {−1, 0, +1}ⁿ (ties at ±½ go to 0)."""
    return torch.sign(x) * (x.abs() > 0.5)


def scaled_ternary(x: Tensor, bins: int = 4096) -> tuple[Tensor, Tensor]:
    """Exact best {−a, 0, +a} approximation of x.

    min_{a, s} ‖x − a s‖², s ∈ {−1, 0, 1}ⁿ. For a support of size t the best choice is the t largest |xᵢ|
    with a = their mean, giving ‖x‖² − S(t)²/t with S(t) the sum of the t largest |xᵢ|; we maximise S(t)²/t
    over every t exactly.

    Sorting a million magnitudes would dominate the cost, so we bound instead: a histogram of |x| gives S(t)
    exactly at bin edges (lower bound on the optimum) and, because (α + βt)²/t is convex in t, an upper bound
    inside each bin from its endpoints. Only bins whose upper bound reaches the best edge value can hold the
    optimum; their (few) elements are sorted and every t inside them evaluated.

    Returns:
        (a as 0-d tensor, signs as int8 tensor in {−1, 0, 1} with x's shape).
    """
    ax = x.abs().reshape(-1)
    n = ax.numel()
    m = ax.max()
    if n == 0 or float(m) == 0.0:
        return ax.new_zeros(()), torch.zeros(x.shape, dtype=torch.int8, device=x.device)
    # S(t)² below must stay finite: S(t) ≤ n·max|x| ≤ √(dtype max) / 4, else work on x·2⁻ˢ (exact, see _pow2_shift)
    shift = _pow2_shift(float(m) * n, math.sqrt(torch.finfo(ax.dtype).max) / 4)
    if shift:
        a, signs = scaled_ternary(x * 2.0 ** -shift, bins)
        return a * 2.0 ** shift, signs
    # bin b holds |x| in [b·w, (b+1)·w); the top bin is closed so max lands in it
    width = m / bins
    b = (ax / width).to(torch.int32).clamp_(max=bins - 1)
    cnt = torch.bincount(b, minlength=bins).to(ax.dtype)
    sm = torch.bincount(b, weights=ax, minlength=bins).to(ax.dtype)
    # cumulative from the top: C[j] = number of elements in bins ≥ j, T[j] their sum (j = 0..bins)
    zero = ax.new_zeros(1)
    C = torch.cat([cnt.flip(0).cumsum(0).flip(0), zero])
    T = torch.cat([sm.flip(0).cumsum(0).flip(0), zero])
    edge_val = torch.where(C > 0, T * T / C.clamp_min(1), torch.zeros_like(T))
    best_edge = edge_val.max()
    # upper bound for t in (C[j+1], C[j]] inside bin j: S(t) ≤ T[j+1] + (t − C[j+1])·hi_j
    hi = (torch.arange(bins, device=ax.device, dtype=ax.dtype) + 1) * width
    hi[-1] = m
    t0 = C[1:]  # C[j+1]
    t1 = C[:-1]  # C[j]
    base = T[1:]

    def ub(t):
        s = base + (t - t0) * hi
        return torch.where(t > 0, s * s / t.clamp_min(1), torch.zeros_like(s))

    # first element inside a bin is t0 + 1
    bound = torch.maximum(ub(t0 + 1), ub(t1))
    cand = (cnt > 0) & (bound >= best_edge * (1 - 1e-6))
    j_edge = int(torch.argmax(edge_val))
    best_t, best_val = int(C[j_edge]), float(best_edge)
    keep = None
    cand_bins = torch.nonzero(cand).reshape(-1)
    if cand_bins.numel():
        lo_b, hi_b = int(cand_bins[0]), int(cand_bins[-1])
        # candidate bins are usually one short run: two compares beat a gather through the bin mask
        sel = (b >= lo_b) & (b <= hi_b) if hi_b - lo_b + 1 == cand_bins.numel() else cand[b]
        vals = ax[sel]
        vb = b[sel]
        # sort candidates descending by value; bins are ordered by value, so this also groups them by bin
        vals, order = torch.sort(vals, descending=True)
        vb = vb[order]
        # S(t) for each candidate = T[bin + 1] + (sum of the larger values within its own bin)
        pos = torch.arange(vals.numel(), device=ax.device)
        first_in_bin = torch.ones_like(vb, dtype=torch.bool)
        first_in_bin[1:] = vb[1:] != vb[:-1]
        grp_start = torch.cummax(torch.where(first_in_bin, pos, torch.zeros_like(pos)), 0).values
        cs = torch.cumsum(vals, 0)
        before = torch.where(grp_start > 0, cs[(grp_start - 1).clamp_min(0)], torch.zeros_like(cs))
        S = T[vb + 1] + (cs - before)
        t = C[vb + 1] + (pos - grp_start + 1)
        val = S * S / t
        j = int(torch.argmax(val))
        if float(val[j]) > best_val:
            best_t = int(t[j])
            bj, thr = int(vb[j]), vals[j]
            keep = (b > bj) | ((b == bj) & (ax >= thr))
    if best_t == 0:
        return ax.new_zeros(()), torch.zeros(x.shape, dtype=torch.int8, device=x.device)
    if keep is None:
        keep = b >= j_edge
    if int(keep.sum()) != best_t:
        # ties at the threshold: take exactly best_t of them
        _, top = torch.topk(ax, best_t, sorted=False)
        keep = torch.zeros(n, dtype=torch.bool, device=ax.device)
        keep[top] = True
    a = torch.where(keep, ax, 0).sum() / best_t
    # a kept weight is never 0 (a zero never raises S(t)²/t), so sign() gives ±1 on the support
    signs = (torch.sign(x.reshape(-1)) * keep).to(torch.int8)
    return a, signs.reshape(x.shape)


def sparse_codebook(
    x: Tensor,
    k: int,
    kappa: int | None = None,
    cost: float = 0.0,
) -> tuple[Tensor, Tensor, Tensor]:
    """Pruning whose surviving values share a learned K-entry codebook, solved to global optimality.

    min over support S, codebook c and codes a of  Σ_{i∉S} xᵢ² + Σ_{i∈S} (xᵢ − c[aᵢ])² + cost·|S|,  with |S| ≤ κ
    when ``kappa`` is given (``cost = 2α/μ`` gives the ℓ0 penalty form α‖θ‖₀ + μ/2‖x − θ‖²).

    Why it is a 1-D dynamic program: for the optimal codebook, a weight is kept when its gain
    xᵢ² − minⱼ (xᵢ − cⱼ)² = maxⱼ (2xᵢcⱼ − cⱼ²) is among the κ largest (and above ``cost``). The gain is a maximum
    of linear functions of xᵢ, hence convex with gain(0) ≤ 0, so the pruned weights form one contiguous block of
    the sorted values, the kept ones are a prefix of the negative values and a suffix of the positive ones (only
    values with xᵢ² > cost can gain), and every codebook entry's weights are contiguous on one side. With the optimal
    k-means costs of every such prefix and suffix for up to K groups (:func:`lcompress._kmeans_exact.prefix_tables`,
    O(K m log m) for m candidates, m ≤ κ per side), the objective of "prefix of length l in K₁ groups, suffix of
    length m in K − K₁ groups" separates into a term in l and one in m, and a running minimum over m ≤ κ − l finds
    the best pair for each K₁.

    Returns:
        (indices of S, sorted int64; codes (uint8 for K ≤ 256) of the kept values; codebook (K,) sorted float32).
        Unused entries (fewer groups than K) repeat a used one; with nothing kept the codebook is zeros.
    """
    from ._kmeans_exact import prefix_groups, prefix_tables

    if k < 1:
        raise ValueError(f"k={k} must be an integer >= 1")
    xf = x.reshape(-1)
    n = xf.numel()
    dev = xf.device
    code_dtype = torch.uint8 if k <= 256 else torch.long
    nothing = (torch.zeros(0, dtype=torch.long, device=dev), torch.zeros(0, dtype=code_dtype, device=dev),
               xf.new_zeros(k))
    if not cost < math.inf or (kappa is not None and kappa <= 0):
        return nothing
    xs, perm = torch.sort(xf)
    thr = math.sqrt(cost)
    n_left = int((xs < -thr).sum())  # candidates for the kept prefix (the most negative values) ...
    n_right = int((xs > thr).sum())  # ... and for the kept suffix (the most positive ones)
    if kappa is not None:
        n_left, n_right = min(n_left, kappa), min(n_right, kappa)
    if n_left + n_right == 0:
        return nothing
    left = xs[:n_left]
    right = -xs[n - n_right :].flip(0)  # the n_right largest values, negated and ascending
    pre, pre_opts, pre_s, pre_shift = prefix_tables(left, k)
    suf, suf_opts, suf_s, suf_shift = prefix_tables(right, k)
    pre_best, pre_j = torch.cummin(pre, 0)  # at most j groups (fewer when that is as good)
    suf_best, suf_j = torch.cummin(suf, 0)

    def removed(v: Tensor) -> Tensor:  # Σ v² over each prefix: what keeping that prefix takes off the zero block
        out = torch.zeros(v.numel() + 1, dtype=torch.float64, device=dev)
        torch.cumsum(v.to(torch.float64) ** 2, 0, out=out[1:])
        return out

    ls = torch.arange(n_left + 1, device=dev)
    ms = torch.arange(n_right + 1, device=dev)
    a_base = cost * ls.to(torch.float64) - removed(left)
    b_base = cost * ms.to(torch.float64) - removed(right)
    # for each l, the largest suffix length allowed: |S| = l + m ≤ κ
    m_cap = torch.full_like(ls, n_right) if kappa is None else (kappa - ls).clamp(max=n_right)
    ok = m_cap >= 0
    best = (math.inf, 0, 0, 0)
    for k1 in range(k + 1):
        b_min, b_arg = torch.cummin(suf_best[k - k1] + b_base, 0)  # best m ≤ t, for every t
        tot = (pre_best[k1] + a_base)[ok] + b_min[m_cap[ok]]
        i = int(torch.argmin(tot))
        v = float(tot[i])
        if v < best[0]:
            l_best = int(ls[ok][i])
            best = (v, l_best, int(b_arg[int(m_cap[l_best])]), k1)
    _, l, m, k1 = best
    j1, j2 = int(pre_j[k1, l]), int(suf_j[k - k1, m])
    # the kept groups as (start, end) in sorted order, with their means from the float64 prefix sums
    bounds, means = [], []
    g = prefix_groups(pre_opts, l, j1)
    for b0, b1 in zip(g[:-1], g[1:]):
        bounds.append((b0, b1))
        means.append((pre_s[b1] - pre_s[b0]) / (b1 - b0) + pre_shift)
    g = prefix_groups(suf_opts, m, j2)
    for b0, b1 in zip(g[:-1], g[1:]):
        bounds.append((n - b1, n - b0))
        means.append(-((suf_s[b1] - suf_s[b0]) / (b1 - b0) + suf_shift))
    if not means:
        return nothing
    cb = torch.stack(means).to(xf.dtype)
    order = torch.argsort(cb, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=dev)
    sizes = torch.tensor([b1 - b0 for b0, b1 in bounds], device=dev)
    sorted_pos = torch.cat([torch.arange(b0, b1, device=dev) for b0, b1 in bounds])
    idx, o = torch.sort(perm[sorted_pos])
    codes = torch.repeat_interleave(rank, sizes)[o].to(code_dtype)
    cb = cb[order]
    if cb.numel() < k:
        cb = torch.cat([cb, cb[-1:].expand(k - cb.numel())])
    return idx, codes, cb


def topk_magnitude(x: Tensor, kappa: int) -> Tensor:
    """Indices (sorted ascending) of the κ largest |xᵢ|: the support of the ℓ0-ball projection.

    Solves min ‖x − θ‖² s.t. ‖θ‖₀ ≤ κ; θ = x on the returned indices, 0 elsewhere. Ties are broken by
    ``torch.topk``; exactly κ indices are returned.
    """
    xf = x.reshape(-1)
    if kappa <= 0:
        return torch.zeros(0, dtype=torch.long, device=x.device)
    if kappa >= xf.numel():
        return torch.arange(xf.numel(), device=x.device)
    _, idx = torch.topk(xf.abs(), kappa, sorted=False)
    idx, _ = torch.sort(idx)
    return idx


def project_l1_ball(x: Tensor, radius: float) -> Tensor:
    """Euclidean projection onto {θ : ‖θ‖₁ ≤ radius}.

    θ = sign(x)·max(|x| − τ, 0) with τ the unique root of Σ max(|xᵢ| − τ, 0) = radius (τ = 0 when x is
    already inside). τ is found by Michelot's fixed point τ ← (Σ_{|xᵢ|>τ} |xᵢ| − radius) / #{|xᵢ| > τ},
    which increases monotonically and stops exactly, in a few passes, at the active set of the solution.
    """
    ax = x.abs()
    total = ax.sum()
    if float(total) <= radius:
        return x.clone()
    if radius <= 0:
        return torch.zeros_like(x)
    tau = (total - radius) / ax.numel()
    for _ in range(1000):
        active = ax > tau
        cnt = active.sum()
        new = (torch.where(active, ax, torch.zeros_like(ax)).sum() - radius) / cnt
        if float(new) <= float(tau):
            break
        tau = new
    return torch.sign(x) * (ax - tau).clamp_min(0)


def hard_threshold(x: Tensor, alpha: float, mu: float) -> Tensor:
    """argmin_θ α‖θ‖₀ + μ/2‖x − θ‖²: keep xᵢ iff xᵢ² > 2α/μ (μ → 0⁺ keeps nothing)."""
    if mu <= 0:
        return torch.zeros_like(x)
    return torch.where(x * x > 2.0 * alpha / mu, x, torch.zeros_like(x))


def soft_threshold(x: Tensor, alpha: float, mu: float) -> Tensor:
    """argmin_θ α‖θ‖₁ + μ/2‖x − θ‖²: shrink every xᵢ towards 0 by α/μ (μ → 0⁺ gives 0)."""
    if mu <= 0:
        return torch.zeros_like(x)
    return torch.sign(x) * (x.abs() - alpha / mu).clamp_min(0)


def truncated_svd(w: Tensor, rank: int) -> tuple[Tensor, Tensor]:
    """Best rank-r approximation (Eckart–Young): W ≈ A @ B with A = U_r diag(s_r) (m×r), B = V_rᵀ (r×n)."""
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def rank_select(
    s: Tensor,
    alpha: float,
    mu: float,
    cost_per_rank: float,
    max_rank: int | None = None,
    dense_cost: float | None = None,
) -> int | None:
    """The penalty-form rank selection C step, solved exactly by enumerating every choice.

    Over the ranks r ∈ {0, …, R} (R = ``max_rank``, default len(s)) and, when ``dense_cost`` is given, the dense
    matrix D kept as it is::

        min( min_r α·cost_per_rank·r + μ/2 Σ_{i>r} sᵢ²,   α·dense_cost )

    (the dense matrix has no distortion). ``s`` holds *all* singular values, sorted descending: the distortion of
    rank r is the whole tail beyond r. Sums are in float64, so squares of singular values beyond float32's range
    (> 1.8e19) stay finite. Ties go to the smaller rank, and to a rank over the dense matrix. μ → 0⁺ (``mu <= 0``)
    gives r = 0.

    Args:
        s: singular values, descending (any float dtype).
        alpha: α ≥ 0, the weight of the cost.
        mu: μ ≥ 0.
        cost_per_rank: C(r) / r, e.g. m + n parameters per rank.
        max_rank: the largest rank offered (≤ len(s)).
        dense_cost: C(dense), e.g. m·n parameters; None offers no dense choice.

    Returns:
        the selected rank r, or None for the dense matrix.

    >>> rank_select(torch.tensor([3.0, 1.0]), alpha=0.1, mu=1.0, cost_per_rank=12)
    1
    >>> rank_select(torch.tensor([3.0, 3.0]), alpha=0.1, mu=1.0, cost_per_rank=4, max_rank=0, dense_cost=4) is None
    True
    """
    if mu <= 0:
        return 0
    top = s.numel() if max_rank is None else min(int(max_rank), s.numel())
    s2 = s.detach().to(torch.float64).square().flip(0)
    # tail[r] = Σ_{i ≥ r} s_i² for r = 0..len(s) (tail[len(s)] = 0), summed from the smallest for accuracy
    tail = torch.cat([torch.cumsum(s2, 0).flip(0), s2.new_zeros(1)])[: top + 1]
    r = torch.arange(top + 1, device=s.device, dtype=torch.float64)
    obj = (alpha * float(cost_per_rank)) * r + (0.5 * mu) * tail
    best = int(torch.argmin(obj))
    if dense_cost is not None and alpha * float(dense_cost) < float(obj[best]):
        return None
    return best
