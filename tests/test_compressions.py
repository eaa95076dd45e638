"""The contract every compression must pass (idempotence, shape/dtype kept, optimality against brute force on tiny
inputs, state round trip, bits counted = bits its codec writes = the real file's, clear errors).

The contract runs over the registry: every registered compression of the package and of the plug-in in
``tests/plugins`` (a class defined outside the package), each of its ``examples()``; no hand-kept table."""
import itertools
import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import lcompress as lc
from lcompress import codecs, export
from lcompress.compressions import REGISTRY, from_config
from lcompress.sizes import index_bits, support_bits

sys.path.insert(0, str(Path(__file__).parent / "plugins"))
import lcplugin_uniform  # noqa: E402  (registers UniformQuantization, defined outside the package)


def sq(x, y):
    return float(((x.double() - y.double()) ** 2).sum())


def _contract_classes():
    return [cls for _, cls in sorted(REGISTRY.items())
            if cls.__module__.startswith("lcompress.") or cls.__module__ == lcplugin_uniform.__name__]


CASES = [(cls, i) for cls in _contract_classes() for i in range(len(cls.examples()))]
IDS = [f"{cls.__name__}-{i}" for cls, i in CASES]
MU = 1.0


def make(case, seed=0):
    """A fresh example of the case, and its input: 300 weights, or a 20×15 matrix for a matrix compression."""
    cls, i = case
    c = cls.examples()[i]
    g = torch.Generator().manual_seed(seed)
    return c, torch.randn((20, 15) if c.matrix else (300,), generator=g) * 0.5


def cases(pred=lambda c: True):
    keep = [(case, i) for case, i in zip(CASES, IDS) if pred(make(case)[0])]
    return pytest.mark.parametrize("case", [c for c, _ in keep], ids=[i for _, i in keep])


def test_every_registered_compression_has_examples_and_every_codec_is_exercised():
    package = [cls for cls in _contract_classes() if cls.__module__.startswith("lcompress.")]
    assert {"AdaptiveQuantization", "ConstraintL0Pruning", "LowRank", "AdditiveCombination"} <= {c.__name__ for c in package}
    for cls in package:
        assert cls.examples(), f"{cls.__name__} gives no examples() for the contract suite"
        assert all(type(e) is cls for e in cls.examples())
    used = set()
    for case in CASES:
        c, w = make(case)
        c.compress(w, MU)
        used.add(codecs.codec_for(c).name)
        used.update(codecs.codec_for(p).name for p in getattr(c, "parts", []))
    assert {n for n, k in codecs.CODECS.items() if type(k).__module__.startswith("lcompress.")} <= used


@cases()
def test_shape_dtype_device_kept(case):
    c, w = make(case)
    out = c.compress(w, MU)
    assert out.shape == w.shape and out.dtype == w.dtype and out.device == w.device
    assert torch.isfinite(out).all()
    # Δ(Θ) from the stored Θ is what compress returned
    assert torch.allclose(c.decompress().reshape(w.shape), out, atol=1e-6)


@cases(lambda c: c.idempotence is not None)
def test_idempotent(case):
    c, w = make(case)
    once = c.compress(w, MU)
    twice = c.compress(once, MU)
    if c.idempotence == "exact":
        assert torch.allclose(once, twice, atol=1e-6), (once - twice).abs().max()
    else:  # a local method (alternation) comes back to a feasible point only nearly
        assert sq(once, twice) <= 1e-4 * float((once ** 2).sum())


@cases(lambda c: not c.penalty_form and c.idempotence is not None)
def test_no_worse_than_other_feasible_points(case):
    """Π(w) is at least as close to w as the compressions of perturbed copies of w (other feasible points)."""
    c, w = make(case)
    d = sq(w, c.compress(w, MU))
    other = make(case)[0]
    for s in range(10):
        g = torch.Generator().manual_seed(100 + s)
        feasible = other.compress(w + 0.3 * torch.randn(w.shape, generator=g), MU)
        assert d <= sq(w, feasible) * (1 + 1e-6) + 1e-9


