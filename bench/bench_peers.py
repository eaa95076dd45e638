"""LeNet300 on Fashion-MNIST: the peers practitioners use instead of LC (lcompress.peers), at LC's schemes and sizes.

Schemes (the task maps LC runs; K=4 is quantize_all with k = 4):

* ``k2``: every layer its own 2-entry codebook — ``ste_codebook`` (learned codebook STE) and ``scaled_sign_ste``;
* ``k4``: every layer its own 4-entry codebook — ``ste_codebook``;
* ``prune_5``: all layers jointly to 5% — ``gmp`` (gradual magnitude pruning) and ``oneshot_prune``;
* ``binary_plus_sparse``: one 2-entry codebook over all layers + 1% sparse float correction — ``ste_codebook_gmp``.

Every run starts from the demo's reference, draws minibatches in the L steps' order (seed + 1), trains with LC's
L-step optimizer (SGD, Nesterov momentum 0.9, batch 256, lr·0.98^epoch) for as many epochs as LC's 30 steps, and
ends at a model of exactly the scheme's form; its size is counted by lcompress (``LC.size_report`` of the peer's Θ).
First every lr of the grid on the first seed, then the best lr (lowest test error there) on the other seeds.

Progress goes to stderr; the JSON (also written to ``--out`` after every run, so an interrupted bench resumes with
the runs it has) goes to stdout.

    OMP_WAIT_POLICY=PASSIVE python bench/bench_peers.py [--reference runs/reference/lenet300.pt] [--seeds 0,1,2,3,4]
                                [--lrs 0.1,0.03,0.01,0.003,0.001] [--threads 1]
                                [--runs k2:ste_codebook,prune_5:gmp] [--epochs 30] [--out bench/peers_DATE.json]
                                [--reuse other.json,...]
"""
from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, header, log  # noqa: E402

import lcompress as lc  # noqa: E402
from lcompress.config import parse_config  # noqa: E402
from lcompress.demo import scheme_config  # noqa: E402
from lcompress.experiment import load_data, prepare_reference  # noqa: E402
from lcompress.peers import METHODS, train_peer  # noqa: E402
from lcompress.training import evaluate  # noqa: E402

#: scheme -> (demo scheme it comes from, k override or None, description)
SCHEMES = {
    "k2": ("quantize_all", None, "every layer its own 2-entry codebook (1 bit)"),
    "k4": ("quantize_all", 4, "every layer its own 4-entry codebook (2 bits)"),
    "prune_5": ("prune_5", None, "all layers jointly pruned to 5%"),
    "binary_plus_sparse": ("binary_plus_sparse", None, "one 1-bit codebook over all layers + 1% sparse correction"),
}
RUNS = ["k2:ste_codebook", "k2:scaled_sign_ste", "k4:ste_codebook", "prune_5:gmp", "prune_5:oneshot_prune",
        "binary_plus_sparse:ste_codebook_gmp"]


