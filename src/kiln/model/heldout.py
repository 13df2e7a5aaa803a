"""Held-out loss and bits per byte of a language model over a 1-D token array.

The trainer's periodic validation and the demo's final number; here, below ``kiln.train`` and
``kiln.eval``, so both can call it (``kiln.eval.heldout`` keeps the old import path).

Bits per byte makes models with different tokenizers comparable: the total cross-entropy of the
targets in nats, divided by ``ln 2`` times the number of UTF-8 bytes those targets spell. Special
tokens (end-of-text) spell no bytes: their loss counts in the numerator but they add no bytes.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Sequence

import numpy as np
import torch

from kiln.model.loss import cross_entropy


@torch.no_grad()
def evaluate_heldout(
    model: torch.nn.Module,
    tokens_1d: np.ndarray | torch.Tensor | Sequence[int],
    token_bytes: Sequence[int] | np.ndarray | torch.Tensor | None,
    context_length: int,
    batch_size: int,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
    autocast_dtype: torch.dtype | None = None,
) -> dict[str, float | int | None]:
    """Mean loss (nats/token) and bits per byte over consecutive, non-overlapping windows.

    The array is cut into windows of ``context_length + 1`` tokens with stride ``context_length``
    (each token after the first is a target exactly once), taken in order, ``batch_size`` windows per
    forward pass, at most ``max_batches`` passes. Deterministic: the same model and data always give
    the same numbers. ``token_bytes[i]`` is the byte length of token ``i`` (0 for special tokens);
    ``None`` gives ``bpb=None``.

    Returns ``{"loss": float, "bpb": float | None, "tokens": int}`` (``tokens`` = targets scored).
    """
    if context_length < 1 or batch_size < 1:
        raise ValueError(f"context_length={context_length} and batch_size={batch_size} must be >= 1")
    if isinstance(tokens_1d, torch.Tensor):
        arr = tokens_1d.cpu().numpy()
    else:
        arr = tokens_1d if isinstance(tokens_1d, np.ndarray) else np.asarray(tokens_1d)
    n_windows = (len(arr) - 1) // context_length
    if n_windows < 1:
        raise ValueError(
            f"held-out set has {len(arr)} tokens, fewer than context_length + 1 = {context_length + 1}; "
            "use a longer validation split or a shorter context"
        )
    if max_batches is not None:
        n_windows = min(n_windows, max_batches * batch_size)
    if device is None:
        device = next(model.parameters()).device
    device = torch.device(device)
    tb = None
    if token_bytes is not None:
        tb = torch.as_tensor(np.asarray(token_bytes), dtype=torch.float64, device=device)  # (V,)
    amp = (
        torch.autocast(device.type, dtype=autocast_dtype)
        if autocast_dtype is not None
        else contextlib.nullcontext()
    )
    was_training = model.training
    model.eval()
    nats = torch.zeros((), dtype=torch.float64, device=device)
    nbytes = torch.zeros((), dtype=torch.float64, device=device)
    offsets = np.arange(context_length + 1)
    try:
        for start in range(0, n_windows, batch_size):
            idx = np.arange(start, min(start + batch_size, n_windows)) * context_length
            windows = np.asarray(arr[idx[:, None] + offsets]).astype(np.int64)  # (b, T+1)
            w = torch.from_numpy(windows).to(device)
            x, y = w[:, :-1], w[:, 1:]  # (b, T) each
            with amp:
                logits = model(x)  # (b, T, V)
            nats += cross_entropy(logits, y, reduction="sum").double()
            if tb is not None:
                nbytes += tb[y].sum()
    finally:
        model.train(was_training)
    n_tokens = n_windows * context_length
    total_nats = nats.item()  # the one host sync of the evaluation
    bpb = None
    if tb is not None:
        total_bytes = nbytes.item()
        bpb = total_nats / (math.log(2) * total_bytes) if total_bytes > 0 else None
    return {"loss": total_nats / n_tokens, "bpb": bpb, "tokens": n_tokens}
