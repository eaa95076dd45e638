"""Grouped integer quantization and N:M sparsity: the C steps against brute force on small groups, the stored
form in files, and bad arguments."""
import itertools
import math

import pytest
import torch
from torch import nn

import lcompress as lc
from lcompress import _grouped as G
from lcompress.compressions.grouped import GGUF_TYPES, gguf_type


def brute_symmetric(x, bits):
    """min over every code vector q ∈ {lo..hi}^g and every real s of ‖x − s q‖² (float64)."""
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x = x.double()
    best = float((x * x).sum())
    for q in itertools.product(range(lo, hi + 1), repeat=x.numel()):
        q = torch.tensor(q, dtype=torch.float64)
        nq = float((q * q).sum())
        if nq:
            best = min(best, float((x * x).sum()) - float((x * q).sum()) ** 2 / nq)
    return best


def err_sym(x, s, q):
    return float(((x.double() - s.double()[:, None] * q.double()) ** 2).sum(1).sum())


@pytest.mark.parametrize("bits,g", [(2, 3), (2, 4), (3, 3), (4, 2)])
def test_symmetric_c_step_is_the_global_optimum_over_real_scales(bits, g):
    gen = torch.Generator().manual_seed(bits * 10 + g)
    xs = [torch.randn(g, generator=gen) for _ in range(30)]
    xs += [torch.tensor([1.0, 1.0, -1.0, 2.0][:g]), torch.zeros(g), torch.tensor([3.0] + [0.1] * (g - 1))]
    x = torch.stack(xs)
    s, q = G.symmetric_grid(x, bits, torch.float32)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert bool(((q >= lo) & (q <= hi) & (q == q.round())).all())
    for i in range(x.shape[0]):
        got = err_sym(x[i : i + 1], s[i : i + 1], q[i : i + 1])
        ref = brute_symmetric(x[i], bits)
        assert got <= ref * (1 + 1e-5) + 1e-10, (i, got, ref)


def test_symmetric_scale_sign_gives_the_extra_level_to_either_side():
    # a group that needs +8·s: only a negative scale reaches it at 4 bits
    x = torch.tensor([[8.0, 4.0, -3.0, 1.0]])
    s, q = G.symmetric_grid(x, 4, torch.float16)
    assert float(s) < 0 and torch.equal(s[:, None] * q, x)


def test_float16_scale_is_at_least_as_good_as_its_rounded_real_optimum_and_near_the_float16_brute_force():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(200, 4, generator=gen) * 0.02
    s16, q16 = G.symmetric_grid(x, 3, torch.float16)
    s32, _ = G.symmetric_grid(x, 3, torch.float32)
    assert torch.equal(s16, s16.half().float())  # stored exactly at float16
    # the real optimum rounded to nearest float16, with its best codes
    r = s32.half().float()
    qr = torch.round(x / r[:, None]).clamp(-4, 3)
    worse = 0
    # brute force over every float16 scale of either sign within the plausible range
    grid = torch.arange(0, 0x7C00, dtype=torch.int32).to(torch.int16).view(torch.float16).float()
    grid = grid[(grid > 1e-4) & (grid < 0.2)]
    for i in range(x.shape[0]):
        xi = x[i].double()
        mine = float(((xi - s16[i].double() * q16[i].double()) ** 2).sum())
        assert mine <= float(((xi - r[i].double() * qr[i].double()) ** 2).sum()) * (1 + 1e-9) + 1e-15
        best = math.inf
        for sign in (1.0, -1.0):
            sg = sign * grid.double()
            qq = torch.round(xi[None, :] / sg[:, None]).clamp(-4, 3)
            best = min(best, float(((xi[None, :] - sg[:, None] * qq) ** 2).sum(1).min()))
        assert mine <= best * (1 + 1e-3) + 1e-15
        worse += mine > best * (1 + 1e-9) + 1e-15
    assert worse <= 10  # the float16 neighbours of the real optimum are the float16 optimum almost always


def brute_asym(x, bits):
    top = (1 << bits) - 1
    x = x.double()
    best = float(((x - x.mean()) ** 2).sum())
    for q in itertools.product(range(top + 1), repeat=x.numel()):
        q = torch.tensor(q, dtype=torch.float64)
        if float(q.var()) == 0:
            continue
        qc, xc = q - q.mean(), x - x.mean()
        d = float((qc * xc).sum() / (qc * qc).sum())
        if d < 0:
            continue
        best = min(best, float(((xc - d * qc) ** 2).sum()))
    return best


