"""A model whose vocabulary is padded past the tokenizer's never samples a padding id."""

from __future__ import annotations

import torch

from kiln.generate import generate_tokens
from kiln.model import ModelConfig, Transformer


def test_padding_ids_are_never_sampled():
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=64, context_length=16, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    with torch.no_grad():  # make the padding rows (ids 40..63) overwhelmingly likely
        model.lm_head.weight[40:] = 0.0
        model.lm_head.weight[40:, 0] = 1e4
        model.embed_tokens.weight[:, 0] = 1.0
    free = list(generate_tokens(model, [1, 2, 3], max_new_tokens=20, temperature=1.0, seed=0))
    assert any(t >= 40 for t in free), "the fixture must make padding ids likely"
    limited = list(generate_tokens(model, [1, 2, 3], max_new_tokens=20, temperature=1.0, seed=0, vocab_limit=40))
    assert len(limited) == 20 and all(t < 40 for t in limited)
