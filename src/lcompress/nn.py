"""Compact inference modules for compressed layers.

A compressed layer keeps its compact form Θ in memory instead of a dense float weight:

* :class:`LowRankLinear`, :class:`LowRankConv2d`: W = A B as two smaller layers (r(m + n) weights, and as many
  multiply-adds per output position);
* :class:`SparseLinear`: a CSR weight (values + int32 column indices + row pointers), used when the density is
  below :data:`SPARSE_CROSSOVER_DENSITY`, the measured point where a CSR product stops being faster than a
  dense one on CPU;
* :class:`CodebookLinear`, :class:`CodebookConv2d`: integer codes (uint8 for K ≤ 256) and a float32 codebook as
  buffers; the weight codebook[codes] is decoded in ``forward`` and freed after the call, so the resident weight
  memory is one byte per weight instead of four.

:func:`compact_model` swaps a model's layers for these given per-weight Θ (see :func:`task_specs`, which splits a
task's Θ — joint tasks included — into per-weight pieces); :func:`lcompress.load` with ``compact=True`` does it
from a file. Model surgery (:func:`lcompress.surgery.remove_dead_neurons`, which shrinks a chain of Linear
layers) lives in :mod:`lcompress.surgery`; it is importable from here too.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _packed
from .surgery import _module_slots, remove_dead_neurons  # (remove_dead_neurons: its old import path)
from .views import CONV_SCHEMES
from .sizes import index_bits

__all__ = [
    "SPARSE_CROSSOVER_DENSITY",
    "SPARSE_BAG_MIN_ROWS",
    "LowRankLinear",
    "LowRankConv2d",
    "SparseLinear",
    "CodebookLinear",
    "CodebookConv2d",
    "CodebookEmbedding",
    "CODEBOOK_TILE_WEIGHTS",
    "GroupedIntLinear",
    "SumLinear",
    "GROUPED_TILE_WEIGHTS",
    "CACHE_MODES",
    "set_cache",
    "resident_bytes",
    "task_specs",
    "compact_model",
    "describe_compact",
    "remove_dead_neurons",
]

logger = logging.getLogger(__name__)

#: Density (nonzeros / weights) below which :func:`compact_model` turns a pruned Linear layer into a
#: :class:`SparseLinear`. Measured with ``bench/bench_compact.py`` (torch 2.13 CPU, 2 threads, CSR with int32
#: indices against ``F.linear``, median of 31 interleaved repeats): the largest density at which the CSR product
#: was still faster was 0.1–0.3 for 1024×1024 and 2048×2048 layers at batch 1 and 256, 0.1 for 784→300 at batch
#: 256 and 0.01 for 300→100 at batch 256; on the small layers at batch 1 the sparse call was 1.1–3× slower at
#: every density (a few microseconds of per-call overhead either way). 0.1 is the median crossover over these
#: cases, and where the time matters (large layers) sparse is faster at 0.1 in every case measured. Memory
#: pays off sooner: 8 bytes per nonzero against 4 per dense weight wins below density 0.5.
SPARSE_CROSSOVER_DENSITY = 0.1

#: Input rows from which :class:`SparseLinear` multiplies on the CPU by weighted embedding bags (gathering whole
#: rows of Xᵀ) instead of the CSR × dense product; one row takes the CSR matrix-vector product. Measured with
#: ``bench/bench_compact_speed.py`` (``sparse_paths``, 90% sparsity, 2 threads): the bags were 0.09–0.17 of the
#: dense time from 16 rows (CSR × dense 0.22–1.6), about even with CSR × dense at 8 rows on 4096×4096 and behind
#: it at 2–8 rows on 576→1536; at one row CSR mv was 0.33–0.55 (CSR × dense 0.63, bags 2.8–2.9).
SPARSE_BAG_MIN_ROWS = 16

_HALF = (torch.float16, torch.bfloat16)


def _check_factors(a: Tensor, b: Tensor, out_dim: int, in_dim: int, what: str) -> int:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(f"{what}: factors must be A (m, r) and B (r, n), got {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape[0] != out_dim or b.shape[1] != in_dim:
        raise ValueError(
            f"{what}: factors {tuple(a.shape)} @ {tuple(b.shape)} do not give the matrix view ({out_dim}, {in_dim})"
        )
    return int(a.shape[1])


class LowRankLinear(nn.Module):
    """y = A (B x) + b: a Linear layer of rank r as two Linear layers (in → r, then r → out).

    Args:
        in_features, out_features: the dense layer's sizes.
        rank: the inner size r ≥ 0 (r = 0 gives y = b).
        bias: keep a bias on the second layer.

    Use :meth:`from_factors` to build one from a dense layer's Θ = (A, B).
    """

    def __init__(self, in_features: int, out_features: int, rank: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features, self.rank = int(in_features), int(out_features), int(rank)
        self.first = nn.Linear(self.in_features, self.rank, bias=False)
        self.second = nn.Linear(self.rank, self.out_features, bias=bias)

    @classmethod
    def from_factors(cls, linear: nn.Linear, a: Tensor, b: Tensor) -> "LowRankLinear":
        """The layer W = A B (A: out × r, B: r × in) with ``linear``'s bias.

        Raises:
            ValueError: the factors do not multiply to the layer's weight shape.
        """
        r = _check_factors(a, b, linear.out_features, linear.in_features, "LowRankLinear")
        p = linear.weight
        m = cls(linear.in_features, linear.out_features, r, bias=linear.bias is not None).to(p.device, p.dtype)
        with torch.no_grad():
            m.first.weight.copy_(b.to(p.device, p.dtype))
            m.second.weight.copy_(a.to(p.device, p.dtype))
            if linear.bias is not None:
                m.second.bias.copy_(linear.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def _pair(v) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(x) for x in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return v  # type: ignore[return-value]


class LowRankConv2d(nn.Module):
    """A Conv2d whose weight's matrix view is A B (see :func:`lcompress.views.to_matrix`).

    * ``scheme_1``: W (o, i, kh, kw) viewed as (o, i·kh·kw). B reshaped to (r, i, kh, kw) is a kh×kw conv with r
      output channels that takes the layer's stride, padding and dilation; A reshaped to (o, r, 1, 1) is a 1×1 conv
      (with the bias).
    * ``scheme_2``: W viewed as (o·kh, i·kw) with rows (output channel, kernel row) and columns (input channel,
      kernel column). The input-side factor B, reshaped to (r, i, 1, kw), is a 1×kw conv that takes the
      horizontal stride, padding and dilation (and no vertical ones: it runs on every input row); A, regrouped
      to (o, r, kh, 1), is a kh×1 conv with the vertical stride, padding and dilation (and the bias). Since
      out[a, p, q] = Σ_{y,s} A[(a,y),s] · Σ_{c,x} B[s,(c,x)] in[c, p·sh + y·dh − ph, q·sw + x·dw − pw], the zero
      (or reflected / circular) rows the second conv pads are exactly the rows the dense conv would pad.

    Only ``groups = 1`` convolutions factor this way.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode: as for
            :class:`torch.nn.Conv2d` (padding may be an int, a pair, "same" or "valid").
        rank: the inner number of channels r.
        conv_scheme: "scheme_1" or "scheme_2".
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        rank: int,
        stride=1,
        padding=0,
        dilation=1,
        bias: bool = True,
        padding_mode: str = "zeros",
        conv_scheme: str = "scheme_1",
    ) -> None:
        super().__init__()
        if conv_scheme not in CONV_SCHEMES:
            raise ValueError(f"conv_scheme={conv_scheme!r} must be one of {CONV_SCHEMES}")
        kh, kw = _pair(kernel_size)
        sh, sw = _pair(stride)
        dh, dw = _pair(dilation)
        self.in_channels, self.out_channels, self.rank = int(in_channels), int(out_channels), int(rank)
        self.kernel_size, self.conv_scheme = (kh, kw), conv_scheme
        if conv_scheme == "scheme_1":
            self.first = nn.Conv2d(in_channels, rank, (kh, kw), (sh, sw), padding, (dh, dw), bias=False,
                                   padding_mode=padding_mode)
            self.second = nn.Conv2d(rank, out_channels, 1, bias=bias)
        else:
            if isinstance(padding, str):
                pad_h = pad_w = padding
            else:
                ph, pw = _pair(padding)
                pad_h, pad_w = (ph, 0), (0, pw)
            self.first = nn.Conv2d(in_channels, rank, (1, kw), (1, sw), pad_w, (1, dw), bias=False,
                                   padding_mode=padding_mode)
            self.second = nn.Conv2d(rank, out_channels, (kh, 1), (sh, 1), pad_h, (dh, 1), bias=bias,
                                    padding_mode=padding_mode)

    @classmethod
    def from_factors(cls, conv: nn.Conv2d, a: Tensor, b: Tensor, conv_scheme: str = "scheme_1") -> "LowRankConv2d":
        """The conv whose weight is ``from_matrix(A @ B, conv.weight.shape, conv_scheme)``, with ``conv``'s
        geometry and bias.

        Raises:
            ValueError: ``conv.groups != 1``, or the factors do not fit the matrix view of the weight.
        """
        if conv.groups != 1:
            raise ValueError(f"LowRankConv2d needs groups=1, the conv has groups={conv.groups}")
        o, i, kh, kw = conv.weight.shape
        rows, cols = (o, i * kh * kw) if conv_scheme == "scheme_1" else (o * kh, i * kw)
        r = _check_factors(a, b, rows, cols, f"LowRankConv2d({conv_scheme})")
        p = conv.weight
        m = cls(i, o, (kh, kw), r, conv.stride, conv.padding, conv.dilation, conv.bias is not None,
                conv.padding_mode, conv_scheme).to(p.device, p.dtype)
        a, b = a.to(p.device, p.dtype), b.to(p.device, p.dtype)
        with torch.no_grad():
            if conv_scheme == "scheme_1":
                m.first.weight.copy_(b.reshape(r, i, kh, kw))
                m.second.weight.copy_(a.reshape(o, r, 1, 1))
            else:
                m.first.weight.copy_(b.reshape(r, i, 1, kw))
                # rows of A are (output channel, kernel row): (o, kh, r) -> (o, r, kh, 1)
                m.second.weight.copy_(a.reshape(o, kh, r).permute(0, 2, 1).unsqueeze(-1))
            if conv.bias is not None:
                m.second.bias.copy_(conv.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        return self.second(self.first(x))

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, out_channels={self.out_channels}, "
                f"kernel_size={self.kernel_size}, rank={self.rank}, conv_scheme={self.conv_scheme!r}")


