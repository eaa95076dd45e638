"""Post-training LC (lcompress.ptq): the layer problem against quantities computed from the raw activations, the
block loop against hooks of our own, the exact L step against a linear solve, resume, and bad input. Tiny
random-weight models built in memory only."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

import lcompress as lc
from lcompress import _layerwise as LW
from lcompress import ptq
from lcompress.tasks import Task

transformers = pytest.importorskip("transformers")


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg).eval()


def fwd(m, b):
    return m(input_ids=b, use_cache=False)


def calib(n=6, seq=16, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 120, (2, seq), generator=g) for _ in range(n // 2)]


TASKS = {r"re:model\.layers\.\d+\..*_proj\.weight": lc.GroupedIntQuantization(3, 16)}


class Recorder:
    """A solver that records each layer's problem and then solves it with another solver."""

    def __init__(self, inner):
        self.inner, self.problems = inner, {}

    def __call__(self, task, problems):
        for p in problems:
            self.problems[p.name] = p
        return self.inner(task, problems)


def inputs_of(model, names, batches):
    """X of each named Linear, from hooks of our own on a forward pass of the whole model."""
    xs = {n: [] for n in names}
    mods = dict(model.named_modules())
    hs = [mods[n.rsplit(".", 1)[0]].register_forward_pre_hook(
        lambda m, a, n=n: xs[n].append(a[0].detach().reshape(-1, a[0].shape[-1]))) for n in names]
    with torch.no_grad():
        for b in batches:
            fwd(model, b)
    for h in hs:
        h.remove()
    return {n: torch.cat(v) for n, v in xs.items()}


def test_hessians_come_from_the_compressed_earlier_blocks():
    model = tiny_llama()
    ref = copy.deepcopy(model)
    rec = Recorder(ptq.direct_solver)
    res = ptq.posttrain(model, TASKS, calib(), blocks=list(model.model.layers), solver=rec, forward=fwd)
    assert len(res.layers) == 14
    # block 0 sees the float model's activations
    names0 = [n for n in rec.problems if n.startswith("model.layers.0.")]
    x = inputs_of(ref, names0, calib())
    for n in names0:
        torch.testing.assert_close(rec.problems[n].hessian, x[n].T @ x[n] / x[n].shape[0], rtol=1e-4, atol=1e-6)
        assert rec.problems[n].tokens == x[n].shape[0] == 6 * 16
        assert torch.equal(rec.problems[n].w0, dict(ref.named_parameters())[n].detach())
    # q, k and v share one input, so one H (and one eigendecomposition)
    p = rec.problems
    assert p["model.layers.0.self_attn.q_proj.weight"]._eig is p["model.layers.0.self_attn.k_proj.weight"]._eig
    # block 1 sees block 0 compressed: the reference model with block 0's Δ in place gives the same inputs
    with torch.no_grad():
        for n, w in dict(model.named_parameters()).items():
            if n.startswith("model.layers.0."):
                dict(ref.named_parameters())[n].copy_(w)
    names1 = [n for n in p if n.startswith("model.layers.1.")]
    x = inputs_of(ref, names1, calib())
    for n in names1:
        torch.testing.assert_close(p[n].hessian, x[n].T @ x[n] / x[n].shape[0], rtol=1e-4, atol=1e-6)


def test_result_round_trips_through_a_file(tmp_path):
    model = tiny_llama()
    res = ptq.posttrain(model, TASKS, calib(), blocks=list(model.model.layers), forward=fwd,
                        solver=ptq.LCSolver(steps=5))
    for t in res.tasks:
        for n, d in zip(t.param_names, t.scatter(t.compression.decompress())):
            assert torch.equal(dict(model.named_parameters())[n].detach(), d)
    out = res.export(tmp_path / "m.lcz")
    fresh = tiny_llama(seed=5)
    lc.load(tmp_path / "m.lcz", fresh)
    ids = calib()[0]
    with torch.no_grad():
        assert torch.equal(fwd(fresh, ids).logits, fwd(model, ids).logits)
    assert out["file_bytes"] <= out["bound_bytes"]
    # 3-bit codes and a float16 scale per 16 weights: 4 bits per weight packed
    packed = sum(t.compression.count_bits(lossless=False) for t in res.tasks) / sum(t.numel for t in res.tasks)
    assert packed == pytest.approx(4.0)
    assert res.bits_per_weight() <= packed


