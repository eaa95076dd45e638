"""The example configs parse, and the demo's embedded schemes are exactly the files under examples/."""
from pathlib import Path

import pytest

from lcompress.config import load_config, parse_config
from lcompress.demo import SCHEMES, scheme_config

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.parametrize("path", sorted(p for p in EXAMPLES.glob("*.toml") if not p.name.startswith("ptq_")),
                         ids=lambda p: p.name)
def test_example_parses_and_builds_its_tasks(path):
    cfg = load_config(path)
    assert cfg.task_map()


@pytest.mark.parametrize("path", sorted(EXAMPLES.glob("ptq_*.toml")), ids=lambda p: p.name)
def test_post_training_example_parses(path):
    from lcompress.ptq_run import load_ptq_config

    tasks, solver = load_ptq_config(path)
    assert tasks and all(c.supports_importance for c in tasks.values())


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_demo_scheme_matches_its_example_file(scheme):
    embedded = parse_config(scheme_config(scheme)).to_dict()
    from_file = load_config(EXAMPLES / f"lenet300_{scheme}.toml").to_dict()
    assert from_file == embedded
