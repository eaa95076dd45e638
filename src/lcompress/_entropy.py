"""Lossless stage: entropy coding of integer symbol streams (quantization codes, support gaps).

A stream of n symbols from the alphabet [0, A) is stored in whichever of these forms is shortest:

* **raw**: the symbols bit-packed at ⌈log₂ A⌉ bits each (:func:`lcompress.codecs.bits.pack_bits`), exactly
  ⌈n·⌈log₂ A⌉ / 8⌉ bytes;
* **coded**, strictly fewer bytes than raw and self-describing: one byte naming the method, then

  - :data:`ANS`: an order-0 model, as LEB128 varints: k (the number of distinct symbols), the k symbols as gaps
    (s₀, s₁ − s₀ − 1, …) and the counts of the first k − 1 of them (the last is n minus their sum); then the
    little-endian uint32 words of a ``constriction`` ``AnsCoder`` (asymmetric numeral systems, 64-bit state,
    24-bit probabilities) that coded the ranks of the symbols among the k, each with the probability
    ``Categorical(counts, perfect=False)`` gives it. Within a few bytes of n·H (H the empirical entropy) plus
    the model: the best form for symbols drawn independently;
  - :data:`CONSTANT`: k = 1 and the one symbol (varints), nothing else;
  - :data:`ZSTD_PACKED` / :data:`ZSTD_SYMBOLS`: a zstd frame (levels :data:`ZSTD_LEVELS` tried, with its 4-byte
    checksum, so that a changed byte is found as it is in an ANS stream; no content size or dictionary) of the raw
    form, or (for widths other than 1, 2, 4, 8, 16, 32 bits) of the symbols at 1, 2 or 4 little-endian bytes
    each. zstd's matching finds what an order-0 model cannot: repeats, such as the same support pattern in the
    rows of a layer whose inputs are dead (image borders), or runs of equal codes.

So the stream's length is its flag: a stream of exactly the raw length is raw, a shorter one is coded, a longer
one is corrupt. Coding never costs more than the raw form.

Decoding trusts nothing in the stream: the caller gives n and A (bounded by the file's header) and nothing of
more than about n symbols is allocated. An ANS model is checked against n and A before it is used (k ≤ min(n,
A), symbols increasing and below A, counts ≥ 1 summing to n), and the coder must decode n symbols, end
exactly at its data's end and reproduce the model's counts; a zstd frame may not declare another size, need a
window larger than its output, fail its checksum, decode to other than the expected bytes or leave bytes after it. Anything else
raises :class:`lcompress.codecs.CorruptFileError`. Encoding and decoding are vectorised (the coders run in
compiled code; no Python loop over symbols).

>>> import numpy as np
>>> x = np.array([0] * 90 + [1] * 9 + [3])
>>> data = encode(x, 4)
>>> len(data) < 25 == len(pack_bits_raw(x, 4))   # 100 2-bit codes take 25 bytes raw
True
>>> bool((decode(data, 100, 4) == x).all())
True
"""
from __future__ import annotations

import hashlib
import math
import threading
from collections import OrderedDict
from typing import Any

import numpy as np

__all__ = ["ANS", "CONSTANT", "ZSTD_PACKED", "ZSTD_SYMBOLS", "MAX_ALPHABET", "encode", "decode", "form", "raw_size",
           "pack_bits_raw"]

ANS = 1
CONSTANT = 2
ZSTD_PACKED = 3
ZSTD_SYMBOLS = 4
METHODS = {ANS: "ans", CONSTANT: "constant", ZSTD_PACKED: "zstd-packed", ZSTD_SYMBOLS: "zstd-symbols"}
#: zstd levels tried (the decoder needs none): 19 is near zstd's best; 3 is sometimes shorter still on packed bits.
ZSTD_LEVELS = (3, 19)
#: Largest alphabet: symbols are at most 32 bits wide (the raw form's limit).
MAX_ALPHABET = 1 << 32
#: Most distinct symbols an ANS model may have; its probabilities have 24 bits, so each symbol keeps room.
MAX_CODED_SYMBOLS = 1 << 20
_MAX_VARINT_BYTES = 9  # 63 bits: every count, symbol and gap fits
# encode() is deterministic and the size report asks for the same streams every LC step, then export once more:
# recent results are kept, keyed by a digest of the symbols (hashing is ~100x cheaper than the zstd searches)
_CACHE: OrderedDict[tuple[int, int, bytes], bytes] = OrderedDict()
_CACHE_BYTES_MAX = 1 << 26
_cache_bytes = 0
_cache_lock = threading.Lock()


def _corrupt(message: str) -> Exception:
    from .codecs.base import CorruptFileError  # codecs.base imports this module: resolved at call time

    return CorruptFileError(f"corrupted .lcz payload: {message}")


