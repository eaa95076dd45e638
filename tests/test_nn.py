"""Compact inference modules against their dense equivalents, model conversion, dead-neuron removal, ONNX."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcompress as lc
from lcompress.compressions.lowrank import from_matrix
from lcompress.nn import (
    CodebookConv2d,
    CodebookLinear,
    LowRankConv2d,
    LowRankLinear,
    SparseLinear,
    compact_model,
    remove_dead_neurons,
    task_specs,
)


def _close(a, b, tol=1e-5):
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max()) <= tol * max(1.0, float(b.abs().max()))


# ---- layers against dense references ----------------------------------------------------------------------------
@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_linear(bias):
    lin = nn.Linear(20, 12, bias=bias)
    a, b = torch.randn(12, 3), torch.randn(3, 20)
    m = LowRankLinear.from_factors(lin, a, b)
    x = torch.randn(2, 5, 20)
    assert m.rank == 3
    assert _close(m(x), F.linear(x, a @ b, lin.bias))


def test_lowrank_linear_rejects_wrong_factors():
    with pytest.raises(ValueError, match="do not give"):
        LowRankLinear.from_factors(nn.Linear(20, 12), torch.randn(11, 3), torch.randn(3, 20))


CONV_GEOMETRIES = [
    dict(kernel_size=3, stride=1, padding=1, dilation=1),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=1),
    dict(kernel_size=(5, 3), stride=(1, 3), padding=(0, 2), dilation=(2, 1)),
    dict(kernel_size=(3, 2), stride=2, padding=0, dilation=(1, 3)),
    dict(kernel_size=(3, 4), stride=1, padding="same", dilation=(2, 1)),
    dict(kernel_size=3, stride=1, padding="valid", dilation=1),
    dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=1, padding_mode="reflect"),
    dict(kernel_size=3, stride=2, padding=1, dilation=1, padding_mode="circular"),
]


@pytest.mark.parametrize("scheme", ["scheme_1", "scheme_2"])
@pytest.mark.parametrize("geom", CONV_GEOMETRIES, ids=lambda g: "-".join(f"{k}{v}" for k, v in g.items()))
@pytest.mark.parametrize("bias", [True, False])
def test_lowrank_conv_matches_dense_conv(scheme, geom, bias):
    conv = nn.Conv2d(4, 6, bias=bias, **geom)
    o, i, kh, kw = conv.weight.shape
    rows, cols = (o, i * kh * kw) if scheme == "scheme_1" else (o * kh, i * kw)
    a, b = torch.randn(rows, 3), torch.randn(3, cols)
    with torch.no_grad():
        conv.weight.copy_(from_matrix(a @ b, (o, i, kh, kw), scheme))
    m = LowRankConv2d.from_factors(conv, a, b, scheme)
    x = torch.randn(2, 4, 11, 13)
    assert m(x).shape == conv(x).shape
    assert _close(m(x), conv(x))


def test_lowrank_conv_needs_groups_1():
    with pytest.raises(ValueError, match="groups"):
        LowRankConv2d.from_factors(nn.Conv2d(4, 4, 3, groups=2), torch.randn(4, 1), torch.randn(1, 18))


def test_sparse_linear_matches_dense():
    lin = nn.Linear(50, 30)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.1)
        lin.weight[3].zero_()  # an empty row
    m = SparseLinear.from_dense(lin)
    assert m.nnz == int((lin.weight != 0).sum())
    assert m.col_indices.dtype == torch.int32
    for x in (torch.randn(50), torch.randn(7, 50), torch.randn(2, 3, 50)):
        assert _close(m(x), lin(x))


def test_sparse_linear_from_indices_validates():
    lin = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="strictly increasing"):
        SparseLinear.from_indices(lin, torch.tensor([3, 1]), torch.ones(2))
    with pytest.raises(ValueError, match="indices but"):
        SparseLinear.from_indices(lin, torch.tensor([1]), torch.ones(2))


def test_codebook_linear_and_memory():
    lin = nn.Linear(64, 32)
    cb = torch.tensor([-0.3, -0.1, 0.05, 0.2])
    codes = torch.randint(0, 4, (32, 64))
    m = CodebookLinear.from_codes(lin, cb, codes)
    assert m.packed_codes.dtype == torch.uint8 and m.codebook.dtype == torch.float32
    assert torch.equal(m.codes, codes.to(torch.uint8))
    assert "weight" not in dict(m.named_parameters())
    x = torch.randn(5, 64)
    assert _close(m(x), F.linear(x, cb[codes], lin.bias))
    weight_bytes = sum(b.numel() * b.element_size() for b in m.buffers())
    assert weight_bytes == 32 * 64 // 4 + 4 * 4  # 2-bit codes: a sixteenth of the dense float32 weight
    with pytest.raises(ValueError, match="codes must lie"):
        CodebookLinear.from_codes(lin, cb, torch.full((32, 64), 4))


@pytest.mark.parametrize("geom", CONV_GEOMETRIES[:4] + CONV_GEOMETRIES[6:], ids=str)
def test_codebook_conv_matches_dense(geom):
    conv = nn.Conv2d(4, 6, **geom)
    cb = torch.linspace(-1, 1, 7)
    codes = torch.randint(0, 7, conv.weight.shape)
    with torch.no_grad():
        conv.weight.copy_(cb[codes])
    m = CodebookConv2d.from_codes(conv, cb, codes)
    x = torch.randn(2, 4, 11, 13)
    assert _close(m(x), conv(x))


def test_codebook_conv_groups_and_same_padding():
    conv = nn.Conv2d(4, 8, (3, 2), padding="same", groups=2, padding_mode="reflect")
    cb = torch.tensor([-0.5, 0.5, 1.5])
    codes = torch.randint(0, 3, conv.weight.shape)
    with torch.no_grad():
        conv.weight.copy_(cb[codes])
    m = CodebookConv2d.from_codes(conv, cb, codes)
    x = torch.randn(1, 4, 9, 9)
    assert _close(m(x), conv(x))


# ---- task_specs and compact_model ---------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 8 * 8, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x):
        x = F.relu(self.conv(x)).flatten(1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


def test_task_specs_joint_quantization_shares_one_codebook():
    net = Net()
    alg = lc.LC(net, {("fc2.weight", "fc3.weight"): lc.AdaptiveQuantization(4)})
    t = alg.tasks[0]
    specs = task_specs(t.param_names, t.shapes, t.compression)
    assert specs["fc2.weight"]["codebook"] is specs["fc3.weight"]["codebook"]
    assert specs["fc3.weight"]["codes"].shape == (10, 32)
    d = alg.decompressed()
    for n in ("fc2.weight", "fc3.weight"):
        assert torch.equal(specs[n]["codebook"][specs[n]["codes"].long()], d[n])


def test_task_specs_joint_pruning_is_per_layer():
    net = Net()
    alg = lc.LC(net, {("fc1.weight", "fc2.weight", "fc3.weight"): lc.ConstraintL0Pruning(500)})
    t = alg.tasks[0]
    specs = task_specs(t.param_names, t.shapes, t.compression)
    d = alg.decompressed()
    assert sum(s["indices"].numel() for s in specs.values()) == 500
    for n, s in specs.items():
        dense = torch.zeros(d[n].numel())
        dense[s["indices"]] = s["values"]
        assert torch.equal(dense.view_as(d[n]), d[n])


def test_compact_model_every_kind_matches_compressed_outputs():
    torch.manual_seed(0)
    net = Net().eval()
    alg = lc.LC(net, {
        "conv.weight": lc.LowRank(3, conv_scheme="scheme_2"),
        "fc1.weight": lc.ConstraintL0Pruning(300),  # density < 1 %: sparse
        ("fc2.weight", "fc3.weight"): lc.AdaptiveQuantization(4),  # joint: one codebook
        "fc1.bias": lc.BinaryQuantization(),  # a bias in a task: stays a dense bias
    })
    x = torch.randn(3, 3, 8, 8)
    with alg.compressed():
        ref = net(x)
        specs = {}
        for t in alg.tasks:
            specs.update(task_specs(t.param_names, t.shapes, t.compression, t.conv_scheme))
        done = compact_model(net, specs)
    assert done == {"conv": "LowRankConv2d", "fc1": "SparseLinear", "fc2": "CodebookLinear", "fc3": "CodebookLinear"}
    assert net.fc2.codebook is net.fc3.codebook
    assert _close(net(x), ref)


def test_compact_model_keeps_dense_enough_layers_and_sums_of_them_dense():
    net = Net().eval()
    alg = lc.LC(net, {"fc1.weight": lc.ConstraintL0Pruning(5000),  # density 15 %: above the crossover
                      "fc2.weight": lc.AdaptiveQuantization(2) + lc.ConstraintL0Pruning(10),
                      "fc3.weight": lc.AdaptiveQuantization(2) + lc.ConstraintL0Pruning(fraction=0.5)})
    specs = {}
    for t in alg.tasks:
        specs.update(task_specs(t.param_names, t.shapes, t.compression))
    assert [p["kind"] for p in specs["fc2.weight"]["parts"]] == ["codebook", "sparse"]
    x = torch.randn(3, 3, 8, 8)
    with alg.compressed():
        ref = net(x)
    # fc3's sparse part is above the crossover, so its sum stays dense (one dense layer, not a dense part beside)
    assert compact_model(net, specs) == {"fc2": "SumLinear"}
    assert [type(p).__name__ for p in net.fc2.parts] == ["CodebookLinear", "SparseLinear"]
    assert type(net.fc1) is nn.Linear and type(net.fc3) is nn.Linear
    with alg.compressed():  # the dense layers hold Δ(Θ), as lc.load gives them
        assert _close(net(x), ref)
    assert compact_model(net, specs, sparse_density=0.6) == {"fc1": "SparseLinear", "fc3": "SumLinear"}
    with torch.no_grad():
        assert _close(net(x), ref)


def test_compact_model_replaces_a_reused_module_everywhere():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = self.a

        def forward(self, x):
            return self.b(self.a(x))

    net = Reuse()
    alg = lc.LC(net, {"a.weight": lc.AdaptiveQuantization(2)})
    x = torch.randn(2, 8)
    with alg.compressed():
        ref = net(x)
        t = alg.tasks[0]
        compact_model(net, task_specs(t.param_names, t.shapes, t.compression))
    assert isinstance(net.a, CodebookLinear) and net.b is net.a
    assert _close(net(x), ref)


def test_load_compact_from_file(tmp_path):
    torch.manual_seed(0)
    net = Net().eval()
    alg = lc.LC(net, {"conv.weight": lc.LowRank(2), "fc1.weight": lc.ConstraintL0Pruning(200, value_dtype="fp16"),
                      "fc2.weight": lc.TernaryQuantization(), "fc3.weight": lc.LowRank(2)})
    alg.export(tmp_path / "n.lcz")
    x = torch.randn(2, 3, 8, 8)
    with alg.compressed():
        ref = net(x)
    sk = Net().eval()
    lc.load(tmp_path / "n.lcz", sk, compact=True)
    assert [type(m).__name__ for m in (sk.conv, sk.fc1, sk.fc2, sk.fc3)] == [
        "LowRankConv2d", "SparseLinear", "CodebookLinear", "LowRankLinear"]
    assert _close(sk(x), ref)


# ---- dead neurons -----------------------------------------------------------------------------------------------
def _mlp(sizes, seed=0):
    torch.manual_seed(seed)
    return lc_models.get_model("mlp", sizes=sizes).eval()


import lcompress.models as lc_models  # noqa: E402


def _reference_sizes(ws):
    """Independent fixpoint on weight supports only: unit j of layer i survives iff its row and the next
    layer's column are nonzero (dead units with a bias are folded, so only the supports matter)."""
    alive = [torch.ones(w.shape[0], dtype=torch.bool) for w in ws]
    changed = True
    while changed:
        changed = False
        for i in range(len(ws) - 1):
            row = (ws[i][:, _in_mask(alive, i, ws)] != 0).any(1)
            col = (ws[i + 1][alive[i + 1]] != 0).any(0)
            new = alive[i] & row & col
            if not torch.equal(new, alive[i]):
                alive[i], changed = new, True
    return [int(a.sum()) for a in alive]


