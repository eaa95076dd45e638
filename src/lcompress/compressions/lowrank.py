"""Low-rank: W ≈ A B with A (m×r) and B (r×n); fixed rank or rank selected by a storage/FLOPs penalty (which may
also keep the matrix dense)."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..codecs import FactorsCodec
from ..views import CONV_SCHEMES, from_matrix, matrix_shape, to_matrix
from ..views import check_scheme as _check_scheme
from .base import Compression, check_float, check_int

# the matrix views live in lcompress.views; they are re-exported here for old imports
__all__ = ["LowRank", "RankSelection", "CONV_SCHEMES", "to_matrix", "from_matrix", "matrix_shape"]


class _Factors(Compression, register=False):
    """Θ = {A (m×r), B (r×n)} with Δ = A @ B, or (rank selection only) Θ = {dense (m×n)} with Δ = dense: the
    matrix kept as it is, at the weights' dtype. Works on the matrix view chosen by ``conv_scheme``."""

    matrix = True
    codec = FactorsCodec()

    def __init__(self, conv_scheme: str = "scheme_1") -> None:
        super().__init__()
        self.conv_scheme = _check_scheme(conv_scheme)

    def check_shape(self, shape, task=None):
        super().check_shape(shape, task)
        if len(shape) != 2:
            raise ValueError(
                self._where(task) + f"{type(self).__name__} needs a matrix (or a conv weight), got shape {tuple(shape)}"
            )

    def _set(self, a: Tensor, b: Tensor) -> Tensor:
        out = a @ b
        # a matrix near float32's range overflows the SVD (or its factors): say so rather than store ±inf/NaN
        if not (bool(torch.isfinite(out).all()) and bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all())):
            raise ValueError(
                f"{type(self).__name__}: the SVD of the weights is not finite in float32: the weights are too large "
                "for float32 arithmetic"
            )
        self._theta = {"A": a.contiguous(), "B": b.contiguous()}
        return out

    def _decompress(self) -> Tensor:
        th = self._theta
        if "dense" in th:
            return th["dense"].float().reshape(self._shape)
        return (th["A"] @ th["B"]).reshape(self._shape)

    @property
    def keeps_dense(self) -> bool:
        """True when the last C step kept the matrix dense instead of factorizing it."""
        return "dense" in self.theta

    @property
    def selected_rank(self) -> int:
        """The rank r of the factors; min(m, n) (the most a dense matrix can have) when the matrix is kept dense."""
        th = self.theta
        if "dense" in th:
            return min(th["dense"].shape)
        return int(th["A"].shape[1])


class LowRank(_Factors):
    """Fixed rank: min ‖W − A B‖²_F with A m×r, B r×n, solved exactly by the truncated SVD (Eckart–Young).

    Args:
        rank: r with 1 ≤ r ≤ min(m, n) of the matrix view.
        conv_scheme: how a conv weight becomes a matrix, "scheme_1" (out, in·kh·kw) or "scheme_2" (out·kh, in·kw);
            see :func:`to_matrix`.
    """

    @classmethod
    def examples(cls) -> list["LowRank"]:
        return [cls(rank=3)]

    def __init__(self, rank: int, conv_scheme: str = "scheme_1") -> None:
        super().__init__(conv_scheme)
        self.rank = check_int("rank", rank, low=1)

    def _config(self) -> dict[str, Any]:
        return {"rank": self.rank, "conv_scheme": self.conv_scheme}

    def check_shape(self, shape, task=None):
        super().check_shape(shape, task)
        if self.rank > min(shape):
            raise ValueError(
                self._where(task) + f"rank={self.rank} exceeds min{tuple(shape)} = {min(shape)} of the matrix view"
            )

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        a, b = F.truncated_svd(w, self.rank)
        return self._set(a, b)


