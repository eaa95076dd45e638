"""Cost of half-precision SparseLinear layers on the CPU, which multiply in float32 (CPU CSR kernels have no
float16/bfloat16 products): a float16 / bfloat16 layer's forward time against the same layer in float32.

Prints one JSON object: per layer shape, density and batch, the median forward time (ms) of the float32,
float16 and bfloat16 layers and of the dense float16 and float32 layers (interleaved repeats,
``torch.inference_mode()``), and the half layers' time over the float32 one and over the dense float16 layer. The half forward converts the nnz values and the input to float32 on every call and the
output back, so the ratio is at its worst for small batches.

Usage:  PYTHONPATH=src python bench/bench_sparse_half.py [--repeats 31] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
import warnings

import torch
from torch import nn

from lcompress.nn import SparseLinear

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def _time(fn, x, inner: int) -> float:
    t = time.perf_counter()
    for _ in range(inner):
        fn(x)
    return (time.perf_counter() - t) / inner * 1e3


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=31)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = {"machine": platform.processor() or platform.machine(), "torch": torch.__version__,
           "threads": args.threads, "loadavg_start": os.getloadavg(), "cases": []}
    for (o, i) in ((300, 784), (1024, 1024), (2048, 2048)):
        for density in (0.01, 0.05):
            lin = nn.Linear(i, o)
            with torch.no_grad():
                lin.weight.mul_(torch.rand_like(lin.weight) < density)
            layers = {"float32": SparseLinear.from_dense(lin)}
            for name, dt in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
                layers[name] = SparseLinear.from_dense(copy.deepcopy(lin).to(dt))
            # the alternative a half-precision model has: its dense layer
            layers["dense_float16"] = copy.deepcopy(lin).half()
            layers["dense_float32"] = lin
            for batch in (1, 256):
                xs = {k: torch.randn(batch, i).to(m.bias.dtype) for k, m in layers.items()}
                inner = 200 if batch == 1 else 10
                times = {k: [] for k in layers}
                with torch.inference_mode():
                    for k, m in layers.items():  # warm-up
                        _time(m, xs[k], 3)
                    for _ in range(args.repeats):
                        for k, m in layers.items():
                            times[k].append(_time(m, xs[k], inner))
                med = {k: statistics.median(v) for k, v in times.items()}
                out["cases"].append({
                    "shape": [o, i], "density": density, "batch": batch, "ms": med,
                    "float16_over_float32": med["float16"] / med["float32"],
                    "bfloat16_over_float32": med["bfloat16"] / med["float32"],
                    "float16_over_dense_float16": med["float16"] / med["dense_float16"],
                })
    out["loadavg_end"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
