"""Additive combinations: w ≈ Δ₁(Θ₁) + Δ₂(Θ₂) + …, e.g. a 1-bit codebook plus a sparse float correction."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .base import Compression, check_float, check_int

__all__ = ["AdditiveCombination"]


class AdditiveCombination(Compression):
    """Sum of compressions: min_{Θ₁…Θₚ} ‖w − Σᵢ Δᵢ(Θᵢ)‖².

    C step by alternating optimization (block coordinate descent): each part in turn takes its own exact C step
    on the residual w − Σ_{j≠i} Δⱼ, for up to ``rounds`` rounds or until the distortion improves by less than
    ``tol`` (relative). The first round starts from all parts at zero, so its first step is the first part's
    C step alone; every later step solves its block exactly, so the distortion never rises above what the first
    part achieves by itself when the other parts can represent zero (pruning, low-rank, adaptive codebooks). Each
    part warm-starts from its own previous Θ (e.g. its codebook).

    Written ``a + b (+ c …)``; nested sums are flattened.

    Args:
        *parts: two or more compressions.
        rounds: maximum rounds of alternation (≥ 1).
        tol: stop early when a round improves the distortion by less than this fraction.
    """

    def __init__(self, *parts: Compression, rounds: int = 10, tol: float = 1e-6) -> None:
        super().__init__()
        flat: list[Compression] = []
        for p in parts:
            if not isinstance(p, Compression):
                raise TypeError(f"parts of an AdditiveCombination must be Compressions, got {type(p).__name__}")
            flat.extend(p.parts if isinstance(p, AdditiveCombination) else [p])
        if len(flat) < 2:
            raise ValueError(f"an AdditiveCombination needs at least 2 parts, got {len(flat)}")
        self.parts = flat
        self.rounds = check_int("rounds", rounds, low=1)
        self.tol = check_float("tol", tol, low=0.0)
        schemes = {p.conv_scheme for p in flat if p.matrix}
        if len(schemes) > 1:
            raise ValueError(f"low-rank parts of one AdditiveCombination must share conv_scheme, got {sorted(schemes)}")
        self.matrix = any(p.matrix for p in flat)
        self.conv_scheme = schemes.pop() if schemes else "scheme_1"
        self.contains_zero = all(p.contains_zero for p in flat)
        self.penalty_form = any(p.penalty_form for p in flat)
        self.last_rounds = 0

    def __add__(self, other: Compression) -> "AdditiveCombination":
        return AdditiveCombination(self, other, rounds=self.rounds, tol=self.tol)

    def _config(self) -> dict[str, Any]:
        return {"parts": [p.config() for p in self.parts], "rounds": self.rounds, "tol": self.tol}

    def __repr__(self) -> str:
        return " + ".join(repr(p) for p in self.parts)

    def check_shape(self, shape, task=None):
        super().check_shape(shape, task)
        for p in self.parts:
            p.check_shape(shape, task)

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        deltas = [torch.zeros_like(w) for _ in self.parts]
        total = torch.zeros_like(w)
        prev = None
        for r in range(self.rounds):
            for i, part in enumerate(self.parts):
                resid = w - (total - deltas[i])
                new = part.compress(resid, mu, check=False)  # w was checked once by compress()
                total += new - deltas[i]
                deltas[i] = new
            d = float(torch.sum((w - total) ** 2))
            self.last_rounds = r + 1
            if prev is not None and prev - d <= self.tol * max(prev, 1e-30):
                break
            prev = d
        self._theta = {f"part{i}": p.theta for i, p in enumerate(self.parts)}
        return total

    def _decompress(self) -> Tensor:
        out = None
        for p in self.parts:
            d = p.decompress().reshape(self._shape)
            out = d if out is None else out + d
        return out

    def count_params(self) -> int:
        self._require()
        return sum(p.count_params() for p in self.parts)

    def count_bits(self) -> int:
        self._require()
        return sum(p.count_bits() for p in self.parts)

    def state_dict(self) -> dict[str, Any]:
        return {
            "config": self.config(),
            "parts": [p.state_dict() for p in self.parts],
            "shape": None if self._shape is None else list(self._shape),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != self.config():
            raise ValueError(f"state was saved for {state.get('config')}, cannot load it into {self.config()}")
        for p, s in zip(self.parts, state["parts"]):
            p.load_state_dict(s)
        shape = state.get("shape")
        self._shape = None if shape is None else tuple(shape)
        self._theta = (
            {f"part{i}": p._theta for i, p in enumerate(self.parts)} if all(p.is_compressed for p in self.parts) else None
        )

    def to(self, device) -> "AdditiveCombination":
        for p in self.parts:
            p.to(device)
        if self._theta is not None:
            self._theta = {f"part{i}": p._theta for i, p in enumerate(self.parts)}
        return self
