"""Byte-level BPE training (Sennrich et al. 2016; byte-level as in GPT-2, Radford et al. 2019).

Vocabulary layout (Kiln's choice): ids 0..255 are the single bytes, ids 256.. are the merges in
the order they were learned, then the special tokens in the order given. ``Tokenizer`` accepts
any layout (GPT-2's files put bytes in a different order), so this only fixes what training emits.

The trainer works on the multiset of pre-tokens ("words", see ``pretokenize``). Each step merges
the most frequent adjacent pair; ties go to the lexicographically greatest pair of byte strings
(``max((count, (bytes_a, bytes_b)))``), as GPT-2-style trainers do, so training is deterministic.
Pair counts are kept incrementally: a merge only revisits the words that contain the merged pair,
and a heap with lazy deletion yields the best pair.

``merge_words_reference`` is the pure-Python reference; ``kiln.tokenizer._native`` does the same
in C and is tested to produce identical merges.
"""

from __future__ import annotations

import heapq
import json
import logging
import os
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path

from kiln.tokenizer.pretokenize import (
    ENDOFTEXT,
    check_special_tokens,
    count_words,
    iter_text_chunks,
    safe_cut,
)

log = logging.getLogger(__name__)

# Byte -> character map used to order byte strings in reverse inside a min-heap: each byte c maps
# to chr(511 - c) and a terminator chr(1000) sorts above every byte, so for byte strings x < y
# we get rev(x) > rev(y) (a prefix is smaller than its extensions, its reverse is larger).
_REV_TABLE = {i: chr(511 - i) for i in range(256)}
_REV_END = chr(1000)


def _rev(b: bytes) -> str:
    return b.decode("latin-1").translate(_REV_TABLE) + _REV_END


def merge_words_reference(word_counts: Mapping[bytes, int], num_merges: int) -> list[tuple[bytes, bytes]]:
    """Learn up to ``num_merges`` BPE merges from pre-token counts (pure-Python reference).

    Args:
        word_counts: pre-token bytes -> number of occurrences in the corpus.
        num_merges: merges to learn; fewer are returned if no pair is left to merge.
    Returns:
        The merges, in order, as pairs of byte strings.
    """
    words: list[list[int]] = [list(w) for w in word_counts]
    freqs: list[int] = list(word_counts.values())
    tok: list[bytes] = [bytes([i]) for i in range(256)]
    pair_counts: dict[tuple[int, int], int] = defaultdict(int)
    where: dict[tuple[int, int], set[int]] = defaultdict(set)
    for wi, w in enumerate(words):
        f = freqs[wi]
        for p in pairwise(w):
            pair_counts[p] += f
            where[p].add(wi)
    heap = [(-c, _rev(tok[p[0]]), _rev(tok[p[1]]), p) for p, c in pair_counts.items()]
    heapq.heapify(heap)
    merges: list[tuple[bytes, bytes]] = []
    while len(merges) < num_merges:
        best = None
        while heap:
            negc, _, _, p = heapq.heappop(heap)
            if pair_counts.get(p, 0) == -negc > 0:
                best = p
                break
        if best is None:
            break  # every word is a single token
        a, b = best
        new = len(tok)
        tok.append(tok[a] + tok[b])
        merges.append((tok[a], tok[b]))
        touched: set[tuple[int, int]] = set()
        for wi in where.pop(best):
            w = words[wi]
            merged = merge_word(w, a, b, new)
            if len(merged) == len(w):
                continue  # stale index entry: the pair left this word in an earlier merge
            f = freqs[wi]
            for p in pairwise(w):
                pair_counts[p] -= f
                touched.add(p)
            for p in pairwise(merged):
                pair_counts[p] += f
                touched.add(p)
                where[p].add(wi)
            words[wi] = merged
        for p in touched:
            c = pair_counts[p]
            if c > 0:
                heapq.heappush(heap, (-c, _rev(tok[p[0]]), _rev(tok[p[1]]), p))
            else:
                del pair_counts[p]
    return merges


