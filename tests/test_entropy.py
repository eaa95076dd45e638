"""The lossless stage (lcompress._entropy): bit-exact round trips, sizes against an independent entropy, hostile
streams."""
import hashlib
import math
import time

import numpy as np
import pytest
import torch

from lcompress import _entropy as E
from lcompress.export import CorruptFileError, pack_bits


def _entropy_bytes(x: np.ndarray) -> float:
    """n·H(empirical) / 8, computed from np.unique counts (independent of the module's histogram)."""
    _, c = np.unique(x, return_counts=True)
    p = c / x.size
    return float(-(c * np.log2(p)).sum() / 8)


def _leb128_len(v: int) -> int:
    return max(1, math.ceil(v.bit_length() / 7))


def _model_bytes(x: np.ndarray) -> int:
    """Bytes of the self-describing model, counted from its definition: method byte, k, k symbol gaps, k−1 counts."""
    u, c = np.unique(x, return_counts=True)
    gaps = np.diff(u, prepend=-1) - 1
    return 1 + _leb128_len(u.size) + sum(_leb128_len(int(g)) for g in gaps) + sum(_leb128_len(int(v)) for v in c[:-1])


def _sample(rng: np.random.Generator, kind: str, n: int, a: int) -> np.ndarray:
    if kind == "uniform":
        return rng.integers(0, a, size=n)
    if kind == "geometric":  # support gaps, quantization codes of a peaked weight distribution
        return np.minimum(rng.geometric(rng.uniform(0.05, 0.9), size=n) - 1, a - 1)
    if kind == "zipf":
        return np.minimum(rng.zipf(rng.uniform(1.3, 3.0), size=n) - 1, a - 1)
    if kind == "gaussian":  # uniform quantizer over a Gaussian: what a uniformly quantized layer's codes look like
        z = np.round(rng.normal(size=n) * a / 8 + a / 2)
        return np.clip(z, 0, a - 1).astype(np.int64)
    if kind == "sparse_alphabet":  # few distinct symbols spread over a large alphabet
        table = rng.choice(a, size=min(a, 7), replace=False)
        return table[rng.integers(0, table.size, size=n) % table.size]
    raise AssertionError(kind)


CASES = [(kind, a, seed) for kind in ("uniform", "geometric", "zipf", "gaussian", "sparse_alphabet")
         for a in (2, 3, 16, 32, 256, 1000, 65536) for seed in range(3)]


@pytest.mark.parametrize("kind,a,seed", CASES)
def test_round_trip_bit_for_bit(kind, a, seed):
    rng = np.random.default_rng(1000 * seed + a)
    n = int(rng.integers(1, 20000))
    x = _sample(rng, kind, n, a)
    data = E.encode(x, a)
    y = E.decode(data, n, a)
    assert y.dtype == (np.uint8 if a <= 256 else np.int64)
    assert np.array_equal(y.astype(np.int64), x)
    assert len(data) <= E.raw_size(n, a)
    # the stream's length is its flag: raw exactly when it is as long as the packed codes
    if len(data) == E.raw_size(n, a):
        assert data == pack_bits(x, max(0, math.ceil(math.log2(a))))


@pytest.mark.parametrize("kind,a,seed", [c for c in CASES if c[0] != "uniform" and c[1] <= 1000])
def test_coded_size_close_to_the_empirical_entropy(kind, a, seed):
    rng = np.random.default_rng(7 + seed)
    n = 50000
    x = _sample(rng, kind, n, a)
    ideal = _entropy_bytes(x)
    bound = ideal * 1.01 + _model_bytes(x) + 8  # 8: the coder's 64-bit state
    ans = E._ans(x, a, E.raw_size(n, a))
    if ans is not None:
        assert len(ans) <= bound
        # not below what an order-0 code of these counts can take (the model is transmitted on top)
        assert len(ans) >= ideal + _model_bytes(x) - 1
    data = E.encode(x, a)  # the chosen form: no longer than the ANS one, and no shorter than n·H on i.i.d. data
    assert ideal - 1 <= len(data) <= min(bound, E.raw_size(n, a))


