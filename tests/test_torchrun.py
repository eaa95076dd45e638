"""``lcompress compress`` under ``torchrun``: 2 CPU ranks (gloo), launched the way a user launches them.

    torchrun --nproc_per_node=2 --standalone --no-python lcompress compress cfg.toml --out RUN

One uninterrupted launch is checked for a single set of run files written by rank 0 and compared with a
single-process run of the same config (same global batch: the config's ``batch_size`` is split over the ranks); one
launch is stopped by SIGINT to the launcher and resumed under ``torchrun``; and ranks that find different
checkpoints in the run directory must refuse to resume. The config mixes compressions (adaptive quantization, low
rank, pruning) over a geometric μ schedule; the model is the synthetic MLP with test hooks (``synthetic.py``), so
that a launch can be paused at an exact training batch.

Why a tolerance against the single process, and which: with per-rank batches of 32, DDP all-reduces the ranks'
mean gradients and divides by 2; the single process takes the mean over the 64 samples at once. The two are the
same sum in a different order, so each L step differs only by float32 rounding (measured: weights 1e-7 relative
after 24 SGD steps). The C steps see those weights; quantization codes and pruned indices come out the same, and a
rank-4 truncated SVD magnifies the perturbation by the inverse gap of the singular values (measured: Δ of the
low-rank layer 4e-6 relative). ``REL`` leaves 25x room over that and is still far below what a real difference
makes (a rank training on the wrong shard, or a loss taken over one rank's shard only: 1e-2 to 1e-1). Two runs
under torchrun with the same world size do the same sums in the same order, so the resumed run is compared with the
uninterrupted one bit for bit.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import synthetic as S
from lcompress.cli import EXIT_BAD_INPUT
from lcompress.config import load_config
from lcompress.experiment import RunInterrupted, run_compress

pytestmark = [
    pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                       reason="torch.distributed with gloo is not available"),
    pytest.mark.usefixtures("isolated_cli"),
]

WORLD = 2
STEPS = 3
BATCH = 64  # the global batch; each rank trains on BATCH // WORLD
BATCHES = S.N_TRAIN // BATCH  # minibatches per L step, on every rank
PAUSE_AT = 2 * BATCHES + 3  # the interrupted launch gets SIGINT at this batch (per rank): inside L step 3
TIMEOUT_S = 120  # a healthy launch takes ~6 s on 2 shared cores; a hang must fail, not block the suite
REL = 1e-4  # see the module docstring
RUN_FILES = {"config.json", "results.json", "checkpoint.pt", "lc_state.pt", "model.lcz", "log.txt"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory, isolated_cli):
    """The data module, a reference, the config, and the single-process run of it (in this process)."""
    root = tmp_path_factory.mktemp("torchrun")
    with S.prepared(root, lambda ref: S.base_config(
        ref,
        model={"name": f"{S.MODULE_NAME}:traced_mlp", "args": {"sizes": S.SIZES}},  # test hooks, no dropout
        data={"batch_size": BATCH},
        schedule={"mu": "geometric", "mu0": 1e-3, "factor": 3.0, "steps": STEPS},
        tasks=[
            {"params": "fc1.weight", "compression": {"type": "AdaptiveQuantization", "k": 2}},
            {"params": "fc2.weight", "compression": {"type": "LowRank", "rank": 4}},
            {"params": "fc3.weight", "compression": {"type": "ConstraintL0Pruning", "fraction": 0.25}},
        ],
    )) as cfg:
        single = root / "single"
        run_compress(load_config(cfg), single, progress=False)
        yield root, cfg, single


class Launch:
    """``torchrun ... lcompress ARGS`` (or another ``launcher_entry``) in ``cwd``, its output read as it comes
    (``err_text()`` so far)."""

    def __init__(self, args: list[str], root: Path, cwd: Path, launcher_entry: str | None = None, **extra: str) -> None:
        exe = Path(sys.executable).with_name("torchrun")
        launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
        self.argv = [*launcher, f"--nproc_per_node={WORLD}", "--standalone", "--no-python",
                     launcher_entry or S.lcompress_exe(), *args]
        self.proc = subprocess.Popen(self.argv, cwd=cwd, env=S.subprocess_env(root, **extra), stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True)
        self.out: list[str] = []
        self.err: list[str] = []
        self.readers = [threading.Thread(target=self._read, args=(f, buf), daemon=True)
                        for f, buf in ((self.proc.stdout, self.out), (self.proc.stderr, self.err))]
        for t in self.readers:
            t.start()
        self.started = time.monotonic()

    @staticmethod
    def _read(stream, buf: list[str]) -> None:
        for line in stream:
            buf.append(line)

    def err_text(self) -> str:
        return "".join(self.err)

    def wait_for(self, predicate) -> None:
        """Poll until ``predicate()``; fail if the launcher exits first or the time runs out."""
        while not predicate():
            if self.proc.poll() is not None:
                pytest.fail(f"torchrun exited early (rc {self.proc.returncode}):\n{self.err_text()}")
            if time.monotonic() - self.started > TIMEOUT_S:
                pytest.fail(f"timed out waiting:\n{self.err_text()}")
            time.sleep(0.005)

    def wait(self) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout=max(1.0, TIMEOUT_S - (time.monotonic() - self.started)))
        except subprocess.TimeoutExpired:
            self.kill()
            pytest.fail(f"{' '.join(self.argv)} did not finish in {TIMEOUT_S} s:\n{self.err_text()}")
        for t in self.readers:
            t.join(timeout=10)
        self.seconds = time.monotonic() - self.started
        return self.proc.returncode, "".join(self.out), self.err_text()

    def kill(self) -> None:
        """Stop a launch that is still running, workers included (they run in sessions of their own)."""
        if self.proc.poll() is not None:
            return
        workers = _children(self.proc.pid)
        self.proc.terminate()  # torchrun passes SIGTERM on to its workers and waits for them
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for pid in workers:
            try:
                if "lcompress" in Path(f"/proc/{pid}/cmdline").read_text():  # still ours, not a reused pid
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass


def _children(pid: int) -> list[int]:
    """Process ids whose parent is ``pid`` (Linux /proc; empty elsewhere)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def launch(args, root, cwd, launcher_entry=None, **extra) -> tuple[int, str, str]:
    run = Launch(args, root, cwd, launcher_entry, **extra)
    try:
        return run.wait()
    finally:
        run.kill()


