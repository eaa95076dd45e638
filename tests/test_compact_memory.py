"""Codebook layers keep their codes bit-packed: the packing against the file's independent (numpy) bit packer,
outputs against F.linear / F.conv2d with the dense decoded weight codebook[codes], resident bytes against the file,
state-dict round trips and hostile state dicts."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lcompress as lc
from lcompress import _packed
from lcompress.export import pack_bits
from lcompress.nn import CodebookConv2d, CodebookLinear
from lcompress.sizes import index_bits

KS = [1, 2, 3, 4, 5, 7, 8, 9, 16, 17, 33, 64, 100, 128, 200, 256, 300]


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", [1, 7, 8, 1003])
def test_pack_codes_is_the_files_bit_stream_and_round_trips(k, n):
    g = torch.Generator().manual_seed(k * 1000 + n)
    codes = torch.randint(0, k, (n,), generator=g)
    p = _packed.pack_codes(codes, k)
    assert p.numel() == _packed.packed_bytes(n, k)
    if index_bits(k) <= 8:
        ref = pack_bits(codes, index_bits(k))
        assert p.dtype == torch.uint8 and bytes(p.numpy()[: len(ref)]) == ref
        assert p.numel() - len(ref) < max(1, index_bits(k))  # group padding: under w bytes
        assert not p[len(ref):].any()
    assert torch.equal(_packed.unpack_codes(p, n, k).long(), codes)
    cb = torch.randn(k, generator=g)
    dec = _packed.Decoder(p, cb, k)
    assert torch.equal(dec.values(0, n), cb[codes])
    if n > 16:
        assert torch.equal(dec.values(8, n - 16), cb[codes[8 : n - 8]])


def test_pack_codes_refuses_codes_out_of_range():
    with pytest.raises(ValueError, match=r"codes must lie in \[0, 3\)"):
        _packed.pack_codes(torch.tensor([0, 3]), 3)
    with pytest.raises(ValueError, match="start=4 must be a multiple of 8"):
        _packed.Decoder(_packed.pack_codes(torch.zeros(32, dtype=torch.long), 4), torch.zeros(4), 4).values(4, 8)


def _codebook_linear(k, out_f, in_f, seed=0, bias=True, **kw):
    g = torch.Generator().manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    cb, codes = torch.randn(k, generator=g), torch.randint(0, k, (out_f, in_f), generator=g)
    return lin, cb, codes, CodebookLinear.from_codes(lin, cb, codes, **kw)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 6, 8, 16, 17, 256, 300])
@pytest.mark.parametrize("tile_weights", [None, 1, 40, 10**6])
@pytest.mark.parametrize("bias", [True, False])
def test_codebook_linear_equals_the_dense_decoded_weight(k, tile_weights, bias):
    lin, cb, codes, m = _codebook_linear(k, 21, 13, seed=k, bias=bias, tile_weights=tile_weights)
    x = torch.randn(2, 5, 13, dtype=torch.float64).float()
    ref = F.linear(x, cb[codes], lin.bias)
    out = m(x)
    assert out.shape == (2, 5, 21)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert torch.equal(m.codes.long(), codes) and torch.equal(m.decoded_weight(), cb[codes])


def test_tiles_start_on_whole_groups():
    for cols in (1, 3, 8, 12, 13, 784):
        for tw in (1, 100, 5000):
            r = _packed.tile_rows(cols, tw)
            assert r >= 1 and (r * cols) % _packed.GROUP == 0


@pytest.mark.parametrize("k", [2, 3, 16])
@pytest.mark.parametrize("groups, padding_mode", [(1, "zeros"), (2, "reflect")])
def test_codebook_conv_equals_the_dense_decoded_weight(k, groups, padding_mode):
    g = torch.Generator().manual_seed(k)
    conv = nn.Conv2d(4, 6, 3, padding=1, groups=groups, padding_mode=padding_mode)
    cb, codes = torch.randn(k, generator=g), torch.randint(0, k, conv.weight.shape, generator=g)
    m = CodebookConv2d.from_codes(conv, cb, codes)
    with torch.no_grad():
        conv.weight.copy_(cb[codes])
    x = torch.randn(2, 4, 7, 7)
    torch.testing.assert_close(m(x), conv(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_layers_match_their_half_weights(dtype):
    lin, cb, codes, _ = _codebook_linear(4, 40, 24)
    half = lin.to(dtype)
    x = torch.randn(3, 24).to(dtype)
    ref = F.linear(x.float(), cb.to(dtype).float()[codes], half.bias.float())
    for tw in (None, 48):
        m = CodebookLinear.from_codes(half, cb, codes, tile_weights=tw)
        assert m.codebook.dtype == dtype and m.packed_codes.dtype == torch.uint8
        out = m(x)
        assert out.dtype == dtype
        torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2)


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(256, 300)
        self.fc2 = nn.Linear(300, 100)


@pytest.mark.parametrize("k", [2, 3, 4, 5, 8, 16])
def test_resident_bytes_are_within_1_2x_of_the_files_bytes_per_layer(tmp_path, k):
    torch.manual_seed(k)
    net = Mlp()
    alg = lc.LC(net, {"re:fc\\d\\.weight": lc.AdaptiveQuantization(k)})
    # against the packed codes (lossless=False): memory keeps them packed for random access, while the lossless
    # stage's coded stream (e.g. log2(3) bits a code at K=3) is smaller than any random-access layout
    alg.export(tmp_path / "m.lcz", lossless=False)
    rows = {r["task"]: r for r in lc.export.inspect(tmp_path / "m.lcz")}
    compact = lc.load(tmp_path / "m.lcz", Mlp(), compact=True)
    for name in ("fc1", "fc2"):
        layer = getattr(compact, name)
        assert isinstance(layer, CodebookLinear)
        file_bytes = rows[f"{name}.weight"]["file_bytes"] + 4 * layer.out_features  # Θ, and the float32 bias
        assert _packed.resident_bytes(layer) <= 1.2 * file_bytes
    x = torch.randn(4, 256)
    with alg.compressed():
        torch.testing.assert_close(compact.fc2(compact.fc1(x)), net.fc2(net.fc1(x)), rtol=1e-5, atol=1e-5)


def test_resident_bytes_count_a_shared_codebook_once():
    lin = nn.Linear(16, 8)
    cb = torch.tensor([-1.0, 1.0])
    a = CodebookLinear.from_codes(lin, cb, torch.randint(0, 2, (8, 16)))
    b = CodebookLinear.from_codes(lin, cb, torch.randint(0, 2, (8, 16)))
    pair = nn.Sequential(a, b)
    assert a.codebook is b.codebook
    assert _packed.resident_bytes(pair) == 2 * (16 + 8 * 4) + 8


@pytest.mark.parametrize("k", [3, 16, 300])
def test_state_dict_round_trip(k):
    lin, cb, codes, m = _codebook_linear(k, 9, 11, seed=1)
    fresh = CodebookLinear(11, 9, k)
    fresh.load_state_dict(m.state_dict())
    x = torch.randn(4, 11)
    assert torch.equal(fresh(x), m(x))
    # a state dict of the unpacked layout (one code per weight) loads too
    old = {"codes": codes.to(torch.uint8 if k <= 256 else torch.int16), "codebook": cb, "bias": lin.bias.detach()}
    fresh2 = CodebookLinear(11, 9, k)
    fresh2.load_state_dict(old)
    assert torch.equal(fresh2(x), m(x))


def test_hostile_state_dicts_are_refused():
    lin, cb, codes, m = _codebook_linear(3, 8, 8)
    sd = m.state_dict()
    bad = dict(sd, packed_codes=torch.full_like(sd["packed_codes"], 0xFF))  # codes 3 in a 3-entry codebook
    with pytest.raises(RuntimeError, match="holds a code >= k=3"):
        CodebookLinear(8, 8, 3).load_state_dict(bad)
    with pytest.raises(RuntimeError, match="size mismatch"):
        CodebookLinear(8, 8, 3).load_state_dict(dict(sd, packed_codes=sd["packed_codes"][:-1]))
    with pytest.raises(RuntimeError, match="dtype torch.int32, expected torch.uint8"):
        CodebookLinear(8, 8, 3).load_state_dict(dict(sd, packed_codes=sd["packed_codes"].int()))
    with pytest.raises(ValueError, match="tile_weights=0 must be a positive integer or None"):
        CodebookLinear(8, 8, 3, tile_weights=0)
    with pytest.raises(ValueError, match="k=0 must be an integer >= 1"):
        CodebookLinear(8, 8, 0)
    with pytest.raises(ValueError, match="codes must lie in"):
        CodebookLinear.from_codes(lin, cb, codes - 1)
