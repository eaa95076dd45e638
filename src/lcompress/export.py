"""The compact file format (``.lcz``): write, read and verify a compressed model.

A ``.lcz`` file is a `safetensors <https://github.com/huggingface/safetensors>`_ file with two uint8 tensors
("blobs") and a few metadata strings; nothing in it is ever unpickled.

Metadata (safetensors ``__metadata__``, all strings):

* ``format`` = ``"lcompress.lcz"``, ``version`` (an integer, :data:`VERSION`);
* ``header``: the JSON header below, zlib-compressed and base64-encoded (``header_encoding`` = ``"zlib+base64"``;
  a ResNet's hundred-odd tensor names would otherwise cost more than its compressed weights);
* ``sha256``: hex digest of the header JSON followed by the ``dense`` and ``theta`` blobs.

The JSON header holds ``entries``, one per state-dict entry of the model (every parameter and persistent
buffer): ``[name, dtype, shape, source]``, where the source is ``["dense", offset, length]`` (raw little-endian
bytes in the ``dense`` blob), ``["task", t, j]`` (parameter j of task t, decoded from its Θ) or
``["alias", name]`` (a tensor shared with an earlier entry); and ``tasks``, one per task: its name, parameters,
matrix view, compression config, bits and bytes, and ``theta``, a record of where its Θ lies in the ``theta``
blob. Each Θ piece is a byte-aligned segment ``[offset, length]``:

* quantization ``{"kind": "codebook"}``: codes bit-packed at ⌈log₂ K⌉ bits each (little-endian bit order),
  then the K float32 codebook entries (``store = "all"``), only the scale a of {−a, a} / {−a, 0, a}
  (``"scale"``), or nothing for a fixed codebook rebuilt from the config (``"none"``);
* pruning ``{"kind": "sparse"}``: the nonzero values at their dtype (or, with ``value_codebook``, their
  ⌈log₂ K⌉-bit codes and the K float32 codebook entries), and the support coded as chosen by
  :func:`lcompress.sizes.support_bits`, an n-bit mask or b-bit delta symbols (all-ones = skip 2ᵇ − 1);
* low rank ``{"kind": "factors"}``: A and B at their dtype, or (a rank selection that kept the matrix dense)
  ``"dense"``: the matrix view at the weights' dtype;
* additive combinations ``{"kind": "sum", "parts": [...]}``, recursively.

So the payload is exactly the bits of :meth:`lcompress.LC.size_report` rounded up to whole bytes per segment,
and the file adds a header of a few hundred bytes to a few KiB.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import sys
import tempfile
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from .compressions import AdditiveCombination, Compression, from_config
from .compressions.lowrank import _Factors, from_matrix
from .compressions.pruning import _Sparse
from .compressions.quantization import _Codebook
from .sizes import FLOAT_BITS, dense_bits, dtype_bits, index_bits, support_bits
from .tasks import unwrap_model

__all__ = ["FORMAT", "VERSION", "save", "load", "read", "inspect", "to_bytes", "pack_bits", "unpack_bits"]

logger = logging.getLogger(__name__)

FORMAT = "lcompress.lcz"
VERSION = 1
HEADER_ENCODING = "zlib+base64"
BLOBS = ("dense", "theta")
#: Allowed slack of the file over the size report: file ≤ (1 + SIZE_SLACK) · compressed_bits / 8 + SIZE_FIXED.
SIZE_SLACK = 0.02
SIZE_FIXED = 4096

_CHUNK = 1 << 20  # values per chunk in the generic bit packer (a multiple of 8 keeps chunks byte-aligned)

_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        _DTYPES[_name] = getattr(torch, _name)


def _dtype_name(d: torch.dtype) -> str:
    name = str(d).removeprefix("torch.")
    if name not in _DTYPES:
        raise TypeError(f"dtype {d} cannot be stored in a .lcz file")
    return name


def _dtype(name: Any, where: str) -> torch.dtype:
    if not isinstance(name, str) or name not in _DTYPES:
        raise ValueError(f"corrupted .lcz header: {where} has unknown dtype {name!r}")
    return _DTYPES[name]


if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("lcompress.export needs a little-endian machine (the .lcz format is little-endian)")


# ---- bit packing ---------------------------------------------------------------------------------------------
def pack_bits(values: Tensor | np.ndarray, width: int) -> bytes:
    """Pack non-negative integers into a little-endian bit stream, ``width`` bits each.

    Value j occupies bits [j·width, (j + 1)·width) of the stream, least significant bit first (bit i of the
    stream is bit i mod 8 of byte ⌊i / 8⌋); the last byte is zero-padded. Vectorized: no Python loop over
    values.

    Args:
        values: integers in [0, 2^width).
        width: bits per value, 0 ≤ width ≤ 32 (0 writes nothing).

    Returns:
        ⌈n·width / 8⌉ bytes.

    Raises:
        ValueError: a width outside [0, 32] or a value that does not fit.

    >>> pack_bits(torch.tensor([1, 0, 3, 2]), 2).hex()
    'b1'
    """
    if not (isinstance(width, int) and 0 <= width <= 32):
        raise ValueError(f"width={width!r} must be an integer in [0, 32]")
    v = values.detach().cpu().reshape(-1).numpy() if isinstance(values, Tensor) else np.asarray(values).reshape(-1)
    if width == 0 or v.size == 0:
        return b""
    if v.min() < 0 or int(v.max()) >= (1 << width):
        raise ValueError(f"pack_bits: values must lie in [0, 2**{width})")
    if width in (8, 16, 32):
        return v.astype(f"<u{width // 8}").tobytes()
    if width in (1, 2, 4):
        per = 8 // width
        u = np.zeros(-(-v.size // per) * per, dtype=np.uint8)
        u[: v.size] = v
        u = u.reshape(-1, per)
        out = np.zeros(u.shape[0], dtype=np.uint8)
        for j in range(per):  # a loop over the ≤ 8 fields of a byte, not over values
            out |= u[:, j] << np.uint8(j * width)
        return out.tobytes()
    pieces = []
    for s in range(0, v.size, _CHUNK):
        c = v[s : s + _CHUNK].astype("<u4")
        bits = np.unpackbits(c.view(np.uint8).reshape(-1, 4), axis=1, bitorder="little")[:, :width]
        pieces.append(np.packbits(bits.reshape(-1), bitorder="little").tobytes())
    return b"".join(pieces)


def unpack_bits(data: bytes | np.ndarray, n: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_bits`: ``n`` values of ``width`` bits (uint8 for width ≤ 8, else int64).

    Raises:
        ValueError: ``data`` is shorter than ⌈n·width / 8⌉ bytes.
    """
    if not (isinstance(width, int) and 0 <= width <= 32):
        raise ValueError(f"width={width!r} must be an integer in [0, 32]")
    buf = np.frombuffer(data, dtype=np.uint8) if not isinstance(data, np.ndarray) else data.reshape(-1)
    need = -(-n * width // 8)
    if buf.size < need:
        raise ValueError(f"bit stream of {buf.size} bytes is too short for {n} values of {width} bits")
    if width == 0:
        return np.zeros(n, dtype=np.uint8)
    if width in (8, 16, 32):
        out = buf[:need].view(f"<u{width // 8}")
        return out.copy() if width == 8 else out.astype(np.int64)
    if width in (1, 2, 4):
        per = 8 // width
        mask = np.uint8((1 << width) - 1)
        u = np.empty((need, per), dtype=np.uint8)
        for j in range(per):
            u[:, j] = (buf[:need] >> np.uint8(j * width)) & mask
        return u.reshape(-1)[:n].copy()
    nbytes = -(-width // 8)
    pieces = []
    step = _CHUNK * width // 8
    for s in range(0, need, step):
        chunk = buf[s : s + step]
        c = min(_CHUNK, n - (s * 8) // width)
        bits = np.unpackbits(chunk, bitorder="little")[: c * width].reshape(c, width)
        padded = np.zeros((c, 4 * 8), dtype=np.uint8)
        padded[:, :width] = bits
        vals = np.packbits(padded, axis=1, bitorder="little").view("<u4").reshape(-1)
        pieces.append(vals)
    out = np.concatenate(pieces) if pieces else np.zeros(0, dtype="<u4")
    return out.astype(np.uint8) if nbytes == 1 else out.astype(np.int64)


def _delta_encode(indices: np.ndarray, width: int) -> np.ndarray:
    """Delta symbols of a sorted support (see :mod:`lcompress.sizes`): per gap g, ⌊g/M⌋ escapes M then g mod M."""
    m = (1 << width) - 1
    prev = np.concatenate([[-1], indices[:-1]])
    gaps = indices - prev - 1
    esc, last = gaps // m, gaps % m
    sym = np.full(int(indices.size + esc.sum()), m, dtype=np.int64)
    sym[np.cumsum(esc + 1) - 1] = last
    return sym


def _delta_decode(sym: np.ndarray, width: int, nnz: int, n: int) -> np.ndarray:
    m = (1 << width) - 1
    final = sym != m
    fpos = np.flatnonzero(final)
    if fpos.size != nnz or (sym.size and not final[-1]):
        raise ValueError(f"corrupted .lcz payload: a delta-coded support decodes to {fpos.size} positions, not {nnz}")
    escapes = np.cumsum(~final)[fpos]
    gaps = np.diff(escapes, prepend=0).astype(np.int64) * m + sym[fpos].astype(np.int64)
    idx = np.cumsum(gaps + 1) - 1
    if idx.size and idx[-1] >= n:
        raise ValueError(f"corrupted .lcz payload: a support position {int(idx[-1])} is beyond the length {n}")
    return idx


# ---- raw tensors -----------------------------------------------------------------------------------------------
def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _bytes_tensor(buf: Tensor, dtype: torch.dtype, shape: Sequence[int], where: str) -> Tensor:
    numel = math.prod(shape)
    if buf.numel() != numel * (dtype_bits(dtype) // 8):
        raise ValueError(f"corrupted .lcz file: {where} has {buf.numel()} bytes, not {numel} × {dtype}")
    return buf.clone().view(dtype).reshape(tuple(shape))


class _Writer:
    """Appends byte-aligned segments to the blobs; returns [offset, length] records."""

    def __init__(self) -> None:
        self.blobs: dict[str, list[bytes]] = {b: [] for b in BLOBS}
        self.sizes: dict[str, int] = {b: 0 for b in BLOBS}

    def add(self, blob: str, data: bytes) -> list[int]:
        off = self.sizes[blob]
        self.blobs[blob].append(data)
        self.sizes[blob] += len(data)
        return [off, len(data)]


class _Reader:
    def __init__(self, blobs: Mapping[str, Tensor]) -> None:
        self.blobs = blobs

    def seg(self, blob: str, rec: Any, where: str) -> Tensor:
        if not (isinstance(rec, list) and len(rec) == 2 and all(isinstance(x, int) and x >= 0 for x in rec)):
            raise ValueError(f"corrupted .lcz header: {where} has a bad segment {rec!r}")
        off, length = rec
        b = self.blobs[blob]
        if off + length > b.numel():
            raise ValueError(
                f"corrupted .lcz file: {where} lies at bytes [{off}, {off + length}) of the {blob!r} blob "
                f"of {b.numel()} bytes"
            )
        return b[off : off + length]

    def np(self, blob: str, rec: Any, where: str) -> np.ndarray:
        return self.seg(blob, rec, where).numpy()


# ---- Θ encodings ---------------------------------------------------------------------------------------------
def _scaled_codebook(a: Tensor, k: int) -> Tensor:
    a = a.reshape(())
    return torch.stack([-a, a]) if k == 2 else torch.stack([-a, a.new_zeros(()), a])


def _fixed_codebook(config: Mapping[str, Any]) -> Tensor:
    comp = from_config(dict(config))
    return comp._fixed(torch.device("cpu")).float()


def _encode(comp: Compression, wr: _Writer, where: str) -> tuple[dict[str, Any], int]:
    """(record, bits) of one compression's Θ."""
    if isinstance(comp, AdditiveCombination):
        parts = [_encode(p, wr, f"{where} part {i}") for i, p in enumerate(comp.parts)]
        return {"kind": "sum", "parts": [r for r, _ in parts]}, sum(b for _, b in parts)
    th = comp.theta
    if isinstance(comp, _Codebook):
        k, codes, cb = comp.k, th["codes"].reshape(-1), th["codebook"].detach().float().cpu().reshape(-1)
        width = index_bits(k)
        rec: dict[str, Any] = {"kind": "codebook", "k": k, "n": codes.numel(), "width": width,
                               "store": comp.stored_codebook}
        if width:
            rec["codes"] = wr.add("theta", pack_bits(codes, width))
        if comp.stored_codebook == "all":
            rec["entries"] = cb.numel()
            rec["codebook"] = wr.add("theta", _tensor_bytes(cb))
            stored = cb.numel()
        elif comp.stored_codebook == "scale":
            if k not in (2, 3) or not torch.equal(_scaled_codebook(cb[-1], k), cb):
                raise ValueError(f"{where}: codebook {cb.tolist()} is not of the scaled form {{-a, (0,) a}}")
            rec["scale"] = wr.add("theta", _tensor_bytes(cb[-1:]))
            stored = 1
        elif comp.stored_codebook == "none":
            if not torch.equal(_fixed_codebook(comp.config()), cb):
                raise ValueError(f"{where}: codebook {cb.tolist()} is not the fixed one of {comp!r}")
            stored = 0
        else:
            raise TypeError(f"{where}: unknown stored_codebook={comp.stored_codebook!r} of {type(comp).__name__}")
        return rec, codes.numel() * width + FLOAT_BITS * stored
    if isinstance(comp, _Sparse):
        idx, vals, n = th["indices"].detach().cpu().reshape(-1).long(), th["values"].detach().cpu().reshape(-1), th["n"]
        scheme, sbits, width = support_bits(idx, n)
        rec = {"kind": "sparse", "n": int(n), "nnz": idx.numel(), "support": scheme}
        if "codebook" in th:  # values = codebook[codes]: ⌈log₂ K⌉-bit codes and a float32 codebook
            cb = th["codebook"].detach().float().cpu().reshape(-1)
            codes = th["codes"].detach().cpu().reshape(-1)
            if not torch.equal(cb[codes.long()], vals.float()):
                raise ValueError(f"{where}: the sparse values are not codebook[codes]")
            cw = index_bits(cb.numel())
            rec.update(entries=cb.numel(), codebook=wr.add("theta", _tensor_bytes(cb)), code_width=cw)
            if cw:
                rec["codes"] = wr.add("theta", pack_bits(codes, cw))
            vbits = idx.numel() * cw + FLOAT_BITS * cb.numel()
        else:
            rec.update(dtype=_dtype_name(vals.dtype), values=wr.add("theta", _tensor_bytes(vals)))
            vbits = idx.numel() * dtype_bits(vals.dtype)
        if scheme == "bitmask":
            mask = np.zeros(n, dtype=np.uint8)
            mask[idx.numpy()] = 1
            rec["mask"] = wr.add("theta", pack_bits(mask, 1))
        else:
            sym = _delta_encode(idx.numpy(), width)
            rec.update(width=width, symbols=int(sym.size), deltas=wr.add("theta", pack_bits(sym, width)))
        return rec, vbits + sbits
    if isinstance(comp, _Factors):
        rec = {"kind": "factors"}
        bits = 0
        for key in ("dense",) if "dense" in th else ("A", "B"):
            t = th[key].detach().cpu()
            rec[key] = {"dtype": _dtype_name(t.dtype), "shape": list(t.shape), "seg": wr.add("theta", _tensor_bytes(t))}
            bits += dense_bits(t)
        return rec, bits
    raise TypeError(f"{where}: the .lcz format has no encoding for {type(comp).__name__}")


def _read_codes(rd: _Reader, rec: Mapping[str, Any], n: int, width: int, where: str) -> Tensor:
    """The n bit-packed codes of ``rec["codes"]`` (all zero, and not stored, when ``width`` is 0)."""
    return torch.from_numpy(unpack_bits(rd.np("theta", rec["codes"], where), n, width) if width else np.zeros(n, np.uint8))


def _check_codes(codes: Tensor, entries: int, where: str) -> None:
    if codes.numel() and int(codes.max()) >= entries:
        raise ValueError(f"corrupted .lcz payload: {where} has a code beyond its {entries}-entry codebook")


def _decode(rec: Any, rd: _Reader, config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Θ (in the compression's own layout) from a record."""
    if not isinstance(rec, dict):
        raise ValueError(f"corrupted .lcz header: {where} has no Θ record")
    kind = rec.get("kind")
    try:
        if kind == "sum":
            parts = config["parts"]
            return {f"part{i}": _decode(r, rd, parts[i], f"{where} part {i}") for i, r in enumerate(rec["parts"])}
        if kind == "codebook":
            n, k, width = int(rec["n"]), int(rec["k"]), int(rec["width"])
            if width != index_bits(k):
                raise ValueError(f"corrupted .lcz header: {where} codes of {width} bits for K={k}")
            codes_t = _read_codes(rd, rec, n, width, where)
            if rec["store"] == "all":
                cb = _bytes_tensor(rd.seg("theta", rec["codebook"], where), torch.float32, [int(rec["entries"])], where)
            elif rec["store"] == "scale":
                cb = _scaled_codebook(_bytes_tensor(rd.seg("theta", rec["scale"], where), torch.float32, [1], where), k)
            elif rec["store"] == "none":
                cb = _fixed_codebook(config)
            else:
                raise ValueError(f"corrupted .lcz header: {where} has codebook store {rec['store']!r}")
            _check_codes(codes_t, cb.numel(), where)
            return {"codebook": cb, "codes": codes_t if k <= 256 else codes_t.long()}
        if kind == "sparse":
            n, nnz = int(rec["n"]), int(rec["nnz"])
            extra: dict[str, Tensor] = {}
            if "codebook" in rec:
                entries, cw = int(rec["entries"]), int(rec["code_width"])
                if entries < 1 or cw != index_bits(entries):
                    raise ValueError(f"corrupted .lcz header: {where} codes of {cw} bits for {entries} entries")
                cb = _bytes_tensor(rd.seg("theta", rec["codebook"], where), torch.float32, [entries], where)
                codes_t = _read_codes(rd, rec, nnz, cw, where).to(torch.uint8)
                _check_codes(codes_t, entries, where)
                vals = cb[codes_t.long()]
                extra = {"codebook": cb, "codes": codes_t}
            else:
                vdt = _dtype(rec["dtype"], where)
                vals = _bytes_tensor(rd.seg("theta", rec["values"], where), vdt, [nnz], where)
            if rec["support"] == "bitmask":
                idx = np.flatnonzero(unpack_bits(rd.np("theta", rec["mask"], where), n, 1))
                if idx.size != nnz:
                    raise ValueError(f"corrupted .lcz payload: {where} bitmask has {idx.size} ones, not {nnz}")
            elif rec["support"] == "delta":
                width = int(rec["width"])
                sym = unpack_bits(rd.np("theta", rec["deltas"], where), int(rec["symbols"]), width)
                idx = _delta_decode(sym, width, nnz, n)
            else:
                raise ValueError(f"corrupted .lcz header: {where} has support coding {rec['support']!r}")
            return {"indices": torch.from_numpy(idx.astype(np.int64)), "values": vals, "n": n, **extra}
        if kind == "factors":
            out = {}
            for key in ("dense",) if "dense" in rec else ("A", "B"):
                r = rec[key]
                out[key] = _bytes_tensor(rd.seg("theta", r["seg"], where), _dtype(r["dtype"], where), r["shape"], where)
            if "dense" in out:
                if out["dense"].dim() != 2:
                    raise ValueError(f"corrupted .lcz header: {where} has a dense matrix of shape {out['dense'].shape}")
                return out
            if out["A"].dim() != 2 or out["B"].dim() != 2 or out["A"].shape[1] != out["B"].shape[0]:
                raise ValueError(f"corrupted .lcz header: {where} has factors {out['A'].shape} and {out['B'].shape}")
            return out
    except (KeyError, TypeError, IndexError) as e:
        raise ValueError(f"corrupted .lcz header: {where} is missing or has a bad field ({e!r})") from None
    raise ValueError(f"corrupted .lcz header: {where} has unknown Θ kind {kind!r}")


def _delta(theta: Mapping[str, Any], view: Sequence[int]) -> Tensor:
    """Δ(Θ) in float32 with the task's view shape."""
    if "part0" in theta:
        out = None
        for i in range(len(theta)):
            d = _delta(theta[f"part{i}"], view)
            out = d if out is None else out + d
        return out
    n = math.prod(view)
    if "indices" in theta:  # (before "codebook": a sparse Θ with codebook values has both)
        if theta["n"] != n:
            raise ValueError(f"corrupted .lcz header: a sparse Θ of length {theta['n']} for a view of {n} weights")
        out = torch.zeros(n, dtype=torch.float32)
        out[theta["indices"]] = theta["values"].float()
        return out.reshape(tuple(view))
    if "codebook" in theta:
        codes = theta["codes"]
        if codes.numel() != n:
            raise ValueError(f"corrupted .lcz header: {codes.numel()} codes for a view of {n} weights")
        return theta["codebook"][codes.long()].reshape(tuple(view))
    if "dense" in theta:  # a rank selection that kept the matrix dense
        if tuple(theta["dense"].shape) != tuple(view):
            raise ValueError(f"corrupted .lcz header: a dense matrix {tuple(theta['dense'].shape)} for a view {tuple(view)}")
        return theta["dense"]  # at its own dtype: a float64 matrix stays exact
    a, b = theta["A"], theta["B"]
    if (a.shape[0], b.shape[1]) != tuple(view):
        raise ValueError(f"corrupted .lcz header: factors {tuple(a.shape)} @ {tuple(b.shape)} for a view {tuple(view)}")
    return (a @ b).reshape(tuple(view))


# ---- writing -----------------------------------------------------------------------------------------------------
def to_bytes(alg) -> tuple[bytes, dict[str, Any]]:
    """The ``.lcz`` bytes of an :class:`lcompress.LC` object's compressed model, and the header written.

    Raises:
        TypeError: ``alg`` is not an LC object, or a compression or a dtype the format cannot store.
    """
    if not (hasattr(alg, "tasks") and isinstance(getattr(alg, "model", None), nn.Module)):
        raise TypeError(f"alg must be an lcompress.LC object, got {type(alg).__name__}")
    model = alg.model
    wr = _Writer()
    task_of: dict[int, tuple[int, int]] = {}
    tasks = []
    for ti, t in enumerate(alg.tasks):
        for j, p in enumerate(t.params):
            task_of[id(p)] = (ti, j)
        before = wr.sizes["theta"]
        rec, bits = _encode(t.compression, wr, f"task {t.name!r}")
        counted = t.compression.count_bits()
        if bits != counted:
            logger.warning("task %r: %d bits written but count_bits() says %d", t.name, bits, counted)
        tasks.append({
            "name": t.name,
            "params": list(t.param_names),
            "view": list(t.view_shape()),
            "matrix": bool(t.matrix),
            "conv_scheme": t.conv_scheme,
            "compression": t.compression.config(),
            "bits": bits,
            "bytes": wr.sizes["theta"] - before,
            "theta": rec,
        })
    entries = []
    first_name: dict[int, str] = {}
    for name, v in model.state_dict(keep_vars=True).items():
        src: list[Any]
        if id(v) in task_of:
            src = ["task", *task_of[id(v)]]
        elif id(v) in first_name:
            src = ["alias", first_name[id(v)]]
        else:
            src = ["dense", *wr.add("dense", _tensor_bytes(v))]
        first_name.setdefault(id(v), name)
        entries.append([name, _dtype_name(v.dtype), list(v.shape), src])
    header = {"format": FORMAT, "version": VERSION, "entries": entries, "tasks": tasks,
              "blobs": {b: wr.sizes[b] for b in BLOBS}}
    header_json = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    blobs = {b: b"".join(wr.blobs[b]) for b in BLOBS}
    digest = hashlib.sha256(header_json)
    for b in BLOBS:
        digest.update(blobs[b])
    from safetensors.torch import save as st_save

    meta = {
        "format": FORMAT,
        "version": str(VERSION),
        "header_encoding": HEADER_ENCODING,
        "header": base64.b64encode(zlib.compress(header_json, 9)).decode("ascii"),
        "sha256": digest.hexdigest(),
    }
    tensors = {b: torch.frombuffer(bytearray(blobs[b]), dtype=torch.uint8) if blobs[b] else
               torch.zeros(0, dtype=torch.uint8) for b in BLOBS}
    return _canonical_header(st_save(tensors, metadata=meta)), header


def _canonical_header(data: bytes) -> bytes:
    """The same safetensors file with its JSON header's keys sorted, so that equal content gives equal bytes.

    safetensors writes ``__metadata__`` from a hash map, in an order that changes from call to call. The header
    is re-serialized compactly with sorted keys and padded with spaces to its original length (the format allows
    trailing spaces); the tensor data and its offsets are untouched.
    """
    n = int.from_bytes(data[:8], "little")
    table = json.loads(data[8 : 8 + n])
    canon = json.dumps(table, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()
    if len(canon) > n:  # cannot happen for a compact header; keep the file as written rather than shift the data
        return data
    return data[:8] + canon + b" " * (n - len(canon)) + data[8 + n :]


def save(alg, path) -> dict[str, Any]:
    """Write ``alg``'s compressed model to a ``.lcz`` file (atomically: a temporary file, then a rename).

    Args:
        alg: an :class:`lcompress.LC` object (its Θ, and every other parameter and buffer of its model).
        path: the file to write.

    Returns:
        ``{"path", "file_bytes", "payload_bytes", "compressed_bits", "reference_bits", "bound_bytes",
        "ratio"}``: ``bound_bytes`` = 1.02 · compressed_bits / 8 + 4096, the size the file is guaranteed to stay
        under (a warning is logged otherwise), and ``ratio`` = reference bytes / file bytes.

    Raises:
        TypeError: a compression or a dtype the format cannot store.
    """
    data, header = to_bytes(alg)
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent if str(path.parent) else ".")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    rep = alg.size_report()
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
        "ratio": rep["reference_bits"] / 8 / len(data),
    }


# ---- reading -----------------------------------------------------------------------------------------------------
def _read_bytes(path) -> tuple[bytes, str]:
    if isinstance(path, (bytes, bytearray, memoryview)):
        return bytes(path), "<bytes>"
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such .lcz file: {str(p)!r}")
    return p.read_bytes(), str(p)


def _parse(data: bytes, where: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """Check the safetensors frame (with clear messages for truncation), the format and the version."""
    if len(data) < 8:
        raise ValueError(f"{where}: not a .lcz file or truncated ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise ValueError(f"{where}: truncated .lcz file (its header needs {8 + n} bytes, the file has {len(data)})")
    try:
        table = json.loads(data[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError(f"{where}: not a .lcz file, or its header is corrupted") from None
    if not isinstance(table, dict):
        raise ValueError(f"{where}: not a .lcz file, or its header is corrupted")
    meta = table.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{where}: not a .lcz file (format={fmt!r}, expected {FORMAT!r})")
    try:
        version = int(meta.get("version", ""))
    except ValueError:
        raise ValueError(f"{where}: corrupted .lcz file (version={meta.get('version')!r})") from None
    if version > VERSION:
        raise ValueError(
            f"{where}: written in .lcz format version {version}, newer than this lcompress reads ({VERSION}); "
            "upgrade lcompress"
        )
    if version < 1:
        raise ValueError(f"{where}: corrupted .lcz file (version={version})")
    try:
        end = max((int(v["data_offsets"][1]) for k, v in table.items() if k != "__metadata__"), default=0)
    except (KeyError, TypeError, ValueError, IndexError):
        raise ValueError(f"{where}: corrupted .lcz file (bad tensor table)") from None
    if 8 + n + end > len(data):
        raise ValueError(f"{where}: truncated .lcz file ({len(data)} bytes, {8 + n + end} expected)")
    from safetensors.torch import load as st_load

    try:
        tensors = st_load(data)
    except Exception as e:  # safetensors raises its own error type
        raise ValueError(f"{where}: corrupted .lcz file ({e})") from None
    return meta, tensors


def read(path) -> dict[str, Any]:
    """Parse and verify a ``.lcz`` file (or its bytes) and decode every tensor.

    Returns:
        ``{"header": the JSON header, "metadata": the safetensors metadata, "state": {state-dict name: tensor}
        (Δ(Θ) for compressed parameters, at their dtype), "thetas": [Θ per task, in the compressions' layouts]}``.

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a ``.lcz`` file, truncated, corrupted (checksum mismatch), or a newer format version.
    """
    data, where = _read_bytes(path)
    meta, tensors = _parse(data, where)
    if meta.get("header_encoding") != HEADER_ENCODING:
        raise ValueError(f"{where}: unknown header encoding {meta.get('header_encoding')!r}")
    try:
        header_json = zlib.decompress(base64.b64decode(meta.get("header", ""), validate=True))
        header = json.loads(header_json)
    except (ValueError, zlib.error, json.JSONDecodeError):
        raise ValueError(f"{where}: corrupted .lcz header (it does not decode)") from None
    blobs = {b: tensors.get(b, torch.zeros(0, dtype=torch.uint8)) for b in BLOBS}
    digest = hashlib.sha256(header_json)
    for b in BLOBS:
        digest.update(blobs[b].numpy().tobytes())
    if digest.hexdigest() != meta.get("sha256"):
        raise ValueError(f"{where}: checksum mismatch, the .lcz file is corrupted (sha256 {digest.hexdigest()} "
                         f"!= {meta.get('sha256')!r} recorded)")
    if not isinstance(header, dict) or header.get("format") != FORMAT:
        raise ValueError(f"{where}: corrupted .lcz header")
    state, thetas = _decode_all(header, _Reader(blobs), where)
    return {"header": header, "metadata": meta, "state": state, "thetas": thetas}


def _decode_all(header: Mapping[str, Any], rd: _Reader, where: str) -> tuple[dict[str, Tensor], list[dict]]:
    try:
        entries, tasks = list(header["entries"]), list(header["tasks"])
    except (KeyError, TypeError):
        raise ValueError(f"{where}: corrupted .lcz header (no entries or tasks)") from None
    info = {}
    for e in entries:
        if not (isinstance(e, list) and len(e) == 4 and isinstance(e[0], str) and isinstance(e[2], list)):
            raise ValueError(f"{where}: corrupted .lcz header (bad entry {e!r})")
        info[e[0]] = (_dtype(e[1], f"entry {e[0]!r}"), e[2])
    thetas, task_values = [], []
    for ti, t in enumerate(tasks):
        try:
            tname, params, view, rec, cfg = t["name"], t["params"], t["view"], t["theta"], t["compression"]
            shapes = [info[p][1] for p in params]
        except (KeyError, TypeError):
            raise ValueError(f"{where}: corrupted .lcz header (task {ti})") from None
        theta = _decode(rec, rd, cfg, f"task {tname!r}")
        d = _delta(theta, view)
        if t.get("matrix"):
            outs = [from_matrix(d, tuple(shapes[0]), t.get("conv_scheme", "scheme_1"))]
        else:
            flat, outs, o = d.reshape(-1), [], 0
            for s in shapes:
                k = math.prod(s)
                outs.append(flat[o : o + k].reshape(tuple(s)))
                o += k
            if o != flat.numel():
                raise ValueError(f"{where}: corrupted .lcz header: task {tname!r} Θ does not fit its parameters")
        thetas.append(theta)
        task_values.append(outs)
    state: dict[str, Tensor] = {}
    for name, dname, shape, src in entries:
        dt = _dtype(dname, f"entry {name!r}")
        kind = src[0] if isinstance(src, list) and src else None
        if kind == "dense":
            state[name] = _bytes_tensor(rd.seg("dense", src[1:], f"entry {name!r}"), dt, shape, f"entry {name!r}")
        elif kind == "task":
            try:
                v = task_values[src[1]][src[2]]
            except (IndexError, TypeError):
                raise ValueError(f"{where}: corrupted .lcz header (entry {name!r} points to a missing task)") from None
            state[name] = v.to(dt).contiguous()
        elif kind == "alias" and src[1] in state:
            state[name] = state[src[1]]
        else:
            raise ValueError(f"{where}: corrupted .lcz header (entry {name!r} has source {src!r})")
        if list(state[name].shape) != list(shape):
            raise ValueError(f"{where}: corrupted .lcz header (entry {name!r} decodes to {tuple(state[name].shape)})")
    return state, thetas


# ---- loading into a model ------------------------------------------------------------------------------------------
def _check_skeleton(header: Mapping[str, Any], sd: Mapping[str, Tensor], strict: bool, where: str) -> list[str]:
    file_names = [e[0] for e in header["entries"]]
    missing = [n for n in file_names if n not in sd]
    unexpected = [n for n in sd if n not in set(file_names)]
    problems = []
    if strict and (missing or unexpected):
        if missing:
            problems.append(f"in the file but not in the model: {missing}")
        if unexpected:
            problems.append(f"in the model but not in the file: {unexpected}")
    for name, dname, shape, _ in header["entries"]:
        if name not in sd:
            continue
        v = sd[name]
        if list(v.shape) != list(shape) or _dtype_name(v.dtype) != dname:
            problems.append(
                f"{name!r} has shape {tuple(shape)} and dtype {dname} in the file but shape {tuple(v.shape)} "
                f"and dtype {_dtype_name(v.dtype)} in the model"
            )
    if problems:
        raise ValueError(f"{where}: the model does not match the file: " + "; ".join(problems))
    return [n for n in file_names if n in sd]


def load(path, model: nn.Module, compact: bool = False, strict: bool = True) -> nn.Module:
    """Load a ``.lcz`` file into a model skeleton: weights = Δ(Θ) decoded, the rest as stored.

    Everything is read, verified and decoded before the model is touched, so on any error the skeleton keeps
    its weights.

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
        ValueError: a corrupted or truncated file, a checksum mismatch, a newer format version, or a model whose
            parameter names, shapes or dtypes differ (what differs is named).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(compact, bool) or not isinstance(strict, bool):
        raise TypeError(f"compact={compact!r} and strict={strict!r} must be True or False")
    got = read(path)
    where = str(path) if not isinstance(path, (bytes, bytearray, memoryview)) else "<bytes>"
    inner = unwrap_model(model)
    sd = inner.state_dict(keep_vars=True)
    names = _check_skeleton(got["header"], sd, strict, where)
    state = got["state"]
    with torch.no_grad():
        for n in names:
            sd[n].copy_(state[n])
    if compact:
        from .nn import compact_model, task_specs

        specs: dict[str, dict[str, Any]] = {}
        for t, theta in zip(got["header"]["tasks"], got["thetas"]):
            if not all(p in sd for p in t["params"]):
                continue
            shapes = [tuple(sd[p].shape) for p in t["params"]]
            specs.update(task_specs(t["params"], shapes, theta, t.get("conv_scheme", "scheme_1")))
        compact_model(inner, specs)
    return model


def inspect(path) -> list[dict[str, Any]]:
    """Per-task summary of a ``.lcz`` file, for ``lcompress inspect``.

    Returns:
        one row per task — ``task``, ``compression`` (its type), ``config``, ``shapes``, ``weights``, ``bits``
        (Θ as counted by the size report), ``file_bytes`` (its payload bytes), ``ratio`` (dense bytes / file
        bytes) — then a row ``"(uncompressed)"`` for the other parameters and buffers and a row ``"(header)"``
        for the container's overhead (its ``file_bytes`` make the rows add up to the file size).

    Raises:
        FileNotFoundError, ValueError: as :func:`read`.
    """
    data, where = _read_bytes(path)
    got = read(data)
    header = got["header"]
    info = {e[0]: e for e in header["entries"]}
    rows = []
    for t in header["tasks"]:
        shapes = [tuple(info[p][2]) for p in t["params"]]
        ref = sum(math.prod(s) * dtype_bits(_DTYPES[info[p][1]]) for p, s in zip(t["params"], shapes))
        rows.append({
            "task": t["name"],
            "compression": t["compression"]["type"],
            "config": t["compression"],
            "shapes": shapes,
            "weights": sum(math.prod(s) for s in shapes),
            "bits": t["bits"],
            "file_bytes": t["bytes"],
            "ratio": ref / 8 / t["bytes"] if t["bytes"] else math.inf,
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
