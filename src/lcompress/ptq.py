"""Post-training LC: compress a trained model from calibration inputs alone, one block at a time.

For a linear layer y = W x with calibration inputs X (N × n) and reference weights W₀, the layer-wise loss

    L(W) = tr((W − W₀) H (W − W₀)ᵀ),   H = XᵀX / N + δ·mean(diag XᵀX / N)·I

is the mean squared error of the layer's outputs on the calibration set, plus a dampening term δ (``damp``, 0.01 by
default, as GPTQ) that keeps H positive definite and pulls weights that the calibration set does not excite back
towards W₀ (a direction X never feeds costs δ·mean(diag H) per unit², instead of nothing). The L step of LC,

    min_W L(W) + μ/2 ‖W − Δ(Θ) − λ/μ‖²,

is then a linear solve: with H = Q diag(e) Qᵀ (one eigendecomposition per distinct layer input: q, k and v of an
attention block share theirs), W Q = (2 e ⊙ W₀Q + μ T Q) / (2e + μ), T = Δ(Θ) + λ/μ. LC keeps W, λ and Δ in the
eigenbasis, so every μ costs two matrix products and the task's own C step, Θ = Π(W − λ/μ): any compression of
the library (grouped integers, N:M, codebooks, pruning, low-rank, sums) is a valid task.

The μ schedule is automatic, measured from H and the direct compression as :func:`lcompress.auto_schedule` does
for training: along the way from W₀ to Δ_DC = Π(W₀) the loss rises by L(Δ_DC) over a distance D₀ = ‖W₀ − Δ_DC‖²,
a curvature κ = 2L(Δ_DC)/D₀; μ₀ = ``mu0``·κ and μ grows geometrically to μ_T, where the loss's gradient at Δ_DC can
hold W only ``tol``·√D₀ away from Δ (μ_T = ‖∇L(Δ_DC)‖ / (tol·√D₀)). The result of a layer is the Θ whose Δ(Θ) has
the lowest loss among the steps (direct compression included), so LC never returns a layer worse than
round-to-nearest on the calibration loss.

The block loop is GPTQ's: the inputs of the first block are captured by running the model on the calibration
batches up to it; each block runs once with hooks that accumulate H of its layers, its tasks are solved, and it runs
again with Δ(Θ) in place to give the next block's inputs, after which its float weights go back. Memory is the
model, Θ, one block's inputs for the whole calibration set (two copies with ``target="float"``) and one block's float
weights. The model's weights change only when the whole run has succeeded; a run given a checkpoint directory resumes
after a kill from the last finished block.
"""
from __future__ import annotations

import hashlib
import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn

from ._io import atomic_save
from ._threads import c_step_threads
from .algorithm import size_report
from .compressions.base import Compression
from .tasks import Task, resolve_tasks, unwrap_model

__all__ = ["posttrain", "PostTrainResult", "LayerProblem", "LCSolver", "direct_solver", "CheckpointMismatchError"]

logger = logging.getLogger(__name__)

CKPT_FORMAT = "lcompress.posttrain"
CKPT_VERSION = 1
CKPT_NAME = "posttrain.pt"


class CheckpointMismatchError(ValueError):
    """A checkpoint directory holds a run of another model, task map, method or calibration set."""


class _Stop(Exception):
    """Raised by the capture hook at the first block: the rest of the model need not run."""


# ---- one layer's problem -------------------------------------------------------------------------------------------
class _Eig:
    """Eigendecompositions of a dampened H, computed once and shared by every layer with that input: of H itself,
    and of the diagonally scaled H̃ = C⁻¹HC⁻¹, C = diag(c), c = √(diag H / mean diag H) (see :class:`LCSolver`)."""

    def __init__(self, h: Tensor, damp: float) -> None:
        self.h = h
        self.damp = damp
        self._cache: dict[str, tuple[Tensor, Tensor, Tensor]] = {}
        self._hd: Tensor | None = None

    def dampened(self) -> Tensor:
        hd = self.h.double().clone()
        hd.diagonal().add_(self.damp * float(hd.diagonal().mean().clamp_min(1e-30)))
        return hd

    def dampened_float(self) -> Tensor:
        """H + δ·mean(diag H)·I at H's dtype, computed once."""
        if self._hd is None:
            self._hd = self.dampened().to(self.h.dtype)
        return self._hd

    def get(self, metric: str = "euclidean") -> tuple[Tensor, Tensor, Tensor]:
        """(c, e, Q): H̃ = C⁻¹ H_δ C⁻¹ = Q diag(e) Qᵀ, with c = 1 for ``"euclidean"`` and the Jacobi scaling for
        ``"diag"``."""
        if metric not in self._cache:
            hd = self.dampened()
            d = hd.diagonal().clamp_min(1e-30)
            c = (d / d.mean()).sqrt() if metric == "diag" else torch.ones_like(d)
            e, q = torch.linalg.eigh(hd / (c[:, None] * c[None, :]))
            dt = self.h.dtype
            self._cache[metric] = (c.to(dt), e.clamp_min(0).to(dt), q.to(dt))
        return self._cache[metric]


