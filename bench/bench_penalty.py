"""Cost of the LC penalty in the L step: LeNet300 epochs on CPU with and without ``alg.penalty(mu)``.

Prints one JSON object on stdout:

* ``epochs``: per batch size (256 and 128), the median epoch seconds of plain training and of two LC variants,
  timed epoch by epoch in turn (plain, per-layer, joint, plain, ...; the order rotates between epochs), and the
  overhead over plain (``overhead``: median of the per-epoch wall-time ratios − 1; target ≤ 5%; also from the
  fastest epochs and from process CPU time, which a loaded machine disturbs less):

  - ``plain``: cross-entropy only;
  - ``lc_per_layer``: ``{"re:fc\\d\\.weight": AdaptiveQuantization(2)}``, three tasks;
  - ``lc_joint``: one joint additive task over all three weight matrices,
    ``AdaptiveQuantization(2) + ConstraintL0Pruning(fraction=0.01)``;
  - ``lc_per_layer_grad``, ``lc_joint_grad``: the same task maps with the penalty's gradient added by
    ``alg.penalty_grad_(mu)`` after ``loss.backward()`` instead of ``alg.penalty(mu)`` in the loss.

  Each variant has its own model (same initial weights) and SGD (Nesterov momentum 0.9). The epoch's shuffled
  copy of the data is made before the clock starts, so the loop is as lean as a training loop gets and the
  penalty's share is not diluted by data loading.
* ``penalty_alone``: ``alg.penalty(mu)`` forward and forward+backward, microseconds per call, for both task maps
  and for a naive per-parameter reference (``μ/2 Σ ((w − t)²).sum()``), timed in turn.
* ``layers``: the same per call for MLPs of 3, 12 and 48 square layers holding the same number of weights
  (each weight matrix its own task): the fused penalty's cost should not grow with the number of layers.

Usage:  python bench/bench_penalty.py [--epochs 7] [--synthetic] [--quick]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
from typing import Any, Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, header, log  # noqa: E402

import lcompress as lc  # noqa: E402
from lcompress.models import MLP, get_model  # noqa: E402

OVERHEAD_TARGET = 0.05
JOINT = ("fc1.weight", "fc2.weight", "fc3.weight")
KINDS = ("plain", "lc_per_layer", "lc_joint", "lc_per_layer_grad", "lc_joint_grad")


def make_tasks(kind: str) -> dict | None:
    kind = kind.removesuffix("_grad")
    if kind == "plain":
        return None
    if kind == "lc_per_layer":
        return {"re:fc\\d\\.weight": lc.AdaptiveQuantization(2)}
    if kind == "lc_joint":
        return {JOINT: lc.AdaptiveQuantization(2) + lc.ConstraintL0Pruning(fraction=0.01)}
    raise ValueError(kind)


def load_data(synthetic: bool, limit: int | None) -> tuple[torch.Tensor, torch.Tensor, str]:
    if not synthetic:
        try:
            from lcompress.data import load_fashion_mnist

            d = load_fashion_mnist()
            x, y, src = d.x_train, d.y_train, "fashion-mnist"
        except FileNotFoundError as e:
            log(f"Fashion-MNIST not found ({e}); using synthetic data")
            synthetic = True
    if synthetic:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(60_000, 1, 28, 28, generator=g) * 0.3
        y = torch.randint(0, 10, (60_000,), generator=g)
        src = "synthetic"
    if limit:
        x, y = x[:limit], y[:limit]
    return x.contiguous(), y.contiguous(), src


class Variant:
    def __init__(self, kind: str, init_state: dict, lr: float, mu: float) -> None:
        self.kind = kind
        self.model = get_model("lenet300")
        self.model.load_state_dict(init_state)
        self.opt = torch.optim.SGD(self.model.parameters(), lr=lr, momentum=0.9, nesterov=True)
        tasks = make_tasks(kind)
        self.alg = None if tasks is None else lc.LC(self.model, tasks)
        self.mu = mu
        self.times: list[float] = []
        self.cpu: list[float] = []

    def epoch(self, xs: torch.Tensor, ys: torch.Tensor, batch: int) -> tuple[float, float]:
        """(wall, process CPU) seconds of one epoch."""
        model, opt, alg, mu = self.model, self.opt, self.alg, self.mu
        use_grad = self.kind.endswith("_grad")
        n = xs.shape[0]
        c0 = time.process_time()
        t0 = time.perf_counter()
        for i in range(0, n, batch):
            x, y = xs[i : i + batch], ys[i : i + batch]
            loss = F.cross_entropy(model(x), y)
            if alg is not None and not use_grad:
                loss = loss + alg.penalty(mu)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if use_grad:
                alg.penalty_grad_(mu)
            opt.step()
        return time.perf_counter() - t0, time.process_time() - c0


def bench_epochs(x, y, batch: int, epochs: int, warmup: int, lr: float, mu: float) -> dict[str, Any]:
    torch.manual_seed(0)
    init_state = get_model("lenet300").state_dict()
    variants = [Variant(k, init_state, lr, mu) for k in KINDS]
    g = torch.Generator().manual_seed(1)
    for e in range(warmup + epochs):
        perm = torch.randperm(x.shape[0], generator=g)
        xs, ys = x[perm], y[perm]
        order = variants[e % len(variants):] + variants[: e % len(variants)]
        for v in order:
            dt, dc = v.epoch(xs, ys, batch)
            if e >= warmup:
                v.times.append(dt)
                v.cpu.append(dc)
        log(f"batch {batch}: epoch {e + 1}/{warmup + epochs} " +
            " ".join(f"{v.kind}={v.times[-1]:.3f}s" for v in variants if v.times))
    plain = variants[0].times
    out: dict[str, Any] = {"batch": batch, "steps_per_epoch": math.ceil(x.shape[0] / batch)}
    for v in variants:
        row: dict[str, Any] = {
            "median_s": round(statistics.median(v.times), 4),
            "min_s": round(min(v.times), 4),
            "median_cpu_s": round(statistics.median(v.cpu), 4),
            "epochs_timed": len(v.times),
        }
        if v.alg is not None:
            per_epoch = [a / b for a, b in zip(v.times, plain)]
            ovh = statistics.median(per_epoch) - 1.0
            row["overhead"] = round(ovh, 4)
            row["overhead_ratio_of_medians"] = round(statistics.median(v.times) / statistics.median(plain) - 1, 4)
            row["overhead_min"] = round(min(v.times) / min(plain) - 1, 4)
            row["overhead_cpu"] = round(
                statistics.median(a / b for a, b in zip(v.cpu, variants[0].cpu)) - 1, 4)
            row["overhead_per_step_us"] = round(
                (statistics.median(v.times) - statistics.median(plain)) / out["steps_per_epoch"] * 1e6, 1)
            row["target_overhead"] = OVERHEAD_TARGET
            row["meets_target"] = bool(ovh <= OVERHEAD_TARGET)
            row["tasks"] = [t.name for t in v.alg.tasks]
        out[v.kind] = row
    return out


# ---- the penalty alone ---------------------------------------------------------------------------------------
def naive_penalty(alg: lc.LC, mu: float) -> torch.Tensor:
    """μ/2 Σ_p ((w_p − t_p)²).sum(), one chain of autograd ops per parameter: the reference to beat."""
    targets = [d + l / mu for d, l in zip(alg._deltas, alg._lambdas)]
    return 0.5 * mu * sum(((p - t) ** 2).sum() for p, t in zip(alg._params, targets))


def per_call_us(fns: dict[str, Callable[[], Any]], calls: int, repeats: int) -> dict[str, dict[str, float]]:
    """Microseconds per call of each function: ``repeats`` batches of ``calls`` calls, the functions in turn."""
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        for _ in range(3):
            f()
    names = list(fns)
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            f = fns[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                f()
            times[name].append((time.perf_counter() - t0) / calls)
    return {k: {"median_us": round(statistics.median(v) * 1e6, 2), "min_us": round(min(v) * 1e6, 2)}
            for k, v in times.items()}


def fwd_bwd(model: torch.nn.Module, loss_fn: Callable[[], torch.Tensor]) -> Callable[[], None]:
    params = [p for p in model.parameters()]

    def run():
        for p in params:
            p.grad = None
        loss_fn().backward()
    return run


def grad_form(model: torch.nn.Module, alg: lc.LC, mu: float) -> Callable[[], None]:
    """``alg.penalty_grad_(mu)`` on gradients that exist (as after ``loss.backward()``)."""
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    return lambda: alg.penalty_grad_(mu)


def bench_penalty_alone(mu: float, calls: int, repeats: int) -> dict[str, Any]:
    torch.manual_seed(0)
    fns: dict[str, Callable[[], Any]] = {}
    for kind in ("lc_per_layer", "lc_joint"):
        model = get_model("lenet300")
        alg = lc.LC(model, make_tasks(kind))
        alg.penalty(mu)
        fns[f"{kind} forward"] = (lambda alg=alg: alg.penalty(mu))
        fns[f"{kind} forward+backward"] = fwd_bwd(model, lambda alg=alg: alg.penalty(mu))
        fns[f"{kind} penalty_grad_"] = grad_form(model, alg, mu)
        if kind == "lc_per_layer":
            fns["naive per-parameter forward+backward"] = fwd_bwd(model, lambda alg=alg: naive_penalty(alg, mu))
    res = per_call_us(fns, calls, repeats)
    return {"model": "lenet300", "weights": 266_200, "mu": mu, "calls_per_repeat": calls, **res}


def bench_layers(mu: float, total: int, depths: tuple[int, ...], calls: int, repeats: int) -> dict[str, Any]:
    fns: dict[str, Callable[[], Any]] = {}
    shapes = {}
    for depth in depths:
        h = int(round(math.sqrt(total / depth)))
        torch.manual_seed(0)
        model = MLP([h] * (depth + 1))
        alg = lc.LC(model, {"re:fc\\d+\\.weight": lc.AdaptiveQuantization(2)})
        alg.penalty(mu)
        shapes[depth] = {"width": h, "weights": depth * h * h, "tasks": len(alg.tasks)}
        fns[f"{depth} fused"] = fwd_bwd(model, lambda alg=alg: alg.penalty(mu))
        fns[f"{depth} naive"] = fwd_bwd(model, lambda alg=alg: naive_penalty(alg, mu))
        fns[f"{depth} grad_form"] = grad_form(model, alg, mu)
    res = per_call_us(fns, calls, repeats)
    out: dict[str, Any] = {"note": "forward+backward of the penalty per call (penalty_grad_: the gradient form); "
                                   "same total weights at every depth"}
    d0 = depths[0]
    base, base_naive = res[f"{d0} fused"]["median_us"], res[f"{d0} naive"]["median_us"]
    for depth in depths:
        fused, naive = res[f"{depth} fused"]["median_us"], res[f"{depth} naive"]["median_us"]
        out[f"{depth}_layers"] = {
            **shapes[depth],
            "fused_us": fused,
            "naive_us": naive,
            "penalty_grad_us": res[f"{depth} grad_form"]["median_us"],
            f"fused_over_{d0}_layers": round(fused / base, 3),
            f"naive_over_{d0}_layers": round(naive / base_naive, 3),
            "fused_per_extra_layer_us": None if depth == d0 else round((fused - base) / (depth - d0), 2),
            "naive_per_extra_layer_us": None if depth == d0 else round((naive - base_naive) / (depth - d0), 2),
        }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=7, help="timed epochs per variant and batch size")
    ap.add_argument("--warmup", type=int, default=1, help="untimed epochs per variant first")
    ap.add_argument("--batches", type=int, nargs="+", default=[256, 128])
    ap.add_argument("--synthetic", action="store_true", help="random data of Fashion-MNIST's shape")
    ap.add_argument("--limit", type=int, default=None, help="use only the first N training samples")
    ap.add_argument("--mu", type=float, default=1e-3)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--calls", type=int, default=200, help="calls per timed batch in the per-call benchmarks")
    ap.add_argument("--call-repeats", type=int, default=15)
    ap.add_argument("--layer-weights", type=int, default=786_432, help="total weights of the depth-scaling MLPs")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="2 epochs on 10k samples, fewer calls")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.limit, args.calls, args.call_repeats = 2, args.limit or 10_000, 50, 5
    torch.set_num_threads(args.threads)
    result = header("penalty", args.threads)
    x, y, src = load_data(args.synthetic, args.limit)
    result["config"] = {
        "data": src, "samples": int(x.shape[0]), "epochs": args.epochs, "warmup": args.warmup, "mu": args.mu,
        "lr": args.lr, "optimizer": "SGD(momentum=0.9, nesterov=True)", "batches": args.batches,
    }
    result["epochs"] = {}
    for b in args.batches:
        result["epochs"][f"batch_{b}"] = bench_epochs(x, y, b, args.epochs, args.warmup, args.lr, args.mu)
    log("penalty alone")
    result["penalty_alone"] = bench_penalty_alone(args.mu, args.calls, args.call_repeats)
    log("layers")
    result["layers"] = bench_layers(args.mu, args.layer_weights, (3, 12, 48), args.calls, args.call_repeats)
    result["targets_missed"] = [
        f"{bk} {kind}" for bk, row in result["epochs"].items()
        for kind, v in row.items() if isinstance(v, dict) and v.get("meets_target") is False
    ]
    emit(result)


if __name__ == "__main__":
    main()
