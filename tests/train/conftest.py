"""Fixtures for the training tests: synthetic token shards and a ~30k-parameter config."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from kiln.model import ModelConfig
from kiln.shards import write_shard
from kiln.train.config import TrainConfig

VOCAB = 64


def write_tokens(d: Path, n_train: int = 20_000, n_val: int = 4_000, seed: int = 0) -> Path:
    """A learnable stream: a fixed random cycle of 48 tokens, with 5% of positions random."""
    rng = np.random.default_rng(seed)
    cycle = rng.integers(0, VOCAB, 48)
    def stream(n):
        s = np.resize(cycle, n)
        noise = rng.random(n) < 0.05
        s[noise] = rng.integers(0, VOCAB, int(noise.sum()))
        return s
    d.mkdir(parents=True, exist_ok=True)
    write_shard(d / "train_00000.bin", stream(n_train // 2), [0], VOCAB)
    write_shard(d / "train_00001.bin", stream(n_train - n_train // 2), [0], VOCAB)
    write_shard(d / "val_00000.bin", stream(n_val), [0], VOCAB)
    return d


def small_config(**kw) -> TrainConfig:
    """Tiny model, short run, frequent eval/save; keyword overrides on top."""
    base = {
        "model": ModelConfig(vocab_size=VOCAB, context_length=16, d_model=32, n_layers=2, n_heads=2, d_ff=64),
        "batch_size": 8, "lr": 1e-2, "min_lr": 1e-3, "warmup_steps": 2, "max_steps": 10, "eval_every": 5, "eval_batches": 2,
        "sample_every": 0, "save_every": 5, "keep_last": 5, "device": "cpu",
    }
    base.update(kw)
    return TrainConfig(**base)


@pytest.fixture
def tokens_dir(tmp_path: Path) -> Path:
    return write_tokens(tmp_path / "tokens")


@pytest.fixture
def make_config():
    """The ``small_config`` factory."""
    return small_config


@pytest.fixture
def make_tokens():
    """The ``write_tokens`` factory (a token folder of another size)."""
    return write_tokens
