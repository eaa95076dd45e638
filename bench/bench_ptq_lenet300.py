"""Post-training LC on a model that is not a language model: the LeNet300 reference of the demo (Fashion-MNIST), with
1,000 training images as the whole calibration set, beside direct compression and beside full LC (the demo's
trained runs). Prints JSON.

Post-training LC here is ``lcompress.ptq.posttrain(model, tasks, images)`` with no blocks: the model is one block and
its three layers are solved in the order they run, each from the inputs the compressed layers before it give.

    .venv/bin/python bench/bench_ptq_lenet300.py --reference runs/reference/lenet300.pt
    (the reference is trained, 40 epochs as in the demo, if the file is missing)
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import lcompress as lc  # noqa: E402
from lcompress import ptq  # noqa: E402
from lcompress.data import load_fashion_mnist  # noqa: E402
from lcompress.models import lenet300  # noqa: E402
from lcompress.training import evaluate, load_checkpoint, save_checkpoint, train_reference  # noqa: E402

#: the demo's schemes that a per-layer post-training solve can take (full LC's errors: README, 2026-12-02 demo)
SCHEMES = {
    "quantize_all_k2": ({r"re:fc\d\.weight": lambda: lc.AdaptiveQuantization(k=2)}, 10.31),
    "prune_5": ({("re:fc\\d\\.weight",): lambda: lc.ConstraintL0Pruning(fraction=0.05)}, 10.36),
    "int4_g28": ({r"re:fc\d\.weight": lambda: lc.GroupedIntQuantization(4, 28)}, None),
    "int2_g28": ({r"re:fc\d\.weight": lambda: lc.GroupedIntQuantization(2, 28)}, None),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", default="runs/reference/lenet300.pt")
    ap.add_argument("--data-dir")
    ap.add_argument("--images", type=int, default=1000)
    ap.add_argument("--schemes", default=",".join(SCHEMES))
    ap.add_argument("--json")
    args = ap.parse_args()
    data = load_fashion_mnist(args.data_dir)
    ref_path = Path(args.reference)
    model = lenet300()
    if ref_path.exists():
        load_checkpoint(ref_path, model)
    else:
        torch.manual_seed(0)
        model = lenet300()
        train_reference(model, data, 40, lr=0.1, lr_decay=0.95, progress=False)
        ref_path.parent.mkdir(parents=True, exist_ok=True)
        save_checkpoint(ref_path, model, {"model": "lenet300", "epochs": 40})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    ref_err = evaluate(model, data.x_test, data.y_test)
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(data.x_train.shape[0], generator=g)[: args.images]
    calib = [data.x_train[idx[i : i + 250]] for i in range(0, args.images, 250)]
    rows = []
    for name in args.schemes.split(","):
        tasks, full_lc = SCHEMES[name]
        row = {"scheme": name, "full_lc_error": full_lc}
        for method in ("rtn", "lc"):
            model.load_state_dict(state)
            t0 = time.perf_counter()
            res = ptq.posttrain(model, {k: f() for k, f in tasks.items()}, calib, solver=method, progress=False)
            row[f"{method}_error"] = evaluate(model, data.x_test, data.y_test)
            row[f"{method}_seconds"] = time.perf_counter() - t0
            row["ratio"] = res.size_report()["ratio"]
        rows.append(row)
        print(f"{name}: DC {row['rtn_error']:.2f}%, post-training LC {row['lc_error']:.2f}% "
              f"(full LC {full_lc})", file=sys.stderr)
    report = {"bench": "ptq_lenet300", "date": time.strftime("%Y-%m-%d"), "reference_error": ref_err,
              "calibration_images": args.images, "threads": torch.get_num_threads(), "runs": rows}
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
