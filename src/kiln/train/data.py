"""Training batches: random windows of ``context_length + 1`` tokens from 1-D token arrays (memmaps).

``get_batch`` is the plain building block. ``TokenSampler`` does the same over several shards with
its own seeded generator, so the data position is a small state dict stored in every checkpoint
(exact resume) and can be reseeded after a rollback (a fresh order, not a replay of the bad batch).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch


def _to_device(windows: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    t = torch.from_numpy(windows.astype(np.int64, copy=False))  # (B, T+1)
    dev = torch.device(device)
    if dev.type == "cuda":  # pinned host memory lets the copy overlap compute
        t = t.pin_memory().to(dev, non_blocking=True)
    else:
        t = t.to(dev)
    return t[:, :-1], t[:, 1:]


def get_batch(
    tokens: np.ndarray | Sequence[int],
    batch_size: int,
    context_length: int,
    device: str | torch.device = "cpu",
    generator: torch.Generator | np.random.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows from a 1-D token array.

    Returns ``(x, y)``, each a LongTensor (batch_size, context_length) on ``device``, with
    ``y[b, t] = x[b, t + 1]`` (the next token). Start offsets are uniform in
    ``[0, len(tokens) - context_length - 1]``; ``generator`` (torch or numpy) makes them reproducible.
    """
    n = len(tokens)
    if n < context_length + 1:
        raise ValueError(
            f"{n} tokens cannot fill one window of context_length + 1 = {context_length + 1}; "
            "use more data or a shorter context_length"
        )
    high = n - context_length  # exclusive bound on the start offset
    if isinstance(generator, np.random.Generator):
        starts = generator.integers(0, high, size=batch_size)
    else:
        starts = torch.randint(0, high, (batch_size,), generator=generator).numpy()
    arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    windows = arr[starts[:, None] + np.arange(context_length + 1)]  # (B, T+1)
    return _to_device(np.asarray(windows), device)


class TokenSampler:
    """Random ``context_length + 1`` windows over one or more token arrays (train shards).

    A window never crosses a shard boundary; each possible window in any shard is equally likely.
    ``rank`` offsets the seed so data-parallel ranks draw different windows (the seam for
    multi-GPU data loading). The whole data position is ``state_dict()``: the generator state.
    """

    def __init__(
        self, shards: Sequence[np.ndarray], context_length: int, seed: int, rank: int = 0,
        doc_starts: Sequence[np.ndarray] | None = None,
    ) -> None:
        """``doc_starts`` (one ascending int64 array per shard): draw only windows that begin at a
        document start, or ``context_length`` tokens after the previous such window inside the same
        document (so long documents are covered whole). Without it, any offset is a window start."""
        self.shards = list(shards)
        self.context_length = context_length
        self.rank = rank
        self._starts: list[np.ndarray] | None = None
        if doc_starts is not None:
            self._starts = [_aligned_starts(np.asarray(d, dtype=np.int64), len(s), context_length)
                            for s, d in zip(self.shards, doc_starts)]
            counts = np.array([len(a) for a in self._starts], dtype=np.int64)
        else:
            counts = np.array([max(len(s) - context_length, 0) for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise ValueError(
                f"no token shard holds context_length + 1 = {context_length + 1} tokens (longest has "
                f"{longest}); use more data or a shorter context_length"
            )
        self._cum = np.cumsum(counts)  # (n_shards,) windows up to and including each shard
        self.n_windows = int(self._cum[-1])
        self.generator = torch.Generator()
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        """Start a new random order (used once at start, and after a rollback)."""
        self.seed = int(seed)
        self.generator.manual_seed(self.seed * 1_000_003 + self.rank)

    def next_batch(self, batch_size: int, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` batch, each (batch_size, context_length) int64 on ``device``."""
        # int64 draws: randint's bound must fit, which any real corpus does (< 2**63 windows).
        g = torch.randint(0, self.n_windows, (batch_size,), generator=self.generator).numpy()
        shard_idx = np.searchsorted(self._cum, g, side="right")  # (B,)
        base = np.concatenate([[0], self._cum[:-1]])
        offsets = g - base[shard_idx]
        if self._starts is not None:
            offsets = np.array([self._starts[i][o] for i, o in zip(shard_idx, offsets)], dtype=np.int64)
        T1 = self.context_length + 1
        windows = np.empty((batch_size, T1), dtype=np.int64)
        for b in range(batch_size):
            s = self.shards[shard_idx[b]]
            windows[b] = s[offsets[b] : offsets[b] + T1]
        return _to_device(windows, device)

    def state_dict(self) -> dict:
        """Data position: seed and generator state (a uint8 tensor)."""
        return {"seed": self.seed, "rank": self.rank, "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore a position saved by ``state_dict``."""
        self.seed = int(state["seed"])
        self.generator.set_state(state["generator"])


def _aligned_starts(doc_starts: np.ndarray, n_tokens: int, context_length: int) -> np.ndarray:
    """Window starts at each document start and every ``context_length`` tokens after it until the
    next document starts; only starts whose ``context_length + 1`` window fits in the shard."""
    bounds = np.append(doc_starts, n_tokens)  # (n_docs + 1,)
    lengths = np.maximum(bounds[1:] - bounds[:-1], 1)
    per_doc = -(-lengths // context_length)  # windows that begin inside each document
    starts = np.repeat(doc_starts, per_doc) + context_length * (
        np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc))
    return starts[starts + context_length + 1 <= n_tokens]


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
