"""LC variants on LeNet300 / Fashion-MNIST at a fixed epoch budget: which changes to the schedule, the C-step
cadence, the multipliers and a final stage lower the compressed model's test error.

Every variant uses the demo's setup (reference runs/reference/lenet300.pt, batch 256, SGD Nesterov momentum 0.9,
lr 0.1·0.98^epoch capped at 1/μ, the auto μ schedule fitted to the budget) unless the variant changes it.
Prints one JSON object with a row per (scheme, variant, seed).

    python bench/bench_lc_variants.py --schemes q2,prune5 --variants base,cps4,ft3 --seeds 0 [--epochs 30]

Variants (combine with "+", e.g. "cps4+ft3"):
  base      one C step per epoch, augmented Lagrangian
  cpsN      N C steps per epoch (the μ schedule has epochs·N steps over the same range)
  qp        the quadratic-penalty method (no multipliers)
  ftN       the last N epochs train the compressed model itself with Θ's discrete part fixed: for codebooks the
            K entries (gradient summed over each entry's weights) and the biases, for pruning the surviving values
  pfX       penalty_fraction X (μ₀ = X·κ), e.g. pf1
  fdX       final_distance X, e.g. fd0.001
  lrX       the L step's initial learning rate X (default 0.1; still decayed 0.98 per epoch and capped at 1/μ)
  cos       cosine learning-rate decay over the LC epochs (from lr to 0) instead of 0.98 per epoch
  avg       each C step compresses the average of the weights over the second half of its L step (the SGD iterate
            average, a less noisy estimate of the L step's minimiser); training continues from the last iterate
  avgkeep   as avg, and training continues from the average
  lbX       multiplier step X·μ instead of μ: λ ← λ − X·μ(w − Δ(Θ)) (X = 1 is the augmented Lagrangian)
  lzX       the multipliers are zeroed once, after the first fraction X of the C steps (the free phase's λ dropped)
  mr        momentum reset: the optimizer's momentum buffers are zeroed after every C step (the targets moved)
  pl        per-layer μ: one LC object per compressed layer, each with its own auto schedule fitted to that layer
            alone (κ_l = 2ΔL_l/‖w_l − Δ_l‖², ΔL_l the loss increase of compressing only layer l)
  prox      the penalty is applied as an exact proximal step after each optimizer step,
            w ← (w + ημ t)/(1 + ημ) with t = Δ + λ/μ (decoupled from momentum, as AdamW decouples weight decay),
            instead of through the loss's gradient
  wuN       linear lr warm-up from lr/10 to lr over the first N epochs
  holdX     μ stays at μ₀ for the first fraction X of the C steps, then grows geometrically to the same μ_T
            (lcompress.auto_schedule(..., hold=X); config schedule.hold)
  capX      the L step's lr capped at X/μ instead of 1/μ (the penalty's curvature μ plus the loss's own can exceed
            what SGD with momentum 0.9 keeps stable at lr = 1/μ)
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

import lcompress as lc
from lcompress.compressions import from_config
from lcompress.config import load_config
from lcompress.data import batches
from lcompress.experiment import build_model, load_data, measure_loss_and_grad, prepare_reference
from lcompress.training import evaluate

LAYERS = ("fc1.weight", "fc2.weight", "fc3.weight")


def tasks_for(scheme: str):
    if scheme == "q2":
        return {"re:fc\\d\\.weight": lc.AdaptiveQuantization(k=2)}
    if scheme == "sb":  # 1 bit per layer as {-a, +a} (the scaled-sign peer's set; 1 float per layer, not 2)
        return {"re:fc\\d\\.weight": lc.ScaledBinaryQuantization()}
    if scheme == "q4":
        return {"re:fc\\d\\.weight": lc.AdaptiveQuantization(k=4)}
    if scheme == "prune5":
        return {LAYERS: lc.ConstraintL0Pruning(fraction=0.05)}
    if scheme == "bs":
        return {LAYERS: lc.AdaptiveQuantization(k=2) + lc.ConstraintL0Pruning(fraction=0.01)}
    raise SystemExit(f"unknown scheme {scheme!r}")


#: numeric variant parts: prefix -> (option, type), the number following the prefix (e.g. "pf0.3")
NUMERIC = {"cps": ("cps", int), "ft": ("ft", int), "pf": ("pf", float), "fd": ("fd", float), "lr": ("lr", float),
           "lb": ("lb", float), "lz": ("lz", float), "wu": ("wu", int), "hold": ("hold", float),
           "cap": ("cap", float)}
#: flag variant parts: name -> (option, value)
FLAGS = {"qp": ("qp", True), "cos": ("cos", True), "mr": ("mr", True), "pl": ("pl", True), "prox": ("prox", True), "avg": ("avg", "avg"),
         "avgkeep": ("avg", "avgkeep")}


def parse_variant(v: str) -> dict:
    o = {"cps": 1, "qp": False, "ft": 0, "pf": 0.1, "fd": 0.005, "lr": 0.1, "cos": False, "avg": "", "mr": False,
         "lb": 1.0, "lz": 0.0, "pl": False, "prox": False, "wu": 0, "hold": 0.0, "cap": 1.0}
    for part in v.split("+"):
        if part == "base":
            continue
        if part in FLAGS:
            key, value = FLAGS[part]
            o[key] = value
            continue
        prefix = next((q for q in sorted(NUMERIC, key=len, reverse=True) if part.startswith(q)), None)
        if prefix is None:
            raise SystemExit(f"unknown variant part {part!r}")
        key, kind = NUMERIC[prefix]
        o[key] = kind(part[len(prefix):])
    return o


def _finetune(model, alg, data, gen, epochs: int, lr0: float, first_epoch: int) -> None:
    """Train the compressed model with the discrete part of Θ fixed: w = Δ(Θ) in the model, gradient steps on the
    biases as usual and on Θ's continuous part through Δ (codebook entries: mean gradient over their weights scaled
    by their count, i.e. the true gradient with a per-entry step; sparse values: masked gradient)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, d in alg.decompressed().items():
            params[n].copy_(d)
    # per task: a function that maps the dense gradient to an update of the weights that keeps them in the set
    projectors = []
    for t in alg.tasks:
        c = t.compression
        names = tuple(t.param_names)
        if isinstance(c, lc.AdaptiveQuantization):
            codes = c.theta["codes"] if "codes" in c.theta else c.theta["assignments"]
            k = c.theta["codebook"].numel()
            projectors.append(("codebook", names, codes.long().reshape(-1), k))
        elif isinstance(c, lc.ConstraintL0Pruning):
            flat = torch.cat([params[n].detach().reshape(-1) for n in names])
            projectors.append(("mask", names, flat != 0, None))
        else:
            projectors.append(("frozen", names, None, None))
    compressed = {n for _, names, _, _ in projectors for n in names}
    others = [p for n, p in params.items() if n not in compressed]
    mom = {}
    for e in range(epochs):
        lr = lr0 * 0.98 ** (first_epoch + e)
        for xb, yb in batches(data.x_train, data.y_train, 256, shuffle=True, generator=gen):
            loss = F.cross_entropy(model(xb), yb)
            model.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                for p in others:
                    buf = mom.setdefault(id(p), torch.zeros_like(p))
                    buf.mul_(0.9).add_(p.grad)
                    p.sub_(lr * (p.grad + 0.9 * buf))
                for kind, names, aux, k in projectors:
                    if kind == "frozen":
                        continue
                    g = torch.cat([params[n].grad.reshape(-1) for n in names])
                    w = torch.cat([params[n].detach().reshape(-1) for n in names])
                    if kind == "codebook":
                        cnt = torch.bincount(aux, minlength=k).clamp_min(1).to(g.dtype)
                        gc = torch.bincount(aux, weights=g, minlength=k) / cnt  # mean gradient per entry
                        key = ("cb", names)
                        buf = mom.setdefault(key, torch.zeros_like(gc))
                        buf.mul_(0.9).add_(gc)
                        step = lr * (gc + 0.9 * buf)
                        w = w - step[aux]
                    else:
                        key = ("m", names)
                        gm = g * aux
                        buf = mom.setdefault(key, torch.zeros_like(gm))
                        buf.mul_(0.9).add_(gm)
                        w = w - lr * (gm + 0.9 * buf) * aux
                    o = 0
                    for n in names:
                        m = params[n].numel()
                        params[n].copy_(w[o : o + m].reshape(params[n].shape))
                        o += m


