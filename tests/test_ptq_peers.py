"""The post-training peers (lcompress.ptq_peers) against independent, written-out references on tiny layers:
GPTQ and SparseGPT as slow OBQ/OBS loops that invert H over the remaining columns at every step, Wanda as a brute
sort of the scores, the practitioner's grid as compressed-tensors' formula; losses against RTN and magnitude
pruning; every solver's result through a .lcz file; the registry's refusals."""
import math

import pytest
import torch
from torch import nn

import lcompress as lc
from lcompress import ptq_peers as P
from lcompress.ptq import LayerProblem, _Eig, posttrain
from lcompress.tasks import resolve_tasks

DAMP = 0.01


def correlated_inputs(n, cols, seed):
    """Calibration rows with correlated features of unequal scale (as a transformer's inputs are)."""
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / math.sqrt(cols) + torch.eye(cols)
    scale = torch.rand(cols, generator=g) * 2 + 0.1
    return (torch.randn(n, cols, generator=g) @ mix) * scale


def problem(comp, rows=8, cols=16, seed=0, n=64, x=None, w=None):
    """(task, [LayerProblem], x) for one bias-free Linear of ``rows`` × ``cols`` with random weights."""
    g = torch.Generator().manual_seed(1000 + seed)
    x = correlated_inputs(n, cols, seed) if x is None else x
    w = torch.randn(rows, cols, generator=g) if w is None else w
    lin = nn.Linear(cols, rows, bias=False)
    with torch.no_grad():
        lin.weight.copy_(w)
    (task,) = resolve_tasks(nn.Sequential(lin), {"0.weight": comp})
    h = x.T @ x / x.shape[0]
    return task, [LayerProblem("0.weight", lin, w.clone().float(), h, x.shape[0], DAMP, _Eig(h, DAMP))], x


def dampened64(h, damp=DAMP):
    hd = h.double().clone()
    hd.diagonal().add_(damp * float(hd.diagonal().mean()))
    return hd


def loss64(w, w0, h):
    d = (w.double() - w0.double())
    return float(((d @ dampened64(h)) * d).sum())


def delta(task):
    return task.scatter(task.compression.decompress())[0]


# ---- the practitioner's grid ---------------------------------------------------------------------------------------
def test_absmax_grid_is_compressed_tensors_formula_with_a_shorter_last_group():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(5, 20, generator=g)
    w[0, :8] = 0.0  # an all-zero group: its scale is float16's eps, not 0
    for bits in (2, 3, 4, 8):
        s, m = P.absmax_grid(w, bits, 8)
        assert m is None and s.shape == (5, 3)
        for r in range(5):
            for k, (a, b) in enumerate(((0, 8), (8, 16), (16, 20))):
                amax = max(abs(float(w[r, a:b].min())), float(w[r, a:b].max()), 0.0)
                ref = torch.tensor(amax / ((2**bits - 1) / 2)).half().float()
                ref = torch.finfo(torch.float16).eps if float(ref) == 0 else float(ref)
                assert float(s[r, k]) == ref, (bits, r, k)


def test_rtn_absmax_codes_clamp_the_largest_positive_weight_and_keep_the_most_negative():
    w = torch.tensor([[7.5, -7.5, 1.0, 0.26] * 4])  # s = 1 at int4: +7.5 rounds to 8, clamped to 7; -7.5 to -8
    task, probs, _ = problem(lc.GroupedIntQuantization(4, 16), rows=1, cols=16, w=w)
    P.rtn_absmax(task, probs)
    th = task.compression.theta
    assert float(th["scales"][0, 0]) == 1.0
    assert delta(task)[0, :4].tolist() == [7.0, -8.0, 1.0, 0.0]


