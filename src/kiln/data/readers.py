"""Read documents from wherever text lives: local files, folders, globs, archives, URLs, Hugging Face.

``read_documents(source)`` is the one entry point. ``source`` is one of:

- a local file: ``.txt``/``.md`` (one document per file), ``.jsonl``/``.ndjson``/``.json`` (one
  JSON object per line; a ``.json`` file holding one array is read as that array), any of those
  compressed as ``.gz``, ``.zst``, ``.bz2`` or ``.xz`` (``.json.gz`` is C4's gzipped jsonl),
  ``.parquet`` (needs ``pyarrow``), or a ``.tar`` archive (plain, ``.gz``/``.tgz``, ``.bz2``,
  ``.xz``, ``.zst``) of those, streamed member by member (never extracted to disk);
- a folder (every supported file under it, sorted) or a glob (``data/*.jsonl.zst``, ``**`` allowed);
  in folders, globs and archives, hidden files and the dataset's own README/LICENSE are skipped, and
  an archive member without an extension is read as text when it sniffs as UTF-8;
- an ``http(s)://`` URL, downloaded once into a cache folder and then read by its extension;
- ``hf://<dataset>[/<config>][:split]``, streamed through ``datasets.load_dataset(..., streaming=True)``.
  ``<dataset>`` is ``owner/name`` when the path has two or more parts (``hf://roneneldan/TinyStories``,
  ``hf://HuggingFaceFW/fineweb/sample-10BT:train``) and a bare name when it has one part.

Bad records (a line that is not JSON, an object without the text field, bytes that are not UTF-8, a
truncated compressed file) are *counted* in ``errors`` by reason and logged with file and line; they
never stop the read. Ids are ``"<file>:<line>"`` for line-based files (1-based, as an editor shows
them), ``"<file>:<row>"`` for Parquet and Hugging Face rows (0-based), and the file's path for one
text file. Every document's metadata holds ``source`` and the record's other fields.
"""

from __future__ import annotations

import collections
import glob as globlib
import gzip
import hashlib
import io
import json
import logging
import os
import tarfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any

from kiln.data.document import Document

log = logging.getLogger(__name__)

TEXT_EXTS = (".txt", ".md", ".text", ".markdown")
JSONL_EXTS = (".jsonl", ".ndjson", ".json")
COMPRESSED_EXTS = (".gz", ".zst", ".zstd", ".bz2", ".xz")
TAR_EXTS = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz", ".tar.zst", ".tar.zstd")
PARQUET_EXTS = (".parquet",)
#: How many bad records per reason are logged at WARNING before the rest go to DEBUG.
MAX_WARNINGS_PER_REASON = 10


class ReadErrors:
    """Where readers report what they met: bad records (counted by reason, the first few of each
    logged with file and line) and repairs (a record read with a fix, kept: bytes that are not
    UTF-8 replaced by U+FFFD). A record is either an error or a document, never both, so a funnel
    that counts documents in and errors in counts every record exactly once.

    Args:
        counter: receives error counts by reason (``invalid_json``, ``missing_text_key``...).
        on_error: also called as ``on_error(reason, where, detail)`` per bad record (the pipeline
            counts each into its Stats with its location).
        repairs: receives repair counts by reason (``invalid_utf8``).
    """

    def __init__(
        self,
        counter: collections.Counter | None = None,
        on_error: Callable[[str, str, str], None] | None = None,
        repairs: collections.Counter | None = None,
    ) -> None:
        self.counter = counter if counter is not None else collections.Counter()
        self.repairs = repairs if repairs is not None else collections.Counter()
        self.on_error = on_error
        self._logged: collections.Counter = collections.Counter()

    def add(self, reason: str, where: str, detail: str = "") -> None:
        """Count one record that could not be read."""
        self.counter[reason] += 1
        if self.on_error is not None:
            self.on_error(reason, where, detail)  # the receiver logs it
        else:
            self._log(reason, where, detail)

    def repair(self, reason: str, where: str, detail: str = "") -> None:
        """Count one record that was read with a fix (it is still a document, not an error)."""
        self.repairs[reason] += 1
        self._log(f"repaired_{reason}", where, detail)

    def _log(self, reason: str, where: str, detail: str) -> None:
        self._logged[reason] += 1
        msg = "%s: %s%s"
        args = (where, reason, f" ({detail})" if detail else "")
        if self._logged[reason] <= MAX_WARNINGS_PER_REASON:
            log.warning(msg, *args)
            if self._logged[reason] == MAX_WARNINGS_PER_REASON:
                log.warning("further '%s' messages are logged at DEBUG level only", reason)
        else:
            log.debug(msg, *args)


