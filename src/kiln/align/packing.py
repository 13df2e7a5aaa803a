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
    return tuple(t[0] for t in build_rows([examples], seq_len, pad_id))


def build_rows(rows: Sequence[Sequence[Example]], seq_len: int, pad_id: int = 0) -> tuple[Tensor, ...]:
    """``build_row`` of every row at once: ids, labels, mask, positions, doc ids, each (B, T)."""
    flat = [e for r in rows for e in r]
    index, at = [], 0
    for r in rows:
        index.append(list(range(at, at + len(r))))
        at += len(r)
    return ExampleStore(flat).rows(index, seq_len, pad_id)


class ExampleStore:
    """Examples as one flat token tensor and one flat mask tensor with offsets, so a batch of rows
    is a few tensor ops whatever its number of examples.

    The host builds the next batch while the GPU runs the current step; built example by example
    (a tensor per example, ops per row) it took ~7 ms for 16 rows of 512 tokens on this machine's
    CPU, as long as a small model's step on an H100, so the GPU waited on it (docs/LOG.md, 2026-12-07).
    """

    def __init__(self, examples: Sequence[Example]) -> None:
        self.lens = torch.tensor([len(ids) for ids, _ in examples], dtype=torch.long)  # (N,)
        self.starts = torch.cumsum(self.lens, 0) - self.lens  # (N,) first token of each example
        self.ids = torch.tensor([t for ids, _ in examples for t in ids], dtype=torch.long)  # (sum lens,)
        self.mask = torch.tensor([bool(m) for _, mask in examples for m in mask], dtype=torch.bool)

    def rows(self, rows: Sequence[Sequence[int]], seq_len: int, pad_id: int = 0) -> tuple[Tensor, ...]:
        """Rows of the examples at ``rows`` (lists of indices, each fitting ``seq_len + 1`` tokens):
        ids, labels, mask, positions, doc ids, each (B, T = ``seq_len``), as ``build_row`` defines them."""
        B, W = len(rows), seq_len + 1
        idx = torch.tensor([i for r in rows for i in r], dtype=torch.long)  # (n_docs,)
        per_row = torch.tensor([len(r) for r in rows], dtype=torch.long)  # (B,)
        lens = self.lens[idx]
        row_of = torch.repeat_interleave(torch.arange(B), per_row)  # (n_docs,)
        ends = torch.cumsum(lens, 0)
        row_tokens = torch.zeros(B, dtype=torch.long).index_add_(0, row_of, lens)  # (B,)
        if bool((row_tokens > W).any()):
            raise ValueError(f"a row holds more than seq_len + 1 = {W} tokens; pack the examples first")
        row_base = torch.cumsum(row_tokens, 0) - row_tokens  # (B,) first flat token of each row
        doc_start = ends - lens - row_base[row_of]  # (n_docs,) first slot of each document in its row
        first_doc = torch.cumsum(per_row, 0) - per_row  # (B,) flat index of each row's first document
        doc_in_row = torch.arange(len(idx)) - first_doc[row_of]  # (n_docs,)
        n = int(ends[-1]) if len(idx) else 0
        pos_tok = torch.arange(n) - torch.repeat_interleave(ends - lens, lens)  # (n,) position in its document
        slot = torch.repeat_interleave(row_of * W + doc_start, lens) + pos_tok  # (n,) where each token goes
        src = torch.repeat_interleave(self.starts[idx], lens) + pos_tok  # (n,) where it comes from
        ids = torch.full((B * W,), pad_id, dtype=torch.long)
        learn = torch.zeros(B * W, dtype=torch.bool)
        doc = torch.full((B * W,), -1, dtype=torch.long)  # -1: padding
        pos = torch.zeros(B * W, dtype=torch.long)
        ids[slot], learn[slot] = self.ids[src], self.mask[src]
        doc[slot], pos[slot] = torch.repeat_interleave(doc_in_row, lens), pos_tok
        ids, learn, doc, pos = ids.view(B, W), learn.view(B, W), doc.view(B, W), pos.view(B, W)
        same_doc = (doc[:, 1:] == doc[:, :-1]) & (doc[:, 1:] >= 0)  # (B, T): the label is in the input's document
        mask = learn[:, 1:] & same_doc
        # padding gets its own block (id = the row's document count), never attended by real tokens
        padded_doc = torch.where(doc[:, :-1] < 0, per_row[:, None], doc[:, :-1])
        return ids[:, :-1], ids[:, 1:].clone(), mask, pos[:, :-1], padded_doc


class DocumentAttention:
    """Block-diagonal causal attention over a (B, T) doc-id tensor (a Kiln ``AttentionFn``)."""

    def __init__(self, doc_ids: Tensor) -> None:
        self.doc_ids = doc_ids  # (B, T)
        self._mask: dict[int, Tensor] = {}  # built once per forward, shared by every layer

    def mask(self, T: int) -> Tensor:
        """(B, T, T) bool: causal and same document."""
        if T not in self._mask:
            d = self.doc_ids
            causal = torch.ones(T, T, dtype=torch.bool, device=d.device).tril()
            self._mask[T] = (d[:, :, None] == d[:, None, :]) & causal  # (B, T, T)
        return self._mask[T]

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
