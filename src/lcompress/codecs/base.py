"""The codec protocol: how one stored form of Θ is counted, written, checked, read and turned into a compact layer.

A codec is registered under its ``name``, which is the ``"kind"`` of the records it writes into a ``.lcz`` header;
defining a subclass with a ``name`` registers it (one registry, :data:`CODECS`). A compression declares the codec
that stores its Θ as its class attribute ``codec`` (an instance, which may carry encoding options, e.g. which part
of a codebook is stored); reading dispatches on the record's kind, so a record describes itself.

One protocol, every method on one codec:

* ``encode(comp, writer) -> record``: write ``comp.theta``'s pieces through the :class:`Writer` and return the JSON
  record that says where they are;
* ``bits(comp)``: the same ``encode`` into a dry :class:`Writer`, which counts instead of writing, so the size
  report and the file cannot disagree;
* ``check(record, config, view, checker, field, depth)``: validate a record of a file that may be hostile, before
  anything is decoded: every field's type and range, and every piece's length (:class:`Checker`);
* ``decode(record, reader, config) -> Θ`` in the compression's own layout, and ``delta(Θ, view, record)`` = Δ(Θ);
* ``compact_specs(Θ, record, names, shapes, conv_scheme)``: per-parameter specs of the compact modules of
  :mod:`lcompress.nn` (empty: the layer stays dense with Δ(Θ) as its weight);
* ``stored_values(comp)``: the number of values Θ stores (``count_params``).

Every stream of integer symbols (codes, a support's bitmask or gaps) goes through :meth:`Writer.write_symbols` /
:meth:`Reader.read_symbols` / :meth:`Checker.symbols`, and every raw tensor through ``write_tensor`` /
``read_tensor`` / :meth:`Checker.tensor`. The lossless stage lives in those three places (:mod:`lcompress._entropy`):
a writer with ``lossless=True`` (the default) stores each symbol stream entropy-coded where that is shorter than its
packed bits, and counts the coded bytes, so every codec's counted bits are its coded ones.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from .. import _entropy
from ..sizes import dense_bits, index_bits
from .bits import pack_bits

__all__ = ["Codec", "CODECS", "CorruptFileError", "Writer", "Reader", "Checker", "codec_for", "check_theta",
           "decode_theta", "DTYPES", "dtype_name", "MAX_INT", "MAX_SUM_DEPTH"]

MAX_SUM_DEPTH = 8  # additive combinations are flat (a + b + c has one level); nesting is refused beyond this
MAX_INT = 1 << 53  # no count, size or offset in a header is larger


class CorruptFileError(ValueError):
    """A file that is not a valid ``.lcz`` file: not one at all, truncated, a checksum mismatch, a newer format
    version, a header whose fields are missing, of the wrong type or inconsistent with each other or with the
    blobs, a payload that does not decode, or a file beyond the reader's limits. The message names the file and
    the field."""


DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (
        torch.float64, torch.float32, torch.float16, torch.bfloat16, torch.complex64, torch.complex128,
        torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool,
    )
}
for _name in ("float8_e4m3fn", "float8_e5m2", "uint16", "uint32", "uint64"):
    if isinstance(getattr(torch, _name, None), torch.dtype):
        DTYPES[_name] = getattr(torch, _name)


def dtype_name(d: torch.dtype) -> str:
    """The name a ``.lcz`` header gives a dtype. Raises TypeError for a dtype the format cannot store."""
    name = str(d).removeprefix("torch.")
    if name not in DTYPES:
        raise TypeError(f"dtype {d} cannot be stored in a .lcz file")
    return name


def _short(v: Any, limit: int = 60) -> str:
    """repr(v), cut to ``limit`` characters: a hostile header's values go into messages, one line each."""
    r = repr(v)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _is_int(v: Any, lo: int = 0, hi: int = MAX_INT) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v <= hi


