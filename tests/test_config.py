"""Run configuration: parsing, validation errors that name the field and the value, overrides, round trips."""
import copy
import json

import pytest

from lcompress.compressions import AdditiveCombination, AdaptiveQuantization, ConstraintL0Pruning
from lcompress.config import ConfigError, config_diff, load_config, parse_config, set_dotted
from synthetic import base_config, to_toml


def raw(**sections):
    """A valid raw config (registry model and data, so nothing needs importing)."""
    cfg = base_config("ref.pt", **sections)
    cfg["model"] = {"name": "mlp", "args": {"sizes": [16, 8, 4]}}
    cfg["data"] = {"dataset": "fashion-mnist", "batch_size": 64}
    return cfg


def error(cfg) -> str:
    with pytest.raises(ConfigError) as e:
        parse_config(cfg)
    return str(e.value)


def test_a_valid_config_parses_with_types_and_defaults():
    cfg = parse_config(raw(optimizer={"lr": 1, "momentum": 0.5}))
    assert cfg.model.name == "mlp" and cfg.model.args == {"sizes": [16, 8, 4]}
    assert cfg.optimizer.lr == 1.0 and isinstance(cfg.optimizer.lr, float)  # an int where a float is expected
    assert cfg.optimizer.momentum == 0.5 and cfg.optimizer.nesterov is True  # a default
    assert cfg.schedule.mu == "geometric" and (cfg.schedule.mu0, cfg.schedule.factor) == (1e-3, 3.0)
    tasks = cfg.task_map()
    assert list(tasks) == [r"re:fc\d\.weight"] and isinstance(tasks[r"re:fc\d\.weight"], AdaptiveQuantization)
    assert tasks[r"re:fc\d\.weight"].k == 2


def test_joint_tasks_and_additive_combinations():
    cfg = parse_config(raw(tasks=[
        {"params": ["fc1.weight", "fc2.weight"], "compression": {"type": "ConstraintL0Pruning", "kappa": 10}},
        {"params": "fc3.weight", "compression": [{"type": "AdaptiveQuantization", "k": 2},
                                                   {"type": "ConstraintL0Pruning", "fraction": 0.01}]},
    ]))
    tasks = cfg.task_map()
    assert isinstance(tasks[("fc1.weight", "fc2.weight")], ConstraintL0Pruning)
    assert isinstance(tasks["fc3.weight"], AdditiveCombination)
    assert cfg.task_map()["fc3.weight"] is not tasks["fc3.weight"]  # fresh objects every time


