"""Fixtures for tokenizer tests: a small training text, a tiny trained tokenizer, GPT-2 files."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizer_samples import VARIED

TINY_CORPUS = (
    "The cat sat on the mat. The dog ate the hat! 123 4567\n<|endoftext|>"
    "low lower lowest newer wider new\n"
)


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    p = tmp_path / "tiny.txt"
    p.write_text(TINY_CORPUS, encoding="utf-8")
    return p


@pytest.fixture(scope="session")
def varied_corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 200 KB of varied text (repeated with variation), for training tests."""
    import random

    rng = random.Random(0)
    words = " ".join(VARIED).split(" ")
    lines = []
    for i in range(4000):
        rng.shuffle(words)
        lines.append(" ".join(words[:12]) + (f" {i}" if i % 3 else ""))
        if i % 500 == 499:
            lines.append("<|endoftext|>")
    p = tmp_path_factory.mktemp("corpus") / "varied.txt"
    p.write_text("\n".join(lines), encoding="utf-8")
    return p


@pytest.fixture
def gpt2_files(shared_data: Path) -> tuple[Path, Path]:
    d = shared_data / "tokenizers" / "gpt2"
    if not (d / "vocab.json").is_file():
        pytest.skip(f"{d} has no GPT-2 files")
    return d / "vocab.json", d / "merges.txt"
