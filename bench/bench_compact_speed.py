"""Do lcompress's compact layers pay for themselves? Latency and resident memory of each compact form against the
dense ``nn.Linear`` (issue 17, item 4), on the CPU.

For a 4096×4096 layer and a transformer-sized 576→1536 one (SmolLM2-135M's MLP up-projection: weight 1536×576), at
batch 1 and 64, every form is built from a Θ of the layer (a random init, weights N(0, 0.02²): sizes and speed do not
depend on training), written to a ``.lcz`` file (the bytes it takes) and held as lcompress's compact layer:

* codebook: ``AdaptiveQuantization`` K = 4 (2-bit) and 16 (4-bit) → :class:`lcompress.nn.CodebookLinear`;
* grouped int: ``GroupedIntQuantization`` int2/int3/int4/int8 in groups of 64 (round-to-nearest grids via
  ``set_grid``; int4 also asymmetric) → :class:`lcompress.nn.GroupedIntLinear`;
* sparse: ``ConstraintL0Pruning`` at 90% and 95% sparsity and ``NMPruning(2, 4)`` → :class:`lcompress.nn.SparseLinear`
  (at exactly 90% and at 2:4 ``lc.load(..., compact=True)`` keeps the layer dense: the CSR layer is built here all the
  same, to measure it);
* low-rank: ``LowRank`` at ranks giving 1/4 and 1/2 of the dense weights → :class:`lcompress.nn.LowRankLinear`;
* sum: int2 g64 + 1% sparse outliers (``AdditiveCombination``): what ``lc.load(..., compact=True)`` builds for it.

Each decoding layer is also timed with its opt-in cache (``set_cache("weight")``, and ``"codes"`` for grouped ints).
Every variant of a (shape, batch) case is timed in turn inside one loop (dense, A, B, ..., repeated) under
``torch.inference_mode()``, after a warm-up that also checks its output against ``F.linear`` with Δ(Θ) as the weight;
``ratio`` is the median over repeats of (variant time / dense time in the same repeat), so load on the shared machine
cancels. Resident bytes count the module's parameters and buffers (caches included), each storage once
(:func:`lcompress.nn.resident_bytes`), against the dense layer's and the ``.lcz`` file's bytes.

Also ``sparse_paths`` (which product :class:`SparseLinear` should use by input rows: CSR × dense, CSR mv, weighted
embedding bags) and ``grouped_tiles`` (tile sizes of :class:`GroupedIntLinear`), which set the layers' constants.

Every case is timed at 1 and 2 torch threads (``--threads``): with other jobs on the 2 cores a second thread often
has no core to run on, and the 1-thread ratios are the steadier ones.

Usage:  OMP_WAIT_POLICY=PASSIVE PYTHONPATH=src nice python bench/bench_compact_speed.py [--repeats 15] [--threads 1,2]
            [--quick] > bench/compact_speed_<date>.json
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, os.path.dirname(__file__))
import common  # noqa: E402

import lcompress as lc  # noqa: E402
from lcompress import nn as lnn  # noqa: E402
from lcompress.export import to_bytes  # noqa: E402
from lcompress.ptq import PostTrainResult  # noqa: E402
from lcompress.tasks import resolve_tasks  # noqa: E402

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

SHAPES = {"4096x4096": (4096, 4096), "576->1536": (1536, 576)}  # (out, in)


# ---- Θ and files ---------------------------------------------------------------------------------------------------
def rtn_grid(comp: lc.GroupedIntQuantization, w: torch.Tensor) -> torch.Tensor:
    """Set a round-to-nearest grid as Θ (the exact C step takes ~30 s on a 4096×4096 layer here; sizes and speed
    do not depend on which grid it is); returns Δ(Θ)."""
    rows, cols = w.shape
    g, b = comp.group, comp.bits
    ng = -(-cols // g)
    wp = F.pad(w, (0, ng * g - cols)).view(rows, ng, g)
    if comp.symmetric:
        s = (wp.abs().amax(-1) / (1 << (b - 1))).clamp_min(1e-8).half().float()
        q = torch.round(w / s.repeat_interleave(g, 1)[:, :cols]).clamp(-(1 << (b - 1)), (1 << (b - 1)) - 1)
        return comp.set_grid(s, q)
    lo, hi = wp.amin(-1), wp.amax(-1)
    d = ((hi - lo) / ((1 << b) - 1)).clamp_min(1e-8).half().float()
    m = lo.half().float()
    q = torch.round((w - m.repeat_interleave(g, 1)[:, :cols]) / d.repeat_interleave(g, 1)[:, :cols])
    return comp.set_grid(d, q.clamp(0, (1 << b) - 1), m)


def file_bytes(lin: nn.Linear, comp) -> int:
    """Bytes of the ``.lcz`` file of a one-layer model whose weight is compressed by ``comp`` (Θ already set)."""
    model = nn.Sequential(lin)
    res = PostTrainResult(model, resolve_tasks(model, {"0.weight": comp}), [], {}, 0.0)
    data, _ = to_bytes(res)
    return len(data)


def build_forms(out_f: int, in_f: int, quick: bool) -> tuple[nn.Linear, list[dict]]:
    """The dense layer and, per form, its compact layer(s), Δ(Θ) and file bytes."""
    torch.manual_seed(0)
    lin = nn.Linear(in_f, out_f)
    with torch.no_grad():
        lin.weight.normal_(0, 0.02)
    w = lin.weight.detach().clone()
    forms: list[dict] = []

    def add(name, comp, delta, layers):
        with torch.no_grad():
            lin.weight.copy_(delta.reshape(w.shape))  # the file's model holds Δ(Θ), as a compressed model does
        fb = file_bytes(lin, comp)
        with torch.no_grad():
            lin.weight.copy_(w)
        forms.append({"form": name, "config": comp.config(), "delta": delta.reshape(w.shape).float(),
                      "file_bytes": fb, "layers": layers})
        common.log("built", name, fb)

    for k in ((4,) if quick else (4, 16)):
        comp = lc.AdaptiveQuantization(k)
        d = comp.compress(w)
        th = comp.theta
        mk = lambda: lnn.CodebookLinear.from_codes(lin, th["codebook"], th["codes"])  # noqa: E731
        add(f"codebook_k{k}", comp, d, {"packed": mk(), "cache_weight": mk().set_cache("weight")})
    grids = [(4, True), (2, True)] if quick else [(2, True), (3, True), (4, True), (8, True), (4, False)]
    for bits, sym in grids:
        comp = lc.GroupedIntQuantization(bits, 64, symmetric=sym)
        d = rtn_grid(comp, w)
        th = comp.theta
        mk = lambda: lnn.GroupedIntLinear.from_theta(lin, th, bits, 64, sym)  # noqa: E731
        add(f"int{bits}_g64" + ("" if sym else "_asym"), comp, d,
            {"packed": mk(), "cache_codes": mk().set_cache("codes"), "cache_weight": mk().set_cache("weight")})
    for sparsity in ((0.9,) if quick else (0.9, 0.95)):
        comp = lc.ConstraintL0Pruning(fraction=round(1 - sparsity, 4))
        d = comp.compress(w)
        idx = torch.nonzero(d.reshape(-1)).reshape(-1)
        add(f"sparse_{int(sparsity * 100)}pct", comp, d,
            {"csr": lnn.SparseLinear.from_indices(lin, idx, d.reshape(-1)[idx])})
    comp = lc.NMPruning(2, 4)
    d = comp.compress(w)
    idx = torch.nonzero(d.reshape(-1)).reshape(-1)
    add("sparse_2of4", comp, d, {"csr": lnn.SparseLinear.from_indices(lin, idx, d.reshape(-1)[idx])})
    full = out_f * in_f / (out_f + in_f)  # the rank whose factors hold as many weights as the layer
    for frac in ((0.25,) if quick else (0.25, 0.5)):
        r = max(1, int(frac * full) // 8 * 8)
        comp = lc.LowRank(r)
        a = torch.randn(out_f, r) * 0.02
        b = torch.randn(r, in_f) * 0.02
        comp.load_state_dict({"config": comp.config(), "theta": {"A": a, "B": b}, "shape": [out_f, in_f]})
        add(f"lowrank_{frac:g}_r{r}", comp, a @ b, {"lowrank": lnn.LowRankLinear.from_factors(lin, a, b)})
    # a sum: int2 g64 over what 1% outliers leave; the layer lc.load(..., compact=True) builds for it
    comp = lc.GroupedIntQuantization(2, 64) + lc.ConstraintL0Pruning(fraction=0.01)
    sp = comp.parts[1]
    ds = sp.compress(w)
    dq = rtn_grid(comp.parts[0], w - ds)
    comp.load_state_dict({"config": comp.config(), "parts": [p.state_dict() for p in comp.parts],
                          "shape": [out_f, in_f]})
    model = nn.Sequential(nn.Linear(in_f, out_f))
    with torch.no_grad():
        model[0].weight.copy_(dq + ds)
        model[0].bias.copy_(lin.bias)
    data, _ = to_bytes(PostTrainResult(model, resolve_tasks(model, {"0.weight": comp}), [], {}, 0.0))
    loaded = lc.load(data, nn.Sequential(nn.Linear(in_f, out_f)), compact=True)[0]
    forms.append({"form": "sum_int2_g64+sparse1pct", "config": comp.config(), "delta": (dq + ds).float(),
                  "file_bytes": len(data), "layers": {type(loaded).__name__: loaded}})
    return lin, forms


# ---- timing --------------------------------------------------------------------------------------------------------
def time_case(variants: dict, x: torch.Tensor, repeats: int) -> dict:
    """Median ms and the median paired ratio to variants["dense"], all timed in turn in one loop."""
    times = {v: [] for v in variants}
    with torch.inference_mode():
        for _ in range(2):
            for f in variants.values():
                f(x)
        for _ in range(repeats):
            for v, f in variants.items():
                t = time.perf_counter()
                f(x)
                times[v].append(time.perf_counter() - t)
    out = {}
    for v, t in times.items():
        out[v] = {"median_ms": round(statistics.median(t) * 1e3, 4), "min_ms": round(min(t) * 1e3, 4),
                  "ratio": round(common.paired_ratio(t, times["dense"]), 3)}
    return out


def layer_cases(shape_name: str, out_f: int, in_f: int, batches, repeats: int, quick: bool, threads) -> dict:
    lin, forms = build_forms(out_f, in_f, quick)
    dense_bytes = lnn.resident_bytes(lin)
    rows = []
    for f in forms:
        for variant, layer in f["layers"].items():
            layer.eval()
            rb = lnn.resident_bytes(layer)
            rows.append({"form": f["form"], "variant": variant, "layer": type(layer).__name__,
                         "config": f["config"], "file_bytes": f["file_bytes"], "resident_bytes": rb,
                         "resident_over_dense": round(rb / dense_bytes, 4),
                         "resident_over_file": round(rb / f["file_bytes"], 4),
                         "resident_by_tensor": lnn.resident_bytes(layer, by_tensor=True), "latency": {}})
    for th in threads:
        torch.set_num_threads(th)
        for b in batches:
            torch.manual_seed(1)
            x = torch.randn(b, in_f)
            variants = {"dense": lin}
            with torch.inference_mode():
                for f in forms:
                    ref = F.linear(x, f["delta"], lin.bias)
                    for variant, layer in f["layers"].items():
                        y = layer(x)
                        err = float((y - ref).abs().max() / ref.abs().max())
                        if err > 1e-4:
                            raise AssertionError(f"{shape_name} {f['form']} {variant}: relative error {err:.2e}")
                        variants[f"{f['form']}/{variant}"] = layer
            load0 = common.loadavg()
            res = time_case(variants, x, repeats)
            key = f"threads_{th}/batch_{b}"
            for r in rows:
                r["latency"][key] = {**res[f"{r['form']}/{r['variant']}"],
                                     "dense_median_ms": res["dense"]["median_ms"]}
            common.log(shape_name, key, "dense", res["dense"]["median_ms"], "ms", "load", load0,
                       {k: v["ratio"] for k, v in res.items() if k != "dense"})
    return {"shape": shape_name, "out_features": out_f, "in_features": in_f, "dense_resident_bytes": dense_bytes,
            "forms": rows}


# ---- the constants' measurements -----------------------------------------------------------------------------------
def sparse_paths(repeats: int) -> list[dict]:
    """SparseLinear's products by input rows, at 90% sparsity: CSR × dense (addmm), CSR mv, weighted embedding
    bags, against dense F.linear."""
    out = []
    for name, (o, i) in SHAPES.items():
        torch.manual_seed(0)
        lin = nn.Linear(i, o)
        k = int(0.1 * o * i)
        idx = torch.randperm(o * i)[:k].sort().values
        sp = lnn.SparseLinear.from_indices(lin, idx, torch.randn(k))
        csr, w = sp.weight_csr(), lin.weight.detach()
        for rows in (1, 2, 4, 8, 16, 64):
            x = torch.randn(rows, i)
            v = {"dense": lambda x: F.linear(x, w),
                 "csr_addmm": lambda x: torch.addmm(sp.bias.unsqueeze(1), csr, x.t().contiguous()).t(),
                 "embedding_bag": lambda x: F.embedding_bag(sp.col_indices, x.t().contiguous(), sp.crow_indices,
                                                            mode="sum", per_sample_weights=sp.values,
                                                            include_last_offset=True).t()}
            if rows == 1:
                v["csr_mv"] = lambda x: torch.mv(csr, x[0])
            res = time_case(v, x, repeats)
            out.append({"shape": name, "rows": rows, **{k: r["ratio"] for k, r in res.items()},
                        "dense_median_ms": res["dense"]["median_ms"]})
            common.log("sparse_paths", name, rows, {k: r["ratio"] for k, r in res.items()})
    return out


def grouped_tiles(repeats: int) -> list[dict]:
    """GroupedIntLinear int4 g64 on the 4096×4096 layer with tiles of 2^16 ... 2^20 weights and the whole weight."""
    torch.manual_seed(0)
    lin = nn.Linear(4096, 4096)
    comp = lc.GroupedIntQuantization(4, 64)
    rtn_grid(comp, lin.weight.detach() * 0.5)
    th = comp.theta
    tiles = {"2^16": 1 << 16, "2^17": 1 << 17, "2^18": 1 << 18, "2^19": 1 << 19, "2^20": 1 << 20, "whole": None}
    layers = {t: lnn.GroupedIntLinear.from_theta(lin, th, 4, 64, tile_weights=tw) for t, tw in tiles.items()}
    out = []
    for b in (1, 64):
        x = torch.randn(b, 4096)
        res = time_case({"dense": lin, **layers}, x, repeats)
        out.append({"batch": b, **{k: r["ratio"] for k, r in res.items()}, "dense_median_ms": res["dense"]["median_ms"]})
        common.log("grouped_tiles", b, {k: r["ratio"] for k, r in res.items()})
    return out


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", default="1,2", help="torch threads to time at, comma-separated (default 1,2)")
    ap.add_argument("--quick", action="store_true", help="3 repeats, fewer forms, the small shape only (a smoke run)")
    ap.add_argument("--skip-constants", action="store_true", help="skip sparse_paths and grouped_tiles")
    args = ap.parse_args(argv)
    threads = [int(t) for t in str(args.threads).split(",")]
    res = common.header("compact_speed", threads[-1], argv)
    res["machine"]["torch_threads"] = threads
    reps = 3 if args.quick else args.repeats
    shapes = {"576->1536": SHAPES["576->1536"]} if args.quick else SHAPES
    res["cases"] = [layer_cases(n, o, i, (1, 64), reps, args.quick, threads) for n, (o, i) in shapes.items()]
    res["loadavg_after_cases"] = common.loadavg()
    if not (args.quick or args.skip_constants):
        res["sparse_paths"], res["grouped_tiles"] = {}, {}
        for th in threads:
            torch.set_num_threads(th)
            res["sparse_paths"][f"threads_{th}"] = sparse_paths(reps)
            res["grouped_tiles"][f"threads_{th}"] = grouped_tiles(reps)
    common.emit(res)


if __name__ == "__main__":
    main()
