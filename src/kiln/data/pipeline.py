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
from pathlib import Path
from typing import Any

import numpy as np

from kiln.data.curation import (  # noqa: F401 - re-exported: kiln.data.pipeline's public names
    OUTPUT_FORMATS,
    PRESETS,
    STEPS,
    PipelineConfig,
    apply_overrides,
    config_keys,
    books,
    build_steps,
    minimal,
    web_en,
)
from kiln.data.dedup import MinHasher, cluster_signatures, doc_line_hashes, exact_hash, remove_lines
from kiln.data.document import Document
from kiln.data.executors import Executor, LocalExecutor, mark_done, run_tasks
from kiln.data.steps import Stats, run_steps, unit_hash
from kiln.data.warc import is_web_archive, read_tar, read_web
from kiln.data.writers import JsonlZstFile, SplitWriter, list_doc_files

log = logging.getLogger(__name__)

STAGE = "data"
WORK = ".work"


# ---- reading and writing -------------------------------------------------------------------------


def read_shard(source: str, cfg: PipelineConfig, stats: Stats) -> Iterator[Document]:
    """Documents of one input (web archives through :mod:`kiln.data.warc`, everything else through
    :mod:`kiln.data.readers`). Every record is counted once: a document in (``stats.add_input``), or
    an unreadable record as an error with its file and line; a record read with a repair (invalid
    UTF-8 replaced) is a document, and the repair a counter (``repaired_invalid_utf8``)."""
    from kiln.data.readers import ReadErrors, file_kind, is_metadata_name, read_documents, read_stream

    is_tar = file_kind(source) == "tar" and os.path.isfile(source)
    # Readers name a record by file (or member) and line; put the input's folder (or archive) in front.
    prefix = f"{source}/" if is_tar else os.path.join(os.path.dirname(source), "")

    def error(reason: str, where: str, detail: str) -> None:
        stats.add_error(f"read_{reason}", where if where.startswith(prefix) else prefix + where, 0, detail)

    repairs: Counter = Counter()
    errs = ReadErrors(on_error=error, repairs=repairs)
    if is_tar:
        # A tar may hold WARC/HTML members (read by kiln.data.warc, with offsets) and JSONL/text/
        # Parquet ones (read by kiln.data.readers).
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
            return read_stream(f, name, kind, where, cfg.text_key, None, errs)

        docs: Iterator[Document] = read_tar(source, stats, other)
    elif source.startswith("hf://datasets/") and (is_web_archive(source) or ".warc" in source.lower()):
        docs = _read_hf_web(source, stats)
    elif is_web_archive(source) or ".warc" in source.lower():
        docs = read_web(source, stats)
    else:
        # An existing local path is read as itself, never as a glob ("Ballads [1885].txt").
        path = globlib.escape(source) if os.path.exists(source) and any(c in source for c in "*?[") else source
        docs = read_documents(path, text_key=cfg.text_key, errors=errs)
    try:
        for doc in docs:
            doc.metadata.setdefault("source", source)
            stats.add_input(doc)
            yield doc
    except (OSError, ValueError) as e:  # an unreadable input is an error of the run, never fatal
        stats.add_error("read_failed", source, 0, f"{type(e).__name__}: {e}")
    for reason, n in repairs.items():
        stats.counters[f"repaired_{reason}"] += n


def _read_hf_web(url: str, stats: Stats) -> Iterator[Document]:
    """A WARC/WET file on the Hugging Face Hub, streamed (``hf://datasets/ORG/NAME[@REV]/PATH``)."""
    from kiln.data.readers import open_hf
    from kiln.data.warc import read_warc_stream

    with open_hf(url) as fh:
        yield from read_warc_stream(fh, url, stats)


def _read_jsonl_zst(path: Path) -> Iterator[Document]:
    import io

    import zstandard

    with open(path, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as r:
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            obj = json.loads(line)
            doc_id, text = obj.pop("id"), obj.pop("text")
            yield Document(text=text, id=doc_id, metadata=obj)


class _ShardWriter(SplitWriter):
    """train (and val, by a hash of the id) files of one output shard (``.jsonl.zst`` or ``.parquet``)."""

    def __init__(self, out_dir: Path, shard: int, cfg: PipelineConfig) -> None:
        super().__init__(out_dir, shard, cfg.output_format, cfg.zstd_level)
        self.val_fraction = cfg.val_fraction

    def write(self, doc: Document, split: str | None = None) -> None:
        if split is None:
            split = "val" if self.val_fraction and unit_hash(doc.id, "val") < self.val_fraction else "train"
        super().write(doc, split)


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
        zw = JsonlZstFile(tmp, 1, internal=True)  # keeps the input size (BYTES_IN) for dedup drops
        hasher = MinHasher(cfg.dedup.minhash) if cfg.dedup.minhash else None
        hashes, sigs, line_hashes = [], [], []
        for doc in docs:
            zw.write(doc)
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
            line_counts=np.array([len(h) for h in line_hashes], dtype=np.int64),
        )
    _save_stats(wk, "stage1", shard, stats)
    mark_done(wk / "markers", "stage1", shard)


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
        np.save(work / "dedup" / "repeated_lines.npy", repeated_lines(fps, codes, cfg.dedup.line_min_docs))
    return {"documents": n, "exact_duplicates": int((codes == 1).sum()), "near_duplicates": int((codes == 2).sum())}


