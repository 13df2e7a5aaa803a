"""Rank-disjoint, deterministic, resumable batches of windows over one token array."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from kiln.distributed.env import DistEnv


class DistributedWindowSampler:
    """Each global step, ``batch_size x world_size`` distinct windows; rank r takes its own slice.

    The token array is cut into non-overlapping windows of ``context_length + 1`` tokens (inputs and
    next-token targets overlap by one token), starting at multiples of ``context_length``. Each epoch
    visits every window once, in an order drawn from ``(seed, epoch)`` alone, so every rank computes
    the same permutation without communicating and no two ranks ever read the same window in a step.

    The position is counted in windows consumed *globally*, so a run saved on 2 ranks resumes on 1
    or 4 ranks at the same point of the same permutation (the next global batch is simply cut
    differently).

    Args:
        n_tokens: length of the token array.
        context_length: tokens per input sequence T.
        batch_size: sequences per rank per step B.
        env: gives rank and world size.
        seed: fixes the order of windows for every epoch.
    """

    def __init__(self, n_tokens: int, context_length: int, batch_size: int, env: DistEnv, seed: int = 0) -> None:
        if context_length < 1 or batch_size < 1:
            raise ValueError(f"context_length {context_length} and batch_size {batch_size} must be >= 1")
        self.n_windows = (n_tokens - 1) // context_length
        self.global_batch = batch_size * env.world_size
        if self.n_windows < self.global_batch:
            raise ValueError(
                f"{n_tokens} tokens give {self.n_windows} windows of {context_length + 1} tokens, fewer than one "
                f"global batch of {batch_size} x {env.world_size} ranks; lower the batch or context, or add data"
            )
        self.context_length = context_length
        self.batch_size = batch_size
        self.rank = env.rank
        self.seed = seed
        self.epoch = 0
        self.consumed = 0  # windows consumed globally in this epoch
        self._perm: np.ndarray | None = None
        self._perm_epoch = -1

    def _permutation(self) -> np.ndarray:
        if self._perm_epoch != self.epoch:
            rng = np.random.default_rng([self.seed, self.epoch])
            self._perm = rng.permutation(self.n_windows)
            self._perm_epoch = self.epoch
        assert self._perm is not None
        return self._perm

    def next_starts(self) -> np.ndarray:
        """Start offsets (B,) of this rank's windows for the next step; advances the position.

        The tail of an epoch smaller than a global batch is dropped, then a new epoch begins.
        """
        if self.consumed + self.global_batch > self.n_windows:
            self.epoch += 1
            self.consumed = 0
        perm = self._permutation()
        lo = self.consumed + self.rank * self.batch_size
        idx = perm[lo : lo + self.batch_size]
        self.consumed += self.global_batch
        return idx.astype(np.int64) * self.context_length

    def next_batch(self, tokens: np.ndarray, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets, each (B, T) int64 on ``device``, for this rank's next step."""
        T = self.context_length
        starts = self.next_starts()
        rows = np.stack([np.asarray(tokens[s : s + T + 1], dtype=np.int64) for s in starts])  # (B, T+1)
        xy = torch.from_numpy(rows)
        return xy[:, :-1].to(device), xy[:, 1:].to(device)

    def __iter__(self) -> Iterator[np.ndarray]:
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
                f"{self.n_windows} of context {self.context_length}; resume with the same tokens and context length"
            )
        self.seed, self.epoch, self.consumed = sd["seed"], sd["epoch"], sd["consumed"]