_Errors = ReadErrors  # the old private name


def file_kind(name: str) -> str | None:
    """How a file is read, from its name: 'text', 'jsonl', 'parquet', 'tar', or None (unsupported)."""
    low = name.lower()
    if low.endswith(TAR_EXTS):
        return "tar"
    for comp in COMPRESSED_EXTS:
        if low.endswith(comp):
            low = low[: -len(comp)]
            break
    if low.endswith(TEXT_EXTS):
        return "text"
    if low.endswith(JSONL_EXTS):
        return "jsonl"
    if low.endswith(PARQUET_EXTS):
        return "parquet"
    return None


def _strip_compression(name: str) -> str:
    low = name.lower()
    for comp in COMPRESSED_EXTS:
        if low.endswith(comp):
            return low[: -len(comp)]
    return low


def _peek_nonspace(stream: IO[bytes]) -> bytes:
    """The first non-whitespace byte of a buffered stream, without consuming it (b"" if unknown)."""
    peek = getattr(stream, "peek", None)
    if peek is None:
        return b""
    head = peek(64)[:64].lstrip(b" \t\r\n")
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:].lstrip()
    return head[:1]


METADATA_STEMS = frozenset({"README", "LICENSE", "LICENCE", "COPYING", "NOTICE"})


def is_metadata_name(base: str) -> bool:
    """Whether a file in a folder or archive is the dataset's own README/LICENSE, not a document.

    Such files are skipped when a folder or archive is read; name one explicitly to read it.
    """
    return base.split(".", 1)[0].upper() in METADATA_STEMS


def _looks_like_text(f: IO[bytes], n: int = 4096) -> bool:
    """Whether a buffered stream starts with UTF-8 text (no NUL bytes); does not consume it."""
    head = f.peek(n)[:n] if hasattr(f, "peek") else b""
    if not head or b"\0" in head:
        return False
    for cut in range(4):  # the window may end inside a multi-byte character
        try:
            head[: len(head) - cut].decode("utf-8")
            return True
        except UnicodeDecodeError:
            continue
    return False


def _supported() -> str:
    return ", ".join(TEXT_EXTS + JSONL_EXTS + PARQUET_EXTS + TAR_EXTS) + " (text and jsonl also as .gz/.zst/.bz2/.xz)"


def _decompress(raw: IO[bytes], name: str) -> IO[bytes]:
    """Wrap a binary stream in the decompressor its name asks for (or return it unchanged)."""
    low = name.lower()
    if low.endswith((".gz", ".tgz")):
        return gzip.GzipFile(fileobj=raw, mode="rb")  # type: ignore[return-value]
    if low.endswith((".zst", ".zstd")):
        import zstandard

        # max_window_size: files written with --long (up to 2 GiB windows) still decompress.
        dctx = zstandard.ZstdDecompressor(max_window_size=2**31)
        return io.BufferedReader(dctx.stream_reader(raw, read_across_frames=True))  # type: ignore[arg-type]
    if low.endswith(".bz2"):
        import bz2

        return bz2.BZ2File(raw, "rb")  # type: ignore[return-value]
    if low.endswith(".xz"):
        import lzma

        return lzma.LZMAFile(raw, "rb")  # type: ignore[return-value]
    return raw


# Exceptions a truncated or corrupt compressed stream raises mid-read.
def _stream_errors() -> tuple[type[BaseException], ...]:
    import lzma

    errs: list[type[BaseException]] = [EOFError, OSError, gzip.BadGzipFile, tarfile.TarError, lzma.LZMAError]
    try:
        import zstandard

        errs.append(zstandard.ZstdError)
    except ImportError:  # pragma: no cover - zstandard is a dependency
        pass
    return tuple(errs)


def _decode(data: bytes, where: str, errors: ReadErrors) -> str:
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        errors.repair("invalid_utf8", where, f"byte {e.start}; undecodable bytes replaced by U+FFFD, record kept")
        text = data.decode("utf-8", errors="replace")
    return text.removeprefix("\ufeff")


