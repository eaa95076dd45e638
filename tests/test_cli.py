"""The ``lcompress`` command line end to end on a tiny synthetic problem (a few seconds per test).

Commands run in-process through ``main(argv)`` (exit codes, stdout and stderr through capsys); one test runs the
installed ``lcompress`` entry point in a subprocess.
"""
import contextlib
import csv
import hashlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

import synthetic as S
import lcompress as lc
from lcompress.config import ConfigError, parse_config
from lcompress.demo import PEERS, SCHEMES, scheme_config
from lcompress.peers import METHODS, Peer, train_peer
from lcompress.training import evaluate
from lcompress.cli import main
from lcompress.export import read as read_lcz
from lcompress.models import get_model
from lcompress.training import load_checkpoint


@pytest.fixture(scope="module", autouse=True)
def _isolated():
    """One torch thread, and the "lcompress" logger put back as it was after the CLI configured it."""
    with S.one_thread(), S.cli_logging_restored():
        yield


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    """The synthetic data module (importable for the whole module) and a trained reference checkpoint."""
    root = tmp_path_factory.mktemp("synth")
    S.write_module(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        ref = root / "reference.pt"
        S.train_reference(ref)
        yield root, ref


@pytest.fixture
def workdir(synth, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the repository's runs/
    return tmp_path


def cfg_file(path: Path, ref, **sections) -> str:
    return str(S.write_config(path, S.base_config(ref, **sections)))


def run_main(argv):
    """main(argv) with its output captured: (exit code, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(argv)
    return rc, out.getvalue(), err.getvalue()


def snapshot(directory: Path) -> dict[str, str]:
    """File name -> sha256 of every file under ``directory`` (empty if it does not exist)."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(synth, tmp_path_factory):
    """One ``lcompress compress`` run shared by the tests that look at its outputs."""
    _, ref = synth
    root = tmp_path_factory.mktemp("run")
    cfg = cfg_file(root / "cfg.toml", ref)
    rc, out, err = run_main(["compress", cfg, "--out", str(root / "run"), "-q"])
    return root / "run", cfg, rc, out, err


# ---- train ------------------------------------------------------------------------------------------------------
def test_train_writes_a_checkpoint_and_prints_the_test_error(workdir, capsys):
    out = workdir / "ref" / "mlp.pt"
    argv = ["train", "--model", "mlp", "--model-arg", f"sizes={S.SIZES}", "--dataset", f"{S.MODULE_NAME}:load",
            "--epochs", "3", "--lr", "0.05", "--batch-size", "64", "--out", str(out), "-q"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    m = re.search(r"test error (\d+\.\d+)% after 3 epochs", printed)
    assert m, printed
    model = get_model("mlp", sizes=S.SIZES)
    meta = load_checkpoint(out, model)
    assert meta["test_error"] == pytest.approx(float(m.group(1)), abs=0.006)
    assert meta["test_error"] < 50  # learned something: chance is 75%
    # the checkpoint is a usable reference
    assert meta["args"] == {"sizes": S.SIZES} and meta["dataset"] == f"{S.MODULE_NAME}:load"

    before = out.read_bytes()
    assert main(argv) == 2  # exists, no --overwrite
    err = capsys.readouterr().err
    assert err.startswith("lcompress: error: --out") and "--overwrite" in err and str(out) in err
    assert out.read_bytes() == before


def test_train_bad_model_argument_is_exit_2(workdir, capsys):
    rc = main(["train", "--model", "mlp", "--model-arg", "width=3", "--dataset", f"{S.MODULE_NAME}:load",
               "--epochs", "1", "--out", str(workdir / "x.pt"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "model.args" in err and "width" in err
    assert not (workdir / "x.pt").exists()


# ---- compress, export, inspect -----------------------------------------------------------------------------------
def test_compress_writes_results_state_and_compact_file(finished_run):
    run, _, rc, out, err = finished_run
    assert rc == 0, err
    assert "LC" in out and "direct compression" in out and f"run directory: {run}" in out
    res = json.loads((run / "results.json").read_text())
    steps = res["steps"]
    assert [s["step"] for s in steps] == [1, 2, 3, 4]
    assert [s["mu"] for s in steps] == pytest.approx([1e-3 * 3.0**k for k in range(4)])
    for s in steps:
        for key in ("mu", "loss", "test_error", "feasibility", "compressed_bits", "ratio"):
            assert isinstance(s[key], (int, float)) and s[key] == s[key], (key, s)
        assert 0 <= s["test_error"] <= 100 and s["feasibility"] >= 0
    # 3 weight matrices at 1 bit per weight plus 2 float codebook entries each, against 32 bits per weight
    n = 16 * 32 + 32 * 32 + 32 * 4
    assert steps[-1]["compressed_bits"] == n + 3 * 2 * 32 + (32 + 32 + 4) * 32
    assert steps[-1]["ratio"] == pytest.approx(steps[-1]["reference_bits"] / steps[-1]["compressed_bits"])
    assert res["final"]["test_error"] == steps[-1]["test_error"]
    assert res["direct_compression"]["test_error"] >= 0 and res["reference"]["test_error"] < 50
    for f in ("config.json", "checkpoint.pt", "lc_state.pt", "model.lcz", "log.txt"):
        assert (run / f).is_file(), f
    assert not list(run.glob("*.tmp"))
    state = torch.load(run / "lc_state.pt", weights_only=True)
    assert state["step"] == 4 and state["mu"] == pytest.approx(steps[-1]["mu"])
    assert "LC step 4/4" in (run / "log.txt").read_text()


def test_gradient_form_of_the_penalty_gives_the_same_run_up_to_rounding(finished_run, synth, tmp_path):
    """lc.penalty = "grad": the L step adds the penalty's gradient after backward; the run's records agree with
    the loss form's to float rounding, and its penalty is recorded at the end of each L step."""
    run, _, rc, _, err = finished_run
    assert rc == 0, err
    _, ref = synth
    cfg = cfg_file(tmp_path / "cfg.toml", ref, lc={"penalty": "grad"})
    rc, _, err = run_main(["compress", cfg, "--out", str(tmp_path / "run"), "-q"])
    assert rc == 0, err
    a = json.loads((run / "results.json").read_text())["steps"]
    b = json.loads((tmp_path / "run" / "results.json").read_text())["steps"]
    assert len(a) == len(b) == 4
    for x, y in zip(a, b):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3)
        assert y["feasibility"] == pytest.approx(x["feasibility"], rel=1e-2, abs=1e-6)
        assert y["penalty"] >= 0 and y["compressed_bits"] == x["compressed_bits"]


def test_export_rewrites_the_runs_compressed_model(finished_run, tmp_path, capsys):
    run = finished_run[0]
    target = tmp_path / "again.lcz"
    assert main(["export", str(run), "--out", str(target), "-q"]) == 0
    assert f"wrote {target}" in capsys.readouterr().out
    again, original = read_lcz(target)["state"], read_lcz(run / "model.lcz")["state"]
    assert again.keys() == original.keys()
    for k in original:
        assert torch.equal(again[k], original[k]), k
    # uncompressed weights come from the run's last L step, compressed ones hold 2 values each
    model = torch.load(run / "checkpoint.pt", weights_only=True)["model"]
    for k in ("fc1.bias", "fc2.bias", "fc3.bias"):
        assert torch.equal(again[k], model[k]), k
    for k in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert again[k].unique().numel() <= 2, k


def test_export_of_an_unfinished_directory_is_exit_2(tmp_path, capsys):
    assert main(["export", str(tmp_path), "-q"]) == 2
    assert "config.json is missing" in capsys.readouterr().err


def test_inspect_prints_one_row_per_task(finished_run, capsys):
    run = finished_run[0]
    assert main(["inspect", str(run / "model.lcz"), "-q"]) == 0
    out = capsys.readouterr().out
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert re.search(rf"^{re.escape(name)}\s+AdaptiveQuantization", out, re.M), out
    # and per layer, what lc.load(..., compact=True) builds and why
    compact = out[out.index("compact layers"):]
    for name in ("fc1.weight", "fc2.weight", "fc3.weight"):
        assert re.search(rf"^{re.escape(name)}\s+\(\d+, \d+\)\s+CodebookLinear\s+2-entry codebook, 1-bit codes$",
                         compact, re.M), compact
    # a file whose compressed weights would take more than the limit to decode: the task table, and a line why
    # the per-layer one is left out
    import lcompress.cli as cli

    limit = cli.INSPECT_DECODE_LIMIT
    try:
        cli.INSPECT_DECODE_LIMIT = 100
        assert main(["inspect", str(run / "model.lcz"), "-q"]) == 0
    finally:
        cli.INSPECT_DECODE_LIMIT = limit
    out = capsys.readouterr().out
    assert re.search(r"^fc1.weight\s+AdaptiveQuantization", out, re.M) and "CodebookLinear" not in out
    assert re.search(r"^compact layers: not shown \(.*more than max_bytes=100\)$", out, re.M), out
    assert main(["inspect", str(run / "nothing.lcz"), "-q"]) == 2
    assert "nothing.lcz" in capsys.readouterr().err


# ---- sweeps -----------------------------------------------------------------------------------------------------
def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_sweep_over_codebook_size_writes_csv_and_plot(synth, workdir, capsys):
    _, ref = synth
    cfg = cfg_file(workdir / "cfg.toml", ref, schedule={"steps": 3})
    out = workdir / "sweep"
    assert main(["sweep", cfg, "--vary", "tasks.0.compression.k", "--values", "2", "4", "--out", str(out), "-q"]) == 0
    rows = read_csv(out / "sweep.csv")
    assert [(r["value"], r["method"]) for r in rows] == [("2", "LC"), ("2", "DC"), ("4", "LC"), ("4", "DC")]
    ratio = {(r["value"], r["method"]): float(r["ratio"]) for r in rows}
    assert ratio[("2", "LC")] > ratio[("4", "LC")] > 1  # 1 bit per weight compresses more than 2
    assert ratio[("2", "LC")] == ratio[("2", "DC")]
    assert all(0 <= float(r["test_error"]) <= 100 for r in rows)
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for v in ("2", "4"):
        res = json.loads((out / v / "results.json").read_text())
        assert res["config"]["tasks"][0]["compression"]["k"] == int(v)
    assert "tasks.0.compression.k" in capsys.readouterr().out
    # run again: the finished runs are reused as they are; with another config the old runs are not mixed in
    runs = {v: snapshot(out / v) for v in ("2", "4")}
    assert main(["sweep", cfg, "--vary", "tasks.0.compression.k", "--values", "2", "4", "--out", str(out), "-q"]) == 0
    assert read_csv(out / "sweep.csv") == rows
    assert {v: snapshot(out / v) for v in ("2", "4")} == runs
    assert main(["sweep", cfg, "--vary", "tasks.0.compression.k", "--values", "2", "4", "--out", str(out),
                 "--set", "optimizer.lr=0.01", "-q"]) == 2
    err = capsys.readouterr().err
    assert "optimizer.lr: 0.05 -> 0.01" in err and "another --out" in err


def test_pruning_sweep_adds_the_retrain_baseline(synth, workdir):
    _, ref = synth
    cfg = cfg_file(workdir / "cfg.toml", ref, schedule={"steps": 2},
                   tasks=[{"params": r"re:fc\d\.weight", "compression": {"type": "ConstraintL0Pruning", "fraction": 0.1}}])
    out = workdir / "sweep"
    rc, _, err = run_main(["sweep", cfg, "--vary", "tasks.0.compression.fraction", "--values", "0.05", "0.2",
                           "--out", str(out), "-q"])
    assert rc == 0, err
    rows = read_csv(out / "sweep.csv")
    assert [(r["value"], r["method"]) for r in rows] == [
        ("0.05", "LC"), ("0.05", "DC"), ("0.05", "retrain"), ("0.2", "LC"), ("0.2", "DC"), ("0.2", "retrain")]
    ratio = {(r["value"], r["method"]): float(r["ratio"]) for r in rows}
    assert ratio[("0.05", "retrain")] > ratio[("0.2", "retrain")] > 1
    assert (out / "sweep.png").is_file()


def test_sweep_with_a_bad_key_is_exit_2(synth, workdir, capsys):
    _, ref = synth
    cfg = cfg_file(workdir / "cfg.toml", ref)
    assert main(["sweep", cfg, "--vary", "tasks.0.compression.q", "--values", "2", "--out", "s", "-q"]) == 2
    err = capsys.readouterr().err
    assert "tasks.0.compression" in err and "'q'" in err and err.count("\n") == 1
    assert main(["sweep", cfg, "--vary", "tasks.0.compression.k", "--values", "2", "--baselines", "retrain",
                 "--out", "s", "-q"]) == 2
    assert "--baselines retrain" in capsys.readouterr().err
    assert main(["sweep", cfg, "--vary", "tasks.0.compression.k", "--values", "2", "0", "--out", "s", "-q"]) == 2
    assert "k=0" in capsys.readouterr().err
    assert not (workdir / "s").exists()


# ---- bad input: exit 2, one line naming field and value, nothing written -------------------------------------
def test_a_directory_holding_a_run_is_not_overwritten(finished_run, tmp_path, capsys):
    run, cfg = finished_run[:2]
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = snapshot(copy)
    assert main(["compress", cfg, "--out", str(copy), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lcompress: error: ")
    assert "already holds a run" in err and str(copy) in err and "--resume" in err
    assert snapshot(copy) == before


@pytest.mark.parametrize("case", ["reference", "data", "schedule", "params", "set", "model_args"])
def test_bad_input_is_exit_2_with_one_line_naming_field_and_value(case, synth, workdir, capsys, monkeypatch):
    _, ref = synth
    out = workdir / "run"
    extra = []
    if case == "reference":
        missing = str(workdir / "no_reference.pt")
        cfg = cfg_file(workdir / "c.toml", missing)
        expect = ["reference.checkpoint", missing]
    elif case == "data":
        monkeypatch.delenv("LCOMPRESS_DATA", raising=False)
        empty = workdir / "empty"
        empty.mkdir()
        cfg = cfg_file(workdir / "c.toml", ref, data={"dataset": "mnist", "dir": str(empty)})
        expect = ["data.dir", str(empty), "mnist"]
    elif case == "schedule":
        cfg = cfg_file(workdir / "c.toml", ref, schedule={"mu": [0.1, 0.05, 0.2], "mu0": None, "factor": None})
        expect = ["schedule.mu.1", "0.05"]
    elif case == "params":
        cfg = cfg_file(workdir / "c.toml", ref, tasks=[
            {"params": "fc1.weight", "compression": {"type": "AdaptiveQuantization", "k": 2}},
            {"params": "fc9.weight", "compression": {"type": "AdaptiveQuantization", "k": 2}}])
        expect = ["tasks.1.params", "fc9.weight"]
    elif case == "set":
        cfg = cfg_file(workdir / "c.toml", ref)
        extra = ["--set", "tasks.0.compression.k=0"]
        expect = ["tasks.0.compression", "k=0"]
    else:
        cfg = cfg_file(workdir / "c.toml", ref, model={"args": {"sizes": S.SIZES, "depth": 3}})
        expect = ["model.args", "depth"]
    assert main(["compress", cfg, "--out", str(out), "-q", *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lcompress: error: ") and err.count("\n") == 1, err
    for e in expect:
        assert e in err, (e, err)
    assert not out.exists()  # nothing written, not even a log


def test_resume_of_a_directory_without_a_run_is_exit_2(workdir, capsys):
    assert main(["compress", "--resume", str(workdir / "nope"), "-q"]) == 2
    err = capsys.readouterr().err
    assert "not a run directory" in err and "nope" in err
    assert main(["compress", "-q"]) == 2
    assert "a config file is needed" in capsys.readouterr().err


def test_demo_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["demo", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--schemes" in out and "--reference" in out and "--steps" in out


# ---- the installed entry point ----------------------------------------------------------------------------------
def test_entry_point_in_a_subprocess(synth, workdir):
    root, ref = synth
    cfg = cfg_file(workdir / "c.toml", ref, schedule={"steps": 2})
    p = subprocess.run([S.lcompress_exe(), "compress", cfg, "--out", "run", "-q"], cwd=workdir,
                       env=S.subprocess_env(root), capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "run directory: run" in p.stdout
    res = json.loads((workdir / "run" / "results.json").read_text())
    assert len(res["steps"]) == 2 and (workdir / "run" / "model.lcz").is_file()
    bad = subprocess.run([S.lcompress_exe(), "compress", cfg, "--out", "run", "-q"], cwd=workdir,
                         env=S.subprocess_env(root), capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.startswith("lcompress: error: run directory 'run' already holds a run")


# ---- more bad input: exit 2, one line, nothing written ---------------------------------------------------------
def _bad_input_cases(workdir: Path, ref: Path) -> dict:
    """case -> (config sections, extra argv, strings the error must hold)."""
    text = workdir / "notes.pt"
    text.write_text("not a checkpoint")
    other = workdir / "other.pt"
    from lcompress.training import save_checkpoint

    save_checkpoint(other, get_model("mlp", sizes=[S.DIM, 8, S.CLASSES]), {})
    existing = workdir / "datadir"
    existing.mkdir()
    return {
        "device": ({"device": "banana"}, [], ["device='banana'", "not a torch device"]),
        "unavailable_device": ({"device": "cuda:99"}, [], ["device='cuda:99'", "not available"]),
        "weight_decay": ({"optimizer": {"weight_decay": -0.1}}, [], ["optimizer.weight_decay=-0.1", ">= 0"]),
        "penalty_fraction_inf": ({"schedule": {"mu": "auto", "mu0": None, "factor": None}},
                                 ["--set", "schedule.penalty_fraction=inf"], ["schedule.penalty_fraction=inf", "finite"]),
        "mu0_nan": ({}, ["--set", "schedule.mu0=nan"], ["schedule.mu0=nan", "finite"]),
        "mu_list_inf": ({"schedule": {"mu": [1e-3, float("inf")], "mu0": None, "factor": None}}, [],
                        ["schedule.mu", "inf"]),
        "steps_1e9": ({}, ["--set", "schedule.steps=1e9"], ["schedule.steps=1000000000.0", "expected int"]),
        "steps_int": ({}, ["--set", "schedule.steps=1000000000"], ["schedule.steps=1000000000", "100000"]),
        "mu_overflow": ({}, ["--set", "schedule.steps=200", "--set", "schedule.factor=2.0"],
                        ["schedule.steps=200", "overflows float32"]),
        "reference_not_torch": ({"ref": text}, [],
                                ["reference.checkpoint", str(text), "not a readable torch checkpoint"]),
        "reference_other_model": ({"ref": other}, [],
                                  ["reference.checkpoint", str(other), "does not fit the model", "fc1.weight"]),
        "set_below_a_string": ({}, ["--set", "name.x=1"], ["--set name.x", "name='synth'", "not a table"]),
        "set_empty_part": ({}, ["--set", "optimizer..lr=1"], ["--set optimizer..lr", "empty part"]),
        "data_dir_missing": ({"data": {"dataset": "fashion-mnist"}}, ["--data-dir", "/nonexistent/lc"],
                             ["--data-dir='/nonexistent/lc'", "not a directory"]),
        "data_dir_unused": ({}, ["--data-dir", str(existing)], ["--data-dir", "not used by data.dataset"]),
        "reference_lr": ({}, ["--set", "reference.lr=-1.0"], ["reference.lr=-1.0"]),
    }


BAD_INPUT = ["device", "unavailable_device", "weight_decay", "penalty_fraction_inf", "mu0_nan", "mu_list_inf",
             "steps_1e9", "steps_int", "mu_overflow", "reference_not_torch", "reference_other_model",
             "set_below_a_string", "set_empty_part", "data_dir_missing", "data_dir_unused", "reference_lr"]


@pytest.mark.parametrize("case", BAD_INPUT)
def test_more_bad_input_is_exit_2_with_one_line_and_nothing_written(case, synth, workdir):
    _, ref = synth
    sections, extra, expect = _bad_input_cases(workdir, ref)[case]
    cfg = cfg_file(workdir / "c.toml", sections.pop("ref", ref), **sections)
    out = workdir / "run"
    rc, _, err = run_main(["compress", cfg, "--out", str(out), "-q", *extra])
    assert rc == 2, err
    assert err.startswith("lcompress: error: ") and err.count("\n") == 1, err
    for e in expect:
        assert e in err, (e, err)
    assert not out.exists()


@pytest.mark.parametrize("name", ["../escape", "/tmp/lc_escape", "a/b", "..", ".", "", "a\\b"])
def test_a_run_name_cannot_leave_the_runs_directory(name, synth, workdir):
    _, ref = synth
    cfg = cfg_file(workdir / "c.toml", ref, name=name)
    rc, _, err = run_main(["compress", cfg, "-q"])
    assert rc == 2 and f"name={name!r}: must be a plain directory name" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in workdir.iterdir()) == ["c.toml"]
    assert not (workdir.parent / "escape").exists() and not Path("/tmp/lc_escape").exists()


@pytest.mark.parametrize("flag,value", [("--device", "banana"), ("--device", "cuda:99"), ("--weight-decay", "-1"),
                                        ("--lr", "inf"), ("--lr", "0"), ("--epochs", "-1"), ("--batch-size", "0")])
def test_bad_train_flags_are_exit_2(flag, value, synth, workdir):
    out = workdir / "ref.pt"
    rc, _, err = run_main(["train", "--model", "mlp", "--model-arg", f"sizes={S.SIZES}", "--dataset",
                           f"{S.MODULE_NAME}:load", "--epochs", "1", "--out", str(out), flag, value, "-q"])
    assert rc == 2 and err.startswith(f"lcompress: error: {flag}=") and err.count("\n") == 1, err
    assert err.startswith(f"lcompress: error: {flag}={value}") or err.startswith(f"lcompress: error: {flag}={value!r}") \
        or err.startswith(f"lcompress: error: {flag}={float(value)!r}"), err  # the bad value, as parsed
    assert not out.exists()


# ---- runtime failures: exit 3, one line, the files that were there kept ------------------------------------------
@pytest.fixture
def stopped_run(synth, workdir):
    """A run stopped after its LC step 2 of 4 (the checkpoint holds step 2)."""
    from lcompress.config import load_config
    from lcompress.experiment import RunInterrupted, run_compress

    _, ref = synth
    cfg = cfg_file(workdir / "c.toml", ref)
    run = workdir / "run"
    calls = []

    def stop_in_step_3():
        calls.append(1)
        return len(calls) > S.PHASE_POLLS + 2 * (S.N_TRAIN // 64) + 1

    with pytest.raises(RunInterrupted):
        run_compress(load_config(cfg), run, progress=False, should_stop=stop_in_step_3)
    assert torch.load(run / "checkpoint.pt", weights_only=True)["step"] == 2
    return cfg, run


def test_a_diverging_l_step_is_exit_3_and_keeps_the_last_good_step(stopped_run):
    cfg, run = stopped_run
    kept = {f: (run / f).read_bytes() for f in ("checkpoint.pt", "results.json")}
    rc, _, err = run_main(["compress", cfg, "--resume", str(run), "--force", "--set", "optimizer.lr=1e30",
                           "--set", "optimizer.clip_lr=false", "-q"])
    assert rc == 3, err
    # (the warning about the changed config comes first)
    assert err.splitlines()[-1].startswith("lcompress: error: the L step diverged at LC step 3"), err
    assert "Traceback" not in err and err.count("lcompress: error") == 1
    assert {f: (run / f).read_bytes() for f in kept} == kept
    assert not list(run.glob("*.tmp"))


def test_a_full_disk_is_exit_3_and_keeps_every_file_whole(stopped_run, monkeypatch):
    import errno

    from lcompress.experiment import RUN_FORMAT

    cfg, run = stopped_run
    kept = {f: (run / f).read_bytes() for f in ("checkpoint.pt", "results.json", "config.json")}
    real_save = torch.save

    def full_disk_save(obj, f, *args, **kwargs):
        if isinstance(obj, dict) and obj.get("format") == RUN_FORMAT:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk_save)
    rc, _, err = run_main(["compress", "--resume", str(run), "-q"])
    assert rc == 3, err
    assert err.count("\n") == 1 and err.startswith("lcompress: error: [Errno 28] No space left on device"), err
    assert {f: (run / f).read_bytes() for f in kept} == kept and not list(run.glob("*.tmp"))
    monkeypatch.setattr(torch, "save", real_save)
    rc, _, err = run_main(["compress", "--resume", str(run), "-q"])  # room again: it goes on from step 2
    assert rc == 0, err
    assert [s["step"] for s in json.loads((run / "results.json").read_text())["steps"]] == [1, 2, 3, 4]


def test_a_log_file_that_cannot_be_written_is_one_warning_not_a_traceback_per_line(synth, workdir, monkeypatch):
    import errno
    import logging

    class FullDisk(io.StringIO):
        def write(self, s):
            raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(logging.FileHandler, "_open", lambda self: FullDisk())
    _, ref = synth
    cfg = cfg_file(workdir / "c.toml", ref, schedule={"steps": 2})
    rc, _, err = run_main(["compress", cfg, "--out", str(workdir / "run"), "-v"])
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "log file" in line]
    assert len(warnings) == 1 and "No space left on device" in warnings[0], err
    assert "Traceback" not in err and "Logging error" not in err
    assert (workdir / "run" / "model.lcz").is_file()


@pytest.fixture
def read_only(monkeypatch):
    """``read_only(d)``: every write, creation, rename or removal under ``d`` fails with EROFS, as on a read-only
    mount (chmod cannot stand for one here: the suite may run as root, which ignores file modes)."""
    import builtins
    import errno

    roots: list[str] = []

    def blocked(path) -> bool:
        try:
            p = os.path.abspath(os.fspath(path))
        except TypeError:
            return False
        return any(p == r or p.startswith(r + os.sep) for r in roots)

    def refuse(path):
        raise OSError(errno.EROFS, "Read-only file system", os.fspath(path))

    real_open, real_os_open = builtins.open, os.open
    real = {n: getattr(os, n) for n in ("mkdir", "replace", "rename", "unlink", "rmdir")}

    def fake_open(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and any(c in mode for c in "wax+") and blocked(file):
            refuse(file)
        return real_open(file, mode, *args, **kwargs)

    def fake_os_open(path, flags, *args, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT) and blocked(path):
            refuse(path)
        return real_os_open(path, flags, *args, **kwargs)

    def guard(name):
        def f(path, *args, **kwargs):
            if blocked(path) or (args and name in ("replace", "rename") and blocked(args[0])):
                refuse(path)
            return real[name](path, *args, **kwargs)
        return f

    monkeypatch.setattr(builtins, "open", fake_open)
    monkeypatch.setattr(os, "open", fake_os_open)
    for n in real:
        monkeypatch.setattr(os, n, guard(n))
    return lambda d: roots.append(os.path.abspath(d))


def test_a_read_only_directory_is_exit_3_and_nothing_changes(stopped_run, workdir, read_only):
    cfg, run = stopped_run
    before = snapshot(run)
    read_only(run)
    rc, _, err = run_main(["compress", "--resume", str(run), "-q"])
    assert rc == 3, err
    assert err.count("\n") == 1 and "Read-only file system" in err and "Traceback" not in err, err
    ro = workdir / "ro"
    ro.mkdir()
    read_only(ro)
    rc, _, err = run_main(["compress", cfg, "--out", str(ro / "run"), "-q"])
    assert rc == 3 and "Read-only file system" in err and err.count("\n") == 1, err
    assert snapshot(run) == before and list(ro.iterdir()) == []


def test_a_read_only_run_directory_still_exports_elsewhere(finished_run, tmp_path, read_only, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished_run[0], run)
    before = snapshot(run)
    read_only(run)
    assert main(["export", str(run), "--out", str(tmp_path / "mine.lcz"), "-q"]) == 0
    assert (tmp_path / "mine.lcz").read_bytes() == (run / "model.lcz").read_bytes()
    assert "exporting it without the lock" in capsys.readouterr().err
    assert main(["export", str(run), "-q"]) == 3  # into the run directory itself: it cannot be written
    err = capsys.readouterr().err
    assert "Read-only file system" in err and err.count("\n") == 1, err
    assert snapshot(run) == before

# ---- peer (the methods practitioners use instead of LC, from a config's [peer] table) ---------------------------
PEER_ALL = ["fc1.weight", "fc2.weight", "fc3.weight"]
PRUNE = [{"params": PEER_ALL, "compression": {"type": "ConstraintL0Pruning", "fraction": 0.1}}]


def test_peer_section_is_validated_and_named(synth):
    base = S.base_config("ref.pt")
    parse_config({**base, "peer": {"method": "gmp", "lr": 0.01}})
    for peer, field in [({"method": "sgd"}, "peer.method"), ({"lr": -1.0}, "peer.lr"),
                        ({"prune_end": 1.5}, "peer.prune_end"), ({"prune_every": 0}, "peer.prune_every"),
                        ({"compression": {"type": "Nope"}}, "peer.compression"), ({"epochs": 3}, "peer.epochs")]:
        with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
            parse_config({**base, "peer": peer})


def test_peer_compression_replaces_every_task(synth):
    cfg = parse_config({**S.base_config("ref.pt"), "peer": {"method": "scaled_sign_ste",
                                                     "compression": {"type": "ScaledBinaryQuantization"}}})
    lc_map, peer_map = cfg.task_map(), cfg.peer_task_map()
    assert list(lc_map) == list(peer_map)
    assert all(isinstance(c, lc.AdaptiveQuantization) for c in lc_map.values())
    assert all(isinstance(c, lc.ScaledBinaryQuantization) for c in peer_map.values())


def test_run_peer_is_train_peer_with_the_runs_settings(synth, tmp_path):
    """The command's run equals a hand-made train_peer call with the config's epochs, lr, decay, batch and seed;
    its file loads back into a model with the reported error."""
    root, ref = synth
    raw = S.base_config(ref, tasks=PRUNE, schedule={"steps": 3}, optimizer={"lr": 0.05, "lr_decay": 0.9},
                 peer={"method": "gmp", "lr": 0.02, "prune_every": 5})
    cfg_path = S.write_config(tmp_path / "cfg.toml", raw)
    out = tmp_path / "peer"
    rc, stdout, err = run_main(["peer", str(cfg_path), "--out", str(out), "-q"])
    assert rc == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "gmp" and res["lr"] == 0.02 and res["epochs"] == 3
    assert f"{res['final']['test_error']:.2f}%" in stdout

    cfg = parse_config(raw)
    data = __import__(S.MODULE_NAME).load()
    model = get_model("mlp", sizes=S.SIZES)
    load_checkpoint(ref, model)
    torch.manual_seed(123)  # train_peer seeds the global RNG itself
    direct = train_peer(model, cfg.task_map(), "gmp", data, epochs=3, lr=0.02, lr_decay=0.9, batch_size=64,
                        seed=0, prune_every=5)
    assert res["final"]["test_error"] == direct.test_error
    assert res["final"]["compressed_bits"] == direct.sizes["compressed_bits"]

    fresh = get_model("mlp", sizes=S.SIZES)
    loaded = lc.load(out / "model.lcz", fresh, compact=True)
    assert evaluate(loaded, data.x_test, data.y_test) == pytest.approx(res["final"]["test_error"], abs=1e-9)
    kept = sum(int((p != 0).sum()) for n, p in model.named_parameters() if n in PEER_ALL)
    assert kept == round(0.1 * sum(model.get_parameter(n).numel() for n in PEER_ALL))


def test_existing_results_are_kept_and_bad_peers_are_exit_2(synth, tmp_path):
    _, ref = synth
    cfg_path = S.write_config(tmp_path / "cfg.toml", S.base_config(ref, tasks=PRUNE, schedule={"steps": 1}))
    out = tmp_path / "p"
    assert run_main(["peer", str(cfg_path), "--method", "oneshot_prune", "--out", str(out), "-q"])[0] == 0
    before = (out / "results.json").read_bytes(), (out / "model.lcz").read_bytes()
    rc, _, err = run_main(["peer", str(cfg_path), "--method", "oneshot_prune", "--out", str(out), "-q"])
    assert rc == 2 and "--overwrite" in err and err.count("\n") == 1
    assert ((out / "results.json").read_bytes(), (out / "model.lcz").read_bytes()) == before
    # no [peer] and no --method; a method that cannot produce the task's compression; an unknown method
    for extra, words in [([], "peer.method"), (["--method", "scaled_sign_ste"], "scaled_sign_ste"),
                         (["--method", "adam"], "adam")]:
        rc, _, err = run_main(["peer", str(cfg_path), "--out", str(tmp_path / "q"), "-q", *extra])
        assert rc == 2 and words in err and err.count("\n") == 1, err
        assert not (tmp_path / "q" / "results.json").exists()


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_demo_schemes_name_a_peer_that_fits_their_tasks(scheme, tmp_path):
    cfg = parse_config(scheme_config(scheme))
    if scheme not in PEERS:
        assert cfg.peer.method == ""
        return
    assert cfg.peer.method in METHODS
    model = get_model("lenet300")
    Peer(model, cfg.peer_task_map(), cfg.peer.method)  # raises if the method cannot produce these compressions


def test_demo_runs_each_scheme_beside_its_peer(tmp_path, monkeypatch):
    """The demo end to end on a tiny Fashion-MNIST stand-in: a scheme with a peer gets its peer's run and row, one
    without gets none, and --no-peers skips them."""
    import numpy as np
    from test_data import write_idx

    monkeypatch.chdir(tmp_path)
    g = np.random.default_rng(0)
    d = tmp_path / "fm"
    d.mkdir()
    for prefix, n in (("train", 128), ("t10k", 64)):
        write_idx(d / f"{prefix}-images-idx3-ubyte", g.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        write_idx(d / f"{prefix}-labels-idx1-ubyte", g.integers(0, 10, n, dtype=np.uint8))
    out, ref = tmp_path / "demo", tmp_path / "ref.pt"
    argv = ["demo", "--out", str(out), "--reference", str(ref), "--schemes", "prune_5,mixed", "--steps", "1",
            "--data-dir", str(d), "-q"]
    rc, stdout, err = run_main(argv)
    assert rc == 0, err
    rows = {r["scheme"]: r for r in json.loads((out / "summary.json").read_text())}
    p = rows["prune_5"]
    assert p["peer"] == "gmp" and 0 <= p["peer_error"] <= 100
    assert p["peer_ratio"] == pytest.approx(p["ratio"], rel=0.05)  # the same budget of kept weights
    peer_res = json.loads((out / "prune_5_peer" / "results.json").read_text())
    assert peer_res["final"]["test_error"] == p["peer_error"] and peer_res["epochs"] == 1
    assert (out / "prune_5_peer" / "model.lcz").is_file()
    assert rows["mixed"]["peer"] is None and not (out / "mixed_peer").exists()
    assert "best peer %" in stdout and (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
    rc, _, err = run_main(argv + ["--overwrite", "--no-peers"])
    assert rc == 0, err
    assert not (out / "prune_5_peer").exists()
    assert all(r["peer"] is None for r in json.loads((out / "summary.json").read_text()))