class SparseLinear(nn.Module):
    """y = W x + b with W (out × in) held in CSR form: ``crow_indices`` (out + 1), ``col_indices`` and ``values``
    (nnz each), as buffers, indices in int32 when they fit (faster on CPU, and 4 bytes less per nonzero).

    A float16 or bfloat16 layer on the CPU, which has no CSR product kernels in those dtypes, multiplies in
    float32 and returns its own dtype (``bench/bench_sparse_half.py`` measures what that costs).

    Args:
        in_features, out_features: the dense layer's sizes.
        nnz: number of stored nonzeros.
        bias: keep a dense bias.

    Use :meth:`from_dense` or :meth:`from_indices` to build one from a layer.
    """

    def __init__(self, in_features: int, out_features: int, nnz: int, bias: bool = True) -> None:
        super().__init__()
        self.in_features, self.out_features = int(in_features), int(out_features)
        idx_dtype = torch.int32 if max(nnz, in_features) < 2**31 else torch.int64
        self.register_buffer("crow_indices", torch.zeros(self.out_features + 1, dtype=idx_dtype))
        self.register_buffer("col_indices", torch.zeros(int(nnz), dtype=idx_dtype))
        self.register_buffer("values", torch.zeros(int(nnz)))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    @property
    def nnz(self) -> int:
        return int(self.values.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(1, self.in_features * self.out_features)

    @classmethod
    def from_indices(cls, linear: nn.Linear, indices: Tensor, values: Tensor) -> "SparseLinear":
        """The layer whose weight is zero except ``weight.view(-1)[indices] = values`` (``linear``'s bias).

        Raises:
            ValueError: indices out of range, unsorted or repeated, or a length mismatch with ``values``.
        """
        o, i = linear.out_features, linear.in_features
        idx = indices.reshape(-1).long().cpu()
        vals = values.reshape(-1)
        if idx.numel() != vals.numel():
            raise ValueError(f"SparseLinear: {idx.numel()} indices but {vals.numel()} values")
        if idx.numel() and (int(idx[0]) < 0 or int(idx[-1]) >= o * i or bool((idx[1:] <= idx[:-1]).any())):
            raise ValueError(f"SparseLinear: indices must be strictly increasing and in [0, {o * i})")
        p = linear.weight
        m = cls(i, o, idx.numel(), bias=linear.bias is not None).to(dtype=p.dtype)
        rows = torch.div(idx, i, rounding_mode="floor")
        counts = torch.bincount(rows, minlength=o)
        crow = torch.zeros(o + 1, dtype=torch.int64)
        crow[1:] = torch.cumsum(counts, 0)
        m.crow_indices = crow.to(m.crow_indices.dtype)
        m.col_indices = (idx - rows * i).to(m.col_indices.dtype)
        m.values = vals.detach().to("cpu", p.dtype).clone()
        if linear.bias is not None:
            with torch.no_grad():
                m.bias.copy_(linear.bias)
        return m.to(p.device)

    @classmethod
    def from_dense(cls, linear: nn.Linear) -> "SparseLinear":
        """The layer holding ``linear``'s nonzero weights."""
        flat = linear.weight.detach().reshape(-1)
        idx = torch.nonzero(flat).reshape(-1)
        return cls.from_indices(linear, idx, flat[idx])

    def weight_csr(self) -> Tensor:
        """The weight as a torch sparse CSR tensor sharing memory with the buffers.

        Built once and reused while the buffers stay the same tensors (a ``.to()`` or a load rebuilds it).
        """
        bufs = (self.crow_indices, self.col_indices, self.values)
        key = tuple((b.data_ptr(), b.device, b.dtype, b.numel()) for b in bufs)
        cached = self.__dict__.get("_csr")
        if cached is None or cached[0] != key:
            w = torch.sparse_csr_tensor(*bufs, (self.out_features, self.in_features), check_invariants=False)
            self.__dict__["_csr"] = cached = (key, w)
        return cached[1]

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        w, bias, out_dtype = self.weight_csr(), self.bias, None
        x2 = x.reshape(-1, self.in_features)
        if x.device.type == "cpu" and w.dtype in _HALF:
            # CPU CSR products have no float16/bfloat16 kernels: compute in float32 (a CSR over float32 copies of
            # the values, built per call: O(nnz)) and round the result back, as a half-precision dense layer would
            out_dtype = torch.promote_types(x.dtype, w.dtype)
            w = torch.sparse_csr_tensor(self.crow_indices, self.col_indices, self.values.float(), w.shape,
                                        check_invariants=False)
            bias = None if bias is None else bias.float()
            xt = torch.empty((self.in_features, x2.shape[0]), dtype=torch.float32).copy_(x2.t())  # one pass
        elif x.device.type == "cpu" and x2.shape[0] == 1 and x2.dtype == w.dtype:
            # one input row: the CSR matrix-vector product (MKL's), 2-4x faster than the CSR × dense product
            y = torch.mv(w, x2[0])
            y = (y if bias is None else y + bias).reshape(*lead, self.out_features)
            return y
        elif x.device.type == "cpu" and x2.shape[0] >= SPARSE_BAG_MIN_ROWS and x2.dtype == w.dtype:
            # many rows: y[:, r] = Σ values · Xᵀ[cols] as one weighted embedding bag per output row (rows of Xᵀ
            # gathered whole: 2-3x faster than the CSR × dense product at 64 rows)
            y = F.embedding_bag(self.col_indices, x2.t().contiguous(), self.crow_indices, mode="sum",
                                per_sample_weights=self.values, include_last_offset=True).t()
            y = (y if bias is None else y + bias).reshape(*lead, self.out_features)
            return y
        else:
            xt = x2.t().contiguous()
        # W @ Xᵀ with a contiguous right-hand side is the fastest CSR × dense product on CPU; addmm adds the bias
        # in the same kernel
        y = w @ xt if bias is None else torch.addmm(bias.unsqueeze(1), w, xt)
        y = y.t().reshape(*lead, self.out_features)
        return y if out_dtype is None else y.to(out_dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, nnz={self.nnz}, "
                f"density={self.density:.4f}")


#: Weights decoded at a time by :class:`CodebookLinear` (a tile of rows; 4 MiB of float32). Measured with
#: ``bench/bench_compact_memory.py``: on a 4096×4096 layer at K = 2, 4 and 16, decoding tiles of 2²⁰ weights and
#: multiplying each while it is in cache was 2.5–6× faster at batch 1 and about 2× faster at batch 64 than
#: decoding the whole weight per call, and faster than tiles of 2¹⁶ or 2¹⁸ weights in every case
#: (``bench/RESULTS.md``).
CODEBOOK_TILE_WEIGHTS = 1 << 20


#: What a decoding layer may keep between calls (:func:`set_cache`): ``"none"`` (the default: only the compact form
#: is resident and every call decodes), ``"weight"`` (the decoded weight, at the layer's dtype: dense speed, and the
#: dense weight's bytes on top of the compact form's) and, for :class:`GroupedIntLinear` only, ``"codes"`` (the
#: codes unpacked to one byte each: a call converts and scales them, skipping the bit unpacking).
CACHE_MODES = ("none", "codes", "weight")


def _init_cache(m: nn.Module) -> None:
    m.cache = "none"
    # a non-persistent buffer: moved by .to(), never saved, and counted by resident_bytes() like every buffer
    m.register_buffer("cached", None, persistent=False)


def _set_cache_method(self, mode: str = "weight"):
    """Keep what ``forward`` decodes between calls (``"weight"``, or ``"codes"`` for :class:`GroupedIntLinear`),
    or nothing (``"none"``, the default). The cache is a non-persistent buffer named ``cached``: it follows
    ``.to()``, is not written by ``state_dict()``, is rebuilt by ``load_state_dict()``, and is counted by
    :func:`resident_bytes`.

    Returns:
        the module.

    Raises:
        ValueError: a mode the layer does not have.
    """
    modes = getattr(self, "_cache_modes", ("none", "weight"))
    if mode not in modes:
        raise ValueError(f"cache={mode!r} must be one of {modes} for {type(self).__name__}")
    self.cache = mode
    self.cached = None
    if mode != "none":
        with torch.no_grad():
            self.cached = self._make_cache(mode)
    return self


def _refresh_cache(m: nn.Module) -> None:
    if getattr(m, "cache", "none") != "none":
        with torch.no_grad():
            m.cached = m._make_cache(m.cache)


def _tile_buffer(x: Tensor, numel: int, like: Tensor) -> Tensor | None:
    """One buffer for the decoded tiles of a call (a fresh multi-MB tensor per tile costs its page faults), or None
    where autograd may save a tile for the backward pass (each tile then gets its own tensor)."""
    if torch.is_grad_enabled() and (x.requires_grad or like.requires_grad):
        return None
    return torch.empty(numel, dtype=like.dtype, device=like.device)


def set_cache(model: nn.Module, mode: str = "weight") -> dict[str, str]:
    """Switch the decode cache of every compact layer of ``model`` that has ``mode`` (see :data:`CACHE_MODES`).

    ``"weight"`` trades memory for speed: each decoding layer (codebook, grouped-int) keeps its decoded weight and
    runs as fast as a dense layer, holding the dense weight's bytes besides its compact form (see
    :func:`resident_bytes`). ``"none"`` drops every cache.

    Returns:
        ``{module name: mode}`` for every layer switched.

    Raises:
        ValueError: ``mode`` is not one of :data:`CACHE_MODES`.
    """
    if mode not in CACHE_MODES:
        raise ValueError(f"mode={mode!r} must be one of {CACHE_MODES}")
    done = {}
    for name, mod in model.named_modules():
        if mode in getattr(mod, "_cache_modes", ("none", "weight") if hasattr(mod, "_make_cache") else ()):
            mod.set_cache(mode)
            done[name] = mode
    return done


def resident_bytes(module: nn.Module, by_tensor: bool = False) -> int | dict[str, int]:
    """Bytes of the tensors a module holds: its parameters and buffers (decode caches included), each storage
    counted once (a codebook shared by several layers, tied weights).

    Args:
        module: any module (a compact layer, a whole model).
        by_tensor: return ``{tensor name: bytes}`` (a storage under its first name) instead of the total.
    """
    if not by_tensor:
        return _packed.resident_bytes(module)
    seen: set[tuple[int, torch.device]] = set()
    out: dict[str, int] = {}
    named = list(module.named_parameters(remove_duplicate=False)) + list(module.named_buffers(remove_duplicate=False))
    for name, t in named:
        st = t.untyped_storage()
        key = (st.data_ptr(), t.device)
        if key in seen:
            continue
        seen.add(key)
        out[name] = st.nbytes()
    return out


def _check_codes(codes: Tensor, k: int, p: Tensor, what: str) -> None:
    if codes.numel() != p.numel():
        raise ValueError(f"{what}: {codes.numel()} codes for a weight of shape {tuple(p.shape)}")
    if codes.is_floating_point() or codes.is_complex():
        raise TypeError(f"{what}: codes must be an integer tensor, got dtype={codes.dtype}")
    if codes.numel() and (int(codes.min()) < 0 or int(codes.max()) >= k):
        raise ValueError(f"{what}: codes must lie in [0, {k})")


class _PackedCodes(nn.Module):
    """Shared state of the codebook layers: ``packed_codes`` (the codes of the weight, flattened row-major,
    bit-packed at ⌈log₂ K⌉ bits as :mod:`lcompress._packed` lays them out) and ``codebook`` (K,) at the layer's
    dtype, both buffers."""

    def _init_codes(self, shape: tuple[int, ...], k: int) -> None:
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"k={k!r} must be an integer >= 1 (the codebook size)")
        self.k, self.weight_shape = int(k), tuple(int(s) for s in shape)
        n = math.prod(self.weight_shape)
        dtype = torch.uint8 if index_bits(self.k) <= 8 else _packed._unpacked_dtype(self.k)
        self.register_buffer("packed_codes", torch.zeros(_packed.packed_bytes(n, self.k), dtype=dtype))
        self.register_buffer("codebook", torch.zeros(self.k))
        _init_cache(self)

    set_cache = _set_cache_method

    def _make_cache(self, mode: str) -> Tensor:
        return self.decoded_weight()

    def _fill(self, codebook: Tensor, codes: Tensor, p: Tensor, what: str) -> None:
        if codebook.numel() != self.k:
            raise ValueError(f"{what}: a codebook of {codebook.numel()} entries for k={self.k}")
        _check_codes(codes, self.k, p, what)
        cb = codebook.detach() if codebook.requires_grad else codebook
        if cb.dtype != p.dtype or cb.device != p.device:
            cb = cb.to(p.device, p.dtype)
        self.codebook = cb if cb.dim() == 1 else cb.reshape(-1)
        self.packed_codes = _packed.pack_codes(codes.to(p.device), self.k)

    @property
    def codes(self) -> Tensor:
        """The codes, unpacked to the weight's shape (a new tensor; uint8 for K ≤ 256)."""
        n = math.prod(self.weight_shape)
        return _packed.unpack_codes(self.packed_codes, n, self.k).reshape(self.weight_shape)

    def decoded_weight(self) -> Tensor:
        """The decoded weight codebook[codes] (a new tensor)."""
        n = math.prod(self.weight_shape)
        return _packed.Decoder(self.packed_codes, self.codebook, self.k).values(0, n).reshape(self.weight_shape)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        old = prefix + "codes"
        if old in state_dict and prefix + "packed_codes" not in state_dict:  # a state dict of unpacked codes
            state_dict[prefix + "packed_codes"] = _packed.pack_codes(state_dict.pop(old), self.k)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        key = prefix + "packed_codes"
        pc = state_dict.get(key)
        if isinstance(pc, Tensor) and pc.dtype != self.packed_codes.dtype:
            error_msgs.append(f"{key}: dtype {pc.dtype}, expected {self.packed_codes.dtype} for k={self.k}")
        elif isinstance(pc, Tensor) and pc.numel() == self.packed_codes.numel() and self.k & (self.k - 1):
            # a K that is not a power of two leaves room for codes ≥ K (padding included: every stored code)
            w = index_bits(self.k)
            n = pc.numel() * 8 // w if w <= 8 else pc.numel()
            if n and int(_packed.unpack_codes(pc, n, self.k).max()) >= self.k:
                error_msgs.append(f"{key}: holds a code >= k={self.k}")
        _refresh_cache(self)


