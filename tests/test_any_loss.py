"""LC beyond cross-entropy and SGD: a small transformer encoder distilled from a copy of itself (1 − cosine, a
bounded loss) with Adam, the μ schedule measured by auto_schedule from the loss function and a few batches."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcompress as lc

import synthetic as S


def _encoder():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=16, nhead=2, dim_feedforward=32, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)


@pytest.mark.parametrize("k", [2, 4])
def test_distilled_transformer_with_adam_ends_feasible_and_beats_direct_compression(k):
    with S.one_thread():
        teacher = _encoder().eval()
        student = copy.deepcopy(teacher)
        g = torch.Generator().manual_seed(1)
        x, x_test = torch.randn(512, 6, 16, generator=g), torch.randn(256, 6, 16, generator=g)
        with torch.no_grad():
            t, t_test = teacher(x).mean(1), teacher(x_test).mean(1)

        def loss_fn(model, batch):
            xb, tb = batch
            return (1 - F.cosine_similarity(model(xb).mean(1), tb, dim=-1)).mean()

        batches = [(x[i : i + 64], t[i : i + 64]) for i in range(0, 512, 64)]
        alg = lc.LC(student, {"re:.*(in_proj_weight|out_proj\\.weight|linear\\d\\.weight)": lc.AdaptiveQuantization(k=k)})
        assert len(alg.tasks) == 8
        with torch.no_grad(), alg.compressed():
            dc = float(loss_fn(student, (x_test, t_test)))
        mus = lc.auto_schedule(alg, 12, loss_fn=loss_fn, batches=batches[:4])
        opt = torch.optim.Adam(student.parameters(), lr=1e-2)
        it = 0
        for mu in mus:
            for group in opt.param_groups:
                group["lr"] = lc.clip_lr_adaptive(1e-2, alg)
            for _ in range(16):
                b = batches[it % len(batches)]
                it += 1
                loss = loss_fn(student, b) + alg.penalty(mu)
                opt.zero_grad()
                loss.backward()
                opt.step()
            alg.c_step(mu)
        with torch.no_grad(), alg.compressed():
            lcv = float(loss_fn(student, (x_test, t_test)))
        assert alg.check_feasible() < alg.feasibility_tol, "LC ended infeasible"
        assert lcv < 0.5 * dc, (lcv, dc)


def test_clip_lr_adaptive_is_the_rms_distance_capped():
    model = nn.Linear(8, 4)
    alg = lc.LC(model, {"weight": lc.BinaryQuantization()})
    rms = float((model.weight.detach() - alg.decompressed()["weight"]).pow(2).mean().sqrt())
    assert lc.clip_lr_adaptive(10.0, alg) == pytest.approx(rms, rel=1e-5)
    assert lc.clip_lr_adaptive(rms / 3, alg) == pytest.approx(rms / 3)
    with pytest.raises(ValueError, match="lr="):
        lc.clip_lr_adaptive(0.0, alg)
