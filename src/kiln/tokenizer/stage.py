"""The ``tokenizer`` stage: train a BPE tokenizer and write ``tokenizer.json`` as an artifact."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from kiln.artifacts import StageRun
from kiln.tokenizer.pretokenize import ENDOFTEXT, PATTERNS, check_special_tokens
from kiln.tokenizer.tokenizer import TOKENIZER_FILE, Tokenizer
from kiln.tokenizer.train import iter_corpus_bytes, train_bpe

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerTrainConfig:
    """Configuration of the ``tokenizer`` stage."""

    inputs: tuple[str, ...] = ()
    """Training text: ``.txt`` files, ``.jsonl`` files (field "text"), or corpus artifact dirs (their train.jsonl)."""
    vocab_size: int = 8192
    """Final vocabulary size: 256 bytes + merges + special tokens."""
    special_tokens: tuple[str, ...] = (ENDOFTEXT,)
    """Special tokens, never merged across; they get the last ids."""
    pattern: str = "gpt2"
    """Pre-tokenization split pattern: a name (gpt2, cl100k, gpt2_digits) or a regex."""
    max_doc_chars: int | None = None
    """Truncate each JSON-lines document to this many characters (None: no cap)."""
    max_bytes: int | None = None
    """Train on about the first this-many bytes of input only (None: all of it)."""
    heldout: tuple[str, ...] = ()
    """Held-out files for the bytes/token statistic; default: val.jsonl of a corpus artifact input."""
    heldout_max_bytes: int = 4_000_000
    """Bytes of held-out text to encode for the statistic."""
    workers: int = 0
    """Processes/threads for pre-tokenization (0: all cores)."""
    backend: str = "auto"
    """auto (the C core when built), native, or python (the pure-Python reference)."""

    def __post_init__(self) -> None:
        if isinstance(self.inputs, (str, os.PathLike)):
            object.__setattr__(self, "inputs", (os.fspath(self.inputs),))
        object.__setattr__(self, "inputs", tuple(os.fspath(p) for p in self.inputs))
        object.__setattr__(self, "heldout", tuple(os.fspath(p) for p in self.heldout))
        specials = check_special_tokens(self.special_tokens)
        object.__setattr__(self, "special_tokens", tuple(specials))
        if self.vocab_size < 256 + len(specials):
            raise ValueError(f"vocab_size {self.vocab_size} < 256 bytes + {len(specials)} special tokens; raise --vocab-size")
        if self.backend not in ("auto", "native", "python"):
            raise ValueError(f"backend {self.backend!r} is not one of auto, native, python")
        if self.max_doc_chars is not None and self.max_doc_chars <= 0:
            raise ValueError(f"max_doc_chars {self.max_doc_chars} must be positive (or None for no cap)")
        if self.pattern not in PATTERNS and not any(c in self.pattern for c in "\\[|("):
            raise ValueError(f"pattern {self.pattern!r} is not one of {sorted(PATTERNS)} (or a regex)")


def _heldout_paths(cfg: TokenizerTrainConfig) -> list[Path]:
    if cfg.heldout:
        return [Path(p) for p in cfg.heldout]
    return [Path(p) / "val.jsonl" for p in cfg.inputs if (Path(p) / "val.jsonl").is_file()]


def bytes_per_token(tok: Tokenizer, paths: list[Path], max_bytes: int) -> dict[str, float]:
    """Compression of ``tok`` on held-out text: UTF-8 bytes per token (higher is better)."""
    import numpy as np

    sizes = np.asarray(tok.token_bytes(), dtype=np.int64)
    n_bytes = n_tokens = 0
    for chunk in iter_corpus_bytes(paths, list(tok.special_tokens) or [ENDOFTEXT], max_bytes=max_bytes):
        ids = tok.encode_bytes(chunk)
        n_tokens += len(ids)
        n_bytes += int(sizes[ids].sum())  # special tokens count 0 bytes
    return {"heldout_bytes": n_bytes, "heldout_tokens": n_tokens,
            "heldout_bytes_per_token": round(n_bytes / max(n_tokens, 1), 4)}


def train_tokenizer(cfg: TokenizerTrainConfig, out_dir: str | os.PathLike, force: bool = False, progress: bool = False) -> Path:
    """Run the ``tokenizer`` stage: train BPE on ``cfg.inputs``, write ``out_dir/tokenizer.json``.

    Reuses ``out_dir`` when its manifest matches this config and inputs (unless ``force``); ``progress``
    shows a progress bar.
    Returns ``out_dir``.
    """
    if not cfg.inputs:
        raise ValueError("no training input: set TokenizerTrainConfig.inputs (CLI: --input FILE)")
    heldout = _heldout_paths(cfg)
    with StageRun(out_dir, "tokenizer", cfg, inputs=[*cfg.inputs, *heldout], force=force) as run:
        if run.reused:
            log.info("tokenizer: reusing %s (same config and inputs)", out_dir)
        else:
            t0 = time.perf_counter()
            vocab, merges = train_bpe(
                list(cfg.inputs), cfg.vocab_size, list(cfg.special_tokens), pattern=cfg.pattern,
                max_doc_chars=cfg.max_doc_chars, max_bytes=cfg.max_bytes, workers=cfg.workers, backend=cfg.backend,
                progress=progress,
            )
            seconds = time.perf_counter() - t0
            tok = Tokenizer(vocab, merges, list(cfg.special_tokens), pattern=cfg.pattern)
            tok.save(run.tmp / TOKENIZER_FILE)
            run.stats.update(vocab_size=tok.vocab_size, merges=len(merges), special_tokens=tok.special_tokens,
                             train_seconds=round(seconds, 3))
            if heldout:
                run.stats.update(bytes_per_token(tok, heldout, cfg.heldout_max_bytes))
            log.info("tokenizer: vocab %d (%d merges) in %.1f s -> %s", tok.vocab_size, len(merges), seconds, out_dir)
    return Path(out_dir)
