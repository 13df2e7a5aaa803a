"""The curation pipeline: raw files -> clean, deduplicated ``train_XXXXX.jsonl.zst`` shards + a report.

One input file is one shard. Two passes, each resumable per shard (see :mod:`kiln.data.executors`):

1. **Per-shard steps** (in parallel): read (WARC/WET/HTML/JSONL/Parquet/text...), size and encoding
   checks, Gutenberg stripping, HTML extraction, language ID, Gopher repetition and quality, C4,
   classifier and perplexity filters, toxicity, PII masking. Survivors go to ``.work/stage1/``
   with their dedup fingerprints (exact hash, MinHash signature, line hashes).
2. **Global dedup** (main process, numpy): exact duplicates, MinHash LSH clusters (one survivor per
   cluster, the first in input order), lines repeated across documents. Then, in parallel per shard,
   the survivors are written as ``train_XXXXX.jsonl.zst`` (and ``val_XXXXX`` when ``val_fraction``),
   which ``kiln tokenize --corpus <out>`` reads directly.

Every drop is a reason string counted with the document's input bytes; the merged
:class:`~kiln.data.steps.Stats` balance exactly (checked), and ``report.html`` shows the funnel.
``manifest.json`` is written last.
"""

from __future__ import annotations

import glob as globlib
import json
import logging
import os
import shutil
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from kiln.data.books import strip_gutenberg
from kiln.data.dedup import (
    DedupConfig,
    MinHashConfig,
    MinHasher,
    cluster_signatures,
    doc_line_hashes,
    exact_hash,
    remove_lines,
)
from kiln.data.document import Document
from kiln.data.executors import Executor, LocalExecutor, mark_done, run_tasks
from kiln.data.extract import ExtractConfig, extract_text
from kiln.data.filters import (
    C4Config,
    GopherQualityConfig,
    GopherRepetitionConfig,
    c4_clean,
    gopher_quality,
    gopher_repetition,
)
from kiln.data.langid import LangIdConfig, LanguageIdentifier
from kiln.data.pii import PIIConfig, mask_pii
from kiln.data.quality import QualityConfig
from kiln.data.steps import (
    BYTES_IN,
    FilterStep,
    MapStep,
    Stats,
    Step,
    run_steps,
    unit_hash,
)
from kiln.data.toxicity import ToxicityConfig, toxicity_filter
from kiln.data.warc import is_web_archive, read_tar, read_web

log = logging.getLogger(__name__)

STAGE = "data"
WORK = ".work"
OUTPUT_FORMATS = ("jsonl.zst", "parquet")


@dataclass(frozen=True)
class PipelineConfig:
    """The whole curation pipeline; a None sub-config disables that step."""

    name: str = "custom"
    """Preset name (recorded in the manifest and the report)."""
    text_key: str = "text"
    """Field holding the text in JSON/Parquet inputs."""
    max_bytes: int = 5_000_000
    """Documents larger than this (UTF-8 bytes) are dropped as ``too_large``."""
    max_bad_char_frac: float = 0.05
    """Drop as ``binary_or_bad_encoding`` when NULs or U+FFFD exceed this share of characters."""
    strip_gutenberg: bool = False
    """Remove Project Gutenberg headers and footers first."""
    extract: ExtractConfig | None = field(default_factory=ExtractConfig)
    """HTML -> text for documents read as HTML (WARC responses, .html files)."""
    langid: LangIdConfig | None = field(default_factory=LangIdConfig)
    """Language ID and filter."""
    gopher_repetition: GopherRepetitionConfig | None = field(default_factory=GopherRepetitionConfig)
    """Gopher repetition rules."""
    gopher_quality: GopherQualityConfig | None = field(default_factory=GopherQualityConfig)
    """Gopher quality rules."""
    c4: C4Config | None = field(default_factory=lambda: C4Config(require_terminal_punct=False))
    """C4 rules (line clean-up off by default, as FineWeb does)."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """Model-based filters (classifier, perplexity); off unless a model is given."""
    toxicity: ToxicityConfig | None = field(default_factory=ToxicityConfig)
    """Toxicity / NSFW filter."""
    pii: PIIConfig | None = field(default_factory=PIIConfig)
    """PII masking."""
    dedup: DedupConfig | None = field(default_factory=DedupConfig)
    """Exact, MinHash and line-level dedup across all shards."""
    keep_dropped_fraction: float = 0.0
    """Keep this share of documents a filter dropped (tagged ``kept_despite``), to audit the filters."""
    val_fraction: float = 0.0
    """Share of kept documents (by id hash) written to ``val_XXXXX.jsonl.zst`` instead of train."""
    output_format: str = "jsonl.zst"
    """``jsonl.zst`` (one JSON object a line: id, text, metadata fields) or ``parquet`` (columns id,
    text, metadata as a JSON string); ``kiln tokenize --corpus <out>`` reads either."""
    zstd_level: int = 3
    """Compression level of the output shards."""
    workers: int = 0
    """Processes for the local executor (0 = all cores)."""
    report: bool = True
    """Write report.html and funnel.png."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes={self.max_bytes} must be positive")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format={self.output_format!r}; pick one of {', '.join(OUTPUT_FORMATS)}")


