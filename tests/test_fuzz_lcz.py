"""Hostile .lcz files: truncations, bit flips, header edits with the checksum recomputed (a sha256 is no
signature), size bombs (huge shapes, k, nnz, symbols, factors; zlib and JSON-token bombs), deep recursion and
wrong JSON types, each through the four readers — read, load, load(compact=True), inspect.

Every call must either succeed (an edit can leave a valid file) or raise the one error class,
``lcompress.export.CorruptFileError``; a failed load must leave the model as it was; and no call may make the
process's peak RSS grow by more than ``RSS_FIXED + RSS_PER_BYTE × (file + model bytes)``. The cases run in a
subprocess under an address-space limit (``RLIMIT_AS``: what was mapped after the warm-up plus ``AS_HEADROOM``),
so an attempt at a GB allocation fails there instead of taking the machine; the peak RSS of each call is read from
``/proc/self/status`` after resetting it through ``/proc/self/clear_refs``.

Run as a script (``python tests/test_fuzz_lcz.py``) it prints the worker's JSON report.
"""
from __future__ import annotations

import base64
import copy
import hashlib
import json
import os
import random
import struct
import subprocess
import sys
import zlib
from pathlib import Path

RSS_FIXED = 16 << 20  # bytes: allocator noise and Python objects of a legitimate header parse of this size
RSS_PER_BYTE = 8
AS_HEADROOM = 1 << 30
N_EDITS = 450  # sampled header edits (of every leaf and container of the header, a few values each)


# ---- the base file -------------------------------------------------------------------------------------------------
def _model_class():
    from torch import nn

    class Fuzz(nn.Module):
        """Every record kind: factors (conv, scheme 2), a sum of a codebook and a delta-coded sparse set with a
        value codebook (fc1), a bitmask sparse set (fc2), a fixed codebook (fc1.bias), a scaled codebook (bn),
        a rank selection kept dense (head), a tied layer (an alias) and dense buffers."""

        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, padding=1)
            self.bn = nn.BatchNorm2d(8)
            self.fc1 = nn.Linear(128, 64)
            self.fc2 = nn.Linear(64, 16)
            self.head = nn.Linear(16, 12)
            self.again = self.fc2  # the same module twice: "again.weight" is an alias of "fc2.weight"

    return Fuzz


def make_base():
    """(file bytes, a model template of the file's architecture, its bytes)."""
    import torch

    import lcompress as lc
    from lcompress import export

    torch.manual_seed(0)
    model = _model_class()().eval()
    alg = lc.LC(model, {
        "conv.weight": lc.LowRank(2, conv_scheme="scheme_2"),
        "fc1.weight": lc.AdaptiveQuantization(2) + lc.ConstraintL0Pruning(40, value_codebook=2),
        "fc2.weight": lc.ConstraintL0Pruning(1024),  # (all kept: a bitmask)
        "fc1.bias": lc.BinaryQuantization(),
        ("bn.weight", "bn.bias"): lc.ScaledTernaryQuantization(),
        "head.weight": lc.RankSelection(1e-9),
    })
    alg.c_step(1e4)  # (a large μ: the rank selection keeps the 12×16 matrix dense)
    data, header = export.to_bytes(alg)
    kinds = json.dumps(header["tasks"])
    for k in ('"kind": "sum"', '"support": "delta"', '"support": "bitmask"', '"store": "none"', '"store": "scale"',
              '"dense": {', '"A": {', '"code_width"'):
        assert k.replace(": ", ":") in kinds.replace(": ", ":"), k
    assert any(e[3][0] == "alias" for e in header["entries"])
    template = _model_class()().eval()
    model_bytes = sum(t.numel() * t.element_size() for t in template.state_dict().values())
    return data, template, model_bytes


# ---- editing a file ------------------------------------------------------------------------------------------------
def split(data: bytes):
    """(safetensors table, header JSON object, payload bytes)."""
    n = struct.unpack("<Q", data[:8])[0]
    table = json.loads(data[8 : 8 + n])
    header = json.loads(zlib.decompress(base64.b64decode(table["__metadata__"]["header"])))
    return table, header, data[8 + n :]


