"""``KVCache``: preallocated keys and values of every layer, for prefill-then-decode generation."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated pair of tensors per layer.

    ``k[i]``, ``v[i]``: (B, n_kv_heads, max_seq_len, head_dim). ``length`` tokens are filled, the
    same number for every row of the batch. A forward pass writes its T new tokens' keys/values at
    ``[length, length + T)`` in every layer (``update``) and then advances ``length`` by T once
    (``Transformer.forward`` calls ``advance``).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k: list[Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v: list[Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.length = 0

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        batch_size: int = 1,
        max_seq_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache shaped for ``model`` (a ``Transformer``); device and dtype default to its weights'."""
        cfg = model.config
        p = next(model.parameters())
        max_seq_len = cfg.context_length if max_seq_len is None else max_seq_len
        if max_seq_len > cfg.context_length:
            raise ValueError(
                f"KVCache max_seq_len={max_seq_len} exceeds the model's context_length={cfg.context_length}"
            )
        return cls(
            cfg.n_layers, batch_size, cfg.n_kv_heads, max_seq_len, cfg.head_dim,
            device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype,
        )

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store k_new, v_new: (B, n_kv_heads, T, head_dim) at ``[length, length+T)`` of ``layer``.

        Returns the keys and values of all tokens so far: (B, n_kv_heads, length + T, head_dim).
        """
        B, _, T, _ = k_new.shape
        end = self.length + T
        if end > self.max_seq_len:
            raise ValueError(
                f"KVCache is full: {self.length} cached + {T} new tokens > max_seq_len={self.max_seq_len}; "
                "reset() it or build a longer cache"
            )
        if B != self.batch_size:
            raise ValueError(f"KVCache holds batch size {self.batch_size}, got a batch of {B}")
        self.k[layer][:, :, self.length:end] = k_new
        self.v[layer][:, :, self.length:end] = v_new
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Mark ``n_tokens`` more positions as filled (after every layer has called ``update``)."""
        self.length += n_tokens

    def reset(self) -> None:
        """Forget every cached token (the buffers are reused)."""
        self.length = 0

    def select(self, rows: Tensor, start: int = 0) -> None:
        """Keep only batch rows ``rows`` (long, (B',)) and drop the first ``start`` cached slots.

        Used by batched decoding: finished rows leave the batch, and slots that are padding in every
        remaining row are trimmed. The buffers keep their ``max_seq_len``; ``length`` drops by ``start``.
        """
        if not 0 <= start <= self.length:
            raise ValueError(f"start={start} must be in [0, length={self.length}]")
        n = self.length - start
        for store in (self.k, self.v):
            for i, buf in enumerate(store):
                new = buf.new_zeros((len(rows), *buf.shape[1:]))  # (B', Hkv, max_seq_len, D)
                new[:, :, :n] = buf[rows, :, start:self.length]
                store[i] = new
        self.batch_size = len(rows)
        self.length = n
