"""Globally optimal 1-D k-means (exact), vectorized in pure PyTorch.

Algorithm
---------
For sorted data the clusters of an optimal 1-D k-means solution are contiguous,
so the problem is an interval-partition dynamic program.  Writing ``S`` for the
prefix sums of the (sorted, centred) data, the SSE of the block ``x[m:i]`` is
``sum(x[m:i]**2) - (S[i] - S[m])**2 / (i - m)``.  The sum of squares of the
whole data is a constant, so minimizing the total SSE is the same as minimizing

    E_j(i) = min_{m < i} E_{j-1}(m) - (S[i] - S[m])**2 / (i - m),   E_0(0) = 0,

(``E_j(i)`` is minus the "between-groups" term of the best partition of the
first ``i`` points into ``j`` groups).  The block cost is Monge, so the
smallest minimizing split ``opt_j(i)`` is non-decreasing in ``i`` and each
layer can be solved by the divide-and-conquer optimization: solve the middle
row of a row interval by scanning its candidate range, then recurse left and
right with the candidate range cut at the middle row's optimum.

The recursion is processed breadth first: all nodes of one level are solved by
a handful of tensor operations.  Candidate ranges of a level are ragged; they
are grouped by power-of-two width and each group is evaluated as a dense
``(width, rows)`` matrix (padding <= 2x), with the minimum taken over the
leading dimension (``amin``, vectorized across rows) and the first index
attaining it recovered with a second ``amin``.  Windows are anchored at their
right end and padded to the left: candidates left of a node's lower bound are
still valid DP candidates (or +inf padding), so they cannot change the
smallest minimizer and no masking is needed.  The last row of a layer is
solved first by a full scan so the rightmost node of every level is bounded.
A node whose candidate bounds coincide needs no further work: all its rows
share that optimum.  After the recursion every row's optimum is known and the
layer values are computed in one pass.

Cost: ``O(n log n)`` per layer for ``k - 2`` layers (layer 1 is closed form and
layer ``k`` is only needed at ``i = n``), plus the sort.
"""

from __future__ import annotations

import logging
import math
import operator

import torch

__all__ = ["kmeans_1d_exact"]

logger = logging.getLogger(__name__)


def _check_inputs(x: torch.Tensor, k: int) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if isinstance(k, bool):
        raise TypeError("k must be an integer, got bool")
    try:
        k = operator.index(k)
    except TypeError:
        raise TypeError(f"k must be an integer, got {type(k).__name__}") from None
    if k < 1:
        raise ValueError(f"k must be >= 1, got k={k}")
    if not torch.is_floating_point(x):
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.numel() == 0:
        raise ValueError("x is empty: cannot cluster zero values")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains non-finite values (nan or inf)")


