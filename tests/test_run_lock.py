"""One process per run directory: a second ``compress``, ``compress --resume`` or ``export`` there is refused
(exit 2, nothing touched) while the first runs; a killed holder's lock does not block; temporaries are unique per
write, and those a killed process left are removed on resume."""
import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import synthetic as S
from lcompress._io import atomic_write
from lcompress._rundir import LOCK_NAME, DirectoryBusy, DirectoryLock, remove_stale_temporaries
from test_cli import run_main, snapshot

pytestmark = pytest.mark.usefixtures("isolated_cli")

STEPS = 3
BATCHES = S.N_TRAIN // 64
PAUSE_AT = BATCHES + 3  # inside L step 2, after step 1's checkpoint


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lock")
    with S.prepared(root, lambda ref: S.base_config(
        ref, model={"name": f"{S.MODULE_NAME}:traced_mlp", "args": {"sizes": S.SIZES}},
        schedule={"steps": STEPS},
    )) as cfg:
        yield root, cfg


def test_a_second_lock_is_refused_even_in_the_same_process_and_released_locks_vanish(tmp_path):
    with DirectoryLock(tmp_path, "run directory") as first:
        assert first.held and (tmp_path / LOCK_NAME).is_file()
        with pytest.raises(DirectoryBusy, match=r"run directory '.*' is in use by another lcompress process"):
            DirectoryLock(tmp_path, "run directory").acquire()
        assert first.held
    assert not (tmp_path / LOCK_NAME).exists()
    with DirectoryLock(tmp_path):  # free again
        pass