def merge_word(w: list[int], a: int, b: int, new: int) -> list[int]:
    """Replace every non-overlapping (a, b) in ``w``, left to right, by ``new``."""
    out: list[int] = []
    i, n = 0, len(w)
    while i < n:
        if i + 1 < n and w[i] == a and w[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(w[i])
            i += 1
    return out


def build_vocab(merges: Sequence[tuple[bytes, bytes]], special_tokens: Sequence[str]) -> dict[int, bytes]:
    """Kiln's layout: 256 bytes, then one id per merge, then the special tokens."""
    vocab = {i: bytes([i]) for i in range(256)}
    for a, b in merges:
        vocab[len(vocab)] = a + b
    for s in special_tokens:
        vocab[len(vocab)] = s.encode("utf-8")
    return vocab


def iter_corpus_texts(
    paths: Sequence[str | os.PathLike],
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    max_doc_chars: int | None = None,
    max_bytes: int | None = None,
    chunk_chars: int = 1 << 22,
) -> Iterator[str]:
    """Training text from ``.txt`` files, ``.jsonl`` files (field ``"text"``) or corpus artifact dirs.

    Yields chunks of about ``chunk_chars`` characters, each cut at a point that does not change
    pre-tokenization. JSON-lines documents are joined by ``<|endoftext|>`` (the first special
    token) and truncated to ``max_doc_chars``; ``max_bytes`` stops after about that many bytes of
    text (counted in characters read, a cheap upper bound for ASCII-heavy text).
    """
    sep = special_tokens[0] if special_tokens else "\n\n"
    budget = max_bytes if max_bytes is not None else float("inf")
    for path in _expand_inputs(paths):
        if budget <= 0:
            return
        if path.suffix == ".jsonl":
            source: Iterable[str] = _jsonl_chunks(path, sep, max_doc_chars, chunk_chars)
        else:
            source = iter_text_chunks(path, chunk_chars, special_tokens)
        for chunk in source:
            if len(chunk) > budget:
                cut = safe_cut(chunk[: int(budget)], special_tokens) or int(budget)
                chunk = chunk[:cut]
            budget -= len(chunk)
            yield chunk
            if budget <= 0:
                return


def _expand_inputs(paths: Sequence[str | os.PathLike]) -> list[Path]:
    out: list[Path] = []
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    for p in map(Path, paths):
        if p.is_dir():
            train = p / "train.jsonl"
            if not train.is_file():
                raise FileNotFoundError(f"{p} is a directory without train.jsonl; pass a .txt/.jsonl file or a corpus artifact")
            out.append(train)
        elif p.is_file():
            out.append(p)
        else:
            raise FileNotFoundError(f"training input {p} does not exist; check the path")
    if not out:
        raise ValueError("no training input given; pass at least one .txt or .jsonl file")
    return out


def _jsonl_chunks(path: Path, sep: str, max_doc_chars: int | None, chunk_chars: int) -> Iterator[str]:
    docs: list[str] = []
    size = 0
    with open(path, encoding="utf-8", errors="surrogateescape") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                text = json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{lineno} is not a JSON object with a \"text\" field ({e}); fix or drop that line") from e
            if max_doc_chars is not None:
                text = text[:max_doc_chars]
            docs.append(text)
            size += len(text)
            if size >= chunk_chars:
                yield sep.join(docs) + sep
                docs, size = [], 0
    if docs:
        yield sep.join(docs)


def count_corpus_words(
    texts: Iterable[str], pattern: str = "gpt2", special_tokens: Sequence[str] = (), workers: int = 1
) -> Counter[bytes]:
    """Pre-token counts of a stream of text chunks, over ``workers`` processes (1 = in-process)."""
    if workers <= 1:
        total: Counter[bytes] = Counter()
        for chunk in texts:
            total.update(count_words([chunk], pattern, special_tokens))
        return total
    from concurrent.futures import ProcessPoolExecutor

    total = Counter()
    with ProcessPoolExecutor(workers) as ex:
        pending = []
        for chunk in texts:
            pending.append(ex.submit(count_words, [chunk], pattern, tuple(special_tokens)))
            if len(pending) >= 2 * workers:  # bounded memory: at most 2 chunks per worker in flight
                total.update(pending.pop(0).result())
        for fut in pending:
            total.update(fut.result())
    return total


