"""The tokens stage: corpus documents -> ``train_00000.bin ...`` and ``val_00000.bin ...`` shards.

Documents are read in order, grouped into batches, encoded on ``num_workers`` processes and written
back **in input order** (results are collected first-in, first-out with a bounded number of batches
in flight, so memory stays flat and the output is byte-identical whatever the number of workers).
Each document is followed by the tokenizer's end-of-text token, the boundary the model learns to
predict and the loader's ``doc_aligned`` mode keys on.
"""

from __future__ import annotations

import collections
import inspect
import logging
import multiprocessing as mp
import os
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kiln.artifacts import StageRun
from kiln.data.readers import artifact_files, file_kind, is_artifact, read_documents
from kiln.shards.format import ShardWriter, dtype_for_vocab

log = logging.getLogger(__name__)

SPLITS = ("train", "val")
BATCH_DOCS = 256
BATCH_BYTES = 1 << 20  # 1 MB of text per task: large enough to amortize IPC, small enough to balance


@dataclass(frozen=True)
class TokenizeConfig:
    """How to turn a corpus into token shards."""

    corpus: str = ""
    """Document artifact folder (``kiln data run`` or the corpus stage: ``train_XXXXX.jsonl.zst``...,
    found through its manifest; older corpus artifacts' ``train.jsonl``/``val.jsonl``), or a folder of
    ``train*``/``val*`` files of any format ``read_documents`` takes. Ignored for a split given below."""
    tokenizer: str = ""
    """Tokenizer file (``tokenizer.json``) or tokenizer artifact folder."""
    train: tuple[str, ...] = ()
    """Explicit sources for the train split (files, folders, globs, URLs, hf://), instead of ``corpus``;
    a document artifact folder gives its train files (through its manifest)."""
    val: tuple[str, ...] = ()
    """Explicit sources for the val split, instead of ``corpus``."""
    text_key: str = "text"
    """Field holding the text in JSON/Parquet/HF records."""
    shard_tokens: int = 100_000_000
    """Tokens per shard file (200 MB as uint16); the last shard of a split is shorter."""
    num_workers: int = 0
    """Encoding processes; 0 means every core (``os.cpu_count()``). Output does not depend on it."""
    append_eot: bool = True
    """Follow every document with the end-of-text token (the shard contract; turn off only for
    tokenizers without one)."""

    def __post_init__(self) -> None:
        if not self.corpus and not self.train:
            raise ValueError("TokenizeConfig needs corpus=<corpus artifact dir> or train=(sources...)")
        if self.shard_tokens <= 0:
            raise ValueError(f"shard_tokens={self.shard_tokens} must be positive (e.g. 100_000_000)")
        if self.num_workers < 0:
            raise ValueError(f"num_workers={self.num_workers} must be >= 0 (0 = all cores)")


def split_sources(cfg: TokenizeConfig) -> dict[str, list[str]]:
    """The sources of each split: explicit ``cfg.train``/``cfg.val``, else found in ``cfg.corpus``."""
    out: dict[str, list[str]] = {}
    for split in SPLITS:
        explicit = getattr(cfg, split)
        if explicit:
            out[split] = list(explicit)
            continue
        if not cfg.corpus:
            out[split] = []
            continue
        d = Path(cfg.corpus)
        if not d.is_dir():
            raise FileNotFoundError(f"corpus folder {d} does not exist; run prepare_corpus / `kiln demo` first")
        exact = d / f"{split}.jsonl"
        if is_artifact(d):  # a Kiln document artifact: its files as its manifest lists them
            out[split] = [str(p) for p in artifact_files(d, split)]
        elif exact.is_file():
            out[split] = [str(exact)]
        elif (d / split).is_dir():
            out[split] = [str(d / split)]
        else:
            found = sorted(
                p for p in d.iterdir()
                if p.is_file() and p.name.startswith((f"{split}_", f"{split}-", f"{split}."))
                and file_kind(p.name) is not None
            )
            out[split] = [str(p) for p in found]
    if not out["train"]:
        raise FileNotFoundError(
            f"no train documents in {cfg.corpus!r}: expected train.jsonl, a train/ folder or train_* files; "
            "build one with prepare_corpus or pass train=(sources...)"
        )
    return out


def load_tokenizer(path: str | os.PathLike) -> Any:
    """``kiln.tokenizer.load_tokenizer(path)``, with a clear error when it is missing."""
    if not path:
        raise ValueError("no tokenizer given; pass the tokenizer.json or tokenizer artifact folder")
    if not Path(path).exists():
        raise FileNotFoundError(f"tokenizer {path} does not exist; train one with `kiln tokenizer train`")
    from kiln.tokenizer import load_tokenizer as load

    return load(path)


