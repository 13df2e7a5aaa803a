"""Sequence packing with a document-aware causal mask, and the padded (unpacked) layout.

Packing puts several conversations in one row of ``T`` tokens, so no compute goes to padding. Two
things keep a packed example's numbers what they are alone (tested: same loss packed or not):

- attention is block-diagonal causal: a query sees keys of its own document only
  (``document_attention`` puts ``DocumentAttention`` in place of every layer's kernel);
- RoPE positions restart at 0 at each document (the ``positions`` row, passed as
  ``token_positions``).

A row is ``(ids, labels, loss mask, positions, doc ids)``, each (T,); labels are the ids shifted
by one inside a document, and the mask is 0 where the next token belongs to the next document or
is padding.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.model.attention import attention_swapped
from kiln.model.layers import scaled_dot_product_attention

Example = tuple[Sequence[int], Sequence[int]]
"""(ids, mask): a rendered conversation and its loss mask (1 where the token is learned)."""


def pack(examples: Sequence[Example], seq_len: int) -> list[list[int]]:
    """Group example indices into rows of at most ``seq_len + 1`` tokens, in order (next-fit).

    ``+ 1``: a row of T inputs needs T + 1 tokens for its labels; a document's last token has no
    next-token label inside the document, so an example of n tokens fills n row slots and yields
    n - 1 predictions. Order is kept so a seeded shuffle before packing fully decides the batches.
    """
    rows: list[list[int]] = []
    used = seq_len + 1
    for i, (ids, _) in enumerate(examples):
        n = len(ids)
        if n > seq_len + 1:
            raise ValueError(f"example {i} has {n} tokens > seq_len + 1 = {seq_len + 1}; drop it before packing")
        if used + n > seq_len + 1:
            rows.append([])
            used = 0
        rows[-1].append(i)
        used += n
    return rows


def build_row(examples: Sequence[Example], seq_len: int, pad_id: int = 0) -> tuple[Tensor, ...]:
    """One row (T = ``seq_len``) from examples that fit: ids, labels, mask, positions, doc ids.

    Position t predicts token t + 1 of the same document; the mask is the example's mask on that
    next token (so a learned token is learned from its own document's prefix only).
    """
    T = seq_len
    ids = torch.full((T + 1,), pad_id, dtype=torch.long)
    learn = torch.zeros(T + 1, dtype=torch.bool)
    doc = torch.full((T + 1,), -1, dtype=torch.long)  # -1: padding
    pos = torch.zeros(T + 1, dtype=torch.long)
    at = 0
    for d, (e_ids, e_mask) in enumerate(examples):
        n = len(e_ids)
        ids[at : at + n] = torch.as_tensor(list(e_ids), dtype=torch.long)
        learn[at : at + n] = torch.as_tensor(list(e_mask), dtype=torch.bool)
        doc[at : at + n] = d
        pos[at : at + n] = torch.arange(n)
        at += n
    same_doc = (doc[1:] == doc[:-1]) & (doc[1:] >= 0)  # (T,): the label is in the input's document
    mask = learn[1:] & same_doc
    padded_doc = doc[:-1].clone()
    padded_doc[padded_doc < 0] = len(examples)  # padding: its own block, never attended by real tokens
    return ids[:-1], ids[1:].clone(), mask, pos[:-1], padded_doc


class DocumentAttention:
    """Block-diagonal causal attention over a (B, T) doc-id tensor (a Kiln ``AttentionFn``)."""

    def __init__(self, doc_ids: Tensor) -> None:
        self.doc_ids = doc_ids  # (B, T)

    def mask(self, T: int) -> Tensor:
        """(B, 1, T, T) bool: causal and same document."""
        d = self.doc_ids
        causal = torch.ones(T, T, dtype=torch.bool, device=d.device).tril()
        return (d[:, :, None] == d[:, None, :]) & causal  # (B, T, T)

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, q_offset: int = 0) -> Tensor:
        if q_offset != 0 or q.shape[2] != k.shape[2]:
            raise ValueError("DocumentAttention is for training-shaped calls (no KV cache)")
        B, H, T, D = q.shape
        G = H // k.shape[1]
        if G > 1:  # grouped-query attention: each key/value head serves G query heads
            k, v = k.repeat_interleave(G, dim=1), v.repeat_interleave(G, dim=1)
        m = self.mask(T)[:, None]  # (B, 1, T, T)
        if q.is_cuda:  # torch's fused kernel takes an arbitrary mask (memory-efficient backend)
            return F.scaled_dot_product_attention(q, k, v, attn_mask=m)
        return scaled_dot_product_attention(q, k, v, m)


@contextmanager
def document_attention(model: Any, doc_ids: Tensor) -> Iterator[DocumentAttention]:
    """Within the block, every attention layer of ``model`` (a Kiln ``Transformer``) masks across
    documents of ``doc_ids`` (B, T); the layers' own kernels are put back on exit."""
    fn = DocumentAttention(doc_ids)
    with attention_swapped(model, fn):
        yield fn


def build_padded(example: Example, seq_len: int, pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """The unpacked layout of one example: ids, labels, mask, each (T,), right-padded."""
    ids, labels, mask, _, _ = build_row([example], seq_len, pad_id)
    return ids, labels, mask
