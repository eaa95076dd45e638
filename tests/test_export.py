"""The .lcz file format: round trips for every compression, the size bound, and corrupted-file errors."""
import json
import math
import os
import struct

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcompress as lc
from lcompress import codecs, container, export
from lcompress.models import get_model
from lcompress.sizes import support_bits

BOUND_SLACK, BOUND_FIXED = 1.02, 4096


class Small(nn.Module):
    """conv (3→8, 3×3) + BN + two Linear layers; input (N, 3, 8, 8)."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc1 = nn.Linear(8 * 4 * 4, 40)
        self.fc2 = nn.Linear(40, 10)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.bn(self.conv(x))), 2)
        return self.fc2(F.relu(self.fc1(x.flatten(1))))


def _small():
    m = Small()
    with torch.no_grad():  # non-trivial BN statistics
        m.bn.running_mean.uniform_(-0.5, 0.5)
        m.bn.running_var.uniform_(0.5, 2.0)
        m.bn.num_batches_tracked.fill_(7)
    return m.eval()


def _rel(a, b):
    return float((a - b).detach().abs().max() / b.detach().abs().max().clamp_min(1e-30))


def _roundtrip(alg, tmp_path, x, factory, compact=True):
    """Save, check the bound and bits, load into a fresh skeleton from ``factory()``; return (file bytes, report)."""
    path = tmp_path / "model.lcz"
    info = alg.export(path)
    size = os.path.getsize(path)
    assert info["file_bytes"] == size
    rep = alg.size_report()
    assert size <= BOUND_SLACK * rep["compressed_bits"] / 8 + BOUND_FIXED, (size, rep["compressed_bits"] / 8)
    header = export.read(path)["header"]
    for t, row in zip(header["tasks"], rep["tasks"]):
        assert t["bits"] == row["bits"], t["name"]  # bits written = bits counted
        assert t["bytes"] * 8 - t["bits"] < 8 * 8  # each segment rounds up to whole bytes, a few segments per task
    alg.model.eval()
    with alg.compressed():
        ref = alg.model(x)
    skeleton = factory().eval()
    out = lc.load(path, skeleton)
    assert out is skeleton
    assert _rel(skeleton(x), ref) <= 1e-6
    for n, d in alg.decompressed().items():
        assert torch.allclose(skeleton.state_dict()[n], d, rtol=1e-6, atol=1e-7), n
    if compact:
        c = factory().eval()
        lc.load(path, c, compact=True)
        assert _rel(c(x), ref) <= 1e-5
    return size, rep


X = torch.randn(4, 3, 8, 8)
W3 = ("conv.weight", "fc1.weight", "fc2.weight")


def _cases():
    fa = torch.randint(0, 5, (40 * 128,), generator=torch.Generator().manual_seed(1))
    fa300 = torch.randint(0, 300, (40 * 128,), generator=torch.Generator().manual_seed(2))
    return {
        "adaptive_k4": {"re:(conv|fc\\d)\\.weight": lc.AdaptiveQuantization(4)},
        "adaptive_k1": {"fc2.weight": lc.AdaptiveQuantization(1)},
        "adaptive_k6_exact": {"fc1.weight": lc.AdaptiveQuantization(6, exact=True)},
        "fixed_assignment_k300": {"fc1.weight": lc.FixedAssignmentQuantization(fa300, k=300)},  # 9-bit codes, int64
        "binary": {"re:(conv|fc\\d)\\.weight": lc.BinaryQuantization()},
        "scaled_binary": {"re:(conv|fc\\d)\\.weight": lc.ScaledBinaryQuantization()},
        "ternary": {"re:(conv|fc\\d)\\.weight": lc.TernaryQuantization()},
        "scaled_ternary": {"re:(conv|fc\\d)\\.weight": lc.ScaledTernaryQuantization()},
        "powers_of_two": {"re:(conv|fc\\d)\\.weight": lc.PowersOfTwoQuantization(4)},
        "fixed_assignment": {"fc1.weight": lc.FixedAssignmentQuantization(fa, k=5)},
        "l0_float32": {"re:(conv|fc\\d)\\.weight": lc.ConstraintL0Pruning(30)},
        "l0_float16": {"re:(conv|fc\\d)\\.weight": lc.ConstraintL0Pruning(30, value_dtype="float16")},
        "l0_bfloat16_dense_support": {"fc1.weight": lc.ConstraintL0Pruning(3000, value_dtype="bfloat16")},
        "l0_all_kept": {"fc2.weight": lc.ConstraintL0Pruning(400)},
        "l0_codebook": {"re:(conv|fc\\d)\\.weight": lc.ConstraintL0Pruning(30, value_codebook=4)},
        "l0_codebook_k1_joint": {W3: lc.ConstraintL0Pruning(60, value_codebook=1)},
        "penalty_l0_codebook": {"fc1.weight": lc.PenaltyL0Pruning(1e-3, value_codebook=3)},
        "additive_quant_prune_codebook": {"fc1.weight": lc.AdaptiveQuantization(2) + lc.ConstraintL0Pruning(50, value_codebook=2)},
        "l1": {"fc1.weight": lc.ConstraintL1Pruning(5.0)},
        "penalty_l0": {"fc1.weight": lc.PenaltyL0Pruning(1e-3)},
        "penalty_l1": {"fc1.weight": lc.PenaltyL1Pruning(1e-3)},
        "lowrank_linear": {"fc1.weight": lc.LowRank(3)},
        "lowrank_conv_scheme_1": {"conv.weight": lc.LowRank(2, conv_scheme="scheme_1")},
        "lowrank_conv_scheme_2": {"conv.weight": lc.LowRank(2, conv_scheme="scheme_2")},
        "rank_selection": {"fc1.weight": lc.RankSelection(1e-4), "conv.weight": lc.RankSelection(1e-4,
                                                                                              conv_scheme="scheme_2")},
        "additive_quant_prune": {"fc1.weight": lc.AdaptiveQuantization(2) + lc.ConstraintL0Pruning(50)},
        "additive_lowrank_prune_conv": {"conv.weight": lc.LowRank(1) + lc.ConstraintL0Pruning(20, value_dtype="fp16")},
        "additive_three": {"fc2.weight": lc.ScaledTernaryQuantization() + lc.LowRank(1) + lc.ConstraintL0Pruning(9)},
        "joint_quant": {W3: lc.AdaptiveQuantization(4)},
        "joint_prune": {W3: lc.ConstraintL0Pruning(100), "fc1.bias": lc.BinaryQuantization()},
        "mixed": {"conv.weight": lc.LowRank(2, conv_scheme="scheme_2"), "fc1.weight": lc.ConstraintL0Pruning(200),
                  "fc2.weight": lc.AdaptiveQuantization(3), ("bn.weight", "bn.bias"): lc.AdaptiveQuantization(2)},
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_roundtrip_every_compression(case, tmp_path):
    model = _small()
    alg = lc.LC(model, _cases()[case])
    if case.startswith(("penalty", "rank_selection")):
        # the penalty forms compress everything at μ → 0⁺; a C step at a moderate μ keeps some weights
        alg.c_step(10.0)
        assert any(t.compression.count_params() > 0 for t in alg.tasks)
    elif not case.startswith(("adaptive", "joint_quant", "additive")):  # (k-means C steps are slow on CPU)
        with torch.no_grad():  # perturb the weights and take a C step, so Θ is not the first one
            for p in model.parameters():
                p.add_(0.01 * torch.randn_like(p))
        alg.c_step(1e-2)
    _roundtrip(alg, tmp_path, X, Small)


def test_float64_model_roundtrip(tmp_path):
    model = _small().double()
    alg = lc.LC(model, {"fc1.weight": lc.LowRank(3), "fc2.weight": lc.ScaledTernaryQuantization(),
                        "conv.weight": lc.ConstraintL0Pruning(40)})
    _roundtrip(alg, tmp_path, X.double(), lambda: Small().double())
    with pytest.raises(ValueError, match="float64 in the file"):
        lc.load(tmp_path / "model.lcz", Small())


def test_save_rejects_a_non_lc_object(tmp_path):
    with pytest.raises(TypeError, match="LC object"):
        export.save(object(), tmp_path / "x.lcz")


def test_lenet300_k2_is_about_one_thirtieth(tmp_path):
    model = get_model("lenet300").eval()
    alg = lc.LC(model, {"re:fc\\d\\.weight": lc.AdaptiveQuantization(2)})
    size, rep = _roundtrip(alg, tmp_path, torch.randn(8, 784), lambda: get_model("lenet300"))
    dense = sum(v.numel() * v.element_size() for v in model.state_dict().values())
    assert 29 <= dense / size <= 32


def test_resnet20_many_small_tensors(tmp_path):
    model = get_model("resnet20").eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    tasks = {
        "re:layer1\\..*conv\\d\\.weight": lc.BinaryQuantization(),
        "re:layer2\\..*conv\\d\\.weight": lc.ScaledTernaryQuantization(),
        ("re:layer3\\..*conv\\d\\.weight",): lc.ConstraintL0Pruning(2000, value_dtype="float16"),
        "re:.*bn\\d\\.bias": lc.AdaptiveQuantization(2),
        "fc.weight": lc.LowRank(4),
    }
    alg = lc.LC(model, tasks)
    assert len(alg.tasks) > 25
    _roundtrip(alg, tmp_path, torch.randn(2, 3, 32, 32), lambda: get_model("resnet20"))


def test_shared_parameters_stored_once(tmp_path):
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(16, 16)
            self.b = nn.Linear(16, 16)
            self.b.bias = self.a.bias  # a dense tensor under two names
            self.c = nn.Linear(16, 16)
            self.c.weight = self.a.weight  # a compressed tensor under two names

        def forward(self, x):
            return self.c(self.b(self.a(x)))

    torch.manual_seed(0)
    model = Tied()
    alg = lc.LC(model, {"a.weight": lc.AdaptiveQuantization(2)})
    x = torch.randn(3, 16)
    path = tmp_path / "t.lcz"
    alg.export(path)
    header = export.read(path)["header"]
    assert header["blobs"]["dense"] == 4 * (16 + 16 * 16 + 16)  # a.bias once, b.weight, c.bias
    with alg.compressed():
        ref = model(x)
    sk = Tied()
    lc.load(path, sk)
    assert _rel(sk(x), ref) <= 1e-6


# ---- the bit-level codings against independent references -------------------------------------------------------
def _ref_pack(values, width):
    bits = "".join(format(int(v), f"0{width}b")[::-1] for v in values) if width else ""
    bits += "0" * (-len(bits) % 8)
    return bytes(int(bits[i : i + 8][::-1], 2) for i in range(0, len(bits), 8))


@pytest.mark.parametrize("width", [0, 1, 2, 3, 4, 5, 7, 8, 9, 13, 16, 17, 31, 32])
@pytest.mark.parametrize("n", [0, 1, 7, 8, 9, 100])
def test_pack_bits_against_reference(width, n):
    g = torch.Generator().manual_seed(width * 1000 + n)
    v = torch.randint(0, 2**width, (n,), generator=g, dtype=torch.int64) if width else torch.zeros(n, dtype=torch.int64)
    packed = export.pack_bits(v, width)
    assert packed == _ref_pack(v.tolist(), width)
    assert len(packed) == math.ceil(n * width / 8)
    assert export.unpack_bits(packed, n, width).tolist() == v.tolist()


def test_pack_bits_large_generic_width_chunks():
    v = torch.randint(0, 2**11, (3 * 2**20 + 5,))
    packed = export.pack_bits(v, 11)
    assert len(packed) == math.ceil(v.numel() * 11 / 8)
    assert torch.equal(torch.from_numpy(export.unpack_bits(packed, v.numel(), 11)), v)


def test_pack_bits_rejects_values_that_do_not_fit():
    with pytest.raises(ValueError, match="2\\*\\*3"):
        export.pack_bits(torch.tensor([8]), 3)
    with pytest.raises(ValueError, match="width"):
        export.pack_bits(torch.tensor([1]), 33)


@pytest.mark.parametrize("density", [0.001, 0.02, 0.3, 0.9])
def test_support_coding_matches_size_accounting(density):
    n = 5000
    idx = torch.nonzero(torch.rand(n, generator=torch.Generator().manual_seed(3)) < density).reshape(-1)
    comp = lc.ConstraintL0Pruning(idx.numel())
    w = torch.zeros(n)
    w[idx] = torch.rand(idx.numel()) + 1.0
    comp.compress(w)
    wr = codecs.Writer(lossless=False)  # the packed bits (tests/test_lossless.py: the coded streams)
    rec = comp.codec.encode(comp, wr)
    assert wr.bits == 32 * idx.numel() + support_bits(idx, n)[1]
    scheme, sbits, width = support_bits(idx, n)
    assert rec["support"] == scheme
    seg = rec["mask"] if scheme == "bitmask" else rec["deltas"]
    assert seg[1] == math.ceil(sbits / 8)
    blob = torch.frombuffer(bytearray(wr.payload()), dtype=torch.uint8)
    theta = codecs.decode_theta(rec, codecs.Reader(blob), comp.config(), "t")
    assert torch.equal(theta["indices"], idx)
    assert torch.equal(theta["values"], w[idx])


def test_support_coding_uses_escapes_for_long_gaps():
    # positions far apart with a narrow best width exercise the escape symbol
    idx = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 2000, 2001, 2002, 2003, 2004, 2005, 2006, 9000])
    width = 3
    sym = codecs.delta_encode(idx, width).numpy()
    assert (sym == 7).sum() > 0
    assert codecs.delta_decode(sym, width, idx.numel(), 10000).tolist() == idx.tolist()


# ---- errors -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_bytes(tmp_path_factory):
    torch.manual_seed(0)
    model = get_model("lenet300").eval()
    alg = lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(2), "fc2.weight": lc.ConstraintL0Pruning(500)})
    path = tmp_path_factory.mktemp("lcz") / "m.lcz"
    alg.export(path)
    return path.read_bytes()


@pytest.fixture
def saved(tmp_path, saved_bytes):
    path = tmp_path / "m.lcz"
    path.write_bytes(saved_bytes)
    return path


def _frame(data):
    n = struct.unpack("<Q", data[:8])[0]
    return n, json.loads(data[8 : 8 + n])


def _reframe(table, payload):
    h = json.dumps(table, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + payload


def test_flipped_payload_byte_is_a_checksum_error(saved):
    data = bytearray(saved.read_bytes())
    n, _ = _frame(data)
    data[8 + n + 100] ^= 0x10
    saved.write_bytes(data)
    with pytest.raises(ValueError, match="checksum"):
        lc.load(saved, get_model("lenet300"))


def test_flipped_header_byte_is_an_error(saved):
    data = bytearray(saved.read_bytes())
    n, _ = _frame(data)
    data[8 + n // 2] ^= 0x01
    saved.write_bytes(data)
    with pytest.raises(ValueError, match="corrupted|checksum|not a .lcz"):
        export.read(saved)


@pytest.mark.parametrize("keep", [0, 5, 8, 100, -1])
def test_truncated_file(saved, keep):
    data = saved.read_bytes()
    saved.write_bytes(data[:keep] if keep >= 0 else data[:-1])
    with pytest.raises(ValueError, match="truncated|not a .lcz"):
        lc.load(saved, get_model("lenet300"))


def test_newer_version(saved):
    data = saved.read_bytes()
    n, table = _frame(data)
    table["__metadata__"]["version"] = str(export.VERSION + 1)
    saved.write_bytes(_reframe(table, data[8 + n :]))
    with pytest.raises(ValueError, match="newer"):
        export.read(saved)


def test_edited_header_fails_checksum(saved):
    data = saved.read_bytes()
    n, table = _frame(data)
    import base64
    import zlib

    header = json.loads(zlib.decompress(base64.b64decode(table["__metadata__"]["header"])))
    header["entries"][1][2] = [301]  # fc1.bias claims another shape
    table["__metadata__"]["header"] = base64.b64encode(zlib.compress(json.dumps(header).encode())).decode()
    saved.write_bytes(_reframe(table, data[8 + n :]))
    with pytest.raises(ValueError, match="checksum"):
        export.read(saved)


def test_not_an_lcz_file(tmp_path):
    from safetensors.torch import save_file

    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(3)}, p)
    with pytest.raises(ValueError, match="not a .lcz"):
        export.read(p)
    q = tmp_path / "junk.lcz"
    q.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    with pytest.raises(ValueError, match="not a .lcz"):
        export.read(q)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        lc.load(tmp_path / "nope.lcz", get_model("lenet300"))


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_renamed_parameter_is_named_and_skeleton_untouched(saved):
    class Renamed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1 = nn.Linear(784, 300)
            self.fc2 = nn.Linear(300, 100)
            self.out = nn.Linear(100, 10)

    sk = Renamed()
    before = _snapshot(sk)
    with pytest.raises(ValueError) as e:
        lc.load(saved, sk)
    assert "fc3.weight" in str(e.value) and "out.weight" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in sk.state_dict().items())


def test_reshaped_parameter_is_named_and_skeleton_untouched(saved):
    sk = get_model("mlp", sizes=[784, 300, 99, 10])
    before = _snapshot(sk)
    with pytest.raises(ValueError, match="fc2.weight") as e:
        lc.load(saved, sk)
    assert "(100, 300)" in str(e.value) and "(99, 300)" in str(e.value)
    assert all(torch.equal(before[k], v) for k, v in sk.state_dict().items())


def test_dtype_mismatch_is_an_error(saved):
    sk = get_model("lenet300").double()
    with pytest.raises(ValueError, match="float64"):
        lc.load(saved, sk)


def test_strict_false_skips_extra_entries(saved):
    sk = get_model("lenet300")
    sk.register_buffer("extra", torch.ones(3))
    with pytest.raises(ValueError, match="extra"):
        lc.load(saved, sk)
    lc.load(saved, sk, strict=False)
    assert torch.equal(sk.extra, torch.ones(3))
    assert torch.equal(sk.fc3.weight, export.read(saved)["state"]["fc3.weight"])


def test_inspect_rows_add_up(saved):
    rows = export.inspect(saved)
    assert [r["task"] for r in rows] == ["fc1.weight", "fc2.weight", "(uncompressed)", "(header)"]
    assert sum(r["file_bytes"] for r in rows) == os.path.getsize(saved)
    assert rows[0]["compression"] == "AdaptiveQuantization" and rows[0]["shapes"] == [(300, 784)]
    assert rows[0]["bits"] == 300 * 784 + 64
    assert 31 < rows[0]["ratio"] < 32.1


def test_file_is_plain_safetensors(saved):
    from safetensors import safe_open

    with safe_open(saved, "pt") as f:
        meta = f.metadata()
        assert meta["format"] == "lcompress.lcz" and meta["version"] == str(export.VERSION)
        assert set(f.keys()) <= {"dense", "theta"}
        assert all(f.get_tensor(k).dtype == torch.uint8 for k in f.keys())


def test_equal_content_gives_equal_bytes(tmp_path, saved_bytes):
    """safetensors writes its metadata in hash-map order; the exporter sorts the header so files reproduce."""
    torch.manual_seed(0)
    model = get_model("lenet300").eval()
    alg = lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(2), "fc2.weight": lc.ConstraintL0Pruning(500)})
    outs = set()
    for i in range(4):
        alg.export(tmp_path / f"m{i}.lcz")
        outs.add((tmp_path / f"m{i}.lcz").read_bytes())
    assert outs == {saved_bytes}
    n, table = _frame(saved_bytes)
    assert list(table) == sorted(table) and list(table["__metadata__"]) == sorted(table["__metadata__"])


# ---- hostile files: one error class naming the field, nothing allocated or touched before the checks -----------------
import base64 as _b64  # noqa: E402
import copy as _copy  # noqa: E402
import hashlib as _hashlib  # noqa: E402
import zlib as _zlib  # noqa: E402

import test_fuzz_lcz as fz  # noqa: E402  (tests/ is on sys.path: the fuzz module's file editors)


@pytest.fixture(scope="module")
def fuzz_base():
    return fz.make_base()  # (bytes, model template, model bytes)


def _edited(data, fn):
    _, header, _ = fz.split(data)
    fn(header)
    return fz.rebuild(data, header)


def _untouched(model, template):
    return [type(m) for m in model.modules()] == [type(m) for m in template.modules()] and all(
        torch.equal(v, template.state_dict()[k]) for k, v in model.state_dict().items())


def test_error_classes_are_public_value_errors():
    assert lc.CorruptFileError is export.CorruptFileError and lc.ModelMismatchError is export.ModelMismatchError
    assert issubclass(export.CorruptFileError, ValueError) and issubclass(export.ModelMismatchError, export.CorruptFileError)
    assert {"CorruptFileError", "ModelMismatchError"} <= set(export.__all__) and "CorruptFileError" in lc.__all__


_FIELD_CASES = {  # the raw Python exceptions, each now a CorruptFileError naming the field
    "k <= 0 with a codebook": (lambda h: fz._task(h, "fc1.weight")["theta"]["parts"][0].update(k=0, width=0),
                               "theta.parts[0].k = 0"),
    "negative shape": (lambda h: fz._entry(h, "fc2.bias").__setitem__(2, [-16]), "('fc2.bias').shape = [-16]"),
    "true as an offset": (lambda h: fz._task(h, "fc1.weight")["theta"]["parts"][0].update(codebook=[True, 8]),
                          "theta.parts[0].codebook = [True, 8]"),
    "1-part sum for a 2-part config": (lambda h: fz._task(h, "fc1.weight")["theta"]["parts"].pop(),
                                       "('fc1.weight').theta.parts"),
    "shape of the wrong type": (lambda h: fz._entry(h, "fc1.weight").__setitem__(2, "64x128"),
                                "('fc1.weight').shape = '64x128'"),
    "huge k": (lambda h: fz._task(h, "fc1.weight")["theta"]["parts"][0].update(k=2**40), "parts[0].k = 1099511627776"),
    "huge nnz": (lambda h: fz._task(h, "fc1.weight")["theta"]["parts"][1].update(nnz=10**12), "parts[1].nnz"),
    "segment beyond the blob": (lambda h: fz._task(h, "fc2.weight")["theta"].update(mask=[10**9, 128]), "theta.mask"),
    "bad conv_scheme": (lambda h: fz._task(h, "conv.weight").update(conv_scheme="scheme_9"), "conv_scheme = 'scheme_9'"),
    "missing field": (lambda h: fz._task(h, "fc2.weight")["theta"].pop("nnz"), "theta.nnz is missing"),
    "unknown dtype": (lambda h: fz._entry(h, "bn.running_mean").__setitem__(1, "float128"), "dtype = 'float128'"),
}


@pytest.mark.parametrize("case", list(_FIELD_CASES))
def test_malformed_header_names_the_field_in_every_reader(fuzz_base, case, tmp_path):
    data, template, _ = fuzz_base
    fn, field = _FIELD_CASES[case]
    path = tmp_path / "bad.lcz"
    path.write_bytes(_edited(data, fn))
    model = _copy.deepcopy(template)
    for call in (lambda: export.read(path), lambda: export.inspect(path), lambda: lc.load(path, model),
                 lambda: lc.load(path, model, compact=True)):
        with pytest.raises(export.CorruptFileError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{path}: ") and field in msg and "\n" not in msg, msg
    assert _untouched(model, template)


def test_a_failed_compact_load_leaves_the_model_untouched(fuzz_base, monkeypatch):
    """The issue's case (a bad conv_scheme) is refused by the header check; a payload that passes the checks but
    does not decode, and a compact layer that cannot be built, are refused before the model is written too."""
    data, template, _ = fuzz_base
    _, header, _ = fz.split(data)
    cb = fz._task(header, "fc1.weight")["theta"]["parts"][0]["codebook"]

    def one_entry(h):  # a 1-entry codebook for 1-bit codes: a code 1 lies beyond it
        fz._task(h, "fc1.weight")["theta"]["parts"][0].update(entries=1, codebook=[cb[0], 4])
    bad = _edited(data, one_entry)
    model = _copy.deepcopy(template)
    with pytest.raises(export.CorruptFileError, match="beyond its 1-entry codebook"):
        lc.load(bad, model, compact=True)
    assert _untouched(model, template)

    from lcompress import nn as lnn

    real, calls = lnn._compact_layer, []

    def fails_second(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated failure building a compact layer")
        return real(*a, **k)
    monkeypatch.setattr(lnn, "_compact_layer", fails_second)
    with pytest.raises(export.CorruptFileError, match="simulated failure"):
        lc.load(data, model, compact=True)
    assert len(calls) == 2 and _untouched(model, template)
    monkeypatch.setattr(lnn, "_compact_layer", real)
    lc.load(data, model, compact=True)  # and the good file loads, biases included
    got = export.read(data)["state"]
    assert isinstance(model.fc1, lnn.SumLinear)  # a sum of a codebook and a sparse part: each part's layer
    assert isinstance(model.conv, lnn.LowRankConv2d) and torch.equal(model.conv.second.bias, got["conv.bias"])
    assert torch.equal(model.fc1.bias, got["fc1.bias"]) and model.again is model.fc2


def test_inspect_decodes_nothing(fuzz_base, monkeypatch):
    """A valid 8 KB file claiming a 2⁴⁰-weight layer (a 1-entry codebook stores no codes): inspect reports it,
    read with max_bytes and load refuse it, and none of them allocates it."""
    data, template, model_bytes = fuzz_base
    bomb = next(d for label, d, _ in fz.named_cases(data) if label.startswith("consistent"))
    rows = export.inspect(bomb)
    assert next(r for r in rows if r["task"] == "fc1.weight")["weights"] == 2**40
    with pytest.raises(export.CorruptFileError, match="max_bytes"):
        export.read(bomb, max_bytes=10 * model_bytes)
    with pytest.raises(export.ModelMismatchError, match=r"'fc1.weight' has shape \(1048576, 1048576\)"):
        lc.load(bomb, _copy.deepcopy(template))

    def no_decoding(*a, **k):
        raise AssertionError("inspect decoded a tensor")
    for name in codecs.CODECS:
        monkeypatch.setattr(type(codecs.CODECS[name]), "decode", no_decoding)
    monkeypatch.setattr(codecs.Reader, "segment", no_decoding)
    assert [r["task"] for r in export.inspect(data)][-2:] == ["(uncompressed)", "(header)"]


def test_read_max_bytes(fuzz_base):
    data, _, _ = fuzz_base
    state = export.read(data)["state"]
    _, header, _ = fz.split(data)
    aliases = {e[0] for e in header["entries"] if e[3][0] == "alias"}
    need = sum(v.numel() * v.element_size() for k, v in state.items() if k not in aliases)
    assert export.read(data, max_bytes=need)["state"].keys() == state.keys()
    with pytest.raises(export.CorruptFileError, match=f"take {need} bytes decoded, more than max_bytes={need - 1}"):
        export.read(data, max_bytes=need - 1)
    with pytest.raises(ValueError, match="max_bytes=-1"):
        export.read(data, max_bytes=-1)


def test_header_inflate_is_bounded_and_checksum_comes_before_parsing(fuzz_base, monkeypatch):
    data, _, _ = fuzz_base
    bomb = next(d for label, d, _ in fz.named_cases(data) if label.startswith("zlib bomb"))
    asked = []
    real = _zlib.decompressobj

    class Spy:
        def __init__(self):
            self.d = real()

        def decompress(self, raw, max_length=0):
            asked.append(max_length)
            out = self.d.decompress(raw, max_length)
            asked.append(len(out))
            return out

        def __getattr__(self, name):
            return getattr(self.d, name)
    monkeypatch.setattr(container.zlib, "decompressobj", Spy)
    cap = container.HEADER_MAX_FIXED + container.HEADER_MAX_RATIO * len(bomb)
    with pytest.raises(export.CorruptFileError, match=f"inflates to more than {cap} bytes"):
        export.inspect(bomb)
    assert asked == [cap + 1, cap + 1]  # 64 MB in the stream, cap + 1 bytes inflated
    monkeypatch.setattr(container.zlib, "decompressobj", real)
    # JSON that does not parse, with the recorded checksum left as it was: the checksum is what fails
    table, _, payload = fz.split(data)
    table["__metadata__"]["header"] = _b64.b64encode(_zlib.compress(b"[" * 5000)).decode()
    with pytest.raises(export.CorruptFileError, match="checksum mismatch"):
        export.read(fz.frame(table, payload))
    # ... and with it recomputed, the JSON is what fails
    with pytest.raises(export.CorruptFileError, match="not JSON"):
        export.read(fz.rebuild(data, header_json=b"[" * 5000))


def test_real_headers_are_far_below_the_limits():
    """ResNet-110's header (656 entries, the most regular names, zlib's best ratio seen: 12.5) against the caps."""
    torch.manual_seed(0)
    alg = lc.LC(get_model("resnet110"), {"re:.*conv.*weight": lc.AdaptiveQuantization(2)})
    data, _ = export.to_bytes(alg)
    table, header, _ = fz.split(data)
    hj = json.dumps(header, separators=(",", ":")).encode()
    assert len(hj) < 0.5 * len(data) < container.HEADER_MAX_RATIO * len(data)
    assert container._tokens(hj) < 0.05 * len(data) < container.TOKENS_MAX_RATIO * len(data)
    assert container._tokens(data[8 : 8 + struct.unpack("<Q", data[:8])[0]]) < container.FRAME_MAX_TOKENS / 4
    assert export.read(data)["header"] == header


@pytest.mark.parametrize("umask", [0o022, 0o027, 0o077])
def test_written_files_follow_the_umask(tmp_path, saved, umask):
    from lcompress._io import atomic_save, atomic_write_text

    old = os.umask(umask)
    try:
        torch.manual_seed(0)
        alg = lc.LC(get_model("lenet300"), {"fc1.weight": lc.BinaryQuantization()})
        alg.export(tmp_path / "m.lcz")
        atomic_save({"a": 1}, tmp_path / "c.pt")
        atomic_write_text("x", tmp_path / "t.json")
        for f in ("m.lcz", "c.pt", "t.json"):
            assert (tmp_path / f).stat().st_mode & 0o777 == 0o666 & ~umask, f
        assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt", "m.lcz", "t.json"]  # no temporaries left
    finally:
        os.umask(old)


def test_cli_inspect_of_a_bad_file_is_one_line_and_exit_2(tmp_path, saved_bytes, capsys, isolated_cli):
    from lcompress.cli import main

    good, bad = tmp_path / "good.lcz", tmp_path / "bad.lcz"
    good.write_bytes(saved_bytes)
    bad.write_bytes(saved_bytes[:-7])
    assert main(["inspect", str(good), "-q"]) == 0
    out = capsys.readouterr().out
    assert "fc1.weight" in out and "AdaptiveQuantization" in out
    assert main(["inspect", str(bad), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"lcompress: error: {bad}: truncated .lcz file") and err.count("\n") == 1, err
    assert main(["inspect", str(tmp_path), "-q"]) == 2  # a directory: an OSError, also one line
    err = capsys.readouterr().err
    assert err.startswith("lcompress: error:") and str(tmp_path) in err and err.count("\n") == 1, err
