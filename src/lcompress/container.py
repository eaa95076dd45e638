"""The ``.lcz`` container: frame, header, checksum, limits and the header's structural check.

What a task's Θ looks like inside is its codec's business (:mod:`lcompress.codecs`); this module frames the
records and the bytes, and :mod:`lcompress.export` builds files from an LC object and loads them into models.

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
matrix view, compression config, bits and bytes, and ``theta``, the record its codec wrote: ``{"kind": codec
name, ...}``, whose pieces are byte-aligned segments ``[offset, length]`` of the ``theta`` blob. The built-in
kinds are ``codebook`` (codes bit-packed at ⌈log₂ K⌉ bits and the stored part of the codebook), ``sparse``
(values or value-codebook codes, and an n-bit mask or delta-coded support), ``factors`` (A and B, or a rank
selection's dense matrix) and ``sum`` (the parts' records); see each codec's module.

Version 2 adds the lossless stage: a symbol stream (codes, a mask, delta symbols) whose segment is shorter than its
packed bits is entropy-coded, self-describing from its first byte (ANS over its symbol counts, or zstd; see
:mod:`lcompress._entropy`). The header is unchanged; the segment's length against the packed bits' is the flag.

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
5. :func:`lcompress.export.load` checks the entries against the model's names, shapes and dtypes before decoding anything, so
   a file never makes it allocate much more than the model's own size; :func:`lcompress.export.inspect` decodes nothing;
   :func:`lcompress.export.read` decodes what the file claims and takes ``max_bytes`` to refuse a file that claims too much.

Every problem found in a file raises :class:`CorruptFileError` (a ``ValueError``), whose message names the file
and the field; a model that does not match a valid file raises its subclass :class:`lcompress.export.ModelMismatchError`.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import zlib
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor

from .codecs.base import DTYPES, MAX_INT, Checker, CorruptFileError, _is_int, _short
from .views import CONV_SCHEMES, matrix_shape

__all__ = ["FORMAT", "VERSION", "BLOBS", "CorruptFileError", "write", "open_bytes", "read_bytes", "check_header",
           "decoded_bytes"]

FORMAT = "lcompress.lcz"
#: The newest version this reads. Version 2 files may hold entropy-coded symbol streams (:mod:`lcompress._entropy`);
#: a file with none is written as version 1, byte for byte what earlier lcompress wrote and reads.
VERSION = 2
HEADER_ENCODING = "zlib+base64"
BLOBS = ("dense", "theta")

#: Limits on what a file may make the reader parse (see the module docstring); a real file is far below them.
FRAME_MAX_TOKENS = 256
HEADER_MAX_FIXED = 1 << 20
HEADER_MAX_RATIO = 32
TOKENS_MAX_FIXED = 1 << 16
TOKENS_MAX_RATIO = 2
_MAX_INT = MAX_INT


# ---- writing -------------------------------------------------------------------------------------------------------
def write(header: Mapping[str, Any], blobs: Mapping[str, bytes], version: int = VERSION) -> bytes:
    """The ``.lcz`` bytes of a header and its blobs: the header JSON zlib-compressed in the safetensors metadata,
    the sha256 over the header JSON and the blobs, and the frame's keys sorted (equal content, equal bytes).
    ``version`` is the format version written (1: no stream is entropy-coded)."""
    if version not in (1, VERSION):
        raise ValueError(f"version={version!r} must be 1 or {VERSION}")
    header_json = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    digest = hashlib.sha256(header_json)
    for b in BLOBS:
        digest.update(blobs[b])
    from safetensors.torch import save as st_save

    meta = {
        "format": FORMAT,
        "version": str(version),
        "header_encoding": HEADER_ENCODING,
        "header": base64.b64encode(zlib.compress(header_json, 9)).decode("ascii"),
        "sha256": digest.hexdigest(),
    }
    tensors = {b: torch.frombuffer(bytearray(blobs[b]), dtype=torch.uint8) if blobs[b] else
               torch.zeros(0, dtype=torch.uint8) for b in BLOBS}
    return _canonical_header(st_save(tensors, metadata=meta))


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



# ---- reading: frame, header, checksum, validation ----------------------------------------------------------------
def read_bytes(path) -> tuple[bytearray, str]:
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


def open_bytes(data: bytearray, where: str) -> tuple[dict[str, Any], dict[str, str], dict[str, Tensor]]:
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
    check_header(Checker(where, {b: blobs[b].numel() for b in BLOBS}, coded=int(meta["version"]) >= 2), header)
    return header, meta, blobs


def check_header(chk: Checker, h: Any) -> None:
    """Check every field of a parsed header (entries, tasks, each task's Θ by its codec); see the module docstring."""
    if not isinstance(h, dict) or h.get("format") != FORMAT:
        raise chk.fail("header.format", h.get("format") if isinstance(h, dict) else h, f"is not {FORMAT!r}")
    blobs = chk.get(h, "blobs", "header")
    if not isinstance(blobs, dict) or set(blobs) != set(BLOBS) or any(blobs[b] != chk.sizes[b] for b in BLOBS):
        raise chk.fail("header.blobs", blobs, f"does not give the blob sizes {dict(chk.sizes)}")
    entries = chk.list_(chk.get(h, "entries", "header"), "header.entries")
    tasks = chk.list_(chk.get(h, "tasks", "header"), "header.tasks")
    info: dict[str, tuple[torch.dtype, list[int]]] = {}
    refs = []
    for i, e in enumerate(entries):
        f = f"entries[{i}]"
        chk.list_(e, f, 4)
        name = chk.str_(e[0], f"{f}.name")
        if name in info:
            raise chk.fail(f"{f}.name", name, "repeats an earlier entry")
        f = f"{f} ({_short(name, 80)})"
        dt = chk.dtype(e[1], f"{f}.dtype")
        shape = chk.shape(e[2], f"{f}.shape")
        src, fs = e[3], f"{f}.source"
        kind = src[0] if isinstance(src, list) and src else None
        if kind == "dense":
            chk.list_(src, fs, 3)
            chk.seg(src[1:], "dense", math.prod(shape) * dt.itemsize, fs)
        elif kind == "task":
            chk.list_(src, fs, 3)
            refs.append((name, shape, chk.int_(src[1], f"{fs}[1]", hi=len(tasks) - 1), src[2], fs))
        elif kind == "alias":
            chk.list_(src, fs, 2)
            if not (isinstance(src[1], str) and src[1] in info):
                raise chk.fail(fs, src, "is not an alias of an earlier entry")
            if info[src[1]] != (dt, shape):
                raise chk.fail(fs, src, f"aliases an entry of another dtype or shape than {e[1]} {shape}")
        else:
            raise chk.fail(fs, src, "is not a dense, task or alias source")
        info[name] = (dt, shape)
    params_of = []
    for ti, t in enumerate(tasks):
        f = f"tasks[{ti}]"
        chk.str_(chk.get(t, "name", f), f"{f}.name")
        f = f"tasks[{ti}] ({_short(t['name'], 80)})"
        params = chk.list_(chk.get(t, "params", f), f"{f}.params")
        if not params or not all(isinstance(p, str) and p in info for p in params) or len(set(params)) != len(params):
            raise chk.fail(f"{f}.params", params, "are not distinct names of entries")
        shapes = [info[p][1] for p in params]
        matrix, scheme = chk.get(t, "matrix", f), chk.get(t, "conv_scheme", f)
        if not isinstance(matrix, bool):
            raise chk.fail(f"{f}.matrix", matrix, "is not true or false")
        if scheme not in CONV_SCHEMES:
            raise chk.fail(f"{f}.conv_scheme", scheme, f"is not one of {CONV_SCHEMES}")
        view = chk.shape(chk.get(t, "view", f), f"{f}.view")
        if matrix:
            if len(params) != 1 or len(shapes[0]) < 2:
                raise chk.fail(f"{f}.params", params, "are not one matrix or conv weight (a matrix task)")
            want = list(matrix_shape(tuple(shapes[0]), scheme))
        else:
            want = [sum(math.prod(s) for s in shapes)]
        if view != want:
            raise chk.fail(f"{f}.view", view, f"is not {want}, the view of parameters of shapes {shapes}")
        cfg = chk.get(t, "compression", f)
        chk.str_(chk.get(cfg, "type", f"{f}.compression"), f"{f}.compression.type")
        chk.int_(chk.get(t, "bits", f), f"{f}.bits")
        chk.int_(chk.get(t, "bytes", f), f"{f}.bytes")
        chk.theta(chk.get(t, "theta", f), cfg, view, f"{f}.theta", 0)
        params_of.append(params)
    for name, shape, ti, j, fs in refs:
        chk.int_(j, f"{fs}[2]", hi=len(params_of[ti]) - 1)
        if info[params_of[ti][j]][1] != shape:
            raise chk.fail(fs, [ti, j], f"points to a parameter of shape {info[params_of[ti][j]][1]}, not {shape}")



def decoded_bytes(header: Mapping[str, Any], names: set[str] | None = None) -> int:
    """Bytes of the tensors a checked header's entries decode to (aliases share; ``names``: only those)."""
    return sum(math.prod(e[2]) * DTYPES[e[1]].itemsize for e in header["entries"]
               if e[3][0] != "alias" and (names is None or e[0] in names))


