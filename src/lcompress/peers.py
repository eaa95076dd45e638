"""Peers: the methods practitioners use instead of LC, run on the same footing so that they can be measured beside it.

Experiment side (like :mod:`lcompress.experiment`): it uses the library, the library never imports it.

A peer takes the same task map as :class:`lcompress.LC` (parameter names, joint tuples, ``"re:"`` patterns, one
compression per task) and trains the model so that it ends *exactly* as a point of that compression's set:

* ``"ste_codebook"`` — quantization-aware training with a learned K-entry codebook per task
  (:class:`~lcompress.AdaptiveQuantization` tasks). The codebook starts at the k-means of the reference weights
  (:func:`lcompress.functional.kmeans_1d`, LC's own direct compression); the forward pass uses the nearest-centroid
  weights q = c[a(w)], the backward pass is straight-through to the latent float weights (∂q/∂w := I), and the
  centroids are trained too, each with the mean of its members' gradients, (1/nₖ) Σ_{aᵢ=k} ∂L/∂qᵢ, rather than
  their sum (with the sum, a centroid holding half the weights takes steps n/2 times larger than a weight does, and
  SGD collapses the codebook).
* ``"scaled_sign_ste"`` — 1 bit with a scale, q = a·sign(w), a = mean |w| per task
  (:class:`~lcompress.ScaledBinaryQuantization` tasks), straight-through to w.
* ``"gmp"`` — gradual magnitude pruning (Zhu & Gupta 2017): the sparsity follows
  s_t = s_f (1 − (1 − t/T)³) over the first ``prune_end`` of the run's minibatches (T of them) and stays at
  s_f after; every ``prune_every`` minibatches (and at t = T) the mask keeps the largest magnitudes of the whole task
  (a joint task is thresholded globally, as :class:`~lcompress.ConstraintL0Pruning` over several layers is), and
  pruned weights are held at 0 (:class:`~lcompress.ConstraintL0Pruning` tasks).
* ``"oneshot_prune"`` — magnitude pruning of the reference to the final sparsity at once, then fine-tuning with the
  mask fixed (GMP with T = 0).
* ``"ste_codebook_gmp"`` — for a sum ``AdaptiveQuantization(k) + ConstraintL0Pruning(...)``: w = c[a(w_q)] + s,
  an STE codebook over latent weights w_q plus a float correction s that starts as the reference's residual
  w − c[a(w)] (so training starts at the reference) and is pruned by GMP to the sum's sparse budget.

:func:`train_peer` runs one with the L steps' conventions of :func:`lcompress.experiment.run_compress`: SGD with
(Nesterov) momentum, minibatches drawn by a generator seeded ``seed + 1``, the global RNG seeded ``seed + 2``, and
lr·decay^epoch per epoch (one epoch per LC step; no 1/μ cap, as there is no μ). It returns a :class:`PeerResult`
whose ``lc`` is an :class:`~lcompress.LC` object over the model holding the peer's Θ, so ``size_report()`` counts
the peer's model by lcompress's rules and ``export()`` writes it. The model's weights end as that Δ(Θ), bit for
bit; direct compression of them by the task's own compression (``LC(model, tasks)``) gives the same model up to
the float32 rounding of the codebook means (≤ a few ulps; ``PeerResult.dc_max_abs_diff``).
"""
from __future__ import annotations

import copy
import json
import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import torch
import torch.nn.functional as TF
from torch import Tensor, nn

from . import functional as F
from .algorithm import LC
from .compressions import (
    AdaptiveQuantization,
    AdditiveCombination,
    Compression,
    ConstraintL0Pruning,
    ScaledBinaryQuantization,
)
from .data import Dataset, batches
from .tasks import Task, resolve_tasks, unwrap_model
from .training import evaluate

__all__ = [
    "METHODS",
    "Peer",
    "PeerResult",
    "train_peer",
    "run_peer",
    "gmp_sparsity",
    "gmp_kept",
    "nearest_centroid_ste",
    "scaled_sign_ste",
]

logger = logging.getLogger(__name__)


# ---- the straight-through maps ----------------------------------------------------------------------------------
def _assign(w: Tensor, c: Tensor) -> Tensor:
    """Index (int64, into ``c`` as it is: it need not be sorted) of the nearest centroid of every weight."""
    cs, order = torch.sort(c.detach())
    return order[F.nearest_in_codebook(w.detach(), cs).long()]