@pytest.fixture(scope="module")
def torchrun_run(setup, tmp_path_factory):
    """One uninterrupted launch (with console logging, so duplicated log lines would show)."""
    root, cfg, _ = setup
    cwd = tmp_path_factory.mktemp("cwd")
    rc, out, err = launch(["compress", str(cfg), "--out", "run"], root, cwd)
    return cwd, cwd / "run", rc, out, err


# ---- helpers ----------------------------------------------------------------------------------------------------
def results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def lc_state(run: Path) -> dict:
    return torch.load(run / "lc_state.pt", weights_only=True)


def model_state(run: Path) -> dict:
    return torch.load(run / "checkpoint.pt", weights_only=True)["model"]


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def without_times(res: dict) -> dict:
    steps = [{k: v for k, v in s.items() if k != "seconds"} for s in res["steps"]]
    return {"steps": steps, "schedule": res["schedule"], "direct_compression": res["direct_compression"]}


# ---- the tests --------------------------------------------------------------------------------------------------
def test_torchrun_run_finishes_and_only_rank_0_writes(torchrun_run):
    cwd, run, rc, out, err = torchrun_run
    assert rc == 0, err
    assert {p.name for p in run.iterdir()} == RUN_FILES  # no per-rank copies, no stray .tmp
    assert {p.name for p in cwd.iterdir()} == {"run"}  # nothing written beside it (e.g. a default runs/ directory)
    res = results(run)
    assert res["world_size"] == WORLD  # the workers joined one group (two lone processes would each say 1)
    assert [s["step"] for s in res["steps"]] == list(range(1, STEPS + 1))
    assert lc_state(run)["step"] == STEPS
    # rank 0 speaks for both: the table, the step lines and the warning once (rank 1 only logs errors)
    assert out.count("run directory: run") == 1 and out.count("direct compression") == 1, out
    assert err.count("LC step 1/3:") == 1, err
    assert err.count("the run ended infeasible") == 1, err  # 3 steps of a small μ leave it infeasible
    log = (run / "log.txt").read_text()
    assert [line.count("LC step") for line in log.splitlines() if "LC step" in line] == [1] * STEPS, log


