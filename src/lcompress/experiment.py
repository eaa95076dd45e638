"""Experiment side: run the LC algorithm from a :class:`~lcompress.config.RunConfig` on real data.

Builds model and data, loads (or trains) the reference, runs direct compression and LC with the config's μ
schedule and SGD L steps, evaluates Δ(Θ) on the test set, and keeps a run directory:

* ``config.json`` — the resolved configuration (a resumed run must match it);
* ``results.json`` — reference, direct compression, and one record per LC step (μ, loss, test error of Δ(Θ),
  ‖w − Δ(Θ)‖, sizes), rewritten atomically after every step;
* ``checkpoint.pt`` — model, optimizer, LC state, RNG states and results after the last finished step, written
  atomically (temporary file, fsync, rename), so a run killed at any moment resumes from the last good one;
* ``lc_state.pt`` — the final LC state; ``model.lcz`` — the compact compressed model (when export is available);
* ``reference.pt`` — the reference, when the config names no ``reference.checkpoint`` and trains one
  (``reference.train_epochs``); the run directory is created and locked before that training starts;
* ``.lock`` — while a process runs there: one process per run directory (a second one is refused).

Distributed: under ``torchrun`` every rank calls :func:`run_compress`; each reads its shard of every batch, the
model is wrapped in DistributedDataParallel, and only rank 0 writes files and shows progress. The losses recorded
are over the global batch (all-reduced), a stop request on any rank stops all of them at the same minibatch (at
the latest at the end of the L step), and a resumed run checks that every rank read the same checkpoint.
"""
from __future__ import annotations

import copy
import json
import logging
import math
import pickle
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ._io import atomic_save, atomic_write_text
from .algorithm import LC, clip_lr
from ._rundir import LOCK_NAME, DirectoryLock, remove_stale_temporaries
from .config import BUILTIN_DATASETS, ConfigError, RunConfig, check_device, config_diff, resolve_entry_point
from .data import Dataset, batches
from .schedules import auto_schedule, geometric
from .training import (TrainingStopped, estimate_epoch_seconds, evaluate, load_checkpoint, save_checkpoint,
                       train_reference)

__all__ = [
    "load_data",
    "build_model",
    "prepare_reference",
    "reference_path",
    "run_compress",
    "measure_loss_and_grad",
    "atomic_save",
    "atomic_write_text",
    "RunInterrupted",
]

logger = logging.getLogger(__name__)

RUN_FORMAT = "lcompress-run"
RUN_VERSION = 1
#: where a reference is trained to when the config names no ``reference.checkpoint``: in the run directory
REFERENCE_NAME = "reference.pt"
#: the files of a run directory (besides log.txt and the lock)
RUN_FILES = ("config.json", "results.json", "checkpoint.pt", "lc_state.pt", "model.lcz", REFERENCE_NAME)


class RunInterrupted(Exception):
    """Raised by a stop request (e.g. Ctrl-C) after the run directory was brought up to date."""


# ---- model and data ---------------------------------------------------------------------------------------------
def load_data(cfg: RunConfig, data_dir: str | None = None, trust_code: bool | None = None) -> Dataset:
    """The config's dataset as in-memory tensors (``data_dir`` overrides ``data.dir``).

    Args:
        cfg: the configuration.
        data_dir: the directory to read a built-in dataset from (only there: a directory without the files is an
            error, never a reason to read them from elsewhere).
        trust_code: consent to run ``data.dataset`` given as ``"package.module:function"`` (see
            :mod:`lcompress.config`); ``None`` takes the consent ``cfg`` was read with.

    Raises:
        ConfigError: naming ``data.dataset``, ``data.dir`` or ``--data-dir``: no consent to run the named code, a
            directory that does not exist or lacks the files, a directory given for a dataset function (which
            reads no directory), unreadable data files, or a function that returns something else.
    """
    from . import data as D

    name = cfg.data.dataset
    trust = cfg.trust_code if trust_code is None else trust_code
    where, what = (data_dir, "--data-dir") if data_dir is not None else (cfg.data.dir, "data.dir")
    if name not in BUILTIN_DATASETS:
        if where is not None:
            raise ConfigError(f"{what}={where!r}: not used by data.dataset={name!r} (a dataset function loads its "
                              "own data); remove it")
        try:
            out = resolve_entry_point(name, "data.dataset", trust, cfg.source)()
        except FileNotFoundError as e:
            raise ConfigError(f"data.dataset={name!r}: {_one_line(e)}") from None
        if isinstance(out, tuple) and len(out) == 4:
            out = Dataset(*out)
        if not isinstance(out, Dataset) or not all(isinstance(t, torch.Tensor) for t in out):
            raise ConfigError(f"data.dataset={name!r} must return lcompress.data.Dataset or (x_train, y_train, x_test, y_test)")
        return out
    loaders = {"fashion-mnist": D.load_fashion_mnist, "mnist": D.load_mnist, "cifar10": D.load_cifar10}
    try:
        return loaders[name](where)
    except FileNotFoundError as e:
        raise ConfigError(f"{what}={where!r}: {_one_line(e)}") from None
    except (ValueError, pickle.UnpicklingError) as e:  # files there, but not what they should be
        raise ConfigError(f"data.dataset={name!r}: {_one_line(e)}") from None


