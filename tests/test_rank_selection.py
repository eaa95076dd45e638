"""RankSelection: the exact minimiser over every rank and the dense matrix, and the dense choice through Θ, sizes,
state, the .lcz file and compact loading."""
import math

import pytest
import torch
from torch import nn

import lcompress as lc
from lcompress import export
from lcompress import functional as F
from lcompress.nn import LowRankConv2d, LowRankLinear


def spectrum_matrix(m, n, s, seed=0):
    """An m×n float32 matrix with singular values ``s`` (random orthonormal singular vectors)."""
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(m, len(s), generator=g, dtype=torch.float64))
    v, _ = torch.linalg.qr(torch.randn(n, len(s), generator=g, dtype=torch.float64))
    return (u * torch.tensor(s, dtype=torch.float64)) @ v.T


def brute_force(w, alpha, mu, per_param, max_rank=None):
    """min over every rank r ≤ R and the dense matrix of α·C + μ/2‖w − Δ‖², from a float64 SVD of w."""
    m, n = w.shape
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    top = min(m, n) if max_rank is None else min(max_rank, m, n)
    objs = {}
    for r in range(top + 1):
        wr = (u[:, :r] * s[:r]) @ vh[:r]
        objs[r] = alpha * r * (m + n) * per_param + mu / 2 * float(((w.double() - wr) ** 2).sum())
    objs["dense"] = alpha * m * n * per_param
    return objs


def objective(c, w, out, alpha, mu, per_param):
    """α·C(Θ) + μ/2‖w − Δ(Θ)‖² of what the C step returned, C read off Θ's stored tensors."""
    cost = sum(t.numel() for t in c.theta.values()) * per_param
    return alpha * cost + mu / 2 * float(((w.double() - out.double()) ** 2).sum())


