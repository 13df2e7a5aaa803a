"""The one output format of the document stages (``kiln data run`` and the corpus stage).

A document artifact is a folder of ``train_XXXXX.<fmt>`` and ``val_XXXXX.<fmt>`` files beside a
``manifest.json`` whose ``stats.files`` lists them per split (readers find the documents through it,
never by parsing ``stats.json`` or ``report.html``). ``<fmt>`` is:

- ``jsonl.zst`` (default): one JSON object a line, ``{"id", "text", <metadata fields>}``,
  zstd-compressed;
- ``parquet``: columns ``id``, ``text``, ``metadata`` (the metadata object as a JSON string, since
  documents carry different fields), zstd-compressed, a row group every 2,000 documents.

Every file is written under a temporary name and renamed when complete. :mod:`kiln.data.readers`
reads both (and the corpus stage's older ``train.jsonl`` / ``val.jsonl``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kiln.data.document import Document

DOC_FORMATS = ("jsonl.zst", "parquet")
SPLITS = ("train", "val")
INTERNAL_KEYS = frozenset({"_bytes_in"})
"""Metadata keys that never leave the pipeline (``kiln.data.steps.BYTES_IN``)."""


def doc_record(doc: Document) -> dict[str, Any]:
    """The JSON object of one document: id, text, then its metadata (never overriding id or text)."""
    rec: dict[str, Any] = {"id": doc.id, "text": doc.text}
    rec.update({k: v for k, v in doc.metadata.items() if k not in rec and k not in INTERNAL_KEYS})
    return rec


class JsonlZstFile:
    """One ``.jsonl.zst`` file being written (one JSON object a line). ``internal`` keeps the
    pipeline's own metadata keys (its intermediate files between passes)."""

    def __init__(self, path: str | os.PathLike, level: int = 3, internal: bool = False) -> None:
        import zstandard

        self.internal = internal
        self._fh = open(path, "wb")  # noqa: SIM115 - closed by the zstd stream writer that wraps it
        self._zw = zstandard.ZstdCompressor(level=level).stream_writer(self._fh)

    def write(self, doc: Document) -> None:
        rec = {"id": doc.id, "text": doc.text, **doc.metadata} if self.internal else doc_record(doc)
        self._zw.write((json.dumps(rec, ensure_ascii=False, default=str) + "\n").encode())

    def close(self) -> None:
        self._zw.close()  # also closes the file


class ParquetFile:
    """One Parquet file being written: columns ``id``, ``text``, ``metadata`` (a JSON string)."""

    def __init__(self, path: str | os.PathLike, level: int = 3, rows_per_group: int = 2000) -> None:
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
            meta = [json.dumps({k: v for k, v in doc_record(d).items() if k not in ("id", "text")},
                               ensure_ascii=False, default=str) for d in self.rows]
            cols = [[d.id for d in self.rows], [d.text for d in self.rows], meta]
            self.writer.write_table(self.pa.Table.from_arrays([self.pa.array(c, self.pa.string()) for c in cols], schema=self.schema))
            self.rows = []

    def close(self) -> None:
        self._flush()
        self.writer.close()


def doc_file_name(split: str, shard: int, fmt: str = "jsonl.zst") -> str:
    """``train_00000.jsonl.zst``: the name of one output file."""
    if fmt not in DOC_FORMATS:
        raise ValueError(f"document format {fmt!r}; pick one of {', '.join(DOC_FORMATS)}")
    return f"{split}_{shard:05d}.{fmt}"


class SplitWriter:
    """The train and val files of one output shard, created on first use, written under temporary
    names and renamed on :meth:`close`."""

    def __init__(self, out_dir: str | os.PathLike, shard: int, fmt: str = "jsonl.zst", level: int = 3) -> None:
        self.paths = {s: Path(out_dir) / doc_file_name(s, shard, fmt) for s in SPLITS}
        self.tmp = {s: p.with_name(f".{p.name}.tmp") for s, p in self.paths.items()}
        self.fmt, self.level = fmt, level
        self.writers: dict[str, JsonlZstFile | ParquetFile] = {}
        self.counts = dict.fromkeys(SPLITS, 0)

    def write(self, doc: Document, split: str = "train") -> None:
        if split not in self.writers:
            kind = ParquetFile if self.fmt == "parquet" else JsonlZstFile
            self.writers[split] = kind(self.tmp[split], self.level)
        self.writers[split].write(doc)
        self.counts[split] += 1

    def close(self) -> dict[str, Path]:
        """Finish the files; returns the path of each split that got documents."""
        for split, w in self.writers.items():
            w.close()
            os.replace(self.tmp[split], self.paths[split])
        return {s: self.paths[s] for s in self.writers}


def list_doc_files(out_dir: str | os.PathLike) -> dict[str, list[str]]:
    """The output files in a folder, per split (names relative to it, sorted): ``stats.files``."""
    d = Path(out_dir)
    return {s: sorted(p.name for p in d.glob(f"{s}_*") if p.name.endswith(DOC_FORMATS)) for s in SPLITS}


def read_records(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The JSON objects of a ``.jsonl.zst`` file this module wrote (or a plain ``.jsonl``), in order."""
    import io

    p = Path(path)
    if not p.name.endswith(".zst"):
        with open(p, encoding="utf-8") as f:
            yield from (json.loads(line) for line in f if line.strip())
        return
    import zstandard

    with open(p, "rb") as fh, zstandard.ZstdDecompressor().stream_reader(fh) as r:
        for line in io.TextIOWrapper(r, encoding="utf-8"):
            yield json.loads(line)


def write_records(path: str | os.PathLike, records: Iterable[dict[str, Any]], level: int = 3) -> int:
    """Write JSON objects as a ``.jsonl.zst`` file (temporary name, then rename); returns how many."""
    import zstandard

    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    n = 0
    with open(tmp, "wb") as fh, zstandard.ZstdCompressor(level=level).stream_writer(fh) as zw:
        for rec in records:
            zw.write((json.dumps(rec, ensure_ascii=False, default=str) + "\n").encode())
            n += 1
    os.replace(tmp, p)
    return n
