"""μ schedules: the increasing penalty parameters of the LC algorithm."""
from __future__ import annotations

import math

__all__ = ["geometric"]


def geometric(mu0: float, factor: float, steps: int) -> list[float]:
    """μₖ = μ₀ · factorᵏ for k = 0 … steps − 1.

    Args:
        mu0: first μ, > 0.
        factor: growth per step, ≥ 1 (1 gives a constant schedule).
        steps: number of LC steps, ≥ 1.

    >>> geometric(1e-3, 2.0, 3)
    [0.001, 0.002, 0.004]
    """
    if isinstance(mu0, bool) or not isinstance(mu0, (int, float)) or not (mu0 > 0 and math.isfinite(mu0)):
        raise ValueError(f"mu0={mu0!r} must be a finite number > 0")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not (factor >= 1 and math.isfinite(factor)):
        raise ValueError(f"factor={factor!r} must be a finite number >= 1")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    return [float(mu0) * float(factor) ** k for k in range(steps)]
