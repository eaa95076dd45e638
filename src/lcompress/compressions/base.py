"""The Compression interface every C step implements."""
from __future__ import annotations

import copy
import math
from typing import Any, ClassVar

import torch
from torch import Tensor

from .._threads import c_step_threads
from ..codecs import Codec, codec_for

__all__ = ["Compression", "NotCompressedError", "REGISTRY", "from_config"]

#: class name → compression class: every subclass of :class:`Compression` registers itself when it is defined
#: (``class _Base(Compression, register=False)`` for an abstract base). Configs and files name compressions by it.
REGISTRY: dict[str, type["Compression"]] = {}


class NotCompressedError(RuntimeError):
    """Θ was asked for before the first C step."""


class Compression:
    """A compression Δ(Θ) with its exact C step Π.

    A subclass holds only its hyperparameters and its last Θ. It implements:

    * ``_compress(w, mu) -> Tensor``: solve Θ = argmin_Θ ‖w − Δ(Θ)‖² (+ a penalty term for penalty forms),
      store Θ in ``self._theta`` and return Δ(Θ) with the shape of ``w``;
    * ``_decompress() -> Tensor``: Δ(Θ) from ``self._theta``;

    and declares, as class attributes:

    * ``codec``: the :class:`lcompress.codecs.Codec` that stores its Θ in a ``.lcz`` file (e.g.
      ``CodebookCodec("all")``); ``count_bits()`` and ``count_params()`` come from it, so the size report is
      what the file stores;
    * ``examples()``: a classmethod returning example instances, over which the shared contract suite
      (``tests/test_compressions.py``) runs every registered compression.

    Defining a subclass registers it in :data:`REGISTRY` under its class name, which is how configs
    (``{type = "Name", ...}``) and ``.lcz`` files name it; :meth:`from_config` rebuilds it from :meth:`config`.

    ``w`` is a float tensor: flat (or any shape) for vector-type compressions, which act elementwise or on the
    flattened vector; a matrix for ``matrix = True`` compressions (low-rank). ``compress`` validates the input,
    and subclasses validate their hyperparameters at construction.

    Two compressions added, ``a + b``, give an :class:`~lcompress.AdditiveCombination`.
    """

    #: True when the C step needs a matrix view of the weights (low-rank); False for elementwise/vector ones
    matrix: bool = False
    #: how a matrix compression views a conv weight (:mod:`lcompress.views`); (out, in·kh·kw) unless it says
    conv_scheme: str = "scheme_1"
    #: True when Θ = 0 is feasible, i.e. Δ can be the zero tensor (used by additive combinations)
    contains_zero: bool = True
    #: True for penalty forms (min α·C(Θ) + μ/2‖w − Δ(Θ)‖²), whose C step depends on μ; at μ → 0⁺ they
    #: compress everything away, so their direct compression is taken at a given μ instead
    penalty_form: bool = False
    #: what compressing Δ(Θ) again gives: "exact" (a projection: Δ(Θ) itself), "approximate" (a local method such
    #: as alternation: nearly Δ(Θ)), or None (a proximal step such as soft thresholding moves it again)
    idempotence: str | None = "exact"
    #: True when :meth:`config` holds every hyperparameter, so that :meth:`from_config` rebuilds the compression
    config_complete: bool = True
    #: True when the C step also solves the weighted projection min_Θ Σᵢ dᵢ(wᵢ − Δᵢ(Θ))² (``compress(...,
    #: importance=d)``), e.g. with d the diagonal of a layer's Hessian in post-training LC
    supports_importance: bool = False
    #: True when the class has a partial C step (``compress(..., partial=True)``): cheaper, from the last Θ, never
    #: further from w than the last Θ is, but not the exact projection
    has_partial: bool = False
    #: the codec that stores Θ (see :mod:`lcompress.codecs`); None: Θ cannot be stored
    codec: ClassVar[Codec | None] = None

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if not register:
            return
        name = cls.__name__
        old = REGISTRY.get(name)
        # the same class defined again (a module reloaded, a class made in a function) replaces the old one
        if old is not None and (old.__module__, old.__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"a compression named {name!r} is already registered ({old.__module__}.{old.__qualname__}); "
                            f"give {cls.__module__}.{cls.__qualname__} another name")
        REGISTRY[name] = cls

    @classmethod
    def examples(cls) -> list["Compression"]:
        """Fresh example instances for the contract suite, each to be run on 300 weights (a vector compression)
        or a 20×15 matrix (``matrix = True``)."""
        return []

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "Compression":
        """The compression from its :meth:`config` arguments (without ``"type"``).

        Raises:
            ValueError: bad arguments, or a class whose config does not hold every hyperparameter.
        """
        if not cls.config_complete:
            raise ValueError(f"{cls.__name__} cannot be built from a config: its config does not hold every "
                             "hyperparameter (construct it in Python)")
        try:
            return cls(**config)
        except TypeError as e:
            raise ValueError(f"bad arguments for {cls.__name__}: {e}") from None

    def __init__(self) -> None:
        self._theta: dict[str, Any] | None = None
        self._shape: tuple[int, ...] | None = None

    # ---- the C step -------------------------------------------------------------------------------------
    def compress(self, w: Tensor, mu: float = 0.0, *, check: bool = True, importance: Tensor | None = None,
                 partial: bool = False) -> Tensor:
        """Θ ← Π(w); return Δ(Θ) with the shape, dtype and device of ``w``.

        Args:
            w: the weights to compress (for the LC algorithm, w − λ/μ).
            mu: the current penalty parameter μ; used by penalty forms (``mu = 0`` means μ → 0⁺).
            check: validate ``w`` (type, NaN/Inf, shape); callers that already did (LC, additive
                combinations) pass False to skip a pass over the weights.
            importance: weights d ≥ 0 of ``w``'s shape: solve min_Θ Σᵢ dᵢ(wᵢ − Δᵢ(Θ))² instead (only for a
                compression with ``supports_importance``).
            partial: where the compression ``has_partial`` and holds a Θ for this shape, take the cheaper partial
                C step (e.g. new codes for the last scales) instead of the exact one.

        On the CPU the C step runs on one torch thread when the task is small or the machine's cores are busy
        (:func:`lcompress._threads.c_step_threads`); ``torch.get_num_threads()`` is restored afterwards.

        Raises:
            TypeError: ``w`` is not a floating-point tensor.
            ValueError: ``w`` holds NaN or Inf, or its shape does not suit the compression.
        """
        if check:
            if not isinstance(w, Tensor):
                raise TypeError(f"w must be a torch.Tensor, got {type(w).__name__}")
            if not w.is_floating_point():
                raise TypeError(f"w must be a floating-point tensor, got dtype={w.dtype}")
            if not bool(torch.isfinite(w).all()):
                raise ValueError("w contains NaN or Inf")
            if mu < 0 or not math.isfinite(mu):
                raise ValueError(f"mu={mu} must be a finite number >= 0")
            self.check_shape(tuple(w.shape))
        if importance is not None:
            if not self.supports_importance:
                raise TypeError(f"{type(self).__name__} has no weighted C step (importance=...)")
            if tuple(importance.shape) != tuple(w.shape):
                raise ValueError(f"importance has shape {tuple(importance.shape)}, not the weights' {tuple(w.shape)}")
        # small ops on one thread where a second one does not pay or the cores are busy (see _threads)
        with c_step_threads(w.numel(), w.device):
            if partial and self.has_partial and self._theta is not None and self._shape == tuple(w.shape):
                out = self._compress_partial(w.detach().float(), float(mu),
                                             None if importance is None else importance.detach().float())
            elif importance is None:
                out = self._compress(w.detach().float(), float(mu))
            else:
                out = self._compress_importance(w.detach().float(), float(mu), importance.detach().float())
        self._shape = tuple(w.shape)
        return out.to(w.dtype)

    def decompress(self) -> Tensor:
        """Δ(Θ) for the stored Θ, in float32 and the shape of the last compressed input."""
        self._require()
        return self._decompress()

    def check_shape(self, shape: tuple[int, ...], task: str | None = None) -> None:
        """Raise ValueError when a tensor of this shape cannot be compressed (e.g. κ > number of weights)."""
        if len(shape) == 0 or math.prod(shape) == 0:
            raise ValueError(self._where(task) + f"cannot compress an empty tensor of shape {shape}")

    # ---- Θ and its size -----------------------------------------------------------------------------------
    @property
    def theta(self) -> dict[str, Any]:
        """The compact form Θ of the last C step (a dict of tensors and ints)."""
        self._require()
        return self._theta

    @property
    def is_compressed(self) -> bool:
        return self._theta is not None

    def count_params(self) -> int:
        """Number of stored values in Θ (codebook entries, nonzeros, factor entries), as its codec stores them."""
        self._require()
        return codec_for(self).stored_values(self)

    def count_bits(self, lossless: bool = True) -> int:
        """Bits a ``.lcz`` file stores for Θ: its codec's encoding, counted (see :mod:`lcompress.codecs`).

        Args:
            lossless: with the lossless stage (the default, as files are written): each symbol stream at its
                entropy-coded bytes where that is shorter; ``False``: the packed bits (⌈log₂ K⌉ a code, ...).

        Raises:
            NotCompressedError: before the first C step.
            TypeError: the compression declares no codec.
        """
        self._require()
        return codec_for(self).bits(self, lossless=lossless)

    # ---- state ----------------------------------------------------------------------------------------------
    def config(self) -> dict[str, Any]:
        """JSON-able hyperparameters: ``{"type": class name, **arguments}``; ``from_config`` inverts it."""
        return {"type": type(self).__name__, **self._config()}

    def _config(self) -> dict[str, Any]:
        return {}

    def state_dict(self) -> dict[str, Any]:
        """Θ, the last input shape and any warm-start state, as tensors and plain Python values."""
        return {
            "config": self.config(),
            "theta": None if self._theta is None else dict(self._theta),
            "shape": None if self._shape is None else list(self._shape),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("config") != self.config():
            raise ValueError(
                f"state was saved for {state.get('config')}, cannot load it into {self.config()}"
            )
        theta = state.get("theta")
        self._theta = None if theta is None else dict(theta)
        shape = state.get("shape")
        self._shape = None if shape is None else tuple(shape)

    def to(self, device) -> "Compression":
        """Move Θ to ``device`` (hyperparameters have no device)."""
        if self._theta is not None:
            self._theta = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in self._theta.items()}
        return self

    def clone(self) -> "Compression":
        """A deep copy, Θ included."""
        return copy.deepcopy(self)

    # ---- helpers ------------------------------------------------------------------------------------------
    def __add__(self, other: "Compression") -> "Compression":
        from .additive import AdditiveCombination

        return AdditiveCombination(self, other)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._config().items())
        return f"{type(self).__name__}({args})"

    def _require(self) -> None:
        if self._theta is None:
            raise NotCompressedError(
                f"{self!r} has no Θ yet: call compress() (or construct lcompress.LC, which runs the first C step)"
            )

    @staticmethod
    def _where(task: str | None) -> str:
        return f"task {task!r}: " if task else ""

    def _decompress(self) -> Tensor:
        raise NotImplementedError

    def _compress(self, w: Tensor, mu: float) -> Tensor:
        raise NotImplementedError

    def _compress_importance(self, w: Tensor, mu: float, importance: Tensor) -> Tensor:
        raise NotImplementedError

    def _compress_partial(self, w: Tensor, mu: float, importance: Tensor | None) -> Tensor:
        raise NotImplementedError