ERROR_CASES = [
    (lambda c: c.update(epochs=3), "epochs", "3"),
    (lambda c: c["optimizer"].update(learning_rate=0.1), "optimizer.learning_rate", "0.1"),
    (lambda c: c.update(seed="zero"), "seed", "'zero'"),
    (lambda c: c["schedule"].update(steps=2.5), "schedule.steps", "2.5"),
    (lambda c: c["optimizer"].update(nesterov=1), "optimizer.nesterov", "1"),
    (lambda c: c["reference"].update(checkpoint=5), "reference.checkpoint", "5"),
    (lambda c: c["schedule"].update(mu0="big"), "schedule.mu0", "'big'"),
    (lambda c: c["model"].update(name="lenet999"), "model.name", "'lenet999'"),
    (lambda c: c["model"].update(name="no_such_module_xyz:build"), "model.name", "'no_such_module_xyz:build'"),
    (lambda c: c["data"].update(dataset="imagenet"), "data.dataset", "'imagenet'"),
    (lambda c: c["data"].update(batch_size=0), "data.batch_size", "0"),
    (lambda c: c["tasks"][0]["compression"].update(type="Quantize"), "tasks.0.compression.type", "'Quantize'"),
    (lambda c: c["tasks"][0]["compression"].update(k=0), "tasks.0.compression", "k=0"),
    (lambda c: c["tasks"][0]["compression"].update(kk=2), "tasks.0.compression", "'kk'"),
    (lambda c: c["tasks"][0].update(compression={"type": "ConstraintL0Pruning", "fraction": 1.5}),
     "tasks.0.compression", "fraction=1.5"),
    (lambda c: c["tasks"][0].update(compression=[{"type": "AdaptiveQuantization", "k": 2}]),
     "tasks.0.compression", "2 parts"),
    (lambda c: c["tasks"][0].update(params=5), "tasks.0.params", "5"),
    (lambda c: c["tasks"][0].update(params=["fc1.weight", 3]), "tasks.0.params", "['fc1.weight', 3]"),
    (lambda c: c["tasks"][0].update(params=[]), "tasks.0.params", "[]"),
    (lambda c: c["tasks"][0].update(layers="fc1"), "tasks.0.layers", "'fc1'"),
    (lambda c: c["tasks"][0].pop("compression"), "tasks.0.compression", "missing"),
    (lambda c: c.pop("tasks"), "tasks", "missing"),
    (lambda c: c.update(tasks=[]), "tasks", "[]"),
    (lambda c: c.update(schedule={"mu": [1e-3, 1e-2, 5e-3]}), "schedule.mu.2", "0.005"),
    (lambda c: c.update(schedule={"mu": [1e-3, 1e-3]}), "schedule.mu.1", "0.001"),
    (lambda c: c.update(schedule={"mu": [1e-3, -1.0]}), "schedule.mu.1", "-1.0"),
    (lambda c: c.update(schedule={"mu": "fast"}), "schedule.mu", "'fast'"),
    (lambda c: c.update(schedule={"mu0": 1e-3}), "schedule.factor", "schedule.mu0=0.001"),
    (lambda c: c.update(schedule={"factor": 1.5}), "schedule.mu0", "schedule.factor=1.5"),
    (lambda c: c.update(schedule={"mu0": 1e-3, "factor": 0.9}), "schedule.factor", "0.9"),
    (lambda c: c.update(schedule={"mu0": -1.0, "factor": 2.0}), "schedule.mu0", "-1.0"),
    (lambda c: c.update(schedule={"mu": "auto", "mu0": 1e-3}), "schedule.mu0", "0.001"),
    (lambda c: c.update(schedule={"mu": [1.0, 2.0], "factor": 2.0}), "schedule.factor", "2.0"),
    (lambda c: c["schedule"].update(steps=0), "schedule.steps", "0"),
    (lambda c: c["schedule"].update(final_distance=1.5), "schedule.final_distance", "1.5"),
    (lambda c: c["schedule"].update(hold=1.0), "schedule.hold", "1.0"),
    (lambda c: c["schedule"].update(hold=-0.5), "schedule.hold", "-0.5"),
    (lambda c: c["optimizer"].update(momentum=1.0), "optimizer.momentum", "1.0"),
    (lambda c: c["optimizer"].update(clip_lr_scale=0.0), "optimizer.clip_lr_scale", "0.0"),
    (lambda c: c["optimizer"].update(clip_lr_scale=1.5), "optimizer.clip_lr_scale", "1.5"),
    (lambda c: c["optimizer"].update(lr=0), "optimizer.lr", "0"),
    (lambda c: c.update(evaluate={"every": 0}), "evaluate.every", "0"),
    (lambda c: c.update(lc=[1]), "lc", "[1]"),
    (lambda c: c.update(lc={"penalty": "both"}), "lc.penalty", "'both'"),
]


@pytest.mark.parametrize("mutate, field, value", ERROR_CASES, ids=[f"{f}:{v}" for _, f, v in ERROR_CASES])
def test_errors_name_the_field_and_the_value(mutate, field, value):
    cfg = raw()
    mutate(cfg)
    msg = error(cfg)
    assert field in msg, msg
    assert value in msg, msg
    assert "\n" not in msg


def test_error_names_the_field_as_a_dotted_path_with_its_value():
    cfg = raw()
    cfg["optimizer"]["lr"] = "fast"
    assert error(cfg).startswith("optimizer.lr='fast': expected float")