def _record_to_doc(
    obj: Any, doc_id: str, where: str, source: str, text_key: str, id_key: str | None, errors: ReadErrors
) -> Document | None:
    """A JSON/Parquet/HF record as a Document, or None (counted) if it is not usable."""
    if not isinstance(obj, Mapping):
        errors.add("not_an_object", where, f"expected a JSON object, got {type(obj).__name__}")
        return None
    text = obj.get(text_key)
    if not isinstance(text, str):
        reason = "missing_text_key" if text is None else "text_not_a_string"
        errors.add(reason, where, f"no string field '{text_key}'; pass text_key=... to read another field")
        return None
    if id_key is not None and obj.get(id_key) is not None:
        doc_id = str(obj[id_key])
    meta = {k: v for k, v in obj.items() if k != text_key and k != id_key}
    meta["source"] = source
    return Document(text=text, id=doc_id, metadata=meta)


def _read_text(fh: IO[bytes], name: str, source: str, errors: ReadErrors) -> Iterator[Document]:
    try:
        data = _decompress(fh, name).read()
    except _stream_errors() as e:
        errors.add("truncated_file", name, str(e))
        return
    yield Document(text=_decode(data, name, errors), id=name, metadata={"source": source})


def _read_jsonl(
    fh: IO[bytes], name: str, source: str, text_key: str, id_key: str | None, errors: ReadErrors
) -> Iterator[Document]:
    stream = _decompress(fh, name)
    lineno = 0
    try:
        if _strip_compression(name).endswith(".json") and _peek_nonspace(stream) == b"[":
            data = _decode(stream.read(), name, errors)
            try:
                records = json.loads(data)
            except json.JSONDecodeError as e:
                errors.add("invalid_json", f"{name}:{e.lineno}", e.msg)
                return
            for i, obj in enumerate(records if isinstance(records, list) else [records]):
                doc = _record_to_doc(obj, f"{name}:{i}", f"{name}[{i}]", source, text_key, id_key, errors)
                if doc is not None:
                    yield doc
            return
        for raw in stream:
            lineno += 1
            if not raw.strip():
                continue
            where = f"{name}:{lineno}"
            line = _decode(raw, where, errors)
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                errors.add("invalid_json", where, e.msg)
                continue
            doc = _record_to_doc(obj, where, where, source, text_key, id_key, errors)
            if doc is not None:
                yield doc
    except _stream_errors() as e:
        errors.add("truncated_file", f"{name}:{lineno + 1}", str(e))


def _read_parquet(
    fh: IO[bytes] | str, name: str, source: str, text_key: str, id_key: str | None, errors: ReadErrors
) -> Iterator[Document]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ImportError(
            f"reading {name} needs pyarrow, which is not installed: pip install pyarrow"
        ) from e
    row = 0
    try:
        pf = pq.ParquetFile(fh)
        for batch in pf.iter_batches(batch_size=1024):
            for obj in batch.to_pylist():
                doc = _record_to_doc(obj, f"{name}:{row}", f"{name}:{row}", source, text_key, id_key, errors)
                row += 1
                if doc is not None:
                    yield doc
    except (pa.ArrowException, OSError) as e:  # not Parquet, or cut short
        errors.add("unreadable_parquet", f"{name}:{row}", str(e))


def _read_tar(
    fh: IO[bytes], name: str, source: str, text_key: str, id_key: str | None, errors: ReadErrors
) -> Iterator[Document]:
    low = name.lower()
    if low.endswith((".zst", ".zstd")):
        fh, mode = _decompress(fh, name), "r|"
    else:
        mode = "r|*"  # streaming; tarfile detects gzip/bz2/xz itself
    try:
        with tarfile.open(fileobj=fh, mode=mode) as tar:
            for member in tar:
                base = member.name.rsplit("/", 1)[-1]
                if not member.isfile() or base.startswith(".") or is_metadata_name(base):
                    continue
                f = tar.extractfile(member)
                if f is None:
                    continue
                kind = file_kind(member.name)
                if kind is None and "." not in base and _looks_like_text(f):
                    kind = "text"  # a name cut short (e.g. at 255 bytes) lost its .txt: sniff it
                if kind is None or kind == "tar":
                    errors.add("unsupported_member", f"{name}/{member.name}", "not a readable file type; skipped")
                    continue
                if kind == "parquet":  # needs random access: read the member into memory
                    f = io.BytesIO(f.read())  # type: ignore[assignment]
                yield from read_stream(f, member.name, kind, f"{source}/{member.name}", text_key, id_key, errors)
    except _stream_errors() as e:
        errors.add("truncated_file", name, str(e))


