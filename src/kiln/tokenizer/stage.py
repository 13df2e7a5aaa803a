"""The ``tokenizer`` stage: train a BPE tokenizer and write ``tokenizer.json`` as an artifact."""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
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
    """Training text: ``.txt`` files and ``.jsonl`` files (field "text") are read here; with a
    document reader (``read_texts``, as ``kiln tokenizer train`` passes), anything it reads too:
    ``kiln data run`` / corpus artifact folders (their train files, through the manifest),
    ``.jsonl.zst``/``.gz``, Parquet, globs, ``hf://``."""
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
    """Held-out files for the bytes/token statistic; default: the val split of an artifact input."""
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


ReadTexts = Callable[[Sequence[str], str], Iterable[str]]
"""``read_texts(sources, split) -> texts``: a document reader (``kiln.data.readers.read_texts``)."""


def _native(path: str) -> bool:
    """Whether the trainer reads ``path`` itself: a ``.txt``/``.jsonl`` file, or an old corpus
    folder with ``train.jsonl`` (anything else needs a document reader)."""
    p = Path(path)
    if p.is_file():
        return p.suffix in (".txt", ".jsonl", ".text", ".md")
    return p.is_dir() and (p / "train.jsonl").is_file() and not (p / "manifest.json").is_file()


def _materialize(texts: Iterable[str], path: Path, sep: str, max_doc_chars: int | None, max_bytes: int | None) -> Path:
    """Write documents to a ``.txt`` file joined by ``sep`` (the end-of-text token, never merged
    across, so the trainer counts the same pre-tokens as from JSON lines); stop past ``max_bytes``."""
    n = 0
    with open(path, "w", encoding="utf-8", errors="surrogateescape") as f:
        for text in texts:
            text = text[:max_doc_chars] if max_doc_chars is not None else text
            f.write(text + sep)
            n += len(text) + len(sep)
            if max_bytes is not None and n >= max_bytes:
                break
    return path


def _training_inputs(cfg: TokenizerTrainConfig, read_texts: ReadTexts | None, scratch: Path) -> list[str]:
    """The trainer's input files: native ones as they are, the rest read by ``read_texts`` into
    ``scratch`` as text (compressed shards must never be trained on as bytes)."""
    sep = cfg.special_tokens[0] if cfg.special_tokens else "\n\n"
    out: list[str] = []
    for i, src in enumerate(cfg.inputs):
        if _native(src):
            out.append(src)
        elif read_texts is None:
            raise ValueError(
                f"{src}: the tokenizer reads .txt and .jsonl files itself; for artifact folders, compressed "
                "or Parquet shards and hf://, pass read_texts=kiln.data.readers.read_texts "
                "(`kiln tokenizer train` does)")
        else:
            out.append(str(_materialize(read_texts([src], "train"), scratch / f"input_{i:03d}.txt", sep,
                                        cfg.max_doc_chars, cfg.max_bytes)))
    return out


def _heldout_paths(cfg: TokenizerTrainConfig, read_texts: ReadTexts | None = None, scratch: Path | None = None) -> list[Path]:
    if cfg.heldout:
        if read_texts is None or scratch is None or all(_native(p) for p in cfg.heldout):
            return [Path(p) for p in cfg.heldout]
        return [_materialize(read_texts(list(cfg.heldout), "val"), scratch / "heldout.txt", ENDOFTEXT, None,
                             cfg.heldout_max_bytes)]
    old = [Path(p) / "val.jsonl" for p in cfg.inputs if (Path(p) / "val.jsonl").is_file()]
    if old or read_texts is None or scratch is None:
        return old
    folders = [p for p in cfg.inputs if (Path(p) / "manifest.json").is_file()]
    if not folders:
        return []
    path = _materialize(read_texts(folders, "val"), scratch / "heldout.txt", ENDOFTEXT, None, cfg.heldout_max_bytes)
    return [path] if path.stat().st_size else []


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


def train_tokenizer(
    cfg: TokenizerTrainConfig, out_dir: str | os.PathLike, force: bool = False, progress: bool = False,
    *, read_texts: ReadTexts | None = None,
) -> Path:
    """Run the ``tokenizer`` stage: train BPE on ``cfg.inputs``, write ``out_dir/tokenizer.json``.

    Reuses ``out_dir`` when its manifest matches this config and inputs (unless ``force``); ``progress``
    shows a progress bar. ``read_texts(sources, split)`` reads inputs the trainer does not read
    itself (artifact folders, ``.jsonl.zst``, Parquet, ``hf://``): ``kiln.data.readers.read_texts``,
    passed in since the tokenizer comes before the data stage in Kiln's import order.
    Returns ``out_dir``.
    """
    if not cfg.inputs:
        raise ValueError("no training input: set TokenizerTrainConfig.inputs (CLI: --input FILE)")
    if read_texts is None and not all(_native(p) for p in cfg.inputs):
        _training_inputs(cfg, None, Path("."))  # raises, naming the input and the fix
    local = [p for p in (*cfg.inputs, *cfg.heldout) if "://" not in p and Path(p).exists()]  # not URLs, globs
    with StageRun(out_dir, "tokenizer", cfg, inputs=[*local, *_heldout_paths(cfg)], force=force) as run:
        if run.reused:
            log.info("tokenizer: reusing %s (same config and inputs)", out_dir)
            return Path(out_dir)
        with tempfile.TemporaryDirectory(prefix=".tokenizer-input-", dir=run.tmp.parent) as scratch:
            _train_into(run, cfg, _training_inputs(cfg, read_texts, Path(scratch)),
                        _heldout_paths(cfg, read_texts, Path(scratch)), progress)
    return Path(out_dir)


def _train_into(run: StageRun, cfg: TokenizerTrainConfig, inputs: list[str], heldout: list[Path], progress: bool) -> None:
    """Train on ``inputs`` and write the tokenizer and its stats into ``run``."""
    t0 = time.perf_counter()
    vocab, merges = train_bpe(
        inputs, cfg.vocab_size, list(cfg.special_tokens), pattern=cfg.pattern,
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
    log.info("tokenizer: vocab %d (%d merges) in %.1f s -> %s", tok.vocab_size, len(merges), seconds, run.out_dir)
