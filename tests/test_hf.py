"""Hugging Face side (lcompress.integrations.hf) on tiny random-weight models built in memory; never the real ones."""
from __future__ import annotations

import json
import math
import socket
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

from lcompress.integrations import hf  # noqa: E402

WORDS = ("the quick brown fox jumps over the lazy dog while a stitch in time saves nine and every cloud has a "
         "silver lining so that all is well that ends well").split()


def english(n_words: int, seed: int = 0) -> str:
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(WORDS), (n_words,), generator=g).tolist()
    return " ".join(WORDS[i] for i in idx) + "."


@pytest.fixture(scope="module")
def bpe():
    """A byte-level BPE of ~300 tokens trained here (offline), as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([english(2000, s) for s in range(3)],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                special_tokens=["<eos>"]))
    return tok


@pytest.fixture(scope="module")
def tokenizer(bpe):
    return transformers.PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<eos>")


def tiny_llama(vocab: int) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                                   rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="module")
def text():
    return english(3000, seed=7)


# ------------------------------------------------------------------------------------------------ perplexity


def reference_perplexity(model, ids: torch.Tensor, seqlen: int, windows: int) -> float:
    """HF's own loss (labels=, shifted inside the model, mean over the seqlen-1 predictions), one window at a time,
    averaged over windows (equal token counts), exponentiated."""
    losses = []
    with torch.no_grad():
        for w in range(windows):
            x = ids[w * seqlen : (w + 1) * seqlen].unsqueeze(0)
            losses.append(model(input_ids=x, labels=x).loss.double().item())
    return math.exp(sum(losses) / len(losses))


def test_perplexity_matches_hf_loss(llama, tokenizer, text):
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"])
    seqlen = 64
    assert ids.numel() > 8 * seqlen
    r = hf.perplexity(llama, tokenizer, text, seqlen=seqlen, max_tokens=5 * seqlen + 17, batch_size=2,
                      progress=False)
    assert r["windows"] == 5 and r["predicted_tokens"] == 5 * 63 and r["text_tokens"] == ids.numel()
    assert r["perplexity"] == pytest.approx(reference_perplexity(llama, ids, seqlen, 5), rel=1e-5)
    assert r["nll"] == pytest.approx(math.log(r["perplexity"]))
    # batching does not change it, and max_tokens=None takes every whole window
    r1 = hf.perplexity(llama, tokenizer, text, seqlen=seqlen, max_tokens=5 * seqlen, batch_size=1, progress=False)
    assert r1["perplexity"] == pytest.approx(r["perplexity"], rel=1e-5)
    rall = hf.perplexity(llama, tokenizer, text, seqlen=seqlen, max_tokens=None, batch_size=8, progress=False)
    assert rall["windows"] == ids.numel() // seqlen
    assert rall["perplexity"] == pytest.approx(reference_perplexity(llama, ids, seqlen, rall["windows"]), rel=1e-5)
    assert not llama.training


def test_perplexity_logs_progress_when_not_a_terminal(llama, tokenizer, text, caplog):
    with caplog.at_level("INFO", logger="lcompress.integrations.hf"):
        hf.perplexity(llama, tokenizer, text, seqlen=32, max_tokens=320, batch_size=1, progress=False,
                      source="eval.txt")
    lines = [r.getMessage() for r in caplog.records]
    assert sum("windows, running ppl" in m for m in lines) == 10
    assert lines[-1].startswith("perplexity eval.txt: ") and "over 10 windows of 32 tokens" in lines[-1]


@pytest.mark.parametrize("kwargs, match", [
    ({"seqlen": 1}, "seqlen=1 should be an integer >= 2"),
    ({"max_tokens": 10}, "max_tokens=10 should be None or an integer >= seqlen=512"),
    ({"batch_size": 0}, "batch_size=0"),
])
def test_perplexity_bad_arguments(llama, tokenizer, text, kwargs, match):
    with pytest.raises(ValueError, match=match):
        hf.perplexity(llama, tokenizer, text, **kwargs)


def test_perplexity_text_shorter_than_one_window(llama, tokenizer):
    with pytest.raises(ValueError, match=r"^eval.txt: \d+ tokens \(19 characters\) is shorter than one window of "
                                         r"seqlen=512"):
        hf.perplexity(llama, tokenizer, "the quick brown fox", source="eval.txt")


# --------------------------------------------------------------------------------------------- token windows


def test_token_windows_random_non_overlapping_and_seeded(tokenizer, text):
    ids = hf.tokenize(tokenizer, text)
    t, seqlen, n = ids.numel(), 50, 6
    w = hf.token_windows(tokenizer, text, n, seqlen, seed=3)
    assert w.shape == (n, seqlen) and w.dtype == torch.long
    # each window is a slice of the token stream; the slices share one offset mod seqlen and do not overlap
    starts = []
    for row in w:
        hits = [s for s in range(t - seqlen + 1) if torch.equal(ids[s : s + seqlen], row)]
        assert hits
        starts.append(hits)
    chosen = next(r for r in range(seqlen) if all(any(s % seqlen == r for s in h) for h in starts))
    positions = sorted(next(s for s in h if s % seqlen == chosen) for h in starts)
    assert all(b - a >= seqlen for a, b in zip(positions, positions[1:]))
    assert torch.equal(w, hf.token_windows(tokenizer, text, n, seqlen, seed=3))
    assert not torch.equal(w, hf.token_windows(tokenizer, text, n, seqlen, seed=4))
    # every window can be drawn at once
    k = t // seqlen
    assert hf.token_windows(tokenizer, text, k, seqlen).shape == (k, seqlen)


def test_token_windows_errors(tokenizer, text):
    t = hf.tokenize(tokenizer, text).numel()
    with pytest.raises(ValueError, match=rf"^calib.txt: {t} tokens hold {t // 100} non-overlapping windows of "
                                         rf"seqlen=100; n={t // 100 + 1} need {(t // 100 + 1) * 100} tokens"):
        hf.token_windows(tokenizer, text, t // 100 + 1, 100, source="calib.txt")
    with pytest.raises(ValueError, match=r"^text: \d+ tokens \(9 characters\) is shorter than one sequence of "
                                         r"seqlen=512"):
        hf.token_windows(tokenizer, "the quick", 1, 512)
    with pytest.raises(ValueError, match="n=0 should be a positive integer"):
        hf.token_windows(tokenizer, text, 0, 16)
    with pytest.raises(ValueError, match="seqlen=0"):
        hf.token_windows(tokenizer, text, 1, 0)


# -------------------------------------------------------------------------------------------- decoder layers


def test_decoder_layers_finds_blocks(llama):
    prefix, blocks = hf.decoder_layers(llama)
    assert prefix == "model.layers" and len(blocks) == 2
    assert all(b is llama.model.layers[i] for i, b in enumerate(blocks))
    names = {n for n, _ in llama.named_parameters()}
    assert f"{prefix}.1.self_attn.q_proj.weight" in names
    assert hf.decoder_layers(llama.model)[0] == "layers"

    bert = transformers.BertModel(transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3,
                                                          num_attention_heads=4, intermediate_size=64))
    prefix, blocks = hf.decoder_layers(bert)
    assert prefix == "encoder.layer" and blocks == list(bert.encoder.layer)
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_embd=32, n_layer=2, n_head=4))
    assert hf.decoder_layers(gpt2) == ("transformer.h", list(gpt2.transformer.h))

    class Wrapper(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.module = m

    assert hf.decoder_layers(Wrapper(llama))[0] == "module.model.layers"
    with pytest.raises(ValueError, match="no transformer blocks found in a Sequential; looked for"):
        hf.decoder_layers(torch.nn.Sequential(torch.nn.Linear(2, 2)))


# --------------------------------------------------------------------------------------------------- loading


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*a, **k):
        raise AssertionError("network access during loading")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def same_logits(a, b, vocab: int) -> None:
    x = torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=1e-6)


def test_load_checkpoint_directory(tmp_path, llama, tokenizer, no_network):
    d = tmp_path / "ckpt"
    llama.save_pretrained(d)
    tokenizer.save_pretrained(d)
    model, tok = hf.load_causal_lm(d)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    assert model.dtype == torch.float32
    same_logits(llama, model, len(tokenizer))
    assert tok("the lazy dog", add_special_tokens=False)["input_ids"] == \
        tokenizer("the lazy dog", add_special_tokens=False)["input_ids"]
    m16, _ = hf.load_causal_lm(d, dtype=torch.bfloat16)
    assert m16.dtype == torch.bfloat16


def test_load_errors(tmp_path, llama, tokenizer):
    with pytest.raises(FileNotFoundError, match="model path not found: .*nothing"):
        hf.load_causal_lm(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty: neither a .gguf file nor a Hugging Face checkpoint directory"):
        hf.load_causal_lm(tmp_path / "empty")
    d = tmp_path / "ckpt"
    llama.save_pretrained(d)
    tokenizer.save_pretrained(d)
    w = d / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    with pytest.raises(ValueError) as e:
        hf.load_causal_lm(d)
    assert str(e.value).startswith(f"{d}: cannot load the model (") and "\n" not in str(e.value)
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(ValueError, match=r"junk.gguf: not a GGUF file \(starts with b'PK\\x03\\x04'"):
        hf.load_causal_lm(junk)
    with pytest.raises(ValueError, match="dtype=torch.int8 should be a floating torch dtype"):
        hf.load_causal_lm(d, dtype=torch.int8)


def write_tiny_gguf(path: Path, model, bpe) -> None:
    """A llama.cpp-style GGUF of the tiny Llama (F32 tensors, q/k rows permuted for llama.cpp's rotary layout, as
    convert_hf_to_gguf.py writes them) with its BPE tokenizer."""
    gguf = pytest.importorskip("gguf")
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_rope_freq_base(10000.0)
    w.add_tokenizer_model("gpt2")
    tokens = [None] * bpe.get_vocab_size()
    for t, i in bpe.get_vocab().items():
        tokens[i] = t
    w.add_token_list(tokens)
    w.add_token_types([gguf.TokenType.NORMAL] * len(tokens))
    merges = json.loads(bpe.to_str())["model"]["merges"]
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in merges])
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)

    def permute(x, heads):
        return x.reshape(heads, 2, x.shape[0] // heads // 2, *x.shape[1:]).swapaxes(1, 2).reshape(x.shape)

    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    names = {"self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate",
             "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        w.add_tensor(f"blk.{i}.attn_q.weight", permute(sd[p + "self_attn.q_proj.weight"], cfg.num_attention_heads))
        w.add_tensor(f"blk.{i}.attn_k.weight", permute(sd[p + "self_attn.k_proj.weight"], cfg.num_key_value_heads))
        for hf_name, gg in names.items():
            w.add_tensor(f"blk.{i}.{gg}.weight", sd[p + hf_name + ".weight"])
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_load_gguf_file(tmp_path, llama, bpe, tokenizer, no_network):
    pytest.importorskip("accelerate")
    path = tmp_path / "tiny.gguf"
    write_tiny_gguf(path, llama, bpe)
    model, tok = hf.load_causal_lm(path)
    assert isinstance(model, transformers.LlamaForCausalLM) and not model.training
    same_logits(llama, model, len(tokenizer))
    assert tok("the lazy dog", add_special_tokens=False)["input_ids"] == bpe.encode("the lazy dog").ids
    # a plain float model, no longer marked quantized: it casts and saves as a checkpoint that loads back
    assert getattr(model, "hf_quantizer", None) is None and getattr(model.config, "quantization_config", None) is None
    model.float()
    model.save_pretrained(tmp_path / "saved")
    tok.save_pretrained(tmp_path / "saved")
    same_logits(llama, hf.load_causal_lm(tmp_path / "saved")[0], len(tokenizer))
    # a truncated copy is refused with one line naming it
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[: path.stat().st_size - 1000])
    with pytest.raises(ValueError, match=r"cut.gguf: unreadable or truncated GGUF file \(") as e:
        hf.load_causal_lm(cut)
    assert "\n" not in str(e.value)
    head = tmp_path / "head.gguf"
    head.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match=r"head.gguf: unreadable or truncated GGUF file"):
        hf.load_causal_lm(head)


# ------------------------------------------------------------------------------------------ sentence encoder


@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
    """A tiny BERT with a WordPiece vocabulary, saved as a sentence-transformers directory would be."""
    d = tmp_path_factory.mktemp("minilm")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS)) + [".", ","]
    (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = transformers.BertTokenizerFast(vocab_file=str(d / "vocab.txt"))
    torch.manual_seed(0)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    transformers.BertModel(cfg, add_pooling_layer=False).eval().save_pretrained(d)
    tok.save_pretrained(d)
    (d / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 12, "do_lower_case": False}))
    (d / "1_Pooling").mkdir()
    (d / "1_Pooling" / "config.json").write_text(json.dumps({"pooling_mode_mean_tokens": True}))
    return d


SENTENCES = ["the quick brown fox", "a stitch in time saves nine , and every cloud has a silver lining so that all "
             "is well that ends well", "dog", "the lazy dog jumps over the fox ."]


def independent_embeddings(model, tok, sentences, max_len):
    """One sentence at a time (no padding at all), mean of every token's last hidden state, unit length."""
    out = []
    with torch.no_grad():
        for s in sentences:
            ids = tok(s, truncation=True, max_length=max_len, return_tensors="pt")
            h = model(**ids).last_hidden_state[0]
            e = h.mean(0)
            out.append(e / e.norm())
    return torch.stack(out)


