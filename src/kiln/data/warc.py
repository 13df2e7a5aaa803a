"""Web archives as Documents: WARC (responses, resources), WET (text conversions), HTML files.

WARC parsing is FastWARC's (``pip install fastwarc``, part of resiliparse); legacy ``.arc`` files go
through warcio (``pip install warcio``). Bad input never stops a run: a broken record, a truncated
gzip member, an unreadable header is counted in :class:`~kiln.data.steps.Stats` as an error with
the file and byte offset where reading stopped, and the rest of the input goes on.

Each document from a WARC response carries its raw HTML in ``text`` with ``metadata["format"] ==
"html"``; the extraction step turns it into text. WET conversion records are already text.
"""

from __future__ import annotations

import gzip
import logging
import os
import tarfile
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from kiln.data.document import Document
from kiln.data.steps import BYTES_IN, Stats

log = logging.getLogger(__name__)

WARC_SUFFIXES = (".warc", ".warc.gz", ".wet", ".wet.gz", ".warc.wet.gz", ".warc.wat.gz")
ARC_SUFFIXES = (".arc", ".arc.gz")
HTML_SUFFIXES = (".html", ".htm", ".html.gz", ".htm.gz")
HTML_TYPES = ("text/html", "application/xhtml+xml")
TEXT_TYPES = ("text/plain",)


def is_web_archive(path: str | os.PathLike) -> bool:
    """True for a file this module reads (WARC, WET, ARC, HTML)."""
    name = os.fspath(path).lower()
    return name.endswith(WARC_SUFFIXES + ARC_SUFFIXES + HTML_SUFFIXES)


def _require(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"reading web archives needs {package}: pip install {package}") from e


def decode_html(raw: bytes, declared: str | None = None) -> str:
    """Bytes of a web page to str: the declared charset, else resiliparse's detection, else UTF-8."""
    if declared:
        try:
            return raw.decode(declared)
        except (LookupError, UnicodeDecodeError):
            pass
    try:
        from resiliparse.parse.encoding import bytes_to_str, detect_encoding

        return bytes_to_str(raw, detect_encoding(raw))
    except ImportError:
        return raw.decode("utf-8", errors="replace")


def _http_header(head: bytes, name: str) -> str | None:
    """Value of one HTTP header in a raw header block (case-insensitive name)."""
    for line in head.split(b"\n")[1:]:
        k, sep, v = line.partition(b":")
        if sep and k.strip().lower() == name.encode():
            return v.strip().decode("latin-1")
    return None


def _charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        k, _, v = part.strip().partition("=")
        if k.lower() == "charset" and v:
            return v.strip().strip("\"'")
    return None


def domain_of(url: str | None) -> str | None:
    """The host of a URL without ``www.`` (None for no URL)."""
    if not url:
        return None
    host = urllib.parse.urlsplit(url).hostname or ""
    return host[4:] if host.startswith("www.") else host or None


def _doc(text: str, rid: str, url: str | None, fmt: str, nbytes: int, extra: dict) -> Document:
    meta = {"url": url, "domain": domain_of(url), "format": fmt, BYTES_IN: nbytes, **extra}
    return Document(text=text, id=rid, metadata=meta)


def read_warc(path: str | os.PathLike, stats: Stats | None = None, *, max_bytes: int = 50_000_000) -> Iterator[Document]:
    """Documents from a WARC/WET file (gzip or not): HTML responses/resources and WET conversions.

    Records that hold no document (requests, warcinfo, metadata, revisits) are skipped and counted
    under ``stats.counters["warc_skipped_records"]``; a response that is not HTML or text (an image)
    becomes a ``warc_non_text`` error; a record larger than ``max_bytes`` becomes ``warc_too_large``.
    A parse failure ends the file with a ``warc_broken`` error at the last good offset.
    """
    if os.fspath(path).lower().endswith(ARC_SUFFIXES):
        yield from read_arc(path, stats)
        return
    stats = stats if stats is not None else Stats()
    src = os.fspath(path)
    fh = _open_counted(path, "warc_broken", stats)
    if fh is None:
        return
    with fh:
        yield from read_warc_stream(fh, src, stats, max_bytes=max_bytes)