@dataclass
class LayerProblem:
    """One linear layer's post-training problem: min_W tr((W − W₀) H (W − W₀)ᵀ) s.t. W = Δ(Θ).

    Attributes:
        name: the weight's parameter name.
        module: the ``nn.Linear``.
        w0: the reference weight (out × in), float32, a copy.
        hessian: H = XᵀX / N (in × in, float32), not dampened.
        tokens: N, the calibration rows it was accumulated over.
        damp: δ (the loss uses H + δ·mean(diag H)·I).
    """

    name: str
    module: nn.Module
    w0: Tensor
    hessian: Tensor
    tokens: int
    damp: float
    _eig: _Eig = field(repr=False, default=None)

    def eig(self, metric: str = "euclidean") -> tuple[Tensor, Tensor, Tensor]:
        """(c, e, Q) with C⁻¹(H + δ·mean(diag H)·I)C⁻¹ = Q diag(e) Qᵀ: c = 1 (``"euclidean"``) or the Jacobi
        scaling √(diag H_δ / mean diag H_δ) (``"diag"``)."""
        return self._eig.get(metric)

    def dampened(self) -> Tensor:
        """H + δ·mean(diag H)·I (shared; do not modify)."""
        return self._eig.dampened_float()

    def loss(self, w: Tensor) -> float:
        """tr((W − W₀) H_δ (W − W₀)ᵀ): the calibration loss of weights ``w`` (dampening included)."""
        d = w.float() - self.w0
        return float(((d @ self.dampened()) * d).sum())

    def relative_error(self, w: Tensor) -> float:
        """‖X(W − W₀)ᵀ‖² / ‖XW₀ᵀ‖² on the calibration set (no dampening)."""
        h = self.hessian
        d = w.float() - self.w0
        return float(((d @ h) * d).sum() / ((self.w0 @ h) * self.w0).sum().clamp_min(1e-30))


#: a per-task solver: given the task (its compression) and its layers' problems, leave Θ in task.compression
Solver = Callable[[Task, Sequence[LayerProblem]], Any]


def direct_solver(task: Task, problems: Sequence[LayerProblem]) -> dict[str, Any]:
    """Round-to-nearest in the task's own format: Θ = Π(W₀), the direct compression (no data used)."""
    task.compression.compress(task.gather([p.w0 for p in problems]))
    return {}