@cases()
def test_state_round_trip(case):
    c, w = make(case)
    c.compress(w, MU)
    fresh, _ = make(case)
    fresh.load_state_dict(c.state_dict())
    assert torch.equal(fresh.decompress(), c.decompress())
    assert fresh.count_bits() == c.count_bits()
    assert fresh.config() == c.config()


@cases()
def test_config_round_trip(case):
    c, _ = make(case)
    if type(c).config_complete:
        assert from_config(c.config()).config() == c.config()
    else:
        with pytest.raises(ValueError, match="cannot be built from a config"):
            from_config(c.config())


@cases()
def test_theta_before_first_c_step_raises(case):
    c, _ = make(case)
    with pytest.raises(lc.NotCompressedError):
        _ = c.theta
    with pytest.raises(lc.NotCompressedError):
        c.count_bits()


@cases()
def test_codec_round_trip_and_bits(case):
    """The codec's dry count, its real encoding, its header check and its decoding agree: the bits counted are the
    bits written, each piece is its bits rounded up to bytes, and the decoded Θ gives Δ(Θ) bit for bit."""
    c, w = make(case)
    c.compress(w, MU)
    codec = codecs.codec_for(c)
    wr = codecs.Writer()
    rec = codec.encode(c, wr)
    assert wr.bits == c.count_bits() == codec.bits(c)
    payload = wr.payload()
    assert len(payload) == wr.size and wr.bits <= 8 * len(payload)
    view = list(w.shape)
    cfg = c.config()
    chk = codecs.Checker("t", {"theta": len(payload), "dense": 0})
    chk.coded = True  # (a lossless stage may have entropy-coded a stream: its segment is then shorter)
    chk.theta(rec, cfg, view, "theta")
    blob = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
    theta = codecs.decode_theta(rec, codecs.Reader(blob), cfg, "t")
    assert torch.equal(codecs.delta_of(rec, theta, view).float(), c.decompress().reshape(view).float())
    assert c.count_params() == codec.stored_values(c) > 0 or c.count_params() == 0


