"""Additive combinations: w ≈ Δ₁(Θ₁) + Δ₂(Θ₂) + …, e.g. a 1-bit codebook plus a sparse float correction."""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..codecs import SumCodec
from .base import Compression, check_float, check_int, from_config

__all__ = ["AdditiveCombination"]


class AdditiveCombination(Compression):
    """Sum of compressions: min_{Θ₁…Θₚ} ‖w − Σᵢ Δᵢ(Θᵢ)‖².

    C step by alternating optimization (block coordinate descent): each part in turn takes its own exact C step
    on the residual w − Σ_{j≠i} Δⱼ, for up to ``rounds`` rounds or until the distortion improves by less than
    ``tol`` (relative). The first round starts from all parts at zero, so its first step is the first part's
    C step alone; every later step solves its block exactly, so the distortion never rises above what the first
    part achieves by itself when the other parts can represent zero (pruning, low-rank, adaptive codebooks). Each
    part warm-starts from its own previous Θ (e.g. its codebook). For constraint forms the best state of the
    rounds is kept (Lloyd's k-means is not an exact block step and can rise slightly).

    ``AdaptiveQuantization(k) + ConstraintL0Pruning(κ)`` (float values, either order) is solved as what it is,
    trimmed k-means: for a given codebook the pruning takes the κ largest quantization errors, so the codebook
    is fitted to the other weights (:func:`lcompress._trimmed_kmeans.trimmed_kmeans_1d`, from the last codebook
    and from global coarse starts), then rounds on the exact weights finish (see :meth:`_compress_trimmed`).
    Alternation is slow there: the pruned weights sit on the old centres in the quantization's residual and
    hold the codebook in place, and centres stay on outliers that the pruning takes over. Measured
    (``bench/bench_additive.py``, ``tests/test_additive_speed.py``): 3-10× faster than alternation, with a
    distortion 0-25% lower on Laplace weights and up to 55% lower with outliers, and at most a few 1e-5 above it
    where the two reach neighbouring local optima.

    Written ``a + b (+ c …)``; nested sums are flattened.

    Args:
        *parts: two or more compressions.
        rounds: maximum rounds of alternation (≥ 1).
        tol: stop early when a round improves the distortion by less than this fraction.
    """

    codec = SumCodec()

    @classmethod
    def examples(cls) -> list["AdditiveCombination"]:
        from .lowrank import LowRank
        from .pruning import ConstraintL0Pruning
        from .quantization import AdaptiveQuantization, BinaryQuantization

        return [AdaptiveQuantization(k=2) + ConstraintL0Pruning(kappa=10),
                BinaryQuantization() + ConstraintL0Pruning(kappa=10, value_codebook=2),
                LowRank(rank=2) + ConstraintL0Pruning(kappa=10)]

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "AdditiveCombination":
        cfg = dict(config)
        parts = cfg.pop("parts", None)
        if not isinstance(parts, list):
            raise ValueError(f"an AdditiveCombination config needs a list of 'parts', got {parts!r}")
        try:
            return cls(*[from_config(p) for p in parts], **cfg)
        except TypeError as e:
            raise ValueError(f"bad arguments for AdditiveCombination: {e}") from None

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
        # the weighted C step alternates the parts' own weighted C steps (post-training LC's diagonal metric)
        self.supports_importance = all(p.supports_importance for p in flat)
        self.penalty_form = any(p.penalty_form for p in flat)
        # alternation with a low-rank part reaches a local optimum: compressing Δ(Θ) again comes back only nearly
        idem = [p.idempotence for p in flat]
        self.idempotence = None if None in idem else "approximate" if self.matrix or "approximate" in idem else "exact"
        #: rounds of alternation in the last C step (for a quantization + ℓ0 pruning sum: rounds after the
        #: trimmed k-means)
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
        self.last_rounds = 0
        pair = self._trimmed_pair(w.numel())
        out = None
        if pair is not None:
            out = self._compress_trimmed(w, mu, *pair)  # Δ, summed as decompress() sums it
        else:
            deltas = [torch.zeros_like(w) for _ in self.parts]
            self._alternate(w, mu, deltas, torch.zeros_like(w), None, self.rounds)
        self._theta = {f"part{i}": p.theta for i, p in enumerate(self.parts)}
        # Δ summed as decompress() sums it, so that what LC uses is bit for bit what a file decodes to
        return out if out is not None else self._sum(tuple(w.shape))

    def _order(self) -> list[int]:
        """The order of the parts in a round: as written, except that beside a grid of integers
        (:class:`GroupedIntQuantization`) the sparse parts go first, so that they take the outliers before the grid
        sets its scales around them (grid first, an outlier fixes its group's scale and stays on the grid)."""
        from .grouped import GroupedIntQuantization
        from .pruning import _Sparse

        if not any(isinstance(p, GroupedIntQuantization) for p in self.parts):
            return list(range(len(self.parts)))
        sparse = [i for i, p in enumerate(self.parts) if isinstance(p, _Sparse)]
        return sparse + [i for i in range(len(self.parts)) if i not in sparse]

    def _compress_importance(self, w: Tensor, mu: float, importance: Tensor) -> Tensor:
        """The weighted C step, min Σᵢ dᵢ(wᵢ − Σ_p Δ_pᵢ)²: each part's weighted C step on the residual, in turn."""
        self.last_rounds = 0
        deltas = [torch.zeros_like(w) for _ in self.parts]
        self._alternate(w, mu, deltas, torch.zeros_like(w), None, self.rounds, importance)
        self._theta = {f"part{i}": p.theta for i, p in enumerate(self.parts)}
        return self._sum(tuple(w.shape))

    def _alternate(self, w: Tensor, mu: float, deltas: list[Tensor], total: Tensor, d: float | None,
                   rounds: int, importance: Tensor | None = None) -> Tensor:
        """Up to ``rounds`` rounds of block coordinate descent from ``deltas`` (whose sum is ``total`` and whose
        distortion is ``d``, None for the all-zero start). Returns the sum of the parts' Δ; for constraint forms
        the best state seen is kept (a C step that is not exact, such as Lloyd's k-means, can rise slightly)."""
        keep_best = not self.penalty_form
        best = None
        if keep_best and d is not None:
            best = (d, list(deltas), [p.state_dict() for p in self.parts])
        prev = d
        for r in range(rounds):
            for i in self._order():
                part = self.parts[i]
                resid = w - (total - deltas[i])
                new = part.compress(resid, mu, check=False, importance=importance)  # w was checked by compress()
                total += new - deltas[i]
                deltas[i] = new
            d = float(torch.sum((w - total) ** 2 if importance is None else importance * (w - total) ** 2))
            self.last_rounds += 1
            if keep_best and (best is None or d <= best[0]):
                best = (d, list(deltas), [p.state_dict() for p in self.parts])
            if prev is not None and prev - d <= self.tol * max(prev, 1e-30):
                break
            prev = d
        if keep_best and best[0] < d:
            for p, st in zip(self.parts, best[2]):
                p.load_state_dict(st)
            total = best[1][0].clone()
            for x in best[1][1:]:
                total += x
        return total

    # ---- quantization + ℓ0 pruning: trimmed k-means -----------------------------------------------------------
    def _trimmed_pair(self, n: int) -> tuple[int, int] | None:
        """(index of the quantization, index of the pruning) when this sum is one ``AdaptiveQuantization`` (not
        ``exact``, whose every block step is a global k-means) plus one ``ConstraintL0Pruning`` with float
        values (in either order) that keeps fewer than n weights; None otherwise."""
        from .pruning import ConstraintL0Pruning
        from .quantization import AdaptiveQuantization

        if len(self.parts) != 2:
            return None
        for qi, pi in ((0, 1), (1, 0)):
            q, p = self.parts[qi], self.parts[pi]
            if (type(q) is AdaptiveQuantization and not q.exact and type(p) is ConstraintL0Pruning
                    and p.value_codebook is None and p.kappa_for(n) < n):
                return qi, pi
        return None

    def _compress_trimmed(self, w: Tensor, mu: float, qi: int, pi: int) -> Tensor:
        """C step of quantization + ℓ0 pruning. Given the codebook, the pruning part's exact C step takes the κ
        largest quantization errors, so the problem is trimmed k-means: its Lloyd iterations
        (:func:`lcompress._trimmed_kmeans.trimmed_kmeans_1d`) fit the codebook to the kept weights only, from
        the last codebook and from a global coarse start. Alternating the parts' own C steps on residuals moves
        the codebook slowly instead (the pruned weights sit on the old centres in the quantization's residual)
        and keeps centres on outliers that the pruning takes over.

        Then rounds on the exact weights, each the pruning part's exact C step on its residual and a Lloyd step of
        the codebook on its own residual (nearest codes, each centre the mean of its weights), until a round
        improves ‖w − Δ‖² by at most ``tol`` (relative) or ``rounds`` rounds; the best state is kept. Returns
        the sum's Δ, as :meth:`_sum` computes it.

        Each pass is done once: the codes come from the histogram's bins
        (:meth:`lcompress._trimmed_kmeans.WeightedPoints.nearest`), and in the first Lloyd step they are those
        of the round before except at the κ pruned weights (the residual is w elsewhere and the codebook has
        not moved); the top-κ ranks only the errors above a bound that more than κ of them exceed
        (:func:`lcompress._trimmed_kmeans.top_errors`: from the histogram, then from the last round's κ-th
        largest error less the largest move of a centre). Both give exactly what the parts' own C steps give.
        """
        from .. import functional as F
        from .._trimmed_kmeans import WeightedPoints, fit, top_errors

        q, p = self.parts[qi], self.parts[pi]
        flat = w.reshape(-1)
        n, k = flat.numel(), q.k
        kappa = p.kappa_for(n)
        init = None  # cold: the trimmed k-means starts from the coarse optimum
        if q.is_compressed and q.theta["codebook"].numel() == k:
            init = q.theta["codebook"].to(w.device)  # warm start: the last C step's codebook
        points = WeightedPoints(flat)
        c, below = fit(points, k, kappa, init)
        codes = points.nearest(flat, c)
        codes_for = c  # the codebook whose nearest codes on w − Δ_p (on w but at the pruned weights) codes are
        # full-length buffers reused by every round: a fresh 4-byte-per-weight temporary costs about as much as
        # the pass that fills it (the allocator hands large blocks back to the system and they fault in again)
        codes32 = codes.reshape(-1).to(torch.int32)
        dq, e = torch.empty_like(flat), torch.empty_like(flat)
        best, prev, cand = None, None, None
        for r in range(self.rounds):
            if r > 0:
                # the quantization's Lloyd step on its residual rq = w − Δ_p, which is w but at the κ pruned
                # weights (means of nearest-assigned sorted clusters stay sorted, so the codes still index c)
                rq = e  # the last round's errors are spent
                rq.copy_(flat)
                rq[idx] = flat[idx] - kept
                if codes_for is c:
                    codes = codes.clone()
                else:
                    codes = points.nearest(flat, c).reshape(-1)
                    codes32.copy_(codes)
                near = F.nearest_in_codebook(rq[idx], c).to(codes.dtype)
                codes[idx] = near
                codes32[idx] = near.to(torch.int32)
                old = c
                c, _ = F.group_means(rq, codes, k, fallback=c)
                codes_for = old
                # an error moves by at most the largest move of a centre (where the code stays)
                move = float((c - old).abs().max()) + 1e-6 * (abs(kth) + float(c.abs().max()))
                below = kth - move
            torch.index_select(c, 0, codes32, out=dq)
            torch.sub(flat, dq, out=e).abs_()
            # the pruning part's exact C step on w − Δ_q. In the first Lloyd step every code but the pruned ones
            # stays, so only the last candidates can exceed their bound moved by the largest move of a centre
            idx = None
            if r == 1 and cand is not None:
                idx, cand = top_errors(e, kappa, bound + move, within=cand)
            if idx is None:
                idx, cand = top_errors(e, kappa, below)
                bound = below  # every error outside cand is at most this
            values = flat[idx] - dq[idx]
            kept = values.to(p.value_dtype).float()  # Δ_p there, as the pruning part stores it
            kth = float(e[idx].min()) if idx.numel() else 0.0
            # ‖w − Δ_q − Δ_p‖²: the errors, but the pruned weights' rounding errors at the pruned ones
            e[idx] = values - kept
            d = float(torch.sum(e.square_()))
            self.last_rounds = r + 1
            state = (d, c, codes, idx, values)
            if best is None or d < best[0]:
                best = state
            if prev is not None and prev - d <= self.tol * max(prev, 1e-30):
                break
            prev = d
        # the last state unless an earlier one was strictly better
        last = best[0] >= d
        _, c, codes, idx, values = state if last else best
        q._set(c, codes.reshape(w.shape), decode=False)
        q._shape = tuple(w.shape)
        if not last:
            torch.index_select(c, 0, codes.reshape(-1).to(torch.int32), out=dq)
        p._set(idx, values, n, w.shape, decode=False)
        p._shape = tuple(w.shape)
        # Δ_q + Δ_p as decompress() sums it (Δ_q + 0 elsewhere, which makes −0 +0), in the spent buffer of Δ_q
        at = dq[idx] + p.theta["values"].float()
        dq.add_(0.0)[idx] = at
        return dq.reshape(w.shape)

    def _decompress(self) -> Tensor:
        return self._sum(self._shape)

    def _sum(self, shape: tuple[int, ...]) -> Tensor:
        out = None
        for p in self.parts:
            d = p.decompress().reshape(shape)
            out = d if out is None else out + d
        return out

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
