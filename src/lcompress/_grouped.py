"""C steps of grouped uniform integer quantization and of N:M sparsity (pure tensor math).

Grouped integers: each row of a matrix is cut into groups of ``g`` consecutive input weights (the last group of a row
may be shorter); a group x ∈ ℝᵍ is stored as b-bit integer codes and one scale (and, in the asymmetric form, one
offset):

* **symmetric**: x ≈ s·q, q ∈ {−2^(b−1), …, 2^(b−1) − 1}, s any real (its sign picks which side gets the extra
  level, as llama.cpp's Q4_0 does);
* **asymmetric**: x ≈ d·q + m, q ∈ {0, …, 2^b − 1}, d ≥ 0 and m real (llama.cpp's Q4_1 layout).

The symmetric C step is exact over real scales. For a fixed s the best codes are round-and-clamp, and the error
f(s) = Σᵢ minₖ (xᵢ − s·k)² is continuous and piecewise quadratic in s: a code changes only where xᵢ/s crosses a
half-integer, at s = |xᵢ|/(k + ½). Between two such breakpoints the codes are fixed, so f(s) = C − 2sA + s²B with
A = Σ xᵢqᵢ and B = Σ qᵢ², whose minimum over the interval is A/B clamped into it. Sorting every group's
breakpoints and accumulating A and B along them visits every interval, so the minimum found is global. Both signs
of s are one sweep: the breakpoints are those of |x|, and only the extra level's breakpoint counts for one sign and
not the other. The scale is then stored at its dtype (float16 by default): the rounded scale is the best of the
float16 neighbours of the real optimum, each with its own best codes.

The asymmetric C step is a descent from the min–max grid (which is what round-to-nearest uses): alternately the
least-squares (d, m) for the codes, the codes for (d, m), and the exact best d for the current m (the same
breakpoint sweep over x − m). Every move lowers the error or keeps it, and after rounding d and m to their dtype
the result is compared with the min–max grid rounded the same way and the better one kept, so it is never worse
than round-to-nearest min–max.

N:M sparsity keeps, in each group of M consecutive input weights of a row, the N of largest magnitude: the exact
projection, since the constraint separates over groups.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["grouped_view", "grouped_unview", "symmetric_grid", "asymmetric_grid", "nm_mask", "nm_patterns",
           "round_to_dtype_neighbours"]

#: breakpoints sorted at once (bounds the C step's temporary memory to about 60 bytes each)
_CHUNK = 1 << 21


def grouped_view(w: Tensor, group: int) -> list[tuple[Tensor, slice]]:
    """The groups of a (rows, cols) matrix: a list of (groups (G, width), column slice), one entry for the full
    groups and one for the shorter last group of each row when ``group`` does not divide ``cols``."""
    rows, cols = w.shape
    full = cols // group
    out = []
    if full:
        out.append((w[:, : full * group].reshape(rows * full, group), slice(0, full * group)))
    if cols % group:
        out.append((w[:, full * group :], slice(full * group, cols)))
    return out


def grouped_unview(parts: list[Tensor], rows: int, cols: int, group: int) -> Tensor:
    """Inverse of :func:`grouped_view` for per-weight tensors: (G, width) pieces back to (rows, cols)."""
    full = cols // group
    pieces = []
    if full:
        pieces.append(parts[0].reshape(rows, full * group))
    if cols % group:
        pieces.append(parts[-1].reshape(rows, cols % group))
    return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=1)


def _sweep(a: Tensor, levels: int, extra: Tensor | None, top: int = 3, weight: Tensor | None = None) -> Tensor:
    """Candidate best real scales of every group of non-negative magnitudes ``a`` (G, g) with codes in
    {0, …, ``levels``}: the minimizers of the ``top`` intervals of lowest error, (G, top) or, with two
    orientations, (G, 2·top) with the second orientation's scales negated.

    With ``extra`` (bool, (G, g)), weight i may also use level ``levels`` only where ``extra`` is False in the
    first orientation and only where it is True in the second: the two signs of a symmetric scale (see the module
    docstring). The errors along the sweep are C − s(2A − sB), which loses digits to cancellation where the error
    is small, so the caller evaluates the candidates directly and keeps the best: several near-equal minima (a
    group that is exactly s·q is also exactly (s/2)·(2q)) are told apart by their true errors.

    ``weight`` (G, g), ≥ 0: minimize Σᵢ wᵢ(aᵢ − s·qᵢ)² instead (the breakpoints are the same; A and B weigh each
    code change by wᵢ).
    """
    G, g = a.shape
    dev = a.device
    ks = torch.arange(levels, device=dev, dtype=a.dtype)
    c = (a * a if weight is None else weight * a * a).sum(1)
    step = max(1, _CHUNK // max(1, g * levels))
    db_k = (2 * ks + 1).expand(g, levels).reshape(-1)
    n_or = 1 if extra is None else 2
    top = min(top, g * levels)
    out = torch.zeros(G, n_or * top, device=dev, dtype=a.dtype)
    for lo in range(0, G, step):
        ac = a[lo : lo + step]
        n = ac.shape[0]
        s_ev = (ac.unsqueeze(2) / (ks + 0.5)).reshape(n, -1)
        s_ev, order = torch.sort(s_ev, dim=1, descending=True)
        da = torch.gather(ac.unsqueeze(2).expand(n, g, levels).reshape(n, -1), 1, order)
        db = db_k[order]
        if weight is not None:
            wt = torch.gather(weight[lo : lo + step].unsqueeze(2).expand(n, g, levels).reshape(n, -1), 1, order)
            da, db = da * wt, db * wt
        s_next = torch.cat([s_ev[:, 1:], s_ev.new_zeros(n, 1)], dim=1)
        if extra is None:
            orients = [(da, db)]
        else:
            last = torch.zeros(g, levels, dtype=torch.bool, device=dev)
            last[:, -1] = True
            ex = extra[lo : lo + step].unsqueeze(2)
            # orientation 0: the extra level is closed to weights marked True; orientation 1: to the others
            off0 = torch.gather((ex & last).reshape(n, -1), 1, order)
            off1 = torch.gather((~ex & last).reshape(n, -1), 1, order)
            orients = [(da.masked_fill(off0, 0), db.masked_fill(off0, 0)),
                       (da.masked_fill(off1, 0), db.masked_fill(off1, 0))]
        cc = c[lo : lo + step].unsqueeze(1)
        for o, (dai, dbi) in enumerate(orients):
            A = torch.cumsum(dai, 1)
            B = torch.cumsum(dbi, 1)
            s = torch.minimum(torch.maximum(A / torch.where(B > 0, B, torch.ones_like(B)), s_next), s_ev)
            f = torch.where(B > 0, cc - s * (2 * A - s * B), cc)
            j = torch.topk(f, top, dim=1, largest=False, sorted=False).indices
            cand = s.gather(1, j)
            out[lo : lo + step, o * top : (o + 1) * top] = -cand if o else cand
    return out


def round_to_dtype_neighbours(s: Tensor, dtype: torch.dtype) -> list[Tensor]:
    """``s`` rounded to ``dtype`` and its two neighbours there (float32 values), same signs; for float32, [s]."""
    if dtype == torch.float32:
        return [s]
    mag = s.abs().to(dtype)
    ity = {torch.float16: torch.int16, torch.bfloat16: torch.int16}[dtype]
    bits = mag.view(ity)
    finite_max = torch.finfo(dtype).max
    out = []
    for d in (-1, 0, 1):
        b = (bits + d).clamp_min(0)
        v = b.view(dtype).float()
        v = torch.where(torch.isfinite(v), v, torch.full_like(v, finite_max)).clamp_max(finite_max)
        out.append(torch.where(s < 0, -v, v))
    return out


def _sym_codes(x: Tensor, s: Tensor, lo: int, hi: int) -> Tensor:
    safe = torch.where(s == 0, torch.ones_like(s), s)
    q = torch.round(x / safe[:, None]).clamp_(lo, hi)
    return torch.where((s == 0)[:, None], torch.zeros_like(q), q)


def symmetric_grid(x: Tensor, bits: int, scale_dtype: torch.dtype = torch.float16,
                   warm: Tensor | None = None, weight: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Exact symmetric C step of every group (row) of ``x`` (G, g): min over s, q of ‖x − s·q‖², q integers in
    [−2^(b−1), 2^(b−1) − 1], then s stored at ``scale_dtype`` (see the module docstring).

    ``warm`` (G,): the previous C step's scales, one more candidate each. A group that is exactly s·q is also
    exactly (s·k/j)·q' for many k/j at 8 bits, and only s itself may be a float16 value: with the last scales as
    candidates, compressing Δ(Θ) again gives Δ(Θ).

    ``weight`` (G, g), ≥ 0: the weighted projection, min Σᵢ wᵢ(xᵢ − s·qᵢ)², exact in the same way.

    Returns (scales (G,) float32 holding values of ``scale_dtype``, codes (G, g) float32 integers).
    """
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = x.float()
    # orientation 0 is s > 0 (positive weights reach hi, negative ones lo = −hi − 1), 1 is s < 0 (the mirror)
    cands = _sweep(x.abs(), hi + 1, x >= 0, weight=weight)
    if warm is not None:
        cands = torch.cat([cands, warm.float().reshape(-1, 1)], dim=1)
    best = None
    for i in range(cands.shape[1]):
        for cand in round_to_dtype_neighbours(cands[:, i], scale_dtype):
            q = _sym_codes(x, cand, lo, hi)
            r = (x - cand[:, None] * q) ** 2
            f = (r if weight is None else r * weight).sum(1)
            if best is None:
                best = [f, cand, q]
            else:
                better = f < best[0]
                best[0] = torch.where(better, f, best[0])
                best[1] = torch.where(better, cand, best[1])
                best[2] = torch.where(better[:, None], q, best[2])
    return best[1], best[2]