def read_stream(
    fh: IO[bytes], name: str, kind: str, source: str, text_key: str = "text", id_key: str | None = None,
    errors: ReadErrors | None = None,
) -> Iterator[Document]:
    """Documents of one open binary stream (a file, an archive member) of ``kind`` (:func:`file_kind`
    of its name: text, jsonl, parquet, tar); ``name`` places bad records (``name:line``), ``source``
    goes into each document's metadata."""
    errors = errors if errors is not None else ReadErrors()
    if kind == "text":
        yield from _read_text(fh, name, source, errors)
    elif kind == "jsonl":
        yield from _read_jsonl(fh, name, source, text_key, id_key, errors)
    elif kind == "parquet":
        yield from _read_parquet(fh, name, source, text_key, id_key, errors)
    elif kind == "tar":
        yield from _read_tar(fh, name, source, text_key, id_key, errors)
    else:  # pragma: no cover - callers check the kind
        raise AssertionError(kind)


def _read_file(
    path: Path, name: str, text_key: str, id_key: str | None, errors: ReadErrors, source: str | None = None
) -> Iterator[Document]:
    kind = file_kind(path.name)
    if kind is None:
        raise ValueError(f"{path}: unsupported file type; Kiln reads {_supported()}")
    try:
        fh = open(path, "rb")  # noqa: SIM115 - closed by the with below; open errors get their own message
    except OSError as e:
        raise FileNotFoundError(f"cannot read {path}: {e.strerror}; check the path and its permissions") from e
    with fh:
        yield from read_stream(fh, name, kind, source or str(path), text_key, id_key, errors)


def _expand_local(source: str) -> list[tuple[Path, str]]:
    """(path, display name) of every supported file a local path, folder or glob names."""
    if any(c in source for c in "*?["):
        paths = sorted(Path(p) for p in globlib.glob(source, recursive=True))
        files = [p for p in paths if p.is_file() and file_kind(p.name) is not None and not is_metadata_name(p.name)]
        if not files:
            raise FileNotFoundError(f"no supported files match {source!r}; Kiln reads {_supported()}")
        return [(p, str(p)) for p in files]
    p = Path(source).expanduser()
    if p.is_file():
        return [(p, p.name)]
    if p.is_dir():
        files = sorted(
            q for q in p.rglob("*")
            if q.is_file() and file_kind(q.name) is not None and not is_metadata_name(q.name)
            and not any(part.startswith(".") for part in q.relative_to(p).parts)
        )
        if not files:
            raise FileNotFoundError(f"folder {p} holds no supported files; Kiln reads {_supported()}")
        return [(q, str(q.relative_to(p))) for q in files]
    raise FileNotFoundError(f"{source} does not exist; pass a file, folder, glob, http(s) URL or hf://dataset")


def default_cache_dir() -> Path:
    """Where downloads are cached: ``$KILN_CACHE/downloads`` or ``~/.cache/kiln/downloads``."""
    root = os.environ.get("KILN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kiln")
    return Path(root) / "downloads"


def download(
    url: str, cache_dir: str | os.PathLike | None = None, timeout: float = 60.0, retries: int = 4,
    backoff_s: float = 1.0,
) -> Path:
    """Download ``url`` once into ``cache_dir`` (temp file, then rename) and return the local path.

    The cached name is a hash of the URL plus its last path component, so the extension (which
    decides how the file is read) survives. A file already in the cache is not downloaded again.
    A failed attempt (network error, timeout, HTTP 5xx or 429) is retried ``retries`` times after
    ``backoff_s``, then 2x, 4x... that wait; other HTTP errors (404) fail at once.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    base = os.path.basename(urllib.parse.urlparse(url).path) or "download"
    dest = cache / f"{hashlib.sha256(url.encode()).hexdigest()[:16]}-{base}"
    if dest.is_file():
        return dest
    cache.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
        log.info("downloading %s -> %s", url, dest)
        try:
            with urllib.request.urlopen(url, timeout=timeout) as resp, open(tmp, "wb") as out:
                while chunk := resp.read(1 << 20):
                    out.write(chunk)
            os.replace(tmp, dest)
            return dest
        except (urllib.error.URLError, OSError) as e:
            tmp.unlink(missing_ok=True)
            code = getattr(e, "code", None)
            transient = code is None or code >= 500 or code == 429
            if not transient or attempt == retries:
                raise RuntimeError(
                    f"could not download {url} ({attempt + 1} attempts): {e}; check the URL and the network, "
                    "or download the file yourself and pass its local path"
                ) from e
            wait = backoff_s * 2**attempt
            log.warning("downloading %s failed (%s); retrying in %.1f s", url, e, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def parse_hf_source(source: str) -> tuple[str, str | None, str]:
    """Split ``hf://<dataset>[/<config>][:split]`` into (dataset, config, split); split defaults to train."""
    rest = source[len("hf://"):]
    split = "train"
    if ":" in rest:
        rest, split = rest.rsplit(":", 1)
    parts = [p for p in rest.split("/") if p]
    if not parts or not split:
        raise ValueError(f"{source!r} is not hf://<dataset>[/<config>][:split], e.g. hf://roneneldan/TinyStories:train")
    if len(parts) <= 2:
        return "/".join(parts), None, split
    return "/".join(parts[:2]), "/".join(parts[2:]), split


