"""save_pretrained / load_pretrained round trips, bad files, and Hugging Face Llama equivalence."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from kiln.model import (
    ModelConfig,
    Transformer,
    load_llama_state_dict,
    load_pretrained,
    save_pretrained,
    to_hf_state_dict,
)

CFG = ModelConfig(vocab_size=97, context_length=48, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64,
                  rope_theta=500.0, norm_eps=1e-6)


def _model(cfg: ModelConfig = CFG) -> Transformer:
    torch.manual_seed(0)
    return Transformer(cfg).eval()


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_round_trip(tmp_path, tie):
    m = _model(dataclasses.replace(CFG, tie_embeddings=tie))
    save_pretrained(m, tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["hidden_size"] == 32
    assert cfg["num_key_value_heads"] == 2 and cfg["tie_word_embeddings"] is tie
    assert cfg["kiln"]["d_model"] == 32
    m2 = load_pretrained(tmp_path)
    assert m2.config == m.config
    assert (m2.lm_head.weight is m2.embed_tokens.weight) is tie
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(m2(idx), m(idx), rtol=0, atol=0)


def test_load_bf16_and_override_attention(tmp_path):
    save_pretrained(_model(), tmp_path, dtype=torch.bfloat16)
    m = load_pretrained(tmp_path, attention_impl="sdpa")
    assert m.embed_tokens.weight.dtype == torch.bfloat16 and m.config.attention_impl == "sdpa"
    assert load_pretrained(tmp_path, dtype=torch.float32).norm.weight.dtype == torch.float32


def test_load_llama_state_dict_accepts_hf_and_kiln_names():
    src, dst = _model(), Transformer(CFG)
    load_llama_state_dict(dst, to_hf_state_dict(src))  # "model." prefixed keys
    torch.testing.assert_close(dst.state_dict(), src.state_dict())
    dst2 = Transformer(CFG)
    load_llama_state_dict(dst2, src.state_dict())
    torch.testing.assert_close(dst2.state_dict(), src.state_dict())


def test_load_llama_state_dict_reports_mismatches():
    sd = to_hf_state_dict(_model())
    del sd["lm_head.weight"]
    with pytest.raises(ValueError, match=r"missing \['lm_head.weight'\].*tie_embeddings=True"):
        load_llama_state_dict(Transformer(CFG), sd)
    wide = Transformer(dataclasses.replace(CFG, d_ff=128))
    with pytest.raises(ValueError, match="shape mismatch.*mlp"):
        load_llama_state_dict(wide, to_hf_state_dict(_model()))
    sd = to_hf_state_dict(_model())
    sd["model.layers.9.mlp.up_proj.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unexpected"):
        load_llama_state_dict(Transformer(CFG), sd)


def test_load_pretrained_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_pretrained(tmp_path)
    save_pretrained(_model(), tmp_path / "m")
    weights = tmp_path / "m" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(tmp_path / "m")
    weights.write_bytes(b"PK\x03\x04 this is a zip, not safetensors" * 10)  # foreign
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        load_pretrained(tmp_path / "m")
    weights.unlink()
    (tmp_path / "m" / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(ValueError, match="never unpickles"):
        load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="not a Llama model"):
        load_pretrained(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load_pretrained(tmp_path / "m")


@pytest.mark.parametrize("tie", [False, True])
def test_logits_equal_hf_llama_both_ways(tmp_path, tie):
    transformers = pytest.importorskip("transformers")
    idx = torch.randint(0, 97, (2, 12))
    # Kiln -> HF
    m = _model(dataclasses.replace(CFG, tie_embeddings=tie))
    save_pretrained(m, tmp_path / "kiln")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "kiln").eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, m(idx), atol=1e-5, rtol=1e-5)
    # HF -> Kiln (a directory written by transformers itself, no "kiln" block)
    hc = transformers.LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=48, rope_theta=500.0, rms_norm_eps=1e-6,
        tie_word_embeddings=tie,
    )
    torch.manual_seed(1)
    hf2 = transformers.LlamaForCausalLM(hc).eval()
    hf2.save_pretrained(tmp_path / "hf")
    m2 = load_pretrained(tmp_path / "hf")
    assert m2.config.rope_theta == 500.0 and m2.config.tie_embeddings is tie
    with torch.no_grad():
        torch.testing.assert_close(m2(idx), hf2(idx).logits, atol=1e-5, rtol=1e-5)


def test_load_pretrained_accepts_a_train_run_directory(tmp_path):
    from kiln.model import ModelConfig, Transformer, load_pretrained, save_pretrained

    model = Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    save_pretrained(model, tmp_path / "run" / "model")
    loaded = load_pretrained(tmp_path / "run")
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        load_pretrained(tmp_path)