# ---- GPTQ ----------------------------------------------------------------------------------------------------------
def slow_gptq(w0, h, scales, bits, group, act_order):
    """OBQ with a fixed grid, written out: quantize the columns one at a time (in activation order or not); after
    each, move the columns not yet quantized (F) by the optimal update for the error, using H_F⁻¹ inverted
    explicitly at every step (float64): δ_F = −(w_j − q_j) [H_F⁻¹]_{:,j} / [H_F⁻¹]_jj."""
    hd = dampened64(h)
    w = w0.double().clone()
    cols = w.shape[1]
    order = torch.argsort(h.diagonal(), descending=True).tolist() if act_order else list(range(cols))
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.zeros_like(w)
    for t, j in enumerate(order):
        free = order[t:]
        hinv = torch.linalg.inv(hd[free][:, free])
        s = scales[:, j // group].double()
        q = torch.clamp(torch.round(w[:, j] / s), lo, hi)
        codes[:, j] = q
        err = (w[:, j] - s * q) / hinv[0, 0]
        w[:, free] -= err[:, None] * hinv[0][None, :]
        w[:, j] = s * q
    return codes, w


@pytest.mark.parametrize("act_order,group,block", [(False, 16, 16), (False, 16, 5), (True, 4, 3), (True, 6, 16)])
def test_gptq_equals_a_written_out_obq_loop(act_order, group, block):
    for seed in range(3):
        comp = lc.GroupedIntQuantization(3, group)
        task, probs, _ = problem(comp, seed=seed)
        info = P.GPTQ(act_order=act_order, block_size=block)(task, probs)
        p = probs[0]
        scales, _ = P.absmax_grid(p.w0, 3, group)
        ref_codes, ref_w = slow_gptq(p.w0, p.hessian, scales, 3, group, act_order)
        th = comp.theta
        assert torch.equal(th["scales"].float(), scales)  # static groups: the scales of the original weights
        codes = th["codes"].reshape(8, 16).float() - 4
        assert torch.equal(codes, ref_codes.float()), (seed, (codes != ref_codes.float()).sum())
        assert torch.allclose(delta(task).double(), ref_w, atol=1e-6)
        assert info["loss"] == pytest.approx(loss64(delta(task), p.w0, p.hessian), rel=1e-4)


def test_gptq_calibration_loss_is_below_round_to_nearest_on_the_same_grid():
    for seed in range(8):
        for bits in (2, 3, 4):
            losses = {}
            for name, solver in (("rtn_absmax", P.rtn_absmax), ("gptq", P.GPTQ()), ("rtn", P.rtn),
                                 ("gptq_direct", P.GPTQ(scales="direct"))):
                task, probs, _ = problem(lc.GroupedIntQuantization(bits, 8), rows=12, cols=32, seed=seed, n=256)
                solver(task, probs)
                losses[name] = loss64(delta(task), probs[0].w0, probs[0].hessian)
            assert losses["gptq"] < losses["rtn_absmax"], (seed, bits, losses)
            assert losses["gptq_direct"] < losses["rtn"], (seed, bits, losses)


def test_gptq_dead_inputs_are_zeroed_and_the_rest_stays_finite():
    x = correlated_inputs(64, 16, 3)
    x[:, 5] = 0.0  # an input the calibration set never excites
    task, probs, _ = problem(lc.GroupedIntQuantization(4, 8), x=x)
    P.GPTQ()(task, probs)
    d = delta(task)
    assert bool(torch.isfinite(d).all()) and bool((d[:, 5] == 0).all())


def test_gptq_keeps_the_layer_dtype_in_a_bfloat16_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8)).to(torch.bfloat16)
    calib = [correlated_inputs(32, 16, s).to(torch.bfloat16) for s in range(2)]
    res = posttrain(model, {"re:.*weight": lc.GroupedIntQuantization(4, 4)}, calib, solver=P.GPTQ(), progress=False)
    for t in res.tasks:
        w = dict(model.named_parameters())[t.param_names[0]]
        assert w.dtype == torch.bfloat16
        assert torch.equal(w, t.scatter(t.compression.decompress())[0].to(torch.bfloat16))


