"""The compact layers' fast paths (issue 17, item 4): GroupedIntLinear, the decode caches, SparseLinear's products by
input rows, CodebookLinear's reused tile buffer, SumLinear. Each layer's output is checked against ``F.linear`` with
Δ(Θ) as the weight, Δ computed here from Θ by its formula (index arithmetic, not the library's expansion); resident
bytes against the tensors the module holds."""
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcompress as lc
from lcompress import nn as lnn
from lcompress.nn import (SPARSE_BAG_MIN_ROWS, CodebookLinear, GroupedIntLinear, SparseLinear, SumLinear,
                          resident_bytes, set_cache)

warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")

from lcompress.codecs import Codec  # noqa: E402
from lcompress.compressions.grouped import GroupedIntCodec  # noqa: E402

# lc.load(..., compact=True) builds GroupedIntLinear once GroupedIntCodec.compact_specs says so; that lands together
# with formats/onnx.py's support for the layer (its export looks for grouped-int weights in plain nn.Linear layers)
needs_grouped_specs = pytest.mark.skipif(
    GroupedIntCodec.compact_specs is Codec.compact_specs,
    reason="GroupedIntCodec.compact_specs (with formats/onnx.py's GroupedIntLinear support) not in yet")

# batch sizes on every path: one row (CSR mv), a few, and past SparseLinear's threshold
ROWS = [1, 3, SPARSE_BAG_MIN_ROWS + 1]


def delta_by_hand(theta, bits, group, symmetric, rows, cols):
    """Δ(Θ)[r, c] = s[r, c // group]·(u[r, c] − 2^(b−1)), or s[r, c // group]·u[r, c] + m[r, c // group]."""
    u = theta["codes"].reshape(rows, cols).double()
    gi = torch.arange(cols) // group
    s = theta["scales"].double()[:, gi]
    if symmetric:
        return s * (u - 2 ** (bits - 1))
    return s * u + theta["mins"].double()[:, gi]


def rel_err(y, ref):
    y, ref = y.detach().double(), ref.detach().double()
    return float((y - ref).abs().max()) / max(float(ref.abs().max()), 1e-30)


def grouped_layer(o, i, bits, group, symmetric=True, scale_dtype="float16", bias=True, seed=0, **kw):
    torch.manual_seed(seed)
    lin = nn.Linear(i, o, bias=bias)
    q = lc.GroupedIntQuantization(bits, group, symmetric=symmetric, scale_dtype=scale_dtype)
    q.compress(lin.weight.detach())
    return lin, q.theta, GroupedIntLinear.from_theta(lin, q.theta, bits, group, symmetric, **kw)


# (out, in, group): rows of whole bytes and groups of whole bytes (the shift path), a shorter last group, a group
# that is not whole bytes, a row that is not whole bytes, one group per row
SHAPES = [(8, 64, 16), (5, 40, 16), (6, 36, 12), (7, 30, 7), (3, 26, 26), (4, 24, 5)]


@pytest.mark.parametrize("bits", [2, 3, 4, 5, 8])
@pytest.mark.parametrize("o,i,group", SHAPES)
def test_grouped_int_linear_equals_the_dense_layer_with_delta(bits, o, i, group):
    for symmetric in (True, False):
        lin, th, m = grouped_layer(o, i, bits, group, symmetric, seed=bits * 100 + i)
        d = delta_by_hand(th, bits, group, symmetric, o, i)
        # the decoded weight is Δ exactly (float32 products of float16 scales and small integers)
        assert torch.equal(m.decoded_weight(), d.float())
        assert torch.equal(m.codes.reshape(-1), th["codes"].reshape(-1))
        for tile in (None, 1, 37, 10**6):
            m.tile_weights = tile
            for cache in ("none", "codes", "weight"):
                m.set_cache(cache)
                for rows in ROWS:
                    x = torch.randn(rows, i)
                    ref = F.linear(x.double(), d, lin.bias.detach().double())
                    assert rel_err(m(x), ref) < 2e-6, (symmetric, tile, cache, rows)
                m.set_cache("none")


@pytest.mark.parametrize("scale_dtype", ["float16", "bfloat16", "float32"])
def test_grouped_int_linear_scale_dtypes_and_input_shapes(scale_dtype):
    lin, th, m = grouped_layer(12, 48, 4, 32, scale_dtype=scale_dtype)  # a shorter last group of 16
    assert m.scales.dtype == getattr(torch, scale_dtype) and m.scales.dtype == th["scales"].dtype
    d = delta_by_hand(th, 4, 32, True, 12, 48)
    for shape in [(48,), (2, 3, 48), (0, 48)]:
        x = torch.randn(*shape)
        y = m(x)
        assert y.shape == (*shape[:-1], 12)
        if x.numel():
            assert rel_err(y, F.linear(x.double(), d, lin.bias.detach().double())) < 2e-6


