"""English text for calibration and evaluation, built offline from two Debian packages.

* ``r-cran-janeaustenr``: Jane Austen's six novels, one R character vector each (a line of the printed book per
  element, ``""`` between paragraphs), in R's lazy-load format (``data/Rdata.rdx`` + ``Rdata.rdb``). R is not
  needed: :func:`read_lazyload_db` reads the format (R's XDR serialization, versions 2 and 3) itself.
* ``debian-handbook``: The Debian Administrator's Handbook as HTML; :func:`html_paragraphs` keeps its prose.

Fetch them without installing (``apt-get download debian-handbook r-cran-janeaustenr`` and ``dpkg-deb -x DEB DIR``;
``scripts/build_texts.py --download`` does both), then :func:`build_texts` writes ``calib.txt`` and ``eval.txt``
from disjoint sources: the evaluation text is one held-out novel, and the calibration text is the other novels
and/or the handbook.

The R reader treats its files as untrusted: every length is checked against the bytes left before anything is
allocated, decompression stops at the length the header declares (itself bounded by the compressor's largest
ratio and by ``max_bytes``), nesting is bounded, and anything malformed or unsupported raises :class:`ValueError`
naming the file and what is wrong. Nothing here evaluates R code.

Only the standard library and numpy; no transformers.
"""
from __future__ import annotations

import bz2
import gzip
import hashlib
import html.parser
import io
import json
import logging
import lzma
import re
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

__all__ = [
    "AUSTEN_NOVELS",
    "RObject",
    "RSymbol",
    "RReference",
    "unserialize",
    "read_rds",
    "read_lazyload_db",
    "austen_paragraphs",
    "austen_novels",
    "join_paragraphs",
    "html_paragraphs",
    "handbook_paragraphs",
    "find_austen_dir",
    "find_handbook_dir",
    "build_texts",
]

logger = logging.getLogger(__name__)

#: The novels' object names in janeaustenr, and their titles.
AUSTEN_NOVELS = {
    "sensesensibility": "Sense & Sensibility",
    "prideprejudice": "Pride & Prejudice",
    "mansfieldpark": "Mansfield Park",
    "emma": "Emma",
    "northangerabbey": "Northanger Abbey",
    "persuasion": "Persuasion",
}

MAX_BYTES = 1 << 30  # default bound on one decompressed object (the janeaustenr database is 4.6 MB)
MAX_DEPTH = 200  # nesting of lists/attributes; pairlists are read iteratively along their CDRs
MAX_ALTREP_LENGTH = 1 << 24  # a compact sequence's length is not backed by bytes, so it gets a bound of its own
NA_INTEGER = -(2**31)
# deflate's largest expansion is about 1032:1 (bzip2 and xz can do more; their decompression stops at the declared
# length instead)
_ZLIB_MAX_RATIO = 1032

# ---------------------------------------------------------------------------------------------------- R values


@dataclass(frozen=True)
class RSymbol:
    """An R symbol (a name), e.g. a pairlist tag or ``quote(x)``."""

    name: str


@dataclass(frozen=True)
class RReference:
    """A value the stream refers to but does not hold: a special environment (``"R_GlobalEnv"``, ...), a package or
    namespace (``kind="namespace"``, ``names=("janeaustenr", "1.0.0")``) or a lazy-load reference (``"persist"``,
    e.g. ``("env::1",)``), a builtin function (``"builtin"``), or an unbound/missing marker."""

    kind: str
    names: tuple[str, ...] = ()


@dataclass(eq=False)
class RObject:
    """An R value other than NULL (``None``) and symbols (:class:`RSymbol`).

    ``type`` is R's ``typeof``; ``data`` by type:

    * ``"character"``: ``list[str | None]`` (None is ``NA``)
    * ``"integer"``, ``"logical"``: ``np.ndarray`` of int32, ``NA`` as -2³¹ (:data:`NA_INTEGER`)
    * ``"double"``: float64 array (R's ``NA_real_`` is a NaN); ``"complex"``: complex128; ``"raw"``: ``bytes``
    * ``"list"``, ``"expression"``: ``list`` of values
    * ``"pairlist"``, ``"language"`` (a call), ``"..."``: ``list[tuple[str | None, value]]``, (tag, value) in order
    * ``"closure"``: ``{"formals", "body", "environment"}``; ``"promise"``: ``{"value", "expression", "environment"}``
    * ``"environment"``: ``dict`` of its frame's bindings (and ``"externalptr"``/``"weakref"``/``"S4"``: ``None``)

    ``attributes`` maps names to values, e.g. ``names``, ``class``, ``row.names`` (a data frame is a ``"list"``
    with class ``data.frame``).
    """

    type: str
    data: Any
    attributes: dict[str, Any] = field(default_factory=dict)

    @property
    def names(self) -> list[str | None] | None:
        n = self.attributes.get("names")
        return n.data if isinstance(n, RObject) and n.type == "character" else None

    @property
    def classes(self) -> list[str]:
        c = self.attributes.get("class")
        return [x for x in c.data if x is not None] if isinstance(c, RObject) and c.type == "character" else []

    def __len__(self) -> int:
        return 0 if self.data is None else len(self.data)

    def __getitem__(self, key: str) -> Any:
        """A named element of a list or data frame (a column), or a binding of an environment."""
        if self.type == "environment":
            return self.data[key]
        names = self.names
        if self.type not in ("list", "expression") or names is None or key not in names:
            raise KeyError(key)
        return self.data[names.index(key)]

    def __repr__(self) -> str:
        n = len(self)
        cls = f" class={self.classes}" if self.classes else ""
        return f"RObject({self.type}, length {n}{cls})"


