"""The model shapes and the Hugging Face export that ``kiln bench serve`` and ``kiln bench serve-http``
share (a module of its own, so neither bench imports the other's file)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def serve_shapes() -> dict:
    """``kiln bench train``'s shapes plus ``preset_tiny`` (the tiny training preset: vocab 4096,
    context 128, d_model 128, 4 layers), the CPU default, and ``1b`` (16 x d2048, ~0.93B parameters):
    wide enough that a batch-1 GEMV reads 8-23 MB and is bound by bytes, where weight-only
    quantization can pay (at d1024 it is bound by launch latency: docs/serve.md); and ``7b``, Llama-2-7B's
    shape (32 x d4096, d_ff 11008, vocab 32000, head untied: 6.7B parameters, 13.5 GB in bf16), the size
    at which gpt-fast reports its int8/int4 speed-ups. Random weights, built on the device (too large
    to carry to it)."""
    from kiln.bench.train import shapes
    from kiln.model import ModelConfig
    from kiln.train.config import tiny

    wide = ModelConfig(vocab_size=50304, context_length=1024, d_model=2048, n_layers=16, n_heads=16, d_ff=5632,
                       tie_embeddings=True)
    llama7b = ModelConfig(vocab_size=32000, context_length=4096, d_model=4096, n_layers=32, n_heads=32, d_ff=11008,
                          tie_embeddings=False)
    return {**shapes(), "preset_tiny": tiny().model, "1b": wide, "7b": llama7b}


def export_for_references(model: Any, out: Path) -> Path:
    """The model in Hugging Face Llama layout (bf16, head untied, with a safetensors index so gpt-fast's
    converter reads it): what transformers and gpt-fast load."""
    import torch
    from safetensors.torch import save_file

    from kiln.model.hf import hf_config_dict, to_hf_state_dict

    out.mkdir(parents=True, exist_ok=True)
    sd = to_hf_state_dict(model, torch.bfloat16)
    sd.setdefault("lm_head.weight", model.lm_head.weight.detach().to("cpu", torch.bfloat16).contiguous().clone())
    if sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr():
        sd["lm_head.weight"] = sd["lm_head.weight"].clone()
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf_config_dict(model.config, torch.bfloat16)
    cfg.pop("kiln")
    cfg["tie_word_embeddings"] = False
    (out / "config.json").write_text(json.dumps(cfg, indent=1))
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": dict.fromkeys(sd, "model.safetensors")}))
    return out
