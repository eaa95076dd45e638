"""Compressed models in ``.lcz`` files: write one from an LC object, read, verify, inspect, and load it into a model.

The container (frame, header, checksum, the reader's limits and the header's structural check) is
:mod:`lcompress.container`; each task's Θ is written and read by the codec its compression declares
(:mod:`lcompress.codecs`), so a file stores exactly the bits :meth:`lcompress.LC.size_report` counts (each piece
rounded up to whole bytes), plus a header of a few hundred bytes to a few KiB.

Reading a file that may be hostile (a sha256 is no signature): everything is checked before anything is decoded,
in the order :mod:`lcompress.container` describes; :func:`load` also checks the entries against the model's
names, shapes and dtypes first, so a file never makes it allocate much more than the model's own size;
:func:`inspect` decodes nothing; :func:`read` decodes what the file claims and takes ``max_bytes`` to refuse a file
that claims too much. Every problem found in a file raises :class:`CorruptFileError` (a ``ValueError``), whose
message names the file and the field; a model that does not match a valid file raises its subclass
:class:`ModelMismatchError`.
"""
from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from . import container
from ._io import atomic_write
from .codecs import CODECS, Reader, Writer, codec_for, decode_theta, delta_of, pack_bits, unpack_bits
from .codecs.base import DTYPES, CorruptFileError, _is_int, _short, dtype_name, tensor_bytes
from .container import BLOBS, FORMAT, VERSION
from .sizes import compression_ratio, dtype_bits
from .tasks import unwrap_model
from .views import from_matrix

__all__ = [
    "FORMAT", "VERSION", "CorruptFileError", "ModelMismatchError", "save", "load", "read", "inspect",
    "compact_layers", "to_bytes", "pack_bits", "unpack_bits",
]

logger = logging.getLogger(__name__)

#: Allowed slack of the file over the size report: file ≤ (1 + SIZE_SLACK) · compressed_bits / 8 + SIZE_FIXED.
SIZE_SLACK = 0.02
SIZE_FIXED = 4096


class ModelMismatchError(CorruptFileError):
    """:func:`load`: the file's parameter names, shapes or dtypes are not the model's (what differs is named)."""


# ---- writing -----------------------------------------------------------------------------------------------------
def to_bytes(alg, lossless: bool = True) -> tuple[bytes, dict[str, Any]]:
    """The ``.lcz`` bytes of an :class:`lcompress.LC` object's compressed model, and the header written.

    Args:
        alg: the LC object.
        lossless: entropy-code the symbol streams where that is shorter (:mod:`lcompress._entropy`; what
            :meth:`lcompress.LC.size_report` counts); ``False`` writes them bit-packed (a version 1 file).

    Raises:
        TypeError, ValueError: ``alg`` is not an LC object, or a compression, Θ or dtype the format cannot store
            (naming the task).
    """
    if not (hasattr(alg, "tasks") and isinstance(getattr(alg, "model", None), nn.Module)):
        raise TypeError(f"alg must be an lcompress.LC object, got {type(alg).__name__}")
    model = alg.model
    wr = Writer(lossless=lossless)
    task_of: dict[int, tuple[int, int]] = {}
    tasks = []
    for ti, t in enumerate(alg.tasks):
        for j, p in enumerate(t.params):
            task_of[id(p)] = (ti, j)
        bits0, bytes0 = wr.bits, wr.size
        try:
            rec = codec_for(t.compression).encode(t.compression, wr)
        except (TypeError, ValueError) as e:
            raise type(e)(f"task {t.name!r}: {e}") from None
        tasks.append({
            "name": t.name,
            "params": list(t.param_names),
            "view": list(t.view_shape()),
            "matrix": bool(t.matrix),
            "conv_scheme": t.conv_scheme,
            "compression": t.compression.config(),
            "bits": wr.bits - bits0,
            "bytes": wr.size - bytes0,
            "theta": rec,
        })
    entries = []
    dense: list[bytes] = []
    dense_size = 0
    first_name: dict[int, str] = {}
    for name, v in model.state_dict(keep_vars=True).items():
        src: list[Any]
        if id(v) in task_of:
            src = ["task", *task_of[id(v)]]
        elif id(v) in first_name:
            src = ["alias", first_name[id(v)]]
        else:
            data = tensor_bytes(v)
            src = ["dense", dense_size, len(data)]
            dense.append(data)
            dense_size += len(data)
        first_name.setdefault(id(v), name)
        entries.append([name, dtype_name(v.dtype), list(v.shape), src])
    version = VERSION if wr.coded else 1  # a file without coded streams stays readable by version-1 readers
    header = {"format": FORMAT, "version": version, "entries": entries, "tasks": tasks,
              "blobs": {"dense": dense_size, "theta": wr.size}}
    return container.write(header, {"dense": b"".join(dense), "theta": wr.payload()}, version), header