def build_model(cfg: RunConfig, trust_code: bool | None = None) -> nn.Module:
    """The config's model, freshly initialized (seeded by ``cfg.seed``).

    Args:
        trust_code: consent to run ``model.name`` given as ``"package.module:function"`` (see
            :mod:`lcompress.config`); ``None`` takes the consent ``cfg`` was read with.

    Raises:
        ConfigError: no consent to run the named code, bad ``model.args``, or a function that returns no module.
    """
    from .models import MODELS, get_model

    torch.manual_seed(cfg.seed)
    name = cfg.model.name
    if name not in MODELS:
        build = resolve_entry_point(name, "model.name", cfg.trust_code if trust_code is None else trust_code,
                                    cfg.source)
        model = build(**cfg.model.args)
        if not isinstance(model, nn.Module):
            raise ConfigError(f"model.name={name!r} must return a torch.nn.Module")
        return model
    try:
        return get_model(name, **cfg.model.args)
    except TypeError as e:
        raise ConfigError(f"model.args={cfg.model.args!r}: {e}") from None


def check_device_available(device: str, what: str = "device") -> torch.device:
    """``device`` as a torch device that this machine has (a tensor can be made there).

    Raises:
        ConfigError: naming ``what``: not a device name, or not available (no CUDA build or no such GPU).
    """
    check_device(device, what)
    dev = torch.device(device)
    try:
        torch.empty(1, device=dev)
    except Exception as e:  # AssertionError ("Torch not compiled with CUDA enabled"), RuntimeError (ordinal), ...
        raise ConfigError(f"{what}={device!r}: not available on this machine ({_one_line(e)})") from None
    return dev


def reference_path(cfg: RunConfig, run_dir: str | Path | None = None) -> Path | None:
    """Where the config's reference checkpoint is: ``reference.checkpoint`` as the config names it (a relative
    path is relative to the current directory), or, when it names none and ``reference.train_epochs > 0``,
    ``run_dir/reference.pt`` (None without a ``run_dir``, or with nothing to train)."""
    ref = cfg.reference
    if ref.checkpoint is not None:
        return Path(ref.checkpoint)
    if ref.train_epochs > 0 and run_dir is not None:
        return Path(run_dir) / REFERENCE_NAME
    return None


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 1):.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def prepare_reference(
    cfg: RunConfig,
    data: Dataset,
    progress: bool = True,
    is_writer: bool = True,
    *,
    run_dir: str | Path | None = None,
    should_stop: Callable[[], bool] | None = None,
    before_training: Callable[[nn.Module], None] | None = None,
) -> tuple[nn.Module, dict]:
    """Load the reference checkpoint, or train it when ``reference.train_epochs > 0`` and it does not exist.

    The checkpoint is ``reference.checkpoint``, or without one ``run_dir/reference.pt`` (see
    :func:`reference_path`). Before training, one INFO line says where the reference goes (its absolute path),
    for how many epochs, and about how long that takes on this machine (timed on a few minibatches, see
    :func:`lcompress.training.estimate_epoch_seconds`).

    Args:
        cfg: the configuration.
        data: the data the reference is trained on.
        progress: a progress bar while training.
        is_writer: save the trained reference (under torchrun only rank 0 does).
        run_dir: the run directory, where a reference goes that the config names no path for.
        should_stop: polled after every training minibatch; True stops the training, saves nothing and raises
            :class:`RunInterrupted`.
        before_training: called with the (untrained) model just before the training starts, and only then (the
            run validates its tasks and opens its run directory there).

    Raises:
        ConfigError: no checkpoint configured (and none to train), the file is missing and training is not
            enabled, or it is not an lcompress checkpoint of the config's model (the model is then untouched).
        RunInterrupted: ``should_stop`` returned True during the training (no file was written for it).
    """
    model = build_model(cfg).to(check_device_available(cfg.device))
    ref = cfg.reference
    path = reference_path(cfg, run_dir)
    if path is None:
        raise ConfigError("reference.checkpoint: a reference model checkpoint is needed (train one with "
                          "`lcompress train`, or set reference.train_epochs to train it in the run directory)")
    if path.is_file():
        try:
            meta = load_checkpoint(path, model)
        except (ValueError, RuntimeError) as e:
            raise ConfigError(f"reference.checkpoint={str(path)!r}: {_one_line(e)}") from None
        logger.info("reference loaded from %s (test error %s%%)", path, meta.get("test_error"))
        return model, meta
    if path.exists():
        raise ConfigError(f"reference.checkpoint={str(path)!r}: not a file")
    if ref.train_epochs <= 0:
        raise ConfigError(
            f"reference.checkpoint={str(path)!r}: file not found (train it with `lcompress train --out {path}` "
            "or set reference.train_epochs)"
        )
    if before_training is not None:
        before_training(model)
    epoch = estimate_epoch_seconds(model, data, ref.batch_size, cfg.device)
    logger.info("training the reference model (%s on %s, %d epochs, about %s on this machine; Ctrl-C stops it) -> %s",
                cfg.model.name, cfg.data.dataset, ref.train_epochs, _duration(epoch * ref.train_epochs),
                path.absolute())
    try:
        train_reference(
            model, data, ref.train_epochs, lr=ref.lr, lr_decay=ref.lr_decay, batch_size=ref.batch_size,
            seed=cfg.seed, device=cfg.device, progress=progress, should_stop=should_stop,
        )
    except TrainingStopped as e:
        raise RunInterrupted(f"stopped while training the reference ({e}); nothing was saved for it, so running "
                             "the command again trains it from the start") from None
    err = evaluate(model, data.x_test, data.y_test)
    meta = {"model": cfg.model.name, "args": cfg.model.args, "dataset": cfg.data.dataset,
            "epochs": ref.train_epochs, "seed": cfg.seed, "test_error": err}
    if is_writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(path, model, meta)
    return model, meta