class _Encoder:
    """Encodes a batch of texts to one flat token array plus per-document lengths (picklable)."""

    def __init__(self, tokenizer: Any, eot_id: int | None, dtype: np.dtype) -> None:
        self.tokenizer = tokenizer
        self.eot_id = eot_id
        self.dtype = dtype
        enc = getattr(tokenizer, "encode_batch", None)
        # Parallelism comes from processes here: a threaded encode_batch (Kiln's C core) gets one
        # thread per process, or workers x cores threads would fight over the cores.
        self._one_thread = enc is not None and "num_threads" in inspect.signature(enc).parameters

    def __call__(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
        """(tokens (sum of lengths,), lengths (len(texts),), UTF-8 bytes of the texts)."""
        enc = getattr(self.tokenizer, "encode_batch", None)
        if enc is None:
            ids = [self.tokenizer.encode(t) for t in texts]
        else:
            ids = enc(texts, num_threads=1) if self._one_thread else enc(texts)
        flat: list[int] = []
        lengths = np.empty(len(ids), dtype=np.int64)
        for i, x in enumerate(ids):  # list.extend, then one conversion: ~4x faster than per-doc arrays
            flat.extend(x)
            if self.eot_id is not None:
                flat.append(self.eot_id)
            lengths[i] = len(x) + (self.eot_id is not None)
        nbytes = sum(len(t.encode("utf-8")) for t in texts)
        return np.array(flat, dtype=self.dtype), lengths, nbytes


_worker_encoder: _Encoder | None = None  # set once per worker process by _init_worker


def _init_worker(tokenizer_or_path: Any, eot_id: int | None, dtype: np.dtype) -> None:
    global _worker_encoder
    # A forked worker inherits the parent's Python signal handlers: under a handler that only sets a
    # flag (a training run's pause on SIGTERM, a server's graceful shutdown), Pool.terminate()'s
    # SIGTERM would not end the worker and the pool's join would wait forever (seen in a full test run).
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C goes to the parent, which stops the pool
    tok = load_tokenizer(tokenizer_or_path) if isinstance(tokenizer_or_path, (str, os.PathLike)) else tokenizer_or_path
    _worker_encoder = _Encoder(tok, eot_id, dtype)


def _encode_in_worker(texts: list[str]) -> tuple[np.ndarray, np.ndarray, int]:
    assert _worker_encoder is not None
    return _worker_encoder(texts)


def _batches(
    sources: list[str], text_key: str, errors: collections.Counter, split: str = "train"
) -> Iterator[list[str]]:
    """Texts in batches; a document artifact among ``sources`` gives its ``split`` files."""
    batch: list[str] = []
    size = 0
    for doc in read_documents(sources, text_key=text_key, errors=errors, split=split):
        batch.append(doc.text)
        size += len(doc.text)
        if len(batch) >= BATCH_DOCS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encoded(
    batches: Iterator[list[str]], encoder: _Encoder, pool: Any, in_flight: int
) -> Iterator[tuple[np.ndarray, np.ndarray, int]]:
    """Encoded batches in input order; at most ``in_flight`` batches queued on the pool."""
    if pool is None:
        for b in batches:
            yield encoder(b)
        return
    pending: collections.deque = collections.deque()
    for b in batches:
        pending.append(pool.apply_async(_encode_in_worker, (b,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def _source_bytes(sources: list[str]) -> int | None:
    """Bytes on disk of local, uncompressed sources (the progress bar's total), else None."""
    total = 0
    for s in sources:
        p = Path(s)
        if p.name.lower().endswith((".gz", ".tgz", ".zst", ".zstd", ".parquet")):
            return None
        if p.is_file():
            total += p.stat().st_size
        elif p.is_dir():
            total += sum(q.stat().st_size for q in p.rglob("*") if q.is_file())
        else:
            return None
    return total


def tokenize_corpus(
    cfg: TokenizeConfig,
    out_dir: str | os.PathLike,
    force: bool = False,
    *,
    tokenizer: Any | None = None,
    progress: bool = True,
) -> Path:
    """Tokenize each split into shards in ``out_dir`` (stage ``"tokens"``); reused when unchanged.

    Args:
        cfg: the config; ``cfg.tokenizer`` is loaded with ``kiln.tokenizer.load_tokenizer`` unless ``tokenizer`` is given.
        out_dir: the artifact folder (``train_00000.bin``..., ``val_00000.bin``..., ``manifest.json``).
        force: recompute even if a matching artifact exists.
        tokenizer: an already-loaded tokenizer object (``encode``, ``eot_id``, ``vocab_size``), e.g.
            in tests; with ``num_workers`` > 1 it must be picklable where there is no fork.
        progress: show a tqdm bar per split (documents, MB/s, ETA).

    Returns ``out_dir``. Manifest stats: per split tokens, docs, bytes, shards, bytes_per_token; and
    the totals, tokens/s and read errors by reason.
    """
    out = Path(out_dir)
    sources = split_sources(cfg)
    inputs: list[str] = [cfg.tokenizer] if cfg.tokenizer else []
    if cfg.corpus and not (cfg.train and cfg.val):
        inputs.append(cfg.corpus)
    for s in [*cfg.train, *cfg.val]:
        if not s.startswith(("http://", "https://", "hf://")) and Path(s).exists():
            inputs.append(s)
    with StageRun(out, "tokens", cfg, inputs=inputs, force=force) as run:
        if run.reused:
            log.info("tokens: reusing %s", out)
            return out
        tok = tokenizer if tokenizer is not None else load_tokenizer(cfg.tokenizer)
        vocab_size = int(tok.vocab_size)
        eot_id = getattr(tok, "eot_id", None) if cfg.append_eot else None
        if cfg.append_eot and eot_id is None:
            raise ValueError(
                "the tokenizer has no <|endoftext|> token, which separates documents in the shards; "
                "train it with that special token, or set append_eot=False"
            )
        dtype = dtype_for_vocab(vocab_size)
        workers = cfg.num_workers or os.cpu_count() or 1
        encoder = _Encoder(tok, eot_id, dtype)
        errors: collections.Counter = collections.Counter()
        t0 = time.time()
        pool = None
        if workers > 1:
            # fork: workers inherit the loaded tokenizer (loading GPT-2's takes seconds) without
            # pickling it. Where there is no fork (macOS/Windows default spawn), each worker loads it.
            fork = "fork" in mp.get_all_start_methods()
            ctx = mp.get_context("fork") if fork else mp.get_context()
            init = tok if fork or tokenizer is not None else cfg.tokenizer
            pool = ctx.Pool(workers, initializer=_init_worker, initargs=(init, eot_id, dtype))
        try:
            for split in SPLITS:
                if not sources[split]:
                    continue
                run.stats[split] = _tokenize_split(
                    sources[split], split, cfg, run.tmp, vocab_size, encoder, pool, 2 * workers, errors, progress
                )
        finally:
            if pool is not None:
                pool.terminate()
                pool.join()
        seconds = time.time() - t0
        tokens = sum(run.stats[s]["tokens"] for s in SPLITS if s in run.stats)
        nbytes = sum(run.stats[s]["bytes"] for s in SPLITS if s in run.stats)
        run.stats.update(
            tokens=tokens, bytes=nbytes, bytes_per_token=round(nbytes / max(tokens, 1), 4),
            vocab_size=vocab_size, dtype=str(dtype), eot_id=eot_id, workers=workers,
            tokens_per_second=round(tokens / max(seconds, 1e-9)), errors=dict(errors),
        )
        log.info(
            "tokens: %d tokens (%.3f bytes/token) in %.1fs, %d workers, errors %s",
            tokens, nbytes / max(tokens, 1), seconds, workers, dict(errors) or 0,
        )
    return out


def _tokenize_split(
    sources: list[str], split: str, cfg: TokenizeConfig, out: Path, vocab_size: int,
    encoder: _Encoder, pool: Any, in_flight: int, errors: collections.Counter, progress: bool,
) -> dict[str, Any]:
    from tqdm.auto import tqdm

    total = _source_bytes(sources)
    bar = tqdm(
        total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=f"tokenize {split}",
        disable=not progress, mininterval=0.5,
    )
    nbytes = 0
    with ShardWriter(out, split, vocab_size, cfg.shard_tokens) as writer:
        for flat, lengths, b in _encoded(_batches(sources, cfg.text_key, errors, split), encoder, pool, in_flight):
            pos = 0
            for n in lengths.tolist():
                writer.add_document(flat[pos:pos + n])
                pos += n
            nbytes += b
            bar.update(b)
            bar.set_postfix(docs=writer.n_docs, tokens=writer.n_tokens, refresh=False)
    bar.total = bar.n  # the total was bytes on disk (an estimate); the bar ends at 100%
    bar.close()
    return {
        "tokens": writer.n_tokens, "docs": writer.n_docs, "bytes": nbytes, "shards": len(writer.paths),
        "bytes_per_token": round(nbytes / max(writer.n_tokens, 1), 4),
    }
