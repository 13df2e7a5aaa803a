"""The token shard file: a 64-byte header, the tokens, then the document start offsets.

Layout (little-endian), as in ``docs/architecture.md``::

    offset  size  field
    0       8     magic b"KILNTOKS"
    8       4     version (u32) = 1
    12      4     dtype code (u32): 1 = uint16, 2 = uint32
    16      8     n_tokens (u64)
    24      8     n_docs (u64)
    32      8     vocab_size (u64)
    40      24    reserved, zero
    64      ...   n_tokens tokens of the dtype
    ...     ...   n_docs uint64 document start offsets (token index within this shard)

The reader memory-maps the tokens, checks magic, version, dtype and the exact file length before
trusting a byte, and checks every id against the recorded vocabulary (one pass of ``max`` over the
map, ~0.1 s per 100M uint16 tokens; skipped where the dtype cannot hold a larger id) (modded-nanogpt's
shards carry a magic and version for the same reason: a foreign or truncated file must fail loudly,
never train on garbage). uint16 holds any vocabulary up to 65,536 ids and halves the disk and
page-cache traffic of uint32.
"""

from __future__ import annotations

import os
import struct
import uuid
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kiln.artifacts import KilnError

MAGIC = b"KILNTOKS"
VERSION = 1
HEADER_BYTES = 64
_HEADER = struct.Struct("<8sIIQQQ")  # magic, version, dtype code, n_tokens, n_docs, vocab_size
DTYPE_CODES: dict[int, np.dtype] = {1: np.dtype("<u2"), 2: np.dtype("<u4")}


class ShardFormatError(KilnError, ValueError):
    """A file is not a valid Kiln token shard (wrong magic, version, dtype or length)."""


def dtype_for_vocab(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size <= 65536), else uint32."""
    if vocab_size <= 0:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    if vocab_size > 2**32:
        raise ValueError(f"vocab_size={vocab_size} does not fit uint32 token ids")
    return DTYPE_CODES[1] if vocab_size <= 2**16 else DTYPE_CODES[2]


def _dtype_code(dtype: np.dtype) -> int:
    for code, dt in DTYPE_CODES.items():
        if dt == dtype:
            return code
    raise AssertionError(dtype)


def pack_header(n_tokens: int, n_docs: int, vocab_size: int, dtype: np.dtype) -> bytes:
    """The 64-byte header for a shard of ``n_tokens`` tokens of ``dtype`` and ``n_docs`` documents."""
    head = _HEADER.pack(MAGIC, VERSION, _dtype_code(np.dtype(dtype)), n_tokens, n_docs, vocab_size)
    return head + b"\0" * (HEADER_BYTES - len(head))


@dataclass
class Shard:
    """One token shard, opened by :func:`read_shard`.

    Attributes:
        path: the file.
        tokens: (n_tokens,) read-only memory map of uint16 or uint32 token ids.
        doc_starts: (n_docs,) int64 offsets into ``tokens`` where documents start, ascending.
        vocab_size: vocabulary size of the tokenizer that wrote it.
    """

    path: Path
    tokens: np.ndarray
    doc_starts: np.ndarray
    vocab_size: int

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_docs(self) -> int:
        return int(self.doc_starts.shape[0])


def write_shard(
    path: str | os.PathLike, tokens: np.ndarray, doc_starts: np.ndarray | list[int], vocab_size: int
) -> Path:
    """Write one shard atomically (temporary file, then rename). Returns the path.

    Args:
        tokens: (n_tokens,) integer token ids, each in ``[0, vocab_size)``.
        doc_starts: (n_docs,) ascending offsets into ``tokens`` where documents start.
        vocab_size: picks the dtype (uint16 up to 65,536, else uint32) and is recorded.
    """
    p = Path(path)
    dtype = dtype_for_vocab(vocab_size)
    toks = np.asarray(tokens)
    if toks.ndim != 1:
        raise ValueError(f"{p}: tokens must be 1-D, got shape {toks.shape}")
    if toks.size and (int(toks.min()) < 0 or int(toks.max()) >= vocab_size):
        raise ValueError(
            f"{p}: token ids span [{int(toks.min())}, {int(toks.max())}] outside [0, vocab_size={vocab_size})"
        )
    starts = np.asarray(doc_starts, dtype=np.int64).reshape(-1)
    if starts.size and (starts[0] < 0 or starts[-1] >= max(toks.size, 1) or np.any(np.diff(starts) <= 0)):
        raise ValueError(f"{p}: doc_starts must be strictly ascending offsets in [0, {toks.size})")
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(pack_header(toks.size, starts.size, vocab_size, dtype))
            f.write(toks.astype(dtype, copy=False).tobytes())
            f.write(starts.astype("<u8").tobytes())
        os.replace(tmp, p)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return p


def read_header(path: str | os.PathLike) -> dict[str, int]:
    """Parse and validate a shard's header against its file length; errors name the file and the fix."""
    p = Path(path)
    try:
        size = p.stat().st_size
        with open(p, "rb") as f:
            raw = f.read(HEADER_BYTES)
    except FileNotFoundError:
        raise FileNotFoundError(f"token shard {p} does not exist; run `kiln tokenize` first") from None
    redo = "re-run `kiln tokenize` to rewrite it"
    if len(raw) < HEADER_BYTES:
        raise ShardFormatError(
            f"{p}: truncated: {size} bytes, shorter than the {HEADER_BYTES}-byte shard header; {redo}"
        )
    magic, version, code, n_tokens, n_docs, vocab_size = _HEADER.unpack_from(raw)
    if magic != MAGIC:
        raise ShardFormatError(f"{p}: not a Kiln token shard (magic {magic!r}, expected {MAGIC!r})")
    if version != VERSION:
        raise ShardFormatError(f"{p}: shard format version {version}, this Kiln reads version {VERSION}; {redo}")
    if code not in DTYPE_CODES:
        raise ShardFormatError(f"{p}: unknown dtype code {code} (1 = uint16, 2 = uint32); {redo}")
    itemsize = DTYPE_CODES[code].itemsize
    expected = HEADER_BYTES + n_tokens * itemsize + n_docs * 8
    if size != expected:
        what = "truncated" if size < expected else "has trailing bytes"
        raise ShardFormatError(
            f"{p}: {what}: header says {n_tokens} tokens x {itemsize} B + {n_docs} doc starts = "
            f"{expected} bytes, the file has {size}; {redo}"
        )
    return {"dtype_code": code, "n_tokens": n_tokens, "n_docs": n_docs, "vocab_size": vocab_size}


