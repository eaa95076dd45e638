"""Tasks: which parameters each compression acts on, and the vector/matrix view it sees (:mod:`lcompress.views`).

A task map's keys are resolved against ``model.named_parameters()`` of the unwrapped model:

* ``"fc1.weight"`` — one parameter;
* ``("fc2.weight", "fc3.weight")`` — one joint task over all of them (flattened and concatenated);
* ``"re:<pattern>"`` — every parameter whose name matches the regular expression (``re.fullmatch``) becomes its
  own task with its own copy of the compression. Inside a tuple, a pattern adds all its matches to the joint task.
"""
from __future__ import annotations

import copy
import difflib
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from .compressions.base import Compression
from .views import from_matrix, matrix_shape, to_matrix

__all__ = ["Task", "resolve_tasks", "unwrap_model", "strip_prefix"]

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The user's module inside DistributedDataParallel / DataParallel / torch.compile wrappers."""
    seen = set()
    while id(model) not in seen:
        seen.add(id(model))
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
    return model


def strip_prefix(name: str) -> str:
    """Drop wrapper prefixes ("module.", "_orig_mod.") from a parameter name."""
    changed = True
    while changed:
        changed = False
        for p in _WRAPPER_PREFIXES:
            if name.startswith(p):
                name = name[len(p) :]
                changed = True
    return name


@dataclass
class Task:
    """One compression over one or more parameters."""

    name: str
    param_names: list[str]
    params: list[nn.Parameter]
    compression: Compression
    shapes: list[torch.Size] = field(init=False)
    numel: int = field(init=False)

    def __post_init__(self) -> None:
        self.shapes = [p.shape for p in self.params]
        self.numel = sum(p.numel() for p in self.params)

    @property
    def matrix(self) -> bool:
        return self.compression.matrix

    @property
    def conv_scheme(self) -> str:
        return getattr(self.compression, "conv_scheme", "scheme_1")

    def view_shape(self) -> tuple[int, ...]:
        """Shape of the tensor the compression sees."""
        if self.matrix:
            return matrix_shape(tuple(self.shapes[0]), self.conv_scheme)
        return (self.numel,)

    def gather(self, tensors: list[Tensor]) -> Tensor:
        """The task's view of per-parameter tensors: a flat concatenation, or the matrix view."""
        if self.matrix:
            return to_matrix(tensors[0], self.conv_scheme)
        if len(tensors) == 1:
            return tensors[0].reshape(-1)
        return torch.cat([t.reshape(-1) for t in tensors])

    def scatter(self, out: Tensor) -> list[Tensor]:
        """Split the task's output back into per-parameter tensors (shapes of the parameters)."""
        if self.matrix:
            return [from_matrix(out, tuple(self.shapes[0]), self.conv_scheme)]
        flat = out.reshape(-1)
        res, o = [], 0
        for s in self.shapes:
            n = s.numel()
            res.append(flat[o : o + n].view(s))
            o += n
        return res


def _suggest(name: str, names: list[str]) -> str:
    close = difflib.get_close_matches(name, names, n=3)
    return f"; did you mean {', '.join(map(repr, close))}?" if close else ""


def _match(key: str, names: list[str], params: dict[str, nn.Parameter]) -> list[str]:
    if key.startswith("re:"):
        pattern = key[3:]
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"task key {key!r}: invalid regular expression ({e})") from None
        found = [n for n in names if rx.fullmatch(n)]
        if not found:
            raise ValueError(f"task key {key!r}: the pattern matches no parameter (known: {', '.join(names)})")
        return found
    name = key if key in params else strip_prefix(key)
    if name not in params:
        raise ValueError(f"task key {key!r}: no parameter of that name{_suggest(name, names)}")
    return [name]


def resolve_tasks(model: nn.Module, tasks: Mapping[Any, Compression]) -> list[Task]:
    """Turn a task map into :class:`Task` objects, validating every key and compression.

    Raises:
        TypeError: a value is not a Compression, a key has the wrong type, or a parameter is not floating point.
        ValueError: an unknown name, a pattern that matches nothing, a parameter in two tasks, a low-rank task over
            several parameters, or a compression that does not fit its parameters' shape.
    """
    if not isinstance(tasks, Mapping) or len(tasks) == 0:
        raise ValueError("tasks must be a non-empty dict {parameter name | tuple of names | 're:pattern': Compression}")
    params = dict(model.named_parameters())
    names = list(params)
    owner: dict[str, str] = {}
    used: set[int] = set()
    out: list[Task] = []
    for key, comp in tasks.items():
        if not isinstance(comp, Compression):
            raise TypeError(f"task {key!r}: the value must be an lcompress Compression, got {type(comp).__name__}")
        if isinstance(key, str):
            groups = [[n] for n in _match(key, names, params)]
            display = [g[0] for g in groups]
        elif isinstance(key, tuple) and key and all(isinstance(k, str) for k in key):
            joint: list[str] = []
            for k in key:
                joint.extend(n for n in _match(k, names, params) if n not in joint)
            groups = [joint]
            display = [joint[0] if len(joint) == 1 else "(" + ", ".join(joint) + ")"]
        else:
            raise TypeError(f"task key {key!r} must be a parameter name, a tuple of names, or 're:<pattern>'")
        for group, disp in zip(groups, display):
            for n in group:
                if n in owner:
                    raise ValueError(f"parameter {n!r} is in two tasks: {owner[n]!r} and {disp!r}")
                owner[n] = disp
                p = params[n]
                if not p.is_floating_point():
                    raise TypeError(f"task {disp!r}: parameter {n!r} has dtype {p.dtype}; only floating-point weights")
            # a compression object holds one task's Θ: a second use (a pattern's later matches) gets a copy
            c = comp if id(comp) not in used else copy.deepcopy(comp)
            used.add(id(c))
            task = Task(disp, list(group), [params[n] for n in group], c)
            if c.matrix:
                if len(group) != 1:
                    raise ValueError(f"task {disp!r}: {c!r} needs a single matrix or conv weight, not a joint task")
                if len(task.shapes[0]) < 2:
                    raise ValueError(
                        f"task {disp!r}: {type(c).__name__} needs a matrix or conv weight, "
                        f"but {group[0]!r} has shape {tuple(task.shapes[0])}"
                    )
            c.check_shape(task.view_shape(), disp)
            _check_flops(task)
            for part in getattr(c, "parts", [c]):  # a rank selection keeps a dense matrix at the weights' dtype
                if hasattr(part, "storage_dtype"):
                    part.storage_dtype = task.params[0].dtype
            out.append(task)
    return out


def _check_flops(task: Task) -> None:
    for c in getattr(task.compression, "parts", [task.compression]):
        if getattr(c, "criterion", None) == "flops" and c.positions is None and len(task.shapes[0]) > 2:
            raise ValueError(
                f"task {task.name!r}: RankSelection(criterion='flops') on a conv weight needs positions= "
                "(the layer's output height × width per sample)"
            )