def _uniform_codes(w: np.ndarray, bits: int) -> np.ndarray:
    """Codes of the MSE-best uniform quantizer with 2^bits levels on [−c, c] (c searched on a grid)."""
    k, best = 1 << bits, None
    for c in np.linspace(1.5, 5.0, 141):
        step = 2 * c / (k - 1)
        q = np.clip(np.round((w + c) / step), 0, k - 1)
        mse = float(((q * step - c - w) ** 2).mean())
        if best is None or mse < best[0]:
            best = (mse, q.astype(np.int64))
    return best[1]


def test_size_matches_the_entropy_at_headroom_figures():
    """Issue 11: uniform 4-bit and 8-bit codes of Gaussian weights take about 3.59 and 7.04 bits a code."""
    w = np.random.default_rng(0).normal(size=266_200)
    for bits, expect in ((4, 3.59), (8, 7.04)):
        codes = _uniform_codes(w, bits)
        per = 8 * len(E.encode(codes, 1 << bits)) / w.size
        assert per == pytest.approx(8 * (_entropy_bytes(codes) + _model_bytes(codes)) / w.size, abs=0.002)
        assert per == pytest.approx(expect, abs=0.06)


def test_coding_helps_skewed_and_falls_back_on_uniform():
    rng = np.random.default_rng(3)
    skew = (rng.random(100_000) < 0.03).astype(np.int64)
    assert len(E.encode(skew, 2)) < 0.25 * E.raw_size(skew.size, 2)  # H(0.03) = 0.19 bits
    flat = rng.integers(0, 256, size=100_000)
    assert E.encode(flat, 256) == flat.astype(np.uint8).tobytes()  # nothing to gain: the raw bytes, no flag


@pytest.mark.parametrize("a", [1, 2, 3, 256, 65536, 1 << 32])
def test_degenerate_streams(a):
    assert E.encode(np.zeros(0, dtype=np.int64), a) == b""
    assert E.decode(b"", 0, a).size == 0
    for n in (1, 2, 1000):
        for s in {0, a - 1}:
            x = np.full(n, s, dtype=np.int64)
            data = E.encode(x, a)
            assert np.array_equal(E.decode(data, n, a).astype(np.int64), x)
            assert len(data) <= E.raw_size(n, a)
            if n == 1000 and a > 1:
                assert len(data) <= 8  # a constant stream is its model alone
    if a == 1:
        assert E.encode(np.zeros(5, dtype=np.int64), 1) == b""
        assert np.array_equal(E.decode(b"", 5, 1), np.zeros(5))


def test_large_symbols_of_a_32_bit_alphabet():
    rng = np.random.default_rng(5)
    table = np.array([0, 1, 2**31 + 5, 2**32 - 1], dtype=np.int64)
    x = table[rng.choice(4, size=3000, p=[0.7, 0.1, 0.1, 0.1])]
    data = E.encode(x, 1 << 32)
    assert len(data) < E.raw_size(x.size, 1 << 32) / 10
    assert np.array_equal(E.decode(data, x.size, 1 << 32), x)


def test_accepts_tensors_and_lists():
    t = torch.tensor([0, 0, 0, 1, 0, 0, 0, 0, 2, 0] * 50, dtype=torch.uint8)
    assert E.encode(t, 3) == E.encode(t.tolist(), 3) == E.encode(t.numpy(), 3)


def test_the_ans_stream_format_is_stable():
    """A golden ANS stream: a changed coder (a constriction quantizing probabilities otherwise) would break files.
    (zstd frames need no such test: any zstd decodes any frame; only the encoder's choices change.)"""
    x = (np.arange(5000) * 7919 % 61) % 5
    x[::3] = 0
    data = E._ans(x, 8, E.raw_size(x.size, 8))
    assert data[0] == E.ANS
    assert len(data) == 1299
    assert hashlib.sha256(data).hexdigest()[:16] == "942e10e030e8397f"
    assert np.array_equal(E.decode(data, x.size, 8), x)


