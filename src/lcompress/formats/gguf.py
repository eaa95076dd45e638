"""A compressed Llama model as a GGUF file that llama.cpp runs, its grouped-integer weights in GGUF's own block types.

A weight compressed by one of llama.cpp's block types (:func:`lcompress.compressions.grouped.gguf_type`: Q8_0,
Q4_0, Q4_1, Q5_0, Q5_1, i.e. a :class:`~lcompress.GroupedIntQuantization` with groups of 32 and float16 scales)
is written as that GGML type, its blocks packed from Θ bit for bit, so llama.cpp's de-quantization gives exactly
Δ(Θ): nothing is rounded at export. Every block is 32 weights of one row (ggml's ``ggml_half`` is IEEE float16,
little-endian; u are Θ's unsigned codes, x = Δ the weights)::

    Q8_0  (34 bytes)  d | qs[32]               qs[j] = u_j − 128 as int8;             x_j = d·qs[j]
    Q4_0  (18 bytes)  d | qs[16]               qs[j] = u_j | u_(j+16) << 4;            x_j = d·(u_j − 8)
    Q4_1  (20 bytes)  d | m | qs[16]           as Q4_0;                               x_j = d·u_j + m
    Q5_0  (22 bytes)  d | qh | qs[16]          qh: uint32, bit j = bit 4 of u_j;       x_j = d·(u_j − 16)
                                               qs[j] = (u_j & 15) | (u_(j+16) & 15) << 4
    Q5_1  (24 bytes)  d | m | qh | qs[16]      as Q5_0;                               x_j = d·u_j + m

Every other tensor is written so that it too decodes to the compressed model's value exactly: in the source GGUF's
own encoding when that decodes to the same value bit for bit (the compression left it as the source had it, e.g.
SmolLM2's Q8_0 token embedding), else a 2-D tensor as F16 or BF16 where every value is exact in it (half the bytes
of F32), else F32; 1-D tensors (norms, biases) as F32, as llama.cpp's own converter writes them.

Tensor names follow gguf-py's map for the architecture (``model.layers.N.self_attn.q_proj.weight`` →
``blk.N.attn_q.weight``, ``model.embed_tokens.weight`` → ``token_embd.weight``, ``model.norm.weight`` →
``output_norm.weight``, ``lm_head.weight`` → ``output.weight``, left out when the embeddings are tied and the
source has no ``output.weight``). llama.cpp applies rotary embeddings to interleaved pairs, Hugging Face to the two
halves of each head, so the rows of ``attn_q`` and ``attn_k`` (weights and biases) are permuted within each head:
GGUF row ``h·D + 2i + j`` is Hugging Face row ``h·D + j·D/2 + i`` (D the head size, i < D/2, j ∈ {0, 1}); the
inverse of what transformers' GGUF loader undoes. A row permutation keeps each row's 32-weight blocks whole, so Θ's
rows are permuted and packed as they are.

The metadata and tokenizer are the source model's: a GGUF file's key-value pairs are all copied (the file type and
the quantization version are set for what is written); a Hugging Face Llama checkpoint directory's ``config.json``
and tokenizer are turned into them with gguf-py's own vocabulary helpers.
"""
from __future__ import annotations

import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from torch import Tensor

__all__ = ["export_gguf", "GGUFExportError", "gguf_block_type", "pack_blocks", "rope_permutation", "BLOCK_TYPES"]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lcompress[hf]' (or: pip install gguf)"

#: GGUF block types written from Θ: name → (bits, group, symmetric, bytes per block of 32 weights)
BLOCK_TYPES = {"q8_0": (8, 32, True, 34), "q4_0": (4, 32, True, 18), "q4_1": (4, 32, False, 20),
               "q5_0": (5, 32, True, 22), "q5_1": (5, 32, False, 24)}
_QK = 32
# architectures whose tensor layout this writer knows (the q/k row permutation is llama's)
_ARCHS = ("llama",)


class GGUFExportError(ValueError):
    """A model that cannot be written as the GGUF file asked for (a one-line message naming the tensor and type)."""


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"GGUF export needs the gguf package, which is not installed: {INSTALL_HINT}") from e
    return gguf


