"""Code named by a config runs only with the user's consent: an installed entry point, or ``--trust-code`` /
``trust_code=True`` for that one call, never a consent read from a file (a run directory's ``config.json``).

The hostile functions here leave a marker file when they run, and the hostile module leaves one when it is merely
imported, so "nothing ran" is checked on the file system, not on messages.
"""
import json
import sys
from pathlib import Path

import pytest

import synthetic as S
from lcompress.config import ConfigError, load_config, parse_config
from lcompress.experiment import build_model, load_data, run_compress
from test_cli import run_main, snapshot

pytestmark = pytest.mark.usefixtures("isolated_cli")

HOSTILE = "lchostile"  # a module on sys.path that no installed entry point declares


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """The synthetic module with its entry points, a hostile module without, a reference, and the marker paths."""
    root = tmp_path_factory.mktemp("trust")
    S.write_module(root)
    marker = root / "ran"
    imported = root / "imported"
    (root / f"{HOSTILE}.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(imported)!r}).touch()\n"
        "import lcsynth\n"
        "def build(**kwargs):\n"
        f"    Path({str(marker)!r}).touch()\n"
        "    return lcsynth.traced_mlp(**kwargs)\n"
        "def load():\n"
        f"    Path({str(marker)!r}).touch()\n"
        "    return lcsynth.load()\n"
    )
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.delitem(sys.modules, HOSTILE, raising=False)
        ref = root / "reference.pt"
        S.train_reference(ref)
        yield root, ref, marker, imported


