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
again with Δ(Θ) in place to give the next block's inputs. Memory is one block's inputs for the whole calibration
set, the model, and Θ. The model's weights change only when the whole run has succeeded; a run given a checkpoint
directory resumes after a kill from the last finished block.
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
    """The eigendecomposition of a dampened H, computed once and shared by every layer with that input."""

    def __init__(self, h: Tensor, damp: float) -> None:
        self.h = h
        self.damp = damp
        self._e: tuple[Tensor, Tensor] | None = None

    def get(self) -> tuple[Tensor, Tensor]:
        if self._e is None:
            hd = self.h.double()
            hd.diagonal().add_(self.damp * float(hd.diagonal().mean().clamp_min(1e-30)))
            e, q = torch.linalg.eigh(hd)
            self._e = (e.clamp_min(0).to(self.h.dtype), q.to(self.h.dtype))
        return self._e


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

    def eig(self) -> tuple[Tensor, Tensor]:
        """(e, Q) of the dampened H: H + δ·mean(diag H)·I = Q diag(e) Qᵀ."""
        return self._eig.get()

    def dampened(self) -> Tensor:
        """H + δ·mean(diag H)·I (a new tensor)."""
        h = self.hessian.clone()
        h.diagonal().add_(self.damp * float(h.diagonal().mean().clamp_min(1e-30)))
        return h

    def loss(self, w: Tensor) -> float:
        """tr((W − W₀) H_δ (W − W₀)ᵀ): the calibration loss of weights ``w`` (dampening included)."""
        e, q = self.eig()
        d = (w.float() - self.w0) @ q
        return float((d * d * e).sum())

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

    Args:
        steps: C steps after direct compression (each one μ).
        mu0: μ₀ as a multiple of the curvature κ along the direct compression.
        tol: μ_T is where the loss's gradient at Δ_DC holds W at ``tol``·√D₀ from Δ.
        multipliers: keep Lagrange multipliers (augmented Lagrangian); False gives the quadratic penalty.

    Raises:
        ValueError: a bad argument, naming it.
    """

    def __init__(self, steps: int = 30, mu0: float = 0.1, tol: float = 0.005, multipliers: bool = True) -> None:
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"steps={steps!r} must be an integer >= 1")
        for name, v in (("mu0", mu0), ("tol", tol)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (v > 0 and math.isfinite(v)):
                raise ValueError(f"{name}={v!r} must be a finite number > 0")
        self.steps, self.mu0, self.tol, self.multipliers = steps, float(mu0), float(tol), bool(multipliers)

    def config(self) -> dict[str, Any]:
        return {"method": "lc", "steps": self.steps, "mu0": self.mu0, "tol": self.tol, "multipliers": self.multipliers}

    def schedule(self, problems: Sequence[LayerProblem], deltas: Sequence[Tensor]) -> list[float]:
        """The geometric μ schedule from the direct compression's Δ (see the module docstring)."""
        loss = d0 = grad2 = 0.0
        for p, d in zip(problems, deltas):
            e, q = p.eig()
            diff = (d.float() - p.w0) @ q
            loss += float((diff * diff * e).sum())
            d0 += float((diff * diff).sum())
            grad2 += float(((2 * diff * e) ** 2).sum())
        if d0 <= 0 or loss <= 0:
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
        w0 = [p.w0 for p in problems]
        comp.compress(task.gather(w0))  # direct compression
        deltas = [d.float() for d in task.scatter(comp.decompress())]
        eigs = [p.eig() for p in problems]
        w0q = [w @ q for w, (_, q) in zip(w0, eigs)]
        mus = self.schedule(problems, deltas)

        def loss_of(dq: list[Tensor]) -> float:
            return sum(float(((d - a) ** 2 * e).sum()) for d, a, (e, _) in zip(dq, w0q, eigs))

        dq = [d @ q for d, (_, q) in zip(deltas, eigs)]
        best_loss, best_state, best_step = loss_of(dq), comp.state_dict(), 0
        dc_loss = best_loss
        lam = [torch.zeros_like(a) for a in w0q]  # λ in the eigenbasis
        for k, mu in enumerate(mus, 1):
            targets = []
            for i, ((e, q), a) in enumerate(zip(eigs, w0q)):
                wq = (2 * e * a + mu * dq[i] + lam[i]) / (2 * e + mu)  # the exact L step, T Q = ΔQ + λQ/μ
                targets.append((wq, (wq - lam[i] / mu) @ q.T))
            comp.compress(task.gather([t for _, t in targets]), mu, check=False)
            deltas = [d.float() for d in task.scatter(comp.decompress())]
            dq = [d @ q for d, (_, q) in zip(deltas, eigs)]
            if self.multipliers:
                lam = [l - mu * (wq - d) for l, (wq, _), d in zip(lam, targets, dq)]
            cur = loss_of(dq)
            if cur < best_loss:
                best_loss, best_state, best_step = cur, comp.state_dict(), k
        comp.load_state_dict(best_state)
        return {"dc_loss": dc_loss, "loss": best_loss, "best_step": best_step, "steps": len(mus),
                "mu_first": mus[0] if mus else None, "mu_last": mus[-1] if mus else None}


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
    the same input tensor in a forward pass (q, k and v) share one accumulator."""

    def __init__(self, layers: dict[str, nn.Module]) -> None:
        self.sums: dict[str, Tensor] = {}
        self.count: dict[str, int] = {}
        self.alias: dict[str, str] = {}
        self.mask: Tensor | None = None
        self._seen: dict[int, tuple[str, Tensor]] = {}
        self._handles = [m.register_forward_pre_hook(self._hook(n)) for n, m in layers.items()]

    def new_pass(self, mask: Tensor | None) -> None:
        self.mask = mask
        self._seen.clear()

    def _hook(self, name: str):
        def hook(mod, args):
            x = args[0]
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
            x2 = x.detach().reshape(-1, x.shape[-1]).float()
            if self.mask is not None and self.mask.numel() == x2.shape[0]:
                x2 = x2[self.mask.reshape(-1).to(x2.device)]
            if not bool(torch.isfinite(x2).all()):
                raise FloatingPointError(f"the input of layer {name!r} holds NaN or Inf")
            if name not in self.sums:
                self.sums[name] = torch.zeros(x2.shape[1], x2.shape[1], device=x2.device)
                self.count[name] = 0
            self.sums[name].addmm_(x2.T, x2)
            self.count[name] += x2.shape[0]
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
              "blocks": [n for n, _ in block_list], "calibration": _calib_digest(batches)}
    ckpt = _Checkpoint(checkpoint, config) if checkpoint is not None else None
    done_blocks = ckpt.load(task_list) if ckpt else 0
    layers_log: list[dict[str, Any]] = ckpt.layers if ckpt else []

    originals: dict[str, Tensor] = {}
    try:
        with torch.no_grad():
            if block_list[0][1] is model:
                inputs = [((b,), {}) for b in batches]
            else:
                inputs = _capture(model, block_list[0][1], batches, forward)
            masks = [_token_mask(b) for b in batches]
            bar = _progress(len(block_list), "posttrain", progress)
            if bar is not None:
                bar.update(done_blocks)
            for bi, (bname, block) in enumerate(block_list):
                btasks = [t for t in task_list if block_of[t.name] == bi]
                run = (lambda a, k: forward(model, a[0])) if block is model else (lambda a, k: block(*a, **k))
                if bi < done_blocks:  # resumed: Θ is loaded; only the next block's inputs are needed
                    _swap_in(btasks, originals, owner)
                else:
                    t0 = time.perf_counter()
                    groups = _groups_in_order(btasks, owner, run, inputs, masks) if block is model else [btasks]
                    for group in groups:
                        layers_log += _solve_group(group, owner, run, inputs, masks, solver, damp, bname)
                        _swap_in(group, originals, owner)
                    if ckpt:
                        ckpt.save(bi + 1, task_list, layers_log)
                    msg = f"block {bi + 1}/{len(block_list)} {bname or '(model)'}: {len(btasks)} tasks in " \
                          f"{time.perf_counter() - t0:.1f} s"
                    if bar is None and progress:
                        logger.info(msg)
                    else:
                        logger.debug(msg)
                if bi + 1 < len(block_list):
                    for j, (a, k) in enumerate(inputs):
                        y = _out(run(a, k))
                        if not bool(torch.isfinite(y).all()):
                            raise FloatingPointError(f"block {bname!r} gave NaN or Inf activations on calibration "
                                                     f"batch {j}")
                        inputs[j] = _with_hidden(a, k, y)
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


def _solve_group(group, owner, run, inputs, masks, solver, damp, bname) -> list[dict[str, Any]]:
    names = {n: owner[n] for t in group for n in t.param_names}
    hooks = _HessianHooks(names)
    try:
        for (a, k), m in zip(inputs, masks):
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
            problems.append(LayerProblem(n, names[n], names[n].weight.detach().float().clone(), h, count, damp, eig))
        t0 = time.perf_counter()
        info = solver(t, problems) or {}
        dt = time.perf_counter() - t0
        deltas = t.scatter(t.compression.decompress())
        for p, d in zip(problems, deltas):
            rec = {"layer": p.name, "task": t.name, "tokens": p.tokens, "rel_error": p.relative_error(d),
                   "seconds": dt / len(problems), **{k: v for k, v in info.items() if isinstance(v, (int, float))}}
            log.append(rec)
            logger.debug("%s: relative output error %.4g", p.name, rec["rel_error"])
    return log


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
    """``DIR/posttrain.pt``: the finished blocks' Θ, their layer records and the run's configuration."""

    def __init__(self, directory, config: dict[str, Any]) -> None:
        self.dir = Path(directory)
        if self.dir.exists() and not self.dir.is_dir():
            raise ValueError(f"checkpoint={str(directory)!r} exists and is not a directory")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / CKPT_NAME
        self.config = config
        self.layers: list[dict[str, Any]] = []

    def load(self, task_list: list[Task]) -> int:
        if not self.path.exists():
            return 0
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ValueError(f"checkpoint {str(self.path)!r} cannot be read ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or state.get("format") != CKPT_FORMAT or state.get("version") != CKPT_VERSION:
            raise CheckpointMismatchError(f"{str(self.path)!r} is not a post-training checkpoint of this version")
        saved = state.get("config", {})
        for key in ("solver", "damp", "tasks", "blocks", "calibration"):
            if saved.get(key) != self.config.get(key):
                raise CheckpointMismatchError(
                    f"checkpoint {str(self.path)!r} is of another run: its {key} differs "
                    f"({str(saved.get(key))[:80]} vs {str(self.config.get(key))[:80]}); use another directory")
        done = state.get("done_blocks")
        if isinstance(done, bool) or not isinstance(done, int) or not 0 <= done <= len(self.config["blocks"]):
            raise CheckpointMismatchError(f"checkpoint {str(self.path)!r}: done_blocks={done!r} is not valid")
        thetas = state.get("tasks", {})
        for t in task_list:
            if t.name in thetas:
                t.compression.load_state_dict(thetas[t.name])
                t.compression.to(t.params[0].device)
        self.layers = list(state.get("layers", []))
        logger.info("resuming from %s: %d of %d blocks done", self.path, done, len(self.config["blocks"]))
        return done

    def save(self, done: int, task_list: list[Task], layers: list[dict[str, Any]]) -> None:
        thetas = {t.name: t.compression.state_dict() for t in task_list if t.compression.is_compressed}
        atomic_save({"format": CKPT_FORMAT, "version": CKPT_VERSION, "config": self.config, "done_blocks": done,
                     "tasks": thetas, "layers": layers}, self.path)
