import json
import logging

import pytest
import torch

from lcompress.data import Dataset
from lcompress.models import MODELS, get_model
from lcompress.training import evaluate, load_checkpoint, save_checkpoint, train_reference


def n_params(m):
    return sum(p.numel() for p in m.parameters())


def resnet_formula(depth, classes=10):
    """Parameters of the CIFAR ResNet with option-A shortcuts, by hand:
    3x3 convs without bias, BN with weight+bias per channel."""
    n = (depth - 2) // 6
    total = 3 * 16 * 9 + 2 * 16  # stem conv + BN
    cin = 16
    for c in (16, 32, 64):
        for _ in range(n):
            total += cin * c * 9 + 2 * c + c * c * 9 + 2 * c
            cin = c
    return total + 64 * classes + classes


def test_registry_lists_models():
    for name in ["lenet300", "lenet300_classic", "lenet5", "resnet20", "resnet32",
                 "resnet56", "resnet110", "vgg16", "mlp"]:
        assert name in MODELS


def test_unknown_model_error():
    with pytest.raises(ValueError) as ei:
        get_model("resnet9000")
    msg = str(ei.value)
    assert "resnet9000" in msg and "lenet300" in msg and "vgg16" in msg


@pytest.mark.parametrize(
    "name,count",
    [("lenet300", 266_610), ("lenet300_classic", 266_610), ("lenet5", 431_080),
     ("resnet20", 269_722), ("resnet32", 464_154), ("resnet56", 853_018),
     ("resnet110", 1_727_962), ("vgg16", 14_987_722)],
)
def test_parameter_counts(name, count):
    assert n_params(get_model(name)) == count


@pytest.mark.parametrize("depth", [20, 32, 56, 110])
def test_resnet_counts_match_formula(depth):
    assert n_params(get_model(f"resnet{depth}")) == resnet_formula(depth)


def test_resnet_published_sizes():
    # He et al. (2016), Table 6: 0.27M, 0.46M, 0.85M, 1.7M
    for depth, m in [(20, 0.27), (32, 0.46), (56, 0.85), (110, 1.7)]:
        assert abs(resnet_formula(depth) / 1e6 - m) < 0.03


def test_lenet_layer_names():
    assert [n for n, _ in get_model("lenet300").named_children()] == ["fc1", "fc2", "fc3"]
    names = dict(get_model("lenet5").named_children())
    assert set(names) == {"conv1", "conv2", "fc1", "fc2"}
    assert names["conv1"].weight.shape == (20, 1, 5, 5)
    assert names["fc1"].weight.shape == (500, 800)


@pytest.mark.parametrize(
    "name,shape",
    [("lenet300", (3, 1, 28, 28)), ("lenet300", (3, 784)), ("lenet300_classic", (3, 1, 28, 28)),
     ("lenet5", (3, 1, 28, 28)), ("resnet20", (2, 3, 32, 32)), ("resnet32", (2, 3, 32, 32)),
     ("vgg16", (2, 3, 32, 32)), ("mlp", (3, 784))],
)
def test_forward_shapes(name, shape):
    torch.manual_seed(0)
    m = get_model(name)
    out = m(torch.randn(*shape))
    assert out.shape == (shape[0], 10)
    assert torch.isfinite(out).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet56", "resnet110"])
def test_forward_deep_resnets(name):
    m = get_model(name).eval()
    with torch.no_grad():
        assert m(torch.randn(1, 3, 32, 32)).shape == (1, 10)


def test_lenet300_activation():
    x = torch.randn(4, 784)
    relu = get_model("lenet300")
    tanh = get_model("lenet300", activation="tanh")
    tanh.load_state_dict(relu.state_dict())
    assert not torch.allclose(relu(x), tanh(x))
    classic = get_model("lenet300_classic")
    classic.load_state_dict(relu.state_dict())
    assert torch.allclose(classic(x), tanh(x))
    with pytest.raises(ValueError, match="sigmoid"):
        get_model("lenet300", activation="sigmoid")


def test_mlp_sizes():
    m = get_model("mlp", sizes=[784, 1024, 1024, 10])
    assert [n for n, _ in m.named_children()] == ["fc1", "fc2", "fc3"]
    assert n_params(m) == 784 * 1024 + 1024 + 1024 * 1024 + 1024 + 1024 * 10 + 10
    m2 = get_model("mlp", sizes=[5, 3])
    assert m2(torch.randn(2, 5)).shape == (2, 3)


def test_resnet_shortcut_is_identity_when_branch_zero():
    # With the residual branch's last BN zeroed, an option-A block outputs
    # relu(shortcut(x)): subsampled input with zero-padded channels.
    m = get_model("resnet20").eval()
    block = m.layer2[0]
    torch.nn.init.zeros_(block.bn2.weight)
    torch.nn.init.zeros_(block.bn2.bias)
    x = torch.rand(2, 16, 32, 32)
    with torch.no_grad():
        out = block(x)
    assert out.shape == (2, 32, 16, 16)
    assert torch.equal(out[:, 8:24], x[:, :, ::2, ::2])
    assert out[:, :8].abs().max() == 0 and out[:, 24:].abs().max() == 0