class _NearestCentroid(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor, c: Tensor, normalize: bool) -> Tensor:
        codes = _assign(w, c)
        ctx.save_for_backward(codes)
        ctx.k, ctx.normalize = c.numel(), normalize
        return c.detach()[codes]

    @staticmethod
    def backward(ctx, g: Tensor):
        (codes,) = ctx.saved_tensors
        gc = None
        if ctx.needs_input_grad[1]:
            gf = g.reshape(-1)
            gc = torch.bincount(codes, weights=gf, minlength=ctx.k).to(g.dtype)
            if ctx.normalize:
                gc = gc / torch.bincount(codes, minlength=ctx.k).clamp_min(1).to(g.dtype)
        return g, gc, None


def nearest_centroid_ste(w: Tensor, codebook: Tensor, normalize: bool = True) -> Tensor:
    """q = c[a(w)], a(w)ᵢ = argminₖ |wᵢ − cₖ| (ties to the smaller centroid), with straight-through gradients.

    Backward: ∂L/∂w = ∂L/∂q (straight through), and for centroid k the mean of its members' gradients,
    (1/nₖ) Σ_{aᵢ=k} ∂L/∂qᵢ (0 for an empty centroid); ``normalize=False`` gives the sum instead (the true
    gradient of q with respect to c, which makes SGD collapse the codebook).

    Args:
        w: flat float tensor of latent weights.
        codebook: (K,) float tensor, in any order.
        normalize: divide each centroid's gradient by its count.
    """
    if codebook.dim() != 1 or codebook.numel() < 1:
        raise ValueError(f"codebook must be a non-empty 1-D tensor, got shape {tuple(codebook.shape)}")
    return _NearestCentroid.apply(w, codebook, normalize)


class _ScaledSign(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w: Tensor) -> Tensor:
        a, pos = F.scaled_binary(w.detach())
        return torch.where(pos, a, -a)

    @staticmethod
    def backward(ctx, g: Tensor):
        return g


def scaled_sign_ste(w: Tensor) -> Tensor:
    """q = a·sign(w) with a = mean |w| and sign(0) = +1 (the C step of ScaledBinaryQuantization); ∂L/∂w := ∂L/∂q."""
    return _ScaledSign.apply(w)


# ---- the GMP schedule -------------------------------------------------------------------------------------------
def gmp_sparsity(t: float, total: float, final_sparsity: float) -> float:
    """Zhu & Gupta's cubic schedule from a dense start: s_t = s_f (1 − (1 − t/T)³) for 0 ≤ t ≤ T, s_f after.

    ``total`` = T = 0 gives s_f at once (one-shot pruning).

    >>> gmp_sparsity(0, 100, 0.9), gmp_sparsity(50, 100, 0.9), gmp_sparsity(100, 100, 0.9)
    (0.0, 0.7875, 0.9)
    """
    if not 0.0 <= final_sparsity <= 1.0:
        raise ValueError(f"final_sparsity={final_sparsity} must be in the range [0, 1]")
    if t < 0 or total < 0:
        raise ValueError(f"t={t} and total={total} must be >= 0")
    if t >= total:
        return float(final_sparsity)
    return float(final_sparsity) * (1.0 - (1.0 - t / total) ** 3)


def gmp_kept(t: int, total: int, n: int, kappa: int) -> int:
    """Number of weights GMP keeps at minibatch t of a task of n weights that ends with κ: n − round(s_t·n) with
    s_f = 1 − κ/n, never below κ, and exactly κ from t = T on."""
    if not 0 <= kappa <= n:
        raise ValueError(f"kappa={kappa} must be in the range [0, {n}]")
    if t >= total:
        return kappa
    s = gmp_sparsity(t, total, 1.0 - kappa / n)
    return max(kappa, n - int(round(s * n)))


