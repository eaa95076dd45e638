"""Training of reference (uncompressed) networks, evaluation, checkpoints."""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from ._io import atomic_write
from .data import Dataset, batches

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

CHECKPOINT_FORMAT = "lcompress-checkpoint"
CHECKPOINT_VERSION = 1

__all__ = ["train_reference", "estimate_epoch_seconds", "TrainingStopped", "evaluate", "save_checkpoint",
           "load_checkpoint"]


class TrainingStopped(Exception):
    """:func:`train_reference` stopped because its ``should_stop`` returned True (after a finished minibatch)."""

    def __init__(self, epoch: int, epochs: int) -> None:
        super().__init__(f"stopped in epoch {epoch} of {epochs}")
        self.epoch, self.epochs = epoch, epochs


def _model_device(model: nn.Module) -> torch.device:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return torch.device("cpu")


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> float:
    """Classification error of ``model`` on ``(x, y)`` in percent.

    The model is evaluated in eval mode (BatchNorm running statistics, no
    dropout) on the device of its parameters, and afterwards put back in
    the train/eval mode it had.
    """
    n = x.shape[0]
    if n == 0:
        raise ValueError("evaluate() needs at least one sample")
    was_training = model.training
    model.eval()
    device = _model_device(model)
    wrong = 0
    try:
        for start in range(0, n, batch_size):
            xb = x[start : start + batch_size].to(device, non_blocking=True)
            yb = y[start : start + batch_size].to(device, non_blocking=True)
            wrong += (model(xb).argmax(dim=1) != yb).sum().item()
    finally:
        model.train(was_training)
    return 100.0 * wrong / n


