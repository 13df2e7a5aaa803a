"""CORE-style centered aggregate and the n-gram contamination check."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.eval.contamination import contamination, ngram_hashes
from kiln.eval.core import centered, core_score


def test_centered_and_core():
    assert centered(0.30, 0.25) == pytest.approx(0.05 / 0.75)
    assert centered(0.5, 0.5) == 0.0 and centered(1.0, 0.25) == 1.0 and centered(0.2, 0.0) == 0.2
    assert core_score({"a": (0.30, 0.25), "b": (0.75, 0.5), "c": (0.1, 0.0)}) == pytest.approx(
        (0.05 / 0.75 + 0.5 + 0.1) / 3)
    with pytest.raises(ValueError):
        centered(0.5, 1.0)


def test_ngram_hashes_match_for_equal_windows():
    h = ngram_hashes(np.array([1, 2, 3, 1, 2, 3, 9]), 3)
    assert len(h) == 5 and h[0] == h[3] and len(set(h.tolist())) == 4
    assert len(ngram_hashes(np.array([1, 2]), 3)) == 0


def test_contamination_per_task():
    rng = np.random.default_rng(0)
    train = rng.integers(0, 1000, 5000)
    leaked = train[100:120].tolist()  # 20 tokens copied from training: 8 shared 13-grams
    clean = (rng.integers(1000, 2000, 20)).tolist()
    straddle = train[4990:5000].tolist() + [7, 7, 7]  # shares no full 13-gram
    res = contamination({"a": [leaked, clean], "b": [straddle, [1, 2]]}, [train[:3000], train[3000:]], n=13, chunk=64)
    assert res["a"].contaminated == 1 and res["a"].ngrams_found == 8 and res["a"].ngrams == 16
    assert res["b"].contaminated == 0 and res["b"].too_short == 1
    # a leak split across two training arrays is not a 13-gram of either; across chunks it is found
    res = contamination({"a": [train[2990:3010].tolist()]}, [train], n=13, chunk=7)
    assert res["a"].contaminated == 1 and res["a"].ngrams_found == 8
    assert res["a"].to_dict()["contaminated_frac"] == 1.0