_VECTOR_TYPES = {10: "logical", 13: "integer", 14: "double", 15: "complex", 16: "character", 19: "list",
                 20: "expression", 24: "raw"}
_PAIRLIST_TYPES = {2: "pairlist", 6: "language", 17: "..."}
_SPECIAL_REFS = {254: None, 253: "R_GlobalEnv", 252: "R_UnboundValue", 251: "R_MissingArg",
                 250: "R_BaseNamespace", 242: "R_EmptyEnv", 241: "R_BaseEnv"}
_TYPE_NAMES = {0: "NULL", 1: "symbol", 3: "closure", 4: "environment", 5: "promise", 7: "special", 8: "builtin",
               9: "CHARSXP", 21: "bytecode", 22: "externalptr", 23: "weakref", 25: "S4", 238: "ALTREP",
               239: "ATTRLISTSXP",
               240: "ATTRLANGSXP", 244: "BCREPDEF", 245: "GENERICREFSXP", 246: "CLASSREFSXP", 247: "PERSISTSXP",
               248: "PACKAGESXP", 249: "NAMESPACESXP", 255: "REFSXP", **_VECTOR_TYPES, **_PAIRLIST_TYPES}
_CHARSXP = 9
_ALTREP_SEQ = {"compact_intseq": np.int32, "compact_realseq": np.float64}