def test_grouped_int_linear_dtype_follows_the_module_and_the_scales_keep_theirs():
    lin, th, m = grouped_layer(6, 32, 4, 16)
    d = delta_by_hand(th, 4, 16, True, 6, 32)
    m.double()
    assert m.dtype == torch.float64 and m.bias.dtype == torch.float64 and m.scales.dtype == torch.float16
    x = torch.randn(3, 32, dtype=torch.float64)
    assert rel_err(m(x), F.linear(x, d, lin.bias.detach().double())) < 1e-12
    assert m.decoded_weight().dtype == torch.float64
    m.half()
    assert m.dtype == torch.float16 and m.scales.dtype == torch.float16
    y = m(x.half())
    assert y.dtype == torch.float16
    assert rel_err(y, F.linear(x, d, lin.bias.detach().double())) < 5e-3
    with pytest.raises(RuntimeError):  # as an nn.Linear would: the input's dtype must be the layer's
        m(torch.randn(1, 32))


def test_grouped_int_linear_backward_gives_the_dense_input_gradient():
    lin, th, m = grouped_layer(10, 40, 3, 16)
    d = delta_by_hand(th, 3, 16, True, 10, 40).float()
    x = torch.randn(4, 40, requires_grad=True)
    m(x).square().sum().backward()
    g = x.grad.clone()
    x.grad = None
    F.linear(x, d, lin.bias).square().sum().backward()
    assert rel_err(g, x.grad) < 1e-5


def test_grouped_int_linear_resident_bytes_are_its_tensors():
    o, i, bits, group = 16, 100, 4, 32  # 4 groups a row, the last of 4 inputs
    lin, th, m = grouped_layer(o, i, bits, group)
    codes = math.ceil(o * i / 8) * bits  # whole groups of 8 codes, b bytes each
    expected = codes + o * 4 * 2 + o * 4  # packed codes, float16 scales, float32 bias
    assert resident_bytes(m) == expected
    assert resident_bytes(m, by_tensor=True) == {"bias": o * 4, "packed_codes": codes, "scales": o * 4 * 2}
    assert m.packed_codes.numel() == codes and m.packed_codes.dtype == torch.uint8
    m.set_cache("codes")
    assert resident_bytes(m) == expected + o * i and m.cached.dtype == torch.int8
    m.set_cache("weight")
    assert resident_bytes(m) == expected + o * i * 4
    assert resident_bytes(m) == sum(t.untyped_storage().nbytes() for t in list(m.parameters()) + list(m.buffers()))
    assert "cached" not in m.state_dict()  # a cache is never written
    m.set_cache("none")
    assert resident_bytes(m) == expected and m.cached is None
    _, _, asym = grouped_layer(o, i, bits, group, symmetric=False, bias=False)
    assert resident_bytes(asym) == codes + 2 * o * 4 * 2


def test_caches_follow_load_state_dict_and_to():
    lin, th, m = grouped_layer(8, 32, 4, 16, seed=1)
    _, th2, other = grouped_layer(8, 32, 4, 16, seed=2)
    for mode in ("codes", "weight"):
        m.set_cache(mode)
        m.load_state_dict(other.state_dict())
        x = torch.randn(2, 32)
        assert rel_err(m(x), F.linear(x.double(), delta_by_hand(th2, 4, 16, True, 8, 32),
                                      other.bias.detach().double())) < 2e-6, mode
        m.load_state_dict(grouped_layer(8, 32, 4, 16, seed=1)[2].state_dict())
    m.set_cache("weight").double()
    assert m.cached.dtype == torch.float64 and torch.equal(m.cached, m.decoded_weight())
    cb = CodebookLinear.from_codes(nn.Linear(16, 4), torch.tensor([-1.0, 0.5, 2.0]), torch.randint(0, 3, (4, 16)))
    cb.set_cache("weight")
    cb2 = CodebookLinear.from_codes(nn.Linear(16, 4), torch.tensor([0.0, 1.0, 3.0]), torch.randint(0, 3, (4, 16)))
    cb.load_state_dict(cb2.state_dict())
    assert torch.equal(cb.cached, cb2.decoded_weight())
    x = torch.randn(3, 16)
    assert torch.allclose(cb(x), cb2(x))


