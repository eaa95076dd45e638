"""Compact codebook models in memory: resident bytes and latency against the dense model (CPU).

For LeNet300 (784-300-100-10, every weight quantized) and one 4096×4096 Linear layer, at K = 2, 4 and 16
(``AdaptiveQuantization``), the model is compressed (direct compression at its random init: sizes and speed do
not depend on training), exported, and loaded with ``lcompress.load(..., compact=True)``. Prints one JSON object
with, per case:

* ``file_bytes`` (the ``.lcz`` file), ``resident_bytes`` of the compact and the dense model (parameters and
  buffers, each storage once: :func:`lcompress._packed.resident_bytes`) and their ratio to the file;
* latency at batch 1 and 64 (median and minimum ms) of the dense model and of the compact model with each decode
  option of :class:`lcompress.nn.CodebookLinear`: tiles of 2¹⁶, 2¹⁸ and 2²⁰ weights (the default) and the whole
  weight per call (``tile_weights=None``). All variants of a case are timed in turn inside one loop (A, B, C, ...
  repeated), under ``torch.inference_mode()``, so that each sees the same load of the shared machine.

Usage:  PYTHONPATH=src python bench/bench_compact_memory.py [--repeats 21] [--threads 2] [--quick]
"""
from __future__ import annotations

import argparse
import copy
import os
import sys

import torch
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import lcompress as lc  # noqa: E402
from lcompress._packed import resident_bytes  # noqa: E402
from lcompress.models import get_model  # noqa: E402
from lcompress.nn import CODEBOOK_TILE_WEIGHTS, CodebookLinear  # noqa: E402

TILES = {"tile_2^16": 1 << 16, "tile_2^18": 1 << 18, "tile_2^20 (default)": CODEBOOK_TILE_WEIGHTS, "whole": None}


def _set_tiles(model: nn.Module, tile_weights) -> nn.Module:
    m = copy.deepcopy(model)
    for mod in m.modules():
        if isinstance(mod, CodebookLinear):
            mod.tile_weights = tile_weights
    return m


def _case(name: str, make, in_features: int, k: int, repeats: int, batches) -> dict:
    torch.manual_seed(0)
    dense = make().eval()
    keys = [n for n, p in dense.named_parameters() if n.endswith("weight")]
    alg = lc.LC(dense, {n: lc.AdaptiveQuantization(k) for n in keys})
    data, _ = lc.export.to_bytes(alg)
    compact = lc.load(data, make().eval(), compact=True)
    with torch.no_grad():  # the dense model holds the same (decoded) weights
        for n, p in dense.named_parameters():
            if n in keys:
                p.copy_(alg.tasks[keys.index(n)].compression.decompress().reshape(p.shape))
    variants = {"dense": dense, **{t: _set_tiles(compact, tw) for t, tw in TILES.items()}}
    out = {
        "model": name, "k": k, "file_bytes": len(data),
        "resident_bytes": {"dense": resident_bytes(dense), "compact": resident_bytes(compact)},
    }
    out["resident_over_file"] = round(out["resident_bytes"]["compact"] / len(data), 4)
    out["dense_over_compact_resident"] = round(out["resident_bytes"]["dense"] / out["resident_bytes"]["compact"], 2)
    lat = {}
    for b in batches:
        x = torch.randn(b, in_features)
        with torch.inference_mode():
            ref = dense(x)
            for v in variants.values():  # warm up, and check that every variant computes the same outputs
                torch.testing.assert_close(v(x), ref, rtol=1e-4, atol=1e-4)
            times = {v: [] for v in variants}
            for _ in range(repeats):
                for v, m in variants.items():
                    s, _, _ = common.timed(lambda: m(x))
                    times[v].append(s)
        lat[f"batch_{b}"] = {v: common.summary_ms(t) for v, t in times.items()}
        lat[f"batch_{b}"]["compact_default_over_dense"] = round(
            common.paired_ratio(times["tile_2^20 (default)"], times["dense"]), 3)
        common.log(name, k, b, {v: s["median_ms"] for v, s in lat[f"batch_{b}"].items() if isinstance(s, dict)})
    out["latency"] = lat
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="3 repeats, K = 2 only (a smoke run)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res = common.header("compact_memory", args.threads, argv)
    ks = [2] if args.quick else [2, 4, 16]
    reps = 3 if args.quick else args.repeats
    cases = []
    for k in ks:
        cases.append(_case("lenet300", lambda: get_model("lenet300"), 784, k, reps, (1, 64)))
    for k in ks:
        cases.append(_case("linear_4096x4096", lambda: nn.Sequential(nn.Linear(4096, 4096)), 4096, k, reps, (1, 64)))
    res["cases"] = cases
    common.emit(res)


if __name__ == "__main__":
    main()