def scheme_tasks(scheme: str, method: str, reference: str):
    """The task map LC runs for the scheme (from the demo's config), or its scaled-sign counterpart."""
    demo, k, _ = SCHEMES[scheme]
    raw = scheme_config(demo, reference)
    if k is not None:
        raw["tasks"][0]["compression"]["k"] = k
    if method == "scaled_sign_ste":
        raw["tasks"][0]["compression"] = {"type": "ScaledBinaryQuantization"}
    return parse_config(raw).task_map()


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--reference", default="runs/reference/lenet300.pt")
    p.add_argument("--seeds", default="0,1,2,3,4")
    p.add_argument("--lrs", default="0.1,0.03,0.01,0.003,0.001")
    p.add_argument("--runs", default=",".join(RUNS))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--raw-centroid-grad", action="store_true",
                   help="STE codebooks: the centroids' summed gradients instead of their members' mean (an ablation)")
    p.add_argument("--prune-end", type=float, default=0.75, help="GMP: fraction of the run over which sparsity rises")
    p.add_argument("--reuse", default="", help="comma-separated JSON files of earlier runs to take records from")
    p.add_argument("--out", default=f"bench/peers_{datetime.date.today().isoformat()}.json")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    seeds = [int(s) for s in a.seeds.split(",")]
    lrs = [float(v) for v in a.lrs.split(",")]
    runs = [tuple(r.split(":")) for r in a.runs.split(",")]
    for scheme, method in runs:
        if scheme not in SCHEMES or method not in METHODS:
            sys.exit(f"--runs: unknown scheme:method {scheme}:{method} "
                     f"(schemes {list(SCHEMES)}, methods {list(METHODS)})")

    normalize = not a.raw_centroid_grad
    out = Path(a.out)
    result = header("lenet300 fashion-mnist peers", a.threads)
    result.update(epochs=a.epochs, prune_end=a.prune_end, lr_grid=lrs, seeds=seeds, records=[],
                  lc_direct_compression={})
    done = {}
    # resume: keep the runs an earlier (interrupted) invocation finished, and those of --reuse files (e.g. from
    # invocations that ran other --runs in parallel)
    for f in ([out] if out.is_file() else []) + [Path(v) for v in a.reuse.split(",") if v]:
        for r in json.loads(f.read_text()).get("records", []):
            key = (r["scheme"], r["method"], r["lr"], r["seed"], r["epochs"], r.get("prune_end", 0.75),
                   r.get("normalize_centroid_grad", True))
            if key not in done:
                done[key] = r
                result["records"].append(r)

    cfg = parse_config(scheme_config("quantize_all", a.reference))
    data = load_data(cfg)
    ref, _ = prepare_reference(cfg, data, progress=False)
    ref_error = evaluate(ref, data.x_test, data.y_test)
    result["reference"] = {"checkpoint": a.reference, "test_error": ref_error}
    log(f"reference {a.reference}: test error {ref_error:.2f}%")

    def run(scheme: str, method: str, lr: float, seed: int) -> dict:
        key = (scheme, method, lr, seed, a.epochs, a.prune_end, normalize)
        if key in done:
            return done[key]
        tasks = scheme_tasks(scheme, method, a.reference)
        model = copy.deepcopy(ref)
        res = train_peer(model, tasks, method, data, epochs=a.epochs, lr=lr, seed=seed, prune_end=a.prune_end,
                         normalize_centroid_grad=normalize)
        rep = res.sizes
        rec = {
            "scheme": scheme, "method": method, "lr": lr, "seed": seed, "epochs": a.epochs, "prune_end": a.prune_end,
            "normalize_centroid_grad": normalize,
            "test_error": res.test_error,
            "compressed_bits": rep["compressed_bits"], "ratio": rep["ratio"],
            "task_bits": {r["task"]: r["bits"] for r in rep["tasks"]},
            "dc_max_abs_diff": res.dc_max_abs_diff,
            "errors_by_epoch": [h.get("test_error") for h in res.history],
            "mask_updates": {k: len(v) for k, v in res.mask_updates.items()},
            "seconds": res.seconds,
        }
        done[key] = rec
        result["records"].append(rec)
        log(f"{scheme:>18} {method:>16} lr {lr:<6g} seed {seed}: {res.test_error:.2f}% "
            f"({rep['compressed_bits']} bits, ratio {rep['ratio']:.2f}, DC diff {res.dc_max_abs_diff:.2g}, "
            f"{res.seconds:.0f}s)")
        out.write_text(json.dumps(result, indent=1))
        return rec

    # LC's size for each scheme at its direct compression (codebooks: LC's final size too; pruning: LC's final
    # support is coded at its own, slightly different, length)
    for scheme in dict.fromkeys(s for s, _ in runs):
        alg = lc.LC(copy.deepcopy(ref), scheme_tasks(scheme, "", a.reference))
        rep = alg.size_report()
        result["lc_direct_compression"][scheme] = {"compressed_bits": rep["compressed_bits"], "ratio": rep["ratio"]}

    t = time.perf_counter()
    summary = []
    for scheme, method in runs:
        grid = {lr: run(scheme, method, lr, seeds[0])["test_error"] for lr in lrs}
        best = min(lrs, key=lambda v: grid[v])
        errs = [run(scheme, method, best, s)["test_error"] for s in seeds]
        summary.append({
            "scheme": scheme, "method": method, "description": METHODS[method][1],
            "grid_seed": seeds[0], "grid": {str(k): v for k, v in grid.items()}, "best_lr": best,
            "errors": dict(zip(map(str, seeds), errs)), "mean_error": statistics.mean(errs),
            "std_error": statistics.stdev(errs) if len(errs) > 1 else 0.0,
            "prune_end": a.prune_end if method in ("gmp", "ste_codebook_gmp") else None,
            "normalize_centroid_grad": normalize if "codebook" in method else None,
            "compressed_bits": run(scheme, method, best, seeds[0])["compressed_bits"],
            "lc_dc_bits": result["lc_direct_compression"][scheme]["compressed_bits"],
        })
        result["summary"] = summary
        out.write_text(json.dumps(result, indent=1))
    result["seconds"] = time.perf_counter() - t
    out.write_text(json.dumps(result, indent=1))
    emit(result)


if __name__ == "__main__":
    main()
