"""Error–compression trade-off sweeps: one LC run per setting, beside direct compression and (for pruning)
magnitude pruning with retraining; a CSV and a plot."""
from __future__ import annotations

import json
import logging
import re
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from ._rundir import DirectoryLock
from .algorithm import LC
from .config import ConfigError, RunConfig, config_diff, load_config
from .data import Dataset, batches
from .demo import plot_tradeoff, write_csv
from .training import evaluate

__all__ = ["run_sweep", "retrain_pruned"]

logger = logging.getLogger(__name__)


def retrain_pruned(cfg: RunConfig, data: Dataset, progress: bool = False) -> dict[str, Any]:
    """Magnitude pruning with retraining: prune the reference by the config's pruning tasks (their direct
    compression), then train the surviving weights with the pruned ones held at zero, for as many epochs as the
    LC run's L steps in total, with the same optimizer settings.

    Raises:
        ConfigError: a task is not a ConstraintL0Pruning.
    """
    from .compressions import ConstraintL0Pruning
    from .experiment import prepare_reference

    tasks = cfg.task_map()
    if not all(isinstance(c, ConstraintL0Pruning) for c in tasks.values()):
        raise ConfigError("the retrain baseline needs every task to be ConstraintL0Pruning")
    model, _ = prepare_reference(cfg, data, progress=False)
    alg = LC(model, tasks)
    masks = []
    with torch.no_grad():
        for p, d in zip(alg._params, alg._deltas):
            p.copy_(d)
            masks.append(d != 0)
    o = cfg.optimizer
    opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0,
                          weight_decay=o.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    device = torch.device(cfg.device)
    x, y = data.x_train.to(device), data.y_train.to(device)
    epochs = cfg.schedule.steps * cfg.schedule.epochs_per_step
    t = time.perf_counter()
    for e in range(epochs):
        for g in opt.param_groups:
            g["lr"] = o.lr * o.lr_decay ** e
        model.train()
        for xb, yb in batches(x, y, cfg.data.batch_size, shuffle=True, generator=gen):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                torch._foreach_mul_(alg._params, masks)
    err = evaluate(model, data.x_test.to(device), data.y_test.to(device))
    return {"test_error": err, "ratio": alg.size_report()["ratio"], "epochs": epochs, "seconds": time.perf_counter() - t}


def _slug(v: Any) -> str:
    """A value as the name of its run directory under the sweep's: one plain name ('.' and '..' are not)."""
    s = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(v))
    return s if s.strip(".") else s.replace(".", "_") or "_"


