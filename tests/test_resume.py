"""Resumable runs: a run killed (SIGKILL), interrupted (Ctrl-C) or stopped while writing its checkpoint continues
with ``--resume`` and ends bit for bit where an uninterrupted run of the same config ends.

Everything runs on the CPU with one thread, so the uninterrupted run (in this process) and the interrupted ones
(subprocesses with OMP_NUM_THREADS=1) do the same floating-point operations in the same order. The model is the
MLP with test hooks (see ``synthetic.py``): a counter of training batches another process can watch, and a pause
at a chosen batch, so that a run is interrupted at an exact point inside an L step.
"""
import io
import json
import signal
import time
from pathlib import Path

import pytest
import torch

import synthetic as S
from lcompress.cli import main
from lcompress import experiment
from lcompress.config import load_config
from lcompress.experiment import RUN_FORMAT, RunInterrupted, run_compress

STEPS = 4
BATCHES = S.N_TRAIN // 64  # training batches per L step (batch_size 64, one epoch per step)
PAUSE_AT = 2 * BATCHES + 3  # the interrupted runs are stopped at this training batch: inside L step 3


pytestmark = pytest.mark.usefixtures("isolated_cli")


@pytest.fixture(scope="module")
def setup(tmp_path_factory, isolated_cli):
    """The data module, a reference, the run config (auto μ schedule) and the uninterrupted run's directory."""
    root = tmp_path_factory.mktemp("resume")
    with S.prepared(root, lambda ref: S.base_config(
        ref,
        model={"name": f"{S.MODULE_NAME}:traced_mlp", "args": {"sizes": S.SIZES, "dropout": 0.1}},
        schedule={"mu": "auto", "steps": STEPS, "mu0": None, "factor": None},
    )) as cfg:
        baseline = root / "baseline"
        run_compress(load_config(cfg), baseline, progress=False)
        yield root, cfg, baseline


def final(run: Path) -> dict:
    """What must match bitwise: final LC state, final weights, and the per-step record (but wall-clock times)."""
    res = json.loads((run / "results.json").read_text())
    steps = [{k: v for k, v in s.items() if k != "seconds"} for s in res["steps"]]
    return {
        "lc": torch.load(run / "lc_state.pt", weights_only=True),
        "model": torch.load(run / "checkpoint.pt", weights_only=True)["model"],
        "steps": steps,
        "schedule": res["schedule"],
        "direct_compression": res["direct_compression"],
    }


def assert_matches_baseline(run: Path, baseline: Path) -> None:
    got, want = final(run), final(baseline)
    assert len(want["steps"]) == STEPS and want["lc"]["step"] == STEPS
    S.assert_same(got, want)
    assert not list(run.glob("*.tmp"))


def checkpoint_step(run: Path) -> int:
    ck = torch.load(run / "checkpoint.pt", weights_only=True)
    assert ck["format"] == RUN_FORMAT
    return int(ck["step"])


def interrupted_subprocess(root: Path, cfg: Path, run: Path, trace: Path, stop):
    """Start ``lcompress compress``; when it is at training batch ``PAUSE_AT`` (L step 3, after step 2's checkpoint
    was written) ``stop(proc)`` and let it go on; returns (proc, training batches it ran)."""
    go = trace.with_name("go")
    proc = S.start(["compress", str(cfg), "--out", str(run), "-q"], root, cwd=root,
                   LCTEST_TRACE=str(trace), LCTEST_PAUSE_AT=str(PAUSE_AT), LCTEST_GO=str(go))
    try:
        S.wait_for(lambda: Path(f"{trace}.paused").exists(), proc)
        assert checkpoint_step(run) == 2
        stop(proc)
        go.touch()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc, S.file_size(trace)


def test_schedule_and_baseline_are_sensible(setup):
    _, _, baseline = setup
    res = json.loads((baseline / "results.json").read_text())
    mus = res["schedule"]
    assert len(mus) == STEPS and all(b > a for a, b in zip(mus, mus[1:]))
    assert res["final"]["ratio"] > 1


def test_sigkill_in_the_middle_of_an_l_step_then_resume_is_bitwise_identical(setup, tmp_path, monkeypatch):
    root, cfg, baseline = setup
    run, trace = tmp_path / "run", tmp_path / "trace"
    proc, trained = interrupted_subprocess(root, cfg, run, trace, lambda p: p.send_signal(signal.SIGKILL))
    assert proc.returncode == -signal.SIGKILL
    assert trained == PAUSE_AT  # killed inside L step 3
    assert checkpoint_step(run) == 2
    assert len(json.loads((run / "results.json").read_text())["steps"]) == 2
    assert not (run / "lc_state.pt").exists()

    resumed_trace = tmp_path / "resumed_trace"
    monkeypatch.setenv("LCTEST_TRACE", str(resumed_trace))
    assert main(["compress", str(cfg), "--resume", str(run), "-q"]) == 0
    assert S.file_size(resumed_trace) == 2 * BATCHES  # steps 3 and 4 only
    assert_matches_baseline(run, baseline)


class Crash(BaseException):
    """Stands for the process dying in the middle of writing a file."""