def _read_hf(source: str, text_key: str, id_key: str | None, errors: ReadErrors) -> Iterator[Document]:
    name, config, split = parse_hf_source(source)
    try:
        import datasets
    except ImportError as e:
        raise ImportError(
            f"reading {source} needs the Hugging Face datasets package: pip install datasets"
        ) from e
    ds = datasets.load_dataset(name, config, split=split, streaming=True)
    prefix = f"{name}{'/' + config if config else ''}:{split}"
    for i, obj in enumerate(ds):
        doc = _record_to_doc(obj, f"{prefix}:{i}", f"{source} row {i}", source, text_key, id_key, errors)
        if doc is not None:
            yield doc


HF_FILES = "hf://datasets/"
"""Prefix of Hugging Face's own file URLs, ``hf://datasets/ORG/NAME[@REV]/PATH`` (``HfFileSystem``)."""


def _hf_fs() -> Any:
    try:
        from huggingface_hub import HfFileSystem
    except ImportError as e:
        raise ImportError("reading hf://datasets/... needs huggingface_hub: pip install huggingface_hub") from e
    return HfFileSystem()


def expand_hf(source: str, fs: Any = None) -> list[str]:
    """The files an ``hf://datasets/ORG/NAME[@REV]/PATH`` URL names, one URL each (a file, every
    readable file under a folder, or a glob), sorted; the pipeline makes each one shard."""
    fs = fs if fs is not None else _hf_fs()
    path = source[len("hf://"):]
    if any(c in path for c in "*?["):
        found = list(fs.glob(path))
    elif fs.isdir(path):
        found = list(fs.find(path))
    else:
        found = [path]
    files = sorted(
        f for f in found
        if (file_kind(f.rsplit("/", 1)[-1]) is not None or _is_web_name(f))
        and not is_metadata_name(f.rsplit("/", 1)[-1]) and not f.rsplit("/", 1)[-1].startswith(".")
    )
    if not files:
        raise FileNotFoundError(f"{source} names no readable files; Kiln reads {_supported()}")
    return ["hf://" + f.lstrip("/") for f in files]


def _is_web_name(name: str) -> bool:
    return name.lower().endswith((".warc", ".warc.gz", ".wet", ".wet.gz", ".arc", ".arc.gz"))


def open_hf(url: str, fs: Any = None) -> IO[bytes]:
    """An ``hf://datasets/...`` file opened for reading (binary, seekable)."""
    fs = fs if fs is not None else _hf_fs()
    return fs.open(url[len("hf://"):], "rb")


def _read_hf_files(source: str, text_key: str, id_key: str | None, errors: ReadErrors) -> Iterator[Document]:
    fs = _hf_fs()
    for url in expand_hf(source, fs):
        name = url.rsplit("/", 1)[-1]
        kind = file_kind(name)
        if kind is None:
            raise ValueError(f"{url}: a web archive; read it with `kiln data run` (which reads WARC/WET)")
        with open_hf(url, fs) as fh:
            yield from read_stream(fh, name, kind, url, text_key, id_key, errors)


DOC_STAGES = ("data", "corpus")
"""Artifact stages whose folders hold documents (``kiln data run``, the corpus stage)."""


