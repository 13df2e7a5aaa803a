"""Contamination check: n-gram overlap between benchmark items and training data, per task.

An item counts as contaminated when any ``n``-token window of its text (context + gold answer)
also occurs in the training tokens. ``n = 13`` follows GPT-3's check (Brown et al., arXiv:2005.14165,
appendix C). Both sides must be tokenized by the same tokenizer. N-grams are compared by 64-bit
polynomial hashes, computed for the whole training array with numpy (``n`` vectorized passes), so
hundreds of millions of tokens stream through in chunks of bounded memory.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from kiln.ngrams import member_of_sorted, ngram_hashes  # both also importable from here, as before


@dataclass
class Overlap:
    """Per-task contamination: items with any shared n-gram, and the share of n-grams found."""

    items: int
    contaminated: int
    too_short: int
    ngrams: int
    ngrams_found: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON-able summary with fractions."""
        return {**self.__dict__, "contaminated_frac": self.contaminated / max(self.items, 1),
                "ngram_frac": self.ngrams_found / max(self.ngrams, 1)}


def contamination(
    tasks: Mapping[str, Sequence[Sequence[int]]],
    train_tokens: Iterable[np.ndarray],
    n: int = 13,
    chunk: int = 1 << 24,
) -> dict[str, Overlap]:
    """Overlap of each task's tokenized items with the training token arrays.

    Args:
        tasks: ``{task: [item tokens, ...]}``.
        train_tokens: token arrays (e.g. shards' memmaps); read ``chunk`` tokens at a time with an
            ``n - 1`` overlap so no window across a chunk boundary is missed.
    """
    item_hashes = {name: [np.unique(ngram_hashes(np.asarray(t), n)) for t in items]
                   for name, items in tasks.items()}
    nonempty = [h for hs in item_hashes.values() for h in hs if len(h)]
    bench = np.unique(np.concatenate(nonempty)) if nonempty else np.zeros(0, dtype=np.uint64)
    found = np.zeros(0, dtype=np.uint64)
    for arr in train_tokens:
        for s in range(0, max(len(arr) - n + 1, 0), chunk):
            h = ngram_hashes(np.asarray(arr[s : s + chunk + n - 1]), n)
            found = np.union1d(found, h[member_of_sorted(h, bench)])
    out = {}
    for name, hs in item_hashes.items():
        hits = [int(member_of_sorted(h, found).sum()) for h in hs]
        out[name] = Overlap(
            items=len(hs), contaminated=sum(x > 0 for x in hits), too_short=sum(len(h) == 0 for h in hs),
            ngrams=sum(len(h) for h in hs), ngrams_found=sum(hits),
        )
    return out


def shard_token_arrays(paths: Sequence[str | os.PathLike]) -> Iterable[np.ndarray]:
    """Memory-mapped token arrays of Kiln token shards (for ``contamination``)."""
    from kiln.shards import read_shard

    for p in paths:
        yield read_shard(p).tokens