def test_sentence_encoder_directory_and_embed(encoder_dir, no_network):
    model, tok = hf.load_sentence_encoder(encoder_dir)
    assert isinstance(model, transformers.BertModel) and not model.training
    assert tok.model_max_length == 12  # from sentence_bert_config.json
    e = hf.embed(model, tok, SENTENCES, batch_size=3)  # padded batches, the long sentence truncated
    assert e.shape == (4, 32) and e.dtype == torch.float32
    ref = independent_embeddings(model, tok, SENTENCES, 12)
    torch.testing.assert_close(e, ref, rtol=0, atol=1e-5)
    torch.testing.assert_close(e.norm(dim=1), torch.ones(4), rtol=0, atol=1e-6)
    raw = hf.embed(model, tok, SENTENCES, batch_size=1, normalize=False)
    torch.testing.assert_close(torch.nn.functional.normalize(raw, dim=1), ref, rtol=0, atol=1e-5)
    assert hf.embed(model, tok, [], batch_size=2).shape == (0, 32)
    with pytest.raises(ValueError, match="not one string"):
        hf.embed(model, tok, "one sentence")
    with pytest.raises(ValueError, match="batch_size=0"):
        hf.embed(model, tok, SENTENCES, batch_size=0)


def test_sentence_encoder_from_zip(encoder_dir, tmp_path, no_network):
    z = tmp_path / "model.zip"
    with zipfile.ZipFile(z, "w") as f:
        for p in encoder_dir.rglob("*"):
            if p.is_file():
                f.write(p, p.relative_to(encoder_dir).as_posix())
        f.writestr("../escape.txt", "outside")  # never extracted: only the model's known file names are
    model, tok = hf.load_sentence_encoder(z)
    ref_model, ref_tok = hf.load_sentence_encoder(encoder_dir)
    torch.testing.assert_close(hf.embed(model, tok, SENTENCES), hf.embed(ref_model, ref_tok, SENTENCES))
    assert not (tmp_path.parent / "escape.txt").exists()
    bad = tmp_path / "bad.zip"
    bad.write_bytes(z.read_bytes()[:200])
    with pytest.raises(ValueError, match="bad.zip: unreadable or truncated model zip"):
        hf.load_sentence_encoder(bad)
    with pytest.raises(FileNotFoundError, match="model path not found"):
        hf.load_sentence_encoder(tmp_path / "none.zip")


def test_cosine_similarity():
    a = torch.tensor([[1.0, 0.0], [1.0, 1.0], [3.0, 4.0]])
    b = torch.tensor([[0.0, 2.0], [2.0, 2.0], [-3.0, -4.0]])
    sim = hf.cosine_similarity(a, b)
    assert sim.dtype == torch.float64 and sim.tolist() == pytest.approx([0.0, 1.0, -1.0])
    with pytest.raises(ValueError, match=r"got \(3, 2\) and \(2, 2\)"):
        hf.cosine_similarity(a, b[:2])


# ----------------------------------------------------------------------------------------- without the extra


def test_missing_transformers_names_the_extra(tmp_path):
    code = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("blocked: " + name)
sys.meta_path.insert(0, Block())
import lcompress.integrations.hf as hf
try:
    hf.load_causal_lm(sys.argv[1])
except ImportError as e:
    print("IMPORT-ERROR:", e)
"""
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert "IMPORT-ERROR: lcompress.integrations.hf needs transformers, which is not installed: " \
           "pip install 'lcompress[hf]'" in r.stdout, r.stderr