def run_sweep(
    config: str | Path,
    vary: str,
    values: list[Any],
    out_dir: str | Path,
    overrides: dict[str, Any] | None = None,
    baselines: list[str] | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    on_ready: Callable[[], None] | None = None,
    trust_code: bool = False,
) -> list[dict[str, Any]]:
    """For each value of the dotted config key ``vary``: an LC run, its direct compression and the requested
    baselines. Writes ``sweep.csv`` and ``sweep.png`` (test error vs compression ratio, log x) under ``out_dir``.

    Args:
        config: the base TOML config.
        vary: e.g. ``"tasks.0.compression.k"`` or ``"tasks.0.compression.fraction"``.
        values: the settings to try.
        baselines: among ``"dc"`` (always recorded) and ``"retrain"`` (magnitude pruning + retraining; pruning
            tasks only). Default: dc, plus retrain when every task is ConstraintL0Pruning.
        on_ready: called once the settings were validated and ``out_dir`` exists (the CLI opens its log there).
        trust_code: consent to import the model or dataset function the config names as
            ``"package.module:function"`` (see :mod:`lcompress.config`).

    Returns:
        rows: value, method (LC, DC, retrain), test error, ratio.

    One sweep per ``out_dir``: it is locked (``out_dir/.lock``) for the whole sweep, and each run directory by
    its run.

    Raises:
        ConfigError: a bad key, value or baseline (nothing is written then), or a run directory of ``out_dir``
            that holds a run of a different config (an earlier sweep's; its finished runs are reused otherwise).
        lcompress._rundir.DirectoryBusy: (a ConfigError) another process holds ``out_dir``.
    """
    from .compressions import ConstraintL0Pruning
    from .experiment import load_data, run_compress

    if not values:
        raise ConfigError("--values: at least one value is needed")
    out = Path(out_dir)
    cfgs = []
    for v in values:
        cfg = load_config(config, {**(overrides or {}), vary: v}, trust_code=trust_code)
        cfg.name = f"{cfg.name}_{_slug(v)}"
        if cfg.reference.checkpoint is None and cfg.reference.train_epochs > 0:
            # one reference for the whole sweep, in its directory (not one per run directory)
            cfg.reference.checkpoint = str(out / "reference.pt")
        cfgs.append(cfg)
    pruning = all(isinstance(c, ConstraintL0Pruning) for c in cfgs[0].task_map().values())
    wanted = set(baselines or (["dc", "retrain"] if pruning else ["dc"]))
    unknown = wanted - {"dc", "retrain"}
    if unknown:
        raise ConfigError(f"--baselines: unknown {sorted(unknown)} (known: dc, retrain)")
    if "retrain" in wanted and not pruning:
        raise ConfigError("--baselines retrain: needs every task to be ConstraintL0Pruning")
    for v, cfg in zip(values, cfgs):
        saved = out / _slug(v) / "config.json"
        if saved.is_file():
            try:
                old = json.loads(saved.read_text())
            except (ValueError, UnicodeDecodeError) as e:
                raise ConfigError(f"{saved}: not valid JSON ({e}); use another --out") from None
            diff = config_diff(old, cfg.to_dict())
            if diff:
                raise ConfigError(f"{str(saved.parent)!r} holds a run of another config ({'; '.join(diff)}); "
                                  "use another --out")
    if len({_slug(v) for v in values}) < len(values):
        raise ConfigError(f"--values {' '.join(map(str, values))}: two values share a run directory name "
                          f"({', '.join(_slug(v) for v in values)})")
    data = load_data(cfgs[0], data_dir)
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "sweep directory", hint="or give another --out"):
        return _sweep(cfgs, values, vary, wanted, out, data, progress, should_stop, on_ready)


def _sweep(cfgs, values, vary, wanted, out: Path, data: Dataset, progress, should_stop, on_ready) -> list[dict[str, Any]]:
    from .experiment import run_compress

    if on_ready is not None:
        on_ready()
    rows: list[dict[str, Any]] = []
    ref_error = None
    for v, cfg in zip(values, cfgs):
        run_dir = out / _slug(v)
        # an interrupted sweep continues where it stopped: finished runs are reused, an unfinished one resumes
        if (run_dir / "lc_state.pt").exists() and (run_dir / "results.json").exists():
            res = json.loads((run_dir / "results.json").read_text())
            logger.info("reusing the finished run %s", run_dir)
        else:
            unfinished = (run_dir / "checkpoint.pt").exists()
            res = run_compress(cfg, run_dir, resume=unfinished, data=data, progress=progress, should_stop=should_stop)
        ref_error = res["reference"]["test_error"]
        rows.append({"value": str(v), "method": "LC", "test_error": res["final"]["test_error"], "ratio": res["final"]["ratio"]})
        rows.append({"value": str(v), "method": "DC", "test_error": res["direct_compression"]["test_error"],
                     "ratio": res["direct_compression"]["ratio"]})
        if "retrain" in wanted:
            rt = retrain_pruned(cfg, data)
            rows.append({"value": str(v), "method": "retrain", "test_error": rt["test_error"], "ratio": rt["ratio"]})
        write_csv(rows, out / "sweep.csv")
    series: dict[str, list] = {}
    names = {"LC": "LC", "DC": "direct compression", "retrain": "magnitude pruning + retraining"}
    for r in rows:
        series.setdefault(names[r["method"]], []).append((r["ratio"], r["test_error"], r["value"]))
    plot_tradeoff(series, out / "sweep.png", reference_error=ref_error, title=f"{cfgs[0].name.rsplit('_', 1)[0]}: {vary}",
                  connect=True)
    return rows