def web_en() -> PipelineConfig:
    """FineWeb/Gopher-like English web text: extraction, English >= 0.65, Gopher, C4, toxicity
    (word list + classifier), PII masking, exact + MinHash dedup (5-grams, 20x6 bands, J >= 0.8) and
    line dedup: lines of >= 10 characters found in >= 20 documents (cookie banners, site menus and
    footers that extraction left; CCNet-style paragraph dedup, arXiv:1911.00359, at a threshold that
    spares quotes and boilerplate-like sentences shared by a few pages)."""
    return PipelineConfig(name="web_en", dedup=DedupConfig(line_min_docs=20))


def books() -> PipelineConfig:
    """Books (e.g. Project Gutenberg): strip headers, English, a loose quality check sized for whole
    books, PII masking, exact + MinHash dedup. No extraction, no C4 (dialogue lacks punctuation
    rules' assumptions), no repetition rules (poetry and refrains repeat by design)."""
    return PipelineConfig(
        name="books",
        strip_gutenberg=True,
        max_bytes=50_000_000,
        extract=None,
        langid=LangIdConfig(languages=("en",), min_score=0.5),
        gopher_repetition=None,
        gopher_quality=GopherQualityConfig(max_words=10_000_000, max_bullet_lines_ratio=0.95),
        c4=None,
        toxicity=None,
        dedup=DedupConfig(exact=True, minhash=MinHashConfig(), line_min_docs=0),
    )


def minimal() -> PipelineConfig:
    """Only size/encoding checks and exact dedup (a fast pass over text that is already clean)."""
    return PipelineConfig(
        name="minimal", extract=ExtractConfig(method="resiliparse"), langid=None, gopher_repetition=None,
        gopher_quality=None, c4=None, toxicity=None, pii=None, dedup=DedupConfig(exact=True, minhash=None),
    )


PRESETS = {"web_en": web_en, "books": books, "minimal": minimal}


# ---- steps ---------------------------------------------------------------------------------------


def _size_check(cfg: PipelineConfig):
    def check(doc: Document) -> str | None:
        if not doc.text.strip():
            return "empty"
        if doc.metadata.get(BYTES_IN, 0) > cfg.max_bytes or len(doc.text) > cfg.max_bytes:
            return "too_large"
        head = doc.text[:20_000]
        if (head.count("\x00") + head.count("\ufffd")) > cfg.max_bad_char_frac * len(head):
            return "binary_or_bad_encoding"
        return None

    return check


