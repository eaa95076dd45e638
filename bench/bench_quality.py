"""LeNet300 on Fashion-MNIST: every demo scheme, 30 one-epoch L steps, LC beside direct compression.

Prints one JSON object: per scheme the LC and DC test errors, the compression ratio, the file size, the target
from the issue (with the reference implementation's figure for the same budget), and whether it was met.

    python bench/bench_quality.py [--out DIR] [--reference runs/reference/lenet300.pt] [--schemes a,b]
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

from lcompress.demo import SCHEMES, run_demo

# scheme -> (target LC test error %, reference implementation's LC error %, its DC error %)
TARGETS = {
    "quantize_all": (12.0, 12.5, 30.1),
    "prune_5": (11.2, 11.4, 61.7),
    "binary_plus_sparse": (11.0, 11.2, 19.5),
}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="runs/bench_quality")
    p.add_argument("--reference", default="runs/reference/lenet300.pt")
    p.add_argument("--schemes")
    p.add_argument("--steps", type=int)
    a = p.parse_args()
    torch.set_num_threads(2)
    load0 = os.getloadavg()
    t = time.perf_counter()
    rows = run_demo(a.out, a.reference, schemes=a.schemes.split(",") if a.schemes else None, steps=a.steps,
                    progress=False)
    for r in rows:
        tgt = TARGETS.get(r["scheme"])
        if tgt:
            r["target_error"], r["reference_impl_error"], r["reference_impl_dc_error"] = tgt
            r["meets_target"] = r["test_error"] <= tgt[0]
    json.dump(
        {
            "benchmark": "lenet300 fashion-mnist quality",
            "schemes": rows,
            "steps": a.steps or 30,
            "seconds": time.perf_counter() - t,
            "torch": torch.__version__,
            "python": platform.python_version(),
            "threads": torch.get_num_threads(),
            "loadavg_start": load0,
            "loadavg_end": os.getloadavg(),
        },
        sys.stdout,
        indent=2,
    )
    print()


if __name__ == "__main__":
    main()