def save(alg, path, lossless: bool = True) -> dict[str, Any]:
    """Write ``alg``'s compressed model to a ``.lcz`` file (atomically: a temporary file, then a rename; the file
    gets the permissions of any new file under the user's umask).

    Args:
        alg: an :class:`lcompress.LC` object (its Θ, and every other parameter and buffer of its model).
        path: the file to write.
        lossless: see :func:`to_bytes`.

    Returns:
        ``{"path", "file_bytes", "payload_bytes", "compressed_bits", "reference_bits", "bound_bytes",
        "ratio", "file_ratio"}``: ``bound_bytes`` = 1.02 · compressed_bits / 8 + 4096, the size the file is
        guaranteed to stay under (a warning is logged otherwise); ``ratio`` = the size report's (reference bits /
        compressed bits: :func:`lcompress.sizes.compression_ratio`, the one definition), and ``file_ratio`` =
        reference bytes / file bytes, the container's header included.

    Raises:
        TypeError: a compression or a dtype the format cannot store.
    """
    data, header = to_bytes(alg, lossless=lossless)
    path = Path(path)
    atomic_write(path, lambda f: f.write(data))
    rep = alg.size_report()
    if not lossless:  # the report counts the coded streams: count these tasks as written
        bits = rep["other_bits"] + sum(t["bits"] for t in header["tasks"])
        rep = {**rep, "compressed_bits": bits, "ratio": compression_ratio(rep["reference_bits"], bits)}
    bound = (1 + SIZE_SLACK) * rep["compressed_bits"] / 8 + SIZE_FIXED
    if len(data) > bound:
        logger.warning("%s: %d bytes exceeds the bound %.0f bytes of the size report", path, len(data), bound)
    logger.info("wrote %s: %d bytes (size report %.0f bytes)", path, len(data), rep["compressed_bits"] / 8)
    return {
        "path": str(path),
        "file_bytes": len(data),
        "payload_bytes": sum(header["blobs"].values()),
        "compressed_bits": rep["compressed_bits"],
        "reference_bits": rep["reference_bits"],
        "bound_bytes": bound,
        "ratio": rep["ratio"],
        "file_ratio": rep["reference_bits"] / 8 / len(data),
    }


