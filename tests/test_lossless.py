"""The lossless stage in .lcz files: the size report counts the coded bytes, the round trip is bit for bit, the
format version says whether any stream is coded, and hostile coded streams are refused."""
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import lcompress as lc
from lcompress import _entropy, codecs, export
from lcompress.codecs import CorruptFileError

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fuzz_lcz import rebuild, split  # noqa: E402


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(400, 64)
        self.fc2 = nn.Linear(64, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _model(seed=0):
    """Weights with a trained layer's structure: heavy-tailed (so codes are skewed), and dead inputs (an image's
    border) carrying small weights (so a support's rows repeat a pattern)."""
    torch.manual_seed(seed)
    m = MLP()
    with torch.no_grad():
        for p in (m.fc1.weight, m.fc2.weight, m.fc3.weight):
            p.mul_(torch.randn_like(p).exp())
        live = torch.zeros(20, 20, dtype=torch.bool)
        live[4:16, 4:16] = True
        m.fc1.weight.mul_(torch.where(live.reshape(-1), 1.0, 0.02))
    return m.eval()


SCHEMES = {
    "prune_5_codebook_32": lambda: {("fc1.weight", "fc2.weight", "fc3.weight"):
                                    lc.ConstraintL0Pruning(fraction=0.05, value_codebook=32)},
    "quantize_k4": lambda: {"re:fc\\d\\.weight": lc.AdaptiveQuantization(k=4)},
    "prune_5": lambda: {("fc1.weight", "fc2.weight", "fc3.weight"): lc.ConstraintL0Pruning(fraction=0.05)},
    "binary_plus_sparse": lambda: {("fc1.weight", "fc2.weight", "fc3.weight"):
                                   lc.AdaptiveQuantization(k=2) + lc.ConstraintL0Pruning(fraction=0.01)},
}


def _segments(rec):
    """Every (field, segment) of a Θ record, parts included."""
    for k, v in rec.items():
        if k == "parts":
            for p in v:
                yield from _segments(p)
        elif isinstance(v, list) and len(v) == 2 and all(isinstance(x, int) for x in v):
            yield k, v
        elif isinstance(v, dict) and "seg" in v:
            yield k, v["seg"]


@pytest.mark.parametrize("scheme", sorted(SCHEMES))
def test_size_report_counts_the_coded_bytes_and_round_trips_bit_for_bit(scheme, tmp_path):
    alg = lc.LC(_model(), SCHEMES[scheme]())
    info = alg.export(tmp_path / "m.lcz")
    got = export.read(tmp_path / "m.lcz")
    header, rep = got["header"], alg.size_report()
    # the size report is the file: per task, the bits counted are the bits written, and each stream's bytes
    # are its bits rounded up (a coded stream's bits are 8 × its bytes)
    for t, row in zip(header["tasks"], rep["tasks"]):
        assert t["bits"] == row["bits"] == alg.tasks[header["tasks"].index(t)].compression.count_bits()
        assert 0 <= 8 * t["bytes"] - t["bits"] < 8 * len(list(_segments(t["theta"])))
    payload = sum(header["blobs"].values())
    assert payload == sum(t["bytes"] for t in header["tasks"]) + rep["other_bits"] // 8
    assert info["file_bytes"] == (tmp_path / "m.lcz").stat().st_size
    # bit for bit: every decoded tensor equals Δ(Θ) exactly, and Θ's integers are the ones written
    for name, d in alg.decompressed().items():
        assert torch.equal(got["state"][name], d), name
    m2 = lc.load(tmp_path / "m.lcz", MLP().eval())
    for name, d in alg.decompressed().items():
        assert torch.equal(m2.state_dict()[name], d), name


def test_the_stage_makes_prune_and_codebook_files_smaller_and_is_versioned(tmp_path):
    alg = lc.LC(_model(), SCHEMES["prune_5_codebook_32"]())
    on = alg.export(tmp_path / "on.lcz")
    off = alg.export(tmp_path / "off.lcz", lossless=False)
    table_on, header_on, _ = split((tmp_path / "on.lcz").read_bytes())
    table_off, header_off, _ = split((tmp_path / "off.lcz").read_bytes())
    assert header_on["blobs"]["theta"] < 0.9 * header_off["blobs"]["theta"]  # codes and support: −14% here
    assert on["file_bytes"] < off["file_bytes"] - (header_off["blobs"]["theta"] - header_on["blobs"]["theta"]) / 2
    assert table_on["__metadata__"]["version"] == "2" and header_on["version"] == 2
    assert table_off["__metadata__"]["version"] == "1" and header_off["version"] == 1
    # without the stage the tasks count the packed bits, as count_bits(lossless=False) does
    for t, task in zip(header_off["tasks"], alg.tasks):
        assert t["bits"] == task.compression.count_bits(lossless=False)
        assert t["bits"] > task.compression.count_bits()
    assert off["compressed_bits"] == sum(t["bits"] for t in header_off["tasks"]) + alg.size_report()["other_bits"]
    assert off["ratio"] < on["ratio"] == alg.size_report()["ratio"]
    # both decode to the same model
    a, b = export.read(tmp_path / "on.lcz")["state"], export.read(tmp_path / "off.lcz")["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_file_with_nothing_to_code_stays_version_1_byte_for_byte(tmp_path):
    torch.manual_seed(1)
    m = nn.Linear(64, 64)  # Gaussian-like weights, K = 2: balanced codes, nothing to gain
    alg = lc.LC(m, {"weight": lc.AdaptiveQuantization(k=2)})
    on, _ = export.to_bytes(alg)
    off, _ = export.to_bytes(alg, lossless=False)
    assert on == off
    assert split(on)[0]["__metadata__"]["version"] == "1"


def test_support_form_is_chosen_by_coded_size():
    """With the stage the sparse codec picks the support form whose coded stream is shortest (never longer than
    the packed bits' best form, coded)."""
    from lcompress.codecs.sparse import coded_support
    from lcompress.sizes import support_bits

    alg = lc.LC(_model(), SCHEMES["prune_5"]())
    th = alg.tasks[0].compression.theta
    idx, n = th["indices"], th["n"]
    w = codecs.Writer(dry=True)
    raw_scheme, _, raw_width = support_bits(idx, n)
    scheme, width = coded_support(idx, n, w, (raw_scheme, raw_width))

    def coded(s, b):
        if s == "bitmask":
            mask = torch.zeros(n, dtype=torch.uint8)
            mask[idx] = 1
            return len(_entropy.encode(mask, 2))
        return len(_entropy.encode(codecs.delta_encode(idx, b), 1 << b))

    best = coded(scheme, width)
    assert best <= coded(raw_scheme, raw_width)
    assert best == min([coded("bitmask", 0)] + [coded("delta", b) for b in range(1, 17)])


def test_writer_rejects_a_bad_lossless_flag():
    with pytest.raises(TypeError, match="lossless=1"):
        codecs.Writer(lossless=1)


# ---- hostile coded streams -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coded_file():
    alg = lc.LC(_model(), SCHEMES["prune_5_codebook_32"]())
    data, header = export.to_bytes(alg)
    rec = header["tasks"][0]["theta"]
    raw_codes = -(-rec["nnz"] * rec["code_width"] // 8)
    assert rec["codes"][1] < raw_codes  # the codes are coded
    return data


def _payload_edit(data: bytes, offset: int, xor: int) -> bytes:
    """The file with one byte of the theta blob flipped and the checksum recomputed."""
    table, header, payload = split(data)
    a = table["theta"]["data_offsets"][0]
    p = bytearray(payload)
    p[a + offset] ^= xor
    n = int.from_bytes(data[:8], "little")
    return rebuild(data[: 8 + n] + bytes(p), header)


def test_a_changed_coded_byte_is_refused(coded_file):
    _, header, _ = split(coded_file)
    rec = header["tasks"][0]["theta"]
    off, length = rec["codes"]
    for i in (0, 1, 2, length // 2, length - 1):
        bad = _payload_edit(coded_file, off + i, 0x10)
        with pytest.raises(CorruptFileError, match="corrupted .lcz payload"):
            export.read(bad)


@pytest.mark.parametrize("edit", ["longer", "shorter", "empty"])
def test_a_coded_segment_of_another_length_is_refused(coded_file, edit):
    _, header, _ = split(coded_file)
    rec = header["tasks"][0]["theta"]
    off, length = rec["codes"]
    rec["codes"] = [off, {"longer": length + 1, "shorter": length - 1, "empty": 0}[edit]]
    with pytest.raises(CorruptFileError):
        export.read(rebuild(coded_file, header))


def test_a_version_1_file_may_not_hold_coded_streams(coded_file):
    table, header, payload = split(coded_file)
    table["__metadata__"]["version"] = "1"
    header["version"] = 1
    from test_fuzz_lcz import frame

    with pytest.raises(CorruptFileError, match="codes"):
        export.read(rebuild(frame(table, payload), header))


def test_inspect_and_compact_load_read_coded_files(coded_file, tmp_path):
    path = tmp_path / "c.lcz"
    path.write_bytes(coded_file)
    rows = export.inspect(path)
    assert sum(r["file_bytes"] for r in rows) == len(coded_file)
    m = lc.load(path, MLP().eval(), compact=True)
    x = torch.randn(3, 400)
    ref = lc.load(path, MLP().eval())
    assert torch.allclose(m(x), ref(x), atol=1e-6)