# ---- SparseGPT -----------------------------------------------------------------------------------------------------
def slow_sparsegpt(w0, h, block, keep=None, nm=None):
    """SparseGPT written out: the mask of each block (or N:M group) from the current weights by w_k²/[H_{F_k}⁻¹]_kk
    (F_k = columns k.. and H_F inverted explicitly), then the OBS update of the free columns after each column."""
    hd = dampened64(h)
    w = w0.double().clone()
    rows, cols = w.shape
    pruned = torch.zeros(rows, cols, dtype=torch.bool)
    inv_kk = [float(torch.linalg.inv(hd[k:, k:])[0, 0]) for k in range(cols)]
    if nm is not None:
        n, m = nm
        block = max(m, block - block % m)
    else:
        total = rows * cols - keep
        sizes = [rows * (min(b + block, cols) - b) for b in range(0, cols, block)]
        bounds = [0]
        for s in sizes:
            bounds.append(bounds[-1] + s)
        counts = [round_half_up(total * bounds[i + 1] / (rows * cols)) - round_half_up(total * bounds[i] / (rows * cols))
                  for i in range(len(sizes))]
    for bi, b0 in enumerate(range(0, cols, block)):
        b1 = min(b0 + block, cols)
        if nm is None and counts[bi]:
            score = torch.stack([w[:, k] ** 2 / inv_kk[k] for k in range(b0, b1)], 1)
            flat = torch.argsort(score.reshape(-1))[: counts[bi]]
            sub = pruned[:, b0:b1].clone().reshape(-1)
            sub[flat] = True
            pruned[:, b0:b1] = sub.reshape(rows, b1 - b0)
        for k in range(b0, b1):
            if nm is not None and k % m == 0:
                score = torch.stack([w[:, j] ** 2 / inv_kk[j] for j in range(k, k + m)], 1)
                for r in range(rows):
                    for j in torch.argsort(score[r])[: m - n].tolist():
                        pruned[r, k + j] = True
            hinv = torch.linalg.inv(hd[k:, k:])
            q = torch.where(pruned[:, k], torch.zeros_like(w[:, k]), w[:, k])
            err = (w[:, k] - q) / hinv[0, 0]
            w[:, k:] -= err[:, None] * hinv[0][None, :]
            w[:, k] = q
    return w, ~pruned


def round_half_up(v):
    return int(math.floor(v + 0.5))


@pytest.mark.parametrize("fraction,block", [(0.5, 16), (0.5, 5), (0.3, 7)])
def test_sparsegpt_unstructured_equals_a_written_out_loop_and_keeps_exactly_the_share(fraction, block):
    for seed in range(3):
        comp = lc.ConstraintL0Pruning(fraction=fraction)
        task, probs, _ = problem(comp, seed=seed)
        p = probs[0]
        kappa = round(fraction * 128)
        w_ours, kept, _ = P.sparsegpt_prune(p.w0, p.hessian, keep=kappa, block_size=block, damp=DAMP)
        ref_w, ref_kept = slow_sparsegpt(p.w0, p.hessian, block, keep=kappa)
        assert torch.equal(kept, ref_kept), seed
        assert torch.allclose(w_ours.double(), ref_w, atol=1e-5)
        P.SparseGPT(block_size=block)(task, probs)
        d = delta(task)
        assert comp.nnz == kappa and int(kept.sum()) == kappa
        idx = comp.theta["indices"]
        assert torch.equal(idx, torch.nonzero(kept.reshape(-1)).reshape(-1))  # the support SparseGPT chose
        assert torch.equal(d, w_ours)  # float32 values: Δ is SparseGPT's final weights


