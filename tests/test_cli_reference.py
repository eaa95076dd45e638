"""`lcompress compress` with a reference it has to train: where it goes, what it says first, Ctrl-C during the
training and between the phases before LC step 1, and what a redirected log gets instead of progress bars."""
import json
import os
import re
import select
import signal
import subprocess
import time
from pathlib import Path

import pytest

import synthetic as S
from lcompress.config import load_config
from lcompress.experiment import RunInterrupted, run_compress

ANNOUNCE = re.compile(r"^training the reference model \(.*, (\d+) epochs, about (\d+) (s|min|h) on this machine; "
                      r"Ctrl-C stops it\) -> (.+)$", re.M)


@pytest.fixture(scope="module", autouse=True)
def _isolated():
    with S.one_thread(), S.cli_logging_restored():
        yield


@pytest.fixture
def synth(tmp_path, monkeypatch):
    """The data module in ``tmp_path/mod`` (on sys.path), and ``tmp_path/work`` as the current directory."""
    mod = tmp_path / "mod"
    S.write_module(mod)
    monkeypatch.syspath_prepend(str(mod))
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    for var in ("LCTEST_TRACE", "LCTEST_PAUSE_AT", "LCTEST_GO"):
        monkeypatch.delenv(var, raising=False)
    return mod, work


def config_training_a_reference(path: Path, epochs: int, steps: int = 2) -> str:
    """The traced MLP (a batch counter and a pause point, see synthetic.py), no reference.checkpoint: the reference
    is trained for ``epochs`` epochs into the run directory."""
    cfg = S.base_config(None, model={"name": "lcsynth_traced_mlp", "args": {"sizes": S.SIZES}},
                        schedule={"steps": steps})
    cfg["reference"] = {"train_epochs": epochs, "batch_size": 64}
    return str(S.write_config(path, cfg))


def files_under(directory: Path) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file()}


