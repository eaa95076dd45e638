"""Tiny synthetic problems and config files for the CLI, config and resume tests.

The data module is written into a temporary directory as ``lcsynth.py`` and named in configs as
``data.dataset = "lcsynth:load"``, the way a user plugs in their own data. Beside it goes the metadata that
``pip install`` of a package declaring it as entry points would write (``lcsynth-0.dist-info/entry_points.txt``,
groups ``lcompress.datasets`` and ``lcompress.models``), so that configs may name it without ``--trust-code``: an
installed entry point is the user's consent (see ``lcompress.config``). Subprocesses find both through
``PYTHONPATH``. ``lcsynth:traced_mlp`` is the registry's MLP with test hooks read from the environment (so they are
not part of the run's config): ``LCTEST_TRACE`` names a file that gets one byte per training-mode forward pass (a
batch counter another process can watch), and at training batch ``LCTEST_PAUSE_AT`` the forward pass creates
``<LCTEST_TRACE>.paused`` and waits until the file ``LCTEST_GO`` exists, so a test can interrupt a run at an exact
point in the middle of an L step. Its ``dropout`` argument (on the input) makes training draw from the global RNG.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

MODULE_NAME = "lcsynth"
DIM = 16
CLASSES = 4
N_TRAIN = 512
N_TEST = 256
#: the times ``run_compress`` polls its ``should_stop`` before LC step 1 when the reference exists (after the data,
#: the reference, direct compression and the start); after that it polls once per minibatch
PHASE_POLLS = 4

MODULE_SOURCE = f'''
"""Synthetic 4-class data (Gaussian blobs) for lcompress tests."""
import os
import time

import torch

from lcompress.data import Dataset
from lcompress.models import MLP


def load(n_train={N_TRAIN}, n_test={N_TEST}, dim={DIM}, classes={CLASSES}, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 0.6 * torch.randn(classes, dim, generator=g)

    def draw(n):
        y = torch.randint(classes, (n,), generator=g)
        return centers[y] + torch.randn(n, dim, generator=g), y

    x_train, y_train = draw(n_train)
    x_test, y_test = draw(n_test)
    return Dataset(x_train, y_train, x_test, y_test)


def load_tuple():
    return tuple(load())


_trained = 0  # training batches so far in this process


class TracedMLP(MLP):
    def forward(self, x):
        if self.training:
            global _trained
            _trained += 1
            trace = os.environ.get("LCTEST_TRACE")
            if trace:
                with open(trace, "ab") as f:
                    f.write(b".")
            if _trained == int(os.environ.get("LCTEST_PAUSE_AT", "0")):
                open(trace + ".paused", "w").close()
                go, end = os.environ.get("LCTEST_GO", ""), time.monotonic() + 60
                while not os.path.exists(go) and time.monotonic() < end:
                    time.sleep(0.005)
        # input dropout draws from the global RNG, so a resume that did not restore it would show
        return super().forward(torch.nn.functional.dropout(x, self.dropout, self.training))


def traced_mlp(sizes, dropout=0.0):
    model = TracedMLP(sizes)
    model.dropout = dropout
    return model
'''

SIZES = [DIM, 32, 32, CLASSES]


ENTRY_POINTS = f"""[lcompress.datasets]
lcsynth = {MODULE_NAME}:load
lcsynth_tuple = {MODULE_NAME}:load_tuple

[lcompress.models]
lcsynth_traced_mlp = {MODULE_NAME}:traced_mlp
"""


def write_module(directory: Path, entry_points: bool = True) -> Path:
    """``lcsynth.py`` in ``directory`` and, with ``entry_points``, the dist-info that declares its functions as
    installed entry points."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{MODULE_NAME}.py"
    path.write_text(MODULE_SOURCE)
    if entry_points:
        info = directory / f"{MODULE_NAME}-0.dist-info"
        info.mkdir(exist_ok=True)
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {MODULE_NAME}\nVersion: 0\n")
        (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return path


def train_reference(path: Path, epochs: int = 4, seed: int = 0) -> float:
    """Train the MLP on the synthetic data and save it as a reference checkpoint; returns its test error."""
    import importlib

    import torch

    from lcompress.models import get_model
    from lcompress.training import evaluate, save_checkpoint
    from lcompress.training import train_reference as _train

    data = importlib.import_module(MODULE_NAME).load()
    torch.manual_seed(seed)
    model = get_model("mlp", sizes=SIZES)
    _train(model, data, epochs, lr=0.05, batch_size=64, seed=seed, progress=False)
    err = evaluate(model, data.x_test, data.y_test)
    save_checkpoint(path, model, {"model": "mlp", "args": {"sizes": SIZES}, "test_error": err})
    return err


@contextlib.contextmanager
def prepared(root: Path, config_for) -> Any:
    """Write the data module into ``root``, train a reference there and write ``root/cfg.toml`` from
    ``config_for(reference_path)``; yields the config's path with ``root`` on ``sys.path`` and the ``LCTEST_*``
    hooks unset (both put back on exit)."""
    import pytest

    write_module(root)
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        for var in ("LCTEST_TRACE", "LCTEST_PAUSE_AT", "LCTEST_GO"):
            mp.delenv(var, raising=False)
        ref = root / "reference.pt"
        train_reference(ref)
        yield write_config(root / "cfg.toml", config_for(ref))


def assert_same(a, b, where: str = "state") -> None:
    """Bitwise equality of nested dicts/lists of tensors and plain values."""
    import torch

    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and (a.dtype, a.shape) == (b.dtype, b.shape), where
        assert torch.equal(a, b), f"{where} differs (max |a - b| = {float((a.double() - b.double()).abs().max()):.3g})"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), f"{where}: keys {list(a)} vs {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@contextlib.contextmanager
