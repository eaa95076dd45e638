"""Codebook sizes against the task: K larger than the weights is refused (with the task named); large valid K is
fast and good; weights near float32's range give finite codebooks or a clear error."""
import math

import pytest
import torch
from torch import nn

import lcompress as lc
from lcompress import functional as F
from lcompress.sizes import support_bits


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(32, 16)  # 512 weights, 16 biases


@pytest.mark.parametrize("k", [513, 16000])
def test_adaptive_k_beyond_the_weights_is_refused_naming_the_task(k):
    with pytest.raises(ValueError, match=rf"task 'fc.weight'.*k={k} exceeds the number of weights \(512\)"):
        lc.LC(Tiny(), {"fc.weight": lc.AdaptiveQuantization(k=k)})
    with pytest.raises(ValueError, match=rf"k={k} exceeds the number of weights \(512\)"):
        lc.AdaptiveQuantization(k=k, exact=True).compress(torch.randn(512))
    # the same inside a sum, and for a pattern's small match (the biases)
    with pytest.raises(ValueError, match=r"task 'fc.bias'.*k=20 exceeds the number of weights \(16\)"):
        lc.LC(Tiny(), {"re:fc\\..*": lc.AdaptiveQuantization(k=20)})
    with pytest.raises(ValueError, match=rf"task 'fc.weight'.*k={k} exceeds"):
        lc.LC(Tiny(), {"fc.weight": lc.AdaptiveQuantization(k=k) + lc.ConstraintL0Pruning(kappa=3)})


def test_adaptive_k_equal_to_the_weights_is_allowed():
    w = torch.randn(64)
    out = lc.AdaptiveQuantization(k=64, exact=True).compress(w)
    assert torch.equal(out, w)  # each weight its own value


def test_value_codebook_beyond_the_weights_is_refused():
    with pytest.raises(ValueError, match=r"task 'fc.bias'.*value_codebook=32 exceeds the number of weights \(16\)"):
        lc.LC(Tiny(), {"fc.bias": lc.ConstraintL0Pruning(kappa=4, value_codebook=32)})
    with pytest.raises(ValueError, match=r"value_codebook=32 exceeds the number of weights \(16\)"):
        lc.PenaltyL0Pruning(1e-3, value_codebook=32).compress(torch.randn(16), 1.0)
    # K above κ is fine (κ may come from a fraction of a small layer): the unused entries are stored, and counted
    p = lc.ConstraintL0Pruning(kappa=2, value_codebook=4)
    out = p.compress(torch.tensor([0.1, -3.0, 0.5, 2.0, 0.0]))
    assert out.tolist() == [0.0, -3.0, 0.0, 2.0, 0.0] and p.count_bits() == 2 * 2 + 4 * 32 + support_bits(p.theta["indices"], 5)[1]


def _panter_dite(x, k):
    """High-resolution estimate of the optimal K-level distortion, n/(12K²)·(∫p^⅓)³, for standard normal data."""
    return x.numel() / (12 * k * k) * 6 * math.sqrt(3) * math.pi


@pytest.mark.parametrize("n, k", [(3000, 300), (20000, 1000), (20000, 5000)])
def test_large_k_uses_k_distinct_values_and_beats_the_high_resolution_estimate(n, k):
    x = torch.randn(n, generator=torch.Generator().manual_seed(k))
    c, a = F.kmeans_1d(x, k)
    d = float(((x.double() - c[a.long()].double()) ** 2).sum())
    # measured 1.01, 0.71, 0.52 of the estimate; the coarse 256-bin start used before (at most 256 distinct values)
    # gave 2.3 and 32 on the first two
    assert d < 1.25 * _panter_dite(x, k)
    assert torch.unique(c[a.long()]).numel() > 0.8 * k