class LCSolver:
    """The LC algorithm on one task's layer-wise losses, with the exact L step (see the module docstring).

    **Metric.** With ``metric="diag"`` (the default, for compressions with a weighted C step) the penalty and the C
    step measure distances with D = diag(H_δ) / mean(diag H_δ): the C step solves min_Θ Σᵢⱼ Dⱼ(Wᵢⱼ − Δᵢⱼ(Θ))², so
    the weights that meet large inputs are matched first, and the L step sees H̃ = D^(−½) H_δ D^(−½), whose
    eigenvalues spread far less than H's (on SmolLM2's layers, over 4 orders of magnitude before, about 2 after).
    This is LC in the coordinates V = W D^(½): the same algorithm and the same constrained problem, better
    conditioned. On layers of SmolLM2-135M at int3 g64 it lowered the calibration loss that LC reaches by 2–4×;
    ``"euclidean"`` is the plain penalty (and the fallback for a compression without a weighted C step).

    **Polish.** After the last step the best Θ is improved locally in the calibration loss itself, where the
    compression's form allows it (``polish=True``): grouped integers alternate coordinate descent on the codes and the
    exact least-squares scales (:mod:`lcompress._layerwise`); pruning (ℓ0, N:M) re-solves the kept values on the
    support exactly. Each move lowers the loss, and the result's record gives the loss before and after.

    Args:
        steps: C steps after direct compression (each one μ).
        mu0: μ₀ as a multiple of the curvature κ along the direct compression.
        tol: μ_T is where the loss's gradient at Δ_DC holds W at ``tol``·√D₀ from Δ.
        multipliers: keep Lagrange multipliers (augmented Lagrangian); False gives the quadratic penalty.
        metric: ``"diag"`` or ``"euclidean"`` (above).
        polish: the local improvement after the last step (above).
        exact_every: take the exact C step every this many steps (and at the last), and the compression's cheaper
            partial C step between them where it has one (grouped integers: new codes and least-squares scales
            from the last ones). 1: always exact.

    Raises:
        ValueError: a bad argument, naming it.
    """

    def __init__(self, steps: int = 30, mu0: float = 0.1, tol: float = 0.005, multipliers: bool = True,
                 metric: str = "diag", polish: bool = True, exact_every: int = 1) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps={steps!r} must be an integer >= 0")
        for name, v in (("mu0", mu0), ("tol", tol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}={v!r} must be a finite number > 0")
        if metric not in ("diag", "euclidean"):
            raise ValueError(f"metric={metric!r} must be 'diag' or 'euclidean'")
        self.steps, self.mu0, self.tol, self.multipliers = steps, float(mu0), float(tol), bool(multipliers)
        self.metric, self.polish = metric, bool(polish)
        if isinstance(exact_every, bool) or not isinstance(exact_every, int) or exact_every < 1:
            raise ValueError(f"exact_every={exact_every!r} must be an integer >= 1")
        self.exact_every = exact_every

    def config(self) -> dict[str, Any]:
        return {"method": "lc", "steps": self.steps, "mu0": self.mu0, "tol": self.tol, "multipliers": self.multipliers,
                "metric": self.metric, "polish": self.polish, "exact_every": self.exact_every}

    def schedule(self, eigs: Sequence[tuple[Tensor, Tensor, Tensor]], v0q: Sequence[Tensor],
                 dq: Sequence[Tensor]) -> list[float]:
        """The geometric μ schedule from the direct compression (in the eigenbasis; module docstring)."""
        loss = d0 = grad2 = 0.0
        for (_, e, _), a, d in zip(eigs, v0q, dq):
            diff = d - a
            loss += float((diff * diff * e).sum())
            d0 += float((diff * diff).sum())
            grad2 += float(((2 * diff * e) ** 2).sum())
        if d0 <= 0 or loss <= 0 or self.steps == 0:
            return []  # the reference is already compressed: nothing to do
        kappa = 2 * loss / d0
        mu0 = self.mu0 * kappa
        mut = max(math.sqrt(grad2) / (self.tol * math.sqrt(d0)), mu0 * 1.0001)
        if self.steps == 1:
            return [mut]
        r = (mut / mu0) ** (1 / (self.steps - 1))
        return [mu0 * r**i for i in range(self.steps)]

    def __call__(self, task: Task, problems: Sequence[LayerProblem]) -> dict[str, Any]:
        comp = task.compression
        metric = self.metric if comp.supports_importance else "euclidean"
        eigs = [p.eig(metric) for p in problems]
        cs = [c for c, _, _ in eigs]
        imp = None
        if metric == "diag":
            imp = task.gather([(c * c).expand_as(p.w0) for c, p in zip(cs, problems)])

        def project(ws: list[Tensor], mu: float, partial: bool = False) -> list[Tensor]:
            """Θ ← Π(W) in the metric; returns Δ(Θ) per layer in V = W·c coordinates, times Q."""
            comp.compress(task.gather(ws), mu, check=False, importance=imp, partial=partial)
            return [(d.float() * c) @ q for d, (c, _, q) in zip(task.scatter(comp.decompress()), eigs)]

        v0q = [(p.w0 * c) @ q for p, (c, _, q) in zip(problems, eigs)]
        dq = project([p.w0 for p in problems], 0.0)  # direct compression

        def loss_of(dq: list[Tensor]) -> float:
            return sum(float(((d - a) ** 2 * e).sum()) for d, a, (_, e, _) in zip(dq, v0q, eigs))

        best_loss, best_state, best_step = loss_of(dq), comp.state_dict(), 0
        dc_loss = best_loss
        mus = self.schedule(eigs, v0q, dq)
        lam = [torch.zeros_like(a) for a in v0q]  # λ in the scaled eigenbasis
        for k, mu in enumerate(mus, 1):
            wq = [(2 * e * a + mu * d + l) / (2 * e + mu) for (_, e, _), a, d, l in zip(eigs, v0q, dq, lam)]
            # the C step's input W − λ/μ, back in the weights' coordinates
            partial = self.exact_every > 1 and k % self.exact_every != 0 and k != len(mus)
            dq = project([((v - l / mu) @ q.T) / c for v, l, (c, _, q) in zip(wq, lam, eigs)], mu, partial)
            if self.multipliers:
                lam = [l - mu * (v - d) for l, v, d in zip(lam, wq, dq)]
            cur = loss_of(dq)
            if cur < best_loss:
                best_loss, best_state, best_step = cur, comp.state_dict(), k
        comp.load_state_dict(best_state)
        info = {"dc_loss": dc_loss, "lc_loss": best_loss, "loss": best_loss, "best_step": best_step,
                "steps": len(mus), "mu_first": mus[0] if mus else None, "mu_last": mus[-1] if mus else None}
        if self.polish:
            info["loss"] = _polish(task, problems)
        return info


def _polish(task: Task, problems: Sequence[LayerProblem]) -> float:
    """Improve Θ of a single-layer task in its calibration loss where the form allows (see :class:`LCSolver`);
    returns the loss after. A joint task, or a compression without a polish, is left as it is."""
    from . import _layerwise as LW
    from .compressions.grouped import GroupedIntQuantization, NMPruning, grouped_delta
    from .compressions.pruning import ConstraintL0Pruning

    comp = task.compression
    if len(problems) != 1:
        return sum(p.loss(d) for p, d in zip(problems, task.scatter(comp.decompress())))
    p = problems[0]
    hd = p.dampened()
    w = task.scatter(comp.decompress())[0].float()
    before = p.loss(w)
    if isinstance(comp, GroupedIntQuantization):
        th = comp.theta
        rows, cols = w.shape
        lo = -(1 << (comp.bits - 1)) if comp.symmetric else 0
        hi = lo + (1 << comp.bits) - 1
        sd = th["scales"].dtype

        def expand(t):
            return t.float().repeat_interleave(comp.group, 1)[:, :cols]

        scales, mins = th["scales"].float(), th.get("mins")
        mins = None if mins is None else mins.float()
        codes = th["codes"].reshape(rows, cols).float() + lo
        best = (before, scales, mins, codes)
        for _ in range(2):
            w, _ = LW.grid_descent(w, p.w0, hd, expand(scales), None if mins is None else expand(mins), lo, hi,
                                   sweeps=2)
            safe = torch.where(expand(scales) == 0, torch.ones_like(w), expand(scales))
            codes = torch.round((w - (0 if mins is None else expand(mins))) / safe).clamp_(lo, hi)
            codes = torch.where(expand(scales) == 0, torch.zeros_like(codes), codes)
            s_new, m_new = LW.grid_scales(codes, p.w0, hd, comp.group, comp.symmetric)
            s_new = s_new.to(sd).float()
            m_new = None if m_new is None else m_new.to(sd).float()
            if not comp.symmetric:
                s_new = s_new.clamp_min(0)
            cand = grouped_delta(s_new, m_new, codes - lo, comp.bits, comp.group, comp.symmetric, rows, cols)
            cur = p.loss(cand)
            if cur < best[0]:
                gain = 1 - cur / best[0]
                best = (cur, s_new, m_new, codes)
                scales, mins, w = s_new, m_new, cand
                if gain < 0.005:  # a further round would move little
                    break
            else:
                break
        comp.set_grid(best[1], best[3].long(), best[2])
        return best[0]
    if isinstance(comp, (ConstraintL0Pruning, NMPruning)) and comp.value_codebook is None:
        mask = w != 0
        new = LW.support_solve(mask, w, p.w0, hd)
        idx = torch.nonzero(mask.reshape(-1)).reshape(-1)
        old_state = comp.state_dict()
        comp._set(idx, new.reshape(-1)[idx], w.numel(), comp._shape)
        after = p.loss(task.scatter(comp.decompress())[0])
        if after < before:
            return after
        comp.load_state_dict(old_state)
    return before


# ---- the result ----------------------------------------------------------------------------------------------------
class PostTrainResult:
    """A post-training run's outcome: the model (holding Δ(Θ)), its tasks (each compression holding Θ), and a record
    per layer. :meth:`export` writes the ``.lcz`` file; :meth:`size_report` counts it."""

    def __init__(self, model: nn.Module, tasks: list[Task], layers: list[dict[str, Any]], config: dict[str, Any],
                 seconds: float) -> None:
        self.model, self.tasks, self.layers, self.config, self.seconds = model, tasks, layers, config, seconds

    def size_report(self) -> dict[str, Any]:
        """What the ``.lcz`` file stores, in bits (the same report as :meth:`lcompress.LC.size_report`)."""
        return size_report(self.model, self.tasks)

    def export(self, path, lossless: bool = True) -> dict[str, Any]:
        """Write the compressed model to a compact ``.lcz`` file (see :func:`lcompress.export.save`)."""
        from .export import save

        return save(self, path, lossless=lossless)

    def bits_per_weight(self) -> float:
        """Stored bits per compressed weight (codes, scales, masks and values as the file stores them)."""
        rep = self.size_report()["scopes"]["compressed"]
        return rep["compressed_bits"] / max(1, sum(t.numel for t in self.tasks))


# ---- hooks and the block loop --------------------------------------------------------------------------------------
def _default_forward(model: nn.Module, batch: Any) -> Any:
    if isinstance(batch, Mapping):
        return model(**batch)
    if isinstance(batch, (tuple, list)):
        return model(batch[0])
    return model(batch)


def _token_mask(batch: Any) -> Tensor | None:
    if isinstance(batch, Mapping) and isinstance(batch.get("attention_mask"), Tensor):
        return batch["attention_mask"].bool()
    return None


class _HessianHooks:
    """Forward pre-hooks that accumulate Σ xxᵀ of each layer's input over the calibration rows; layers called on
    the same input tensor in a forward pass (q, k and v) share one accumulator.

    For the float target (:func:`posttrain`'s ``target="float"``) a pass in ``stash`` mode first keeps each layer's
    input x on the float model's path, and the next pass, on the compressed model's path x̃, also accumulates the
    cross term Σ x̃ xᵀ."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.sums: dict[str, Tensor] = {}
        self.cross: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self.mask: Tensor | None = None
        self.stash_mode = False
        self._stash: dict[str, Tensor] = {}
        self._seen: dict[int, tuple[str, Tensor]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def new_pass(self, mask: Tensor | None, stash: bool = False) -> None:
        self.mask = mask
        self.stash_mode = stash
        self._seen.clear()
        if stash:
            self._stash = {}

    def _rows(self, x: Tensor) -> Tensor:
        x2 = x.detach().reshape(-1, x.shape[-1]).float()
        if self.mask is not None and self.mask.numel() == x2.shape[0]:
            x2 = x2[self.mask.reshape(-1).to(x2.device)]
        return x2

    def _hook(self, name: str):
        def hook(mod, args):
            x = args[0]
            if self.stash_mode:
                self._stash[name] = x
                return None
            prev = self._seen.get(id(x))
            if prev is not None and prev[1] is x:  # the same input as an earlier layer of this pass
                if self.alias.setdefault(name, prev[0]) != prev[0] or name in self.sums:
                    raise ValueError(f"layer {name!r} shares its input with {prev[0]!r} on some calibration batches "
                                     "only")
                return None
            if name in self.alias:
                raise ValueError(f"layer {name!r} shares its input with {self.alias[name]!r} on some calibration "
                                 "batches only")
            self._seen[id(x)] = (name, x)  # keeps x alive, so its id is not reused within the pass
            x2 = self._rows(x)
            if not bool(torch.isfinite(x2).all()):
                raise FloatingPointError(f"the input of layer {name!r} holds NaN or Inf")
            if name not in self.sums:
                self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
                self.count[name] = 0
            self.sums[name].addmm_(x2.T, x2)
            self.count[name] += x2.shape[0]
            if name in self._stash:
                xf = self._rows(self._stash[name])
                if name not in self.cross:
                    self.cross[name] = torch.zeros_like(self.sums[name])
                self.cross[name].addmm_(x2.T, xf)
            return None

        return hook

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def hessian(self, name: str) -> tuple[Tensor, int, str]:
        src = self.alias.get(name, name)
        n = self.count.get(src, 0)
        if n == 0:
            raise ValueError(f"layer {name!r} saw no calibration rows (is it used in the model's forward pass?)")
        return self.sums[src] / n, n, src

    def cross_term(self, name: str) -> Tensor | None:
        """Σ x̃ xᵀ / N (compressed path × float path), or None without a stash pass."""
        src = self.alias.get(name, name)
        c = self.cross.get(src)
        return None if c is None else c / self.count[src]


def _out(o: Any) -> Tensor:
    return o[0] if isinstance(o, (tuple, list)) else o


@torch.no_grad()
def _capture(model: nn.Module, block: nn.Module, batches: list, forward: Callable) -> list[tuple[tuple, dict]]:
    """The (args, kwargs) the first block receives for each calibration batch (the model runs up to it)."""
    store: list[tuple[tuple, dict]] = []

    def hook(mod, args, kwargs):
        kw = dict(kwargs)
        for k in ("past_key_value", "past_key_values", "layer_past"):
            if k in kw:
                kw[k] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
        store.append((tuple(a.detach() if isinstance(a, Tensor) else a for a in args), kw))
        raise _Stop

    h = block.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                forward(model, b)
            except _Stop:
                continue
            raise ValueError("the calibration forward pass never reached the first block: is it part of the model?")
    finally:
        h.remove()
    return store


def _hidden(args: tuple, kwargs: dict) -> Tensor:
    return args[0] if args else kwargs["hidden_states"]


def _with_hidden(args: tuple, kwargs: dict, x: Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": x}


def _calib_digest(batches: list) -> str:
    h = hashlib.sha256()
    for b in batches:
        for t in (b.values() if isinstance(b, Mapping) else b if isinstance(b, (tuple, list)) else [b]):
            if isinstance(t, Tensor):
                h.update(str((tuple(t.shape), str(t.dtype))).encode())
                h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _progress(total: int, desc: str, enabled: bool):
    """A tqdm bar when stderr is a terminal; otherwise None (the loop logs a line per block)."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="block")


def posttrain(
    model: nn.Module,
    tasks: Mapping[Any, Compression],
    calibration: Iterable[Any],
    *,
    blocks: Sequence[nn.Module | str] | None = None,
    solver: Solver | str = "lc",
    forward: Callable[[nn.Module, Any], Any] | None = None,
    damp: float = 0.01,
    target: str = "own",
    checkpoint: str | Path | None = None,
    progress: bool = True,
) -> PostTrainResult:
    """Compress a trained model post-training by LC, block by block (see the module docstring).

    Args:
        model: the model; every task's parameter must be the weight of an ``nn.Linear``.
        tasks: ``{key: Compression}`` as for :class:`lcompress.LC` (names, ``"re:"`` patterns, tuples).
        calibration: the calibration batches, each what ``forward(model, batch)`` takes (a tensor, a tuple whose
            first item is the input, or a dict of keyword arguments whose ``attention_mask``, if any, excludes padded
            tokens from H).
        blocks: the model's blocks in the order they run (modules or their names), e.g. a transformer's decoder
            layers; each runs on its own inputs as ``block(*args, **kwargs)`` with its hidden states first. None:
            the whole model is one block, and its layers are solved one group at a time in the order they run
            (layers sharing an input together), each from inputs that the layers before it give compressed.
        solver: ``"lc"`` (an :class:`LCSolver` with its defaults), ``"rtn"`` (direct compression), or a callable
            ``solver(task, problems)`` (e.g. an :class:`LCSolver` with other settings, or a peer method).
        forward: ``forward(model, batch)`` runs the model on one batch (default: see ``calibration``).
        damp: δ of the dampened H (module docstring), ≥ 0.
        target: what each layer's loss asks it to reproduce. ``"own"`` (GPTQ's choice): its own float outputs on
            the inputs it now gets, ‖X̃(W − W₀)ᵀ‖². ``"float"``: the float model's outputs, ‖X̃Wᵀ − XW₀ᵀ‖², where X
            are the layer's inputs in the float model; the loss is then the same quadratic in H̃ around the
            weights W* that best undo the error of the layers before (:func:`_float_target`), so a layer corrects
            what the earlier ones lost instead of preserving it. It costs one more forward pass of each block over
            the calibration set and a second copy of the block inputs.
        checkpoint: a directory: after every block the run saves its state there, and a run started with the same
            directory, model, tasks, solver and calibration resumes from the last finished block.
        progress: a progress bar per block when stderr is a terminal (a log line per block otherwise).

    Returns:
        a :class:`PostTrainResult`; the model's task weights now hold Δ(Θ).

    Raises:
        TypeError, ValueError: bad tasks (no parameter matches, a parameter that is not a Linear weight), an empty
            calibration set, a bad ``damp`` or ``blocks``, NaN or Inf activations (naming the layer), or a
            checkpoint of another run (:class:`CheckpointMismatchError`). The model is left as it was.
    """
    t_start = time.perf_counter()
    model = unwrap_model(model)
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not (damp >= 0 and math.isfinite(damp)):
        raise ValueError(f"damp={damp!r} must be a finite number >= 0")
    if target not in ("own", "float"):
        raise ValueError(f"target={target!r} must be 'own' or 'float'")
    if isinstance(solver, str):
        named = {"lc": LCSolver, "rtn": lambda: direct_solver}
        if solver not in named:
            raise ValueError(f"solver={solver!r} must be 'lc', 'rtn' or a callable solver(task, problems)")
        solver = named[solver]()
    elif not callable(solver):
        raise TypeError(f"solver={solver!r} must be 'lc', 'rtn' or a callable solver(task, problems)")
    forward = forward or _default_forward
    batches = list(calibration)
    if not batches:
        raise ValueError("calibration is empty: give at least one batch")
    task_list = resolve_tasks(model, tasks)
    modules = dict(model.named_modules())
    owner: dict[str, nn.Module] = {}
    for t in task_list:
        for n in t.param_names:
            mod_name, _, leaf = n.rpartition(".")
            mod = modules.get(mod_name)
            if not isinstance(mod, nn.Linear) or leaf != "weight":
                raise ValueError(f"task {t.name!r}: {n!r} is not the weight of an nn.Linear; post-training LC solves "
                                 "linear layers from their inputs (keep other parameters out of the task map)")
            owner[n] = mod
    block_list = _resolve_blocks(model, modules, blocks)
    block_of = _assign_blocks(task_list, block_list, modules, model)
    config = {"solver": getattr(solver, "config", lambda: {"method": getattr(solver, "__name__", repr(solver))})(),
              "damp": float(damp), "tasks": [[t.name, t.compression.config()] for t in task_list],
              "blocks": [n for n, _ in block_list], "calibration": _calib_digest(batches), "target": target}
    ckpt = _Checkpoint(checkpoint, config) if checkpoint is not None else None
    done_blocks = ckpt.load(task_list, block_of) if ckpt else 0
    layers_log: list[dict[str, Any]] = ckpt.layers if ckpt else []

    originals: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            if block_list[0][1] is model:
                inputs = [((b,), {}) for b in batches]
            else:
                inputs = _capture(model, block_list[0][1], batches, forward)
            masks = [_token_mask(b) for b in batches]
            ref = list(inputs) if target == "float" else None  # the float model's block inputs
            bar = _progress(len(block_list), "posttrain", progress)
            if bar is not None:
                bar.update(done_blocks)
            t_loop = time.perf_counter()
            for bi, (bname, block) in enumerate(block_list):
                btasks = [t for t in task_list if block_of[t.name] == bi]
                t_block = time.perf_counter()
                run = (lambda a, k: forward(model, a[0])) if block is model else (lambda a, k: block(*a, **k))
                if bi < done_blocks:  # resumed: Θ is loaded; only the next block's inputs are needed
                    if ref is not None and bi + 1 < len(block_list):
                        ref = [_with_hidden(a, k, _out(run(a, k))) for a, k in ref]
                    _swap_in(btasks, originals, owner)
                else:
                    t0 = time.perf_counter()
                    groups = _groups_in_order(btasks, owner, run, inputs, masks) if block is model else [btasks]
                    new_ref = None
                    for group in groups:
                        fw = _FloatWeights(originals, owner) if block is model and originals else None
                        log, out_ref = _solve_group(group, owner, run, inputs, masks, solver, damp, bname,
                                                    ref_inputs=ref, float_weights=fw)
                        layers_log += log
                        new_ref = new_ref if new_ref is not None else out_ref
                        _swap_in(group, originals, owner)
                    if ref is not None and bi + 1 < len(block_list):
                        ref = new_ref if new_ref is not None else [_with_hidden(a, k, _out(run(a, k))) for a, k in ref]
                    if ckpt:
                        ckpt.save(bi + 1, btasks, layers_log)
                    solve_s = time.perf_counter() - t0
                if bi + 1 < len(block_list):
                    for j, (a, k) in enumerate(inputs):
                        y = _out(run(a, k))
                        if not bool(torch.isfinite(y).all()):
                            raise FloatingPointError(f"block {bname!r} gave NaN or Inf activations on calibration "
                                                     f"batch {j}")
                        inputs[j] = _with_hidden(a, k, y)
                if bi >= done_blocks:
                    now = time.perf_counter()
                    left = (now - t_loop) / (bi + 1 - done_blocks) * (len(block_list) - bi - 1)
                    msg = (f"block {bi + 1}/{len(block_list)} {bname or '(model)'}: {len(btasks)} tasks solved in "
                           f"{solve_s:.1f} s, block {now - t_block:.1f} s" + (f"; about {left / 60:.0f} min left"
                                                                             if bi + 1 < len(block_list) else ""))
                    if bar is None and progress:
                        logger.info(msg)
                    else:
                        logger.debug(msg)
                if block is not model:
                    # later blocks run on the stored inputs: this block's originals go back now, and only one
                    # block's originals are ever held (Δ(Θ) is written into the model when the run has succeeded)
                    for t in btasks:
                        for n in t.param_names:
                            owner[n].weight.data.copy_(originals.pop(n))
                if bar is not None:
                    bar.update(1)
            if bar is not None:
                bar.close()
    except BaseException:
        _restore(originals, owner, task_list)
        raise
    # success: the compressed weights stay; the originals are dropped
    for t in task_list:
        for n, d in zip(t.param_names, t.scatter(t.compression.decompress())):
            owner[n].weight.data.copy_(d.to(owner[n].weight.dtype))
    return PostTrainResult(model, task_list, layers_log, config, time.perf_counter() - t_start)


def _resolve_blocks(model, modules, blocks) -> list[tuple[str, nn.Module]]:
    if blocks is None:
        return [("", model)]
    names = {id(m): n for n, m in modules.items()}
    out = []
    for i, b in enumerate(blocks):
        if isinstance(b, str):
            if b not in modules:
                raise ValueError(f"blocks[{i}]={b!r} is not a module of the model")
            out.append((b, modules[b]))
        elif isinstance(b, nn.Module) and id(b) in names:
            out.append((names[id(b)], b))
        else:
            raise ValueError(f"blocks[{i}] is not a module of the model ({type(b).__name__})")
    if not out:
        raise ValueError("blocks is empty: give the model's blocks in order, or None for the whole model")
    return out


def _assign_blocks(task_list, block_list, modules, model) -> dict[str, int]:
    res = {}
    for t in task_list:
        idx = set()
        for n in t.param_names:
            hit = [i for i, (bn, _) in enumerate(block_list) if bn == "" or n.startswith(bn + ".")]
            if not hit:
                raise ValueError(f"task {t.name!r}: {n!r} is in none of the blocks; post-training runs blocks only "
                                 "(give blocks=None to treat the whole model as one)")
            idx.add(hit[0])
        if len(idx) > 1:
            raise ValueError(f"task {t.name!r} spans several blocks; a joint task must lie in one block")
        res[t.name] = idx.pop()
    return res


def _groups_in_order(btasks, owner, run, inputs, masks) -> list[list[Task]]:
    """The block's tasks grouped by layer input, in the order the layers run (one forward pass on a batch)."""
    order: list[str] = []
    first_input: dict[str, int] = {}
    hooks = []
    for t in btasks:
        for n in t.param_names:
            def hook(mod, args, n=n):
                if n not in first_input:
                    order.append(n)
                    first_input[n] = id(args[0])
            hooks.append(owner[n].register_forward_pre_hook(hook))
    try:
        a, k = inputs[0]
        run(a, k)
    finally:
        for h in hooks:
            h.remove()
    groups: list[list[Task]] = []
    placed: set[str] = set()
    for n in order:
        t = next(t for t in btasks if n in t.param_names)
        if t.name in placed:
            continue
        # tasks whose layers take the same input as this one join its group
        key = first_input[n]
        group = [u for u in btasks if u.name not in placed and any(first_input.get(m) == key for m in u.param_names)]
        placed.update(u.name for u in group)
        groups.append(group)
    missing = [t.name for t in btasks if t.name not in placed]
    if missing:
        raise ValueError(f"task(s) {missing} never ran in the calibration forward pass")
    return groups


def _float_target(w0: Tensor, h: Tensor, c: Tensor, damp: float) -> Tensor:
    """W* = argmin_W ‖X̃Wᵀ − XW₀ᵀ‖²/N + δ'‖W − W₀‖² = W₀(Cᵀ + δ'I)(H̃ + δ'I)⁻¹, with H̃ = X̃ᵀX̃/N, C = X̃ᵀX/N and
    δ' = δ·mean(diag H̃): the weights that best give the float model's outputs from the compressed model's inputs.
    The layer's loss is then (W − W*)(H̃ + δ'I)(W − W*)ᵀ up to a constant."""
    hd = h.double().clone()
    dp = damp * float(hd.diagonal().mean().clamp_min(1e-30))
    hd.diagonal().add_(dp)
    cd = c.double().clone()
    cd.diagonal().add_(dp)
    return torch.linalg.solve(hd, cd @ w0.double().T).T.to(w0.dtype)


def _solve_group(group, owner, run, inputs, masks, solver, damp, bname, ref_inputs=None,
                 float_weights=None) -> tuple[list[dict[str, Any]], list | None]:
    """H (and, with ``ref_inputs``, the float target) of the group's layers from one pass over the calibration
    batches, then each task solved. Returns the layer records and, with ``ref_inputs``, the block's outputs on the
    float path (the stash passes run the float block)."""
    names = {n: owner[n] for t in group for n in t.param_names}
    hooks = _HessianHooks(names)
    ref_out = [] if ref_inputs is not None else None
    try:
        for j, ((a, k), m) in enumerate(zip(inputs, masks)):
            if ref_inputs is not None:
                hooks.new_pass(m, stash=True)
                ra, rk = ref_inputs[j]
                with float_weights() if float_weights is not None else _nullcontext():
                    y = run(ra, rk)
                ref_out.append(_with_hidden(ra, rk, _out(y)))
            hooks.new_pass(m)
            run(a, k)
    except FloatingPointError as e:
        raise FloatingPointError(f"{e} in block {bname!r}") from None
    finally:
        hooks.remove()
    eigs: dict[str, _Eig] = {}
    log = []
    for t in group:
        problems = []
        for n in t.param_names:
            h, count, src = hooks.hessian(n)
            eig = eigs.setdefault(src, _Eig(h, damp))
            w0 = names[n].weight.detach().float().clone()
            c = hooks.cross_term(n)
            if c is not None:
                w0 = _float_target(w0, h, c, damp)
            problems.append(LayerProblem(n, names[n], w0, h, count, damp, eig))
        t0 = time.perf_counter()
        # many small tensor ops: on one thread when the cores are busy (see lcompress._threads)
        with c_step_threads(t.numel, problems[0].w0.device):
            info = solver(t, problems) or {}
        dt = time.perf_counter() - t0
        deltas = t.scatter(t.compression.decompress())
        for p, d in zip(problems, deltas):
            rec = {"layer": p.name, "task": t.name, "tokens": p.tokens, "rel_error": p.relative_error(d),
                   "seconds": dt / len(problems), **{k: v for k, v in info.items() if isinstance(v, (int, float))}}
            log.append(rec)
            logger.debug("%s: relative output error %.4g", p.name, rec["rel_error"])
    return log, ref_out


class _nullcontext:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class _FloatWeights:
    """Within the block: the layers already compressed hold their original weights (the float model's path)."""

    def __init__(self, originals: dict[str, Tensor], owner: dict[str, nn.Module]) -> None:
        self.originals, self.owner = originals, owner
        self.saved: dict[str, Tensor] = {}

    def __call__(self):
        return self

    def __enter__(self):
        for n, w in self.originals.items():
            self.saved[n] = self.owner[n].weight.detach().clone()
            self.owner[n].weight.data.copy_(w)
        return self

    def __exit__(self, *exc):
        for n, w in self.saved.items():
            self.owner[n].weight.data.copy_(w)
        self.saved = {}
        return False


def _swap_in(group, originals, owner) -> None:
    """Put Δ(Θ) of the tasks into their layers (the originals kept aside to restore on failure)."""
    for t in group:
        for n, d in zip(t.param_names, t.scatter(t.compression.decompress())):
            w = owner[n].weight
            if n not in originals:
                originals[n] = w.detach().clone()
            w.data.copy_(d.to(w.dtype))


def _restore(originals, owner, task_list) -> None:
    for n, w in originals.items():
        owner[n].weight.data.copy_(w)


class _Checkpoint:
    """``DIR/posttrain.pt`` (the run's configuration, the finished blocks' count and layer records) and
    ``DIR/block_NNNN.pt`` (Θ of one finished block's tasks): each block is written once, when it finishes."""

    def __init__(self, directory, config: dict[str, Any]) -> None:
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"checkpoint={str(directory)!r} exists and is not a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / CKPT_NAME
        self.config = config
        self.layers: list[dict[str, Any]] = []

    def _read(self, path: Path) -> Any:
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointMismatchError(f"checkpoint {str(path)!r} cannot be read ({type(e).__name__}: {e})") from None

    def load(self, task_list: list[Task], block_of: dict[str, int]) -> int:
        if not self.path.exists():
            return 0
        state = self._read(self.path)
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or state.get("version") != CKPT_VERSION:
            raise CheckpointMismatchError(f"{str(self.path)!r} is not a post-training checkpoint of this version")
        saved = state.get("config", {})
        for key in ("solver", "damp", "tasks", "blocks", "calibration", "target"):
            if saved.get(key) != self.config.get(key):
                raise CheckpointMismatchError(
                    f"checkpoint {str(self.path)!r} is of another run: its {key} differs "
                    f"({str(saved.get(key))[:80]} vs {str(self.config.get(key))[:80]}); use another directory")
        done = state.get("done_blocks")
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= len(self.config["blocks"]):
            raise CheckpointMismatchError(f"checkpoint {str(self.path)!r}: done_blocks={done!r} is not valid")
        for bi in range(done):
            path = self.dir / f"block_{bi:04d}.pt"
            thetas = self._read(path)
            for t in task_list:
                if block_of[t.name] != bi:
                    continue
                try:
                    t.compression.load_state_dict(thetas[t.name])
                    t.compression.to(t.params[0].device)
                    shapes = [tuple(d.shape) for d in t.scatter(t.compression.decompress())]
                except Exception as e:
                    raise CheckpointMismatchError(f"checkpoint {str(path)!r}: task {t.name!r} does not load "
                                                  f"({type(e).__name__}: {e})") from None
                if shapes != [tuple(p.shape) for p in t.params]:
                    raise CheckpointMismatchError(f"checkpoint {str(path)!r}: task {t.name!r} has shapes {shapes}")
        self.layers = list(state.get("layers", []))
        logger.info("resuming from %s: %d of %d blocks done", self.path, done, len(self.config["blocks"]))
        return done

    def save(self, done: int, btasks: list[Task], layers: list[dict[str, Any]]) -> None:
        """Block ``done − 1`` has finished: its Θ, then the index that counts it."""
        atomic_save({t.name: t.compression.state_dict() for t in btasks}, self.dir / f"block_{done - 1:04d}.pt")
        atomic_save({"format": CKPT_FORMAT, "version": CKPT_VERSION, "config": self.config, "done_blocks": done,
                     "layers": layers}, self.path)
