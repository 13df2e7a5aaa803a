"""Weight-only int8/int4 module swap: close to the full-precision model, and decodable by the engine."""

from __future__ import annotations

import copy

import pytest
import torch

from kiln.generate import EngineConfig, LLMEngine, SamplingParams
from kiln.model import Int4Linear, Int8Linear, ModelConfig, Transformer, quantize_model
from kiln.model.quantize import weight_bytes

CFG = ModelConfig(vocab_size=257, context_length=32, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=128)


@pytest.mark.parametrize("mode,tol,ratio", [("int8", 0.02, 0.3), ("int4", 0.15, 0.2)])
def test_quantized_model_is_close_and_smaller(mode, tol, ratio):
    torch.manual_seed(0)
    m = Transformer(CFG).eval()
    x = torch.randint(0, 257, (2, 16))
    with torch.no_grad():
        ref = m(x)
        qm = quantize_model(copy.deepcopy(m), mode, group_size=32)
        got = qm(x)
    kind = Int8Linear if mode == "int8" else Int4Linear
    assert isinstance(qm.layers[0].mlp.down_proj, kind) and isinstance(qm.lm_head, kind)
    # by default int4 runs Kiln's tuned GEMV at one row (faster on an H100), int8 Inductor's fused form
    assert qm.lm_head.tuned == (mode == "int4")
    assert not quantize_model(copy.deepcopy(m), mode, group_size=32, tuned=False).lm_head.tuned
    err = ((got - ref).norm() / ref.norm()).item()
    assert err < tol, f"{mode}: relative logit error {err:.3f}"
    # block matrices and head: 1 (int8) or ~0.6 (int4 + fp32 group scales) bytes per weight vs 4 (fp32)
    assert weight_bytes(qm) < weight_bytes(m) * (ratio + 0.05)
    eng = LLMEngine(qm, None, EngineConfig(block_size=4))
    out = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=6, temperature=0))[0].token_ids
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        for _ in range(6):
            ids = torch.cat([ids, qm(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    assert out == ids[0, 3:].tolist()
    with pytest.raises(ValueError, match="unknown"):
        quantize_model(m, "int3")