def frame(table, payload: bytes) -> bytes:
    h = json.dumps(table, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + payload


def blobs_of(table, payload):
    out = {}
    for b in ("dense", "theta"):
        if b in table:
            a, e = table[b]["data_offsets"]
            out[b] = payload[a:e]
        else:
            out[b] = b""
    return out


def rebuild(data: bytes, header=None, header_json: bytes | None = None, compressed: bytes | None = None) -> bytes:
    """The file with a new header (an object, its JSON bytes, or its zlib stream with the JSON it inflates to),
    the checksum recomputed as an attacker would."""
    table, _, payload = split(data)
    if header_json is None:
        header_json = json.dumps(header, separators=(",", ":")).encode()
    if compressed is None:
        compressed = zlib.compress(header_json, 9)
    digest = hashlib.sha256(header_json)
    blobs = blobs_of(table, payload)
    digest.update(blobs["dense"])
    digest.update(blobs["theta"])
    table["__metadata__"]["header"] = base64.b64encode(compressed).decode()
    table["__metadata__"]["sha256"] = digest.hexdigest()
    return frame(table, payload)


def _leaves(obj, path=()):
    """Every (path, value) of a JSON object, containers included."""
    yield path, obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _leaves(v, path + (i,))


def _set(obj, path, value):
    obj = copy.deepcopy(obj)
    cur = obj
    for p in path[:-1]:
        cur = cur[p]
    if value is _DELETE:
        del cur[path[-1]]
    else:
        cur[path[-1]] = value
    return obj


_DELETE = object()


def _replacements(v):
    common = [None, True, "x", [], {}, -1, 1.5, 10**30]
    if isinstance(v, bool):
        return common + [not v, 1, 0]
    if isinstance(v, int):
        return common + [0, 1, v - 1, v + 1, -v, 2 * v + 7, 255, 256, 2**31, 2**32, 2**40, 2**63, 2**64, float(v)]
    if isinstance(v, str):
        return common + ["", v + "x", v.upper(), 0, "scheme_3", "float64", "alias", "sum", "dense"]
    if isinstance(v, list):
        return common + [v[:-1], v + [v[-1] if v else 0], v[::-1], [v], v * 2] + ([[], v[1:]] if v else [])
    if isinstance(v, dict):
        extra = dict(v, extra=1)
        return common + [extra, _DELETE] + [{k: x for k, x in v.items() if k != key} for key in list(v)[:4]]
    return common


def header_edits(data: bytes, n: int, seed: int = 0):
    """``n`` sampled single edits of the header (every leaf and container is a candidate), checksum recomputed."""
    _, header, _ = split(data)
    cands = []
    for path, v in _leaves(header):
        if not path:
            continue
        for r in _replacements(v):
            cands.append((path, r))
        cands.append((path, _DELETE))
    rng = random.Random(seed)
    picked = rng.sample(cands, min(n, len(cands)))
    for path, r in picked:
        label = f"edit {'/'.join(map(str, path))} = {'<deleted>' if r is _DELETE else repr(r)[:40]}"
        yield label, rebuild(data, _set(header, path, r))


# ---- named hostile files -------------------------------------------------------------------------------------------
def _task(header, name):
    return next(t for t in header["tasks"] if t["name"] == name)


def _entry(header, name):
    return next(e for e in header["entries"] if e[0] == name)


def named_cases(data: bytes):
    """(label, file, what the readers may do): "error" (all four raise) or "any" (each raises or succeeds)."""
    table, header, payload = split(data)
    theta_seg = _task(header, "fc1.weight")["theta"]["parts"][0]["codebook"]  # 8 bytes of theta to point at
    out = []

    def edit(label, fn, expect="error"):
        h = copy.deepcopy(header)
        fn(h)
        out.append((label, rebuild(data, h), expect))

    # the cases
    edit("huge entry shape", lambda h: _entry(h, "fc1.weight").__setitem__(2, [10**6, 10**6]))
    edit("negative shape", lambda h: _entry(h, "fc1.weight").__setitem__(2, [-64, -128]))
    edit("shape of floats", lambda h: _entry(h, "fc1.weight").__setitem__(2, [64.0, 128.0]))
    edit("shape not a list", lambda h: _entry(h, "fc1.weight").__setitem__(2, 8192))

    def factors_1e5(h):
        t = _task(h, "conv.weight")
        t["view"] = [10**5, 10**5]
        t["theta"]["A"]["shape"] = [10**5, 0]
        t["theta"]["B"]["shape"] = [0, 10**5]
        t["theta"]["A"]["seg"] = [0, 0]
        t["theta"]["B"]["seg"] = [0, 0]
    edit("1e5x0 factors", factors_1e5)

    def huge_k(h):
        rec = _task(h, "fc1.weight")["theta"]["parts"][0]
        rec["k"], rec["width"], rec["entries"] = 2**32, 32, 2**32
    edit("huge k", huge_k)
    edit("k = 0 with a codebook", lambda h: _task(h, "fc1.weight")["theta"]["parts"][0].update(k=0, width=0))
    edit("k = -3 with a codebook", lambda h: _task(h, "fc1.weight")["theta"]["parts"][0].update(k=-3))
    edit("huge nnz", lambda h: _task(h, "fc1.weight")["theta"]["parts"][1].update(nnz=10**12))
    edit("huge n", lambda h: _task(h, "fc1.weight")["theta"]["parts"][1].update(n=10**12))
    edit("huge delta symbols", lambda h: _task(h, "fc1.weight")["theta"]["parts"][1].update(symbols=10**12))
    edit("true as an offset", lambda h: _task(h, "fc1.weight")["theta"]["parts"][0].update(codebook=[True, 8]))
    edit("1-part sum for a 2-part config", lambda h: _task(h, "fc1.weight")["theta"]["parts"].pop())
    edit("bad conv_scheme", lambda h: _task(h, "conv.weight").update(conv_scheme="scheme_9"))
    edit("bad value dtype", lambda h: _task(h, "fc2.weight")["theta"].update(dtype="float128"))
    edit("task index out of range", lambda h: _entry(h, "fc1.weight")[3].__setitem__(1, 99))
    edit("param index out of range", lambda h: _entry(h, "fc1.weight")[3].__setitem__(2, 5))
    edit("alias of no entry", lambda h: _entry(h, "again.bias")[3].__setitem__(1, "zzz"))
    edit("alias of another shape", lambda h: _entry(h, "again.bias").__setitem__(2, [4, 4]))
    edit("unknown kind", lambda h: _task(h, "fc2.weight")["theta"].update(kind="magic"))
    edit("fixed codebook from a learned config",
         lambda h: _task(h, "fc1.bias").update(compression={"type": "AdaptiveQuantization", "k": 2}))
    edit("fixed codebook from an unknown config", lambda h: _task(h, "fc1.bias").update(compression={"type": "os:system"}))
    edit("entries not a list", lambda h: h.update(entries={"a": 1}))
    edit("tasks missing", lambda h: h.pop("tasks"))
    edit("header a list", lambda h: h.clear())

    # a consistent file that claims a 2**40-weight layer from 4 bytes (a 1-entry codebook stores no codes): read
    # with max_bytes and load refuse it, inspect (which decodes nothing) reports it
    def consistent_bomb(h):
        n = 2**40
        e = _entry(h, "fc1.weight")
        e[2] = [2**20, 2**20]
        t = _task(h, "fc1.weight")
        t["view"], t["compression"] = [n], {"type": "AdaptiveQuantization", "k": 1, "exact": False}
        t["theta"] = {"kind": "codebook", "k": 1, "n": n, "width": 0, "store": "all", "entries": 1,
                      "codebook": [theta_seg[0], 4]}
    edit("consistent 2**40-weight bomb", consistent_bomb, expect="bomb")

    # sums nested 40 deep (records and configs alike)
    def deep_sum(h):
        t = _task(h, "fc1.weight")
        rec, cfg = t["theta"], t["compression"]
        for _ in range(40):
            rec = {"kind": "sum", "parts": [rec, rec["parts"][1]]}
            cfg = {"type": "AdditiveCombination", "parts": [cfg, cfg["parts"][1]], "rounds": 1, "tol": 0.0}
        t["theta"], t["compression"] = rec, cfg
    edit("sums nested 40 deep", deep_sum)

    # JSON nested 10**5 deep (refused by its token count) and 10**4 deep (a RecursionError for the parser)
    for depth in (100_000, 10_000):
        deep = b'{"format":"lcompress.lcz","x":' + b"[" * depth + b"]" * depth + b"}"
        out.append((f"JSON nested {depth} deep", rebuild(data, header_json=deep), "error"))
    # a zlib bomb: the real header followed by 64 MB of spaces (valid JSON), compressed to ~64 KB
    hj = json.dumps(header, separators=(",", ":")).encode()
    comp = zlib.compressobj(9)
    parts = [comp.compress(hj)]
    chunk = b" " * (1 << 20)
    for _ in range(64):
        parts.append(comp.compress(chunk))
    parts.append(comp.flush())
    digest = hashlib.sha256(hj)
    for _ in range(64):
        digest.update(chunk)
    bomb = b"".join(parts)
    t2, _, p2 = split(data)
    blobs = blobs_of(t2, p2)
    digest.update(blobs["dense"])
    digest.update(blobs["theta"])
    t2["__metadata__"]["header"] = base64.b64encode(bomb).decode()
    t2["__metadata__"]["sha256"] = digest.hexdigest()
    out.append(("zlib bomb (64 MB of JSON)", frame(t2, p2), "error"))
    # a JSON-token bomb within the inflate cap: 900 KB of "[]," (300k containers)
    hb = dict(header, pad=[[]] * 300_000)
    out.append(("JSON token bomb", rebuild(data, hb), "error"))
    # the frame: a huge table length, a table full of tokens, blobs that do not tile the file
    out.append(("table length 2**63", struct.pack("<Q", 2**63) + data[8:], "error"))
    t3 = copy.deepcopy(table)
    t3["__metadata__"]["junk"] = "[" * 10_000
    out.append(("frame token bomb", frame(t3, payload), "error"))
    t4 = copy.deepcopy(table)
    t4["theta"]["data_offsets"][1] += 10**12
    t4["theta"]["shape"] = [t4["theta"]["data_offsets"][1] - t4["theta"]["data_offsets"][0]]
    out.append(("blob beyond the file", frame(t4, payload), "error"))
    out.append(("trailing bytes", data + b"\0" * 16, "error"))
    t5 = copy.deepcopy(table)
    t5["theta"]["dtype"] = "F32"
    out.append(("blob of another dtype", frame(t5, payload), "error"))
    t6 = copy.deepcopy(table)
    t6["__metadata__"]["version"] = "99999999999999999999"
    out.append(("huge version", frame(t6, payload), "error"))
    out.append(("not base64", frame(_with_meta(table, header="!!!"), payload), "error"))
    out.append(("not zlib", frame(_with_meta(table, header=base64.b64encode(b"hello").decode()), payload), "error"))
    return out


def _with_meta(table, **kw):
    t = copy.deepcopy(table)
    t["__metadata__"].update(kw)
    return t


def all_cases(data: bytes):
    cases = named_cases(data)
    rng = random.Random(1)
    for keep in sorted(set(list(range(0, 24)) + [rng.randrange(len(data)) for _ in range(40)] + [len(data) - 1])):
        cases.append((f"truncated to {keep} bytes", data[:keep], "error"))
    for i in range(120):
        pos = rng.randrange(len(data))
        b = bytearray(data)
        b[pos] ^= 1 << rng.randrange(8)
        cases.append((f"bit flip at byte {pos}", bytes(b), "any"))
    cases.extend((label, d, "any") for label, d in header_edits(data, N_EDITS))
    return cases


# ---- the worker ----------------------------------------------------------------------------------------------------
def _status() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            k, _, v = line.partition(":")
            if k in ("VmHWM", "VmRSS", "VmSize"):
                out[k] = int(v.split()[0]) * 1024
    return out


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker() -> dict:
    import resource

    import torch

    torch.set_num_threads(1)
    from lcompress import export

    data, template, model_bytes = make_base()
    cases = all_cases(data)
    snap = {k: v.clone() for k, v in template.state_dict().items()}
    types = [type(m) for m in template.modules()]

    def untouched(m) -> bool:
        return [type(x) for x in m.modules()] == types and all(
            torch.equal(v, snap[k]) for k, v in m.state_dict().items())

    entry_points = {
        "read": lambda d, m: export.read(d, max_bytes=4 * model_bytes),
        "load": lambda d, m: export.load(d, m),
        "load_compact": lambda d, m: export.load(d, m, compact=True),
        "inspect": lambda d, m: export.inspect(d),
        "compact_layers": lambda d, m: export.compact_layers(d, max_bytes=4 * model_bytes),
    }
    # warm up every path once on the good file (imports, allocator pools), then cap the address space
    for name, fn in entry_points.items():
        fn(data, copy.deepcopy(template))
    per_call = _reset_peak()
    base_as = _status()["VmSize"]
    resource.setrlimit(resource.RLIMIT_AS, (base_as + AS_HEADROOM, resource.getrlimit(resource.RLIMIT_AS)[1]))
    bad, peak, worst, calls, succeeded = [], 0, None, 0, 0
    start_rss = _status()["VmRSS"]
    for label, d, expect in cases:
        budget = RSS_FIXED + RSS_PER_BYTE * (len(d) + model_bytes)
        for name, fn in entry_points.items():
            model = copy.deepcopy(template) if name.startswith("load") else None
            before = _status()["VmRSS"]
            if per_call:
                _reset_peak()
            err = None
            try:
                fn(d, model)
            except export.CorruptFileError as e:
                err = e
            except BaseException as e:  # noqa: BLE001 - any other exception is what the test reports
                bad.append([label, name, f"{type(e).__name__}: {str(e)[:200]}"])
                err = e
            calls += 1
            if per_call:
                grew = _status()["VmHWM"] - before
                if grew > peak:
                    peak, worst = grew, [label, name]
                if grew > budget:
                    bad.append([label, name, f"peak RSS grew {grew} bytes, over the budget {budget}"])
            if err is None:
                succeeded += 1
                if expect == "error" or (expect == "bomb" and name != "inspect"):
                    bad.append([label, name, "accepted"])
            else:
                msg = str(err)
                if isinstance(err, export.CorruptFileError) and ("\n" in msg or not msg.startswith("<bytes>: ")):
                    bad.append([label, name, f"message is not one line naming the file: {msg[:200]!r}"])
                if expect == "bomb" and name == "inspect":
                    bad.append([label, name, f"inspect decodes nothing and should report the file: {msg[:200]}"])
                if model is not None and not untouched(model):
                    bad.append([label, name, "a failed load changed the model"])
    if not per_call:  # no per-call peak: the whole run's peak against the largest budget
        grew = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - start_rss
        peak, worst = grew, ["(whole run)", ""]
        if grew > RSS_FIXED + RSS_PER_BYTE * (max(len(d) for _, d, _ in cases) + model_bytes):
            bad.append(["(whole run)", "", f"peak RSS grew {grew} bytes"])
    return {"cases": len(cases), "calls": calls, "succeeded": succeeded, "bad": bad, "peak_rss_growth": peak,
            "worst": worst, "file_bytes": len(data), "model_bytes": model_bytes, "per_call_peak": per_call}


# ---- the test ------------------------------------------------------------------------------------------------------
def test_hostile_files_give_one_error_class_under_a_memory_cap():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parent), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, __file__], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads(proc.stdout.strip().splitlines()[-1])
    assert rep["cases"] >= 600 and rep["calls"] == 5 * rep["cases"]
    assert rep["bad"] == [], json.dumps(rep["bad"][:20], indent=1) + f"\n{len(rep['bad'])} in all"
    # some edits leave a valid file, most do not: the fuzzer reaches both sides
    assert 0 < rep["succeeded"] < rep["calls"] // 2, rep
    assert rep["peak_rss_growth"] < RSS_FIXED + RSS_PER_BYTE * (rep["file_bytes"] + rep["model_bytes"]), rep


if __name__ == "__main__":
    print(json.dumps(worker()))