def test_set_cache_names_the_mode_and_the_layer():
    _, _, m = grouped_layer(4, 16, 4, 16)
    with pytest.raises(ValueError, match=r"cache='fast' must be one of \('none', 'codes', 'weight'\) for "
                                         "GroupedIntLinear"):
        m.set_cache("fast")
    cb = CodebookLinear.from_codes(nn.Linear(8, 4), torch.tensor([0.0, 1.0]), torch.randint(0, 2, (4, 8)))
    with pytest.raises(ValueError, match="cache='codes' must be one of .* for CodebookLinear"):
        cb.set_cache("codes")
    with pytest.raises(ValueError, match="mode='all' must be one of"):
        set_cache(nn.Sequential(cb), "all")


@needs_grouped_specs
def test_set_cache_switches_a_model_and_resident_bytes_count_it():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    alg = lc.LC(net, {"0.weight": lc.GroupedIntQuantization(4, 16), "2.weight": lc.AdaptiveQuantization(4),
                      "4.weight": lc.ConstraintL0Pruning(3)})
    data, _ = lc.export.to_bytes(alg)
    m = lc.load(data, nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)),
                compact=True).eval()
    assert [type(x).__name__ for x in m[::2]] == ["GroupedIntLinear", "CodebookLinear", "SparseLinear"]
    x = torch.randn(5, 32)
    y0, before = m(x), resident_bytes(m)
    assert set_cache(m, "weight") == {"0": "weight", "2": "weight"}
    assert resident_bytes(m) == before + (16 * 32 + 8 * 16) * 4
    assert torch.allclose(m(x), y0, atol=1e-6)
    assert set_cache(m, "codes") == {"0": "codes"}  # the codebook layer has no such cache, and keeps its own
    assert m[2].cache == "weight" and resident_bytes(m) == before + 16 * 32 + 8 * 16 * 4
    assert set_cache(m, "none") == {"0": "none", "2": "none"} and resident_bytes(m) == before


@needs_grouped_specs
def test_load_compact_builds_grouped_int_layers(tmp_path):
    torch.manual_seed(0)

    def make():
        return nn.Sequential(nn.Linear(40, 24), nn.ReLU(), nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 6))

    net = make()
    alg = lc.LC(net, {"0.weight": lc.GroupedIntQuantization(3, 16),  # a shorter last group of 8
                      "2.weight": lc.GroupedIntQuantization(4, 8, symmetric=False, scale_dtype="float32"),
                      "4.weight": lc.GroupedIntQuantization(2, 10) + lc.ConstraintL0Pruning(4)})
    alg.export(tmp_path / "g.lcz")
    m = lc.load(tmp_path / "g.lcz", make(), compact=True)
    assert isinstance(m[0], GroupedIntLinear) and (m[0].bits, m[0].group, m[0].symmetric) == (3, 16, True)
    assert isinstance(m[2], GroupedIntLinear) and not m[2].symmetric and m[2].scales.dtype == torch.float32
    assert isinstance(m[4], SumLinear)
    assert [type(p).__name__ for p in m[4].parts] == ["GroupedIntLinear", "SparseLinear"]
    x = torch.randn(7, 40)
    with alg.compressed():
        ref = net(x)
    assert rel_err(m(x), ref) < 1e-5
    for t in alg.tasks[:2]:  # Δ exactly for float16 scales; float32 scales round s·u + m in float32
        mod, c = m[int(t.param_names[0].split(".")[0])], t.compression
        want = delta_by_hand(c.theta, c.bits, c.group, c.symmetric, mod.out_features, mod.in_features)
        assert rel_err(mod.decoded_weight(), want) <= (0 if c.scale_dtype == "float16" else 1e-7)
    rows = {r["parameter"]: r for r in lc.export.compact_layers(tmp_path / "g.lcz")}
    assert rows["0.weight"]["layer"] == "GroupedIntLinear" and rows["0.weight"]["why"] == "3-bit codes in groups of 16"
    assert rows["2.weight"]["why"] == "4-bit codes in groups of 8, with offsets"
    assert rows["4.weight"]["layer"] == "SumLinear"
    # the same forms from the live compressions (task_specs, which passes each compression's config)
    specs = {}
    for t in alg.tasks:
        specs.update(lnn.task_specs(t.param_names, t.shapes, t.compression))
    fresh = make()
    fresh.load_state_dict(net.state_dict())
    assert lnn.compact_model(fresh, specs) == {"0": "GroupedIntLinear", "2": "GroupedIntLinear", "4": "SumLinear"}
    with alg.compressed():
        assert rel_err(fresh(x), ref) < 1e-5


