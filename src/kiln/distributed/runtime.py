"""The seam between a training loop and its processes: the ``RuntimeProtocol``, ``SingleProcess``,
the device choice and the global gradient norm.

Every stage that trains (``kiln.train``'s loop: pretraining, SFT, DPO, GRPO) talks to its ranks
through one object with this interface and never imports torch.distributed::

    rt.rank, rt.world_size, rt.is_main      where this process sits
    rt.device                               this rank's device, or None (the stage picks one)
    rt.wrap(model) -> model_step            the data-parallel model to run forward/backward on
    rt.no_sync(model_step)                  a context: backward without gradient communication
    rt.optimizer(model, cls, params, **kw)  the optimizer, sharded over ranks under ZeRO-1
    rt.clip_grad_norm_(params, max_norm)    global gradient norm over ranks' shards, clipped
    rt.all_reduce_mean(t)                   mean of a metric tensor over ranks
    rt.barrier()                            wait for every rank
    rt.zero1, rt.sharded_params, rt.sharded_checkpoints   what the state looks like
    rt.save_sharded / load_sharded / full_state_dict       sharded checkpoints and export

``SingleProcess()`` is one process (every collective a no-op); ``Runtime.start(DistConfig())`` is
torchrun's job (``kiln.distributed.parallel``). Both satisfy ``RuntimeProtocol``.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import AbstractContextManager
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from kiln.distributed.env import DistEnv
from kiln.distributed.parallel import Runtime


@runtime_checkable
class RuntimeProtocol(Protocol):
    """What a training loop needs from its processes (see the module docstring)."""

    rank: int
    world_size: int
    is_main: bool
    device: torch.device | None
    zero1: bool
    sharded_params: bool
    sharded_checkpoints: bool

    def wrap(self, model: nn.Module) -> nn.Module: ...
    def no_sync(self, model: nn.Module) -> AbstractContextManager[None]: ...
    def optimizer(self, model: nn.Module, optimizer_cls: type, params: Any = None, **kwargs: Any) -> Any: ...
    def clip_grad_norm_(self, params: Iterable[torch.Tensor], max_norm: float) -> torch.Tensor: ...
    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor: ...
    def barrier(self) -> None: ...
    def save_sharded(self, path: Any, model: nn.Module, optimizer: Any) -> Any: ...
    def load_sharded(self, path: Any, model: nn.Module, optimizer: Any) -> None: ...
    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]: ...


class SingleProcess(Runtime):
    """One process: rank 0 of 1, the model unwrapped, every collective a no-op."""

    def __init__(self) -> None:
        super().__init__(DistEnv())

    def load_sharded(self, path: Any, model: nn.Module, optimizer: Any) -> None:
        """A sharded checkpoint read by one process (DCP needs no process group)."""
        from kiln.distributed.fsdp import load_sharded_checkpoint

        load_sharded_checkpoint(path, model, optimizer)


def pick_device(name: str = "auto", runtime: Any = None) -> torch.device:
    """The device to run on: ``runtime.device`` when the runtime fixes one (a rank's GPU), else
    ``name``: "auto" (CUDA when present, else the CPU) or any name ``torch.device`` takes.

    The one place Kiln picks a device (train, eval, bench, profile, generate and the demo call it).
    """
    if runtime is not None and runtime.device is not None:
        return torch.device(runtime.device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available; use --device cpu "
                           "(or --set device=cpu)")
    return dev
