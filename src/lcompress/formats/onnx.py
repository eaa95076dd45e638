"""A compressed model as an ONNX file whose grouped-integer layers stay packed in ONNX Runtime.

:func:`export_onnx` traces lcompress's compact model (``lc.load(..., compact=True)``: codebook layers as uint8
codes and a codebook, low-rank layers as two products) with ``torch.onnx.export``, and writes every
``nn.Linear`` compressed by :class:`~lcompress.GroupedIntQuantization` as one ``com.microsoft`` ``MatMulNBits``
node, so that ONNX Runtime keeps the weight packed at its bits and runs its low-bit kernels on it.

``MatMulNBits`` computes y = A·Wᵀ with W (N × K: out × in features) stored in blocks of ``block_size``
consecutive input weights of a row, each block dequantized as (q − zero_point)·scale. lcompress's groups are
those blocks (group = block_size), its unsigned codes u are the q, and::

    B            uint8 (N, ⌈K/block⌉, block·bits/8)   each block's codes as a bit stream, lowest bits first:
                                                      code j of a block in bits [j·bits, (j+1)·bits) of the blob
                                                      (4 bits: byte i = u[2i] | u[2i+1] << 4)
    scales       (N, ⌈K/block⌉)                        Θ's scales, at the graph's dtype (below)
    zero_points  uint8 (N, ⌈⌈K/block⌉·bits/8⌉)         each row's zero points packed as B's codes; left out
                                                      for a symmetric grid, whose default 2^(b−1) it is

* **Symmetric** grids (Δ = s·(u − 2^(b−1))) are MatMulNBits's default zero point: exact.
* **Asymmetric** grids (Δ = s·u + m) are exact only where every offset is m = −zp·s for an integer zero point
  0 ≤ zp < 2^b (then Δ = (u − zp)·s); MatMulNBits has float zero points too (ONNX Runtime's CPU kernel takes
  them for 2 and 4 bits, not 8), but −m/s is not exact in floating point, so other offsets are refused.
* **K not a multiple of the group**: lcompress's last group of a row is shorter; MatMulNBits pads the last block
  of every row to ``block_size``. The padding codes are written as the block's zero point (they dequantize to 0;
  ONNX Runtime reads only K weights of each row), so B holds ⌈K/block⌉·block codes per row.
* **Scales** are written as Θ stores them: in a float32 graph, float16 (or bfloat16) scales stay float16 in the
  file and a ``Cast`` node widens them (exact; ONNX Runtime folds it once at load), since MatMulNBits wants its
  scales at the input's dtype; in a float16 graph they are used as they are (float32 scales only where every one
  is exact in float16).

What ONNX Runtime's MatMulNBits accepts (checked against onnxruntime 1.32's CPU kernel; other versions and
execution providers may accept more): bits 2, 4 or 8 (the operator's spec allows 2–8, the CPU kernel refuses 3,
5, 6, 7), ``block_size`` a power of two ≥ 16, inputs float32 or float16. Anything else is refused with a one-line
:class:`ONNXExportError` naming the tensor and its compression, as is any compressed weight that would be written
as a float tensor (a compression with no compact layer that ``torch.onnx`` can trace: pruning, which
``torch.export`` cannot trace as a CSR product; sums; grouped integers outside an ``nn.Linear``), unless
``allow_float=True``.

The file is the model ``torch.onnx.export`` (dynamo) traces with ``optimize=False`` (so that no constant folding
turns packed codes back into float weights), built in memory, stripped of the exporter's per-node debugging
annotations (Python stack traces), checked, and written through a temporary file
renamed into place: the path holds the old file or the whole new one. Files over 2 GB (protobuf's limit on one
message) are not supported.
"""
import copy
import logging
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["export_onnx", "ONNXExportError", "MatMulNBitsLinear", "matmul_nbits_form", "pack_nbits", "unpack_nbits",
           "dequantize_nbits", "ORT_BITS", "INSTALL_HINT"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lcompress[onnx]' (onnx, onnxruntime, onnxscript)"

#: bit widths onnxruntime's CPU MatMulNBits kernel runs (1.32: "Only 2b, 4b and 8b quantization is supported")
ORT_BITS = (2, 4, 8)
_MIN_BLOCK = 16
_GRAPH_DTYPES = (torch.float32, torch.float16)


class ONNXExportError(ValueError):
    """A model that cannot be written as the ONNX file asked for (one line naming the tensor and its compression)."""


def _describe(config: Mapping[str, Any]) -> str:
    args = ", ".join(f"{k}={v}" for k, v in config.items() if k != "type")
    return f"{config.get('type')}({args})"


# ---- packing -------------------------------------------------------------------------------------------------------
def pack_nbits(codes: Tensor, bits: int) -> Tensor:
    """Codes as MatMulNBits packs them: a bit stream along the last axis, lowest bits first.

    Args:
        codes: (..., n) unsigned integer codes < 2^bits, n·bits a multiple of 8.
        bits: 2, 4 or 8.

    Returns:
        (..., n·bits/8) uint8: code j in bits [j·bits, (j+1)·bits) of the stream (4 bits: u[2i] | u[2i+1] << 4).

    >>> pack_nbits(torch.tensor([[1, 2, 3, 0]]), 2).tolist()
    [[57]]
    """
    if bits not in ORT_BITS:
        raise ValueError(f"bits={bits} must be one of {ORT_BITS}")
    per = 8 // bits
    n = codes.shape[-1]
    if n % per:
        raise ValueError(f"{n} codes of {bits} bits do not fill whole bytes")
    u = codes.to(torch.int32).reshape(*codes.shape[:-1], n // per, per)
    shifts = torch.arange(per, dtype=torch.int32, device=codes.device) * bits
    return (u << shifts).sum(-1).to(torch.uint8)


def unpack_nbits(packed: Tensor, n: int, bits: int) -> Tensor:
    """Inverse of :func:`pack_nbits`: the first ``n`` codes of each stream, (..., n) uint8."""
    per = 8 // bits
    shifts = torch.arange(per, dtype=torch.uint8, device=packed.device) * bits
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(*packed.shape[:-1], packed.shape[-1] * per)[..., :n]


def dequantize_nbits(qweight: Tensor, scales: Tensor, zero_points: Tensor | None, k: int, bits: int) -> Tensor:
    """W (N, K) = (q − zero_point)·scale from MatMulNBits's inputs (float32, or the scales' dtype if wider)."""
    n, nb, blob = qweight.shape
    block = blob * 8 // bits
    q = unpack_nbits(qweight, block, bits).float()  # (N, nb, block)
    if zero_points is None:
        zp = torch.full((n, nb, 1), float(1 << (bits - 1)), device=q.device)
    else:
        zp = unpack_nbits(zero_points, nb, bits).float().unsqueeze(-1)
    w = (q - zp) * scales.float().unsqueeze(-1)
    return w.reshape(n, nb * block)[:, :k]


# the product as a custom op, so that torch.onnx.export sees one node and writes it as MatMulNBits (and runs it
# eagerly as dequantize-then-multiply)
@torch.library.custom_op(
    "lcompress::matmul_nbits", mutates_args=(),
    schema="(Tensor a, Tensor b, Tensor scales, Tensor? zero_points, int k, int n, int bits, int block_size) -> Tensor")
def _matmul_nbits(a, b, scales, zero_points, k, n, bits, block_size):
    return F.linear(a, dequantize_nbits(b, scales, zero_points, k, bits).to(a.dtype))


@_matmul_nbits.register_fake
def _(a, b, scales, zero_points, k, n, bits, block_size):
    return a.new_empty(*a.shape[:-1], n)


# ---- the form of one layer -----------------------------------------------------------------------------------------
def matmul_nbits_form(name: str, config: Mapping[str, Any], theta: Mapping[str, Tensor], shape: Sequence[int],
                      dtype: torch.dtype) -> dict[str, Any]:
    """MatMulNBits's inputs for a Linear weight compressed by grouped integers, exact, or why there are none.

    Args:
        name: the weight's name (for messages).
        config: the compression's config (``{"type": "GroupedIntQuantization", "bits", "group", "symmetric",
            "scale_dtype"}``).
        theta: its Θ: ``codes`` (N·K,) unsigned, ``scales`` (N, groups), ``mins`` (asymmetric).
        shape: the weight's shape (N, K).
        dtype: the layer's dtype, which is the graph's (float32 or float16).

    Returns:
        ``{"qweight": uint8 (N, blocks, blob), "scales": (N, blocks), "zero_points": uint8 (N, ·) or None,
        "k", "n", "bits", "block_size"}``.

    Raises:
        ONNXExportError: (one line naming the tensor and compression) not grouped integers, bits or a group that
            MatMulNBits does not run, a layer dtype it does not take, offsets off the scales' integer grid, scales
            not exact at a float16 graph's dtype, a Θ that does not fit the shape.
    """
    what = f"tensor {name}: {_describe(config)}"
    if config.get("type") != "GroupedIntQuantization":
        raise ONNXExportError(f"{what} is not grouped integers; MatMulNBits holds only those")
    if len(shape) != 2:
        raise ONNXExportError(f"{what}: a weight of shape {tuple(shape)} is not a Linear layer's matrix")
    n, k = (int(x) for x in shape)
    bits, group, symmetric = int(config["bits"]), int(config["group"]), bool(config["symmetric"])
    if bits not in ORT_BITS:
        raise ONNXExportError(f"{what}: ONNX Runtime's MatMulNBits runs {', '.join(map(str, ORT_BITS))}-bit weights, "
                              f"not {bits}-bit")
    if group < _MIN_BLOCK or group & (group - 1):
        raise ONNXExportError(f"{what}: MatMulNBits blocks must be a power of two >= {_MIN_BLOCK} weights long, "
                              f"not group={group}")
    if dtype not in _GRAPH_DTYPES:
        raise ONNXExportError(f"{what}: the layer is {str(dtype).removeprefix('torch.')}; ONNX Runtime's MatMulNBits "
                              "takes float32 or float16 inputs")
    nb = -(-k // group)
    codes, scales = theta["codes"].reshape(-1), theta["scales"]
    if codes.numel() != n * k or tuple(scales.shape) != (n, nb):
        raise ONNXExportError(f"{what}: Θ with {codes.numel()} codes and scales {tuple(scales.shape)} does not fit "
                              f"a ({n}, {k}) weight in groups of {group}")
    u = codes.reshape(n, k).to(torch.uint8).cpu()
    scales = scales.detach().cpu()
    if symmetric:
        zp = None
        pad_code = torch.full((n, nb), 1 << (bits - 1), dtype=torch.uint8)
    else:
        s, m = scales.double(), theta["mins"].detach().cpu().double()
        z = torch.round(-m / torch.where(s == 0, torch.ones_like(s), s))
        z = torch.where(s == 0, torch.zeros_like(z), z)
        ok = (z >= 0) & (z < (1 << bits)) & (-z * s == m)
        if not bool(ok.all()):
            r, g = (int(i) for i in torch.nonzero(~ok)[0])
            raise ONNXExportError(
                f"{what}: the offset {float(m[r, g]):.6g} of row {r}, group {g} is not -zp*scale (scale "
                f"{float(s[r, g]):.6g}) for an integer zero point 0 <= zp < {1 << bits}, so MatMulNBits's "
                "(q - zp)*scale cannot hold it exactly; compress with symmetric=True")
        pad_code = z.to(torch.uint8)
        per = 8 // bits
        zpad = -(-nb // per) * per - nb
        zp = pack_nbits(F.pad(pad_code, (0, zpad)), bits) if zpad else pack_nbits(pad_code, bits)
    if dtype == torch.float16 and scales.dtype != torch.float16:
        s16 = scales.to(torch.float16)
        if not torch.equal(s16.to(scales.dtype), scales):
            raise ONNXExportError(f"{what}: a float16 graph needs float16 scales, and these "
                                  f"{str(scales.dtype).removeprefix('torch.')} scales are not all exact in float16")
        scales = s16
    pad = nb * group - k
    if pad:  # the last block of each row padded with its zero point (dequantizes to 0; ORT reads K weights a row)
        u = torch.cat([u, pad_code[:, -1:].expand(n, pad)], dim=1)
    qweight = pack_nbits(u.reshape(n, nb, group), bits)
    return {"qweight": qweight, "scales": scales.clone(), "zero_points": zp, "k": k, "n": n, "bits": bits,
            "block_size": group}


class MatMulNBitsLinear(nn.Module):
    """y = x Wᵀ + b with W held as ONNX Runtime's ``MatMulNBits`` holds it (module docstring): ``qweight`` (N,
    blocks, blob) uint8, ``scales`` (N, blocks), ``zero_points`` (packed uint8, or None for the default 2^(b−1)).

    In PyTorch the weight is dequantized on every call; exported with :func:`export_onnx` the layer is one
    ``com.microsoft.MatMulNBits`` node (and an ``Add`` for the bias).

    Use :meth:`from_form` with the output of :func:`matmul_nbits_form`.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, block_size: int, bias: bool = True,
                 zero_points: bool = False, scale_dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        if bits not in ORT_BITS or block_size < _MIN_BLOCK or block_size & (block_size - 1):
            raise ValueError(f"bits={bits} must be one of {ORT_BITS} and block_size={block_size} a power of two >= "
                             f"{_MIN_BLOCK}")
        self.in_features, self.out_features = int(in_features), int(out_features)
        self.bits, self.block_size = int(bits), int(block_size)
        nb = -(-self.in_features // self.block_size)
        self.register_buffer("qweight", torch.zeros(self.out_features, nb, self.block_size * bits // 8,
                                                    dtype=torch.uint8))
        self.register_buffer("scales", torch.zeros(self.out_features, nb, dtype=scale_dtype))
        zpb = -(-nb * bits // 8)
        self.zero_points: Tensor | None
        self.register_buffer("zero_points", torch.zeros(self.out_features, zpb, dtype=torch.uint8)
                             if zero_points else None)
        self.bias = nn.Parameter(torch.zeros(self.out_features)) if bias else None

    @classmethod
    def from_form(cls, linear: nn.Linear, form: Mapping[str, Any]) -> "MatMulNBitsLinear":
        """The layer holding ``form`` (:func:`matmul_nbits_form`) with ``linear``'s bias, sizes and dtype."""
        if (form["n"], form["k"]) != (linear.out_features, linear.in_features):
            raise ValueError(f"a ({form['n']}, {form['k']}) form for a Linear({linear.in_features}, "
                             f"{linear.out_features})")
        m = cls(linear.in_features, linear.out_features, form["bits"], form["block_size"], linear.bias is not None,
                form["zero_points"] is not None, form["scales"].dtype)
        m.qweight = form["qweight"].clone()
        m.scales = form["scales"].clone()
        if form["zero_points"] is not None:
            m.zero_points = form["zero_points"].clone()
        if linear.bias is not None:
            m.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=linear.bias.requires_grad)
        return m.to(linear.weight.device)

    def dequantized_weight(self) -> Tensor:
        """W (out, in) as MatMulNBits dequantizes it, in float32."""
        return dequantize_nbits(self.qweight, self.scales, self.zero_points, self.in_features, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() == 1:
            return self.forward(x.unsqueeze(0)).squeeze(0)
        y = torch.ops.lcompress.matmul_nbits(x, self.qweight, self.scales.to(x.dtype), self.zero_points,
                                             self.in_features, self.out_features, self.bits, self.block_size)
        return y if self.bias is None else y + self.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"block_size={self.block_size}, zero_points={self.zero_points is not None}")


# ---- ONNX ----------------------------------------------------------------------------------------------------------
def _onnx_modules():
    try:
        import onnx
        import onnxscript
    except ImportError as e:
        raise ImportError(f"ONNX export needs onnx and onnxscript, which are not installed: {INSTALL_HINT}") from e
    return onnx, onnxscript


def _translation(onnx, onnxscript):
    """``{our custom op: a function writing com.microsoft.MatMulNBits}`` for ``torch.onnx.export``."""
    from onnx.defs import OpSchema

    # onnx's registry has no com.microsoft schemas; the exporter needs one to build the node, so it gets the
    # inputs and attributes used here (ONNX Runtime's own schema decides what runs)
    P, A = OpSchema.FormalParameter, OpSchema.Attribute
    opt = OpSchema.FormalParameterOption.Optional
    floats = ["tensor(float)", "tensor(float16)"]
    schema = OpSchema(
        "MatMulNBits", "com.microsoft", 1,
        inputs=[P("A", "T1"), P("B", "T2"), P("scales", "T1"), P("zero_points", "T3", param_option=opt)],
        outputs=[P("Y", "T1")],
        type_constraints=[("T1", floats, ""), ("T2", ["tensor(uint8)"], ""), ("T3", ["tensor(uint8)"] + floats, "")],
        attributes=[A(a, OpSchema.AttrType.INT, "", required=True) for a in ("K", "N", "bits", "block_size")])
    op = onnxscript.values.Op(onnxscript.values.Opset("com.microsoft", 1), "MatMulNBits", schema)

    def matmul_nbits(a, b, scales, zero_points, k: int, n: int, bits: int, block_size: int):
        inputs = (a, b, scales) if zero_points is None else (a, b, scales, zero_points)
        return op(*inputs, K=k, N=n, bits=bits, block_size=block_size)

    return {torch.ops.lcompress.matmul_nbits.default: matmul_nbits}


def _lcz_bytes(compressed) -> tuple[bytes, nn.Module | None, str]:
    """The compressed model as .lcz bytes (packed, no lossless stage), its model if it holds one, and a name."""
    from ..export import to_bytes

    if isinstance(compressed, (bytes, bytearray)):
        return bytes(compressed), None, "the .lcz bytes"
    if isinstance(compressed, (str, os.PathLike)):
        p = Path(compressed)
        try:
            return p.read_bytes(), None, str(p)
        except IsADirectoryError:
            raise FileNotFoundError(f"{p}: is a directory, not a .lcz file") from None
    model, tasks = getattr(compressed, "model", None), getattr(compressed, "tasks", None)
    if not isinstance(model, nn.Module) or tasks is None:
        raise TypeError(f"the compressed model must be a .lcz path or an object with .model and .tasks (an LC object "
                        f"or a PostTrainResult), got {type(compressed).__name__}")
    return to_bytes(compressed, lossless=False)[0], model, type(compressed).__name__


def _check_writable(out: Path) -> None:
    """Fail before any work when ``out`` cannot be created (a missing or read-only directory, a directory there)."""
    if out.is_dir():
        raise OSError(21, f"{out}: is a directory, not a file the ONNX model can be written to")
    probe = out.with_name(f"{out.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(probe, "xb"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"{out}: the ONNX file cannot be written ({e.strerror or e})") from None
    probe.unlink(missing_ok=True)


def export_onnx(compressed, path, args: tuple = (), *, model: nn.Module | None = None,
                kwargs: Mapping[str, Any] | None = None, allow_float: bool = False, dynamic_shapes=None,
                input_names: Sequence[str] | None = None, output_names: Sequence[str] | None = None,
                verify: bool = True) -> dict[str, Any]:
    """Write a compressed model as an ONNX file for ONNX Runtime (module docstring: layouts and limits).

    The model written is lcompress's compact model (``lc.load(..., compact=True)``), in eval mode, with every
    ``nn.Linear`` compressed by :class:`~lcompress.GroupedIntQuantization` as a ``com.microsoft.MatMulNBits``
    node holding Θ's codes and scales packed (:func:`matmul_nbits_form`); its outputs are the compact model's
    within float rounding. ``model`` (or the compressed object's own) is copied, never changed.

    Args:
        compressed: an :class:`~lcompress.LC` object or a :class:`~lcompress.ptq.PostTrainResult` (its model and
            Θ), or a ``.lcz`` file (its path or bytes) with ``model``.
        path: the ``.onnx`` file to write.
        args: example positional inputs for tracing (a tuple).
        model: a model of the compressed architecture to load a ``.lcz`` into (ignored for an LC object).
        kwargs: example keyword inputs.
        allow_float: a compressed weight with no compact ONNX form is refused by default; ``True`` writes its
            Δ(Θ) as a float tensor instead (exact, not compressed in the file).
        dynamic_shapes, input_names, output_names: passed to ``torch.onnx.export`` (e.g. ``({0: "batch"},)`` for
            a dynamic batch).
        verify: check the model with ``onnx.checker`` and that each MatMulNBits node holds the packed codes
            built here before the file is written.

    Returns:
        ``{"path", "file_bytes", "matmul_nbits": {weight: {"bits", "block_size", "k", "n", "zero_points"}},
        "compact": {module: compact class}, "float": [compressed weights written as float]}``.

    Raises:
        ImportError: onnx or onnxscript (the ``onnx`` extra) is not installed.
        ONNXExportError: (a ValueError, one line naming the tensor and compression) a compression with no ONNX
            form and ``allow_float=False``; grouped integers that MatMulNBits cannot hold exactly.
        CorruptFileError: a ``.lcz`` that does not load into ``model``.
        OSError: ``path`` cannot be written (naming it); nothing is left behind.
        RuntimeError: ``torch.onnx.export`` cannot trace the model.
    """
    onnx, onnxscript = _onnx_modules()
    from ..export import load, read
    from ..nn import CodebookConv2d, CodebookEmbedding, CodebookLinear, LowRankConv2d, LowRankLinear, SparseLinear
    from ..surgery import _module_slots
    from ..tasks import unwrap_model

    if not isinstance(allow_float, bool) or not isinstance(verify, bool):
        raise TypeError(f"allow_float={allow_float!r} and verify={verify!r} must be True or False")
    if not isinstance(args, tuple):
        raise TypeError(f"args must be a tuple of example inputs, got {type(args).__name__}")
    out = Path(path)
    data, own, where = _lcz_bytes(compressed)
    skeleton = own if own is not None else model
    if not isinstance(skeleton, nn.Module):
        raise TypeError(f"{where}: pass model=, a model of the compressed architecture to load it into")
    _check_writable(out)

    net = copy.deepcopy(unwrap_model(skeleton))
    load(data, net, compact=True)
    net.eval()
    rec = read(data)
    state = rec["state"]
    modules = dict(net.named_modules())
    compact_types = (CodebookLinear, CodebookConv2d, CodebookEmbedding, LowRankLinear, LowRankConv2d)
    swaps: list[tuple[str, nn.Module]] = []
    nbits: dict[str, dict[str, Any]] = {}
    compact: dict[str, str] = {}
    as_float: list[str] = []
    for t, theta in zip(rec["header"]["tasks"], rec["thetas"]):
        cfg, params = dict(t["compression"]), list(t["params"])
        for p in params:
            mname, _, attr = p.rpartition(".")
            mod = modules.get(mname)
            if cfg.get("type") == "GroupedIntQuantization" and len(params) == 1 and attr == "weight" \
                    and type(mod) is nn.Linear:
                try:
                    form = matmul_nbits_form(p, cfg, theta, tuple(mod.weight.shape), mod.weight.dtype)
                except ONNXExportError as e:
                    if not allow_float:
                        raise ONNXExportError(f"{e}; allow_float=True (--allow-float) writes its Δ(Θ) as a float "
                                              "tensor") from None
                    logger.warning("%s; written as a float tensor (allow_float)", e)
                    as_float.append(p)
                    continue
                swaps.append((mname, MatMulNBitsLinear.from_form(mod, form)))
                nbits[p] = {k: form[k] for k in ("bits", "block_size", "k", "n")}
                nbits[p]["zero_points"] = form["zero_points"] is not None
                continue
            if isinstance(mod, compact_types) and attr == "weight":
                compact[mname] = type(mod).__name__
                continue
            if isinstance(mod, SparseLinear):
                why = "torch.export cannot trace a sparse CSR product"
            elif cfg.get("type") == "GroupedIntQuantization":
                why = ("MatMulNBits is the product of one nn.Linear's weight" if len(params) == 1 else
                       f"MatMulNBits holds one nn.Linear's weight, not a joint task of {len(params)}")
            else:
                why = "lcompress has no compact layer for it that ONNX can hold"
            if not allow_float:
                raise ONNXExportError(f"tensor {p}: {_describe(cfg)} has no ONNX form ({why}); allow_float=True "
                                      "(--allow-float) writes its Δ(Θ) as a float tensor")
            logger.warning("%s: %s has no ONNX form (%s); written as a float tensor (allow_float)", p,
                           _describe(cfg), why)
            as_float.append(p)
            if isinstance(mod, SparseLinear):  # back to a dense layer holding Δ(Θ)
                dense = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                with torch.no_grad():
                    dense.weight.copy_(state[p].reshape(dense.weight.shape))
                    if mod.bias is not None:
                        dense.bias.copy_(mod.bias)
                swaps.append((mname, dense.to(mod.values.device, state[p].dtype)))
    slots = _module_slots(net)
    for mname, new in swaps:
        for parent, cname in slots.get(mname, []):
            setattr(parent, cname, new)

    # one eager call first: lcompress._packed caches its decoding tables on first use, and a table first built
    # while torch.export traces would be a fake tensor, cached for later eager calls
    with torch.no_grad():
        net(*args, **dict(kwargs or {}))
    try:
        prog = torch.onnx.export(net, args, None, kwargs=dict(kwargs or {}), dynamo=True, optimize=False,
                                 external_data=False, verbose=False, dynamic_shapes=dynamic_shapes,
                                 input_names=input_names, output_names=output_names,
                                 custom_translation_table=_translation(onnx, onnxscript))
    except Exception as e:
        first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")
        raise RuntimeError(f"{where}: torch.onnx.export cannot trace the compact model ({type(e).__name__}: "
                           f"{first})") from e
    proto = prog.model_proto
    # the exporter annotates each node with its Python stack trace and FX node (paths on this machine, and more
    # bytes than a small model's weights): debugging data a runtime never reads
    for graph_nodes in [proto.graph.node] + [f.node for f in proto.functions]:
        for node in graph_nodes:
            del node.metadata_props[:]
    if verify:
        _verify(onnx, proto, {m: n for m, n in swaps if isinstance(n, MatMulNBitsLinear)})
    try:
        blob = proto.SerializeToString()
    except ValueError as e:  # protobuf refuses messages over 2 GB
        raise ONNXExportError(f"{where}: the ONNX model is too large for one file ({e})") from None

    from .._io import atomic_write

    try:
        atomic_write(out, lambda f: f.write(blob))
    except OSError as e:
        raise OSError(e.errno, f"{out}: the ONNX file cannot be written ({e.strerror or e})") from None
    size = out.stat().st_size
    logger.info("wrote %s: %d bytes, %d MatMulNBits layers, %d other compact layers, %d compressed weights as float",
                out, size, len(nbits), len(compact), len(as_float))
    return {"path": str(out), "file_bytes": size, "matmul_nbits": nbits, "compact": compact, "float": as_float}


def _verify(onnx, proto, layers: Mapping[str, MatMulNBitsLinear]) -> None:
    """The model passes ``onnx.checker``, and each layer is one MatMulNBits node whose B is the packed codes."""
    from onnx import numpy_helper

    onnx.checker.check_model(proto)
    inits = {i.name: i for i in proto.graph.initializer}
    nodes = [n for n in proto.graph.node if n.op_type == "MatMulNBits" and n.domain == "com.microsoft"]
    by_b = {n.input[1]: n for n in nodes}
    if len(nodes) != len(layers):
        raise RuntimeError(f"the ONNX graph has {len(nodes)} MatMulNBits nodes for {len(layers)} layers (a bug)")
    for mname, layer in layers.items():
        b = f"{mname}.qweight"
        if b not in by_b or b not in inits:
            raise RuntimeError(f"{mname}: no MatMulNBits node reads {b} as its packed weight (a bug)")
        if not torch.equal(torch.from_numpy(numpy_helper.to_array(inits[b]).copy()), layer.qweight.cpu()):
            raise RuntimeError(f"{mname}: the ONNX initializer {b} is not the packed codes (a bug)")
        if f"{mname}.weight" in inits:
            raise RuntimeError(f"{mname}: a float weight was written beside its MatMulNBits codes (a bug)")
