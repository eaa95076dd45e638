"""The formats runtimes execute: grouped uniform integers (GPTQ/AWQ-style int2–int8 with one scale per group of
input weights, llama.cpp's Q4_0/Q4_1/Q5_0/Q5_1/Q8_0 blocks) and N:M structured sparsity (2:4, 4:8), with their
codecs. The C steps are in :mod:`lcompress._grouped`."""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import _grouped as G
from ..codecs import Checker, Codec, CorruptFileError, Reader, SparseCodec, Writer
from ..codecs.base import DTYPES, dtype_name
from .base import Compression, check_int
from .pruning import _DTYPE_NAMES, _Sparse, _value_dtype

__all__ = ["GroupedIntQuantization", "NMPruning", "GroupedIntCodec", "NMSparseCodec", "GGUF_TYPES", "gguf_type"]

_SCALE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def _groups(cols: int, group: int) -> int:
    return -(-cols // group)


def _expand(per_group: Tensor, group: int, cols: int) -> Tensor:
    """(rows, groups) → (rows, cols): each group's value over its columns."""
    return per_group.float().repeat_interleave(group, dim=1)[:, :cols]


def grouped_delta(scales: Tensor, mins: Tensor | None, codes: Tensor, bits: int, group: int, symmetric: bool,
                  rows: int, cols: int) -> Tensor:
    """Δ(Θ) of grouped integers: s·(u − 2^(b−1)) (symmetric) or d·u + m (asymmetric), u the stored unsigned codes."""
    u = codes.reshape(rows, cols).float()
    if symmetric:
        return _expand(scales, group, cols) * (u - (1 << (bits - 1)))
    return _expand(scales, group, cols) * u + _expand(mins, group, cols)


class GroupedIntCodec(Codec):
    """Grouped integer codes with a scale (and an offset) per group.

    Θ = ``{"scales": (rows, groups), "mins": (rows, groups) (asymmetric only), "codes": (rows·cols,) uint8}``, the
    scales at the compression's ``scale_dtype`` and the codes unsigned (the symmetric code q is stored as
    q + 2^(b−1)). Record ``{"kind": "groupedint", "rows", "cols", "bits", "group", "symmetric", "scale_dtype",
    "codes", "scales", "mins"?}``: the codes as one stream of b-bit symbols, then the scales (and offsets) row by
    row. Loaded compactly, the layer stays dense with Δ(Θ) as its weight.
    """

    name = "groupedint"

    def stored_values(self, comp) -> int:
        th = comp.theta
        return th["codes"].numel() + th["scales"].numel() + (th["mins"].numel() if "mins" in th else 0)

    def encode(self, comp, w: Writer) -> dict[str, Any]:
        th = comp.theta
        rows, ng = th["scales"].shape
        cols = th["codes"].numel() // max(rows, 1)
        rec: dict[str, Any] = {"kind": self.name, "rows": rows, "cols": cols, "bits": comp.bits, "group": comp.group,
                               "symmetric": comp.symmetric, "scale_dtype": dtype_name(th["scales"].dtype)}
        rec["codes"] = w.write_symbols("codes", th["codes"].reshape(-1), 1 << comp.bits)
        rec["scales"] = w.write_tensor("scales", th["scales"].detach().cpu().reshape(-1))
        if not comp.symmetric:
            rec["mins"] = w.write_tensor("mins", th["mins"].detach().cpu().reshape(-1))
        return rec

    def check(self, rec, cfg, view, chk: Checker, f: str, depth: int) -> None:
        if len(view) != 2:
            raise chk.fail(f"{f}.kind", rec["kind"], f"is a matrix record for a view {view} that is not a matrix")
        rows = chk.int_(chk.get(rec, "rows", f), f"{f}.rows")
        cols = chk.int_(chk.get(rec, "cols", f), f"{f}.cols")
        if [rows, cols] != list(view):
            raise chk.fail(f"{f}.rows/cols", [rows, cols], f"are not the view {view}")
        bits = chk.int_(chk.get(rec, "bits", f), f"{f}.bits", lo=2, hi=8)
        group = chk.int_(chk.get(rec, "group", f), f"{f}.group", lo=1, hi=max(cols, 1))
        sym = chk.get(rec, "symmetric", f)
        if not isinstance(sym, bool):
            raise chk.fail(f"{f}.symmetric", sym, "is not true or false")
        sd = chk.get(rec, "scale_dtype", f)
        if sd not in _SCALE_DTYPES:
            raise chk.fail(f"{f}.scale_dtype", sd, f"is not one of {sorted(_SCALE_DTYPES)}")
        if isinstance(cfg, dict) and (cfg.get("bits"), cfg.get("group"), cfg.get("symmetric"), cfg.get("scale_dtype")) \
                != (bits, group, sym, sd):
            raise chk.fail(f"{f}", [bits, group, sym, sd], f"does not match the task's config {cfg}")
        chk.symbols(chk.get(rec, "codes", f), rows * cols, 1 << bits, f"{f}.codes")
        ng = rows * _groups(cols, group)
        chk.tensor(chk.get(rec, "scales", f), _SCALE_DTYPES[sd], ng, f"{f}.scales")
        if not sym:
            chk.tensor(chk.get(rec, "mins", f), _SCALE_DTYPES[sd], ng, f"{f}.mins")

    def decode(self, rec, rd: Reader, cfg, where: str) -> dict[str, Any]:
        rows, cols, bits, group = int(rec["rows"]), int(rec["cols"]), int(rec["bits"]), int(rec["group"])
        if not (2 <= bits <= 8 and 1 <= group):
            raise CorruptFileError(f"corrupted .lcz header: {where} has bits={bits}, group={group}")
        sd = _SCALE_DTYPES.get(rec["scale_dtype"])
        if sd is None:
            raise CorruptFileError(f"corrupted .lcz header: {where} has scale_dtype {rec['scale_dtype']!r}")
        ng = _groups(cols, group)
        codes = torch.from_numpy(np.ascontiguousarray(rd.read_symbols(rec["codes"], rows * cols, 1 << bits, where)))
        th = {"codes": codes.to(torch.uint8), "scales": rd.read_tensor(rec["scales"], sd, [rows, ng], where)}
        if not rec["symmetric"]:
            th["mins"] = rd.read_tensor(rec["mins"], sd, [rows, ng], where)
        return th

    def delta(self, theta, view: Sequence[int], rec) -> Tensor:
        rows, cols = view
        if theta["codes"].numel() != rows * cols or theta["scales"].shape[0] != rows:
            raise CorruptFileError(f"corrupted .lcz header: grouped codes {theta['codes'].numel()} and scales "
                                   f"{tuple(theta['scales'].shape)} for a view {tuple(view)}")
        return grouped_delta(theta["scales"], theta.get("mins"), theta["codes"], int(rec["bits"]), int(rec["group"]),
                             bool(rec["symmetric"]), rows, cols)


class GroupedIntQuantization(Compression):
    """Grouped uniform integer quantization: each row of the matrix view (an output unit; a Linear weight's row)
    is cut into groups of ``group`` consecutive input weights, and each group x is stored as ``bits``-bit integer
    codes with one scale:

    * ``symmetric=True``: x ≈ s·q, q ∈ {−2^(b−1), …, 2^(b−1) − 1} (int4: −8…7), s of either sign;
    * ``symmetric=False``: x ≈ d·q + m, q ∈ {0, …, 2^b − 1}, with an offset m per group.

    Scales (and offsets) are stored at ``scale_dtype`` and counted: int4 with groups of 64 and float16 scales is
    4 + 16/64 = 4.25 bits per weight. When ``group`` does not divide the row, the last group of each row is
    shorter.

    C step (:mod:`lcompress._grouped`): symmetric, min_{s,q} ‖x − s·q‖² solved exactly per group over real s by a
    sweep over the breakpoints s = |xᵢ|/(k + ½) where codes change (the stored scale is then the best of the
    float16 neighbours of that optimum); asymmetric, a descent from the min–max grid that is never worse than
    round-to-nearest min–max.

    llama.cpp's block types are presets (:func:`gguf_type`): Q8_0 = (8, 32), Q4_0 = (4, 32), Q5_0 = (5, 32),
    symmetric; Q4_1 = (4, 32), Q5_1 = (5, 32), asymmetric; float16 scales.

    Args:
        bits: 2 ≤ b ≤ 8.
        group: weights per group, 1 ≤ group ≤ the row length.
        symmetric: the form (above).
        scale_dtype: ``"float16"`` (default), ``"bfloat16"`` or ``"float32"``.

    Raises:
        ValueError: a bad argument, or (at the task) a group wider than a row.

    >>> q = GroupedIntQuantization(bits=2, group=2)
    >>> q.compress(torch.tensor([[1.0, -2.0, 0.5, 0.25]])).tolist()
    [[1.0, -2.0, 0.5, 0.25]]
    """

    matrix = True
    supports_importance = True
    has_partial = True
    codec = GroupedIntCodec()

    @classmethod
    def examples(cls) -> list["GroupedIntQuantization"]:
        return [cls(4, 4), cls(3, 8), cls(2, 15), cls(8, 6), cls(4, 4, symmetric=False),
                cls(3, 5, scale_dtype="float32")]

    def __init__(self, bits: int, group: int, symmetric: bool = True, scale_dtype: str = "float16") -> None:
        super().__init__()
        self.bits = check_int("bits", bits, low=2, high=8)
        self.group = check_int("group", group, low=1)
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric={symmetric!r} must be True or False")
        self.symmetric = symmetric
        if scale_dtype not in _SCALE_DTYPES:
            raise ValueError(f"scale_dtype={scale_dtype!r} must be one of {sorted(_SCALE_DTYPES)}")
        self.scale_dtype = scale_dtype
        self.idempotence = "exact" if symmetric else "approximate"

    def _config(self) -> dict[str, Any]:
        return {"bits": self.bits, "group": self.group, "symmetric": self.symmetric, "scale_dtype": self.scale_dtype}

    def check_shape(self, shape, task=None):
        super().check_shape(shape, task)
        if len(shape) != 2:
            raise ValueError(self._where(task) + f"GroupedIntQuantization needs a matrix, got shape {tuple(shape)}")
        if self.group > shape[1]:
            raise ValueError(self._where(task) + f"group={self.group} is wider than a row ({shape[1]} weights); "
                             f"use 1 <= group <= {shape[1]}")

    @property
    def bits_per_weight(self) -> float:
        """Stored bits per weight for a row length that the group divides (codes plus scales, packed)."""
        per_group = 8 * torch.tensor([], dtype=_SCALE_DTYPES[self.scale_dtype]).element_size()
        return self.bits + per_group * (1 if self.symmetric else 2) / self.group

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        return self._compress_importance(w, mu, None)

    def _compress_importance(self, w: Tensor, mu: float, importance: Tensor | None) -> Tensor:
        rows, cols = w.shape
        sd = _SCALE_DTYPES[self.scale_dtype]
        scales, mins, codes = [], [], []
        prev = self._theta if self._theta is not None and self._shape == (rows, cols) else None
        wts = [None] * 2 if importance is None else [x for x, _ in G.grouped_view(importance, self.group)]
        for (x, cols_), wt in zip(G.grouped_view(w, self.group), wts):
            gs = slice(cols_.start // self.group, _groups(cols_.stop, self.group))  # this piece's groups
            if self.symmetric:
                warm = None if prev is None else prev["scales"][:, gs].reshape(-1)
                s, q = G.symmetric_grid(x, self.bits, sd, warm=warm, weight=wt)
                u = q + (1 << (self.bits - 1))
            else:
                warm = None if prev is None else (prev["scales"][:, gs].reshape(-1), prev["mins"][:, gs].reshape(-1))
                s, m, u = G.asymmetric_grid(x, self.bits, sd, warm=warm, weight=wt)
                mins.append(m.reshape(rows, -1))
            scales.append(s.reshape(rows, -1))
            codes.append(u)
        th = {"codes": G.grouped_unview(codes, rows, cols, self.group).reshape(-1).to(torch.uint8),
              "scales": torch.cat(scales, 1).to(sd)}
        if not self.symmetric:
            th["mins"] = torch.cat(mins, 1).to(sd)
        self._theta = th
        return self._delta(rows, cols)

    def _compress_partial(self, w: Tensor, mu: float, importance: Tensor | None) -> Tensor:
        """The partial C step: the best codes for the last scales (and offsets), then each group's (weighted)
        least-squares scale for those codes at ``scale_dtype`` with its best codes, kept where it lowers the error.
        Never further from ``w`` (in the weighted distance) than the last Θ is."""
        rows, cols = w.shape
        th = self._theta
        lo = -(1 << (self.bits - 1)) if self.symmetric else 0
        hi = lo + (1 << self.bits) - 1
        sd = _SCALE_DTYPES[self.scale_dtype]
        wt = torch.ones_like(w) if importance is None else importance

        def ex(t):
            return _expand(t, self.group, cols)

        def codes_for(s, m):
            se = ex(s)
            q = torch.round((w - (0 if m is None else ex(m))) / torch.where(se == 0, torch.ones_like(se), se))
            return torch.where(se == 0, torch.zeros_like(q), q.clamp_(lo, hi))

        def err(s, m, q):
            d = w - ex(s) * q - (0 if m is None else ex(m))
            return torch.nn.functional.pad(wt * d * d, (0, _groups(cols, self.group) * self.group - cols)) \
                .reshape(rows, -1, self.group).sum(2)

        s0 = th["scales"].float()
        m0 = None if self.symmetric else th["mins"].float()
        q0 = codes_for(s0, m0)
        f0 = err(s0, m0, q0)
        # least-squares scale (symmetric) or (scale, offset) for the codes, per group
        pad = _groups(cols, self.group) * self.group - cols

        def gsum(t):
            return torch.nn.functional.pad(t, (0, pad)).reshape(rows, -1, self.group).sum(2)

        if self.symmetric:
            den = gsum(wt * q0 * q0)
            s1 = torch.where(den > 0, gsum(wt * w * q0) / den.clamp_min(1e-30), s0).to(sd).float()
            m1 = None
        else:
            sw, sq, sx = gsum(wt), gsum(wt * q0), gsum(wt * w)
            sqq, sqx = gsum(wt * q0 * q0), gsum(wt * q0 * w)
            det = sw * sqq - sq * sq
            ok = det > 1e-12 * (sw * sqq).clamp_min(1e-30)
            s1 = torch.where(ok, (sw * sqx - sq * sx) / torch.where(ok, det, torch.ones_like(det)), s0).clamp_min(0)
            m1 = torch.where(ok, (sx - s1 * sq) / sw.clamp_min(1e-30), m0)
            s1, m1 = s1.to(sd).float(), m1.to(sd).float()
        q1 = codes_for(s1, m1)
        better = err(s1, m1, q1) < f0
        s = torch.where(better, s1, s0)
        m = None if self.symmetric else torch.where(better, m1, m0)
        q = torch.where(ex(better.float()) > 0, q1, q0)
        return self.set_grid(s, q.long(), m)

    def set_grid(self, scales: Tensor, codes: Tensor, mins: Tensor | None = None) -> Tensor:
        """Θ ← a grid chosen elsewhere (a peer method such as GPTQ picks its own scales and codes); returns Δ(Θ).

        Args:
            scales: (rows, groups) scales; stored at ``scale_dtype`` (Δ uses the stored values).
            codes: (rows, cols) integer codes: symmetric in [−2^(b−1), 2^(b−1) − 1], asymmetric in [0, 2^b − 1].
            mins: (rows, groups) offsets (asymmetric only).

        Raises:
            ValueError: shapes that do not fit, codes out of range, non-finite scales.
        """
        rows, cols = codes.shape
        ng = _groups(cols, self.group)
        if tuple(scales.shape) != (rows, ng):
            raise ValueError(f"scales have shape {tuple(scales.shape)}; codes {tuple(codes.shape)} in groups of "
                             f"{self.group} need ({rows}, {ng})")
        lo = -(1 << (self.bits - 1)) if self.symmetric else 0
        hi = lo + (1 << self.bits) - 1
        if codes.numel() and (int(codes.min()) < lo or int(codes.max()) > hi or bool((codes != codes.round()).any())):
            raise ValueError(f"codes must be integers in [{lo}, {hi}] for {self!r}")
        if self.symmetric != (mins is None) or (mins is not None and tuple(mins.shape) != (rows, ng)):
            raise ValueError(f"{self!r} needs mins of shape ({rows}, {ng})" if not self.symmetric
                             else f"{self!r} is symmetric: give no mins")
        sd = _SCALE_DTYPES[self.scale_dtype]
        th = {"codes": (codes - lo).reshape(-1).to(torch.uint8), "scales": scales.detach().to(sd)}
        if mins is not None:
            th["mins"] = mins.detach().to(sd)
        if not all(bool(torch.isfinite(v.float()).all()) for k, v in th.items() if k != "codes"):
            raise ValueError("scales and mins must be finite at scale_dtype")
        self._theta, self._shape = th, (rows, cols)
        return self._delta(rows, cols)

    def _delta(self, rows: int, cols: int) -> Tensor:
        th = self._theta
        return grouped_delta(th["scales"], th.get("mins"), th["codes"], self.bits, self.group, self.symmetric,
                             rows, cols)

    def _decompress(self) -> Tensor:
        return self._delta(*self._shape)


#: llama.cpp block types that are grouped integers: name → (bits, group, symmetric), float16 scales
GGUF_TYPES = {"q8_0": (8, 32, True), "q5_0": (5, 32, True), "q5_1": (5, 32, False), "q4_0": (4, 32, True),
              "q4_1": (4, 32, False)}


def gguf_type(name: str) -> GroupedIntQuantization:
    """The compression whose Θ is exactly llama.cpp's block type ``name`` (``"q4_0"``, ``"q8_0"``, ...)."""
    key = name.lower() if isinstance(name, str) else name
    if key not in GGUF_TYPES:
        raise ValueError(f"GGUF type {name!r} is not one lcompress compresses to; known: {', '.join(GGUF_TYPES)}")
    b, g, sym = GGUF_TYPES[key]
    return GroupedIntQuantization(b, g, symmetric=sym)


# ---- N:M sparsity --------------------------------------------------------------------------------------------------
class NMSparseCodec(SparseCodec):
    """N:M sparse weights: which N of every M consecutive weights of a row are kept, as one symbol per group (its
    index among the C(M, N) patterns), then the kept values at their dtype, row-major.

    Θ is the sparse layout of :class:`lcompress.ConstraintL0Pruning` (``indices``, ``values``, ``n``), so Δ(Θ)
    and the compact form (a sparse layer) are :class:`SparseCodec`'s. Record ``{"kind": "nmsparse", "keep", "m", "rows", "cols", "dtype",
    "patterns", "values"}``.
    """

    name = "nmsparse"

    def stored_values(self, comp) -> int:
        return int(comp.theta["indices"].numel())

    def encode(self, comp, w: Writer) -> dict[str, Any]:
        th = comp.theta
        rows, cols = comp._shape
        n, m = comp.n, comp.m
        mask = torch.zeros(rows * cols, dtype=torch.bool)
        mask[th["indices"].cpu()] = True
        pats, index = G.nm_patterns(n, m)
        bitval = (mask.reshape(-1, m).long() << torch.arange(m)).sum(1)
        sym = index[bitval]
        if bool((sym < 0).any()):
            raise ValueError(f"the support is not {n}:{m} (a group keeps a number of weights other than {n})")
        vals = th["values"].detach().cpu().reshape(-1)
        return {"kind": self.name, "keep": n, "m": m, "rows": rows, "cols": cols, "dtype": dtype_name(vals.dtype),
                "patterns": w.write_symbols("patterns", sym, pats.shape[0]), "values": w.write_tensor("values", vals)}

    def check(self, rec, cfg, view, chk: Checker, f: str, depth: int) -> None:
        if len(view) != 2:
            raise chk.fail(f"{f}.kind", rec["kind"], f"is a matrix record for a view {view} that is not a matrix")
        rows = chk.int_(chk.get(rec, "rows", f), f"{f}.rows")
        cols = chk.int_(chk.get(rec, "cols", f), f"{f}.cols")
        if [rows, cols] != list(view):
            raise chk.fail(f"{f}.rows/cols", [rows, cols], f"are not the view {view}")
        m = chk.int_(chk.get(rec, "m", f), f"{f}.m", lo=1, hi=NMPruning.MAX_M)
        n = chk.int_(chk.get(rec, "keep", f), f"{f}.keep", lo=1, hi=m)
        if cols % m:
            raise chk.fail(f"{f}.m", m, f"does not divide the row length {cols}")
        if isinstance(cfg, dict) and (cfg.get("n"), cfg.get("m")) != (n, m):
            raise chk.fail(f"{f}.keep/m", [n, m], f"do not match the task's config {cfg}")
        dt = chk.dtype(chk.get(rec, "dtype", f), f"{f}.dtype")
        groups = rows * cols // m
        chk.symbols(chk.get(rec, "patterns", f), groups, math.comb(m, n), f"{f}.patterns")
        chk.tensor(chk.get(rec, "values", f), dt, groups * n, f"{f}.values")

    def decode(self, rec, rd: Reader, cfg, where: str) -> dict[str, Any]:
        rows, cols, n, m = int(rec["rows"]), int(rec["cols"]), int(rec["keep"]), int(rec["m"])
        if not (1 <= n <= m <= NMPruning.MAX_M) or cols % m:
            raise CorruptFileError(f"corrupted .lcz header: {where} has keep={n}, m={m} for rows of {cols}")
        pats, _ = G.nm_patterns(n, m)
        groups = rows * cols // m
        sym = torch.from_numpy(rd.read_symbols(rec["patterns"], groups, pats.shape[0], where).astype(np.int64))
        if sym.numel() and int(sym.max()) >= pats.shape[0]:
            raise CorruptFileError(f"corrupted .lcz payload: {where} has a pattern beyond the C({m},{n}) patterns")
        idx = torch.nonzero(pats[sym].reshape(-1)).reshape(-1)
        vdt = DTYPES.get(rec["dtype"])
        if vdt is None:
            raise CorruptFileError(f"corrupted .lcz header: {where} has unknown dtype {rec['dtype']!r}")
        return {"indices": idx, "values": rd.read_tensor(rec["values"], vdt, [groups * n], where), "n": rows * cols}


class NMPruning(_Sparse):
    """N:M structured sparsity: in every group of ``m`` consecutive input weights of a row, at most ``n`` are
    nonzero (2:4 is what sparse tensor cores and many CPU kernels run).

    C step (exact, since the constraint separates over groups): keep the n of largest magnitude in each group
    (:func:`lcompress._grouped.nm_mask`). Stored as one ⌈log₂ C(m, n)⌉-bit pattern index per group (2:4: 6
    patterns, under 3 bits per 4 weights) and the n kept values at ``value_dtype``; ``n`` of ``m`` is the share
    kept.

    Args:
        n: weights kept per group, 1 ≤ n ≤ m.
        m: group length, 1 ≤ m ≤ 16; it must divide the row length.
        value_dtype: ``"float32"`` (default), ``"float16"`` or ``"bfloat16"``.
    """

    matrix = True
    supports_importance = True
    codec = NMSparseCodec()
    MAX_M = 16

    @classmethod
    def examples(cls) -> list["NMPruning"]:
        return [cls(2, 5), cls(1, 3, value_dtype="float16"), cls(4, 5)]

    def __init__(self, n: int = 2, m: int = 4, value_dtype="float32") -> None:
        super().__init__(value_dtype=value_dtype)
        self.m = check_int("m", m, low=1, high=self.MAX_M)
        self.n = check_int("n", n, low=1, high=self.m)

    def _config(self) -> dict[str, Any]:
        return {"n": self.n, "m": self.m, "value_dtype": _DTYPE_NAMES[self.value_dtype]}

    def check_shape(self, shape, task=None):
        super().check_shape(shape, task)
        if len(shape) != 2:
            raise ValueError(self._where(task) + f"NMPruning needs a matrix, got shape {tuple(shape)}")
        if shape[1] % self.m:
            raise ValueError(self._where(task) + f"NMPruning m={self.m} does not divide the row length {shape[1]}")

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        return self._compress_importance(w, mu, None)

    def _compress_importance(self, w: Tensor, mu: float, importance: Tensor | None) -> Tensor:
        mask = G.nm_mask(w, self.n, self.m, importance).reshape(-1)
        idx = torch.nonzero(mask).reshape(-1)
        return self._set(idx, w.reshape(-1)[idx], w.numel(), w.shape)
