"""`kiln generate` end to end on a tiny exported model and a byte-level Kiln tokenizer."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.cli.main import main
from kiln.model import ModelConfig, Transformer, save_pretrained

tokenizer_mod = pytest.importorskip("kiln.tokenizer")


@pytest.fixture
def run_dir(tmp_path):
    """A fake finished train run: run/model/ (weights) and a tokenizer artifact named in the manifest."""
    tok = tokenizer_mod.Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    (tmp_path / "tok").mkdir()
    tok.save(tmp_path / "tok" / "tokenizer.json")
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=257, context_length=32, d_model=32, n_layers=1, n_heads=2, d_ff=64)
    save_pretrained(Transformer(cfg), tmp_path / "run" / "model")
    (tmp_path / "run" / "manifest.json").write_text(
        json.dumps({"stage": "train", "inputs": {str(tmp_path / "tok"): "x"}})
    )
    return tmp_path


def test_generate_streams_text_and_finds_tokenizer_through_manifest(run_dir, capsys):
    args = ["generate", "--model", str(run_dir / "run"), "--prompt", "Hi", "--max-new-tokens", "8",
            "--seed", "1", "--keep-eot", "--temperature", "0"]
    assert main(args) == 0
    out1 = capsys.readouterr().out
    assert out1.startswith("Hi") and len(out1) > 2
    assert main(args + ["--tokenizer", str(run_dir / "tok" / "tokenizer.json"), "--top-k", "5"]) == 0
    assert capsys.readouterr().out == out1  # greedy: the same text


def test_generate_bad_model_dir(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path), "--prompt", "x"]) == 1
    assert "has neither config.json nor model/config.json" in capsys.readouterr().err


def test_generate_help_documents_options(capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = capsys.readouterr().out
    for opt in ("--model", "--tokenizer", "--prompt", "--max-new-tokens", "--temperature", "--top-k",
                "--top-p", "--seed", "--device"):
        assert opt in out


def test_generate_prompts_file_batches_and_matches_single_prompts(run_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Hi\n\nHello there\nA\n")
    base = ["--model", str(run_dir / "run"), "--max-new-tokens", "6", "--keep-eot", "--temperature", "0"]
    assert main(["generate", *base, "--prompts-file", str(prompts), "--batch-size", "2"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["Hi", "Hello there", "A"]
    for r in rows:  # greedy batched decoding equals the one-prompt path
        assert main(["generate", *base, "--prompt", r["prompt"], "--no-echo"]) == 0
        assert capsys.readouterr().out.rstrip("\n") == r["completion"]
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    assert main(["generate", *base, "--prompts-file", str(empty)]) == 1
    assert "holds no prompts" in capsys.readouterr().err


def test_generate_quantized_model(run_dir, capsys):
    base = ["--model", str(run_dir / "run"), "--max-new-tokens", "5", "--temperature", "0", "--no-echo"]
    assert main(["generate", *base, "--prompt", "Hi", "--quantize", "int8"]) == 0
    assert "characters in" in capsys.readouterr().err
    assert main(["generate", *base, "--prompt", "Hi", "--quantize", "int4"]) == 0
    assert "characters in" in capsys.readouterr().err


def test_generate_speculative_ngram_prints_the_same_greedy_text(run_dir, capsys):
    base = ["--model", str(run_dir / "run"), "--max-new-tokens", "40", "--temperature", "0", "--no-echo",
            "--keep-eot", "--prompt", "abcabcabc"]
    assert main(["generate", *base]) == 0
    plain = capsys.readouterr().out
    assert main(["generate", *base, "--speculative", "ngram"]) == 0
    assert capsys.readouterr().out == plain
    assert main(["generate", *base, "--compile"]) == 0  # CUDA graphs + compiled step (the CPU: plain steps)
    assert capsys.readouterr().out == plain


def test_generate_fuses_projections_before_quantizing_unless_told_not_to(run_dir, capsys, monkeypatch):
    import kiln.model

    calls = []
    fuse = kiln.model.fuse_projections
    monkeypatch.setattr(kiln.model, "fuse_projections", lambda m: calls.append(m) or fuse(m))
    base = ["generate", "--model", str(run_dir / "run"), "--prompt", "Hi", "--max-new-tokens", "8", "--temperature",
            "0", "--keep-eot"]
    assert main(base) == 0 and len(calls) == 1
    fused = capsys.readouterr().out
    assert main(base + ["--no-fuse-projections"]) == 0 and len(calls) == 1
    assert capsys.readouterr().out == fused  # the same greedy text
    assert main(base + ["--quantize", "int8"]) == 0 and len(calls) == 2
    assert kiln.model.is_fused(calls[-1]) and isinstance(calls[-1].layers[0].self_attn.qkv_proj, kiln.model.Int8Linear)


def test_generate_processing_flags_reach_the_engine(run_dir, tmp_path, capsys, monkeypatch):
    """--repetition-penalty and friends become SamplingParams fields on both paths (one prompt, a file);
    a strong repetition penalty changes a greedy text that repeats; a bad value fails before loading."""
    from kiln.generate import llm_engine

    seen = []
    add = llm_engine.LLMEngine.add_request
    monkeypatch.setattr(llm_engine.LLMEngine, "add_request",
                        lambda self, ids, params=None, request_id=None: seen.append(params) or add(self, ids, params,
                                                                                                request_id))
    base = ["--model", str(run_dir / "run"), "--max-new-tokens", "30", "--temperature", "0", "--no-echo",
            "--keep-eot", "--prompt", "aaaa"]
    assert main(["generate", *base]) == 0
    plain = capsys.readouterr().out
    flags = ["--repetition-penalty", "3.0", "--presence-penalty", "0.5", "--frequency-penalty", "-0.25",
             "--min-p", "0.1", "--min-tokens", "2"]
    assert main(["generate", *base, *flags]) == 0
    penalized = capsys.readouterr().out
    p = seen[-1]
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.min_p, p.min_tokens) == (
        3.0, 0.5, -0.25, 0.1, 2)
    assert penalized != plain
    prompts = tmp_path / "p.txt"
    prompts.write_text("aaaa\n")
    assert main(["generate", "--model", str(run_dir / "run"), "--max-new-tokens", "30", "--temperature", "0",
                 "--keep-eot", "--prompts-file", str(prompts), *flags]) == 0
    assert json.loads(capsys.readouterr().out)["completion"] == penalized.rstrip("\n")
    assert seen[-1].repetition_penalty == 3.0
    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x", "--presence-penalty", "5"]) == 1
    assert "presence_penalty=5.0 must be in [-2, 2]" in capsys.readouterr().err