def loss_direct(w, w0, x, damp):
    """‖X(W − W₀)ᵀ‖²/N + δ·mean(diag XᵀX/N)·‖W − W₀‖², from the raw activations."""
    n = x.shape[0]
    d = w.double() - w0.double()
    h = x.double().T @ x.double() / n
    return float(((x.double() @ d.T) ** 2).sum() / n + damp * float(h.diagonal().mean()) * (d * d).sum())


def problem(rows=12, cols=32, n=200, seed=0, damp=0.01, corr=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, cols, generator=g)
    if corr:  # correlated, badly scaled inputs, as a transformer's are
        x = x @ torch.randn(cols, cols, generator=g) * torch.logspace(-1, 1, cols)
    w0 = torch.randn(rows, cols, generator=g) * 0.1
    h = x.T @ x / n
    mod = nn.Linear(cols, rows, bias=False)
    return ptq.LayerProblem("w", mod, w0, h, n, damp, ptq._Eig(h, damp)), x


def test_layer_loss_is_the_calibration_error():
    p, x = problem()
    w = p.w0 + 0.01 * torch.randn_like(p.w0)
    assert p.loss(w) == pytest.approx(loss_direct(w, p.w0, x, 0.01), rel=1e-4)
    assert LW.layer_loss(w, p.w0, p.dampened()) == pytest.approx(loss_direct(w, p.w0, x, 0.01), rel=1e-4)
    assert p.relative_error(w) == pytest.approx(
        float(((x @ (w - p.w0).T) ** 2).sum() / ((x @ p.w0.T) ** 2).sum()), rel=1e-4)


@pytest.mark.parametrize("metric", ["euclidean", "diag"])
def test_one_lc_step_is_the_exact_l_step_then_the_c_step(metric, monkeypatch):
    """Steps=1: W = argmin L(W) + μ/2‖W − Δ_DC‖²_D (a linear solve here), then Θ = Π_D(W)."""
    p, _ = problem()
    comp = lc.GroupedIntQuantization(3, 8, scale_dtype="float32")
    seen = []
    orig = comp.compress

    def spy(w, mu=0.0, **kw):
        seen.append((w.clone(), mu, kw.get("importance")))
        return orig(w, mu, **kw)

    monkeypatch.setattr(comp, "compress", spy)
    task = Task("w", ["w"], [nn.Parameter(p.w0.clone())], comp)
    solver = ptq.LCSolver(steps=1, metric=metric, polish=False)
    solver(task, [p])
    (_, _, imp0), (w_in, mu, imp) = seen[0], seen[1]
    dc = lc.GroupedIntQuantization(3, 8, scale_dtype="float32").compress(p.w0, importance=imp0)
    hd = p.dampened().double()
    dvec = hd.diagonal() / hd.diagonal().mean() if metric == "diag" else torch.ones(hd.shape[0], dtype=torch.float64)
    # (2H + μD) Wᵀ = 2 H W₀ᵀ + μ D Δᵀ, row by row
    a = 2 * hd + mu * torch.diag(dvec)
    rhs = 2 * hd @ p.w0.double().T + mu * dvec[:, None] * dc.double().T
    w_ref = torch.linalg.solve(a, rhs).T
    torch.testing.assert_close(w_in.double(), w_ref, rtol=1e-4, atol=1e-6)
    if metric == "diag":
        torch.testing.assert_close(imp[0].double(), dvec.float().double(), rtol=1e-5, atol=0)


def test_schedule_from_the_direct_compression():
    p, _ = problem()
    solver = ptq.LCSolver(steps=7, mu0=0.1, tol=0.005, metric="euclidean")
    comp = lc.GroupedIntQuantization(3, 8)
    dc = comp.compress(p.w0)
    hd = p.dampened().double()
    e = dc.double() - p.w0.double()
    loss = float(((e @ hd) * e).sum())
    d0 = float((e * e).sum())
    grad = float((2 * e @ hd).norm())
    c, ev, q = p.eig("euclidean")
    mus = solver.schedule([(c, ev, q)], [p.w0 @ q], [dc @ q])
    assert len(mus) == 7
    assert mus[0] == pytest.approx(0.1 * 2 * loss / d0, rel=1e-4)
    assert mus[-1] == pytest.approx(grad / (0.005 * math.sqrt(d0)), rel=1e-4)
    assert all(b / a == pytest.approx(mus[1] / mus[0], rel=1e-6) for a, b in zip(mus, mus[1:]))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lc_beats_round_to_nearest_and_never_loses_to_it(bits):
    for seed in range(3):
        p, _ = problem(seed=seed)
        rtn = lc.GroupedIntQuantization(bits, 8)
        rtn_loss = p.loss(rtn.compress(p.w0))
        comp = lc.GroupedIntQuantization(bits, 8)
        info = ptq.LCSolver(steps=20)(Task("w", ["w"], [nn.Parameter(p.w0.clone())], comp), [p])
        got = p.loss(comp.decompress())
        assert got == pytest.approx(info["loss"], rel=1e-4)
        assert info["lc_loss"] <= info["dc_loss"] and info["loss"] <= info["lc_loss"] * (1 + 1e-6)
        assert got < 0.7 * rtn_loss, (bits, seed, got, rtn_loss)