def safe_cut_bytes(buf: bytes, special_tokens: Sequence[str] = ()) -> int:
    """Bytes twin of ``pretokenize.safe_cut`` (ASCII cut points only): last exact cut, 0 if none."""
    best = 0
    for s in special_tokens:
        k = buf.rfind(s.encode("utf-8"))
        if k >= 0:
            best = max(best, k + len(s.encode("utf-8")))
    # Stay a special token's length from the end: a partial special token there must not be cut.
    p = len(buf) - 2 - max((len(s.encode("utf-8")) for s in special_tokens), default=0)
    while p > best:
        p = buf.rfind(b" ", best, p + 1)
        if p <= best:
            break
        a, b = buf[p - 1], buf[p + 1]
        if a < 0x80 and a not in b" \t\n\v\f\r" and (65 <= b <= 90 or 97 <= b <= 122):
            enc = [s.encode("utf-8") for s in special_tokens if " " in s]
            if not any(t in buf[max(0, p - len(t)) : p + len(t)] for t in enc):
                return p
        p -= 1
    return best


def iter_corpus_bytes(
    paths: Sequence[str | os.PathLike] | str | os.PathLike,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    max_doc_chars: int | None = None,
    max_bytes: int | None = None,
    chunk_bytes: int = 1 << 25,
) -> Iterator[bytes]:
    """Training input as UTF-8 byte chunks cut at exact points (``.txt`` read as raw bytes, so
    invalid UTF-8 passes through untouched); the C pre-tokenizer's input."""
    budget = max_bytes if max_bytes is not None else float("inf")
    for path in _expand_inputs(paths):
        if budget <= 0:
            return
        if path.suffix == ".jsonl":
            sep = special_tokens[0] if special_tokens else "\n\n"
            source: Iterable[bytes] = (c.encode("utf-8", "surrogateescape") for c in _jsonl_chunks(path, sep, max_doc_chars, chunk_bytes))
        else:
            source = _raw_chunks(path, chunk_bytes, special_tokens)
        for chunk in source:
            if len(chunk) > budget:
                chunk = chunk[: safe_cut_bytes(chunk[: int(budget)], special_tokens) or int(budget)]
            budget -= len(chunk)
            yield chunk
            if budget <= 0:
                return


def _raw_chunks(path: Path, chunk_bytes: int, special_tokens: Sequence[str]) -> Iterator[bytes]:
    offset, reported = 0, False
    with open(path, "rb") as f:
        buf = b""
        while True:
            block = f.read(chunk_bytes)
            if block:
                buf += block
                cut = safe_cut_bytes(buf, special_tokens)
                if cut <= 0:
                    continue
            else:
                cut = len(buf)
            if not cut:
                break
            chunk, buf = buf[:cut], buf[cut:]
            if not reported:
                reported = _report_invalid_utf8(path, chunk, offset)
            offset += len(chunk)
            yield chunk
            if not block:
                break


def _report_invalid_utf8(path: Path, chunk: bytes, offset: int) -> bool:
    """Log once per file where its UTF-8 is invalid (the bytes are kept; BPE is byte-level)."""
    try:
        chunk.decode("utf-8")
        return False
    except UnicodeDecodeError as e:
        log.warning("%s: invalid UTF-8 at byte %d (%s); kept as raw bytes, later ones not reported",
                    path, offset + e.start, e.reason)
        return True


def count_input_words(
    input_path: str | os.PathLike | Sequence[str | os.PathLike],
    pattern: str = "gpt2",
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    max_doc_chars: int | None = None,
    max_bytes: int | None = None,
    workers: int = 1,
    backend: str = "auto",
    progress: bool = False,
) -> Counter[bytes]:
    """Pre-token counts of training input: C pre-tokenizer on threads, else Python on processes."""
    from kiln.tokenizer import native

    if backend != "python" and native.available() and native.pattern_id(pattern) is not None:
        chunks = _progress(iter_corpus_bytes(input_path, special_tokens, max_doc_chars, max_bytes), input_path, max_bytes, progress)
        return native.count_words_bytes(chunks, pattern, special_tokens, workers)
    if backend == "native":
        native.module()
        raise ValueError(f"the C core has no pre-tokenizer for pattern {pattern!r}; use backend='python'")
    texts = _progress(iter_corpus_texts(input_path, special_tokens, max_doc_chars, max_bytes), input_path, max_bytes, progress)
    return count_corpus_words(texts, pattern, special_tokens, workers)