def from_config(config: dict) -> Compression:
    """Rebuild a registered compression from :meth:`Compression.config` output.

    Nothing is imported: the type must be registered already (a built-in, or a class whose module was imported).

    Raises:
        ValueError: not a config, an unknown type, or bad arguments.
    """
    if not isinstance(config, dict) or "type" not in config:
        raise ValueError(f"a compression config must be a dict with a 'type' key, got {config!r}")
    cfg = dict(config)
    name = cfg.pop("type")
    cls = REGISTRY.get(name) if isinstance(name, str) else None
    if cls is None:
        raise ValueError(f"unknown compression {name!r}; known: {', '.join(sorted(REGISTRY))}")
    return cls.from_config(cfg)


def check_int(name: str, value: Any, low: int | None = None, high: int | None = None) -> int:
    """Validate an integer hyperparameter; the message names the argument, the value and the allowed range."""
    if isinstance(value, bool) or not isinstance(value, (int,)) and not (
        isinstance(value, float) and value.is_integer()
    ):
        raise TypeError(f"{name}={value!r} must be an integer")
    value = int(value)
    if (low is not None and value < low) or (high is not None and value > high):
        rng = f"[{'-inf' if low is None else low}, {'inf' if high is None else high}]"
        raise ValueError(f"{name}={value} must be in the range {rng}")
    return value


def check_float(name: str, value: Any, low: float | None = None, strict: bool = False) -> float:
    """Validate a real hyperparameter (finite, ≥ low, or > low when ``strict``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name}={value!r} must be a real number")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name}={value} must be finite")
    if low is not None and (value <= low if strict else value < low):
        raise ValueError(f"{name}={value} must be {'>' if strict else '>='} {low}")
    return value