def _in_mask(alive, i, ws):
    return torch.ones(ws[0].shape[1], dtype=torch.bool) if i == 0 else alive[i - 1]


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_remove_dead_neurons_keeps_outputs(activation):
    net = lc_models.get_model("mlp", sizes=[30, 40, 20, 5], activation=activation).eval()
    with torch.no_grad():
        net.fc1.weight[:10] = 0  # dead units of layer 1; their bias (nonzero) is folded into fc2's bias
        net.fc1.bias[:5] = 0.7
        net.fc2.weight[:, 30:] = 0  # units 30..39 of layer 1 are unused
        net.fc2.weight[:4] = 0  # dead units of layer 2
        net.fc3.weight[:, 15:] = 0  # units 15..19 of layer 2 unused
        net.fc1.weight[:, :7] = 0  # 7 inputs unused
    ws = [net.fc1.weight.detach().clone(), net.fc2.weight.detach().clone(), net.fc3.weight.detach().clone()]
    x = torch.randn(6, 30)
    ref = net(x)
    f = F.relu if activation == "relu" else torch.tanh
    rep = remove_dead_neurons(net, ["fc1", "fc2", "fc3"], activation=f)
    assert rep["sizes_before"] == [30, 40, 20, 5]
    assert rep["sizes_after"] == [30, *_reference_sizes(ws)] == [30, 20, 11, 5]
    assert rep["inputs_used"] == 23
    assert (net.fc1.out_features, net.fc2.in_features, net.fc2.out_features) == (20, 20, 11)
    assert _close(net(x), ref, 1e-6)