def check_ids(path: Path, tokens: np.ndarray, vocab_size: int) -> None:
    """Raise ShardFormatError naming the first id >= ``vocab_size`` and its position, if any.

    A shard from another tokenizer, or a flipped bit, would otherwise crash training deep in an
    embedding lookup (``IndexError: index 32877 is out of bounds``). One ``max`` pass over the map;
    a second pass finds the position only when an id is bad.
    """
    if not len(tokens) or vocab_size > np.iinfo(tokens.dtype).max:
        return
    top = int(tokens.max())
    if top >= vocab_size:
        pos = int(np.argmax(tokens >= vocab_size))
        raise ShardFormatError(
            f"{path}: token id {int(tokens[pos])} at position {pos} is outside the vocabulary of "
            f"{vocab_size} recorded in its header (largest id {top}); the shard is damaged or was "
            "written by another tokenizer: re-run `kiln tokenize` with the run's tokenizer"
        )


def read_shard(path: str | os.PathLike) -> Shard:
    """Open a shard: tokens memory-mapped (read-only), doc starts loaded; the header is validated."""
    p = Path(path)
    h = read_header(p)
    dtype = DTYPE_CODES[h["dtype_code"]]
    n, d = h["n_tokens"], h["n_docs"]
    if n:
        tokens = np.memmap(p, dtype=dtype, mode="r", offset=HEADER_BYTES, shape=(n,))
    else:
        tokens = np.zeros(0, dtype=dtype)  # mmap of zero bytes is an error
    starts = np.fromfile(p, dtype="<u8", count=d, offset=HEADER_BYTES + n * dtype.itemsize).astype(np.int64)
    check_ids(p, tokens, h["vocab_size"])
    return Shard(path=p, tokens=tokens, doc_starts=starts, vocab_size=h["vocab_size"])


class ShardWriter:
    """Stream documents' tokens into shards of exactly ``shard_tokens`` tokens (the last may be shorter).

    Files are ``{out_dir}/{prefix}_00000.bin``, ``_00001`` and so on. A document that crosses a
    shard boundary continues at the start of the next shard; each shard's ``doc_starts`` lists the
    documents that *start* in it, so reading the shards back to back gives the exact token stream.

    Usage::

        with ShardWriter(out, "train", vocab_size=50257, shard_tokens=100_000_000) as w:
            for ids in docs:
                w.add_document(ids)   # ids already end with the end-of-text token
        w.paths, w.n_tokens, w.n_docs
    """

    def __init__(
        self, out_dir: str | os.PathLike, prefix: str, vocab_size: int, shard_tokens: int = 100_000_000
    ) -> None:
        if shard_tokens <= 0:
            raise ValueError(f"shard_tokens={shard_tokens} must be positive")
        self.out_dir = Path(out_dir)
        self.prefix = prefix
        self.vocab_size = vocab_size
        self.shard_tokens = shard_tokens
        self.dtype = dtype_for_vocab(vocab_size)
        self._buf = np.empty(shard_tokens, dtype=self.dtype)
        self._fill = 0
        self._starts: list[int] = []
        self.paths: list[Path] = []
        self.n_tokens = 0
        self.n_docs = 0

    def add_document(self, tokens: np.ndarray | list[int]) -> None:
        """Append one document's tokens (including its trailing end-of-text token, if any); empty ones are skipped."""
        toks = np.asarray(tokens)
        if toks.size == 0:
            return
        if int(toks.max()) >= self.vocab_size or int(toks.min()) < 0:
            raise ValueError(f"token ids of document {self.n_docs} fall outside [0, {self.vocab_size})")
        if self._fill == self.shard_tokens:
            self._flush()
        self._starts.append(self._fill)
        self.n_docs += 1
        pos = 0
        while pos < toks.size:
            if self._fill == self.shard_tokens:
                self._flush()
            take = min(toks.size - pos, self.shard_tokens - self._fill)
            self._buf[self._fill:self._fill + take] = toks[pos:pos + take]
            self._fill += take
            pos += take
        self.n_tokens += int(toks.size)

    def _flush(self) -> None:
        if self._fill == 0 and not self._starts:
            return
        path = self.out_dir / f"{self.prefix}_{len(self.paths):05d}.bin"
        write_shard(path, self._buf[: self._fill], self._starts, self.vocab_size)
        self.paths.append(path)
        self._fill = 0
        self._starts = []

    def close(self) -> list[Path]:
        """Write the last partial shard; returns every shard path written."""
        self._flush()
        return self.paths

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
