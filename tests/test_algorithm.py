"""The LC object: the user's loop, the two steps, state, and errors."""
import copy
import logging
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcompress as lc


class MLP(nn.Module):
    def __init__(self, sizes=(20, 64, 64, 4)):
        super().__init__()
        self.fc1 = nn.Linear(sizes[0], sizes[1])
        self.fc2 = nn.Linear(sizes[1], sizes[2])
        self.fc3 = nn.Linear(sizes[2], sizes[3])

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


class Net(nn.Module):
    """Conv + linear layers, as in the issue's example."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 32)
        self.fc4 = nn.Linear(32, 3)

    def forward(self, x):
        x = torch.relu(self.conv1(x)).flatten(1)
        return self.fc4(torch.relu(self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))))


def teacher_data(n=2000, d=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    t = MLP((d, 32, 32, classes))
    with torch.no_grad():
        for p in t.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        y = t(x).argmax(1)
    return x, y


def full_loss(model, x, y):
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


# ---- the user's loop ------------------------------------------------------------------------------------------
def test_user_loop_ends_feasible_and_beats_direct_compression():
    x, y = teacher_data()
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(300):  # reference model
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    ref_loss = full_loss(model, x, y)
    alg = lc.LC(model, {"re:fc\\d\\.weight": lc.AdaptiveQuantization(k=2)})
    with alg.compressed():
        dc_loss = full_loss(model, x, y)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(1)
    for mu in lc.geometric(1e-3, 1.4, 25):
        for group in opt.param_groups:
            group["lr"] = lc.clip_lr(0.05, mu)
        for _ in range(4):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x), 200):
                b = perm[i : i + 200]
                loss = F.cross_entropy(model(x[b]), y[b]) + alg.penalty(mu)
                opt.zero_grad()
                loss.backward()
                opt.step()
        alg.c_step(mu)
    with alg.compressed():
        lc_loss = full_loss(model, x, y)
    w = torch.cat([p.detach().reshape(-1) for n, p in model.named_parameters() if n.endswith("weight")])
    assert alg.feasibility()["total"] < 0.02 * float(w.norm())
    assert lc_loss < dc_loss - 0.1, (ref_loss, dc_loss, lc_loss)
    # the compressed model really has 2 distinct values per layer
    for name, d in alg.decompressed().items():
        assert torch.unique(d).numel() <= 2, name


def test_reduced_rank_regression_reaches_closed_form():
    """LC with LowRank on linear least squares reaches the reduced-rank regression optimum; DC does not.

    The result must not hang on float rounding. The loss's Hessian 2XᵀX/n has eigenvalues from about 0.5 to 18. With
    the exact L step, one LC step moves the compressed point like a projected gradient step of size 1/μ. At μ ≪ 18
    (the first steps) that step is far too long and the path is chaotic: a 1e-6 relative change of the start, the
    size of the difference between CPU kernels (default, AVX2, AVX-512), moves where it lands at μ ≈ 3. A schedule that
    then keeps growing μ to ~300 has too little total step Σ1/μ left to reach the optimum from there. Before, on 1 start
    in 16 perturbed ones, and on Intel AVX-512 machines, it ended 2% above the optimum. So μ grows to just past the
    largest curvature, where the augmented Lagrangian converges at fixed μ, and stays there. Three perturbed starts
    stand in for three CPUs.
    """
    g = torch.Generator().manual_seed(1)
    n, d, m, r = 400, 6, 6, 2
    scales = torch.tensor([3.0, 2.0, 1.5, 1.0, 0.7, 0.5])  # correlated inputs make DC ≠ RRR
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g))
    x = (torch.randn(n, d, generator=g) * scales) @ q
    b = torch.randn(m, d, generator=g)
    y = x @ b.T + 0.5 * torch.randn(n, m, generator=g)
    xd, yd = x.double(), y.double()

    def loss_of(wt):
        return float(((yd - xd @ wt.double().T) ** 2).sum(1).mean())

    w_ols = torch.linalg.solve(xd.T @ xd, xd.T @ yd).T  # (m, d)
    _, _, vh = torch.linalg.svd(xd @ w_ols.T, full_matrices=False)
    v = vh[:r].T
    w_rrr = v @ v.T @ w_ols  # the closed-form reduced-rank regression solution
    u, s, vh2 = torch.linalg.svd(w_ols, full_matrices=False)
    w_dc = (u[:, :r] * s[:r]) @ vh2[:r]
    l_rrr, l_dc = loss_of(w_rrr), loss_of(w_dc)
    assert l_dc > 1.3 * l_rrr  # direct compression is clearly suboptimal here
    curvature = float(torch.linalg.eigvalsh(2 * xd.T @ xd / n).max())
    rise = lc.geometric(1e-2, 1.3, 31)
    assert rise[-1] > curvature  # the held μ is past the loss's largest curvature
    schedule = rise + [rise[-1]] * 60

    for start in range(3):
        w0 = w_ols.float()
        if start:
            w0 = w0 * (1 + 1e-6 * torch.randn(w0.shape, generator=torch.Generator().manual_seed(start)))
        model = nn.Linear(d, m, bias=False)
        with torch.no_grad():
            model.weight.copy_(w0)
        alg = lc.LC(model, {"weight": lc.LowRank(rank=r)})
        with alg.compressed():
            assert loss_of(model.weight.detach()) == pytest.approx(l_dc, rel=1e-4)
        opt = torch.optim.LBFGS(model.parameters(), lr=1, max_iter=100, tolerance_grad=1e-9,
                                tolerance_change=1e-12, line_search_fn="strong_wolfe")
        for mu in schedule:
            def closure():
                opt.zero_grad()
                loss = ((y - model(x)) ** 2).sum(1).mean() + alg.penalty(mu)
                loss.backward()
                return loss
            opt.step(closure)
            alg.c_step(mu)
        with alg.compressed():
            l_lc = loss_of(model.weight.detach())
        assert l_lc <= 1.01 * l_rrr, (start, l_lc, l_rrr, l_dc)


# ---- the penalty and the C step ----------------------------------------------------------------------------------
def test_penalty_value_and_gradient():
    model = MLP()
    alg = lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(k=2), ("fc2.weight", "fc3.weight"): lc.ConstraintL0Pruning(100)})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    alg.c_step(0.5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    mu = 0.7
    deltas, lams = alg.decompressed(), alg.lambdas
    params = dict(model.named_parameters())
    expected = sum(
        mu / 2 * float(((params[n].detach().double() - deltas[n].double() - lams[n].double() / mu) ** 2).sum())
        for n in deltas
    )
    pen = alg.penalty(mu)
    assert float(pen.detach()) == pytest.approx(expected, rel=1e-5)
    pen.backward()
    for n in deltas:
        ref = mu * (params[n].detach() - deltas[n] - lams[n] / mu)
        assert torch.allclose(params[n].grad, ref, atol=1e-6)
    assert model.fc1.bias.grad is None


def _perturbed_with_multipliers():
    """An MLP and an LC over per-layer and joint additive tasks, with nonzero λ and w ≠ Δ."""
    torch.manual_seed(3)
    model = MLP()
    alg = lc.LC(model, {
        "fc1.weight": lc.AdaptiveQuantization(k=2),
        ("fc2.weight", "fc3.weight"): lc.AdaptiveQuantization(k=2) + lc.ConstraintL0Pruning(20),
    })
    for mu in (0.3, 0.5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.02 * torch.randn_like(p))
        alg.c_step(mu)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return model, alg


def test_penalty_grad_matches_closed_form_and_loss_form():
    model, alg = _perturbed_with_multipliers()
    x, y = teacher_data(n=64)
    mu = 0.7
    deltas, lams = alg.decompressed(), alg.lambdas
    params = dict(model.named_parameters())
    assert all(float(lams[n].abs().max()) > 0 for n in lams)
    weights = {n: p.detach().clone() for n, p in params.items()}

    model.zero_grad(set_to_none=True)
    (F.cross_entropy(model(x), y) + alg.penalty(mu)).backward()
    loss_form = {n: p.grad.clone() for n, p in params.items()}

    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    data_grad = {n: p.grad.clone() for n, p in params.items()}
    assert alg.penalty_grad_(mu) is None
    for n, p in params.items():
        assert torch.equal(p.detach(), weights[n])  # the weights themselves are untouched
        if n in deltas:  # data gradient plus μ(w − Δ − λ/μ), computed here in float64
            ref = data_grad[n].double() + mu * (weights[n].double() - deltas[n].double() - lams[n].double() / mu)
            assert torch.allclose(p.grad.double(), ref, rtol=1e-5, atol=1e-6), n
            assert torch.allclose(p.grad, loss_form[n], rtol=1e-5, atol=1e-6), n
        else:  # biases: no penalty term
            assert torch.equal(p.grad, data_grad[n]), n


def test_penalty_grad_fills_missing_gradients_and_checks_mu():
    model, alg = _perturbed_with_multipliers()
    mu = 2.0
    model.zero_grad(set_to_none=True)
    model.fc1.weight.grad = torch.ones_like(model.fc1.weight)  # fc2/fc3 took no part in a loss: .grad is None
    alg.penalty_grad_(mu)
    d, lam = alg.decompressed(), alg.lambdas
    for name in ("fc2.weight", "fc3.weight"):
        p = dict(model.named_parameters())[name]
        assert torch.allclose(p.grad, mu * (p.detach() - d[name] - lam[name] / mu), atol=1e-6)
    p1 = model.fc1.weight
    assert torch.allclose(p1.grad, 1 + mu * (p1.detach() - d["fc1.weight"] - lam["fc1.weight"] / mu), atol=1e-6)
    assert model.fc1.bias.grad is None
    before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="penalty_grad_: mu="):
            alg.penalty_grad_(bad)
    with pytest.raises(TypeError, match="penalty_grad_: mu="):
        alg.penalty_grad_(True)
    for p, b in zip(model.parameters(), before):  # a refused call changed no gradient
        assert (p.grad is None and b is None) or torch.equal(p.grad, b)


def test_penalty_grad_rejects_sparse_gradient_before_touching_any():
    emb = nn.Embedding(30, 4, sparse=True)
    lin = nn.Linear(4, 2)
    model = nn.ModuleDict({"emb": emb, "lin": lin})
    alg = lc.LC(model, {"lin.weight": lc.AdaptiveQuantization(k=2), "emb.weight": lc.AdaptiveQuantization(k=2)})
    lin(emb(torch.tensor([1, 2]))).sum().backward()
    assert emb.weight.grad.is_sparse
    g_lin = lin.weight.grad.clone()
    with pytest.raises(TypeError, match="emb.weight.*sparse"):
        alg.penalty_grad_(1.0)
    assert torch.equal(lin.weight.grad, g_lin)


def test_user_loop_with_penalty_grad_follows_the_loss_form():
    """Same loop, the penalty's gradient added after backward instead of through the loss: same trajectory
    up to float rounding, and LC ends feasible."""
    x, y = teacher_data(n=600)
    runs = []
    for fast in (False, True):
        torch.manual_seed(0)
        model = MLP()
        alg = lc.LC(model, {"re:fc\\d\\.weight": lc.AdaptiveQuantization(k=2)})
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for mu in lc.geometric(1e-2, 2.0, 16):
            for group in opt.param_groups:
                group["lr"] = lc.clip_lr(0.05, mu)
            for i in range(0, len(x), 100):
                loss = F.cross_entropy(model(x[i : i + 100]), y[i : i + 100])
                opt.zero_grad()
                if fast:
                    loss.backward()
                    alg.penalty_grad_(mu)
                else:
                    (loss + alg.penalty(mu)).backward()
                opt.step()
            alg.c_step(mu)
        runs.append((model, alg))
    (m0, a0), (m1, a1) = runs
    for p0, p1 in zip(m0.parameters(), m1.parameters()):
        assert torch.allclose(p0, p1, rtol=1e-3, atol=1e-5)
    w = torch.cat([p.detach().reshape(-1) for n, p in m1.named_parameters() if n.endswith("weight")])
    assert a1.feasibility()["total"] < 0.05 * float(w.norm())
    assert a1.feasibility()["total"] == pytest.approx(a0.feasibility()["total"], rel=1e-2)


def test_multiplier_update_and_quadratic_penalty():
    model = MLP()
    alg = lc.LC(model, {"fc1.weight": lc.ConstraintL0Pruning(50)})
    assert torch.count_nonzero(alg.lambdas["fc1.weight"]) == 0  # direct compression leaves λ = 0
    w = model.fc1.weight.detach().clone()
    lam0 = alg.lambdas["fc1.weight"].clone()
    alg.c_step(2.0)
    d = alg.decompressed()["fc1.weight"]
    assert torch.allclose(alg.lambdas["fc1.weight"], lam0 - 2.0 * (w - d))
    qp = lc.LC(MLP(), {"fc1.weight": lc.ConstraintL0Pruning(50)}, multipliers=False)
    qp.c_step(2.0)
    assert qp.lambdas is None
    p = qp.model.fc1.weight.detach()
    assert float(qp.penalty(3.0)) == pytest.approx(1.5 * float(((p - qp.decompressed()["fc1.weight"]) ** 2).sum()), rel=1e-5)


def test_c_step_uses_shifted_weights():
    model = MLP()
    alg = lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(k=3)})
    with torch.no_grad():
        model.fc1.weight.add_(0.05 * torch.randn_like(model.fc1.weight))
    alg.c_step(1.0)
    with torch.no_grad():
        model.fc1.weight.add_(0.05 * torch.randn_like(model.fc1.weight))
    lam = alg.lambdas["fc1.weight"].clone()
    alg.c_step(2.0)
    ref = lc.AdaptiveQuantization(k=3, exact=True).compress(model.fc1.weight.detach() - lam / 2.0)
    got = alg.decompressed()["fc1.weight"]
    w_shift = model.fc1.weight.detach() - lam / 2.0
    assert float(((w_shift - got) ** 2).sum()) <= 1.02 * float(((w_shift - ref) ** 2).sum())


def test_issue_example_mix_of_tasks():
    model = Net()
    alg = lc.LC(
        model,
        {
            "fc1.weight": lc.AdaptiveQuantization(k=2),
            ("fc2.weight", "fc3.weight"): lc.ConstraintL0Pruning(kappa=100),
            "conv1.weight": lc.LowRank(rank=2),
            "fc4.weight": lc.AdaptiveQuantization(k=2) + lc.ConstraintL0Pruning(kappa=5),
        },
    )
    d = alg.decompressed()
    assert torch.unique(d["fc1.weight"]).numel() == 2
    assert int(torch.count_nonzero(d["fc2.weight"])) + int(torch.count_nonzero(d["fc3.weight"])) == 100
    assert int(torch.linalg.matrix_rank(d["conv1.weight"].reshape(8, -1))) == 2
    resid = d["fc4.weight"] - alg.tasks[3].compression.parts[0].decompress().reshape(3, 32)
    assert int(torch.count_nonzero(resid)) <= 5
    rep = alg.size_report()
    total = sum(p.numel() for p in model.parameters())
    assert rep["reference_bits"] == 32 * total
    assert rep["compressed_bits"] == rep["other_bits"] + sum(r["bits"] for r in rep["tasks"])
    assert rep["ratio"] == pytest.approx(rep["reference_bits"] / rep["compressed_bits"])
    assert rep["tasks"][0]["bits"] == 32 * 128 + 64


def test_pattern_tasks_get_their_own_compression_copies():
    model = MLP()
    q = lc.AdaptiveQuantization(k=2)
    alg = lc.LC(model, {"re:fc\\d\\.weight": q})
    assert [t.name for t in alg.tasks] == ["fc1.weight", "fc2.weight", "fc3.weight"]
    assert alg.tasks[0].compression is q
    assert len({id(t.compression) for t in alg.tasks}) == 3
    assert not torch.equal(alg.tasks[0].compression.theta["codebook"], alg.tasks[1].compression.theta["codebook"])
    joint = lc.LC(MLP(), {("re:fc\\d\\.weight",): lc.AdaptiveQuantization(k=2)})
    assert len(joint.tasks) == 1 and joint.tasks[0].param_names == ["fc1.weight", "fc2.weight", "fc3.weight"]


# ---- the model is never replaced behind the user's back ---------------------------------------------------------
def test_parameters_keep_identity_and_compressed_restores():
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = [id(p) for p in model.parameters()]
    ptrs = [p.data_ptr() for p in model.parameters()]
    before = [p.detach().clone() for p in model.parameters()]
    alg = lc.LC(model, {"re:.*weight": lc.TernaryQuantization()})
    alg.c_step(1.0)
    with alg.compressed():
        assert torch.equal(model.fc1.weight, alg.decompressed()["fc1.weight"])
        assert torch.equal(model.fc1.bias, before[1])  # untouched
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    with pytest.raises(RuntimeError):
        with alg.compressed():
            raise RuntimeError("evaluation failed")
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))
    assert [id(p) for p in model.parameters()] == ids
    assert [p.data_ptr() for p in model.parameters()] == ptrs
    assert [id(p) for p in opt.param_groups[0]["params"]] == ids


# ---- state ------------------------------------------------------------------------------------------------------
def _train(model, alg, opt, mus, x, y, seed):
    g = torch.Generator().manual_seed(seed)
    for mu in mus:
        for _ in range(3):
            b = torch.randint(0, len(x), (64,), generator=g)
            loss = F.cross_entropy(model(x[b]), y[b]) + alg.penalty(mu)
            opt.zero_grad()
            loss.backward()
            opt.step()
        alg.c_step(mu)


def test_state_dict_resume_is_bitwise():
    x, y = teacher_data(500)
    tasks = lambda: {  # noqa: E731
        "fc1.weight": lc.AdaptiveQuantization(k=4),
        ("fc2.weight", "fc3.weight"): lc.ScaledTernaryQuantization() + lc.ConstraintL0Pruning(20),
    }
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    alg = lc.LC(model, tasks())
    mus = lc.geometric(1e-2, 2.0, 5)
    _train(model, alg, opt, mus[:3], x, y, 0)
    ckpt = copy.deepcopy({"model": model.state_dict(), "opt": opt.state_dict(), "lc": alg.state_dict()})
    _train(model, alg, opt, mus[3:], x, y, 1)

    model2 = MLP()
    opt2 = torch.optim.SGD(model2.parameters(), lr=0.05, momentum=0.9)
    model2.load_state_dict(ckpt["model"])
    alg2 = lc.LC(model2, tasks())
    opt2.load_state_dict(ckpt["opt"])
    alg2.load_state_dict(ckpt["lc"])
    assert alg2.step == 3 and alg2.mu == mus[2]
    _train(model2, alg2, opt2, mus[3:], x, y, 1)
    for n, d in alg.decompressed().items():
        assert torch.equal(d, alg2.decompressed()[n]), n
        assert torch.equal(alg.lambdas[n], alg2.lambdas[n]), n
    for p, q in zip(model.parameters(), model2.parameters()):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_other_tasks():
    alg = lc.LC(MLP(), {"fc1.weight": lc.AdaptiveQuantization(k=4)})
    other = lc.LC(MLP(), {"fc1.weight": lc.AdaptiveQuantization(k=8)})
    with pytest.raises(ValueError, match="fc1.weight"):
        other.load_state_dict(alg.state_dict())
    other2 = lc.LC(MLP(), {"fc2.weight": lc.AdaptiveQuantization(k=4)})
    with pytest.raises(ValueError, match="tasks"):
        other2.load_state_dict(alg.state_dict())


def _lc_snapshot(alg):
    st = alg.state_dict()
    return st, [t.compression.state_dict() for t in alg.tasks]


def _same_state(a, b):
    (sa, ca), (sb, cb) = a, b
    assert sa["mu"] == sb["mu"] and sa["step"] == sb["step"]
    for k in ("deltas", "lambdas"):
        for n in sa[k]:
            assert torch.equal(sa[k][n], sb[k][n]), (k, n)
    for x, y in zip(ca, cb):
        assert x["config"] == y["config"] and x["shape"] == y["shape"]
        assert x["theta"].keys() == y["theta"].keys()
        for key, v in x["theta"].items():
            w = y["theta"][key]
            assert (torch.equal(v, w) if isinstance(v, torch.Tensor) else v == w), key


@pytest.mark.parametrize(
    "damage", ["missing_lambda", "bad_delta_shape", "nan_lambda", "no_step", "bad_mu", "bad_theta", "short_theta"]
)
def test_load_state_dict_is_atomic(damage):
    """A bad state dict raises ValueError naming what is wrong, and leaves the LC exactly as it was."""
    model = MLP()
    tasks = {"fc1.weight": lc.AdaptiveQuantization(k=4), ("fc2.weight", "fc3.weight"): lc.ConstraintL0Pruning(50)}
    src = lc.LC(model, tasks)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    src.c_step(0.3)
    state = copy.deepcopy(src.state_dict())
    target = lc.LC(MLP(), {"fc1.weight": lc.AdaptiveQuantization(k=4), ("fc2.weight", "fc3.weight"): lc.ConstraintL0Pruning(50)})
    target.c_step(0.1)
    before = _lc_snapshot(target)
    match = {
        "missing_lambda": "lambdas\\['fc3.weight'\\]",
        "bad_delta_shape": "deltas\\['fc2.weight'\\] has shape",
        "nan_lambda": "finite",
        "no_step": "'step'",
        "bad_mu": "mu=",
        "bad_theta": "task .*compression state is not valid",
        "short_theta": "task .*compression state is not valid",
    }[damage]
    if damage == "missing_lambda":
        del state["lambdas"]["fc3.weight"]
    elif damage == "bad_delta_shape":
        state["deltas"]["fc2.weight"] = state["deltas"]["fc2.weight"][:3]
    elif damage == "nan_lambda":
        state["lambdas"]["fc1.weight"][0, 0] = float("nan")
    elif damage == "no_step":
        del state["step"]
    elif damage == "bad_mu":
        state["mu"] = -1.0
    elif damage == "bad_theta":  # the second task's compression state is broken; the first one loads first
        state["tasks"][1]["compression"]["theta"] = {"garbage": 1}
    elif damage == "short_theta":  # Θ of the wrong size: every surviving index but the last
        theta = state["tasks"][1]["compression"]["theta"]
        big = max((k for k, v in theta.items() if isinstance(v, torch.Tensor)), key=lambda k: theta[k].numel())
        theta[big] = theta[big][:-1]
    with pytest.raises((ValueError, TypeError, KeyError), match=match):
        target.load_state_dict(state)
    _same_state(before, _lc_snapshot(target))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_penalty_is_computed_in_float32(dtype):
    """μ/2‖w − Δ − λ/μ‖² at μ = 1000 overflows float16 if formed in it; the value and both gradient forms match a
    float64 closed form, and λ stays float32."""
    model = MLP().to(dtype)
    alg = lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(k=2), ("fc2.weight", "fc3.weight"): lc.ConstraintL0Pruning(100)})
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    alg.c_step(200.0)
    assert all(l.dtype == torch.float32 for l in alg.lambdas.values())
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5 * torch.randn_like(p))
    mu = 1000.0
    params = dict(model.named_parameters())
    deltas, lams = alg.decompressed(), alg.lambdas
    expected = sum(
        mu / 2 * float(((params[n].detach().double() - deltas[n].double() - lams[n].double() / mu) ** 2).sum())
        for n in deltas
    )
    assert expected > 70000  # far past float16's range: the old half-precision sum was inf
    pen = alg.penalty(mu)
    assert pen.dtype == torch.float32 and math.isfinite(float(pen))
    assert float(pen) == pytest.approx(expected, rel=1e-4)
    pen.backward()
    loss_form = {n: params[n].grad.clone() for n in deltas}
    for p in model.parameters():
        p.grad = None
    alg.penalty_grad_(mu)
    for n in deltas:
        exact = mu * (params[n].detach().double() - deltas[n].double() - lams[n].double() / mu)
        for g in (loss_form[n], params[n].grad):
            assert g.dtype == dtype
            assert torch.allclose(g.double(), exact.to(dtype).double(), rtol=1e-2, atol=1e-2 * float(exact.abs().max())), n


def test_subnormals_are_flushed_unless_asked_not_to():
    """LC turns on flush-to-zero (late LC steps make many weights and multipliers subnormal, which x86 CPUs compute
    slowly); flush_denormal=False leaves the process setting alone."""
    supported = torch.set_flush_denormal(False)  # earlier tests' LC objects turned it on
    try:
        sub = torch.tensor([1e-40], dtype=torch.float32)
        assert float(sub) != 0.0  # a subnormal float32 (below 1.2e-38)
        lc.LC(MLP(), {"fc1.weight": lc.BinaryQuantization()}, flush_denormal=False)
        assert float(sub * 1.0) != 0.0
        lc.LC(MLP(), {"fc1.weight": lc.BinaryQuantization()})
        assert float(sub * 1.0) == (0.0 if supported else float(sub))
    finally:
        torch.set_flush_denormal(True)
    with pytest.raises(TypeError, match="flush_denormal"):
        lc.LC(MLP(), {"fc1.weight": lc.BinaryQuantization()}, flush_denormal="yes")


def test_export_and_run_warn_when_the_run_ends_infeasible(tmp_path, caplog):
    x = torch.randn(256, 20)
    y = torch.randint(0, 4, (256,))

    sched = {"now": [1e-6, 2e-6]}

    def l_step(m, penalty, step):
        opt = torch.optim.SGD(m.parameters(), lr=lc.clip_lr(0.05, sched["now"][step]))
        for _ in range(20):
            loss = F.cross_entropy(m(x), y) + penalty()
            opt.zero_grad(); loss.backward(); opt.step()

    with pytest.raises(ValueError, match="feasibility_tol"):
        lc.LC(MLP(), {"fc1.weight": lc.BinaryQuantization()}, feasibility_tol=0.0)
    model = MLP()
    alg = lc.LC(model, {"re:fc\\d\\.weight": lc.AdaptiveQuantization(k=2)})
    with caplog.at_level(logging.WARNING, logger="lcompress"):
        alg.run(l_step, sched["now"], progress=False)  # μ far too small: w stays at the reference
    assert any("ended infeasible" in r.getMessage() for r in caplog.records)
    rel = alg.check_feasible(warn=False)
    assert rel > 0.1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcompress"):
        alg.export(tmp_path / "a.lcz")  # the same C step: warned once already
    assert not [r for r in caplog.records if "ended infeasible" in r.getMessage()]
    alg.c_step(3e-6)
    with caplog.at_level(logging.WARNING, logger="lcompress"):
        alg.export(tmp_path / "a.lcz")
    assert len([r for r in caplog.records if "ended infeasible" in r.getMessage()]) == 1
    caplog.clear()
    sched["now"] = lc.geometric(1.0, 10.0, 5)
    alg.run(l_step, sched["now"], progress=False)  # now μ pins w to Δ
    assert alg.check_feasible(warn=False) < 1e-3
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="lcompress"):
        alg.export(tmp_path / "b.lcz")
    assert not [r for r in caplog.records if "ended infeasible" in r.getMessage()]


# ---- wrappers ---------------------------------------------------------------------------------------------------
def test_compiled_and_prefixed_names():
    model = MLP()
    compiled = torch.compile(model)  # not called, so nothing is compiled
    alg = lc.LC(compiled, {"fc1.weight": lc.BinaryQuantization(), "_orig_mod.fc2.weight": lc.BinaryQuantization()})
    assert alg.model is model
    assert [t.name for t in alg.tasks] == ["fc1.weight", "fc2.weight"]


def test_distributed_data_parallel_wrapper(tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        model = MLP()
        ddp = nn.parallel.DistributedDataParallel(model)
        alg = lc.LC(ddp, {"fc1.weight": lc.AdaptiveQuantization(k=2), "module.fc2.weight": lc.LowRank(rank=3)})
        x, y = teacher_data(64)
        loss = F.cross_entropy(ddp(x), y) + alg.penalty(1e-2)
        loss.backward()
        assert model.fc1.weight.grad is not None
        alg.c_step(1e-2)
        with alg.compressed() as m:
            assert m is ddp
            assert torch.unique(model.fc1.weight).numel() == 2
    finally:
        dist.destroy_process_group()


# ---- errors -----------------------------------------------------------------------------------------------------
class IntParam(MLP):
    def __init__(self):
        super().__init__()
        self.counts = nn.Parameter(torch.zeros(3, dtype=torch.long), requires_grad=False)


@pytest.mark.parametrize(
    "tasks, exc, match",
    [
        ({"fc9.weight": lc.BinaryQuantization()}, ValueError, "fc9.weight.*did you mean"),
        ({"re:conv.*": lc.BinaryQuantization()}, ValueError, "matches no parameter"),
        ({"re:fc[": lc.BinaryQuantization()}, ValueError, "invalid regular expression"),
        ({"fc1.weight": lc.BinaryQuantization(), ("fc2.weight", "fc1.weight"): lc.BinaryQuantization()}, ValueError, "two tasks"),
        ({"fc1.weight": lc.ConstraintL0Pruning(kappa=10**6)}, ValueError, "fc1.weight.*kappa=1000000"),
        ({"fc1.weight": lc.LowRank(rank=100)}, ValueError, "fc1.weight.*rank=100"),
        ({"fc1.bias": lc.LowRank(rank=1)}, ValueError, "fc1.bias.*matrix"),
        ({("fc1.weight", "fc2.weight"): lc.LowRank(rank=1)}, ValueError, "single"),
        ({"fc1.weight": "binary"}, TypeError, "Compression"),
        ({3: lc.BinaryQuantization()}, TypeError, "task key"),
        ({}, ValueError, "non-empty"),
    ],
)
def test_bad_task_maps(tasks, exc, match):
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(exc, match=match):
        lc.LC(model, tasks)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_integer_parameters_rejected():
    with pytest.raises(TypeError, match="counts.*dtype"):
        lc.LC(IntParam(), {"counts": lc.BinaryQuantization()})


def test_flops_criterion_on_conv_needs_positions():
    with pytest.raises(ValueError, match="positions"):
        lc.LC(Net(), {"conv1.weight": lc.RankSelection(alpha=1e-3, criterion="flops")})
    lc.LC(Net(), {"conv1.weight": lc.RankSelection(alpha=1e-3, criterion="flops", positions=16)})


def test_bad_mu_and_nan_leave_state_unchanged(caplog):
    model = MLP()
    alg = lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(k=2), "fc2.weight": lc.AdaptiveQuantization(k=2)})
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="mu="):
            alg.c_step(bad)
        with pytest.raises(ValueError, match="mu="):
            alg.penalty(bad)
    alg.c_step(1.0)
    state = copy.deepcopy(alg.state_dict())
    weights = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        model.fc2.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="fc2.weight.*NaN"):
        alg.c_step(2.0)
    with torch.no_grad():
        model.fc2.weight[0, 0] = weights[2][0, 0]
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    after = alg.state_dict()
    assert after["step"] == state["step"] and after["mu"] == state["mu"]
    for n in state["deltas"]:
        assert torch.equal(after["deltas"][n], state["deltas"][n])
    assert torch.equal(alg.tasks[0].compression.theta["codebook"], state["tasks"][0]["compression"]["theta"]["codebook"])
    with caplog.at_level(logging.WARNING, logger="lcompress"):
        alg.c_step(0.5)
    assert any("smaller than the previous" in r.message for r in caplog.records)


def test_failed_compression_restores_earlier_tasks(monkeypatch):
    model = MLP()
    alg = lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(k=2), "fc2.weight": lc.AdaptiveQuantization(k=2)})
    cb = alg.tasks[0].compression.theta["codebook"].clone()
    with torch.no_grad():
        model.fc1.weight.mul_(3)

    def boom(*a, **k):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(alg.tasks[1].compression, "_compress", boom)
    with pytest.raises(RuntimeError):
        alg.c_step(1.0)
    assert torch.equal(alg.tasks[0].compression.theta["codebook"], cb)
    assert alg.step == 0


# ---- the convenience driver and helpers -----------------------------------------------------------------------------
def test_run_driver(caplog):
    x, y = teacher_data(400)
    model = MLP()
    alg = lc.LC(model, {"re:fc\\d\\.weight": lc.ScaledBinaryQuantization()})
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    calls = []

    def l_step(m, penalty, step):
        calls.append(step)
        for _ in range(5):
            loss = F.cross_entropy(m(x), y) + penalty()
            opt.zero_grad()
            loss.backward()
            opt.step()

    with caplog.at_level(logging.INFO, logger="lcompress"):
        hist = alg.run(l_step, lc.geometric(1e-2, 3.0, 4), evaluate=lambda m: full_loss(m, x, y), progress=False)
    logged = [r.getMessage() for r in caplog.records]
    assert sum("mu=" in m and "||w - Delta||=" in m for m in logged) == 4
    assert sum(m.strip().startswith("task fc1.weight:") for m in logged) == 4  # per-task sizes every step
    assert calls == [0, 1, 2, 3] and len(hist) == 4
    assert hist[-1]["mu"] == pytest.approx(0.09 * 3)
    assert all(h["evaluation"] is not None and h["ratio"] > 1 for h in hist)
    assert hist[-1]["feasibility"] < hist[0]["feasibility"]


def test_clip_lr_and_geometric():
    assert lc.clip_lr(0.1, 100.0) == pytest.approx(0.01)
    assert lc.clip_lr(0.1, 1.0) == 0.1
    assert lc.geometric(1.0, 2.0, 3) == [1.0, 2.0, 4.0]
    with pytest.raises(ValueError, match="factor"):
        lc.geometric(1.0, 0.5, 3)
    with pytest.raises(ValueError, match="mu0"):
        lc.geometric(0.0, 2.0, 3)
    with pytest.raises(ValueError, match="mu="):
        lc.clip_lr(0.1, 0.0)
    assert lc.clip_lr(0.1, 100.0, scale=0.5) == pytest.approx(0.005)
    assert lc.clip_lr(0.1, 4.0, scale=0.5) == 0.1
    with pytest.raises(ValueError, match="scale=0"):
        lc.clip_lr(0.1, 1.0, scale=0)


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_clip_lr_scale_keeps_nesterov_momentum_stable_up_to_its_margin(scale):
    """Nesterov SGD (torch's, β = 0.9) on a quadratic of curvature μ + h at lr = clip_lr(1, μ, scale): stable while
    lr·(μ + h) < 2(1 + β)/(1 + 2β) = 1.357, i.e. h < (1.357/scale − 1)·μ; the run blows up just past that."""
    mu = 10.0
    limit = (2 * 1.9 / 2.8 / scale - 1) * mu  # the loss's curvature the cap leaves room for

    def final(h):
        x = torch.ones(1, requires_grad=True)
        opt = torch.optim.SGD([x], lr=lc.clip_lr(1.0, mu, scale), momentum=0.9, nesterov=True)
        for _ in range(2000):
            opt.zero_grad()
            (0.5 * (mu + h) * x.pow(2)).sum().backward()
            opt.step()
        return float(x.abs())

    assert final(0.97 * limit) < 1e-3
    assert not final(1.03 * limit) < 1e3  # diverged (inf or nan)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_given_to_lc_are_blamed_on_the_model_not_an_l_step(bad):
    # no L step has run at construction: the error must say the model came with NaN/Inf and name the parameter,
    # not suggest a smaller learning rate
    model = MLP()
    with torch.no_grad():
        model.fc2.weight[3, 5] = bad
        model.fc2.weight[0, 1] = bad
    with pytest.raises(ValueError) as e:
        lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(k=2), ("fc2.weight", "fc3.weight"): lc.ConstraintL0Pruning(10)})
    msg = str(e.value)
    assert "before LC started" in msg and "'fc2.weight'" in msg and "2 of 4096 values" in msg, msg
    assert "L step" not in msg.replace("no L step", "") and "learning rate" not in msg, msg
    # a finite model still constructs, and a NaN after construction keeps the L-step hint
    model = MLP()
    alg = lc.LC(model, {"fc1.weight": lc.AdaptiveQuantization(k=2)})
    with torch.no_grad():
        model.fc1.weight[0, 0] = bad
    with pytest.raises(ValueError, match="did the L step diverge"):
        alg.c_step(1.0)
