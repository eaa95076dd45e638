"""One definition of the compression ratio: the size report's scopes counted by hand, and export()'s, inspect's
and the CLI's ratio equal to the size report's."""
import math

import pytest
import torch
from torch import nn

import lcompress as lc
from lcompress.sizes import compression_ratio


class Tagger(nn.Module):
    """A large embedding table left dense and a small quantized head: the whole-model ratio is near 1."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(2000, 64)
        self.head = nn.Linear(64, 64)


def test_size_report_scopes_against_hand_counts():
    net = Tagger()
    alg = lc.LC(net, {"head.weight": lc.AdaptiveQuantization(2)})
    rep = alg.size_report()
    head_ref, head_bits = 64 * 64 * 32, 64 * 64 * 1 + 2 * 32
    other = (2000 * 64 + 64) * 32  # the table and the head's bias
    assert rep["scopes"]["compressed"] == {"reference_bits": head_ref, "compressed_bits": head_bits,
                                           "ratio": head_ref / head_bits}
    assert rep["scopes"]["uncompressed"] == {"reference_bits": other, "compressed_bits": other, "ratio": 1.0}
    assert rep["scopes"]["model"] == {"reference_bits": head_ref + other, "compressed_bits": head_bits + other,
                                      "ratio": (head_ref + other) / (head_bits + other)}
    assert rep["ratio"] == rep["scopes"]["model"]["ratio"] < 1.04 < 30 < rep["scopes"]["compressed"]["ratio"]
    # compressing the table as well moves the whole model's ratio, not the head's
    alg2 = lc.LC(Tagger(), {"head.weight": lc.AdaptiveQuantization(2), "emb.weight": lc.RowwiseQuantization(2)})
    rep2 = alg2.size_report()
    assert rep2["ratio"] > 10 and rep2["scopes"]["uncompressed"]["reference_bits"] == 64 * 32


def test_export_inspect_and_the_cli_report_the_size_reports_ratio(tmp_path, capsys):
    torch.manual_seed(0)
    alg = lc.LC(Tagger(), {"head.weight": lc.AdaptiveQuantization(4), "emb.weight": lc.RowwiseQuantization(4)})
    rep = alg.size_report()
    info = alg.export(tmp_path / "m.lcz")
    assert info["ratio"] == rep["ratio"] == compression_ratio(rep["reference_bits"], rep["compressed_bits"])
    size = (tmp_path / "m.lcz").stat().st_size
    assert info["file_ratio"] == rep["reference_bits"] / 8 / size < info["ratio"]  # the header costs a little
    rows = {r["task"]: r for r in lc.export.inspect(tmp_path / "m.lcz")}
    for t in rep["tasks"]:
        assert rows[t["task"]]["ratio"] == t["ratio"]


def test_compression_ratio():
    assert compression_ratio(64, 2) == 32.0
    assert compression_ratio(64, 0) == math.inf