def test_remove_dead_neurons_cascades_and_creates_bias():
    net = lc_models.get_model("mlp", sizes=[6, 4, 3, 2]).eval()
    with torch.no_grad():
        net.fc1.weight[0] = 0
        net.fc1.bias[0] = 2.0
        net.fc2.weight.zero_()
        net.fc2.weight[0, 0] = 1.5  # unit 0 of layer 2 only reads the dead unit 0 of layer 1
        net.fc2.bias.zero_()
    net.fc3.bias = None
    x = torch.randn(4, 6)
    ref = net(x)
    rep = remove_dead_neurons(net, ["fc1", "fc2", "fc3"])
    # everything folds into a constant: fc3's bias is created
    assert rep["sizes_after"] == [6, 0, 0, 2]
    assert net.fc3.bias is not None
    assert _close(net(x), ref, 1e-6)


def test_remove_dead_neurons_validates():
    net = _mlp([6, 4, 2])
    with pytest.raises(ValueError, match="at least two"):
        remove_dead_neurons(net, ["fc1"])
    with pytest.raises(ValueError, match="no module named 'fc9'"):
        remove_dead_neurons(net, ["fc1", "fc9"])
    with pytest.raises(ValueError, match="outputs but"):
        remove_dead_neurons(net, ["fc2", "fc1"])


