"""μ schedules: the increasing penalty parameters of the LC algorithm."""
from __future__ import annotations

import math

__all__ = ["geometric", "auto_schedule"]


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


def auto_schedule(
    alg,
    steps: int,
    loss_increase: float,
    grad_norm: float,
    penalty_fraction: float = 0.1,
    final_distance: float = 0.005,
    min_ratio: float = 100.0,
) -> list[float]:
    """A geometric μ schedule fitted to the model and the step budget.

    Along the segment from the reference weights w to their direct compression Δ_DC the loss rises by
    ΔL = L(Δ_DC) − L(w) over a squared distance D₀ = ‖w − Δ_DC‖², i.e. with curvature about κ = 2ΔL/D₀. The L step
    min L(w) + μ/2‖w − Δ‖² barely moves w while μ ≪ κ and pins it to Δ once μ ≫ κ, so the schedule brackets κ:

    * μ₀ makes the first penalty a small fraction of what direct compression costs in loss:
      μ₀/2 · D₀ = ``penalty_fraction`` · ΔL, i.e. μ₀ = ``penalty_fraction`` · κ;
    * the last μ makes the weights nearly feasible: at the end of an L step the penalty's gradient balances the
      loss's, μ‖w − Δ‖ ≈ ‖∇L(Δ)‖, so asking for ‖w − Δ‖ = ``final_distance`` · √D₀ gives
      μ_T = ‖∇L(Δ_DC)‖ / (``final_distance`` · √D₀), and at least ``min_ratio`` · μ₀;
    * the growth factor spreads μ₀ … μ_T geometrically over ``steps`` L steps.

    Args:
        alg: an :class:`~lcompress.LC` object right after construction (Θ = direct compression).
        steps: number of LC steps.
        loss_increase: ΔL = L(Δ_DC) − L(w), e.g. the training cross-entropy of the directly compressed model
            minus that of the reference.
        grad_norm: ‖∇L‖ over the compressed parameters at Δ_DC (e.g. from a few thousand samples).
        penalty_fraction: μ₀ as a fraction of the curvature estimate κ.
        final_distance: the target ‖w − Δ‖ at the end, as a fraction of ‖w − Δ_DC‖.
        min_ratio: the least μ_T / μ₀.

    Returns:
        the list of ``steps`` increasing μ values.

    To choose by hand instead: start where μ₀/2‖w − Δ_DC‖² is ~10% of the loss that direct compression adds, and
    grow by a factor f with f^steps ≈ 10⁴–10⁵ (e.g. 1.4 per step over 30 steps). Too slow a growth ends
    infeasible (the compressed model is then no better than direct compression); too fast a one follows the LC
    path poorly.
    """
    from .algorithm import _check_mu

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps={steps!r} must be an integer >= 1")
    if not math.isfinite(loss_increase):
        raise ValueError(f"loss_increase={loss_increase!r} must be finite")
    if not (grad_norm >= 0 and math.isfinite(grad_norm)):
        raise ValueError(f"grad_norm={grad_norm!r} must be a finite number >= 0")
    if not penalty_fraction > 0:
        raise ValueError(f"penalty_fraction={penalty_fraction!r} must be > 0")
    if not 0 < final_distance < 1:
        raise ValueError(f"final_distance={final_distance!r} must be in (0, 1)")
    d0 = alg.feasibility()["total"] ** 2
    if d0 <= 0:  # the reference is already compressed: any schedule works
        return geometric(1e-3, 2.0, steps)
    # direct compression costing nothing (or even helping) leaves no curvature to measure: assume a small one
    kappa = 2.0 * max(loss_increase, 1e-3) / d0
    mu0 = _check_mu(penalty_fraction * kappa, "auto_schedule")
    mu_t = max(grad_norm / (final_distance * math.sqrt(d0)), mu0 * min_ratio)
    factor = (mu_t / mu0) ** (1.0 / max(steps - 1, 1))
    return geometric(mu0, factor, steps)
