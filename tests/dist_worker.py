"""One process of the distributed LC tests (driven by tests/test_distributed.py; not collected by pytest).

Usage: ``python tests/dist_worker.py OUT_DIR RANK WORLD_SIZE INIT_FILE [FORM]``

FORM is ``loss`` (default: ``loss + alg.penalty(mu)``) or ``grad`` (``alg.penalty_grad_(mu)`` after backward, where
DDP has already averaged the gradients); a ``grad`` run does only part 1 and writes ``..._grad.pt``.

1. An MLP (in DistributedDataParallel when WORLD_SIZE > 1) is trained by LC over a geometric μ schedule on a fixed
   data set; rank r takes its shard of every global batch of ``GLOBAL_BATCH`` samples. After direct compression and
   after every C step the worker records Θ, Δ, λ and the weights. WORLD_SIZE 1 is the single-process reference over
   the same global batches.
2. With WORLD_SIZE > 1, rank 1 then perturbs ``fc1.weight`` behind DDP's back and every rank calls ``c_step``; the
   worker records the error each rank got, whether the LC state survived it, and whether a C step succeeds once the
   weights are re-synchronised.

Everything goes to ``OUT_DIR/rank{r}_world{n}.pt``. The process group has a 60 s gloo timeout, so a rank left
waiting in a collective fails instead of hanging the test.
"""
from __future__ import annotations

import copy
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch is imported: one thread per rank, 2 ranks on 2 cores

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn.parallel import DistributedDataParallel as DDP  # noqa: E402

import lcompress as lc  # noqa: E402
from lcompress.data import batches  # noqa: E402

torch.set_num_threads(1)

N_SAMPLES = 512
GLOBAL_BATCH = 64
DIM, HIDDEN, CLASSES = 16, 32, 4
MU_SCHEDULE = lc.geometric(1e-2, 2.0, 4)
EPOCHS_PER_STEP = 2
LR = 0.1


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(DIM, HIDDEN)
        self.fc2 = nn.Linear(HIDDEN, HIDDEN)
        self.fc3 = nn.Linear(HIDDEN, HIDDEN)
        self.fc4 = nn.Linear(HIDDEN, CLASSES)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        x = torch.relu(self.fc3(x))
        return self.fc4(x)


def make_tasks() -> dict:
    """A quantization task, a joint pruning task over two layers, and an additive (low-rank + sparse) task."""
    return {
        "fc1.weight": lc.AdaptiveQuantization(k=4),
        ("fc2.weight", "fc4.weight"): lc.ConstraintL0Pruning(kappa=300),
        "fc3.weight": lc.LowRank(rank=2) + lc.ConstraintL0Pruning(kappa=64),
    }


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(N_SAMPLES, DIM, generator=g)
    w = torch.randn(DIM, CLASSES, generator=g)
    y = (x @ w + 0.5 * torch.randn(N_SAMPLES, CLASSES, generator=g)).argmax(1)
    return x, y


def snapshot(alg: lc.LC, model: nn.Module) -> dict:
    return {
        "theta": copy.deepcopy([t.compression.state_dict() for t in alg.tasks]),
        "deltas": {k: v.clone() for k, v in alg.decompressed().items()},
        "lambdas": {k: v.clone() for k, v in alg.lambdas.items()},
        "weights": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "step": alg.step,
        "mu": alg.mu,
    }


def setup(rank: int, world: int, init_file: str) -> tuple[nn.Module, nn.Module]:
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
        )
    torch.manual_seed(0)  # the same initial weights everywhere (DDP would broadcast rank 0's anyway)
    model = MLP()
    wrapped = DDP(model) if world > 1 else model
    return model, wrapped


def l_step(wrapped, alg, opt, x, y, mu, step, rank, world, form="loss") -> None:
    for epoch in range(EPOCHS_PER_STEP):
        # the same permutation on every rank; rank r takes every world-th element of it, so the union of the
        # ranks' i-th batches is the single-process run's i-th global batch
        g = torch.Generator().manual_seed(1000 * step + epoch)
        for xb, yb in batches(x, y, GLOBAL_BATCH // world, shuffle=True, generator=g, rank=rank, world_size=world):
            loss = F.cross_entropy(wrapped(xb), yb)
            if form == "loss":
                loss = loss + alg.penalty(mu)
            opt.zero_grad()
            loss.backward()
            if form == "grad":
                alg.penalty_grad_(mu)
            opt.step()


def train(model, wrapped, alg, rank: int, world: int, form: str = "loss") -> list[dict]:
    x, y = make_data()
    records = [snapshot(alg, model)]
    for step, mu in enumerate(MU_SCHEDULE):
        opt = torch.optim.SGD(wrapped.parameters(), lr=lc.clip_lr(LR, mu), momentum=0.9)
        l_step(wrapped, alg, opt, x, y, mu, step, rank, world, form)
        alg.c_step(mu)
        records.append(snapshot(alg, model))
    return records


def diverge(model, alg, rank: int) -> dict:
    mu = alg.mu
    before = snapshot(alg, model)
    if rank == 1:
        with torch.no_grad():  # behind DDP's back: only this rank's copy changes
            noise = torch.randn(model.fc1.weight.shape, generator=torch.Generator().manual_seed(7))
            model.fc1.weight.add_(1e-3 * noise)
    error = None
    try:
        alg.c_step(mu)
    except RuntimeError as e:
        error = str(e)
    after = snapshot(alg, model)
    unchanged = (before["step"], before["mu"]) == (after["step"], after["mu"]) and all(
        torch.equal(before[k][n], after[k][n]) for k in ("deltas", "lambdas") for n in before[k]
    )
    # recovery: rank 0's weights everywhere again; the C step must now succeed on every rank
    with torch.no_grad():
        for p in model.parameters():
            dist.broadcast(p, src=0)
    try:
        alg.c_step(mu)
        recovered = True
    except RuntimeError:
        recovered = False
    return {"error": error, "state_unchanged": unchanged, "recovered": recovered}


def fail_on_one_rank(model, alg, rank: int) -> dict:
    """Rank 1's C step fails (NaN in its weights); rank 0 must not wait for it until the timeout."""
    mu = alg.mu
    saved = model.fc2.weight.detach().clone()
    if rank == 1:
        with torch.no_grad():
            model.fc2.weight[0, 0] = float("nan")
    t = time.perf_counter()
    error = None
    try:
        alg.c_step(mu)
    except (RuntimeError, ValueError) as e:
        error = f"{type(e).__name__}: {e}"
    with torch.no_grad():
        model.fc2.weight.copy_(saved)
    return {"error": error, "seconds": time.perf_counter() - t}


def main(argv: list[str]) -> None:
    out, rank, world, init_file = argv[:4]
    form = argv[4] if len(argv) > 4 else "loss"
    rank, world = int(rank), int(world)
    try:
        model, wrapped = setup(rank, world, init_file)
        alg = lc.LC(wrapped, make_tasks())
        result = {"records": train(model, wrapped, alg, rank, world, form)}
        if world > 1 and form == "loss":
            result["diverge"] = diverge(model, alg, rank)
            result["fail_one"] = fail_on_one_rank(model, alg, rank)
        suffix = "" if form == "loss" else f"_{form}"
        torch.save(result, Path(out) / f"rank{rank}_world{world}{suffix}.pt")
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1:])
