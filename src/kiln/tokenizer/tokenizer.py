"""``Tokenizer``: byte-level BPE encode/decode, streaming, save/load, GPT-2 files.

Encoding splits the text on special tokens, splits each piece into pre-tokens with the split
pattern, and applies the merges to each pre-token's bytes in rank order (lowest rank first, as
GPT-2's ``bpe()``). Pre-token -> ids results are cached. The C core, when built, does the same
work (and is tested equal); this module's Python path is the reference.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np

from kiln.tokenizer import native
from kiln.tokenizer.formats import bytes_to_str, str_to_bytes
from kiln.tokenizer.train import merge_word
from kiln.tokenizer.pretokenize import (
    ENDOFTEXT,
    check_special_tokens,
    compile_pattern,
    resolve_pattern,
    safe_cut,
    split_on_specials,
)

FORMAT = "kiln-bpe"
FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
KILN_TOKENIZER_FILE = "kiln_tokenizer.json"  # Kiln's format in a model folder, beside Hugging Face's tokenizer.json
_CACHE_MAX = 1 << 18  # pre-tokens kept in the Python encode cache before it is cleared


class Tokenizer:
    """Byte-level BPE tokenizer.

    Args:
        vocab: id -> bytes. Any layout; every single byte must have an id.
        merges: merges in rank order (first = applied first); each ``a + b`` must be in ``vocab``.
        special_tokens: strings encoded as one id each and never split. A special token whose bytes
            are already in ``vocab`` keeps that id; the others get new ids after the largest.
        pattern: split pattern name (``gpt2``, ``cl100k``, ``gpt2_digits``) or regex.
        backend: ``auto`` (C core when built), ``native`` or ``python`` (the reference).
    """

    def __init__(
        self,
        vocab: Mapping[int, bytes],
        merges: Sequence[tuple[bytes, bytes]],
        special_tokens: Sequence[str] | None = None,
        pattern: str = "gpt2",
        backend: str = "auto",
    ) -> None:
        self.vocab: dict[int, bytes] = {}
        for i, b in vocab.items():
            if not isinstance(i, int) or i < 0 or not isinstance(b, (bytes, bytearray)):
                raise TypeError(f"vocab entry {i!r}: {b!r} must map a non-negative int id to bytes")
            self.vocab[i] = bytes(b)
        self.merges: list[tuple[bytes, bytes]] = [(bytes(a), bytes(b)) for a, b in merges]
        self.pattern = pattern
        self._pat = compile_pattern(pattern)
        specials = check_special_tokens(special_tokens)
        inverse: dict[bytes, int] = {}
        for i in sorted(self.vocab):
            inverse.setdefault(self.vocab[i], i)
        self.special_tokens: dict[str, int] = {}
        for s in specials:
            sb = s.encode("utf-8")
            if sb in inverse:
                self.special_tokens[s] = inverse[sb]
            else:
                new = max(self.vocab, default=-1) + 1
                self.vocab[new] = sb
                self.special_tokens[s] = new
        self._special_ids = set(self.special_tokens.values())
        # The ordinary tokens' inverse excludes special ids, so that text never encodes to them.
        self._inverse = {b: i for b, i in inverse.items() if i not in self._special_ids}
        missing = [x for x in range(256) if bytes([x]) not in self._inverse]
        if missing:
            raise ValueError(f"vocab lacks single bytes {missing[:8]}...: a byte-level vocab needs all 256")
        self._byte_ids = [self._inverse[bytes([x])] for x in range(256)]
        self._ranks: dict[tuple[int, int], tuple[int, int]] = {}
        for r, (a, b) in enumerate(self.merges):
            try:
                key = (self._inverse[a], self._inverse[b])
                merged = self._inverse[a + b]
            except KeyError:
                raise ValueError(f"merge {r} ({a!r}, {b!r}) uses or makes a token that is not in the vocab") from None
            self._ranks.setdefault(key, (r, merged))
        self.vocab_size = max(self.vocab) + 1
        self.eot_id: int | None = self.special_tokens.get(ENDOFTEXT)
        self._cache: dict[str, tuple[int, ...]] = {}
        self._core = None
        if backend not in ("auto", "native", "python"):
            raise ValueError(f"backend {backend!r} is not one of auto, native, python")
        if backend != "python" and native.available():
            self._core = native.make_encoder(self)
        if backend == "native" and self._core is None:
            native.module()  # raises with the reason when the core is missing
            raise ValueError(f"the C core has no pre-tokenizer for pattern {pattern!r}; use backend='python' or 'auto'")
        self.backend = "native" if self._core is not None else "python"

    # ------------------------------------------------------------------ encoding
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special tokens in the text become their ids."""
        if self._core is not None:
            try:
                return self._core.encode(text)
            except UnicodeEncodeError:  # lone surrogates: only the Python path takes them
                pass
        return self._encode_py(text)

    def encode_ordinary(self, text: str) -> list[int]:
        """Token ids of ``text`` with special tokens treated as plain text."""
        if self._core is not None:
            try:
                return self._core.encode_ordinary(text)
            except UnicodeEncodeError:
                pass
        return self._encode_ordinary_py(text)

    def _encode_py(self, text: str) -> list[int]:
        parts = split_on_specials(text, list(self.special_tokens))
        ids: list[int] = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special_tokens[part])
            elif part:
                ids.extend(self._encode_ordinary_py(part))
        return ids

    def _encode_ordinary_py(self, text: str) -> list[int]:
        ids: list[int] = []
        cache = self._cache
        for piece in self._pat.findall(text):
            hit = cache.get(piece)
            if hit is None:
                hit = tuple(self.bpe(_to_bytes(piece)))
                if len(cache) >= _CACHE_MAX:
                    cache.clear()
                cache[piece] = hit
            ids.extend(hit)
        return ids

    def bpe(self, piece: bytes) -> list[int]:
        """Apply the merges to one pre-token's bytes (pure Python): lowest rank first."""
        ids = [self._byte_ids[x] for x in piece]
        ranks = self._ranks
        while len(ids) > 1:
            best = None
            for pair in pairwise(ids):
                r = ranks.get(pair)
                if r is not None and (best is None or r[0] < best[0]):
                    best = r
                    best_pair = pair
            if best is None:
                break
            ids = merge_word(ids, best_pair[0], best_pair[1], best[1])
        return ids

    def encode_batch(self, texts: Sequence[str], num_threads: int = 0) -> list[list[int]]:
        """``[encode(t) for t in texts]``, on ``num_threads`` threads in the C core (0 = all cores)."""
        if self._core is not None:
            out = self._core.encode_batch(list(texts), num_threads or (os.cpu_count() or 1))
            return [ids if ids is not None else self._encode_py(t) for ids, t in zip(out, texts)]
        return [self._encode_py(t) for t in texts]

    def encode_batch_flat(
        self, texts: Sequence[str], num_threads: int = 0, append_id: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """All texts' ids in one uint32 array, and each text's length (int64), ``append_id`` (e.g.
        ``eot_id``) after each text and counted in its length. The fast path for writing shards:
        no Python int per token."""
        import numpy as np

        if self._core is not None:
            out = self._core.encode_batch_flat(list(texts), num_threads or (os.cpu_count() or 1), True,
                                               -1 if append_id is None else append_id)
            if out is not None:  # None: a text with lone surrogates, which only Python encodes
                return np.frombuffer(out[0], dtype=np.uint32), np.frombuffer(out[1], dtype=np.int64)
        extra = [] if append_id is None else [append_id]
        per_text = [self._encode_py(t) + extra for t in texts]
        lengths = np.array([len(x) for x in per_text], dtype=np.int64)
        flat = np.fromiter((i for x in per_text for i in x), dtype=np.uint32, count=int(lengths.sum()))
        return flat, lengths

    def encode_bytes(self, data: bytes, allow_special: bool = True) -> np.ndarray:
        """Ids of UTF-8 bytes as a uint32 array (C core, GIL released; invalid UTF-8 kept as bytes)."""
        import numpy as np

        if self._core is not None:
            return np.frombuffer(self._core.encode_bytes(data, allow_special), dtype="<u4")
        text = bytes(data).decode("utf-8", "surrogateescape")
        ids = self._encode_py(text) if allow_special else self._encode_ordinary_py(text)
        return np.asarray(ids, dtype="<u4")

    def encode_iterable(self, iterable: Iterable[str], buffer_chars: int = 1 << 16) -> Iterator[int]:
        """Stream the ids of the concatenation of ``iterable`` (e.g. a file's lines), in bounded memory.

        Text is buffered until a point where cutting does not change the tokens (``safe_cut``), so
        the result equals ``encode("".join(iterable))``.
        """
        specials = list(self.special_tokens)
        buf = ""
        for chunk in iterable:
            buf += chunk
            if len(buf) < buffer_chars:
                continue
            cut = safe_cut(buf, specials)
            if cut > 0:
                yield from self.encode(buf[:cut])
                buf = buf[cut:]
        if buf:
            yield from self.encode(buf)

    def encode_file(self, path: str | os.PathLike, chunk_bytes: int = 1 << 24) -> Iterator[np.ndarray]:
        """Stream a text file's ids as uint32 arrays, one per chunk of about ``chunk_bytes`` bytes.

        Memory stays bounded by the chunk size whatever the file size; the concatenated ids equal
        ``encode`` of the whole file (chunks are cut at exact points; invalid UTF-8 kept as bytes).
        """
        from kiln.tokenizer.train import iter_corpus_bytes

        specials = list(self.special_tokens)
        for chunk in iter_corpus_bytes([path], specials, chunk_bytes=chunk_bytes):
            yield self.encode_bytes(chunk)

    # ------------------------------------------------------------------ decoding
    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        """The bytes of ``ids`` joined; raises ValueError naming an id outside the vocab."""
        vocab = self.vocab
        try:
            return b"".join([vocab[i] for i in ids])
        except (KeyError, TypeError):
            for i in ids:
                if i not in vocab:
                    raise ValueError(f"token id {i!r} is not in the vocab (size {self.vocab_size})") from None
            raise

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; byte sequences that are not valid UTF-8 decode to U+FFFD."""
        return self.decode_bytes(ids).decode("utf-8", errors="replace")

    def token_bytes(self) -> list[int]:
        """Byte length of each id (0 for special tokens and unused ids); for bits per byte."""
        out = [0] * self.vocab_size
        for i, b in self.vocab.items():
            if i not in self._special_ids:
                out[i] = len(b)
        return out

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict:
        """Kiln's JSON form (see docs/tokenizer.md)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "pattern": self.pattern,
            "pattern_regex": resolve_pattern(self.pattern),
            "special_tokens": self.special_tokens,
            "vocab": {bytes_to_str(b): i for i, b in sorted(self.vocab.items()) if i not in self._special_ids},
            "merges": [[bytes_to_str(a), bytes_to_str(b)] for a, b in self.merges],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write Kiln's ``tokenizer.json`` (to ``path``, or into ``path`` if it is a directory)."""
        p = Path(path)
        if p.is_dir():
            p = p / TOKENIZER_FILE
        tmp = p.with_name(f".{p.name}.tmp")
        tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False, indent=0) + "\n", encoding="utf-8")
        os.replace(tmp, p)
        return p

    @classmethod
    def load(cls, path: str | os.PathLike, backend: str = "auto") -> Tokenizer:
        """Load Kiln's format: the file, or a folder holding it as ``kiln_tokenizer.json`` (a model
        folder) or ``tokenizer.json`` (a tokenizer artifact). ``kiln.tokenizer.load_tokenizer`` reads
        Hugging Face's format too and finds the tokenizer of a run or tokens folder."""
        p = Path(path)
        if p.is_dir():
            p = p / KILN_TOKENIZER_FILE if (p / KILN_TOKENIZER_FILE).is_file() else p / TOKENIZER_FILE
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file {p} does not exist; run `kiln tokenizer train` first")
        try:
            d = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{p} is not valid JSON ({e}); retrain or re-export it") from e
        if not isinstance(d, dict) or d.get("format") != FORMAT:
            raise ValueError(f"{p} is not a Kiln tokenizer (format {d.get('format') if isinstance(d, dict) else None!r}); "
                             "for a Hugging Face tokenizer.json use kiln.tokenizer.load_tokenizer")
        if d.get("version") != FORMAT_VERSION:
            raise ValueError(f"{p} has format version {d.get('version')}, this Kiln reads {FORMAT_VERSION}; upgrade Kiln")
        vocab = {int(i): str_to_bytes(s, f"{p} token") for s, i in d["vocab"].items()}
        specials = sorted(d.get("special_tokens", {}).items(), key=lambda kv: kv[1])
        for s, i in specials:
            vocab[int(i)] = s.encode("utf-8")
        merges = [(str_to_bytes(a, f"{p} merge"), str_to_bytes(b, f"{p} merge")) for a, b in d["merges"]]
        return cls(vocab, merges, [s for s, _ in specials], pattern=d.get("pattern", "gpt2"), backend=backend)

    @classmethod
    def from_gpt2_files(
        cls,
        vocab_json: str | os.PathLike,
        merges_txt: str | os.PathLike,
        special_tokens: Sequence[str] | None = (ENDOFTEXT,),
        backend: str = "auto",
    ) -> Tokenizer:
        """Load GPT-2's ``vocab.json`` (encoder.json) and ``merges.txt`` (vocab.bpe)."""
        for f in (vocab_json, merges_txt):
            if not Path(f).is_file():
                raise FileNotFoundError(f"GPT-2 tokenizer file {f} does not exist")
        enc = json.loads(Path(vocab_json).read_text(encoding="utf-8"))
        specials = list(special_tokens or [])
        vocab: dict[int, bytes] = {}
        for s, i in enc.items():
            vocab[int(i)] = s.encode("utf-8") if s in specials else str_to_bytes(s, f"{vocab_json}: token")
        merges = []
        for lineno, line in enumerate(Path(merges_txt).read_text(encoding="utf-8").splitlines(), 1):
            if not line or line.startswith("#version"):
                continue
            parts = line.split(" ")
            if len(parts) != 2:
                raise ValueError(f"{merges_txt}:{lineno} is not 'left right': {line!r}")
            merges.append((str_to_bytes(parts[0], f"{merges_txt}:{lineno}"), str_to_bytes(parts[1], f"{merges_txt}:{lineno}")))
        return cls(vocab, merges, specials, pattern="gpt2", backend=backend)

    def __reduce__(self) -> tuple:
        # Picklable for worker processes: rebuilt from its parts (the C encoder is not picklable).
        specials = sorted(self.special_tokens, key=self.special_tokens.__getitem__)
        return (type(self), (self.vocab, self.merges, specials, self.pattern, "auto" if self.backend == "native" else "python"))

    def __repr__(self) -> str:
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, special_tokens={list(self.special_tokens)}, pattern={self.pattern!r})"


def _to_bytes(piece: str) -> bytes:
    try:
        return piece.encode("utf-8")
    except UnicodeEncodeError:
        try:
            return piece.encode("utf-8", "surrogateescape")  # text read with surrogateescape
        except UnicodeEncodeError:
            return piece.encode("utf-8", "surrogatepass")
