"""μ schedules: geometric and the automatic one, including what it measures itself."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcompress as lc


def _setup():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    x, y = torch.randn(96, 10), torch.randint(0, 3, (96,))
    alg = lc.LC(model, {"re:\\d\\.weight": lc.AdaptiveQuantization(k=2)})
    return model, alg, x, y


def test_measure_direct_compression_matches_a_hand_computation():
    model, alg, x, y = _setup()
    batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, 96, 32)]
    before = [p.detach().clone() for p in model.parameters()]
    loss, loss_dc, gnorm = lc.measure_direct_compression(alg, lambda m, b: F.cross_entropy(m(b[0]), b[1]), batches)
    # independent: the whole set at once in float64 (equal batches, so the mean of means is the mean)
    m64 = [p.detach().double() for p in model.parameters()]
    d = alg.decompressed()

    def ce(w1, b1, w2, b2):
        return F.cross_entropy(torch.relu(x.double() @ w1.T + b1) @ w2.T + b2, y)

    assert loss == pytest.approx(float(ce(*m64)), rel=1e-5)
    w1 = d["0.weight"].double().requires_grad_()
    w2 = d["2.weight"].double().requires_grad_()
    out = ce(w1, m64[1], w2, m64[3])
    g1, g2 = torch.autograd.grad(out, (w1, w2))
    assert loss_dc == pytest.approx(float(out), rel=1e-5)
    assert gnorm == pytest.approx(math.sqrt(float(g1.norm()) ** 2 + float(g2.norm()) ** 2), rel=1e-4)
    assert loss_dc > loss
    for p, b in zip(model.parameters(), before):
        assert torch.equal(p, b) and p.grad is None
    assert model.training  # restored


def test_auto_schedule_measures_itself_the_same_as_given_values():
    model, alg, x, y = _setup()
    batches = [(x, y)]
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    loss, loss_dc, gnorm = lc.measure_direct_compression(alg, loss_fn, batches)
    by_hand = lc.auto_schedule(alg, 10, loss_dc - loss, gnorm)
    measured = lc.auto_schedule(alg, 10, loss_fn=loss_fn, batches=batches)
    assert measured == pytest.approx(by_hand, rel=1e-12)
    assert all(b > a for a, b in zip(measured, measured[1:]))


def test_auto_schedule_argument_errors():
    model, alg, x, y = _setup()
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    with pytest.raises(ValueError, match="loss_fn and batches together"):
        lc.auto_schedule(alg, 5, loss_fn=loss_fn)
    with pytest.raises(ValueError, match="not both"):
        lc.auto_schedule(alg, 5, 0.1, 1.0, loss_fn=loss_fn, batches=[(x, y)])
    with pytest.raises(ValueError, match="loss_increase and grad_norm"):
        lc.auto_schedule(alg, 5)
    with pytest.raises(ValueError, match="batches is empty"):
        lc.auto_schedule(alg, 5, loss_fn=loss_fn, batches=[])
    with pytest.raises(ValueError, match=r"loss_fn\(model, batches\[0\]\) must return a finite 0-d tensor"):
        lc.auto_schedule(alg, 5, loss_fn=lambda m, b: m(b[0]), batches=[(x, y)])


@pytest.mark.parametrize("hold, held", [(0.0, 0), (0.5, 10), (0.33, 7), (0.99, 18)])  # at most steps - 2 held: the last μ is still μ_T
def test_auto_schedule_hold_keeps_mu0_then_grows_geometrically_to_the_same_last_mu(hold, held):
    model, alg, x, y = _setup()
    dl, gn, pf, fd = 0.2, 0.7, 1.0, 0.01
    mus = lc.auto_schedule(alg, 20, dl, gn, penalty_fraction=pf, final_distance=fd, hold=hold)
    # independent: the schedule's formulas from the weights and their direct compression
    d = alg.decompressed()
    d0 = sum(float((p.detach().double() - d[n].double()).pow(2).sum()) for n, p in model.named_parameters() if n in d)
    mu0 = pf * 2 * dl / d0
    mu_t = max(gn / (fd * math.sqrt(d0)), 100 * mu0)
    assert len(mus) == 20
    assert mus[:held + 1] == pytest.approx([mu0] * (held + 1), rel=1e-6)  # D0: a float32 sum
    assert mus[-1] == pytest.approx(mu_t, rel=1e-6)
    ratios = [b / a for a, b in zip(mus[held:], mus[held + 1:])]
    assert ratios == pytest.approx([(mu_t / mu0) ** (1 / (19 - held))] * (19 - held), rel=1e-6)


def test_auto_schedule_hold_errors_name_the_value():
    model, alg, x, y = _setup()
    for bad in (1.0, -0.1, float("nan"), True, "0.5"):
        with pytest.raises(ValueError, match=r"hold=.* must be a number in \[0, 1\)"):
            lc.auto_schedule(alg, 5, 0.1, 1.0, hold=bad)


def test_auto_schedule_on_a_batchnorm_cnn_emits_no_warning():
    # a user's BatchNorm CNN leaked "Converting a tensor with requires_grad=True to a scalar" (float() of the
    # loss at Δ, which needs its graph for the gradient)
    import warnings

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    alg = lc.LC(model, {"0.weight": lc.AdaptiveQuantization(k=2), "4.weight": lc.AdaptiveQuantization(k=2)})
    batches = [(torch.randn(8, 1, 8, 8), torch.randint(0, 3, (8,))) for _ in range(3)]
    loss_fn = lambda m, b: F.cross_entropy(m(b[0]), b[1])  # noqa: E731
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mus = lc.auto_schedule(alg, 6, loss_fn=loss_fn, batches=batches)
    assert len(mus) == 6 and all(b > a for a, b in zip(mus, mus[1:]))
    # the value is unchanged by the detach: the same as the loss at Δ computed without a graph
    with torch.no_grad(), alg.compressed():
        model.eval()
        by_hand = sum(float(loss_fn(model, b)) for b in batches) / len(batches)
        model.train()
    _, loss_dc, _ = lc.measure_direct_compression(alg, loss_fn, batches)
    assert loss_dc == pytest.approx(by_hand, rel=1e-6)