class RankSelection(_Factors):
    """Rank selection, penalty form: the exact minimiser of α·C + μ/2 ‖W − Δ‖²_F over two kinds of Δ:

    * Δ = W_r, the best rank-r approximation (truncated SVD), 0 ≤ r ≤ R, at cost C(r) = r·(m + n);
    * Δ = W itself, the matrix kept dense, at cost C = m·n and no distortion.

    C counts parameters ("storage"), or multiply-adds ("flops"): the same times the layer's output positions per
    sample (1 for a Linear layer, H_out·W_out for a conv layer). Every choice is enumerated over the singular
    values. At μ → 0⁺ the rank is 0; it rises as μ grows, and a layer whose spectrum is too flat to factorize
    profitably is kept dense (Θ = {"dense": W}, stored at the weights' dtype and loaded as a plain layer).

    Ranks with r·(m + n) ≥ m·n cost at least as much as the dense matrix and distort at least as much, so the
    dense choice makes them redundant: by default R is the largest rank with r·(m + n) < m·n, and the result is
    the exact minimiser over every rank 0 ≤ r ≤ min(m, n) and the dense matrix.

    Args:
        alpha: the penalty weight α ≥ 0 (α per parameter, or per multiply-add for "flops").
        criterion: "storage" or "flops".
        conv_scheme: matrix view of a conv weight, as for :class:`LowRank`.
        positions: output positions per sample for the "flops" criterion (required for conv weights).
        max_rank: upper bound R on the rank of the factors (capped at min(m, n)). It bounds the factorization
            only: keeping the matrix dense stays a choice (use :class:`LowRank` to force a factorization).
    """

    @classmethod
    def examples(cls) -> list["RankSelection"]:
        return [cls(alpha=1e-4)]

    penalty_form = True
    #: dtype a dense choice is stored at: the parameter's, set by :class:`lcompress.LC` when it resolves the task
    #: (its C steps see half-precision weights in float32); None keeps the input's dtype
    storage_dtype: torch.dtype | None = None

    def __init__(
        self,
        alpha: float,
        criterion: str = "storage",
        conv_scheme: str = "scheme_1",
        positions: int | None = None,
        max_rank: int | None = None,
    ) -> None:
        super().__init__(conv_scheme)
        self.alpha = check_float("alpha", alpha, low=0.0)
        if criterion not in ("storage", "flops"):
            raise ValueError(f"criterion={criterion!r} must be 'storage' or 'flops'")
        self.criterion = criterion
        self.positions = None if positions is None else check_int("positions", positions, low=1)
        self.max_rank = None if max_rank is None else check_int("max_rank", max_rank, low=0)

    def _config(self) -> dict[str, Any]:
        return {
            "alpha": self.alpha,
            "criterion": self.criterion,
            "conv_scheme": self.conv_scheme,
            "positions": self.positions,
            "max_rank": self.max_rank,
        }

    def rank_limit(self, shape) -> int:
        """Largest rank of the factors offered for an m×n matrix view (the dense matrix is offered as well)."""
        m, n = shape
        if self.max_rank is not None:
            return min(self.max_rank, m, n)
        return min((m * n - 1) // (m + n), m, n)

    def _per_param(self) -> float:
        return float(self.positions or 1) if self.criterion == "flops" else 1.0

    def cost_per_rank(self, shape) -> float:
        """C(r) / r for an m×n matrix view: m + n (times the output positions for "flops")."""
        m, n = shape
        return float(m + n) * self._per_param()

    def dense_cost(self, shape) -> float:
        """C of keeping an m×n matrix view dense: m·n (times the output positions for "flops")."""
        m, n = shape
        return float(m * n) * self._per_param()

    def compress(self, w: Tensor, mu: float = 0.0, *, check: bool = True) -> Tensor:
        # a dense choice stores the input itself, at its own dtype (the SVD runs on a float32 copy)
        self._input = w.detach() if isinstance(w, Tensor) else None
        try:
            return super().compress(w, mu, check=check)
        finally:
            self._input = None

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        shape = tuple(w.shape)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        if not bool(torch.isfinite(s).all()):
            raise ValueError(
                f"{type(self).__name__}: the SVD of the weights is not finite in float32: the weights are too large "
                "for float32 arithmetic"
            )
        r = F.rank_select(s, self.alpha, mu, self.cost_per_rank(shape), max_rank=self.rank_limit(shape),
                          dense_cost=self.dense_cost(shape))
        if r is None:
            src = getattr(self, "_input", None)
            src = w if src is None else src
            dense = src.to(self.storage_dtype or src.dtype, copy=True, memory_format=torch.contiguous_format)
            self._theta = {"dense": dense}
            return dense.clone()  # the weights as the model stores them (and Θ not aliased by the result)
        return self._set(u[:, :r] * s[:r], vh[:r])
