"""The lossless stage of the ``.lcz`` format (issue 11): file bytes with and without it, and the coder choice.

Prints one JSON object:

* ``headroom``: uniform 4- and 8-bit codes of 266,200 Gaussian weights (LeNet300's count; the MSE-best uniform
  quantizer on [−c, c]): raw bits a code, the empirical entropy, the ANS stream (constriction) and zstd at
  level 19 on the codes one byte each and on the packed bits;
* ``schemes``: for every demo scheme (``examples/lenet300_*.toml``) and for prune-5% with a 32-entry value
  codebook (Deep Compression's prune + quantize + entropy code), the ``.lcz`` file bytes without and with the
  stage, the size report's bytes, the bit-for-bit round trip of Θ, and per symbol stream (codes, support) its
  raw bytes, the ANS bytes, zstd-19 bytes, and decode times. Θ is taken two ways:

  - ``"dc"``: direct compression of the reference (``runs/reference/lenet300.pt``): Θ = Π(w), reproducible
    anywhere the reference is;
  - ``"lc"``: the final Θ of the demo's 30-step LC runs where their run directories are present
    (``--runs``, e.g. ``runs/newdemo1`` ``runs/newdemo2``), which is what a user's file holds.

Usage:  PYTHONPATH=src python bench/bench_lossless.py [--runs runs/newdemo1 runs/newdemo2]
            [--cb32-run runs/lossless_prune5_cb32] > bench/lossless_DATE.json
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import header, loadavg  # noqa: E402

import lcompress as lc  # noqa: E402
from lcompress import _entropy  # noqa: E402
from lcompress.compressions import AdditiveCombination  # noqa: E402
from lcompress.config import load_config  # noqa: E402
from lcompress.experiment import build_model  # noqa: E402
from lcompress.codecs import Writer, delta_encode  # noqa: E402
from lcompress.codecs.sparse import coded_support  # noqa: E402
from lcompress.sizes import index_bits, support_bits  # noqa: E402
from lcompress.training import load_checkpoint  # noqa: E402

try:
    import zstandard
except ImportError:  # zstd is only a comparison here, not a dependency
    zstandard = None

ROOT = Path(__file__).resolve().parent.parent
DEMO_RUN_NAMES = {  # examples/lenet300_<x>.toml -> the demo's run directory name
    "quantize_all": "quantize_all", "quantize_1_3": "quantize_1_3", "prune_5": "prune_5",
    "binary_plus_sparse": "binary_plus_sparse", "mixed": "mixed", "rank_selection": "rank_selection",
}


def _zstd(data: bytes) -> tuple[int, float]:
    """(bytes, decode ms) of zstd level 19 without checksum or content size."""
    if zstandard is None:
        return -1, float("nan")
    z = zstandard.ZstdCompressor(level=19, write_checksum=False, write_content_size=False).compress(data)
    d = zstandard.ZstdDecompressor()
    t = time.perf_counter()
    d.decompress(z, max_output_size=len(data))
    return len(z), (time.perf_counter() - t) * 1e3


def _unpacked(sym: np.ndarray, alphabet: int) -> bytes:
    return sym.astype(np.uint8 if alphabet <= 256 else "<u2" if alphabet <= 65536 else "<u4").tobytes()


def stream_report(name: str, sym: np.ndarray, alphabet: int) -> dict:
    """One symbol stream under each coder."""
    sym = np.asarray(sym).astype(np.int64)
    raw = _entropy.pack_bits_raw(sym, alphabet)
    t = time.perf_counter()
    coded = _entropy.encode(sym, alphabet)
    enc_ms = (time.perf_counter() - t) * 1e3
    t = time.perf_counter()
    back = _entropy.decode(coded, sym.size, alphabet)
    dec_ms = (time.perf_counter() - t) * 1e3
    assert np.array_equal(back.astype(np.int64), sym)
    _, c = np.unique(sym, return_counts=True)
    h = float(-(c * np.log2(c / sym.size)).sum()) if sym.size else 0.0
    z_sym, z_sym_ms = _zstd(_unpacked(sym, alphabet))
    z_packed, z_packed_ms = _zstd(raw)
    return {
        "stream": name, "n": int(sym.size), "alphabet": int(alphabet), "distinct": int(c.size),
        "raw_bytes": len(raw), "entropy_bytes": round(h / 8, 1), "kept_bytes": len(coded),
        "kept_form": _entropy.form(coded, sym.size, alphabet),
        "ans_bytes": len(_entropy._ans(sym, alphabet, len(raw)) or raw),
        "encode_ms": round(enc_ms, 2), "decode_ms": round(dec_ms, 2),
        "zstd19_symbols_bytes": z_sym, "zstd19_symbols_decode_ms": round(z_sym_ms, 2),
        "zstd19_packed_bytes": z_packed, "zstd19_packed_decode_ms": round(z_packed_ms, 2),
    }


def _parts(comp):
    if isinstance(comp, AdditiveCombination):
        for p in comp.parts:
            yield from _parts(p)
    else:
        yield comp


def streams(alg) -> list[dict]:
    """Every symbol stream of the file: codebook codes, sparse value codes and support delta symbols."""
    out = []
    for t in alg.tasks:
        for i, comp in enumerate(_parts(t.compression)):
            th, where = comp.theta, f"{t.name} part {i} ({type(comp).__name__})"
            if "indices" in th:
                idx = th["indices"].reshape(-1).long()
                if "codes" in th:
                    k = th["codebook"].numel()
                    out.append(stream_report(f"{where} value codes", th["codes"].reshape(-1).numpy(), k))
                raw_scheme, _, raw_width = support_bits(idx, th["n"])
                scheme, width = coded_support(idx, th["n"], Writer(dry=True), (raw_scheme, raw_width))
                for label, (sc, b) in (("packed bits' best", (raw_scheme, raw_width)), ("coded best", (scheme, width))):
                    if sc == "bitmask":
                        sym, a = torch.zeros(th["n"], dtype=torch.int64).index_fill_(0, idx, 1).numpy(), 2
                    else:
                        sym, a = delta_encode(idx, b).numpy(), 1 << b
                    out.append(stream_report(f"{where} support, {label}: {sc} {b} bits", sym, a))
            elif "codes" in th and index_bits(comp.k) > 0:
                out.append(stream_report(f"{where} codes", th["codes"].reshape(-1).numpy(), comp.k))
    return out


def file_report(alg) -> dict:
    """File bytes without and with the stage, and the size report's bytes against the coded file's payload."""
    from lcompress.export import read, to_bytes

    plain, h_plain = to_bytes(alg, lossless=False)
    t = time.perf_counter()
    coded, h_coded = to_bytes(alg, lossless=True)
    write_s = time.perf_counter() - t
    rep = alg.size_report()
    t = time.perf_counter()
    read(coded)
    read_s = time.perf_counter() - t
    return {"file_bytes_without": len(plain), "file_bytes_with": len(coded),
            "smaller_pct": round(100 * (1 - len(coded) / len(plain)), 2),
            "payload_bytes_without": sum(h_plain["blobs"].values()), "payload_bytes_with": sum(h_coded["blobs"].values()),
            "size_report_bytes": rep["compressed_bits"] / 8, "version_with": h_coded["version"],
            "write_with_s": round(write_s, 3), "read_with_s": round(read_s, 3)}


def roundtrip_exact(alg, path: Path) -> bool:
    """Θ read back from the coded file equals Θ written, element for element."""
    alg.export(path)
    model2 = copy.deepcopy(alg.model)
    with torch.no_grad():
        for p in model2.parameters():
            p.zero_()
    lc.load(path, model2)
    with alg.compressed():
        ref = {k: v.detach().clone() for k, v in alg.model.state_dict().items()}
    got = model2.state_dict()
    return all(torch.equal(ref[k], got[k]) for k in ref)


def _mse_uniform(w: np.ndarray, bits: int) -> tuple[float, np.ndarray]:
    """(c, codes) of the uniform 2^bits-level quantizer on [−c, c] of least squared error: a golden-section
    search over c (the error is unimodal in c)."""
    levels = (1 << bits) - 1

    def quantize(c):
        step = 2 * c / levels
        return step, np.clip(np.rint((w + c) / step), 0, levels)

    def err(c):
        step, q = quantize(c)
        return float(np.square(q * step - c - w).sum())

    lo, hi, g = 0.5, 8.0, (5 ** 0.5 - 1) / 2
    for _ in range(40):
        a, b = hi - g * (hi - lo), lo + g * (hi - lo)
        lo, hi = (lo, b) if err(a) < err(b) else (a, hi)
    c = (lo + hi) / 2
    return c, quantize(c)[1].astype(np.int64)


def _reference_model(cfg):
    model = build_model(cfg)
    load_checkpoint(ROOT / cfg.reference.checkpoint, model)
    return model


def _alg_dc(cfg):
    """Direct compression of the reference; a penalty form (rank selection) at its schedule's last μ."""
    s, kw = cfg.schedule, {}
    if s.mu == "geometric":
        kw["direct_mu"] = lc.geometric(s.mu0, s.factor, s.steps * s.c_steps_per_step)[-1]
    elif isinstance(s.mu, list):
        kw["direct_mu"] = float(s.mu[-1])
    return lc.LC(_reference_model(cfg), cfg.task_map(), multipliers=cfg.lc.multipliers, **kw)


