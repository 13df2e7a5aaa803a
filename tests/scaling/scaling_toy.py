"""Helpers for the scaling tests (imported by name: pytest puts this folder on sys.path): a
synthetic token corpus and synthetic (N, D, loss) rows from a known L(N, D)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

# Hoffmann et al.'s published approach-3 constants: the "given L(N, D)" of the recovery tests.
TRUE = {"E": 1.69, "A": 406.4, "B": 410.7, "alpha": 0.34, "beta": 0.28}


def true_loss(n, d, p=TRUE):
    return p["E"] + p["A"] / np.asarray(n, float) ** p["alpha"] + p["B"] / np.asarray(d, float) ** p["beta"]


def markov_tokens(n: int, vocab: int = 64, sample_seed: int = 1, branching: int = 4) -> np.ndarray:
    """(n,) uint16 tokens of an order-2 Markov chain whose sparse transitions are fixed (seed 0):
    each (prev2, prev1) has ``branching`` likely next tokens, so loss falls with N and with D."""
    rng = np.random.default_rng(0)
    table = rng.integers(0, vocab, size=(vocab, vocab, branching))  # (V, V, b)
    cdf = rng.dirichlet(np.ones(branching) * 0.7, size=(vocab, vocab)).cumsum(-1)  # (V, V, b)
    u = np.random.default_rng(sample_seed).random(n)
    out = np.empty(n, dtype=np.int64)
    out[:2] = (1, 2)
    for i in range(2, n):
        a, b = out[i - 2], out[i - 1]
        out[i] = table[a, b, min(int(np.searchsorted(cdf[a, b], u[i])), branching - 1)]
    return out.astype(np.uint16)


def write_toy_shards(folder: Path, n_train: int = 200_000, n_val: int = 20_000, vocab: int = 64) -> Path:
    """train_00000.bin and val_00000.bin (another sample of the same chain), a document per 2,048 tokens."""
    from kiln.shards import write_shard

    folder.mkdir(parents=True, exist_ok=True)
    for name, n, seed in (("train", n_train, 1), ("val", n_val, 2)):
        write_shard(folder / f"{name}_00000.bin", markov_tokens(n, vocab, seed), np.arange(0, n, 2048), vocab)
    return folder