def test_asymmetric_never_worse_than_min_max_and_mostly_optimal():
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(60, 4, generator=gen)
    d, m, q = G.asymmetric_grid(x, 2, torch.float32)
    assert bool((d >= 0).all()) and bool(((q >= 0) & (q <= 3)).all())
    mine = ((x - d[:, None] * q - m[:, None]) ** 2).sum(1)
    # round-to-nearest on the min-max grid, written independently
    mn, mx = x.min(1).values, x.max(1).values
    dd = (mx - mn) / 3
    qq = torch.round((x - mn[:, None]) / dd[:, None]).clamp(0, 3)
    rtn = ((x - dd[:, None] * qq - mn[:, None]) ** 2).sum(1)
    assert bool((mine <= rtn * (1 + 1e-6) + 1e-9).all())
    assert float(mine.sum()) < 0.8 * float(rtn.sum())
    hits = sum(float(mine[i]) <= brute_asym(x[i], 2) * (1 + 1e-4) + 1e-9 for i in range(x.shape[0]))
    assert hits >= 0.85 * x.shape[0], hits


def test_asymmetric_float16_never_worse_than_min_max_at_float16():
    gen = torch.Generator().manual_seed(6)
    x = torch.randn(500, 32, generator=gen) * 0.05 + 0.01
    d, m, q = G.asymmetric_grid(x, 4, torch.float16)
    assert torch.equal(d, d.half().float()) and torch.equal(m, m.half().float())
    mine = ((x - d[:, None] * q - m[:, None]) ** 2).sum(1)
    mn, mx = x.min(1).values.half().float(), x.max(1).values
    dd = ((mx - x.min(1).values) / 15).half().float()
    qq = torch.round((x - mn[:, None]) / dd[:, None]).clamp(0, 15)
    rtn = ((x - dd[:, None] * qq - mn[:, None]) ** 2).sum(1)
    assert bool((mine <= rtn * (1 + 1e-6)).all())


def test_nm_mask_is_the_best_n_of_m_in_every_group():
    gen = torch.Generator().manual_seed(7)
    for n, m in [(2, 4), (1, 3), (4, 8), (3, 5)]:
        x = torch.randn(6, 4 * m, generator=gen)
        mask = G.nm_mask(x, n, m)
        groups = mask.reshape(-1, m)
        assert bool((groups.sum(1) == n).all())
        xg = x.reshape(-1, m)
        for i in range(xg.shape[0]):
            best = max(sum(float(xg[i, j]) ** 2 for j in c) for c in itertools.combinations(range(m), n))
            assert float((xg[i][groups[i]] ** 2).sum()) == pytest.approx(best, rel=1e-6)


def test_nm_patterns_enumerate_every_choice_once():
    pats, index = G.nm_patterns(2, 4)
    assert pats.shape == (6, 4) and bool((pats.sum(1) == 2).all())
    assert len({tuple(p.tolist()) for p in pats}) == 6
    for i, p in enumerate(pats):
        assert int(index[sum(1 << j for j in range(4) if p[j])]) == i
    assert int((index >= 0).sum()) == 6


@pytest.mark.parametrize("comp", [lc.GroupedIntQuantization(4, 64), lc.GroupedIntQuantization(3, 48, symmetric=False),
                                  lc.NMPruning(2, 4, value_dtype="float16")], ids=repr)
def test_file_round_trip_and_size(tmp_path, comp):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 8))
    alg = lc.LC(model, {"0.weight": comp})
    out = alg.export(tmp_path / "m.lcz")
    fresh = nn.Sequential(nn.Linear(96, 40), nn.ReLU(), nn.Linear(40, 8))
    lc.load(tmp_path / "m.lcz", fresh)
    assert torch.equal(fresh[0].weight, alg.decompressed()["0.weight"])
    assert torch.equal(fresh[2].weight, model[2].weight)
    assert out["file_bytes"] <= out["bound_bytes"]
    rep = alg.size_report()["tasks"][0]
    if isinstance(comp, lc.GroupedIntQuantization):
        packed = comp.count_bits(lossless=False)
        groups = 40 * math.ceil(96 / comp.group)
        assert packed == 40 * 96 * comp.bits + groups * 16 * (1 if comp.symmetric else 2)
        assert rep["bits"] <= packed
    else:
        assert comp.count_bits(lossless=False) == 40 * 96 // 2 * 16 + math.ceil(40 * 96 // 4 * 3 / 8) * 8