def test_remove_dead_neurons_on_pruned_lenet300():
    net = lc_models.get_model("lenet300").eval()
    alg = lc.LC(net, {("fc1.weight", "fc2.weight", "fc3.weight"): lc.ConstraintL0Pruning(5000)})
    x = torch.randn(8, 784)
    with alg.compressed():
        ref = net(x)
        rep = remove_dead_neurons(net, ["fc1", "fc2", "fc3"])
        assert _close(net(x), ref, 1e-6)
    assert rep["sizes_after"][1] < 300 and rep["sizes_after"][2] <= 100


# ---- ONNX -------------------------------------------------------------------------------------------------------
def test_onnx_export_of_compact_model_runs_in_onnxruntime(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    torch.manual_seed(0)
    net = Net().eval()
    alg = lc.LC(net, {"conv.weight": lc.LowRank(2, conv_scheme="scheme_2"), "fc1.weight": lc.LowRank(4),
                      "fc2.weight": lc.BinaryQuantization(), "fc3.weight": lc.PowersOfTwoQuantization(2)})
    alg.export(tmp_path / "n.lcz")
    sk = lc.load(tmp_path / "n.lcz", Net().eval(), compact=True)
    x = torch.randn(2, 3, 8, 8)
    # optimize=False keeps the packed uint8 codes as initializers instead of folding them into float weights
    torch.onnx.export(sk, (x,), str(tmp_path / "n.onnx"), dynamo=True, optimize=False)
    inits = {i.name: i.data_type for i in onnx.load(str(tmp_path / "n.onnx")).graph.initializer}
    assert inits["fc2.packed_codes"] == onnx.TensorProto.UINT8
    sess = ort.InferenceSession(str(tmp_path / "n.onnx"))
    y = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    assert _close(torch.from_numpy(y), sk(x))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16, torch.bfloat16])