def build_steps(cfg: PipelineConfig, stats: Stats, perplexity_scorer: Callable[[str], float] | None = None) -> list[Step]:
    """The per-shard steps of ``cfg``, in order (closures may count events into ``stats``)."""
    k = cfg.keep_dropped_fraction
    steps: list[Step] = [FilterStep("size", _size_check(cfg))]
    if cfg.strip_gutenberg:
        def strip(doc: Document) -> Document:
            doc.text = strip_gutenberg(doc.text)
            return doc
        steps.append(MapStep("gutenberg", strip))
    if cfg.extract is not None:
        ecfg = cfg.extract

        def extract(doc: Document) -> str | None:
            if doc.metadata.get("format") != "html":
                return None
            try:
                doc.text = extract_text(doc.text, doc.metadata.get("url"), ecfg)
            except ImportError:
                raise
            except Exception as e:  # noqa: BLE001 - a page the parsers choke on is a counted drop, never fatal
                log.debug("extraction failed on %s: %s", doc.id, e)
                return "extract_error"
            doc.metadata["format"] = "text"
            return None if doc.text.strip() else "extract_empty"
        steps.append(FilterStep("extract", extract))
    else:
        steps.append(FilterStep("html_without_extract", lambda d: "html_not_extracted" if d.metadata.get("format") == "html" else None))
    if cfg.langid is not None:
        lcfg = cfg.langid
        ident = LanguageIdentifier.from_config(lcfg)
        keep = frozenset(lcfg.languages)

        def lang(doc: Document) -> str | None:
            code, score = ident.identify(doc.text)
            doc.metadata["language"] = code
            doc.metadata["language_score"] = round(score, 4)
            if keep and code not in keep:
                return "langid_other_language"
            return "langid_low_score" if score < lcfg.min_score else None
        steps.append(FilterStep("langid", lang, k))
    if cfg.gopher_repetition is not None:
        rcfg = cfg.gopher_repetition
        steps.append(FilterStep("gopher_repetition", lambda d: gopher_repetition(d.text, rcfg), k))
    if cfg.gopher_quality is not None:
        qcfg = cfg.gopher_quality
        steps.append(FilterStep("gopher_quality", lambda d: gopher_quality(d.text, qcfg), k))
    if cfg.c4 is not None:
        ccfg = cfg.c4

        def c4(doc: Document) -> str | None:
            text, reason, removed = c4_clean(doc.text, ccfg)
            if removed:
                stats.counters["c4_lines_removed"] += removed
            doc.text = text
            return reason
        steps.append(FilterStep("c4", c4, k))
    if cfg.quality.classifier:
        from kiln.data.quality import load_quality_classifier

        clf = load_quality_classifier(cfg.quality.classifier)
        thr = cfg.quality.min_classifier_score

        def classify(doc: Document) -> str | None:
            s = clf.score(doc.text)
            doc.metadata["quality_score"] = round(s, 4)
            return "quality_classifier" if s < thr else None
        steps.append(FilterStep("quality_classifier", classify, k))
    if cfg.quality.perplexity_model:
        from kiln.data.quality import perplexity_filter

        if perplexity_scorer is None:
            raise ValueError("quality.perplexity_model is set but no scorer was passed: call run_pipeline(..., "
                             "perplexity_scorer=kiln.eval.kiln_lm_scorer(model_dir, tokenizer_json)) (kiln data run "
                             "--perplexity-model does this)")
        pf = perplexity_filter(perplexity_scorer, cfg.quality.max_perplexity)

        def ppl(doc: Document) -> str | None:
            reason, value = pf(doc.text)
            doc.metadata["perplexity"] = round(value, 2)
            return reason
        steps.append(FilterStep("perplexity", ppl, k))
    if cfg.toxicity is not None:
        tox = toxicity_filter(cfg.toxicity)

        def toxic(doc: Document) -> str | None:
            reason, scores = tox(doc.text, doc.metadata.get("url"))
            for name, value in scores.items():
                doc.metadata[name] = round(value, 4)
            return reason
        steps.append(FilterStep("toxicity", toxic, k))
    if cfg.pii is not None:
        pcfg = cfg.pii

        def pii(doc: Document) -> Document:
            doc.text, counts = mask_pii(doc.text, pcfg)
            stats.counters.update(counts)
            return doc
        steps.append(MapStep("pii", pii))
    return steps


# ---- reading and writing -------------------------------------------------------------------------