# ---- reading: decoding ----------------------------------------------------------------------------------------
def compact_layers(path, *, max_bytes: int | None = None) -> list[dict[str, Any]]:
    """What ``load(path, model, compact=True)`` makes of each compressed weight's layer, for ``lcompress inspect``.

    The file alone does not say which module owns a weight, so the owner is taken from the shape (see
    :func:`lcompress.nn.describe_compact`): row codebooks an ``nn.Embedding``, another 2-D weight an
    ``nn.Linear``, a 4-D one an ``nn.Conv2d``. The choice itself is the one :func:`load` makes (a sparse weight
    becomes a :class:`~lcompress.nn.SparseLinear` only below :data:`~lcompress.nn.SPARSE_CROSSOVER_DENSITY`).
    The tasks' Θ are decoded (not the dense entries).

    Args:
        path: the file (or its bytes).
        max_bytes: refuse a file whose compressed parameters take more than this many bytes decoded.

    Returns:
        one row per compressed parameter, in task order: ``parameter``, ``task``, ``shape``, ``layer`` (the
        compact class name, or ``"dense"``: the layer keeps Δ(Θ) as its weight) and ``why``.

    Raises:
        FileNotFoundError, CorruptFileError: as :func:`read`; CorruptFileError also for more than ``max_bytes``.
    """
    from .nn import describe_compact

    if max_bytes is not None and not _is_int(max_bytes, hi=1 << 62):
        raise ValueError(f"max_bytes={max_bytes!r} must be a non-negative integer or None")
    data, where = container.read_bytes(path)
    header, _, blobs = container.open_bytes(data, where)
    info = {e[0]: e for e in header["entries"]}
    params = {p for t in header["tasks"] for p in t["params"]}
    need = container.decoded_bytes(header, params)
    if max_bytes is not None and need > max_bytes:
        raise CorruptFileError(f"{where}: the compressed parameters take {need} bytes decoded, more than "
                               f"max_bytes={max_bytes}")
    rd = Reader(blobs["theta"])
    rows = []
    for t in header["tasks"]:
        shapes = [tuple(info[p][2]) for p in t["params"]]
        tname = _short(t["name"], 80)
        try:  # the header was checked: what is left is a payload that does not decode, as in _decode_all
            theta = decode_theta(t["theta"], rd, t["compression"], f"task {tname}")
            specs = CODECS[t["theta"]["kind"]].compact_specs(theta, t["theta"], t["params"], shapes, t["conv_scheme"])
        except (ValueError, TypeError, KeyError, IndexError) as e:  # CorruptFileError is a ValueError
            raise CorruptFileError(f"{where}: {e}") from None
        for p, shape in zip(t["params"], shapes):
            layer, why = describe_compact(p, shape, specs.get(p))
            rows.append({"parameter": p, "task": t["name"], "shape": shape, "layer": layer, "why": why})
    return rows


def read(path, *, max_bytes: int | None = None) -> dict[str, Any]:
    """Parse and verify a ``.lcz`` file (or its bytes) and decode every tensor.

    The sizes are checked against each other and the blobs before anything is decoded, but the shapes are the
    file's own: a valid file of a few KiB may describe a model of many GB (a one-entry codebook stores no codes).
    For a file that may be hostile pass ``max_bytes``, or use :func:`load` (bounded by the model) or
    :func:`inspect` (decodes nothing).

    Args:
        path: the file (or its bytes).
        max_bytes: refuse a file whose tensors take more than this many bytes decoded (None: no limit).

    Returns:
        ``{"header": the JSON header, "metadata": the safetensors metadata, "state": {state-dict name: tensor}
        (Δ(Θ) for compressed parameters, at their dtype), "thetas": [Θ per task, in the compressions' layouts]}``.

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: not a ``.lcz`` file, truncated, corrupted (checksum mismatch, inconsistent header, a
            payload that does not decode), a newer format version, or more than ``max_bytes`` decoded.
    """
    if max_bytes is not None and not _is_int(max_bytes, hi=1 << 62):
        raise ValueError(f"max_bytes={max_bytes!r} must be a non-negative integer or None")
    data, where = container.read_bytes(path)
    header, meta, blobs = container.open_bytes(data, where)
    need = container.decoded_bytes(header)
    if max_bytes is not None and need > max_bytes:
        raise CorruptFileError(f"{where}: the file's tensors take {need} bytes decoded, more than max_bytes={max_bytes}")
    state, thetas = _decode_all(header, blobs, where)
    return {"header": header, "metadata": meta, "state": state, "thetas": [thetas[i] for i in sorted(thetas)]}