def test_repeats_go_to_zstd():
    """A layer whose rows share a pattern (dead inputs): zstd's matching beats the order-0 model, losslessly."""
    rng = np.random.default_rng(4)
    row = rng.integers(0, 2, size=784)
    x = np.tile(row, 300)
    x[rng.integers(0, x.size, size=500)] ^= 1
    data = E.encode(x, 2)
    assert E.form(data, x.size, 2) == "zstd-packed"
    assert len(data) < 0.2 * len(E._ans(x, 2, E.raw_size(x.size, 2)))
    assert np.array_equal(E.decode(data, x.size, 2), x)
    gaps = np.tile(rng.geometric(0.1, size=300) - 1, 40).clip(0, 62)  # a 6-bit alphabet: symbols ≠ packed bytes
    data = E.encode(gaps, 64)
    assert E.form(data, gaps.size, 64) == "zstd-symbols"
    assert np.array_equal(E.decode(data, gaps.size, 64), gaps)


def test_a_hostile_zstd_frame_is_refused():
    import zstandard

    n, a = 5000, 4  # raw: 1250 bytes
    plain = zstandard.ZstdCompressor(level=3, write_content_size=False, write_checksum=False)
    good = bytes([E.ZSTD_PACKED]) + plain.compress(bytes(1250))
    assert np.array_equal(E.decode(good, n, a), np.zeros(n))
    streaming = zstandard.ZstdCompressor(compression_params=zstandard.ZstdCompressionParameters(
        window_log=27, write_content_size=False)).compressobj()  # streamed: the size is not known, the window kept
    big_window = streaming.compress(bytes(1250)) + streaming.flush()
    assert zstandard.get_frame_parameters(big_window).window_size == 1 << 27
    cases = {
        "declares 10^6 bytes": zstandard.ZstdCompressor(level=3).compress(bytes(10**6)),
        "holds more than the raw form": plain.compress(bytes(1251)),
        "holds less": plain.compress(bytes(1249)),
        "two frames": plain.compress(bytes(625)) + plain.compress(bytes(625)),
        "a frame and trailing bytes": plain.compress(bytes(1250)) + b"\0\0",
        "a 2^27-byte window": big_window,
        "not a frame": b"\x28\xb5\x2f\xfd" + bytes(10),
    }
    for what, frame in cases.items():
        data = bytes([E.ZSTD_PACKED]) + frame
        if len(data) >= E.raw_size(n, a):
            continue
        with pytest.raises(CorruptFileError):
            E.decode(data, n, a)
    # zstd-symbols: symbols beyond the alphabet are refused
    data = bytes([E.ZSTD_SYMBOLS]) + plain.compress(bytes([3, 5] * 2500))
    with pytest.raises(CorruptFileError, match="beyond its alphabet"):
        E.decode(data, n, a)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="alphabet_size=0"):
        E.encode([0], 0)
    with pytest.raises(ValueError, match="alphabet_size"):
        E.encode([0], (1 << 32) + 1)
    with pytest.raises(ValueError, match=r"\[0, alphabet_size=4\)"):
        E.encode([0, 4], 4)
    with pytest.raises(ValueError, match=r"\[0, alphabet_size=4\)"):
        E.encode([-1, 2], 4)
    with pytest.raises(ValueError, match="integers"):
        E.encode(np.array([0.5, 1.0]), 4)
    with pytest.raises(ValueError, match="n=-1"):
        E.decode(b"", -1, 4)


@pytest.fixture(params=["ans", "zstd-packed", "zstd-symbols"])
def coded(request):
    rng = np.random.default_rng(11)
    x = rng.choice(8, size=4000, p=[0.5, 0.2, 0.1, 0.1, 0.05, 0.03, 0.01, 0.01])
    a = 8
    if request.param == "zstd-packed":
        x, a = np.tile(x[:400] > 0, 20).astype(np.int64), 2
    elif request.param == "zstd-symbols":
        x = np.tile(x[:400], 10)  # 3-bit symbols: zstd matches them better as bytes than packed
    data = E.encode(x, a)
    assert E.form(data, x.size, a) == request.param
    return x, data, a


def test_every_truncation_raises(coded):
    x, data, a = coded
    for cut in range(len(data)):
        with pytest.raises(CorruptFileError):
            E.decode(data[:cut], x.size, a)