def read_shard(source: str, cfg: PipelineConfig, stats: Stats) -> Iterator[Document]:
    """Documents of one input (web archives here, everything else through ``kiln.data.readers``);
    every document is counted in; unreadable records are counted as errors."""
    from kiln.data.readers import (
        _Errors,
        _read_one,
        file_kind,
        is_metadata_name,
        read_documents,
    )

    errors: Counter = Counter()
    if file_kind(source) == "tar" and os.path.isfile(source):
        class _ToStats(_Errors):  # bad records of tar members go straight to stats, with member:line
            def add(self, reason: str, where: str, detail: str = "") -> None:
                super().add(reason, where, detail)
                stats.add_error(f"read_{reason}", f"{source}/{where}", 0, detail)

        errs = _ToStats(None)

        # A tar may hold WARC/HTML members (read here, with offsets) and JSONL/text/Parquet ones
        # (read by kiln.data.readers).
        def other(f, name: str, where: str) -> Iterator[Document]:
            kind = file_kind(name)
            if is_metadata_name(name.rsplit("/", 1)[-1]):  # the archive's README/LICENSE
                return iter(())
            if kind in (None, "tar"):
                stats.add_error("tar_unsupported_member", where, 0, "not a readable file type")
                return iter(())
            if kind == "parquet":
                import io

                f = io.BytesIO(f.read())
            return _read_one(f, name, kind, where, cfg.text_key, None, errs)

        for doc in read_tar(source, stats, other):
            doc.metadata.setdefault("source", source)
            stats.add_input(doc)
            yield doc
        return
    if is_web_archive(source) or ".warc" in source.lower():
        for doc in read_web(source, stats):
            doc.metadata.setdefault("source", source)
            stats.add_input(doc)
            yield doc
        return
    # An existing local path is read as itself, never as a glob ("Ballads [1885].txt").
    path = globlib.escape(source) if os.path.exists(source) and any(c in source for c in "*?[") else source
    try:
        for doc in read_documents(path, text_key=cfg.text_key, errors=errors):
            stats.add_input(doc)
            yield doc
    except (OSError, ValueError) as e:  # an unreadable input is an error of the run, never fatal
        stats.add_error("read_failed", source, 0, f"{type(e).__name__}: {e}")
    for reason, n in errors.items():
        for _ in range(n):
            stats.add_error(f"read_{reason}", source)


def _jsonl_writer(path: Path, level: int):
    import zstandard

    fh = open(path, "wb")  # noqa: SIM115 - closed by the zstd stream writer that wraps it
    return fh, zstandard.ZstdCompressor(level=level).stream_writer(fh)


def _record(doc: Document) -> bytes:
    meta = {k: v for k, v in doc.metadata.items() if k != BYTES_IN}
    return (json.dumps({"id": doc.id, "text": doc.text, **meta}, ensure_ascii=False) + "\n").encode()


def _read_jsonl_zst(path: Path) -> Iterator[Document]:
    import io

    import zstandard

    with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as r:
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            obj = json.loads(line)
            doc_id, text = obj.pop("id"), obj.pop("text")
            yield Document(text=text, id=doc_id, metadata=obj)


