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

Reading a file that may be hostile (a sha256 is no signature: anyone can edit a file and recompute it), in this
order, and nothing is allocated before the check that bounds it:

1. the safetensors frame: its JSON table (at most :data:`FRAME_MAX_TOKENS` JSON tokens, a few dozen in a real
   file) and the two blobs, which must tile the rest of the file exactly;
2. the header is inflated through a bounded ``zlib.decompressobj``: at most :data:`HEADER_MAX_FIXED` +
   :data:`HEADER_MAX_RATIO` × (file bytes) bytes of JSON (a real header is 0.03–0.3 × its file);
3. the checksum is verified before the JSON is parsed, and the JSON may hold at most :data:`TOKENS_MAX_FIXED` +
   :data:`TOKENS_MAX_RATIO` × (file bytes) tokens (``[ { , :``; parsing costs at most ~64 bytes a token);
4. every field of the header is checked (types, ranges, every segment's exact length against what its record
   says it holds and against its blob, every Θ against its task's view and the view against the parameters'
   shapes), so decoding allocates only what the entries' shapes say the tensors take;
5. :func:`load` checks the entries against the model's names, shapes and dtypes before decoding anything, so
   a file never makes it allocate much more than the model's own size; :func:`inspect` decodes nothing;
   :func:`read` decodes what the file claims and takes ``max_bytes`` to refuse a file that claims too much.

Every problem found in a file raises :class:`CorruptFileError` (a ``ValueError``), whose message names the file
and the field; a model that does not match a valid file raises its subclass :class:`ModelMismatchError`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import logging
import math
import os
import sys
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from ._io import atomic_write
from .compressions import REGISTRY, AdditiveCombination, Compression, from_config
from .compressions.lowrank import CONV_SCHEMES, _Factors, from_matrix, matrix_shape
from .compressions.pruning import _Sparse
from .compressions.quantization import _Codebook, _FixedCodebook
from .sizes import FLOAT_BITS, dense_bits, dtype_bits, index_bits, support_bits
from .tasks import unwrap_model

__all__ = [
    "FORMAT", "VERSION", "CorruptFileError", "ModelMismatchError", "save", "load", "read", "inspect", "to_bytes",
    "pack_bits", "unpack_bits",
]

logger = logging.getLogger(__name__)

FORMAT = "lcompress.lcz"
VERSION = 1
HEADER_ENCODING = "zlib+base64"
BLOBS = ("dense", "theta")
#: Allowed slack of the file over the size report: file ≤ (1 + SIZE_SLACK) · compressed_bits / 8 + SIZE_FIXED.
SIZE_SLACK = 0.02
SIZE_FIXED = 4096

#: Limits on what a file may make the reader parse (see the module docstring); a real file is far below them.
FRAME_MAX_TOKENS = 256
HEADER_MAX_FIXED = 1 << 20
HEADER_MAX_RATIO = 32
TOKENS_MAX_FIXED = 1 << 16
TOKENS_MAX_RATIO = 2
_MAX_SUM_DEPTH = 8  # additive combinations are flat (a + b + c has one level); nesting is refused beyond this
_MAX_INT = 1 << 53  # no count, size or offset in a header is larger

_CHUNK = 1 << 20  # values per chunk in the generic bit packer (a multiple of 8 keeps chunks byte-aligned)


class CorruptFileError(ValueError):
    """A file that is not a valid ``.lcz`` file: not one at all, truncated, a checksum mismatch, a newer format
    version, a header whose fields are missing, of the wrong type or inconsistent with each other or with the
    blobs, a payload that does not decode, or a file beyond the reader's limits. The message names the file and
    the field."""


class ModelMismatchError(CorruptFileError):
    """:func:`load`: the file's parameter names, shapes or dtypes are not the model's (what differs is named)."""

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
        raise CorruptFileError(f"corrupted .lcz header: {where} has unknown dtype {name!r}")
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
        raise CorruptFileError(f"corrupted .lcz payload: a delta-coded support decodes to {fpos.size} positions, not {nnz}")
    escapes = np.cumsum(~final)[fpos]
    gaps = np.diff(escapes, prepend=0).astype(np.int64) * m + sym[fpos].astype(np.int64)
    idx = np.cumsum(gaps + 1) - 1
    if idx.size and idx[-1] >= n:
        raise CorruptFileError(f"corrupted .lcz payload: a support position {int(idx[-1])} is beyond the length {n}")
    return idx


# ---- raw tensors -----------------------------------------------------------------------------------------------
def _tensor_bytes(t: Tensor) -> bytes:
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _bytes_tensor(buf: Tensor, dtype: torch.dtype, shape: Sequence[int], where: str) -> Tensor:
    numel = math.prod(shape)
    if buf.numel() != numel * (dtype_bits(dtype) // 8):
        raise CorruptFileError(f"corrupted .lcz file: {where} has {buf.numel()} bytes, not {numel} × {dtype}")
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
            raise CorruptFileError(f"corrupted .lcz header: {where} has a bad segment {rec!r}")
        off, length = rec
        b = self.blobs[blob]
        if off + length > b.numel():
            raise CorruptFileError(
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
        raise CorruptFileError(f"corrupted .lcz payload: {where} has a code beyond its {entries}-entry codebook")


def _decode(rec: Any, rd: _Reader, config: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Θ (in the compression's own layout) from a record."""
    if not isinstance(rec, dict):
        raise CorruptFileError(f"corrupted .lcz header: {where} has no Θ record")
    kind = rec.get("kind")
    try:
        if kind == "sum":
            parts = config["parts"]
            return {f"part{i}": _decode(r, rd, parts[i], f"{where} part {i}") for i, r in enumerate(rec["parts"])}
        if kind == "codebook":
            n, k, width = int(rec["n"]), int(rec["k"]), int(rec["width"])
            if width != index_bits(k):
                raise CorruptFileError(f"corrupted .lcz header: {where} codes of {width} bits for K={k}")
            codes_t = _read_codes(rd, rec, n, width, where)
            if rec["store"] == "all":
                cb = _bytes_tensor(rd.seg("theta", rec["codebook"], where), torch.float32, [int(rec["entries"])], where)
            elif rec["store"] == "scale":
                cb = _scaled_codebook(_bytes_tensor(rd.seg("theta", rec["scale"], where), torch.float32, [1], where), k)
            elif rec["store"] == "none":
                cb = _fixed_codebook(config)
            else:
                raise CorruptFileError(f"corrupted .lcz header: {where} has codebook store {rec['store']!r}")
            _check_codes(codes_t, cb.numel(), where)
            return {"codebook": cb, "codes": codes_t if k <= 256 else codes_t.long()}
        if kind == "sparse":
            n, nnz = int(rec["n"]), int(rec["nnz"])
            extra: dict[str, Tensor] = {}
            if "codebook" in rec:
                entries, cw = int(rec["entries"]), int(rec["code_width"])
                if entries < 1 or cw != index_bits(entries):
                    raise CorruptFileError(f"corrupted .lcz header: {where} codes of {cw} bits for {entries} entries")
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
                    raise CorruptFileError(f"corrupted .lcz payload: {where} bitmask has {idx.size} ones, not {nnz}")
            elif rec["support"] == "delta":
                width = int(rec["width"])
                sym = unpack_bits(rd.np("theta", rec["deltas"], where), int(rec["symbols"]), width)
                idx = _delta_decode(sym, width, nnz, n)
            else:
                raise CorruptFileError(f"corrupted .lcz header: {where} has support coding {rec['support']!r}")
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
        raise CorruptFileError(f"corrupted .lcz header: {where} is missing or has a bad field ({e!r})") from None
    raise CorruptFileError(f"corrupted .lcz header: {where} has unknown Θ kind {kind!r}")


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
            raise CorruptFileError(f"corrupted .lcz header: a sparse Θ of length {theta['n']} for a view of {n} weights")
        out = torch.zeros(n, dtype=torch.float32)
        out[theta["indices"]] = theta["values"].float()
        return out.reshape(tuple(view))
    if "codebook" in theta:
        codes = theta["codes"]
        if codes.numel() != n:
            raise CorruptFileError(f"corrupted .lcz header: {codes.numel()} codes for a view of {n} weights")
        # int32 indices: half the memory of int64 ones, for a tensor as long as the view
        return theta["codebook"].index_select(0, codes.reshape(-1).to(torch.int32)).reshape(tuple(view))
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
    """Write ``alg``'s compressed model to a ``.lcz`` file (atomically: a temporary file, then a rename; the file
    gets the permissions of any new file under the user's umask).

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
    atomic_write(path, lambda f: f.write(data))
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


# ---- reading: frame, header, checksum, validation ----------------------------------------------------------------
def _short(v: Any, limit: int = 60) -> str:
    """repr(v), cut to ``limit`` characters: a hostile header's values go into messages, one line each."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _read_bytes(path) -> tuple[bytearray, str]:
    """The file's bytes, in a writable buffer (the blobs become tensors on it without a copy), and its name."""
    if isinstance(path, (bytes, bytearray, memoryview)):
        return bytearray(path), "<bytes>"
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no such .lcz file: {str(p)!r}")
    with open(p, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        data = bytearray(size)
        got = f.readinto(data)
    if got != size:
        raise CorruptFileError(f"{p}: the file changed while it was read ({got} of {size} bytes)")
    return data, str(p)


def _tokens(b: bytes) -> int:
    """Structural JSON tokens: each is at most one container or value (≤ ~64 bytes of Python objects)."""
    return b.count(b"[") + b.count(b"{") + b.count(b",") + b.count(b":")


def _is_int(v: Any, lo: int = 0, hi: int = _MAX_INT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def _parse_frame(data: bytearray, where: str) -> tuple[dict[str, str], dict[str, Tensor]]:
    """The safetensors frame: the metadata (format and version checked) and the blobs, as uint8 tensors viewing
    ``data``. The blobs must tile the bytes after the frame's table exactly."""
    if len(data) < 8:
        raise CorruptFileError(f"{where}: not a .lcz file or truncated ({len(data)} bytes)")
    n = int.from_bytes(data[:8], "little")
    if 8 + n > len(data):
        raise CorruptFileError(f"{where}: truncated .lcz file (its header needs {8 + n} bytes, the file has {len(data)})")
    raw = bytes(data[8 : 8 + n])
    if _tokens(raw) > FRAME_MAX_TOKENS:
        raise CorruptFileError(f"{where}: not a .lcz file (its safetensors table has {_tokens(raw)} JSON tokens; "
                               f"a .lcz file has a few dozen)")
    try:
        table = json.loads(raw)
    except (ValueError, RecursionError):  # (UnicodeDecodeError and JSONDecodeError are ValueErrors)
        raise CorruptFileError(f"{where}: not a .lcz file, or its header is corrupted") from None
    if not isinstance(table, dict):
        raise CorruptFileError(f"{where}: not a .lcz file, or its header is corrupted")
    meta = table.get("__metadata__")
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        fmt = meta.get("format") if isinstance(meta, dict) else None
        raise CorruptFileError(f"{where}: not a .lcz file (format={_short(fmt)}, expected {FORMAT!r})")
    version = meta.get("version")
    if not (isinstance(version, str) and version.isascii() and version.isdigit() and len(version) <= 6):
        raise CorruptFileError(f"{where}: corrupted .lcz file (version={_short(version)})")
    if int(version) > VERSION:
        raise CorruptFileError(
            f"{where}: written in .lcz format version {int(version)}, newer than this lcompress reads ({VERSION}); "
            "upgrade lcompress"
        )
    if int(version) < 1:
        raise CorruptFileError(f"{where}: corrupted .lcz file (version={version})")
    bad = [k for k in table if k != "__metadata__" and k not in BLOBS]
    if bad:
        raise CorruptFileError(f"{where}: corrupted .lcz file (unexpected tensor {_short(bad[0])})")
    spans = []
    for b in BLOBS:
        if b not in table:
            continue
        v = table[b]
        off = v.get("data_offsets") if isinstance(v, dict) else None
        shape = v.get("shape") if isinstance(v, dict) else None
        if not (isinstance(v, dict) and v.get("dtype") == "U8" and isinstance(off, list) and len(off) == 2
                and all(_is_int(x) for x in off) and off[0] <= off[1] and shape == [off[1] - off[0]]):
            raise CorruptFileError(f"{where}: corrupted .lcz file (bad tensor table entry {b!r}: {_short(v)})")
        spans.append((off[0], off[1], b))
    spans.sort()
    end = 0
    for a, e, b in spans:
        if a != end:
            raise CorruptFileError(f"{where}: corrupted .lcz file (blob {b!r} starts at {a}, not {end})")
        end = e
    if 8 + n + end > len(data):
        raise CorruptFileError(f"{where}: truncated .lcz file ({len(data)} bytes, {8 + n + end} expected)")
    if 8 + n + end < len(data):
        raise CorruptFileError(f"{where}: corrupted .lcz file ({len(data) - 8 - n - end} bytes after its last blob)")
    blobs = {}
    for a, e, b in spans:
        blobs[b] = (torch.frombuffer(data, dtype=torch.uint8, count=e - a, offset=8 + n + a) if e > a
                    else torch.zeros(0, dtype=torch.uint8))
    for b in BLOBS:
        blobs.setdefault(b, torch.zeros(0, dtype=torch.uint8))
    return meta, blobs


def _inflate_header(meta: Mapping[str, Any], file_bytes: int, where: str) -> bytes:
    """The header JSON bytes, inflated through a bounded decompressor (a zlib bomb stops at the cap)."""
    if meta.get("header_encoding") != HEADER_ENCODING:
        raise CorruptFileError(f"{where}: unknown header encoding {_short(meta.get('header_encoding'))}")
    text = meta.get("header")
    if not isinstance(text, str):
        raise CorruptFileError(f"{where}: corrupted .lcz file (no header)")
    try:
        raw = base64.b64decode(text, validate=True)
    except ValueError:  # (binascii.Error, and non-ASCII text)
        raise CorruptFileError(f"{where}: corrupted .lcz header (it is not base64)") from None
    cap = HEADER_MAX_FIXED + HEADER_MAX_RATIO * file_bytes
    d = zlib.decompressobj()
    try:
        out = d.decompress(raw, cap + 1)
    except zlib.error:
        raise CorruptFileError(f"{where}: corrupted .lcz header (it does not decode)") from None
    if len(out) > cap:
        raise CorruptFileError(f"{where}: corrupted .lcz header (it inflates to more than {cap} bytes, the limit "
                               f"for a file of {file_bytes} bytes)")
    if not d.eof or d.unused_data:
        raise CorruptFileError(f"{where}: corrupted .lcz header (its zlib stream is truncated or has trailing data)")
    return out


def _open(data: bytearray, where: str) -> tuple[dict[str, Any], dict[str, str], dict[str, Tensor]]:
    """(header, metadata, blobs) of a file's bytes, every check of the module docstring done."""
    meta, blobs = _parse_frame(data, where)
    header_json = _inflate_header(meta, len(data), where)
    digest = hashlib.sha256(header_json)
    for b in BLOBS:
        digest.update(blobs[b].numpy())
    if digest.hexdigest() != meta.get("sha256"):
        raise CorruptFileError(f"{where}: checksum mismatch, the .lcz file is corrupted (sha256 {digest.hexdigest()} "
                               f"!= {_short(meta.get('sha256'), 70)} recorded)")
    limit = TOKENS_MAX_FIXED + TOKENS_MAX_RATIO * len(data)
    if _tokens(header_json) > limit:
        raise CorruptFileError(f"{where}: corrupted .lcz header ({_tokens(header_json)} JSON tokens, more than the "
                               f"{limit} allowed for a file of {len(data)} bytes)")
    try:
        header = json.loads(header_json)
    except (ValueError, RecursionError):
        raise CorruptFileError(f"{where}: corrupted .lcz header (it is not JSON, or nests too deep)") from None
    _Check(where, {b: blobs[b].numel() for b in BLOBS}).header(header)
    return header, meta, blobs


class _Check:
    """Structural check of a parsed header: every field's type and range, and every size against the others and
    against the blobs, so that decoding can trust them. Raises CorruptFileError naming the field."""

    def __init__(self, where: str, blob_sizes: Mapping[str, int]) -> None:
        self.where, self.sizes = where, blob_sizes

    def fail(self, field: str, value: Any, problem: str) -> CorruptFileError:
        return CorruptFileError(f"{self.where}: corrupted .lcz header: {field} = {_short(value)} {problem}")

    def get(self, d: Any, key: str, field: str) -> Any:
        if not isinstance(d, dict):
            raise self.fail(field, d, "is not a JSON object")
        if key not in d:
            raise CorruptFileError(f"{self.where}: corrupted .lcz header: {field}.{key} is missing")
        return d[key]

    def int_(self, v: Any, field: str, lo: int = 0, hi: int = _MAX_INT) -> int:
        if not _is_int(v, lo, hi):
            raise self.fail(field, v, f"is not an integer in [{lo}, {hi}]")
        return v

    def str_(self, v: Any, field: str) -> str:
        if not isinstance(v, str):
            raise self.fail(field, v, "is not a string")
        return v

    def list_(self, v: Any, field: str, length: int | None = None) -> list:
        if not isinstance(v, list) or (length is not None and len(v) != length):
            raise self.fail(field, v, "is not a list" + (f" of {length}" if length is not None else ""))
        return v

    def shape(self, v: Any, field: str) -> list[int]:
        self.list_(v, field)
        if len(v) > 64 or not all(_is_int(x) for x in v) or math.prod(v) > _MAX_INT:
            raise self.fail(field, v, "is not a shape (a list of non-negative integers)")
        return v

    def dtype(self, v: Any, field: str) -> torch.dtype:
        if not isinstance(v, str) or v not in _DTYPES:
            raise self.fail(field, v, "is not a dtype the format stores")
        return _DTYPES[v]

    def seg(self, v: Any, blob: str, length: int, field: str) -> None:
        """A segment [offset, length] of exactly ``length`` bytes inside ``blob``."""
        if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)):
            raise self.fail(field, v, "is not a segment [offset, length]")
        if v[1] != length:
            raise self.fail(field, v, f"has {v[1]} bytes where its record needs {length}")
        if v[0] + v[1] > self.sizes[blob]:
            raise self.fail(field, v, f"lies beyond the {blob!r} blob of {self.sizes[blob]} bytes")

    def header(self, h: Any) -> None:
        if not isinstance(h, dict) or h.get("format") != FORMAT:
            raise self.fail("header.format", h.get("format") if isinstance(h, dict) else h, f"is not {FORMAT!r}")
        blobs = self.get(h, "blobs", "header")
        if not isinstance(blobs, dict) or set(blobs) != set(BLOBS) or any(blobs[b] != self.sizes[b] for b in BLOBS):
            raise self.fail("header.blobs", blobs, f"does not give the blob sizes {dict(self.sizes)}")
        entries = self.list_(self.get(h, "entries", "header"), "header.entries")
        tasks = self.list_(self.get(h, "tasks", "header"), "header.tasks")
        info: dict[str, tuple[torch.dtype, list[int]]] = {}
        refs = []
        for i, e in enumerate(entries):
            f = f"entries[{i}]"
            self.list_(e, f, 4)
            name = self.str_(e[0], f"{f}.name")
            if name in info:
                raise self.fail(f"{f}.name", name, "repeats an earlier entry")
            f = f"{f} ({_short(name, 80)})"
            dt = self.dtype(e[1], f"{f}.dtype")
            shape = self.shape(e[2], f"{f}.shape")
            src, fs = e[3], f"{f}.source"
            kind = src[0] if isinstance(src, list) and src else None
            if kind == "dense":
                self.list_(src, fs, 3)
                self.seg(src[1:], "dense", math.prod(shape) * dt.itemsize, fs)
            elif kind == "task":
                self.list_(src, fs, 3)
                refs.append((name, shape, self.int_(src[1], f"{fs}[1]", hi=len(tasks) - 1), src[2], fs))
            elif kind == "alias":
                self.list_(src, fs, 2)
                if not (isinstance(src[1], str) and src[1] in info):
                    raise self.fail(fs, src, "is not an alias of an earlier entry")
                if info[src[1]] != (dt, shape):
                    raise self.fail(fs, src, f"aliases an entry of another dtype or shape than {e[1]} {shape}")
            else:
                raise self.fail(fs, src, "is not a dense, task or alias source")
            info[name] = (dt, shape)
        params_of = []
        for ti, t in enumerate(tasks):
            f = f"tasks[{ti}]"
            self.str_(self.get(t, "name", f), f"{f}.name")
            f = f"tasks[{ti}] ({_short(t['name'], 80)})"
            params = self.list_(self.get(t, "params", f), f"{f}.params")
            if not params or not all(isinstance(p, str) and p in info for p in params) or len(set(params)) != len(params):
                raise self.fail(f"{f}.params", params, "are not distinct names of entries")
            shapes = [info[p][1] for p in params]
            matrix, scheme = self.get(t, "matrix", f), self.get(t, "conv_scheme", f)
            if not isinstance(matrix, bool):
                raise self.fail(f"{f}.matrix", matrix, "is not true or false")
            if scheme not in CONV_SCHEMES:
                raise self.fail(f"{f}.conv_scheme", scheme, f"is not one of {CONV_SCHEMES}")
            view = self.shape(self.get(t, "view", f), f"{f}.view")
            if matrix:
                if len(params) != 1 or len(shapes[0]) < 2:
                    raise self.fail(f"{f}.params", params, "are not one matrix or conv weight (a matrix task)")
                want = list(matrix_shape(tuple(shapes[0]), scheme))
            else:
                want = [sum(math.prod(s) for s in shapes)]
            if view != want:
                raise self.fail(f"{f}.view", view, f"is not {want}, the view of parameters of shapes {shapes}")
            cfg = self.get(t, "compression", f)
            self.str_(self.get(cfg, "type", f"{f}.compression"), f"{f}.compression.type")
            self.int_(self.get(t, "bits", f), f"{f}.bits")
            self.int_(self.get(t, "bytes", f), f"{f}.bytes")
            self.theta(self.get(t, "theta", f), cfg, view, f"{f}.theta", 0)
            params_of.append(params)
        for name, shape, ti, j, fs in refs:
            self.int_(j, f"{fs}[2]", hi=len(params_of[ti]) - 1)
            if info[params_of[ti][j]][1] != shape:
                raise self.fail(fs, [ti, j], f"points to a parameter of shape {info[params_of[ti][j]][1]}, not {shape}")

    def theta(self, rec: Any, cfg: Any, view: list[int], f: str, depth: int) -> None:
        kind = self.get(rec, "kind", f)
        n = math.prod(view)
        if kind == "sum":
            if depth >= _MAX_SUM_DEPTH:
                raise self.fail(f"{f}.kind", kind, f"nests sums deeper than {_MAX_SUM_DEPTH} levels")
            parts = self.list_(self.get(rec, "parts", f), f"{f}.parts")
            cparts = self.get(cfg, "parts", f"{f} config") if isinstance(cfg, dict) else None
            if not (isinstance(cfg, dict) and cfg.get("type") == "AdditiveCombination" and isinstance(cparts, list)):
                raise self.fail(f"{f} config", cfg, "is not an AdditiveCombination config for a sum record")
            if len(parts) < 2 or len(parts) != len(cparts):
                raise self.fail(f"{f}.parts", f"{len(parts)} parts", f"for a config of {len(cparts)} parts")
            for i, (r, c) in enumerate(zip(parts, cparts)):
                self.theta(r, c, view, f"{f}.parts[{i}]", depth + 1)
        elif kind == "codebook":
            if self.int_(self.get(rec, "n", f), f"{f}.n") != n:
                raise self.fail(f"{f}.n", rec["n"], f"is not the {n} weights of the view")
            k = self.int_(self.get(rec, "k", f), f"{f}.k", lo=1, hi=1 << 32)
            width = self.get(rec, "width", f)
            if width != index_bits(k):
                raise self.fail(f"{f}.width", width, f"is not ⌈log₂ K⌉ = {index_bits(k)} for K={k}")
            if width:
                self.seg(self.get(rec, "codes", f), "theta", -(-n * width // 8), f"{f}.codes")
            store = self.get(rec, "store", f)
            if store == "all":
                entries = self.int_(self.get(rec, "entries", f), f"{f}.entries", lo=1)
                self.seg(self.get(rec, "codebook", f), "theta", 4 * entries, f"{f}.codebook")
            elif store == "scale":
                if k not in (2, 3):
                    raise self.fail(f"{f}.k", k, "is not 2 or 3 (a scaled codebook {-a, (0,) a})")
                self.seg(self.get(rec, "scale", f), "theta", 4, f"{f}.scale")
            elif store == "none":
                cls = REGISTRY.get(cfg.get("type")) if isinstance(cfg, dict) else None
                if not (isinstance(cls, type) and issubclass(cls, _FixedCodebook)):
                    raise self.fail(f"{f} config", cfg, "is not a fixed-codebook compression")
                try:
                    comp = from_config(cfg)
                except (ValueError, TypeError):
                    raise self.fail(f"{f} config", cfg, "does not build a compression") from None
                if comp.k != k:
                    raise self.fail(f"{f}.k", k, f"is not the {comp.k} entries of {cfg['type']}")
            else:
                raise self.fail(f"{f}.store", store, "is not 'all', 'scale' or 'none'")
        elif kind == "sparse":
            if self.int_(self.get(rec, "n", f), f"{f}.n") != n:
                raise self.fail(f"{f}.n", rec["n"], f"is not the {n} weights of the view")
            nnz = self.int_(self.get(rec, "nnz", f), f"{f}.nnz", hi=n)
            if "codebook" in rec:
                entries = self.int_(self.get(rec, "entries", f), f"{f}.entries", lo=1, hi=1 << 32)
                cw = self.get(rec, "code_width", f)
                if cw != index_bits(entries):
                    raise self.fail(f"{f}.code_width", cw, f"is not {index_bits(entries)} for {entries} entries")
                if entries > 256:  # (the decoder keeps these codes in uint8)
                    raise self.fail(f"{f}.entries", entries, "is more than 256")
                self.seg(rec["codebook"], "theta", 4 * entries, f"{f}.codebook")
                if cw:
                    self.seg(self.get(rec, "codes", f), "theta", -(-nnz * cw // 8), f"{f}.codes")
            else:
                dt = self.dtype(self.get(rec, "dtype", f), f"{f}.dtype")
                self.seg(self.get(rec, "values", f), "theta", nnz * dt.itemsize, f"{f}.values")
            support = self.get(rec, "support", f)
            if support == "bitmask":
                self.seg(self.get(rec, "mask", f), "theta", -(-n // 8), f"{f}.mask")
            elif support == "delta":
                width = self.int_(self.get(rec, "width", f), f"{f}.width", lo=1, hi=32)
                # every symbol moves the position on by at least one, and each nonzero ends one symbol
                symbols = self.int_(self.get(rec, "symbols", f), f"{f}.symbols", lo=nnz, hi=n)
                self.seg(self.get(rec, "deltas", f), "theta", -(-symbols * width // 8), f"{f}.deltas")
            else:
                raise self.fail(f"{f}.support", support, "is not 'bitmask' or 'delta'")
        elif kind == "factors":
            if len(view) != 2:
                raise self.fail(f"{f}.kind", kind, f"is a matrix record for a view {view} that is not a matrix")
            shapes = {}
            for key in ("dense",) if "dense" in rec else ("A", "B"):
                r, fk = self.get(rec, key, f), f"{f}.{key}"
                dt = self.dtype(self.get(r, "dtype", fk), f"{fk}.dtype")
                shapes[key] = s = self.shape(self.get(r, "shape", fk), f"{fk}.shape")
                if len(s) != 2:
                    raise self.fail(f"{fk}.shape", s, "is not a matrix shape")
                self.seg(self.get(r, "seg", fk), "theta", math.prod(s) * dt.itemsize, f"{fk}.seg")
            if "dense" in shapes:
                if shapes["dense"] != view:
                    raise self.fail(f"{f}.dense.shape", shapes["dense"], f"is not the view {view}")
            elif shapes["A"][1] != shapes["B"][0] or [shapes["A"][0], shapes["B"][1]] != view:
                raise self.fail(f"{f}.A/B.shape", [shapes["A"], shapes["B"]], f"do not multiply to the view {view}")
        else:
            raise self.fail(f"{f}.kind", kind, "is not a Θ kind (sum, codebook, sparse, factors)")


def _decoded_bytes(header: Mapping[str, Any], names: set[str] | None = None) -> int:
    """Bytes of the tensors a checked header's entries decode to (aliases share; ``names``: only those)."""
    return sum(math.prod(e[2]) * _DTYPES[e[1]].itemsize for e in header["entries"]
               if e[3][0] != "alias" and (names is None or e[0] in names))


# ---- reading: decoding ----------------------------------------------------------------------------------------
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
    data, where = _read_bytes(path)
    header, meta, blobs = _open(data, where)
    need = _decoded_bytes(header)
    if max_bytes is not None and need > max_bytes:
        raise CorruptFileError(f"{where}: the file's tensors take {need} bytes decoded, more than max_bytes={max_bytes}")
    state, thetas = _decode_all(header, _Reader(blobs), where)
    return {"header": header, "metadata": meta, "state": state, "thetas": [thetas[i] for i in sorted(thetas)]}


def _decode_all(
    header: Mapping[str, Any], rd: _Reader, where: str, names: set[str] | None = None
) -> tuple[dict[str, Tensor], dict[int, dict]]:
    """Decode a checked header's entries (``names``: only those, and what they alias): ({name: tensor},
    {task index: Θ}) for the tasks that were needed."""
    entries, tasks = header["entries"], header["tasks"]
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
            theta = _decode(t["theta"], rd, t["compression"], f"task {_short(tname, 80)}")
            d = _delta(theta, t["view"])
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
            dt = _DTYPES[dname]
            if src[0] == "dense":
                w = f"entry {_short(name, 80)}"
                state[name] = _bytes_tensor(rd.seg("dense", src[1:], w), dt, shape, w)
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
    data, where = _read_bytes(path)
    header, _, blobs = _open(data, where)
    inner = unwrap_model(model)
    sd = inner.state_dict(keep_vars=True)
    names = _check_skeleton(header, sd, strict, where)
    state, thetas = _decode_all(header, _Reader(blobs), where, set(names))
    plan = []
    if compact:
        from .nn import _plan_compact, task_specs

        specs: dict[str, dict[str, Any]] = {}
        try:
            for ti, theta in thetas.items():
                t = header["tasks"][ti]
                if not all(p in sd for p in t["params"]):
                    continue
                shapes = [tuple(sd[p].shape) for p in t["params"]]
                specs.update(task_specs(t["params"], shapes, theta, t["conv_scheme"]))
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
        (Θ as counted by the size report), ``file_bytes`` (its payload bytes), ``ratio`` (dense bytes / file
        bytes) — then a row ``"(uncompressed)"`` for the other parameters and buffers and a row ``"(header)"``
        for the container's overhead (its ``file_bytes`` make the rows add up to the file size).

    Raises:
        FileNotFoundError, CorruptFileError: as :func:`read`.
    """
    data, where = _read_bytes(path)
    header, _, _ = _open(data, where)
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