class _GMPMask:
    """The mask of one flat tensor under GMP: ``update(t)`` before minibatch t recomputes it when due."""

    def __init__(self, n: int, kappa: int, end_fraction: float, every: int) -> None:
        self.n, self.kappa, self.end_fraction, self.every = n, kappa, end_fraction, every
        self.end: int | None = None
        self.mask: Tensor | None = None  # None while everything is kept
        self.kept = n
        self.updates: list[tuple[int, int]] = []  # (t, kept) of every recomputation that pruned

    def start(self, total_steps: int) -> None:
        self.end = int(round(self.end_fraction * total_steps))

    def due(self, t: int) -> int | None:
        """The number to keep if the mask is recomputed before minibatch t, else None."""
        if self.end is None:
            raise RuntimeError("start(total_steps) must be called before update()")
        if t > self.end or (t % self.every and t != self.end):
            return None
        keep = gmp_kept(t, self.end, self.n, self.kappa)
        return None if keep >= self.kept else keep

    def recompute(self, t: int, flat: Tensor, keep: int) -> Tensor:
        """Keep the ``keep`` largest |flat| (a global threshold over the task); returns the flat bool mask."""
        idx = F.topk_magnitude(flat, keep)
        mask = torch.zeros(self.n, dtype=torch.bool, device=flat.device)
        mask[idx] = True
        self.mask, self.kept = mask, keep
        self.updates.append((t, keep))
        return mask


# ---- per-task handlers ------------------------------------------------------------------------------------------
class _TaskPeer:
    """What a peer does to one task. ``effective`` returns the forward weights (None: the parameters as they are);
    ``final`` the final flat weights and the task compression's state dict holding their Θ."""

    def __init__(self, task: Task, **options: Any) -> None:
        self.task = task

    def latent(self) -> Tensor:
        return self.task.gather([p.detach() for p in self.task.params])

    def parameters(self) -> list[Tensor]:
        return []

    def start(self, total_steps: int) -> None:
        pass

    def update(self, t: int) -> None:
        pass

    def after_step(self) -> None:
        pass

    def effective(self, flat: Tensor) -> Tensor | None:
        return None

    def final(self) -> tuple[Tensor, dict[str, Any]]:
        raise NotImplementedError

    def _state(self, comp: Compression, theta: dict[str, Any]) -> dict[str, Any]:
        return {"config": comp.config(), "theta": theta, "shape": [self.task.numel]}


def _codebook_theta(latent: Tensor, c: Tensor) -> tuple[Tensor, dict[str, Any]]:
    """Final weights and AdaptiveQuantization's Θ (codebook sorted ascending, codes into it) of latent weights."""
    cs, order = torch.sort(c.detach().float())
    codes = F.nearest_in_codebook(latent, cs).reshape(-1)
    if cs.numel() > 256:
        codes = codes.long()
    return cs[codes.long()], {"codebook": cs, "codes": codes}


def _sparse_theta(flat: Tensor, mask: Tensor | None, comp: ConstraintL0Pruning) -> tuple[Tensor, dict[str, Any]]:
    """Final weights and ConstraintL0Pruning's Θ of a masked flat tensor (values rounded to its value dtype)."""
    if mask is None:
        idx = torch.arange(flat.numel(), device=flat.device)
    else:
        idx = torch.nonzero(mask).reshape(-1)
    values = flat[idx].to(comp.value_dtype)
    out = torch.zeros(flat.numel(), dtype=torch.float32, device=flat.device)
    out[idx] = values.float()
    return out, {"indices": idx, "values": values, "n": int(flat.numel())}


def _require(task: Task, method: str, ok: bool, wanted: str) -> None:
    if not ok:
        raise TypeError(f"task {task.name!r}: method={method!r} needs {wanted}, got {task.compression!r}")


def _check_pruning(task: Task, method: str, comp: Compression) -> None:
    _require(task, method, type(comp) is ConstraintL0Pruning, "ConstraintL0Pruning")
    if comp.value_codebook is not None:
        raise ValueError(f"task {task.name!r}: method={method!r} does not support value_codebook={comp.value_codebook}")


class _CodebookSTE(_TaskPeer):
    def __init__(self, task: Task, normalize_centroid_grad: bool = True, **options: Any) -> None:
        super().__init__(task)
        _require(task, "ste_codebook", type(task.compression) is AdaptiveQuantization, "AdaptiveQuantization")
        c, _ = F.kmeans_1d(self.latent(), task.compression.k)
        self.codebook = nn.Parameter(c.clone())
        self.normalize = normalize_centroid_grad

    def parameters(self) -> list[Tensor]:
        return [self.codebook]

    def effective(self, flat: Tensor) -> Tensor:
        return nearest_centroid_ste(flat, self.codebook, self.normalize)

    def final(self):
        out, theta = _codebook_theta(self.latent(), self.codebook)
        return out, self._state(self.task.compression, theta)


