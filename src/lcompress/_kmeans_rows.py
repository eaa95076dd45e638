"""Globally optimal 1-D k-means of every row of a matrix at once (each row its own K-entry codebook).

For sorted data the clusters of an optimal 1-D k-means are contiguous, so each row is an interval-partition
dynamic programme over its sorted values. With S the prefix sums of a (sorted, centred) row, the SSE of the block
x[m:i] is Σ x² − (S[i] − S[m])² / (i − m); Σ x² is constant, so the DP minimises

    E_j(i) = min_{m < i} E_{j−1}(m) + C(m, i),   C(m, i) = −(S[i] − S[m])² / (i − m),   E_0(0) = 0.

Every row has the same length D, so the DP runs on all rows together: C is a (rows, D + 1, D + 1) tensor and a
layer is one ``amin`` over its middle dimension, O(K·D²) per row in time and O(D²) in memory. Rows are taken in
chunks that bound the memory (a loop over chunks, never over rows); the split points of every layer are kept
and the partitions recovered by K gathers. Sums are in float64.

The cost suits embedding tables (D of a few dozen to a few hundred); for one long vector use
:func:`lcompress.functional.kmeans_1d_exact`, which is O(K·n log n).
"""
from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["kmeans_1d_exact_rows"]

_CHUNK_ELEMENTS = 1 << 21  # rows × (D + 1)² float64 values per chunk (16 MiB)


def kmeans_1d_exact_rows(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Exact 1-D k-means of each row of ``x``: min over codebooks c (R, K) and codes a of Σ_r Σ_j (x_rj − c_r[a_rj])².

    Args:
        x: (R, D) floating-point matrix, finite.
        k: entries per row's codebook, 1 ≤ K ≤ D.

    Returns:
        (codebooks (R, K) float32, each row sorted ascending; codes (R, D) int64 in [0, K)). When a row has fewer
        than K distinct values some of its entries repeat.

    Raises:
        TypeError: ``x`` is not a floating-point tensor.
        ValueError: ``x`` is not a non-empty matrix, holds NaN or Inf, or K is outside [1, D].

    >>> c, a = kmeans_1d_exact_rows(torch.tensor([[0.0, 0.1, 5.0], [1.0, 1.0, -1.0]]), 2)
    >>> c.tolist(), a.tolist()
    ([[0.05000000074505806, 5.0], [-1.0, 1.0]], [[0, 0, 1], [1, 1, 0]])
    """
    if not isinstance(x, Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got {type(x).__name__ if not isinstance(x, Tensor) else x.dtype}")
    if x.dim() != 2 or x.numel() == 0:
        raise ValueError(f"x must be a non-empty matrix, got shape {tuple(x.shape)}")
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= x.shape[1]:
        raise ValueError(f"k={k!r} must be an integer in [1, {x.shape[1]}] (the row length)")
    if not bool(torch.isfinite(x).all()):
        raise ValueError("x contains NaN or Inf")
    r, d = x.shape
    chunk = max(1, _CHUNK_ELEMENTS // ((d + 1) ** 2))
    cbs, codes = [], []
    for s in range(0, r, chunk):  # chunks of rows, bounding the (rows, D + 1, D + 1) tables
        c, a = _rows(x[s : s + chunk], k)
        cbs.append(c)
        codes.append(a)
    return torch.cat(cbs), torch.cat(codes)


def _rows(x: Tensor, k: int) -> tuple[Tensor, Tensor]:
    r, d = x.shape
    xd = x.double()
    mean = xd.mean(dim=1, keepdim=True)
    xs, perm = torch.sort(xd - mean, dim=1)
    s = torch.cat([xs.new_zeros(r, 1), xs.cumsum(dim=1)], dim=1)  # (r, d + 1)
    idx = torch.arange(d + 1, device=x.device)
    length = (idx.view(1, -1) - idx.view(-1, 1)).to(xs.dtype)  # [m, i] = i − m
    valid = length > 0
    diff = s.unsqueeze(1) - s.unsqueeze(2)  # [r, m, i] = S[i] − S[m]
    cost = torch.where(valid, -diff.square() / length.clamp(min=1), torch.full_like(diff, float("inf")))
    del diff
    e = cost[:, 0, :].clone()  # E_1(i) = C(0, i) (E_1(0) = +inf: no empty block)
    splits = []
    for _ in range(2, k + 1):  # layers 2..K
        cand = e.unsqueeze(2) + cost  # [r, m, i]
        e, arg = cand.min(dim=1)
        splits.append(arg)
    del cost
    # boundaries from the end: b_K = d, b_{j−1} = split_j(b_j)
    bounds = [torch.full((r,), d, dtype=torch.int64, device=x.device)]
    for arg in reversed(splits):
        bounds.append(arg.gather(1, bounds[-1].unsqueeze(1)).squeeze(1))
    bounds.append(torch.zeros(r, dtype=torch.int64, device=x.device))
    b = torch.stack(bounds[::-1], dim=1)  # (r, k + 1): 0 = b_0 < b_1 < ... < b_K = d
    sums = s.gather(1, b[:, 1:]) - s.gather(1, b[:, :-1])
    centroids = sums / (b[:, 1:] - b[:, :-1]).to(xs.dtype) + mean
    # sorted position p is in block j when b_j ≤ p < b_{j+1}
    pos = torch.arange(d, device=x.device).expand(r, d).contiguous()
    labels_sorted = torch.searchsorted(b[:, 1:-1].contiguous(), pos, right=True)
    codes = torch.empty_like(labels_sorted).scatter_(1, perm, labels_sorted)
    return centroids.float(), codes
