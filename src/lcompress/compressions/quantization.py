"""Quantization: every weight takes one of K values (a codebook), stored as ⌈log₂ K⌉-bit codes."""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from .. import functional as F
from ..codecs import CodebookCodec
from .base import Compression, check_int

__all__ = [
    "AdaptiveQuantization",
    "BinaryQuantization",
    "ScaledBinaryQuantization",
    "TernaryQuantization",
    "ScaledTernaryQuantization",
    "PowersOfTwoQuantization",
    "FixedAssignmentQuantization",
]


def _codes_dtype(k: int) -> torch.dtype:
    return torch.uint8 if k <= 256 else torch.int64


class _Codebook(Compression, register=False):
    """Shared Θ layout: ``codebook`` (K,) float32 and ``codes`` (n,) integer indices into it.

    The codec says what a file keeps of the codebook: all K float32 values for a learned codebook, the scale of a
    scaled fixed codebook, nothing for a fixed codebook (see :class:`lcompress.codecs.CodebookCodec`).
    """

    codec = CodebookCodec("all")

    def _set(self, codebook: Tensor, codes: Tensor, decode: bool = True) -> Tensor | None:
        """Θ ← (codebook, codes); return Δ(Θ) in codes' shape (None with ``decode=False``, for a caller that
        has it already)."""
        k = codebook.numel()
        codebook = codebook.float()
        if not bool(torch.isfinite(codebook).all()):  # K values: a cheap last guard, so no file holds ±inf
            raise ValueError(
                f"{type(self).__name__}: the C step gave a non-finite codebook {codebook[:8].tolist()}: the weights "
                "are too large for float32 arithmetic"
            )
        self._theta = {"codebook": codebook, "codes": codes.reshape(-1).to(_codes_dtype(k))}
        return self._decompress_shape(codes.shape) if decode else None

    def _decompress_shape(self, shape) -> Tensor:
        th = self._theta
        return th["codebook"][th["codes"].long()].reshape(shape)

    def _decompress(self) -> Tensor:
        return self._decompress_shape(self._shape)

    @property
    def k(self) -> int:
        return self._k


class AdaptiveQuantization(_Codebook):
    """Adaptive quantization with a learned codebook of K entries (1-D k-means).

    C step: min_{c, a} Σᵢ (wᵢ − c[aᵢ])². By default Lloyd's algorithm (:func:`lcompress.functional.kmeans_1d`),
    warm-started from the previous C step's codebook; ``exact=True`` solves it to global optimality by dynamic
    programming (:func:`lcompress.functional.kmeans_1d_exact`).

    Args:
        k: codebook size K, 1 ≤ K ≤ the task's number of weights (⌈log₂ K⌉ bits per weight).
        exact: use the globally optimal solver.

    >>> q = AdaptiveQuantization(k=2)
    >>> w = torch.tensor([-1.0, -0.9, 1.0, 1.1])
    >>> q.compress(w).tolist()
    [-0.949999988079071, -0.949999988079071, 1.0499999523162842, 1.0499999523162842]
    >>> torch.equal(q.compress(q.compress(w)), q.compress(w))   # idempotent
    True
    """

    @classmethod
    def examples(cls) -> list["AdaptiveQuantization"]:
        return [cls(k=4), cls(k=2, exact=True)]

    def __init__(self, k: int, exact: bool = False) -> None:
        super().__init__()
        self._k = check_int("k", k, low=1)
        if not isinstance(exact, bool):
            raise TypeError(f"exact={exact!r} must be True or False")
        self.exact = exact

    def _config(self) -> dict[str, Any]:
        return {"k": self._k, "exact": self.exact}

    def check_shape(self, shape, task=None):
        super().check_shape(shape, task)
        n = math.prod(shape)
        if self._k > n:
            raise ValueError(
                self._where(task) + f"AdaptiveQuantization k={self._k} exceeds the number of weights ({n}); "
                f"use 1 <= k <= {n}"
            )

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        if self.exact:
            c, codes = F.kmeans_1d_exact(w, self._k)
            return self._set(c, codes.reshape(w.shape))
        init = None
        if self._theta is not None:
            init = self._theta["codebook"].to(w.device)
        c, codes = F.kmeans_1d(w, self._k, init=init)
        return self._set(c, codes.reshape(w.shape))


class _FixedCodebook(_Codebook, register=False):
    """Nearest-neighbour assignment to a fixed sorted codebook (no learned values; a file stores none)."""

    codec = CodebookCodec("none")

    def fixed_codebook(self, device=None) -> Tensor:
        """The K fixed values, sorted (float32)."""
        raise NotImplementedError

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        c = self.fixed_codebook(w.device)
        return self._set(c, F.nearest_in_codebook(w, c))


class BinaryQuantization(_FixedCodebook):
    """Weights in {−1, +1} (1 bit each, no codebook stored). C step: sign(w), with sign(0) = +1."""

    @classmethod
    def examples(cls) -> list["BinaryQuantization"]:
        return [cls()]

    def __init__(self) -> None:
        super().__init__()
        self._k = 2

    def fixed_codebook(self, device=None) -> Tensor:
        return torch.tensor([-1.0, 1.0], device=device)

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        return self._set(self.fixed_codebook(w.device), (w >= 0).to(torch.uint8))