def test_sparsegpt_n_m_equals_a_written_out_loop_and_has_the_pattern():
    for seed in range(3):
        comp = lc.NMPruning(2, 4, value_dtype="float16")
        task, probs, _ = problem(comp, seed=seed)
        p = probs[0]
        ref_w, ref_kept = slow_sparsegpt(p.w0, p.hessian, 6, nm=(2, 4))  # 6 → blocks of 4
        P.SparseGPT(block_size=6)(task, probs)
        d = delta(task)
        kept = torch.zeros(8 * 16, dtype=torch.bool)
        kept[comp.theta["indices"]] = True
        kept = kept.reshape(8, 16)
        assert torch.equal(kept, ref_kept)
        assert bool((kept.reshape(8, 4, 4).sum(-1) == 2).all())
        # Δ is SparseGPT's final weights rounded to float16 (the value dtype)
        w_ours, kept_ours, _ = P.sparsegpt_prune(p.w0, p.hessian, nm=(2, 4), block_size=6, damp=DAMP)
        assert torch.equal(kept_ours, kept) and torch.equal(d, w_ours.half().float())
        assert torch.allclose(d.double(), ref_w, rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("comp_fn", [lambda: lc.ConstraintL0Pruning(fraction=0.5), lambda: lc.NMPruning(2, 4),
                                     lambda: lc.ConstraintL0Pruning(fraction=0.25), lambda: lc.NMPruning(1, 4)])
def test_sparsegpt_loss_is_below_magnitude_pruning(comp_fn):
    for seed in range(6):
        losses = {}
        for name, solver in (("magnitude", P.magnitude), ("sparsegpt", P.SparseGPT())):
            task, probs, _ = problem(comp_fn(), rows=12, cols=32, seed=seed, n=256)
            solver(task, probs)
            losses[name] = loss64(delta(task), probs[0].w0, probs[0].hessian)
        assert losses["sparsegpt"] < losses["magnitude"], (seed, losses)


def test_sparsegpt_joint_task_splits_kappa_over_its_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))
    calib = [correlated_inputs(32, 16, s) for s in range(2)]
    comp = lc.ConstraintL0Pruning(fraction=0.3)
    res = posttrain(model, {("0.weight", "2.weight"): comp}, calib, solver=P.SparseGPT(block_size=4),
                    progress=False)
    n0, n1 = 12 * 16, 8 * 12
    assert comp.nnz == round(0.3 * (n0 + n1))
    kappa = round(0.3 * (n0 + n1))
    assert int((model[0].weight != 0).sum()) == round(kappa * n0 / (n0 + n1))  # the same share in each layer
    assert int((model[2].weight != 0).sum()) == kappa - round(kappa * n0 / (n0 + n1))
    assert res.layers[0]["layer"] == "0.weight"


# ---- Wanda ---------------------------------------------------------------------------------------------------------
def brute_wanda(w, x, keep=None, nm=None):
    """Scores |W_ij|·‖X_j‖ from the inputs themselves; each row keeps its top ⌊keep/rows⌋ by a full sort, the rest
    go to the rows whose next score is largest; N:M by sorting every group."""
    score = w.abs().double() * x.double().norm(dim=0)
    rows, cols = w.shape
    kept = torch.zeros(rows, cols, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        for r in range(rows):
            for g0 in range(0, cols, m):
                for j in torch.argsort(score[r, g0:g0 + m], descending=True)[:n].tolist():
                    kept[r, g0 + j] = True
        return kept
    base, extra = divmod(keep, rows)
    order = [torch.argsort(score[r], descending=True).tolist() for r in range(rows)]
    for r in range(rows):
        for j in order[r][:base]:
            kept[r, j] = True
    nxt = sorted(range(rows), key=lambda r: -float(score[r, order[r][base]]))[:extra]
    for r in nxt:
        kept[r, order[r][base]] = True
    return kept


@pytest.mark.parametrize("comp_fn,keep,nm", [(lambda: lc.ConstraintL0Pruning(fraction=0.5), 64, None),
                                             (lambda: lc.ConstraintL0Pruning(fraction=0.3), 38, None),
                                             (lambda: lc.NMPruning(2, 4), None, (2, 4)),
                                             (lambda: lc.NMPruning(3, 8), None, (3, 8))])
def test_wanda_mask_equals_a_brute_force_sort_of_the_scores(comp_fn, keep, nm):
    for seed in range(4):
        comp = comp_fn()
        task, probs, x = problem(comp, seed=seed)
        P.Wanda()(task, probs)
        ref = brute_wanda(probs[0].w0, x, keep=keep, nm=nm)
        kept = torch.zeros(128, dtype=torch.bool)
        kept[comp.theta["indices"]] = True
        assert torch.equal(kept.reshape(8, 16), ref), seed
        assert torch.equal(delta(task), probs[0].w0 * ref)  # no weight update


# ---- every solver through a file; the registry ---------------------------------------------------------------------
def _tiny():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))