def _open_counted(path: str | os.PathLike, reason: str, stats: Stats) -> IO[bytes] | None:
    """``open(path, "rb")``, or None with a ``reason`` error at offset 0 counted when it cannot be opened."""
    try:
        return open(path, "rb")
    except OSError as e:
        stats.add_error(reason, f"{os.fspath(path)}@0", 0, str(e))
        return None


def read_warc_stream(fh: IO[bytes], src: str, stats: Stats, *, max_bytes: int = 50_000_000) -> Iterator[Document]:
    """:func:`read_warc` on an open binary stream (a file, a tar member); ``src`` names it in errors."""
    fw = _require("fastwarc.warc", "fastwarc")
    offset = 0
    try:
        # HTTP headers are parsed here, not by FastWARC, so a block shorter than its declared
        # Content-Length (a truncated file) is seen and counted.
        it = fw.ArchiveIterator(fh, parse_http=False)
        for rec in it:
            offset = rec.stream_pos
            where = f"{src}@{offset}"
            rtype = rec.record_type
            is_conv = rtype == fw.WarcRecordType.conversion
            if not (is_conv or rtype in (fw.WarcRecordType.response, fw.WarcRecordType.resource)):
                stats.counters["warc_skipped_records"] += 1
                continue
            length = rec.content_length
            if length > max_bytes:
                stats.add_error("warc_too_large", where, length)
                continue
            block = rec.reader.read()
            if len(block) < length:
                stats.add_error("warc_truncated_record", where, len(block), f"{len(block)} of {length} bytes")
                continue
            url = rec.headers.get("WARC-Target-URI")
            rid = rec.headers.get("WARC-Record-ID") or where
            extra = {"source": src, "offset": offset, "date": rec.headers.get("WARC-Date")}
            if is_conv:
                yield _doc(block.decode("utf-8", errors="replace"), rid, url, "text", len(block), extra)
                continue
            ctype, body = rec.headers.get("Content-Type") or "", block
            if rtype == fw.WarcRecordType.response and block.startswith(b"HTTP/"):
                head, sep, body = block.partition(b"\r\n\r\n")
                if not sep:
                    head, _, body = block.partition(b"\n\n")
                ctype = _http_header(head, "content-type") or ""
            mime = ctype.split(";")[0].strip().lower()
            if mime in HTML_TYPES or (not mime and body.lstrip()[:1] == b"<"):
                yield _doc(decode_html(body, _charset(ctype)), rid, url, "html", len(block), extra)
            elif mime in TEXT_TYPES:
                yield _doc(decode_html(body, _charset(ctype)), rid, url, "text", len(block), extra)
            else:
                stats.add_error("warc_non_text", where, len(block), mime or "unknown content type")
    except (OSError, ValueError, EOFError) as e:  # FastWARC raises OSError on broken headers/gzip
        stats.add_error("warc_broken", f"{src}@{offset}", 0, str(e))


def read_arc(path: str | os.PathLike, stats: Stats | None = None) -> Iterator[Document]:
    """Documents from a legacy ARC file through warcio (converted to WARC records on the fly)."""
    ai = _require("warcio.archiveiterator", "warcio")
    stats = stats if stats is not None else Stats()
    src = os.fspath(path)
    offset = 0
    try:
        with open(path, "rb") as fh:
            it = ai.ArchiveIterator(fh, arc2warc=True)
            for rec in it:
                offset = it.get_record_offset()
                if rec.rec_type not in ("response", "resource"):
                    stats.counters["warc_skipped_records"] += 1
                    continue
                body = rec.content_stream().read()
                url = rec.rec_headers.get_header("WARC-Target-URI")
                ctype = (rec.http_headers.get_header("Content-Type") if rec.http_headers else None) or ""
                extra = {"source": src, "offset": offset}
                if ctype.split(";")[0].strip().lower() in HTML_TYPES:
                    yield _doc(decode_html(body, _charset(ctype)), f"{src}@{offset}", url, "html", len(body), extra)
                else:
                    stats.add_error("warc_non_text", f"{src}@{offset}", len(body), ctype or "unknown")
    except Exception as e:  # noqa: BLE001 - warcio raises ArchiveLoadFailed and assorted parse errors
        stats.add_error("warc_broken", f"{src}@{offset}", 0, f"{type(e).__name__}: {e}")