def _alg_lc(cfg, run: Path):
    model = build_model(cfg)
    model.load_state_dict(torch.load(run / "checkpoint.pt", map_location="cpu", weights_only=True)["model"])
    alg = lc.LC(model, cfg.task_map(), multipliers=cfg.lc.multipliers)
    alg.load_state_dict(torch.load(run / "lc_state.pt", map_location="cpu", weights_only=True))
    return alg


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", nargs="*", default=[], help="demo output directories holding the LC runs")
    ap.add_argument("--cb32-run", default=None,
                    help="a run directory of examples/lenet300_prune_5.toml with "
                         "--set tasks.0.compression.value_codebook=32 (LC's Θ for prune_5_codebook_32)")
    ap.add_argument("--tmp", default="/tmp/bench_lossless.lcz")
    args = ap.parse_args()
    torch.set_num_threads(1)
    out = header("bench_lossless", 1)
    out["coder"] = {"constriction": _entropy_version(), "zstandard": getattr(zstandard, "__version__", None)}

    # ---- headroom: uniform codes of Gaussian weights
    w = np.random.default_rng(0).normal(size=266_200)
    head = []
    for bits in (4, 8):
        c, codes = _mse_uniform(w, bits)
        r = stream_report(f"uniform {bits}-bit codes on [-c, c], c = {c:.3f}", codes, 1 << bits)
        r.update({key: round(8 * r[key] / w.size, 3) for key in
                  ("raw_bytes", "entropy_bytes", "kept_bytes", "ans_bytes", "zstd19_symbols_bytes",
                            "zstd19_packed_bytes")})
        r["unit"] = "bits per code"
        head.append(r)
    out["headroom"] = head

    # ---- the demo schemes and prune-5% with a 32-entry value codebook
    schemes = []
    configs = sorted((ROOT / "examples").glob("lenet300_*.toml"))
    for path in configs + ["prune_5_codebook_32"]:  # (the last: examples/lenet300_prune_5.toml, K = 32)
        if path == "prune_5_codebook_32":
            cfg = load_config(ROOT / "examples/lenet300_prune_5.toml",
                              overrides={"tasks.0.compression.value_codebook": 32})
            name = "prune_5_codebook_32"
        else:
            cfg = load_config(path)
            name = path.stem.removeprefix("lenet300_")
        sources = [("dc", lambda: _alg_dc(cfg))]
        runs = [Path(r) / DEMO_RUN_NAMES.get(name, name) for r in args.runs]
        if name == "prune_5_codebook_32":
            runs = [Path(args.cb32_run)] if args.cb32_run else []
        for run in runs:
            if (run / "lc_state.pt").is_file():
                sources.append(("lc", lambda run=run: _alg_lc(cfg, run)))
        for theta, make in sources:
            alg = make()
            row = {"scheme": name, "theta": theta, **file_report(alg)}
            row["roundtrip_bit_for_bit"] = roundtrip_exact(alg, Path(args.tmp))
            row["streams"] = streams(alg)
            schemes.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "streams"}), file=sys.stderr)
    out["schemes"] = schemes
    out["loadavg_end"] = loadavg()
    print(json.dumps(out, indent=1))


def _entropy_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("constriction")
    except PackageNotFoundError:
        return None


if __name__ == "__main__":
    main()
