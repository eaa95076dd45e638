"""Benchmark of the compact file format and the compact inference modules (CPU, 2 threads).

Prints one JSON object:

* ``models``: for LeNet300 (784-300-100-10), a larger MLP (784-2048-2048-10) and ResNet-20, per compression
  scheme: ``.lcz`` file bytes against the float32 state dict and the size report's bound, resident parameter
  bytes of the compact model (``lcompress.load(..., compact=True)``) against the dense one, the compact layer
  types, and CPU latency (median ms) at batch 1 and 256 of the compact and the dense model, timed side by side
  (interleaved repeats in one run) under ``torch.inference_mode()``;
* ``sparse_crossover``: CSR (:class:`lcompress.nn.SparseLinear`) against dense ``F.linear`` time over densities,
  per layer shape and batch size, and the largest density at which the sparse product is still faster;
* ``dead_neurons``: LeNet300 784-300-100 sizes after :func:`lcompress.nn.remove_dead_neurons` on a pruned
  model (trained a little on Fashion-MNIST first when the data set is found, else at its random init).

Usage:  PYTHONPATH=src python bench/bench_compact.py [--repeats 15] [--quick] [--train-epochs 2]

The machine may be shared: ``loadavg`` is recorded at the start and the end, and timings are medians of
interleaved repeats so that both sides of a comparison see the same load.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import tempfile
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

import lcompress as lc
from lcompress.models import get_model
from lcompress.nn import SPARSE_CROSSOVER_DENSITY, SparseLinear
from lcompress.surgery import remove_dead_neurons

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")


def resident_bytes(model: nn.Module) -> int:
    """Bytes of the distinct storages behind the model's parameters and buffers."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def interleaved(fns: list, repeats: int, warmup: int = 2) -> list[float]:
    """Median seconds of each function, timed in turn within every repeat."""
    times = [[] for _ in fns]
    with torch.inference_mode():
        for _ in range(warmup):
            for f in fns:
                f()
        for _ in range(repeats):
            for i, f in enumerate(fns):
                t = time.perf_counter()
                f()
                times[i].append(time.perf_counter() - t)
    return [statistics.median(t) for t in times]


def mlp_factory(sizes):
    return lambda: get_model("mlp", sizes=sizes).eval()


def schemes_for(name: str, model: nn.Module) -> dict:
    if name == "resnet20":
        convs = "re:.*layer\\d\\.\\d\\.conv\\d\\.weight"
        return {
            "quantize_k2_convs": {convs: lc.AdaptiveQuantization(2)},
            "prune_5pct_joint": {(convs, "fc.weight"): lc.ConstraintL0Pruning(int(0.05 * _numel(model, convs)))},
            "lowrank_r8_layer3_scheme_1": {"re:layer3\\..*conv\\d\\.weight": lc.LowRank(8)},
            "lowrank_r8_layer3_scheme_2": {"re:layer3\\..*conv\\d\\.weight": lc.LowRank(8, conv_scheme="scheme_2")},
        }
    ws = tuple(n for n, p in model.named_parameters() if n.endswith("weight"))
    n_all = sum(p.numel() for n, p in model.named_parameters() if n in ws)
    return {
        "quantize_k2_all": {"re:fc\\d\\.weight": lc.AdaptiveQuantization(2)},
        "quantize_k4_joint": {ws: lc.AdaptiveQuantization(4)},
        "prune_5pct_joint": {ws: lc.ConstraintL0Pruning(int(0.05 * n_all))},
        "prune_1pct_joint": {ws: lc.ConstraintL0Pruning(int(0.01 * n_all))},
        "lowrank_r10_fc2": {"fc2.weight": lc.LowRank(10)},
        "quantize_k2_plus_prune_1pct_fc1": {"fc1.weight": lc.AdaptiveQuantization(2)
                                            + lc.ConstraintL0Pruning(int(0.01 * model.fc1.weight.numel()))},
    }


def _numel(model, pattern):
    import re

    rx = re.compile(pattern[3:])
    return sum(p.numel() for n, p in model.named_parameters() if rx.fullmatch(n))


