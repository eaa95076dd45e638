"""Bit accounting against a literal encoder."""
import pytest
import torch

from lcompress.sizes import best_delta_width, delta_symbols, dense_bits, dtype_bits, quantized_bits, support_bits


def encode_delta(indices, width):
    """Write the delta code symbol by symbol (the escape symbol 2^b − 1 skips that many positions)."""
    m = (1 << width) - 1
    out, prev = [], -1
    for i in indices:
        gap = i - prev - 1
        while gap >= m:
            out.append(m)
            gap -= m
        out.append(gap)
        prev = i
    return out


def decode_delta(symbols, width):
    m = (1 << width) - 1
    pos, res = -1, []
    for s in symbols:
        if s == m:
            pos += m
            continue
        pos += s + 1
        res.append(pos)
    return res


@pytest.mark.parametrize("density", [0.001, 0.01, 0.1, 0.5])
def test_delta_code_matches_literal_encoder(density):
    g = torch.Generator().manual_seed(0)
    n = 5000
    idx = torch.nonzero(torch.rand(n, generator=g) < density).reshape(-1)
    for width in (1, 2, 3, 5, 8):
        symbols = encode_delta(idx.tolist(), width)
        assert decode_delta(symbols, width) == idx.tolist()
        assert delta_symbols(idx, width) == len(symbols)
    w, bits = best_delta_width(idx)
    assert bits == min(len(encode_delta(idx.tolist(), b)) * b for b in range(1, 33))
    assert bits == len(encode_delta(idx.tolist(), w)) * w


def test_support_bits_picks_the_cheaper_code():
    # a 1-bit delta code is a bitmask cut after the last index, so it never loses to the bitmask by more than a tie
    dense = torch.nonzero(torch.rand(1000) < 0.5).reshape(-1)
    dense[-1] = 999
    assert best_delta_width(dense)[1] >= 1000
    assert support_bits(dense, 1000) == ("bitmask", 1000, 0)
    sparse = torch.tensor([5, 700, 999])
    scheme, bits, width = support_bits(sparse, 1000)
    assert scheme == "delta" and bits < 1000 and bits == best_delta_width(sparse)[1]
    assert support_bits(torch.zeros(0, dtype=torch.long), 1000) == ("delta", 0, 1)


def test_dense_and_quantized_bits():
    assert dense_bits(torch.zeros(10, dtype=torch.float16)) == 160
    assert dense_bits(torch.zeros(3, dtype=torch.int64)) == 192
    assert dtype_bits(torch.bfloat16) == 16
    assert quantized_bits(100, 2) == 100 + 64
    assert quantized_bits(100, 5, codebook_entries=1) == 300 + 32