def test_schedule_forms():
    assert parse_config(raw(schedule={"mu0": 1e-3, "factor": 1.5, "steps": 7})).schedule.mu == "geometric"
    auto = parse_config(raw(schedule={"mu": "auto", "steps": 7, "mu0": None, "factor": None})).schedule
    assert (auto.mu, auto.steps, auto.mu0, auto.factor) == ("auto", 7, None, None)
    listed = parse_config(raw(schedule={"mu": [1e-3, 1e-2, 1e-1], "steps": 30, "mu0": None, "factor": None}))
    assert listed.schedule.mu == [1e-3, 1e-2, 1e-1] and listed.schedule.steps == 3  # the list decides
    default = raw()
    del default["schedule"]
    assert parse_config(default).schedule.mu == "auto"


def test_set_overrides_with_dotted_keys(tmp_path):
    path = tmp_path / "run.toml"
    path.write_text(to_toml(raw()))
    cfg = load_config(path, {
        "tasks.0.compression.k": 4,
        "schedule.steps": 9,
        "optimizer.lr": 0.01,
        "data.dir": "/data/here",
        "evaluate.every": 3,  # a table the file does not have
    })
    assert cfg.task_map()[r"re:fc\d\.weight"].k == 4
    assert (cfg.schedule.steps, cfg.optimizer.lr, cfg.data.dir, cfg.evaluate.every) == (9, 0.01, "/data/here", 3)
    assert cfg.source == str(path)
    # overrides are validated like the file
    with pytest.raises(ConfigError, match=r"tasks\.0\.compression.*k=0"):
        load_config(path, {"tasks.0.compression.k": 0})
    with pytest.raises(ConfigError, match=r"tasks\.3\.compression: tasks has no element '3' \(it has 1\)"):
        load_config(path, {"tasks.3.compression": {"type": "BinaryQuantization"}})
    with pytest.raises(ConfigError, match=r"schedule\.stepz=5: unknown key"):
        load_config(path, {"schedule.stepz": 5})


def test_set_dotted_creates_tables_and_indexes_lists():
    d = {"tasks": [{"compression": {"k": 2}}]}
    set_dotted(d, "tasks.0.compression.k", 8)
    set_dotted(d, "a.b.c", 1)
    assert d == {"tasks": [{"compression": {"k": 8}}], "a": {"b": {"c": 1}}}


def test_cli_set_values_are_read_as_toml():
    from lcompress.cli import _parse_set

    assert _parse_set(["a.b=3", "c=0.5", "d=true", "e=[1, 2]", "f=word", "g='x y'"]) == {
        "a.b": 3, "c": 0.5, "d": True, "e": [1, 2], "f": "word", "g": "x y"}
    with pytest.raises(ConfigError, match="noequals"):
        _parse_set(["noequals"])


def test_load_config_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\nname = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


@pytest.mark.parametrize("schedule", [
    {"mu0": 1e-3, "factor": 3.0, "steps": 4},
    {"mu": "auto", "steps": 5, "mu0": None, "factor": None},
    {"mu": [1e-3, 1e-2], "mu0": None, "factor": None},
])
def test_round_trip_through_to_dict_and_json(schedule):
    cfg = parse_config(raw(schedule=schedule, data={"dir": "/d"}, tasks=[
        {"params": ["fc1.weight", "fc2.weight"], "compression": {"type": "ConstraintL0Pruning", "fraction": 0.05}},
        {"params": "fc3.weight", "compression": [{"type": "AdaptiveQuantization", "k": 2},
                                                   {"type": "ConstraintL0Pruning", "kappa": 3}]},
    ]))
    d = cfg.to_dict()
    assert "source" not in d
    again = parse_config(copy.deepcopy(d))
    assert again.to_dict() == d
    # the run directory keeps it as JSON; reading that back gives the same config too
    from_json = parse_config(json.loads(json.dumps(d)))
    assert from_json.to_dict() == d
    assert config_diff(d, from_json.to_dict()) == []


def test_config_diff_names_each_changed_field_with_both_values():
    a = parse_config(raw()).to_dict()
    b = copy.deepcopy(a)
    b["optimizer"]["lr"] = 0.01
    b["tasks"][0]["compression"]["k"] = 4
    b["schedule"]["mu0"] = 1  # the same number as an int: not a change
    a["schedule"]["mu0"] = 1.0
    assert config_diff(a, b) == ["optimizer.lr: 0.05 -> 0.01", "tasks.0.compression.k: 2 -> 4"]
