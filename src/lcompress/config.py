"""Run configuration: a TOML file naming model, data, reference, tasks, μ schedule and L-step optimizer.

Every field is validated when the file is read; an error names the field (as a dotted path) and the bad value.
See ``examples/*.toml`` for complete files. A minimal one::

    [model]
    name = "lenet300"                      # a registered model, an installed entry point, or "package.module:function"

    [data]
    dataset = "fashion-mnist"              # fashion-mnist | mnist | cifar10 | an entry point | "package.module:function"

    [reference]
    checkpoint = "runs/reference/lenet300.pt"

    [[tasks]]
    params = 're:fc\\d\\.weight'           # a name, a 're:' pattern, or a list of names (one joint task)
    compression = { type = "AdaptiveQuantization", k = 2 }

    [schedule]
    mu = "auto"                            # or mu0 = 9e-5 with factor = 1.4, or a list of values
    steps = 30

Code named by a config (``model.name``, ``data.dataset`` or a task's ``compression.type`` that is not built in or
already registered) runs only with the user's consent, since a config can name any callable (``"os:system"``).
Consent is either

* an installed entry point: a package the user installed declares the function (or compression class) in the group
  ``lcompress.models``, ``lcompress.datasets`` or ``lcompress.compressions``
  (``[project.entry-points."lcompress.models"] mynet = "mypkg.nets:build"``); the config then names it by its
  entry-point name (``"mynet"``) or by its value (``"mypkg.nets:build"``); or
* ``trust_code=True`` (``--trust-code`` on the command line) for this call, in the spirit of Hugging Face's
  ``trust_remote_code``. It is never taken from a file: a run directory's ``config.json`` that names such code needs
  the flag again to be resumed or exported.

Without either, nothing is imported and a :class:`ConfigError` says how to consent.
"""
from __future__ import annotations

import copy
import importlib
import json
import logging
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

from .compressions import REGISTRY, AdditiveCombination, Compression, from_config

logger = logging.getLogger(__name__)

__all__ = ["ConfigError", "RunConfig", "load_config", "parse_config", "build_compression", "compression_type",
           "resolve_entry_point", "ENTRY_POINT_GROUPS", "COMPRESSION_GROUP", "MAX_STEPS"]

#: entry-point group of each config field that can name code
ENTRY_POINT_GROUPS = {"model.name": "lcompress.models", "data.dataset": "lcompress.datasets"}
#: entry-point group of compression classes a task's ``compression.type`` may name
COMPRESSION_GROUP = "lcompress.compressions"
#: the most LC steps a schedule may have (the papers use tens; a typo such as 1e9 would allocate the whole list)
MAX_STEPS = 100_000
_FLOAT32_MAX = 3.4028234663852886e38


class ConfigError(ValueError):
    """A configuration problem; the message names the field and the value."""


@dataclass
class ModelConfig:
    name: str = "lenet300"
    args: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    dataset: str = "fashion-mnist"
    dir: str | None = None
    batch_size: int = 256
    augment: bool = False


@dataclass
class ReferenceConfig:
    checkpoint: str | None = None  # relative to the current directory; None: RUN/reference.pt when it is trained
    train_epochs: int = 0  # > 0: train the reference when the checkpoint does not exist yet
    lr: float = 0.1
    lr_decay: float = 0.95
    batch_size: int = 128


@dataclass
class TaskConfig:
    params: Any  # str or list of str
    compression: Any  # dict or list of dicts (an additive combination)


@dataclass
class ScheduleConfig:
    mu: Any = "auto"  # "auto" | "geometric" (mu0 and factor; implied when only those are given) | list of floats
    mu0: float | None = None
    factor: float | None = None
    steps: int = 30
    epochs_per_step: int = 1
    c_steps_per_step: int = 1  # C steps per LC step: its minibatches split into this many parts, each its own μ
    penalty_fraction: float = 0.1  # auto: μ₀ makes the first penalty this fraction of the loss
    final_distance: float = 0.005  # auto: target ‖w − Δ‖ / ‖w − Δ_DC‖ at the end
    hold: float = 0.0  # auto: fraction of the C steps kept at μ₀ before μ grows