def test_torchrun_run_matches_the_single_process_run(setup, torchrun_run):
    _, _, single = setup
    _, run, rc, _, err = torchrun_run
    assert rc == 0, err
    got, want = results(run), results(single)
    assert got["schedule"] == want["schedule"] and len(got["steps"]) == STEPS
    assert got["direct_compression"] == want["direct_compression"]  # from the same reference: no training yet
    for g, w in zip(got["steps"], want["steps"]):
        assert (g["mu"], g["lr"]) == (w["mu"], w["lr"])
        # the loss of the step over the global batch (each rank saw half of every batch)
        assert g["loss"] == pytest.approx(w["loss"], rel=REL), g["step"]
        assert g["penalty"] == pytest.approx(w["penalty"], rel=REL), g["step"]
        assert g["feasibility"] == pytest.approx(w["feasibility"], rel=REL), g["step"]
        assert (g["compressed_bits"], g["task_bits"]) == (w["compressed_bits"], w["task_bits"]), g["step"]
        # test errors of Δ(Θ) and of w: a weight a rounding error away from a decision boundary may flip one sample
        assert g["test_error"] == pytest.approx(w["test_error"], abs=100 / S.N_TEST + 1e-9), g["step"]
        assert g["test_error_w"] == pytest.approx(w["test_error_w"], abs=100 / S.N_TEST + 1e-9), g["step"]
    assert got["final"]["test_error"] == pytest.approx(want["final"]["test_error"], abs=100 / S.N_TEST + 1e-9)

    a, b = lc_state(run), lc_state(single)
    assert a["deltas"].keys() == b["deltas"].keys() == {"fc1.weight", "fc2.weight", "fc3.weight"}
    for name in b["deltas"]:  # Δ(Θ) and λ per parameter
        assert rel_diff(a["deltas"][name], b["deltas"][name]) <= REL, name
        assert rel_diff(a["lambdas"][name], b["lambdas"][name]) <= REL, name
    quant, _, prune = (t["compression"]["theta"] for t in a["tasks"])
    quant_1, _, prune_1 = (t["compression"]["theta"] for t in b["tasks"])
    assert torch.equal(quant["codes"], quant_1["codes"])  # the discrete parts of Θ agree exactly
    assert torch.equal(prune["indices"], prune_1["indices"])
    wa, wb = model_state(run), model_state(single)
    for name in wb:
        assert rel_diff(wa[name], wb[name]) <= REL, name


def test_sigint_to_torchrun_stops_every_rank_and_resume_under_torchrun_finishes(setup, torchrun_run, tmp_path):
    root, cfg, _ = setup
    _, uninterrupted, rc0, _, _ = torchrun_run
    assert rc0 == 0
    run, trace, go = tmp_path / "run", tmp_path / "trace", tmp_path / "go"
    # both ranks wait at training batch PAUSE_AT (each counts its own) until `go` exists; both append to `trace`
    launch_ = Launch(["compress", str(cfg), "--out", str(run), "-q"], root, tmp_path,
                     LCTEST_TRACE=str(trace), LCTEST_PAUSE_AT=str(PAUSE_AT), LCTEST_GO=str(go))
    try:
        launch_.wait_for(lambda: Path(f"{trace}.paused").exists())
        assert int(torch.load(run / "checkpoint.pt", weights_only=True)["step"]) == 2
        launch_.proc.send_signal(signal.SIGINT)  # Ctrl-C in the terminal reaches the launcher only
        # torchrun passes SIGINT on to every worker; rank 0 acknowledges it
        launch_.wait_for(lambda: "stopping after the current minibatch" in launch_.err_text())
        go.touch()
        rc, _, err = launch_.wait()
    finally:
        launch_.kill()
    # torchrun itself re-raises the signal (SignalException, exit 1); its workers stopped by themselves, quickly
    assert rc != 0
    assert err.count("lcompress: interrupted: stopped during LC step 3") == 1, err  # from rank 0 only
    assert f"--resume {run}" in err
    assert "lcompress: aborted" not in err, err  # no rank died of KeyboardInterrupt
    assert err.count("Traceback") == err.count("SignalException: Process"), err  # the launcher's own, no worker's
    assert "Unable to shutdown process" not in err, err  # no worker needed SIGKILL
    trained = S.file_size(trace)
    assert trained % WORLD == 0 and WORLD * PAUSE_AT <= trained <= WORLD * 3 * BATCHES  # same batch, inside step 3
    assert int(torch.load(run / "checkpoint.pt", weights_only=True)["step"]) == 2
    assert [s["step"] for s in results(run)["steps"]] == [1, 2]
    assert {p.name for p in run.iterdir()} == {"config.json", "results.json", "checkpoint.pt", "log.txt"}

    # resume under torchrun from the run directory alone: every rank loads the checkpoint, rank 0 writes
    resumed_trace = tmp_path / "resumed_trace"
    rc, out, err = launch(["compress", "--resume", str(run), "-q"], root, tmp_path, LCTEST_TRACE=str(resumed_trace))
    assert rc == 0, err
    assert S.file_size(resumed_trace) == WORLD * BATCHES  # L step 3 only, on each rank
    assert out.count("run directory") == 1
    assert {p.name for p in run.iterdir()} == RUN_FILES
    # bit for bit what the uninterrupted launch ended with
    S.assert_same(lc_state(run), lc_state(uninterrupted), "lc_state")
    S.assert_same(model_state(run), model_state(uninterrupted), "model")
    S.assert_same(without_times(results(run)), without_times(results(uninterrupted)), "results")