class CodebookLinear(_PackedCodes):
    """A Linear layer with weight codebook[codes], keeping the codes bit-packed in memory.

    ``packed_codes`` holds the (out, in) codes at ⌈log₂ K⌉ bits each (uint8 bytes, see :mod:`lcompress._packed`;
    K > 256 keeps int16/int32 codes) and ``codebook`` (K,) the values at the layer's dtype, both buffers, so the
    resident weight memory is about what the ``.lcz`` file stores for it: 1/32 of a float32 weight at K = 2.
    ``forward`` decodes the weight a tile of rows at a time (about ``tile_weights`` weights) and multiplies each
    tile while it is in cache; no decoded weight outlives the call.

    Args:
        in_features, out_features: the layer's sizes.
        k: the codebook size K.
        bias: keep a dense bias.
        tile_weights: weights decoded at a time (default :data:`CODEBOOK_TILE_WEIGHTS`); None decodes the whole
            weight in each call (one matrix product: what ``torch.onnx.export`` of a large layer wants).
    """

    def __init__(self, in_features: int, out_features: int, k: int, bias: bool = True,
                 tile_weights: int | None = CODEBOOK_TILE_WEIGHTS) -> None:
        super().__init__()
        if tile_weights is not None and (isinstance(tile_weights, bool) or not isinstance(tile_weights, int)
                                         or tile_weights < 1):
            raise ValueError(f"tile_weights={tile_weights!r} must be a positive integer or None")
        self.in_features, self.out_features, self.tile_weights = int(in_features), int(out_features), tile_weights
        self._init_codes((self.out_features, self.in_features), k)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    @classmethod
    def from_codes(cls, linear: nn.Linear, codebook: Tensor, codes: Tensor,
                   tile_weights: int | None = CODEBOOK_TILE_WEIGHTS) -> "CodebookLinear":
        """The layer with weight ``codebook[codes]`` and ``linear``'s bias.

        ``codebook`` is kept as given when it already has the layer's dtype and device, so several layers of a
        joint task share one codebook tensor.

        Raises:
            ValueError: ``codes`` does not have the weight's number of elements, or holds a code ≥ K.
        """
        p = linear.weight
        m = cls(linear.in_features, linear.out_features, codebook.numel(), bias=linear.bias is not None,
                tile_weights=tile_weights)
        m.to(p.device, p.dtype)
        m._fill(codebook, codes, p, "CodebookLinear")
        if linear.bias is not None:
            with torch.no_grad():
                m.bias.copy_(linear.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        if self.cached is not None:
            return F.linear(x, self.cached, self.bias)
        o, i = self.out_features, self.in_features
        dec = _packed.Decoder(self.packed_codes, self.codebook, self.k)
        rows = o if self.tile_weights is None else _packed.tile_rows(i, self.tile_weights)
        if rows >= o:
            return F.linear(x, dec.values(0, o * i).view(o, i), self.bias)
        b = self.bias
        buf = _tile_buffer(x, rows * i, self.codebook)
        ys = []
        for r in range(0, o, rows):
            n = min(rows, o - r)
            w = dec.values(r * i, n * i, out=None if buf is None else buf[: n * i]).view(n, i)
            ys.append(F.linear(x, w, None if b is None else b[r : r + n]))
        return torch.cat(ys, dim=-1)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, k={self.k}"


#: Weights decoded at a time by :class:`GroupedIntLinear` (a tile of rows, decoded into one reused buffer and
#: multiplied while it is in cache). Measured with ``bench/bench_compact_speed.py`` (``grouped_tiles``: int4 g64,
#: 4096×4096, 15 interleaved repeats, load average 3.5–4 on the 2 cores): at batch 1 tiles of 2²⁰ weights took
#: 4.3× (1 thread) and 3.3× (2 threads) the dense time, 2¹⁸ 5.6×, 2¹⁶ 9–13× (each tile's dozen ops cost their
#: per-op overhead), the whole weight 15–28× (a fresh 64 MB tensor a call); at batch 64 tiles of 2¹⁷–2²⁰ were
#: within noise of each other (1.06–1.28×) and the whole weight 2.2–2.5×. Tiles beat decoding the whole weight at
#: every batch size measured, so there is no batch size from which the layer decodes it whole.
GROUPED_TILE_WEIGHTS = 1 << 20

#: The top bit of every field of a byte of b-bit codes (b = 2, 4, 8): XOR-ing it turns the stored unsigned code
#: u = q + 2^(b−1) into q's two's complement, so an arithmetic shift yields q itself.
_SIGN_BITS = {2: 0xAA, 4: 0x88, 8: 0x80}


def _unpack_fields(seg: Tensor, bits: int, signed: bool, out: Tensor) -> None:
    """Field t of every byte of ``seg`` (n, L) into ``out[:, t, :]`` (n, 8/bits, L), converted to out's dtype:
    q = u − 2^(b−1) when ``signed``, else u. Whole-row slices, so every copy is contiguous (the columns come out
    permuted: column 8/b·j + t of the row lands at t·L + j)."""
    per = 8 // bits
    src = torch.bitwise_xor(seg, _SIGN_BITS[bits]) if signed else seg
    mask = (1 << bits) - 1
    for t in range(per):  # a loop over the ≤ 4 fields of a byte, not over codes
        lo = bits * t
        if signed:
            top = src if t == per - 1 else torch.bitwise_left_shift(src, 8 - lo - bits)  # field t to the top bits
            f = top.view(torch.int8)
            if bits < 8:
                f = torch.bitwise_right_shift(f, 8 - bits)  # arithmetic: sign-extends
        else:
            f = src if bits == 8 else (torch.bitwise_right_shift(src, lo) if t else src)
            if t < per - 1:
                f = torch.bitwise_and(f, mask)
        out[:, t, :].copy_(f)


def _mul_groups(w3: Tensor, s: Tensor, q: int) -> None:
    """w3 (n, P, L) *= the scale of each column's group, in place: along L the columns run in groups of q (the
    last one shorter when q does not divide L), group j taking s[:, j] (s: (n, ⌈L / q⌉))."""
    n, p, length = w3.shape
    full = length // q
    if full:
        w3[:, :, : full * q].view(n, p, full, q).mul_(s[:, None, :full, None])
    if full * q < length:
        w3[:, :, full * q :].mul_(s[:, None, full : full + 1])


def _group_sums(x2: Tensor, group: int) -> Tensor:
    """(B, I) → (B, ⌈I / group⌉): the sum of x over each group of inputs (the last one shorter)."""
    b, i = x2.shape
    full = i // group
    parts = [x2[:, : full * group].reshape(b, full, group).sum(-1)] if full else []
    if full * group < i:
        parts.append(x2[:, full * group :].sum(-1, keepdim=True))
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)


