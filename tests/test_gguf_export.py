"""GGUF export (lcompress.formats.gguf) on tiny random-weight Llamas built here: every block type read back by
independent decoders (gguf-py's de-quantizer, transformers' GGUF loader, a byte layout written out by hand) equals
Δ(Θ) bit for bit, the metadata and tokenizer are the source's, and bad input is refused with nothing written."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")
gguf = pytest.importorskip("gguf")
pytest.importorskip("tokenizers")
pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file

import lcompress as lc  # noqa: E402
from lcompress import cli  # noqa: E402
from lcompress.compressions.grouped import GGUF_TYPES, gguf_type  # noqa: E402
from lcompress.formats.gguf import GGUFExportError, export_gguf, pack_blocks, rope_permutation  # noqa: E402
from lcompress.integrations import hf  # noqa: E402
from lcompress.ptq import posttrain  # noqa: E402

KINDS = ["q8_0", "q4_0", "q4_1", "q5_0", "q5_1"]
LINEAR = r"re:model\.layers\.\d+\..*_proj\.weight"


def all_but(layer):
    """Every linear layer of the blocks except ``model.layers.<layer>.weight``."""
    return r"re:model\.layers\.(?!" + layer.replace(".", r"\.") + r"\.weight)\d+\..*_proj\.weight"


WORDS = ("the quick brown fox jumps over the lazy dog while a stitch in time saves nine and every cloud has a "
         "silver lining so that all is well that ends well").split()
HF_TO_GGUF = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}


def english(n, seed):
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist()) + "."


@pytest.fixture(scope="module")
def bpe():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([english(2000, s) for s in range(3)],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                special_tokens=["<eos>"]))
    return tok


def tiny_llama(vocab, hidden=64, tied=False, seed=0):
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
                                   bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


def hf_permute(x, heads):
    """convert_hf_to_gguf.py's q/k row order for llama.cpp's rotary embedding, written out per row."""
    d = x.shape[0] // heads
    out = torch.empty_like(x)
    for h in range(heads):
        for i in range(d // 2):
            for j in range(2):
                out[h * d + 2 * i + j] = x[h * d + j * (d // 2) + i]
    return out


def write_source_gguf(path: Path, model, bpe, embd_type="F32") -> None:
    """A llama.cpp-style GGUF of a tiny Llama, its BPE tokenizer and a few extra metadata pairs (an array of floats,
    a chat template); the token embedding as F32 or Q8_0 (gguf-py's quantizer); no output.weight when tied."""
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    tokens = [None] * bpe.get_vocab_size()
    for t, i in bpe.get_vocab().items():
        tokens[i] = t
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    merges = json.loads(bpe.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_chat_template("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    w.add_array("lcompress.test.floats", [0.5, 1.25, -3.0])
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    emb = sd["model.embed_tokens.weight"]
    if embd_type == "Q8_0":
        w.add_tensor("token_embd.weight", gguf.quants.quantize(emb, gguf.GGMLQuantizationType.Q8_0),
                     raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    else:
        w.add_tensor("token_embd.weight", emb)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        for hf_name, gg in HF_TO_GGUF.items():
            x = torch.from_numpy(sd[p + hf_name + ".weight"])
            if gg in ("attn_q", "attn_k"):
                x = hf_permute(x, cfg.num_attention_heads if gg == "attn_q" else cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", x.numpy())
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    if not cfg.tie_word_embeddings:
        w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def source(bpe, tmp_path_factory):
    path = tmp_path_factory.mktemp("src") / "tiny.gguf"
    write_source_gguf(path, tiny_llama(bpe.get_vocab_size()), bpe)
    return path


def compress(path, tasks, vocab, seed=0):
    """The model in ``path`` loaded as lcompress ptq loads it, compressed post-training by round to nearest."""
    model, _ = hf.load_causal_lm(path)
    ids = torch.randint(0, vocab, (4, 32), generator=torch.Generator().manual_seed(seed))
    return posttrain(model, tasks, [ids], blocks=list(model.model.layers), solver="rtn",
                     forward=lambda m, b: m(input_ids=b, use_cache=False), progress=False)


def gguf_name(hf_name):
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, i, rest = hf_name.split(".", 3)
    return f"blk.{i}.{HF_TO_GGUF[rest[: -len('.weight')]]}.weight"


def reference_delta(comp):
    """Δ(Θ) from Θ by the formula of llama.cpp's block types (float32, as its de-quantizers compute)."""
    th, (rows, cols) = comp.theta, comp._shape
    u = th["codes"].reshape(rows, cols).float()
    d = th["scales"].float().repeat_interleave(32, dim=1)
    if comp.symmetric:
        return d * (u - 2 ** (comp.bits - 1))
    return d * u + th["mins"].float().repeat_interleave(32, dim=1)


def bits(x):
    """The float32 bit patterns (a bit-exact comparison that also tells −0.0 from 0.0)."""
    x = x.detach().float() if isinstance(x, torch.Tensor) else torch.from_numpy(np.array(x, dtype=np.float32))
    return x.contiguous().view(torch.int32)


def field_values(reader):
    out = {}
    for f in reader.fields.values():
        if not f.name.startswith("GGUF."):
            out[f.name] = (list(f.types), f.contents())
    return out


@pytest.fixture
def no_network(monkeypatch):
    import socket

    def refuse(*a, **k):
        raise AssertionError("network access")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def load_gguf(directory, name):
    """transformers' GGUF loader (it de-quantizes with gguf-py and undoes the q/k row order), float32 weights."""
    return transformers.AutoModelForCausalLM.from_pretrained(str(directory), gguf_file=name,
                                                             dtype=torch.float32).eval()


def no_temporaries(directory: Path):
    return not [p for p in directory.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------------- block layouts


def hand_block(kind, u, d, m=None) -> bytes:
    """One llama.cpp block, byte by byte as ggml-quants.c lays it out (block_q4_0 ... block_q8_0)."""
    b = struct.pack("<e", d) + (struct.pack("<e", m) if m is not None else b"")
    if kind == "q8_0":
        return b + bytes((x - 128) & 0xFF for x in u)
    if kind in ("q5_0", "q5_1"):
        qh = 0
        for j in range(32):
            qh |= ((u[j] >> 4) & 1) << j
        b += struct.pack("<I", qh)
    return b + bytes((u[j] & 0xF) | ((u[j + 16] & 0xF) << 4) for j in range(16))


@pytest.mark.parametrize("kind", KINDS)
def test_blocks_are_llama_cpp_layout(kind):
    bits_, _, sym = GGUF_TYPES[kind]
    g = torch.Generator().manual_seed(3)
    rows, cols = 3, 64
    u = torch.randint(0, 1 << bits_, (rows, cols), generator=g).to(torch.uint8)
    u[0, :32] = torch.arange(32) % (1 << bits_)  # every code position distinct in the first block
    d = (torch.rand(rows, 2, generator=g) * 0.2 - 0.1).half()
    m = None if sym else (torch.rand(rows, 2, generator=g) - 0.5).half()
    out = pack_blocks(kind, u.numpy(), d.numpy(), None if m is None else m.numpy())
    size = {"q8_0": 34, "q4_0": 18, "q4_1": 20, "q5_0": 22, "q5_1": 24}[kind]
    assert out.dtype == np.uint8 and out.shape == (rows, 2 * size)
    want = b"".join(hand_block(kind, u[r, 32 * k : 32 * k + 32].tolist(), float(d[r, k]),
                               None if m is None else float(m[r, k]))
                    for r in range(rows) for k in range(2))
    assert out.tobytes() == want
    # gguf-py's de-quantizer gives the formula's values
    deq = gguf.quants.dequantize(out, getattr(gguf.GGMLQuantizationType, kind.upper()))
    exp = d.float().repeat_interleave(32, 1) * (u.float() - 2 ** (bits_ - 1) if sym else u.float())
    if m is not None:
        exp = exp + m.float().repeat_interleave(32, 1)
    assert torch.equal(bits(deq), bits(exp))


def test_pack_blocks_refuses_bad_theta():
    u = np.zeros((2, 32), np.uint8)
    d = np.zeros((2, 1), np.float16)
    with pytest.raises(ValueError, match="a code 16 does not fit 4 bits"):
        pack_blocks("q4_0", u + 16, d)
    with pytest.raises(ValueError, match="multiple of 32"):
        pack_blocks("q4_0", np.zeros((2, 48), np.uint8), d)
    with pytest.raises(ValueError, match="q4_1 needs mins"):
        pack_blocks("q4_1", u, d)
    with pytest.raises(ValueError, match="scales must be float16"):
        pack_blocks("q8_0", u, d.astype(np.float32))
    with pytest.raises(ValueError, match="kind='q2_k'"):
        pack_blocks("q2_k", u, d)


@pytest.mark.parametrize("rows, heads", [(64, 4), (32, 2), (12, 3)])
def test_rope_permutation_is_convert_order_and_transformers_undoes_it(rows, heads):
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    x = torch.randn(rows, 5)
    perm = rope_permutation(rows, heads)
    assert torch.equal(x[perm], hf_permute(x, heads))
    back = LlamaTensorProcessor()._reverse_permute_weights(x[perm].numpy(), heads, heads)
    assert np.array_equal(back, x.numpy())
    with pytest.raises(ValueError, match="do not split into 4 heads of an even size"):
        rope_permutation(20, 4)


# ------------------------------------------------------------------------------------- export, read back, load


@pytest.mark.parametrize("kind", KINDS)
def test_export_reads_back_exactly(kind, source, bpe, tmp_path, no_network):
    res = compress(source, {LINEAR: gguf_type(kind)}, bpe.get_vocab_size())
    out = tmp_path / f"{kind}.gguf"
    summary = export_gguf(res, source, out)
    assert summary["compressed"] == 14 and summary["types"] == {kind.upper(): 14, "F32": 7}
    r = gguf.GGUFReader(str(out))
    tensors = {t.name: t for t in r.tensors}
    src = gguf.GGUFReader(str(source))
    assert list(tensors) == [t.name for t in src.tensors]
    heads = {"attn_q": 4, "attn_k": 2}
    for task in res.tasks:
        (hf_name,) = task.param_names
        t = tensors[gguf_name(hf_name)]
        assert t.tensor_type == getattr(gguf.GGMLQuantizationType, kind.upper())
        deq = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type))
        kind_ = gguf_name(hf_name).split(".")[2]
        if kind_ in heads:  # undo llama.cpp's rotary row order as transformers does
            from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

            deq = torch.from_numpy(LlamaTensorProcessor()._reverse_permute_weights(deq.numpy(), heads[kind_],
                                                                                   heads[kind_]))
        ref = reference_delta(task.compression)
        assert torch.equal(bits(deq), bits(ref)), hf_name
        assert torch.equal(bits(ref), bits(res.model.get_parameter(hf_name).detach()))
    # the tensors the compression left alone keep the source's bytes; the metadata is the source's
    compressed = {gguf_name(t.param_names[0]) for t in res.tasks}
    assert len(compressed) == 14
    for t in src.tensors:
        if t.name not in compressed:
            assert np.array_equal(tensors[t.name].data, t.data) and tensors[t.name].tensor_type == t.tensor_type
    mine, theirs = field_values(r), field_values(src)
    for key, val in theirs.items():
        if key not in ("general.file_type", "GGUF.kv_count"):
            assert mine[key] == val, key
    assert mine["general.file_type"][1] == getattr(gguf.LlamaFileType, f"MOSTLY_{kind.upper()}")
    assert mine["general.quantization_version"][1] == gguf.GGML_QUANT_VERSION
    # the .lcz file of the same result gives the same bytes
    lcz = tmp_path / "model.lcz"
    res.export(lcz)
    export_gguf(lcz, source, tmp_path / "again.gguf")
    assert (tmp_path / "again.gguf").read_bytes() == out.read_bytes()
    # transformers' GGUF loader: the weights are Δ(Θ), the logits the compressed model's
    loaded = load_gguf(str(tmp_path), out.name)
    sd = loaded.state_dict()
    for name, v in res.model.state_dict().items():
        assert torch.equal(bits(sd[name]), bits(v)), name
    x = torch.randint(0, bpe.get_vocab_size(), (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, res.model(x).logits, rtol=0, atol=1e-6)
    tok = transformers.AutoTokenizer.from_pretrained(str(tmp_path), gguf_file=out.name)
    assert tok("the lazy dog", add_special_tokens=False)["input_ids"] == bpe.encode("the lazy dog").ids


def test_tied_embeddings_and_a_quantized_source_tensor(bpe, tmp_path, no_network):
    """SmolLM2's case: tied embeddings (no output.weight) and a Q8_0 token embedding the compression leaves alone:
    its blocks are copied as they are (they decode to the model's values), no output.weight is added."""
    src = tmp_path / "tied.gguf"
    write_source_gguf(src, tiny_llama(bpe.get_vocab_size(), tied=True), bpe, embd_type="Q8_0")
    res = compress(src, {LINEAR: gguf_type("q4_1")}, bpe.get_vocab_size())
    out = tmp_path / "out.gguf"
    s = export_gguf(res, src, out)
    assert "output.weight" not in s["tensors"] and s["tensors"]["token_embd.weight"] == "Q8_0"
    r = {t.name: t for t in gguf.GGUFReader(str(out)).tensors}
    s_emb = next(t for t in gguf.GGUFReader(str(src)).tensors if t.name == "token_embd.weight")
    assert np.array_equal(r["token_embd.weight"].data, s_emb.data)
    loaded = load_gguf(str(tmp_path), out.name)
    x = torch.randint(0, bpe.get_vocab_size(), (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, res.model(x).logits, rtol=0, atol=1e-6)


def test_hugging_face_directory_source(bpe, tmp_path, no_network):
    """A Hugging Face checkpoint directory as the source: metadata from config.json, the vocabulary by gguf-py's
    helpers; weights exact in float16 are written as F16 (2-D) and F32 (1-D)."""
    model = tiny_llama(bpe.get_vocab_size(), seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    d = tmp_path / "ckpt"
    model.save_pretrained(d)
    transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>").save_pretrained(d)
    res = compress(d, {LINEAR: gguf_type("q5_0")}, bpe.get_vocab_size())
    out = tmp_path / "out" / "m.gguf"
    out.parent.mkdir()
    s = export_gguf(res, d, out)
    assert s["types"] == {"Q5_0": 14, "F16": 2, "F32": 5}
    assert s["tensors"]["token_embd.weight"] == "F16" and s["tensors"]["output_norm.weight"] == "F32"
    r = gguf.GGUFReader(str(out))
    f = field_values(r)
    assert f["llama.attention.head_count"][1] == 4 and f["llama.attention.head_count_kv"][1] == 2
    assert f["llama.embedding_length"][1] == 64 and f["tokenizer.ggml.model"][1] == "gpt2"
    assert len(f["tokenizer.ggml.tokens"][1]) == bpe.get_vocab_size()
    loaded = load_gguf(str(out.parent), out.name)
    sd = loaded.state_dict()
    for name, v in res.model.state_dict().items():
        assert torch.equal(bits(sd[name]), bits(v)), name
    x = torch.randint(0, bpe.get_vocab_size(), (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, res.model(x).logits, rtol=0, atol=1e-6)
    tok = transformers.AutoTokenizer.from_pretrained(str(out.parent), gguf_file=out.name)
    assert tok("the lazy dog saves nine", add_special_tokens=False)["input_ids"] == \
        bpe.encode("the lazy dog saves nine").ids


# ----------------------------------------------------------------------------------------------------- bad input


def test_compression_without_a_gguf_form_is_refused_or_written_as_float(source, bpe, tmp_path):
    tasks = {all_but("0.mlp.down_proj"): gguf_type("q4_0"),
             "model.layers.0.mlp.down_proj.weight": lc.AdaptiveQuantization(k=4)}
    res = compress(source, tasks, bpe.get_vocab_size())
    out = tmp_path / "m.gguf"
    out.write_bytes(b"what was there")
    with pytest.raises(GGUFExportError, match=r"^tensor blk\.0\.ffn_down\.weight \(model\.layers\.0\.mlp\.down_proj"
                                              r"\.weight\): its compression AdaptiveQuantization\(k=4.*\) has no GGUF "
                                              r"block type") as e:
        export_gguf(res, source, out)
    assert "\n" not in str(e.value)
    assert out.read_bytes() == b"what was there" and no_temporaries(tmp_path)
    s = export_gguf(res, source, out, allow_float=True)
    assert s["tensors"]["blk.0.ffn_down.weight"] == "F32" and s["compressed"] == 13
    t = next(t for t in gguf.GGUFReader(str(out)).tensors if t.name == "blk.0.ffn_down.weight")
    w = res.model.get_parameter("model.layers.0.mlp.down_proj.weight").detach()
    assert torch.equal(bits(t.data), bits(w)) and torch.unique(w).numel() <= 4
    # grouped integers of another group or scale type have no block type either
    res2 = compress(source, {LINEAR: lc.GroupedIntQuantization(4, 32, scale_dtype="float32")},
                    bpe.get_vocab_size())
    with pytest.raises(GGUFExportError, match=r"scale_dtype=float32\) has no GGUF block type"):
        export_gguf(res2, source, tmp_path / "m2.gguf")
    assert not (tmp_path / "m2.gguf").exists()


def test_rows_not_a_multiple_of_32_are_refused(bpe, tmp_path):
    src = tmp_path / "h48.gguf"
    write_source_gguf(src, tiny_llama(bpe.get_vocab_size(), hidden=48), bpe)
    res = compress(src, {LINEAR: gguf_type("q4_0")}, bpe.get_vocab_size())
    with pytest.raises(GGUFExportError, match=r"^tensor blk\.0\.attn_q\.weight: rows of 48 weights are not a "
                                              r"multiple of the 32-weight blocks of Q4_0$"):
        export_gguf(res, src, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists() and no_temporaries(tmp_path)


def test_unwritable_path(source, bpe, tmp_path):
    res = compress(source, {LINEAR: gguf_type("q8_0")}, bpe.get_vocab_size())
    missing = tmp_path / "no" / "such" / "m.gguf"
    with pytest.raises(OSError, match=r"m\.gguf: the GGUF file cannot be written \(No such file or directory\)"):
        export_gguf(res, source, missing)
    (tmp_path / "adir").mkdir()
    with pytest.raises(OSError, match="adir: is a directory"):
        export_gguf(res, source, tmp_path / "adir")
    assert no_temporaries(tmp_path)
    with pytest.raises(FileNotFoundError, match="source model not found"):
        export_gguf(res, tmp_path / "nothing.gguf", tmp_path / "m.gguf")
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x00" * 20)
    with pytest.raises(GGUFExportError, match=r"bad\.gguf'?: unreadable GGUF file"):
        export_gguf(res, bad, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


# ---------------------------------------------------------------------------------------------------------- CLI


def test_cli_ptq_then_export_gguf(source, bpe, tmp_path, capsys, isolated_cli):
    calib = tmp_path / "calib.txt"
    calib.write_text(english(3000, 5))
    run = tmp_path / "run"
    assert cli.main(["ptq", "--model", str(source), "--calib", str(calib), "--out", str(run), "--scheme", "q4_0",
                     "--method", "rtn", "--calib-samples", "4", "--seqlen", "16", "-q"]) == 0
    out = tmp_path / "m.gguf"
    assert cli.main(["export", str(run), "--format", "gguf", "--out", str(out), "-q"]) == 0
    said = capsys.readouterr().out
    assert f"wrote {out}" in said and "(7 F32, 14 Q4_0)" in said
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(str(out)).tensors}
    assert types["blk.1.ffn_down.weight"] == "Q4_0" and types["token_embd.weight"] == "F32"
    model, _ = hf.load_causal_lm(source)
    lc.load(run / "model.lcz", model)
    loaded = load_gguf(str(tmp_path), out.name)
    x = torch.randint(0, bpe.get_vocab_size(), (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=1e-6)
    # --format lcz of a ptq run: its model.lcz, copied
    copy = tmp_path / "copy.lcz"
    assert cli.main(["export", str(run), "--out", str(copy), "-q"]) == 0
    assert copy.read_bytes() == (run / "model.lcz").read_bytes()


def test_cli_export_gguf_bad_input(source, bpe, tmp_path, capsys, isolated_cli):
    tasks = {all_but("1.self_attn.v_proj"): gguf_type("q4_0"),
             "model.layers.1.self_attn.v_proj.weight": lc.ConstraintL0Pruning(kappa=100)}
    run = tmp_path / "run"
    run.mkdir()
    compress(source, tasks, bpe.get_vocab_size()).export(run / "model.lcz")
    (run / "results.json").write_text(json.dumps({"model": str(source)}))
    out = tmp_path / "m.gguf"
    assert cli.main(["export", str(run), "--format", "gguf", "--out", str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("lcompress: error: tensor blk.1.attn_v.weight") and "ConstraintL0Pruning" in err
    assert "\n" not in err and not out.exists()
    assert cli.main(["export", str(run), "--format", "gguf", "--out", str(out), "--allow-float", "-q"]) == 0
    assert out.exists()
    # the source named in results.json is gone: say so, and --source
    (run / "results.json").write_text(json.dumps({"model": str(tmp_path / "moved.gguf")}))
    assert cli.main(["export", str(run), "--format", "gguf", "--out", str(out), "-q"]) == 2
    assert "pass --source" in capsys.readouterr().err
    assert cli.main(["export", str(run), "--format", "gguf", "--out", str(tmp_path / "m3.gguf"), "--source",
                     str(source), "--allow-float", "-q"]) == 0
    # a compress run directory (config.json) is not a Llama ptq run
    other = tmp_path / "lenet"
    other.mkdir()
    (other / "config.json").write_text("{}")
    assert cli.main(["export", str(other), "--format", "gguf", "--out", str(out), "-q"]) == 2
    assert "is not an lcompress ptq run" in capsys.readouterr().err