class _ScaledSignSTE(_TaskPeer):
    def __init__(self, task: Task, **options: Any) -> None:
        super().__init__(task)
        _require(task, "scaled_sign_ste", type(task.compression) is ScaledBinaryQuantization,
                 "ScaledBinaryQuantization")

    def effective(self, flat: Tensor) -> Tensor:
        return scaled_sign_ste(flat)

    def final(self):
        a, pos = F.scaled_binary(self.latent())
        cb = torch.stack([-a, a]).float()
        codes = pos.reshape(-1).to(torch.uint8)
        return cb[codes.long()], self._state(self.task.compression, {"codebook": cb, "codes": codes})


class _GMP(_TaskPeer):
    """GMP on the task's own weights (held at 0 once pruned: the parameters are masked after every step)."""

    def __init__(self, task: Task, prune_end: float = 0.75, prune_every: int = 100, method: str = "gmp",
                 **options: Any) -> None:
        super().__init__(task)
        _check_pruning(task, method, task.compression)
        self.gmp = _GMPMask(task.numel, task.compression.kappa_for(task.numel), prune_end, prune_every)
        self.masks: list[Tensor] | None = None

    def start(self, total_steps: int) -> None:
        self.gmp.start(total_steps)

    @torch.no_grad()
    def update(self, t: int) -> None:
        keep = self.gmp.due(t)
        if keep is not None:
            self.masks = self.task.scatter(self.gmp.recompute(t, self.latent(), keep))
            self.after_step()

    @torch.no_grad()
    def after_step(self) -> None:
        if self.masks is not None:
            torch._foreach_mul_([p.data for p in self.task.params], self.masks)

    def final(self):
        out, theta = _sparse_theta(self.latent(), self.gmp.mask, self.task.compression)
        return out, self._state(self.task.compression, theta)


class _CodebookPlusSparse(_TaskPeer):
    """w = c[a(w_q)] + s: STE codebook over the latent weights plus a GMP-pruned float correction s."""

    def __init__(self, task: Task, normalize_centroid_grad: bool = True, prune_end: float = 0.75,
                 prune_every: int = 100, **options: Any) -> None:
        super().__init__(task)
        comp = task.compression
        method = "ste_codebook_gmp"
        _require(task, method, isinstance(comp, AdditiveCombination) and len(comp.parts) == 2
                 and sorted(type(p).__name__ for p in comp.parts) == ["AdaptiveQuantization", "ConstraintL0Pruning"],
                 "AdaptiveQuantization(k) + ConstraintL0Pruning(...)")
        self.iq = 0 if isinstance(comp.parts[0], AdaptiveQuantization) else 1
        self.quant, self.sparse = comp.parts[self.iq], comp.parts[1 - self.iq]
        _check_pruning(task, method, self.sparse)
        w = self.latent()
        c, codes = F.kmeans_1d(w, self.quant.k)
        self.codebook = nn.Parameter(c.clone())
        # the correction starts as the residual, so training starts at the reference itself
        self.correction = nn.Parameter(w - c[codes.long()])
        self.normalize = normalize_centroid_grad
        self.gmp = _GMPMask(task.numel, self.sparse.kappa_for(task.numel), prune_end, prune_every)

    def parameters(self) -> list[Tensor]:
        return [self.codebook, self.correction]

    def start(self, total_steps: int) -> None:
        self.gmp.start(total_steps)

    @torch.no_grad()
    def update(self, t: int) -> None:
        keep = self.gmp.due(t)
        if keep is not None:
            self.gmp.recompute(t, self.correction.detach(), keep)
            self.after_step()

    @torch.no_grad()
    def after_step(self) -> None:
        if self.gmp.mask is not None:
            self.correction.mul_(self.gmp.mask)

    def effective(self, flat: Tensor) -> Tensor:
        return nearest_centroid_ste(flat, self.codebook, self.normalize) + self.correction

    def final(self):
        q, qtheta = _codebook_theta(self.latent(), self.codebook)
        s, stheta = _sparse_theta(self.correction.detach(), self.gmp.mask, self.sparse)
        parts = [None, None]
        parts[self.iq] = (q, self._state(self.quant, qtheta))
        parts[1 - self.iq] = (s, self._state(self.sparse, stheta))
        # summed in the parts' order, as AdditiveCombination's Δ(Θ) is
        out = parts[0][0] + parts[1][0]
        comp = self.task.compression
        return out, {"config": comp.config(), "parts": [p[1] for p in parts], "shape": [self.task.numel]}