def one_thread():
    """torch on one thread meanwhile: these problems are too small to gain from more, a shared machine loses, and
    bitwise comparisons with the subprocesses (OMP_NUM_THREADS=1) need the same reduction order."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def cli_logging_restored():
    """The CLI configures the "lcompress" logger (its own handlers, no propagation); put it back afterwards so
    that other test modules' caplog still sees the library's records."""
    import logging

    lg = logging.getLogger("lcompress")
    saved = (list(lg.handlers), lg.propagate, lg.level)
    try:
        yield
    finally:
        for h in list(lg.handlers):
            if h not in saved[0]:
                lg.removeHandler(h)
                h.close()
        lg.handlers[:] = saved[0]
        lg.propagate, lg.level = saved[1], saved[2]


# ---- TOML -------------------------------------------------------------------------------------------------------
def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"no TOML for {v!r}")


def to_toml(cfg: dict[str, Any]) -> str:
    """A config dict as TOML: scalars first, then one [table] per dict, then [[tasks]]."""
    lines = [f"{k} = {_value(v)}" for k, v in cfg.items() if not isinstance(v, (dict, list))]
    for k, v in cfg.items():
        if isinstance(v, dict):
            lines.append(f"\n[{k}]")
            lines += [f"{kk} = {_value(vv)}" for kk, vv in v.items()]
    for t in cfg.get("tasks", []):
        lines.append("\n[[tasks]]")
        lines += [f"{kk} = {_value(vv)}" for kk, vv in t.items()]
    return "\n".join(lines) + "\n"


def base_config(reference: Path | str | None, **sections: Any) -> dict[str, Any]:
    """A small run: the MLP, the synthetic data, 2-level quantization of every weight matrix, 4 LC steps."""
    cfg: dict[str, Any] = {
        "name": "synth",
        "seed": 0,
        "model": {"name": "mlp", "args": {"sizes": SIZES}},
        "data": {"dataset": f"{MODULE_NAME}:load", "batch_size": 64},
        "reference": {"checkpoint": str(reference)} if reference is not None else {},
        "schedule": {"mu0": 1e-3, "factor": 3.0, "steps": 4},
        "optimizer": {"lr": 0.05, "lr_decay": 0.95},
        "tasks": [{"params": r"re:fc\d\.weight", "compression": {"type": "AdaptiveQuantization", "k": 2}}],
    }
    for k, v in sections.items():  # tables are merged key by key; None removes a key
        if isinstance(v, dict) and isinstance(cfg.get(k), dict):
            cfg[k] = {kk: vv for kk, vv in {**cfg[k], **v}.items() if vv is not None}
        elif v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    return cfg


def write_config(path: Path, cfg: dict[str, Any]) -> Path:
    path.write_text(to_toml(cfg))
    return path


# ---- subprocesses -----------------------------------------------------------------------------------------------
def lcompress_exe() -> str:
    exe = Path(sys.executable).with_name("lcompress")
    return str(exe) if exe.exists() else "lcompress"


def subprocess_env(module_dir: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(module_dir), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.update(extra)
    return env


def start(args: list[str], module_dir: Path, cwd: Path, **extra: str) -> subprocess.Popen:
    return subprocess.Popen(
        [lcompress_exe(), *args], cwd=cwd, env=subprocess_env(module_dir, **extra),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def wait_for(predicate, proc: subprocess.Popen | None = None, timeout: float = 60.0, poll: float = 0.002) -> None:
    """Poll until ``predicate()``; fail if ``proc`` exits first or the time runs out."""
    end = time.monotonic() + timeout
    while not predicate():
        if proc is not None and proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"the process exited early (rc {proc.returncode}):\n{out}\n{err}")
        if time.monotonic() > end:
            raise AssertionError("timed out waiting")
        time.sleep(poll)


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