def test_compact_modules_keep_the_layer_dtype(dtype):
    lin = nn.Linear(16, 8).to(dtype)
    conv = nn.Conv2d(2, 4, 3).to(dtype)
    mods = [
        LowRankLinear.from_factors(lin, torch.randn(8, 2), torch.randn(2, 16)),
        SparseLinear.from_indices(lin, torch.tensor([0, 5, 100]), torch.randn(3)),
        CodebookLinear.from_codes(lin, torch.tensor([-1.0, 1.0]), torch.randint(0, 2, (8, 16))),
        LowRankConv2d.from_factors(conv, torch.randn(4, 2), torch.randn(2, 18)),
        CodebookConv2d.from_codes(conv, torch.tensor([-1.0, 1.0]), torch.randint(0, 2, (4, 2, 3, 3))),
    ]
    for m in filter(None, mods):
        x = torch.randn(2, 2, 5, 5, dtype=dtype) if "Conv" in type(m).__name__ else torch.randn(3, 16, dtype=dtype)
        assert m(x).dtype == dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_sparse_linear_in_half_precision_on_cpu(dtype, bias):
    """CPU CSR products have no half-precision kernels; the layer multiplies in float32 and rounds once, so it
    matches the exact product of its half-precision weights, rounded to the dtype (a float64 dense reference)."""
    torch.manual_seed(0)
    lin = nn.Linear(64, 24, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.rand_like(lin.weight) < 0.1)
    half = lin.to(dtype)
    m = SparseLinear.from_dense(half)
    assert m.values.dtype == dtype and m.nnz == int((half.weight != 0).sum())
    x = torch.randn(2, 5, 64).to(dtype)
    y = m(x)
    ref = x.double() @ half.weight.double().t() + (half.bias.double() if bias else 0)
    assert y.dtype == dtype and y.shape == (2, 5, 24)
    # one rounding of a float32 accumulation: within an ulp of the exact value
    eps = torch.finfo(dtype).eps
    assert float((y.double() - ref).abs().max()) <= eps * (1 + float(ref.abs().max()))
    if bias:  # gradients reach the half-precision bias through the cast
        y.float().sum().backward()
        assert m.bias.grad.dtype == dtype and torch.equal(m.bias.grad, torch.full((24,), 10.0, dtype=dtype))


