"""Peers (lcompress.peers): the straight-through maps against brute force and hand-computed gradients, the GMP
schedule against its formula, and every peer's final model exactly representable by the task's compression."""
import copy

import pytest
import torch

import lcompress as lc
from lcompress.data import Dataset
from lcompress.models import get_model
from lcompress.peers import METHODS, Peer, gmp_kept, gmp_sparsity, nearest_centroid_ste, scaled_sign_ste, train_peer
from lcompress.training import train_reference

FC = "re:fc\\d\\.weight"
ALL = ("fc1.weight", "fc2.weight", "fc3.weight")
SIZES = [16, 32, 32, 4]


def blobs(n_train=512, n_test=256, dim=16, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = 0.6 * torch.randn(classes, dim, generator=g)

    def draw(n):
        y = torch.randint(classes, (n,), generator=g)
        return centers[y] + torch.randn(n, dim, generator=g), y

    return Dataset(*draw(n_train), *draw(n_test))


@pytest.fixture(scope="module")
def data():
    return blobs()


@pytest.fixture(scope="module")
def reference(data):
    torch.manual_seed(0)
    model = get_model("mlp", sizes=SIZES)
    train_reference(model, data, 4, lr=0.05, batch_size=64, progress=False)
    return model


SCHEMES = {
    "ste_codebook": {FC: lc.AdaptiveQuantization(k=4)},
    "scaled_sign_ste": {FC: lc.ScaledBinaryQuantization()},
    "gmp": {ALL: lc.ConstraintL0Pruning(fraction=0.05)},
    "oneshot_prune": {ALL: lc.ConstraintL0Pruning(fraction=0.05)},
    "ste_codebook_gmp": {ALL: lc.AdaptiveQuantization(k=2) + lc.ConstraintL0Pruning(fraction=0.02)},
}


def brute_nearest(w, c):
    """c[argmin_k |w − c_k|], ties to the smaller centroid value."""
    cs, _ = torch.sort(c)
    d = (w[:, None] - cs[None, :]).abs()
    return cs[torch.argmin(d, dim=1)]  # argmin takes the first minimum: the smaller value


def structure(comp):
    """The discrete part of Θ: codes of codebooks, supports of sparse parts."""
    parts = comp.parts if isinstance(comp, lc.AdditiveCombination) else [comp]
    return [p.theta["indices"] if "indices" in p.theta else p.theta["codes"] for p in parts]


# ---- straight-through maps ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_ste_forward_is_nearest_centroid(k):
    g = torch.Generator().manual_seed(k)
    w = torch.randn(2000, generator=g)
    c = torch.randn(k, generator=g)  # unsorted on purpose
    assert torch.equal(nearest_centroid_ste(w, c), brute_nearest(w, c))


def test_peer_forward_weights_are_nearest_centroid_of_the_latent_weights(reference):
    model = copy.deepcopy(reference)
    peer = Peer(model, {FC: lc.AdaptiveQuantization(k=4)}, "ste_codebook")
    with torch.no_grad():  # move the codebooks off their k-means start, out of order
        for h in peer.handlers:
            h.codebook.copy_(h.codebook.flip(0) + 0.01 * torch.arange(4.0))
    w = peer.weights()
    assert sorted(w) == list(ALL)
    for h, name in zip(peer.handlers, ALL):
        latent = model.get_parameter(name).detach()
        assert torch.equal(w[name], brute_nearest(latent.reshape(-1), h.codebook.detach()).reshape(latent.shape))
    # the codebook starts at the k-means of the reference weights (LC's own direct compression)
    fresh = Peer(copy.deepcopy(reference), {"fc2.weight": lc.AdaptiveQuantization(k=4)}, "ste_codebook")
    dc = lc.LC(copy.deepcopy(reference), {"fc2.weight": lc.AdaptiveQuantization(k=4)})
    assert torch.equal(fresh.handlers[0].codebook.detach(), dc.tasks[0].compression.theta["codebook"])


@pytest.mark.parametrize("normalize", [True, False])
def test_centroid_gradient_is_the_members_mean(normalize):
    g = torch.Generator().manual_seed(3)
    w = torch.randn(500, generator=g, requires_grad=True)
    c = torch.tensor([0.3, -1.0, 0.1, 50.0], requires_grad=True)  # 50 is empty
    r = torch.randn(500, generator=g)
    (nearest_centroid_ste(w, c, normalize=normalize) * r).sum().backward()
    assert torch.equal(w.grad, r)  # straight through
    # by hand: which centroid each weight went to, then the members' mean (or sum) of ∂L/∂q = r
    want = []
    for k in range(4):
        wd, cd = w.detach().tolist(), c.detach().tolist()
        members = [i for i in range(500) if min(range(4), key=lambda j: (abs(wd[i] - cd[j]), cd[j])) == k]
        s = sum(float(r[i]) for i in members)
        want.append(s / len(members) if normalize and members else s)
    assert want[3] == 0.0
    assert torch.allclose(c.grad, torch.tensor(want), atol=1e-5, rtol=1e-5)


def test_scaled_sign_ste_is_the_scaled_binary_c_step():
    g = torch.Generator().manual_seed(4)
    w = torch.randn(777, generator=g)
    w[5] = 0.0  # sign(0) = +1
    w.requires_grad_(True)
    q = scaled_sign_ste(w)
    a = w.detach().abs().mean()
    assert torch.equal(q, torch.where(w.detach() >= 0, a, -a))
    assert torch.equal(q, lc.ScaledBinaryQuantization().compress(w.detach()))
    r = torch.randn(777, generator=g)
    (q * r).sum().backward()
    assert torch.equal(w.grad, r)


# ---- GMP ----------------------------------------------------------------------------------------------------------
def test_gmp_schedule_values():
    sf, T = 0.95, 1000
    assert gmp_sparsity(0, T, sf) == 0.0
    assert gmp_sparsity(T / 2, T, sf) == pytest.approx(sf * (1 - 0.5**3), rel=1e-12)
    assert gmp_sparsity(T / 4, T, sf) == pytest.approx(sf * (1 - 0.75**3), rel=1e-12)
    assert gmp_sparsity(T, T, sf) == sf and gmp_sparsity(2 * T, T, sf) == sf
    assert gmp_sparsity(0, 0, sf) == sf  # T = 0: one shot
    n, kappa = 266200, 13310
    kept = [gmp_kept(t, T, n, kappa) for t in range(0, T + 1)]
    assert kept[0] == n and kept[-1] == kappa
    assert kept[T // 2] == n - round(gmp_sparsity(T // 2, T, 1 - kappa / n) * n)
    assert all(a >= b for a, b in zip(kept, kept[1:]))
    with pytest.raises(ValueError, match="final_sparsity=1.5"):
        gmp_sparsity(0, T, 1.5)


def test_gmp_global_threshold_cadence_and_final_sparsity(reference):
    model = copy.deepcopy(reference)
    w0 = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in ALL]).clone()
    n = w0.numel()
    peer = Peer(model, {ALL: lc.ConstraintL0Pruning(fraction=0.05)}, "gmp", prune_end=0.5, prune_every=3)
    kappa = round(0.05 * n)
    total = 20
    peer.start(total)  # T = 10
    order = torch.argsort(w0.abs(), descending=True)
    counts = []
    for t in range(total + 1):
        peer.update(t)
        w = torch.cat([model.get_parameter(p).detach().reshape(-1) for p in ALL])
        nz = int((w != 0).sum())
        counts.append(nz)
        keep = gmp_kept(t - t % 3 if t < 10 else 10, 10, n, kappa) if t else n
        assert nz == keep, t
        # the survivors are the largest magnitudes of all three layers together, at their values
        top = torch.zeros(n, dtype=torch.bool)
        top[order[:nz]] = True
        assert torch.equal(w != 0, top) and torch.equal(w[top], w0[top])
    changed = [t for t in range(1, total + 1) if counts[t] != counts[t - 1]]
    assert changed == [3, 6, 9, 10]
    assert counts[-1] == kappa
    assert peer.handlers[0].gmp.updates == [(t, counts[t]) for t in changed]