def test_grouped_int_linear_refuses_theta_that_does_not_fit():
    lin = nn.Linear(20, 4)
    q = lc.GroupedIntQuantization(4, 8)
    q.compress(lin.weight.detach())
    th = q.theta
    with pytest.raises(ValueError, match=r"scales of shape \(4, 3\); a \(4, 20\) weight in groups of 4 needs \(4, 5\)"):
        GroupedIntLinear.from_theta(lin, th, 4, 4)
    with pytest.raises(ValueError, match="80 codes for a weight of shape"):
        GroupedIntLinear.from_theta(nn.Linear(21, 4), th, 4, 8)
    with pytest.raises(ValueError, match="symmetric=False needs mins of shape"):
        GroupedIntLinear.from_theta(lin, th, 4, 8, symmetric=False)
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 4\)"):
        GroupedIntLinear.from_theta(lin, th, 2, 8)
    with pytest.raises(ValueError, match="bits=9 must be an integer in"):
        GroupedIntLinear(8, 4, 9, 4)
    with pytest.raises(ValueError, match="group=0 must be a positive integer"):
        GroupedIntLinear(8, 4, 4, 0)
    with pytest.raises(ValueError, match="tile_weights=0 must be a positive integer or None"):
        GroupedIntLinear(8, 4, 4, 4, tile_weights=0)


@pytest.mark.parametrize("o,i,density", [(7, 13, 0.3), (64, 40, 0.05), (33, 20, 0.0), (50, 70, 0.12)])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_equals_the_dense_layer_on_every_product(o, i, density, bias):
    torch.manual_seed(o + i)
    lin = nn.Linear(i, o, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand(o, i) < density)
    sp = SparseLinear.from_dense(lin)
    w = lin.weight.detach().double()
    b = None if lin.bias is None else lin.bias.detach().double()
    for shape in [(i,), (1, i), (2, i), (SPARSE_BAG_MIN_ROWS - 1, i), (SPARSE_BAG_MIN_ROWS, i), (3, 50, i)]:
        x = torch.randn(*shape, requires_grad=True)
        y = sp(x)
        ref = F.linear(x.double(), w, b)
        assert y.shape == ref.shape and y.dtype == torch.float32
        assert float((y.double() - ref).abs().max()) <= 1e-5 * (1 + float(ref.abs().max()))
        y.square().sum().backward()  # the bag path's gradient flows to x too
        gx = x.grad.double()
        x.grad = None
        ref.square().sum().backward()
        assert float((gx - x.grad.double()).abs().max()) <= 1e-4 * (1 + float(x.grad.abs().max()))


def test_codebook_linear_tiles_with_a_reused_buffer_and_with_autograd():
    torch.manual_seed(0)
    lin = nn.Linear(30, 20)
    cb, codes = torch.tensor([-0.5, 0.1, 0.7, 1.3]), torch.randint(0, 4, (20, 30))
    m = CodebookLinear.from_codes(lin, cb, codes, tile_weights=64)  # tiles of 8 rows, the last of 4
    d = cb.double()[codes]
    x = torch.randn(5, 30, requires_grad=True)
    with torch.no_grad():  # the reused buffer
        assert rel_err(m(x), F.linear(x.double(), d, lin.bias.detach().double())) < 1e-6
    m(x).square().sum().backward()  # a fresh tensor per tile: autograd keeps every tile for the backward pass
    g = x.grad.clone()
    x.grad = None
    F.linear(x, d.float(), lin.bias).square().sum().backward()
    assert rel_err(g, x.grad) < 1e-5


def test_sum_linear_resident_bytes_are_its_parts():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(64, 32))
    alg = lc.LC(net, {"0.weight": lc.AdaptiveQuantization(4) + lc.ConstraintL0Pruning(20)})
    m = lc.load(lc.export.to_bytes(alg)[0], nn.Sequential(nn.Linear(64, 32)), compact=True)[0]
    assert isinstance(m, SumLinear)
    assert resident_bytes(m) == sum(resident_bytes(p) for p in m.parts) + 32 * 4
    assert resident_bytes(m.parts[0]) == 64 * 32 * 2 // 8 + 4 * 4  # 2-bit codes, 4 float32 entries
    assert resident_bytes(m.parts[1]) == 20 * (4 + 4) + 33 * 4  # values, int32 columns, int32 row pointers
    x = torch.randn(3, 64)
    with alg.compressed():
        assert rel_err(m(x), net(x)) < 1e-5