def _progress(chunks: Iterable, paths: object, max_bytes: int | None, enabled: bool) -> Iterator:
    """Pass ``chunks`` through, with a tqdm bar of input consumed when ``enabled``."""
    if not enabled:
        yield from chunks
        return
    from tqdm import tqdm

    total = sum(p.stat().st_size for p in _expand_inputs(paths))  # type: ignore[arg-type]
    if max_bytes is not None:
        total = min(total, max_bytes)
    with tqdm(total=total, unit="B", unit_scale=True, desc="pre-tokenize", leave=False) as bar:
        for c in chunks:
            yield c
            bar.update(len(c))


def train_bpe(
    input_path: str | os.PathLike | Sequence[str | os.PathLike],
    vocab_size: int,
    special_tokens: Sequence[str] = (ENDOFTEXT,),
    *,
    pattern: str = "gpt2",
    max_doc_chars: int | None = None,
    max_bytes: int | None = None,
    workers: int = 1,
    backend: str = "auto",
    progress: bool = False,
) -> tuple[dict[int, bytes], list[tuple[bytes, bytes]]]:
    """Train a byte-level BPE tokenizer on text files.

    Args:
        input_path: a ``.txt`` file, a ``.jsonl`` file (field ``"text"``, documents joined by
            ``<|endoftext|>``), a corpus artifact directory, or a list of these.
        vocab_size: final vocabulary size, counting the 256 bytes and the special tokens.
        special_tokens: strings that are never merged across and get their own ids (last).
        pattern: split pattern name (``"gpt2"``, ``"cl100k"``, ``"gpt2_digits"``) or a regex.
        max_doc_chars: truncate each JSON-lines document to this many characters.
        max_bytes: read only about the first this-many bytes of input.
        workers: processes for pre-tokenization (the Python path; 0 = all cores).
        backend: ``"python"`` (the reference), ``"native"`` (the C core) or ``"auto"``.
        progress: show a progress bar over the input (tqdm) and log each phase.
    Returns:
        ``(vocab, merges)``: id -> bytes, and the merges in order.
    """
    specials = check_special_tokens(special_tokens)
    if not isinstance(vocab_size, int) or vocab_size < 256 + len(specials):
        raise ValueError(
            f"vocab_size {vocab_size} is too small: it must be at least 256 bytes + {len(specials)} special tokens "
            f"= {256 + len(specials)}; raise --vocab-size"
        )
    workers = workers or (os.cpu_count() or 1)
    t0 = time.perf_counter()
    counts = count_input_words(input_path, pattern, specials, max_doc_chars, max_bytes, workers, backend, progress)
    if not counts:
        raise ValueError(f"training input {input_path} holds no text (empty corpus); give a non-empty file")
    num_merges = vocab_size - 256 - len(specials)
    if progress:
        log.info("pre-tokenized: %d distinct pre-tokens, %d in all, in %.1f s; merging %d pairs",
                 len(counts), sum(counts.values()), time.perf_counter() - t0, num_merges)
    merges = merge_words(counts, num_merges, backend)
    if len(merges) < num_merges:
        log.warning("corpus too small: learned %d merges, not %d; the vocab has %d ids",
                    len(merges), num_merges, 256 + len(merges) + len(specials))
    return build_vocab(merges, specials), merges


def merge_words(word_counts: Mapping[bytes, int], num_merges: int, backend: str = "auto") -> list[tuple[bytes, bytes]]:
    """``merge_words_reference`` or its C twin, per ``backend`` (``auto``/``native``/``python``)."""
    if backend not in ("auto", "native", "python"):
        raise ValueError(f"backend {backend!r} is not one of auto, native, python")
    if backend != "python":
        from kiln.tokenizer import native

        if native.available():
            return native.merge_words(word_counts, num_merges)
        if backend == "native":
            raise RuntimeError(f"the native tokenizer core is not built ({native.import_error()}); reinstall kiln with a C compiler or use backend='python'")
    return merge_words_reference(word_counts, num_merges)