def test_polish_of_pruning_solves_the_restricted_normal_equations():
    p, x = problem(rows=6, cols=24)
    comp = lc.ConstraintL0Pruning(fraction=0.5)
    ptq.LCSolver(steps=10)(Task("w", ["w"], [nn.Parameter(p.w0.clone())], comp), [p])
    w = comp.decompress().double().reshape(6, 24)
    hd = p.dampened().double()
    assert int((w != 0).sum()) == 72
    for r in range(6):  # on each row's support S: H_SS w_S = (H w0)_S, solved independently
        s = w[r] != 0
        ref = torch.linalg.solve(hd[s][:, s], (hd @ p.w0[r].double())[s])
        torch.testing.assert_close(w[r][s], ref, rtol=1e-3, atol=1e-6)


def test_grid_scales_are_the_least_squares_optimum():
    p, _ = problem(rows=4, cols=20)
    hd = p.dampened()
    g = torch.Generator().manual_seed(3)
    codes = torch.randint(-4, 4, (4, 20), generator=g).float()
    for symmetric in (True, False):
        s, m = LW.grid_scales(codes if symmetric else codes + 4, p.w0, hd, 8, symmetric)
        # reference: per row, lstsq over the columns [q restricted to group g] (and [1 on group g])
        for r in range(4):
            cols = []
            q = codes[r] if symmetric else codes[r] + 4
            for gi in range(3):
                v = torch.zeros(20, dtype=torch.float64)
                v[gi * 8 : (gi + 1) * 8] = q[gi * 8 : (gi + 1) * 8].double()
                cols.append(v)
            if not symmetric:
                for gi in range(3):
                    v = torch.zeros(20, dtype=torch.float64)
                    v[gi * 8 : (gi + 1) * 8] = 1
                    cols.append(v)
            a = torch.stack(cols, 1)
            l = torch.linalg.cholesky(hd.double())
            sol = torch.linalg.lstsq(l.T @ a, l.T @ p.w0[r].double()).solution
            got = s[r].double() if symmetric else torch.cat([s[r], m[r]]).double()
            torch.testing.assert_close(got, sol, rtol=1e-3, atol=1e-6)


def test_grid_descent_never_raises_the_loss_and_stays_on_the_grid():
    p, _ = problem()
    hd = p.dampened()
    comp = lc.GroupedIntQuantization(3, 8)
    w = comp.compress(p.w0)
    scale = comp.theta["scales"].float().repeat_interleave(8, 1)
    new, moves = LW.grid_descent(w, p.w0, hd, scale, None, -4, 3)
    assert moves > 0 and LW.layer_loss(new, p.w0, hd) < LW.layer_loss(w, p.w0, hd)
    q = new / scale
    assert torch.allclose(q, q.round(), atol=1e-4) and float(q.min()) >= -4 and float(q.max()) <= 3
    # at a fixed point, no single weight can move to another grid point and lower the loss
    again, moves2 = LW.grid_descent(new, p.w0, hd, scale, None, -4, 3, sweeps=1)
    if moves2 == 0:
        base = LW.layer_loss(new, p.w0, hd)
        for i, j in [(0, 0), (3, 7), (11, 31)]:
            for step in (-1, 1):
                t = new.clone()
                t[i, j] += step * scale[i, j]
                if -4 <= float(t[i, j] / scale[i, j]) <= 3:
                    assert LW.layer_loss(t, p.w0, hd) >= base * (1 - 1e-6)


def test_whole_model_mode_solves_layers_in_order_from_compressed_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    ref = copy.deepcopy(model)
    data = [torch.randn(32, 20) for _ in range(3)]
    rec = Recorder(ptq.LCSolver(steps=5))
    res = ptq.posttrain(model, {"re:\\d\\.weight": lc.GroupedIntQuantization(4, 4)}, data, solver=rec)
    assert [r["layer"] for r in res.layers] == ["0.weight", "2.weight", "4.weight"]
    # layer 2's inputs: ReLU(layer 0 compressed), computed here
    with torch.no_grad():
        ref[0].weight.copy_(model[0].weight)
        x = torch.cat([torch.relu(ref[0](d)) for d in data])
    torch.testing.assert_close(rec.problems["2.weight"].hessian, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)


