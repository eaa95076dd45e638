"""Pruning with a small codebook for the surviving values (``value_codebook=K``) against independent references."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcompress as lc
from lcompress.functional import kmeans_1d_exact, sparse_codebook


def objective(x, S, codes, codebook, cost=0.0):
    """Σ_{i∉S} xᵢ² + Σ_{i∈S} (xᵢ − c[aᵢ])² + cost·|S|, in float64."""
    x = x.double()
    theta = torch.zeros_like(x)
    theta[S] = codebook.double()[codes.long()]
    return float(((x - theta) ** 2).sum()) + cost * S.numel()


def brute_force(x, k, kappa, cost):
    """Every support of size ≤ κ, every assignment of its values to k groups (each group at its mean)."""
    x = x.tolist()
    n = len(x)
    best = sum(v * v for v in x)  # empty support
    for r in range(1, (n if kappa is None else kappa) + 1):
        for S in itertools.combinations(range(n), r):
            rest = sum(x[i] ** 2 for i in range(n) if i not in S) + cost * r
            for assign in itertools.product(range(k), repeat=r):
                tot = rest
                for j in range(k):
                    g = [x[i] for i, a in zip(S, assign) if a == j]
                    if g:
                        m = sum(g) / len(g)
                        tot += sum((v - m) ** 2 for v in g)
                best = min(best, tot)
    return best


def test_against_brute_force_on_tiny_inputs():
    """Global optimum: equal to the best of every support and every grouping, ties and zeros included."""
    cases = 0
    for seed in range(60):
        g = torch.Generator().manual_seed(seed)
        n = 1 + seed % 7
        x = torch.randn(n, generator=g)
        if seed % 5 == 0:
            x = torch.round(x * 2) / 2  # ties and exact zeros
        if seed % 11 == 0:
            x[:] = 0.7
        for k, kappa, cost in [(1, min(2, n), 0.0), (2, min(3, n), 0.0), (3, n, 0.0), (2, 0, 0.0),
                               (2, None, 0.5), (3, None, 0.0)]:
            S, codes, cb = sparse_codebook(x, k, kappa=kappa, cost=cost)
            assert cb.numel() == k and codes.numel() == S.numel()
            assert kappa is None or S.numel() <= kappa
            assert torch.equal(S, torch.unique(S))  # sorted, no repeats
            ours, best = objective(x, S, codes, cb, cost), brute_force(x, k, kappa, cost)
            assert ours == pytest.approx(best, rel=1e-9, abs=1e-12), (seed, k, kappa, cost, x.tolist())
            cases += 1
    assert cases == 360


@pytest.mark.parametrize("kappa,cost", [(30, 0.0), (None, 0.3)])
def test_fixed_point_conditions(kappa, cost):
    """At the returned solution each block is optimal given the others: the support is the best one for the
    codebook (checked by sorting the gains), the codes are nearest entries, and each entry is its group's mean."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(300, generator=g).pow(3)
    S, codes, cb = sparse_codebook(x, 4, kappa=kappa, cost=cost)
    xd, cd = x.double(), cb.double()
    # support: best for this codebook, from an independent sort of every weight's gain
    err = ((xd[:, None] - cd[None, :]) ** 2).min(1).values
    gain = torch.sort(xd * xd - err - cost, descending=True).values
    keep = gain[gain > 0] if kappa is None else gain[:kappa][gain[:kappa] > 0]
    best_for_cb = float((xd * xd).sum()) - float(keep.sum())
    assert objective(x, S, codes, cb, cost) == pytest.approx(best_for_cb, rel=1e-6)
    # codes: nearest entry; entries: their group's mean
    xs = xd[S]
    assert torch.allclose(((xs - cd[codes.long()]) ** 2), ((xs[:, None] - cd[None, :]) ** 2).min(1).values, atol=1e-9)
    for j in range(cb.numel()):
        grp = xs[codes.long() == j]
        if grp.numel():
            assert float(cd[j]) == pytest.approx(float(grp.mean()), rel=1e-5, abs=1e-7)


def test_never_worse_than_top_kappa_then_exact_kmeans():
    for seed in range(5):
        x = torch.randn(2000, generator=torch.Generator().manual_seed(seed)) ** 3
        S0 = torch.topk(x.abs(), 100).indices
        c0, a0 = kmeans_1d_exact(x[S0], 4)
        base = objective(x, S0, a0, c0)
        S, codes, cb = sparse_codebook(x, 4, kappa=100)
        assert objective(x, S, codes, cb) <= base * (1 + 1e-6)


