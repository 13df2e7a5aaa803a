"""A budget of tokens to carry: the first documents of a shard folder, cut to a token count.

``subset_shards`` writes ``train_00000.bin`` (whole documents from the start of the source's
training shards, up to ``train_tokens``), ``val_00000.bin`` (the same from its held-out shards) and
a copy of the tokenizer, so a GPU machine gets a few MiB instead of the corpus (docs/scaling.md).
"""

from __future__ import annotations

import itertools
import os
import shutil
from pathlib import Path

import numpy as np

from kiln.artifacts import StageRun


def _take(paths: list[Path], budget: int) -> tuple[np.ndarray, np.ndarray, int]:
    """Whole documents from ``paths`` in order until ``budget`` tokens: (tokens, doc_starts, vocab)."""
    from kiln.shards import read_shard

    parts, starts, n, vocab = [], [], 0, 0
    for p in paths:
        s = read_shard(p)
        vocab = max(vocab, s.vocab_size)
        bounds = list(s.doc_starts) + [len(s)]
        for a, b in itertools.pairwise(bounds):
            take = min(int(b - a), budget - n)
            if take <= 0:
                break
            starts.append(n)
            parts.append(np.asarray(s.tokens[a:a + take]))
            n += take
        if n >= budget:
            break
    if not parts:
        raise ValueError(f"no documents in {[os.fspath(p) for p in paths]}")
    return np.concatenate(parts), np.asarray(starts, dtype=np.int64), vocab


def subset_shards(src: str | os.PathLike, out: str | os.PathLike, train_tokens: int, val_tokens: int,
                  tokenizer: str | os.PathLike | None = None) -> Path:
    """The first ``train_tokens`` / ``val_tokens`` tokens (whole documents, the last one cut) of
    ``src``'s train and val shards into the artifact folder ``out`` (manifest last)."""
    from kiln.shards import write_shard

    src = Path(src)
    train = sorted(src.glob("train_*.bin"))
    val = sorted(src.glob("val_*.bin"))
    if not train or not val:
        raise FileNotFoundError(f"{src} needs train_*.bin and val_*.bin shards (kiln tokenize with a validation split)")
    tok = Path(tokenizer) if tokenizer else None
    if tok is None:
        from kiln.train.trainer import _find_tokenizer

        found = _find_tokenizer(src)
        tok = (found / "tokenizer.json" if found and found.is_dir() else found) if found else None
    cfg = {"train_tokens": train_tokens, "val_tokens": val_tokens}
    with StageRun(out, "tokens_subset", cfg, inputs=[src]) as run:
        if run.reused:
            return Path(out)
        stats = {}
        for name, paths, budget in (("train", train, train_tokens), ("val", val, val_tokens)):
            toks, starts, vocab = _take(paths, budget)
            write_shard(run.tmp / f"{name}_00000.bin", toks, starts, vocab)
            stats[name] = {"tokens": len(toks), "docs": len(starts), "mib": round(len(toks) * toks.itemsize / 2**20, 2)}
        if tok is not None and tok.is_file():
            shutil.copy(tok, run.tmp / "tokenizer.json")
        run.stats = stats
    return Path(out)
