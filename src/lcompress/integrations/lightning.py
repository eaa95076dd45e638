"""PyTorch Lightning integration: compress a LightningModule by LC from a callback, leaving its code alone.

>>> from lcompress.integrations.lightning import LCCallback                            # doctest: +SKIP
>>> cb = LCCallback({"fc1.weight": lc.AdaptiveQuantization(k=2)}, lc.geometric(1e-3, 1.5, 30))  # doctest: +SKIP
>>> lightning.Trainer(max_epochs=30, callbacks=[cb]).fit(module)                       # doctest: +SKIP
>>> cb.lc.export("model.lcz")                                                          # doctest: +SKIP

Needs ``pip install lightning`` (or ``pip install 'lcompress[lightning]'``); ``import lcompress`` never imports it.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Iterable, Mapping

import torch
from torch import Tensor, nn

try:
    from lightning.pytorch.callbacks import Callback
except ImportError as e:  # pragma: no cover - exercised in a subprocess by the tests
    raise ImportError(
        "lcompress.integrations.lightning needs PyTorch Lightning, which is not installed: "
        "pip install lightning  (or: pip install 'lcompress[lightning]')"
    ) from e

from ..algorithm import LC, _check_mu
from ..compressions.base import Compression

__all__ = ["LCCallback"]

logger = logging.getLogger(__name__)

STATE_FORMAT = "lcompress.LCCallback"
STATE_VERSION = 1

_MISSING = object()
_SAVED = "_lcompress_saved"  # on our training_step wrapper: the instance attribute it shadows (or _MISSING)


class LCCallback(Callback):
    """Run the LC algorithm over a LightningModule's own training: the L steps are Lightning epochs.

    * **Fit start**: ``LC(pl_module, tasks, multipliers)`` is built on the LightningModule itself (task keys are
      names from ``pl_module.named_parameters()``); this runs direct compression. The LC object is
      :attr:`lc` (None before the first fit).
    * **L step**: every training batch minimizes L(w) + μ/2 ‖w − Δ(Θ) − λ/μ‖². The penalty is added to the loss that
      ``training_step`` returns (a tensor, or the ``"loss"`` entry of a dict; None, a skipped batch, passes through).
    * **C step**: at the end of every ``epochs_per_step``-th epoch, ``lc.c_step(μ)``; then ``lc/mu``,
      ``lc/feasibility`` (‖w − Δ(Θ)‖ over all tasks) and ``lc/ratio`` (compression ratio) are logged with
      ``pl_module.log``. μ = ``mu_schedule[epoch // epochs_per_step]``; when the schedule is done the callback asks
      the trainer to stop (``trainer.should_stop``), and should training go on (``min_epochs``) it keeps the last μ.
      If training ends between C steps (``max_steps``, a ``max_epochs`` that cuts a step short), one more C step
      at the current μ is taken at train end, so Δ(Θ) reflects the trained weights.
    * **Fit end**: with ``finalize`` the model's weights become Δ(Θ) (the compressed model, ready to evaluate or
      export with ``callback.lc.export(path)``).
    * **Checkpoints**: Θ, λ, Δ(Θ) and the compressions' warm starts are saved in the callback's state and restored
      on ``trainer.fit(..., ckpt_path=...)``; μ follows from the restored epoch.

    How the penalty reaches the loss. Lightning's ``on_before_backward`` sees the loss but cannot replace it, and
    adding the penalty's gradient in ``on_after_backward`` would have to redo by hand what Lightning does to the
    loss (divide by ``accumulate_grad_batches``, multiply by the AMP loss scale) and, under DDP, a second backward
    pass into the parameters would fire DDP's gradient hooks a second time (an error). So at fit start the callback
    shadows ``training_step`` on the module *instance* with a wrapper that calls the user's method and adds
    :meth:`LC.penalty` to its loss; the class and its source are untouched, and the instance attribute is removed at
    teardown (also after an exception). The penalty is then an ordinary term of the loss: precision plugins,
    gradient accumulation, gradient clipping and DDP's gradient averaging treat it like the rest (its gradient is
    the same on every rank, so the average is itself). The wrapper keeps the user's signature
    (``functools.wraps``), which Lightning inspects. Only automatic optimization is supported: with
    ``automatic_optimization = False`` the module calls ``manual_backward`` itself and the returned value is not the
    loss.

    ``penalty="grad"`` takes the cheaper gradient form instead (:meth:`LC.penalty_grad_`): the wrapper passes the
    loss through unchanged (it only notes the batch's μ) and, in ``on_before_optimizer_step``, the penalty's
    gradient is added to ``.grad`` once per optimizer step that followed a trained batch. Lightning calls that hook after the backward passes of every accumulated batch, after the AMP scaler has
    unscaled the gradients, after DDP has averaged them, and before gradient clipping, so the result is the loss
    form's up to float rounding. The penalty is then not part of the logged loss.

    Under DDP every rank builds the same LC object and runs the same C step; :meth:`LC.c_step` checks that the ranks
    agree (see ``docs/distributed.md``).

    Args:
        tasks: ``{key: Compression}`` as for :class:`lcompress.LC`.
        mu_schedule: the increasing penalty parameters μ, one per LC step (e.g. :func:`lcompress.geometric`).
        epochs_per_step: training epochs per LC step (≥ 1); the fit needs ``max_epochs ≥ len(mu_schedule) ·
            epochs_per_step`` to run the whole schedule (fewer is allowed, and logged as a warning).
        multipliers: keep Lagrange multipliers λ (augmented Lagrangian); False: quadratic-penalty method.
        finalize: put Δ(Θ) into the model's weights at fit end.
        penalty: ``"loss"`` (the penalty added to ``training_step``'s loss) or ``"grad"`` (its gradient added
            before each optimizer step; see above).

    Raises:
        TypeError, ValueError: bad arguments (at construction) or a bad task map (at fit start, from :class:`LC`).
        RuntimeError: at fit start, a module with manual optimization.
    """

    def __init__(
        self,
        tasks: Mapping[Any, Compression],
        mu_schedule: Iterable[float],
        epochs_per_step: int = 1,
        multipliers: bool = True,
        finalize: bool = True,
        penalty: str = "loss",
    ) -> None:
        super().__init__()
        if not isinstance(tasks, Mapping) or len(tasks) == 0:
            raise ValueError(
                "tasks must be a non-empty dict {parameter name | tuple of names | 're:pattern': Compression}"
            )
        for key, comp in tasks.items():
            if not isinstance(comp, Compression):
                raise TypeError(f"task {key!r}: the value must be an lcompress Compression, got {type(comp).__name__}")
        schedule = [_check_mu(mu, f"mu_schedule[{i}]") for i, mu in enumerate(mu_schedule)]
        if not schedule:
            raise ValueError("mu_schedule must hold at least one μ")
        if isinstance(epochs_per_step, bool) or not isinstance(epochs_per_step, int) or epochs_per_step < 1:
            raise ValueError(f"epochs_per_step={epochs_per_step!r} must be an integer >= 1")
        for name, flag in (("multipliers", multipliers), ("finalize", finalize)):
            if not isinstance(flag, bool):
                raise TypeError(f"{name}={flag!r} must be True or False")
        if penalty not in ("loss", "grad"):
            raise ValueError(f"penalty={penalty!r} must be 'loss' or 'grad'")
        self.penalty = penalty
        self.tasks = tasks
        self.mu_schedule = schedule
        self.epochs_per_step = epochs_per_step
        self.multipliers = multipliers
        self.finalize = finalize
        self.lc: LC | None = None
        self._pending: dict[str, Any] | None = None  # state loaded before the LC object exists
        self._module: nn.Module | None = None
        self._saved_step: Any = _MISSING
        self._since_c_step = 0  # training batches with a penalty since the last C step
        self._last_mu: float | None = None
        self._grad_due: float | None = None  # penalty="grad": μ of a batch whose optimizer step is still to come

    # ---- the schedule ---------------------------------------------------------------------------------------
    def mu_at(self, epoch: int) -> float:
        """μ of the LC step that training epoch ``epoch`` (0-based) belongs to (the last μ past the schedule)."""
        return self.mu_schedule[min(epoch // self.epochs_per_step, len(self.mu_schedule) - 1)]

    @property
    def total_epochs(self) -> int:
        """Epochs the whole schedule takes: ``len(mu_schedule) · epochs_per_step``."""
        return len(self.mu_schedule) * self.epochs_per_step

    # ---- fit start / end ------------------------------------------------------------------------------------
    def on_fit_start(self, trainer, pl_module) -> None:
        if not pl_module.automatic_optimization:
            raise RuntimeError(
                "LCCallback needs automatic optimization (the penalty is added to the loss training_step returns); "
                "with manual optimization use lcompress.LC directly and add lc.penalty(mu) to the loss yourself"
            )
        self.lc = LC(pl_module, self.tasks, multipliers=self.multipliers)
        self._grad_due = None
        if self._pending is not None:
            self._restore(self._pending)
            self._pending = None
        self._install(pl_module)
        max_epochs = trainer.max_epochs
        if max_epochs is not None and 0 <= max_epochs < self.total_epochs:
            logger.warning(
                "LCCallback: max_epochs=%d is fewer than the %d epochs of the schedule (%d μ values × %d epochs); "
                "LC will stop at μ=%g",
                max_epochs,
                self.total_epochs,
                len(self.mu_schedule),
                self.epochs_per_step,
                self.mu_at(max(max_epochs - 1, 0)),
            )

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        epoch = trainer.current_epoch  # the epoch that just ended
        if (epoch + 1) % self.epochs_per_step != 0:
            return
        mu = self.mu_at(epoch)
        self._c_step(mu)
        feasibility = self.lc.feasibility()["total"]
        ratio = self.lc.size_report()["ratio"]
        # the values are identical on every rank: sync_dist only averages equal numbers (and avoids Lightning's
        # warning about unsynchronised epoch-level metrics)
        pl_module.log("lc/mu", mu, sync_dist=True)
        pl_module.log("lc/feasibility", feasibility, sync_dist=True)
        pl_module.log("lc/ratio", ratio, sync_dist=True)
        logger.info(
            "LC step %d (epoch %d): mu=%.4g ||w - Delta||=%.4g ratio=%.2f", self.lc.step, epoch, mu, feasibility, ratio
        )
        if epoch + 1 >= self.total_epochs:
            trainer.should_stop = True

    def on_train_end(self, trainer, pl_module) -> None:
        # still inside the training loop, so under DDP every rank is here and the C step's check can communicate
        if self.lc is not None and self._since_c_step > 0 and self._last_mu is not None:
            logger.info(
                "LCCallback: %d batches trained since the last C step; one more at mu=%g",
                self._since_c_step,
                self._last_mu,
            )
            self._c_step(self._last_mu)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self.lc is None:
            return
        params = dict(pl_module.named_parameters())
        deltas = self.lc.decompressed()
        if any(deltas[n].device != params[n].device for n in deltas):
            # the strategy moved the model (e.g. to the CPU at teardown): keep Θ, λ and Δ beside the weights
            self.lc.load_state_dict(self.lc.state_dict())
            deltas = self.lc.decompressed()
        if self.finalize:
            with torch.no_grad():
                for name, d in deltas.items():
                    params[name].copy_(d)
            logger.info("LCCallback: model weights set to the compressed weights Δ(Θ)")

    def teardown(self, trainer, pl_module, stage: str) -> None:
        self._uninstall()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._uninstall()

    # ---- the penalty in training_step -----------------------------------------------------------------------
    def _install(self, pl_module: nn.Module) -> None:
        self._uninstall()
        current = pl_module.__dict__.get("training_step", _MISSING)
        while hasattr(current, _SAVED):  # a wrapper left behind by a fit that never reached teardown
            current = getattr(current, _SAVED)
        self._saved_step = current
        self._module = pl_module
        # the class's method bound to this instance, or the instance attribute the user set
        user_step = type(pl_module).training_step.__get__(pl_module) if current is _MISSING else current

        @functools.wraps(user_step)
        def training_step(*args, **kwargs):
            return self._add_penalty(user_step(*args, **kwargs), pl_module)

        setattr(training_step, _SAVED, current)
        pl_module.training_step = training_step

    def _uninstall(self) -> None:
        module, self._module = self._module, None
        if module is None:
            return
        if self._saved_step is _MISSING:
            module.__dict__.pop("training_step", None)
        else:
            module.training_step = self._saved_step
        self._saved_step = _MISSING

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if self.penalty == "grad" and self._grad_due is not None:
            self.lc.penalty_grad_(self._grad_due)
            self._grad_due = None

    def _add_penalty(self, out: Any, pl_module) -> Any:
        if out is None:  # Lightning skips the batch
            return out
        if not (isinstance(out, Tensor) or (isinstance(out, dict) and "loss" in out)):
            raise TypeError(
                f"LCCallback: training_step returned {type(out).__name__}; expected the loss tensor, a dict with a "
                "'loss' key, or None"
            )
        mu = self.mu_at(pl_module.trainer.current_epoch)
        if self.penalty == "grad":
            self._grad_due = mu  # added to the gradients in on_before_optimizer_step, once per optimizer step
        elif isinstance(out, Tensor):
            out = out + self.lc.penalty(mu)
        else:
            out = {**out, "loss": out["loss"] + self.lc.penalty(mu)}
        self._since_c_step += 1
        self._last_mu = mu
        return out

    def _c_step(self, mu: float) -> None:
        self.lc.c_step(mu)
        self._since_c_step = 0

    # ---- checkpoints ----------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The LC state (Θ, λ, Δ(Θ), warm starts) and the schedule, for Lightning checkpoints."""
        if self.lc is None:
            return dict(self._pending) if self._pending is not None else {}
        return {
            "format": STATE_FORMAT,
            "version": STATE_VERSION,
            "lc": self.lc.state_dict(),
            "mu_schedule": list(self.mu_schedule),
            "epochs_per_step": self.epochs_per_step,
            "batches_since_c_step": self._since_c_step,
            "last_mu": self._last_mu,
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; before fit start (the usual case) it is applied once the LC object exists.

        Raises:
            ValueError: not an LCCallback state, or (when applied) an LC state for a different task map.
        """
        if not state_dict:
            return
        if state_dict.get("format") != STATE_FORMAT:
            raise ValueError(f"not an LCCallback state dict (format={state_dict.get('format')!r})")
        if state_dict.get("version", 0) > STATE_VERSION:
            raise ValueError(
                f"LCCallback state version {state_dict.get('version')} is newer than supported ({STATE_VERSION})"
            )
        same = (
            list(state_dict["mu_schedule"]) == self.mu_schedule
            and state_dict["epochs_per_step"] == self.epochs_per_step
        )
        if not same:
            logger.warning(
                "LCCallback: the checkpoint was made with another schedule (%d μ values × %d epochs); "
                "continuing with this callback's (%d × %d)",
                len(state_dict["mu_schedule"]),
                state_dict["epochs_per_step"],
                len(self.mu_schedule),
                self.epochs_per_step,
            )
        if self.lc is None:
            self._pending = dict(state_dict)
        else:  # strategies that restore checkpoints after setup call this after fit start
            self._restore(state_dict)

    def _restore(self, state: Mapping[str, Any]) -> None:
        self.lc.load_state_dict(state["lc"])
        self._since_c_step = int(state.get("batches_since_c_step", 0))
        self._last_mu = state.get("last_mu")

    def __repr__(self) -> str:
        return (
            f"LCCallback({len(self.tasks)} task key(s), {len(self.mu_schedule)} μ values, "
            f"epochs_per_step={self.epochs_per_step}, multipliers={self.multipliers}, finalize={self.finalize})"
        )
