"""Deduplication, from scratch: exact (document hash), line-level (lines repeated across the corpus)
and fuzzy MinHash with LSH banding, clustered by connected components, one survivor per cluster.

MinHash (Broder 1997): the probability that two sets have the same minimum under a random hash is
their Jaccard similarity, so the fraction of equal entries of two signatures estimates it. LSH
banding (Leskovec et al., *Mining of Massive Datasets*, ch. 3) splits a signature into ``bands``
of ``rows``; documents sharing any band become candidates, with probability
``1 - (1 - J**rows)**bands`` (an S-curve around ``(1/bands)**(1/rows)``). Candidates are then checked
against the signature estimate of J, and the verified pairs are merged with union-find.

Everything vectorized with numpy: word hashes are CRC32, n-gram hashes a polynomial combination of
them, and each of the ``num_perm`` hash functions is a multiply-shift hash ``(a*x + b) >> 32`` with
an odd 64-bit ``a`` (Dietzfelbinger et al. 1997), computed for all shingles at once.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np

from kiln.data.document import Document
from kiln.data.steps import Stats, Step

_NORM_RE = re.compile(r"[^\w\s]+", re.UNICODE)
_MASK32 = np.uint64(0xFFFFFFFF)


@dataclass(frozen=True)
class MinHashConfig:
    """Fuzzy deduplication with MinHash LSH."""

    ngram: int = 5
    """Words per shingle."""
    bands: int = 20
    """LSH bands; with ``rows`` they set the S-curve: P(candidate | J) = 1 - (1 - J**rows)**bands."""
    rows: int = 6
    """Signature rows per band (num_perm = bands x rows = 120). At J=0.8 a pair is a candidate with
    probability 0.998; at J=0.5, 0.27 (then rejected by the signature check)."""
    threshold: float = 0.8
    """Jaccard similarity (estimated from signatures) above which two documents are duplicates."""
    verify_slack: float = 0.05
    """Candidates are kept when their *estimated* Jaccard is >= threshold - verify_slack: with 120
    permutations the estimate's standard error at J=0.8 is 0.037, so without slack about half the
    pairs just above the threshold would be missed."""
    seed: int = 1
    """Seed of the hash functions (signatures are comparable only under the same seed)."""

    @property
    def num_perm(self) -> int:
        return self.bands * self.rows

    def __post_init__(self) -> None:
        if self.ngram < 1 or self.bands < 1 or self.rows < 1:
            raise ValueError("MinHashConfig: ngram, bands and rows must be >= 1")
        if not 0.0 < self.threshold <= 1.0:
            raise ValueError(f"MinHashConfig.threshold={self.threshold} must be in (0, 1]")


def normalize(text: str) -> str:
    """Lower-cased text with punctuation removed and whitespace collapsed (what dedup compares)."""
    return " ".join(_NORM_RE.sub(" ", text.lower()).split())


def shingles(text: str, n: int = 5) -> set[str]:
    """Word n-grams of the normalized text (the whole text as one shingle when shorter than n)."""
    ws = normalize(text).split()
    if len(ws) < n:
        return {" ".join(ws)} if ws else set()
    return {" ".join(ws[i : i + n]) for i in range(len(ws) - n + 1)}


def jaccard(a: set, b: set) -> float:
    """|a ∩ b| / |a ∪ b| (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


class MinHasher:
    """MinHash signatures of texts: ``signature(text) -> uint32 array (num_perm,)``."""

    def __init__(self, cfg: MinHashConfig = MinHashConfig()) -> None:
        self.cfg = cfg
        rng = np.random.default_rng(cfg.seed)
        self.a = (rng.integers(0, 2**63, size=cfg.num_perm, dtype=np.uint64) << np.uint64(1)) | np.uint64(1)
        self.b = rng.integers(0, 2**63, size=cfg.num_perm, dtype=np.uint64)
        # Polynomial weights that combine n word hashes into one n-gram hash (mod 2**64).
        self.poly = rng.integers(0, 2**63, size=cfg.ngram, dtype=np.uint64) | np.uint64(1)

    def shingle_hashes(self, text: str) -> np.ndarray:
        """uint64 hashes of the word n-grams (unique), shape (S,)."""
        ws = normalize(text).split()
        if not ws:
            return np.zeros(1, dtype=np.uint64)
        wh = np.fromiter((zlib.crc32(w.encode()) for w in ws), dtype=np.uint64, count=len(ws))
        n = min(self.cfg.ngram, len(ws))
        m = len(ws) - n + 1
        h = np.zeros(m, dtype=np.uint64)
        with np.errstate(over="ignore"):
            for k in range(n):
                h += wh[k : k + m] * self.poly[k]
        return np.unique(h)

    def signature(self, text: str) -> np.ndarray:
        """uint32 MinHash signature, shape (num_perm,)."""
        x = self.shingle_hashes(text)  # (S,)
        with np.errstate(over="ignore"):
            hv = (self.a[:, None] * x[None, :] + self.b[:, None]) >> np.uint64(32)  # (P, S)
        return hv.min(axis=1).astype(np.uint32)

    def signatures(self, texts: Iterable[str]) -> np.ndarray:
        """Signatures of many texts, shape (N, num_perm) uint32."""
        sigs = [self.signature(t) for t in texts]
        if not sigs:
            return np.zeros((0, self.cfg.num_perm), dtype=np.uint32)
        return np.stack(sigs)


def lsh_candidate_pairs(sigs: np.ndarray, cfg: MinHashConfig) -> np.ndarray:
    """Pairs ``(i, j)``, i < j, sharing at least one LSH band; shape (P, 2) int64.

    Within a bucket every member is paired with the bucket's first member (enough for connected
    components, and linear in the bucket size).
    """
    n = sigs.shape[0]
    if n < 2:
        return np.zeros((0, 2), dtype=np.int64)
    rng = np.random.default_rng(cfg.seed + 7)
    mult = rng.integers(0, 2**63, size=cfg.rows, dtype=np.uint64) | np.uint64(1)
    pairs = []
    s64 = sigs.astype(np.uint64)
    for b in range(cfg.bands):
        band = s64[:, b * cfg.rows : (b + 1) * cfg.rows]  # (N, rows)
        with np.errstate(over="ignore"):
            key = (band * mult[None, :]).sum(axis=1)  # (N,) band hash
        order = np.argsort(key, kind="stable")
        sk = key[order]
        starts = np.r_[True, sk[1:] != sk[:-1]]  # first row of each bucket
        group_first = order[np.maximum.accumulate(np.where(starts, np.arange(n), 0))]
        member = ~starts
        if member.any():
            pairs.append(np.stack([group_first[member], order[member]], axis=1))
    if not pairs:
        return np.zeros((0, 2), dtype=np.int64)
    p = np.concatenate(pairs)
    p = np.sort(p, axis=1)
    return np.unique(p, axis=0).astype(np.int64)


def connected_components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Component label of each of ``n`` nodes (the smallest index in its component), shape (n,)."""
    parent = np.arange(n)

    def find(x: int) -> int:
        root = x
        while parent[root] != root:
            root = parent[root]
        while parent[x] != root:  # path compression
            parent[x], x = root, parent[x]
        return root

    for i, j in pairs.tolist():
        ri, rj = find(i), find(j)
        if ri != rj:
            parent[max(ri, rj)] = min(ri, rj)
    return np.array([find(i) for i in range(n)])


def cluster_signatures(sigs: np.ndarray, cfg: MinHashConfig = MinHashConfig()) -> np.ndarray:
    """Cluster label per document (smallest member index): LSH candidates, verified, then components."""
    pairs = lsh_candidate_pairs(sigs, cfg)
    if len(pairs):
        est = (sigs[pairs[:, 0]] == sigs[pairs[:, 1]]).mean(axis=1)
        pairs = pairs[est >= cfg.threshold - cfg.verify_slack]
    return connected_components(sigs.shape[0], pairs)


def minhash_clusters(texts: list[str], cfg: MinHashConfig = MinHashConfig()) -> list[int]:
    """Cluster label of each text (texts with equal labels are near-duplicates)."""
    return cluster_signatures(MinHasher(cfg).signatures(texts), cfg).tolist()


def exact_hash(text: str) -> int:
    """64-bit hash of the normalized text (exact duplicates up to case, punctuation, spacing)."""
    return int.from_bytes(hashlib.blake2b(normalize(text).encode(), digest_size=8).digest(), "little", signed=True)


def line_hash(line: str) -> int:
    """64-bit hash of one stripped line."""
    return int.from_bytes(hashlib.blake2b(line.strip().encode(), digest_size=8).digest(), "little", signed=True)


def doc_line_hashes(text: str, min_chars: int = 10) -> set[int]:
    """Hashes of the distinct lines of a document that are long enough to count."""
    return {line_hash(ln) for ln in text.split("\n") if len(ln.strip()) >= min_chars}


def remove_lines(text: str, repeated: set[int] | frozenset[int], min_chars: int = 10) -> tuple[str, int]:
    """Text without the lines whose hash is in ``repeated``; returns (text, lines removed)."""
    out, removed = [], 0
    for ln in text.split("\n"):
        if len(ln.strip()) >= min_chars and line_hash(ln) in repeated:
            removed += 1
        else:
            out.append(ln)
    return re.sub(r"\n{3,}", "\n\n", "\n".join(out)).strip(), removed


@dataclass(frozen=True)
class DedupConfig:
    """Which deduplications run, across the whole run (all shards)."""

    exact: bool = True
    """Drop documents whose normalized text equals an earlier document's."""
    minhash: MinHashConfig | None = MinHashConfig()
    """Drop near-duplicates (one survivor per cluster, the first in input order); None disables."""
    line_min_docs: int = 0
    """Remove lines that occur in at least this many documents (0 disables; e.g. 20 on big crawls)."""
    line_min_chars: int = 10
    """Only lines at least this long are counted and removed."""


class InMemoryDedup(Step):
    """Exact + MinHash dedup of one stream held in memory (for small runs and tests); the pipeline
    uses the sharded global version in :mod:`kiln.data.pipeline`."""

    name = "dedup"

    def __init__(self, cfg: DedupConfig = DedupConfig()) -> None:
        self.cfg = cfg

    def run(self, docs: Iterable[Document], stats: Stats) -> Iterator[Document]:
        buf: list[Document] = []
        seen: set[int] = set()
        for d in docs:
            if self.cfg.exact:
                h = exact_hash(d.text)
                if h in seen:
                    stats.add_drop(d, "dedup_exact")
                    continue
                seen.add(h)
            buf.append(d)
        if self.cfg.minhash is None:
            yield from buf
            return
        labels = minhash_clusters([d.text for d in buf], self.cfg.minhash)
        for i, (d, lab) in enumerate(zip(buf, labels)):
            if lab == i:
                yield d
            else:
                d.metadata["duplicate_of"] = buf[lab].id
                stats.add_drop(d, "dedup_minhash")