class GroupedIntLinear(nn.Module):
    """y = x Δᵀ + b for a Linear weight compressed by :class:`lcompress.GroupedIntQuantization`, keeping Θ in memory.

    Each row is cut into groups of ``group`` inputs (the last one shorter when ``group`` does not divide the row);
    group j of row r stores b-bit unsigned codes u and a scale s (and an offset m):

    * symmetric: Δ = s·(u − 2^(b−1));
    * asymmetric: Δ = s·u + m.

    What is resident (buffers, counted by :func:`resident_bytes`):

    * ``packed_codes``: the (out, in) codes row-major, bit-packed at b bits (:mod:`lcompress._packed`'s layout,
      ⌈out·in / 8⌉·b bytes);
    * ``scales`` (and ``mins``): (out, ⌈in / group⌉) at the stored dtype (float16 by default), as in Θ; they keep
      that dtype when the module is moved to another dtype;
    * ``bias`` at the layer's dtype; and ``cached`` when :meth:`set_cache` is on (``"codes"``: one int8 per weight;
      ``"weight"``: the decoded weight at the layer's dtype). Nothing else outlives a call.

    ``forward`` decodes the weight a tile of rows at a time into one reused buffer and multiplies each tile while
    it is in cache (a BLAS product per tile, at every batch size: tiles measured faster than decoding the whole
    weight at batch 1 and 64 alike, see :data:`GROUPED_TILE_WEIGHTS`). For 2-, 4- and 8-bit codes whose groups and rows
    are whole bytes, a tile is decoded by shifts on the packed bytes (a field of every byte at once, straight to
    the signed q for symmetric codes) with its columns permuted, and the input is permuted to match; other widths
    decode through :class:`lcompress._packed.Decoder`'s table. An asymmetric layer adds the offsets as
    (group sums of x) · mᵀ, a product of ⌈in / group⌉ columns.

    Args:
        in_features, out_features: the layer's sizes.
        bits: the code width b, 2..8.
        group: inputs per group, ≥ 1.
        symmetric: Δ = s·(u − 2^(b−1)) (no offsets) or s·u + m.
        bias: keep a bias.
        scale_dtype: the dtype of the scales (and offsets).
        tile_weights: weights decoded at a time (default :data:`GROUPED_TILE_WEIGHTS`); None decodes the whole
            weight in each call.

    Use :meth:`from_theta` to build one from a layer and its Θ.
    """

    _cache_modes = CACHE_MODES

    def __init__(self, in_features: int, out_features: int, bits: int, group: int, symmetric: bool = True,
                 bias: bool = True, scale_dtype: torch.dtype = torch.float16,
                 tile_weights: int | None = GROUPED_TILE_WEIGHTS) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits={bits!r} must be an integer in [2, 8]")
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise ValueError(f"group={group!r} must be a positive integer")
        if not isinstance(symmetric, bool):
            raise TypeError(f"symmetric={symmetric!r} must be True or False")
        if tile_weights is not None and (isinstance(tile_weights, bool) or not isinstance(tile_weights, int)
                                         or tile_weights < 1):
            raise ValueError(f"tile_weights={tile_weights!r} must be a positive integer or None")
        if not (isinstance(scale_dtype, torch.dtype) and scale_dtype.is_floating_point):
            raise ValueError(f"scale_dtype={scale_dtype!r} must be a floating-point torch.dtype")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.group, self.symmetric, self.tile_weights = bits, group, symmetric, tile_weights
        self.groups = -(-self.in_features // group)
        self.dtype = torch.get_default_dtype()  # the layer's (decoded weight's) dtype; follows .to()
        n = self.out_features * self.in_features
        self.register_buffer("packed_codes", torch.zeros(_packed.packed_bytes(n, 1 << bits), dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(self.out_features, self.groups, dtype=scale_dtype))
        self.mins: Tensor | None
        self.register_buffer("mins", None if symmetric else torch.zeros(self.out_features, self.groups,
                                                                         dtype=scale_dtype))
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None
        _init_cache(self)

    @classmethod
    def from_theta(cls, linear: nn.Linear, theta: Mapping[str, Tensor], bits: int, group: int, symmetric: bool = True,
                   tile_weights: int | None = GROUPED_TILE_WEIGHTS) -> "GroupedIntLinear":
        """The layer with ``linear``'s sizes, bias and dtype holding Θ = ``{"codes": (out·in,) unsigned in [0, 2^b),
        "scales": (out, groups), "mins": (out, groups) (asymmetric only)}`` (``GroupedIntQuantization``'s Θ).

        Raises:
            ValueError: Θ's shapes do not fit the layer and group, codes out of range, offsets missing or extra.
        """
        o, i = linear.out_features, linear.in_features
        codes, scales, mins = theta["codes"], theta["scales"], theta.get("mins")
        ng = -(-i // group) if isinstance(group, int) and group >= 1 else None
        if codes.numel() != o * i:
            raise ValueError(f"GroupedIntLinear: {codes.numel()} codes for a weight of shape ({o}, {i})")
        if codes.is_floating_point() or codes.is_complex():
            raise TypeError(f"GroupedIntLinear: codes must be an integer tensor, got dtype={codes.dtype}")
        if tuple(scales.shape) != (o, ng):
            raise ValueError(f"GroupedIntLinear: scales of shape {tuple(scales.shape)}; a ({o}, {i}) weight in "
                             f"groups of {group} needs ({o}, {ng})")
        if symmetric != (mins is None) or (mins is not None and tuple(mins.shape) != (o, ng)):
            raise ValueError(f"GroupedIntLinear: symmetric={symmetric} " + (
                "takes no mins" if symmetric else f"needs mins of shape ({o}, {ng})"))
        p = linear.weight
        m = cls(i, o, bits, group, symmetric, bias=linear.bias is not None, scale_dtype=scales.dtype,
                tile_weights=tile_weights)
        m.to(p.device, p.dtype)
        m.packed_codes = _packed.pack_codes(codes.detach().reshape(-1).to(p.device), 1 << bits)
        m.scales = scales.detach().to(p.device).clone()
        if mins is not None:
            m.mins = mins.detach().to(p.device, scales.dtype).clone()
        if linear.bias is not None:
            with torch.no_grad():
                m.bias.copy_(linear.bias)
        return m

    # -- dtype: the layer's dtype follows .to()/.half(); the scales keep Θ's --------------------------------------
    def _apply(self, fn, recurse=True):
        keep = {k: self._buffers.pop(k) for k in ("scales", "mins")}
        try:
            super()._apply(fn, recurse)
        finally:
            dev = self.packed_codes.device
            for k, t in keep.items():
                self._buffers[k] = None if t is None else t.to(dev)
        self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype
        return self

    @property
    def codes(self) -> Tensor:
        """The (out, in) unsigned codes, unpacked (a new uint8 tensor)."""
        n = self.out_features * self.in_features
        return _packed.unpack_codes(self.packed_codes, n, 1 << self.bits).view(self.out_features, self.in_features)

    def decoded_weight(self) -> Tensor:
        """Δ(Θ) (out, in) at the layer's dtype (a new tensor), computed as the codec's Δ is: in float32, the
        scales expanded over their groups."""
        i = self.in_features
        u = self.codes.float()

        def ex(t):
            return t.float().repeat_interleave(self.group, dim=1)[:, :i]

        w = ex(self.scales) * (u - (1 << (self.bits - 1))) if self.symmetric else ex(self.scales) * u + ex(self.mins)
        return w.to(self.dtype)

    def _fields(self) -> int:
        """Codes per byte when a tile decodes by shifts (the rows and the groups are whole bytes), else 0."""
        per = 8 // self.bits if self.bits in (2, 4, 8) else 0
        return per if per and self.in_features % per == 0 and self.group % per == 0 else 0

    set_cache = _set_cache_method

    def _make_cache(self, mode: str) -> Tensor:
        if mode == "weight":
            return self.decoded_weight()
        o, i, per = self.out_features, self.in_features, self._fields()
        dt = torch.int8 if self.symmetric else torch.uint8
        if per:  # the layout the forward's tiles have: columns permuted as _unpack_fields writes them
            out = torch.empty(o, per, i // per, dtype=dt, device=self.packed_codes.device)
            _unpack_fields(self.packed_codes[: o * (i // per)].view(o, i // per), self.bits, self.symmetric, out)
            return out.view(o, i)
        u = self.codes
        return (u.to(torch.int16) - (1 << (self.bits - 1))).to(dt) if self.symmetric else u

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        _refresh_cache(self)

    def forward(self, x: Tensor) -> Tensor:
        if self.cache == "weight" and self.cached is not None:
            return F.linear(x, self.cached, self.bias)
        o, i, per, dt = self.out_features, self.in_features, self._fields(), self.dtype
        lead = x.shape[:-1]
        x2 = x.reshape(-1, i)
        s = self.scales.to(dt)
        codes = self.cached if self.cache == "codes" else None
        tw = self.tile_weights
        if per:
            length = i // per
            xk = x2.reshape(-1, length, per).transpose(1, 2).reshape(-1, i)  # the tiles' column order
            rows = o if tw is None else max(1, tw // max(i, 1))
            packed = self.packed_codes[: o * length].view(o, length)
            dec = None
        else:
            xk, length, per = x2, i, 1
            rows = o if tw is None else _packed.tile_rows(i, tw)
            table = torch.arange(1 << self.bits, dtype=dt, device=s.device)
            dec = _packed.Decoder(self.packed_codes, table - (1 << (self.bits - 1)) if self.symmetric else table,
                                  1 << self.bits)
        rows = min(rows, o)
        buf = _tile_buffer(x, rows * i, s)
        b = self.bias
        ys = []
        for r in range(0, o, rows):
            n = min(rows, o - r)
            w = (torch.empty(n * i, dtype=dt, device=s.device) if buf is None else buf[: n * i]).view(n, per, length)
            if codes is not None:
                w.view(n, i).copy_(codes[r : r + n])
            elif dec is None:
                _unpack_fields(packed[r : r + n], self.bits, self.symmetric, w)
            else:
                dec.values(r * i, n * i, out=w)
            _mul_groups(w, s[r : r + n], self.group // per)
            ys.append(F.linear(xk, w.view(n, i), None if b is None else b[r : r + n]))
        y = ys[0] if len(ys) == 1 else torch.cat(ys, dim=-1)
        if not self.symmetric:
            y = torch.addmm(y, _group_sums(x2, self.group), self.mins.to(dt).t())
        return y.reshape(*lead, o)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group={self.group}, symmetric={self.symmetric}, scale_dtype={self.scales.dtype}, cache={self.cache!r}")


class SumLinear(nn.Module):
    """y = Σᵢ partᵢ(x) + b: a Linear weight compressed by a sum Δ = Σᵢ Δᵢ(Θᵢ) (:class:`lcompress.AdditiveCombination`),
    each part held as its own compact layer without a bias (e.g. grouped ints + sparse outliers:
    :class:`GroupedIntLinear` + :class:`SparseLinear`), so what is resident is the parts' compact forms.

    Args:
        parts: the parts' compact layers (each maps in_features → out_features, no bias).
        in_features, out_features: the layer's sizes.
        bias: keep a bias (added once).
    """

    def __init__(self, parts: Sequence[nn.Module], in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__()
        if len(parts) < 1:
            raise ValueError("SumLinear needs at least one part")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.parts = nn.ModuleList(parts)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        y = self.parts[0](x)
        for p in self.parts[1:]:
            y = y + p(x)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


class _LayerShape:
    """What the compact layers' constructors read of a Linear layer (sizes, dtype, device; no bias), without a
    dense weight: the stand-in for a part of a sum."""

    def __init__(self, mod: nn.Module) -> None:
        self.in_features, self.out_features, self.bias = mod.in_features, mod.out_features, None
        w = mod.weight
        self.weight = torch.zeros((), dtype=w.dtype, device=w.device).expand(w.shape)


def _conv_padding(padding, kernel_size, dilation) -> list[int]:
    """F.pad amounts (left, right, top, bottom) for an nn.Conv2d padding spec."""
    if padding == "valid":
        return [0, 0, 0, 0]
    if padding == "same":
        out = []
        for k, d in zip(reversed(kernel_size), reversed(dilation)):
            total = d * (k - 1)
            out += [total // 2, total - total // 2]
        return out
    ph, pw = _pair(padding)
    return [pw, pw, ph, ph]


class CodebookConv2d(_PackedCodes):
    """A Conv2d with weight codebook[codes], the codes bit-packed in memory (see :class:`CodebookLinear`).

    The whole weight is decoded in each ``forward`` call and freed after it: a conv reuses every weight at each
    output position, so one decode is small beside the convolution, and tiling by output channels would repeat
    the convolution's input unfolding per tile.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias, padding_mode: as for
            :class:`torch.nn.Conv2d`.
        k: the codebook size K.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        k: int,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
    ) -> None:
        super().__init__()
        self.in_channels, self.out_channels, self.groups = int(in_channels), int(out_channels), groups
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        self.padding = padding if isinstance(padding, str) else _pair(padding)
        self.padding_mode = padding_mode
        self._init_codes((self.out_channels, self.in_channels // groups, *self.kernel_size), k)
        self.bias = nn.Parameter(torch.zeros(self.out_channels)) if bias else None

    @classmethod
    def from_codes(cls, conv: nn.Conv2d, codebook: Tensor, codes: Tensor) -> "CodebookConv2d":
        """The conv with ``conv``'s geometry and bias and weight ``codebook[codes]``.

        Raises:
            ValueError: ``codes`` does not have the weight's number of elements, or holds a code ≥ K.
        """
        p = conv.weight
        m = cls(conv.in_channels, conv.out_channels, conv.kernel_size, codebook.numel(), conv.stride, conv.padding,
                conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode)
        m.to(p.device, p.dtype)
        m._fill(codebook, codes, p, "CodebookConv2d")
        if conv.bias is not None:
            with torch.no_grad():
                m.bias.copy_(conv.bias)
        return m

    def forward(self, x: Tensor) -> Tensor:
        w = self.cached if self.cached is not None else self.decoded_weight()
        if self.padding_mode != "zeros":
            x = F.pad(x, _conv_padding(self.padding, self.kernel_size, self.dilation), mode=self.padding_mode)
            return F.conv2d(x, w, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, k={self.k}, "
                f"stride={self.stride}, padding={self.padding}")


class CodebookEmbedding(_PackedCodes):
    """An embedding table whose row r is codebook[r][codes[r]]: each row its own K-entry codebook
    (:class:`lcompress.RowwiseQuantization`), the codes bit-packed in memory.

    ``packed_codes`` holds the (num_embeddings, embedding_dim) codes at ⌈log₂ K⌉ bits, each row padded to a whole
    number of 8-code groups (none when the dimension is a multiple of 8), so a lookup unpacks only the rows it
    reads; ``codebook`` (num_embeddings, K) holds the rows' values at the layer's dtype.

    Args:
        num_embeddings, embedding_dim: the table's sizes.
        k: the entries of each row's codebook.
        padding_idx: kept for the record, as :class:`torch.nn.Embedding` (it affects only training).
    """

    def __init__(self, num_embeddings: int, embedding_dim: int, k: int, padding_idx: int | None = None) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = int(num_embeddings), int(embedding_dim), padding_idx
        self._init_codes((self.num_embeddings, self.embedding_dim), k)
        self.row_bytes = _packed.packed_bytes(self.embedding_dim, self.k)
        self.packed_codes = self.packed_codes.new_zeros(self.num_embeddings * self.row_bytes)
        self.codebook = torch.zeros(self.num_embeddings, self.k)

    @classmethod
    def from_codes(cls, embedding: nn.Embedding, codebook: Tensor, codes: Tensor) -> "CodebookEmbedding":
        """The table with ``embedding``'s sizes whose row r is ``codebook[r][codes[r]]``.

        Raises:
            ValueError: ``codebook`` is not (num_embeddings, K), ``codes`` does not have the table's number of
                elements, or holds a code ≥ K.
        """
        p = embedding.weight
        v, d = p.shape
        if codebook.dim() != 2 or codebook.shape[0] != v:
            raise ValueError(f"CodebookEmbedding: codebook of shape {tuple(codebook.shape)} for {v} rows")
        m = cls(v, d, int(codebook.shape[1]), embedding.padding_idx).to(p.device, p.dtype)
        _check_codes(codes, m.k, p, "CodebookEmbedding")
        codes = codes.detach().to(p.device).reshape(v, d)
        pad = -(-d // _packed.GROUP) * _packed.GROUP - d
        m.packed_codes = _packed.pack_codes(F.pad(codes, (0, pad)) if pad else codes, m.k)
        m.codebook = codebook.detach().to(p.device, p.dtype).clone()
        return m

    def _row_codes(self, rows: Tensor | None) -> Tensor:
        """(rows, embedding_dim) codes of the given rows (None: every row)."""
        d = self.embedding_dim
        dpad = -(-d // _packed.GROUP) * _packed.GROUP if index_bits(self.k) <= 8 else d
        packed = self.packed_codes.view(self.num_embeddings, self.row_bytes)
        sel = packed if rows is None else packed[rows]
        n = sel.shape[0]
        return _packed.unpack_codes(sel.reshape(-1), n * dpad, self.k).view(n, dpad)[:, :d]

    @property
    def codes(self) -> Tensor:
        return self._row_codes(None).clone()

    def decoded_weight(self) -> Tensor:
        return torch.gather(self.codebook, 1, self._row_codes(None).long())

    def forward(self, ids: Tensor) -> Tensor:
        if self.cached is not None:
            return F.embedding(ids, self.cached)
        flat = ids.reshape(-1)
        out = torch.gather(self.codebook[flat], 1, self._row_codes(flat).long())
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, k={self.k}"


# ---- converting a model ------------------------------------------------------------------------------------
def task_specs(
    param_names: Sequence[str],
    shapes: Sequence[Sequence[int]],
    compression: Any,
    conv_scheme: str = "scheme_1",
) -> dict[str, dict[str, Any]]:
    """Split one task's Θ into per-parameter compact forms for :func:`compact_model`.

    The compression's codec (:mod:`lcompress.codecs`) says what its Θ becomes: a codebook layer per parameter
    (a joint task's layers share one codebook tensor), a sparse layer per parameter (a joint support split by
    parameter), a low-rank pair for one matrix or conv weight, grouped integers for one matrix, a sum of the
    parts' forms for one weight whose every part has one; nothing for a rank selection's dense choice (or a joint
    sum), whose layers stay dense with Δ(Θ) as their weight.

    Args:
        param_names: the task's parameters in task order.
        shapes: their shapes.
        compression: the task's compression, after a C step (its ``theta`` is split).
        conv_scheme: the matrix view of a low-rank task.

    Returns:
        ``{parameter name: spec}``.

    Raises:
        TypeError: ``compression`` is not a compression with a codec.
        ValueError: Θ does not cover the parameters' sizes.
    """
    from .codecs import codec_for

    # the compression's config stands in for a file's record (both name bits, group, ... where a codec needs them)
    return codec_for(compression).compact_specs(compression.theta, compression.config(), list(param_names), shapes,
                                                conv_scheme)


def compact_model(
    model: nn.Module,
    specs: Mapping[str, Mapping[str, Any]],
    sparse_density: float = SPARSE_CROSSOVER_DENSITY,
) -> dict[str, str]:
    """Replace layers whose weight has a compact form by compact modules, in place.

    ``specs`` maps a weight's parameter name (``"fc1.weight"``) to a spec from :func:`task_specs`. For each one
    whose owner is an ``nn.Linear``, ``nn.Conv2d`` or ``nn.Embedding``:

    * codebook → :class:`CodebookLinear` / :class:`CodebookConv2d`;
    * row codebooks (``{"kind": "rowcodebook", "codebook": (rows, K), "codes"}``) of an ``nn.Embedding`` →
      :class:`CodebookEmbedding`;
    * low-rank → :class:`LowRankLinear` / :class:`LowRankConv2d` (when the factors are smaller than the weight
      and, for a conv, ``groups == 1``);
    * sparse → :class:`SparseLinear` when the density is below ``sparse_density``;
    * grouped integers (``{"kind": "groupedint", "codes", "scales", "mins"?, "bits", "group", "symmetric"}``) of
      an ``nn.Linear`` → :class:`GroupedIntLinear`;
    * a sum (``{"kind": "sum", "parts": [spec, ...]}``) of an ``nn.Linear`` whose every part has a compact layer by
      the rules above → :class:`SumLinear` of those layers.

    Any other layer keeps its dense weight (load Δ(Θ) into the model first, as :func:`lcompress.load` does).
    Biases are copied from the layers. A module that appears at several places is replaced at each.

    Args:
        model: the model holding the decoded weights.
        specs: ``{weight name: spec}``.
        sparse_density: the density threshold for :class:`SparseLinear`
            (default :data:`SPARSE_CROSSOVER_DENSITY`).

    Returns:
        ``{module name: compact class name}`` for every replaced module.
    """
    return _apply_compact(model, _plan_compact(model, specs, sparse_density))


def _plan_compact(
    model: nn.Module, specs: Mapping[str, Mapping[str, Any]], sparse_density: float = SPARSE_CROSSOVER_DENSITY
) -> list[tuple[str, nn.Module, nn.Module]]:
    """The compact modules of :func:`compact_model`, built without touching ``model``: [(name, old, new)].

    Everything that can fail (a spec that does not fit its layer) fails here, so :func:`lcompress.load` can
    build the plan before it writes anything into the model, and apply it after.
    """
    if not (isinstance(sparse_density, (int, float)) and 0.0 <= sparse_density <= 1.0):
        raise ValueError(f"sparse_density={sparse_density!r} must be a number in [0, 1]")
    modules = dict(model.named_modules())
    plan: list[tuple[str, nn.Module, nn.Module]] = []
    done: set[str] = set()
    for pname, spec in specs.items():
        mname, _, attr = pname.rpartition(".")
        mod = modules.get(mname)
        if attr != "weight" or mod is None or type(mod) not in (nn.Linear, nn.Conv2d, nn.Embedding) or mname in done:
            continue
        new = _compact_layer(mod, spec, sparse_density, pname)
        if new is None:
            continue
        plan.append((mname, mod, new))
        done.add(mname)
    return plan


def _apply_compact(model: nn.Module, plan: Sequence[tuple[str, nn.Module, nn.Module]]) -> dict[str, str]:
    """Swap the planned modules in (at every place each old one appears), with the old modules' current biases
    and train/eval mode (the biases may have been loaded after the plan was built)."""
    slots = _module_slots(model)
    done: dict[str, str] = {}
    for mname, old, new in plan:
        if getattr(old, "bias", None) is not None:
            bias = new.second.bias if isinstance(new, (LowRankLinear, LowRankConv2d)) else new.bias
            with torch.no_grad():
                bias.copy_(old.bias)
        new.train(old.training)
        for parent, cname in slots.get(mname, []):
            setattr(parent, cname, new)
        done[mname] = type(new).__name__
        logger.debug("compact_model: %s -> %s", mname, done[mname])
    return done


def _compact_choice(
    owner: type, spec: Mapping[str, Any], numel: int, sparse_density: float = SPARSE_CROSSOVER_DENSITY,
    groups: int = 1, max_norm: float | None = None,
) -> tuple[type | None, str]:
    """What :func:`compact_model` makes of a weight of ``numel`` weights owned by a module of type ``owner``
    (``nn.Linear``, ``nn.Conv2d`` or ``nn.Embedding``) given its spec: (the compact class, or None to keep the
    layer dense with Δ(Θ) as its weight; why, in words). The one place the choice is made, so that
    :func:`describe_compact` (``lcompress inspect``) says what ``lc.load(..., compact=True)`` does."""
    kind = spec.get("kind")
    if owner is nn.Embedding:
        if kind != "rowcodebook":
            return None, f"no compact embedding for a {kind} Θ"
        if max_norm is not None:  # a lookup that renormalizes the table in place needs the dense table
            return None, f"max_norm={max_norm} renormalizes the table in place"
        return CodebookEmbedding, f"a {int(spec['codebook'].shape[-1])}-entry codebook per row"
    linear = owner is nn.Linear
    if kind == "sum":
        if not linear:
            return None, "a sum has a compact layer only for nn.Linear"
        names = []
        for j, part in enumerate(spec["parts"]):
            cls, why = _compact_choice(owner, part, numel, sparse_density)
            if cls is None:
                return None, f"a sum whose part {j} has no compact layer ({why})"
            names.append(cls.__name__)
        return SumLinear, "a sum: " + " + ".join(names)
    if kind == "groupedint":
        form = f"{spec['bits']}-bit codes in groups of {spec['group']}" + ("" if spec["symmetric"] else ", with offsets")
        if not linear:
            return None, f"{form}; a grouped-int compact layer exists only for nn.Linear"
        return GroupedIntLinear, form
    if kind == "codebook":
        k = int(spec["codebook"].numel())
        return (CodebookLinear if linear else CodebookConv2d), f"{k}-entry codebook, {index_bits(k)}-bit codes"
    if kind == "lowrank":
        a, b = spec["A"], spec["B"]
        factors, rank = a.numel() + b.numel(), int(a.shape[-1]) if a.dim() else 0
        if factors >= numel:
            return None, f"rank {rank}: the factors' {factors} weights are not fewer than the layer's {numel}"
        if not linear and groups != 1:
            return None, f"rank {rank}, but the conv has groups={groups}"
        return (LowRankLinear if linear else LowRankConv2d), f"rank {rank}: {factors} weights instead of {numel}"
    if kind == "sparse":
        nnz = int(spec["indices"].numel())
        density = nnz / max(numel, 1)
        if not linear:
            return None, f"density {density:.4g}; a sparse compact layer exists only for nn.Linear"
        if nnz < sparse_density * numel:
            return SparseLinear, f"density {density:.4g} < {sparse_density:g}"
        return None, (f"density {density:.4g} is not below the sparse/dense crossover {sparse_density:g} "
                      "(lcompress.nn.SPARSE_CROSSOVER_DENSITY), where a CSR product stops being faster on CPU")
    if kind == "rowcodebook":
        return None, "row codebooks have a compact form only in an nn.Embedding"
    return None, f"no compact form for a {kind} Θ"


def describe_compact(
    param: str, shape: Sequence[int], spec: Mapping[str, Any] | None, owner: type | None = None,
    sparse_density: float = SPARSE_CROSSOVER_DENSITY,
) -> tuple[str, str]:
    """What ``lc.load(..., compact=True)`` (:func:`compact_model`) makes of the layer owning weight ``param``:
    (the compact class name, or ``"dense"``; why, in words).

    Args:
        param: the weight's parameter name (only a module's ``weight`` gets a compact layer).
        shape: its shape.
        spec: its spec from :func:`task_specs` (``None``: its Θ has no compact form, e.g. a sum).
        owner: the owning module's type; ``None`` guesses it from the shape, as a file alone cannot tell: row
            codebooks belong to an ``nn.Embedding``, another 2-D weight to an ``nn.Linear``, a 4-D one to an
            ``nn.Conv2d``.
        sparse_density: as in :func:`compact_model`.
    """
    if spec is None:
        return "dense", "its Θ has no compact form: Δ(Θ) is the layer's weight"
    if param.rpartition(".")[2] != "weight":
        return "dense", "only a module's weight gets a compact layer"
    if owner is None:
        owner = {2: nn.Linear, 4: nn.Conv2d}.get(len(shape))
        if spec.get("kind") == "rowcodebook" and len(shape) == 2:
            owner = nn.Embedding
    if owner not in (nn.Linear, nn.Conv2d, nn.Embedding):
        return "dense", f"no compact layer for a {len(shape)}-D weight"
    cls, why = _compact_choice(owner, spec, math.prod(shape), sparse_density)
    return (cls.__name__ if cls is not None else "dense"), why


def _compact_layer(mod: nn.Module, spec: Mapping[str, Any], sparse_density: float, pname: str) -> nn.Module | None:
    owner = nn.Linear if isinstance(mod, _LayerShape) else type(mod)
    cls, why = _compact_choice(owner, spec, mod.weight.numel(), sparse_density,
                               groups=getattr(mod, "groups", 1), max_norm=getattr(mod, "max_norm", None))
    if cls is None:
        logger.info("compact_model: %s kept dense: %s", pname, why)
        return None
    if cls is CodebookEmbedding:
        return CodebookEmbedding.from_codes(mod, spec["codebook"], spec["codes"])
    if cls is GroupedIntLinear:
        return GroupedIntLinear.from_theta(mod, spec, spec["bits"], spec["group"], spec["symmetric"])
    if cls is SumLinear:
        shape = _LayerShape(mod)
        parts = [_compact_layer(shape, part, sparse_density, f"{pname} (part {j})") for j, part in enumerate(spec["parts"])]
        return SumLinear(parts, mod.in_features, mod.out_features, bias=mod.bias is not None).to(
            mod.weight.device, mod.weight.dtype)
    if cls in (CodebookLinear, CodebookConv2d):
        return cls.from_codes(mod, spec["codebook"], spec["codes"])
    if cls is LowRankLinear:
        return LowRankLinear.from_factors(mod, spec["A"], spec["B"])
    if cls is LowRankConv2d:
        return LowRankConv2d.from_factors(mod, spec["A"], spec["B"], spec.get("conv_scheme", "scheme_1"))
    return SparseLinear.from_indices(mod, spec["indices"], spec["values"])
