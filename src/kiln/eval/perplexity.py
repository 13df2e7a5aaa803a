"""Held-out text: loss, perplexity and bits per byte, exact for documents longer than the context.

Each document is scored on its own, starting after an end-of-text token (so its first token is
predicted too, as it was in training where documents follow an end-of-text). A document longer than
the context is scored with sliding windows: the first window scores its ``T`` targets, each later
window moves ``stride`` tokens and scores only its last ``stride`` targets, so every token is scored
exactly once and with at least ``T - stride`` tokens of context (Hugging Face's "perplexity of
fixed-length models"; ``stride = T`` is the cheap, pessimistic non-overlapping variant). When a
document fits the context the result equals one full-context forward pass.

Bits per byte divides the summed loss (nats -> bits) by the UTF-8 bytes the scored tokens decode to,
which makes models with different tokenizers comparable; special tokens (0 bytes) are left out of
bits per byte but kept in the token-level loss.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kiln.eval.lm import Row, context_length, score_rows


@dataclass
class TextLoss:
    """Held-out text scores: ``loss`` in nats per token, ``bits_per_byte`` over non-special tokens."""

    loss: float
    perplexity: float
    bits_per_byte: float
    tokens: int
    bytes: int
    documents: int
    windows: int

    def to_dict(self) -> dict[str, float | int]:
        """JSON-able copy."""
        return dict(self.__dict__)


def windows(doc_len: int, T: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """Sliding windows over a sequence of ``doc_len + 1`` tokens (a leading end-of-text, then the doc).

    Yields ``(begin, end, first_scored)``: the window's inputs are ``seq[begin:end]``, its targets
    ``seq[begin+1:end+1]``, and targets at sequence index ``> first_scored`` are scored, which are the
    positions ``first_scored - begin`` .. ``end - begin - 1`` of the window.
    """
    if not 0 < stride <= T:
        raise ValueError(f"stride={stride} must be in 1..context_length={T}")
    done = 0  # targets seq[1..done] are scored
    while done < doc_len:
        end = min(done + (T if done == 0 else stride), doc_len)
        begin = max(0, end - T)
        yield begin, end, done
        done = end


def text_loss(
    model: Any,
    docs: Iterable[Sequence[int]],
    token_bytes: Sequence[int],
    bos: int,
    stride: int | None = None,
    batch_size: int = 8,
    device: Any = None,
) -> TextLoss:
    """Loss, perplexity and bits per byte of ``model`` on tokenized documents.

    Args:
        docs: token lists, one per document (no leading end-of-text: ``bos`` is prepended).
        token_bytes: UTF-8 byte length of each token id (0 for special tokens), as
            ``Tokenizer.token_bytes()`` returns.
        bos: the id prepended to every document (the end-of-text id).
        stride: tokens each window advances; default half the context length.
    """
    T = context_length(model)
    stride = stride or max(1, T // 2)
    rows: list[Row] = []
    n_docs = 0
    for doc in docs:
        if len(doc) == 0:
            continue
        n_docs += 1
        seq = [bos, *doc]
        for begin, end, done in windows(len(doc), T, stride):
            rows.append(Row(tuple(seq[begin:end]),
                            tuple((p - begin, seq[p + 1]) for p in range(done, end))))
    if not rows:
        raise ValueError("no tokens to score: every document is empty")
    nll = nll_bytes = 0.0
    n_tok = n_bytes = 0
    for row, (lps, _) in zip(rows, score_rows(model, rows, batch_size=batch_size, device=device)):
        for (_, t), lp in zip(row.queries, lps):
            nll -= lp
            n_tok += 1
            b = token_bytes[t]
            if b > 0:
                nll_bytes -= lp
                n_bytes += b
    loss = nll / n_tok
    return TextLoss(loss, math.exp(loss), nll_bytes / (math.log(2) * max(n_bytes, 1)), n_tok, n_bytes,
                    n_docs, len(rows))


def read_texts(path: str | os.PathLike, text_key: str = "text") -> Iterator[str]:
    """Documents of a held-out source: a ``.txt`` file (the whole file), a ``.jsonl`` file (a row
    without ``text_key`` or with invalid JSON is an error naming the file and line), or anything the
    data stage's reader takes (``.jsonl.zst``, Parquet, globs, ``hf://``; a ``kiln data run`` or corpus
    artifact folder gives its val split, through its manifest)."""
    p = Path(path)
    if p.is_file() and p.suffix == ".jsonl":
        from kiln.eval.tasks import read_jsonl

        for i, obj in read_jsonl(p):
            if not isinstance(obj.get(text_key), str):
                raise ValueError(f"{p}:{i}: expected an object with a string {text_key!r} field")
            yield obj[text_key]
    elif p.is_file() and p.suffix in (".txt", ".md", ".text"):
        yield p.read_text(encoding="utf-8")
    else:
        from kiln.data.readers import read_texts as read_documents_text  # the one reading layer

        yield from read_documents_text([os.fspath(path)], split="val", text_key=text_key)


def shard_documents(path: str | os.PathLike) -> Iterator[list[int]]:
    """Documents of a Kiln token shard, each without its trailing end-of-text token."""
    from kiln.shards import read_shard  # lazy: evaluation of plain text does not need shards

    shard = read_shard(path)
    starts = [int(s) for s in shard.doc_starts] + [len(shard.tokens)]
    for a, b in zip(starts[:-1], starts[1:]):
        doc = shard.tokens[a:b].tolist()
        yield doc[:-1] if doc else doc  # documents end with end-of-text; it is bos of the next


def evaluate_text(
    model: Any,
    tokenizer: Any,
    paths: Sequence[str | os.PathLike],
    stride: int | None = None,
    batch_size: int = 8,
    max_documents: int | None = None,
    device: Any = None,
) -> TextLoss:
    """Held-out scores on text/jsonl files or token shards (``.bin``), documents scored separately."""
    bos = getattr(tokenizer, "eot_id", None)
    if bos is None:
        raise ValueError("held-out evaluation needs a tokenizer with an end-of-text token (eot_id)")

    def docs() -> Iterator[list[int]]:
        n = 0
        for path in paths:
            it = (shard_documents(path) if str(path).endswith(".bin")
                  else (tokenizer.encode(t) for t in read_texts(path)))
            for d in it:
                if max_documents is not None and n >= max_documents:
                    return
                n += 1
                yield d

    return text_loss(model, docs(), tokenizer.token_bytes(), bos, stride, batch_size, device)
