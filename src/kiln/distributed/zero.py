"""ZeRO stage 1: shard the optimizer state over data-parallel ranks.

Rajbhandari et al., "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models"
(arXiv:1910.02054), stage 1 (P_os). Adam keeps two fp32 moments per parameter, 8 bytes per
parameter, usually more than the bf16 weights and gradients together. With gradients already
averaged over ranks (by :class:`~kiln.distributed.ddp.DataParallel`), every rank holds the full
gradient, so each rank can step *its own* subset of parameters and then share the updated values:
optimizer memory per rank falls to about 1/world_size, communication grows by one broadcast of the
parameters per step.

Partitioning is by whole tensors (greedy, largest first, onto the least-loaded rank), which keeps
any ``torch.optim.Optimizer`` usable unchanged, at the price of imbalance when one tensor dominates
(a big embedding); see docs/distributed.md.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kiln.distributed.env import DistEnv, collective_guard


def partition_params(sizes: list[int], world_size: int) -> list[int]:
    """Owner rank of each tensor: largest first onto the least-loaded rank (ties: lowest rank, index).

    Deterministic, so every rank computes the same assignment without communicating.
    """
    load = [0] * world_size
    owner = [0] * len(sizes)
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        r = min(range(world_size), key=lambda r: (load[r], r))
        owner[i] = r
        load[r] += sizes[i]
    return owner


class ShardedOptimizer:
    """``optimizer_cls`` over this rank's shard of ``params``, plus a broadcast of updated weights.

    ``ShardedOptimizer(model.parameters(), torch.optim.AdamW, env, lr=3e-4, weight_decay=0.1)``
    behaves like ``torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1)`` when the
    gradients are identical on every rank (wrap the model in ``DataParallel``), but each rank only
    allocates state for the parameters it owns. ``params`` may be tensors or param-group dicts.
    ``param_groups`` exposes the local groups, so schedulers that set ``group["lr"]`` work.
    """

    def __init__(self, params: Iterable[Any], optimizer_cls: type[torch.optim.Optimizer], env: DistEnv, **kwargs: Any) -> None:
        groups = list(params)
        if not groups:
            raise ValueError("ShardedOptimizer got an empty parameter list")
        if not isinstance(groups[0], dict):
            groups = [{"params": groups}]
        self.env = env
        self.all_params: list[nn.Parameter] = []
        for g in groups:
            g["params"] = list(g["params"])
            self.all_params.extend(g["params"])
        owners = partition_params([p.numel() for p in self.all_params], env.world_size)
        self.owner: dict[int, int] = {id(p): r for p, r in zip(self.all_params, owners)}
        local_groups = [{**g, "params": [p for p in g["params"] if self.owner[id(p)] == env.rank]} for g in groups]
        self.local_params = [p for g in local_groups for p in g["params"]]
        # A rank that owns nothing (more ranks than tensors) still takes part in the broadcasts.
        self.optimizer: torch.optim.Optimizer | None = (
            optimizer_cls([g for g in local_groups if g["params"]], **kwargs) if self.local_params else None
        )
        self._groups_template = groups
        # Per source rank, per dtype: the tensors it broadcasts after each step.
        self._by_rank: list[dict[tuple[torch.dtype, torch.device], list[nn.Parameter]]] = [{} for _ in range(env.world_size)]
        for p in self.all_params:
            self._by_rank[self.owner[id(p)]].setdefault((p.dtype, p.device), []).append(p)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """This rank's parameter groups (set ``lr`` here, as with any optimizer)."""
        return self.optimizer.param_groups if self.optimizer is not None else []

    @property
    def state(self) -> Any:
        """This rank's optimizer state: only for the parameters it owns."""
        return self.optimizer.state if self.optimizer is not None else {}

    def set_lr(self, lr: float) -> None:
        """Set the learning rate of every local group."""
        for g in self.param_groups:
            g["lr"] = lr

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Clear the gradients of *all* parameters (every rank holds every gradient)."""
        for p in self.all_params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_().zero_()

    @property
    def supports_ok_mask(self) -> bool:
        """Whether ``step(ok=...)`` (a device-side skip of a bad step) is supported: the inner optimizer's."""
        return bool(getattr(self.optimizer, "supports_ok_mask", False)) or self.optimizer is None

    @torch.no_grad()
    def step(self, **kwargs: Any) -> None:
        """Step the local shard, then broadcast each rank's updated parameters to the others.

        ``kwargs`` (e.g. ``ok``) go to the inner optimizer's ``step``."""
        if self.optimizer is not None:
            self.optimizer.step(**kwargs)
        if not self.env.is_distributed:
            return
        works, flats = [], []
        with collective_guard(self.env, "ShardedOptimizer parameter broadcast"):
            for src in range(self.env.world_size):
                for tensors in self._by_rank[src].values():
                    # One flat buffer per (rank, dtype): a few large messages, not one per tensor.
                    if src == self.env.rank:
                        flat = torch.cat([t.reshape(-1) for t in tensors])
                    else:
                        flat = torch.empty(sum(t.numel() for t in tensors), dtype=tensors[0].dtype, device=tensors[0].device)
                    works.append(dist.broadcast(flat, src=src, async_op=True))
                    flats.append((src, flat, tensors))
            for w in works:
                w.wait()
        for src, flat, tensors in flats:
            if src == self.env.rank:
                continue
            offset = 0
            for t in tensors:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def state_bytes(self) -> int:
        """Bytes of optimizer state tensors held by this rank."""
        return optimizer_state_bytes(self)

    def state_dict(self) -> dict[str, Any]:
        """This rank's shard (save one file per rank; the partition is deterministic)."""
        return {
            "rank": self.env.rank,
            "world_size": self.env.world_size,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
        }

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Load a shard written by the same rank of a job with the same world size and parameters."""
        if sd["world_size"] != self.env.world_size or sd["rank"] != self.env.rank:
            raise ValueError(
                f"this ZeRO-1 shard was written by rank {sd['rank']} of {sd['world_size']}, not rank "
                f"{self.env.rank} of {self.env.world_size}; resume on the same number of ranks or use FSDP checkpoints"
            )
        if self.optimizer is not None:
            self.optimizer.load_state_dict(sd["optimizer"])


def optimizer_state_bytes(optimizer: Any) -> int:
    """Bytes of the tensors this rank holds in ``optimizer.state`` (any torch optimizer, ShardedOptimizer,
    or an optimizer over FSDP2's DTensors, counted by their local shards)."""
    total = 0
    for s in optimizer.state.values():
        for v in s.values():
            if torch.is_tensor(v):
                v = v.to_local() if hasattr(v, "to_local") else v
                total += v.numel() * v.element_size()
    return total
