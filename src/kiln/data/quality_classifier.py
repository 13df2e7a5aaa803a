"""The quality classifier: a fastText-style linear model over hashed word n-grams, its training
(``kiln data train-quality``) and its versioned file. :mod:`kiln.data.quality` builds the pipeline's
filters on it; :mod:`kiln.data.quality_default` builds the shipped model with it.

The classifier follows fastText's supervised model (Joulin et al. 2016, arXiv:1607.01759) reduced to
the binary case: a document is the mean of the weights of its hashed word unigrams and bigrams, and
``p(high quality) = sigmoid(mean + bias)``, trained by SGD on the logistic loss. Hashing
(``2**buckets_log2`` buckets, CRC32) means no vocabulary is stored. The model file is ``.npz`` with a
magic string and a version that :meth:`QualityClassifier.load` checks.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO

import numpy as np

MAGIC = "KILNQUAL"
VERSION = 1
_WORD_RE = re.compile(r"\w+", re.UNICODE)


@dataclass(frozen=True)
class QualityTrainConfig:
    """Training of the quality classifier."""

    buckets_log2: int = 20
    """log2 of the number of hashed feature buckets (2**20 = 1M weights, 4 MB)."""
    bigrams: bool = True
    """Use word bigrams as well as unigrams."""
    epochs: int = 5
    """Passes over the training examples."""
    lr: float = 0.5
    """SGD learning rate (decays linearly to 0, as fastText's)."""
    max_words: int = 2000
    """Words of each document used (the start of the document)."""
    val_fraction: float = 0.1
    """Share of examples held out to report accuracy."""
    seed: int = 0
    """Shuffling and split seed."""
    optimizer: str = "sgd"
    """``sgd``: fastText's per-example SGD (large data); ``adam``: full-batch Adam on the mean
    logistic loss plus ``l2`` (small data: SGD on a mean of weights underfits a few thousand examples)."""
    l2: float = 1e-4
    """``adam``: L2 penalty on the weights (per example, as ``l2 * |w|^2 / 2``)."""
    steps: int = 400
    """``adam``: full-batch steps."""


def features(text: str, buckets_log2: int, bigrams: bool, max_words: int) -> np.ndarray:
    """Hashed unigram (+ bigram) bucket ids of a text, shape (F,) int64 (at least one id)."""
    ws = _WORD_RE.findall(text.lower())[:max_words]
    mask = (1 << buckets_log2) - 1
    ids = [zlib.crc32(w.encode()) & mask for w in ws]
    if bigrams:
        ids += [zlib.crc32(f"{a} {b}".encode()) & mask for a, b in itertools.pairwise(ws)]
    return np.array(ids or [0], dtype=np.int64)


class QualityClassifier:
    """Binary linear classifier over hashed n-grams; ``score(text)`` is p(positive class)."""

    def __init__(self, weights: np.ndarray, bias: float, cfg: QualityTrainConfig) -> None:
        self.w = weights
        self.bias = bias
        self.cfg = cfg

    def score(self, text: str) -> float:
        """Probability that the text is like the positive examples."""
        f = features(text, self.cfg.buckets_log2, self.cfg.bigrams, self.cfg.max_words)
        z = float(self.w[f].mean()) + self.bias
        return 1.0 / (1.0 + math.exp(-max(min(z, 30.0), -30.0)))

    def predict(self, text: str, threshold: float = 0.5) -> tuple[str, float]:
        """``("high" | "low", p(high))``: the label at ``threshold`` and the score."""
        p = self.score(text)
        return ("high" if p >= threshold else "low"), p

    def save(self, path: str | Path, dtype: str = "float32") -> None:
        """Write the ``.npz`` model (magic, version, config, weights as ``dtype``; float16 halves the file)."""
        meta = json.dumps({"magic": MAGIC, "version": VERSION, "config": asdict(self.cfg), "bias": self.bias})
        with open(path, "wb") as f:
            np.savez_compressed(f, meta=np.array(meta), w=self.w.astype(dtype))

    @classmethod
    def load(cls, path: str | Path | IO[bytes]) -> QualityClassifier:
        """Read a model written by :meth:`save` (a path or a binary file); checks the magic and version."""
        with np.load(path, allow_pickle=False) as z:
            meta = json.loads(str(z["meta"]))
            if meta.get("magic") != MAGIC or meta.get("version") != VERSION:
                raise ValueError(f"{path} is not a Kiln quality model v{VERSION}; retrain with `kiln data train-quality`")
            cfg = QualityTrainConfig(**meta["config"])
            return cls(z["w"].astype(np.float32), float(meta["bias"]), cfg)


def train_quality_classifier(
    positives: Sequence[str], negatives: Sequence[str], cfg: QualityTrainConfig = QualityTrainConfig()
) -> tuple[QualityClassifier, dict[str, float]]:
    """Train on texts labeled 1 (positives) and 0 (negatives); returns the model and held-out metrics."""
    if not positives or not negatives:
        raise ValueError("train-quality needs both positive and negative examples")
    data = [(t, 1.0) for t in positives] + [(t, 0.0) for t in negatives]
    rng = random.Random(cfg.seed)
    rng.shuffle(data)
    n_val = int(len(data) * cfg.val_fraction) if len(data) >= 10 else 0
    val, train = data[:n_val], data[n_val:]
    feats = [features(t, cfg.buckets_log2, cfg.bigrams, cfg.max_words) for t, _ in train]
    if cfg.optimizer == "adam":
        w, bias = _fit_adam(feats, np.array([y for _, y in train]), cfg)
        return _with_metrics(QualityClassifier(w, bias, cfg), train, val)
    if cfg.optimizer != "sgd":
        raise ValueError(f"optimizer {cfg.optimizer!r} is unknown; pick sgd or adam")
    w = np.zeros(1 << cfg.buckets_log2, dtype=np.float32)
    bias = 0.0
    total = cfg.epochs * len(train)
    step = 0
    for _ in range(cfg.epochs):
        order = list(range(len(train)))
        rng.shuffle(order)
        for i in order:
            lr = cfg.lr * (1.0 - step / total)
            step += 1
            f, y = feats[i], train[i][1]
            z = float(w[f].mean()) + bias
            p = 1.0 / (1.0 + math.exp(-max(min(z, 30.0), -30.0)))
            g = p - y  # d(logistic loss)/dz
            np.add.at(w, f, -lr * g / len(f))
            bias -= lr * g * 0.1
    return _with_metrics(QualityClassifier(w, bias, cfg), train, val)


def _with_metrics(model: QualityClassifier, train: list, val: list) -> tuple[QualityClassifier, dict[str, float]]:
    metrics: dict[str, float] = {"train_examples": len(train), "val_examples": len(val)}
    if val:
        correct = sum((model.score(t) >= 0.5) == (y == 1.0) for t, y in val)
        metrics["val_accuracy"] = correct / len(val)
    return model, metrics


def _fit_adam(feats: list[np.ndarray], y: np.ndarray, cfg: QualityTrainConfig) -> tuple[np.ndarray, float]:
    """Full-batch Adam on ``mean_i logloss(sigmoid(mean(w[f_i]) + b), y_i) + l2 |w|^2 / 2``."""
    idx = np.concatenate(feats)  # (nnz,) bucket ids
    row = np.repeat(np.arange(len(feats)), [len(f) for f in feats])  # (nnz,) example of each id
    inv_len = 1.0 / np.array([len(f) for f in feats], dtype=np.float64)  # (N,)
    n_w = 1 << cfg.buckets_log2
    w = np.zeros(n_w + 1)  # the weights, then the bias
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    b1, b2, eps = 0.9, 0.999, 1e-8
    for t in range(1, cfg.steps + 1):
        z = np.bincount(row, weights=w[idx], minlength=len(feats)) * inv_len + w[-1]
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
        r = (p - y) / len(feats)  # dL/dz_i
        g = np.empty_like(w)
        g[:n_w] = np.bincount(idx, weights=(r * inv_len)[row], minlength=n_w) + cfg.l2 * w[:n_w]
        g[-1] = r.sum()
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        lr = cfg.lr * (1 - (t - 1) / cfg.steps)  # linear decay, as the SGD path
        w -= lr * (m / (1 - b1**t)) / (np.sqrt(v / (1 - b2**t)) + eps)
    return w[:n_w].astype(np.float32), float(w[-1])
