"""Token shards -> (x, y) batches in epochs: ``ShardLoader``, ``kiln.shards.WindowSampler`` over a folder.

``TokenDataset`` reads shards back to back as one token stream (a window may cross a shard
boundary). ``ShardLoader`` cuts that stream into windows of ``seq_len + 1`` tokens and yields
``x = w[:-1]``, ``y = w[1:]`` as (B, T) int64 tensors.

Windows (each epoch covers every window once, then the next epoch begins):

- ``doc_aligned=False``: a grid with stride ``seq_len``, ``offset + k * seq_len``. With
  ``shuffle=True`` the offset is drawn per epoch (so epochs see different cuts) and the windows are
  permuted; with ``shuffle=False`` the offset is 0 and windows come in order (validation).
- ``doc_aligned=True``: every document start begins a window, and a document longer than
  ``seq_len`` continues in further windows at ``start + k * seq_len``; the last window of a document
  runs on into the next one (the end-of-text token separates them). Every sequence then begins at a
  document start or continues one, instead of most sequences opening mid-sentence (the packing of
  nanochat's BOS-aligned loader, without its cropping); the price is that a document's tail may be
  seen twice in an epoch, at most ``seq_len`` tokens per document.

Order depends only on ``seed`` and the epoch (``np.random.default_rng([seed, epoch])``), so the batch
at a given step is the same in every run; ``state_dict()`` is the (epoch, step) position and
``load_state_dict`` resumes exactly there. With ``world_size > 1`` each rank takes its own rows of
every global batch. On CUDA the batch is staged in pinned host memory and copied with
``non_blocking=True``, so the copy overlaps the previous step's compute.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.shards.format import Shard, read_shard
from kiln.shards.sampler import WindowSampler


def shard_paths(tokens_dir: str | os.PathLike, split: str = "train") -> list[Path]:
    """The ``{split}_XXXXX.bin`` shards of a tokens artifact folder, in order."""
    d = Path(tokens_dir)
    paths = sorted(d.glob(f"{split}_*.bin"))
    if not paths:
        raise FileNotFoundError(f"no {split}_*.bin shards in {d}; run `kiln tokenize` to write them")
    return paths


class TokenDataset:
    """Several shards as one token stream. ``len()`` is the total number of tokens.

    Attributes:
        shards: the opened shards (memory-mapped).
        offsets: (n_shards + 1,) int64, where each shard starts in the stream.
        doc_starts: (n_docs,) int64, document starts in stream positions.
        vocab_size: the shards' vocabulary size (all shards must agree).
    """

    def __init__(self, paths: Sequence[str | os.PathLike] | str | os.PathLike, split: str = "train") -> None:
        if isinstance(paths, (str, os.PathLike)):
            p = Path(paths)
            paths = shard_paths(p, split) if p.is_dir() else [p]
        if not paths:
            raise ValueError("TokenDataset needs at least one shard path")
        self.shards: list[Shard] = [read_shard(p) for p in paths]
        vocab = {s.vocab_size for s in self.shards}
        if len(vocab) != 1:
            raise ValueError(f"shards disagree on vocab_size ({sorted(vocab)}); they come from different tokenizers")
        self.vocab_size = vocab.pop()
        self.offsets = np.cumsum([0] + [len(s) for s in self.shards]).astype(np.int64)
        self.doc_starts = np.concatenate(
            [s.doc_starts + off for s, off in zip(self.shards, self.offsets[:-1])]
        ).astype(np.int64)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, start: int, stop: int) -> np.ndarray:
        """Tokens ``[start, stop)`` of the stream as int64, crossing shard boundaries as needed."""
        if not 0 <= start <= stop <= len(self):
            raise IndexError(f"range [{start}, {stop}) outside the {len(self)}-token dataset")
        i = int(np.searchsorted(self.offsets, start, side="right")) - 1
        parts = []
        while start < stop:
            lo = start - int(self.offsets[i])
            take = min(stop - start, len(self.shards[i]) - lo)
            parts.append(np.asarray(self.shards[i].tokens[lo:lo + take]))
            start += take
            i += 1
        if len(parts) == 1:
            return parts[0].astype(np.int64)
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


class ShardLoader(WindowSampler):
    """``WindowSampler`` in epoch (or sequential) order over a tokens folder: an infinite iterator of
    (x, y) batches, each (batch_size, seq_len) int64 (see the module doc).

    Args:
        data: a TokenDataset, a tokens artifact folder (with ``split``) or a list of shard paths.
        batch_size: rows per batch on this rank (B).
        seq_len: tokens per row (T); each window reads T + 1 tokens.
        split: which shards of a folder to read (``train`` or ``val``).
        shuffle: random windows (training) or in-order windows (validation).
        doc_aligned: start windows at document starts.
        seed: seeds window offsets and order.
        device: where batches go; on CUDA they pass through pinned memory, copied non-blocking.
        rank, world_size: this process's share of each global batch of B x world_size rows.
    """

    def __init__(
        self,
        data: TokenDataset | str | os.PathLike | Sequence[str | os.PathLike],
        batch_size: int,
        seq_len: int,
        *,
        split: str = "train",
        shuffle: bool = True,
        doc_aligned: bool = False,
        seed: int = 0,
        device: str | torch.device = "cpu",
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.data = data if isinstance(data, TokenDataset) else TokenDataset(data, split)
        if batch_size <= 0 or seq_len <= 0:
            raise ValueError(f"batch_size={batch_size} and seq_len={seq_len} must be positive")
        n = len(self.data)
        if n < seq_len + 1:
            raise ValueError(
                f"the shards hold {n} tokens, fewer than seq_len + 1 = {seq_len + 1}; lower seq_len or add data"
            )
        if doc_aligned and self.data.doc_starts.size == 0:
            raise ValueError("doc_aligned=True but the shards record no document starts; use doc_aligned=False")
        super().__init__([s.tokens for s in self.data.shards], seq_len, seed,
                         doc_starts=[s.doc_starts for s in self.data.shards], doc_aligned=doc_aligned,
                         batch_size=batch_size, rank=rank, world_size=world_size, device=device,
                         order="epoch" if shuffle else "sequential")
        self.seq_len, self.shuffle = seq_len, shuffle
        if self.steps_per_epoch == 0:
            raise ValueError(
                f"an epoch has {len(self.epoch_starts(0))} windows of {seq_len + 1} tokens, fewer than one global "
                f"batch of {batch_size} x {world_size}; lower batch_size or seq_len, or add data"
            )

    _epoch_starts = WindowSampler.epoch_starts  # the name before the move

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        """The next (x, y), each (B, T) int64 on ``device``; advances the position."""
        return super().next_batch()

    def _fingerprint(self) -> dict[str, Any]:
        return {
            "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
            "shuffle": self.shuffle, "doc_aligned": self.doc_aligned,
            "world_size": self.world_size, "n_tokens": len(self.data),
        }

    def state_dict(self) -> dict[str, Any]:
        """The position (epoch, step) plus what must match for an exact resume."""
        return {"epoch": self.epoch, "step": self.step, **self._fingerprint()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume at ``state``'s position; raises if the data or loader settings differ."""
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if k in state and state[k] != v}
        if diff:
            detail = ", ".join(f"{k}: saved {a} vs now {b}" for k, (a, b) in diff.items())
            raise ValueError(f"cannot resume the data loader exactly ({detail}); use the same data and settings")
        self._plan = None
        self.epoch, self.step = int(state["epoch"]), int(state["step"])
