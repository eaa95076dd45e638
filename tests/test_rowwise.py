"""Quantization by row: the batched exact C step against the single-vector exact solver and brute force, the
codec's round trip and hostile records, and LC + export + compact load of a model with an nn.Embedding."""
import itertools
import math

import pytest
import torch
from torch import nn

import lcompress as lc
from lcompress import _packed
from lcompress import functional as F
from lcompress.nn import CodebookEmbedding


def _sse(x, c, a):
    return ((x.double() - c.double().gather(1, a.long())) ** 2).sum(dim=1)


@pytest.mark.parametrize("d, k", [(1, 1), (5, 1), (5, 5), (7, 3), (16, 4), (33, 16), (64, 8), (100, 2)])
def test_rows_match_the_exact_single_vector_solver(d, k):
    g = torch.Generator().manual_seed(d * 100 + k)
    x = torch.randn(40, d, generator=g) * torch.logspace(-3, 3, 40).unsqueeze(1)  # rows of very different scales
    x[0] = 1.5  # a constant row
    if d >= 3:
        x[1, :3] = 2.0  # ties
    c, a = F.kmeans_1d_exact_rows(x, k)
    assert c.shape == (40, k) and a.shape == (40, d) and int(a.min()) >= 0 and int(a.max()) < k
    assert bool((c[:, 1:] >= c[:, :-1]).all())
    ref = torch.stack([_sse(r.unsqueeze(0), *[t.unsqueeze(0) for t in F.kmeans_1d_exact(r, k)]).squeeze(0)
                       for r in x])
    torch.testing.assert_close(_sse(x, c, a), ref, rtol=1e-9, atol=1e-12)


def test_rows_match_brute_force_on_tiny_rows():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(6, 6, generator=g)
    for k in (2, 3):
        c, a = F.kmeans_1d_exact_rows(x, k)
        for r in range(6):
            best = min(
                float(((x[r].double() - torch.tensor([x[r][torch.tensor(lab) == j].double().mean() for j in lab]))
                       ** 2).sum())
                for lab in itertools.product(range(k), repeat=6) if len(set(lab)) == k)
            assert float(_sse(x[r : r + 1], c[r : r + 1], a[r : r + 1])) <= best + 1e-9


def test_rows_are_processed_in_chunks_without_changing_the_result(monkeypatch):
    from lcompress import _kmeans_rows

    x = torch.randn(50, 9, generator=torch.Generator().manual_seed(2))
    whole = _kmeans_rows.kmeans_1d_exact_rows(x, 3)
    monkeypatch.setattr(_kmeans_rows, "_CHUNK_ELEMENTS", 250)  # 2 rows a chunk
    parts = _kmeans_rows.kmeans_1d_exact_rows(x, 3)
    assert torch.equal(whole[0], parts[0]) and torch.equal(whole[1], parts[1])


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match=r"k=4 must be an integer in \[1, 3\]"):
        F.kmeans_1d_exact_rows(torch.zeros(2, 3), 4)
    with pytest.raises(ValueError, match="must be a non-empty matrix"):
        F.kmeans_1d_exact_rows(torch.zeros(6), 2)
    with pytest.raises(ValueError, match="NaN or Inf"):
        F.kmeans_1d_exact_rows(torch.tensor([[0.0, float("nan")]]), 1)
    with pytest.raises(ValueError, match=r"k=300 must be in the range \[1, 256\]"):
        lc.RowwiseQuantization(300)
    with pytest.raises(ValueError, match=r"task 'emb.weight'.*k=16 exceeds the row length \(8\)"):
        lc.LC(Tagger(dim=8), {"emb.weight": lc.RowwiseQuantization(16)})


class Tagger(nn.Module):
    """An embedding table that dominates the model, and a small head."""

    def __init__(self, vocab=500, dim=32):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, ids):
        return self.head(self.emb(ids).mean(dim=1))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 16])