def _sgd_and_data_order(model, o: dict, seed: int, data):
    """The L steps' optimizer and data order (seed s: minibatches from a generator seeded s + 1), the batches per
    epoch and per C step."""
    opt = torch.optim.SGD(model.parameters(), lr=o["lr"], momentum=0.9, nesterov=True)
    gen = torch.Generator().manual_seed(seed + 1)
    torch.manual_seed(seed + 2)
    n_batches = math.ceil(len(data.x_train) / 256)
    return opt, gen, n_batches, math.ceil(n_batches / o["cps"])


def run_layers(scheme: str, o: dict, variant: str, seed: int, epochs: int, cfg, data, ref_state) -> dict:
    """The pl / prox / wu / hold variants: a list of LC objects (one for all layers, or one per layer with pl),
    each with its own μ schedule."""
    from contextlib import ExitStack

    if o["avg"] or o["lb"] != 1.0 or o["lz"] or o["qp"] or (o["ft"] and o["pl"]):
        raise SystemExit(f"variant {variant!r}: pl/prox/wu/hold do not combine with avg/lb/lz/qp (nor pl with ft)")
    model = build_model(cfg)
    model.load_state_dict(ref_state)
    t0 = time.perf_counter()
    tasks = tasks_for(scheme)
    if o["pl"]:
        if len(tasks) != 1 or not isinstance(next(iter(tasks)), str):
            raise SystemExit("pl needs a per-layer scheme (q2, q4, sb)")
        comp = next(iter(tasks.values()))
        algs = [lc.LC(model, {n: from_config(comp.config())}) for n in LAYERS]
    else:
        algs = [lc.LC(model, tasks)]
    def compressed_error() -> float:
        with ExitStack() as st:
            for a_ in algs:
                st.enter_context(a_.compressed())
            return evaluate(model, data.x_test, data.y_test)

    dc = compressed_error()
    lc_epochs = epochs - o["ft"]
    steps = lc_epochs * o["cps"]
    sched = []
    for a_ in algs:
        loss, loss_dc, gnorm = measure_loss_and_grad(model, a_, data.x_train, data.y_train)
        sched.append(lc.auto_schedule(a_, steps, loss_dc - loss, gnorm, penalty_fraction=o["pf"],
                                      final_distance=o["fd"], hold=o["hold"]))
    opt, gen, n_batches, per = _sgd_and_data_order(model, o, seed, data)
    total_batches = lc_epochs * n_batches
    curve = []
    step = 0
    for epoch in range(lc_epochs):
        lr_e = o["lr"] * 0.98**epoch
        for i, (xb, yb) in enumerate(batches(data.x_train, data.y_train, 256, shuffle=True, generator=gen)):
            lr_b = lr_e
            if o["cos"]:
                lr_b = o["lr"] * 0.5 * (1 + math.cos(math.pi * (epoch * n_batches + i) / total_batches))
            if o["wu"] and epoch < o["wu"]:
                lr_b = lr_e * (0.1 + 0.9 * (epoch * n_batches + i) / (o["wu"] * n_batches))
            mus_now = [s_[step] for s_ in sched]
            lr_b = min(lc.clip_lr(lr_b, m, o["cap"]) for m in mus_now)  # min(lr, cap/μ)
            for g in opt.param_groups:
                g["lr"] = lr_b
            loss = F.cross_entropy(model(xb), yb)
            if not o["prox"]:
                loss = loss + sum(a_.penalty(m) for a_, m in zip(algs, mus_now))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if o["prox"]:
                with torch.no_grad():
                    for a_, m in zip(algs, mus_now):
                        lams = a_._lambdas or [None] * len(a_._params)
                        for p_, d_, l_ in zip(a_._params, a_._deltas, lams):
                            t_ = d_ if l_ is None else d_ + l_ / m
                            p_.add_(t_, alpha=lr_b * m).div_(1 + lr_b * m)
            if (i + 1) % per == 0 or i + 1 == n_batches:
                for a_, m in zip(algs, mus_now):
                    a_.c_step(m)
                step += 1
                if o["mr"]:
                    for st_ in opt.state.values():
                        if st_.get("momentum_buffer") is not None:
                            st_["momentum_buffer"].zero_()
        curve.append(round(compressed_error(), 2))
    if o["ft"]:
        _finetune(model, algs[0], data, gen, o["ft"], o["lr"] * 0.98**lc_epochs * 0.1, lc_epochs)
        curve.append(round(evaluate(model, data.x_test, data.y_test), 2))
    err = curve[-1]
    return {
        "scheme": scheme, "variant": variant, "seed": seed, "epochs": epochs, "test_error": round(err, 3),
        "dc_error": round(dc, 3), "mu0": [s_[0] for s_ in sched], "mu_last": [s_[-1] for s_ in sched],
        "ratio": algs[0].size_report()["ratio"] if not o["pl"] else None,  # pl: the same compression as without it
        "feasibility": [a_.check_feasible(warn=False) for a_ in algs], "curve": curve,
        "seconds": round(time.perf_counter() - t0, 1),
    }