@dataclass
class OptimizerConfig:
    lr: float = 0.1
    momentum: float = 0.9
    nesterov: bool = True
    lr_decay: float = 0.98  # per LC step
    clip_lr: bool = True  # lr ≤ clip_lr_scale/μ
    clip_lr_scale: float = 1.0  # the cap's scale: 1 is the papers' 1/μ; 0.5 leaves momentum SGD more margin
    weight_decay: float = 0.0


@dataclass
class EvaluateConfig:
    every: int = 1  # evaluate Δ(Θ) every this many LC steps (and always at the last)


@dataclass
class LCConfig:
    multipliers: bool = True
    # "loss": loss + alg.penalty(mu) (the penalty's value every batch); "grad": alg.penalty_grad_(mu) after backward
    # (cheaper; results differ by float rounding only)
    penalty: str = "loss"


@dataclass
class PeerConfig:
    """``lcompress peer`` and the demo's peer column: a method practitioners use instead of LC (see
    :mod:`lcompress.peers`), trained with the run's data, optimizer, seed and epoch budget (steps · epochs_per_step)."""

    method: str = ""  # one of lcompress.peers.METHODS; "" = no peer
    lr: float = 0.0  # 0: optimizer.lr
    compression: Any = None  # replaces every task's compression for the peer (e.g. ScaledBinaryQuantization)
    prune_end: float = 0.75  # GMP: fraction of the run over which the sparsity ramps up
    prune_every: int = 100  # GMP: minibatches between mask updates


@dataclass
class RunConfig:
    """A parsed, validated run configuration."""

    name: str = "run"
    seed: int = 0
    device: str = "cpu"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    lc: LCConfig = field(default_factory=LCConfig)
    peer: PeerConfig = field(default_factory=PeerConfig)
    source: str | None = None  # the file it came from (not part of the run's identity)
    # the consent given when it was read (load_config/parse_config's trust_code): never part of a file
    trust_code: bool = field(default=False, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("source", None)
        d.pop("trust_code", None)
        return d

    def task_map(self) -> dict[Any, Compression]:
        """The ``{key: Compression}`` map for :class:`lcompress.LC` (fresh compression objects)."""
        out: dict[Any, Compression] = {}
        for i, t in enumerate(self.tasks):
            key = t.params if isinstance(t.params, str) else tuple(t.params)
            out[key] = build_compression(t.compression, f"tasks.{i}.compression", self.trust_code, self.source)
        return out

    def peer_task_map(self) -> dict[Any, Compression]:
        """The task map the peer trains: :meth:`task_map`, with every compression replaced by
        ``peer.compression`` when that is given."""
        out = self.task_map()
        if self.peer.compression is not None:
            out = {k: build_compression(self.peer.compression, "peer.compression", self.trust_code, self.source)
                   for k in out}
        return out


_SECTIONS = {
    "model": ModelConfig,
    "data": DataConfig,
    "reference": ReferenceConfig,
    "schedule": ScheduleConfig,
    "optimizer": OptimizerConfig,
    "evaluate": EvaluateConfig,
    "lc": LCConfig,
    "peer": PeerConfig,
}
_TOP = {"name", "seed", "device", "tasks", *_SECTIONS}
BUILTIN_DATASETS = ("fashion-mnist", "mnist", "cifar10")
# fields whose default is None: the type a given value must have
_OPTIONAL = {"dir": str, "checkpoint": str, "mu0": float, "factor": float}


def _short(v: Any, limit: int = 80) -> str:
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _type_ok(value: Any, default: Any, name: str) -> bool:
    if name in ("mu", "params", "compression", "args"):
        return True
    if default is None:
        want = _OPTIONAL.get(name)
        if value is None or want is None:
            return True
        default = want()
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, int):
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(default, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def _type_name(default: Any, name: str) -> str:
    if default is None and name in _OPTIONAL:
        return _OPTIONAL[name].__name__
    return type(default).__name__


def _section(cls, raw: Any, path: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}={_short(raw)}: expected a table")
    obj = cls()
    known = set(obj.__dataclass_fields__)
    for k, v in raw.items():
        if k not in known:
            raise ConfigError(f"{path}.{k}={_short(v)}: unknown key (known: {', '.join(sorted(known))})")
        default = getattr(obj, k)
        if not _type_ok(v, default, k):
            raise ConfigError(f"{path}.{k}={_short(v)}: expected {_type_name(default, k)}")
        numeric_float = isinstance(default, float) or (default is None and _OPTIONAL.get(k) is float)
        if numeric_float and v is not None and not math.isfinite(v):
            raise ConfigError(f"{path}.{k}={v!r}: must be a finite number")
        setattr(obj, k, float(v) if numeric_float and isinstance(v, int) and not isinstance(v, bool) else v)
    return obj


def build_compression(spec: Any, path: str = "compression", trust_code: bool = False,
                      source: str | None = None) -> Compression:
    """A compression from its config: ``{type = "...", **args}`` or a list of those (an additive combination).

    ``type`` is a registered compression's name (the built-ins, and every class already imported), an installed
    entry point of the group ``lcompress.compressions`` (by its name or its value), or, with ``trust_code``,
    ``"package.module:Class"``, imported for it (see the module docstring: nothing is imported without consent).

    Raises:
        ConfigError: unknown type, no consent to import it, not a compression class, or bad arguments, naming
            ``path``.
    """
    if isinstance(spec, list):
        if len(spec) < 2:
            raise ConfigError(f"{path}: an additive combination needs at least 2 parts, got {len(spec)}")
        parts = [build_compression(p, f"{path}[{i}]", trust_code, source) for i, p in enumerate(spec)]
        return AdditiveCombination(*parts)
    if not isinstance(spec, dict) or "type" not in spec:
        raise ConfigError(f"{path}={_short(spec)}: expected a table with a 'type' key")
    spec = copy.deepcopy(spec)
    spec["type"] = compression_type(spec["type"], f"{path}.type", trust_code, source)
    if spec["type"] == "AdditiveCombination" and isinstance(spec.get("parts"), list):
        parts = [build_compression(p, f"{path}.parts[{i}]", trust_code, source) for i, p in enumerate(spec["parts"])]
        rest = {k: v for k, v in spec.items() if k not in ("type", "parts")}
        try:
            return AdditiveCombination(*parts, **rest)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"{path}: {e}") from None
    try:
        return from_config(spec)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{path}: {e}") from None