SPECTRA = {
    "gauss": None,
    "flat": lambda k: [3.0] * k,
    "decay": lambda k: [4.0 * 0.5 ** i for i in range(k)],
    "two_levels": lambda k: [5.0] * (k // 2) + [0.3] * (k - k // 2),
}


@pytest.mark.parametrize("shape", [(6, 4), (5, 5), (3, 8), (9, 7)])
@pytest.mark.parametrize("spectrum", list(SPECTRA))
@pytest.mark.parametrize("criterion, positions", [("storage", None), ("flops", 1), ("flops", 9)])
def test_matches_brute_force_over_every_rank_and_dense(shape, spectrum, criterion, positions):
    m, n = shape
    if SPECTRA[spectrum] is None:
        w = torch.randn(m, n, generator=torch.Generator().manual_seed(m * n))
    else:
        w = spectrum_matrix(m, n, SPECTRA[spectrum](min(m, n)), seed=m + n).float()
    per_param = positions or 1
    for alpha, mu in [(1e-3, 1.0), (3e-2, 1.0), (0.2, 5.0), (1e-2, 100.0), (1.0, 0.01)]:
        for max_rank in (None, 1):
            c = lc.RankSelection(alpha, criterion=criterion, positions=positions, max_rank=max_rank)
            out = c.compress(w, mu)
            objs = brute_force(w, alpha, mu, per_param, max_rank)
            best = min(objs.values())
            got = objective(c, w, out, alpha, mu, per_param)
            assert got <= best * (1 + 1e-5) + 1e-9, (alpha, mu, max_rank, got, objs)
            if c.keeps_dense:
                assert torch.equal(out, w) and objs["dense"] == pytest.approx(best, rel=1e-5)
            else:
                assert c.theta["A"].shape[1] <= (min(m, n) if max_rank is None else max_rank)


def test_flat_spectrum_40x25_is_kept_dense():
    w = spectrum_matrix(40, 25, [7.0] * 25).float()
    for criterion, positions in [("storage", None), ("flops", 16)]:
        c = lc.RankSelection(1e-3, criterion=criterion, positions=positions)
        out = c.compress(w, 1.0)
        assert c.keeps_dense and torch.equal(out, w)
        p = positions or 1
        assert objective(c, w, out, 1e-3, 1.0, p) == pytest.approx(1e-3 * 1000 * p)
        # the best factorization (rank ≤ 15, the largest with 65 r < 1000) costs over 200
        assert min(v for r, v in brute_force(w, 1e-3, 1.0, p, c.rank_limit((40, 25))).items() if r != "dense") > 200
        assert c.count_params() == 1000 and c.count_bits() == 1000 * 32 and c.selected_rank == 25
    # a steep spectrum still gets its low rank
    steep = spectrum_matrix(40, 25, [7.0, 5.0] + [1e-3] * 23).float()
    c = lc.RankSelection(1e-3)
    c.compress(steep, 1.0)
    assert not c.keeps_dense and c.selected_rank == 2 and c.count_bits() == 2 * 65 * 32


def test_mu_to_zero_gives_rank_zero_and_ties_prefer_factors():
    w = spectrum_matrix(6, 4, [2.0, 1.0, 0.5, 0.1]).float()
    c = lc.RankSelection(1e-3)
    assert float(c.compress(w, 0.0).abs().max()) == 0.0 and c.selected_rank == 0
    full = lc.RankSelection(0.0, max_rank=4)  # α = 0: full rank and dense both cost 0; the factors are kept
    full.compress(w, 1.0)
    assert not full.keeps_dense and full.selected_rank == 4


def test_rank_select_function_brute_force():
    g = torch.Generator().manual_seed(3)
    for trial in range(30):
        k = 1 + trial % 7
        s = torch.sort(torch.rand(k, generator=g) * 3, descending=True).values
        alpha, mu = float(torch.rand((), generator=g)) * 0.5, float(torch.rand((), generator=g)) * 4 + 0.01
        c, dense = 3.0 + trial % 5, (3.0 + trial % 5) * k * 0.6
        top = trial % (k + 1)
        r = F.rank_select(s, alpha, mu, c, max_rank=top, dense_cost=dense)
        objs = {q: alpha * c * q + 0.5 * mu * float((s[q:].double() ** 2).sum()) for q in range(top + 1)}
        objs[None] = alpha * dense
        assert objs[r] == pytest.approx(min(objs.values()), rel=1e-9, abs=1e-12)
    # float32 squares would overflow: the sums are float64
    big = torch.tensor([3e19, 2e19], dtype=torch.float32)
    assert F.rank_select(big, 1.0, 1.0, 10.0, dense_cost=15.0) is None
    assert F.rank_select(big, 1.0, 1.0, 10.0, max_rank=1) == 1 and F.rank_select(big, 1.0, 1.0, 10.0) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_dense_choice_keeps_the_input_dtype_and_counts_its_bits(dtype):
    w = spectrum_matrix(12, 10, [2.0] * 10).to(dtype)
    c = lc.RankSelection(1e-3)
    out = c.compress(w, 1.0)
    assert c.keeps_dense and out.dtype == dtype and torch.equal(out, w)
    assert c.theta["dense"].dtype == dtype and c.count_bits() == 120 * torch.finfo(dtype).bits


def test_state_round_trip_of_the_dense_choice():
    w = spectrum_matrix(12, 10, [2.0] * 10).float()
    c = lc.RankSelection(1e-3)
    c.compress(w, 1.0)
    fresh = lc.RankSelection(1e-3)
    fresh.load_state_dict(c.state_dict())
    assert fresh.keeps_dense and torch.equal(fresh.decompress(), w)
    assert fresh.count_bits() == c.count_bits() == 120 * 32


# ---- through LC, the file and compact loading --------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1 = nn.Linear(8 * 4 * 4, 25)
        self.fc2 = nn.Linear(25, 40)
        self.fc3 = nn.Linear(40, 10)

    def forward(self, x):
        x = torch.max_pool2d(torch.relu(self.conv(x)), 2)
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def _net(dtype=torch.float32):
    torch.manual_seed(0)
    net = Net().eval()
    with torch.no_grad():
        net.conv.weight.copy_(spectrum_matrix(8, 27, [2.0] * 8, seed=1).reshape(8, 3, 3, 3))  # flat: dense
        net.fc1.weight.copy_(spectrum_matrix(25, 128, [1.0, 0.8] + [1e-4] * 23, seed=2))  # rank 2
        net.fc2.weight.copy_(spectrum_matrix(40, 25, [0.7] * 25, seed=3))  # flat: dense
    return net.to(dtype)


TASKS = lambda: {  # noqa: E731
    "conv.weight": lc.RankSelection(1e-4, criterion="flops", positions=64),
    "fc1.weight": lc.RankSelection(1e-4),
    "fc2.weight": lc.RankSelection(1e-4),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_export_and_compact_load_of_dense_and_low_rank_choices(tmp_path, dtype):
    net = _net(dtype)
    alg = lc.LC(net, TASKS(), direct_mu=1.0)
    conv, fc1, fc2 = (t.compression for t in alg.tasks)
    assert conv.keeps_dense and fc2.keeps_dense and not fc1.keeps_dense and fc1.selected_rank == 2
    bits = dict(zip((t.name for t in alg.tasks), (t.compression.count_bits() for t in alg.tasks)))
    fbits = torch.finfo(dtype).bits
    assert bits == {"conv.weight": 8 * 27 * fbits, "fc1.weight": 2 * (25 + 128) * 32, "fc2.weight": 40 * 25 * fbits}

    path = tmp_path / "m.lcz"
    alg.export(path)
    got = export.read(path)
    for t in got["header"]["tasks"]:
        assert t["bits"] == bits[t["name"]]  # bits written = bits counted
        assert t["bytes"] * 8 == t["bits"]  # whole-byte tensors: no padding
        assert set(t["theta"]) == ({"kind", "dense"} if t["name"] != "fc1.weight" else {"kind", "A", "B"})
    assert alg.size_report()["compressed_bits"] >= sum(bits.values())
    with alg.compressed():
        for name in ("conv.weight", "fc1.weight", "fc2.weight"):
            assert torch.equal(got["state"][name], net.get_parameter(name).detach())
        x = torch.randn(2, 3, 8, 8).to(dtype)
        ref = net(x) if dtype == torch.float32 else None
    # the dense choices are the weights themselves, bit for bit
    assert torch.equal(got["state"]["conv.weight"], net.conv.weight.detach())
    assert torch.equal(got["state"]["fc2.weight"], net.fc2.weight.detach())

    sk = Net().to(dtype).eval()
    lc.load(path, sk, compact=True)
    assert type(sk.conv) is nn.Conv2d and type(sk.fc2) is nn.Linear and isinstance(sk.fc1, LowRankLinear)
    assert torch.equal(sk.conv.weight, net.conv.weight) and torch.equal(sk.fc2.weight, net.fc2.weight)
    if ref is not None:
        assert torch.allclose(sk(x), ref, atol=1e-5, rtol=1e-4)


def test_lc_state_round_trip_with_a_dense_choice():
    net = _net()
    alg = lc.LC(net, TASKS(), direct_mu=1.0)
    state = alg.state_dict()
    again = lc.LC(_net(), TASKS())
    again.load_state_dict(state)
    for a, b in zip(alg.tasks, again.tasks):
        assert a.compression.keeps_dense == b.compression.keeps_dense
        assert torch.equal(a.compression.decompress(), b.compression.decompress())
        assert a.compression.count_bits() == b.compression.count_bits()


def test_low_rank_conv_choice_still_compacts():
    net = _net()
    with torch.no_grad():
        net.conv.weight.copy_(spectrum_matrix(8, 27, [1.0] + [1e-4] * 7, seed=4).reshape(8, 3, 3, 3))
    alg = lc.LC(net, TASKS(), direct_mu=1.0)
    assert alg.tasks[0].compression.selected_rank == 1 and not alg.tasks[0].compression.keeps_dense
    sk = Net().eval()
    lc.load(export.to_bytes(alg)[0], sk, compact=True)
    assert isinstance(sk.conv, LowRankConv2d) and type(sk.fc2) is nn.Linear
    x = torch.randn(2, 3, 8, 8)
    with alg.compressed():
        ref = net(x)
    assert torch.allclose(sk(x), ref, atol=1e-5, rtol=1e-4)
    assert math.isclose(alg.tasks[0].compression.count_bits(), (8 + 27) * 32)