class TernaryQuantization(_FixedCodebook):
    """Weights in {−1, 0, +1} (⌈log₂ 3⌉ = 2 bits each). C step: round to the nearest (ties at ±½ go to 0)."""

    @classmethod
    def examples(cls) -> list["TernaryQuantization"]:
        return [cls()]

    def __init__(self) -> None:
        super().__init__()
        self._k = 3

    def fixed_codebook(self, device=None) -> Tensor:
        return torch.tensor([-1.0, 0.0, 1.0], device=device)

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        codes = (F.ternary(w) + 1).to(torch.uint8)
        return self._set(self.fixed_codebook(w.device), codes)


class PowersOfTwoQuantization(_FixedCodebook):
    """Weights in {0, ±1, ±2⁻¹, …, ±2⁻ᶜ} (2c + 3 values, ⌈log₂(2c + 3)⌉ bits each). C step: nearest value.

    Args:
        c: the smallest nonzero magnitude is 2⁻ᶜ (c ≥ 0).
    """

    @classmethod
    def examples(cls) -> list["PowersOfTwoQuantization"]:
        return [cls(c=3)]

    def __init__(self, c: int) -> None:
        super().__init__()
        self.c = check_int("c", c, low=0, high=126)
        self._k = 2 * self.c + 3

    def _config(self) -> dict[str, Any]:
        return {"c": self.c}

    def fixed_codebook(self, device=None) -> Tensor:
        return F.powers_of_two_codebook(self.c, device=device)


class ScaledBinaryQuantization(_Codebook):
    """Weights in {−a, +a} with a learned scale a (1 bit each plus one float32).

    C step (exact): a = mean |w|, codes = sign(w) with sign(0) = +1.
    """

    @classmethod
    def examples(cls) -> list["ScaledBinaryQuantization"]:
        return [cls()]

    codec = CodebookCodec("scale")
    contains_zero = True

    def __init__(self) -> None:
        super().__init__()
        self._k = 2

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        a, pos = F.scaled_binary(w)
        return self._set(torch.stack([-a, a]), pos.to(torch.uint8))


class ScaledTernaryQuantization(_Codebook):
    """Weights in {−a, 0, +a} with a learned scale a (2 bits each plus one float32).

    C step (exact): the best support size is chosen over all sizes (see
    :func:`lcompress.functional.scaled_ternary`), a = mean |w| over the support.
    """

    @classmethod
    def examples(cls) -> list["ScaledTernaryQuantization"]:
        return [cls()]

    codec = CodebookCodec("scale")

    def __init__(self) -> None:
        super().__init__()
        self._k = 3

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        a, signs = F.scaled_ternary(w)
        return self._set(torch.stack([-a, a.new_zeros(()), a]), (signs + 1).to(torch.uint8))


class FixedAssignmentQuantization(_Codebook):
    """Weight sharing with fixed groups: weights with the same assignment share one learned value.

    C step (exact): every group's value is the mean of its weights (an empty group gets 0).

    Args:
        assignments: integer tensor of group labels in [0, K), with as many elements as the task has weights
            (for a joint task, in the order of the concatenated, flattened parameters).
        k: number of groups (default: max label + 1).
    """

    config_complete = False  # the assignments live in its state, not in its config

    @classmethod
    def examples(cls) -> list["FixedAssignmentQuantization"]:
        return [cls(torch.arange(300) % 5)]

    def __init__(self, assignments: Tensor, k: int | None = None) -> None:
        super().__init__()
        if not isinstance(assignments, Tensor):
            assignments = torch.as_tensor(assignments)
        if assignments.is_floating_point() or assignments.is_complex() or assignments.dtype == torch.bool:
            raise TypeError(f"assignments must be an integer tensor, got dtype={assignments.dtype}")
        if assignments.numel() == 0:
            raise ValueError("assignments must not be empty")
        lo, hi = int(assignments.min()), int(assignments.max())
        if lo < 0:
            raise ValueError(f"assignments must be >= 0, found {lo}")
        self._k = hi + 1 if k is None else check_int("k", k, low=1)
        if hi >= self._k:
            raise ValueError(f"assignments hold label {hi} but k={self._k}")
        self.assignments = assignments.reshape(-1).long()

    def _config(self) -> dict[str, Any]:
        return {"k": self._k, "n": self.assignments.numel()}

    def check_shape(self, shape, task=None):
        super().check_shape(shape, task)
        n = 1
        for s in shape:
            n *= s
        if n != self.assignments.numel():
            raise ValueError(
                self._where(task)
                + f"FixedAssignmentQuantization has {self.assignments.numel()} assignments but the weights have {n}"
            )

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        a = self.assignments.to(w.device)
        c, _ = F.group_means(w.reshape(-1), a, self._k)
        if not bool(torch.isfinite(c).all()):  # a group's sum overflowed: average w·2⁻ˢ (exact) and scale back
            shift = w.numel().bit_length() + 1
            c = F.group_means(w.reshape(-1) * 2.0 ** -shift, a, self._k)[0] * 2.0 ** shift
        return self._set(c, a.reshape(w.shape))

    def state_dict(self):
        s = super().state_dict()
        s["assignments"] = self.assignments
        return s

    def load_state_dict(self, state):
        super().load_state_dict(state)
        if "assignments" in state:
            self.assignments = state["assignments"].reshape(-1).long()