def compression_type(name: Any, what: str, trust_code: bool = False, source: str | None = None) -> str:
    """The registered name of the compression class a config's ``type`` names, importing it only with consent
    (an installed entry point of group ``lcompress.compressions``, or ``trust_code`` for ``"package.module:Class"``).

    Raises:
        ConfigError: naming ``what``.
    """
    if not isinstance(name, str):
        raise ConfigError(f"{what}={_short(name)}: expected a string")
    if name in REGISTRY:
        return name
    group = COMPRESSION_GROUP
    if ":" not in name and not any(e.name == name for e in _installed_entry_points(group)):
        raise ConfigError(f"{what}={name!r}: unknown compression (known: {', '.join(sorted(REGISTRY))}; or an "
                          f"installed entry point of group {group!r}, or 'package.module:Class' with --trust-code)")
    cls = resolve_entry_point(name, what, trust_code, source, group=group)
    if not (isinstance(cls, type) and issubclass(cls, Compression)):
        raise ConfigError(f"{what}={name!r}: {_short(cls)} is not an lcompress Compression class")
    if REGISTRY.get(cls.__name__) is not cls:
        raise ConfigError(f"{what}={name!r}: {cls.__qualname__} is not registered (defined with register=False, or "
                          f"another class took the name {cls.__name__!r})")
    return cls.__name__


def _installed_entry_points(group: str) -> list[Any]:
    from importlib.metadata import entry_points

    try:
        return list(entry_points(group=group))
    except Exception as e:  # a broken distribution's metadata must not hide the others' errors
        logger.warning("cannot read the installed entry points of group %r: %s", group, e)
        return []


def _same_target(a: str, b: str) -> bool:
    return "".join(a.split()) == "".join(b.split())