def measure_loss_and_grad(
    model: nn.Module, alg: LC, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000, n: int = 5000
) -> tuple[float, float, float]:
    """On ``n`` training samples: (loss at the current weights, loss at Δ(Θ), ‖∇L‖ over the compressed
    parameters at Δ(Θ)). Feeds :func:`lcompress.auto_schedule`."""
    g = torch.Generator().manual_seed(12345)
    idx = torch.randperm(len(x), generator=g)[:n]
    xs, ys = x[idx], y[idx]
    was = model.training
    model.eval()

    def total_loss():
        with torch.no_grad():
            return sum(
                float(F.cross_entropy(model(xs[i : i + batch_size]), ys[i : i + batch_size], reduction="sum"))
                for i in range(0, len(xs), batch_size)
            ) / len(xs)

    try:
        loss = total_loss()
        params = alg._params
        grads = [torch.zeros_like(p) for p in params]
        with alg.compressed():
            loss_dc = total_loss()
            for i in range(0, len(xs), batch_size):
                out = F.cross_entropy(model(xs[i : i + batch_size]), ys[i : i + batch_size], reduction="sum") / len(xs)
                torch._foreach_add_(grads, torch.autograd.grad(out, params))
        gnorm = float(torch.stack(torch._foreach_norm(grads)).norm())
    finally:
        model.train(was)
    return loss, loss_dc, gnorm


# ---- the run ----------------------------------------------------------------------------------------------------
def _dist_info() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _mu_schedule(cfg: RunConfig, alg: LC | None, model: nn.Module, data: Dataset) -> list[float]:
    s = cfg.schedule
    if isinstance(s.mu, list):
        return [float(v) for v in s.mu]
    if s.mu == "geometric":
        return geometric(s.mu0, s.factor, s.steps * s.c_steps_per_step)
    assert alg is not None, "an auto schedule is measured on the LC object's direct compression"
    loss, loss_dc, gnorm = measure_loss_and_grad(model, alg, data.x_train.to(cfg.device), data.y_train.to(cfg.device))
    mus = auto_schedule(alg, s.steps * s.c_steps_per_step, loss_dc - loss, gnorm, penalty_fraction=s.penalty_fraction,
                        final_distance=s.final_distance, hold=s.hold)
    logger.info("auto schedule: loss %.4g -> %.4g at DC, |grad L(DC)| %.4g -> mu0 %.4g (held for a fraction %g of "
                "%d C steps), factor %.4f, last mu %.4g", loss, loss_dc, gnorm, mus[0], s.hold, len(mus),
                (mus[-1] / mus[-2]) if len(mus) > 1 else 1.0, mus[-1])
    return mus


def _stop_requested(
    should_stop: Callable[[], bool] | None, world: int, batch: int, every: int = 10, force: bool = False
) -> bool:
    """Poll the stop request; under torch.distributed all ranks agree (MAX all-reduce every ``every`` batches, and
    whenever ``force``: every rank passes the same ``batch`` and ``force``), so a Ctrl-C seen by one process stops
    every rank at the same batch instead of leaving the others waiting."""
    local = bool(should_stop is not None and should_stop())
    if world == 1:
        return local
    if batch % every and not force:
        return False
    import torch.distributed as dist

    flag = torch.tensor([1 if local else 0], device=_flag_device())
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def _flag_device() -> torch.device:
    import torch.distributed as dist

    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _rank_seed(seed: int, rank: int) -> int:
    """Seed of a rank's global RNG (dropout and other model randomness): distinct per rank, seed + 2 on rank 0."""
    return seed + 2 + 1_000_003 * rank


def _all_rank_states(state: torch.Tensor, world: int) -> torch.Tensor | list[torch.Tensor]:
    """This rank's RNG state, or with several ranks every rank's (a collective: every rank calls it)."""
    if world == 1:
        return state
    import torch.distributed as dist

    dev = _flag_device()
    out = [torch.empty_like(state, device=dev) for _ in range(world)]
    dist.all_gather(out, state.to(dev))
    return [t.cpu() for t in out]


def _this_rank_state(saved: Any, rank: int, world: int, what: str) -> torch.Tensor:
    """The RNG state a checkpoint holds for this rank (checkpoints of one process hold a single state)."""
    states = saved if isinstance(saved, list) else [saved]
    if len(states) != world:
        logger.warning("the checkpoint holds %d %s RNG state(s) for %d rank(s): rank %d takes state %d, so random "
                       "draws (dropout) are not resumed bit for bit", len(states), what, world, rank,
                       rank % len(states))
    return states[rank % len(states)]


