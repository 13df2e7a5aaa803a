"""Training batches: ``get_batch`` and ``TokenSampler``, now ``kiln.shards.sampler`` under their old names.

``kiln.shards.WindowSampler`` is the one sampler (random windows over shards, this rank's slice of
each global batch, a resumable position); ``TokenSampler`` is it with the old constructor, and
``read_heldout`` reads the first held-out tokens that evaluations score.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from kiln.shards.sampler import WindowSampler, aligned_starts, get_batch

_aligned_starts = aligned_starts  # the name before the move

__all__ = ["TokenSampler", "WindowSampler", "get_batch", "read_heldout"]


class TokenSampler(WindowSampler):
    """``WindowSampler`` in random order under its old constructor: ``rank`` offsets the seed (each
    rank its own stream; the trainer instead slices one global stream, ``WindowSampler(rank=...)``)."""

    def __init__(self, shards: Sequence[np.ndarray], context_length: int, seed: int, rank: int = 0,
                 doc_starts: Sequence[np.ndarray] | None = None) -> None:
        self._seed_offset = rank
        super().__init__(shards, context_length, seed, doc_starts=doc_starts)

    def reseed(self, seed: int) -> None:
        super().reseed(seed)
        self.generator.manual_seed(self.seed * 1_000_003 + self._seed_offset)


def read_heldout(tokens_dir: str | Path, n: int) -> np.ndarray | None:
    """The first ``n`` tokens of the ``val_*.bin`` shards in ``tokens_dir`` (fewer if they hold
    fewer), or None when there are none: what evaluations read, without loading the rest."""
    from kiln.shards import read_shard

    parts, have = [], 0
    for p in sorted(Path(tokens_dir).glob("val_*.bin")):
        parts.append(np.asarray(read_shard(p).tokens[: n - have]))
        have += len(parts[-1])
        if have >= n:
            break
    return np.concatenate(parts) if parts else None