def test_a_checkpoint_write_that_died_midway_is_never_loaded(setup, tmp_path, monkeypatch):
    root, cfg, baseline = setup
    run = tmp_path / "run"
    real_save = torch.save

    def dying_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == RUN_FORMAT and obj["step"] == 3:
            buf = io.BytesIO()
            real_save(obj, buf, *args, **kwargs)
            f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
            f.flush()
            raise Crash
        return real_save(obj, f, *args, **kwargs)

    with monkeypatch.context() as mp:
        mp.setattr(torch, "save", dying_save)
        with pytest.raises(Crash):
            run_compress(load_config(cfg), run, progress=False)
    assert checkpoint_step(run) == 2  # the good one from before, intact
    assert not (run / "checkpoint.pt.tmp").exists()  # the half-written file was removed on the way out
    # a process killed in the middle of a write leaves its temporary file behind: plant one, half of a later
    # checkpoint, and make sure the resumed run reads the good checkpoint.pt and not this
    full = (baseline / "checkpoint.pt").read_bytes()
    (run / "checkpoint.pt.tmp").write_bytes(full[: len(full) // 2])
    with pytest.raises(Exception):
        torch.load(run / "checkpoint.pt.tmp", weights_only=True)

    trace = tmp_path / "trace"
    monkeypatch.setenv("LCTEST_TRACE", str(trace))

    def no_measuring(*args, **kwargs):
        raise AssertionError("the auto schedule was measured again instead of read from the checkpoint")

    monkeypatch.setattr(experiment, "measure_loss_and_grad", no_measuring)
    run_compress(load_config(cfg), run, resume=True, progress=False)
    assert S.file_size(trace) == 2 * BATCHES  # resumed after step 2
    assert_matches_baseline(run, baseline)


def snapshot(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}


def test_resume_with_a_changed_config_is_refused_and_force_proceeds(setup, tmp_path, capsys):
    root, cfg, baseline = setup
    run = tmp_path / "run"
    calls = []

    def stop_in_step_3():
        calls.append(1)
        return len(calls) > S.PHASE_POLLS + 2 * BATCHES + 2

    with pytest.raises(RunInterrupted):
        run_compress(load_config(cfg), run, progress=False, should_stop=stop_in_step_3)
    assert checkpoint_step(run) == 2
    before = snapshot(run)

    for argv in (["compress", str(cfg), "--resume", str(run)], ["compress", "--resume", str(run)]):
        assert main([*argv, "--set", "optimizer.lr=0.01", "-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("lcompress: error: ") and err.count("\n") == 1, err
        assert "optimizer.lr: 0.05 -> 0.01" in err and "--force" in err
        assert snapshot(run) == before

    # --force cannot make a checkpoint fit a different compression: still refused, nothing touched
    assert main(["compress", str(cfg), "--resume", str(run), "--set", "tasks.0.compression.k=4", "--force", "-q"]) == 2
    err = capsys.readouterr().err
    assert "cannot resume" in err and "tasks.0.compression.k: 2 -> 4" in err and err.count("\n") == 1, err
    assert snapshot(run) == before

    assert main(["compress", str(cfg), "--resume", str(run), "--set", "optimizer.lr=0.01", "--force", "-q"]) == 0
    res = json.loads((run / "results.json").read_text())
    assert [s["step"] for s in res["steps"]] == [1, 2, 3, 4]
    want = json.loads((baseline / "results.json").read_text())
    assert final(run)["steps"][:2] == final(baseline)["steps"][:2]  # kept from before the change
    for s in res["steps"][2:]:  # the new learning rate from step 3 on (clipped to 1/μ)
        assert s["lr"] == pytest.approx(min(0.01 * 0.95 ** (s["step"] - 1), 1 / s["mu"]))
    assert res["steps"][2]["lr"] != want["steps"][2]["lr"]
    assert res["schedule"] == want["schedule"]  # the auto schedule came from the checkpoint
    assert json.loads((run / "config.json").read_text())["optimizer"]["lr"] == 0.01
    assert res["resumed_with_changes"] == [["optimizer.lr: 0.05 -> 0.01"]]


def test_ctrl_c_exits_130_keeps_the_results_and_resume_finishes(setup, tmp_path, monkeypatch):
    root, cfg, baseline = setup
    run, trace = tmp_path / "run", tmp_path / "trace"

    def ctrl_c(proc):
        proc.send_signal(signal.SIGINT)
        time.sleep(0.05)  # let its handler run before the paused batch goes on

    proc, trained = interrupted_subprocess(root, cfg, run, trace, ctrl_c)
    assert proc.returncode == 130, proc.stderr.read()
    err = proc.stderr.read()
    assert "interrupted" in err and f"--resume {run}" in err
    assert PAUSE_AT <= trained < 3 * BATCHES  # it stopped after the minibatch it was in, inside L step 3
    assert checkpoint_step(run) == 2
    assert [s["step"] for s in json.loads((run / "results.json").read_text())["steps"]] == [1, 2]
    assert not (run / "lc_state.pt").exists()

    # resume from the run directory alone (its config.json)
    resumed_trace = tmp_path / "resumed_trace"
    monkeypatch.setenv("LCTEST_TRACE", str(resumed_trace))
    assert main(["compress", "--resume", str(run), "-q"]) == 0
    assert S.file_size(resumed_trace) == 2 * BATCHES
    assert_matches_baseline(run, baseline)