def test_oneshot_prune_starts_from_the_direct_compression(reference, data):
    tasks = {ALL: lc.ConstraintL0Pruning(fraction=0.1)}
    model = copy.deepcopy(reference)
    peer = Peer(model, tasks, "oneshot_prune")
    peer.start(10)
    peer.update(0)
    dc = lc.LC(copy.deepcopy(reference), copy.deepcopy(tasks))
    for name, d in dc.decompressed().items():
        assert torch.equal(model.get_parameter(name).detach(), d)


# ---- the training loop --------------------------------------------------------------------------------------------
def test_same_data_order_and_optimizer_as_the_l_steps(reference, data):
    """With nothing to compress (keep every weight), a peer run is plain SGD in the L steps' minibatch order
    (generator seeded seed + 1), bit for bit the same as train_reference seeded so."""
    a, b = copy.deepcopy(reference), copy.deepcopy(reference)
    res = train_peer(a, {ALL: lc.ConstraintL0Pruning(fraction=1.0)}, "oneshot_prune", data, epochs=2, lr=0.03,
                     batch_size=64, seed=5, evaluate_every=0)
    train_reference(b, data, 2, lr=0.03, batch_size=64, lr_decay=0.98, seed=6, progress=False)
    for (n, p), q in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(p, q), n
    assert [h["lr"] for h in res.history] == [0.03, 0.03 * 0.98]