def _check_same_start(start: int, out: Path) -> None:
    """Every rank read the run directory itself: make sure they all resume after the same LC step (a directory
    that not every rank sees, or sees at a different state, would otherwise make them diverge or hang)."""
    import torch.distributed as dist

    t = torch.tensor([start, -start], dtype=torch.int64, device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ConfigError(
            f"{str(out)!r}: the ranks found different checkpoints there (from LC step {-int(t[1])} to {int(t[0])}); "
            "the run directory must be the same for every rank (a shared filesystem)"
        )


def _results_path(out: Path) -> Path:
    return out / "results.json"


def _one_line(e: BaseException) -> str:
    return " ".join(line.strip() for line in str(e).splitlines() if line.strip())


def _load_run_checkpoint(path: Path) -> dict[str, Any]:
    """The run checkpoint, on the CPU (RNG states must stay there; the load_state_dict calls move the rest).

    Only ``checkpoint.pt`` is ever read: a ``checkpoint.pt.<unique>.tmp`` is a save that did not finish."""
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a file that is not a torch checkpoint at all
        raise ConfigError(f"{path}: not a readable lcompress run checkpoint ({_one_line(e)})") from None
    if not isinstance(ck, dict) or ck.get("format") != RUN_FORMAT:
        raise ConfigError(f"{path}: not an lcompress run checkpoint")
    version = ck.get("version", 0)
    if not isinstance(version, int) or version > RUN_VERSION:
        raise ConfigError(f"{path}: run checkpoint version {version!r} is newer than supported ({RUN_VERSION})")
    rng = ck.get("rng")
    if (not isinstance(ck.get("step"), int) or not all(isinstance(ck.get(k), dict) for k in ("model", "optimizer", "lc"))
            or not isinstance(ck.get("results"), str) or not isinstance(rng, dict)
            or not {"batches", "torch"} <= set(rng)):
        raise ConfigError(f"{path}: an incomplete lcompress run checkpoint (step, model, optimizer, lc, rng or "
                          "results missing or of the wrong type)")
    try:
        json.loads(ck["results"])["schedule"]
    except (ValueError, KeyError, TypeError):
        raise ConfigError(f"{path}: its results are not the JSON of a run") from None
    return ck


def _check_tasks(model: nn.Module, tasks: dict[Any, Any]) -> None:
    """Resolve the config's task keys against the model; errors name the task (``tasks.<i>.params``) and key."""
    from .tasks import resolve_tasks

    for i, (key, comp) in enumerate(tasks.items()):
        try:
            resolve_tasks(model, {key: comp})
        except (TypeError, ValueError) as e:
            shown = key if isinstance(key, str) else list(key)
            raise ConfigError(f"tasks.{i}.params={shown!r}: {_one_line(e)}") from None
    try:
        resolve_tasks(model, tasks)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"tasks: {_one_line(e)}") from None


def run_compress(
    cfg: RunConfig,
    out_dir: str | Path,
    resume: bool = False,
    force: bool = False,
    data: Dataset | None = None,
    data_dir: str | None = None,
    progress: bool = True,
    should_stop: Callable[[], bool] | None = None,
    export: bool = True,
    on_ready: Callable[[], None] | None = None,
) -> dict[str, Any]:
    """Run LC as configured, writing the run directory (see the module docstring).

    Args:
        cfg: the validated configuration.
        out_dir: the run directory (created; must not hold another run unless ``resume``).
        resume: continue from ``out_dir/checkpoint.pt``.
        force: resume even when the configuration changed.
        data: already loaded data (otherwise loaded from the config).
        data_dir: overrides ``data.dir``.
        progress: show a progress bar (rank 0 only).
        should_stop: polled between minibatches (the reference's training included) and between the phases
            before the LC steps; True stops the run after saving what is done so far (a reference stopped in its
            training is not saved).
        export: write ``model.lcz`` at the end.
        on_ready: called once everything was validated and the run directory exists, before the first write to
            it beyond ``config.json`` (the CLI opens its log file there then).

    Returns:
        the results dict (also in ``results.json``).

    Resuming restores everything the continuation depends on, so an interrupted and resumed run ends bit for bit
    where an uninterrupted one does (same device and thread count): model, optimizer (momentum), LC state, the
    minibatch generator, the global RNG, the μ schedule (an "auto" one is not measured again), the step index and
    the results so far. Only ``checkpoint.pt`` is read, never a temporary file of a save that did not finish;
    such files, left by a killed process, are removed once the directory is locked.

    One process per run directory: the run holds ``out_dir/.lock`` (``fcntl.flock``, see :mod:`lcompress._rundir`)
    from its first look at an existing run directory, or from the creation of a new one, to its end; the kernel
    releases it however the process ends, so a killed run's lock file does not block its resume.

    Raises:
        ConfigError: a bad or changed configuration (the differing fields named), an unknown parameter in a task,
            a missing reference checkpoint or data file, an existing run directory, a checkpoint that does not fit
            the config, a device this machine lacks, code named by the config without consent
            (``cfg.trust_code``). Nothing in the run directory is written before these checks pass.
        lcompress._rundir.DirectoryBusy: (a ConfigError) another process holds the run directory; nothing touched.
        FloatingPointError: an L step diverged (the run directory keeps the last good step).
        OSError: a write failed (disk full, read-only directory); every file is the old one or the new one.
        RunInterrupted: ``should_stop`` returned True (results so far are saved).
    """
    held: list[DirectoryLock] = []
    try:
        return _run_compress(cfg, Path(out_dir), resume, force, data, data_dir, progress, should_stop, export,
                             on_ready, held)
    finally:
        for lock in held:
            lock.release()


def _check_no_run(out: Path) -> None:
    if (out / "results.json").exists() or (out / "checkpoint.pt").exists():
        raise ConfigError(f"run directory {str(out)!r} already holds a run; use --resume, or another --out")


def _is_run_dir(out: Path) -> bool:
    return (out / "config.json").is_file() or (out / LOCK_NAME).exists()


