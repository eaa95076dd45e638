"""The PyTorch Lightning callback: LC over a LightningModule whose code knows nothing of LC.

Tests that need Lightning take the ``pl`` fixture, which skips them when it is not installed; the two tests that
lightning stays optional run in a subprocess and need no Lightning.
"""
from __future__ import annotations

import copy
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcompress as lc

SRC = Path(__file__).resolve().parents[1] / "src"
SCHEDULE = lc.geometric(1e-3, 1.5, 20)
K = 2
KAPPA = 96

pytestmark = [
    pytest.mark.filterwarnings("ignore:.*does not have many workers"),
    pytest.mark.filterwarnings("ignore:.*isinstance\\(treespec, LeafSpec\\)"),  # lightning 2.6 on torch 2.13
]


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True, text=True)


# ---- lightning stays optional ---------------------------------------------------------------------------------
def test_import_lcompress_does_not_import_lightning():
    r = _python(
        """
        import sys
        import lcompress, lcompress.integrations
        bad = sorted(m for m in sys.modules if m.split(".")[0] in ("lightning", "pytorch_lightning"))
        assert not bad, bad
        """
    )
    assert r.returncode == 0, r.stderr


def test_missing_lightning_raises_import_error_with_install_hint():
    r = _python(
        """
        import sys

        class Block:  # make `import lightning` fail as if it were not installed
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == "lightning":
                    raise ModuleNotFoundError(f"No module named {name!r}", name=name)

        sys.meta_path.insert(0, Block())
        try:
            import lcompress.integrations.lightning
        except ImportError as e:
            print(e)
        else:
            raise SystemExit("no ImportError")
        """
    )
    assert r.returncode == 0, r.stderr
    assert "pip install lightning" in r.stdout and "lcompress[lightning]" in r.stdout, r.stdout


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models gain nothing from intra-op threads, and spinning OpenMP threads on a loaded 2-core CI machine
    # made this module 30× slower
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def pl():
    return pytest.importorskip("lightning.pytorch")


@pytest.fixture(scope="module")
def Classifier(pl):
    class Classifier(pl.LightningModule):
        """A plain LightningModule: nothing in it mentions LC."""

        def __init__(self, dict_output: bool = False, fail_at_batch: int | None = None):
            super().__init__()
            self.fc1 = nn.Linear(16, 64)
            self.fc2 = nn.Linear(64, 64)
            self.fc3 = nn.Linear(64, 4)
            self.dict_output = dict_output
            self.fail_at_batch = fail_at_batch

        def forward(self, x):
            return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

        def training_step(self, batch, batch_idx):
            if batch_idx == self.fail_at_batch:
                raise RuntimeError("boom")
            x, y = batch
            loss = F.cross_entropy(self(x), y)
            self.log("train_loss", loss)
            return {"loss": loss, "batch_size": len(y)} if self.dict_output else loss

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    return Classifier


@pytest.fixture(scope="module")
def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1024, 16, generator=g)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        for p in teacher.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        y = teacher(x).argmax(1)
    return x, y


@pytest.fixture(scope="module")
def reference(Classifier, data):
    """State dict of a well-trained uncompressed model (the LC starting point)."""
    x, y = data
    torch.manual_seed(0)
    model = Classifier()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return copy.deepcopy(model.state_dict())


def make_tasks():
    return {
        "fc1.weight": lc.AdaptiveQuantization(k=K),
        "fc2.weight": lc.AdaptiveQuantization(k=K),
        "fc3.weight": lc.ConstraintL0Pruning(kappa=KAPPA),
    }


def loader(data, shuffle=True):
    g = torch.Generator().manual_seed(0)
    dataset = torch.utils.data.TensorDataset(*data)
    return torch.utils.data.DataLoader(dataset, batch_size=64, shuffle=shuffle, generator=g)


def trainer(pl, callbacks, max_epochs, **kw):
    kw.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        max_epochs=max_epochs,
        callbacks=callbacks,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kw,
    )


def full_loss(model, data):
    x, y = data
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def fresh(Classifier, reference, **kw):
    model = Classifier(**kw)
    model.load_state_dict(reference)
    return model


