"""A compression defined outside the package (``tests/plugins/lcplugin_uniform.py``, with a codec of its own) works
end to end: LC, size report, export, load, compact load, and from a TOML config under the trust rule (an installed
entry point, or ``--trust-code`` / ``trust_code=True``; without consent its module is not even imported)."""
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lcompress as lc
import synthetic as S
from lcompress import config as lconfig
from lcompress import export
from lcompress.compressions import REGISTRY
from lcompress.config import ConfigError, load_config, parse_config
from lcompress.experiment import build_model, run_compress

PLUGINS = Path(__file__).parent / "plugins"
sys.path.insert(0, str(PLUGINS))
import lcplugin_uniform as U  # noqa: E402

pytestmark = pytest.mark.usefixtures("isolated_cli")
SPEC = "lcplugin_uniform:UniformQuantization"


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(20, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def test_registered_by_being_defined():
    assert REGISTRY["UniformQuantization"] is U.UniformQuantization
    assert lc.codecs.CODECS["uniform"].__class__ is U.UniformCodec
    assert not U.UniformQuantization.__module__.startswith("lcompress")


def test_lc_size_report_export_load_and_compact_load(tmp_path):
    torch.manual_seed(0)
    model = Net().eval()
    alg = lc.LC(model, {"fc1.weight": U.UniformQuantization(bits=3), ("fc2.weight", "fc2.bias"): U.UniformQuantization(2)})
    for mu in (1e-2, 1e-1):
        alg.c_step(mu)
    rep = alg.size_report()
    assert [r["bits"] for r in rep["tasks"]] == [320 * 3 + 64, 68 * 2 + 64]  # independent: n·b + two float32
    path = tmp_path / "m.lcz"
    info = alg.export(path)
    header = export.read(path)["header"]
    assert [t["bits"] for t in header["tasks"]] == [r["bits"] for r in rep["tasks"]]
    assert [t["theta"]["kind"] for t in header["tasks"]] == ["uniform", "uniform"]
    assert info["file_bytes"] == path.stat().st_size <= info["bound_bytes"]
    x = torch.randn(7, 20)
    with alg.compressed():
        want = model(x)
        weights = {k: v.clone() for k, v in model.state_dict().items()}
    loaded = lc.load(path, Net().eval())
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in weights.items())
    compact = lc.load(path, Net().eval(), compact=True)
    assert type(compact.fc1).__name__ == "CodebookLinear" and type(compact.fc2).__name__ == "CodebookLinear"
    assert torch.allclose(compact(x), want, atol=1e-6)


def test_a_class_without_a_codec_is_refused_at_construction():
    class NoCodec(lc.AdaptiveQuantization, register=False):
        codec = None

    with pytest.raises(TypeError, match=r"task 'fc2.weight': cannot be stored.*NoCodec declares no codec"):
        lc.LC(Net(), {"fc1.weight": lc.AdaptiveQuantization(2), "fc2.weight": NoCodec(2)})


def test_a_name_taken_by_another_class_is_refused():
    with pytest.raises(TypeError, match="'AdaptiveQuantization' is already registered"):
        type("AdaptiveQuantization", (lc.compressions.Compression,), {})


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("plugin")
    S.write_module(root)
    marker = root / "imported"
    (root / "lcplugin_marker.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n"
                                             "from lcplugin_uniform import UniformQuantization as Q\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        ref = root / "reference.pt"
        S.train_reference(ref)
        yield root, ref, marker


def _raw(ref, spec, **args):
    return S.base_config(ref, schedule={"steps": 2},
                         tasks=[{"params": r"re:fc\d\.weight", "compression": {"type": spec, **args}}])


def test_a_config_naming_the_class_needs_consent(synth):
    _, ref, marker = synth
    with pytest.raises(ConfigError, match=r"tasks\.0\.compression\.type='lcplugin_marker:Q'.*--trust-code"):
        parse_config(_raw(ref, "lcplugin_marker:Q", bits=2))
    assert not marker.exists() and "lcplugin_marker" not in sys.modules
    with pytest.raises(ConfigError, match=r"tasks\.0\.compression\.type='NoSuchQuantization': unknown compression"):
        parse_config(_raw(ref, "NoSuchQuantization"))
    with pytest.raises(ConfigError, match="is not an lcompress Compression class"):
        parse_config(_raw(ref, "json:dumps"), trust_code=True)


def test_from_a_toml_config_with_trust_code_end_to_end(synth, tmp_path):
    _, ref, _ = synth
    path = S.write_config(tmp_path / "c.toml", _raw(ref, SPEC, bits=2))
    cfg = load_config(path, trust_code=True)
    run = tmp_path / "run"
    res = run_compress(cfg, run, progress=False)
    assert (run / "model.lcz").exists() and res["final"]["export"]["file_bytes"] == (run / "model.lcz").stat().st_size
    rows = export.inspect(run / "model.lcz")
    assert {r["compression"] for r in rows[:-2]} == {"UniformQuantization"}
    model = lc.load(run / "model.lcz", build_model(cfg), compact=True)
    assert type(model.fc1).__name__ == "CodebookLinear"
    # the run directory's config.json names the class: reading it back needs the consent again
    assert json.loads((run / "config.json").read_text())["tasks"][0]["compression"]["type"] == SPEC
    with pytest.raises(ConfigError, match="refusing"):
        load_config(run / "config.json")
    assert load_config(run / "config.json", trust_code=True).task_map()


def test_from_an_installed_entry_point_without_the_flag(synth, monkeypatch):
    _, ref, _ = synth

    class EP:  # what importlib.metadata gives for `[project.entry-points."lcompress.compressions"]`
        name, value, group = "uniform", SPEC, "lcompress.compressions"

        def load(self):
            return U.UniformQuantization

    real = lconfig._installed_entry_points
    monkeypatch.setattr(lconfig, "_installed_entry_points",
                        lambda group: [EP()] if group == "lcompress.compressions" else real(group))
    for spec in ("uniform", SPEC):
        comp = parse_config(_raw(ref, spec, bits=3)).task_map()[r"re:fc\d\.weight"]
        assert type(comp) is U.UniformQuantization and comp.bits == 3
