"""evaluate_heldout: loss and bits per byte against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kiln.eval.heldout import evaluate_heldout
from kiln.train import cross_entropy


class Bigram(torch.nn.Module):
    """logits depend on the current token only: a fixed table (V, V)."""

    def __init__(self, V: int) -> None:
        super().__init__()
        self.table = torch.nn.Parameter(torch.randn(V, V, generator=torch.Generator().manual_seed(0)))

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        return self.table[idx]  # (B, T, V)


def test_loss_and_bpb_match_a_direct_computation():
    V, T = 10, 4
    tokens = np.random.default_rng(0).integers(0, V, 4 * 5 + 1)  # exactly 5 windows of T
    token_bytes = [0] + [1, 2, 3] * 3  # token 0 is special: 0 bytes
    model = Bigram(V)
    r = evaluate_heldout(model, tokens, token_bytes, context_length=T, batch_size=2)
    x, y = torch.as_tensor(tokens[:-1]), torch.as_tensor(tokens[1:])
    nats = cross_entropy(model(x[None]), y[None], reduction="sum").item()
    nbytes = sum(token_bytes[t] for t in tokens[1:])
    assert r["tokens"] == 20
    assert r["loss"] == pytest.approx(nats / 20, rel=1e-6)
    assert r["bpb"] == pytest.approx(nats / (math.log(2) * nbytes), rel=1e-6)
    assert model.training  # mode restored
    # max_batches limits the windows; no token_bytes gives bpb None.
    r2 = evaluate_heldout(model, tokens, None, context_length=T, batch_size=2, max_batches=1)
    assert r2["tokens"] == 8 and r2["bpb"] is None


def test_uniform_model_scores_ln_v():
    class Uniform(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, idx):
            return torch.zeros(*idx.shape, 16) + self.w

    r = evaluate_heldout(Uniform(), torch.arange(16).repeat(4), [1] * 16, context_length=8, batch_size=3)
    assert r["loss"] == pytest.approx(math.log(16))
    assert r["bpb"] == pytest.approx(4.0)  # log2(16) bits per one-byte token
    with pytest.raises(ValueError, match="fewer than context_length"):
        evaluate_heldout(Uniform(), [1, 2, 3], None, context_length=8, batch_size=1)