def _lock_run_dir(out: Path, writer: bool, world: int, held: list, check: Callable[[], None] | None = None) -> None:
    """One process per run directory: rank 0 takes its lock (then runs ``check``, under the lock), and every rank
    learns whether that failed (a collective under torchrun: every rank calls it at the same point), so that all
    of them raise instead of some waiting for the others. Stale temporaries of killed writers go once it is held."""
    err: Exception | None = None
    if writer:
        lock = DirectoryLock(out, "run directory", hint="or give another --out")
        try:
            lock.acquire()
            if check is not None:
                check()
        except Exception as e:  # busy, a run there, or an OSError (read-only): raised after the ranks agree
            lock.release()
            err = e
        else:
            held.append(lock)
            remove_stale_temporaries(out, RUN_FILES)
    if world > 1:
        import torch.distributed as dist

        flag = torch.tensor([0 if err is None else 1], device=_flag_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if int(flag.item()) and err is None:
            err = ConfigError(f"run directory {str(out)!r}: refused by rank 0 (its message says why)")
    if err is not None:
        raise err


@dataclass
class _Run:
    """The state of one run as its stages pass it on (see :func:`_run_compress`)."""

    cfg: RunConfig
    out: Path
    rank: int
    world: int
    device: torch.device
    ckpt_path: Path
    cfg_dict: dict[str, Any]
    locked: bool = False  # the run directory existed as one and is locked already
    opened: bool = False  # _open_run_dir has run
    ref_path: Path | None = None  # the reference checkpoint (reference_path)
    diff: list[str] = field(default_factory=list)  # config fields changed since the run being resumed
    ck: dict[str, Any] | None = None  # the checkpoint resumed from
    model: nn.Module | None = None
    ddp_model: nn.Module | None = None
    alg: LC | None = None
    tensors: tuple = ()  # x_train, y_train, x_test, y_test on the device
    mus: list[float] = field(default_factory=list)
    opt: torch.optim.Optimizer | None = None
    gen: torch.Generator | None = None
    results: dict[str, Any] = field(default_factory=dict)
    start: int = 0
    t0: float = 0.0
    ref_meta: dict[str, Any] = field(default_factory=dict)  # the reference checkpoint's metadata
    penalty: bool = False  # a task is a penalty form (its direct compression is taken at the last μ)

    @property
    def writer(self) -> bool:
        return self.rank == 0


def _run_compress(cfg, out, resume, force, data, data_dir, progress, should_stop, export, on_ready, held) -> dict:
    """The stages of a run: validate (nothing written before it passes), build, start or restore, open the run
    directory, the LC steps, finish."""
    rank, world = _dist_info()
    run = _Run(cfg, out, rank, world, check_device_available(cfg.device), out / "checkpoint.pt", cfg.to_dict())
    _check_run_dir(run, resume, force, held)
    _build(run, data, data_dir, progress, should_stop, lambda: _open_run_dir(run, resume, on_ready, held))
    _start_or_restore(run)
    _check_stop(run, should_stop)
    _open_run_dir(run, resume, on_ready, held)
    _lc_steps(run, progress, should_stop)
    return _finish(run, export)


def _check_run_dir(run: _Run, resume: bool, force: bool, held: list) -> None:
    """Validate everything about the run directory before writing anything: a bad config, a missing file or a
    changed config leaves it as it was. A directory that already is a run directory is locked first (one process
    per run directory); a new one is locked when it is created, just before the first write."""
    out = run.out
    locked = out.is_dir() and _is_run_dir(out)
    if run.world > 1:  # every rank must take the same path through the collectives of _lock_run_dir
        import torch.distributed as dist

        flag = torch.tensor([int(locked)], device=_flag_device())
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        locked = bool(flag.item())
    run.locked = locked
    if locked:
        _lock_run_dir(out, run.writer, run.world, held)
    if resume:
        cfg_file = out / "config.json"
        if not cfg_file.is_file():
            raise ConfigError(f"--resume {str(out)!r}: not a run directory (no config.json there)")
        try:
            saved = json.loads(cfg_file.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{cfg_file}: not valid JSON ({_one_line(e)})") from None
        run.diff = config_diff(saved, run.cfg_dict)
        if run.diff and not force:
            raise ConfigError(
                f"the config differs from the run being resumed ({'; '.join(run.diff)}); use --force to resume anyway"
            )
        if run.ckpt_path.is_file():
            run.ck = _load_run_checkpoint(run.ckpt_path)
        else:
            logger.warning("%s: no checkpoint.pt (stopped during the first LC step): starting from the beginning", out)
    else:
        _check_no_run(out)


def _build(run: _Run, data: Dataset | None, data_dir: str | None, progress: bool,
           should_stop: Callable[[], bool] | None = None, open_run_dir: Callable[[], None] | None = None) -> None:
    """Data, reference model, tasks, LC object (direct compression) and the μ schedule; a stop request is
    honoured between these phases and during the reference's training. A reference that has to be trained is
    trained only after the tasks were checked on the model and ``open_run_dir()`` opened (and locked) the run
    directory, where its log then goes (and, when the config names no path, the reference itself)."""
    cfg, device = run.cfg, run.device
    if data is None:
        data = load_data(cfg, data_dir)
    run.tensors = (data.x_train.to(device), data.y_train.to(device), data.x_test.to(device), data.y_test.to(device))
    _check_stop(run, should_stop)
    run.ref_path = reference_path(cfg, run.out)
    if run.world > 1:
        _check_same_reference(run.ref_path)

    def before_training(model: nn.Module) -> None:
        _check_tasks(model, cfg.task_map())  # a bad task key fails now, not after the training
        if open_run_dir is not None:
            open_run_dir()

    model, ref_meta = prepare_reference(cfg, data, progress=progress and run.writer, is_writer=run.writer,
                                        run_dir=run.out, should_stop=_batch_poll(should_stop, run.world),
                                        before_training=before_training)
    run.ref_meta = ref_meta
    _check_stop(run, should_stop)
    run.t0 = time.perf_counter()
    tasks = cfg.task_map()
    _check_tasks(model, tasks)
    penalty = any(c.penalty_form for c in tasks.values())
    ddp_model: nn.Module = model
    if run.world > 1:
        ddp_model = nn.parallel.DistributedDataParallel(model)
    # Penalty forms (explicit schedules only, see config.py) start from their C step at the first μ: at μ → 0⁺
    # they compress everything away, and an L step pulled towards Δ = 0 would wipe out the weights.
    first_mu = _mu_schedule(cfg, None, model, data)[0] if penalty else None
    alg = LC(ddp_model, tasks, multipliers=cfg.lc.multipliers, direct_mu=first_mu)
    # The μ schedule of a resumed run is the one it started with (an "auto" one is not measured again); only a
    # forced resume with a changed [schedule] takes the new one.
    schedule_changed = any(d.startswith("schedule.") for d in run.diff)
    if run.world > 1:
        _check_same_start(int(run.ck["step"]) if run.ck is not None else 0, run.out)
    _check_stop(run, should_stop)
    if run.ck is not None and not schedule_changed:
        run.mus = [float(v) for v in json.loads(run.ck["results"])["schedule"]]
    else:
        run.mus = _mu_schedule(cfg, alg, model, data)
    run.model, run.ddp_model, run.alg, run.penalty = model, ddp_model, alg, penalty


def _check_stop(run: _Run, should_stop: Callable[[], bool] | None) -> None:
    """Between the phases before the LC steps: a stop request ends the run here (every rank at the same point).
    Nothing of the LC steps was written yet, so the same command continues (a new run starts again; a resumed
    one resumes again)."""
    if _stop_requested(should_stop, run.world, 0, force=True):
        step = int(run.ck["step"]) if run.ck is not None else 0
        again = f"--resume {run.out}" if run.ck is not None else "the same command"
        raise RunInterrupted(f"stopped before LC step {step + 1}; nothing was lost: {again} starts there")


def _batch_poll(should_stop: Callable[[], bool] | None, world: int) -> Callable[[], bool] | None:
    """A stop poll for the reference's training, one call per minibatch; under torch.distributed every rank trains
    the same minibatches, so the ranks agree every few of them as in the LC steps (:func:`_stop_requested`)."""
    if should_stop is None:
        return None
    count = [0]

    def poll() -> bool:
        count[0] += 1
        return _stop_requested(should_stop, world, count[0])

    return poll


def _check_same_reference(path: Path | None) -> None:
    """Every rank must see the reference checkpoint, or none of them: a rank that trains it while another loads
    it would wait for the others in the training's stop polls."""
    import torch.distributed as dist

    has = int(path is not None and path.is_file())
    t = torch.tensor([has, -has], dtype=torch.int64, device=_flag_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    if int(t[0]) != -int(t[1]):
        raise ConfigError(f"reference.checkpoint={str(path)!r}: some ranks see the file and others do not; it must "
                          "be on a filesystem every rank shares")


def _start_or_restore(run: _Run) -> None:
    """The optimizer and minibatch generator; a new run's results (reference and direct compression), or a
    resumed run's state from its checkpoint."""
    cfg, model, alg, mus, device = run.cfg, run.model, run.alg, run.mus, run.device
    _, _, x_test, y_test = run.tensors
    penalty = run.penalty
    run.opt = opt = torch.optim.SGD(model.parameters(), lr=cfg.optimizer.lr, momentum=cfg.optimizer.momentum,
                                    nesterov=cfg.optimizer.nesterov and cfg.optimizer.momentum > 0,
                                    weight_decay=cfg.optimizer.weight_decay)
    run.gen = gen = torch.Generator().manual_seed(cfg.seed + 1)
    ck = run.ck
    if ck is None:
        ref_error = evaluate(model, x_test, y_test)
        if penalty:
            # penalty forms compress everything away at μ → 0⁺: compare with direct compression at the last μ
            dc_alg = LC(copy.deepcopy(model), cfg.task_map(), multipliers=False, direct_mu=mus[-1])
        else:
            dc_alg = alg
        with dc_alg.compressed() as m:
            dc_error = evaluate(m, x_test, y_test)
        dc_sizes = dc_alg.size_report()
        del dc_alg
        logger.info("reference test error %.2f%%, direct compression %.2f%% (ratio %.2f)", ref_error, dc_error,
                    dc_sizes["ratio"])
        # each rank its own stream for the model's randomness (dropout): ranks see different samples and must not
        # share masks; rank 0 (and a single process) keeps seed + 2
        torch.manual_seed(_rank_seed(cfg.seed, run.rank))
        if device.type == "cuda":
            torch.cuda.manual_seed(_rank_seed(cfg.seed, run.rank))
        run.results = {
            "name": cfg.name,
            "config": run.cfg_dict,
            "reference": {"test_error": ref_error, "checkpoint": str(run.ref_path) if run.ref_path else None,
                          "meta": run.ref_meta},
            "direct_compression": {"test_error": dc_error, "mu": mus[-1] if penalty else None, **_sizes(dc_sizes)},
            "schedule": mus,
            "steps": [],
            "world_size": run.world,
        }
        run.start = 0
        return
    diff = run.diff
    try:
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        alg.load_state_dict(ck["lc"])
    except (RuntimeError, ValueError, KeyError) as e:
        changed = f" (changed: {'; '.join(diff)})" if diff else ""
        raise ConfigError(f"{run.ckpt_path}: cannot resume it with this config{changed}: {_one_line(e)}") from None
    gen.set_state(ck["rng"]["batches"])
    torch.set_rng_state(_this_rank_state(ck["rng"]["torch"], run.rank, run.world, "torch"))
    if device.type == "cuda" and ck["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(_this_rank_state(ck["rng"]["cuda"], run.rank, run.world, "cuda"), device)
    results = json.loads(ck["results"])
    run.start = int(ck["step"])
    if diff:
        logger.warning("resuming %s with a changed config: %s", run.out, "; ".join(diff))
        results["config"] = run.cfg_dict
        results.setdefault("resumed_with_changes", []).append(diff)
        results["schedule"] = mus
    run.results = results
    logger.info("resumed %s after LC step %d of %d", run.out, run.start, len(mus) // cfg.schedule.c_steps_per_step)


def _open_run_dir(run: _Run, resume: bool, on_ready: Callable[[], None] | None, held: list) -> None:
    """Create and lock a new run directory (meanwhile another run may have finished there) and write config.json;
    once per run (before the reference's training when there is one, else before the LC steps)."""
    if run.opened:
        return
    run.opened = True
    out = run.out
    if run.writer:
        out.mkdir(parents=True, exist_ok=True)
    if not run.locked:
        _lock_run_dir(out, run.writer, run.world, held, check=None if resume else lambda: _check_no_run(out))
    if run.writer:
        if run.ck is None or run.diff:
            atomic_write_text(json.dumps(run.cfg_dict, indent=2), out / "config.json")
        if on_ready is not None:
            on_ready()


def _lc_steps(run: _Run, progress: bool, should_stop: Callable[[], bool] | None) -> None:
    """The LC steps from ``run.start``: each an L step (its minibatches split among the step's C steps), the C
    step, its record, and the checkpoint."""
    cfg, world, x_train = run.cfg, run.world, run.tensors[0]
    per_rank_batch = max(1, cfg.data.batch_size // world)
    if per_rank_batch * world != cfg.data.batch_size:
        logger.warning("data.batch_size=%d is not a multiple of the %d ranks: the global batch is %d",
                       cfg.data.batch_size, world, per_rank_batch * world)
    n_batches = math.ceil((len(x_train) // world) / per_rank_batch)
    # c C steps per LC step: the step's minibatches split into c nearly equal parts, part j ended by the C step at
    # its own μ (the schedule has c values per LC step); the last part's C step is the one after the step's loop
    c_per = cfg.schedule.c_steps_per_step
    n_steps = len(run.mus) // c_per
    step_batches = cfg.schedule.epochs_per_step * n_batches
    c_after = [math.ceil(step_batches * (j + 1) / c_per) for j in range(c_per - 1)]
    bar = None
    if progress and run.writer:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_steps * step_batches, initial=run.start * step_batches, desc=cfg.name, unit="batch",
                   dynamic_ncols=True)
    counter = [0]  # minibatches this process has trained, for the stop poll's cadence
    try:
        for step in range(run.start, n_steps):
            rec = _lc_step(run, step, n_steps, per_rank_batch, c_after, bar, should_stop, counter)
            run.results["steps"].append(rec)
            if bar is not None:
                bar.set_postfix(mu=f"{rec['mu']:.3g}", err=f"{rec.get('test_error', float('nan')):.2f}",
                                feas=f"{rec['feasibility']:.3g}")
            logger.info(
                "LC step %d/%d: mu=%.4g lr=%.4g loss=%.4f |w-Delta|=%.4g test error %s ratio %.2f",
                step + 1, n_steps, rec["mu"], rec["lr"], rec["loss"], rec["feasibility"],
                f"{rec['test_error']:.2f}%" if "test_error" in rec else "-", rec["ratio"],
            )
            _save_step(run, step)
    finally:
        if bar is not None:
            bar.close()


def _lc_step(run: _Run, step: int, n_steps: int, per_rank_batch: int, c_after: list[int], bar, should_stop,
             counter: list[int]) -> dict[str, Any]:
    """One LC step: the L step over ``epochs_per_step`` epochs with the step's inner C steps, then its last C step;
    returns the step's record."""
    cfg, alg, opt, device, world, out = run.cfg, run.alg, run.opt, run.device, run.world, run.out
    x_train, y_train, x_test, y_test = run.tensors
    c_per = cfg.schedule.c_steps_per_step
    grad_form = cfg.lc.penalty == "grad"  # the penalty's gradient added after backward, not through the loss
    sub = run.mus[step * c_per : (step + 1) * c_per]
    mu = sub[0]
    lr0 = cfg.optimizer.lr * cfg.optimizer.lr_decay ** step
    lr = clip_lr(lr0, mu, cfg.optimizer.clip_lr_scale) if cfg.optimizer.clip_lr else lr0
    for group in opt.param_groups:
        group["lr"] = lr
    ts = time.perf_counter()
    run.model.train()
    loss_sum = torch.zeros((), device=device)
    pen_sum = torch.zeros((), device=device)
    seen = 0
    part = 0
    for _ in range(cfg.schedule.epochs_per_step):
        for xb, yb in batches(x_train, y_train, per_rank_batch, shuffle=True, generator=run.gen, rank=run.rank,
                              world_size=world):
            loss = F.cross_entropy(run.ddp_model(xb), yb)
            opt.zero_grad(set_to_none=True)
            if grad_form:  # the penalty's gradient added after backward (and after DDP's all-reduce)
                loss.backward()
                alg.penalty_grad_(mu)
            else:
                pen = alg.penalty(mu)
                (loss + pen).backward()
                pen_sum += pen.detach()
            opt.step()
            loss_sum += loss.detach()
            seen += 1
            counter[0] += 1
            if bar is not None:
                bar.update(1)
            if _stop_requested(should_stop, world, counter[0]):
                raise RunInterrupted(f"stopped during LC step {step + 1}; resume with --resume {out}")
            if part < c_per - 1 and seen == c_after[part]:  # an inner C step, then the next part's μ
                alg.c_step(mu)
                part += 1
                mu = sub[part]
                lr = clip_lr(lr0, mu, cfg.optimizer.clip_lr_scale) if cfg.optimizer.clip_lr else lr0
                for group in opt.param_groups:
                    group["lr"] = lr
    # ranks agree once more before the C step: an L step shorter than the poll interval would otherwise never see a
    # stop request
    if world > 1 and _stop_requested(should_stop, world, counter[0], force=True):
        raise RunInterrupted(f"stopped during LC step {step + 1}; resume with --resume {out}")
    if world > 1:
        # the step's loss over the global batch, as a single process would report it (each rank saw a shard)
        import torch.distributed as dist

        sums = torch.stack([loss_sum, pen_sum]).to(_flag_device())
        dist.all_reduce(sums)
        loss_sum, pen_sum = (sums / world).to(device).unbind()
    mean_loss = float(loss_sum) / max(seen, 1)
    if grad_form:  # no per-batch values: the penalty at the L step's end weights (the same on every rank)
        with torch.no_grad():
            pen_value = float(alg.penalty(mu))
    else:
        pen_value = float(pen_sum) / max(seen, 1)
    if not math.isfinite(mean_loss):
        raise FloatingPointError(
            f"the L step diverged at LC step {step + 1} (mu={mu:.4g}, loss={mean_loss}); lower optimizer.lr"
        )
    alg.c_step(mu)
    rec = {
        "step": step + 1,
        "mu": mu,
        "lr": lr,
        "loss": mean_loss,
        "penalty": pen_value,
        "feasibility": alg.feasibility()["total"],
        "seconds": time.perf_counter() - ts,
        **_sizes(alg.size_report()),
    }
    if (step + 1) % cfg.evaluate.every == 0 or step + 1 == n_steps:
        with alg.compressed() as m:
            rec["test_error"] = evaluate(m, x_test, y_test)
        rec["test_error_w"] = evaluate(run.model, x_test, y_test)
    return rec


def _save_step(run: _Run, step: int) -> None:
    """The checkpoint after LC step ``step``, then results.json (which so never shows a step a resume would run
    again); every rank's RNG states are gathered, rank 0 writes."""
    device, world = run.device, run.world
    rng_torch = _all_rank_states(torch.get_rng_state(), world)
    rng_cuda = _all_rank_states(torch.cuda.get_rng_state(device), world) if device.type == "cuda" else None
    if not run.writer:
        return
    atomic_save(
        {
            "format": RUN_FORMAT,
            "version": RUN_VERSION,
            "step": step + 1,
            "model": run.model.state_dict(),
            "optimizer": run.opt.state_dict(),
            "lc": run.alg.state_dict(),
            "rng": {
                "batches": run.gen.get_state(),
                "torch": rng_torch,  # one state per rank (a single tensor for one process)
                "cuda": rng_cuda,
            },
            "results": json.dumps(run.results),
        },
        run.ckpt_path,
    )
    atomic_write_text(json.dumps(run.results, indent=2), _results_path(run.out))


def _finish(run: _Run, export: bool) -> dict[str, Any]:
    """The final record, results.json, the final LC state and (``export``) model.lcz."""
    alg, results, out = run.alg, run.results, run.out
    final = results["steps"][-1] if results["steps"] else {}
    rel = alg.check_feasible()  # logs the library's "ended infeasible" warning (once)
    results["final"] = {
        "test_error": final.get("test_error"),
        "feasibility": final.get("feasibility"),
        "relative_feasibility": rel,
        "feasible": rel <= alg.feasibility_tol,
        **_sizes(alg.size_report()),
        "seconds": time.perf_counter() - run.t0,
    }
    if run.writer:
        atomic_write_text(json.dumps(results, indent=2), _results_path(out))
        atomic_save(alg.state_dict(), out / "lc_state.pt")
        if export:
            _export(alg, out / "model.lcz", results)
            atomic_write_text(json.dumps(results, indent=2), _results_path(out))
    return results


def _export(alg: LC, path: Path, results: dict) -> None:
    info = alg.export(path)
    results["final"]["file_bytes"] = path.stat().st_size
    results["final"]["export"] = {k: v for k, v in info.items() if isinstance(v, (int, float, str))}


def _sizes(rep: dict[str, Any]) -> dict[str, Any]:
    return {
        "compressed_bits": rep["compressed_bits"],
        "reference_bits": rep["reference_bits"],
        "ratio": rep["ratio"],
        "task_bits": {r["task"]: r["bits"] for r in rep["tasks"]},
    }