def _width(alphabet_size: int) -> int:
    return 0 if alphabet_size <= 1 else math.ceil(math.log2(alphabet_size))


def _check_alphabet(alphabet_size: Any) -> int:
    if isinstance(alphabet_size, bool) or not isinstance(alphabet_size, (int, np.integer)) or not (
        1 <= alphabet_size <= MAX_ALPHABET
    ):
        raise ValueError(f"alphabet_size={alphabet_size!r} must be an integer in [1, 2**32]")
    return int(alphabet_size)


def raw_size(n: int, alphabet_size: int) -> int:
    """Bytes of the raw form: ⌈n·⌈log₂ A⌉ / 8⌉."""
    return -(-int(n) * _width(_check_alphabet(alphabet_size)) // 8)


def pack_bits_raw(symbols: Any, alphabet_size: int) -> bytes:
    """The raw form of a stream: ``symbols`` bit-packed at ⌈log₂ A⌉ bits each."""
    from .codecs.bits import pack_bits

    return pack_bits(np.asarray(symbols).reshape(-1), _width(_check_alphabet(alphabet_size)))


# ---- LEB128 varints, vectorised ------------------------------------------------------------------------------
def _varints(values: np.ndarray) -> bytes:
    v = np.asarray(values, dtype=np.uint64).reshape(-1)
    if v.size == 0:
        return b""
    nb = np.ones(v.size, dtype=np.int64)
    t = v >> np.uint64(7)
    while t.any():  # at most 9 rounds: a loop over byte positions, not over values
        nb += t > 0
        t >>= np.uint64(7)
    starts = np.cumsum(nb) - nb
    j = np.arange(int(nb.sum()), dtype=np.int64) - np.repeat(starts, nb)
    out = (np.repeat(v, nb) >> (np.uint64(7) * j.astype(np.uint64))) & np.uint64(0x7F)
    out |= np.where(j < np.repeat(nb, nb) - 1, np.uint64(0x80), np.uint64(0))
    return out.astype(np.uint8).tobytes()


def _read_varints(buf: np.ndarray, pos: int, m: int, what: str) -> tuple[np.ndarray, int]:
    """m varints from ``buf[pos:]``: (values as int64, position after them). Allocates O(len(buf))."""
    if m == 0:
        return np.zeros(0, dtype=np.int64), pos
    ends = np.flatnonzero(buf[pos:] < 0x80)
    if ends.size < m:
        raise _corrupt(f"the entropy model's {what} are truncated")
    ends = ends[:m] + 1
    lengths = np.diff(ends, prepend=0)
    if int(lengths.max()) > _MAX_VARINT_BYTES:
        raise _corrupt(f"the entropy model has a varint of more than {_MAX_VARINT_BYTES} bytes in its {what}")
    b = buf[pos : pos + int(ends[-1])].astype(np.uint64) & np.uint64(0x7F)
    starts = ends - lengths
    j = np.arange(b.size, dtype=np.uint64) - np.repeat(starts, lengths).astype(np.uint64)
    vals = np.add.reduceat(b << (np.uint64(7) * j), starts)
    return vals.astype(np.int64), pos + int(ends[-1])


# ---- coding --------------------------------------------------------------------------------------------------
def _model(counts: np.ndarray):
    import constriction

    return constriction.stream.model.Categorical(counts.astype(np.float64), perfect=False)


def _histogram(x: np.ndarray, alphabet_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(distinct symbols, their counts, each symbol's rank among them)."""
    if alphabet_size <= (1 << 22) or alphabet_size <= 4 * x.size:
        counts = np.bincount(x, minlength=0)
        used = np.flatnonzero(counts)
        rank = np.cumsum(counts > 0) - 1
        return used, counts[used], rank[x]
    used, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    return used, counts, inverse


def _symbol_bytes(x: np.ndarray, width: int) -> bytes:
    return x.astype("<u1" if width <= 8 else "<u2" if width <= 16 else "<u4").tobytes()


def _zstd_frame(data: bytes, level: int) -> bytes:
    import zstandard

    c = zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=False,
                                 write_dict_id=False)
    return c.compress(data)


def _ans(x: np.ndarray, a: int, raw: int) -> bytes | None:
    """The ANS or constant form, or None where its model alone is no shorter than ``raw``."""
    used, counts, rank = _histogram(x, a)
    gaps = np.diff(used, prepend=-1) - 1
    if used.size == 1:
        return bytes([CONSTANT]) + _varints(np.array([1, used[0]]))
    if used.size > MAX_CODED_SYMBOLS:
        return None
    head = bytes([ANS]) + _varints(np.concatenate([[used.size], gaps, counts[:-1]]))
    if len(head) >= raw:
        return None
    import constriction

    coder = constriction.stream.stack.AnsCoder()
    coder.encode_reverse(rank.astype(np.int32), _model(counts))
    return head + coder.get_compressed().astype("<u4").tobytes()


def encode(symbols: Any, alphabet_size: int) -> bytes:
    """Entropy-code ``symbols`` (integers in [0, alphabet_size)) in the shortest form (see the module docstring).

    Args:
        symbols: a 1-d array-like (numpy array, tensor, list) of integers.
        alphabet_size: A, 1 ≤ A ≤ 2³²; the raw form takes ⌈log₂ A⌉ bits a symbol.

    Returns:
        The stream: at most :func:`raw_size` (n, A) bytes, and fewer exactly when it is coded. The same
        symbols give the same bytes.

    Raises:
        ValueError: ``alphabet_size`` out of range, or a symbol outside [0, alphabet_size).
    """
    a = _check_alphabet(alphabet_size)
    if hasattr(symbols, "detach"):
        symbols = symbols.detach().cpu().numpy()
    x = np.asarray(symbols).reshape(-1)
    if x.size and not np.issubdtype(x.dtype, np.integer):
        raise ValueError(f"symbols must be integers, got dtype {x.dtype}")
    if x.size and (int(x.min()) < 0 or int(x.max()) >= a):
        raise ValueError(f"symbols must lie in [0, alphabet_size={a}), got [{int(x.min())}, {int(x.max())}]")
    x = x.astype(np.int64, copy=False)
    width, raw = _width(a), raw_size(x.size, a)
    if raw == 0:
        return b""
    key = (a, x.size, hashlib.blake2b(np.ascontiguousarray(x).view(np.uint8), digest_size=16).digest())
    with _cache_lock:
        if key in _CACHE:
            _CACHE.move_to_end(key)
            return _CACHE[key]
    best = _encode(x, a, width, raw)
    _remember(key, best)
    return best


def _remember(key: tuple[int, int, bytes], data: bytes) -> None:
    global _cache_bytes
    if len(data) > _CACHE_BYTES_MAX // 4:
        return
    with _cache_lock:
        if key not in _CACHE:
            _CACHE[key] = data
            _cache_bytes += len(data)
        while _cache_bytes > _CACHE_BYTES_MAX:
            _cache_bytes -= len(_CACHE.popitem(last=False)[1])


def _encode(x: np.ndarray, a: int, width: int, raw: int) -> bytes:
    packed = pack_bits_raw(x, a)
    best = packed
    ans = _ans(x, a, raw)
    if ans is not None and len(ans) < len(best):
        best = ans
    if len(best) > 12:  # a zstd frame takes ≥ 12 bytes with its method byte and checksum
        candidates = [(ZSTD_PACKED, packed, level) for level in ZSTD_LEVELS]
        if width not in (1, 2, 4, 8, 16, 32):  # packing across byte boundaries hides repeats from zstd's matcher
            candidates.append((ZSTD_SYMBOLS, _symbol_bytes(x, width), ZSTD_LEVELS[-1]))
        for method, data, level in candidates:
            z = bytes([method]) + _zstd_frame(data, level)
            if len(z) < len(best):
                best = z
    return best


def _unzstd(body: np.ndarray, expect: int) -> bytes:
    """The ``expect`` bytes a zstd frame holds, allocating at most about ``expect`` (window included)."""
    import zstandard

    frame = body.tobytes()
    window = 1 << max(10, math.ceil(math.log2(max(expect, 1))))
    try:
        size = zstandard.get_frame_parameters(frame).content_size
        if size not in (expect, zstandard.CONTENTSIZE_UNKNOWN):
            raise _corrupt(f"a zstd frame declares {size} bytes, not {expect}")
        dctx = zstandard.ZstdDecompressor(max_window_size=window)
        out = dctx.decompress(frame, max_output_size=expect) if expect else b""
        obj = dctx.decompressobj()  # the frame is known to decode to expect bytes: check it ends the stream
        obj.decompress(frame)
        ends = obj.eof and not obj.unused_data
    except zstandard.ZstdError as e:
        raise _corrupt(f"a zstd frame does not decode ({e})") from None
    if len(out) != expect or not ends:
        raise _corrupt(f"a zstd frame decodes to {len(out)} bytes, not {expect}, or has bytes after it")
    return out


def decode(data: bytes | bytearray | memoryview | np.ndarray, n: int, alphabet_size: int) -> np.ndarray:
    """Inverse of :func:`encode`: the n symbols (uint8 when ⌈log₂ A⌉ ≤ 8, else int64).

    Args:
        data: the stream.
        n: the number of symbols, bounded by the caller (nothing of much more than n symbols is allocated).
        alphabet_size: A, as given to :func:`encode`.

    Raises:
        ValueError: ``n`` or ``alphabet_size`` out of range (a caller's error).
        CorruptFileError: the stream is longer than the raw form, or a coded stream that does not decode to n
            symbols below A exactly as the module docstring says.
    """
    a = _check_alphabet(alphabet_size)
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n={n!r} must be a non-negative integer")
    n = int(n)
    buf = data.reshape(-1).view(np.uint8) if isinstance(data, np.ndarray) else np.frombuffer(data, dtype=np.uint8)
    width, raw = _width(a), raw_size(n, a)
    out_dtype = np.uint8 if width <= 8 else np.int64
    if buf.size > raw:
        raise _corrupt(f"an entropy-coded stream of {buf.size} bytes is longer than its raw form ({raw} bytes)")
    if buf.size == raw:
        return _checked(_unpack(buf, n, width), a, out_dtype)
    if buf.size == 0:
        raise _corrupt(f"an entropy-coded stream of {n} symbols is empty")
    method = int(buf[0])
    if method == ZSTD_PACKED:
        return _checked(_unpack(np.frombuffer(_unzstd(buf[1:], raw), np.uint8), n, width), a, out_dtype)
    if method == ZSTD_SYMBOLS:
        dt = "<u1" if width <= 8 else "<u2" if width <= 16 else "<u4"
        x = np.frombuffer(_unzstd(buf[1:], n * np.dtype(dt).itemsize), dt)
        return _checked(x, a, out_dtype)
    if method not in (ANS, CONSTANT):
        raise _corrupt(f"an entropy-coded stream has unknown method {method}")
    return _decode_ans(buf, method, n, a, out_dtype)


def _unpack(buf: np.ndarray, n: int, width: int) -> np.ndarray:
    from .codecs.bits import unpack_bits

    used = n * width % 8
    if used and int(buf[-1]) >> used:  # pack_bits pads with zeros: anything else is another stream's bytes
        raise _corrupt(f"a bit-packed stream of {n} symbols of {width} bits has nonzero padding")
    return unpack_bits(buf, n, width)


def _checked(x: np.ndarray, a: int, out_dtype) -> np.ndarray:
    if x.size and int(x.max()) >= a:
        raise _corrupt(f"a stream holds the symbol {int(x.max())}, beyond its alphabet of {a}")
    return x.astype(out_dtype)


def _decode_ans(buf: np.ndarray, method: int, n: int, a: int, out_dtype) -> np.ndarray:
    (k,), pos = _read_varints(buf, 1, 1, "symbol count")
    if not 1 <= k <= min(n, a, MAX_CODED_SYMBOLS) or (method == CONSTANT) != (k == 1):
        raise _corrupt(f"an entropy model of {k} symbols for {n} symbols of an alphabet of {a} (method {method})")
    # k ≤ n and each varint takes ≥ 1 byte: what is allocated here is bounded by n and by the stream
    if 2 * k - 1 > buf.size - pos and method == ANS:
        raise _corrupt(f"the entropy model of {k} symbols is truncated")
    gaps, pos = _read_varints(buf, pos, k, "symbols")
    used = np.cumsum(gaps + 1) - 1  # gaps < 2⁶³ and k ≤ 2²⁰: no overflow before the check below
    if (gaps >= a).any() or int(used[-1]) >= a:
        raise _corrupt(f"the entropy model names a symbol beyond its alphabet of {a}")
    if method == CONSTANT:
        if pos != buf.size:
            raise _corrupt(f"a constant stream has {buf.size - pos} bytes after its model")
        return np.full(n, used[0], dtype=out_dtype)
    head, pos = _read_varints(buf, pos, k - 1, "counts")
    if (head < 1).any() or int(head.sum()) > n - 1:  # each head count < n, so the sum cannot overflow
        raise _corrupt(f"the entropy model's counts do not sum to {n} with each at least 1")
    counts = np.append(head, n - int(head.sum()))
    words = buf[pos:]
    if words.size % 4:
        raise _corrupt(f"the entropy coder's data is {words.size} bytes, not a whole number of 32-bit words")
    import constriction

    try:
        coder = constriction.stream.stack.AnsCoder(words.copy().view("<u4").astype(np.uint32))
        ranks = coder.decode(_model(counts), n)
        exhausted = coder.is_empty()
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # the compiled coder's refusal of a stream (a Rust panic is a BaseException)
        raise _corrupt(f"the entropy coder's data does not decode ({type(e).__name__}: {e})") from None
    if not exhausted or not np.array_equal(np.bincount(ranks, minlength=k), counts):
        raise _corrupt("the entropy coder's data does not decode to its model's counts")
    return used.astype(out_dtype)[ranks]


def form(data: bytes, n: int, alphabet_size: int) -> str:
    """The form a stream of :func:`encode` is in: "raw", "ans", "constant", "zstd-packed" or "zstd-symbols"."""
    if len(data) == raw_size(n, alphabet_size):
        return "raw"
    return METHODS.get(data[0], "unknown") if data else "unknown"