def bench_model(name, factory, x_shape, repeats, big_batch, tmp):
    torch.manual_seed(0)
    base = factory()
    dense_bytes = sum(v.numel() * v.element_size() for v in base.state_dict().values())
    rows = {}
    for scheme, tasks in schemes_for(name, base).items():
        model = copy.deepcopy(base)
        t0 = time.perf_counter()
        alg = lc.LC(model, tasks)
        t_compress = time.perf_counter() - t0
        path = os.path.join(tmp, f"{name}-{scheme}.lcz")
        t0 = time.perf_counter()
        info = alg.export(path)
        t_save = time.perf_counter() - t0
        dense_model = factory()
        t0 = time.perf_counter()
        lc.load(path, dense_model)
        t_load = time.perf_counter() - t0
        compact = lc.load(path, factory(), compact=True)
        kinds = sorted({type(m).__name__ for m in compact.modules() if type(m).__module__ == "lcompress.nn"})
        lat = {}
        for b in (1, big_batch):
            x = torch.randn(b, *x_shape)
            with torch.inference_mode():
                err = float((compact(x) - dense_model(x)).abs().max() / dense_model(x).abs().max())
            td, tc = interleaved([lambda: dense_model(x), lambda: compact(x)], repeats if b == 1 else max(3, repeats // 3))
            lat[f"batch_{b}"] = {"dense_ms": round(td * 1e3, 3), "compact_ms": round(tc * 1e3, 3),
                                 "speedup": round(td / tc, 2), "max_rel_diff": err}
        rows[scheme] = {
            "file_bytes": info["file_bytes"],
            "dense_state_dict_bytes": dense_bytes,
            "file_ratio": round(dense_bytes / info["file_bytes"], 2),
            "size_report_bytes": round(info["compressed_bits"] / 8),
            "bound_bytes": round(info["bound_bytes"]),
            "bound_margin_bytes": round(info["bound_bytes"] - info["file_bytes"]),
            "resident_dense_bytes": resident_bytes(dense_model),
            "resident_compact_bytes": resident_bytes(compact),
            "compact_layers": kinds,
            "latency": lat,
            "seconds": {"direct_compression": round(t_compress, 2), "save": round(t_save, 3), "load": round(t_load, 3)},
        }
    return rows


def sparse_crossover(repeats: int, quick: bool):
    shapes = [(300, 784), (100, 300), (1024, 1024), (2048, 2048)] if not quick else [(300, 784), (1024, 1024)]
    densities = [0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5]
    out = []
    torch.manual_seed(0)
    for o, i in shapes:
        lin = nn.Linear(i, o)
        for b in (1, 256):
            x = torch.randn(b, i)
            ratios = {}
            for d in densities:
                pruned = copy.deepcopy(lin)
                with torch.no_grad():
                    pruned.weight.mul_(torch.rand_like(pruned.weight) < d)
                sp = SparseLinear.from_dense(pruned)
                td, ts = interleaved([lambda: F.linear(x, pruned.weight, pruned.bias), lambda: sp(x)],
                                     repeats if b == 1 else max(5, repeats // 2))
                ratios[d] = round(ts / td, 3)
            faster = [d for d in densities if ratios[d] < 1.0]
            out.append({"shape": [o, i], "batch": b, "sparse_over_dense_time": ratios,
                        "crossover_density": max(faster) if faster else 0.0})
    return {"rows": out, "min_crossover": min(r["crossover_density"] for r in out),
            "median_crossover": statistics.median(r["crossover_density"] for r in out),
            "constant_in_lcompress_nn": SPARSE_CROSSOVER_DENSITY}


def dead_neurons(train_epochs: int):
    torch.manual_seed(0)
    model = get_model("lenet300")
    trained = False
    if train_epochs > 0:
        try:
            from lcompress.data import load_fashion_mnist
            from lcompress.training import evaluate, train_reference

            data = load_fashion_mnist()
            train_reference(model, data, epochs=train_epochs, lr=0.05, progress=False)
            trained = True
        except (FileNotFoundError, OSError, ValueError):
            pass
    model.eval()
    ws = ("fc1.weight", "fc2.weight", "fc3.weight")
    n_all = sum(getattr(model, w.split(".")[0]).weight.numel() for w in ws)
    res = {"trained_on_fashion_mnist_epochs": train_epochs if trained else 0,
           "note": "direct magnitude pruning (no LC retraining), so test errors are those of a pruned, untuned net"}
    if trained:
        res["dense_test_error_pct"] = evaluate(model, data.x_test, data.y_test)
    for frac in (0.05, 0.02, 0.01):
        m = copy.deepcopy(model)
        alg = lc.LC(m, {ws: lc.ConstraintL0Pruning(int(frac * n_all))})
        with alg.compressed(), torch.no_grad():
            x = torch.randn(16, 784)
            ref = m(x)
            rep = remove_dead_neurons(m, ["fc1", "fc2", "fc3"])
            diff = float((m(x) - ref).abs().max())
            entry = {"sizes_before": rep["sizes_before"], "sizes_after": rep["sizes_after"],
                     "inputs_used": rep["inputs_used"], "max_abs_output_diff": diff}
            if trained:
                entry["test_error_pct"] = evaluate(m, data.x_test, data.y_test)
        res[f"prune_{int(frac * 100)}pct_joint"] = entry
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--quick", action="store_true", help="LeNet300 only, fewer shapes")
    ap.add_argument("--train-epochs", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(2)
    result = {
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "loadavg_start": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        models = {"lenet300": (lambda: get_model("lenet300").eval(), (784,), 256)}
        if not args.quick:
            models["mlp_784_2048_2048_10"] = (mlp_factory([784, 2048, 2048, 10]), (784,), 256)
            models["resnet20"] = (lambda: get_model("resnet20").eval(), (3, 32, 32), 256)
        result["models"] = {n: bench_model(n, f, s, args.repeats, b, tmp) for n, (f, s, b) in models.items()}
    result["sparse_crossover"] = sparse_crossover(args.repeats, args.quick)
    result["dead_neurons"] = dead_neurons(args.train_epochs)
    result["machine"]["loadavg_end"] = os.getloadavg()
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
