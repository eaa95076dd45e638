"""Trimmed 1-D k-means: the codebook of a quantization + ℓ0-pruning sum.

The C step of ``AdaptiveQuantization(k) + ConstraintL0Pruning(kappa)`` is

    min_{c, a, s}  Σᵢ (xᵢ − c[aᵢ] − sᵢ)²   s.t.  ‖s‖₀ ≤ κ.

For a fixed codebook c the sparse part takes the κ largest quantization errors exactly (they then cost nothing),
so the problem is *trimmed k-means*: min_c Σ over all but the κ points farthest from their nearest centre of the
squared error. Alternating the two parts' own C steps (k-means on x − s, then top-κ of x − Δ) converges slowly:
the κ points held by s sit exactly on the old centres in the residual x − s and anchor the codebook there. Here
the codebook is fitted to the kept points only (a Lloyd iteration of trimmed k-means), which moves freely.

The iterations run on sorted weighted points: the sorted data itself for up to 2¹⁶ values, else a 2¹⁶-bin
histogram with each bin a point mass at its mean. So they cost O(B) for B ≤ 2¹⁶ points, whatever the number of
weights. Each cell (the points between two midpoints) is a range of the sorted points, and so is its kept part
[c_j − τ, c_j + τ]. Its count, sum and sum of squares come from prefix sums. τ, the κ-th largest distance to the
nearest centre, is found by selection on the points' distances, or by a histogram of them for weighted points.

Lloyd steps are over-relaxed: a step ω(L(c) − c), with ω doubling up to 4 and reset to a plain step when the
objective rises. Several starts are tried (see :func:`trimmed_kmeans_1d`), and the caller finishes with passes
over the exact data.
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["WeightedPoints", "top_errors", "trimmed_kmeans_1d"]

_EXACT_POINTS = 1 << 16
_BINS = 1 << 16
_BUCKETS = 1 << 14
_COARSE = 256
_RESTARTS = 3
_START_TOL = 1e-6
_COLD_START_EVALS = 50
_COLD_START_TOL = 1e-5
#: the early-stopped guard is resumed when it is within this fraction of the best other start: about what ten
#: more iterations gaining _COLD_START_TOL each would bring
_GUARD_RESUME = 10 * _COLD_START_TOL
#: from this codebook size on, WeightedPoints.nearest looks codes up by bin instead of comparing K − 1 times
_BIN_NEAREST_K = 8


class WeightedPoints:
    """x as sorted weighted points: the sorted values themselves for up to 2¹⁶ of them (``unit``), else the means
    of a 2¹⁶-bin equal-width histogram's occupied bins. ``v`` (B,) the points, ``prefix`` (B + 1, 3) the prefix
    sums of their count, sum and sum of squares (float64). For a histogram, ``bins`` keeps each value's bin, from
    which :meth:`nearest` finds nearest-centre codes of x in a few passes whatever the codebook size."""

    def __init__(self, x: Tensor) -> None:
        xf = x.reshape(-1)
        self.numel, self.dtype = xf.numel(), xf.dtype
        self.bins = None
        if xf.numel() <= _EXACT_POINTS:
            v = torch.sort(xf.double()).values
            parts = torch.stack([torch.ones_like(v), v, v * v], 1)
            self.unit = True
        else:
            lo, hi = torch.aminmax(xf)
            width = (hi - lo).clamp_min(torch.finfo(xf.dtype).tiny) / _BINS
            self.lo, self.width = lo, width
            scratch = torch.empty_like(xf)  # one temporary for the quotients, then the squares
            b = self._bin(xf, scratch)
            # per-bin sums in x's precision (a bin holds few values), everything after in float64
            cnt = torch.bincount(b, minlength=_BINS).double()
            sm = torch.bincount(b, weights=xf, minlength=_BINS).double()
            sq = torch.bincount(b, weights=torch.mul(xf, xf, out=scratch), minlength=_BINS).double()
            del scratch
            occupied = cnt > 0
            cnt, sm, sq = cnt[occupied], sm[occupied], sq[occupied]
            v = sm / cnt
            parts = torch.stack([cnt, sm, sq], 1)
            self.unit = False
            self.bins = b
        self.v = v
        self.prefix = torch.cat([parts.new_zeros(1, 3), torch.cumsum(parts, 0)])

    def _bin(self, y: Tensor, out: Tensor | None = None) -> Tensor:
        """The histogram bin of each value of y: a non-decreasing function of the value (every step is), the same
        for x and for any other tensor of its dtype (a midpoint, say). The quotient is clamped before the
        conversion so that values far outside x's range, which x's own quotients never reach, stay monotone.
        ``out``: a scratch tensor like y for the quotients."""
        q = torch.sub(y, self.lo, out=out) if out is not None else y - self.lo
        q.div_(self.width).clamp_(-1.0, float(_BINS))
        return q.to(torch.int32).clamp_(0, _BINS - 1)

    def nearest(self, x: Tensor, c: Tensor) -> Tensor:
        """:func:`lcompress.functional.nearest_in_codebook` (x, c), code for code, where x is the tensor these
        points were made of and c is sorted ascending, in x's dtype.

        A midpoint m of c and a value in another bin compare as their bins do (the bin is non-decreasing in the
        value), so each bin's code is the number of midpoints in lower bins, plus, in the bin holding a
        midpoint, whether the value lies above it: two gathers and a compare instead of K − 1 compares. Falls
        back to the compares when two midpoints share a bin, when c is not finite, for K > 256, and where those
        few compares cost less (K < 8)."""
        from .functional import nearest_in_codebook

        k = c.numel()
        if self.bins is None or k < _BIN_NEAREST_K or k > 256:
            return nearest_in_codebook(x, c)
        xf = x.reshape(-1)
        mids = (c[1:] + c[:-1]) * 0.5  # as nearest_in_codebook computes them
        mb = self._bin(mids)
        if not bool(torch.isfinite(mids).all()) or bool((mb[1:] == mb[:-1]).any()):
            return nearest_in_codebook(x, c)
        below = torch.searchsorted(mb, torch.arange(_BINS, dtype=torch.int32, device=mb.device), right=False)
        below = below.to(torch.uint8)
        thr = torch.full((_BINS,), float("inf"), dtype=xf.dtype, device=xf.device)
        thr[mb.long()] = mids
        idx = torch.index_select(below, 0, self.bins)
        idx += xf > torch.index_select(thr, 0, self.bins)
        return idx.reshape(x.shape)


def top_errors(e: Tensor, kappa: int, below: float | None = None,
               within: Tensor | None = None) -> tuple[Tensor | None, Tensor | None]:
    """Indices, ascending, of the κ largest values of the flat tensor e (ties between equal values broken by
    position): the support of the ℓ0 pruning's exact C step when e = |w − Δ|. Also returns the candidates that
    were ranked (None when all were).

    With ``below``, a value that at least κ values of e are believed to exceed, only those above it are ranked
    (a compare pass and a selection among a few more than κ values instead of among all n); every other value is
    at most ``below`` and so smaller than each of them, which keeps the result exact. When fewer than κ values
    exceed it, all n are ranked. With ``within`` as well, ascending indices outside which every value is known
    to be at most ``below``, only those are compared, and (None, None) comes back when fewer than κ of them
    exceed it.
    """
    ef = e.reshape(-1)
    n = ef.numel()
    if kappa <= 0:
        return torch.zeros(0, dtype=torch.int64, device=e.device), None
    if kappa >= n:
        return torch.arange(n, device=e.device), None
    cand = None
    if within is not None:
        cand = within[ef[within] > below]
        if cand.numel() < kappa:
            return None, None
    elif below is not None:
        cand = torch.nonzero(ef > below).reshape(-1)
        if cand.numel() < kappa:
            cand = None
    if cand is None:
        ec = ef
    else:
        if cand.numel() == kappa:
            return cand, cand
        ec = ef[cand]
    kth = torch.kthvalue(ec, ec.numel() - kappa + 1).values  # the κ-th largest
    above = ec > kth
    ties = ec == kth
    need = kappa - int(above.sum())
    keep = above | (ties & (torch.cumsum(ties, 0) <= need))
    if cand is None:
        return torch.nonzero(keep).reshape(-1), None
    return cand[keep], cand


class _Trimmed:
    """Trimmed k-means on sorted weighted points; :meth:`step` is one Lloyd iteration."""

    def __init__(self, points: WeightedPoints, kappa: int) -> None:
        self.points = points
        self.v, self.prefix, self.unit, self.kappa = points.v, points.prefix, points.unit, int(kappa)
        v = self.v
        self.counts = self.prefix[1:, 0] - self.prefix[:-1, 0]
        self.nb = v.numel()
        # a relative widening of τ that keeps the point defining it inside its window despite rounding
        self.widen = 1.0 + 64 * torch.finfo(v.dtype).eps
        self._zero = torch.zeros(1, dtype=torch.int64, device=v.device)
        self._end = torch.full((1,), self.nb, dtype=torch.int64, device=v.device)

    def _edge(self, err: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Weighted points: the histogram of the errors in _BUCKETS buckets of width top / _BUCKETS, and i, the
        smallest bucket edge with at most κ points at or above it: (i, top, the number of points in buckets ≥ i)."""
        top = err.max().clamp_min(1e-300)
        bucket = (err * (_BUCKETS / top)).to(torch.int32).clamp_(0, _BUCKETS - 1)
        per = torch.bincount(bucket, weights=self.counts, minlength=_BUCKETS)
        # points in buckets < i: below[i − 1]; counts are whole numbers, so these float64 sums are exact and
        # above[i] = n − below[i − 1] ≤ κ is below[i − 1] ≥ n − κ
        below = torch.cumsum(per, 0)
        total = below[-1:]
        i = (torch.searchsorted(below, total - self.kappa) + 1).clamp_(1, _BUCKETS - 1)
        return i, top, total - below[i - 1]

    def _tau(self, err: Tensor) -> tuple[Tensor, Tensor]:
        """τ (points with error ≤ τ are kept) and the number of points beyond τ minus κ (≤ 0)."""
        zero = err.new_zeros(())
        if self.kappa == 0:
            return err.max(), zero
        if self.unit:
            return torch.kthvalue(err, self.nb - self.kappa).values, zero
        # weighted points: the smallest edge τ_i = i·top/N of a histogram of the errors with at most κ points at
        # or above it; the points short of κ are charged at τ_i (they lie just below it)
        i, top, above = self._edge(err)
        tau = (i.to(err.dtype) * (top / _BUCKETS)).reshape(())
        return tau / self.widen, (above - self.kappa).reshape(())

    def lower_bound(self, c: Tensor) -> float:
        """A value that more than κ of x's values exceed in distance to their nearest centre of c (computed in
        x's dtype), for :func:`top_errors`: the (κ + 1)-th largest point error, less a bucket for a histogram of
        the errors, less a bin width for the distance of a value to its bin's mean, less a margin for rounding."""
        err = self.errors(c)[0]
        scale = float(torch.maximum(self.v.abs().max(), c.abs().max()))
        if self.unit:
            kth = float(torch.kthvalue(err, self.nb - self.kappa).values)
            return kth - 1e-6 * (scale + kth)
        i, top, _ = self._edge(err)
        below = float((i - 1).to(err.dtype) * (top / _BUCKETS))  # more than κ points are at or above it
        return below - float(self.points.width) - 1e-6 * (scale + below)

    def errors(self, c: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Each point's distance to its nearest centre, and the cells as ranges [starts_j, ends_j) of the sorted
        points (a value equal to a midpoint goes to the lower centre)."""
        mids = (c[1:] + c[:-1]) * 0.5
        ends = torch.cat([torch.searchsorted(self.v, mids, right=True), self._end])
        sizes = torch.diff(ends, prepend=self._zero)
        centre = torch.repeat_interleave(c, sizes, output_size=self.nb)  # the points are sorted: runs per cell
        return (self.v - centre).abs_(), ends - sizes, ends

    def tau(self, c: Tensor) -> float:
        """τ of codebook c: the κ-th largest distance to the nearest centre."""
        return float(self._tau(self.errors(c)[0])[0])

    def step(self, c: Tensor) -> tuple[float, Tensor]:
        """(objective of c, the trimmed Lloyd update of c)."""
        err, starts, ends = self.errors(c)
        tau, short = self._tau(err)
        # the kept points of a cell: the range within τ of its centre
        t = tau * self.widen
        k = c.numel()
        bounds = torch.searchsorted(self.v, torch.cat([c - t, c + t]), right=True)
        lo = torch.maximum(bounds[:k], starts)
        hi = torch.maximum(torch.minimum(bounds[k:], ends), lo)
        win = self.prefix[hi] - self.prefix[lo]  # (K, 3): count, sum and sum of squares of each kept range
        n, s, q = win.unbind(1)
        sse = (q - 2 * c * s + c * c * n).sum()
        # weighted points: fewer than κ may lie beyond τ; the shortfall is charged at τ (trimmed just below it)
        obj = float(sse if self.unit else sse + short * tau * tau)
        new = torch.where(n > 0, s / n.clamp_min(1e-300), c)
        return obj, new


def _coarse_table(v: Tensor, prefix: Tensor, coarse: int = _COARSE) -> tuple[Tensor, Tensor, Tensor]:
    """The points rounded to ``coarse`` equal-width bins: prefix counts N and sums S1 over bin boundaries, and
    the (coarse + 1)² table of each bin range's sum of squares about its mean, [i, l] for bins l..i−1 (inf where
    l > i)."""
    span = (v[-1] - v[0]).clamp_min(1e-300)
    b = ((v - v[0]) * (coarse / span)).to(torch.int64).clamp_(0, coarse - 1)
    parts = prefix[1:] - prefix[:-1]
    binned = torch.zeros(coarse, 3, dtype=parts.dtype, device=parts.device).index_add_(0, b, parts)
    P = torch.cat([binned.new_zeros(1, 3), torch.cumsum(binned, 0)])
    N, S1, S2 = P.unbind(1)
    # stored transposed, [i, l] for bins l..i−1, so that the programme's minimum over l runs along rows; in place
    # where it can be (each fresh (coarse + 1)² temporary costs more in page faults than its arithmetic)
    dn = N[:, None] - N[None, :]
    ds = S1[:, None] - S1[None, :]
    cost = S2[:, None] - S2[None, :]
    cost -= ds.mul_(ds).div_(dn.clamp_min(1e-300))
    cost.clamp_min_(0).masked_fill_(dn <= 0, 0.0)
    idx = torch.arange(coarse + 1, device=v.device)
    cost.masked_fill_(idx[None, :] > idx[:, None], float("inf"))
    return N, S1, cost


def _coarse_optimum(table: tuple[Tensor, Tensor, Tensor], k: int, tau2: float | None) -> Tensor:
    """Globally optimal codebook of the points rounded to ``coarse`` equal-width bins, for the penalty form of
    trimming: every point costs min((x − c)², τ²) (``tau2`` = τ²; None: no trimming, plain k-means).

    In sorted order an optimal solution alternates runs of trimmed points (cost τ² each) and clusters (their
    sum of squares about their mean), so a dynamic programme over bin boundaries solves it:
    G_j(l) = min_{m ≤ l} D_{j−1}(m) + τ²·N(m, l),  D_j(i) = min_{l ≤ i} G_j(l) + SSE(l, i),
    the answer min_i D_k(i) + τ²·N(i, end); O(k · coarse²) work on (coarse + 1)² arrays. Like the coarse start of
    :func:`lcompress.functional.kmeans_1d`, it keeps Lloyd's iterations out of poor local optima (here, for
    instance, centres left on outliers that the pruning takes over).
    """
    N, S1, cost = table
    coarse = N.numel() - 1
    idx = torch.arange(coarse + 1, device=N.device)
    D = torch.full((coarse + 1,), float("inf"), dtype=cost.dtype, device=cost.device)
    D[0] = 0.0
    back = []
    total = torch.empty_like(cost)  # one buffer for every step's (coarse + 1)² sums
    for _ in range(k):
        if tau2 is None:
            G, gl = D, idx
        else:
            G, gl = torch.cummin(D - tau2 * N, 0)
            G = G + tau2 * N
        D, a = torch.add(G[None, :], cost, out=total).min(1)
        back.append((a, gl))
    end = D + (tau2 * (N[-1] - N) if tau2 is not None else torch.where(idx == coarse, 0.0, float("inf")))
    i = int(end.argmin())
    cs = []
    for a, gl in reversed(back):
        l_ = int(a[i])
        cnt = float(N[i] - N[l_])
        cs.append(float(S1[i] - S1[l_]) / cnt if cnt > 0 else float("nan"))
        i = int(gl[l_])
    c = torch.tensor(cs[::-1], dtype=N.dtype, device=N.device)
    # an empty cluster (more clusters than occupied runs) takes its neighbour's centre
    if bool(torch.isnan(c).any()):
        ok = ~torch.isnan(c)
        if not bool(ok.any()):
            return torch.full((k,), float(S1[-1] / N[-1]), dtype=N.dtype, device=N.device)
        good = torch.nonzero(ok).reshape(-1)
        pos = torch.searchsorted(good, torch.arange(k, device=N.device)).clamp_(max=good.numel() - 1)
        c = torch.where(ok, c, c[good[pos]])
    return torch.sort(c).values


def _lloyd(problem: _Trimmed, c: Tensor, max_iter: int, tol: float) -> tuple[float, Tensor, int]:
    """Over-relaxed trimmed Lloyd iterations from c: (objective, codebook, iterations of the ``max_iter``)."""
    c = torch.sort(c).values
    obj, lloyd = problem.step(c)
    omega = 1.0
    evals = 1
    for _ in range(max_iter - 1):
        if obj <= 0.0:
            break
        evals += 1
        prop = torch.sort(c + omega * (lloyd - c)).values
        obj2, lloyd2 = problem.step(prop)
        if obj2 > obj and omega > 1.0:
            # the extrapolated step went too far: take the plain Lloyd step (which never raises the objective)
            omega = 1.0
            prop = torch.sort(lloyd).values
            obj2, lloyd2 = problem.step(prop)
        improved = obj - obj2
        if improved < 0:  # rounding: keep the better point and stop
            break
        c, obj, lloyd = prop, obj2, lloyd2
        if improved <= tol * obj:
            break
        omega = min(2.0 * omega, 4.0)
    return obj, c, evals


def trimmed_kmeans_1d(
    x: Tensor, k: int, kappa: int, init: Tensor | None = None, max_iter: int = 300, tol: float = 1e-9
) -> Tensor:
    """Codebook of trimmed 1-D k-means: min_c Σ over all but the κ worst-fitting xᵢ of min_j (xᵢ − c_j)².

    Over-relaxed trimmed Lloyd iterations (to a local optimum, like :func:`lcompress.functional.kmeans_1d`) on
    sorted weighted points (see the module docstring), keeping the best result of several starts: ``init``
    (e.g. the last C step's codebook; without it, the optimal coarse k-means codebook of x), then, up to
    three times while that improves, the global optimum of the coarse penalty form of trimming
    (:func:`_coarse_optimum`) with τ the κ-th largest error of the best result so far.

    Args:
        x: floating tensor, any shape (flattened).
        k: codebook size ≥ 1.
        kappa: number of points left out (0 ≤ κ < number of values).
        init: optional (k,) starting codebook.
        max_iter: maximum objective evaluations per start.
        tol: stop when an iteration lowers the objective by less than this fraction of it.

    Returns:
        (k,) codebook sorted ascending, in ``x``'s dtype and on its device.
    """
    return fit(WeightedPoints(x), k, kappa, init, max_iter, tol)[0].to(x.dtype)


def fit(points: WeightedPoints, k: int, kappa: int, init: Tensor | None = None, max_iter: int = 300,
        tol: float = 1e-9) -> tuple[Tensor, float]:
    """:func:`trimmed_kmeans_1d` on the points of x: (codebook in x's dtype, a value that more than κ of the
    values of x exceed in distance to their nearest centre, see :meth:`_Trimmed.lower_bound`; −inf for κ = 0)."""
    v = points.v
    problem = _Trimmed(points, kappa)
    table = _coarse_table(v, points.prefix) if init is None or kappa > 0 else None
    if init is None:
        first = _coarse_optimum(table, k, None)
    else:
        first = init.reshape(-1).to(device=v.device, dtype=torch.float64)
        if first.numel() != k:
            raise ValueError(f"init has {first.numel()} entries but k={k}")
    # every start runs to a looser tolerance (most of Lloyd's iterations are spent in the slow tail), and only
    # the best is then run to ``tol``
    loose = max(tol, _START_TOL)
    # cold, the coarse k-means start is only a guard (the penalty form's start below nearly always wins): a few
    # iterations tell whether its basin competes. They stop early once an iteration gains less than
    # _COLD_START_TOL: its slow tail moves τ, and so the penalty form's start, too little to matter, and it is
    # resumed below only when the other starts did not end well ahead of it.
    guard = None
    if init is None:
        budget = min(max_iter, _COLD_START_EVALS)
        best = guard = _lloyd(problem, first, budget, max(loose, _COLD_START_TOL))
    else:
        best = _lloyd(problem, first, max_iter, loose)
    tried = None
    for _ in range(_RESTARTS if kappa > 0 else 0):
        if best[0] <= 0:
            break
        # the penalty form's global coarse optimum at the τ of the best result so far
        tau = problem.tau(best[1])
        start = _coarse_optimum(table, k, tau * tau)
        if tried is not None and torch.equal(start, tried):
            break
        tried = start
        other = _lloyd(problem, start, max_iter, loose)
        if not other[0] < best[0] * (1 - 1e-9):
            break
        best = other
    if guard is not None and best is not guard and guard[2] < budget and guard[0] <= best[0] * (1 + _GUARD_RESUME):
        resumed = _lloyd(problem, guard[1], budget - guard[2], loose)
        if resumed[0] < best[0]:
            best = resumed
    best = _lloyd(problem, best[1], max_iter, tol)
    dtype = points.dtype
    c = best[1].to(dtype)
    return c, (problem.lower_bound(c.double()) if kappa > 0 else float("-inf"))