def _decode_all(
    header: Mapping[str, Any], blobs: Mapping[str, Tensor], where: str, names: set[str] | None = None
) -> tuple[dict[str, Tensor], dict[int, dict]]:
    """Decode a checked header's entries (``names``: only those, and what they alias): ({name: tensor},
    {task index: Θ}) for the tasks that were needed."""
    entries, tasks = header["entries"], header["tasks"]
    rd, dense = Reader(blobs["theta"]), Reader(blobs["dense"], "dense")
    if names is not None:  # an alias needs its target, which comes earlier
        names = set(names)
        for name, _, _, src in reversed(entries):
            if name in names and src[0] == "alias":
                names.add(src[1])
    wanted = [e for e in entries if names is None or e[0] in names]
    need_tasks = sorted({e[3][1] for e in wanted if e[3][0] == "task"}) if names is not None else range(len(tasks))
    info = {e[0]: e for e in entries}
    thetas, task_values = {}, {}
    try:
        for ti in need_tasks:
            t = tasks[ti]
            tname, shapes = t["name"], [info[p][2] for p in t["params"]]
            theta = decode_theta(t["theta"], rd, t["compression"], f"task {_short(tname, 80)}")
            d = delta_of(t["theta"], theta, t["view"])
            if t["matrix"]:
                outs = [from_matrix(d, tuple(shapes[0]), t["conv_scheme"])]
            else:
                flat, outs, o = d.reshape(-1), [], 0
                for s in shapes:
                    k = math.prod(s)
                    outs.append(flat[o : o + k].reshape(tuple(s)))
                    o += k
            thetas[ti] = theta
            task_values[ti] = outs
        state: dict[str, Tensor] = {}
        for name, dname, shape, src in wanted:
            dt = DTYPES[dname]
            if src[0] == "dense":
                w = f"entry {_short(name, 80)}"
                state[name] = dense.read_tensor(src[1:], dt, shape, w)
            elif src[0] == "task":
                state[name] = task_values[src[1]][src[2]].to(dt).contiguous()
            else:
                state[name] = state[src[1]]
            if list(state[name].shape) != list(shape):
                raise CorruptFileError(f"entry {_short(name, 80)} decodes to {tuple(state[name].shape)}, not {tuple(shape)}")
    except (ValueError, KeyError, TypeError, IndexError) as e:
        # the header was checked, so what is left is a payload that does not decode (a code beyond its codebook,
        # a support that does not add up)
        raise CorruptFileError(f"{where}: {e}") from None
    return state, thetas


# ---- loading into a model ------------------------------------------------------------------------------------------
def _check_skeleton(header: Mapping[str, Any], sd: Mapping[str, Tensor], strict: bool, where: str) -> list[str]:
    file_names = [e[0] for e in header["entries"]]
    missing = [n for n in file_names if n not in sd]
    unexpected = [n for n in sd if n not in set(file_names)]
    problems = []
    if strict and (missing or unexpected):
        if missing:
            problems.append(f"in the file but not in the model: {_short(missing, 300)}")
        if unexpected:
            problems.append(f"in the model but not in the file: {_short(unexpected, 300)}")
    for name, dname, shape, _ in header["entries"]:
        if name not in sd:
            continue
        v = sd[name]
        vname = str(v.dtype).removeprefix("torch.")
        if list(v.shape) != list(shape) or vname != dname:
            problems.append(
                f"{_short(name, 80)} has shape {_short(tuple(shape))} and dtype {dname} in the file but shape {tuple(v.shape)} "
                f"and dtype {vname} in the model"
            )
    if problems:
        raise ModelMismatchError(f"{where}: the model does not match the file: " + "; ".join(problems[:8])
                                 + (f"; and {len(problems) - 8} more" if len(problems) > 8 else ""))
    return [n for n in file_names if n in sd]