def train_reference(
    model: nn.Module,
    data: Dataset,
    epochs: int,
    lr: float = 0.1,
    momentum: float = 0.9,
    nesterov: bool = True,
    weight_decay: float = 0.0,
    batch_size: int = 128,
    lr_decay: float = 0.99,
    seed: int = 0,
    device: Union[str, torch.device] = "cpu",
    augment: Optional[Callable[..., torch.Tensor]] = None,
    progress: bool = True,
    should_stop: Optional[Callable[[], bool]] = None,
) -> list[dict[str, Any]]:
    """Train ``model`` on ``data.x_train, data.y_train`` with cross-entropy.

    Optimiser: SGD with (Nesterov) momentum and weight decay.  Learning-rate
    schedule: exponential decay per epoch, ``lr * lr_decay**epoch`` for
    epochs 0, 1, ... (``lr_decay=1`` keeps it constant).  Minibatches of
    ``batch_size`` are drawn without replacement from a fresh random
    permutation each epoch.

    ``seed`` seeds the minibatch order and the augmentation (through a
    private generator) and also the global torch RNG (used by dropout), so
    a run is reproducible given the same initial model.  ``augment`` is an
    optional ``f(xb, generator) -> xb`` applied to every training batch,
    e.g. :func:`lcompress.data.augment_cifar`.

    The model is moved to ``device`` and left there, in train mode.  A tqdm
    progress bar is shown on stderr if ``progress``; per-epoch mean loss is
    logged at INFO level.  Returns a list with one dict per epoch
    (``epoch``, ``lr``, ``loss``, ``train_error`` on the batches seen, in
    percent, and ``seconds``).

    ``should_stop`` is polled after every minibatch; when it returns True
    the training stops there and :class:`TrainingStopped` is raised (the
    model holds the weights of the last minibatch: not a trained model).
    """
    if epochs < 0:
        raise ValueError(f"epochs must be >= 0, got {epochs}")
    device = torch.device(device)
    model.to(device)
    model.train()
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    x = data.x_train.to(device)
    y = data.y_train.to(device)
    opt = torch.optim.SGD(
        model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov and momentum > 0,
        weight_decay=weight_decay,
    )
    n_batches = (x.shape[0] + batch_size - 1) // batch_size
    history: list[dict[str, Any]] = []

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=epochs * n_batches, desc="train", unit="batch", leave=False)
    try:
        for epoch in range(epochs):
            epoch_lr = lr * lr_decay**epoch
            for group in opt.param_groups:
                group["lr"] = epoch_lr
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), device=device)
            wrong = torch.zeros((), device=device, dtype=torch.int64)
            seen = 0
            for xb, yb in batches(x, y, batch_size, shuffle=True, generator=gen):
                if augment is not None:
                    xb = augment(xb, gen)
                out = model(xb)
                loss = F.cross_entropy(out, yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss_sum += loss.detach() * yb.shape[0]
                wrong += (out.detach().argmax(dim=1) != yb).sum()
                seen += yb.shape[0]
                if bar is not None:
                    bar.update(1)
                if should_stop is not None and should_stop():
                    raise TrainingStopped(epoch + 1, epochs)
            mean_loss = loss_sum.item() / max(seen, 1)
            train_err = 100.0 * wrong.item() / max(seen, 1)
            if not math.isfinite(mean_loss):
                raise FloatingPointError(
                    f"training diverged at epoch {epoch + 1} (loss {mean_loss}); lower lr={lr}"
                )
            rec = {
                "epoch": epoch + 1,
                "lr": epoch_lr,
                "loss": mean_loss,
                "train_error": train_err,
                "seconds": time.perf_counter() - t0,
            }
            history.append(rec)
            if bar is not None:
                bar.set_postfix(epoch=epoch + 1, loss=f"{mean_loss:.4f}")
            logger.info(
                "epoch %d/%d lr %.5g loss %.5f train error %.2f%% (%.1fs)",
                epoch + 1, epochs, epoch_lr, mean_loss, train_err, rec["seconds"],
            )
    finally:
        if bar is not None:
            bar.close()
    return history


def estimate_epoch_seconds(
    model: nn.Module, data: Dataset, batch_size: int = 128, device: Union[str, torch.device] = "cpu",
    batches: int = 5,
) -> float:
    """About how long an epoch of :func:`train_reference` takes here: ``batches`` SGD steps (after one not timed)
    on a copy of ``model``, scaled to the epoch's minibatches. ``model`` and the global RNG are left as they were.

    Args:
        model: the model to be trained (copied; its device is ``device``).
        data: the training data (the first ``batch_size`` samples are used).
        batch_size: the training's minibatch size.
        device: where the training runs.
        batches: timed minibatches (≥ 1).

    Returns:
        seconds per epoch (forward, backward and step; the per-epoch evaluation and logging are not counted).
    """
    import copy

    if batches < 1:
        raise ValueError(f"batches={batches!r} must be >= 1")
    device = torch.device(device)
    n = data.x_train.shape[0]
    if n == 0:
        return 0.0
    probe = copy.deepcopy(model).to(device).train()
    opt = torch.optim.SGD(probe.parameters(), lr=1e-3, momentum=0.9)
    xb = data.x_train[:batch_size].to(device)
    yb = data.y_train[:batch_size].to(device)
    rng = torch.get_rng_state()  # dropout draws from it
    try:
        times = []
        for i in range(batches + 1):
            t0 = time.perf_counter()
            loss = F.cross_entropy(probe(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if i:  # the first one pays for allocations and lazy initialization
                times.append(time.perf_counter() - t0)
    finally:
        torch.set_rng_state(rng)
    per_batch = sorted(times)[len(times) // 2]  # the median: a busy machine's outliers do not set it
    return per_batch * ((n + batch_size - 1) // batch_size)


def save_checkpoint(path: PathLike, model: nn.Module, meta: Optional[dict] = None) -> None:
    """Save ``model.state_dict()`` and a JSON-serialisable ``meta`` dict.

    ``meta`` typically holds the model name and constructor kwargs, the
    dataset, the test error, epochs and seed.  The file is written to
    ``path + ".tmp"``, flushed and fsynced, then renamed over ``path``, so
    an interrupted save never leaves a truncated checkpoint.  Raises
    ``TypeError`` if ``meta`` is not JSON-serialisable.
    """
    path = Path(path)
    meta = {} if meta is None else meta
    try:
        meta_json = json.dumps(meta, sort_keys=True, allow_nan=True)
    except (TypeError, ValueError) as exc:
        raise TypeError(f"checkpoint meta must be JSON-serialisable: {exc}") from exc
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    obj = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "meta_json": meta_json,
        "state_dict": state,
    }
    if path.parent and not path.parent.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: torch.save(obj, f))
    logger.info("saved checkpoint %s", path)


def load_checkpoint(path: PathLike, model: Optional[nn.Module] = None) -> dict:
    """Load a checkpoint written by :func:`save_checkpoint`.

    The file is read with ``torch.load(weights_only=True)``.  If ``model``
    is given its parameters and buffers are replaced (strictly: keys must
    match).  Returns the ``meta`` dict; the raw state dict is available as
    ``meta["state_dict"]`` only if no model was given.

    Raises ``FileNotFoundError`` if there is no such file; ``ValueError``
    naming the file if it is not a torch file, not an lcompress checkpoint
    or of a newer version; ``RuntimeError`` naming the keys if it does not
    fit ``model``, which is then left as it was.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle, zip and torch errors alike: not a torch file we can read
        msg = " ".join(str(exc).split())[:200]
        raise ValueError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {msg})") from None
    if not isinstance(obj, dict) or obj.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path}: not an lcompress checkpoint")
    version = obj.get("version", 0)
    if not isinstance(version, int) or version > CHECKPOINT_VERSION:
        raise ValueError(
            f"{path}: checkpoint version {version!r} is newer than supported "
            f"({CHECKPOINT_VERSION})"
        )
    state = obj.get("state_dict")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{path}: its state_dict is not a dict of tensors")
    try:
        meta = json.loads(obj.get("meta_json", "{}"))
    except (TypeError, ValueError):
        raise ValueError(f"{path}: its meta_json is not valid JSON") from None
    if not isinstance(meta, dict):
        raise ValueError(f"{path}: its meta_json is not a JSON object")
    if model is not None:
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(state)), sorted(set(state) - set(own))
        bad = [k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape)]
        if missing or unexpected or bad:
            parts = []
            if missing:
                parts.append(f"missing {', '.join(missing[:5])}")
            if unexpected:
                parts.append(f"unexpected {', '.join(unexpected[:5])}")
            if bad:
                parts.append("shape of " + ", ".join(
                    f"{k} {tuple(state[k].shape)} (the model's {tuple(own[k].shape)})" for k in bad[:5]))
            # RuntimeError, as torch's own load_state_dict raises, but before anything was copied
            raise RuntimeError(f"{path}: does not fit the model ({'; '.join(parts)})")
        model.load_state_dict(state, strict=True)
    else:
        meta["state_dict"] = state
    return meta