class _One(nn.Module):
    """One Linear layer whose weight has the example's input shape (a 300-weight vector: a 10×30 weight)."""

    def __init__(self, shape):
        super().__init__()
        self.fc = nn.Linear(shape[1], shape[0]) if len(shape) == 2 else nn.Linear(30, shape[0] // 30)


@cases()
def test_size_report_is_the_written_file(case, tmp_path):
    """Through LC: the size report's bits are the file header's, the task's bytes in the file are each piece
    rounded up, the file loads back to Δ(Θ) bit for bit, and compactly to the same outputs."""
    c, w = make(case)
    model = _One(tuple(w.shape)).eval()
    alg = lc.LC(model, {"fc.weight": c}, direct_mu=MU, flush_denormal=False)
    path = tmp_path / "m.lcz"
    info = alg.export(path)
    data = path.read_bytes()
    assert info["file_bytes"] == len(data) <= info["bound_bytes"]
    header = export.read(data)["header"]
    (task,) = header["tasks"]
    rep = alg.size_report()
    assert task["bits"] == rep["tasks"][0]["bits"] == c.count_bits()
    assert header["blobs"]["theta"] == task["bytes"]
    segments = []

    def walk(v):
        if isinstance(v, list) and len(v) == 2 and all(type(x) is int for x in v):
            segments.append(v)
        elif isinstance(v, dict):
            for x in v.values():
                walk(x)
        elif isinstance(v, list):
            for x in v:
                walk(x)
    walk(task["theta"])
    assert task["bits"] <= 8 * task["bytes"] < task["bits"] + 8 * max(1, len(segments))
    x = torch.randn(5, model.fc.in_features)
    with alg.compressed():
        ref = model.fc.weight.detach().clone()
        y = model.fc(x)
    fresh = _One(tuple(w.shape)).eval()
    lc.load(path, fresh)
    assert torch.equal(fresh.fc.weight, ref)
    compact = lc.load(path, _One(tuple(w.shape)).eval(), compact=True)
    assert torch.allclose(compact.fc(x), y, atol=1e-5)


def brute_best(name, w):
    """Independent brute-force optimum of min ‖w − Δ(Θ)‖² over the compression's feasible set (tiny w)."""
    n = w.numel()
    x = w.double().reshape(-1)
    if name in ("binary", "ternary", "pow2"):
        cb = {"binary": [-1.0, 1.0], "ternary": [-1.0, 0.0, 1.0], "pow2": [-1, -0.5, -0.25, -0.125, 0, 0.125, 0.25, 0.5, 1]}[name]
        return min(float(((x - torch.tensor(v, dtype=torch.float64)) ** 2).sum()) for v in itertools.product(cb, repeat=n))
    if name in ("scaled_binary", "scaled_ternary"):
        vals = [-1, 1] if name == "scaled_binary" else [-1, 0, 1]
        best = math.inf
        for s in itertools.product(vals, repeat=n):
            s = torch.tensor(s, dtype=torch.float64)
            nz = float((s != 0).sum())
            a = float((x * s).sum()) / nz if nz else 0.0
            best = min(best, float(((x - a * s) ** 2).sum()))
        return best
    if name.startswith("adaptive"):
        k = 4 if name == "adaptive_k4" else 2
        xs = sorted(x.tolist())
        best = math.inf
        for cuts in itertools.combinations(range(1, n), k - 1):
            b = (0,) + cuts + (n,)
            best = min(best, sum(sum((v - sum(xs[l:h]) / (h - l)) ** 2 for v in xs[l:h]) for l, h in zip(b[:-1], b[1:])))
        return best
    if name.startswith("l0"):
        return min(
            float((x ** 2).sum() - (x[list(s)] ** 2).sum()) for s in itertools.combinations(range(n), 3)
        )
    raise KeyError(name)


TINY = {
    "binary": lambda: lc.BinaryQuantization(),
    "ternary": lambda: lc.TernaryQuantization(),
    "pow2": lambda: lc.PowersOfTwoQuantization(c=3),
    "scaled_binary": lambda: lc.ScaledBinaryQuantization(),
    "scaled_ternary": lambda: lc.ScaledTernaryQuantization(),
    "adaptive_k4": lambda: lc.AdaptiveQuantization(k=4, exact=True),
    "adaptive_k2": lambda: lc.AdaptiveQuantization(k=2, exact=True),
    "l0": lambda: lc.ConstraintL0Pruning(kappa=3),
}


@pytest.mark.parametrize("name", list(TINY))
@pytest.mark.parametrize("seed", range(4))
def test_matches_brute_force_on_tiny_inputs(name, seed):
    g = torch.Generator().manual_seed(seed)
    # the brute force enumerates K^n points: n = 4 keeps the 9-value powers-of-two codebook fast
    w = torch.randn(4 if name == "pow2" else 6, generator=g) * 0.6
    c = TINY[name]()
    assert sq(w, c.compress(w)) == pytest.approx(brute_best(name, w), rel=1e-6, abs=1e-10)


def test_lowrank_is_eckart_young():
    w = torch.randn(12, 9)
    s = torch.linalg.svdvals(w.double())
    out = lc.LowRank(rank=4).compress(w)
    assert sq(w, out) == pytest.approx(float((s[4:] ** 2).sum()), rel=1e-4)


def test_rank_selection_minimizes_its_objective():
    w = torch.randn(12, 9)
    s = torch.linalg.svdvals(w.double())
    for alpha, mu in [(1e-3, 1.0), (1e-2, 1.0), (1e-1, 10.0), (3.0, 1.0)]:
        c = lc.RankSelection(alpha=alpha)
        out = c.compress(w, mu)
        # every rank, and the matrix kept dense (108 parameters, no distortion)
        objs = {q: alpha * q * 21 + mu / 2 * float((s[q:] ** 2).sum()) for q in range(10)}
        objs["dense"] = alpha * 108
        choice = "dense" if c.keeps_dense else c.selected_rank
        assert objs[choice] == pytest.approx(min(objs.values()), rel=1e-5)
        if c.keeps_dense:
            assert torch.equal(out, w)
        else:
            assert int(torch.linalg.matrix_rank(out)) == choice if choice else float(out.abs().max()) == 0.0
    c = lc.RankSelection(alpha=1e-3, criterion="flops", positions=10)
    assert c.cost_per_rank((12, 9)) == 210.0
    assert c.rank_limit((12, 9)) == 5 and lc.RankSelection(alpha=0, max_rank=9).rank_limit((12, 9)) == 9
    full = lc.RankSelection(alpha=0.0, max_rank=9)
    full.compress(w, 1.0)
    assert full.selected_rank == 9


def test_penalty_forms_minimize_their_objectives():
    w = torch.randn(40)
    for cls, cost in [(lc.PenaltyL0Pruning, lambda t: float((t != 0).sum())), (lc.PenaltyL1Pruning, lambda t: float(t.abs().sum()))]:
        c = cls(alpha=0.05)
        t = c.compress(w, mu=2.0)
        obj = 0.05 * cost(t) + 1.0 * sq(w, t)
        for s in range(20):  # random perturbations of the solution never do better
            g = torch.Generator().manual_seed(s)
            t2 = t + 0.05 * torch.randn(40, generator=g) * (torch.rand(40, generator=g) < 0.3)
            assert obj <= 0.05 * cost(t2) + 1.0 * sq(w, t2) + 1e-9


def test_bits_follow_the_formulas():
    """The packed bits; with the lossless stage (the default) a stream counts its coded bytes where shorter
    (tests/test_lossless.py)."""
    w = torch.randn(1000)
    q = lc.AdaptiveQuantization(k=5)
    q.compress(w)
    assert q.count_bits(lossless=False) == 1000 * 3 + 5 * 32
    b = lc.BinaryQuantization()
    b.compress(w)
    assert b.count_bits(lossless=False) == 1000
    sb = lc.ScaledBinaryQuantization()
    sb.compress(w)
    assert sb.count_bits(lossless=False) == 1000 + 32
    st = lc.ScaledTernaryQuantization()
    st.compress(w)
    assert st.count_bits(lossless=False) == 2000 + 32
    p2 = lc.PowersOfTwoQuantization(c=2)  # 7 values -> 3 bits
    p2.compress(w)
    assert p2.count_bits(lossless=False) == 3000
    p = lc.ConstraintL0Pruning(kappa=50, value_dtype="float16")
    p.compress(w)
    assert p.count_bits(lossless=False) == 50 * 16 + support_bits(p.theta["indices"], 1000)[1]
    assert support_bits(p.theta["indices"], 1000)[1] <= 1000
    r = lc.LowRank(rank=3)
    r.compress(torch.randn(20, 10))
    assert r.count_bits(lossless=False) == 3 * 30 * 32
    a = lc.AdaptiveQuantization(k=2) + lc.ConstraintL0Pruning(kappa=10)
    a.compress(w)
    for lossless in (False, True):
        assert a.count_bits(lossless) == a.parts[0].count_bits(lossless) + a.parts[1].count_bits(lossless)
    assert index_bits(1) == 0 and index_bits(2) == 1 and index_bits(3) == 2 and index_bits(256) == 8


def test_additive_never_worse_than_its_first_part():
    for s in range(5):
        w = torch.randn(2000) * 0.1 + (torch.rand(2000) < 0.01) * torch.randn(2000)
        first = lc.AdaptiveQuantization(k=2)
        d1 = sq(w, first.compress(w))
        comb = lc.AdaptiveQuantization(k=2) + lc.ConstraintL0Pruning(kappa=20)
        d = sq(w, comb.compress(w))
        assert d <= d1 * (1 + 1e-6)
        assert d < 0.9 * d1  # the sparse correction helps on outliers
    lr = lc.LowRank(rank=2) + lc.ConstraintL0Pruning(kappa=20)
    m = torch.randn(30, 20)
    assert sq(m, lr.compress(m)) <= sq(m, lc.LowRank(rank=2).compress(m)) * (1 + 1e-6)


def test_additive_flattens_and_validates():
    a = lc.BinaryQuantization() + lc.ConstraintL0Pruning(1) + lc.PenaltyL1Pruning(0.1)
    assert len(a.parts) == 3
    with pytest.raises(ValueError, match="conv_scheme"):
        lc.LowRank(1) + lc.LowRank(1, conv_scheme="scheme_2")
    with pytest.raises(TypeError):
        lc.AdditiveCombination(lc.BinaryQuantization(), 3)


@pytest.mark.parametrize(
    "factory, match",
    [
        (lambda: lc.AdaptiveQuantization(k=0), "k=0"),
        (lambda: lc.AdaptiveQuantization(k=2.5), "k=2.5"),
        (lambda: lc.ConstraintL0Pruning(kappa=-1), "kappa=-1"),
        (lambda: lc.ConstraintL1Pruning(kappa=-0.5), "kappa=-0.5"),
        (lambda: lc.PenaltyL0Pruning(alpha=-1), "alpha=-1"),
        (lambda: lc.LowRank(rank=0), "rank=0"),
        (lambda: lc.LowRank(rank=2, conv_scheme="scheme_9"), "conv_scheme"),
        (lambda: lc.RankSelection(alpha=1, criterion="speed"), "criterion"),
        (lambda: lc.PowersOfTwoQuantization(c=-1), "c=-1"),
        (lambda: lc.ConstraintL0Pruning(kappa=3, value_dtype="int8"), "value_dtype"),
        (lambda: lc.FixedAssignmentQuantization(torch.tensor([0.5, 1.0])), "integer"),
        (lambda: lc.FixedAssignmentQuantization(torch.tensor([-1, 1])), ">= 0"),
    ],
)
def test_bad_hyperparameters_are_named(factory, match):
    with pytest.raises((ValueError, TypeError), match=match):
        factory()


def test_bad_inputs():
    q = lc.AdaptiveQuantization(k=2)
    with pytest.raises(TypeError, match="floating"):
        q.compress(torch.arange(10))
    with pytest.raises(ValueError, match="NaN"):
        q.compress(torch.tensor([1.0, float("nan")]))
    with pytest.raises(ValueError, match="kappa=11"):
        lc.ConstraintL0Pruning(kappa=11).compress(torch.randn(10))
    with pytest.raises(ValueError, match="rank=5"):
        lc.LowRank(rank=5).compress(torch.randn(4, 8))
    with pytest.raises(ValueError, match="matrix"):
        lc.LowRank(rank=1).compress(torch.randn(8))
    with pytest.raises(ValueError, match="assignments"):
        lc.FixedAssignmentQuantization(torch.arange(5)).compress(torch.randn(6))


def test_warm_start_uses_previous_codebook():
    q = lc.AdaptiveQuantization(k=4)
    w = torch.randn(5000) * 0.1
    q.compress(w)
    c0 = q.theta["codebook"].clone()
    q.compress(w + 1e-4 * torch.randn(5000))
    assert torch.allclose(q.theta["codebook"], c0, atol=1e-3)


def test_l0_fraction():
    p = lc.ConstraintL0Pruning(fraction=0.05)
    out = p.compress(torch.randn(1000))
    assert int(torch.count_nonzero(out)) == 50 and p.config()["fraction"] == 0.05
    assert from_config(p.config()).kappa_for(200) == 10
    with pytest.raises(ValueError, match="exactly one"):
        lc.ConstraintL0Pruning(kappa=3, fraction=0.1)
    # fraction is the share kept: the error says so and names the range (0, 1]
    for bad in (1.5, 0, 0.0, -0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"fraction=.* is the share of weights kept .* must be in \(0, 1\]"):
            lc.ConstraintL0Pruning(fraction=bad)
    with pytest.raises(TypeError, match="fraction='5%'.*share of weights kept"):
        lc.ConstraintL0Pruning(fraction="5%")
    # the edges of (0, 1]: 1 keeps everything, a tiny share keeps round(fraction * n)
    w = torch.randn(400)
    assert torch.equal(lc.ConstraintL0Pruning(fraction=1).compress(w), w)
    assert int(torch.count_nonzero(lc.ConstraintL0Pruning(fraction=0.01).compress(w))) == 4
