"""Integer codes bit-packed in memory, and their decoding to codebook values, in torch on any device.

Layout (the ``.lcz`` file's, :func:`lcompress.export.pack_bits`): code j of a flat sequence occupies bits
[j·w, (j + 1)·w) of the byte stream, least significant bit first, with w = ⌈log₂ K⌉. Codes are padded with
zeros to a whole number of groups of 8, and a group of 8 codes is exactly w bytes, so the packed tensor has
⌈n / 8⌉·w bytes (at most w − 1 bytes more than the file's ⌈n·w / 8⌉) and any range of codes starting at a
multiple of 8 starts at a byte.

* K = 1 (w = 0) stores nothing;
* 2 ≤ K ≤ 256 (1 ≤ w ≤ 8) stores the uint8 stream above;
* K > 256 stores the codes unpacked, as int16 (K ≤ 2¹⁵) or int32: a code of 9–16 bits in 2 bytes.

Decoding maps codes to codebook values in one gather per range, through a table of the values that each index
decodes to (:class:`Decoder`): a byte's 8/w codes for w ∈ {1, 2, 4, 8}, else chunks of 4 (w = 3) or 2 codes
cut from each group's bits. The table is built per call from the codebook (at most 2¹⁴ rows), so a layer keeps
none.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor, nn

from .sizes import index_bits

__all__ = ["GROUP", "packed_bytes", "pack_codes", "unpack_codes", "Decoder", "resident_bytes"]

#: Codes per group: a group of w-bit codes is exactly w bytes.
GROUP = 8

_LUTS: dict[tuple[int, torch.device], Tensor] = {}


def _unpacked_dtype(k: int) -> torch.dtype:
    return torch.int16 if k <= 2**15 else torch.int32


def packed_bytes(n: int, k: int) -> int:
    """Elements of the packed tensor holding n codes of a K-entry codebook (bytes for K ≤ 256)."""
    w = index_bits(k)
    if w > 8:
        return n
    return -(-n // GROUP) * w


def pack_codes(codes: Tensor, k: int) -> Tensor:
    """The packed form (see the module docstring) of integer codes in [0, K), flattened, on their device.

    Raises:
        ValueError: a code outside [0, K).
    """
    flat = codes.detach().reshape(-1)
    n, w = flat.numel(), index_bits(k)
    if n and (int(flat.min()) < 0 or int(flat.max()) >= k):
        raise ValueError(f"codes must lie in [0, {k}), found [{int(flat.min())}, {int(flat.max())}]")
    if w > 8:
        return flat.to(_unpacked_dtype(k)).clone()
    if w == 0 or n == 0:
        return torch.zeros(packed_bytes(n, k), dtype=torch.uint8, device=flat.device)
    groups = -(-n // GROUP)
    c = torch.zeros(groups * GROUP, dtype=torch.int64, device=flat.device)
    c[:n] = flat
    if w in (1, 2, 4, 8):  # whole codes per byte
        per = 8 // w
        c = c.view(-1, per)
        out = c[:, 0].clone()
        for j in range(1, per):  # a loop over the ≤ 8 fields of a byte, not over codes
            out |= c[:, j] << (w * j)
        return out.to(torch.uint8)
    c = c.view(groups, GROUP)
    v = c[:, 0].clone()
    for j in range(1, GROUP):  # the group's 8·w bits in one int64 (w ≤ 7: at most 56 bits)
        v |= c[:, j] << (w * j)
    shifts = torch.arange(0, 8 * w, 8, device=flat.device)
    return ((v.unsqueeze(-1) >> shifts) & 0xFF).to(torch.uint8).reshape(-1)


def unpack_codes(packed: Tensor, n: int, k: int) -> Tensor:
    """The n codes of a packed tensor (uint8 for K ≤ 256, else the stored integer dtype), flat."""
    w = index_bits(k)
    if w > 8:
        return packed[:n].clone()
    if w == 0:
        return torch.zeros(n, dtype=torch.uint8, device=packed.device)
    return _lut(w, packed.device)[_chunk_indices(packed, w)].reshape(-1)[:n].to(torch.uint8)


def _chunk(w: int) -> int:
    """Codes per table index: a byte's 8 / w codes for w ∈ {1, 2, 4, 8}, else 4 (w = 3) or 2 (w = 5, 6, 7)
    codes, at most 14 bits, so the table has at most 2¹⁴ rows."""
    return 8 // w if w in (1, 2, 4, 8) else (4 if w == 3 else 2)


def _lut(w: int, device: torch.device) -> Tensor:
    """(2^(c·w), c) int64: the c = :func:`_chunk` (w) codes that each c·w-bit index holds (built once per width
    and device, in numpy, so that a traced or exported graph holds it as a constant)."""
    key = (w, device)
    t = _LUTS.get(key)
    if t is None or _is_fake(t):
        c = _chunk(w)
        b = np.arange(1 << (c * w), dtype=np.int64)
        t = torch.from_numpy(np.stack([(b >> (w * j)) & ((1 << w) - 1) for j in range(c)], axis=1)).to(device)
        if not _is_fake(t):  # a table built while torch.export traces is a fake tensor: never cache one
            _LUTS[key] = t
    return t


def _is_fake(t: Tensor) -> bool:
    try:
        from torch._subclasses.fake_tensor import FakeTensor
    except ImportError:  # pragma: no cover - older torch
        return False
    return isinstance(t, FakeTensor)


def _tracing() -> bool:
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


def _chunk_indices(seg: Tensor, w: int) -> Tensor:
    """Table indices of a byte segment of whole groups: the bytes themselves for w ∈ {1, 2, 4, 8}, else each
    group's 8·w bits cut into 8 / c chunks of c·w bits."""
    if w in (1, 2, 4, 8):
        return seg.to(torch.int32)
    c = _chunk(w)
    g = seg.view(-1, w)
    dt = torch.int32 if w <= 3 else torch.int64  # 8·w bits must fit (int32's sign bit is masked off)
    v = g[:, 0].to(dt)
    for i in range(1, w):  # a loop over the ≤ 7 bytes of a group
        v = v + g[:, i].to(dt) * (1 << (8 * i))
    if _tracing():  # ONNX has no shifts of signed integers: the same by division (v ≥ 0 here)
        scales = torch.tensor([1 << s for s in range(0, GROUP * w, c * w)], device=seg.device, dtype=dt)
        return torch.remainder(torch.div(v.unsqueeze(-1), scales, rounding_mode="floor"), 1 << (c * w)).reshape(-1)
    shifts = torch.arange(0, GROUP * w, c * w, device=seg.device, dtype=dt)
    return ((v.unsqueeze(-1) >> shifts) & ((1 << (c * w)) - 1)).reshape(-1)


