"""Local improvements of a layer's compressed weights under its calibration loss L(W) = tr((W − W₀) H (W − W₀)ᵀ)
(pure tensor math; post-training LC calls these after its last step, see :mod:`lcompress.ptq`).

Rows of W are independent in L (H acts on the input side), so every function works on all rows at once.

* :func:`grid_descent`: coordinate descent on the integer codes of a grid whose scales (and offsets) are fixed:
  each weight in turn moves to the grid point nearest to its exact minimizer given the others,
  wⱼ − [(W − W₀)H]ⱼ / Hⱼⱼ. Every move lowers L or keeps it.
* :func:`grid_scales`: for fixed codes, the scales (and offsets) of every group that minimize L exactly: per row a
  least-squares problem in its groups' scales.
* :func:`support_solve`: for a fixed support (pruning), the values that minimize L: per row the restricted normal
  equations H_SS w_S = (H W₀ᵀ)_S, solved for all rows at once by conjugate gradients.
"""
from __future__ import annotations

import torch
from torch import Tensor

from ._threads import c_step_threads

__all__ = ["grid_descent", "grid_scales", "support_solve", "layer_loss"]


def layer_loss(w: Tensor, w0: Tensor, h: Tensor) -> float:
    """tr((W − W₀) H (W − W₀)ᵀ)."""
    d = w - w0
    return float(((d @ h) * d).sum())


def grid_descent(w: Tensor, w0: Tensor, h: Tensor, scale: Tensor, offset: Tensor | None, lo: int, hi: int,
                 sweeps: int = 3, block: int = 128) -> tuple[Tensor, int]:
    """Cyclic coordinate descent of L over the grid {scaleᵢⱼ·q + offsetᵢⱼ : q ∈ [lo, hi]} (per weight).

    Args:
        w: the start, on the grid (rows × cols).
        w0, h: the loss's reference weights and (dampened, positive-definite) Hessian.
        scale, offset: per-weight grid (the groups' values expanded to rows × cols); offset None for 0.
        sweeps: passes over the columns at most (stops early when a pass moves nothing).
        block: columns per lazy update of the gradient (as GPTQ batches its updates).

    Returns:
        (the improved weights, the number of moves made).
    """
    with c_step_threads(0, w.device):  # a loop of small ops: one thread does them fastest
        return _grid_descent(w, w0, h, scale, offset, lo, hi, sweeps, block)


def _grid_descent(w, w0, h, scale, offset, lo, hi, sweeps, block):
    w = w.clone().float()
    w0 = w0.float()
    h = h.float()
    n = w.shape[1]
    diag = h.diagonal().clamp_min(1e-30)
    safe = torch.where(scale == 0, torch.ones_like(scale), scale)
    off = torch.zeros_like(w) if offset is None else offset
    moves = 0
    for _ in range(sweeps):
        r = (w - w0) @ h
        moved = 0
        for a in range(0, n, block):
            b = min(n, a + block)
            dblk = torch.zeros(w.shape[0], b - a, dtype=w.dtype, device=w.device)
            for j in range(a, b):
                t = w[:, j] - r[:, j] / diag[j]
                q = torch.round((t - off[:, j]) / safe[:, j]).clamp_(lo, hi)
                new = torch.where(scale[:, j] == 0, off[:, j], q * scale[:, j] + off[:, j])
                dj = new - w[:, j]
                w[:, j] = new
                dblk[:, j - a] = dj
                if j + 1 < b:
                    r[:, j + 1 : b] += dj[:, None] * h[j, j + 1 : b][None, :]
            moved += int((dblk != 0).sum())
            if b < n:
                r[:, b:] += dblk @ h[a:b, b:]
        moves += moved
        if moved == 0:
            break
    return w, moves


def grid_scales(codes: Tensor, w0: Tensor, h: Tensor, group: int, symmetric: bool) -> tuple[Tensor, Tensor | None]:
    """The per-group scales (and, asymmetric, offsets) minimizing L for fixed integer ``codes`` (rows × cols):
    W = Σ_g (s_g·q_g + m_g·1_g) per row, a least-squares problem in (s, m) with Gram matrix [uᵍᵀ H uʰ].

    Returns (scales (rows, groups), offsets (rows, groups) or None); groups whose codes are all zero keep scale 0.
    """
    rows, cols = codes.shape
    ng = -(-cols // group)
    pad = ng * group - cols
    q = torch.nn.functional.pad(codes.double(), (0, pad)).reshape(rows, ng, group)
    hp = torch.nn.functional.pad(h.double(), (0, pad, 0, pad)).reshape(ng, group, ng, group)
    rhs_full = torch.nn.functional.pad((w0.double() @ h.double()), (0, pad)).reshape(rows, ng, group)
    # Gram of the scale columns: G[r, a, b] = Σ_{i∈a, j∈b} q[r,a,i] H[a,i,b,j] q[r,b,j]
    gram = torch.einsum("rai,aibj,rbj->rab", q, hp, q)
    bvec = torch.einsum("rai,rai->ra", q, rhs_full)
    if not symmetric:
        ones = torch.nn.functional.pad(torch.ones(rows, cols, dtype=torch.float64, device=codes.device),
                                       (0, pad)).reshape(rows, ng, group)
        g_sm = torch.einsum("rai,aibj,rbj->rab", q, hp, ones)
        g_mm = torch.einsum("rai,aibj,rbj->rab", ones, hp, ones)
        gram = torch.cat([torch.cat([gram, g_sm], 2), torch.cat([g_sm.transpose(1, 2), g_mm], 2)], 1)
        bvec = torch.cat([bvec, torch.einsum("rai,rai->ra", ones, rhs_full)], 1)
    k = gram.shape[1]
    # a group with no nonzero code has a zero row and column: pin its scale to 0
    dead = gram.diagonal(dim1=1, dim2=2) <= 0
    eye = torch.eye(k, dtype=gram.dtype, device=gram.device)
    scale_ref = gram.diagonal(dim1=1, dim2=2).abs().amax(1).clamp_min(1e-30)
    gram = gram + eye * (dead.double() * scale_ref[:, None])[:, :, None] + eye * 1e-12 * scale_ref[:, None, None]
    bvec = torch.where(dead, torch.zeros_like(bvec), bvec)
    z = torch.linalg.solve(gram, bvec.unsqueeze(-1)).squeeze(-1).float()
    if symmetric:
        return z, None
    return z[:, :ng], z[:, ng:]


def support_solve(mask: Tensor, w: Tensor, w0: Tensor, h: Tensor, iters: int = 50, tol: float = 1e-6) -> Tensor:
    """min L(W) over W with W = 0 outside ``mask`` (rows × cols, bool), from ``w``: preconditioned conjugate
    gradients on every row at once (one matrix product per iteration), stopping when the relative residual of every
    row is below ``tol``. L is convex here, so this converges to the exact restricted minimizer."""
    m = mask.float()
    h = h.float()
    x = w.float() * m
    pre = 1.0 / h.diagonal().clamp_min(1e-30)
    b = (w0.float() @ h) * m
    r = b - (x @ h) * m
    z = r * pre
    p = z.clone()
    rz = (r * z).sum(1)
    bnorm = (b * b).sum(1).sqrt().clamp_min(1e-30)
    for _ in range(iters):
        if float(((r * r).sum(1).sqrt() / bnorm).max()) < tol:
            break
        hp = (p @ h) * m
        alpha = rz / (p * hp).sum(1).clamp_min(1e-30)
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * hp
        z = r * pre
        rz_new = (r * z).sum(1)
        p = z + (rz_new / rz.clamp_min(1e-30))[:, None] * p
        rz = rz_new
    return x * m
