"""Stage artifacts: one directory per stage, written atomically, with ``manifest.json`` written last.

Every Kiln stage (corpus, tokenizer, tokens, train, eval...) writes its outputs into one directory.
The directory is built under a temporary sibling path and renamed into place only when the stage
has finished, so a killed run never leaves a half-written artifact behind. ``manifest.json`` is the
last file written: its presence means the artifact is complete.

The manifest records the stage name, the full config, each input's path and content hash, the code
version and summary statistics. A stage whose stage name, config and input hashes are unchanged is
*reused*, not recomputed (``StageRun.reused``).

Usage::

    with StageRun(out_dir, "tokenizer", cfg, inputs=[corpus_path]) as run:
        if not run.reused:
            train_and_save(run.tmp / "tokenizer.json")
            run.stats["vocab_size"] = 8192
    manifest = run.manifest   # read back (reused) or freshly written
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
MANIFEST_VERSION = 1
_HASH_CACHE: dict[tuple[str, int, int], str] = {}


class KilnError(Exception):
    """A failure Kiln can explain in one line: bad input, a damaged or foreign artifact, a config that
    cannot work. The message names the file (and line, record or key) and says what to do; ``kiln``
    prints it without a traceback (``--debug`` or ``KILN_DEBUG=1`` shows one). Every stage's own
    error classes derive from it (``ArtifactError``, ``ShardFormatError``, ``CheckpointError``...)."""


class ArtifactError(KilnError, RuntimeError):
    """An artifact directory is missing, incomplete or not of the expected stage."""


def file_sha256(path: str | os.PathLike, chunk_bytes: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes (hex). Cached per (path, size, mtime) within the process."""
    p = Path(path)
    st = p.stat()
    key = (str(p.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _HASH_CACHE:
        h = hashlib.sha256()
        with open(p, "rb") as f:
            while chunk := f.read(chunk_bytes):
                h.update(chunk)
        _HASH_CACHE[key] = h.hexdigest()
    return _HASH_CACHE[key]


def input_hash(path: str | os.PathLike) -> str:
    """Content hash of an input: a file's SHA-256, a directory's hash over its files.

    For a directory that holds a complete Kiln artifact, the manifest's own content hash stands for
    the whole directory (it already pins every input and output of that stage), so chaining stages
    costs nothing however large the artifact is.
    """
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"input {p} does not exist; check the path or run the stage that makes it")
    if p.is_file():
        return file_sha256(p)
    manifest = p / MANIFEST
    if manifest.is_file():
        return "manifest:" + file_sha256(manifest)
    h = hashlib.sha256()
    for f in sorted(q for q in p.rglob("*") if q.is_file()):
        h.update(str(f.relative_to(p)).encode())
        h.update(file_sha256(f).encode())
    return "dir:" + h.hexdigest()


def config_to_dict(cfg: Any) -> Any:
    """A JSON-able view of a (nested) config dataclass, dict, list or scalar."""
    if dataclasses.is_dataclass(cfg) and not isinstance(cfg, type):
        return {f.name: config_to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, Mapping):
        return {str(k): config_to_dict(v) for k, v in cfg.items()}
    if isinstance(cfg, (list, tuple)):
        return [config_to_dict(v) for v in cfg]
    if isinstance(cfg, os.PathLike):
        return os.fspath(cfg)
    if cfg is None or isinstance(cfg, (bool, int, float, str)):
        return cfg
    return repr(cfg)


def code_version() -> dict[str, str]:
    """Kiln's version, the git commit when run from a checkout, and the library versions."""
    from kiln import __version__

    info = {"kiln": __version__, "python": platform.python_version()}
    try:
        import torch

        info["torch"] = torch.__version__
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass
    try:
        root = Path(__file__).resolve().parents[2]
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5
        )
        if sha.returncode == 0:
            info["git"] = sha.stdout.strip()
            dirty = subprocess.run(
                ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                capture_output=True, text=True, timeout=5,
            )
            if dirty.returncode == 0 and dirty.stdout.strip():
                info["git"] += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def read_manifest(artifact_dir: str | os.PathLike, stage: str | None = None) -> dict[str, Any]:
    """Load ``manifest.json`` of a complete artifact; check its stage when ``stage`` is given."""
    d = Path(artifact_dir)
    path = d / MANIFEST
    if not path.is_file():
        if not d.exists():
            raise ArtifactError(f"{d} does not exist; run the stage that writes it first")
        raise ArtifactError(f"{d} has no {MANIFEST}: it is incomplete or not a Kiln artifact; delete it and rerun")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path} is not valid JSON ({e}); delete {d} and rerun the stage") from e
    if stage is not None and manifest.get("stage") != stage:
        raise ArtifactError(
            f"{d} is a '{manifest.get('stage')}' artifact, but a '{stage}' artifact was expected"
        )
    return manifest


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename (never half-written)."""
    p = Path(path)
    tmp = p.with_name(f".{p.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and a rename (never half-written)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


class StageRun:
    """Context manager for one stage's artifact directory (see the module docstring).

    Args:
        out_dir: final artifact directory.
        stage: stage name recorded in the manifest (``"tokenizer"``, ``"tokens"``...).
        config: the stage's frozen config dataclass (or a dict); recorded in full.
        inputs: files or artifact directories this stage reads; their content hashes are recorded.
        force: recompute even if a matching artifact exists.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        stage: str,
        config: Any,
        inputs: Iterable[str | os.PathLike] = (),
        force: bool = False,
    ) -> None:
        self.out_dir = Path(out_dir)
        self.stage = stage
        self.config = config_to_dict(config)
        self.inputs = {os.fspath(p): input_hash(p) for p in inputs}
        self.stats: dict[str, Any] = {}
        self.manifest: dict[str, Any] | None = None
        self.reused = False
        if not force and (self.out_dir / MANIFEST).is_file():
            try:
                old = read_manifest(self.out_dir)
            except ArtifactError:
                old = None
            if old is not None and self._matches(old):
                self.reused = True
                self.manifest = old
        self.tmp = self.out_dir.with_name(f".{self.out_dir.name}.tmp-{uuid.uuid4().hex[:8]}")
        self._t0 = time.time()

    def _matches(self, old: Mapping[str, Any]) -> bool:
        return (
            old.get("stage") == self.stage
            and old.get("config") == self.config
            and {k: v for k, v in old.get("inputs", {}).items()} == self.inputs
        )

    def write_manifest(self, directory: Path, seconds: float | None = None) -> dict[str, Any]:
        """Write ``manifest.json`` (stage, config, inputs, code, ``self.stats``) into ``directory``,
        atomically; the last file of an artifact. ``seconds`` defaults to the time since creation."""
        self.manifest = {
            "manifest_version": MANIFEST_VERSION,
            "stage": self.stage,
            "config": self.config,
            "inputs": self.inputs,
            "code": code_version(),
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "seconds": round(time.time() - self._t0, 3) if seconds is None else seconds,
            "stats": config_to_dict(self.stats),
        }
        write_json_atomic(directory / MANIFEST, self.manifest)
        return self.manifest

    def __enter__(self) -> StageRun:
        if not self.reused:
            self.out_dir.parent.mkdir(parents=True, exist_ok=True)
            self.tmp.mkdir()
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if self.reused:
            return False
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        self.write_manifest(self.tmp)
        old = None
        if self.out_dir.exists():
            old = self.out_dir.with_name(f".{self.out_dir.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(self.out_dir, old)
        os.replace(self.tmp, self.out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return False
