"""N-gram hashing shared by the stages that compare token or word sequences: the corpus stage's
held-out decontamination (``kiln.data.corpus``) and the benchmark contamination check
(``kiln.eval.contamination``). Windows are hashed with a 64-bit polynomial (arithmetic modulo 2**64),
vectorized with numpy: ``n`` passes over the array, no Python loop per window."""

from __future__ import annotations

import numpy as np

_P = np.uint64(0x100000001B3)  # FNV prime: an odd multiplier for the rolling polynomial hash


def ngram_hashes(tokens: np.ndarray, n: int) -> np.ndarray:
    """uint64 hash of every ``n``-token window of ``tokens`` (length ``len(tokens) - n + 1``)."""
    t = np.asarray(tokens, dtype=np.uint64)
    m = len(t) - n + 1
    if m <= 0:
        return np.zeros(0, dtype=np.uint64)
    h = np.zeros(m, dtype=np.uint64)
    with np.errstate(over="ignore"):  # arithmetic modulo 2**64 is the point
        for j in range(n):
            h = h * _P + t[j : j + m] + np.uint64(1)
    return h


def member_of_sorted(values: np.ndarray, sorted_unique: np.ndarray) -> np.ndarray:
    """Boolean mask: which ``values`` occur in ``sorted_unique`` (sorted, no repeats). A binary
    search per value: for 64-bit hashes ``np.isin`` was ~50x slower here (1.5 s for 55k values
    against 1.5M), since it re-sorts the large side on every call."""
    if len(sorted_unique) == 0:
        return np.zeros(len(values), dtype=bool)
    idx = np.minimum(np.searchsorted(sorted_unique, values), len(sorted_unique) - 1)
    return sorted_unique[idx] == values