def run(scheme: str, variant: str, seed: int, epochs: int, cfg, data, ref_state) -> dict:
    o = parse_variant(variant)
    if o["pl"] or o["prox"] or o["wu"] or o["hold"]:
        return run_layers(scheme, o, variant, seed, epochs, cfg, data, ref_state)
    model = build_model(cfg)
    model.load_state_dict(ref_state)
    t0 = time.perf_counter()
    alg = lc.LC(model, tasks_for(scheme), multipliers=not o["qp"])
    with alg.compressed() as m:
        dc = evaluate(m, data.x_test, data.y_test)
    lc_epochs = epochs - o["ft"]
    steps = lc_epochs * o["cps"]
    loss, loss_dc, gnorm = measure_loss_and_grad(model, alg, data.x_train, data.y_train)
    mus = lc.auto_schedule(alg, steps, loss_dc - loss, gnorm, penalty_fraction=o["pf"], final_distance=o["fd"])
    opt, gen, n_batches, per = _sgd_and_data_order(model, o, seed, data)
    curve = []
    step = 0
    wparams = [p for n, p in model.named_parameters() if n in LAYERS]
    total_batches = lc_epochs * n_batches
    avg, n_avg, since = None, 0, 0
    for epoch in range(lc_epochs):
        lr_e = o["lr"] * 0.98 ** epoch
        for i, (xb, yb) in enumerate(batches(data.x_train, data.y_train, 256, shuffle=True, generator=gen)):
            mu = mus[step]
            if o["cos"]:
                lr_e = o["lr"] * 0.5 * (1 + math.cos(math.pi * (epoch * n_batches + i) / total_batches))
            for g in opt.param_groups:
                g["lr"] = lc.clip_lr(lr_e, mu, o["cap"])  # min(lr, cap/μ)
            loss = F.cross_entropy(model(xb), yb) + alg.penalty(mu)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            since += 1
            boundary = (i + 1) % per == 0 or i + 1 == n_batches
            if o["avg"]:
                if since > per // 2:  # the second half of a full-length L step (the last one may be shorter)
                    with torch.no_grad():
                        if avg is None:
                            avg = [p.detach().clone() for p in wparams]
                            n_avg = 1
                        else:
                            n_avg += 1
                            for a_, p in zip(avg, wparams):
                                a_.add_(p.detach() - a_, alpha=1.0 / n_avg)
            if boundary:
                if o["avg"] and avg is not None:
                    with torch.no_grad():
                        last = [p.detach().clone() for p in wparams]
                        for a_, p in zip(avg, wparams):
                            p.copy_(a_)
                    alg.c_step(mu)
                    if o["avg"] == "avg":
                        with torch.no_grad():
                            for l_, p in zip(last, wparams):
                                p.copy_(l_)
                else:
                    lam_old = [t.clone() for t in alg._lambdas] if o["lb"] != 1.0 and alg._lambdas else None
                    alg.c_step(mu)
                    if lam_old is not None:  # λ ← λ_old + X·(λ_new − λ_old)
                        with torch.no_grad():
                            for lo, ln in zip(lam_old, alg._lambdas):
                                ln.copy_(lo + o["lb"] * (ln - lo))
                avg, n_avg, since = None, 0, 0
                step += 1
                if o["lz"] and step == max(1, round(o["lz"] * steps)) and alg._lambdas:
                    with torch.no_grad():
                        for t_ in alg._lambdas:
                            t_.zero_()
                if o["mr"]:
                    for st in opt.state.values():
                        if "momentum_buffer" in st and st["momentum_buffer"] is not None:
                            st["momentum_buffer"].zero_()
        with alg.compressed() as m:
            curve.append(round(evaluate(m, data.x_test, data.y_test), 2))
    if o["ft"]:
        _finetune(model, alg, data, gen, o["ft"], o["lr"] * 0.98 ** lc_epochs * 0.1, lc_epochs)
        err = evaluate(model, data.x_test, data.y_test)
        curve.append(round(err, 2))
    else:
        with alg.compressed() as m:
            err = evaluate(m, data.x_test, data.y_test)
    return {
        "scheme": scheme, "variant": variant, "seed": seed, "epochs": epochs, "test_error": round(err, 3),
        "dc_error": round(dc, 3), "mu0": mus[0], "mu_last": mus[-1], "ratio": alg.size_report()["ratio"],
        "feasibility": alg.check_feasible(warn=False), "curve": curve, "seconds": round(time.perf_counter() - t0, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--schemes", default="q2")
    p.add_argument("--variants", default="base")
    p.add_argument("--seeds", default="0")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    cfg = load_config("examples/lenet300_quantize_all.toml")
    data = load_data(cfg)
    ref, _ = prepare_reference(cfg, data, progress=False, is_writer=False)
    ref_state = {k: v.clone() for k, v in ref.state_dict().items()}
    rows = []
    load0 = os.getloadavg()
    for scheme in a.schemes.split(","):
        for variant in a.variants.split(","):
            for seed in [int(s) for s in a.seeds.split(",")]:
                r = run(scheme, variant, seed, a.epochs, cfg, data, ref_state)
                print(json.dumps(r), file=sys.stderr, flush=True)
                rows.append(r)
    json.dump({"benchmark": "lc variants, lenet300 fashion-mnist", "rows": rows, "loadavg_start": load0,
               "loadavg_end": os.getloadavg(), "torch": torch.__version__}, sys.stdout, indent=1)
    print()


if __name__ == "__main__":
    main()