def is_artifact(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a finished Kiln artifact folder (it holds ``manifest.json``)."""
    return (Path(path) / "manifest.json").is_file()


def artifact_files(folder: str | os.PathLike, split: str = "train") -> list[Path]:
    """The document files of one split of a document artifact, as its manifest lists them
    (``stats.files``); for artifacts written before that list, the corpus stage's ``<split>.jsonl``
    or the ``<split>_XXXXX.*`` shards. Never the artifact's own ``stats.json``/``report.html``."""
    d = Path(folder)
    try:
        manifest = json.loads((d / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{d}/manifest.json is unreadable ({e}); rerun the stage that wrote {d}") from e
    stage = manifest.get("stage")
    if stage not in DOC_STAGES:
        raise ValueError(f"{d} is a '{stage}' artifact, not documents; pass the folder of `kiln data run` "
                         "or of the corpus stage")
    files = (manifest.get("stats") or {}).get("files")
    if isinstance(files, dict):
        return [d / n for n in files.get(split, [])]
    legacy = d / f"{split}.jsonl"
    if legacy.is_file():
        return [legacy]
    return sorted(p for p in d.glob(f"{split}_*") if p.is_file() and file_kind(p.name) is not None)


def _iter_source(
    source: str, text_key: str, id_key: str | None, errors: ReadErrors, cache_dir: str | os.PathLike | None,
    split: str = "train",
) -> Iterator[Document]:
    if source.startswith(HF_FILES):
        yield from _read_hf_files(source, text_key, id_key, errors)
    elif source.startswith("hf://"):
        yield from _read_hf(source, text_key, id_key, errors)
    elif source.startswith(("http://", "https://")):
        base = os.path.basename(urllib.parse.urlparse(source).path)
        if file_kind(base) is None:
            raise ValueError(
                f"{source}: cannot tell the file type from the URL (Kiln reads {_supported()}); "
                "download it and pass the local path with the right extension"
            )
        path = download(source, cache_dir)
        yield from _read_file(path, base, text_key, id_key, errors, source=source)
    elif is_artifact(source):
        for path in artifact_files(source, split):
            yield from _read_file(path, path.name, text_key, id_key, errors)
    else:
        for path, name in _expand_local(source):
            yield from _read_file(path, name, text_key, id_key, errors)


def read_documents(
    source: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    text_key: str = "text",
    id_key: str | None = None,
    limit: int | None = None,
    errors: collections.Counter | ReadErrors | None = None,
    cache_dir: str | os.PathLike | None = None,
    repairs: collections.Counter | None = None,
    split: str = "train",
) -> Iterator[Document]:
    """Stream Documents from a file, folder, glob, archive, URL or ``hf://`` dataset (see module doc).

    Args:
        source: where to read (a list of sources is read in order).
        text_key: the field holding the text in JSON, Parquet and Hugging Face records.
        id_key: a field to use as the document id (default: ``"<file>:<line>"``).
        limit: stop after this many documents.
        errors: a Counter that receives bad-record counts by reason (``invalid_json``,
            ``missing_text_key``, ``truncated_file``...), or a :class:`ReadErrors`.
        repairs: a Counter that receives counts of records read with a fix and kept
            (``invalid_utf8``: undecodable bytes replaced by U+FFFD); such a record is not an error.
        cache_dir: where URL downloads are cached (default :func:`default_cache_dir`).
        split: which split of a Kiln document artifact folder to read (``train`` or ``val``).

    Raises:
        FileNotFoundError: the source does not exist or holds no supported file.
        ValueError: the file type is not supported.
        ImportError: an optional dependency (pyarrow, datasets) is missing; the message names it.
    """
    if limit is not None and limit <= 0:
        return
    errs = errors if isinstance(errors, ReadErrors) else ReadErrors(errors, repairs=repairs)
    sources = [source] if isinstance(source, (str, os.PathLike)) else list(source)
    n = 0
    for src in sources:
        for doc in _iter_source(os.fspath(src), text_key, id_key, errs, cache_dir, split):
            yield doc
            n += 1
            if limit is not None and n >= limit:
                return


_read_one = read_stream  # the old private name


def read_texts(
    sources: str | os.PathLike | Iterable[str | os.PathLike], split: str = "train", text_key: str = "text",
    errors: collections.Counter | None = None,
) -> Iterator[str]:
    """The texts of :func:`read_documents` (any format Kiln reads or writes; an artifact folder's
    ``split``): what the tokenizer stage trains on when given this reader."""
    for doc in read_documents(sources, text_key=text_key, errors=errors, split=split):
        yield doc.text
