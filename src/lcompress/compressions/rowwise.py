"""Quantization by row: each row of a matrix (an embedding table's row, a layer's output unit) its own K-entry
codebook, and its codec.

An embedding table is looked up row by row and its rows often differ in scale by orders of magnitude, so one
codebook for the whole table wastes its entries on the largest rows; a codebook per row costs K float32 values a
row (for a 64-wide row at K = 4: 16 bytes of codebook beside 16 bytes of 2-bit codes) and keeps the C step exact
and separable. The choice is one codebook per row, not per block of rows: a block's codebook would again mix
scales, and the row form needs no block-size hyperparameter.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor

from .._kmeans_rows import kmeans_1d_exact_rows
from ..codecs import Checker, Codec, CorruptFileError, Reader, Writer
from ..sizes import index_bits
from .base import Compression, check_int

__all__ = ["RowwiseQuantization", "RowCodebookCodec"]


class RowCodebookCodec(Codec):
    """Codes and one codebook per row of the matrix view.

    Θ = ``{"codebooks": (rows, K) float32, "codes": (rows·cols,) uint8}``, row-major. Record ``{"kind":
    "rowcodebook", "rows", "cols", "k", "width", "codes"?, "codebooks"}``: the codes as one stream of ⌈log₂ K⌉-bit
    symbols (none for K = 1), then the rows' codebooks in float32. The compact form of an ``nn.Embedding`` is a
    :class:`lcompress.nn.CodebookEmbedding`; any other layer stays dense with Δ(Θ) as its weight.
    """

    name = "rowcodebook"

    def stored_values(self, comp) -> int:
        th = comp.theta
        return th["codes"].numel() + th["codebooks"].numel()

    def encode(self, comp, w: Writer) -> dict[str, Any]:
        th = comp.theta
        cbs, codes = th["codebooks"].detach().float().cpu(), th["codes"].reshape(-1)
        rows, k = cbs.shape
        rec: dict[str, Any] = {"kind": self.name, "rows": rows, "cols": codes.numel() // max(rows, 1), "k": k,
                               "width": index_bits(k)}
        if rec["width"]:
            rec["codes"] = w.write_symbols("codes", codes, k)
        rec["codebooks"] = w.write_tensor("codebook", cbs.reshape(-1))
        return rec

    def check(self, rec, cfg, view, chk: Checker, f: str, depth: int) -> None:
        if len(view) != 2:
            raise chk.fail(f"{f}.kind", rec["kind"], f"is a matrix record for a view {view} that is not a matrix")
        rows = chk.int_(chk.get(rec, "rows", f), f"{f}.rows")
        cols = chk.int_(chk.get(rec, "cols", f), f"{f}.cols")
        if [rows, cols] != list(view):
            raise chk.fail(f"{f}.rows/cols", [rows, cols], f"are not the view {view}")
        k = chk.int_(chk.get(rec, "k", f), f"{f}.k", lo=1, hi=min(256, max(cols, 1)))
        width = chk.get(rec, "width", f)
        if width != index_bits(k):
            raise chk.fail(f"{f}.width", width, f"is not ⌈log₂ K⌉ = {index_bits(k)} for K={k}")
        if width:
            chk.symbols(chk.get(rec, "codes", f), rows * cols, k, f"{f}.codes")
        chk.tensor(chk.get(rec, "codebooks", f), torch.float32, rows * k, f"{f}.codebooks")

    def decode(self, rec, rd: Reader, cfg, where: str) -> dict[str, Any]:
        rows, cols, k, width = int(rec["rows"]), int(rec["cols"]), int(rec["k"]), int(rec["width"])
        if width != index_bits(k) or k > 256:
            raise CorruptFileError(f"corrupted .lcz header: {where} codes of {width} bits for K={k}")
        n = rows * cols
        codes = torch.from_numpy(rd.read_symbols(rec["codes"], n, k, where) if width else np.zeros(n, np.uint8))
        if codes.numel() and int(codes.max()) >= k:
            raise CorruptFileError(f"corrupted .lcz payload: {where} has a code beyond its {k}-entry row codebooks")
        cbs = rd.read_tensor(rec["codebooks"], torch.float32, [rows, k], where)
        return {"codebooks": cbs, "codes": codes.to(torch.uint8)}

    def delta(self, theta, view: Sequence[int], rec=None) -> Tensor:
        cbs, codes = theta["codebooks"], theta["codes"]
        if len(view) != 2 or cbs.shape[0] != view[0] or codes.numel() != math.prod(view):
            raise CorruptFileError(f"corrupted .lcz header: row codebooks {tuple(cbs.shape)} and {codes.numel()} "
                                   f"codes for a view {tuple(view)}")
        return torch.gather(cbs, 1, codes.reshape(tuple(view)).long())

    def compact_specs(self, theta, rec, names, shapes, conv_scheme) -> dict[str, dict[str, Any]]:
        """A :class:`lcompress.nn.CodebookEmbedding` for a single 2-D weight (an embedding table)."""
        if len(names) != 1 or len(shapes[0]) != 2:
            return {}
        return {names[0]: {"kind": "rowcodebook", "codebook": theta["codebooks"],
                           "codes": theta["codes"].reshape(tuple(shapes[0]))}}


class RowwiseQuantization(Compression):
    """Quantization by row: row r of the matrix view takes values in its own learned codebook c_r of K entries.

    C step (exact, every row at once): min over c, a of Σ_r Σ_j (w_rj − c_r[a_rj])², solved row by row to global
    optimality by dynamic programming over the sorted row (:func:`lcompress.functional.kmeans_1d_exact_rows`,
    O(K·D²) per row of length D, vectorised over rows). Stored as ⌈log₂ K⌉-bit codes and K float32 values a row.
    For an ``nn.Embedding`` weight, ``lcompress.load(..., compact=True)`` gives a
    :class:`lcompress.nn.CodebookEmbedding`.

    Args:
        k: entries per row's codebook, 1 ≤ K ≤ min(256, row length).

    >>> q = RowwiseQuantization(k=2)
    >>> q.compress(torch.tensor([[0.0, 0.1, 5.0], [100.0, 100.0, -100.0]])).tolist()
    [[0.05000000074505806, 0.05000000074505806, 5.0], [100.0, 100.0, -100.0]]
    """

    matrix = True
    codec = RowCodebookCodec()

    @classmethod
    def examples(cls) -> list["RowwiseQuantization"]:
        return [cls(k=2), cls(k=5)]

    def __init__(self, k: int) -> None:
        super().__init__()
        self._k = check_int("k", k, low=1, high=256)

    @property
    def k(self) -> int:
        return self._k

    def _config(self) -> dict[str, Any]:
        return {"k": self._k}

    def check_shape(self, shape, task=None):
        super().check_shape(shape, task)
        if len(shape) != 2:
            raise ValueError(self._where(task) + f"RowwiseQuantization needs a matrix, got shape {tuple(shape)}")
        if self._k > shape[1]:
            raise ValueError(self._where(task) + f"RowwiseQuantization k={self._k} exceeds the row length "
                             f"({shape[1]}); use 1 <= k <= {shape[1]}")

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        c, a = kmeans_1d_exact_rows(w, self._k)
        if not bool(torch.isfinite(c).all()):
            raise ValueError(f"RowwiseQuantization: the C step gave a non-finite codebook: the weights are too large "
                             "for float32")
        self._theta = {"codebooks": c, "codes": a.reshape(-1).to(torch.uint8)}
        return self._decompress_shape(w.shape)

    def _decompress_shape(self, shape) -> Tensor:
        th = self._theta
        return torch.gather(th["codebooks"], 1, th["codes"].reshape(th["codebooks"].shape[0], -1).long()).reshape(shape)

    def _decompress(self) -> Tensor:
        return self._decompress_shape(self._shape)
