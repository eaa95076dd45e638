"""Pruning: most weights are zero; Θ is the support (positions) and the surviving values."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..codecs import SparseCodec
from .base import Compression, check_float, check_int

__all__ = ["ConstraintL0Pruning", "ConstraintL1Pruning", "PenaltyL0Pruning", "PenaltyL1Pruning"]

_VALUE_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16"}


def _value_dtype(value) -> torch.dtype:
    if isinstance(value, torch.dtype) and value in _DTYPE_NAMES:
        return value
    if isinstance(value, str) and value.lower() in _VALUE_DTYPES:
        return _VALUE_DTYPES[value.lower()]
    raise ValueError(f"value_dtype={value!r} must be one of 'float32', 'float16', 'bfloat16'")


class _Sparse(Compression, register=False):
    """Θ = {indices (nnz,) int64 sorted, values (nnz,) at ``value_dtype``, n}.

    ``value_dtype`` stores surviving values at lower precision (float16/bfloat16); the C step then rounds the
    kept values, which is the exact projection for a fixed support.

    With ``value_codebook = K`` (the ℓ0 forms) the surviving values share a learned K-entry float32 codebook, and Θ
    adds ``codebook`` (K,) and ``codes`` (nnz,) with ``values = codebook[codes]``; the file stores ⌈log₂ K⌉ bits
    per survivor plus the codebook instead of the values.
    """

    codec = SparseCodec()

    def __init__(self, value_dtype="float32", value_codebook: int | None = None) -> None:
        super().__init__()
        self.value_dtype = _value_dtype(value_dtype)
        self.value_codebook = None
        if value_codebook is not None:
            self.value_codebook = check_int("value_codebook", value_codebook, low=1)
            if self.value_codebook > 256:
                raise ValueError(f"value_codebook={value_codebook} must be at most 256 (8-bit codes)")
            if self.value_dtype != torch.float32:
                raise ValueError(
                    f"give value_dtype={value_dtype!r} or value_codebook={value_codebook}, not both "
                    "(a codebook's entries are stored in float32)"
                )

    def check_shape(self, shape, task=None):
        super().check_shape(shape, task)
        n = math.prod(shape)
        if self.value_codebook is not None and self.value_codebook > n:
            raise ValueError(
                self._where(task) + f"value_codebook={self.value_codebook} exceeds the number of weights ({n}); "
                f"use 1 <= value_codebook <= {n}"
            )

    def _config(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {"value_dtype": _DTYPE_NAMES[self.value_dtype]}
        if self.value_codebook is not None:
            cfg["value_codebook"] = self.value_codebook
        return cfg

    def _set_dense(self, theta_dense: Tensor) -> Tensor:
        """Store a dense vector with zeros as Θ; return Δ(Θ) (after rounding the values to ``value_dtype``)."""
        flat = theta_dense.reshape(-1)
        idx = torch.nonzero(flat).reshape(-1)
        return self._set(idx, flat[idx], flat.numel(), theta_dense.shape)

    def _set(self, idx: Tensor, values: Tensor, n: int, shape, decode: bool = True) -> Tensor | None:
        """Θ ← (idx, values rounded to ``value_dtype``); return Δ(Θ) in ``shape`` (None with ``decode=False``,
        for a caller that assembles it itself)."""
        values = values.to(self.value_dtype)
        self._theta = {"indices": idx, "values": values, "n": int(n)}
        if not decode:
            return None
        out = torch.zeros(n, dtype=torch.float32, device=values.device)
        out[idx] = values.float()
        return out.reshape(shape)

    def _set_codebook(self, w: Tensor, kappa: int | None, cost: float) -> Tensor:
        """The exact C step with codebook values (see :func:`lcompress.functional.sparse_codebook`)."""
        flat = w.reshape(-1)
        idx, codes, cb = F.sparse_codebook(flat, self.value_codebook, kappa=kappa, cost=cost)
        out = self._set(idx, cb[codes.long()], flat.numel(), w.shape)
        self._theta.update(codebook=cb, codes=codes)
        return out

    def _decompress(self) -> Tensor:
        th = self._theta
        out = torch.zeros(th["n"], dtype=torch.float32, device=th["values"].device)
        out[th["indices"]] = th["values"].float()
        return out.reshape(self._shape)

    @property
    def nnz(self) -> int:
        return int(self.theta["indices"].numel())


class ConstraintL0Pruning(_Sparse):
    """Keep the κ weights of largest magnitude: min ‖w − θ‖² s.t. ‖θ‖₀ ≤ κ.

    Over a joint task (several layers) the κ survivors are chosen across all of them together.

    Args:
        kappa: number of nonzero weights to keep, 0 ≤ κ ≤ number of weights in the task.
        fraction: instead of ``kappa``, the share of the task's weights that is **kept** (nonzero), in (0, 1]:
            ``fraction=0.05`` keeps 5% and prunes 95% away ("prune to 5%"); κ = round(fraction · n) once the task
            is known.
        value_dtype: precision of the surviving values ("float32", "float16" or "bfloat16").
        value_codebook: instead, K: the surviving values share one learned K-entry codebook (⌈log₂ K⌉ bits each
            plus K floats). The C step stays exact: support, codes and codebook are optimized jointly by
            :func:`lcompress.functional.sparse_codebook`.

    >>> ConstraintL0Pruning(kappa=2).compress(torch.tensor([0.1, -3.0, 0.5, 2.0])).tolist()
    [0.0, -3.0, 0.0, 2.0]
    """

    @classmethod
    def examples(cls) -> list["ConstraintL0Pruning"]:
        return [cls(kappa=30), cls(kappa=30, value_dtype="float16"), cls(kappa=30, value_codebook=4),
                cls(fraction=0.1)]

    def __init__(self, kappa: int | None = None, value_dtype="float32", *, fraction: float | None = None,
                 value_codebook: int | None = None) -> None:
        super().__init__(value_dtype, value_codebook)
        if (kappa is None) == (fraction is None):
            raise ValueError(f"give exactly one of kappa (a count) and fraction, got kappa={kappa!r}, fraction={fraction!r}")
        self.kappa = None if kappa is None else check_int("kappa", kappa, low=0)
        self.fraction = None
        if fraction is not None:
            if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
                raise TypeError(f"fraction={fraction!r} must be a real number: the share of weights kept, in (0, 1]")
            if not 0 < fraction <= 1:  # NaN fails this too
                raise ValueError(f"fraction={fraction!r} is the share of weights kept (0.05 keeps 5%) and must be in "
                                 "(0, 1]; to keep none, use kappa=0")
            self.fraction = float(fraction)
        # the weighted projection keeps the κ largest dᵢwᵢ²; a value codebook has no weighted C step
        self.supports_importance = self.value_codebook is None

    def _config(self):
        size = {"kappa": self.kappa} if self.fraction is None else {"fraction": self.fraction}
        return {**size, **super()._config()}

    def kappa_for(self, n: int) -> int:
        """κ for a task of n weights."""
        return self.kappa if self.fraction is None else int(round(self.fraction * n))

    def check_shape(self, shape, task=None):
        super().check_shape(shape, task)
        n = 1
        for s in shape:
            n *= s
        if self.kappa is not None and self.kappa > n:
            raise ValueError(
                self._where(task) + f"kappa={self.kappa} exceeds the number of weights ({n}); use 0 <= kappa <= {n}"
            )

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        flat = w.reshape(-1)
        if self.value_codebook is not None:
            return self._set_codebook(w, self.kappa_for(flat.numel()), 0.0)
        idx = F.topk_magnitude(flat, self.kappa_for(flat.numel()))
        return self._set(idx, flat[idx], flat.numel(), w.shape)

    def _compress_importance(self, w: Tensor, mu: float, importance: Tensor) -> Tensor:
        """min Σᵢ dᵢ(wᵢ − θᵢ)² s.t. ‖θ‖₀ ≤ κ: keep the κ largest dᵢwᵢ² (their values unchanged)."""
        flat = w.reshape(-1)
        idx = F.topk_magnitude((importance.reshape(-1) * flat * flat).sqrt(), self.kappa_for(flat.numel()))
        return self._set(idx, flat[idx], flat.numel(), w.shape)


class ConstraintL1Pruning(_Sparse):
    """Projection onto the ℓ1 ball: min ‖w − θ‖² s.t. ‖θ‖₁ ≤ κ (soft thresholding at the exact τ).

    Args:
        kappa: the ℓ1 radius κ ≥ 0 (a real number, not a count).
        value_dtype: precision of the surviving values.
    """

    @classmethod
    def examples(cls) -> list["ConstraintL1Pruning"]:
        return [cls(kappa=3.0)]

    def __init__(self, kappa: float, value_dtype="float32") -> None:
        super().__init__(value_dtype)
        self.kappa = check_float("kappa", kappa, low=0.0)

    def _config(self):
        return {"kappa": self.kappa, **super()._config()}

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        return self._set_dense(F.project_l1_ball(w, self.kappa))


class _PenaltyPruning(_Sparse, register=False):
    """Penalty form min_θ α·C(θ) + μ/2‖w − θ‖², solved elementwise by a threshold (``_threshold``)."""

    penalty_form = True
    _threshold = staticmethod(F.hard_threshold)

    def __init__(self, alpha: float, value_dtype="float32", value_codebook: int | None = None) -> None:
        super().__init__(value_dtype, value_codebook)
        self.alpha = check_float("alpha", alpha, low=0.0)

    def _config(self):
        return {"alpha": self.alpha, **super()._config()}

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        return self._set_dense(self._threshold(w, self.alpha, mu))


class PenaltyL0Pruning(_PenaltyPruning):
    """Penalty form: min_θ α‖θ‖₀ + μ/2‖w − θ‖², i.e. hard thresholding at √(2α/μ).

    As μ grows along the LC path the threshold falls; at μ → 0⁺ (direct compression) every weight is pruned.

    Args:
        alpha: the penalty weight α ≥ 0.
        value_dtype: precision of the surviving values.
        value_codebook: instead, K: the surviving values share one learned K-entry codebook (see
            :class:`ConstraintL0Pruning`); a weight is kept when its gain xᵢ² − (xᵢ − c[aᵢ])² exceeds 2α/μ.
    """

    @classmethod
    def examples(cls) -> list["PenaltyL0Pruning"]:
        return [cls(alpha=1e-3), cls(alpha=1e-2, value_codebook=2)]

    _threshold = staticmethod(F.hard_threshold)

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        if self.value_codebook is None:
            return super()._compress(w, mu)
        cost = math.inf if mu <= 0 else 2.0 * self.alpha / mu
        return self._set_codebook(w, None, cost)


class PenaltyL1Pruning(_PenaltyPruning):
    """Penalty form: min_θ α‖θ‖₁ + μ/2‖w − θ‖², i.e. soft thresholding at α/μ.

    Args:
        alpha: the penalty weight α ≥ 0.
        value_dtype: precision of the surviving values.
    """

    @classmethod
    def examples(cls) -> list["PenaltyL1Pruning"]:
        return [cls(alpha=1e-3)]

    _threshold = staticmethod(F.soft_threshold)
    idempotence = None  # soft thresholding is a proximal step: it shrinks Δ(Θ) again

    def __init__(self, alpha: float, value_dtype="float32") -> None:  # no codebook form for ℓ1
        super().__init__(alpha, value_dtype)
