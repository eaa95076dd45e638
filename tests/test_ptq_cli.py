"""``lcompress ptq`` end to end on a tiny random-weight Llama saved to a directory (never the real model): the run
directory, a reload of model.lcz, perplexities, resume after an interruption, and bad input."""
from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("tokenizers")

import lcompress as lc  # noqa: E402
from lcompress import cli, ptq, ptq_run  # noqa: E402
from lcompress.integrations import hf  # noqa: E402

WORDS = ("the quick brown fox jumps over the lazy dog while a stitch in time saves nine and every cloud has a "
         "silver lining so that all is well that ends well").split()


def english(n, seed):
    g = torch.Generator().manual_seed(seed)
    return " ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (n,), generator=g).tolist()) + "."


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([english(2000, s) for s in range(3)],
                            trainers.BpeTrainer(vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                special_tokens=["<eos>"]))
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   tie_word_embeddings=False)
    m = transformers.LlamaForCausalLM(cfg).eval()
    d = tmp_path_factory.mktemp("tiny")
    m.save_pretrained(d)
    fast.save_pretrained(d)
    (d / "calib.txt").write_text(english(4000, 11))
    (d / "eval.txt").write_text(english(1000, 12))
    return d


def args(model_dir, out, *extra):
    return ["ptq", "--model", str(model_dir), "--calib", str(model_dir / "calib.txt"), "--eval",
            str(model_dir / "eval.txt"), "--out", str(out), "--calib-samples", "4", "--seqlen", "16",
            "--eval-tokens", "64", "--batch-size", "2", "-q", *extra]


def test_ptq_run_directory_and_reload(model_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(args(model_dir, out, "--scheme", "int4-g16", "--steps", "5")) == 0
    assert "perplexity" in capsys.readouterr().out
    res = json.loads((out / "results.json").read_text())
    assert res["method"] == "lc" and res["scheme"] == "int4-g16"
    assert not (out / "ckpt").exists()  # dropped once the run finished
    # 14 layers, 4-bit codes + a float16 scale per 16 weights = 5 bits/weight packed
    assert len(res["layers"]) == 14
    assert res["sizes"]["bits_per_weight_packed"] == pytest.approx(5.0)
    assert res["sizes"]["bits_per_weight"] <= 5.0
    # lc.load puts the result into a freshly loaded float model, which scores what results.json says
    model, tok = hf.load_causal_lm(model_dir)
    float_ppl = hf.perplexity(model, tok, (model_dir / "eval.txt").read_text(), seqlen=16, max_tokens=64)
    assert float_ppl["perplexity"] == pytest.approx(res["float"]["perplexity"], rel=1e-6)
    lc.load(out / "model.lcz", model)
    again = hf.perplexity(model, tok, (model_dir / "eval.txt").read_text(), seqlen=16, max_tokens=64)
    assert again["perplexity"] == pytest.approx(res["compressed"]["perplexity"], rel=1e-6)
    # a finished run is not overwritten without --overwrite
    before = (out / "model.lcz").read_bytes()
    assert cli.main(args(model_dir, out, "--scheme", "int4-g16")) == 2
    assert (out / "model.lcz").read_bytes() == before
    assert cli.main(args(model_dir, out, "--scheme", "2:4", "--method", "rtn", "--overwrite", "--no-float-eval")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["scheme"] == "2:4" and "float" not in res


def test_ptq_interrupted_run_resumes(model_dir, tmp_path, monkeypatch, capsys):
    full = tmp_path / "full"
    assert cli.main(args(model_dir, full, "--scheme", "int3-g16", "--steps", "4")) == 0
    real = ptq_run.make_solver

    class Interrupt:
        def __init__(self, inner):
            self.inner, self.n, self.config = inner, 0, inner.config

        def __call__(self, task, problems):
            self.n += 1
            if self.n == 9:  # in the second block: the first is checkpointed
                raise KeyboardInterrupt
            return self.inner(task, problems)

    monkeypatch.setattr(ptq_run, "make_solver", lambda m, a: Interrupt(real(m, a)))
    out = tmp_path / "run"
    assert cli.main(args(model_dir, out, "--scheme", "int3-g16", "--steps", "4")) == 130
    assert "run the same command again" in capsys.readouterr().err
    assert (out / "ckpt" / "posttrain.pt").exists() and not (out / "results.json").exists()
    monkeypatch.setattr(ptq_run, "make_solver", real)
    assert cli.main(args(model_dir, out, "--scheme", "int3-g16", "--steps", "4")) == 0
    a = lc.export.read(full / "model.lcz")["state"]
    b = lc.export.read(out / "model.lcz")["state"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("extra,match", [
    (["--scheme", "int4-g0"], "group=0"),
    (["--scheme", "int4-g48"], r"group=48 is wider than a row \(32"),
    (["--scheme", "int9-g16"], "bits=9"),
    (["--scheme", "fp4"], "not a named scheme"),
    (["--scheme", "sparse50", "--method", "gptq"], "gptq"),
    (["--scheme", "int4-g16", "--calib-samples", "1000"], "--calib:.*non-overlapping"),
    (["--scheme", "int4-g16", "--method", "bogus"], "--method 'bogus'"),
    (["--scheme", "int4-g16", "--config", "x.toml"], "exactly one of --scheme and --config"),
])
def test_ptq_bad_input_exits_2_and_writes_nothing(model_dir, tmp_path, capsys, extra, match):
    out = tmp_path / "run"
    assert cli.main(args(model_dir, out, *extra)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lcompress: error:")
    import re

    assert re.search(match, err), err
    assert not (out / "model.lcz").exists() and not (out / "results.json").exists()


def test_ptq_bad_model_files(model_dir, tmp_path, capsys):
    assert cli.main(args(tmp_path / "nowhere", tmp_path / "r1", "--scheme", "int4-g16")) == 2
    bad = tmp_path / "trunc.gguf"
    bad.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\x00" * 10)
    assert cli.main(args(bad, tmp_path / "r2", "--scheme", "int4-g16")) == 2
    err = capsys.readouterr().err
    assert "trunc.gguf" in err and "Traceback" not in err


def test_ptq_config_with_a_sum_and_a_solver_table(model_dir, tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('''
[[tasks]]
params = 're:model\\.layers\\.\\d+\\.mlp\\..*_proj\\.weight'
compression = [{ type = "GroupedIntQuantization", bits = 3, group = 16 },
               { type = "ConstraintL0Pruning", fraction = 0.01, value_dtype = "float16" }]
[solver]
steps = 3
''')
    out = tmp_path / "run"
    assert cli.main(args(model_dir, out, "--config", str(cfg), "--no-float-eval")) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["solver"]["steps"] == 3 and len(res["layers"]) == 6
    cfg.write_text('[[tasks]]\nparams = "re:nothing"\ncompression = { type = "GroupedIntQuantization", bits = 3, '
                   'group = 16 }\n')
    assert cli.main(args(model_dir, tmp_path / "r2", "--config", str(cfg))) == 2
