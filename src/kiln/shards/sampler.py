"""The one way Kiln feeds token windows to training: ``WindowSampler``.

A window is ``context_length + 1`` tokens; a micro-batch is ``(x, y)``, each (B, T) int64 on the
device, with ``y[b, t] = x[b, t + 1]``. Every rank draws the same global batch of
``B x world_size`` windows (same seed, no communication) and keeps rows ``rank * B .. (rank + 1) * B``,
so ranks read disjoint draws, together read what one process with the same global batch reads
(2 ranks give the losses of 1 process), and the data position does not depend on the world size.

Two orders:

- ``order="random"`` (training; what ``kiln train`` uses): each window drawn uniformly from every
  window of every shard (a window never crosses a shard boundary), with replacement, from a seeded
  ``torch.Generator``. ``doc_aligned``: windows start at a document start, or ``T`` tokens after the
  previous such window inside the same document (long documents are covered whole). The position is
  the generator's state; ``reseed(seed)`` starts a fresh order (after a rollback).
- ``order="epoch"`` (``shuffle=True``) or ``"sequential"``: the shards read back to back as one
  stream (a window may cross a shard boundary), cut on a grid of stride ``T`` (a random offset per
  epoch when shuffled) or at document starts, each window once per epoch in the order of
  ``np.random.default_rng([seed, epoch])``; the position is (epoch, step). ``ShardLoader`` is this.

``state_dict()`` / ``load_state_dict()`` make it part of ``kiln.train.TrainState`` (exact resume);
iterating yields micro-batches of ``batch_size`` rows on ``device``, the batch source that
``kiln.train.fit`` takes. ``get_batch`` (CS336's signature) draws windows of one array with the
same window cutter. ``TokenSampler`` (``kiln.train.data``) and ``ShardLoader`` (``kiln.shards.loader``)
are this class under their old constructors, and so is ``DistributedWindowSampler`` (epoch order
on a grid at multiples of T, its position counted in windows so a run resumes on any world size).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ORDERS = ("random", "epoch", "sequential")


def to_device(windows: np.ndarray, device: str | torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T + 1) windows -> ``(x, y)``, each (B, T) int64 on ``device`` (pinned, non-blocking on CUDA)."""
    t = torch.from_numpy(np.ascontiguousarray(windows).astype(np.int64, copy=False))  # (B, T+1)
    dev = torch.device(device)
    if dev.type == "cuda":  # pinned host memory lets the copy overlap compute
        t = t.pin_memory().to(dev, non_blocking=True)
    elif dev.type != "cpu":
        t = t.to(dev)
    return t[:, :-1], t[:, 1:]