class _Reader:
    """R's ``unserialize`` for the XDR format, versions 2 and 3 (serialize.c's ``ReadItem``), over bytes in memory."""

    def __init__(self, data: bytes, source: str):
        self.buf = memoryview(data)
        self.pos = 0
        self.source = source
        self.refs: list[Any] = []
        self.depth = 0
        self.native_encoding = "utf-8"

    def fail(self, what: str) -> ValueError:
        return ValueError(f"{self.source}: {what} (at byte {self.pos} of {len(self.buf)})")

    def left(self) -> int:
        return len(self.buf) - self.pos

    def take(self, n: int, what: str) -> memoryview:
        if n < 0 or n > self.left():
            raise self.fail(f"truncated: {what} needs {n} bytes, {self.left()} left")
        out = self.buf[self.pos : self.pos + n]
        self.pos += n
        return out

    def int(self, what: str = "an integer") -> int:
        return struct.unpack(">i", self.take(4, what))[0]

    def length(self, type_name: str, min_item_bytes: int) -> int:
        n = self.int(f"the length of a {type_name} vector")
        if n == -1:  # a long vector: the length follows as two 32-bit halves
            hi, lo = struct.unpack(">II", self.take(8, f"the long length of a {type_name} vector"))
            n = (hi << 32) | lo
        if n < 0:
            raise self.fail(f"negative length {n} of a {type_name} vector")
        if n * min_item_bytes > self.left():
            raise self.fail(f"a {type_name} vector of length {n} needs at least {n * min_item_bytes} bytes, "
                            f"{self.left()} left")
        return n

    # ---- the stream
    def header(self) -> None:
        fmt = bytes(self.take(2, "the format mark"))
        if fmt != b"X\n":
            kinds = {b"A\n": "ASCII", b"B\n": "native binary", b"RD": "an .RData/save() file"}
            kind = kinds.get(fmt, f"not R serialization (starts with {fmt!r})")
            raise self.fail(f"only R's XDR serialization format is read; this is {kind}")
        version = self.int("the format version")
        self.int("the writer's R version")
        self.int("the minimal reader's R version")
        if version == 3:
            n = self.int("the length of the native encoding")
            if not 0 <= n <= 63:  # R_CODESET_MAX
                raise self.fail(f"native encoding name of length {n} (at most 63)")
            name = bytes(self.take(n, "the native encoding")).decode("ascii", "replace")
            self.native_encoding = _python_encoding(name)
        elif version != 2:
            raise self.fail(f"serialization format version {version} (versions 2 and 3 are read)")

    def item(self) -> Any:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"objects nested deeper than {MAX_DEPTH} levels")
        try:
            return self._item()
        finally:
            self.depth -= 1

    def _item(self) -> Any:
        flags = self.int("an item's flags")
        t = flags & 0xFF
        has_attr = bool(flags & (1 << 9))
        if t in _SPECIAL_REFS:
            name = _SPECIAL_REFS[t]
            return None if name is None else RReference("environment" if "Env" in name or "Namespace" in name
                                                        else "marker", (name,))
        if t == 255:  # REFSXP: an index into the table of symbols and environments read so far
            i = flags >> 8 or self.int("a reference index")
            if not 1 <= i <= len(self.refs):
                raise self.fail(f"reference {i} to one of {len(self.refs)} objects read so far")
            return self.refs[i - 1]
        if t in (247, 248, 249):  # PERSISTSXP, PACKAGESXP, NAMESPACESXP: named by a string vector
            if self.int("a persistent name's leading 0") != 0:
                raise self.fail("a persistent name vector does not start with 0")
            n = self.length("persistent name", 8)
            names = tuple("" if s is None else s for s in (self.charsxp_item() for _ in range(n)))
            ref = RReference({247: "persist", 248: "package", 249: "namespace"}[t], names)
            self.refs.append(ref)
            return ref
        if t == 1:  # SYMSXP
            name = self.charsxp_item()
            sym = RSymbol("NA" if name is None else name)
            self.refs.append(sym)
            return sym
        if t in (3, 5):  # CLOSXP (environment, formals, body), PROMSXP (environment, value, expression)
            attrs = self.attributes_of(self.item()) if has_attr else {}
            env = self.item() if flags & (1 << 10) else None
            car, cdr = self.item(), self.item()
            if t == 3:
                return RObject("closure", {"formals": car, "body": cdr, "environment": env}, attrs)
            return RObject("promise", {"value": car, "expression": cdr, "environment": env}, attrs)
        if t in _PAIRLIST_TYPES:
            return self.pairlist(flags)
        if t == 4:  # ENVSXP
            self.int("an environment's lock flag")
            env = RObject("environment", {})
            self.refs.append(env)
            self.item()  # the enclosing environment
            frame, hashtab = self.item(), self.item()
            for binding in (frame, *(hashtab.data if isinstance(hashtab, RObject) and hashtab.type == "list"
                                     else ())):
                if isinstance(binding, RObject) and binding.type == "pairlist":
                    env.data.update((k, v) for k, v in binding.data if k is not None)
            attrs = self.item()
            env.attributes = self.attributes_of(attrs)
            return env
        if t == 238:  # ALTREP_SXP: a class, its state, attributes
            return self.altrep()
        if t == _CHARSXP:  # a bare CHARSXP where an object is expected (R never writes this)
            raise self.fail("a CHARSXP where an R object was expected")
        if t in (7, 8):  # SPECIALSXP, BUILTINSXP: a primitive's name
            n = self.length("builtin name", 1)
            return RReference("builtin", (bytes(self.take(n, "a builtin's name")).decode("ascii", "replace"),))
        if t in _VECTOR_TYPES:
            obj = self.vector(t, _VECTOR_TYPES[t])
        elif t == 22:  # EXTPTRSXP: registered before its protected value and tag are read
            obj = RObject("externalptr", None)
            self.refs.append(obj)
            self.item()
            self.item()
        elif t == 23:  # WEAKREFSXP
            obj = RObject("weakref", None)
            self.refs.append(obj)
        elif t == 25:  # S4SXP / OBJSXP: only attributes
            obj = RObject("S4", None)
        else:
            raise self.fail(f"unsupported R object type {t} ({_TYPE_NAMES.get(t, 'unknown')})")
        if has_attr:
            obj.attributes = self.attributes_of(self.item())
        return obj

    def attributes_of(self, attrs: Any) -> dict[str, Any]:
        if attrs is None:
            return {}
        if not isinstance(attrs, RObject) or attrs.type != "pairlist":
            raise self.fail(f"attributes are a {getattr(attrs, 'type', type(attrs).__name__)}, not a pairlist")
        return {("" if k is None else k): v for k, v in attrs.data}

    def pairlist(self, flags: int) -> RObject:
        """A chain of cons cells: read along the CDRs in a loop, so a long pairlist costs no recursion."""
        first_type = _PAIRLIST_TYPES[flags & 0xFF]
        cells: list[tuple[str | None, Any]] = []
        head_attrs: dict[str, Any] = {}
        while True:
            has_attr, has_tag = bool(flags & (1 << 9)), bool(flags & (1 << 10))
            attrs = self.attributes_of(self.item()) if has_attr else {}
            if not cells:
                head_attrs = attrs
            tag = self.item() if has_tag else None
            if tag is not None and not isinstance(tag, RSymbol):
                if isinstance(tag, RObject) and tag.type == "character" and len(tag.data) == 1:
                    tag = RSymbol(tag.data[0] or "")
                else:
                    raise self.fail(f"a pairlist tag is a {getattr(tag, 'type', type(tag).__name__)}, not a symbol")
            cells.append((tag.name if tag is not None else None, self.item()))
            # the CDR: NULL ends the list, another cons cell continues it
            flags = self.int("a pairlist's tail")
            t = flags & 0xFF
            if t == 254:
                break
            if t not in _PAIRLIST_TYPES:
                self.pos -= 4
                tail = self.item()
                if tail is not None:
                    raise self.fail(f"a pairlist ends in a {_TYPE_NAMES.get(t, t)} instead of NULL")
                break
        return RObject(first_type, cells, head_attrs)

    def charsxp_item(self) -> str | None:
        """One element of a character vector: flags (a CHARSXP), length (-1 for NA), bytes."""
        flags = self.int("a string's flags")
        if flags & 0xFF != _CHARSXP:
            raise self.fail(f"a character element of type {flags & 0xFF} ({_TYPE_NAMES.get(flags & 0xFF, 'unknown')}),"
                            " not CHARSXP (9)")
        n = self.int("a string's length")
        if n == -1:
            s = None
        else:
            if n < -1:
                raise self.fail(f"string length {n}")
            raw = bytes(self.take(n, "a string"))
            levels = flags >> 12
            if levels & (1 << 2):  # LATIN1
                enc = "latin-1"
            elif levels & ((1 << 3) | (1 << 6)):  # UTF8, ASCII
                enc = "utf-8"
            elif levels & (1 << 1):  # BYTES: no encoding; keep every byte
                enc = "latin-1"
            else:
                enc = self.native_encoding
            try:
                s = raw.decode(enc)
            except UnicodeDecodeError as e:
                raise self.fail(f"a string that is not valid {enc}: {e.reason}") from None
        if flags & (1 << 9):  # an attribute on a CHARSXP (old writers): read and dropped, as R does
            self.item()
        return s

    def vector(self, t: int, type_name: str) -> RObject:
        if t == 16:
            n = self.length(type_name, 8)
            return RObject(type_name, [self.charsxp_item() for _ in range(n)])
        if t in (19, 20):
            n = self.length(type_name, 4)
            return RObject(type_name, [self.item() for _ in range(n)])
        if t == 24:
            n = self.length(type_name, 1)
            return RObject(type_name, bytes(self.take(n, "raw bytes")))
        size, dtype = {10: (4, ">i4"), 13: (4, ">i4"), 14: (8, ">f8"), 15: (16, ">c16")}[t]
        n = self.length(type_name, size)
        arr = np.frombuffer(self.take(n * size, f"{type_name} values"), dtype=dtype)
        return RObject(type_name, arr.astype(dtype[1:], copy=True))

    def altrep(self) -> RObject:
        info, state, attrs = self.item(), self.item(), self.item()
        cls = info.data[0][1] if isinstance(info, RObject) and info.type == "pairlist" and info.data else None
        cls_name = cls.name if isinstance(cls, RSymbol) else None
        if cls_name in _ALTREP_SEQ:
            if not (isinstance(state, RObject) and state.type == "double" and len(state.data) == 3):
                raise self.fail(f"ALTREP {cls_name} state is not 3 doubles")
            n, start, step = (float(x) for x in state.data)
            if not (n == int(n) and 0 <= n <= MAX_ALTREP_LENGTH and np.isfinite(start) and np.isfinite(step)):
                raise self.fail(f"ALTREP {cls_name} of length {n} (at most {MAX_ALTREP_LENGTH}), "
                                f"start {start}, step {step}")
            dtype = _ALTREP_SEQ[cls_name]
            values = start + step * np.arange(int(n), dtype=np.float64)
            if dtype is np.int32 and not (np.all(np.abs(values) < 2**31) and start == int(start)):
                raise self.fail(f"ALTREP {cls_name} leaves the integer range")
            obj = RObject("integer" if dtype is np.int32 else "double", values.astype(dtype))
        elif cls_name and cls_name.startswith("wrap_"):
            # wrapper objects: state is list(x, meta); the value is x
            if not (isinstance(state, RObject) and state.type == "list" and state.data
                    and isinstance(state.data[0], RObject)):
                raise self.fail(f"ALTREP {cls_name} state is not list(x, meta)")
            inner = state.data[0]
            obj = RObject(inner.type, inner.data, dict(inner.attributes))
        elif cls_name == "deferred_string":
            # state is a pairlist whose first value is the integer or double vector to show as strings
            arg = state.data[0][1] if isinstance(state, RObject) and state.type == "pairlist" and state.data else None
            if not (isinstance(arg, RObject) and arg.type in ("integer", "double")):
                raise self.fail("ALTREP deferred_string without an integer or double vector")
            if arg.type == "integer":
                strs = [None if v == NA_INTEGER else str(int(v)) for v in arg.data]
            else:
                strs = [None if np.isnan(v) else _r_double_str(float(v)) for v in arg.data]
            obj = RObject("character", strs)
        else:
            raise self.fail(f"unsupported ALTREP class {cls_name!r}")
        obj.attributes.update(self.attributes_of(attrs))
        return obj