def read_html_file(path: str | os.PathLike, stats: Stats | None = None) -> Iterator[Document]:
    """One document from an HTML file (``.html``, ``.htm``, optionally ``.gz``)."""
    p = Path(path)
    try:
        raw = p.read_bytes()
        if p.name.lower().endswith(".gz"):
            import gzip

            raw = gzip.decompress(raw)
    except (OSError, EOFError) as e:
        (stats if stats is not None else Stats()).add_error("html_unreadable", str(p), 0, str(e))
        return
    yield _doc(decode_html(raw), str(p), None, "html", len(raw), {"source": str(p)})


def read_web(path: str | os.PathLike, stats: Stats | None = None) -> Iterator[Document]:
    """Dispatch on the file name: WARC/WET, ARC or HTML."""
    name = os.fspath(path).lower()
    if name.endswith(HTML_SUFFIXES):
        return read_html_file(path, stats)
    return read_warc(path, stats)


def read_tar(
    path: str | os.PathLike, stats: Stats, read_other: Callable[[IO[bytes], str, str], Iterator[Document]] | None = None
) -> Iterator[Document]:
    """Documents from a tar archive (plain, .gz/.bz2/.xz, or .zst), streamed member by member: WARC/WET
    members through :func:`read_warc_stream`, HTML members as pages, anything else through
    ``read_other(stream, member_name, source)`` (the pipeline passes Kiln's JSONL/text/Parquet reader)
    or counted as ``tar_unsupported_member``. A truncated archive ends with a ``tar_broken`` error."""
    src = os.fspath(path)
    raw = _open_counted(path, "tar_broken", stats)
    if raw is None:
        return
    with raw:
        fh: IO[bytes] = raw
        mode = "r|*"  # streaming; tarfile detects gzip/bz2/xz itself
        if src.lower().endswith((".zst", ".zstd")):
            import zstandard

            fh, mode = zstandard.ZstdDecompressor().stream_reader(raw), "r|"
        member_name = ""
        try:
            with tarfile.open(fileobj=fh, mode=mode) as tar:
                for member in tar:
                    member_name = member.name
                    base = member.name.rsplit("/", 1)[-1]
                    if not member.isfile() or base.startswith("."):
                        continue
                    f = tar.extractfile(member)
                    if f is None:
                        continue
                    where = f"{src}/{member.name}"
                    low = base.lower()
                    if low.endswith(WARC_SUFFIXES):
                        for doc in read_warc_stream(f, where, stats):
                            doc.metadata["source"] = where
                            yield doc
                    elif low.endswith(HTML_SUFFIXES):
                        data = f.read()
                        if low.endswith(".gz"):
                            import gzip

                            try:
                                data = gzip.decompress(data)
                            except (OSError, EOFError) as e:
                                stats.add_error("html_unreadable", where, len(data), str(e))
                                continue
                        yield _doc(decode_html(data), where, None, "html", len(data), {"source": where})
                    elif read_other is not None:
                        yield from read_other(f, member.name, where)
                    else:
                        stats.add_error("tar_unsupported_member", where, member.size, "not a web archive or HTML file")
        except (OSError, EOFError, tarfile.TarError) as e:
            stats.add_error("tar_broken", f"{src}@{member_name or 0}", 0, f"{type(e).__name__}: {e}")


def write_warc(pages: list[dict[str, Any]], path: Path, copies: int = 1) -> int:
    """Write pages (``{"url", "html"}`` dicts) as a gzipped WARC of response records, ``copies`` times
    each; returns the records written. The benchmarks' and tests' input; ``read_warc`` reads it back."""
    n = 0
    with gzip.open(path, "wb") as f:
        for c in range(copies):
            for i, p in enumerate(pages):
                body = p["html"].encode("utf-8")
                http = b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n\r\n" + body
                head = (
                    "WARC/1.0\r\nWARC-Type: response\r\n"
                    f"WARC-Record-ID: <urn:kiln:{c}:{i}>\r\nWARC-Target-URI: {p['url']}\r\n"
                    "WARC-Date: 2024-01-01T00:00:00Z\r\nContent-Type: application/http; msgtype=response\r\n"
                    f"Content-Length: {len(http)}\r\n\r\n"
                ).encode()
                f.write(head + http + b"\r\n\r\n")
                n += 1
    return n