def tensor_bytes(t: Tensor) -> bytes:
    """The raw little-endian bytes of a tensor."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


# ---- writing -------------------------------------------------------------------------------------------------------
class Writer:
    """Collects the byte-aligned pieces of Θ that codecs write, and counts their bits.

    Each ``write_*`` returns the record fragment that locates the piece (today a segment ``[offset, length]`` in the
    ``theta`` blob) and adds the piece's exact bits to :attr:`bits` (before byte padding; an entropy-coded stream
    counts its bytes). A dry writer (``dry=True``, what :meth:`Codec.bits` uses) counts the same bits and writes
    nothing.

    Args:
        dry: count, do not write.
        lossless: entropy-code symbol streams where that is shorter (:mod:`lcompress._entropy`); ``False``
            writes every stream bit-packed, as ``.lcz`` version 1 did.
    """

    def __init__(self, dry: bool = False, lossless: bool = True) -> None:
        if not isinstance(lossless, bool):
            raise TypeError(f"lossless={lossless!r} must be True or False")
        self.dry, self.lossless = dry, lossless
        self.bits = 0
        self.size = 0  # bytes written (or that would be)
        self.coded = 0  # symbol streams stored entropy-coded (a file with any is .lcz version 2)
        self._pieces: list[bytes] = []

    def write_symbols(self, name: str, symbols: Tensor | np.ndarray, alphabet_size: int) -> Any:
        """A stream of integer symbols in [0, alphabet_size): bit-packed at ⌈log₂ alphabet_size⌉ bits each, or,
        with ``lossless``, entropy-coded when that is shorter (the segment is then shorter than the packed bits:
        its length is the flag, see :mod:`lcompress._entropy`).

        Args:
            name: what the stream is (``"codes"``, ``"mask"``, ``"deltas"``), for a coder that treats them apart.
            symbols: the integers (any shape; flattened).
            alphabet_size: the number of possible symbols (≥ 2 for a stream worth writing).
        """
        width = index_bits(alphabet_size)
        n = symbols.numel() if isinstance(symbols, Tensor) else int(np.asarray(symbols).size)
        raw = -(-n * width // 8)
        if self.lossless and raw:
            data = _entropy.encode(symbols, alphabet_size)
            if len(data) < raw:
                self.coded += 1
                self.bits += 8 * len(data)
                return self._count(len(data)) if self.dry else self._add(data)
        self.bits += n * width
        if self.dry:
            return self._count(raw)
        return self._add(pack_bits(symbols, width))

    def stream_bytes(self, symbols: Tensor | np.ndarray, alphabet_size: int) -> int:
        """Bytes :meth:`write_symbols` would take for this stream (a codec choosing between forms asks this)."""
        n = symbols.numel() if isinstance(symbols, Tensor) else int(np.asarray(symbols).size)
        raw = -(-n * index_bits(alphabet_size) // 8)
        return min(raw, len(_entropy.encode(symbols, alphabet_size))) if self.lossless and raw else raw

    def write_tensor(self, name: str, t: Tensor) -> Any:
        """A tensor's raw little-endian bytes at its own dtype (``name`` says what it is, as above)."""
        dtype_name(t.dtype)
        self.bits += dense_bits(t)
        if self.dry:
            return self._count(t.numel() * t.element_size())
        return self._add(tensor_bytes(t))

    def _count(self, length: int) -> list[int]:
        off = self.size
        self.size += length
        return [off, length]

    def _add(self, data: bytes) -> list[int]:
        self._pieces.append(data)
        return self._count(len(data))

    def payload(self) -> bytes:
        """Everything written, in order (the ``theta`` blob)."""
        return b"".join(self._pieces)


# ---- reading -------------------------------------------------------------------------------------------------------
class Reader:
    """Reads the pieces a checked record locates (see :class:`Checker`, which has already checked their lengths)."""

    def __init__(self, blob: Tensor, name: str = "theta") -> None:
        self.blob, self.name = blob, name

    def segment(self, seg: Any, field: str) -> Tensor:
        """The bytes of a segment ``[offset, length]`` (a view of the blob)."""
        if not (isinstance(seg, list) and len(seg) == 2 and all(_is_int(x) for x in seg)):
            raise CorruptFileError(f"corrupted .lcz header: {field} has a bad segment {_short(seg)}")
        off, length = seg
        if off + length > self.blob.numel():
            raise CorruptFileError(f"corrupted .lcz file: {field} lies at bytes [{off}, {off + length}) of the "
                                   f"{self.name!r} blob of {self.blob.numel()} bytes")
        return self.blob[off : off + length]

    def read_symbols(self, frag: Any, n: int, alphabet_size: int, field: str) -> np.ndarray:
        """Inverse of :meth:`Writer.write_symbols`: ``n`` symbols (uint8 up to 8 bits a symbol, else int64), from
        the packed bits or an entropy-coded stream (see :mod:`lcompress._entropy`).

        Raises:
            CorruptFileError: naming ``field``: a stream that does not decode to n symbols of the alphabet.
        """
        try:
            return _entropy.decode(self.segment(frag, field).numpy(), n, alphabet_size)
        except CorruptFileError as e:
            raise CorruptFileError(f"{field}: {e}") from None

    def read_tensor(self, seg: Any, dtype: torch.dtype, shape: Sequence[int], field: str) -> Tensor:
        """Inverse of :meth:`Writer.write_tensor`: a new tensor of ``dtype`` and ``shape``."""
        buf = self.segment(seg, field)
        numel = math.prod(shape)
        if buf.numel() != numel * dtype.itemsize:
            raise CorruptFileError(f"corrupted .lcz file: {field} has {buf.numel()} bytes, not {numel} × {dtype}")
        return buf.clone().view(dtype).reshape(tuple(shape))