def resolve_entry_point(spec: str, what: str, trust_code: bool = False, source: str | None = None,
                        group: str | None = None):
    """The callable a config names: an installed entry point or, with ``trust_code``, ``"package.module:function"``.

    Args:
        spec: an entry-point name of the group :data:`ENTRY_POINT_GROUPS` gives for ``what``, or
            ``"package.module:function"``.
        what: the config field (``"model.name"`` or ``"data.dataset"``); errors name it.
        trust_code: import ``"package.module:function"`` even when no installed entry point declares it.
        source: the file the config came from, for the error message.
        group: the entry-point group (default: the one of ``what``).

    Nothing is imported unless an installed entry point declares the target or ``trust_code`` is given.

    Raises:
        ConfigError: no consent (the message says how to give it), not importable, or not callable.
    """
    group = group or ENTRY_POINT_GROUPS.get(what)
    installed = _installed_entry_points(group) if group else []
    ep = next((e for e in installed if e.name == spec), None) or next(
        (e for e in installed if ":" in spec and _same_target(e.value, spec)), None)
    if ep is None and ":" not in spec:
        names = sorted({e.name for e in installed})
        raise ConfigError(f"{what}={spec!r}: no installed entry point of that name in group {group!r}"
                          + (f" (installed: {', '.join(names)})" if names else ""))
    if ep is None:
        mod, _, fn = spec.partition(":")
        if not mod or not fn:
            raise ConfigError(f"{what}={spec!r}: expected 'package.module:function'")
        if not trust_code:
            where = f" in {source}" if source else ""
            raise ConfigError(
                f"{what}={spec!r}{where}: refusing to import and run code that a config names without your consent "
                f"(a config can name any function, e.g. 'os:system'). If you trust it, pass --trust-code (library: "
                f"trust_code=True), or install it as an entry point in group {group!r}"
            )
        try:
            obj = getattr(importlib.import_module(mod), fn)
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{what}={spec!r}: cannot import it ({e})") from None
    else:
        try:
            obj = ep.load()
        except (ImportError, AttributeError) as e:
            raise ConfigError(f"{what}={spec!r}: cannot import the installed entry point {ep.value!r} ({e})") from None
    if not callable(obj):
        raise ConfigError(f"{what}={spec!r}: not callable")
    return obj


def _check_run_name(name: str) -> None:
    """A run's name becomes a directory under ``runs/``: it must stay one plain name there."""
    seps = {"/", "\\", os.sep} | ({os.altsep} if os.altsep else set())
    if not name or name in (".", "..") or any(c in name for c in seps) or "\0" in name or name != name.strip():
        raise ConfigError(f"name={name!r}: must be a plain directory name (no path separators, not '.' or '..', "
                          "no surrounding spaces): it names the run directory runs/<name>")


def check_device(device: str, what: str = "device") -> None:
    """``device`` names a torch device (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``, ...).

    Raises:
        ConfigError: naming ``what`` and the value.
    """
    import torch

    try:
        torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ConfigError(f"{what}={device!r}: not a torch device (e.g. \"cpu\", \"cuda\", \"cuda:1\", \"mps\")") from None


