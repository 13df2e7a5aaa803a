"""The trainer's seam: ``wrap_model``, ``build_optimizer``, ``no_sync``.

The trainer never branches on the strategy: it wraps once, builds its optimizer once, and wraps all
but the last micro-batch of an accumulation step in ``no_sync(model)``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
from torch import nn

from kiln.distributed.config import DistConfig
from kiln.distributed.ddp import DataParallel
from kiln.distributed.env import DistEnv
from kiln.distributed.zero import ShardedOptimizer


def wrap_model(model: nn.Module, env: DistEnv, cfg: DistConfig) -> nn.Module:
    """Make ``model`` (already on ``env.device``) data-parallel as ``cfg.strategy`` says.

    A single process gets the model back unchanged. Call after ``init_distributed(env)`` and before
    building the optimizer (FSDP replaces parameters by sharded ones).
    """
    if not env.is_distributed:
        return model
    if cfg.strategy == "ddp":
        return DataParallel(model, env, bucket_mb=cfg.bucket_mb, first_bucket_mb=cfg.first_bucket_mb)
    if cfg.strategy == "torch_ddp":
        ids = [env.local_rank] if env.device_type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids, bucket_cap_mb=cfg.bucket_mb)
    if cfg.strategy == "fsdp":
        from kiln.distributed.fsdp import apply_fsdp

        return apply_fsdp(model, env, cfg)
    raise ValueError(f"unknown strategy {cfg.strategy!r}")


def build_optimizer(model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], env: DistEnv, cfg: DistConfig,
                    params: Any = None, **kwargs: Any) -> Any:
    """``optimizer_cls(params, **kwargs)``, sharded over ranks when ``cfg.zero1`` (ZeRO-1).

    ``params`` defaults to ``model.parameters()``; pass param groups (e.g. no weight decay on norms).
    """
    params = list(model.parameters()) if params is None else list(params)
    if cfg.zero1 and env.is_distributed:
        return ShardedOptimizer(params, optimizer_cls, env, **kwargs)
    return optimizer_cls(params, **kwargs)


def no_sync(model: nn.Module) -> AbstractContextManager[None]:
    """A context in which backward does not synchronize gradients, whatever the wrapper.

    Kiln's DataParallel and torch DDP skip their all-reduce; FSDP2 skips the reduce-scatter
    (gradients stay unsharded and accumulate); a plain module needs nothing.
    """
    if isinstance(model, (DataParallel, nn.parallel.DistributedDataParallel)):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        return _fsdp_no_sync(model)
    return nullcontext()


@contextmanager
def _fsdp_no_sync(model: Any) -> Iterator[None]:
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def clip_grad_norm_(params: Iterable[torch.Tensor] | torch.Tensor, max_norm: float, eps: float = 1e-6) -> torch.Tensor:
    """Scale gradients in place so their global L2 norm is at most ``max_norm``.

    Returns the total norm before clipping as a 0-dim fp32 tensor on the gradients' device. The
    scale ``min(1, max_norm / (norm + eps))`` is applied as a tensor, so nothing waits on the host.
    (``kiln.train.clip_grad_norm_`` is this function.)
    """
    if isinstance(params, torch.Tensor):
        params = [params]
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return torch.tensor(0.0)
    norms = torch._foreach_norm(grads, 2)
    total = torch.linalg.vector_norm(torch.stack([n.float() for n in norms]), 2)
    scale = (max_norm / (total + eps)).clamp(max=1.0)
    torch._foreach_mul_(grads, scale.to(grads[0].dtype))
    return total


def _torch_optimizer(optimizer: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer DCP can read: ZeRO-1's local one (it holds exactly this rank's state)."""
    if isinstance(optimizer, ShardedOptimizer):
        if optimizer.optimizer is None:
            raise ValueError("this rank owns no parameters under ZeRO-1 (more ranks than tensors); use fewer ranks or strategy='fsdp'")
        return optimizer.optimizer
    return optimizer