# ---- checking a header that may be hostile -------------------------------------------------------------------------
class Checker:
    """Structural checks of a parsed header: each raises :class:`CorruptFileError` naming the file and the field.

    Args:
        where: the file, for messages.
        blob_sizes: ``{blob name: bytes}``; codecs' pieces lie in ``"theta"``.
        coded: symbol streams may be entropy-coded (``.lcz`` version 2): a stream's segment may be shorter than
            its packed bits.
    """

    def __init__(self, where: str, blob_sizes: Mapping[str, int], coded: bool = False) -> None:
        self.where, self.sizes, self.coded = where, blob_sizes, coded

    def fail(self, field: str, value: Any, problem: str) -> CorruptFileError:
        return CorruptFileError(f"{self.where}: corrupted .lcz header: {field} = {_short(value)} {problem}")

    def get(self, d: Any, key: str, field: str) -> Any:
        if not isinstance(d, dict):
            raise self.fail(field, d, "is not a JSON object")
        if key not in d:
            raise CorruptFileError(f"{self.where}: corrupted .lcz header: {field}.{key} is missing")
        return d[key]

    def int_(self, v: Any, field: str, lo: int = 0, hi: int = MAX_INT) -> int:
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
        if len(v) > 64 or not all(_is_int(x) for x in v) or math.prod(v) > MAX_INT:
            raise self.fail(field, v, "is not a shape (a list of non-negative integers)")
        return v

    def dtype(self, v: Any, field: str) -> torch.dtype:
        if not isinstance(v, str) or v not in DTYPES:
            raise self.fail(field, v, "is not a dtype the format stores")
        return DTYPES[v]

    def seg(self, v: Any, blob: str, length: int, field: str) -> None:
        """A segment [offset, length] of exactly ``length`` bytes inside ``blob``."""
        if not (isinstance(v, list) and len(v) == 2 and all(_is_int(x) for x in v)):
            raise self.fail(field, v, "is not a segment [offset, length]")
        if v[1] != length:
            raise self.fail(field, v, f"has {v[1]} bytes where its record needs {length}")
        if v[0] + v[1] > self.sizes[blob]:
            raise self.fail(field, v, f"lies beyond the {blob!r} blob of {self.sizes[blob]} bytes")

    def symbols(self, frag: Any, n: int, alphabet_size: int, field: str) -> None:
        """What :meth:`Writer.write_symbols` wrote for ``n`` symbols of an alphabet of ``alphabet_size``: their
        packed bits, or (a coded file) an entropy-coded stream of at least one byte and fewer than those."""
        raw = -(-n * index_bits(alphabet_size) // 8)
        if self.coded and isinstance(frag, list) and len(frag) == 2 and _is_int(frag[1]) and 0 < frag[1] < raw:
            raw = frag[1]  # what the stream holds is checked as it is decoded (lcompress._entropy.decode)
        self.seg(frag, "theta", raw, field)

    def tensor(self, seg: Any, dtype: torch.dtype, numel: int, field: str) -> None:
        """What :meth:`Writer.write_tensor` wrote for ``numel`` values of ``dtype``."""
        self.seg(seg, "theta", numel * dtype.itemsize, field)

    def theta(self, rec: Any, cfg: Any, view: list[int], field: str, depth: int = 0) -> None:
        """A Θ record: its kind names a registered codec, which checks the rest."""
        kind = self.get(rec, "kind", field)
        codec = CODECS.get(kind) if isinstance(kind, str) else None
        if codec is None:
            raise self.fail(f"{field}.kind", kind, f"is not a Θ kind ({', '.join(sorted(CODECS))})")
        codec.check(rec, cfg, view, self, field, depth)


# ---- the protocol --------------------------------------------------------------------------------------------------
#: kind → the codec instance that reads records of that kind (one registry; a subclass with a ``name`` registers)
CODECS: dict[str, "Codec"] = {}


class Codec:
    """One stored form of Θ (see the module docstring for the protocol).

    A subclass sets ``name`` (the record kind) and is registered when it is defined; its constructor must accept no
    arguments (the instance that reads files is ``cls()``); encoding options go into other constructor arguments
    with defaults.
    """

    name: ClassVar[str]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        name = cls.__dict__.get("name")
        if name is None:
            return
        if not isinstance(name, str) or not name:
            raise TypeError(f"{cls.__qualname__}.name={name!r} must be a non-empty string (the record kind)")
        old = CODECS.get(name)
        if old is not None and (type(old).__module__, type(old).__qualname__) != (cls.__module__, cls.__qualname__):
            raise TypeError(f"codec name {name!r} of {cls.__module__}.{cls.__qualname__} is already registered by "
                            f"{type(old).__module__}.{type(old).__qualname__}")
        CODECS[name] = cls()

    # -- writing --
    def encode(self, comp: Any, writer: Writer) -> dict[str, Any]:
        raise NotImplementedError

    def bits(self, comp: Any, lossless: bool = True) -> int:
        """Bits of ``comp``'s Θ in a file: ``encode`` into a dry writer (the path that writes, counting), with the
        lossless stage or (``lossless=False``) without."""
        w = Writer(dry=True, lossless=lossless)
        self.encode(comp, w)
        return w.bits

    def stored_values(self, comp: Any) -> int:
        raise NotImplementedError

    # -- reading --
    def check(self, rec: dict, cfg: Any, view: list[int], chk: Checker, field: str, depth: int) -> None:
        raise NotImplementedError

    def decode(self, rec: dict, rd: Reader, cfg: Mapping[str, Any], field: str) -> dict[str, Any]:
        raise NotImplementedError

    def delta(self, theta: Mapping[str, Any], view: Sequence[int], rec: Mapping[str, Any]) -> Tensor:
        raise NotImplementedError

    def compact_specs(self, theta: Mapping[str, Any], rec: Mapping[str, Any] | None, names: Sequence[str],
                      shapes: Sequence[Sequence[int]], conv_scheme: str) -> dict[str, dict[str, Any]]:
        """Per-parameter compact-module specs (see :func:`lcompress.nn.compact_model`); none by default."""
        return {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def codec_for(comp: Any) -> Codec:
    """The codec a compression declares (its ``codec`` attribute), checked to be a registered kind.

    Raises:
        TypeError: the compression declares none, or a codec whose kind is not registered.
    """
    codec = getattr(comp, "codec", None)
    if not isinstance(codec, Codec):
        raise TypeError(f"{type(comp).__name__} declares no codec, so its Θ cannot be stored: set its class attribute "
                        "`codec` to an lcompress.codecs.Codec instance")
    reg = type(CODECS.get(getattr(codec, "name", None)))
    if (reg.__module__, reg.__qualname__) != (type(codec).__module__, type(codec).__qualname__):  # (or reloaded)
        raise TypeError(f"{type(comp).__name__}'s codec {codec!r} is not a registered codec (give its class a `name`)")
    return codec


def check_theta(chk: Checker, rec: Any, cfg: Any, view: list[int], field: str, depth: int = 0) -> None:
    """Check a Θ record (of any registered kind); see :meth:`Checker.theta`."""
    chk.theta(rec, cfg, view, field, depth)


def decode_theta(rec: Any, rd: Reader, cfg: Mapping[str, Any], field: str) -> dict[str, Any]:
    """Θ from a checked record, by its kind's codec."""
    if not isinstance(rec, dict) or rec.get("kind") not in CODECS:
        raise CorruptFileError(f"corrupted .lcz header: {field} has no Θ record of a known kind")
    try:
        return CODECS[rec["kind"]].decode(rec, rd, cfg, field)
    except (KeyError, TypeError, IndexError) as e:
        raise CorruptFileError(f"corrupted .lcz header: {field} is missing or has a bad field ({e!r})") from None


def delta_of(rec: Mapping[str, Any], theta: Mapping[str, Any], view: Sequence[int]) -> Tensor:
    """Δ(Θ) in the view's shape, by the record's codec."""
    return CODECS[rec["kind"]].delta(theta, view, rec)