def test_lc_export_and_compact_load_of_an_embedding(tmp_path, k):
    torch.manual_seed(k)
    net = Tagger()
    with torch.no_grad():
        net.emb.weight.mul_(torch.logspace(-2, 2, 500).unsqueeze(1))
    alg = lc.LC(net, {"emb.weight": lc.RowwiseQuantization(k), "head.weight": lc.AdaptiveQuantization(2)})
    comp = alg.tasks[0].compression
    w = net.emb.weight.detach()
    c_ref, a_ref = F.kmeans_1d_exact_rows(w, k)
    assert torch.equal(comp.decompress(), c_ref.gather(1, a_ref))
    info = alg.export(tmp_path / "t.lcz")
    width = 0 if k == 1 else math.ceil(math.log2(k))
    packed = 500 * 32 * width + 500 * k * 32
    assert comp.count_bits(lossless=False) == packed  # the lossless stage may code the codes shorter
    assert alg.size_report()["tasks"][0]["bits"] == comp.count_bits() <= packed
    plain = lc.load(tmp_path / "t.lcz", Tagger())
    compact = lc.load(tmp_path / "t.lcz", Tagger(), compact=True)
    assert isinstance(compact.emb, CodebookEmbedding)
    ids = torch.randint(0, 500, (7, 3))
    with alg.compressed():
        ref = net(ids)
        torch.testing.assert_close(plain.emb.weight, net.emb.weight, rtol=0, atol=0)
    torch.testing.assert_close(compact(ids), ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(compact.emb.decoded_weight(), plain.emb.weight)
    # small in memory: about the file's bytes for the table (its Θ)
    rows = {r["task"]: r for r in lc.export.inspect(tmp_path / "t.lcz")}
    assert rows["emb.weight"]["file_bytes"] <= packed / 8 + 8
    assert _packed.resident_bytes(compact.emb) <= 1.2 * packed / 8 + 8  # against the packed codes (random access)
    assert info["file_bytes"] < 500 * 32 * 4  # the float32 table alone


def test_codebook_embedding_state_dict_round_trip_and_hostile_codes():
    emb = nn.Embedding(10, 12)
    cbs = torch.randn(10, 3)
    codes = torch.randint(0, 3, (10, 12))
    m = CodebookEmbedding.from_codes(emb, cbs, codes)
    assert m.row_bytes == 4  # 12 codes padded to 16, 2 bits each
    ref = torch.gather(cbs, 1, codes)
    assert torch.equal(m.decoded_weight(), ref) and torch.equal(m.codes.long(), codes)
    ids = torch.tensor([[3, 3, 9], [0, 1, 2]])
    assert torch.equal(m(ids), ref[ids])
    fresh = CodebookEmbedding(10, 12, 3)
    fresh.load_state_dict(m.state_dict())
    assert torch.equal(fresh(ids), m(ids))
    bad = dict(m.state_dict(), packed_codes=torch.full_like(m.packed_codes, 0xFF))
    with pytest.raises(RuntimeError, match="holds a code >= k=3"):
        CodebookEmbedding(10, 12, 3).load_state_dict(bad)
    with pytest.raises(ValueError, match="codes must lie in"):
        CodebookEmbedding.from_codes(emb, cbs, codes + 1)
    with pytest.raises(ValueError, match=r"codebook of shape \(9, 3\) for 10 rows"):
        CodebookEmbedding.from_codes(emb, cbs[:9], codes)
    half = CodebookEmbedding.from_codes(emb.to(torch.bfloat16), cbs, codes)
    assert half(ids).dtype == torch.bfloat16


def test_hostile_row_codebook_records_are_refused(tmp_path):
    from lcompress.codecs import Checker, CorruptFileError

    rec = {"kind": "rowcodebook", "rows": 4, "cols": 8, "k": 3, "width": 2, "codes": [0, 8], "codebooks": [8, 48]}
    chk = Checker("f", {"theta": 56, "dense": 0})
    chk.theta(rec, {"type": "RowwiseQuantization", "k": 3}, [4, 8], "t")
    for bad, msg in [({"rows": 5}, "are not the view"), ({"k": 9}, "is not an integer in"),
                     ({"width": 1}, "is not ⌈log₂ K⌉"), ({"codebooks": [8, 40]}, "has 40 bytes"),
                     ({"codes": [0, 7]}, "has 7 bytes")]:
        with pytest.raises(CorruptFileError, match=msg):
            chk.theta({**rec, **bad}, {"type": "RowwiseQuantization", "k": 3}, [4, 8], "t")
    with pytest.raises(CorruptFileError, match="not a matrix"):
        chk.theta(rec, {"type": "RowwiseQuantization", "k": 3}, [32], "t")