class Runtime:
    """The ``dist`` object that ``kiln.train.train(..., dist=...)`` takes, backed by torch.distributed.

    ``Runtime.start(DistConfig())`` reads torchrun's variables, joins the group (with the config's
    collective timeout) and returns the object; the trainer then calls ``wrap``, ``no_sync``,
    ``all_reduce_mean`` and ``barrier`` and never imports torch.distributed itself. ``close()`` leaves
    the group. With one process every method is a no-op, like the trainer's ``SingleProcess``.
    """

    def __init__(self, env: DistEnv, cfg: DistConfig | None = None) -> None:
        self.env = env
        self.cfg = cfg or DistConfig()

    @classmethod
    def start(cls, cfg: DistConfig | None = None, env: DistEnv | None = None, **consistency: Any) -> Runtime:
        """Join the job (``env`` defaults to torchrun's variables) and check ``consistency`` across ranks,
        e.g. ``Runtime.start(cfg, config=config_to_dict(train_cfg), code=code_version())``."""
        from kiln.distributed.env import check_consistency, init_distributed

        cfg = cfg or DistConfig()
        env = env or DistEnv.from_environment()
        init_distributed(env, cfg.timeout_s)
        check_consistency(env, dist_config=cfg, **consistency)
        return cls(env, cfg)

    rank = property(lambda self: self.env.rank, doc="Global rank.")
    world_size = property(lambda self: self.env.world_size, doc="Number of ranks.")
    is_main = property(lambda self: self.env.is_main, doc="True on rank 0 (it logs and saves).")

    @property
    def device(self) -> torch.device | None:
        """This rank's device when distributed (one GPU per rank); None lets the trainer choose."""
        return self.env.device if self.env.is_distributed else None

    def wrap(self, model: nn.Module) -> nn.Module:
        """``wrap_model(model, env, cfg)``."""
        return wrap_model(model, self.env, self.cfg)

    def no_sync(self, model: nn.Module) -> AbstractContextManager[None]:
        """``no_sync(model)``."""
        return no_sync(model)

    def optimizer(self, model: nn.Module, optimizer_cls: type[torch.optim.Optimizer], params: Any = None, **kwargs: Any) -> Any:
        """``build_optimizer``: ZeRO-1 sharded when ``cfg.zero1``. Build it *after* ``wrap`` (FSDP swaps parameters)."""
        return build_optimizer(model, optimizer_cls, self.env, self.cfg, params=params, **kwargs)

    @property
    def sharded_params(self) -> bool:
        """True under FSDP with several ranks: parameters and gradients are DTensor shards."""
        return self.env.is_distributed and self.cfg.strategy == "fsdp"

    @property
    def sharded_checkpoints(self) -> bool:
        """True when ranks hold state the others lack (FSDP, ZeRO-1): every rank must save its part."""
        return self.env.is_distributed and (self.cfg.strategy == "fsdp" or self.cfg.zero1)

    @property
    def zero1(self) -> bool:
        """True when the optimizer state is sharded over ranks (ZeRO-1)."""
        return self.env.is_distributed and self.cfg.zero1

    def clip_grad_norm_(self, params: Any, max_norm: float) -> torch.Tensor:
        """Clip to a global L2 norm over all ranks' shards; returns the norm (a plain 0-dim tensor).

        Whole gradients (one process, DDP, ZeRO-1): ``clip_grad_norm_`` below, no host sync. Under
        FSDP ``torch.nn.utils.clip_grad_norm_`` reduces DTensor gradient norms across shards, so every
        rank gets the same norm and scale (a norm of the local shards alone would differ per rank).
        """
        if not self.sharded_params:
            return clip_grad_norm_(params, max_norm)
        total = torch.nn.utils.clip_grad_norm_(list(params), max_norm)
        return total.full_tensor() if hasattr(total, "full_tensor") else total

    def save_sharded(self, path: Any, model: nn.Module, optimizer: Any) -> Any:
        """Every rank writes its shards of model (and optimizer) state; ``save_sharded_checkpoint``."""
        from kiln.distributed.fsdp import save_sharded_checkpoint

        return save_sharded_checkpoint(path, model, _torch_optimizer(optimizer), self.env)

    def load_sharded(self, path: Any, model: nn.Module, optimizer: Any) -> None:
        """Load (and reshard to this job) a checkpoint written by ``save_sharded``."""
        from kiln.distributed.fsdp import load_sharded_checkpoint

        load_sharded_checkpoint(path, model, _torch_optimizer(optimizer))

    def full_state_dict(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """The whole model's state on every rank (a collective under FSDP), for export."""
        from kiln.distributed.fsdp import full_state_dict

        return full_state_dict(model)

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        """Mean of ``t`` over ranks (a new tensor; ``t`` is left alone)."""
        if not self.env.is_distributed:
            return t
        import torch.distributed as dist

        from kiln.distributed.env import collective_guard

        out = t.detach().clone()
        with collective_guard(self.env, "all_reduce_mean"):
            dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out / self.env.world_size

    def barrier(self) -> None:
        """Wait for every rank (fails after the collective timeout instead of hanging)."""
        if not self.env.is_distributed:
            return
        import torch.distributed as dist

        from kiln.distributed.env import collective_guard

        with collective_guard(self.env, "barrier"):
            dist.barrier()

    def close(self) -> None:
        """Leave the process group."""
        from kiln.distributed.env import shutdown_distributed

        shutdown_distributed()