def _asym_codes(x: Tensor, d: Tensor, m: Tensor, top: int) -> Tensor:
    safe = torch.where(d > 0, d, torch.ones_like(d))
    q = torch.round((x - m[:, None]) / safe[:, None]).clamp_(0, top)
    return torch.where((d > 0)[:, None], q, torch.zeros_like(q))


def _asym_err(x: Tensor, d: Tensor, m: Tensor, q: Tensor, weight: Tensor | None = None) -> Tensor:
    r = (x - d[:, None] * q - m[:, None]) ** 2
    return (r if weight is None else r * weight).sum(1)


def asymmetric_grid(x: Tensor, bits: int, scale_dtype: torch.dtype = torch.float16, rounds: int = 3,
                    warm: tuple[Tensor, Tensor] | None = None,
                    weight: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Asymmetric C step of every group (row) of ``x`` (G, g): x ≈ d·q + m, q ∈ {0, …, 2^b − 1}, d ≥ 0; a descent
    from the min–max grid, never worse than it after rounding d and m to ``scale_dtype`` (module docstring).
    ``warm``: the previous C step's (d, m), kept where it is still better. ``weight`` (G, g), ≥ 0: the weighted
    error Σᵢ wᵢ(xᵢ − d·qᵢ − m)² throughout (never worse than min–max in that error).

    Returns (d (G,), m (G,), codes (G, g)), d and m float32 holding values of ``scale_dtype``.
    """
    top = (1 << bits) - 1
    x = x.float()
    wt = torch.ones_like(x) if weight is None else weight.float()
    err = lambda d, m, q: _asym_err(x, d, m, q, weight)  # noqa: E731
    mn, mx = x.min(1).values, x.max(1).values

    def rounded(d, m):
        d16 = d.to(scale_dtype).float().clamp_min(0)
        m16 = m.to(scale_dtype).float()
        q = _asym_codes(x, d16, m16, top)
        return d16, m16, q, err(d16, m16, q)

    # round-to-nearest min-max, at the stored precision: the grid this is never worse than
    base = rounded((mx - mn) / top, mn)
    d, m = (mx - mn) / top, mn.clone()
    q = _asym_codes(x, d, m, top)
    for _ in range(rounds):
        # (weighted) least-squares (d, m) for the codes
        tw = wt.sum(1).clamp_min(1e-30)
        qm, xm = (wt * q).sum(1) / tw, (wt * x).sum(1) / tw
        var = (wt * (q - qm[:, None]) ** 2).sum(1)
        cov = (wt * (q - qm[:, None]) * (x - xm[:, None])).sum(1)
        d = torch.where(var > 0, cov / var.clamp_min(1e-30), d).clamp_min(0)
        m = xm - d * qm
        # the exact best d ≥ 0 for this m (codes below m are 0)
        y = (x - m[:, None]).clamp_min(0)
        q = _asym_codes(x, d, m, top)
        f = err(d, m, q)
        cands = _sweep(y, top, None, weight=weight)
        for i in range(cands.shape[1]):
            q_new = _asym_codes(x, cands[:, i], m, top)
            f_new = err(cands[:, i], m, q_new)
            better = f_new < f
            f = torch.where(better, f_new, f)
            d = torch.where(better, cands[:, i], d)
            q = torch.where(better[:, None], q_new, q)
    best = list(base)
    for cand in [rounded(d, m)] + ([] if warm is None else [rounded(warm[0].float(), warm[1].float())]):
        better = cand[3] < best[3]
        best = [torch.where(better, c, b) if c.dim() == 1 else torch.where(better[:, None], c, b)
                for c, b in zip(cand, best)]
    return best[0], best[1], best[2]


def nm_patterns(n: int, m: int, device=None) -> tuple[Tensor, Tensor]:
    """The C(m, n) ways to keep n of m: (patterns (C, m) bool in lexicographic order of the kept positions,
    index (2^m,) int64 mapping a bitmask Σ kept_j·2^j to its pattern's index, −1 where the mask keeps ≠ n)."""
    import itertools

    combos = list(itertools.combinations(range(m), n))
    pats = torch.zeros(len(combos), m, dtype=torch.bool)
    index = torch.full((1 << m,), -1, dtype=torch.int64)
    for i, c in enumerate(combos):
        pats[i, list(c)] = True
        index[sum(1 << j for j in c)] = i
    return pats.to(device), index.to(device)


def nm_mask(x: Tensor, n: int, m: int, weight: Tensor | None = None) -> Tensor:
    """Keep the n largest |x| in every group of m consecutive entries of each row of ``x`` (rows, cols), cols a
    multiple of m: the exact projection onto N:M sparsity (with ``weight``, the n largest wᵢxᵢ², the exact weighted
    projection). Returns a bool mask of x's shape (ties: by position, from torch.topk)."""
    rows, cols = x.shape
    g = (x.abs() if weight is None else weight * x * x).reshape(rows, cols // m, m)
    idx = torch.topk(g, n, dim=2, sorted=False).indices
    mask = torch.zeros_like(g, dtype=torch.bool).scatter_(2, idx, True)
    return mask.reshape(rows, cols)