def test_a_killed_holders_lock_file_does_not_block(tmp_path):
    holder = subprocess.Popen(
        # the lock protocol by hand (DirectoryLock's import would bring torch: seconds, for nothing)
        [sys.executable, "-c", textwrap.dedent(f"""
            import fcntl, os, time
            fd = os.open({str(tmp_path / LOCK_NAME)!r}, os.O_RDWR | os.O_CREAT, 0o666)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            print("locked", flush=True)
            time.sleep(120)
        """)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(DirectoryBusy):  # another process really holds it
            DirectoryLock(tmp_path).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait(timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
            holder.wait()
    assert (tmp_path / LOCK_NAME).exists()  # left behind by the kill, but unlocked
    with DirectoryLock(tmp_path) as lock:
        assert lock.held


def test_a_second_run_on_a_directory_in_use_is_refused_and_a_kill_frees_it(setup, tmp_path):
    root, cfg = setup
    run, trace, go = tmp_path / "run", tmp_path / "trace", tmp_path / "go"
    proc = S.start(["compress", str(cfg), "--out", str(run), "-q"], root, cwd=root,
                   LCTEST_TRACE=str(trace), LCTEST_PAUSE_AT=str(PAUSE_AT), LCTEST_GO=str(go))
    try:
        S.wait_for(lambda: Path(f"{trace}.paused").exists(), proc)
        assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 1
        before = snapshot(run)
        for argv in (["compress", "--resume", str(run)], ["compress", str(cfg), "--out", str(run)],
                     ["compress", str(cfg), "--resume", str(run), "--force", "--set", "optimizer.lr=0.01"],
                     ["export", str(run)]):
            rc, _, err = run_main([*argv, "-q"])
            assert rc == 2, (argv, err)
            assert err.startswith("lcompress: error: ") and err.count("\n") == 1, err
            assert f"run directory {str(run)!r} is in use by another lcompress process" in err, err
            assert snapshot(run) == before
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert (run / LOCK_NAME).exists()
    # temporaries a killed writer would leave (atomic_write's, the old fixed name, tempfile's), and a file of the
    # user's that merely ends in .tmp
    stale = ["checkpoint.pt.4242.0123abcd.tmp", "results.json.tmp", "model.lcz.k3j_x9.tmp"]
    for name in stale + ["notes.tmp"]:
        (run / name).write_bytes(b"partial")
    rc, _, err = run_main(["compress", "--resume", str(run), "-q"])
    assert rc == 0, err
    res = json.loads((run / "results.json").read_text())
    assert [s["step"] for s in res["steps"]] == list(range(1, STEPS + 1))
    assert not any((run / n).exists() for n in stale) and (run / "notes.tmp").read_bytes() == b"partial"
    assert not (run / LOCK_NAME).exists()  # released at the end


def test_a_new_directory_is_locked_when_created_and_the_loser_writes_nothing(setup, tmp_path, monkeypatch):
    """Two fresh runs into one new directory: both validate (it does not exist yet); the one that comes second to
    the lock is refused there, before it writes its config.json or log."""
    from lcompress import experiment

    _, cfg = setup
    run = tmp_path / "run"
    real = experiment.prepare_reference
    winner = []

    def meanwhile_another_run_creates_it(*args, **kwargs):
        run.mkdir()
        winner.append(DirectoryLock(run, "run directory").acquire())
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "prepare_reference", meanwhile_another_run_creates_it)
    rc, _, err = run_main(["compress", str(cfg), "--out", str(run), "-q"])
    assert rc == 2 and f"run directory {str(run)!r} is in use by another lcompress process" in err, err
    assert err.count("\n") == 1
    assert sorted(p.name for p in run.iterdir()) == [LOCK_NAME]  # the winner's, and nothing of the loser's
    winner[0].release()


def test_a_directory_a_run_finished_in_while_we_validated_is_not_overwritten(setup, tmp_path, monkeypatch):
    """The holds-a-run check is repeated under the lock: a run that finished in the directory after our first
    look (it did not exist then) is not overwritten."""
    from lcompress import experiment

    _, cfg = setup
    run, other = tmp_path / "run", tmp_path / "other"
    assert run_main(["compress", str(cfg), "--out", str(other), "-q"])[0] == 0
    real = experiment.prepare_reference

    def meanwhile_a_run_finishes_there(*args, **kwargs):
        import shutil

        shutil.copytree(other, run)
        return real(*args, **kwargs)

    monkeypatch.setattr(experiment, "prepare_reference", meanwhile_a_run_finishes_there)
    rc, _, err = run_main(["compress", str(cfg), "--out", str(run), "-q"])
    assert rc == 2 and "already holds a run" in err, err
    assert snapshot(run) == snapshot(other)


def test_two_writers_of_one_file_never_share_a_temporary(tmp_path):
    """With one fixed temporary name the inner write would replace (and then rename away) the outer's temporary,
    and the outer's rename would fail or publish the inner's bytes."""
    path = tmp_path / "results.json"
    names = []

    def outer(f):
        names.append(Path(f.name).name)
        f.write(b"outer")
        atomic_write(path, lambda g: (names.append(Path(g.name).name), g.write(b"inner")))

    atomic_write(path, outer)
    assert path.read_bytes() == b"outer"  # the last rename wins, each with its own bytes
    assert len(set(names)) == 2 and all(n.startswith("results.json.") and n.endswith(".tmp") for n in names)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    mode = path.stat().st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_remove_stale_temporaries_touches_only_the_named_files(tmp_path):
    for name in ("checkpoint.pt.1.ab.tmp", "config.json.tmp", "checkpoint.pt", "other.pt.1.ab.tmp", "x.tmp"):
        (tmp_path / name).write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path, ("checkpoint.pt", "config.json"))
    assert sorted(p.name for p in removed) == ["checkpoint.pt.1.ab.tmp", "config.json.tmp"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt", "other.pt.1.ab.tmp", "x.tmp"]


def test_a_demo_or_sweep_directory_in_use_is_refused_before_anything_is_removed(setup, tmp_path):
    _, cfg = setup
    demo = tmp_path / "demo"
    (demo / "quantize_all").mkdir(parents=True)
    (demo / "quantize_all" / "results.json").write_text("{}")  # an earlier demo's run, still being written
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    with DirectoryLock(demo, "demo directory"), DirectoryLock(sweep, "sweep directory"):
        rc, _, err = run_main(["demo", "--out", str(demo), "--overwrite", "-q"])
        assert rc == 2 and f"demo directory {str(demo)!r} is in use" in err and err.count("\n") == 1, err
        rc, _, err = run_main(["sweep", str(cfg), "--vary", "seed", "--values", "1", "--out", str(sweep), "-q"])
        assert rc == 2 and f"sweep directory {str(sweep)!r} is in use" in err and err.count("\n") == 1, err
    assert (demo / "quantize_all" / "results.json").read_text() == "{}"
    assert sorted(p.name for p in sweep.iterdir()) == []