def _r_double_str(v: float) -> str:
    """``as.character`` of a double: up to 15 significant digits."""
    if np.isinf(v):
        return "Inf" if v > 0 else "-Inf"
    s = f"{v:.15g}"
    return s.replace("e+0", "e+").replace("e-0", "e-") if "e" in s else s


def _python_encoding(name: str) -> str:
    n = name.strip().lower().replace("_", "-")
    if n in ("utf-8", "utf8", ""):
        return "utf-8"
    if n in ("latin1", "latin-1", "iso-8859-1", "iso8859-1", "cp1252"):
        return "latin-1" if n != "cp1252" else "cp1252"
    try:
        import codecs

        return codecs.lookup(n).name
    except LookupError:
        return "utf-8"


def unserialize(data: bytes, *, source: str = "<bytes>") -> Any:
    """Read one R object from R's XDR serialization (``serialize(x, NULL)``, format versions 2 and 3).

    Args:
        data: the uncompressed stream, starting with ``b"X\\n"``.
        source: what to name in error messages (a file, a key).

    Returns:
        ``None`` for NULL, :class:`RSymbol`, :class:`RReference`, or :class:`RObject`.

    Raises:
        ValueError: naming ``source``, on a truncated or malformed stream, trailing bytes, or an unsupported type
            (bytecode, ALTREP classes other than compact sequences, wrappers and deferred strings).
    """
    r = _Reader(bytes(data), source)
    r.header()
    obj = r.item()
    if r.left():
        raise r.fail(f"{r.left()} bytes after the object")
    return obj


def _read_limited(stream: Any, limit: int, source: str, what: str) -> bytes:
    try:
        out = stream.read(limit + 1)
    except (OSError, EOFError, zlib.error, lzma.LZMAError) as e:
        raise ValueError(f"{source}: {what} is corrupt or truncated ({e})") from None
    if len(out) > limit:
        raise ValueError(f"{source}: {what} decompresses to more than {limit} bytes (the bound is max_bytes or, "
                         "for gzip, what deflate can expand the file to)")
    return out