#: method -> (per-task handler, what it is)
METHODS: dict[str, tuple[type, str]] = {
    "ste_codebook": (_CodebookSTE, "STE-QAT with a learned K-entry codebook (k-means start, count-normalised "
                                   "centroid gradients)"),
    "scaled_sign_ste": (_ScaledSignSTE, "scaled-sign STE: a·sign(w), a = mean |w|"),
    "gmp": (_GMP, "gradual magnitude pruning (Zhu & Gupta cubic schedule, global threshold per task)"),
    "oneshot_prune": (_GMP, "one-shot magnitude pruning, then fine-tuning with the mask fixed"),
    "ste_codebook_gmp": (_CodebookPlusSparse, "STE codebook plus a GMP-pruned sparse float correction"),
}


# ---- a peer over a whole task map -------------------------------------------------------------------------------
class Peer:
    """A peer method over a task map (the one LC takes): forward weights, extra trainable tensors, mask updates, and
    the final model as an LC object holding its Θ.

    Args:
        model: the model, holding the reference weights (they become the latent weights; never replaced).
        tasks: ``{key: Compression}`` as for :class:`lcompress.LC`; each task's compression must suit ``method``.
        method: one of :data:`METHODS`.
        prune_end: GMP: fraction of the run's minibatches over which the sparsity rises to its final value (T);
            in [0, 1] (ignored by ``oneshot_prune``, which is T = 0).
        prune_every: GMP: recompute the masks every this many minibatches (≥ 1), and at T.
        normalize_centroid_grad: STE codebooks: each centroid's gradient divided by its count.

    Raises:
        ValueError: an unknown method or a bad option (named with its value); bad task keys as in LC.
        TypeError: a task whose compression the method cannot produce (the task is named).
    """

    def __init__(self, model: nn.Module, tasks: Mapping[Any, Compression], method: str, *,
                 prune_end: float = 0.75, prune_every: int = 100, normalize_centroid_grad: bool = True) -> None:
        if method not in METHODS:
            raise ValueError(f"method={method!r} is not a peer method (known: {', '.join(METHODS)})")
        if isinstance(prune_end, bool) or not isinstance(prune_end, (int, float)) or not 0.0 <= prune_end <= 1.0:
            raise ValueError(f"prune_end={prune_end!r} must be a number in the range [0, 1]")
        if isinstance(prune_every, bool) or not isinstance(prune_every, int) or prune_every < 1:
            raise ValueError(f"prune_every={prune_every!r} must be an integer >= 1")
        if not isinstance(normalize_centroid_grad, bool):
            raise TypeError(f"normalize_centroid_grad={normalize_centroid_grad!r} must be True or False")
        self.method = method
        self.model = unwrap_model(model)
        self.task_map = dict(tasks)
        self.tasks = resolve_tasks(self.model, copy.deepcopy(self.task_map))
        handler = METHODS[method][0]
        end = 0.0 if method == "oneshot_prune" else float(prune_end)
        self.handlers: list[_TaskPeer] = [
            handler(t, prune_end=end, prune_every=prune_every, normalize_centroid_grad=normalize_centroid_grad,
                    method=method)
            for t in self.tasks
        ]
        self._finished = False

    def parameters(self) -> list[Tensor]:
        """The trainable tensors a peer adds (codebooks, corrections), to give the optimizer with the model's."""
        return [p for h in self.handlers for p in h.parameters()]

    def start(self, total_steps: int) -> None:
        """Tell the peer how many minibatches the run has (GMP's T is a fraction of them)."""
        for h in self.handlers:
            h.start(total_steps)

    def update(self, t: int) -> None:
        """Before minibatch t (and once with t = the number of minibatches, at the end): recompute due masks."""
        for h in self.handlers:
            h.update(t)

    def after_step(self) -> None:
        """After every optimizer step: hold pruned weights at 0."""
        for h in self.handlers:
            h.after_step()

    def weights(self) -> dict[str, Tensor]:
        """The forward weights by parameter name (differentiable in the latent weights and the peer's tensors);
        parameters not named are used as they are."""
        out: dict[str, Tensor] = {}
        for t, h in zip(self.tasks, self.handlers):
            eff = h.effective(t.gather(list(t.params)))
            if eff is not None:
                out.update(zip(t.param_names, t.scatter(eff)))
        return out

    @contextmanager
    def applied(self) -> Iterator[nn.Module]:
        """Temporarily put the forward weights into the model (to evaluate it); the latent weights come back."""
        with torch.no_grad():
            eff = {k: v.detach().clone() for k, v in self.weights().items()}
        params = dict(self.model.named_parameters())
        backup = {k: params[k].detach().clone() for k in eff}
        try:
            with torch.no_grad():
                for k, v in eff.items():
                    params[k].copy_(v)
            yield self.model
        finally:
            with torch.no_grad():
                for k, v in backup.items():
                    params[k].copy_(v)

    @torch.no_grad()
    def finish(self) -> tuple[LC, float]:
        """Write the final compressed weights Δ(Θ) into the model (in place) and return an LC object holding Θ,
        with the largest |difference| between those weights and their direct compression by the task map."""
        if self._finished:
            raise RuntimeError("finish() was already called")
        finals = [h.final() for h in self.handlers]
        for t, (flat, _) in zip(self.tasks, finals):
            for p, d in zip(t.params, t.scatter(flat)):
                p.copy_(d.to(p.dtype))
        alg = LC(self.model, copy.deepcopy(self.task_map))  # direct compression of the final weights
        diff = 0.0
        for n, d in alg.decompressed().items():
            diff = max(diff, float((d - self.model.get_parameter(n).detach()).abs().max()))
        state = alg.state_dict()
        for ts, t, (_, cstate) in zip(state["tasks"], self.tasks, finals):
            if ts["name"] != t.name:  # resolve_tasks is deterministic; this guards against a change there
                raise RuntimeError(f"task order differs: {ts['name']!r} != {t.name!r}")
            ts["compression"] = cstate
        state["deltas"] = {n: self.model.get_parameter(n).detach().clone() for n in state["deltas"]}
        alg.load_state_dict(state)
        self._finished = True
        return alg, diff