# ---- the block types -----------------------------------------------------------------------------------------------
def gguf_block_type(config: Mapping[str, Any]) -> str | None:
    """The GGUF block type whose blocks are exactly this compression's Θ (``"q4_0"``, ...), or None.

    Args:
        config: a compression's :meth:`~lcompress.compressions.base.Compression.config`.

    >>> gguf_block_type({"type": "GroupedIntQuantization", "bits": 4, "group": 32, "symmetric": True,
    ...                  "scale_dtype": "float16"})
    'q4_0'
    """
    if not isinstance(config, Mapping) or config.get("type") != "GroupedIntQuantization" \
            or config.get("scale_dtype") != "float16":
        return None
    key = (config.get("bits"), config.get("group"), config.get("symmetric"))
    return next((name for name, t in BLOCK_TYPES.items() if t[:3] == key), None)


def pack_blocks(kind: str, codes: np.ndarray, scales: np.ndarray, mins: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's blocks of ``kind`` from Θ (layouts in the module docstring).

    Args:
        kind: ``"q8_0"``, ``"q4_0"``, ``"q4_1"``, ``"q5_0"`` or ``"q5_1"``.
        codes: (rows, cols) unsigned codes u < 2^bits, cols a multiple of 32.
        scales: (rows, cols/32) float16 scales d.
        mins: (rows, cols/32) float16 offsets m (the ``_1`` types only).

    Returns:
        (rows, cols/32 · bytes per block) uint8: each row's blocks in order, as a GGUF file stores the tensor.

    Raises:
        ValueError: an unknown kind, shapes that do not fit, a code out of range.
    """
    if kind not in BLOCK_TYPES:
        raise ValueError(f"kind={kind!r} is not one of {', '.join(BLOCK_TYPES)}")
    bits, _, symmetric, size = BLOCK_TYPES[kind]
    u = np.asarray(codes)
    if u.ndim != 2 or u.shape[1] % _QK:
        raise ValueError(f"codes of shape {u.shape}: {kind} needs a matrix whose rows are a multiple of {_QK} long")
    rows, cols = u.shape
    nb = cols // _QK
    if u.size and int(u.max()) >= 1 << bits:
        raise ValueError(f"a code {int(u.max())} does not fit {bits} bits ({kind})")
    u = u.astype(np.uint8).reshape(rows, nb, _QK)

    def halves(x, what):
        x = np.asarray(x)
        if x.dtype != np.float16 or x.shape != (rows, nb):
            raise ValueError(f"{what} must be float16 of shape {(rows, nb)}, got {x.dtype} {x.shape}")
        return np.ascontiguousarray(x.astype("<f2")).view(np.uint8).reshape(rows, nb, 2)

    parts = [halves(scales, "scales")]
    if not symmetric:
        if mins is None:
            raise ValueError(f"{kind} needs mins")
        parts.append(halves(mins, "mins"))
    elif mins is not None:
        raise ValueError(f"{kind} is symmetric: give no mins")
    if bits == 8:
        parts.append(u ^ np.uint8(0x80))  # u − 128 in two's complement
    else:
        if bits == 5:
            hi = ((u >> 4) & 1).astype(np.uint32) << np.arange(_QK, dtype=np.uint32)
            qh = np.bitwise_or.reduce(hi, axis=2).astype("<u4")
            parts.append(np.ascontiguousarray(qh).view(np.uint8).reshape(rows, nb, 4))
        lo = u & np.uint8(0x0F)
        parts.append(lo[:, :, : _QK // 2] | (lo[:, :, _QK // 2 :] << np.uint8(4)))
    out = np.concatenate(parts, axis=2).reshape(rows, nb * size)
    return out


def rope_permutation(rows: int, heads: int) -> Tensor:
    """The row order llama.cpp's rotary embedding wants: GGUF row r is Hugging Face row ``perm[r]``.

    Hugging Face rotates the two halves of each head (i, i + D/2) together, llama.cpp adjacent pairs (2i, 2i + 1).

    Raises:
        ValueError: ``rows`` not a multiple of 2·heads.
    """
    if heads < 1 or rows % (2 * heads):
        raise ValueError(f"{rows} rows do not split into {heads} heads of an even size")
    d = rows // heads
    i = torch.arange(d // 2).repeat_interleave(2)  # GGUF position 2i + j within a head ...
    j = torch.arange(2).repeat(d // 2)
    within = j * (d // 2) + i  # ... takes Hugging Face row j·D/2 + i
    return (torch.arange(heads).unsqueeze(1) * d + within).reshape(-1)


# ---- the compressed model ------------------------------------------------------------------------------------------
@dataclass
class _Task:
    name: str
    params: list[str]
    config: dict[str, Any]
    theta: dict[str, Any] | None
    view: tuple[int, ...]


@dataclass
class _Compressed:
    state: dict[str, Tensor]
    tasks: list[_Task]
    where: str
    task_of: dict[str, _Task] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.task_of = {p: t for t in self.tasks for p in t.params}


def _compressed_model(obj) -> _Compressed:
    from ..tasks import strip_prefix

    if isinstance(obj, (str, os.PathLike)):
        from ..export import read

        r = read(obj)
        tasks = [_Task(t["name"], list(t["params"]), dict(t["compression"]), th, tuple(t["view"]))
                 for t, th in zip(r["header"]["tasks"], r["thetas"])]
        return _Compressed(dict(r["state"]), tasks, str(obj))
    model, tasks = getattr(obj, "model", None), getattr(obj, "tasks", None)
    if not isinstance(model, torch.nn.Module) or tasks is None:
        raise TypeError(f"the compressed model must be a .lcz path or an object with .model and .tasks (a "
                        f"PostTrainResult or an LC object), got {type(obj).__name__}")
    out = []
    for t in tasks:
        comp = t.compression
        out.append(_Task(t.name, [strip_prefix(p) for p in t.param_names], comp.config(),
                         comp.theta if comp.is_compressed else None, tuple(t.view_shape())))
    state = {strip_prefix(k): v.detach() for k, v in model.state_dict().items()}
    return _Compressed(state, out, type(obj).__name__)


# ---- the source model ----------------------------------------------------------------------------------------------
@dataclass
class _Source:
    arch: str
    heads: int
    heads_kv: int
    blocks: int
    fill: Any  # fill(writer): the metadata and tokenizer
    tensors: dict[str, Any]  # GGUF name -> ReaderTensor (a GGUF source) or nothing
    order: list[str]
    where: str


def _field_value(g, f):
    """A GGUF reader field's value for GGUFWriter.add_key_value: strings as their raw bytes (copied as they are)."""
    T = g.GGUFValueType
    main = f.types[0]
    if main == T.STRING:
        return bytes(f.parts[f.data[0]])
    if main == T.ARRAY:
        sub = f.types[-1]
        if len(f.types) > 2:
            raise GGUFExportError(f"metadata {f.name!r}: nested arrays are not copied by this writer")
        if sub == T.STRING:
            return [bytes(f.parts[i]) for i in f.data]
        return f.contents()
    return f.contents()


def _source_gguf(path: Path) -> _Source:
    g = _gguf()
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise GGUFExportError(f"source {str(path)!r}: not a GGUF file (starts with {magic!r})")
    try:
        reader = g.GGUFReader(str(path))
    except Exception as e:  # the reader raises anything from ValueError to IndexError on a bad file
        raise GGUFExportError(f"source {str(path)!r}: unreadable GGUF file ({type(e).__name__}: "
                              f"{' '.join(str(e).split())})") from None
    fields = reader.fields
    arch_f = fields.get(g.Keys.General.ARCHITECTURE)
    arch = arch_f.contents() if arch_f is not None else None
    if arch not in _ARCHS:
        raise GGUFExportError(f"source {str(path)!r}: general.architecture={arch!r}; GGUF export writes "
                              f"{', '.join(_ARCHS)} models")

    def num(key, default=None):
        f = fields.get(key.format(arch=arch))
        if f is None:
            if default is None:
                raise GGUFExportError(f"source {str(path)!r}: metadata {key.format(arch=arch)!r} is missing")
            return default
        return int(f.contents())

    heads = num(g.Keys.Attention.HEAD_COUNT)
    heads_kv = num(g.Keys.Attention.HEAD_COUNT_KV, heads)
    blocks = num(g.Keys.LLM.BLOCK_COUNT)
    skip = {g.Keys.General.ARCHITECTURE, g.Keys.General.ALIGNMENT, g.Keys.General.FILE_TYPE,
            g.Keys.General.QUANTIZATION_VERSION}
    kv = []
    for f in fields.values():
        if f.name.startswith("GGUF.") or f.name in skip:
            continue
        if f.types[0] == g.GGUFValueType.ARRAY and len(f.data) == 0:
            logger.debug("%s: metadata %s is an empty array, which gguf-py cannot write; left out", path, f.name)
            continue
        sub = f.types[-1] if f.types[0] == g.GGUFValueType.ARRAY else None
        kv.append((f.name, _field_value(g, f), f.types[0], sub))
    align = fields.get(g.Keys.General.ALIGNMENT)
    alignment = int(align.contents()) if align is not None else None

    def fill(w):
        if alignment is not None:
            w.add_custom_alignment(alignment)
        for name, val, vtype, sub in kv:
            w.add_key_value(name, val, vtype, sub_type=sub)

    tensors = {t.name: t for t in reader.tensors}
    return _Source(arch, heads, heads_kv, blocks, fill, tensors, list(tensors), str(path))


def _source_hf_dir(path: Path) -> _Source:
    g = _gguf()
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise GGUFExportError(f"source {str(path)!r}: config.json cannot be read ({e})") from None
    if cfg.get("model_type") != "llama":
        raise GGUFExportError(f"source {str(path)!r}: model_type={cfg.get('model_type')!r}; GGUF export from a "
                              "Hugging Face directory writes llama models")
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling")
    if rope.get("rope_type", "default") != "default" or (scaling and scaling.get("rope_type", scaling.get("type"))
                                                          not in (None, "default")):
        raise GGUFExportError(f"source {str(path)!r}: rotary scaling {scaling or rope!r} is not written by this "
                              "exporter; convert the float model with llama.cpp and export from that GGUF file")
    heads = int(cfg["num_attention_heads"])
    heads_kv = int(cfg.get("num_key_value_heads") or heads)
    hidden = int(cfg["hidden_size"])
    head_dim = int(cfg.get("head_dim") or hidden // heads)
    theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
    tokens, scores, types, tok_model = _hf_vocab(g, path)
    vocab = int(cfg.get("vocab_size") or len(tokens))
    if len(tokens) < vocab:  # an embedding padded past the tokenizer: llama.cpp wants a token per row
        pad = vocab - len(tokens)
        tokens += [f"[PAD{i}]" for i in range(len(tokens), vocab)]
        types += [g.TokenType.UNUSED] * pad
        if scores is not None:
            scores += [-1000.0] * pad
    special = g.SpecialVocab(path, load_merges=tok_model == "gpt2", n_vocab=len(tokens))

    def fill(w):
        w.add_name(path.name)
        w.add_context_length(int(cfg.get("max_position_embeddings", 2048)))
        w.add_embedding_length(hidden)
        w.add_block_count(int(cfg["num_hidden_layers"]))
        w.add_feed_forward_length(int(cfg["intermediate_size"]))
        w.add_head_count(heads)
        w.add_head_count_kv(heads_kv)
        w.add_layer_norm_rms_eps(float(cfg.get("rms_norm_eps", 1e-6)))
        w.add_rope_freq_base(float(theta))
        w.add_rope_dimension_count(head_dim)
        w.add_vocab_size(len(tokens))
        w.add_tokenizer_model(tok_model)
        if tok_model == "gpt2":
            # llama.cpp picks its pre-tokenizer by name; its converter recognises known tokenizers by hashing their
            # output, which this exporter does not do: "default" (override with metadata={"tokenizer.ggml.pre": ...})
            w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        if scores is not None:
            w.add_token_scores(scores)
        w.add_token_types(types)
        special.add_to_gguf(w, quiet=True)

    return _Source("llama", heads, heads_kv, int(cfg["num_hidden_layers"]), fill, {}, [], str(path))


def _hf_vocab(g, path: Path):
    """(tokens, scores or None, token types, tokenizer model) of a Hugging Face tokenizer, by gguf-py's helpers."""
    errors = []
    for cls, model in ((g.vocab.BpeVocab, "gpt2"), (g.vocab.SentencePieceVocab, "llama")):
        try:
            v = cls(path)
        except (FileNotFoundError, ImportError, ValueError) as e:
            errors.append(f"{cls.__name__}: {e}")
            continue
        tokens, scores, types = [], [], []
        for text, score, ttype in v.all_tokens():
            tokens.append(text)
            scores.append(score)
            types.append(ttype)
        return tokens, (scores if model == "llama" else None), types, model
    raise GGUFExportError(f"source {str(path)!r}: no tokenizer gguf-py can convert ({'; '.join(errors)})")


def _source(path) -> _Source:
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"source model not found: {p}")
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise GGUFExportError(f"source {str(p)!r}: neither a GGUF file nor a Hugging Face checkpoint directory "
                                  "(no config.json)")
        return _source_hf_dir(p)
    return _source_gguf(p)


# ---- encoding one tensor -------------------------------------------------------------------------------------------
def _bits(x: Tensor) -> Tensor:
    return x.contiguous().view(torch.int32)


def _float_encoding(g, value: Tensor, name: str, src) -> tuple[np.ndarray, Any]:
    """(data, GGML type) of a tensor that is not written from Θ: exact in every case (module docstring)."""
    T = g.GGMLQuantizationType
    x = value.detach().to(torch.float32).cpu().contiguous()
    if src is not None:
        if list(reversed([int(d) for d in src.shape])) != list(x.shape):
            raise GGUFExportError(f"tensor {name}: the source has shape {tuple(reversed(src.shape.tolist()))}, the "
                                  f"compressed model {tuple(x.shape)}")
        try:
            dec = torch.from_numpy(np.array(g.quants.dequantize(src.data, src.tensor_type), dtype=np.float32)
                                   ).reshape(x.shape)
        except NotImplementedError:
            dec = None
        if dec is not None and torch.equal(_bits(dec), _bits(x)):
            return src.data, src.tensor_type
    if x.dim() == 2:
        for dt, gt in ((torch.float16, T.F16), (torch.bfloat16, T.BF16)):
            y = x.to(dt)
            if torch.equal(_bits(y.to(torch.float32)), _bits(x)):
                if dt == torch.float16:
                    return y.numpy(), gt
                return y.view(torch.int16).numpy().view(np.uint8).reshape(x.shape[0], -1), gt
    return x.numpy(), T.F32


def _theta_encoding(g, kind: str, task: _Task, name: str, perm: Tensor | None) -> tuple[np.ndarray, Any, Tensor]:
    """(blocks, GGML type, Δ(Θ) in the file's row order) of a weight compressed to a GGUF block type."""
    from ..compressions.grouped import grouped_delta

    bits, group, symmetric, _ = BLOCK_TYPES[kind]
    th = task.theta
    rows, cols = task.view
    if cols % _QK:
        raise GGUFExportError(f"tensor {name}: rows of {cols} weights are not a multiple of the {_QK}-weight blocks "
                              f"of {kind.upper()}")
    codes = th["codes"].reshape(rows, cols)
    scales, mins = th["scales"], th.get("mins")
    if perm is not None:
        codes, scales = codes[perm], scales[perm]
        mins = None if mins is None else mins[perm]
    try:
        blocks = pack_blocks(kind, codes.cpu().numpy(), scales.cpu().numpy(),
                             None if mins is None else mins.cpu().numpy())
    except ValueError as e:
        raise GGUFExportError(f"tensor {name} ({kind.upper()}): {e}") from None
    delta = grouped_delta(scales, mins, codes.reshape(-1), bits, group, symmetric, rows, cols)
    return blocks, getattr(g.GGMLQuantizationType, kind.upper()), delta


# ---- the writer ----------------------------------------------------------------------------------------------------
def export_gguf(compressed, source, out_path, *, allow_float: bool = False, verify: bool = True,
                metadata: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Write a compressed Llama model as a GGUF file for llama.cpp (module docstring: types, names, permutation).

    Each weight compressed to a GGUF block type (:func:`gguf_block_type`) is written as that type, packed from Θ
    (:func:`pack_blocks`); its de-quantized values are Δ(Θ) bit for bit. The file is written to a temporary file
    beside ``out_path`` and renamed over it at the end, so ``out_path`` is the old file or the whole new one.

    Args:
        compressed: the compressed model: a ``.lcz`` path (e.g. ``RUN/model.lcz`` of ``lcompress ptq``), or a
            :class:`~lcompress.ptq.PostTrainResult` / :class:`~lcompress.LC` object (``.model`` and ``.tasks``;
            the compressed weights are taken from Θ, the others from the model).
        source: the model that was compressed, for the metadata and tokenizer: a GGUF file (all its key-value
            pairs are copied, and the tensors that the compression left unchanged keep its encoding), or a Hugging
            Face Llama checkpoint directory (``config.json`` and the tokenizer files).
        out_path: the GGUF file to write.
        allow_float: a compressed weight whose compression has no GGUF block type (a codebook, pruning, grouped
            integers of another group or scale type) is refused by default; ``True`` writes its Δ(Θ) as a float
            tensor instead (exact, but not compressed in the file).
        verify: de-quantize every block-type tensor written with gguf-py's own decoder and check it against Δ(Θ)
            bit for bit before the file is renamed into place.
        metadata: key-value pairs to add or replace, ``{key: value}`` (str, bool, int as uint32, float as float32,
            a list) or ``{key: (value, gguf.GGUFValueType)}``; e.g. ``{"tokenizer.ggml.pre": "smollm"}``.

    Returns:
        ``{"path", "file_bytes", "tensors": {GGUF name: GGML type name}, "types": {type name: count},
        "compressed": number of tensors written from Θ}``.

    Raises:
        ImportError: gguf (the ``hf`` extra) is not installed.
        FileNotFoundError: ``compressed`` or ``source`` does not exist.
        GGUFExportError: (a ValueError, one line naming the tensor and type) a compression with no GGUF form and
            ``allow_float=False``, a row length that is not a multiple of 32, a tensor whose name has no GGUF
            counterpart, a shape that is not the source's, a source that is not a Llama GGUF file or checkpoint.
        OSError: ``out_path`` cannot be written (naming it); nothing is left behind.
    """
    g = _gguf()
    out = Path(out_path)
    model = _compressed_model(compressed)
    src = _source(source)
    names = g.get_tensor_name_map({v: k for k, v in g.MODEL_ARCH_NAMES.items()}[src.arch], src.blocks)
    # the compressed model's tensors by GGUF name
    mine: dict[str, str] = {}
    unmapped = []
    for hf_name in model.state:
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            if hf_name in model.task_of:
                raise GGUFExportError(f"tensor {hf_name}: compressed, but it has no {src.arch} GGUF name")
            unmapped.append(hf_name)
            continue
        if gname in mine:
            raise GGUFExportError(f"tensor {hf_name}: its GGUF name {gname} is also {mine[gname]}'s")
        mine[gname] = hf_name
    if unmapped:
        logger.warning("not written (no %s GGUF name): %s", src.arch, ", ".join(unmapped))
    order = [n for n in src.order] + [n for n in mine if n not in src.tensors]
    # tied embeddings: no output.weight where the source has none and the head is the embedding
    out_name, emb_name = "output.weight", "token_embd.weight"
    if out_name in mine and out_name not in src.tensors and emb_name in mine:
        a, b = model.state[mine[out_name]], model.state[mine[emb_name]]
        if a is b or (a.shape == b.shape and torch.equal(a, b)):
            order.remove(out_name)
    _check_writable(out)
    T = g.GGMLQuantizationType
    planned: list[tuple[str, np.ndarray, Any]] = []
    from_theta: dict[str, str] = {}  # GGUF name -> block type, the tensors written from Θ
    checks: list[tuple[str, np.ndarray, Any, Tensor]] = []
    for gname in order:
        if gname not in mine:  # a source tensor the model does not hold (e.g. rope_freqs): copied as it is
            t = src.tensors[gname]
            logger.info("%s: copied from the source as %s", gname, t.tensor_type.name)
            planned.append((gname, t.data, t.tensor_type))
            continue
        hf_name = mine[gname]
        perm = None
        if ".attn_q." in gname or ".attn_k." in gname:
            heads = src.heads if ".attn_q." in gname else src.heads_kv
            try:
                perm = rope_permutation(model.state[hf_name].shape[0], heads)
            except ValueError as e:
                raise GGUFExportError(f"tensor {gname}: {e}") from None
        task = model.task_of.get(hf_name)
        if task is not None:
            if task.theta is None:
                raise GGUFExportError(f"tensor {gname}: its task {task.name!r} has no Θ yet (no C step was run)")
            kind = gguf_block_type(task.config)
            shape = tuple(model.state[hf_name].shape)
            if kind is not None and len(task.params) == 1 and tuple(task.view) == shape and len(shape) == 2:
                blocks, gtype, delta = _theta_encoding(g, kind, task, gname, perm)
                planned.append((gname, blocks, gtype))
                from_theta[gname] = gtype.name
                if verify:
                    checks.append((gname, blocks, gtype, delta))
                continue
            what = "{}({})".format(task.config.get("type"),
                                   ", ".join(f"{k}={v}" for k, v in task.config.items() if k != "type"))
            if not allow_float:
                raise GGUFExportError(f"tensor {gname} ({hf_name}): its compression {what} has no GGUF block type "
                                      f"(GGUF writes {', '.join(k.upper() for k in BLOCK_TYPES)} from Θ: grouped "
                                      "integers in groups of 32 with float16 scales); pass allow_float=True "
                                      "(--allow-float) to write its Δ(Θ) as a float tensor")
            logger.warning("%s: %s has no GGUF block type; written as a float tensor (allow_float)", gname, what)
        value = model.state[hf_name]
        if perm is not None:
            value = value[perm]
        data, gtype = _float_encoding(g, value, gname, src.tensors.get(gname))
        planned.append((gname, data, gtype))
    for gname, blocks, gtype, delta in checks:
        dec = np.asarray(g.quants.dequantize(blocks, gtype), dtype=np.float32)
        if not torch.equal(_bits(torch.from_numpy(dec).reshape(delta.shape)), _bits(delta.float().cpu())):
            raise RuntimeError(f"tensor {gname}: the {gtype.name} blocks do not decode to Δ(Θ) (a bug in the packer)")
    counts = Counter(gt.name for _, _, gt in planned)
    main = (Counter(from_theta.values()) or counts).most_common(1)[0][0]
    ftype = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}.get(main, f"MOSTLY_{main}")

    tmp = out.with_name(f"{out.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    w = g.GGUFWriter(None, src.arch)
    try:
        src.fill(w)
        w.add_file_type(int(getattr(g.LlamaFileType, ftype, g.LlamaFileType.GUESSED)))
        w.add_quantization_version(g.GGML_QUANT_VERSION)
        for key, val in (metadata or {}).items():
            _add_metadata(g, w, key, val)
        for gname, data, gtype in planned:
            w.add_tensor(gname, data, raw_dtype=None if gtype in (T.F32, T.F16) else gtype)
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
            for f in w.fout or []:
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            raise OSError(e.errno, f"{out}: the GGUF file cannot be written ({e.strerror or e})") from None
        finally:
            w.close()
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    size = out.stat().st_size
    tensors = {n: gt.name for n, _, gt in planned}
    logger.info("wrote %s: %d bytes, %d tensors (%s)", out, size, len(tensors),
                ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return {"path": str(out), "file_bytes": size, "tensors": tensors, "types": dict(counts),
            "compressed": len(from_theta)}


def _check_writable(out: Path) -> None:
    """Fail before any work when ``out`` cannot be created (a missing or read-only directory, a directory there)."""
    if out.is_dir():
        raise OSError(21, f"{out}: is a directory, not a file the GGUF can be written to")
    probe = out.with_name(f"{out.name}.{os.getpid()}.{os.urandom(4).hex()}.tmp")
    try:
        with open(probe, "xb"):
            pass
    except OSError as e:
        raise OSError(e.errno, f"{out}: the GGUF file cannot be written ({e.strerror or e})") from None
    probe.unlink(missing_ok=True)


def _add_metadata(g, w, key: str, val: Any) -> None:
    T = g.GGUFValueType
    if isinstance(val, tuple) and len(val) == 2 and isinstance(val[1], T):
        w.add_key_value(key, val[0], val[1])
        return
    if isinstance(val, bool):
        w.add_bool(key, val)
    elif isinstance(val, int):
        w.add_uint32(key, val)
    elif isinstance(val, float):
        w.add_float32(key, val)
    elif isinstance(val, str):
        w.add_string(key, val)
    elif isinstance(val, (list, tuple)):
        w.add_array(key, list(val))
    else:
        raise GGUFExportError(f"metadata {key!r}: a value of type {type(val).__name__} is not one GGUF stores")