def test_ctrl_c_while_the_reference_trains_stops_at_once_and_leaves_no_partial_file(synth, tmp_path):
    mod, work = synth
    cfg = config_training_a_reference(tmp_path / "cfg.toml", epochs=5000)  # far longer than the test waits
    trace, go = tmp_path / "trace", tmp_path / "go"
    # minibatch 40 pauses (a few timed ones of the estimate, then the training's: 8 a epoch), so the signal
    # surely lands inside the reference's training
    proc = S.start(["compress", cfg, "--out", "run"], mod, work, LCTEST_TRACE=str(trace), LCTEST_PAUSE_AT="40",
                   LCTEST_GO=str(go))
    try:
        S.wait_for(lambda: Path(str(trace) + ".paused").exists(), proc, timeout=120)
        proc.send_signal(signal.SIGINT)
        t0 = time.monotonic()
        go.touch()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 130, err
    # stopped after the minibatch it was in: not one more was trained (the run polls after every minibatch)
    assert trace.read_bytes() == b"." * 40
    assert took < 20, took  # (the interpreter's exit included; on a calm machine about 1 s)
    # it said first where the reference goes and about how long it takes
    m = ANNOUNCE.search(err)
    assert m, err
    assert m.group(1) == "5000" and Path(m.group(4)) == work / "run" / "reference.pt"
    assert err.index("training the reference model") < err.index("lcompress: interrupted")
    assert re.search(r"^lcompress: interrupted: stopped while training the reference \(stopped in epoch \d+ of 5000\)",
                     err, re.M), err
    # files intact: the run directory holds its config and log, no reference, no checkpoint, no temporary file;
    # nothing was written outside it
    assert files_under(work) == {"run/config.json", "run/log.txt"}
    assert "training the reference model" in (work / "run" / "log.txt").read_text()
    # the same command again starts over (the directory holds no run yet), here with a short training
    cfg = config_training_a_reference(tmp_path / "cfg.toml", epochs=2, steps=1)
    p = subprocess.run([S.lcompress_exe(), "compress", cfg, "--out", "run", "-q"], cwd=work,
                       env=S.subprocess_env(mod), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert {"run/reference.pt", "run/results.json", "run/model.lcz"} <= files_under(work)


def test_reference_goes_under_the_run_directory_and_a_redirected_log_gets_lines_not_bars(synth, tmp_path):
    mod, work = synth
    cfg = config_training_a_reference(tmp_path / "cfg.toml", epochs=3, steps=3)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as f:  # stderr to a file, as `lcompress compress ... 2> log` does
        p = subprocess.run([S.lcompress_exe(), "compress", cfg, "--out", "out/run"], cwd=work,
                           env=S.subprocess_env(mod), stdout=subprocess.PIPE, stderr=f, text=True, timeout=300)
    err = log.read_text()
    assert p.returncode == 0, err
    # no bar redraws: one line per epoch of the reference and per LC step
    assert "\r" not in err and "batch/s" not in err and "it/s" not in err
    assert len(re.findall(r"^epoch \d/3 ", err, re.M)) == 3
    assert [int(k) for k in re.findall(r"^LC step (\d)/3: ", err, re.M)] == [1, 2, 3]
    # the reference was announced and went under the run's directory (not a path relative to the current one)
    m = ANNOUNCE.search(err)
    assert m and m.group(1) == "3" and Path(m.group(4)) == work / "out" / "run" / "reference.pt", err
    assert int(m.group(2)) >= 1
    assert (work / "out" / "run" / "reference.pt").is_file() and not (work / "runs").exists()
    res = json.loads((work / "out" / "run" / "results.json").read_text())
    assert res["reference"]["checkpoint"] == str(Path("out") / "run" / "reference.pt")
    assert res["reference"]["meta"]["epochs"] == 3
    assert not [p.name for p in (work / "out" / "run").iterdir() if p.name.endswith(".tmp")]


def test_progress_bars_are_drawn_on_a_terminal(synth, tmp_path):
    # the other side of the rule above: with stderr a terminal the bar is drawn (carriage-return redraws)
    mod, work = synth
    ref = tmp_path / "ref.pt"
    S.train_reference(ref)
    cfg = S.write_config(tmp_path / "cfg.toml", S.base_config(ref, schedule={"steps": 2}))
    import fcntl
    import struct
    import termios

    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 100, 0, 0))  # a bar needs a terminal's width
    proc = subprocess.Popen([S.lcompress_exe(), "compress", str(cfg), "--out", "run"], cwd=work,
                            env=S.subprocess_env(mod), stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    try:
        while True:
            ready, _, _ = select.select([master], [], [], 1.0)
            if ready:
                try:
                    data = os.read(master, 65536)
                except OSError:  # the other end closed
                    break
                if not data:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        proc.wait(timeout=300)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    err = b"".join(chunks).decode(errors="replace")
    assert proc.returncode == 0, err
    assert re.search(r"\rsynth: +\d+%\|", err), err  # the bar, redrawn in place


def test_a_stop_before_lc_step_1_writes_nothing(synth, tmp_path):
    # a stop request seen between the phases before the LC steps (here at the first check, after the data is
    # loaded) ends the run there; a run whose reference exists has written nothing yet
    mod, work = synth
    ref = tmp_path / "ref.pt"
    S.train_reference(ref)
    cfg = load_config(S.write_config(tmp_path / "cfg.toml", S.base_config(ref, schedule={"steps": 2})))
    polls = []

    def stop():
        polls.append(1)
        return True

    with pytest.raises(RunInterrupted, match=r"stopped before LC step 1; nothing was lost: the same command starts"):
        run_compress(cfg, work / "run", progress=False, should_stop=stop)
    assert polls == [1] and not (work / "run").exists()


def test_the_training_time_estimate_leaves_the_model_and_the_rng_as_they_were(synth):
    import importlib

    import torch

    from lcompress.models import get_model
    from lcompress.training import TrainingStopped, estimate_epoch_seconds, train_reference

    data = importlib.import_module(S.MODULE_NAME).load()
    torch.manual_seed(0)
    model = get_model("mlp", sizes=S.SIZES)
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rng = torch.get_rng_state()
    per_epoch = estimate_epoch_seconds(torch.nn.Sequential(model, torch.nn.Dropout(0.5)), data, batch_size=64)
    assert per_epoch > 0
    assert not model.training and all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert torch.equal(torch.get_rng_state(), rng)  # the dropout's draws were put back
    with pytest.raises(ValueError, match="batches=0"):
        estimate_epoch_seconds(model, data, batches=0)
    # the training it estimates stops right after the minibatch whose poll said so
    polls = []
    with pytest.raises(TrainingStopped, match="stopped in epoch 1 of 4"):
        train_reference(model, data, 4, batch_size=64, progress=False,
                        should_stop=lambda: polls.append(1) or len(polls) == 3)
    assert len(polls) == 3


def test_a_sweep_trains_one_reference_in_its_own_directory(synth, tmp_path):
    from lcompress.sweep import run_sweep

    mod, work = synth
    cfg = config_training_a_reference(tmp_path / "cfg.toml", epochs=2, steps=1)
    rows = run_sweep(cfg, "tasks.0.compression.k", [2, 4], work / "sweep", progress=False)
    assert {r["method"] for r in rows} == {"LC", "DC"}
    # one reference, in the sweep's directory, used by both runs (not one per run directory)
    assert files_under(work) >= {"sweep/reference.pt", "sweep/2/results.json", "sweep/4/results.json"}
    assert not [f for f in files_under(work) if f.endswith("reference.pt") and f != "sweep/reference.pt"]
    refs = {json.loads((work / "sweep" / v / "results.json").read_text())["reference"]["checkpoint"] for v in "24"}
    assert refs == {str(work / "sweep" / "reference.pt")}