def test_attention_mask_keeps_padding_out_of_h():
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    model = nn.Sequential(lin)
    x = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    rec = Recorder(ptq.direct_solver)
    ptq.posttrain(model, {"0.weight": lc.GroupedIntQuantization(4, 4)}, [{"x": x, "attention_mask": mask}],
                  solver=rec, forward=lambda m, b: m(b["x"]))
    keep = x[mask.bool()]
    torch.testing.assert_close(rec.problems["0.weight"].hessian, keep.T @ keep / 8, rtol=1e-5, atol=1e-6)
    assert rec.problems["0.weight"].tokens == 8


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(a, b):
    return all(torch.equal(a[k], b[k]) for k in a)


class Interrupt:
    def __init__(self, inner, at):
        self.inner, self.at, self.n = inner, at, 0
        self.config = inner.config  # the same run, as far as the checkpoint can tell

    def __call__(self, task, problems):
        self.n += 1
        if self.n == self.at:
            raise KeyboardInterrupt
        return self.inner(task, problems)


def test_a_killed_run_leaves_the_model_and_resumes_to_the_same_result(tmp_path):
    full = tiny_llama()
    ptq.posttrain(full, TASKS, calib(), blocks=list(full.model.layers), forward=fwd, solver=ptq.LCSolver(steps=4))
    model = tiny_llama()
    before = state(model)
    with pytest.raises(KeyboardInterrupt):
        ptq.posttrain(model, TASKS, calib(), blocks=list(model.model.layers), forward=fwd,
                      solver=Interrupt(ptq.LCSolver(steps=4), at=9), checkpoint=tmp_path / "ck")
    assert same_state(state(model), before)  # nothing changed in the model
    assert (tmp_path / "ck" / "posttrain.pt").exists()
    res = ptq.posttrain(model, TASKS, calib(), blocks=list(model.model.layers), forward=fwd,
                        solver=ptq.LCSolver(steps=4), checkpoint=tmp_path / "ck")
    assert same_state(state(model), state(full))
    assert len(res.layers) == 14
    # a different task map is refused, naming what differs
    other = tiny_llama()
    with pytest.raises(ptq.CheckpointMismatchError, match="tasks differs"):
        ptq.posttrain(other, {r"re:model\.layers\.\d+\..*_proj\.weight": lc.GroupedIntQuantization(4, 16)},
                      calib(), blocks=list(other.model.layers), forward=fwd, checkpoint=tmp_path / "ck",
                      solver=ptq.LCSolver(steps=4))


@pytest.mark.parametrize("tasks,match", [
    ({"re:nothing.*": lc.GroupedIntQuantization(3, 16)}, "matches no parameter"),
    ({"model.embed_tokens.weight": lc.GroupedIntQuantization(3, 16)}, "not the weight of an nn.Linear"),
    ({"model.layers.0.mlp.down_proj.weight": lc.GroupedIntQuantization(3, 128)}, r"group=128 is wider than a row \(64"),
])
def test_bad_tasks_name_the_field_and_leave_the_model(tasks, match):
    model = tiny_llama()
    before = state(model)
    with pytest.raises(ValueError, match=match):
        ptq.posttrain(model, tasks, calib(), blocks=list(model.model.layers), forward=fwd)
    assert same_state(state(model), before)


def test_bad_arguments():
    model = tiny_llama()
    with pytest.raises(ValueError, match="calibration is empty"):
        ptq.posttrain(model, TASKS, [], blocks=list(model.model.layers), forward=fwd)
    with pytest.raises(ValueError, match="damp=-1"):
        ptq.posttrain(model, TASKS, calib(), damp=-1, forward=fwd)
    with pytest.raises(ValueError, match="solver='gptq'"):
        ptq.posttrain(model, TASKS, calib(), solver="gptq", forward=fwd)
    with pytest.raises(ValueError, match="steps=-1"):
        ptq.LCSolver(steps=-1)
    with pytest.raises(ValueError, match="metric='l1'"):
        ptq.LCSolver(metric="l1")


def test_nan_activations_stop_the_run_naming_the_layer_and_leave_the_model():
    model = tiny_llama()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    before = state(model)
    with pytest.raises(FloatingPointError, match=r"down_proj.*NaN"):
        ptq.posttrain(model, TASKS, calib(), blocks=list(model.model.layers), forward=fwd,
                      solver=ptq.direct_solver)
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in
               zip(state(model).values(), before.values()))