def test_grouped_int_shorter_last_group_and_bits_per_weight():
    w = torch.randn(5, 70)
    q = lc.GroupedIntQuantization(4, 64)
    d = q.compress(w)
    assert q.theta["scales"].shape == (5, 2) and q.theta["scales"].dtype == torch.float16
    # the last group of 6 has its own scale: compressing it alone gives the same values
    alone = lc.GroupedIntQuantization(4, 6).compress(w[:, 64:])
    assert torch.equal(d[:, 64:], alone)
    assert q.bits_per_weight == 4.25


def test_gguf_presets():
    assert set(GGUF_TYPES) >= {"q8_0", "q4_0", "q4_1", "q5_0"}
    q = gguf_type("Q4_0")
    assert (q.bits, q.group, q.symmetric) == (4, 32, True)
    with pytest.raises(ValueError, match="q3_k"):
        gguf_type("q3_k")


@pytest.mark.parametrize("kwargs,match", [
    (dict(bits=4, group=0), "group=0"), (dict(bits=1, group=8), "bits=1"), (dict(bits=9, group=8), "bits=9"),
    (dict(bits=4, group=8, scale_dtype="int8"), "scale_dtype='int8'"),
])
def test_grouped_bad_arguments(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        lc.GroupedIntQuantization(**kwargs)


def test_group_wider_than_row_and_nm_not_dividing_name_the_task():
    model = nn.Linear(10, 4)
    with pytest.raises(ValueError, match=r"task 'weight'.*group=16 is wider than a row \(10"):
        lc.LC(model, {"weight": lc.GroupedIntQuantization(4, 16)})
    with pytest.raises(ValueError, match=r"task 'weight'.*m=4 does not divide the row length 10"):
        lc.LC(model, {"weight": lc.NMPruning(2, 4)})
    with pytest.raises(ValueError, match="n=5"):
        lc.NMPruning(5, 4)


def test_set_grid_takes_a_grid_chosen_elsewhere():
    q = lc.GroupedIntQuantization(3, 4)
    codes = torch.tensor([[-4, 3, 0, 1, 2, -1]])
    scales = torch.tensor([[0.5, 0.25]])
    d = q.set_grid(scales, codes)
    assert torch.equal(d, torch.tensor([[-2.0, 1.5, 0.0, 0.5, 0.5, -0.25]]))
    assert torch.equal(q.decompress(), d) and q.count_bits(lossless=False) == 6 * 3 + 2 * 16
    with pytest.raises(ValueError, match=r"integers in \[-4, 3\]"):
        q.set_grid(scales, codes + 1)
    with pytest.raises(ValueError, match="need \\(1, 2\\)"):
        q.set_grid(scales[:, :1], codes)
    a = lc.GroupedIntQuantization(2, 6, symmetric=False)
    d = a.set_grid(torch.tensor([[0.5]]), torch.tensor([[0, 1, 2, 3, 3, 0]]), mins=torch.tensor([[-1.0]]))
    assert torch.equal(d, torch.tensor([[-1.0, -0.5, 0.0, 0.5, 0.5, -1.0]]))


def brute_symmetric_weighted(x, d, bits):
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    x, d = x.double(), d.double()
    c = float((d * x * x).sum())
    best = c
    for q in itertools.product(range(lo, hi + 1), repeat=x.numel()):
        q = torch.tensor(q, dtype=torch.float64)
        nq = float((d * q * q).sum())
        if nq:
            best = min(best, c - float((d * x * q).sum()) ** 2 / nq)
    return best


def test_weighted_symmetric_c_step_is_the_global_optimum():
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(40, 3, generator=gen)
    d = torch.rand(40, 3, generator=gen) ** 3 * 10 + 1e-3
    s, q = G.symmetric_grid(x, 2, torch.float32, weight=d)
    for i in range(x.shape[0]):
        got = float((d[i].double() * (x[i].double() - float(s[i]) * q[i].double()) ** 2).sum())
        ref = brute_symmetric_weighted(x[i], d[i], 2)
        assert got <= ref * (1 + 1e-5) + 1e-10, (i, got, ref)


def test_importance_c_steps_solve_the_weighted_projection():
    gen = torch.Generator().manual_seed(12)
    w = torch.randn(6, 12, generator=gen)
    d = torch.rand(6, 12, generator=gen) * 5
    # pruning: the kept set maximizes sum d w^2
    p = lc.ConstraintL0Pruning(kappa=20)
    out = p.compress(w, importance=d)
    kept = out != 0
    assert int(kept.sum()) == 20
    score = (d * w * w).reshape(-1)
    assert float(score[kept.reshape(-1)].min()) >= float(score[~kept.reshape(-1)].max())
    # N:M: per group of 4 the two largest d w^2
    nm = lc.NMPruning(2, 4)
    out = nm.compress(w, importance=d)
    for r in range(6):
        for g0 in range(0, 12, 4):
            sc = (d * w * w)[r, g0 : g0 + 4]
            k = out[r, g0 : g0 + 4] != 0
            assert int(k.sum()) == 2 and float(sc[k].min()) >= float(sc[~k].max())
    # asymmetric grouped: never worse than weighted min-max
    a = lc.GroupedIntQuantization(3, 6, symmetric=False, scale_dtype="float32")
    out = a.compress(w, importance=d)
    mn, mx = w.reshape(-1, 6).min(1).values, w.reshape(-1, 6).max(1).values
    dd = (mx - mn) / 7
    qq = torch.round((w.reshape(-1, 6) - mn[:, None]) / dd[:, None]).clamp(0, 7)
    rtn = (d.reshape(-1, 6) * (w.reshape(-1, 6) - dd[:, None] * qq - mn[:, None]) ** 2).sum(1)
    mine = (d.reshape(-1, 6) * (w - out).reshape(-1, 6) ** 2).sum(1)
    assert bool((mine <= rtn * (1 + 1e-6) + 1e-9).all())
    with pytest.raises(TypeError, match="no weighted C step"):
        lc.AdaptiveQuantization(2).compress(w.reshape(-1), importance=d.reshape(-1))
    with pytest.raises(ValueError, match="importance has shape"):
        lc.GroupedIntQuantization(3, 6).compress(w, importance=d[:, :6])


def test_sum_of_grouped_ints_and_sparse_outliers():
    """int3 g8 + 1% sparse float16 outliers: stored and reloaded exactly, no worse than int3 alone, and the weighted
    C step lowers the weighted distance below the unweighted one's."""
    gen = torch.Generator().manual_seed(13)
    w = torch.randn(16, 32, generator=gen)
    w[3, 5] = 12.0  # an outlier that ruins its group's scale
    s = lc.GroupedIntQuantization(3, 8) + lc.ConstraintL0Pruning(fraction=0.01, value_dtype="float16")
    assert s.supports_importance and s.matrix
    out = s.compress(w)
    alone = lc.GroupedIntQuantization(3, 8).compress(w)
    assert float(((w - out) ** 2).sum()) < 0.8 * float(((w - alone) ** 2).sum())
    assert s.parts[1].nnz == 5 and float(s.parts[1].decompress().reshape(16, 32)[3, 5]) != 0
    d = torch.rand(16, 32, generator=gen) ** 4
    s2 = lc.GroupedIntQuantization(3, 8) + lc.ConstraintL0Pruning(fraction=0.01, value_dtype="float16")
    outw = s2.compress(w, importance=d)
    assert float((d * (w - outw) ** 2).sum()) <= float((d * (w - out) ** 2).sum()) * (1 + 1e-6)
    model = nn.Linear(32, 16)
    with torch.no_grad():
        model.weight.copy_(w)
    alg = lc.LC(model, {"weight": lc.GroupedIntQuantization(3, 8) + lc.ConstraintL0Pruning(fraction=0.01,
                                                                                         value_dtype="float16")})
    import tempfile, pathlib
    with tempfile.TemporaryDirectory() as tmp:
        alg.export(pathlib.Path(tmp) / "s.lcz")
        fresh = nn.Linear(32, 16)
        lc.load(pathlib.Path(tmp) / "s.lcz", fresh)
    assert torch.equal(fresh.weight, alg.decompressed()["weight"])
