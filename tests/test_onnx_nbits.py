"""ONNX export with grouped-integer layers as ONNX Runtime's MatMulNBits (lcompress.formats.onnx).

ONNX Runtime itself is the reference: the exported files run on its CPU execution provider and are compared with
lcompress's compact model (``lc.load(..., compact=True)``), and its dequantized weights (read out by multiplying
the identity) with Δ(Θ) bit for bit. The packing is checked against a bit stream written out by hand with numpy.
"""
import os
import re

import numpy as np
import pytest
import torch
from torch import nn

import lcompress as lc
from lcompress.models import get_model

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("onnxscript")

from lcompress.formats.onnx import (  # noqa: E402
    ONNXExportError, MatMulNBitsLinear, export_onnx, matmul_nbits_form, pack_nbits, unpack_nbits)

TOL = 2e-5  # relative to the largest output: float32 sums in another order


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def mlp(sizes, bias=True):
    layers = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        layers += [nn.Linear(a, b, bias=bias), nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def linear_names(net):
    return [n for n, p in net.named_parameters() if p.dim() == 2]


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def ort_run(path, x):
    s = session(path)
    return torch.from_numpy(s.run(None, {s.get_inputs()[0].name: x.numpy()})[0])


def compact_of(alg, make, tmp_path):
    alg.export(tmp_path / "m.lcz")
    return lc.load(tmp_path / "m.lcz", make(), compact=True)


def packed_bits(alg):
    """The size report with every stream at its packed bits (the lossless stage off): what the ONNX file holds."""
    rep = alg.size_report()
    return rep["other_bits"] + sum(t.compression.count_bits(lossless=False) for t in alg.tasks)


def close(y, ref, tol=TOL):
    return float((y.float() - ref.float()).abs().max()) <= tol * float(ref.float().abs().max())


def initializers(path):
    return {i.name: i for i in onnx.load(str(path)).graph.initializer}


def by_hand(u, bits):
    """Codes (rows, n) as a little-endian bit stream per row, bit by bit (numpy's packbits)."""
    u = np.asarray(u, dtype=np.uint8)
    bit = (u[..., None] >> np.arange(bits)) & 1
    return np.packbits(bit.reshape(*u.shape[:-1], -1), axis=-1, bitorder="little")


# ---- packing ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_is_a_low_first_bit_stream(bits):
    u = torch.randint(0, 1 << bits, (5, 64), dtype=torch.uint8)
    p = pack_nbits(u, bits)
    assert p.dtype == torch.uint8 and p.shape == (5, 64 * bits // 8)
    assert np.array_equal(p.numpy(), by_hand(u.numpy(), bits))
    assert torch.equal(unpack_nbits(p, 64, bits), u)


@pytest.mark.parametrize("bits,group,cols", [(4, 32, 96), (2, 16, 40), (8, 64, 100), (4, 16, 50)])
def test_matmul_nbits_form_packs_theta_block_by_block(bits, group, cols):
    """B is (rows, blocks, group·bits/8) with each block's codes as a bit stream; a shorter last group is padded
    with the zero point 2^(b−1); the scales are Θ's, at their float16 dtype."""
    q = lc.GroupedIntQuantization(bits, group)
    q.compress(torch.randn(6, cols))
    th = q.theta
    f = matmul_nbits_form("w", q.config(), th, (6, cols), torch.float32)
    nb = -(-cols // group)
    u = th["codes"].reshape(6, cols).numpy()
    u = np.concatenate([u, np.full((6, nb * group - cols), 1 << (bits - 1), np.uint8)], axis=1)
    want = by_hand(u.reshape(6, nb, group), bits)
    assert f["qweight"].shape == (6, nb, group * bits // 8)
    assert np.array_equal(f["qweight"].numpy(), want)
    assert f["zero_points"] is None and f["scales"].dtype == torch.float16
    assert torch.equal(f["scales"], th["scales"])
    assert (f["k"], f["n"], f["bits"], f["block_size"]) == (cols, 6, bits, group)


# ---- ONNX Runtime against the compact model -------------------------------------------------------------------
# (bits, group, sizes): models large enough that the graph (about 3 KB for two layers) is under 2% of the file
CASES = [(4, 32, [1024, 512, 16]), (8, 64, [768, 256, 16]), (2, 16, [1024, 512, 16])]


@pytest.mark.parametrize("bits,group,sizes", CASES, ids=["int4g32", "int8g64", "int2g16"])
def test_grouped_int_model_runs_in_onnxruntime_as_matmul_nbits(bits, group, sizes, tmp_path):
    torch.manual_seed(0)
    net = mlp(sizes)
    alg = lc.LC(net, {n: lc.GroupedIntQuantization(bits, group) for n in linear_names(net)})
    alg.c_step(1e-3)
    out = tmp_path / "m.onnx"
    x = torch.randn(3, sizes[0])
    r = export_onnx(alg, out, (x,), dynamic_shapes=({0: "batch"},))
    assert sorted(r["matmul_nbits"]) == ["0.weight", "2.weight"] and r["float"] == [] and r["compact"] == {}

    # ONNX Runtime's outputs are the compact model's, at another batch size (the batch is dynamic)
    ref_model = compact_of(alg, lambda: mlp(sizes), tmp_path)
    x = torch.randn(7, sizes[0])
    with torch.no_grad():
        ref = ref_model(x)
    assert close(ort_run(out, x), ref)

    # the graph holds MatMulNBits nodes and the packed codes; the only float initializers are biases and scales
    model = onnx.load(str(out))
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulNBits") == 2 and "MatMul" not in ops and "Gemm" not in ops
    assert all(n.domain == "com.microsoft" for n in model.graph.node if n.op_type == "MatMulNBits")
    inits = initializers(out)
    for name, (k, n) in {"0": (sizes[0], sizes[1]), "2": (sizes[1], sizes[2])}.items():
        b = inits[f"{name}.qweight"]
        assert b.data_type == onnx.TensorProto.UINT8 and list(b.dims) == [n, k // group, group * bits // 8]
        assert inits[f"{name}.scales"].data_type == onnx.TensorProto.FLOAT16  # as Θ stores them, Cast in the graph
        assert f"{name}.weight" not in inits
    floats = {i.name for i in model.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    assert floats == {"0.bias", "2.bias"}

    # the file is the packed size report plus the graph: within 2%; the size report's default (lossless) count is
    # what the .lcz stores, at most the packed one (entropy-coded streams where shorter)
    packed = packed_bits(alg) / 8
    assert sum(len(i.raw_data) for i in model.graph.initializer) == packed  # every stored byte, nothing more
    assert packed <= r["file_bytes"] <= 1.02 * packed
    assert alg.size_report()["compressed_bits"] <= 8 * packed


def test_a_shorter_last_group_is_padded_to_a_whole_block(tmp_path):
    """K = 1008 in groups of 32: lcompress's last group has 16 weights, MatMulNBits's last block is padded to 32.
    The padding is the only difference from the packed size report: 16 codes a row."""
    torch.manual_seed(0)
    sizes = [1008, 512, 16]
    net = mlp(sizes)
    alg = lc.LC(net, {"0.weight": lc.GroupedIntQuantization(4, 32), "2.weight": lc.GroupedIntQuantization(2, 16)})
    alg.c_step(1e-3)
    out = tmp_path / "m.onnx"
    r = export_onnx(alg, out, (torch.randn(2, 1008),))
    assert r["matmul_nbits"]["0.weight"] == {"bits": 4, "block_size": 32, "k": 1008, "n": 512, "zero_points": False}
    x = torch.randn(2, 1008)
    with torch.no_grad():
        ref = compact_of(alg, lambda: mlp(sizes), tmp_path)(x)
    assert close(ort_run(out, x), ref)
    assert list(initializers(out)["0.qweight"].dims) == [512, 32, 16]
    pad = 512 * 16 * 4 / 8
    raw = sum(len(i.raw_data) for i in onnx.load(str(out)).graph.initializer)
    assert raw == packed_bits(alg) / 8 + pad
    assert raw <= r["file_bytes"] <= 1.02 * raw


def _identity_readout(path, k):
    """The weight ONNX Runtime dequantizes, (n, k): the model's output on the k×k identity (a bias-free layer)."""
    return ort_run(path, torch.eye(k)).T


@pytest.mark.parametrize("bits,group,cols", [(4, 32, 64), (2, 16, 48), (8, 64, 128), (4, 32, 80)])
def test_onnxruntime_dequantizes_exactly_delta(bits, group, cols, tmp_path):
    """Nothing is rounded at export: W as ONNX Runtime dequantizes it is Δ(Θ) bit for bit."""
    torch.manual_seed(0)
    net = mlp([cols, 24], bias=False)
    alg = lc.LC(net, {"0.weight": lc.GroupedIntQuantization(bits, group)})
    alg.c_step(1e-3)
    export_onnx(alg, tmp_path / "m.onnx", (torch.randn(2, cols),), dynamic_shapes=({0: "batch"},))
    w = _identity_readout(tmp_path / "m.onnx", cols)
    assert torch.equal(w, alg.decompressed()["0.weight"])


def test_asymmetric_offsets_on_the_scale_grid_are_integer_zero_points(tmp_path):
    """Δ = s·u + m with m = −zp·s, zp an integer: exported as MatMulNBits's packed uint8 zero points (2 bits, 5
    blocks a row: each row's zero points packed on their own, 2 bytes)."""
    torch.manual_seed(0)
    net = mlp([80, 24], bias=False)
    q = lc.GroupedIntQuantization(2, 16, symmetric=False)
    alg = lc.LC(net, {"0.weight": q})
    alg.c_step(1e-3)
    s = 2.0 ** torch.randint(-9, -4, (24, 5)).float()
    zp = torch.randint(0, 4, (24, 5)).float()
    q.set_grid(s, torch.randint(0, 4, (24, 80)), -zp * s)
    r = export_onnx(alg, tmp_path / "m.onnx", (torch.randn(2, 80),), dynamic_shapes=({0: "batch"},))
    assert r["matmul_nbits"]["0.weight"]["zero_points"]
    zinit = initializers(tmp_path / "m.onnx")["0.zero_points"]
    assert zinit.data_type == onnx.TensorProto.UINT8 and list(zinit.dims) == [24, 2]
    assert np.array_equal(onnx.numpy_helper.to_array(zinit), by_hand(zp.to(torch.uint8).numpy(), 2))
    w = _identity_readout(tmp_path / "m.onnx", 80)
    assert torch.equal(w, q.decompress())


def test_codebook_and_low_rank_layers_stay_compact_beside_matmul_nbits(tmp_path):
    torch.manual_seed(0)
    sizes = [64, 48, 32, 10]
    net = mlp(sizes)
    alg = lc.LC(net, {"0.weight": lc.GroupedIntQuantization(4, 16), "2.weight": lc.AdaptiveQuantization(4),
                      "4.weight": lc.LowRank(2)})
    alg.c_step(1e-3)
    r = export_onnx(alg, tmp_path / "m.onnx", (torch.randn(2, 64),))
    assert list(r["matmul_nbits"]) == ["0.weight"]
    assert r["compact"] == {"2": "CodebookLinear", "4": "LowRankLinear"}
    inits = initializers(tmp_path / "m.onnx")
    assert inits["2.packed_codes"].data_type == onnx.TensorProto.UINT8 and "2.weight" not in inits
    x = torch.randn(2, 64)
    with torch.no_grad():
        ref = compact_of(alg, lambda: mlp(sizes), tmp_path)(x)
    assert close(ort_run(tmp_path / "m.onnx", x), ref)


def test_an_lcz_file_and_a_float16_model(tmp_path):
    """From a .lcz file and a skeleton; a float16 graph takes the float16 scales as they are (no Cast)."""
    torch.manual_seed(0)
    net = mlp([128, 64, 8]).half()
    alg = lc.LC(net, {"0.weight": lc.GroupedIntQuantization(4, 32), "2.weight": lc.GroupedIntQuantization(8, 64)})
    alg.c_step(1e-3)
    alg.export(tmp_path / "h.lcz")
    skeleton = mlp([128, 64, 8]).half()
    before = {k: v.clone() for k, v in skeleton.state_dict().items()}
    x = torch.randn(3, 128).half()
    export_onnx(tmp_path / "h.lcz", tmp_path / "h.onnx", (x,), model=skeleton)
    assert all(torch.equal(before[k], v) for k, v in skeleton.state_dict().items())  # the skeleton is not touched
    model = onnx.load(str(tmp_path / "h.onnx"))
    assert [n.op_type for n in model.graph.node].count("Cast") == 0
    with torch.no_grad():
        ref = lc.load(tmp_path / "h.lcz", mlp([128, 64, 8]).half(), compact=True)(x)
    assert close(ort_run(tmp_path / "h.onnx", x), ref, tol=5e-3)


def test_a_post_training_result(tmp_path):
    from lcompress.ptq import posttrain

    torch.manual_seed(0)
    sizes = [64, 32, 8]
    net = mlp(sizes)
    res = posttrain(net, {r"re:\d\.weight": lc.GroupedIntQuantization(4, 16)}, [torch.randn(16, 64)], solver="rtn",
                    progress=False)
    r = export_onnx(res, tmp_path / "m.onnx", (torch.randn(2, 64),), dynamic_shapes=({0: "batch"},))
    assert sorted(r["matmul_nbits"]) == ["0.weight", "2.weight"]
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = compact_of(res, lambda: mlp(sizes), tmp_path)(x)
        assert close(ref, net(x), tol=1e-6)  # (the result's model holds Δ(Θ))
    assert close(ort_run(tmp_path / "m.onnx", x), ref)


def test_matmul_nbits_linear_runs_in_pytorch_as_the_dense_layer():
    torch.manual_seed(0)
    lin = nn.Linear(100, 12)
    q = lc.GroupedIntQuantization(4, 32)
    d = q.compress(lin.weight.detach())
    with torch.no_grad():
        lin.weight.copy_(d)
    m = MatMulNBitsLinear.from_form(lin, matmul_nbits_form("w", q.config(), q.theta, (12, 100), torch.float32))
    assert torch.equal(m.dequantized_weight(), d)
    x = torch.randn(5, 100)
    assert torch.allclose(m(x), lin(x), atol=1e-6) and torch.allclose(m(x[0]), lin(x[0]), atol=1e-6)


# ---- bad input -------------------------------------------------------------------------------------------------
def _one_line_refusal(alg, tmp_path, x, *patterns, **kw):
    out = tmp_path / "bad.onnx"
    with pytest.raises(ONNXExportError) as e:
        export_onnx(alg, out, (x,), **kw)
    msg = str(e.value)
    assert "\n" not in msg
    for p in patterns:
        assert re.search(p, msg), msg
    assert os.listdir(tmp_path) == [], "nothing may be left behind"
    return msg


@pytest.mark.parametrize("comp,why", [
    (lc.GroupedIntQuantization(4, 48), r"power of two >= 16.*group=48"),
    (lc.GroupedIntQuantization(4, 8), r"power of two >= 16.*group=8"),
    (lc.GroupedIntQuantization(5, 32), r"2, 4, 8-bit weights, not 5-bit"),
    (lc.GroupedIntQuantization(3, 32), r"not 3-bit"),
    (lc.GroupedIntQuantization(4, 32, symmetric=False), r"offset .* row \d+, group \d+ is not -zp\*scale"),
    (lc.ConstraintL0Pruning(100), r"no ONNX form \(torch.export cannot trace a sparse CSR product\)"),
    (lc.ConstraintL0Pruning(3000), r"no ONNX form"),
], ids=["group48", "group8", "bits5", "bits3", "asymmetric", "sparse", "pruned-dense"])
def test_a_compression_with_no_exact_onnx_form_is_refused(comp, why, tmp_path):
    torch.manual_seed(0)
    net = mlp([96, 64, 8])
    alg = lc.LC(net, {"0.weight": comp})
    alg.c_step(1e-3)
    name = type(comp).__name__
    _one_line_refusal(alg, tmp_path, torch.randn(2, 96), r"^tensor 0\.weight: " + name,
                      why, "allow_float=True")


def test_allow_float_writes_the_layer_as_float(tmp_path):
    torch.manual_seed(0)
    net = mlp([96, 64, 8])
    alg = lc.LC(net, {"0.weight": lc.GroupedIntQuantization(5, 32), "2.weight": lc.GroupedIntQuantization(4, 32)})
    alg.c_step(1e-3)
    r = export_onnx(alg, tmp_path / "m.onnx", (torch.randn(2, 96),), allow_float=True, dynamic_shapes=({0: "b"},))
    assert r["float"] == ["0.weight"] and list(r["matmul_nbits"]) == ["2.weight"]
    assert initializers(tmp_path / "m.onnx")["0.weight"].data_type == onnx.TensorProto.FLOAT
    x = torch.randn(4, 96)
    with torch.no_grad():
        ref = compact_of(alg, lambda: mlp([96, 64, 8]), tmp_path)(x)
    assert close(ort_run(tmp_path / "m.onnx", x), ref)


def test_a_path_that_cannot_be_written_is_refused_naming_it(tmp_path):
    torch.manual_seed(0)
    net = mlp([32, 8])
    alg = lc.LC(net, {"0.weight": lc.GroupedIntQuantization(4, 16)})
    alg.c_step(1e-3)
    x = torch.randn(2, 32)
    for bad in (tmp_path / "missing" / "m.onnx", tmp_path):
        with pytest.raises(OSError, match=re.escape(str(bad))) as e:
            export_onnx(alg, bad, (x,))
        assert "\n" not in str(e.value)
    assert os.listdir(tmp_path) == []
    if os.geteuid() != 0:  # (root writes anywhere)
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OSError, match="cannot be written"):
            export_onnx(alg, ro / "m.onnx", (x,))
        assert os.listdir(ro) == []
    # an existing file is replaced whole
    target = tmp_path / "m.onnx"
    target.write_bytes(b"old")
    export_onnx(alg, target, (x,))
    assert target.read_bytes()[:3] != b"old" and sorted(os.listdir(tmp_path)) == sorted(
        ["m.onnx"] + (["ro"] if os.geteuid() != 0 else []))


# ---- the command line ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def grouped_run(tmp_path_factory):
    """An ``lcompress compress`` run of the synthetic MLP: fc1, fc2 as int4 in groups of 16, fc3 a codebook."""
    import synthetic as S
    from lcompress.cli import main

    root = tmp_path_factory.mktemp("onnxrun")
    S.write_module(root)
    with pytest.MonkeyPatch.context() as mp, S.cli_logging_restored():
        mp.syspath_prepend(str(root))
        ref = root / "reference.pt"
        S.train_reference(ref)
        tasks = [{"params": r"re:fc[12]\.weight", "compression": {"type": "GroupedIntQuantization", "bits": 4,
                                                                   "group": 16}},
                 {"params": "fc3.weight", "compression": {"type": "AdaptiveQuantization", "k": 2}}]
        cfg = S.write_config(root / "cfg.toml", S.base_config(ref, tasks=tasks))
        assert main(["compress", str(cfg), "--out", str(root / "run"), "-q"]) == 0
        yield root / "run", main


def test_cli_export_format_onnx(grouped_run, tmp_path, capsys):
    import synthetic as S

    run, main = grouped_run
    with S.cli_logging_restored():
        assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "-q"]) == 0
        printed = capsys.readouterr().out
        assert re.search(r"wrote .*m\.onnx: \d+ bytes \(2 MatMulNBits layers, 1 other compact layers", printed)
        x = torch.randn(5, S.DIM)
        with torch.no_grad():
            ref = lc.load(run / "model.lcz", get_model("mlp", sizes=S.SIZES), compact=True).eval()(x)
        assert close(ort_run(tmp_path / "m.onnx", x), ref)
        # no --out; a bad --input-shape: exit 2, one line, nothing written
        assert main(["export", str(run), "--format", "onnx", "-q"]) == 2
        assert "--format onnx needs --out" in capsys.readouterr().err
        assert main(["export", str(run), "--format", "onnx", "--out", str(tmp_path / "x.onnx"), "--input-shape",
                     "a,b", "-q"]) == 2
        assert "--input-shape" in capsys.readouterr().err and not (tmp_path / "x.onnx").exists()