def test_float_target_is_the_least_squares_fit_to_the_float_model_outputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 4))
    ref = copy.deepcopy(model)
    data = [torch.randn(32, 20) for _ in range(3)]
    rec = Recorder(ptq.LCSolver(steps=5))
    ptq.posttrain(model, {"re:\\d\\.weight": lc.GroupedIntQuantization(2, 4)}, data, solver=rec, target="float",
                  damp=0.0)
    p = rec.problems
    # the first layer sees the float inputs: its target is its own weight
    torch.testing.assert_close(p["0.weight"].w0, ref[0].weight.detach(), rtol=1e-4, atol=1e-5)
    # the second: min ||X~ W^T - X W0^T||, X~ from layer 0 compressed, X from the float model (lstsq here)
    with torch.no_grad():
        x = torch.cat([torch.relu(ref[0](d)) for d in data]).double()
        lin0 = copy.deepcopy(ref[0])
        lin0.weight.copy_(model[0].weight)
        xt = torch.cat([torch.relu(lin0(d)) for d in data]).double()
    target = (x @ ref[2].weight.detach().double().T)
    w_star = torch.linalg.lstsq(xt, target).solution.T
    torch.testing.assert_close(p["2.weight"].w0.double(), w_star, rtol=1e-3, atol=1e-4)
    assert not torch.allclose(p["2.weight"].w0, ref[2].weight.detach(), atol=1e-3)


def test_float_target_in_blocks_and_resume(tmp_path):
    model = tiny_llama()
    ref = tiny_llama()
    rec = Recorder(ptq.LCSolver(steps=3))
    ptq.posttrain(model, TASKS, calib(), blocks=list(model.model.layers), solver=rec, forward=fwd, target="float")
    n = "model.layers.1.mlp.up_proj.weight"
    x = inputs_of(ref, [n], calib())[n].double()  # the float model's inputs to block 1's up_proj
    comp0 = copy.deepcopy(ref)
    with torch.no_grad():
        for name, w in dict(model.named_parameters()).items():
            if name.startswith("model.layers.0."):
                dict(comp0.named_parameters())[name].copy_(w)
    xt = inputs_of(comp0, [n], calib())[n].double()
    h = xt.T @ xt / xt.shape[0]
    c = xt.T @ x / xt.shape[0]
    dp = 0.01 * float(h.diagonal().mean())
    w0 = dict(ref.named_parameters())[n].detach().double()
    w_star = torch.linalg.solve(h + dp * torch.eye(32, dtype=torch.float64), (c + dp * torch.eye(32, dtype=torch.float64)) @ w0.T).T
    torch.testing.assert_close(rec.problems[n].w0.double(), w_star, rtol=1e-3, atol=1e-5)
    # resumed with the float target: the same result as one go
    again = tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        ptq.posttrain(again, TASKS, calib(), blocks=list(again.model.layers), forward=fwd, target="float",
                      solver=Interrupt(ptq.LCSolver(steps=3), at=10), checkpoint=tmp_path / "ck")
    ptq.posttrain(again, TASKS, calib(), blocks=list(again.model.layers), forward=fwd, target="float",
                  solver=ptq.LCSolver(steps=3), checkpoint=tmp_path / "ck")
    assert same_state(state(again), state(model))
    with pytest.raises(ValueError, match="target='self'"):
        ptq.posttrain(tiny_llama(), TASKS, calib(), forward=fwd, target="self")


def test_a_corrupt_checkpoint_is_refused_naming_the_file(tmp_path):
    model = tiny_llama()
    with pytest.raises(KeyboardInterrupt):
        ptq.posttrain(model, TASKS, calib(), blocks=list(model.model.layers), forward=fwd,
                      solver=Interrupt(ptq.LCSolver(steps=2), at=9), checkpoint=tmp_path / "ck")
    blk = tmp_path / "ck" / "block_0000.pt"
    state = torch.load(blk, weights_only=True)
    name = next(iter(state))
    state[name]["theta"]["codes"] = state[name]["theta"]["codes"][:10]
    torch.save(state, blk)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ptq.CheckpointMismatchError, match="block_0000.pt"):
        ptq.posttrain(model, TASKS, calib(), blocks=list(model.model.layers), forward=fwd,
                      solver=ptq.LCSolver(steps=2), checkpoint=tmp_path / "ck")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    blk.write_bytes(b"not a torch file")
    with pytest.raises(ptq.CheckpointMismatchError, match="cannot be read"):
        ptq.posttrain(model, TASKS, calib(), blocks=list(model.model.layers), forward=fwd,
                      solver=ptq.LCSolver(steps=2), checkpoint=tmp_path / "ck")