def parse_config(raw: dict[str, Any], source: str | None = None, trust_code: bool = False) -> RunConfig:
    """Validate a config dict (as read from TOML) into a :class:`RunConfig`.

    Args:
        raw: the config dict.
        source: the file it came from (for messages).
        trust_code: consent to import ``model.name`` / ``data.dataset`` given as ``"package.module:function"``
            when no installed entry point declares it (see the module docstring); kept in the returned config.

    Raises:
        ConfigError: an unknown key, a value of the wrong type or range, an unknown model or compression, a
            schedule that does not increase; the message names the field and the value.
    """
    from .models import MODELS

    if not isinstance(raw, dict):
        raise ConfigError(f"the config must be a table, got {_short(raw)}")
    for k in raw:
        if k not in _TOP:
            raise ConfigError(f"{k}={_short(raw[k])}: unknown key (known: {', '.join(sorted(_TOP))})")
    cfg = RunConfig(source=source, trust_code=bool(trust_code))
    for k in ("name", "seed", "device"):
        if k in raw:
            if not _type_ok(raw[k], getattr(cfg, k), k):
                raise ConfigError(f"{k}={_short(raw[k])}: expected {type(getattr(cfg, k)).__name__}")
            setattr(cfg, k, raw[k])
    _check_run_name(cfg.name)
    check_device(cfg.device)
    if not 0 <= cfg.seed < 2**63:
        raise ConfigError(f"seed={cfg.seed}: must be in [0, 2**63)")
    for k, cls in _SECTIONS.items():
        if k in raw:
            setattr(cfg, k, _section(cls, raw[k], k))

    # model and data: built in, or code named by the config (imported only with consent, see the module docstring)
    if cfg.model.name not in MODELS:
        if ":" not in cfg.model.name and not _installed_entry_points(ENTRY_POINT_GROUPS["model.name"]):
            raise ConfigError(f"model.name={cfg.model.name!r}: unknown model (known: {', '.join(sorted(MODELS))}, "
                              "an installed entry point, or 'package.module:function')")
        resolve_entry_point(cfg.model.name, "model.name", trust_code, source)
    if not isinstance(cfg.model.args, dict):
        raise ConfigError(f"model.args={cfg.model.args!r}: expected a table")
    if cfg.data.dataset not in BUILTIN_DATASETS:
        if ":" not in cfg.data.dataset and not _installed_entry_points(ENTRY_POINT_GROUPS["data.dataset"]):
            raise ConfigError(f"data.dataset={cfg.data.dataset!r}: unknown dataset ({', '.join(BUILTIN_DATASETS)}, "
                              "an installed entry point, or 'package.module:function')")
        resolve_entry_point(cfg.data.dataset, "data.dataset", trust_code, source)
    if cfg.data.batch_size < 1:
        raise ConfigError(f"data.batch_size={cfg.data.batch_size}: must be >= 1")
    r = cfg.reference
    if r.train_epochs < 0:
        raise ConfigError(f"reference.train_epochs={r.train_epochs}: must be >= 0")
    if not r.lr > 0:
        raise ConfigError(f"reference.lr={r.lr}: must be > 0")
    if not 0 < r.lr_decay <= 1:
        raise ConfigError(f"reference.lr_decay={r.lr_decay}: must be in (0, 1]")
    if r.batch_size < 1:
        raise ConfigError(f"reference.batch_size={r.batch_size}: must be >= 1")
    if cfg.lc.penalty not in ("loss", "grad"):
        raise ConfigError(f"lc.penalty={cfg.lc.penalty!r}: expected \"loss\" or \"grad\"")
    # tasks
    if "tasks" not in raw:
        raise ConfigError("tasks: missing; at least one [[tasks]] entry is needed (params = ..., compression = {...})")
    raw_tasks = raw["tasks"]
    if not isinstance(raw_tasks, list) or not raw_tasks:
        raise ConfigError(f"tasks={_short(raw_tasks)}: at least one [[tasks]] entry is needed "
                          "(params = ..., compression = {...})")
    for i, t in enumerate(raw_tasks):
        path = f"tasks.{i}"
        if not isinstance(t, dict):
            raise ConfigError(f"{path}={_short(t)}: expected a table")
        for k in t:
            if k not in ("params", "compression"):
                raise ConfigError(f"{path}.{k}={_short(t[k])}: unknown key (known: compression, params)")
        for k in ("params", "compression"):
            if k not in t:
                raise ConfigError(f"{path}.{k}: missing (a task needs both 'params' and 'compression')")
        p = t["params"]
        if not (isinstance(p, str) or (isinstance(p, list) and p and all(isinstance(x, str) for x in p))):
            raise ConfigError(f"{path}.params={_short(p)}: expected a name, a 're:' pattern or a list of names")
        build_compression(t["compression"], f"{path}.compression", trust_code, source)
        cfg.tasks.append(TaskConfig(params=p, compression=t["compression"]))
    # schedule
    s = cfg.schedule
    if not 1 <= s.steps <= MAX_STEPS:
        raise ConfigError(f"schedule.steps={s.steps}: must be in [1, {MAX_STEPS}]")
    if s.epochs_per_step < 1:
        raise ConfigError(f"schedule.epochs_per_step={s.epochs_per_step}: must be >= 1")
    if not 1 <= s.c_steps_per_step <= 64:
        raise ConfigError(f"schedule.c_steps_per_step={s.c_steps_per_step}: must be in [1, 64]")
    if s.steps * s.c_steps_per_step > MAX_STEPS:
        raise ConfigError(f"schedule.c_steps_per_step={s.c_steps_per_step}: steps·c_steps_per_step = "
                          f"{s.steps * s.c_steps_per_step} C steps, more than {MAX_STEPS}")
    if s.c_steps_per_step > 1 and isinstance(raw.get("schedule"), dict) and isinstance(raw["schedule"].get("mu"), list):
        raise ConfigError(f"schedule.c_steps_per_step={s.c_steps_per_step}: needs an \"auto\" or geometric schedule "
                          "(a list schedule.mu gives one μ per LC step)")
    mu_given = isinstance(raw.get("schedule"), dict) and raw["schedule"].get("mu") is not None
    if not mu_given:  # mu0 and/or factor alone mean a geometric schedule
        s.mu = "geometric" if s.mu0 is not None or s.factor is not None else "auto"
    if isinstance(s.mu, list):
        if not s.mu or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in s.mu):
            raise ConfigError(f"schedule.mu={_short(s.mu)}: expected a non-empty list of numbers")
        for i, v in enumerate(s.mu):
            if not (v > 0 and math.isfinite(v)):
                raise ConfigError(f"schedule.mu.{i}={v!r}: every value must be a finite number > 0")
            if v > _FLOAT32_MAX:
                raise ConfigError(f"schedule.mu.{i}={v!r}: overflows float32 (the weights' penalty would be inf)")
        for i in range(1, len(s.mu)):
            if s.mu[i] <= s.mu[i - 1]:
                raise ConfigError(
                    f"schedule.mu.{i}={s.mu[i]!r}: not greater than schedule.mu.{i - 1}={s.mu[i - 1]!r} "
                    f"(the schedule {_short(s.mu)} must increase)"
                )
        for k in ("mu0", "factor"):
            if getattr(s, k) is not None:
                raise ConfigError(f"schedule.{k}={getattr(s, k)!r}: not used with a list schedule.mu; remove it")
        if len(s.mu) > MAX_STEPS:
            raise ConfigError(f"schedule.mu: {len(s.mu)} values, more than {MAX_STEPS} steps")
        s.steps = len(s.mu)
    elif s.mu == "auto":
        for k in ("mu0", "factor"):
            if getattr(s, k) is not None:
                raise ConfigError(f"schedule.{k}={getattr(s, k)!r}: not used with schedule.mu=\"auto\"; "
                                  "give either mu = \"auto\" or mu0 and factor")
    elif s.mu == "geometric":
        for k, other in (("mu0", "factor"), ("factor", "mu0")):
            if getattr(s, k) is None:
                have = getattr(s, other)
                raise ConfigError(
                    f"schedule.{k}: missing; a geometric schedule needs both mu0 and factor"
                    + (f" (schedule.{other}={have!r} is given)" if have is not None else "")
                )
        if not (s.mu0 > 0 and math.isfinite(s.mu0)):
            raise ConfigError(f"schedule.mu0={s.mu0!r}: must be a finite number > 0")
        if not (s.factor > 1 and math.isfinite(s.factor)):
            raise ConfigError(f"schedule.factor={s.factor!r}: must be a finite number > 1 (μ must increase)")
        # the last μ, mu0·factor^(steps−1), in logs: it must not overflow the weights' float32 penalty
        if math.log(s.mu0) + (s.steps - 1) * math.log(s.factor) > math.log(_FLOAT32_MAX):
            raise ConfigError(
                f"schedule.steps={s.steps}: the last μ = mu0·factor^(steps−1) = {s.mu0!r}·{s.factor!r}^{s.steps - 1} "
                "overflows float32; use fewer steps or a smaller factor"
            )
    else:
        raise ConfigError(f"schedule.mu={_short(s.mu)}: expected \"auto\", \"geometric\" or a list of numbers")
    if s.mu == "auto":
        pen = [i for i, t in enumerate(cfg.tasks) if build_compression(t.compression).penalty_form]
        if pen:
            raise ConfigError(
                f"schedule.mu=\"auto\": not available with the penalty form in tasks.{pen[0]} (RankSelection, "
                "PenaltyL0Pruning, PenaltyL1Pruning): their compression level is set by alpha/mu, so give the "
                "schedule with it (mu0 and factor, or a list); see the README's 'Choosing μ'"
            )
    if not 0 < s.penalty_fraction:
        raise ConfigError(f"schedule.penalty_fraction={s.penalty_fraction}: must be > 0")
    if not 0 < s.final_distance < 1:
        raise ConfigError(f"schedule.final_distance={s.final_distance}: must be in (0, 1)")
    if not 0 <= s.hold < 1:
        raise ConfigError(f"schedule.hold={s.hold}: must be in [0, 1)")
    o = cfg.optimizer
    if not o.lr > 0:
        raise ConfigError(f"optimizer.lr={o.lr}: must be > 0")
    if not 0 <= o.momentum < 1:
        raise ConfigError(f"optimizer.momentum={o.momentum}: must be in [0, 1)")
    if not 0 < o.clip_lr_scale <= 1:
        raise ConfigError(f"optimizer.clip_lr_scale={o.clip_lr_scale}: must be in (0, 1]")
    if not 0 < o.lr_decay <= 1:
        raise ConfigError(f"optimizer.lr_decay={o.lr_decay}: must be in (0, 1]")
    if not o.weight_decay >= 0:
        raise ConfigError(f"optimizer.weight_decay={o.weight_decay}: must be >= 0")
    if cfg.evaluate.every < 1:
        raise ConfigError(f"evaluate.every={cfg.evaluate.every}: must be >= 1")
    _check_peer(cfg.peer, trust_code, source)
    return cfg