@pytest.mark.parametrize("method", list(METHODS))
def test_final_model_is_exactly_representable(method, reference, data, tmp_path):
    tasks = SCHEMES[method]
    model = copy.deepcopy(reference)
    res = train_peer(model, copy.deepcopy(tasks), method, data, epochs=2, lr=0.03, batch_size=64, prune_every=4)
    params = dict(model.named_parameters())
    # the model is Δ(Θ) of the LC object the peer returns, bit for bit
    for name, d in res.lc.decompressed().items():
        assert torch.equal(params[name].detach(), d), name
    # ... and of the compression's own form: K values per layer, κ nonzeros
    for t in res.lc.tasks:
        w = torch.cat([params[n].detach().reshape(-1) for n in t.param_names])
        comp = t.compression
        if method == "ste_codebook":
            assert torch.unique(w).numel() <= comp.k
        elif method == "scaled_sign_ste":
            a = comp.theta["codebook"][1]
            assert torch.equal(w.abs(), a.expand_as(w))
        elif method in ("gmp", "oneshot_prune"):
            assert int((w != 0).sum()) == comp.nnz == round(0.05 * t.numel)
        else:
            q, s = comp.parts
            assert s.nnz == round(0.02 * t.numel)
            assert torch.unique(w[~torch.isin(torch.arange(t.numel), s.theta["indices"])]).numel() <= 2
    # direct compression of the final weights by the task map gives the same model (up to float32 rounding of
    # the codebook means) at the same size
    # the codebooks' (the sum's alternating C step stops at its 1e-6 relative tolerance), with the same codes and
    # supports, at the same size
    dc = lc.LC(copy.deepcopy(model), copy.deepcopy(tasks))
    for name, d in dc.decompressed().items():
        assert torch.allclose(d, params[name].detach(), rtol=0, atol=1e-5), name
    assert res.dc_max_abs_diff == max(float((d - params[n].detach()).abs().max()) for n, d in dc.decompressed().items())
    for mine, theirs in zip(res.lc.tasks, dc.tasks):
        for a, b in zip(structure(mine.compression), structure(theirs.compression)):
            assert torch.equal(a, b)
    assert dc.size_report()["compressed_bits"] == res.sizes["compressed_bits"]
    # the size is LC's for the same scheme: identical for codebooks, for pruning the same count of values
    lc_sizes = lc.LC(copy.deepcopy(reference), copy.deepcopy(tasks)).size_report()
    if method in ("ste_codebook", "gmp", "oneshot_prune", "ste_codebook_gmp"):
        assert [r["stored_values"] for r in lc_sizes["tasks"]] == [r["stored_values"] for r in res.sizes["tasks"]]
    if method == "ste_codebook":
        assert lc_sizes["compressed_bits"] == res.sizes["compressed_bits"]
    # the file writer takes it as it is, and loading gives the model back
    res.lc.export(tmp_path / "peer.lcz")
    back = lc.load(tmp_path / "peer.lcz", get_model("mlp", sizes=SIZES))
    for n, p in back.named_parameters():
        assert torch.equal(p, params[n]), n
    assert res.test_error == pytest.approx(100 * float((model(data.x_test).argmax(1) != data.y_test).float().mean()))


def test_bad_input_is_named(reference, data):
    m = copy.deepcopy(reference)
    with pytest.raises(ValueError, match="method='sgd'"):
        Peer(m, {FC: lc.AdaptiveQuantization(2)}, "sgd")
    with pytest.raises(TypeError, match="task 'fc1.weight'.*ste_codebook.*AdaptiveQuantization"):
        Peer(m, {"fc1.weight": lc.ConstraintL0Pruning(kappa=3)}, "ste_codebook")
    with pytest.raises(ValueError, match="prune_end=1.5"):
        Peer(m, {ALL: lc.ConstraintL0Pruning(kappa=3)}, "gmp", prune_end=1.5)
    with pytest.raises(ValueError, match="prune_every=0"):
        Peer(m, {ALL: lc.ConstraintL0Pruning(kappa=3)}, "gmp", prune_every=0)
    with pytest.raises(ValueError, match="value_codebook=2"):
        Peer(m, {ALL: lc.ConstraintL0Pruning(kappa=3, value_codebook=2)}, "gmp")
    with pytest.raises(ValueError, match="lr=-1"):
        train_peer(m, {ALL: lc.ConstraintL0Pruning(kappa=3)}, "gmp", data, lr=-1)
    assert all(torch.equal(p, q) for p, q in zip(m.parameters(), reference.parameters()))  # nothing touched
