"""The post-training peers of LC: round-to-nearest, GPTQ, SparseGPT, Wanda and magnitude pruning, as solvers for
:func:`lcompress.ptq.posttrain` (``posttrain(model, tasks, calib, solver=GPTQ())``).

Every solver writes its result into the task's own compression, so a peer's model is stored, counted and loaded
exactly as LC's is: GPTQ sets the codes and scales of a :class:`~lcompress.GroupedIntQuantization`
(:meth:`~lcompress.GroupedIntQuantization.set_grid`), the pruning methods give their final weights to the
compression's C step (``comp.compress(W)``), which keeps exactly their support. For one linear layer with
calibration inputs X (N × n), H = XᵀX/N and the dampened H_δ = H + δ·mean(diag H)·I, each method is a greedy or
closed-form answer to the layer-wise problem that LC solves by its L and C steps,

    min_W tr((W − W₀) H_δ (W − W₀)ᵀ)   s.t.  W in the compression's format;

the ``loss`` each solver reports is this objective at its result.

What each one is (the practitioners' versions, as llmcompressor 0.14 / compressed-tensors 0.19 run them):

* ``rtn``: the direct compression Θ = Π(W₀) (:func:`lcompress.ptq.direct_solver`; for grouped integers the
  exact C step, the best scale of every group). ``rtn_absmax``: the practitioner's round-to-nearest, symmetric
  s = max(|x|)/((2^b − 1)/2) per group (int4: absmax/7.5, as compressed-tensors' min–max observer), rounded to
  the stored scale dtype, q = clamp(round(x/s), −2^(b−1), 2^(b−1) − 1); asymmetric d = (max − min)/(2^b − 1),
  m = min (llama.cpp's Q4_1 rule).
* :class:`GPTQ`: the column-by-column OBQ update with the upper Cholesky factor of H_δ⁻¹ (Frantar et al. 2022),
  lazy batch updates over blocks of ``block_size`` columns, activation order (columns by decreasing H_jj) with
  *static* groups: the scales are fixed from the original weights' groups before any update (llmcompressor's
  default ``actorder="static"``), so the stored format is unchanged.
* :class:`SparseGPT`: the same update with pruning (Frantar & Alistarh 2023): at each block the mask is chosen
  from the updated weights by w²/[U]²_jj (adaptive mask selection); N:M chooses each group's mask at its first
  column.
* :class:`Wanda`: scores |W_ij|·‖X_j‖ (‖X_j‖² = N·H_jj) compared within each output row (or N:M group); no
  weight update (Sun et al. 2023).
* ``magnitude``: the direct compression of a pruning task (the largest |w| of the layer, or of each N:M group).

:data:`PEERS` maps the CLI's method names to solver factories; a solver given a compression it cannot produce
raises ValueError naming the task. Experiment side: the core never imports this module.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Callable, Sequence

import torch
from torch import Tensor

from .compressions.base import Compression
from .compressions.grouped import _SCALE_DTYPES, GroupedIntQuantization, NMPruning
from .compressions.pruning import ConstraintL0Pruning, _Sparse
from .ptq import LayerProblem, direct_solver
from .tasks import Task

__all__ = [
    "RTN", "rtn", "rtn_absmax", "GPTQ", "SparseGPT", "Wanda", "Magnitude", "magnitude", "PEERS", "make_solver",
    "check_method", "absmax_grid", "quantize_to_grid", "gptq_quantize", "sparsegpt_prune", "wanda_mask",
]

logger = logging.getLogger(__name__)


# ---- pure math: grids, GPTQ, SparseGPT, Wanda ----------------------------------------------------------------------
def _group_reduce(w: Tensor, group: int, op: str) -> Tensor:
    """(rows, cols) → (rows, ⌈cols/group⌉): max or min over each group of ``group`` consecutive columns (a shorter
    last group when ``group`` does not divide ``cols``)."""
    rows, cols = w.shape
    ng = -(-cols // group)
    pad = ng * group - cols
    if pad:
        fill = -math.inf if op == "amax" else math.inf
        w = torch.cat([w, w.new_full((rows, pad), fill)], dim=1)
    g = w.reshape(rows, ng, group)
    return g.amax(-1) if op == "amax" else g.amin(-1)


def _round_scale(s: Tensor, scale_dtype: torch.dtype) -> Tensor:
    """Scales rounded to the stored dtype (float32 values); a zero scale becomes that dtype's eps, as
    compressed-tensors does, so x/s is defined."""
    s = s.to(scale_dtype).float()
    return torch.where(s == 0, torch.full_like(s, torch.finfo(scale_dtype).eps), s)


def absmax_grid(w: Tensor, bits: int, group: int, symmetric: bool = True,
                scale_dtype: torch.dtype = torch.float16) -> tuple[Tensor, Tensor | None]:
    """The practitioner's grid of every group: (scales, mins), each (rows, ⌈cols/group⌉), float32 values that are
    exact at ``scale_dtype``.

    Symmetric (compressed-tensors' ``calculate_qparams`` with the min–max observer): the range always holds 0,
    s = max(|min(x, 0)|, max(x, 0)) / ((2^b − 1)/2), mins None. Asymmetric (llama.cpp's Q4_1 reference):
    d = (max x − min x)/(2^b − 1), m = min x.
    """
    w = w.float()
    levels = (1 << bits) - 1
    if symmetric:
        amax = _group_reduce(w.abs(), group, "amax")
        return _round_scale(amax / (levels / 2), scale_dtype), None
    hi = _group_reduce(w, group, "amax")
    lo = _group_reduce(w, group, "amin")
    return _round_scale((hi - lo) / levels, scale_dtype), lo.to(scale_dtype).float()


def quantize_to_grid(x: Tensor, s: Tensor, m: Tensor | None, bits: int) -> tuple[Tensor, Tensor]:
    """Round-to-nearest of ``x`` on a fixed grid (``s``, ``m`` broadcast against ``x``): the integer codes and
    the dequantized values, computed as :func:`lcompress.compressions.grouped.grouped_delta` computes Δ.

    Symmetric (``m`` None): q = clamp(round(x/s), −2^(b−1), 2^(b−1) − 1), x̂ = s·q. Asymmetric:
    u = clamp(round((x − m)/s), 0, 2^b − 1), x̂ = s·u + m. Ties round to even (torch.round), as compressed-tensors.
    """
    if m is None:
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        q = torch.clamp(torch.round(x / s), lo, hi)
        return q, s * q
    u = torch.clamp(torch.round((x - m) / s), 0, (1 << bits) - 1)
    return u, s * u + m


def _hinv_factor(h: Tensor, w: Tensor, damp: float, where: str) -> tuple[Tensor, bool]:
    """GPTQ's bookkeeping of H: dead inputs (H_jj = 0) get H_jj = 1 and their weights are zeroed in ``w`` (in
    place); H_δ = H + δ·mean(diag H)·I; returns (U, fallback) with U the upper Cholesky factor of H_δ⁻¹.

    Tried in float32 as GPTQ does, then float64; if H_δ is still not positive definite, U = I (round-to-nearest,
    llmcompressor's fallback) and a warning names the layer."""
    hd = h.clone()
    dead = hd.diagonal() == 0
    if bool(dead.any()):
        hd.diagonal()[dead] = 1.0
        w[:, dead] = 0.0
    hd.diagonal().add_(damp * float(hd.diagonal().mean()))
    for dt in (torch.float32, torch.float64):
        l, info = torch.linalg.cholesky_ex(hd.to(dt))
        if int(info) == 0:
            hinv = torch.cholesky_inverse(l)
            u, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if int(info) == 0 and bool(torch.isfinite(u).all()):
                return u.to(torch.float32), False
    logger.warning("%s: the dampened Hessian is not positive definite even in float64 (damp=%g); falling back to "
                   "round-to-nearest for this layer (raise damp or give more calibration data)", where, damp)
    return torch.eye(h.shape[0], dtype=torch.float32, device=h.device), True


def _check_block_size(block_size: Any) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size={block_size!r} must be an integer >= 1 (columns updated together)")
    return block_size


def _check_damp(damp: Any) -> float | None:
    if damp is None:
        return None
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"damp={damp!r} must be None (the run's δ) or a finite number >= 0")
    return float(damp)


@torch.no_grad()
def gptq_quantize(w: Tensor, h: Tensor, scales: Tensor, mins: Tensor | None, bits: int, group: int, *,
                  act_order: bool = True, block_size: int = 128, damp: float = 0.01,
                  where: str = "layer") -> tuple[Tensor, Tensor, dict[str, Any]]:
    """GPTQ on one layer with a fixed grid: each column (in activation order) is rounded to its group's grid, and
    its error e_j = (w_j − ŵ_j)/U_jj is spread over the columns not yet quantized, W_{:,k} −= e_j·U_jk (U the
    upper Cholesky factor of H_δ⁻¹), in blocks of ``block_size`` columns with lazy updates of the rest.

    Args:
        w: (rows, cols) weights W₀.
        h: (cols, cols) H = XᵀX/N, not dampened.
        scales, mins: the grid, (rows, ⌈cols/group⌉) each (mins None: symmetric), fixed before the updates from
            the original weights' groups (static groups).
        bits: code bits.
        group: columns per group, in the original order.
        act_order: quantize columns in order of decreasing H_jj.
        block_size: columns per lazy-update block.
        damp: δ.
        where: the layer's name, for messages.

    Returns:
        (codes (rows, cols) float integers, Ŵ (rows, cols) = the dequantized weights, info ``{"fallback"}``).
    """
    rows, cols = w.shape
    dev = w.device
    W = w.detach().float().clone()
    H = h.detach().to(device=dev, dtype=torch.float32)
    perm = torch.argsort(H.diagonal(), descending=True) if act_order else None
    if perm is not None:
        W, H = W[:, perm], H[perm][:, perm]
    U, fallback = _hinv_factor(H, W, damp, where)
    gidx = (perm if perm is not None else torch.arange(cols, device=dev)) // group
    S = scales.float().to(dev)[:, gidx]  # each column's scale, in the working order
    M = None if mins is None else mins.float().to(dev)[:, gidx]
    Q = torch.empty_like(W)
    C = torch.empty_like(W)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            c, q = quantize_to_grid(W1[:, i], S[:, i1 + i], None if M is None else M[:, i1 + i], bits)
            Q[:, i1 + i] = q
            C[:, i1 + i] = c
            e = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            E1[:, i] = e
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    if perm is not None:
        inv = torch.argsort(perm)
        Q, C = Q[:, inv], C[:, inv]
    return C, Q, {"fallback": int(fallback)}


def _split_count(total: int, sizes: Sequence[int]) -> list[int]:
    """``total`` split over parts of ``sizes`` in proportion (cumulative rounding: every prefix is as close to its
    share as an integer can be, and the parts sum to ``total``)."""
    n = sum(sizes)
    out, acc, prev = [], 0, 0
    for s in sizes:
        acc += s
        cur = (total * acc + n // 2) // n
        out.append(cur - prev)
        prev = cur
    return out


@torch.no_grad()
def sparsegpt_prune(w: Tensor, h: Tensor, *, keep: int | None = None, nm: tuple[int, int] | None = None,
                    block_size: int = 128, damp: float = 0.01, where: str = "layer") -> tuple[Tensor, Tensor, dict]:
    """SparseGPT on one layer: prune columns left to right with the OBS update of the rest (as
    :func:`gptq_quantize`, the rounding replaced by zeroing the pruned weights), the mask chosen adaptively.

    Unstructured (``keep``): at the start of each block of columns the weights with the smallest w²/U_jj² over
    the block (all rows) are pruned, as many as the block's share of the ``cols·rows − keep`` pruned weights
    (split so that exactly ``keep`` survive in the layer). N:M (``nm = (n, m)``): at the first column of each
    group of m, the m − n weights of smallest w²/U_jj² in each row of the group are pruned. ``block_size`` is
    rounded down to a multiple of m (at least m) so that no group straddles two blocks.

    Returns:
        (W (rows, cols) the final weights, zeros where pruned; kept (rows, cols) bool; info ``{"fallback"}``).
    """
    if (keep is None) == (nm is None):
        raise ValueError("give exactly one of keep (a count) and nm (n, m)")
    rows, cols = w.shape
    dev = w.device
    W = w.detach().float().clone()
    H = h.detach().to(device=dev, dtype=torch.float32)
    U, fallback = _hinv_factor(H, W, damp, where)
    pruned = torch.zeros(rows, cols, dtype=torch.bool, device=dev)
    if nm is not None:
        n, m = nm
        block_size = max(m, block_size - block_size % m)
        counts = None
    else:
        if not 0 <= keep <= rows * cols:
            raise ValueError(f"keep={keep} must be in [0, {rows * cols}] for a {rows}x{cols} layer")
        starts = list(range(0, cols, block_size))
        counts = _split_count(rows * cols - keep, [rows * (min(s + block_size, cols) - s) for s in starts])
    for b, i1 in enumerate(range(0, cols, block_size)):
        i2 = min(i1 + block_size, cols)
        W1 = W[:, i1:i2].clone()
        E1 = torch.empty_like(W1)
        U1 = U[i1:i2, i1:i2]
        d2 = U1.diagonal() ** 2
        P1 = torch.zeros(rows, i2 - i1, dtype=torch.bool, device=dev)
        if counts is not None and counts[b]:
            score = (W1 * W1 / d2).reshape(-1)
            P1.view(-1)[torch.topk(score, counts[b], largest=False, sorted=False).indices] = True
        for i in range(i2 - i1):
            if nm is not None and i % m == 0:
                score = W1[:, i:i + m] ** 2 / d2[i:i + m]
                idx = torch.topk(score, m - n, dim=1, largest=False, sorted=False).indices
                P1[:, i:i + m].scatter_(1, idx, True)
            q = torch.where(P1[:, i], torch.zeros_like(W1[:, i]), W1[:, i])
            e = (W1[:, i] - q) / U1[i, i]
            W1[:, i:] -= e[:, None] * U1[i, i:][None, :]
            W1[:, i] = q
            E1[:, i] = e
        W[:, i1:i2] = W1
        pruned[:, i1:i2] = P1
        W[:, i2:] -= E1 @ U[i1:i2, i2:]
    W[pruned] = 0.0
    return W, ~pruned, {"fallback": int(fallback)}


def wanda_mask(w: Tensor, h_diag: Tensor, *, keep: int | None = None, nm: tuple[int, int] | None = None) -> Tensor:
    """Wanda's mask: scores S_ij = |W_ij|·√H_jj (∝ |W_ij|·‖X_j‖), compared within each output row.

    Unstructured (``keep`` weights in all): each row keeps ⌊keep/rows⌋ of its highest scores; the
    ``keep mod rows`` remaining weights go one each to the rows whose next score is highest. N:M: the n highest
    scores of every group of m consecutive weights of a row.

    Returns:
        kept (rows, cols) bool.
    """
    if (keep is None) == (nm is None):
        raise ValueError("give exactly one of keep (a count) and nm (n, m)")
    rows, cols = w.shape
    score = w.detach().float().abs() * h_diag.detach().float().to(w.device).clamp_min(0).sqrt()
    mask = torch.zeros(rows, cols, dtype=torch.bool, device=w.device)
    if nm is not None:
        n, m = nm
        g = score.reshape(rows, cols // m, m)
        idx = torch.topk(g, n, dim=2, sorted=False).indices
        return mask.reshape(rows, cols // m, m).scatter_(2, idx, True).reshape(rows, cols)
    if not 0 <= keep <= rows * cols:
        raise ValueError(f"keep={keep} must be in [0, {rows * cols}] for a {rows}x{cols} layer")
    base, extra = divmod(keep, rows)
    order = torch.argsort(score, dim=1, descending=True)
    if base:
        mask.scatter_(1, order[:, :base], True)
    if extra:
        nxt = score.gather(1, order[:, base:base + 1]).reshape(-1)
        r = torch.topk(nxt, extra, sorted=False).indices
        mask[r, order[r, base]] = True
    return mask


# ---- the solvers ---------------------------------------------------------------------------------------------------
def _loss(p: LayerProblem, w: Tensor) -> float:
    """tr((W − W₀) H_δ (W − W₀)ᵀ), H_δ as the problem's (LayerProblem.loss without its eigendecomposition)."""
    d = w.float().to(p.w0.device) - p.w0
    hd = p.dampened().to(d.device)
    return float(((d @ hd) * d).sum())


def _describe(comp: Compression) -> str:
    cfg = comp.config()
    return cfg.pop("type") + "(" + ", ".join(f"{k}={v!r}" for k, v in cfg.items()) + ")"


def _pruning_support(comp: Compression) -> str | None:
    """None when SparseGPT and Wanda can produce ``comp`` (N:M, or unstructured with float values); else why not."""
    if isinstance(comp, NMPruning) or isinstance(comp, ConstraintL0Pruning) and comp.value_codebook is None:
        return None
    return ("it prunes to ConstraintL0Pruning (without value_codebook) or NMPruning" +
            ("" if isinstance(comp, _Sparse) else "; for quantization use 'gptq'"))


def _layer_keeps(comp: ConstraintL0Pruning, problems: Sequence[LayerProblem]) -> list[int]:
    """κ of the task split over its layers in proportion to their sizes (the same share kept in each)."""
    sizes = [p.w0.numel() for p in problems]
    return _split_count(comp.kappa_for(sum(sizes)), sizes)


class _Peer:
    method = ""

    def config(self) -> dict[str, Any]:
        return {"method": self.method}

    def supports(self, comp: Compression) -> str | None:
        """None when the method can produce ``comp``; otherwise why not (one sentence)."""
        raise NotImplementedError

    def _check(self, task: Task) -> None:
        why = self.supports(task.compression)
        if why is not None:
            raise ValueError(f"task {task.name!r}: method {self.method!r} cannot produce "
                             f"{_describe(task.compression)}: {why}")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "method")
        return f"{type(self).__name__}({args})"


class RTN(_Peer):
    """Round-to-nearest, no calibration data.

    Args:
        scales: ``"direct"``: the compression's own C step Θ = Π(W₀) (:func:`lcompress.ptq.direct_solver`; for
            grouped integers the best scale of every group), for any compression but pruning; ``"absmax"``: the
            practitioner's grid (:func:`absmax_grid`), for :class:`~lcompress.GroupedIntQuantization`.
    """

    def __init__(self, scales: str = "direct") -> None:
        if scales not in ("direct", "absmax"):
            raise ValueError(f"scales={scales!r} must be 'direct' (the exact C step) or 'absmax' (max |x| per group)")
        self.scales = scales
        self.method = "rtn" if scales == "direct" else "rtn_absmax"

    def config(self) -> dict[str, Any]:
        return {"method": self.method}

    def supports(self, comp: Compression) -> str | None:
        if self.scales == "absmax":
            if not isinstance(comp, GroupedIntQuantization):
                return "absmax round-to-nearest sets the grid of a GroupedIntQuantization (use 'rtn' for others)"
            return None
        if isinstance(comp, _Sparse):
            return "pruning has no rounding; its direct compression is method 'magnitude'"
        return None

    def __call__(self, task: Task, problems: Sequence[LayerProblem]) -> dict[str, Any]:
        self._check(task)
        comp = task.compression
        if self.scales == "direct":
            direct_solver(task, problems)
        else:
            (p,) = problems
            s, m = absmax_grid(p.w0, comp.bits, comp.group, comp.symmetric, _SCALE_DTYPES[comp.scale_dtype])
            cols = p.w0.shape[1]
            gidx = torch.arange(cols, device=p.w0.device) // comp.group
            codes, _ = quantize_to_grid(p.w0, s[:, gidx], None if m is None else m[:, gidx], comp.bits)
            comp.set_grid(s, codes, m)
        deltas = task.scatter(comp.decompress())
        return {"loss": sum(_loss(p, d) for p, d in zip(problems, deltas))}


class GPTQ(_Peer):
    """GPTQ (Frantar et al. 2022) onto a :class:`~lcompress.GroupedIntQuantization`'s grid, as llmcompressor 0.14
    runs it (see :func:`gptq_quantize`): static groups (scales from the original weights' groups, by
    ``scales``), activation order, blocks of ``block_size`` columns, float32.

    Args:
        act_order: quantize columns in order of decreasing H_jj.
        block_size: columns per lazy-update block.
        damp: δ of H_δ = H + δ·mean(diag H)·I; None takes the run's (``posttrain(damp=...)``, 0.01 by default as
            llmcompressor's ``dampening_frac``).
        scales: ``"absmax"`` (llmcompressor's min–max observer, :func:`absmax_grid`) or ``"direct"`` (the
            compression's exact C step on W₀: the best scale of every group before the updates).

    Raises:
        ValueError: a bad argument; at a task, a compression that is not a GroupedIntQuantization.
    """

    method = "gptq"

    def __init__(self, act_order: bool = True, block_size: int = 128, damp: float | None = None,
                 scales: str = "absmax") -> None:
        if not isinstance(act_order, bool):
            raise TypeError(f"act_order={act_order!r} must be True or False")
        if scales not in ("absmax", "direct"):
            raise ValueError(f"scales={scales!r} must be 'absmax' (max |x| per group) or 'direct' (the exact C step)")
        self.act_order, self.scales = act_order, scales
        self.block_size = _check_block_size(block_size)
        self.damp = _check_damp(damp)

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "act_order": self.act_order, "block_size": self.block_size,
                "damp": self.damp, "scales": self.scales}

    def supports(self, comp: Compression) -> str | None:
        if not isinstance(comp, GroupedIntQuantization):
            return "GPTQ rounds weights onto a grid of grouped integers (GroupedIntQuantization)"
        return None

    def __call__(self, task: Task, problems: Sequence[LayerProblem]) -> dict[str, Any]:
        self._check(task)
        comp: GroupedIntQuantization = task.compression
        (p,) = problems
        if self.scales == "direct":
            comp.compress(p.w0)
            th = comp.theta
            s = th["scales"].float()
            m = th["mins"].float() if "mins" in th else None
        else:
            s, m = absmax_grid(p.w0, comp.bits, comp.group, comp.symmetric, _SCALE_DTYPES[comp.scale_dtype])
        codes, q, info = gptq_quantize(p.w0, p.hessian, s, m, comp.bits, comp.group, act_order=self.act_order,
                                       block_size=self.block_size, damp=p.damp if self.damp is None else self.damp,
                                       where=p.name)
        comp.set_grid(s, codes, m)
        return {"loss": _loss(p, comp.decompress()), **info}


class SparseGPT(_Peer):
    """SparseGPT (Frantar & Alistarh 2023) for :class:`~lcompress.ConstraintL0Pruning` (the task's κ, split over
    its layers in proportion: the same share kept in each, chosen within each layer by blocks) and
    :class:`~lcompress.NMPruning` (see :func:`sparsegpt_prune`). The final weights go through the compression's
    C step, which keeps exactly SparseGPT's support (values rounded to its ``value_dtype``).

    Args:
        block_size: columns per block (the unit of adaptive mask selection and of lazy updates).
        damp: δ; None takes the run's.
    """

    method = "sparsegpt"

    def __init__(self, block_size: int = 128, damp: float | None = None) -> None:
        self.block_size = _check_block_size(block_size)
        self.damp = _check_damp(damp)

    def config(self) -> dict[str, Any]:
        return {"method": self.method, "block_size": self.block_size, "damp": self.damp}

    def supports(self, comp: Compression) -> str | None:
        return _pruning_support(comp)

    def __call__(self, task: Task, problems: Sequence[LayerProblem]) -> dict[str, Any]:
        self._check(task)
        comp = task.compression
        finals, fallback = [], 0
        keeps = _layer_keeps(comp, problems) if isinstance(comp, ConstraintL0Pruning) else [None] * len(problems)
        for p, k in zip(problems, keeps):
            w, _, info = sparsegpt_prune(p.w0, p.hessian, keep=k,
                                         nm=(comp.n, comp.m) if isinstance(comp, NMPruning) else None,
                                         block_size=self.block_size,
                                         damp=p.damp if self.damp is None else self.damp, where=p.name)
            finals.append(w)
            fallback += info["fallback"]
        comp.compress(task.gather(finals))
        deltas = task.scatter(comp.decompress())
        return {"loss": sum(_loss(p, d) for p, d in zip(problems, deltas)), "fallback": fallback}


class Wanda(_Peer):
    """Wanda (Sun et al. 2023): prune by |W_ij|·‖X_j‖ within each output row (or N:M group), no update (see
    :func:`wanda_mask`). For :class:`~lcompress.ConstraintL0Pruning` (κ split over the task's layers in
    proportion) and :class:`~lcompress.NMPruning`."""

    method = "wanda"

    def supports(self, comp: Compression) -> str | None:
        return _pruning_support(comp)

    def __call__(self, task: Task, problems: Sequence[LayerProblem]) -> dict[str, Any]:
        self._check(task)
        comp = task.compression
        finals = []
        keeps = _layer_keeps(comp, problems) if isinstance(comp, ConstraintL0Pruning) else [None] * len(problems)
        for p, k in zip(problems, keeps):
            mask = wanda_mask(p.w0, p.hessian.diagonal(), keep=k,
                              nm=(comp.n, comp.m) if isinstance(comp, NMPruning) else None)
            finals.append(p.w0 * mask)
        comp.compress(task.gather(finals))
        deltas = task.scatter(comp.decompress())
        return {"loss": sum(_loss(p, d) for p, d in zip(problems, deltas))}


class Magnitude(_Peer):
    """Magnitude pruning: the direct compression of a pruning task (the κ largest |w| of the task, or the n
    largest of every N:M group), no data used."""

    method = "magnitude"

    def supports(self, comp: Compression) -> str | None:
        if not isinstance(comp, _Sparse):
            return "magnitude pruning needs a pruning compression; for quantization use 'rtn'"
        return None

    def __call__(self, task: Task, problems: Sequence[LayerProblem]) -> dict[str, Any]:
        self._check(task)
        direct_solver(task, problems)
        deltas = task.scatter(task.compression.decompress())
        return {"loss": sum(_loss(p, d) for p, d in zip(problems, deltas))}


rtn = RTN()
rtn_absmax = RTN("absmax")
magnitude = Magnitude()

#: CLI method name → solver factory (``PEERS[name](**options)`` gives a solver for :func:`lcompress.ptq.posttrain`)
PEERS: dict[str, Callable[..., _Peer]] = {
    "rtn": RTN,
    "rtn_absmax": lambda: RTN("absmax"),
    "gptq": GPTQ,
    "sparsegpt": SparseGPT,
    "wanda": Wanda,
    "magnitude": Magnitude,
}


def check_method(method: str, compression: Compression, task: str | None = None) -> None:
    """Raise ValueError when peer ``method`` cannot produce ``compression`` (naming both, and the task)."""
    solver = make_solver(method)
    why = solver.supports(compression)
    if why is not None:
        at = f"task {task!r}: " if task is not None else ""
        raise ValueError(f"{at}method {method!r} cannot produce {_describe(compression)}: {why}")


def make_solver(method: str, tasks: dict | None = None, **options: Any) -> _Peer:
    """The solver for a CLI method name, checked against a task map's compressions when given.

    Args:
        method: a key of :data:`PEERS`.
        tasks: ``{key: Compression}`` (as for :func:`lcompress.ptq.posttrain`); every compression must be one the
            method produces.
        options: the factory's arguments (e.g. ``act_order=False`` for GPTQ).

    Raises:
        ValueError: an unknown method (the known ones listed), or a task the method cannot produce (named).
        TypeError: an option the method does not take.
    """
    if not isinstance(method, str) or method not in PEERS:
        raise ValueError(f"method={method!r} is not a peer; known: {', '.join(PEERS)}")
    try:
        solver = PEERS[method](**options)
    except TypeError as e:
        raise TypeError(f"method {method!r}: {e}") from None
    for key, comp in (tasks or {}).items():
        why = solver.supports(comp)
        if why is not None:
            raise ValueError(f"task {key!r}: method {method!r} cannot produce {_describe(comp)}: {why}")
    return solver