def _check_peer(p: PeerConfig, trust_code: bool, source: str | None) -> None:
    from .peers import METHODS

    if p.method and p.method not in METHODS:
        raise ConfigError(f"peer.method={p.method!r}: unknown peer method (known: {', '.join(METHODS)})")
    if not p.lr >= 0:
        raise ConfigError(f"peer.lr={p.lr}: must be >= 0 (0: optimizer.lr)")
    if not 0 <= p.prune_end <= 1:
        raise ConfigError(f"peer.prune_end={p.prune_end}: must be in [0, 1]")
    if p.prune_every < 1:
        raise ConfigError(f"peer.prune_every={p.prune_every}: must be >= 1")
    if p.compression is not None:
        build_compression(p.compression, "peer.compression", trust_code, source)


def load_config(path: str | Path, overrides: dict[str, Any] | None = None, trust_code: bool = False) -> RunConfig:
    """Read and validate a run configuration: a TOML file, or the ``config.json`` a run directory keeps.

    Args:
        path: the ``.toml`` (or ``.json``) file.
        overrides: dotted keys to set before validation, e.g. ``{"schedule.steps": 5}``.
        trust_code: consent to import the code it names (see :func:`parse_config`); never read from the file.

    Raises:
        ConfigError: the file is missing or not valid TOML/JSON, or a field is invalid (named).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    if path.suffix == ".json":
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
    else:
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the config must be a table, got {_short(raw)}")
    for key, value in (overrides or {}).items():
        set_dotted(raw, key, value)
    return parse_config(raw, source=str(path), trust_code=trust_code)


def set_dotted(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set ``raw["a"]["b"][0]["c"] = value`` for ``key = "a.b.0.c"`` (creating tables as needed).

    Raises:
        ConfigError: an empty part, an index that a list does not have, or a part below a value that is neither a
            table nor a list (``name.x`` where ``name`` is a string).
    """
    parts = key.split(".")
    if not all(parts):
        raise ConfigError(f"--set {key}: empty part in the dotted key")
    cur: Any = raw
    for i, p in enumerate(parts):
        here = ".".join(parts[:i]) or "the config"
        if not isinstance(cur, (dict, list)):
            raise ConfigError(f"--set {key}: {here}={_short(cur)} is a {type(cur).__name__}, not a table, "
                              f"so it has no field {p!r}")
        if isinstance(cur, list):
            if not p.isdigit() or int(p) >= len(cur):
                raise ConfigError(f"--set {key}: {here} has no element {p!r} (it has {len(cur)})")
            if i == len(parts) - 1:
                cur[int(p)] = value
            else:
                cur = cur[int(p)]
            continue
        if i == len(parts) - 1:
            cur[p] = value
        else:
            if p not in cur:
                cur[p] = [] if parts[i + 1].isdigit() else {}
            cur = cur[p]


def config_diff(a: Any, b: Any, prefix: str = "") -> list[str]:
    """Dotted paths (list elements by index, as ``--set`` names them) where two config dicts differ, each with
    both values: ``["optimizer.lr: 0.1 -> 0.05", "tasks.0.compression.k: 2 -> 4"]``."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += config_diff(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{prefix}{k}.")
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        out = []
        for i, (va, vb) in enumerate(zip(a, b)):
            out += config_diff(va, vb, f"{prefix}{i}.")
        return out
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    if numbers and a == b:  # 1 and 1.0 are the same setting
        return []
    if json.dumps(a, sort_keys=True, default=str) != json.dumps(b, sort_keys=True, default=str):
        return [f"{prefix.rstrip('.')}: {_short(a)} -> {_short(b)}"]
    return []