def _decompress_file_bytes(raw: bytes, source: str, max_bytes: int) -> bytes:
    """What R's ``gzfile()`` does on reading: gzip, bzip2, xz, or plain bytes."""
    if raw[:2] == b"\x1f\x8b":
        limit = min(max_bytes, _ZLIB_MAX_RATIO * len(raw) + 64)  # deflate expands at most ~1032:1
        return _read_limited(gzip.GzipFile(fileobj=io.BytesIO(raw)), limit, source, "the gzip stream")
    if raw[:3] == b"BZh":
        return _read_limited(bz2.BZ2File(io.BytesIO(raw)), max_bytes, source, "the bzip2 stream")
    if raw[:6] == b"\xfd7zXZ\x00":
        return _read_limited(lzma.LZMAFile(io.BytesIO(raw)), max_bytes, source, "the xz stream")
    return raw


def _read_file(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{what} not found: {path}") from None
    except OSError as e:
        raise ValueError(f"{path}: cannot read {what} ({e.strerror or e})") from None


def read_rds(path: str | Path, *, max_bytes: int = MAX_BYTES) -> Any:
    """Read an ``.rds`` file (``saveRDS``): one serialized object, gzip/bzip2/xz-compressed or not.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path``, if the file is not a readable XDR stream (see :func:`unserialize`).
    """
    path = Path(path)
    data = _decompress_file_bytes(_read_file(path, "R data file"), str(path), max_bytes)
    return unserialize(data, source=str(path))


def _decompress_value(blob: bytes, compressed: int, source: str, max_bytes: int) -> bytes:
    """R's ``R_decompress1/2/3``: a 4-byte big-endian uncompressed length, (for 2 and 3) a type byte, the stream."""
    if not compressed:
        return blob
    if len(blob) < 4:
        raise ValueError(f"{source}: truncated: {len(blob)} bytes, less than the 4-byte length header")
    outlen = struct.unpack(">I", blob[:4])[0]
    body, kind = blob[4:], "Z"
    if compressed in (2, 3):
        if len(blob) < 5:
            raise ValueError(f"{source}: truncated: no compression type byte")
        kind, body = chr(blob[4]), blob[5:]
    if outlen > max_bytes:
        raise ValueError(f"{source}: declares {outlen} uncompressed bytes, more than max_bytes={max_bytes}")
    if kind == "0":
        data = body
    elif kind == "Z":
        if outlen > _ZLIB_MAX_RATIO * len(body) + 64:
            raise ValueError(f"{source}: declares {outlen} uncompressed bytes from {len(body)} zlib bytes, "
                             f"more than zlib can expand to")
        d = zlib.decompressobj()
        try:
            data = d.decompress(body, outlen)
        except zlib.error as e:
            raise ValueError(f"{source}: corrupt zlib stream ({e})") from None
        if not d.eof:
            raise ValueError(f"{source}: the zlib stream is truncated or longer than its declared {outlen} bytes")
    elif kind in ("2", "X"):
        d = bz2.BZ2Decompressor() if kind == "2" else lzma.LZMADecompressor(lzma.FORMAT_XZ)
        try:
            data = d.decompress(body, max_length=outlen)
        except (OSError, EOFError, lzma.LZMAError) as e:
            raise ValueError(f"{source}: corrupt {'bzip2' if kind == '2' else 'xz'} stream ({e})") from None
        if not d.eof:
            raise ValueError(f"{source}: the compressed stream is truncated or longer than its declared {outlen} bytes")
    else:
        raise ValueError(f"{source}: unknown compression type byte {kind!r} (expected Z, 2, X or 0)")
    if len(data) != outlen:
        raise ValueError(f"{source}: decompressed to {len(data)} bytes, the header declares {outlen}")
    return data


def _lazyload_paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    base = p.with_suffix("") if p.suffix in (".rdx", ".rdb") else p
    return base.with_name(base.name + ".rdx"), base.with_name(base.name + ".rdb")


def read_lazyload_db(path: str | Path, names: Iterable[str] | None = None, *,
                     max_bytes: int = MAX_BYTES) -> dict[str, Any]:
    """Read objects from an R lazy-load database: ``BASE.rdx`` (the index) and ``BASE.rdb`` (the values).

    The index is an ``.rds`` holding ``list(variables = list(NAME = c(offset, length), ...), references = ...,
    compressed = TRUE | 2 | 3)``; each value is ``length`` bytes at ``offset`` in the ``.rdb``, a compressed
    serialized object (:func:`unserialize`). Environments the values share are left as
    ``RReference("persist", ("env::N",))``.

    Args:
        path: ``BASE``, ``BASE.rdx`` or ``BASE.rdb`` (e.g. ``.../janeaustenr/data/Rdata``).
        names: the variables to read (default: all).
        max_bytes: the largest decompressed size accepted for one object.

    Returns:
        ``{name: value}`` in the index's order.

    Raises:
        FileNotFoundError: the ``.rdx`` or ``.rdb`` does not exist.
        ValueError: naming the file (and variable), for a malformed index, an offset or length outside the
            ``.rdb``, a corrupt value, or a name in ``names`` that the index does not hold.
    """
    rdx, rdb = _lazyload_paths(path)
    index = read_rds(rdx, max_bytes=max_bytes)
    variables = index["variables"] if isinstance(index, RObject) and index.type == "list" and index.names \
        and "variables" in index.names else None
    if not isinstance(variables, RObject) or variables.type != "list" or variables.names is None:
        raise ValueError(f"{rdx}: not a lazy-load index (no named list 'variables')")
    comp = index["compressed"] if "compressed" in index.names else None
    if not isinstance(comp, RObject) or comp.type not in ("logical", "integer", "double") or len(comp.data) != 1:
        raise ValueError(f"{rdx}: the index's 'compressed' is not a single number")
    compressed = int(comp.data[0])
    if compressed not in (0, 1, 2, 3):
        raise ValueError(f"{rdx}: compressed={compressed} (expected FALSE, TRUE, 2 or 3)")
    keys = {}
    for name, key in zip(variables.names, variables.data):
        if not (isinstance(key, RObject) and key.type in ("integer", "double") and len(key.data) == 2):
            raise ValueError(f"{rdx}: the key of {name!r} is not c(offset, length)")
        off, n = (float(v) for v in key.data)
        if not (off == int(off) and n == int(n) and off >= 0 and n >= 0):
            raise ValueError(f"{rdx}: the key of {name!r} is c({off}, {n}), not two non-negative integers")
        keys[name] = (int(off), int(n))
    wanted = list(keys) if names is None else list(names)
    missing = [n for n in wanted if n not in keys]
    if missing:
        raise ValueError(f"{rdx}: no variable {missing[0]!r} (it holds {sorted(k for k in keys if k)})")
    try:
        f = open(rdb, "rb")
    except FileNotFoundError:
        raise FileNotFoundError(f"R lazy-load data file not found: {rdb}") from None
    except OSError as e:
        raise ValueError(f"{rdb}: cannot read ({e.strerror or e})") from None
    out = {}
    with f:
        size = f.seek(0, io.SEEK_END)
        for name in wanted:
            off, n = keys[name]
            source = f"{rdb} (variable {name!r})"
            if off + n > size:
                raise ValueError(f"{source}: bytes {off}..{off + n} lie outside the file's {size} bytes "
                                 f"(truncated?)")
            f.seek(off)
            blob = f.read(n)
            out[name] = unserialize(_decompress_value(blob, compressed, source, max_bytes), source=source)
    logger.debug("read %d objects from %s", len(out), rdb)
    return out


# ------------------------------------------------------------------------------------------------------ Austen


def find_austen_dir(root: str | Path) -> Path:
    """The janeaustenr package directory (the one holding ``data/Rdata.rdx``) at or under ``root`` (e.g. the
    directory ``dpkg-deb -x`` extracted ``r-cran-janeaustenr`` into).

    Raises:
        FileNotFoundError: naming ``root``, when none is found.
    """
    root = Path(root)
    if (root / "data" / "Rdata.rdx").is_file():
        return root
    if root.is_dir():
        for cand in sorted(root.glob("**/janeaustenr/data/Rdata.rdx")):
            return cand.parent.parent
    raise FileNotFoundError(f"austen_dir={str(root)!r}: no janeaustenr/data/Rdata.rdx under it "
                            f"(extract r-cran-janeaustenr there: apt-get download r-cran-janeaustenr && "
                            f"dpkg-deb -x r-cran-janeaustenr_*.deb DIR)")


def austen_paragraphs(lines: Sequence[str | None]) -> list[str]:
    """Paragraphs of a janeaustenr novel: its lines (one per printed line, ``""`` between paragraphs) joined with
    spaces within a paragraph. Chapter headings ("CHAPTER I") stay as paragraphs of their own."""
    paras, cur = [], []
    for line in lines:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            paras.append(" ".join(cur))
            cur = []
    if cur:
        paras.append(" ".join(cur))
    return paras


def join_paragraphs(paragraphs: Sequence[str]) -> str:
    """The text files' layout: paragraphs separated by one blank line, a final newline."""
    return "\n\n".join(paragraphs) + "\n"


def austen_novels(austen_dir: str | Path) -> dict[str, list[str]]:
    """The six novels as paragraphs (:func:`austen_paragraphs`), keyed by janeaustenr's object names
    (:data:`AUSTEN_NOVELS`), read from ``data/Rdata.rdx``/``.rdb`` under ``austen_dir``."""
    d = find_austen_dir(austen_dir)
    db = read_lazyload_db(d / "data" / "Rdata", names=list(AUSTEN_NOVELS))
    out = {}
    for name, obj in db.items():
        if not (isinstance(obj, RObject) and obj.type == "character"):
            raise ValueError(f"{d / 'data' / 'Rdata.rdb'}: {name!r} is not a character vector but {obj!r}")
        out[name] = austen_paragraphs(obj.data)
    return out


# ---------------------------------------------------------------------------------------------------- handbook

_SKIP_TAGS = {"script", "style", "pre", "head", "title", "noscript", "svg", "math", "table", "object", "iframe"}
# Publican's page furniture and other things that are not prose
_SKIP_CLASSES = {"docnav", "toc", "navheader", "navfooter", "programlisting", "screen", "synopsis", "indexterm",
                 "footnotes", "index", "titlepage", "mediaobject", "figure", "example", "informalexample",
                 "calloutlist", "callout", "legalnotice", "revhistory"}
_SKIP_IDS = {"banner", "title", "site_footer", "footer"}
_PARA_TAGS = {"p"}
_PARA_CLASSES = {"para", "simpara"}
_BLOCK_TAGS = {"p", "div", "li", "ul", "ol", "dl", "dt", "dd", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote",
               "pre", "table", "tr", "td", "th", "hr", "section", "article", "body", "html", "form"}
_VOID_TAGS = {"br", "hr", "img", "meta", "link", "input", "area", "base", "col", "embed", "param", "source",
              "track", "wbr"}


class _ProseParser(html.parser.HTMLParser):
    """Text of paragraph elements (``<p>``, ``<div class="para">``), cut at every block boundary, outside code
    listings, scripts, navigation and other furniture."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, skips, is_para)
        self.skip = 0
        self.para = 0
        self.buf: list[str] = []
        self.paragraphs: list[str] = []

    def flush(self) -> None:
        text = re.sub(r"\s+", " ", "".join(self.buf)).strip()
        self.buf = []
        if text:
            self.paragraphs.append(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        classes = set((a.get("class") or "").split())
        skips = tag in _SKIP_TAGS or bool(classes & _SKIP_CLASSES) or a.get("id") in _SKIP_IDS
        is_para = tag in _PARA_TAGS or bool(classes & _PARA_CLASSES)
        if tag in _BLOCK_TAGS:
            self.flush()
        if tag in _VOID_TAGS:  # images and the like are not prose; a line break is a space
            if tag == "br":
                self.handle_data(" ")
            return
        self.stack.append((tag, skips, is_para))
        self.skip += skips
        self.para += is_para

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in _BLOCK_TAGS:
            self.flush()
        elif tag == "br":
            self.handle_data(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in _VOID_TAGS or not any(t == tag for t, _, _ in self.stack):
            return  # a stray end tag
        if tag in _BLOCK_TAGS:
            self.flush()
        while self.stack:
            t, skips, is_para = self.stack.pop()
            self.skip -= skips
            self.para -= is_para
            if t == tag:
                break
        if tag in _BLOCK_TAGS:
            self.flush()

    def handle_data(self, data: str) -> None:
        if self.para and not self.skip:
            self.buf.append(data)

    def close(self) -> None:
        super().close()
        self.flush()


def html_paragraphs(html_text: str) -> list[str]:
    """The prose paragraphs of an HTML page: the text of ``<p>`` and ``<div class="para">`` elements with
    whitespace collapsed and entities decoded, leaving out scripts, styles, code listings (``<pre>``,
    ``class="programlisting"``/``"screen"``), tables, figures, examples, navigation and tables of contents. Inline
    markup (``<code>``, ``<em>``, links) keeps its text; a block inside a paragraph (a list) splits it.

    >>> html_paragraphs('<p>Run <code>apt</code> &amp; wait.</p><pre>$ apt update</pre><script>x()</script>')
    ['Run apt & wait.']
    """
    p = _ProseParser()
    p.feed(html_text)
    p.close()
    return p.paragraphs


def find_handbook_dir(root: str | Path, lang: str = "en-US") -> Path:
    """The handbook's HTML directory for ``lang`` (holding ``index.html``) at or under ``root`` (e.g. the directory
    ``dpkg-deb -x`` extracted ``debian-handbook`` into).

    Raises:
        FileNotFoundError: naming ``root`` and ``lang``, when none is found.
    """
    root = Path(root)
    for cand in (root, root / lang, root / "usr/share/doc/debian-handbook/html" / lang):
        if (cand / "index.html").is_file() and (cand.name == lang or cand == root):
            return cand
    if root.is_dir():
        for cand in sorted(root.glob(f"**/html/{lang}/index.html")):
            return cand.parent
    raise FileNotFoundError(f"handbook_dir={str(root)!r}: no html/{lang}/index.html under it (extract "
                            f"debian-handbook there: apt-get download debian-handbook && "
                            f"dpkg-deb -x debian-handbook_*.deb DIR)")


def handbook_paragraphs(handbook_dir: str | Path, lang: str = "en-US", min_words: int = 4) -> list[str]:
    """Prose paragraphs of The Debian Administrator's Handbook, page by page in the book's order (following each
    page's ``<link rel="next">`` from ``index.html``; pages off that chain follow in name order). Paragraphs
    shorter than ``min_words`` words (labels, stray captions) are dropped."""
    if min_words < 0:
        raise ValueError(f"min_words={min_words} should be a non-negative integer")
    d = find_handbook_dir(handbook_dir, lang)
    pages = {p.name: p for p in sorted(d.glob("*.html"))}
    order, seen, cur = [], set(), "index.html"
    while cur in pages and cur not in seen:
        seen.add(cur)
        order.append(cur)
        m = re.search(r'<link\s+rel="next"\s+href="([^"#]+)', pages[cur].read_text("utf-8", errors="replace"))
        cur = m.group(1) if m else None
    order += [n for n in pages if n not in seen]
    paras = []
    for name in order:
        for para in html_paragraphs(pages[name].read_text("utf-8", errors="replace")):
            if len(para.split()) >= min_words:
                paras.append(para)
    logger.info("handbook: %d pages, %d paragraphs from %s", len(order), len(paras), d)
    return paras


# ------------------------------------------------------------------------------------------------------ builder


def _debian_version(root: Path, package: str) -> str | None:
    """``VERSION`` from the first line, ``PACKAGE (VERSION) ...``, of the package's Debian changelog at or above
    ``root`` (where ``dpkg-deb -x`` put it), if there is one."""
    for base in (root, *root.parents):
        for name in ("changelog.Debian.gz", "changelog.gz"):
            f = base / "usr/share/doc" / package / name
            if f.is_file():
                try:
                    with gzip.open(f, "rt", encoding="utf-8", errors="replace") as fh:
                        m = re.match(rf"{re.escape(package)} \(([^)]+)\)", fh.readline())
                except (OSError, EOFError):
                    return None
                return m.group(1) if m else None
    return None


def build_texts(handbook_dir: str | Path | None, austen_dir: str | Path, out_dir: str | Path, *,
                eval_novel: str = "emma", calib_novels: Sequence[str] | None = None,
                handbook: bool = True, lang: str = "en-US") -> dict[str, Any]:
    """Write ``calib.txt``, ``eval.txt`` and ``manifest.json`` into ``out_dir``, from disjoint sources.

    * ``eval.txt``: the held-out novel ``eval_novel``, paragraphs separated by a blank line.
    * ``calib.txt``: the novels in ``calib_novels`` (default: the other five) and, with ``handbook``, the handbook's
      English prose, each source's paragraphs separated by blank lines, the sources by two.
    * ``manifest.json``: each file's size and sha256, its sources and their sizes (characters, words, paragraphs,
      bytes), and the Debian packages' versions where their changelogs say.

    Args:
        handbook_dir: where ``debian-handbook`` was extracted (see :func:`find_handbook_dir`); may be None when
            ``handbook`` is False.
        austen_dir: where ``r-cran-janeaustenr`` was extracted (see :func:`find_austen_dir`).
        out_dir: created if missing; the three files are replaced atomically.
        eval_novel: one of :data:`AUSTEN_NOVELS`.
        calib_novels: novels for calibration; must not include ``eval_novel``.
        handbook: add the handbook to the calibration text.
        lang: the handbook's language directory.

    Returns:
        The manifest (as written).

    Raises:
        ValueError: an unknown novel, ``eval_novel`` among ``calib_novels``, or no calibration source.
        FileNotFoundError: a package directory that does not hold the package.
    """
    from .._io import atomic_write_text  # (lcompress._io imports torch; only the writer needs it)

    if eval_novel not in AUSTEN_NOVELS:
        raise ValueError(f"eval_novel={eval_novel!r} should be one of {sorted(AUSTEN_NOVELS)}")
    if calib_novels is None:
        calib_novels = [n for n in AUSTEN_NOVELS if n != eval_novel]
    calib_novels = list(calib_novels)
    for n in calib_novels:
        if n not in AUSTEN_NOVELS:
            raise ValueError(f"calib_novels contains {n!r}; each should be one of {sorted(AUSTEN_NOVELS)}")
    if eval_novel in calib_novels:
        raise ValueError(f"calib_novels={calib_novels} includes eval_novel={eval_novel!r}: calibration and "
                         "evaluation text must be disjoint")
    if not calib_novels and not handbook:
        raise ValueError("no calibration source: calib_novels is empty and handbook=False")
    if handbook and handbook_dir is None:
        raise ValueError("handbook_dir=None with handbook=True")

    novels = austen_novels(austen_dir)
    austen_root = find_austen_dir(austen_dir)
    rdb = austen_root / "data" / "Rdata.rdb"

    def describe(name: str, paras: list[str], source: str, text: str) -> dict[str, Any]:
        return {"name": name, "source": source, "paragraphs": len(paras), "characters": len(text),
                "words": len(text.split()), "bytes": len(text.encode("utf-8"))}

    eval_text = join_paragraphs(novels[eval_novel])
    parts, calib_sources = [], []
    for n in calib_novels:
        t = "\n\n".join(novels[n])
        parts.append(t)
        calib_sources.append(describe(f"austen:{n}", novels[n], f"{rdb} ({AUSTEN_NOVELS[n]})", t))
    if handbook:
        hb = handbook_paragraphs(handbook_dir, lang)
        t = "\n\n".join(hb)
        parts.append(t)
        calib_sources.append(describe(f"debian-handbook:{lang}", hb, str(find_handbook_dir(handbook_dir, lang)), t))
    calib_text = "\n\n\n".join(parts) + "\n"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    def file_entry(name: str, text: str) -> dict[str, Any]:
        data = text.encode("utf-8")
        return {"file": name, "bytes": len(data), "characters": len(text), "sha256": hashlib.sha256(data).hexdigest()}

    packages = {"r-cran-janeaustenr": _debian_version(austen_root, "r-cran-janeaustenr")}
    if handbook:
        packages["debian-handbook"] = _debian_version(find_handbook_dir(handbook_dir, lang), "debian-handbook")
    manifest = {
        "format": "lcompress.texts",
        "version": 1,
        "eval": {**file_entry("eval.txt", eval_text),
                 "sources": [describe(f"austen:{eval_novel}", novels[eval_novel],
                                      f"{rdb} ({AUSTEN_NOVELS[eval_novel]})", eval_text)]},
        "calib": {**file_entry("calib.txt", calib_text), "sources": calib_sources},
        "packages": packages,
        "layout": "paragraphs separated by one blank line; in calib.txt, sources separated by two",
    }
    atomic_write_text(eval_text, out / "eval.txt")
    atomic_write_text(calib_text, out / "calib.txt")
    atomic_write_text(json.dumps(manifest, indent=2) + "\n", out / "manifest.json")
    logger.info("wrote %s (%d chars, %s) and %s (%d chars, %d sources)", out / "eval.txt", len(eval_text),
                eval_novel, out / "calib.txt", len(calib_text), len(calib_sources))
    return manifest
