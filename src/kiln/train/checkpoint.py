"""Checkpoints: a directory of safetensors files plus ``meta.json``, written atomically.

Layout of ``step_000042/``::

    model.safetensors       model state dict (tied tensors stored once)
    optimizer.safetensors   optimizer state tensors (step, exp_avg, exp_avg_sq per parameter)
    extra.safetensors       tensors inside ``extra`` (RNG states, data position...)
    meta.json               written last: format tag, iteration, JSON parts, file sizes

Nothing is ever unpickled: tensors go through safetensors, everything else through JSON, so a
checkpoint from an untrusted source cannot run code. The directory is built under a temporary name
and renamed into place, so a killed save never leaves a half-written checkpoint under the final name;
a truncated, damaged or foreign directory raises ``CheckpointError`` naming the file, the problem
and the earlier checkpoint to resume from. Before anything is loaded, every tensor that ``meta.json``
names is checked to be in its file (``_validate``).
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from kiln.artifacts import KilnError

FORMAT = "kiln.checkpoint"
VERSION = 1
META = "meta.json"
_FILES = ("model", "optimizer", "extra")


class CheckpointError(KilnError, RuntimeError):
    """A checkpoint directory is missing, truncated, foreign, or does not fit the model."""


def _split_tensors(obj: Any, prefix: str, tensors: dict[str, torch.Tensor], seen: dict) -> Any:
    """JSON view of ``obj`` with every tensor replaced by ``{"__tensor__": key}``; tensors sharing
    storage (tied weights) are stored once under the first key."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach()
        ident = (t.device, t.data_ptr(), tuple(t.shape), t.stride(), t.dtype) if t.numel() else None
        if ident is not None and ident in seen:
            return {"__tensor__": seen[ident]}
        key = prefix or "_"
        tensors[key] = t.cpu().contiguous()
        if ident is not None:
            seen[ident] = key
        return {"__tensor__": key}
    if isinstance(obj, dict):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint dict keys must be str or int, got {type(k).__name__}")
            sk = f"{k}" if isinstance(k, str) else f"__int__{k}"
            out[sk] = _split_tensors(v, f"{prefix}.{k}" if prefix else str(k), tensors, seen)
        return out
    if isinstance(obj, tuple):
        return {"__tuple__": [_split_tensors(v, f"{prefix}.{i}", tensors, seen) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_split_tensors(v, f"{prefix}.{i}", tensors, seen) for i, v in enumerate(obj)]
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at '{prefix}' in a checkpoint (tensors and JSON only)")


def _join_tensors(obj: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Inverse of ``_split_tensors``."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return tensors[obj["__tensor__"]]
        if set(obj) == {"__tuple__"}:
            return tuple(_join_tensors(v, tensors) for v in obj["__tuple__"])
        return {
            (int(k[7:]) if k.startswith("__int__") else k): _join_tensors(v, tensors) for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [_join_tensors(v, tensors) for v in obj]
    return obj


def save_checkpoint(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    iteration: int,
    out: str | os.PathLike,
    **extra: Any,
) -> Path:
    """Write model, optimizer, ``iteration`` and ``extra`` (tensors and JSON values, nested freely)
    to the directory ``out``, atomically (temporary directory, then rename). Returns ``out``."""
    from kiln.model.fuse import is_fused

    if is_fused(model):  # its state dict names qkv_proj / gate_up_proj, which no loader reads
        raise ValueError("the model's projections are fused (kiln.model.fuse_projections, for inference only); "
                         "call kiln.model.unfuse_projections(model) before saving a checkpoint")
    out = Path(out)
    parts = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "extra": extra,
    }
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    tmp.mkdir(parents=True)
    try:
        meta: dict[str, Any] = {"format": FORMAT, "version": VERSION, "iteration": int(iteration), "files": {}}
        for name in _FILES:
            tensors: dict[str, torch.Tensor] = {}
            meta[name] = _split_tensors(parts[name], "", tensors, {})
            path = tmp / f"{name}.safetensors"
            save_file(tensors, str(path))
            meta["files"][path.name] = path.stat().st_size
        (tmp / META).write_text(json.dumps(meta) + "\n")  # last: its presence marks a complete save
        old = None
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _tensor_keys(obj: Any) -> list[str]:
    """Every ``{"__tensor__": key}`` reference inside a JSON part of ``meta.json``."""
    if isinstance(obj, dict):
        if set(obj) == {"__tensor__"}:
            return [obj["__tensor__"]]
        return [k for v in obj.values() for k in _tensor_keys(v)]
    if isinstance(obj, list):
        return [k for v in obj for k in _tensor_keys(v)]
    return []


def _what_to_do(src: Path) -> str:
    """Which checkpoint to resume from instead of the damaged ``src`` (a sibling ``step_*`` before it)."""
    ckpt = src.parent if src.name == "trainer" else src  # a sharded checkpoint keeps its meta in trainer/
    earlier = sorted(p for p in ckpt.parent.glob("step_*") if p.name < ckpt.name
                     and ((p / META).is_file() or (p / "trainer" / META).is_file()))
    if earlier:
        return f"delete {ckpt} and run the same command again: it resumes from {earlier[-1]}"
    return f"delete {ckpt}; no earlier checkpoint is beside it, so the run starts over from step 0"


def _validate(src: Path, meta: dict, tensors: dict[str, dict[str, torch.Tensor]]) -> None:
    """Every tensor ``meta.json`` names is in its safetensors file (a flipped byte in a file's header
    renames a tensor and keeps the file readable)."""
    for name, have in tensors.items():
        if name not in meta:
            raise CheckpointError(f"checkpoint {src}/{META} lacks the '{name}' part; {_what_to_do(src)}")
        missing = [k for k in _tensor_keys(meta[name]) if k not in have]
        if missing:
            raise CheckpointError(f"checkpoint file {src / f'{name}.safetensors'} lacks tensor '{missing[0]}' that "
                                  f"{META} lists ({len(missing)} missing): the file is damaged; {_what_to_do(src)}")


def _read(src: Path, names: tuple[str, ...] = _FILES) -> tuple[dict, dict[str, dict[str, torch.Tensor]]]:
    if not src.is_dir():
        hint = " (checkpoints are directories like checkpoints/step_000100)" if src.is_file() else ""
        raise CheckpointError(f"checkpoint {src} does not exist or is not a directory{hint}")
    meta_path = src / META
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {src} has no {META}: the save was interrupted or this is not a Kiln checkpoint; {_what_to_do(src)}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {src}/{META} is corrupt ({e}); {_what_to_do(src)}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise CheckpointError(f"{src} is not a Kiln checkpoint (no '{FORMAT}' tag in {META})")
    if meta.get("version") != VERSION:
        raise CheckpointError(f"checkpoint {src} has format version {meta.get('version')}, this Kiln reads {VERSION}; use a matching Kiln version")
    tensors = {}
    for name in names:
        path = src / f"{name}.safetensors"
        expected = meta.get("files", {}).get(path.name)
        size = path.stat().st_size if path.is_file() else None
        if size is None or size != expected:
            raise CheckpointError(f"checkpoint file {path} is missing or truncated ({size} bytes, expected {expected}); {_what_to_do(src)}")
        try:
            tensors[name] = load_file(str(path))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"checkpoint file {path} is unreadable ({e}); {_what_to_do(src)}") from None
    _validate(src, meta, tensors)
    return meta, tensors


def load_checkpoint(
    src: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> int:
    """Load model (and optimizer) state saved by ``save_checkpoint``; return the iteration.
    Raises ``CheckpointError`` for a missing, truncated, foreign or mismatched checkpoint."""
    return restore_checkpoint(src, model, optimizer)[0]


def restore_checkpoint(
    src: str | os.PathLike, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None
) -> tuple[int, dict[str, Any]]:
    """Like ``load_checkpoint``, and also return the ``**extra`` values (tensors on the CPU)."""
    src = Path(src)
    meta, tensors = _read(src)
    sd = _join_tensors(meta["model"], tensors["model"])
    try:
        model.load_state_dict(sd)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"checkpoint {src} does not fit this model ({' '.join(first[:3])[:400]}); check the model config") from None
    if optimizer is not None:
        osd = _join_tensors(meta["optimizer"], tensors["optimizer"])
        if osd is None:
            raise CheckpointError(f"checkpoint {src} holds no optimizer state; load it with optimizer=None")
        try:
            optimizer.load_state_dict(osd)
        except (ValueError, KeyError) as e:
            raise CheckpointError(f"checkpoint {src}: optimizer state does not fit ({e})") from None
    return int(meta["iteration"]), _join_tensors(meta["extra"], tensors["extra"])


def load_checkpoint_extra(src: str | os.PathLike) -> dict[str, Any]:
    """The ``**extra`` values a checkpoint was saved with (tensors on the CPU)."""
    meta, tensors = _read(Path(src), ("extra",))
    return _join_tensors(meta["extra"], tensors["extra"])
