"""LC under torch.distributed: 2 CPU ranks (gloo) with DistributedDataParallel, against a single-process run.

One launch serves every test here: ``tests/dist_worker.py`` runs as ranks 0 and 1 of a 2-process group (initialised
through a file in ``tmp_path``, so no port is needed) and, at the same time, as a single process over the same global
batches. Each process trains an MLP by LC under a task mix (adaptive quantization, a joint pruning task over two
layers, low-rank + sparse) and writes what it saw to ``tmp_path``; the tests compare the files. A second pair of
ranks and a second single process do the same with the gradient form of the penalty (``alg.penalty_grad_``).
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

WORKER = Path(__file__).with_name("dist_worker.py")
SRC = Path(__file__).resolve().parents[1] / "src"
TIMEOUT_S = 180  # generous: a healthy run takes ~15 s on 2 cores; a hang must fail, not block CI

pytestmark = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()), reason="torch.distributed with gloo is not available"
)


def _launch(out: Path) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    jobs = [(2, 0, out / "pg_init", "loss"), (2, 1, out / "pg_init", "loss"), (1, 0, out / "unused", "loss"),
            (2, 0, out / "pg_init_grad", "grad"), (2, 1, out / "pg_init_grad", "grad"), (1, 0, out / "unused", "grad")]
    procs = [
        subprocess.Popen(
            [sys.executable, str(WORKER), str(out), str(rank), str(world), str(init), form],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for world, rank, init, form in jobs
    ]
    failures = []
    try:
        for (world, rank, _, form), p in zip(jobs, procs):
            try:
                log, _ = p.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                p.kill()
                log, _ = p.communicate()
                failures.append(f"world {world} rank {rank} ({form}): timed out after {TIMEOUT_S} s\n{log}")
                continue
            if p.returncode != 0:
                failures.append(f"world {world} rank {rank} ({form}): exit code {p.returncode}\n{log}")
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    if failures:
        pytest.fail("distributed worker failed:\n" + "\n".join(failures))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    _launch(out)

    def load(rank, world):
        # the records hold only tensors, dicts, lists, strings and numbers: the safe loader suffices
        return torch.load(out / f"rank{rank}_world{world}.pt", weights_only=True)

    runs = {"rank0": load(0, 2), "rank1": load(1, 2), "single": load(0, 1)}
    for name, (rank, world) in {"grad_rank0": (0, 2), "grad_rank1": (1, 2), "grad_single": (0, 1)}.items():
        runs[name] = torch.load(out / f"rank{rank}_world{world}_grad.pt", weights_only=True)
    return runs


def _assert_bitwise_equal(a, b, where: str) -> None:
    assert type(a) is type(b), f"{where}: {type(a).__name__} vs {type(b).__name__}"
    if isinstance(a, torch.Tensor):
        assert (a.dtype, a.shape) == (b.dtype, b.shape), f"{where}: {a.dtype}, {a.shape} vs {b.dtype}, {b.shape}"
        assert torch.equal(a, b), f"{where}: differs (max |a - b| = {float((a.double() - b.double()).abs().max()):.3g})"
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), f"{where}: keys {sorted(a)} vs {sorted(b)}"
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), f"{where}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} vs {b!r}"


# ---- (a) every rank holds the same Θ, Δ and λ after every C step ------------------------------------------------
def test_ranks_agree_bitwise_after_every_c_step(runs):
    r0, r1 = runs["rank0"]["records"], runs["rank1"]["records"]
    assert len(r0) == len(r1) == 5  # direct compression + 4 C steps
    for i, (a, b) in enumerate(zip(r0, r1)):
        assert a["step"] == i
        for key in ("theta", "deltas", "lambdas", "weights"):
            _assert_bitwise_equal(a[key], b[key], f"C step {i}: {key}")
    # the run did something: multipliers moved and the weights left their initial values
    assert any(float(v.abs().max()) > 0 for v in r0[-1]["lambdas"].values())
    assert not torch.equal(r0[0]["weights"]["fc1.weight"], r0[-1]["weights"]["fc1.weight"])


# ---- (b) DDP over 2 shards = one process over the whole global batch --------------------------------------------
# DDP averages the two ranks' gradients of their half-batch mean losses, which is the gradient of the global batch's
# mean loss; the penalty's gradient is the same on both ranks, so its average is itself. The two runs differ only in
# float32 summation order (two half-batch sums and an all-reduce against one full-batch sum): ~1 ulp (1.2e-7) per
# gradient, carried through 32 momentum-SGD steps. Measured: ≤ 5e-7 relative in Δ and in w. 1e-5 leaves a 20× margin,
# while a real mistake (a wrong shard, gradients summed instead of averaged, the penalty counted twice) moves Δ by
# 1e-2 or more. The discrete parts of Θ (quantization codes, surviving indices) must match exactly.
RTOL = 1e-5


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def test_ddp_matches_single_process_run(runs):
    ddp, single = runs["rank0"]["records"], runs["single"]["records"]
    assert len(ddp) == len(single)
    for i, (a, b) in enumerate(zip(ddp, single)):
        for name in b["deltas"]:
            assert _rel(a["deltas"][name], b["deltas"][name]) <= RTOL, f"C step {i}: Δ of {name}"
        for name in b["weights"]:
            assert _rel(a["weights"][name], b["weights"][name]) <= RTOL, f"C step {i}: weight {name}"
    qa, qb = ddp[-1]["theta"][0]["theta"], single[-1]["theta"][0]["theta"]
    assert torch.equal(qa["codes"], qb["codes"])
    assert _rel(qa["codebook"], qb["codebook"]) <= RTOL
    pa, pb = ddp[-1]["theta"][1]["theta"], single[-1]["theta"][1]["theta"]
    assert torch.equal(pa["indices"].sort().values, pb["indices"].sort().values)
    sa, sb = ddp[-1]["theta"][2]["parts"][1]["theta"], single[-1]["theta"][2]["parts"][1]["theta"]
    assert torch.equal(sa["indices"].sort().values, sb["indices"].sort().values)
    # and the final model is compressed as asked
    final = ddp[-1]["deltas"]
    assert final["fc1.weight"].unique().numel() <= 4
    assert int((final["fc2.weight"] != 0).sum() + (final["fc4.weight"] != 0).sum()) <= 300


def test_gradient_form_under_ddp_matches_single_process_and_loss_form(runs):
    """``alg.penalty_grad_(mu)`` after backward, where DDP has averaged the gradients: the ranks agree bitwise, the
    run matches the single-process gradient-form run and the loss-form run (float rounding only)."""
    g0, g1, gs, loss = (runs[k]["records"] for k in ("grad_rank0", "grad_rank1", "grad_single", "rank0"))
    assert len(g0) == len(g1) == len(gs) == len(loss) == 5
    for i in range(5):
        for key in ("theta", "deltas", "lambdas", "weights"):
            _assert_bitwise_equal(g0[i][key], g1[i][key], f"grad form, C step {i}: {key}")
        for other, what in ((gs, "single-process grad form"), (loss, "loss form under DDP")):
            for name in other[i]["weights"]:
                assert _rel(g0[i]["weights"][name], other[i]["weights"][name]) <= RTOL, f"C step {i}: {name} vs {what}"
            for name in other[i]["deltas"]:
                assert _rel(g0[i]["deltas"][name], other[i]["deltas"][name]) <= RTOL, f"C step {i}: Δ {name} vs {what}"
    assert not torch.equal(g0[0]["weights"]["fc1.weight"], g0[-1]["weights"]["fc1.weight"])


# ---- (c) a rank whose weights drifted makes c_step fail on every rank, naming the task --------------------------
def test_diverged_rank_raises_on_every_rank(runs):
    for rank in ("rank0", "rank1"):
        res = runs[rank]["diverge"]
        assert res["error"] is not None, f"{rank}: c_step did not raise"
        assert "'fc1.weight'" in res["error"] and "disagree" in res["error"], res["error"]
        # only the perturbed task is named
        assert "fc2.weight" not in res["error"] and "fc3.weight" not in res["error"], res["error"]
        assert res["state_unchanged"], f"{rank}: the failed C step changed Θ/Δ/λ"
        assert res["recovered"], f"{rank}: the C step still failed after re-synchronising the weights"


def test_failure_on_one_rank_raises_on_every_rank_without_hanging(runs):
    r0, r1 = runs["rank0"]["fail_one"], runs["rank1"]["fail_one"]
    assert r1["error"] is not None and "ValueError" in r1["error"] and "fc2.weight" in r1["error"], r1
    assert r0["error"] is not None and "another rank" in r0["error"], r0
    assert r0["seconds"] < 30, r0  # far below the process-group timeout: rank 0 did not wait for rank 1
