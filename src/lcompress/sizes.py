"""Bit accounting shared by ``LC.size_report()`` and the compact file writer.

What we count is what a file must store (payload only; a file adds a small fixed header):

* a dense tensor: numel × its dtype's bits;
* quantization: ⌈log₂ K⌉ bits per weight (bit-packed codes) plus the codebook in float32 (fixed codebooks such as
  binary, ternary or powers of two store no codebook; scaled ones store their one float32 scale);
* a sparse vector: its values at their dtype plus its support, coded the cheaper of two ways —
  a bitmask of n bits, or delta-coded positions (below);
* low-rank: both factors at their dtype.

Delta coding of a support i₀ < i₁ < … (n positions): gaps gⱼ = iⱼ − iⱼ₋₁ − 1 ≥ 0 (with i₋₁ = −1) are written in
b-bit symbols; the all-ones symbol M = 2ᵇ − 1 is an escape meaning "skip M positions, no value here", so a gap g
takes ⌊g / M⌋ escapes and one symbol for g mod M. The width b ∈ [1, 32] is the one that minimises the total.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["dtype_bits", "dense_bits", "index_bits", "quantized_bits", "delta_symbols", "support_bits",
           "compression_ratio"]

FLOAT_BITS = 32
MAX_DELTA_WIDTH = 32


def dtype_bits(dtype: torch.dtype) -> int:
    """Bits per element of ``dtype`` (bool counts 8, as stored by PyTorch)."""
    if dtype == torch.bool:
        return 8
    if dtype.is_floating_point or dtype.is_complex:
        return torch.finfo(dtype).bits * (2 if dtype.is_complex else 1)
    return torch.iinfo(dtype).bits


def dense_bits(t: Tensor) -> int:
    """Bits to store ``t`` as it is."""
    return t.numel() * dtype_bits(t.dtype)


def compression_ratio(reference_bits: int, compressed_bits: int) -> float:
    """The compression ratio ρ, the one definition every "ratio" of lcompress uses (``LC.size_report()``, the
    summary ``LC.export()`` returns, ``lcompress export``, ``lcompress inspect``, a run's ``results.json``).

    ρ = reference bits / compressed bits, over one scope (a task, the compressed parameters, the whole model):

    * reference bits: the scope's tensors at their own dtype, as a state dict stores them (each tensor once);
    * compressed bits: what a ``.lcz`` file stores for them, as counted bit for bit by the codecs (tasks at
      their compressed size, everything else at its dtype) — the file's payload before byte padding, without
      the container's header (a few hundred bytes to a few KiB; ``LC.export()`` also reports
      ``file_ratio`` = reference bytes / file bytes, header included).

    Returns ``inf`` when nothing is stored.

    >>> round(compression_ratio(32 * 1000, 1000 + 2 * 32), 2)   # 1000 float32 weights: 1-bit codes, 2-entry codebook
    30.08
    """
    return reference_bits / compressed_bits if compressed_bits else math.inf


def index_bits(k: int) -> int:
    """⌈log₂ K⌉: bits per code for a K-entry codebook (0 for K = 1)."""
    return 0 if k <= 1 else math.ceil(math.log2(k))


def quantized_bits(n: int, k: int, codebook_entries: int | None = None) -> int:
    """n codes of ⌈log₂ K⌉ bits plus ``codebook_entries`` float32 values (default K)."""
    return n * index_bits(k) + FLOAT_BITS * (k if codebook_entries is None else codebook_entries)


def _gaps(indices: Tensor) -> Tensor:
    idx = indices.reshape(-1).long()
    prev = torch.cat([idx.new_full((1,), -1), idx[:-1]])
    return idx - prev - 1


def delta_symbols(indices: Tensor, width: int) -> int:
    """Number of ``width``-bit symbols the delta code of a sorted support takes (escapes included)."""
    if indices.numel() == 0:
        return 0
    m = (1 << width) - 1
    return int(indices.numel() + torch.div(_gaps(indices), m, rounding_mode="floor").sum())


def best_delta_width(indices: Tensor) -> tuple[int, int]:
    """(width, total bits) of the cheapest delta code of a sorted support."""
    if indices.numel() == 0:
        return 1, 0
    g = _gaps(indices)
    widths = torch.arange(1, MAX_DELTA_WIDTH + 1, device=g.device)
    m = (torch.ones_like(widths) << widths) - 1
    # symbols(b) = nnz + Σ ⌊g / M_b⌋, all widths at once; a (32, nnz) temporary is avoided by looping 32 times
    extra = torch.stack([torch.div(g, int(mb), rounding_mode="floor").sum() for mb in m.tolist()])
    total = (g.numel() + extra) * widths
    j = int(torch.argmin(total))
    return j + 1, int(total[j])


def support_bits(indices: Tensor, n: int) -> tuple[str, int, int]:
    """Cheaper coding of a sorted support of a length-n vector.

    Returns:
        (scheme, bits, width): scheme "bitmask" (n bits, width 0) or "delta" (width-bit symbols).
    """
    width, dbits = best_delta_width(indices)
    if n <= dbits:
        return "bitmask", n, 0
    return "delta", dbits, width
