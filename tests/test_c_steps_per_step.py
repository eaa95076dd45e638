"""schedule.c_steps_per_step: several C steps per LC step, each ending its share of the L step's minibatches at its
own μ (measured on LeNet300: 4 per epoch with penalty_fraction 1 lowered the 1-bit error from 11.25% to 10.5-10.6%,
bench/RESULTS.md)."""
import math

import pytest

import lcompress as lc
import synthetic as S
from lcompress.config import ConfigError, load_config
from lcompress.experiment import run_compress

pytestmark = pytest.mark.usefixtures("isolated_cli")

BATCHES = math.ceil(S.N_TRAIN / 64)


def test_c_steps_split_each_l_step_and_follow_the_schedule(tmp_path, monkeypatch):
    events = []
    orig_c, orig_p = lc.LC.c_step, lc.LC.penalty

    def c_step(self, mu):
        events.append(("c", mu))
        return orig_c(self, mu)

    def penalty(self, mu):
        events.append(("p", mu))
        return orig_p(self, mu)

    monkeypatch.setattr(lc.LC, "c_step", c_step)
    monkeypatch.setattr(lc.LC, "penalty", penalty)
    with S.prepared(tmp_path, lambda ref: S.base_config(
        ref, schedule={"mu0": 1e-3, "factor": 2.0, "steps": 2, "c_steps_per_step": 3, "epochs_per_step": 2},
    )) as path:
        cfg = load_config(path)
        res = run_compress(cfg, tmp_path / "run", progress=False, export=False)
    mus = lc.geometric(1e-3, 2.0, 6)
    assert res["schedule"] == pytest.approx(mus)
    # per LC step: 2 epochs of BATCHES minibatches in 3 parts of ceil(2·BATCHES·j/3) - ..., each closed by its C step
    bounds = [math.ceil(2 * BATCHES * (j + 1) / 3) for j in range(3)]
    sizes = [bounds[0], bounds[1] - bounds[0], bounds[2] - bounds[1]]
    expected = []
    for i, mu in enumerate(mus):
        expected += [("p", mu)] * sizes[i % 3] + [("c", mu)]
    assert events == expected
    assert len(res["steps"]) == 2 and res["steps"][-1]["mu"] == mus[-1]


@pytest.mark.parametrize("value, message", [(0, "must be in \\[1, 64\\]"), (65, "must be in \\[1, 64\\]")])
def test_c_steps_per_step_range(tmp_path, value, message):
    path = S.write_config(tmp_path / "c.toml", S.base_config(None, schedule={"c_steps_per_step": value}))
    with pytest.raises(ConfigError, match="schedule.c_steps_per_step=" + str(value) + ": " + message):
        load_config(path, trust_code=True)


def test_c_steps_per_step_needs_a_computed_schedule(tmp_path):
    path = S.write_config(tmp_path / "c.toml", S.base_config(
        None, schedule={"mu": [1e-3, 1e-2], "mu0": None, "factor": None, "c_steps_per_step": 2}))
    with pytest.raises(ConfigError, match="needs an \"auto\" or geometric schedule"):
        load_config(path, trust_code=True)