class _LayerSolver:
    """Holds the per-problem arrays shared by all DP layers.

    Layer arrays (prefix sums, layer values) are stored with ``P`` leading
    padding entries: logical index ``i`` lives at ``P + i``.  The padding of
    the value arrays is ``+inf``, so candidate windows may run off the left
    end without index clamping (their value is +inf and never wins).
    """

    def __init__(self, S: torch.Tensor) -> None:
        n = S.numel() - 1
        self.n = n
        self.device = S.device
        # P >= any window width used below (widths are <= 2**ceil(log2(n))).
        self.P = P = 1 << max(n, 1).bit_length()
        self.Sp = torch.zeros(P + n + 1, dtype=torch.float64, device=S.device)
        self.Sp[P:] = S

    def pad_values(self, E: torch.Tensor) -> torch.Tensor:
        Ep = torch.full((self.P + self.n + 1,), math.inf, dtype=torch.float64, device=self.device)
        Ep[self.P :] = E
        return Ep

    # -- dense evaluation of a group of rows sharing one padded width ---------
    def _eval_dense(
        self, Ep: torch.Tensor, rows: torch.Tensor, chi: torch.Tensor, width: int
    ) -> torch.Tensor:
        """Smallest argmin over m in [chi - width + 1, chi] of E[m] - (S[i]-S[m])^2/(i-m).

        The window is anchored at its right end ``chi`` (the largest allowed
        candidate) and extends ``width - 1`` to the left.  Candidates left of
        the node's lower bound are still valid DP candidates (or +inf padding),
        so including them cannot change the smallest minimizer.
        """
        P, Sp, dev = self.P, self.Sp, self.device
        small = torch.int16 if width <= 32767 else torch.int32
        # (width, R) layout: reductions run over the leading dimension, which
        # torch vectorizes across the contiguous R rows.
        # int32 candidate indices halve the index traffic of the gathers.
        idt = torch.int32 if self.P + self.n < 2**31 - 1 else torch.int64
        wrev = torch.arange(width - 1, -1, -1, device=dev, dtype=idt).unsqueeze(1)
        m = (chi + P).to(idt).unsqueeze(0) - wrev  # physical candidate indices
        mf = m.view(-1)
        ds = Sp.index_select(0, mf).view(m.shape)
        torch.sub(Sp.index_select(0, rows + P).unsqueeze(0), ds, out=ds)  # S[i] - S[m]
        ln = (rows - chi).to(torch.float64).unsqueeze(0) + wrev.to(torch.float64)  # i - m >= 1
        ln = torch.div(ds, ln, out=ln)
        val = Ep.index_select(0, mf).view(m.shape)
        del m, mf
        val.addcmul_(ds, ln, value=-1.0)  # E[m] - (S[i]-S[m])^2 / (i-m)
        del ds, ln
        vmin = val.amin(0)
        ar = torch.arange(width, device=dev, dtype=small).unsqueeze(1)
        first = torch.where(val == vmin.unsqueeze(0), ar, width).amin(0)
        return chi - (width - 1) + first

    def _eval_level(
        self, Ep: torch.Tensor, rows: torch.Tensor, clo: torch.Tensor, chi: torch.Tensor
    ) -> torch.Tensor:
        length = chi - clo + 1
        R = rows.numel()
        wmax, total = (int(v) for v in torch.stack([length.max(), length.sum()]).tolist())
        # A single dense block is fine when its padding is small.
        if R * wmax <= 2 * total + 4096:
            return self._eval_dense(Ep, rows, chi, wmax)
        # Otherwise group rows by power-of-two width (padding <= 2x per group);
        # adjacent groups are merged while the padding of the merged group
        # stays <= 2x, to limit the number of small kernel launches.
        bucket = torch.ceil(torch.log2(length.to(torch.float32))).to(torch.int64)
        counts = torch.bincount(bucket).tolist()
        present = [b for b, c in enumerate(counts) if c]
        best = torch.empty_like(rows)
        g_start = 0
        while g_start < len(present):
            g_end = g_start  # inclusive
            cnt = counts[present[g_start]]
            lb = cnt * (1 << max(present[g_start] - 1, 0))  # lower bound of summed lengths
            while g_end + 1 < len(present):
                b = present[g_end + 1]
                c2 = cnt + counts[b]
                lb2 = lb + counts[b] * (1 << max(b - 1, 0))
                if c2 * (1 << b) > 2 * lb2 + 4096:
                    break
                g_end, cnt, lb = g_end + 1, c2, lb2
            b_lo, b_hi = present[g_start], present[g_end]
            if b_lo == b_hi:
                sel = (bucket == b_lo).nonzero().squeeze(1)
            else:
                sel = ((bucket >= b_lo) & (bucket <= b_hi)).nonzero().squeeze(1)
            best[sel] = self._eval_dense(Ep, rows[sel], chi[sel], 1 << b_hi)
            g_start = g_end + 1
        return best

    def layer(self, Ep: torch.Tensor, j: int, row_lo: int, row_hi: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Solve layer j for rows i in [row_lo, row_hi]; candidates m in [j-1, i-1].

        ``Ep`` holds layer j-1 in padded layout.  Returns (E_j padded, opt_j),
        ``opt_j`` of length n+1 in logical indices (E_j = +inf outside the rows).
        """
        n, dev, P = self.n, self.device, self.P
        it = torch.int64
        opt = torch.zeros(n + 2, dtype=it, device=dev)
        fill = torch.zeros(n + 2, dtype=it, device=dev)  # difference array for finished nodes
        # The last row is solved first by a full scan, so that the rightmost
        # node of every level is bounded by it (otherwise that node scans
        # ~n/2 candidates per level).
        top = torch.tensor([row_hi], dtype=it, device=dev)
        o_top = self._eval_dense(Ep, top, top - 1, row_hi - (j - 1))
        opt[row_hi] = o_top[0]
        # Frontier of the breadth-first recursion: row interval [lo, hi] and
        # inclusive candidate bounds [olo, ohi] for its rows.
        lo = torch.tensor([row_lo], dtype=it, device=dev)
        hi = top - 1
        olo = torch.tensor([j - 1], dtype=it, device=dev)
        ohi = o_top
        if row_lo > row_hi - 1:
            lo = lo[:0]
        levels = 0
        while lo.numel():
            levels += 1
            mid = (lo + hi) >> 1
            chi = torch.minimum(ohi, mid - 1)
            best = self._eval_level(Ep, mid, olo, chi)
            # Guard: in floating point a near-tie could in principle put the
            # minimizer left of the node's bound; keep the recursion consistent.
            best = torch.maximum(best, olo)
            opt[mid] = best
            # children, interleaved (left, right) to keep rows in order
            c_lo = torch.stack([lo, mid + 1], 1).view(-1)
            c_hi = torch.stack([mid - 1, hi], 1).view(-1)
            c_olo = torch.stack([olo, best], 1).view(-1)
            c_ohi = torch.stack([best, ohi], 1).view(-1)
            nonempty = c_lo <= c_hi
            done = nonempty & (c_olo == c_ohi)
            # finished nodes: every row in [lo, hi] has optimum olo
            d_lo, d_hi, d_o = c_lo[done], c_hi[done], c_olo[done]
            if d_lo.numel():
                fill.index_add_(0, d_lo, d_o)
                fill.index_add_(0, d_hi + 1, -d_o)
            keep = (nonempty & ~done).nonzero().squeeze(1)
            lo, hi, olo, ohi = c_lo[keep], c_hi[keep], c_olo[keep], c_ohi[keep]
        opt += torch.cumsum(fill, 0, dtype=it)
        opt = opt[: n + 1]
        # Layer values from the optima, in one pass over the rows.
        Sp = self.Sp
        o = opt[row_lo : row_hi + 1]
        oP = o + P
        ds = Sp[P + row_lo : P + row_hi + 1] - Sp.index_select(0, oP)
        ln = torch.arange(row_lo, row_hi + 1, device=dev, dtype=torch.float64) - o.to(torch.float64)
        E = torch.full_like(Ep, math.inf)
        E[P + row_lo : P + row_hi + 1] = Ep.index_select(0, oP) - ds * ds / ln
        logger.debug("layer %d: %d rows, %d recursion levels", j, row_hi - row_lo + 1, levels)
        return E, opt


def kmeans_1d_exact(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (codebook (k,) float32 sorted ascending, assignments (n,) int64 into codebook) minimizing
    sum_i (x_i - c[a_i])^2 exactly (global optimum).

    ``x`` may have any shape (it is flattened) and live on any device; all work
    is done with torch operations on ``x.device``.  If ``k`` is at least the
    number of distinct values, every distinct value is its own centroid and the
    codebook is padded with copies of the largest value to length ``k``.

    Raises:
        TypeError: ``x`` is not a floating-point tensor or ``k`` not an integer.
        ValueError: ``x`` is empty or not finite, or ``k < 1``.
    """
    _check_inputs(x, k)
    k = operator.index(k)
    dev = x.device
    flat = x.detach().reshape(-1)
    if flat.dtype not in (torch.float32, torch.float64):
        flat = flat.to(torch.float32)
    n = flat.numel()

    xs, perm = torch.sort(flat)

    # Few distinct values: each one is its own cluster (zero distortion).
    n_distinct = 1 + int((xs[1:] != xs[:-1]).sum()) if n > 1 else 1
    if n_distinct <= k:
        uniq = torch.unique_consecutive(xs)
        codebook = torch.empty(k, dtype=torch.float32, device=dev)
        codebook[:n_distinct] = uniq.to(torch.float32)
        codebook[n_distinct:] = codebook[n_distinct - 1]
        labels_sorted = torch.searchsorted(uniq, xs)
        return codebook, _unsort(labels_sorted, perm)

    S, _, shift = _centred_prefix_sums(xs)  # float64, centred: see there

    splits = _optimal_splits(S, k)  # python list of k+1 boundaries
    bounds = torch.tensor(splits, dtype=torch.int64, device=dev)
    sizes = bounds[1:] - bounds[:-1]
    labels_sorted = torch.repeat_interleave(torch.arange(k, device=dev), sizes, output_size=n)

    # Cluster means from the same float64 prefix sums the DP used (a float32
    # running sum over ~1e6 values would lose several digits), rounded to
    # float32.  Only k values: negligible cost.
    means = (S.index_select(0, bounds[1:]) - S.index_select(0, bounds[:-1])) / sizes.to(torch.float64)
    codebook = (means + shift).to(torch.float32)
    # Contiguous clusters of sorted data have non-decreasing means; guard
    # against rounding reordering nearly-equal neighbours.
    codebook, order = torch.sort(codebook, stable=True)
    if not bool((order == torch.arange(k, device=dev)).all()):
        inv = torch.empty_like(order)
        inv[order] = torch.arange(k, device=dev)
        labels_sorted = inv[labels_sorted]
    return codebook, _unsort(labels_sorted, perm)


def _unsort(labels_sorted: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    out = torch.empty_like(labels_sorted, dtype=torch.int64)
    out[perm] = labels_sorted.to(torch.int64)
    return out


def _optimal_splits(S: torch.Tensor, k: int) -> list[int]:
    """Boundaries 0 = b_0 < b_1 < ... < b_k = n of an optimal partition."""
    n = S.numel() - 1
    dev = S.device
    if k == 1:
        return [0, n]
    E1 = _first_layer(S)
    solver = _LayerSolver(S)
    Ep = solver.pad_values(E1)
    del E1
    opts: list[torch.Tensor] = []
    for j in range(2, k):
        # Layer j is needed for i in [j, n - (k - j)] (room for the rest).
        Ep, opt = solver.layer(Ep, j, j, n - (k - j))
        opts.append(opt)
    # Last layer, only at i = n: candidates m in [k-1, n-1].
    top = torch.tensor([n], dtype=torch.int64, device=dev)
    last = int(solver._eval_dense(Ep, top, top - 1, n - (k - 1))[0])
    splits = [n, last]
    b = last
    for opt in reversed(opts):
        b = int(opt[b])
        splits.append(b)
    splits.append(0)
    splits.reverse()
    return splits


def prefix_tables(xs: torch.Tensor, k: int) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    """Optimal k-means costs of every prefix of sorted data, for every number of groups up to ``k``.

    Args:
        xs: sorted (ascending) 1-D floating tensor of n values.
        k: the largest number of groups.

    Returns:
        ``sse`` (k + 1, n + 1) float64: ``sse[j, i]`` is the least sum of squared distances to their group means of
        ``xs[:i]`` split into exactly j contiguous groups (+inf where i < j; ``sse[0, 0] = 0``);
        ``opts``: for j = 2..k, the layer's split table (``opts[j - 2][i]`` = start of the last group of the best
        j-group partition of ``xs[:i]``), for :func:`prefix_groups`;
        ``S`` and ``shift``: the float64 prefix sums of the data centred by ``shift`` (a group's mean is
        ``(S[b] - S[a]) / (b - a) + shift``).
    """
    n = xs.numel()
    dev = xs.device
    S, Q, shift = _centred_prefix_sums(xs, squares=True)
    sse = torch.full((k + 1, n + 1), math.inf, dtype=torch.float64, device=dev)
    sse[0, 0] = 0.0
    opts: list[torch.Tensor] = []
    if k >= 1 and n >= 1:
        E = _first_layer(S)
        sse[1, 1:] = Q[1:] + E[1:]
        solver = _LayerSolver(S)
        Ep = solver.pad_values(E)
        for j in range(2, min(k, n) + 1):
            Ep, opt = solver.layer(Ep, j, j, n)
            opts.append(opt)
            sse[j, j:] = Q[j:] + Ep[solver.P + j :]
    # rounding can leave a tiny negative cost for a perfectly fitting prefix
    sse.clamp_(min=0.0)
    return sse, opts, S, shift


def _centred_prefix_sums(
    xs: torch.Tensor, squares: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """(S, Q, shift): float64 prefix sums of xs − shift (and of its squares when ``squares``), shift = mean(xs).

    float64 because the DP compares differences S[i] − S[m] over up to n ~ 1e6 terms, where float32 would lose most
    significant digits (catastrophic cancellation) and the "exact" optimum would be wrong; centring keeps the sums
    small. This is the one place float64 is needed.
    """
    n = xs.numel()
    x64 = xs.to(torch.float64)
    shift = x64.mean()
    x64 -= shift
    S = torch.zeros(n + 1, dtype=torch.float64, device=xs.device)
    torch.cumsum(x64, 0, out=S[1:])
    Q = None
    if squares:
        Q = torch.zeros(n + 1, dtype=torch.float64, device=xs.device)
        torch.cumsum(x64 * x64, 0, out=Q[1:])
    return S, Q, shift


def _first_layer(S: torch.Tensor) -> torch.Tensor:
    """Layer 1 of the DP: one block [0, i), E_1(i) = −S[i]² / i (+inf at i = 0)."""
    n = S.numel() - 1
    E1 = torch.full((n + 1,), math.inf, dtype=torch.float64, device=S.device)
    E1[1:] = -(S[1:] * S[1:]) / torch.arange(1, n + 1, device=S.device, dtype=torch.float64)
    return E1


def prefix_groups(opts: list[torch.Tensor], i: int, j: int) -> list[int]:
    """Boundaries 0 = b_0 < … < b_j = i of the best j-group partition of the first i sorted values."""
    if j == 0:
        return [0]
    splits = [i]
    b = i
    for t in range(j, 1, -1):
        b = int(opts[t - 2][b])
        splits.append(b)
    splits.append(0)
    splits.reverse()
    return splits