def test_half_precision_pruned_model_loads_compact_and_runs(tmp_path):
    def net(dtype):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).to(dtype)

    for dtype in (torch.float16, torch.bfloat16):
        model = net(dtype)
        alg = lc.LC(model, {"0.weight": lc.ConstraintL0Pruning(fraction=0.05)})
        alg.export(tmp_path / "h.lcz")
        sk = lc.load(tmp_path / "h.lcz", net(dtype), compact=True)
        assert isinstance(sk[0], SparseLinear) and sk[0].values.dtype == dtype
        x = torch.randn(4, 64).to(dtype)
        with alg.compressed():
            want = model(x)
        got = sk(x)
        assert got.dtype == dtype
        # the dense half layer rounds its own way; both are within a few ulps of the exact product
        assert float((got.float() - want.float()).abs().max()) <= 4 * torch.finfo(dtype).eps * float(want.abs().max())


@pytest.mark.parametrize("case", ["crossover", "below", "joint_conv_sum", "lowrank_too_big"])
def test_compact_layers_says_what_load_compact_builds(case, tmp_path):
    # `lcompress inspect` lists, per weight, the layer lc.load(..., compact=True) builds; checked here against the
    # modules the load really builds, on each side of the sparse/dense crossover (density 0.1) and for the forms
    # that stay dense
    from lcompress.export import compact_layers
    from lcompress.nn import SPARSE_CROSSOVER_DENSITY

    assert SPARSE_CROSSOVER_DENSITY == 0.1
    torch.manual_seed(0)
    n1 = 8 * 8 * 8 * 64  # fc1's weights
    tasks = {
        "crossover": {"fc1.weight": lc.ConstraintL0Pruning(fraction=0.1)},  # 3277 of 32768: density 0.10001
        "below": {"fc1.weight": lc.ConstraintL0Pruning(int(0.1 * n1) - 1), "fc2.weight": lc.AdaptiveQuantization(3)},
        "joint_conv_sum": {("conv.weight", "fc2.weight"): lc.ConstraintL0Pruning(60),
                           "fc3.weight": lc.AdaptiveQuantization(2) + lc.ConstraintL0Pruning(5)},
        "lowrank_too_big": {"fc3.weight": lc.LowRank(10), "conv.weight": lc.LowRank(2)},
    }[case]
    net = Net().eval()
    alg = lc.LC(net, tasks)
    alg.export(tmp_path / "n.lcz")
    sk = Net().eval()
    lc.load(tmp_path / "n.lcz", sk, compact=True)
    rows = {r["parameter"]: r for r in compact_layers(tmp_path / "n.lcz")}
    assert set(rows) == {p for t in alg.tasks for p in t.param_names}
    for p, r in rows.items():
        built = type(getattr(sk, p.split(".")[0])).__name__
        assert r["layer"] == (built if built not in ("Linear", "Conv2d") else "dense"), (p, r, built)
    if case == "crossover":  # the user's case: pruned to 10% and back as a plain nn.Linear; the row says why
        assert rows["fc1.weight"]["layer"] == "dense" and type(sk.fc1) is nn.Linear
        assert "not below the sparse/dense crossover 0.1" in rows["fc1.weight"]["why"]
        assert "density 0.1" in rows["fc1.weight"]["why"]
    if case == "below":
        assert type(sk.fc1) is SparseLinear and rows["fc1.weight"]["why"] == f"density {3275 / n1:.4g} < 0.1"
        assert rows["fc2.weight"]["why"] == "3-entry codebook, 2-bit codes"
    if case == "joint_conv_sum":
        assert rows["conv.weight"]["layer"] == "dense" and "only for nn.Linear" in rows["conv.weight"]["why"]
        assert rows["fc3.weight"]["layer"] == "SumLinear"
        assert rows["fc3.weight"]["why"] == "a sum: CodebookLinear + SparseLinear"
    if case == "lowrank_too_big":
        assert rows["fc3.weight"]["why"] == "rank 10: the factors' 420 weights are not fewer than the layer's 320"
        assert rows["conv.weight"]["layer"] == "LowRankConv2d"