def test_dropout_draws_differ_across_ranks_and_resume_bit_for_bit(setup, tmp_path):
    """Each rank has its own RNG stream for the model's randomness (its shard must not reuse the other rank's
    dropout masks), the checkpoint keeps every rank's state, and a run killed inside L step 3 resumes to exactly
    what an uninterrupted launch ends with."""
    import tomllib

    root, cfg, _ = setup
    raw = tomllib.loads(cfg.read_text())
    raw["model"]["args"]["dropout"] = 0.1
    dcfg = S.write_config(tmp_path / "cfg_dropout.toml", raw)
    full = tmp_path / "full"
    rc, _, err = launch(["compress", str(dcfg), "--out", str(full), "-q"], root, tmp_path)
    assert rc == 0, err
    states = torch.load(full / "checkpoint.pt", weights_only=True)["rng"]["torch"]
    assert isinstance(states, list) and len(states) == WORLD and not torch.equal(states[0], states[1])

    run, trace, go = tmp_path / "run", tmp_path / "trace", tmp_path / "go"
    killed = Launch(["compress", str(dcfg), "--out", str(run), "-q"], root, tmp_path,
                    LCTEST_TRACE=str(trace), LCTEST_PAUSE_AT=str(PAUSE_AT), LCTEST_GO=str(go))
    try:
        killed.wait_for(lambda: Path(f"{trace}.paused").exists())
    finally:
        killed.kill()  # inside L step 3: the checkpoint holds step 2
    assert int(torch.load(run / "checkpoint.pt", weights_only=True)["step"]) == 2
    rc, _, err = launch(["compress", "--resume", str(run), "-q"], root, tmp_path)
    assert rc == 0, err
    S.assert_same(lc_state(run), lc_state(full), "lc_state")
    S.assert_same(model_state(run), model_state(full), "model")
    S.assert_same(without_times(results(run)), without_times(results(full)), "results")
    # and dropout made a difference: the run is not the dropout-free one
    assert not torch.equal(model_state(full)["fc1.weight"], model_state(setup[2])["fc1.weight"])


def test_ranks_that_find_different_checkpoints_refuse_to_resume(setup, tmp_path):
    """Every rank reads the run directory itself. Where the ranks do not see the same one (no shared filesystem,
    or a copy that is not up to date) they must stop with an error instead of training from different states and
    hanging in the first collective that one of them skips. Here rank r resumes ``dir<r>`` (through a shell that
    reads RANK): a run stopped after LC step 1 and a copy of it whose checkpoint is a finished run's."""
    root, cfg, single = setup
    behind = tmp_path / "dir0"
    calls = []

    def stop_in_step_2():
        calls.append(1)
        return len(calls) > S.PHASE_POLLS + BATCHES + 2

    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        with pytest.raises(RunInterrupted):
            run_compress(load_config(cfg), behind, progress=False, should_stop=stop_in_step_2)
    ahead = tmp_path / "dir1"
    shutil.copytree(behind, ahead)
    shutil.copy(single / "checkpoint.pt", ahead / "checkpoint.pt")
    steps = [int(torch.load(d / "checkpoint.pt", weights_only=True)["step"]) for d in (behind, ahead)]
    assert steps == [1, STEPS]
    before = {d: {p.name: p.read_bytes() for p in d.iterdir()} for d in (behind, ahead)}

    script = 'exec "$0" compress --resume "$1$RANK" -q'
    rc, _, err = launch(["-c", script, S.lcompress_exe(), str(tmp_path / "dir")], root, tmp_path, launcher_entry="sh")
    assert rc != 0
    assert "lcompress: error: " in err, err
    assert "the ranks found different checkpoints there (from LC step 1 to 3)" in err, err
    # torchrun's table of failed workers: the CLI's bad-input code, or SIGTERM from torchrun for one that was still
    # on its way out when the other ended; no crash (a worker that raised out of a collective would say 1)
    codes = {int(c) for c in re.findall(r"exitcode\s*:\s*(-?\d+)", err)}
    assert EXIT_BAD_INPUT in codes and codes <= {EXIT_BAD_INPUT, -signal.SIGTERM}, err
    for d in (behind, ahead):  # refused before writing anything
        assert {p.name: p.read_bytes() for p in d.iterdir()} == before[d]
