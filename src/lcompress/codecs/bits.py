"""The bit-stream layer of the ``.lcz`` codecs: fixed-width bit packing and the delta code of a sorted support.

Every stream of symbols a codec writes (codebook codes, a support's bitmask or its delta symbols) passes through
:meth:`lcompress.codecs.Writer.write_symbols`, which packs it here; see :mod:`lcompress.sizes` for the delta code.
"""
from __future__ import annotations

import sys

import numpy as np
import torch
from torch import Tensor

__all__ = ["pack_bits", "unpack_bits", "delta_encode", "delta_decode"]

if sys.byteorder != "little":  # pragma: no cover - every platform torch ships for is little-endian
    raise ImportError("lcompress.codecs needs a little-endian machine (the .lcz format is little-endian)")

_CHUNK = 1 << 20  # values per chunk in the generic bit packer (a multiple of 8 keeps chunks byte-aligned)


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


def delta_encode(indices: Tensor, width: int) -> Tensor:
    """Delta symbols of a sorted support (see :mod:`lcompress.sizes`): per gap g, ⌊g/M⌋ escapes M then g mod M,
    with M = 2^width − 1. Runs on the indices' device; int64 symbols."""
    idx = indices.reshape(-1).long()
    m = (1 << width) - 1
    prev = torch.cat([idx.new_full((1,), -1), idx[:-1]])
    gaps = idx - prev - 1
    esc, last = torch.div(gaps, m, rounding_mode="floor"), torch.remainder(gaps, m)
    sym = torch.full((int(idx.numel() + esc.sum()),), m, dtype=torch.int64, device=idx.device)
    if idx.numel():
        sym[torch.cumsum(esc + 1, 0) - 1] = last
    return sym


def delta_decode(sym: np.ndarray, width: int, nnz: int, n: int, error: type[Exception] = ValueError) -> np.ndarray:
    """The sorted support (int64) of ``nnz`` positions in [0, n) that the delta symbols ``sym`` code.

    Raises:
        error: the symbols do not decode to ``nnz`` positions inside the length ``n``.
    """
    m = (1 << width) - 1
    final = sym != m
    fpos = np.flatnonzero(final)
    if fpos.size != nnz or (sym.size and not final[-1]):
        raise error(f"corrupted .lcz payload: a delta-coded support decodes to {fpos.size} positions, not {nnz}")
    escapes = np.cumsum(~final)[fpos]
    gaps = np.diff(escapes, prepend=0).astype(np.int64) * m + sym[fpos].astype(np.int64)
    idx = np.cumsum(gaps + 1) - 1
    if idx.size and idx[-1] >= n:
        raise error(f"corrupted .lcz payload: a support position {int(idx[-1])} is beyond the length {n}")
    return idx