def repeated_lines(fps: list[Any], codes: np.ndarray, min_docs: int) -> np.ndarray:
    """Hashes of lines found in at least ``min_docs`` *surviving* documents (``codes == 0``).

    Each document's distinct line hashes are stored together (``lines``, ``line_counts`` per
    document); a line counts once per document that survived exact and near dedup, so a page
    crawled 40 times counts its lines once, not 40 times, and keeps them (issue 24 item 8).
    """
    lines = np.concatenate([f["lines"] for f in fps]) if fps else np.zeros(0, dtype=np.int64)
    counts = np.concatenate([f["line_counts"] for f in fps]) if fps else np.zeros(0, dtype=np.int64)
    alive = np.repeat(codes == 0, counts)  # (total lines,): the line's document survived
    uniq, cnt = np.unique(lines[alive], return_counts=True)
    return uniq[cnt >= min_docs]


# ---- the run ---------------------------------------------------------------------------------------


_READER_SUFFIXES = tuple(
    base + comp for base in (".txt", ".md", ".text", ".jsonl", ".ndjson", ".json")
    for comp in ("", ".gz", ".zst", ".zstd", ".bz2", ".xz")
) + (".parquet", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.zstd")


def _readable(name: str) -> bool:
    """A file name ``kiln.data.readers.read_documents`` reads (by extension)."""
    return name.lower().endswith(_READER_SUFFIXES)


def expand_inputs(inputs: list[str]) -> list[str]:
    """Input files (one shard each), sorted within each folder/glob: ``hf://datasets/...`` becomes one
    input per remote file, a Kiln document artifact its train and val files (through its manifest);
    other URLs and Kiln's ``hf://`` shorthand pass through."""
    from kiln.data.readers import HF_FILES, artifact_files, expand_hf, is_artifact, is_metadata_name

    files: list[str] = []
    for src in inputs:
        if src.startswith(HF_FILES):
            files += expand_hf(src)
            continue
        if src.startswith(("http://", "https://", "hf://")):
            files.append(src)
            continue
        if any(c in src for c in "*?["):
            matches = sorted(p for p in globlib.glob(src, recursive=True) if os.path.isfile(p))
        elif os.path.isdir(src) and is_artifact(src):
            matches = [str(p) for split in ("train", "val") for p in artifact_files(src, split)]
        elif os.path.isdir(src):
            matches = sorted(
                str(p) for p in Path(src).rglob("*")
                if p.is_file() and not any(part.startswith(".") for part in p.relative_to(src).parts)
                and (is_web_archive(p) or _readable(p.name))
                and not is_metadata_name(p.name)
            )
        elif os.path.isfile(src):
            matches = [src]
        else:
            raise FileNotFoundError(f"input {src} does not exist; pass files, folders, globs, URLs or hf://")
        if not matches:
            raise FileNotFoundError(f"input {src} holds no readable files")
        files += matches
    return files


def input_hashes(files: list[str]) -> dict[str, str | None]:
    """Each input's content hash (SHA-256 of a local file, :func:`kiln.artifacts.input_hash`), as
    every other stage identifies inputs; None for URLs and ``hf://`` (not hashed before reading)."""
    from kiln.artifacts import input_hash

    return {f: input_hash(f) if os.path.isfile(f) else None for f in files}


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
    input_ids = input_hashes(files)
    conf = _config_dict(cfg)
    manifest = out / MANIFEST
    if manifest.is_file() and not force:
        old = json.loads(manifest.read_text())
        if old.get("config") == conf and old.get("inputs") == input_ids:
            log.info("%s is complete with the same config and inputs; reusing it", out)
            return Stats.from_dict(json.loads((out / "stats.json").read_text()))
    work = out / WORK
    if force and out.exists():
        shutil.rmtree(out)
    if manifest.exists():  # a finished run with another config: start over
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    # Completion markers are only valid for the config and inputs that made them.
    key = {"config": conf, "inputs": input_ids}
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
        "inputs": input_ids,
        "code": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "seconds": round(seconds, 3),
        "stats": {"docs_in": stats.docs_in, "kept": stats.kept, "bytes_in": stats.bytes_in,
                  "kept_bytes_out": stats.kept_bytes_out, "dedup": dedup_stats, "shards": len(files),
                  "files": list_doc_files(out)},
    })
    return stats