def aligned_starts(doc_starts: np.ndarray, n_tokens: int, context_length: int) -> np.ndarray:
    """Window starts at each document start and every ``context_length`` tokens after it until the
    next document starts; only starts whose ``context_length + 1`` window fits in ``n_tokens``."""
    bounds = np.append(doc_starts, n_tokens)  # (n_docs + 1,)
    lengths = np.maximum(bounds[1:] - bounds[:-1], 1)
    per_doc = -(-lengths // context_length)  # windows that begin inside each document
    starts = np.repeat(doc_starts, per_doc) + context_length * (
        np.arange(per_doc.sum()) - np.repeat(np.cumsum(per_doc) - per_doc, per_doc))
    return starts[starts + context_length + 1 <= n_tokens]


class WindowSampler:
    """Micro-batches of token windows for this rank (see the module docstring).

    Args:
        shards: 1-D token arrays (memmaps of ``train_*.bin``).
        context_length: T; each window reads T + 1 tokens.
        seed: fixes the order.
        doc_starts: one ascending int64 array of document starts per shard (for ``doc_aligned``).
        doc_aligned: windows start at document starts (random order: needs ``doc_starts``).
        batch_size: rows per micro-batch on this rank (B), for iteration.
        rank, world_size: this process's rows of each global batch of B x world_size.
        device: where iterated micro-batches go.
        order: "random", "epoch" or "sequential".
        grid_offset: in epoch order, shift the grid by a random offset each epoch (else windows
            start at multiples of T).
    """

    def __init__(self, shards: Sequence[np.ndarray], context_length: int, seed: int = 0, *,
                 doc_starts: Sequence[np.ndarray] | None = None, doc_aligned: bool | None = None,
                 batch_size: int = 1, rank: int = 0, world_size: int = 1, device: str | torch.device = "cpu",
                 order: str = "random", grid_offset: bool = True) -> None:
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is unknown; use one of {ORDERS}")
        if batch_size <= 0 or context_length <= 0:
            raise ValueError(f"batch_size={batch_size} and context_length={context_length} must be positive")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
        self.shards, self.context_length, self.order, self.grid_offset = list(shards), context_length, order, grid_offset
        self.doc_aligned = doc_starts is not None if doc_aligned is None else doc_aligned
        self.batch_size, self.rank, self.world_size, self.device = batch_size, rank, world_size, torch.device(device)
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards]).astype(np.int64)  # stream position of each shard
        per_shard = [np.asarray(d, dtype=np.int64) for d in doc_starts] if doc_starts is not None else None
        self.doc_starts = per_shard
        self.generator = torch.Generator()
        self.epoch = self.step = 0
        self._plan: tuple[int, np.ndarray] | None = None  # (epoch, window starts in serving order)
        if order == "random":
            self._init_random()
        self.reseed(seed)

    # -- random order ---------------------------------------------------------------------------
    def _init_random(self) -> None:
        T = self.context_length
        self._starts: list[np.ndarray] | None = None
        if self.doc_aligned:
            if self.doc_starts is None:
                raise ValueError("doc_aligned=True needs doc_starts (the shards' document starts)")
            self._starts = [aligned_starts(d, len(s), T) for s, d in zip(self.shards, self.doc_starts)]
            counts = np.array([len(a) for a in self._starts], dtype=np.int64)
        else:
            counts = np.array([max(len(s) - T, 0) for s in self.shards], dtype=np.int64)
        if counts.sum() == 0:
            longest = max((len(s) for s in self.shards), default=0)
            raise ValueError(f"no token shard holds context_length + 1 = {T + 1} tokens (longest has {longest}); "
                             "use more data or a shorter context_length")
        self._cum = np.cumsum(counts)  # (n_shards,) windows up to and including each shard
        self.n_windows = int(self._cum[-1])

    def _random_windows(self, n: int) -> np.ndarray:
        """``n`` windows (n, T + 1) drawn uniformly; advances the generator."""
        # int64 draws: randint's bound must fit, which any real corpus does (< 2**63 windows).
        g = torch.randint(0, self.n_windows, (n,), generator=self.generator).numpy()
        shard_idx = np.searchsorted(self._cum, g, side="right")  # (n,)
        offsets = g - np.concatenate([[0], self._cum[:-1]])[shard_idx]
        if self._starts is not None:
            offsets = np.array([self._starts[i][o] for i, o in zip(shard_idx, offsets)], dtype=np.int64)
        T1 = self.context_length + 1
        windows = np.empty((n, T1), dtype=np.int64)
        for b in range(n):
            windows[b] = self.shards[shard_idx[b]][offsets[b]:offsets[b] + T1]
        return windows

    # -- epoch and sequential orders -------------------------------------------------------------
    def epoch_starts(self, epoch: int) -> np.ndarray:
        """Stream positions of the windows of ``epoch``, in the order they are served."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        T, n = self.context_length, int(self.offsets[-1])
        rng = np.random.default_rng([self.seed, epoch])
        shuffle = self.order == "epoch"
        if self.doc_aligned:
            s = self.stream_doc_starts()
            e = np.append(s[1:], n)
            counts = np.maximum(-(-(e - s) // T), 1)
            first = np.repeat(np.cumsum(counts) - counts, counts)
            starts = np.repeat(s, counts) + (np.arange(counts.sum()) - first) * T
        else:
            offset = int(rng.integers(0, min(T, n - T))) if shuffle and self.grid_offset else 0
            starts = offset + np.arange((n - 1 - offset) // T, dtype=np.int64) * T
        starts = starts[starts + T + 1 <= n]
        if shuffle:
            starts = starts[rng.permutation(len(starts))]
        self._plan = (epoch, starts)
        return starts

    def stream_doc_starts(self) -> np.ndarray:
        """Document starts as positions in the stream of all shards."""
        if not self.doc_starts:
            return np.zeros(0, np.int64)
        return np.concatenate([d + off for d, off in zip(self.doc_starts, self.offsets[:-1])]).astype(np.int64)

    @property
    def steps_per_epoch(self) -> int:
        """Global batches per epoch (the last partial one is dropped)."""
        return len(self.epoch_starts(self.epoch)) // (self.batch_size * self.world_size)

    def stream(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the shards read back to back, as int64."""
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            lo = start - int(self.offsets[i])
            take = min(stop - start, len(self.shards[i]) - lo)
            parts.append(np.asarray(self.shards[i][lo:lo + take]))
            start += take
            i += 1
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def _epoch_windows(self, batch_size: int) -> np.ndarray:
        """This rank's ``batch_size`` windows of the next global batch in epoch order."""
        if self.step >= self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        starts = self.epoch_starts(self.epoch)
        lo = (self.step * self.world_size + self.rank) * batch_size
        self.step += 1
        T1 = self.context_length + 1
        return np.stack([self.stream(int(s), int(s) + T1) for s in starts[lo:lo + batch_size]])  # (B, T+1)

    # -- batches and position --------------------------------------------------------------------
    def reseed(self, seed: int) -> None:
        """Start a new order (used once at start, and after a rollback)."""
        self.seed = int(seed)
        self.generator.manual_seed(self.seed * 1_000_003)
        self._plan = None

    def next_batch(self, batch_size: int | None = None, device: str | torch.device | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next ``(x, y)``, each (batch_size, T) int64 on ``device`` (defaults: the
        sampler's); advances the position by one global batch."""
        b = batch_size or self.batch_size
        if self.order == "random":
            windows = self._random_windows(b * self.world_size)[self.rank * b:(self.rank + 1) * b]
        else:
            windows = self._epoch_windows(b)
        return to_device(windows, self.device if device is None else device)

    def __iter__(self) -> WindowSampler:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position: seed and generator state (random order), or epoch and step."""
        if self.order == "random":
            return {"seed": self.seed, "generator": self.generator.get_state()}
        return {"seed": self.seed, "epoch": self.epoch, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at a position saved by ``state_dict``."""
        self.seed = int(state["seed"])
        if self.order == "random":
            self.generator.set_state(state["generator"])
        else:
            self._plan = None
            self.epoch, self.step = int(state["epoch"]), int(state["step"])


class DistributedWindowSampler(WindowSampler):
    """``WindowSampler`` in epoch order over one token array of ``n_tokens``, windows at multiples of
    ``context_length`` (no grid offset), under its old API: ``next_starts()`` gives this rank's
    window starts (B,), ``next_batch(tokens, device)`` their ``(x, y)``. The position is counted in
    windows consumed *globally*, so a run saved on 2 ranks resumes on 1 or 4 at the same point of
    the same permutation (the next global batch is cut differently). ``env``: anything with
    ``rank`` and ``world_size`` (a ``kiln.distributed.DistEnv``).
    """

    def __init__(self, n_tokens: int, context_length: int, batch_size: int, env: Any, seed: int = 0) -> None:
        if context_length < 1 or batch_size < 1:
            raise ValueError(f"context_length {context_length} and batch_size {batch_size} must be >= 1")
        n_windows = (n_tokens - 1) // context_length
        if n_windows < batch_size * env.world_size:
            raise ValueError(
                f"{n_tokens} tokens give {n_windows} windows of {context_length + 1} tokens, fewer than one "
                f"global batch of {batch_size} x {env.world_size} ranks; lower the batch or context, or add data")
        length_only = np.broadcast_to(np.zeros(1, np.uint8), (n_tokens,))  # the plan needs the length, not the tokens
        super().__init__([length_only], context_length, seed, batch_size=batch_size, rank=env.rank,
                         world_size=env.world_size, order="epoch", grid_offset=False)
        self.n_windows, self.global_batch, self.consumed = n_windows, batch_size * env.world_size, 0

    def next_starts(self) -> np.ndarray:
        """Start offsets (B,) of this rank's windows for the next step; advances the position.
        The tail of an epoch smaller than a global batch is dropped, then a new epoch begins."""
        if self.consumed + self.global_batch > self.n_windows:
            self.epoch, self.consumed = self.epoch + 1, 0
        lo = self.consumed + self.rank * self.batch_size
        self.consumed += self.global_batch
        return self.epoch_starts(self.epoch)[lo:lo + self.batch_size].astype(np.int64)

    def next_batch(self, tokens: np.ndarray, device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """Inputs and targets, each (B, T) int64 on ``device``, for this rank's next step."""
        T1 = self.context_length + 1
        return to_device(np.stack([np.asarray(tokens[s:s + T1], dtype=np.int64) for s in self.next_starts()]), device)

    def __iter__(self):  # type: ignore[override]
        while True:
            yield self.next_starts()

    def state_dict(self) -> dict[str, Any]:
        """Position to save in a checkpoint (independent of rank and world size)."""
        return {"seed": self.seed, "epoch": self.epoch, "consumed": self.consumed, "n_windows": self.n_windows,
                "context_length": self.context_length}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at a saved position; the token array and context length must be the same."""
        if sd["n_windows"] != self.n_windows or sd["context_length"] != self.context_length:
            raise ValueError(
                f"sampler state is for {sd['n_windows']} windows of context {sd['context_length']}, this run has "
                f"{self.n_windows} of context {self.context_length}; resume with the same tokens and context length")
        self.seed, self.epoch, self.consumed, self._plan = sd["seed"], sd["epoch"], sd["consumed"], None


def get_batch(tokens: np.ndarray | Sequence[int], batch_size: int, context_length: int,
              device: str | torch.device = "cpu", generator: torch.Generator | np.random.Generator | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """``batch_size`` random windows from a 1-D token array (CS336's ``get_batch``).

    Returns ``(x, y)``, each a LongTensor (batch_size, context_length) on ``device``, with
    ``y[b, t] = x[b, t + 1]``. Start offsets are uniform in ``[0, len(tokens) - context_length - 1]``;
    ``generator`` (torch or numpy) makes them reproducible.
    """
    n = len(tokens)
    if n < context_length + 1:
        raise ValueError(f"{n} tokens cannot fill one window of context_length + 1 = {context_length + 1}; "
                         "use more data or a shorter context_length")
    high = n - context_length  # exclusive bound on the start offset
    if isinstance(generator, np.random.Generator):
        starts = generator.integers(0, high, size=batch_size)
    else:
        starts = torch.randint(0, high, (batch_size,), generator=generator).numpy()
    arr = tokens if isinstance(tokens, np.ndarray) else np.asarray(tokens)
    return to_device(np.asarray(arr[starts[:, None] + np.arange(context_length + 1)]), device)