def test_flipped_bits_raise(coded):
    x, data, a = coded
    rng = np.random.default_rng(0)
    positions = list(range(min(len(data), 64))) + list(rng.integers(0, len(data), size=200))
    unused = 0
    for i in positions:
        b = bytearray(data)
        b[i] ^= 1 << int(rng.integers(8))
        try:
            y = E.decode(bytes(b), x.size, a)
        except CorruptFileError:
            continue
        # a zstd frame has a few bits its decoder ignores (an unused header flag, padding): the symbols are the
        # same; any flip that changes them is caught (the frame's checksum)
        assert E.form(data, x.size, a) != "ans" and np.array_equal(y.astype(np.int64), x)
        unused += 1
    assert unused <= 0.05 * len(positions)


def test_garbage_and_wrong_lengths_raise(coded):
    x, data, a = coded
    rng = np.random.default_rng(1)
    for _ in range(200):
        g = bytearray(rng.integers(0, 256, size=int(rng.integers(1, len(data))), dtype=np.uint8).tobytes())
        g[0] = int(rng.choice([E.ANS, E.CONSTANT, E.ZSTD_PACKED, E.ZSTD_SYMBOLS, 0, 7]))
        with pytest.raises(CorruptFileError):
            E.decode(bytes(g), x.size, a)
    for n in (x.size - 1, x.size + 1, 2 * x.size):
        with pytest.raises(CorruptFileError):
            E.decode(data, n, a)
    with pytest.raises(CorruptFileError, match="longer than its raw form"):
        E.decode(data + bytes(E.raw_size(x.size, a)), x.size, a)
    with pytest.raises(CorruptFileError, match="beyond its alphabet"):
        E.decode(pack_bits(np.array([5, 1]), 3), 2, 5)


def test_a_hostile_model_is_refused_before_allocating():
    """k, the symbols and the counts are checked against n and A before anything of their size is made."""
    n = 20

    def stream(*varints):
        return bytes([E.ANS]) + E._varints(np.array(varints, dtype=np.uint64))

    cases = {
        "claims more symbols than n": stream(1 << 40, 0, 0),
        "claims 2^63 symbols": bytes([E.ANS]) + b"\xff" * 8 + b"\x7f",
        "a varint of ten bytes": bytes([E.ANS]) + b"\xff" * 9 + b"\x01",
        "a symbol beyond the alphabet": stream(2, 0, 300, 5),
        "counts above n": stream(2, 0, 0, 11),
        "a zero count": stream(2, 0, 0, 0),
        "a constant stream with two symbols": bytes([E.CONSTANT]) + E._varints(np.array([2, 0, 0])),
        "a constant stream with trailing bytes": bytes([E.CONSTANT]) + E._varints(np.array([1, 3])) + b"\0",
    }
    for what, data in cases.items():
        assert len(data) < E.raw_size(n, 256), what
        with pytest.raises(CorruptFileError):
            E.decode(data, n, 256)


def test_varints_round_trip():
    rng = np.random.default_rng(2)
    v = np.concatenate([[0, 1, 127, 128, 2**14 - 1, 2**14, 2**63 - 1], rng.integers(0, 2**62, size=1000)])
    enc = E._varints(v)
    assert len(enc) == sum(_leb128_len(int(t)) for t in v)
    out, pos = E._read_varints(np.frombuffer(enc, np.uint8), 0, v.size, "test")
    assert pos == len(enc) and np.array_equal(out, v.astype(np.int64))


def test_module_doctest():
    import doctest

    assert doctest.testmod(E).failed == 0


def test_repeated_encodes_are_cached_and_equal():
    rng = np.random.default_rng(9)
    x = rng.geometric(0.2, size=50_000).clip(1, 64) - 1
    first = E.encode(x, 64)
    t = time.perf_counter()
    again = E.encode(x.copy(), 64)
    assert again == first and time.perf_counter() - t < 0.05
    y = x.copy()
    y[17] = (y[17] + 1) % 64  # one symbol changed: a new stream, not the cached one
    assert np.array_equal(E.decode(E.encode(y, 64), y.size, 64), y)
