"""μ schedules: the increasing penalty parameters of the LC algorithm."""
from __future__ import annotations

import math

from typing import Any, Callable, Iterable

__all__ = ["geometric", "auto_schedule", "measure_direct_compression"]


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


def measure_direct_compression(alg, loss_fn: Callable[[Any, Any], Any], batches: Iterable[Any]) -> tuple[float, float, float]:
    """What :func:`auto_schedule` needs, measured on a few batches: (L(w), L(Δ_DC), ‖∇L(Δ_DC)‖).

    L is the mean of ``loss_fn(model, batch)`` over ``batches`` (any loss: cross-entropy, a distillation loss such
    as 1 − cosine, MSE), the model in eval mode (restored afterwards); the gradient is over the compressed
    parameters only, with Δ(Θ) in the model. The model's weights and gradients are left as they were.

    Args:
        alg: an :class:`~lcompress.LC` object (Θ = direct compression right after construction).
        loss_fn: ``loss_fn(model, batch) -> 0-d tensor``; ``model`` is the model the LC object was built on.
        batches: a few batches (a list, or an iterable read once), e.g. 4-20 training minibatches.

    Raises:
        ValueError: no batches, or a loss that is not a finite 0-d tensor.
    """
    import torch

    model = alg.wrapped_model
    params = alg._params
    was = model.training
    model.eval()
    batches = list(batches)
    if not batches:
        raise ValueError("measure_direct_compression: batches is empty (pass a few training batches)")

    def value(b, i):
        out = loss_fn(model, b)
        if not isinstance(out, torch.Tensor) or out.numel() != 1 or not bool(torch.isfinite(out).all()):
            raise ValueError(f"measure_direct_compression: loss_fn(model, batches[{i}]) must return a finite 0-d tensor, got {out!r}")
        return out.reshape(())

    try:
        with torch.no_grad():
            loss = sum(float(value(b, i)) for i, b in enumerate(batches)) / len(batches)
        grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        loss_dc = 0.0
        with alg.compressed():
            for i, b in enumerate(batches):
                out = value(b, i)
                loss_dc += float(out.detach())  # float() of a tensor that requires grad warns
                for g, d in zip(grads, torch.autograd.grad(out, params, allow_unused=True)):
                    if d is not None:
                        g.add_(d.float())
        loss_dc /= len(batches)
        gnorm = math.sqrt(sum(float(g.norm()) ** 2 for g in grads)) / len(batches)
    finally:
        model.train(was)
    return loss, loss_dc, gnorm


def auto_schedule(
    alg,
    steps: int,
    loss_increase: float | None = None,
    grad_norm: float | None = None,
    penalty_fraction: float = 0.1,
    final_distance: float = 0.005,
    min_ratio: float = 100.0,
    *,
    hold: float = 0.0,
    loss_fn: Callable[[Any, Any], Any] | None = None,
    batches: Iterable[Any] | None = None,
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
    * the growth factor spreads μ₀ … μ_T geometrically over ``steps`` L steps, or over the last
      ``(1 − hold)·steps`` of them when ``hold`` > 0: the first ``hold·steps`` stay at μ₀.

    Args:
        alg: an :class:`~lcompress.LC` object right after construction (Θ = direct compression).
        steps: number of LC steps.
        loss_increase: ΔL = L(Δ_DC) − L(w), e.g. the training cross-entropy of the directly compressed model
            minus that of the reference. Not needed with ``loss_fn`` and ``batches``.
        grad_norm: ‖∇L‖ over the compressed parameters at Δ_DC (e.g. from a few thousand samples). Not needed
            with ``loss_fn`` and ``batches``.
        loss_fn, batches: measure ΔL and ‖∇L(Δ_DC)‖ here instead, with :func:`measure_direct_compression`
            (``loss_fn(model, batch)`` returns the L step's loss without the penalty).
        penalty_fraction: μ₀ as a fraction of the curvature estimate κ.
        final_distance: the target ‖w − Δ‖ at the end, as a fraction of ‖w − Δ_DC‖.
        min_ratio: the least μ_T / μ₀.
        hold: the fraction of the steps, in [0, 1), that stay at μ₀ before μ grows. A long phase where the penalty
            binds only weakly lets the weights find better assignments/supports than those near direct
            compression (LeNet300 at 1 bit: mean test error 10.65% with no hold, 10.3% with ``hold=0.5`` and
            ``penalty_fraction=1``; bench/RESULTS.md, "A held μ₀ and a safer lr cap").

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
    if (loss_fn is None) != (batches is None):
        raise ValueError("auto_schedule: pass loss_fn and batches together (or neither)")
    if loss_fn is not None:
        if loss_increase is not None or grad_norm is not None:
            raise ValueError("auto_schedule: pass either loss_fn and batches or loss_increase and grad_norm, not both")
        loss, loss_dc, grad_norm = measure_direct_compression(alg, loss_fn, batches)
        loss_increase = loss_dc - loss
    elif loss_increase is None or grad_norm is None:
        raise ValueError("auto_schedule: pass loss_fn and batches (measured here) or loss_increase and grad_norm")
    if not math.isfinite(loss_increase):
        raise ValueError(f"loss_increase={loss_increase!r} must be finite")
    if not (grad_norm >= 0 and math.isfinite(grad_norm)):
        raise ValueError(f"grad_norm={grad_norm!r} must be a finite number >= 0")
    if not penalty_fraction > 0:
        raise ValueError(f"penalty_fraction={penalty_fraction!r} must be > 0")
    if not 0 < final_distance < 1:
        raise ValueError(f"final_distance={final_distance!r} must be in (0, 1)")
    if isinstance(hold, bool) or not isinstance(hold, (int, float)) or not 0 <= hold < 1:
        raise ValueError(f"hold={hold!r} must be a number in [0, 1)")
    d0 = alg.feasibility()["total"] ** 2
    held = max(0, min(steps - 2, round(hold * steps)))  # the last step still reaches μ_T
    if d0 <= 0:  # the reference is already compressed: any schedule works
        return [1e-3] * held + geometric(1e-3, 2.0, steps - held)
    # direct compression costing nothing (or even helping) leaves no curvature to measure: assume a small one
    kappa = 2.0 * max(loss_increase, 1e-3) / d0
    mu0 = _check_mu(penalty_fraction * kappa, "auto_schedule")
    mu_t = max(grad_norm / (final_distance * math.sqrt(d0)), mu0 * min_ratio)
    grow = steps - held
    factor = (mu_t / mu0) ** (1.0 / max(grow - 1, 1))
    return [mu0] * held + geometric(mu0, factor, grow)