def test_large_input_matches_an_independent_dp_over_the_zero_block():
    """n = 300 (too many for brute force): against a plain O(n²K) dynamic program written here from scratch, over
    every zero block [l, r) of the sorted values and every split of the K groups between the two sides."""
    x = torch.randn(300, generator=torch.Generator().manual_seed(9)) ** 3
    k, kappa = 3, 40
    S, codes, cb = sparse_codebook(x, k, kappa=kappa)
    xs = sorted(x.double().tolist())
    n = len(xs)

    def kmeans_costs(vals, kmax):
        """cost[j][i]: best j-group SSE of vals[:i] (O(i² kmax) DP)."""
        import itertools as it
        pre1 = [0.0] + list(it.accumulate(vals))
        pre2 = [0.0] + list(it.accumulate(v * v for v in vals))
        sse = lambda a, b: pre2[b] - pre2[a] - (pre1[b] - pre1[a]) ** 2 / (b - a)
        inf = float("inf")
        cost = [[0.0] + [inf] * len(vals)] + [[inf] * (len(vals) + 1) for _ in range(kmax)]
        for j in range(1, kmax + 1):
            for i in range(j, len(vals) + 1):
                cost[j][i] = min(cost[j - 1][m] + sse(m, i) for m in range(j - 1, i))
        return [[min(cost[t][i] for t in range(j + 1)) for i in range(len(vals) + 1)] for j in range(kmax + 1)]

    left = kmeans_costs(xs[:kappa], k)
    right = kmeans_costs([-v for v in reversed(xs[-kappa:])], k)
    total = sum(v * v for v in xs)
    best = float("inf")
    for l in range(kappa + 1):
        for m in range(kappa + 1 - l):
            zero = total - sum(v * v for v in xs[:l]) - sum(v * v for v in xs[n - m :])
            for k1 in range(k + 1):
                best = min(best, zero + left[k1][l] + right[k - k1][m])
    assert objective(x, S, codes, cb) == pytest.approx(best, rel=1e-9)


def test_compression_classes_store_codes_and_count_bits():
    w = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p = lc.ConstraintL0Pruning(kappa=50, value_codebook=5)
    out = p.compress(w)
    th = p.theta
    assert int((out != 0).sum()) <= 50 and torch.unique(out[out != 0]).numel() <= 5
    assert torch.equal(th["values"], th["codebook"][th["codes"].long()])
    nnz = th["indices"].numel()
    assert p.count_bits() == nnz * 3 + 5 * 32 + lc.sizes.support_bits(th["indices"], 1000)[1]
    assert p.count_params() == nnz + 5
    # penalty form: kept exactly when the gain beats 2α/μ; μ → 0⁺ prunes everything
    q = lc.PenaltyL0Pruning(alpha=0.05, value_codebook=2)
    assert int((q.compress(w, 0.0) != 0).sum()) == 0
    out = q.compress(w, 1.0)
    cb = q.theta["codebook"]
    gain = w * w - ((w[:, None] - cb[None, :]) ** 2).min(1).values
    assert torch.equal(out != 0, gain > 0.1)


def test_bad_arguments_name_the_parameter():
    with pytest.raises(ValueError, match="value_codebook=0"):
        lc.ConstraintL0Pruning(kappa=3, value_codebook=0)
    with pytest.raises(ValueError, match="value_codebook=300"):
        lc.ConstraintL0Pruning(kappa=3, value_codebook=300)
    with pytest.raises(ValueError, match="value_dtype.*value_codebook"):
        lc.ConstraintL0Pruning(kappa=3, value_dtype="float16", value_codebook=2)
    with pytest.raises(TypeError, match="value_codebook"):
        lc.ConstraintL1Pruning(kappa=3.0, value_codebook=2)


def test_lc_with_codebook_pruning_ends_feasible_and_exports(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    x = torch.randn(512, 20)
    y = (x[:, :4] * 3).argmax(1)
    alg = lc.LC(model, {("0.weight", "2.weight"): lc.ConstraintL0Pruning(fraction=0.1, value_codebook=2)})
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for mu in lc.geometric(1e-2, 1.7, 18):
        for group in opt.param_groups:
            group["lr"] = lc.clip_lr(0.05, mu)
        for i in list(range(0, 512, 64)) * 4:  # 4 epochs per L step
            loss = F.cross_entropy(model(x[i : i + 64]), y[i : i + 64])
            opt.zero_grad()
            loss.backward()
            alg.penalty_grad_(mu)
            opt.step()
        alg.c_step(mu)
    d = torch.cat([v.reshape(-1) for v in alg.decompressed().values()])
    assert int((d != 0).sum()) <= round(0.1 * d.numel())
    assert torch.unique(d[d != 0]).numel() <= 2
    w = torch.cat([model[0].weight.detach().reshape(-1), model[2].weight.detach().reshape(-1)])
    assert alg.feasibility()["total"] < 0.005 * float(w.norm())
    path = tmp_path / "m.lcz"
    alg.export(path)
    fresh = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 4))
    loaded = lc.load(path, fresh)
    with alg.compressed():
        ref = model(x)
    assert torch.allclose(loaded(x), ref, atol=1e-6)
    report = alg.size_report()
    payload = math.ceil(report["tasks"][0]["bits"] / 8)
    assert payload <= path.stat().st_size