# ---- the callback -----------------------------------------------------------------------------------------------
def test_callback_compresses_an_unmodified_module(pl, Classifier, data, reference):
    from lcompress.integrations.lightning import LCCallback

    dc_model = fresh(Classifier, reference)
    with lc.LC(dc_model, make_tasks()).compressed():
        dc_loss = full_loss(dc_model, data)  # direct compression of the reference

    model = fresh(Classifier, reference)
    user_step = type(model).training_step
    cb = LCCallback(make_tasks(), SCHEDULE)
    seen = []

    class Probe(pl.Callback):  # the penalty is active during training, through an instance-level wrapper
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            seen.append("training_step" in vars(pl_module))

    t = trainer(pl, [cb, Probe()], max_epochs=100)  # more epochs than the schedule: the callback stops the fit
    t.fit(model, loader(data))

    # the schedule ran once, one C step per epoch, and the trainer stopped with it
    assert t.current_epoch == len(SCHEDULE)
    assert cb.lc.step == len(SCHEDULE) and cb.lc.mu == SCHEDULE[-1]
    assert seen and all(seen)
    # the user's training_step is untouched: same class function, no instance attribute left behind
    assert type(model).training_step is user_step and "training_step" not in vars(model)
    # logged: μ and ‖w − Δ‖, and the L steps pulled w close to Δ(Θ)
    metrics = t.callback_metrics
    assert float(metrics["lc/mu"]) == pytest.approx(SCHEDULE[-1])
    w_norm = float(torch.cat([model.get_parameter(n).detach().reshape(-1) for n in cb.lc.decompressed()]).norm())
    assert float(metrics["lc/feasibility"]) < 0.05 * w_norm
    # finalize: the model now holds Δ(Θ): K distinct values per quantized layer, ≤ κ nonzeros in the pruned one
    for name in ("fc1.weight", "fc2.weight"):
        assert torch.unique(model.get_parameter(name)).numel() == K, name
    assert int((model.fc3.weight != 0).sum()) <= KAPPA
    for name, d in cb.lc.decompressed().items():
        assert torch.equal(model.get_parameter(name), d), name
    # and LC beats direct compression on the training data by a wide margin
    lc_loss = full_loss(model, data)
    assert lc_loss < 0.5 * dc_loss, (lc_loss, dc_loss)


def test_gradient_form_follows_the_loss_form(pl, Classifier, data, reference):
    """penalty="grad": the penalty's gradient is added before each optimizer step instead of through the loss;
    same LC run up to float rounding, and the loss training_step returns is passed through unchanged."""
    from lcompress.integrations.lightning import LCCallback

    runs = {}
    for form in ("loss", "grad"):
        model = fresh(Classifier, reference)
        cb = LCCallback(make_tasks(), SCHEDULE, penalty=form)
        extra = []

        class Probe(pl.Callback):  # what the wrapper added to the user's loss
            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                x, y = batch
                with torch.no_grad():
                    self.ce = float(F.cross_entropy(pl_module(x), y))

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                extra.append(float(outputs["loss"]) - self.ce)

        trainer(pl, [cb, Probe()], max_epochs=100).fit(model, loader(data))
        assert cb.lc.step == len(SCHEDULE)
        if form == "grad":
            assert extra and all(abs(e) < 1e-6 for e in extra)
        else:  # the penalty is in the loss
            assert extra and all(e > 0 for e in extra)
        runs[form] = (model, cb)
    (m_loss, cb_loss), (m_grad, cb_grad) = runs["loss"], runs["grad"]
    for (name, a), b in zip(m_loss.named_parameters(), m_grad.parameters()):
        assert torch.allclose(a, b, rtol=1e-3, atol=1e-4), name
    assert cb_grad.lc.feasibility()["total"] == pytest.approx(cb_loss.lc.feasibility()["total"], rel=0.05, abs=1e-6)
    with pytest.raises(ValueError, match="penalty='both'"):
        LCCallback(make_tasks(), SCHEDULE, penalty="both")


def test_dict_output_epochs_per_step_and_catch_up_c_step(pl, Classifier, data, reference, caplog):
    from lcompress.integrations.lightning import LCCallback

    model = fresh(Classifier, reference, dict_output=True)
    schedule = [1e-3, 1e-2, 1e-1]
    cb = LCCallback(make_tasks(), schedule, epochs_per_step=2, finalize=False)
    w0 = model.fc1.weight.detach().clone()
    with caplog.at_level(logging.WARNING, logger="lcompress"):
        trainer(pl, [cb], max_epochs=3).fit(model, loader(data))  # cuts the schedule short, mid-step
    assert "fewer than the 6 epochs" in caplog.text
    # a C step after epoch 2 at μ₀; epoch 3 trains at μ₁ and gets its C step at train end
    assert cb.lc.step == 2 and cb.lc.mu == schedule[1]
    # finalize=False leaves the trained (uncompressed) weights
    assert torch.unique(model.fc1.weight).numel() > K and not torch.equal(model.fc1.weight, w0)
    assert "training_step" not in vars(model)


def test_training_step_restored_after_an_exception(pl, Classifier, data, reference):
    from lcompress.integrations.lightning import LCCallback

    model = fresh(Classifier, reference, fail_at_batch=3)
    with pytest.raises(RuntimeError, match="boom"):
        trainer(pl, [LCCallback(make_tasks(), SCHEDULE)], max_epochs=2).fit(model, loader(data))
    assert "training_step" not in vars(model)


def test_manual_optimization_is_refused(pl, Classifier, data, reference):
    from lcompress.integrations.lightning import LCCallback

    model = fresh(Classifier, reference)
    model.automatic_optimization = False
    with pytest.raises(RuntimeError, match="automatic optimization"):
        trainer(pl, [LCCallback(make_tasks(), SCHEDULE)], max_epochs=1).fit(model, loader(data))
    assert "training_step" not in vars(model)