# ------------------------------------------------------------- training


def separable_problem(n=600, d=20, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(d, classes, generator=g)
    x = torch.randn(n, d, generator=g)
    y = (x @ w).argmax(1)
    return Dataset(x[:500], y[:500], x[500:], y[500:])


def test_train_reference_learns(caplog):
    data = separable_problem()
    torch.manual_seed(0)
    model = get_model("mlp", sizes=[20, 32, 4])
    before = evaluate(model, data.x_test, data.y_test)
    with caplog.at_level(logging.INFO, logger="lcompress.training"):
        hist = train_reference(model, data, epochs=5, lr=0.05, batch_size=32, progress=False)
    after = evaluate(model, data.x_test, data.y_test)
    assert len(hist) == 5
    assert hist[-1]["loss"] < hist[0]["loss"]
    assert hist[1]["lr"] == pytest.approx(0.05 * 0.99)
    assert after < 15.0 < before  # chance is 75 %
    assert sum("epoch" in r.getMessage() for r in caplog.records) == 5


def test_train_reference_reproducible():
    data = separable_problem()
    outs = []
    for _ in range(2):
        torch.manual_seed(1)
        m = get_model("mlp", sizes=[20, 16, 4])
        train_reference(m, data, epochs=2, lr=0.05, batch_size=50, seed=3, progress=False)
        outs.append(m.fc1.weight.detach().clone())
    assert torch.equal(outs[0], outs[1])


def test_train_reference_with_augment_and_progress():
    data = separable_problem()
    calls = []

    def aug(xb, gen):
        calls.append(xb.shape[0])
        return xb

    m = get_model("mlp", sizes=[20, 8, 4])
    train_reference(m, data, epochs=1, lr=0.05, batch_size=100, augment=aug, progress=True)
    assert calls == [100] * 5


def test_evaluate_restores_mode_and_counts():
    m = get_model("lenet5")
    m.train()
    x = torch.randn(10, 1, 28, 28)
    with torch.no_grad():
        pred = m.eval()(x).argmax(1)
    m.train()
    y = pred.clone()
    y[:3] = (y[:3] + 1) % 10
    assert evaluate(m, x, y, batch_size=4) == pytest.approx(30.0)
    assert m.training
    m.eval()
    evaluate(m, x, y)
    assert not m.training


def test_checkpoint_roundtrip(tmp_path):
    torch.manual_seed(0)
    m = get_model("resnet20")
    m.train()
    m(torch.randn(4, 3, 32, 32))  # update BN running stats (buffers)
    meta = {"model": "resnet20", "kwargs": {}, "dataset": "cifar10",
            "test_error": 8.25, "epochs": 3, "seed": 0}
    p = tmp_path / "sub" / "ck.pt"
    save_checkpoint(p, m, meta)
    assert sorted(x.name for x in (tmp_path / "sub").iterdir()) == ["ck.pt"]  # no temporary file left, whatever its name
    m2 = get_model("resnet20")
    assert not torch.equal(m2.conv1.weight, m.conv1.weight)
    got = load_checkpoint(p, m2)
    assert got == meta
    sd1, sd2 = m.state_dict(), m2.state_dict()
    assert sd1.keys() == sd2.keys()
    assert all(torch.equal(sd1[k], sd2[k]) for k in sd1)
    # meta-only load exposes the raw state dict
    raw = load_checkpoint(p)
    assert torch.equal(raw["state_dict"]["fc.weight"], m.fc.weight)
    # overwriting an existing checkpoint works
    save_checkpoint(p, m2, {"x": 1})
    assert load_checkpoint(p, m2) == {"x": 1}


def test_checkpoint_rejects_bad_meta_and_wrong_model(tmp_path):
    m = get_model("lenet300")
    with pytest.raises(TypeError, match="JSON"):
        save_checkpoint(tmp_path / "a.pt", m, {"t": torch.zeros(1)})
    assert list(tmp_path.iterdir()) == []  # neither a.pt nor a temporary file of any name
    save_checkpoint(tmp_path / "b.pt", m, {"model": "lenet300"})
    with pytest.raises(RuntimeError):
        load_checkpoint(tmp_path / "b.pt", get_model("lenet5"))
    torch.save({"hello": 1}, tmp_path / "c.pt")
    with pytest.raises(ValueError, match="not an lcompress checkpoint"):
        load_checkpoint(tmp_path / "c.pt", m)
    json.dumps(load_checkpoint(tmp_path / "b.pt", m))
