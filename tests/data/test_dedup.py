"""Exact, line-level and MinHash dedup, measured on planted near-duplicates."""

from __future__ import annotations

import numpy as np

from kiln.bench.data import dedup_precision_recall, planted_near_duplicates
from kiln.data.dedup import (
    DedupConfig,
    InMemoryDedup,
    MinHashConfig,
    MinHasher,
    connected_components,
    exact_hash,
    jaccard,
    minhash_clusters,
    remove_lines,
    shingles,
)
from kiln.data.document import Document
from kiln.data.steps import Stats


def test_exact_hash_normalizes() -> None:
    assert exact_hash("Hello,  World!") == exact_hash("hello world")
    assert exact_hash("hello world") != exact_hash("hello there")


def test_signature_estimates_jaccard() -> None:
    cfg = MinHashConfig(bands=32, rows=8)
    h = MinHasher(cfg)
    words = [f"w{i}" for i in range(400)]
    a, b = " ".join(words), " ".join(words[:300] + [f"x{i}" for i in range(100)])
    true = jaccard(shingles(a), shingles(b))
    est = float((h.signature(a) == h.signature(b)).mean())
    assert abs(est - true) < 0.1
    assert (h.signature(a) == MinHasher(cfg).signature(a)).all()  # deterministic across instances


def test_connected_components() -> None:
    labels = connected_components(6, np.array([[0, 1], [1, 2], [4, 5]]))
    assert labels.tolist() == [0, 0, 0, 3, 4, 4]


def test_minhash_precision_recall_on_planted_duplicates() -> None:
    cfg = MinHashConfig()
    texts, family = planted_near_duplicates(n_docs=600, n_dups=150, words_per_doc=200)
    labels = minhash_clusters(texts, cfg)
    sh = [shingles(t, cfg.ngram) for t in texts]
    precision, recall, n_true = dedup_precision_recall(labels, family, sh, cfg.threshold)
    assert n_true > 100
    assert precision >= 0.95 and recall >= 0.95, (precision, recall)


def test_in_memory_dedup_step_counts_reasons() -> None:
    base = " ".join(f"word{i}" for i in range(200))
    docs = [Document(base, "a"), Document(base.upper(), "b"), Document(base + " extra", "c"), Document("other text " * 30, "d")]
    stats = Stats()
    for d in docs:
        stats.add_input(d)
    kept = list(InMemoryDedup(DedupConfig()).run(docs, stats))
    assert [d.id for d in kept] == ["a", "d"]
    assert stats.dropped == {"dedup_exact": 1, "dedup_minhash": 1}


def test_remove_lines() -> None:
    from kiln.data.dedup import line_hash

    text = "Keep this line please\nCopyright 2024 Example Inc.\nAnother kept line"
    out, removed = remove_lines(text, {line_hash("Copyright 2024 Example Inc.")})
    assert removed == 1 and out == "Keep this line please\nAnother kept line"
