"""The LC algorithm: Θ and λ kept beside the user's model; the L step stays the user's own training loop."""
from __future__ import annotations

import logging
import math
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import Tensor, nn

from .compressions.base import Compression
from .sizes import compression_ratio, dense_bits
from .tasks import Task, resolve_tasks, unwrap_model

__all__ = ["LC", "clip_lr", "clip_lr_adaptive", "size_report"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "lcompress.LC"
STATE_VERSION = 1


def clip_lr(lr: float, mu: float, scale: float = 1.0) -> float:
    """min(lr, scale/μ): the learning-rate cap for SGD in the L step, so the penalty's curvature μ does not make
    the step unstable (``scale=1`` is the papers' 1/μ).

    SGD with momentum β on curvature h is stable for lr·h below about 2 (plain), 2(1 + β) (heavy ball) or
    2(1 + β)/(1 + 2β) (Nesterov; 1.36 at β = 0.9). The L step's curvature is μ plus the loss's own, so at lr = 1/μ
    Nesterov at β = 0.9 is stable only while the loss's top curvature stays below 0.36μ; ``scale=0.5`` leaves it
    1.7μ. Measured on LeNet300 at 1 bit over 15 epochs (the cap binding in the last epoch): with 1/μ the error
    rose 0.1–1.5 points in that epoch in every run, with 0.5/μ it did not, and at 30 epochs (where the cap barely
    binds) the two gave the same errors (bench/RESULTS.md, "A held μ₀ and a safer lr cap").

    Raises:
        ValueError: μ ≤ 0, or scale ≤ 0.
    """
    if mu <= 0:
        raise ValueError(f"mu={mu} must be > 0")
    if not scale > 0:
        raise ValueError(f"scale={scale} must be > 0")
    return min(lr, scale / mu)


_HALF = (torch.float16, torch.bfloat16)


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype LC keeps λ and −μt in, and computes the penalty in, for a parameter of ``dtype``: float32 for
    half-precision weights (μ·w overflows float16 near μ = 65504/|w|, and ‖g‖² much sooner), the weight's own
    dtype otherwise (no copies)."""
    return torch.float32 if dtype in _HALF else dtype


def _acc(ts: list[Tensor]) -> list[Tensor]:
    """``ts`` in their accumulation dtype: float32 copies of half-precision tensors, the others as they are."""
    return [t.float() if t.dtype in _HALF else t for t in ts]


def clip_lr_adaptive(lr: float, alg: "LC") -> float:
    """min(lr, RMS(w − Δ(Θ))): the learning-rate rule for adaptive optimizers (Adam, AdamW, RMSprop) in the L step.

    Adam moves every weight by about ``lr`` per iteration whatever the gradient's scale, so the penalty's μ does
    not set how close the L step gets to Δ(Θ): the weights end within about ``lr`` of their targets. Capping lr at
    the root-mean-square distance of the weights from Δ(Θ) (over every compressed weight, measured after each C
    step) lets the run settle on Δ(Θ) as μ grows. ``lr`` itself must be large enough to move the weights: about
    RMS(w − Δ_DC) divided by the iterations of one L step or more (on a small transformer distilled with
    1 − cosine, lr = 1e-2 reached 0.1% feasibility where a plain 1e-4 ended 32% away and barely beat direct
    compression).

    >>> for group in opt.param_groups:          # doctest: +SKIP
    ...     group["lr"] = lc.clip_lr_adaptive(1e-2, alg)
    """
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"lr={lr!r} must be a finite number > 0")
    n = sum(p.numel() for p in alg._params)
    return min(float(lr), alg.feasibility()["total"] / math.sqrt(max(n, 1)))


def _check_mu(mu: Any, where: str) -> float:
    if isinstance(mu, Tensor):
        mu = float(mu)
    if isinstance(mu, bool) or not isinstance(mu, (int, float)):
        raise TypeError(f"{where}: mu={mu!r} must be a real number")
    mu = float(mu)
    if not (mu > 0 and math.isfinite(mu)):
        raise ValueError(f"{where}: mu={mu} must be a finite number > 0")
    return mu


class _Penalty(torch.autograd.Function):
    """μ/2 Σ_p ‖w_p − t_p‖² in one autograd node, with fused multi-tensor (foreach) kernels.

    One node instead of a chain of per-parameter ops keeps the penalty's cost flat in the number of layers. The
    caller passes c = −μ t (formed once per μ), so one fused pass g = μ w + c gives the gradient μ(w − t); the
    value is ‖g‖²/(2μ), and backward hands g to autograd as it is (scaled only if the incoming gradient is not 1).
    That is three passes over the weights per step (form g, its norm, and autograd's accumulation into .grad)
    where the textbook version takes five.
    """

    @staticmethod
    def forward(ctx, mu: float, neg_mu_targets: list[Tensor], *params: Tensor) -> Tensor:
        # half-precision weights: g and its norm in float32 (neg_mu_targets is float32 for them)
        g = torch._foreach_add(neg_mu_targets, _acc(list(params)), alpha=mu)
        norms = torch._foreach_norm(g)
        ctx.mu = mu
        ctx.c = neg_mu_targets
        ctx.g = g
        ctx.save_for_backward(*params)  # so that autograd notices weights changed in place before backward
        return torch.stack(norms).square().sum() * (0.5 / mu)

    @staticmethod
    def backward(ctx, grad: Tensor):
        params = ctx.saved_tensors
        g, ctx.g = ctx.g, None
        if g is None:  # a second backward through a retained graph
            g = torch._foreach_add(ctx.c, _acc(list(params)), alpha=ctx.mu)
        # skip the multiply for the usual grad = 1 (a host read is free on CPU; on an accelerator just multiply)
        if grad.device.type != "cpu" or float(grad) != 1.0:
            g = torch._foreach_mul(g, grad)
        return (None, None, *(gi if gi.dtype == p.dtype else gi.to(p.dtype) for gi, p in zip(g, params)))


def _check_storable(tasks: list[Task], encode: bool = False) -> None:
    """Every task's compression (each part of a sum) declares a registered codec; with ``encode``, its Θ also
    encodes (a dry run of the file writer: dtypes the format stores, a codebook of the declared form).

    Raises:
        TypeError, ValueError: naming the task.
    """
    from .codecs import codec_for

    for t in tasks:
        try:
            for part in [t.compression, *getattr(t.compression, "parts", [])]:
                codec_for(part)
            if encode:
                t.compression.count_bits()
        except (TypeError, ValueError) as e:
            raise type(e)(f"task {t.name!r}: cannot be stored in a .lcz file: {e}") from None


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _bits_checksum(ts: list[Tensor]) -> Tensor:
    """Two int64 sums over the bit patterns of ``ts``: plain and position-weighted (wrapping on overflow).

    Exact: a one-bit difference anywhere changes them, whatever the dtype, and no float rounding hides it.
    """
    s1 = torch.zeros((), dtype=torch.int64, device=ts[0].device)
    s2 = torch.zeros((), dtype=torch.int64, device=ts[0].device)
    off = 0
    for t in ts:
        t = t.detach().contiguous().reshape(-1)
        ity = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
        v = t.view(ity).long()
        s1 += v.sum()
        s2 += (v * torch.arange(off + 1, off + 1 + v.numel(), device=v.device)).sum()
        off += v.numel()
    return torch.stack([s1, s2])


def _check_ranks_agree(tasks: list[Task], deltas: list[Tensor] | None, error: BaseException | None = None) -> None:
    """Under torch.distributed, verify that every rank computed the same Δ(Θ) — and that none failed.

    Each rank runs the C step itself on identical weights (DDP keeps them identical) with deterministic torch
    ops, so Θ agrees without communication; two small all-reduces (max and min of per-task checksums of the bit
    patterns, plus a success flag) verify it. A rank whose C step failed still joins the all-reduces, so the
    others raise too instead of waiting for it until the process-group timeout.
    """
    import torch.distributed as dist

    if not _distributed():
        return
    device = tasks[0].params[0].device
    rows, o = [], 0
    for t in tasks:
        k = len(t.params)
        if deltas is None:
            rows.append(torch.zeros(2, dtype=torch.int64, device=device))
        else:
            rows.append(_bits_checksum(deltas[o : o + k]).to(device))
        o += k
    ok = torch.tensor([0 if error is not None else 1], dtype=torch.int64, device=device)
    hi = torch.cat([torch.stack(rows).reshape(-1), ok])
    lo = hi.clone()
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    if error is not None:
        return  # the caller re-raises its own error
    if int(lo[-1]) == 0:
        raise RuntimeError("c_step failed on another rank (see that rank's error); this rank's LC state is unchanged")
    diff = (hi[:-1] != lo[:-1]).reshape(-1, 2).any(1)
    bad = torch.nonzero(diff).reshape(-1).tolist()
    if bad:
        names = ", ".join(repr(tasks[i].name) for i in bad)
        raise RuntimeError(
            f"c_step: ranks disagree on the compressed weights of task(s) {names}: the weights differ across "
            "ranks (is the model wrapped in DistributedDataParallel?) or the C step is not deterministic here "
            "(on CUDA, try torch.use_deterministic_algorithms(True))"
        )


def _check_finite_weights(tasks: list[Task]) -> None:
    """The weights handed to ``LC(...)`` must be finite: no L step has run yet, so a NaN/Inf there came with the
    model (a diverged training, a bad checkpoint), and the error says so and names the parameter."""
    with torch.no_grad():
        for t in tasks:
            for name, p in zip(t.param_names, t.params):
                bad = int((~torch.isfinite(p.detach())).sum())
                if bad:
                    raise ValueError(
                        f"LC(...): task {t.name!r}: the model's weights contain NaN or Inf before LC started "
                        f"(parameter {name!r}: {bad} of {p.numel()} values); check the model or the checkpoint it "
                        "was loaded from (did its training diverge?)"
                    )


def size_report(model: nn.Module, tasks: list[Task]) -> dict[str, Any]:
    """What a ``.lcz`` file of ``model`` with these compressed ``tasks`` stores, in bits: see
    :meth:`LC.size_report` (which is this over the LC object's model and tasks)."""
    compressed_ids = {id(p) for t in tasks for p in t.params}
    seen: set[int] = set()
    ref = other = 0
    for v in model.state_dict(keep_vars=True).values():
        if id(v) in seen:
            continue
        seen.add(id(v))
        b = dense_bits(v)
        ref += b
        if id(v) not in compressed_ids:
            other += b
    rows = []
    for t in tasks:
        bits = t.compression.count_bits()
        tref = sum(dense_bits(p) for p in t.params)
        rows.append(
            {
                "task": t.name,
                "compression": repr(t.compression),
                "params": list(t.param_names),
                "weights": t.numel,
                "stored_values": t.compression.count_params(),
                "bits": bits,
                "reference_bits": tref,
                "ratio": compression_ratio(tref, bits),
            }
        )
    task_ref, task_bits = sum(r["reference_bits"] for r in rows), sum(r["bits"] for r in rows)
    comp = other + task_bits
    scopes = {name: {"reference_bits": r, "compressed_bits": c, "ratio": compression_ratio(r, c)}
              for name, r, c in (("model", ref, comp), ("compressed", task_ref, task_bits),
                                 ("uncompressed", other, other))}
    return {
        "reference_bits": ref,
        "compressed_bits": comp,
        "ratio": scopes["model"]["ratio"],
        "other_bits": other,
        "tasks": rows,
        "scopes": scopes,
    }


class LC:
    """The Learning-Compression algorithm over a model and a task map.

    Solves min_w L(w) s.t. w = Δ(Θ) by alternating, over an increasing sequence of μ,

    * the **L step**: the user's own training on L(w) + :meth:`penalty` (μ/2‖w − Δ(Θ) − λ/μ‖²), and
    * the **C step** (:meth:`c_step`): Θ ← Π(w − λ/μ), the exact best compression, then λ ← λ − μ(w − Δ(Θ)).

    Construction runs direct compression (μ → 0⁺): Θ = Π(w), λ = 0. Model parameters are never replaced, so the
    user's optimizer keeps working on the same tensors.

    Args:
        model: the model to compress (a DistributedDataParallel or ``torch.compile`` wrapper is accepted; task
            keys use the unwrapped names).
        tasks: ``{key: Compression}``; a key is a parameter name, a tuple of names (one joint task), or
            ``"re:<pattern>"`` (each matching parameter its own task), see :mod:`lcompress.tasks`.
        multipliers: keep Lagrange multipliers λ (augmented Lagrangian); ``False`` gives the quadratic-penalty
            method (λ = 0 throughout).
        direct_mu: μ for the initial direct compression. The default, μ → 0⁺, is the exact direct compression
            for constraint forms; penalty forms (e.g. :class:`RankSelection`) compress everything away there, so
            to compare against a meaningful direct compression pass the μ of interest (e.g. the schedule's last).
        flush_denormal: set ``torch.set_flush_denormal(True)`` for this process (x86 CPUs; a no-op elsewhere).
            Late in a run the weights that the penalty pins to a zero or to a codebook entry converge
            geometrically, and tens of thousands of weights, multipliers, gradients and momentum entries become
            subnormal floats (below 1.2·10⁻³⁸), which many x86 CPUs compute 10-100× slower: measured, an LC
            pruning run took 170-216 s instead of 52 s, with the same result. Flushing them to zero changes no
            result at the precision that matters. It is a process-wide setting and stays on after the run (torch
            has no way to read it back); pass ``False`` to leave the setting alone.
        feasibility_tol: the relative distance ‖w − Δ(Θ)‖ / ‖w‖ above which :meth:`export` and :meth:`run` warn
            that the run ended infeasible (see :meth:`check_feasible`).

    Raises:
        TypeError, ValueError: bad keys or compressions, with the task named (see :func:`resolve_tasks`); a
            compression whose Θ cannot be stored in a ``.lcz`` file (no registered codec, or a Θ its codec refuses).
        ValueError: NaN or Inf in the model's compressed weights (the task and parameter named).

    Example::

        alg = lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(k=2)})
        for mu in lc.geometric(1e-3, 1.5, 30):
            for x, y in loader:
                loss = F.cross_entropy(model(x), y) + alg.penalty(mu)
                opt.zero_grad(); loss.backward(); opt.step()
            alg.c_step(mu)
    """

    def __init__(
        self,
        model: nn.Module,
        tasks: Mapping[Any, Compression],
        multipliers: bool = True,
        direct_mu: float | None = None,
        flush_denormal: bool = True,
        feasibility_tol: float = 1e-2,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if not isinstance(multipliers, bool):
            raise TypeError(f"multipliers={multipliers!r} must be True or False")
        if not isinstance(flush_denormal, bool):
            raise TypeError(f"flush_denormal={flush_denormal!r} must be True or False")
        if (isinstance(feasibility_tol, bool) or not isinstance(feasibility_tol, (int, float))
                or not (feasibility_tol > 0 and math.isfinite(feasibility_tol))):
            raise ValueError(f"feasibility_tol={feasibility_tol!r} must be a finite number > 0")
        self.feasibility_tol = float(feasibility_tol)
        self._warned_infeasible: int | None = None
        self.wrapped_model = model
        self.model = unwrap_model(model)
        self.tasks: list[Task] = resolve_tasks(self.model, tasks)
        _check_storable(self.tasks)
        self.multipliers = multipliers
        self._params: list[nn.Parameter] = [p for t in self.tasks for p in t.params]
        self._names: list[str] = [n for t in self.tasks for n in t.param_names]
        self._deltas: list[Tensor] = [torch.zeros_like(p, requires_grad=False) for p in self._params]
        self._lambdas: list[Tensor] | None = (
            [torch.zeros_like(p, dtype=_acc_dtype(p.dtype), requires_grad=False) for p in self._params]
            if multipliers
            else None
        )
        self._neg_targets: list[Tensor] | None = None
        self._neg_targets_mu: float | None = None
        self.mu: float | None = None  # μ of the last C step (None: only direct compression so far)
        self.step = 0  # number of C steps taken after direct compression
        if direct_mu is not None:
            direct_mu = _check_mu(direct_mu, "LC(direct_mu=...)")
        _check_finite_weights(self.tasks)  # before the C step's own check, whose hint is about a diverged L step
        self._c_step(direct_mu or 0.0, update_multipliers=False)
        _check_storable(self.tasks, encode=True)
        self.mu, self.step = None, 0
        if flush_denormal and torch.set_flush_denormal(True):
            logger.debug("subnormal floats are flushed to zero in this process (LC(flush_denormal=False) to keep them)")
        logger.info("direct compression done: %s", self._size_line())

    # ---- the two steps ------------------------------------------------------------------------------------
    def penalty(self, mu: float) -> Tensor:
        """μ/2 ‖w − Δ(Θ) − λ/μ‖² summed over every task: add it to the L step's loss.

        Differentiable in the model's parameters (one fused autograd node); a 0-d tensor on the weights' device.

        Raises:
            ValueError: μ ≤ 0 or not finite.
        """
        mu = self._neg_targets_for(mu, "penalty")
        return _Penalty.apply(mu, self._neg_targets, *self._params)

    def _neg_targets_for(self, mu: Any, where: str) -> float:
        """Check μ and make sure ``self._neg_targets`` holds −μ t = −μΔ − λ for it (formed once per μ)."""
        if mu != self._neg_targets_mu or isinstance(mu, bool):
            mu = _check_mu(mu, where)
            if mu != self._neg_targets_mu:
                neg = torch._foreach_mul(_acc(self._deltas), -mu)
                if self._lambdas is not None:
                    torch._foreach_sub_(neg, self._lambdas)
                self._neg_targets, self._neg_targets_mu = neg, mu
        return self._neg_targets_mu

    @torch.no_grad()
    def penalty_grad_(self, mu: float) -> None:
        """Add the penalty's gradient μ(w − Δ(Θ) − λ/μ) to every compressed parameter's ``.grad``, in place.

        The fast alternative to adding :meth:`penalty` to the loss, for L steps that do not need the penalty's
        value each batch: call it after ``loss.backward()`` and before ``opt.step()``, once per optimizer step.
        The gradient is the same (up to float rounding: here it is added in two fused passes over the weights,
        ``grad += μw`` then ``grad −= μt``); there is no autograd node and no value to compute, which is what
        makes it cheaper (see ``bench/bench_penalty.py``). A parameter whose ``.grad`` is None (it took no part
        in the loss) gets the penalty's gradient alone.

        >>> loss = F.cross_entropy(model(x), y)      # doctest: +SKIP
        >>> opt.zero_grad(); loss.backward()
        >>> alg.penalty_grad_(mu)                    # instead of loss + alg.penalty(mu)
        >>> opt.step()

        With ``torch.amp.GradScaler`` call ``scaler.unscale_(opt)`` first (the gradients must be unscaled); with
        gradient accumulation, call it once after the last micro-batch's backward; with gradient clipping, call it
        before clipping, as the loss form would. For the penalty's value (to log it now and then), evaluate
        :meth:`penalty` under ``torch.no_grad()``.

        Raises:
            ValueError: μ ≤ 0 or not finite.
            TypeError: a parameter's gradient is sparse.
        """
        mu = self._neg_targets_for(mu, "penalty_grad_")
        grads: list[Tensor] = []
        ws: list[Tensor] = []
        cs: list[Tensor] = []
        missing: list[tuple[nn.Parameter, Tensor]] = []
        for p, c, name in zip(self._params, self._neg_targets, self._names):
            g = p.grad
            if g is None:
                missing.append((p, c))
            elif g.is_sparse:
                raise TypeError(f"penalty_grad_: {name!r} has a sparse gradient; add alg.penalty(mu) to the loss instead")
            else:
                grads.append(g)
                ws.append(p)
                cs.append(c)
        for p, c in missing:
            p.grad = torch.add(c, p.detach().to(c.dtype), alpha=mu).to(p.dtype)
        half = [i for i, g in enumerate(grads) if g.dtype in _HALF]
        for i in half:  # μw − μt in float32, then rounded once into the half-precision gradient
            grads[i].add_(torch.add(cs[i], ws[i].float(), alpha=mu).to(grads[i].dtype))
        if half:
            keep = [i for i in range(len(grads)) if grads[i].dtype not in _HALF]
            grads, ws, cs = [grads[i] for i in keep], [ws[i] for i in keep], [cs[i] for i in keep]
        if grads:
            torch._foreach_add_(grads, ws, alpha=mu)  # grad += μw   (two in-place passes, nothing allocated)
            torch._foreach_add_(grads, cs)  # grad += −μt

    def c_step(self, mu: float) -> None:
        """The C step at μ: Θ ← Π(w − λ/μ) for every task, then λ ← λ − μ(w − Δ(Θ)).

        μ is expected to increase from call to call; a smaller μ than the last one is allowed but logged as a
        warning. On any error the LC state is left as it was (the model's weights are never touched here).

        Raises:
            ValueError: μ ≤ 0, or NaN/Inf in a task's weights (the task is named).
        """
        mu = _check_mu(mu, "c_step")
        if self.mu is not None and mu < self.mu:
            logger.warning("c_step: mu=%g is smaller than the previous mu=%g (mu should increase)", mu, self.mu)
        self._c_step(mu, update_multipliers=self.multipliers)

    @torch.no_grad()
    def _c_step(self, mu: float, update_multipliers: bool) -> None:
        ws = _acc([p.detach() for p in self._params])
        saved = [t.compression.state_dict() for t in self.tasks]
        new: list[Tensor] = []
        try:
            if self._lambdas is not None and mu > 0:
                shifted = torch._foreach_add(ws, self._lambdas, alpha=-1.0 / mu)
            else:
                shifted = ws
            inputs, o = [], 0
            for t in self.tasks:
                k = len(t.params)
                x = t.gather(shifted[o : o + k])
                if x.dtype != t.params[0].dtype:  # half-precision weights: Θ keeps the weights' dtype
                    x = x.to(t.params[0].dtype)
                o += k
                if not bool(torch.isfinite(x).all()):
                    raise ValueError(
                        f"c_step: task {t.name!r} has NaN or Inf in its weights"
                        + (" or multipliers" if self._lambdas is not None else "")
                        + " (did the L step diverge? try a smaller learning rate, e.g. lc.clip_lr(lr, mu))"
                    )
                inputs.append(x)
            for t, x in zip(self.tasks, inputs):
                try:
                    out = t.compression.compress(x, mu, check=False)  # inputs were checked above
                except ValueError as e:  # e.g. weights too large for float32: say which task
                    raise ValueError(f"c_step: task {t.name!r}: {e}") from e
                new.extend(d.to(p.dtype).contiguous() for d, p in zip(t.scatter(out), t.params))
        except Exception as e:
            for t, s in zip(self.tasks, saved):
                t.compression.load_state_dict(s)
            _check_ranks_agree(self.tasks, None, error=e)
            raise
        try:
            _check_ranks_agree(self.tasks, new)
        except Exception:
            for t, s in zip(self.tasks, saved):
                t.compression.load_state_dict(s)
            raise
        self._deltas = new
        if update_multipliers:
            # λ ← λ − μ (w − Δ)
            torch._foreach_add_(self._lambdas, torch._foreach_sub(ws, _acc(new)), alpha=-mu)
        self._neg_targets = self._neg_targets_mu = None
        if mu > 0:
            self.mu = mu
            self.step += 1

    # ---- looking at the result ----------------------------------------------------------------------------
    @contextmanager
    def compressed(self) -> Iterator[nn.Module]:
        """Temporarily put Δ(Θ) into the model's parameters (in place); the weights are restored on exit.

        >>> with alg.compressed():      # doctest: +SKIP
        ...     test_error = evaluate(model)
        """
        backup = [p.detach().clone() for p in self._params]
        try:
            with torch.no_grad():
                for p, d in zip(self._params, self._deltas):
                    p.copy_(d)
            yield self.wrapped_model
        finally:
            with torch.no_grad():
                for p, b in zip(self._params, backup):
                    p.copy_(b)

    def decompressed(self) -> dict[str, Tensor]:
        """Δ(Θ) per compressed parameter name (the tensors the model holds inside :meth:`compressed`)."""
        return dict(zip(self._names, self._deltas))

    @property
    def lambdas(self) -> dict[str, Tensor] | None:
        """λ per compressed parameter name (None for the quadratic-penalty method)."""
        return None if self._lambdas is None else dict(zip(self._names, self._lambdas))

    @torch.no_grad()
    def feasibility(self) -> dict[str, float]:
        """‖w − Δ(Θ)‖ per task and in total (key ``"total"``): how far the weights are from compressed."""
        ws = _acc([p.detach() for p in self._params])
        sq = torch.stack(torch._foreach_norm(torch._foreach_sub(ws, _acc(self._deltas))))
        sq = (sq.float() ** 2).tolist()
        res, o = {}, 0
        for t in self.tasks:
            k = len(t.params)
            res[t.name] = math.sqrt(sum(sq[o : o + k]))
            o += k
        res["total"] = math.sqrt(sum(sq))
        return res

    def check_feasible(self, warn: bool = True) -> float:
        """The relative distance ‖w − Δ(Θ)‖ / ‖w‖ over every compressed parameter; with ``warn``, a warning is logged
        when it exceeds ``feasibility_tol`` after at least one C step.

        A run should end with the weights w at their compressed value Δ(Θ): then the compressed model is the
        model the L steps trained. A run that ends far from it (μ never grew large enough) leaves a compressed model
        that may be no better than direct compression. :meth:`export` and :meth:`run` call this; the warning is
        logged once per C step.
        """
        w = math.sqrt(sum(float(n.float()) ** 2 for n in torch._foreach_norm(_acc([p.detach() for p in self._params]))))
        rel = self.feasibility()["total"] / max(w, 1e-30)
        if warn and self.step > 0 and rel > self.feasibility_tol and self._warned_infeasible != self.step:
            self._warned_infeasible = self.step  # once per C step, however often it is asked
            logger.warning(
                "the run ended infeasible: ||w - Delta(Theta)|| is %.2f%% of ||w|| after %d C steps (last mu=%.4g), "
                "above feasibility_tol=%.2g%%; the compressed model may be far from the trained one (raise the last "
                "mu: more steps or a larger growth factor)",
                100 * rel, self.step, self.mu, 100 * self.feasibility_tol,
            )
        return rel

    def size_report(self) -> dict[str, Any]:
        """What a compressed file stores, in bits (see :mod:`lcompress.sizes`).

        Every ratio here is :func:`lcompress.sizes.compression_ratio` (reference bits / compressed bits) over
        its scope, the same definition as ``export()``'s and the CLI's ``ratio``.

        Returns:
            dict with ``reference_bits`` (every parameter and persistent buffer at its dtype),
            ``compressed_bits`` (tasks at their compressed size plus everything else at its dtype),
            ``ratio`` = reference / compressed of the whole model (ρ in the papers), ``other_bits`` (the
            uncompressed rest), ``tasks``: a row per task with its compression, weights, stored values, bits and
            ratio, and ``scopes``: ``{"model", "compressed", "uncompressed"}``, each with ``reference_bits``,
            ``compressed_bits`` and ``ratio`` — the whole model, the compressed parameters alone (what the
            compressions achieved), and the rest (ratio 1). A model whose uncompressed part dominates (an embedding
            table left dense) has a ``model`` ratio far below its ``compressed`` one.
        """
        return size_report(self.model, self.tasks)

    def _size_line(self) -> str:
        r = self.size_report()
        return f"{r['compressed_bits'] / 8 / 1024:.1f} KiB, ratio {r['ratio']:.2f}"

    # ---- state --------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """Θ, λ, Δ(Θ) and every compression's warm-start state: enough to resume bit for bit."""
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "multipliers": self.multipliers,
            "mu": self.mu,
            "step": self.step,
            "tasks": [
                {"name": t.name, "params": list(t.param_names), "compression": t.compression.state_dict()}
                for t in self.tasks
            ],
            "deltas": {n: d.detach().clone() for n, d in zip(self._names, self._deltas)},
            "lambdas": None
            if self._lambdas is None
            else {n: l.detach().clone() for n, l in zip(self._names, self._lambdas)},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a :meth:`state_dict`. The task map must be the same one (names and compressions).

        Atomic: everything is checked (task map, every Δ and λ present with the parameter's shape and finite,
        μ and step) and every compression's state is loaded, before anything of this LC changes; on any error this
        LC is left as it was.

        Raises:
            ValueError: a different format, task map or multiplier setting, or a missing or misshapen entry
                (what differs is named).
        """
        if not isinstance(state, Mapping):
            raise TypeError(f"state must be a mapping from LC.state_dict(), got {type(state).__name__}")
        if state.get("format") != STATE_FORMAT:
            raise ValueError(f"not an LC state dict (format={state.get('format')!r})")
        version = state.get("version", 0)
        if not isinstance(version, int) or version > STATE_VERSION:
            raise ValueError(f"LC state version {version!r} is not supported (this lcompress reads up to {STATE_VERSION})")
        for key in ("multipliers", "mu", "step", "tasks", "deltas", "lambdas"):
            if key not in state:
                raise ValueError(f"LC state dict has no {key!r} entry")
        if bool(state["multipliers"]) != self.multipliers:
            raise ValueError(f"state has multipliers={state['multipliers']} but this LC has {self.multipliers}")
        saved = state["tasks"]
        if not isinstance(saved, (list, tuple)) or not all(isinstance(s, Mapping) and "name" in s for s in saved):
            raise ValueError("LC state dict: 'tasks' must be a list of {'name', 'params', 'compression'} records")
        if [s["name"] for s in saved] != [t.name for t in self.tasks]:
            raise ValueError(
                f"state holds tasks {[s['name'] for s in saved]} but this LC has {[t.name for t in self.tasks]}"
            )
        for t, s in zip(self.tasks, saved):
            comp = s.get("compression")
            if not isinstance(comp, Mapping) or comp.get("config") != t.compression.config():
                got = comp.get("config") if isinstance(comp, Mapping) else comp
                raise ValueError(f"task {t.name!r}: state holds {got}, this LC has {t.compression.config()}")
        mu, step = state["mu"], state["step"]
        if mu is not None and (isinstance(mu, bool) or not isinstance(mu, (int, float)) or not (mu > 0 and math.isfinite(mu))):
            raise ValueError(f"LC state dict: mu={mu!r} must be None or a finite number > 0")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"LC state dict: step={step!r} must be an integer >= 0")

        def tensors(key: str) -> list[Tensor]:
            table = state[key]
            if not isinstance(table, Mapping):
                raise ValueError(f"LC state dict: {key!r} must map parameter names to tensors")
            out = []
            for n, p in zip(self._names, self._params):
                v = table.get(n)
                if not isinstance(v, Tensor) or tuple(v.shape) != tuple(p.shape):
                    what = "no tensor" if not isinstance(v, Tensor) else f"shape {tuple(v.shape)}"
                    raise ValueError(f"LC state dict: {key}[{n!r}] has {what}; parameter {n!r} has shape {tuple(p.shape)}")
                if not (v.is_floating_point() and bool(torch.isfinite(v).all())):
                    raise ValueError(f"LC state dict: {key}[{n!r}] must be finite floating-point values")
                out.append(v)
            return out

        deltas = [d.to(p.device, p.dtype).clone() for d, p in zip(tensors("deltas"), self._params)]
        lambdas = None
        if self._lambdas is not None:
            lambdas = [l.to(p.device, _acc_dtype(p.dtype)).clone() for l, p in zip(tensors("lambdas"), self._params)]
        before = [t.compression.state_dict() for t in self.tasks]
        where = ""
        try:
            o = 0
            for t, s in zip(self.tasks, saved):
                where = f"task {t.name!r}: "
                k = len(t.params)
                t.compression.load_state_dict(s["compression"])
                t.compression.to(t.params[0].device)
                # Θ must decode to the saved Δ: this checks every piece of Θ against the task's shapes
                if not t.compression.is_compressed:
                    raise ValueError("the state holds no Θ")
                for d, got, n in zip(deltas[o : o + k], t.scatter(t.compression.decompress()), t.param_names):
                    got = got.to(d.dtype)
                    if got.shape != d.shape or not torch.allclose(
                        got, d, rtol=1e-3, atol=1e-5 * max(float(d.abs().max()), 1e-30)
                    ):
                        raise ValueError(f"Θ does not decode to the saved Δ of {n!r}")
                o += k
        except Exception as e:
            for t, b in zip(self.tasks, before):
                t.compression.load_state_dict(b)
            raise ValueError(
                f"LC state dict: {where}the compression state is not valid ({type(e).__name__}: {e})"
            ) from e
        self._deltas = deltas
        if lambdas is not None:
            self._lambdas = lambdas
        self.mu = None if mu is None else float(mu)
        self.step = int(step)
        self._neg_targets = self._neg_targets_mu = None

    def export(self, path, lossless: bool = True) -> dict[str, Any]:
        """Write the compressed model to a compact ``.lcz`` file (see :mod:`lcompress.export`).

        Args:
            path: the file.
            lossless: entropy-code codes and supports where that is shorter (the default, what
                :meth:`size_report` counts); ``False`` stores them bit-packed.

        Returns:
            a summary: file bytes and the size report it was checked against.
        """
        from .export import save

        self.check_feasible()
        return save(self, path, lossless=lossless)

    # ---- a convenience driver -----------------------------------------------------------------------------
    def run(
        self,
        l_step: Callable[[nn.Module, Callable[[], Tensor], int], Any],
        mu_schedule: Iterable[float],
        evaluate: Callable[[nn.Module], Any] | None = None,
        progress: bool = True,
    ) -> list[dict[str, Any]]:
        """Drive the whole algorithm in the authors' style.

        For each μ: ``l_step(model, penalty, step)`` (``penalty()`` returns :meth:`penalty` at this μ), then the
        C step; logs μ, ‖w − Δ(Θ)‖ and sizes, and calls ``evaluate(model)`` with Δ(Θ) in the model.

        Returns:
            one dict per step: ``step``, ``mu``, ``feasibility`` (‖w − Δ‖), ``compressed_bits``, ``ratio``,
            ``evaluation`` (what ``evaluate`` returned, or None).
        """
        from tqdm.auto import tqdm

        history = []
        schedule = list(mu_schedule)
        bar = tqdm(schedule, desc="LC", unit="step", disable=not progress)
        for i, mu in enumerate(bar):
            mu = _check_mu(mu, f"mu_schedule[{i}]")
            l_step(self.wrapped_model, lambda mu=mu: self.penalty(mu), i)
            self.c_step(mu)
            feas = self.feasibility()["total"]
            sizes = self.size_report()
            ev = None
            if evaluate is not None:
                with self.compressed():
                    ev = evaluate(self.wrapped_model)
            rec = {
                "step": i,
                "mu": mu,
                "feasibility": feas,
                "compressed_bits": sizes["compressed_bits"],
                "ratio": sizes["ratio"],
                "evaluation": ev,
            }
            history.append(rec)
            bar.set_postfix(mu=f"{mu:.3g}", feas=f"{feas:.3g}", ratio=f"{sizes['ratio']:.1f}")
            logger.info(
                "step %d: mu=%.4g ||w - Delta||=%.4g ratio=%.2f%s",
                i,
                mu,
                feas,
                sizes["ratio"],
                "" if ev is None else f" evaluation={ev}",
            )
            for row in sizes["tasks"]:
                logger.info("  task %s: %d bits (ratio %.2f)", row["task"], row["bits"], row["ratio"])
        self.check_feasible()
        return history

    def __repr__(self) -> str:
        lines = [f"LC({type(self.model).__name__}, multipliers={self.multipliers}, tasks=["]
        lines += [f"  {t.name}: {t.compression!r}," for t in self.tasks]
        lines.append("])")
        return "\n".join(lines)