class Decoder:
    """Decodes ranges of one packed code sequence to codebook values.

    Built once per forward call: it pads the codebook to 2ʷ entries (so that no code can index past it) and
    makes the table of the values each index decodes to (``codebook[LUT]``: 256 × 8/w for w ∈ {1, 2, 4}, the
    codebook itself for w = 8, at most 2¹⁴ × c for the other widths), so decoding a range is one gather.

    Args:
        packed: the packed codes.
        codebook: (K,) values, at the dtype the decoded weight should have.
        k: the codebook size K the codes were packed for.
    """

    def __init__(self, packed: Tensor, codebook: Tensor, k: int) -> None:
        self.packed, self.k, self.w = packed, int(k), index_bits(k)
        cb = codebook.reshape(-1)
        if self.w <= 8 and cb.numel() < (1 << self.w):
            cb = torch.cat([cb, cb.new_zeros((1 << self.w) - cb.numel())])
        self.codebook = cb
        self.table = cb[_lut(self.w, cb.device)] if 1 <= self.w <= 8 else None

    def values(self, start: int, count: int, out: Tensor | None = None) -> Tensor:
        """codebook[codes[start : start + count]] as a flat tensor; ``start`` must be a multiple of 8.

        ``out``: a contiguous tensor of ``count`` elements at the codebook's dtype to decode into, returned viewed
        flat. A caller decoding tile after tile reuses one: a fresh multi-MB tensor per tile costs its page faults
        (measured on this 2-core VM, 1 thread: gathering 2²⁰ table rows of 4 floats took 5.8 ms into a fresh tensor,
        3.2 ms into a reused one)."""
        w = self.w
        if out is not None:
            out = out.view(-1)
            if out.numel() != count:
                raise ValueError(f"out has {out.numel()} elements for count={count}")
        if w > 8:
            idx = self.packed[start : start + count].to(torch.int32)
            return self.codebook.index_select(0, idx) if out is None else torch.index_select(self.codebook, 0, idx,
                                                                                              out=out)
        if w == 0:
            v = self.codebook[:1].expand(count)
            return v.contiguous() if out is None else out.copy_(v)
        if start % GROUP:
            raise ValueError(f"start={start} must be a multiple of {GROUP}")
        b0, b1 = start // GROUP * w, -(-(start + count) // GROUP) * w
        idx = _chunk_indices(self.packed[b0:b1], w)
        per = self.table.shape[1]
        if out is not None and count % per == 0 and idx.numel() * per == count and not _tracing():
            return torch.index_select(self.table, 0, idx, out=out.view(-1, per)).view(-1)
        v = self.table.index_select(0, idx).reshape(-1)[:count]
        return v if out is None else out.copy_(v)


def tile_rows(cols: int, tile_weights: int) -> int:
    """Rows per tile of a row-major (rows, cols) code matrix: about ``tile_weights`` weights, and a multiple of
    the rows that make a whole number of groups (so every tile starts at a byte)."""
    step = GROUP // math.gcd(cols, GROUP)
    return max(step, tile_weights // max(cols, 1) // step * step)


def resident_bytes(module: nn.Module) -> int:
    """Bytes of a module's parameters and buffers (each storage counted once: shared codebooks and tied weights
    are counted once)."""
    seen: set[tuple[int, torch.device]] = set()
    total = 0
    for t in list(module.parameters()) + list(module.buffers()):
        s = t.untyped_storage()
        key = (s.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        total += s.nbytes()
    return total
