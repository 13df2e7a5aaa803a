"""The FSDP2 path (``torch.distributed.fsdp.fully_shard``) and sharded checkpoints.

FSDP2 shards every parameter over ranks as a DTensor (dim 0), all-gathers a block's parameters
just before its forward/backward and reduce-scatters its gradients after, so parameters, gradients
and optimizer state all take 1/world_size of the memory (ZeRO-3). Kiln wraps each transformer block
as its own unit (so only one block is gathered at a time), then the root.

Checkpoints go through ``torch.distributed.checkpoint`` (DCP): every rank writes its own shards plus
metadata, and loading reshards to whatever the current job looks like, so a run saved on 2 GPUs
resumes on 1 or 8.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.distributed.config import DistConfig
from kiln.distributed.env import DistEnv


def _fully_shard() -> Callable[..., Any]:
    """``fully_shard`` from wherever this torch has it, or an error saying what to install."""
    try:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6

        return fully_shard
    except ImportError:
        pass
    try:
        from torch.distributed._composable.fsdp import fully_shard  # torch 2.4 - 2.5

        return fully_shard
    except ImportError:
        raise RuntimeError(
            f"strategy='fsdp' needs FSDP2 (torch >= 2.6, found {torch.__version__}); "
            "pip install -U 'torch>=2.6' or use strategy='ddp'"
        ) from None


def _flat_options() -> Any:
    """Optimizer state keyed per parameter name (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``)
    rather than one ``param_groups`` list: ZeRO-1 ranks each hold a different subset of parameters,
    and DCP keeps a single copy of a non-tensor item, so an unflattened list would be rank 0's on
    every rank. Per-name keys also let a different number of ranks pick up exactly their own."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(flatten_optimizer_state_dict=True)


def _dtype(name: str | None) -> torch.dtype | None:
    return None if name is None else getattr(torch, name)


def shard_units(model: nn.Module) -> list[nn.Module]:
    """Submodules that become their own FSDP unit: the entries of the model's block list.

    Uses ``model.layers`` (Kiln's Transformer, Llama layout) or ``model.blocks`` / ``model.h`` when
    present, else every direct child ``nn.ModuleList``'s entries; the root is always sharded too.
    """
    for name in ("layers", "blocks", "h"):
        blocks = getattr(model, name, None)
        if isinstance(blocks, nn.ModuleList):
            return list(blocks)
    units: list[nn.Module] = []
    for child in model.children():
        if isinstance(child, nn.ModuleList):
            units.extend(child)
    return units


def apply_fsdp(model: nn.Module, env: DistEnv, cfg: DistConfig) -> nn.Module:
    """Shard ``model`` in place with FSDP2 over all ranks; returns it (its class becomes FSDP<cls>)."""
    fully_shard = _fully_shard()
    from torch.distributed.device_mesh import init_device_mesh

    try:
        from torch.distributed.fsdp import MixedPrecisionPolicy
    except ImportError:
        from torch.distributed._composable.fsdp import MixedPrecisionPolicy
    mesh = init_device_mesh(env.device_type, (env.world_size,))
    mp = MixedPrecisionPolicy(param_dtype=_dtype(cfg.fsdp_param_dtype), reduce_dtype=_dtype(cfg.fsdp_reduce_dtype))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=cfg.fsdp_reshard_after_forward, mp_policy=mp)
    # The root's parameters (embeddings, final norm, head) are used last in backward: keep them gathered.
    fully_shard(model, mesh=mesh, reshard_after_forward=False, mp_policy=mp)
    return model


def save_sharded_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None,
                            env: DistEnv, extra: dict[str, Any] | None = None) -> Path:
    """Write model (and optimizer) state as a DCP checkpoint directory, every rank its own shards.

    Works for FSDP2, DataParallel/DDP (unwrapped first) and plain models. ``extra`` (step, sampler
    position, ...; JSON) is written by rank 0 as ``extra.json`` after the shards.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
    )

    from kiln.distributed.ddp import unwrap

    model = unwrap(model)
    path = Path(path)
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer, options=_flat_options())
        state: dict[str, Any] = {"model": msd, "optim": osd}
    else:
        state = {"model": get_model_state_dict(model)}
    dcp.save(state, checkpoint_id=str(path))
    if env.is_main:
        (path / "extra.json").write_text(json.dumps({"world_size": env.world_size, **(extra or {})}))
    if dist.is_initialized():
        dist.barrier()
    return path


def load_sharded_checkpoint(path: str | Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> dict[str, Any]:
    """Load a DCP checkpoint into ``model`` (and ``optimizer``), resharding to the current world size.

    The model must be built (and sharded, for FSDP) the way it will train; returns ``extra``.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_state_dict,
        set_model_state_dict,
        set_state_dict,
    )

    from kiln.distributed.ddp import unwrap

    model = unwrap(model)
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a sharded checkpoint (no .metadata); pass a directory written by save_sharded_checkpoint")
    if optimizer is not None:
        msd, osd = get_state_dict(model, optimizer, options=_flat_options())
        state: dict[str, Any] = {"model": msd, "optim": osd}
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_flat_options())
    else:
        state = {"model": get_model_state_dict(model)}
        dcp.load(state, checkpoint_id=str(path))
        set_model_state_dict(model, state["model"])
    extra_file = path / "extra.json"
    return json.loads(extra_file.read_text()) if extra_file.is_file() else {}


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's state as ordinary CPU tensors, on every rank (for export and tests)."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
    )

    from kiln.distributed.ddp import unwrap

    sd = get_model_state_dict(unwrap(model), options=StateDictOptions(full_state_dict=True, cpu_offload=False))
    out = {}
    for k, v in sd.items():
        full = v.full_tensor() if hasattr(v, "full_tensor") else v
        out[k] = full.detach().cpu()
    return out