@pytest.fixture
def clean(env, tmp_path, monkeypatch):
    """Each test starts with no markers, the hostile module not imported, and a working directory of its own."""
    _, _, marker, imported = env
    for m in (marker, imported):
        m.unlink(missing_ok=True)
    monkeypatch.delitem(sys.modules, HOSTILE, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def hostile_config(path: Path, ref, **sections) -> str:
    return str(S.write_config(path, S.base_config(ref, schedule={"steps": 2}, **sections)))


def assert_refused(rc, err, field, value):
    assert rc == 2, err
    assert err.startswith("lcompress: error: ") and err.count("\n") == 1, err
    assert f"{field}={value!r}" in err and "--trust-code" in err and "entry point" in err, err


def test_os_system_named_by_a_config_runs_nothing_without_consent(env, clean):
    _, ref, _, _ = env
    victim = clean / "pwned"
    command = f"touch {victim}"
    cfg = hostile_config(clean / "c.toml", ref, model={"name": "os:system", "args": {"command": command}})
    rc, _, err = run_main(["compress", cfg, "--out", str(clean / "run"), "-q"])
    assert_refused(rc, err, "model.name", "os:system")
    rc, _, err = run_main(["sweep", cfg, "--vary", "seed", "--values", "1", "--out", str(clean / "sweep"), "-q"])
    assert_refused(rc, err, "model.name", "os:system")
    rc, _, err = run_main(["train", "--model", "os:system", "--model-arg", f"command='{command}'", "--dataset",
                           f"{S.MODULE_NAME}:load", "--epochs", "1", "--out", str(clean / "t.pt"), "-q"])
    assert_refused(rc, err, "model.name", "os:system")
    cfg = hostile_config(clean / "d.toml", ref, data={"dataset": "os:system"})
    rc, _, err = run_main(["compress", cfg, "--out", str(clean / "run"), "-q"])
    assert_refused(rc, err, "data.dataset", "os:system")
    assert not victim.exists()
    assert sorted(p.name for p in clean.iterdir()) == ["c.toml", "d.toml"]  # nothing written


def test_a_module_named_by_a_config_is_not_even_imported_without_consent(env, clean):
    _, ref, marker, imported = env
    cfg = hostile_config(clean / "c.toml", ref, model={"name": f"{HOSTILE}:build", "args": {"sizes": S.SIZES}})
    rc, _, err = run_main(["compress", cfg, "--out", str(clean / "run"), "-q"])
    assert_refused(rc, err, "model.name", f"{HOSTILE}:build")
    assert str(clean / "c.toml") in err  # the file that named it
    assert not imported.exists() and HOSTILE not in sys.modules and not (clean / "run").exists()
    # consent for this command: it runs
    rc, _, err = run_main(["compress", cfg, "--out", str(clean / "run"), "--trust-code", "-q"])
    assert rc == 0, err
    assert imported.exists() and marker.exists()


def test_a_run_directory_naming_code_needs_the_flag_again(env, clean):
    """Resume and export read the run's config.json: a file that anyone may have written or edited."""
    _, ref, marker, _ = env
    cfg = hostile_config(clean / "c.toml", ref, data={"dataset": f"{HOSTILE}:load"})
    run = clean / "run"
    assert run_main(["compress", cfg, "--out", str(run), "--trust-code", "-q"])[0] == 0
    before = snapshot(run)
    marker.unlink()
    for argv in (["export", str(run)], ["compress", "--resume", str(run)]):
        rc, _, err = run_main([*argv, "-q"])
        assert_refused(rc, err, "data.dataset", f"{HOSTILE}:load")
        assert str(run / "config.json") in err
    assert not marker.exists() and snapshot(run) == before
    rc, out, err = run_main(["export", str(run), "--out", str(clean / "again.lcz"), "--trust-code", "-q"])
    assert rc == 0, err
    assert (clean / "again.lcz").stat().st_size == (run / "model.lcz").stat().st_size
    # an edited config.json of a run that used only built-in and installed names
    config = json.loads((run / "config.json").read_text())
    config["model"] = {"name": "os:system", "args": {"command": f"touch {clean / 'pwned'}"}}
    (run / "config.json").write_text(json.dumps(config))
    before = snapshot(run)
    for argv in (["export", str(run)], ["compress", "--resume", str(run)]):
        rc, _, err = run_main([*argv, "-q"])
        assert_refused(rc, err, "model.name", "os:system")
    assert not (clean / "pwned").exists() and snapshot(run) == before


def test_installed_entry_points_need_no_flag(env, clean):
    """lcsynth's dist-info declares its functions (see synthetic.py): by entry-point name or by value, no flag."""
    _, ref, _, _ = env
    by_name = S.base_config(ref, model={"name": "lcsynth_traced_mlp", "args": {"sizes": S.SIZES}},
                            data={"dataset": "lcsynth"})
    cfg = parse_config(by_name)
    assert not cfg.trust_code
    assert build_model(cfg).fc1.weight.shape == (32, S.DIM)
    assert len(load_data(cfg).x_train) == S.N_TRAIN
    by_value = parse_config(S.base_config(ref, data={"dataset": f"{S.MODULE_NAME}:load_tuple"}))
    assert len(load_data(by_value).x_test) == S.N_TEST
    with pytest.raises(ConfigError, match=r"model\.name='nosuch': no installed entry point.*lcsynth_traced_mlp"):
        parse_config(S.base_config(ref, model={"name": "nosuch"}))


def test_library_consent_is_an_argument_never_part_of_a_saved_config(env, clean):
    _, ref, marker, imported = env
    raw = S.base_config(ref, model={"name": f"{HOSTILE}:build", "args": {"sizes": S.SIZES}}, schedule={"steps": 1})
    with pytest.raises(ConfigError, match=r"trust_code=True"):
        parse_config(raw)
    assert not imported.exists()
    cfg = parse_config(raw, trust_code=True)
    assert cfg.trust_code and "trust_code" not in cfg.to_dict()
    # the consent given for this config can be withdrawn per call
    with pytest.raises(ConfigError, match="refusing"):
        build_model(cfg, trust_code=False)
    run = clean / "run"
    run_compress(cfg, run, progress=False)
    assert marker.exists()
    saved = json.loads((run / "config.json").read_text())
    assert "trust_code" not in json.dumps(saved)
    with pytest.raises(ConfigError, match=r"model\.name='lchostile:build' in .*config\.json: refusing"):
        load_config(run / "config.json")
    assert load_config(run / "config.json", trust_code=True).trust_code
    # a RunConfig built without consent does not run the code either
    from lcompress.config import RunConfig

    bare = RunConfig(model=cfg.model)
    marker.unlink()
    with pytest.raises(ConfigError, match="refusing"):
        build_model(bare)
    assert not marker.exists()