def test_bad_arguments(pl):
    from lcompress.integrations.lightning import LCCallback

    with pytest.raises(ValueError, match="mu_schedule"):
        LCCallback(make_tasks(), [])
    with pytest.raises(ValueError, match=r"mu_schedule\[1\]"):
        LCCallback(make_tasks(), [1e-3, -1.0])
    with pytest.raises(ValueError, match="epochs_per_step"):
        LCCallback(make_tasks(), SCHEDULE, epochs_per_step=0)
    with pytest.raises(TypeError, match="fc1"):
        LCCallback({"fc1.weight": "quantize"}, SCHEDULE)


def _assert_same_state(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.filterwarnings("ignore:Be aware that when using `ckpt_path`")
def test_checkpoint_round_trip_restores_lc_state(pl, Classifier, data, reference, tmp_path):
    from lcompress.integrations.lightning import LCCallback

    schedule = SCHEDULE[:4]
    # run A: the whole schedule, a checkpoint after every epoch (after that epoch's C step)
    ckpt = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", every_n_epochs=1, save_top_k=-1)
    cb_a = LCCallback(make_tasks(), schedule)
    trainer(pl, [cb_a, ckpt], max_epochs=4, enable_checkpointing=True).fit(
        fresh(Classifier, reference), loader(data, shuffle=False)
    )
    path = tmp_path / "epoch=1.ckpt"
    saved = torch.load(path, weights_only=False)["callbacks"][cb_a.state_key]["lc"]
    assert saved["step"] == 2 and saved["mu"] == schedule[1]

    # run B: a new module and callback resume from the checkpoint after epoch 2
    restored = {}

    class Probe(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            restored.update(cb_b.lc.state_dict())

    cb_b = LCCallback(make_tasks(), schedule)
    trainer(pl, [cb_b, Probe()], max_epochs=4).fit(
        fresh(Classifier, reference), loader(data, shuffle=False), ckpt_path=path
    )
    # at the start of training, Θ, Δ, λ and the step count are the checkpoint's
    _assert_same_state(restored, saved, "restored")
    # and resuming reproduces the uninterrupted run (same data order, optimizer state restored)
    _assert_same_state(cb_b.lc.state_dict(), cb_a.lc.state_dict(), "final")


DDP_SCRIPT = '''
import os, sys
import torch, torch.nn.functional as F
from torch import nn
import lightning.pytorch as pl
import lcompress as lc
from lcompress.integrations.lightning import LCCallback

torch.set_num_threads(1)


class Classifier(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 4)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


if __name__ == "__main__":
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 16, generator=g)
    y = x[:, :4].argmax(1)
    torch.manual_seed(0)
    model = Classifier()
    tasks = {
        "fc1.weight": lc.AdaptiveQuantization(k=2),
        ("fc2.weight", "fc3.weight"): lc.ConstraintL0Pruning(kappa=200),
    }
    cb = LCCallback(tasks, lc.geometric(1e-3, 2.0, 4))
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    trainer = pl.Trainer(max_epochs=10, accelerator="cpu", devices=2, strategy="ddp", callbacks=[cb], logger=False,
                         enable_progress_bar=False, enable_checkpointing=False, enable_model_summary=False)
    trainer.fit(model, dl)
    torch.save({"step": cb.lc.step, "epochs": trainer.current_epoch, "deltas": cb.lc.decompressed(),
                "weights": {k: v.detach().clone() for k, v in model.named_parameters()},
                "patched": "training_step" in vars(model)},
               os.path.join(sys.argv[1], f"rank{trainer.global_rank}.pt"))
    # Lightning leaves the gloo process group alive; tearing it down at interpreter exit instead intermittently
    # aborts the process ("terminate called without an active exception")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
'''


@pytest.mark.slow
def test_callback_under_lightning_ddp(pl, tmp_path):
    """2 CPU ranks (Lightning's "ddp" strategy, gloo): the penalty rides inside DDP's forward, C steps agree."""
    script = tmp_path / "fit_ddp.py"
    script.write_text(DDP_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")])
    r = subprocess.run(
        [sys.executable, str(script), str(tmp_path)], env=env, capture_output=True, text=True, timeout=180, cwd=tmp_path
    )
    assert r.returncode == 0, r.stdout + r.stderr
    ranks = [torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in (0, 1)]
    for res in ranks:
        assert res["step"] == 4 and res["epochs"] == 4 and not res["patched"]
        for name, d in res["deltas"].items():
            assert torch.equal(res["weights"][name], d), name  # finalized
    _assert_same_state(ranks[0]["deltas"], ranks[1]["deltas"], "deltas")
    _assert_same_state(ranks[0]["weights"], ranks[1]["weights"], "weights")
