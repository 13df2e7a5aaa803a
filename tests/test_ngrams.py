"""Shared n-gram hashing (kiln.ngrams), and the layering it exists for: the data stages do not
import the evaluation package (checked for every stage in tests/test_layering.py)."""

import numpy as np

from kiln import ngrams
from kiln.eval import contamination


def test_member_of_sorted_matches_isin():
    rng = np.random.default_rng(0)
    pool = rng.integers(0, 2**63, 500, dtype=np.uint64)
    table = np.unique(pool[:300])
    values = np.concatenate([pool, rng.integers(0, 2**63, 50, dtype=np.uint64), table[:1], table[-1:]])
    np.testing.assert_array_equal(ngrams.member_of_sorted(values, table), np.isin(values, table))
    # above the largest entry, below the smallest, and an empty table
    assert not ngrams.member_of_sorted(np.array([table[-1] + np.uint64(1)]), table)[0]
    assert ngrams.member_of_sorted(np.zeros(3, dtype=np.uint64), np.zeros(0, dtype=np.uint64)).tolist() == [False] * 3


def test_ngram_hashes_depend_on_order_and_position_only():
    h = ngrams.ngram_hashes(np.array([5, 6, 7, 5, 6, 7, 6, 5]), 3)
    assert len(h) == 6
    assert h[0] == h[3] and len(set(h.tolist())) == 5  # (5,6,7) twice, the other windows distinct
    assert ngrams.ngram_hashes(np.array([0, 0]), 2)[0] != ngrams.ngram_hashes(np.array([0]), 1)[0]


def test_contamination_keeps_the_old_import_path():
    assert contamination.ngram_hashes is ngrams.ngram_hashes
    assert contamination.member_of_sorted is ngrams.member_of_sorted