class _ParquetShard:
    """One Parquet output file: columns ``id``, ``text``, ``metadata`` (JSON object as a string, since
    documents' metadata keys differ), zstd-compressed, a row group every ``rows_per_group`` documents."""

    def __init__(self, path: Path, level: int, rows_per_group: int = 2000) -> None:
        try:
            import pyarrow as pa
            import pyarrow.parquet as pq
        except ImportError as e:
            raise ImportError("output_format='parquet' needs pyarrow: pip install pyarrow") from e
        self.pa = pa
        self.schema = pa.schema([("id", pa.string()), ("text", pa.string()), ("metadata", pa.string())])
        self.writer = pq.ParquetWriter(path, self.schema, compression="zstd", compression_level=level)
        self.rows: list[Document] = []
        self.rows_per_group = rows_per_group

    def write(self, doc: Document) -> None:
        self.rows.append(doc)
        if len(self.rows) >= self.rows_per_group:
            self._flush()

    def _flush(self) -> None:
        if self.rows:
            meta = [json.dumps({k: v for k, v in d.metadata.items() if k != BYTES_IN}, ensure_ascii=False) for d in self.rows]
            cols = [[d.id for d in self.rows], [d.text for d in self.rows], meta]
            self.writer.write_table(self.pa.Table.from_arrays([self.pa.array(c, self.pa.string()) for c in cols], schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


class _JsonlZstShard:
    def __init__(self, path: Path, level: int) -> None:
        self.fh, self.zw = _jsonl_writer(path, level)

    def write(self, doc: Document) -> None:
        self.zw.write(_record(doc))

    def close(self) -> None:
        self.zw.close()  # also closes fh


class _ShardWriter:
    """train (and val) shards of one output shard (``.jsonl.zst`` or ``.parquet``), written under
    temporary names, renamed on close."""

    def __init__(self, out_dir: Path, shard: int, cfg: PipelineConfig) -> None:
        self.cfg = cfg
        self.paths = {s: out_dir / f"{s}_{shard:05d}.{cfg.output_format}" for s in ("train", "val")}
        self.tmp = {s: p.with_name(f".{p.name}.tmp") for s, p in self.paths.items()}
        self.writers: dict[str, Any] = {}

    def write(self, doc: Document) -> None:
        split = "val" if self.cfg.val_fraction and unit_hash(doc.id, "val") < self.cfg.val_fraction else "train"
        if split not in self.writers:
            kind = _ParquetShard if self.cfg.output_format == "parquet" else _JsonlZstShard
            self.writers[split] = kind(self.tmp[split], self.cfg.zstd_level)
        self.writers[split].write(doc)

    def close(self) -> None:
        for split, w in self.writers.items():
            w.close()
            os.replace(self.tmp[split], self.paths[split])


# ---- shard tasks (top-level functions: they are pickled to worker processes) -------------------------


def _stats_path(work: Path, stage: str, shard: int) -> Path:
    return work / "stats" / f"{stage}_{shard:05d}.json"


def _save_stats(work: Path, stage: str, shard: int, stats: Stats) -> None:
    p = _stats_path(work, stage, shard)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(json.dumps(stats.to_dict()))
    os.replace(tmp, p)


def stage1_task(
    shard: int, source: str, cfg: PipelineConfig, out_dir: str, work: str,
    perplexity_scorer: Callable[[str], float] | None = None,
) -> None:
    """Read one input and run the per-shard steps; write survivors (+ fingerprints), stats, marker."""
    out, wk = Path(out_dir), Path(work)
    stats = Stats()
    steps = build_steps(cfg, stats, perplexity_scorer)
    docs = run_steps(read_shard(source, cfg, stats), steps, stats, count_kept=cfg.dedup is None)
    if cfg.dedup is None:
        writer = _ShardWriter(out, shard, cfg)
        for doc in docs:
            writer.write(doc)
        writer.close()
    else:
        (wk / "stage1").mkdir(parents=True, exist_ok=True)
        path = wk / "stage1" / f"{shard:05d}.jsonl.zst"
        tmp = path.with_name(path.name + ".tmp")
        _, zw = _jsonl_writer(tmp, 1)  # closing the zstd writer closes the file
        hasher = MinHasher(cfg.dedup.minhash) if cfg.dedup.minhash else None
        hashes, sigs, line_hashes = [], [], []
        for doc in docs:
            zw.write(_record_keep_bytes(doc))
            hashes.append(exact_hash(doc.text))
            if hasher is not None:
                sigs.append(hasher.signature(doc.text))
            if cfg.dedup.line_min_docs:
                line_hashes.append(np.fromiter(doc_line_hashes(doc.text, cfg.dedup.line_min_chars), dtype=np.int64))
        zw.close()
        os.replace(tmp, path)
        n_perm = cfg.dedup.minhash.num_perm if cfg.dedup.minhash else 0
        np.savez(
            wk / "stage1" / f"{shard:05d}.fp.npz",
            exact=np.array(hashes, dtype=np.int64),
            sigs=np.stack(sigs) if sigs else np.zeros((0, n_perm), dtype=np.uint32),
            lines=np.concatenate(line_hashes) if line_hashes else np.zeros(0, dtype=np.int64),
        )
    _save_stats(wk, "stage1", shard, stats)
    mark_done(wk / "markers", "stage1", shard)


def _record_keep_bytes(doc: Document) -> bytes:
    """Intermediate records keep the input size so dedup drops count the right bytes."""
    meta = dict(doc.metadata)
    return (json.dumps({"id": doc.id, "text": doc.text, **meta}, ensure_ascii=False) + "\n").encode()


def final_task(shard: int, cfg: PipelineConfig, out_dir: str, work: str) -> None:
    """Apply the global dedup decisions to one shard and write its output shards."""
    out, wk = Path(out_dir), Path(work)
    stats = Stats()
    decisions = np.load(wk / "dedup" / f"{shard:05d}.npy")
    repeated: set[int] = set()
    if cfg.dedup is not None and cfg.dedup.line_min_docs:
        repeated = set(np.load(wk / "dedup" / "repeated_lines.npy").tolist())
    writer = _ShardWriter(out, shard, cfg)
    reasons = {1: "dedup_exact", 2: "dedup_minhash"}
    for j, doc in enumerate(_read_jsonl_zst(wk / "stage1" / f"{shard:05d}.jsonl.zst")):
        code = int(decisions[j])
        if code:
            stats.add_drop(doc, reasons[code])
            continue
        if repeated:
            doc.text, removed = remove_lines(doc.text, repeated, cfg.dedup.line_min_chars)
            if removed:
                stats.counters["dedup_lines_removed"] += removed
            if not doc.text:
                stats.add_drop(doc, "dedup_line_empty")
                continue
        stats.add_kept(doc)
        writer.write(doc)
    writer.close()
    _save_stats(wk, "final", shard, stats)
    mark_done(wk / "markers", "final", shard)


def global_dedup(cfg: PipelineConfig, n_shards: int, work: Path) -> dict[str, int]:
    """Decide which documents survive across all shards; writes ``.work/dedup/<shard>.npy`` codes
    (0 keep, 1 exact duplicate, 2 near-duplicate) and the repeated-line hashes."""
    assert cfg.dedup is not None
    fps = [np.load(work / "stage1" / f"{i:05d}.fp.npz") for i in range(n_shards)]
    counts = [len(f["exact"]) for f in fps]
    offsets = np.cumsum([0] + counts)
    n = int(offsets[-1])
    codes = np.zeros(n, dtype=np.int8)
    if cfg.dedup.exact and n:
        exact = np.concatenate([f["exact"] for f in fps])
        _, first = np.unique(exact, return_index=True)
        dup = np.ones(n, dtype=bool)
        dup[first] = False
        codes[dup] = 1
    if cfg.dedup.minhash is not None and n:
        sigs = np.concatenate([f["sigs"] for f in fps])
        alive = np.flatnonzero(codes == 0)
        labels = cluster_signatures(sigs[alive], cfg.dedup.minhash)
        near = labels != np.arange(len(alive))
        codes[alive[near]] = 2
    (work / "dedup").mkdir(parents=True, exist_ok=True)
    for i in range(n_shards):
        np.save(work / "dedup" / f"{i:05d}.npy", codes[offsets[i] : offsets[i + 1]])
    if cfg.dedup.line_min_docs:
        lines = np.concatenate([f["lines"] for f in fps]) if fps else np.zeros(0, dtype=np.int64)
        uniq, cnt = np.unique(lines, return_counts=True)
        np.save(work / "dedup" / "repeated_lines.npy", uniq[cnt >= cfg.dedup.line_min_docs])
    return {"documents": n, "exact_duplicates": int((codes == 1).sum()), "near_duplicates": int((codes == 2).sum())}


# ---- the run ---------------------------------------------------------------------------------------


_READER_SUFFIXES = tuple(
    base + comp for base in (".txt", ".md", ".text", ".jsonl", ".ndjson", ".json")
    for comp in ("", ".gz", ".zst", ".zstd", ".bz2", ".xz")
) + (".parquet", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.zstd")


# Files in a folder that describe the data rather than hold it (as kiln.data.readers skips them).
_METADATA_STEMS = frozenset({"README", "LICENSE", "LICENCE", "COPYING", "NOTICE"})


def _readable(name: str) -> bool:
    """A file name ``kiln.data.readers.read_documents`` reads (by extension)."""
    return name.lower().endswith(_READER_SUFFIXES)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Input files (one shard each), sorted within each folder/glob; URLs and hf:// pass through."""
    files: list[str] = []
    for src in inputs:
        if src.startswith(("http://", "https://", "hf://")):
            files.append(src)
            continue
        if any(c in src for c in "*?["):
            matches = sorted(p for p in globlib.glob(src, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(src):
            matches = sorted(
                str(p) for p in Path(src).rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
                and (is_web_archive(p) or _readable(p.name))
                and p.name.split(".")[0].upper() not in _METADATA_STEMS
            )
        elif os.path.isfile(src):
            matches = [src]
        else:
            raise FileNotFoundError(f"input {src} does not exist; pass files, folders, globs, URLs or hf://")
        if not matches:
            raise FileNotFoundError(f"input {src} holds no readable files")
        files += matches
    return files


def _config_dict(cfg: PipelineConfig) -> dict[str, Any]:
    from kiln.artifacts import config_to_dict

    d = config_to_dict(cfg)
    d.pop("workers", None)  # how many processes ran does not change the output
    return d


def run_pipeline(
    cfg: PipelineConfig,
    inputs: list[str],
    out_dir: str | os.PathLike,
    executor: Executor | None = None,
    force: bool = False,
    keep_work: bool = False,
    perplexity_scorer: Callable[[str], float] | None = None,
) -> Stats:
    """Run the pipeline over ``inputs`` into ``out_dir``; returns the merged, balanced Stats.

    ``perplexity_scorer`` (``text -> perplexity``, picklable) serves ``cfg.quality.perplexity_model``;
    build it with ``kiln.eval.kiln_lm_scorer`` (the data stage never builds a model itself).

    A complete output with the same config and inputs is reused; an interrupted run resumes from
    its completion markers (``out_dir/.work/markers``). ``force`` recomputes from scratch.
    """
    from kiln.artifacts import MANIFEST, code_version, write_json_atomic

    out = Path(out_dir)
    files = expand_inputs(list(inputs))
    input_ids = {f: (os.path.getsize(f), int(os.path.getmtime(f))) if os.path.isfile(f) else None for f in files}
    conf = _config_dict(cfg)
    manifest = out / MANIFEST
    if manifest.is_file() and not force:
        old = json.loads(manifest.read_text())
        if old.get("config") == conf and old.get("inputs") == {k: list(v) if v else v for k, v in input_ids.items()}:
            log.info("%s is complete with the same config and inputs; reusing it", out)
            return Stats.from_dict(json.loads((out / "stats.json").read_text()))
    work = out / WORK
    if force and out.exists():
        shutil.rmtree(out)
    if manifest.exists():  # a finished run with another config: start over
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # Completion markers are only valid for the config and inputs that made them.
    key = {"config": conf, "inputs": {k: list(v) if v else v for k, v in input_ids.items()}}
    if work.exists() and (not (work / "run.json").is_file() or json.loads((work / "run.json").read_text()) != key):
        log.info("%s holds work of another config or inputs; starting over", work)
        shutil.rmtree(work)
    work.mkdir(exist_ok=True)
    write_json_atomic(work / "run.json", key)
    executor = executor or LocalExecutor(cfg.workers)
    t0 = time.time()
    markers = work / "markers"
    ran = run_tasks(executor, "stage1", stage1_task, [(f, cfg, str(out), str(work), perplexity_scorer) for f in files], markers)
    log.info("stage 1: %d shards processed (%.1fs)", ran, time.time() - t0)
    dedup_stats: dict[str, int] = {}
    if cfg.dedup is not None:
        dedup_stats = global_dedup(cfg, len(files), work)
        log.info("dedup: %s", dedup_stats)
        run_tasks(executor, "final", final_task, [(cfg, str(out), str(work)) for _ in files], markers)
    stats = Stats()
    for i in range(len(files)):
        stats.merge(Stats.from_dict(json.loads(_stats_path(work, "stage1", i).read_text())))
        if cfg.dedup is not None:
            stats.merge(Stats.from_dict(json.loads(_stats_path(work, "final", i).read_text())))
    stats.check_balance()
    seconds = time.time() - t0
    write_json_atomic(out / "stats.json", stats.to_dict())
    if cfg.report:
        from kiln.data.report import write_report

        write_report(out, stats, cfg.name, seconds=seconds)
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    write_json_atomic(manifest, {
        "manifest_version": 1, "stage": STAGE, "config": conf,
        "inputs": {k: list(v) if v else v for k, v in input_ids.items()},
        "code": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 3),
        "stats": {"docs_in": stats.docs_in, "kept": stats.kept, "bytes_in": stats.bytes_in,
                  "kept_bytes_out": stats.kept_bytes_out, "dedup": dedup_stats, "shards": len(files)},
    })
    return stats