@dataclass
class PeerResult:
    """What :func:`train_peer` returns.

    Attributes:
        method, lr, seed, epochs: the run.
        test_error: test error (%) of the final compressed model.
        lc: an LC object over the model holding the peer's Θ (``size_report()``, ``export()``).
        sizes: ``lc.size_report()``.
        dc_max_abs_diff: max |w − Δ_DC(w)| of the final weights w under direct compression by the task map
            (0 up to float rounding when the model is exactly representable and the C step finds it).
        history: one dict per epoch (epoch, lr, loss, test_error when evaluated, seconds).
        mask_updates: per task, the (minibatch, weights kept) of every GMP mask recomputation.
    """

    method: str
    lr: float
    seed: int
    epochs: int
    test_error: float
    lc: LC
    sizes: dict[str, Any]
    dc_max_abs_diff: float
    history: list[dict[str, Any]] = field(default_factory=list)
    mask_updates: dict[str, list[tuple[int, int]]] = field(default_factory=dict)
    seconds: float = 0.0


def train_peer(
    model: nn.Module,
    tasks: Mapping[Any, Compression],
    method: str,
    data: Dataset,
    *,
    epochs: int = 30,
    lr: float = 0.1,
    lr_decay: float = 0.98,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    batch_size: int = 256,
    seed: int = 0,
    evaluate_every: int = 1,
    prune_end: float = 0.75,
    prune_every: int = 100,
    normalize_centroid_grad: bool = True,
    should_stop: Any = None,
) -> PeerResult:
    """Train ``model`` (holding the reference weights) by a peer method and end at its compressed model.

    The L steps' conventions of :func:`lcompress.experiment.run_compress`: cross-entropy, SGD over the model's
    parameters (and the peer's codebooks/corrections) with (Nesterov) momentum, minibatches of ``batch_size`` drawn
    without replacement by a generator seeded ``seed + 1``, the global RNG (dropout) seeded ``seed + 2``, and
    lr · lr_decay^epoch in epoch 0, 1, …. The model stays on its device; data is moved there.

    ``should_stop`` (a callable, polled between minibatches) returning True stops the run with
    :class:`lcompress.experiment.RunInterrupted`.

    Returns:
        a :class:`PeerResult`; the model then holds the final compressed weights.

    Raises:
        ValueError: a bad argument (named with its value), or a method/task mismatch (see :class:`Peer`).
        FloatingPointError: the loss diverged (lower ``lr``).
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise ValueError(f"epochs={epochs!r} must be an integer >= 0")
    for name, v in (("lr", lr), ("lr_decay", lr_decay)):
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"{name}={v!r} must be a finite number > 0")
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise ValueError(f"batch_size={batch_size!r} must be an integer >= 1")
    if not (isinstance(evaluate_every, int) and evaluate_every >= 0):
        raise ValueError(f"evaluate_every={evaluate_every!r} must be an integer >= 0 (0: only at the end)")
    t0 = time.perf_counter()
    peer = Peer(model, tasks, method, prune_end=prune_end, prune_every=prune_every,
                normalize_centroid_grad=normalize_centroid_grad)
    net = peer.model
    device = next(net.parameters()).device
    x, y = data.x_train.to(device), data.y_train.to(device)
    x_test, y_test = data.x_test.to(device), data.y_test.to(device)
    opt = torch.optim.SGD(list(net.parameters()) + peer.parameters(), lr=lr, momentum=momentum,
                          nesterov=nesterov and momentum > 0, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed + 1)  # the L steps' minibatch order
    torch.manual_seed(seed + 2)  # the L steps' global RNG (rank 0)
    n_batches = math.ceil(len(x) / batch_size)
    peer.start(epochs * n_batches)
    history: list[dict[str, Any]] = []
    t = 0
    for epoch in range(epochs):
        ts = time.perf_counter()
        epoch_lr = lr * lr_decay**epoch
        for g in opt.param_groups:
            g["lr"] = epoch_lr
        net.train()
        loss_sum = torch.zeros((), device=device)
        seen = 0
        for xb, yb in batches(x, y, batch_size, shuffle=True, generator=gen):
            if should_stop is not None and should_stop():
                from .experiment import RunInterrupted

                raise RunInterrupted(f"{method}: stopped in epoch {epoch + 1} of {epochs}; nothing was written")
            peer.update(t)
            w = peer.weights()
            out = torch.func.functional_call(net, w, (xb,)) if w else net(xb)
            loss = TF.cross_entropy(out, yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            peer.after_step()
            loss_sum += loss.detach()
            seen += 1
            t += 1
        mean_loss = float(loss_sum) / max(seen, 1)
        if not math.isfinite(mean_loss):
            raise FloatingPointError(
                f"{method}: training diverged in epoch {epoch + 1} (loss {mean_loss}); lower lr={lr}"
            )
        rec: dict[str, Any] = {"epoch": epoch + 1, "lr": epoch_lr, "loss": mean_loss}
        if evaluate_every and ((epoch + 1) % evaluate_every == 0) and epoch + 1 < epochs:
            with peer.applied() as m:
                rec["test_error"] = evaluate(m, x_test, y_test)
        rec["seconds"] = time.perf_counter() - ts
        history.append(rec)
        logger.info("%s epoch %d/%d lr %.4g loss %.4f test error %s (%.1fs)", method, epoch + 1, epochs, epoch_lr,
                    mean_loss, f"{rec['test_error']:.2f}%" if "test_error" in rec else "-", rec["seconds"])
    peer.update(t)  # GMP ends at exactly its final sparsity, also when T is the last minibatch
    alg, diff = peer.finish()
    err = evaluate(net, x_test, y_test)
    if history:
        history[-1]["test_error"] = err
    updates = {}
    for tk, h in zip(peer.tasks, peer.handlers):
        gmp = getattr(h, "gmp", None)
        if gmp is not None:
            updates[tk.name] = list(gmp.updates)
    return PeerResult(method=method, lr=float(lr), seed=int(seed), epochs=epochs, test_error=err, lc=alg,
                      sizes=alg.size_report(), dc_max_abs_diff=diff, history=history, mask_updates=updates,
                      seconds=time.perf_counter() - t0)


def run_peer(
    cfg: Any,
    out_dir: Any,
    *,
    data: Dataset | None = None,
    data_dir: str | None = None,
    overwrite: bool = False,
    progress: bool = True,
    should_stop: Any = None,
) -> dict[str, Any]:
    """Run the peer a run config names (its ``[peer]`` table) on that config's reference, data, optimizer, seed
    and epoch budget (``schedule.steps · schedule.epochs_per_step`` epochs, ``optimizer.lr_decay`` per LC step), and
    write ``out_dir/results.json`` and ``out_dir/model.lcz`` (the peer's compressed model in lcompress's format).

    Args:
        cfg: a :class:`lcompress.config.RunConfig` whose ``peer.method`` is set.
        out_dir: the run directory (created; one that already holds results is refused unless ``overwrite``).
        data: already loaded data (otherwise loaded from the config); ``data_dir`` overrides ``data.dir``.
        progress: a progress bar while the reference is trained, when it has to be (the peer itself logs one line
            per epoch).
        should_stop: polled between minibatches (of the reference's training too); True stops the run (nothing is
            written).

    Returns:
        the results dict: method, lr, reference, final (test_error, ratio, compressed_bits, file_bytes), history.

    Raises:
        ConfigError: no ``peer.method``, a task the method cannot train, a results file already there, or the
            reference / data errors of :func:`lcompress.experiment.prepare_reference`.
    """
    from pathlib import Path

    from ._io import atomic_write_text
    from ._rundir import DirectoryLock
    from .config import ConfigError
    from .experiment import _export, _sizes, load_data, prepare_reference, reference_path

    p = cfg.peer
    if not p.method:
        raise ConfigError("peer.method: missing; name the peer to run (known: " + ", ".join(METHODS) + ")")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "peer run directory", hint="or give another --out"):
        if (out / "results.json").exists() and not overwrite:
            raise ConfigError(f"run directory {str(out)!r} already holds results; pass --overwrite or another --out")
        if data is None:
            data = load_data(cfg, data_dir)
        # a reference the config names no path for is trained into this run directory
        model, _ = prepare_reference(cfg, data, progress=progress, run_dir=out, should_stop=should_stop)
        ref_err = evaluate(model, data.x_test, data.y_test)
        tasks = cfg.peer_task_map()
        epochs = cfg.schedule.steps * cfg.schedule.epochs_per_step
        lr = p.lr or cfg.optimizer.lr
        o = cfg.optimizer
        try:
            res = train_peer(
                model, tasks, p.method, data, epochs=epochs, lr=lr,
                lr_decay=o.lr_decay ** (1.0 / cfg.schedule.epochs_per_step), momentum=o.momentum,
                nesterov=o.nesterov, weight_decay=o.weight_decay, batch_size=cfg.data.batch_size, seed=cfg.seed,
                evaluate_every=cfg.evaluate.every, prune_end=p.prune_end, prune_every=p.prune_every,
                should_stop=should_stop,
            )
        except (TypeError, ValueError) as e:  # a task the method cannot train, or a bad option
            raise ConfigError(f"peer.method={p.method!r}: {e}") from None
        results: dict[str, Any] = {
            "name": cfg.name,
            "method": p.method,
            "description": METHODS[p.method][1],
            "lr": lr,
            "epochs": epochs,
            "seed": cfg.seed,
            "reference": {"checkpoint": str(reference_path(cfg, out)), "test_error": ref_err},
            "final": {"test_error": res.test_error, **_sizes(res.sizes)},
            "dc_max_abs_diff": res.dc_max_abs_diff,
            "history": res.history,
            "seconds": res.seconds,
        }
        _export(res.lc, out / "model.lcz", results)
        atomic_write_text(json.dumps(results, indent=2), out / "results.json")
    logger.info("%s: test error %.2f%%, ratio %.1f", p.method, res.test_error, res.sizes["ratio"])
    return results