def load(path, model: nn.Module, compact: bool = False, strict: bool = True) -> nn.Module:
    """Load a ``.lcz`` file into a model skeleton: weights = Δ(Θ) decoded, the rest as stored.

    The file is verified and checked against the model's names, shapes and dtypes before anything is decoded
    (so a hostile file cannot make it allocate much more than the model's size), and everything is decoded —
    the compact modules built too — before the model is touched: on any error the skeleton is left as it was.

    Args:
        path: the ``.lcz`` file (or its bytes).
        model: a model of the same architecture (a DistributedDataParallel or ``torch.compile`` wrapper is
            accepted); its parameters and buffers must have the file's names, shapes and dtypes.
        compact: also replace compressed layers by compact modules (:func:`lcompress.nn.compact_model`):
            codebook layers, low-rank pairs, sparse layers below the density crossover.
        strict: names must match exactly; with ``strict=False`` entries missing on either side are skipped
            (shapes and dtypes of the shared ones must still match).

    Returns:
        ``model`` (its modules replaced in place when ``compact``).

    Raises:
        FileNotFoundError: no such file.
        CorruptFileError: a corrupted or truncated file, a checksum mismatch, a newer format version.
        ModelMismatchError: (a CorruptFileError) a model whose parameter names, shapes or dtypes differ (what
            differs is named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(compact, bool) or not isinstance(strict, bool):
        raise TypeError(f"compact={compact!r} and strict={strict!r} must be True or False")
    data, where = container.read_bytes(path)
    header, _, blobs = container.open_bytes(data, where)
    inner = unwrap_model(model)
    sd = inner.state_dict(keep_vars=True)
    names = _check_skeleton(header, sd, strict, where)
    state, thetas = _decode_all(header, blobs, where, set(names))
    plan = []
    if compact:
        from .nn import _plan_compact

        specs: dict[str, dict[str, Any]] = {}
        try:
            for ti, theta in thetas.items():
                t = header["tasks"][ti]
                if not all(p in sd for p in t["params"]):
                    continue
                shapes = [tuple(sd[p].shape) for p in t["params"]]
                codec = CODECS[t["theta"]["kind"]]
                specs.update(codec.compact_specs(theta, t["theta"], t["params"], shapes, t["conv_scheme"]))
            plan = _plan_compact(inner, specs)
        except (ValueError, TypeError, KeyError, IndexError) as e:
            raise CorruptFileError(f"{where}: the compact layers cannot be built: {e}") from None
    # nothing above touched the model; copies of checked shapes and dtypes cannot fail
    with torch.no_grad():
        for n in names:
            sd[n].copy_(state[n])
    if plan:
        from .nn import _apply_compact

        _apply_compact(inner, plan)
    return model


def inspect(path) -> list[dict[str, Any]]:
    """Per-task summary of a ``.lcz`` file, for ``lcompress inspect``; the file is verified and its header
    checked, but no tensor is decoded.

    Returns:
        one row per task — ``task``, ``compression`` (its type), ``config``, ``shapes``, ``weights``, ``bits``
        (Θ as counted by the size report), ``file_bytes`` (its payload bytes), ``ratio`` (reference bits / bits:
        :func:`lcompress.sizes.compression_ratio`, as the size report's task rows) — then a row ``"(uncompressed)"`` for the other parameters and buffers and a row ``"(header)"``
        for the container's overhead (its ``file_bytes`` make the rows add up to the file size).

    Raises:
        FileNotFoundError, CorruptFileError: as :func:`read`.
    """
    data, where = container.read_bytes(path)
    header, _, _ = container.open_bytes(data, where)
    info = {e[0]: e for e in header["entries"]}
    rows = []
    for t in header["tasks"]:
        shapes = [tuple(info[p][2]) for p in t["params"]]
        ref = sum(math.prod(s) * dtype_bits(DTYPES[info[p][1]]) for p, s in zip(t["params"], shapes))
        rows.append({
            "task": t["name"],
            "compression": t["compression"]["type"],
            "config": t["compression"],
            "shapes": shapes,
            "weights": sum(math.prod(s) for s in shapes),
            "bits": t["bits"],
            "file_bytes": t["bytes"],
            "ratio": compression_ratio(ref, t["bits"]),
        })
    dense = [e for e in header["entries"] if e[3][0] == "dense"]
    dense_bytes = header["blobs"]["dense"]
    rows.append({
        "task": "(uncompressed)",
        "compression": "dense",
        "config": None,
        "shapes": [tuple(e[2]) for e in dense],
        "weights": sum(math.prod(e[2]) for e in dense),
        "bits": dense_bytes * 8,
        "file_bytes": dense_bytes,
        "ratio": 1.0,
    })
    payload = sum(header["blobs"].values())
    rows.append({"task": "(header)", "compression": "container", "config": None, "shapes": [], "weights": 0,
                 "bits": 0, "file_bytes": len(data) - payload, "ratio": None})
    return rows