CASES = [("rtn", lambda: lc.GroupedIntQuantization(4, 8)), ("rtn_absmax", lambda: lc.GroupedIntQuantization(3, 8)),
         ("gptq", lambda: lc.GroupedIntQuantization(3, 8)), ("gptq", lambda: lc.GroupedIntQuantization(4, 6, False)),
         ("sparsegpt", lambda: lc.ConstraintL0Pruning(fraction=0.5, value_dtype="float16")),
         ("sparsegpt", lambda: lc.NMPruning(2, 4, value_dtype="float16")),
         ("wanda", lambda: lc.ConstraintL0Pruning(fraction=0.4)), ("wanda", lambda: lc.NMPruning(2, 4)),
         ("magnitude", lambda: lc.ConstraintL0Pruning(fraction=0.5)), ("magnitude", lambda: lc.NMPruning(2, 4))]


@pytest.mark.parametrize("method,comp_fn", CASES)
def test_every_solver_round_trips_through_a_lcz_file(tmp_path, method, comp_fn):
    model = _tiny()
    calib = [correlated_inputs(32, 16, s) for s in range(3)]
    res = posttrain(model, {"re:.*weight": comp_fn()}, calib, solver=P.make_solver(method), progress=False)
    assert all(math.isfinite(r["loss"]) for r in res.layers)
    res.export(tmp_path / "m.lcz")
    fresh = nn.Sequential(nn.Linear(16, 24), nn.GELU(), nn.Linear(24, 8))
    lc.load(tmp_path / "m.lcz", fresh)
    for (n, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), n
    for t in res.tasks:  # the model holds Δ(Θ)
        assert torch.equal(dict(model.named_parameters())[t.param_names[0]], t.scatter(t.compression.decompress())[0])


def test_registry_lists_the_cli_methods_and_refuses_combinations_that_make_no_sense():
    assert {"rtn", "gptq", "sparsegpt", "wanda", "magnitude"} <= set(P.PEERS)
    with pytest.raises(ValueError, match=r"method='obc' is not a peer; known: rtn"):
        P.make_solver("obc")
    bad = [("gptq", lc.ConstraintL0Pruning(fraction=0.5), "GroupedIntQuantization"),
           ("sparsegpt", lc.GroupedIntQuantization(4, 8), "use 'gptq'"),
           ("wanda", lc.ConstraintL0Pruning(fraction=0.5, value_codebook=4), "without value_codebook"),
           ("magnitude", lc.GroupedIntQuantization(4, 8), "use 'rtn'"),
           ("rtn", lc.NMPruning(2, 4), "method 'magnitude'"),
           ("rtn_absmax", lc.AdaptiveQuantization(k=4), "GroupedIntQuantization")]
    for method, comp, why in bad:
        with pytest.raises(ValueError, match=rf"task 'layer': method '{method}' cannot produce .*{why}"):
            P.make_solver(method, {"layer": comp})
    with pytest.raises(TypeError, match="method 'wanda'"):
        P.make_solver("wanda", block_size=3)
    with pytest.raises(ValueError, match="block_size=0"):
        P.GPTQ(block_size=0)
    with pytest.raises(ValueError, match="damp=-1"):
        P.SparseGPT(damp=-1)


def test_a_solver_given_the_wrong_compression_names_the_task_and_leaves_the_model():
    model = _tiny()
    before = {n: t.clone() for n, t in model.state_dict().items()}
    calib = [correlated_inputs(32, 16, 0)]
    with pytest.raises(ValueError, match=r"task '2.weight': method 'gptq' cannot produce NMPruning"):
        posttrain(model, {"0.weight": lc.GroupedIntQuantization(4, 8), "2.weight": lc.NMPruning(2, 4)}, calib,
                  solver=P.GPTQ(), progress=False)
    for n, t in model.state_dict().items():
        assert torch.equal(t, before[n]), n
