"""LC against the best peer at the same size and budget, over seeds (issue 10's target), from recorded runs.

LC's rows come from ``bench/bench_lc_variants.py`` JSON outputs (one or more files, e.g. a run per scheme), the peers'
from ``bench/bench_peers.py``'s JSON (its ``summary``: each peer's best lr on seed 0 and its errors over seeds).
Both use the same reference, data order (seed s: minibatches from a generator seeded s + 1), optimizer and sizes
counted by lcompress. For each scheme this prints LC's mean ± sd over the seeds both have, the best peer's (the
lowest mean), the difference, and the issue's targets:

* 30 epochs: LC mean ≤ best peer mean − 0.3 (K=2, prune 5%, 1 bit + 1%), ≤ best peer mean (K=4);
* moonshot: LC at 15 epochs ≤ the best peer at 30.

    python bench/bench_lc_vs_peers.py --lc bench/lc_seeds_2026-12-02.json --peers bench/peers_2026-12-02.json \
        --variant cps4+pf1,prune5=cps4+pf0.03 > bench/lc_vs_peers_2026-12-02.json

``--variant15`` picks the 15-epoch (moonshot) rows' variants the same way (default: ``--variant``'s).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys

#: bench_lc_variants scheme -> (bench_peers scheme, description, margin the issue asks for)
SCHEMES = {
    "q2": ("k2", "1 bit per layer (K=2)", 0.3),
    "q4": ("k4", "2 bits per layer (K=4)", 0.0),
    "prune5": ("prune_5", "prune 5% jointly", 0.3),
    "bs": ("binary_plus_sparse", "1 bit + 1% sparse correction", 0.3),
}


def _stats(errors: dict[int, float]) -> dict:
    v = [errors[s] for s in sorted(errors)]
    return {"errors": {str(s): errors[s] for s in sorted(errors)}, "mean": round(statistics.mean(v), 3),
            "sd": round(statistics.stdev(v), 3) if len(v) > 1 else None, "n": len(v)}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--lc", required=True, help="comma-separated bench_lc_variants JSON files")
    p.add_argument("--peers", required=True, help="bench_peers JSON file")
    p.add_argument("--variant", default="cps4+pf1",
                   help="LC's variant for every scheme, or per scheme: default,scheme=variant,... "
                        "(e.g. cps4+pf1,prune5=cps4+pf0.3)")
    p.add_argument("--variant15", default=None, help="the same for the 15-epoch rows (default: --variant)")
    a = p.parse_args()
    rows = []
    for f in a.lc.split(","):
        rows += json.load(open(f))["rows"]
    peers = json.load(open(a.peers))

    def chooser(spec: str):
        parts = spec.split(",")
        per = {k: v for k, _, v in (x.partition("=") for x in parts if "=" in x)}
        default = next((x for x in parts if "=" not in x), "cps4+pf1")
        return lambda scheme: per.get(scheme, default)

    pick30, pick15 = chooser(a.variant), chooser(a.variant15 or a.variant)
    out = []
    for scheme, (pscheme, desc, margin) in SCHEMES.items():
        v, v15 = pick30(scheme), pick15(scheme)
        lc = {e: {r["seed"]: r["test_error"] for r in rows
                  if r["scheme"] == scheme and r["variant"] == ve and r["epochs"] == e} for e, ve in ((30, v), (15, v15))}
        cands = [s for s in peers["summary"] if s["scheme"] == pscheme]
        if not lc[30] or not cands:
            continue
        best = min(cands, key=lambda s: s["mean_error"])
        seeds = sorted(set(lc[30]) & {int(k) for k in best["errors"]})
        peer = _stats({s: best["errors"][str(s)] for s in seeds})
        mine = _stats({s: lc[30][s] for s in seeds})
        diff = round(mine["mean"] - peer["mean"], 3)
        rec = {
            "scheme": scheme, "description": desc, "seeds": seeds, "lc_variant": v, "lc_30": mine,
            "best_peer": {"method": best["method"], "lr": best["best_lr"], **peer,
                          "bits": best["compressed_bits"], "lc_bits": best["lc_dc_bits"]},
            "other_peers": {s["method"]: round(s["mean_error"], 3) for s in cands if s is not best},
            "lc_minus_peer": diff, "target": f"<= -{margin}" if margin else "<= 0", "target_met": diff <= -margin,
        }
        if lc[15]:
            m15 = _stats(lc[15])
            rec["moonshot"] = {"lc_variant": v15, "lc_15": m15, "target": "LC at 15 epochs <= best peer at 30",
                               "met": m15["mean"] <= peer["mean"]}
        out.append(rec)
    json.dump({"benchmark": "LC vs best peer, lenet300 fashion-mnist, 30 epochs", "lc_files": a.lc,
               "peers_file": a.peers, "peers_date": peers.get("date"), "reference": peers.get("reference"),
               "schemes": out}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
