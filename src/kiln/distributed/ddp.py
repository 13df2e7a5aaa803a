"""Kiln's own data-parallel wrapper: bucketed gradient all-reduce overlapped with backward.

The design follows the one described for PyTorch's DDP reducer (Li et al., "PyTorch Distributed:
Experiences on Accelerating Data Parallel Training", VLDB 2020, arXiv:2006.15704), written small:

1. At wrap time rank 0's parameters and buffers are broadcast, so every replica starts identical.
2. Parameters are grouped into buckets of about ``bucket_mb`` MiB, in *reverse* registration order,
   because backward produces gradients roughly from the last layer to the first; the first bucket is
   capped at ``first_bucket_mb`` (1 MiB, as in PyTorch DDP) so the first all-reduce starts early.
3. A post-accumulate-grad hook on each parameter copies its gradient into its bucket's flat buffer
   and makes ``p.grad`` a view of that buffer. When the last gradient of a bucket lands, the bucket's
   ``all_reduce`` is launched asynchronously, so communication overlaps the rest of backward.
   Buckets are always launched in index order (a ready bucket waits for earlier ones), so every rank
   issues the same collectives in the same order even if hooks fire in a different order.
4. At the end of backward (an autograd engine callback) every outstanding all-reduce is waited on
   and the buffers are divided by the world size: gradients are the mean over all ranks' batches.
5. ``no_sync()`` skips 2-4 for gradient-accumulation micro-steps: gradients accumulate locally and
   are reduced once, on the last micro-step.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kiln.distributed.env import DistEnv, DistributedError, collective_guard

MIB = 1024 * 1024
log = logging.getLogger(__name__)


@dataclass
class Bucket:
    """A flat gradient buffer for a run of parameters of one dtype and device."""

    index: int
    params: list[nn.Parameter]
    offsets: list[int]
    buffer: torch.Tensor  # (numel,) flat, same dtype/device as the params
    ready: int = 0
    work: Any = None  # the async all-reduce handle, once launched
    views: list[torch.Tensor] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()


def plan_buckets(params: list[nn.Parameter], bucket_mb: float, first_bucket_mb: float | None = None) -> list[list[int]]:
    """Group parameter indices into buckets, walking ``params`` in reverse order.

    A bucket is closed as soon as it holds at least ``bucket_mb`` MiB or the next parameter has a
    different dtype/device. ``first_bucket_mb`` caps the first bucket (the first gradients of backward)
    so that communication starts early, as PyTorch DDP does with 1 MiB. Returns lists of indices into
    ``params`` (pure function; used by tests).
    """
    if bucket_mb <= 0:
        raise ValueError(f"bucket_mb={bucket_mb} must be > 0")
    limit = min(bucket_mb, first_bucket_mb or bucket_mb) * MIB
    plan: list[list[int]] = []
    current: list[int] = []
    size = 0.0
    for i in reversed(range(len(params))):
        p = params[i]
        if current and (p.dtype != params[current[0]].dtype or p.device != params[current[0]].device):
            plan.append(current)
            current, size = [], 0.0
        current.append(i)
        size += p.numel() * p.element_size()
        if size >= limit:
            plan.append(current)
            current, size = [], 0.0
            limit = bucket_mb * MIB
    if current:
        plan.append(current)
    return plan


class DataParallel(nn.Module):
    """Wrap ``module`` for data-parallel training over ``env.world_size`` ranks.

    ``forward`` is the module's forward. After ``loss.backward()`` returns, every parameter's
    ``.grad`` holds the mean gradient over all ranks (call :meth:`finish_gradient_sync` only if you
    drive backward in an unusual way; it is idempotent). Use :meth:`no_sync` for all but the last
    micro-batch of a gradient-accumulation step.

    Args:
        module: any ``nn.Module``, already on ``env.device``.
        env: this process's place in the job; with ``world_size == 1`` no collective is issued.
        bucket_mb: target bucket size in MiB (PyTorch DDP's default is 25).
        first_bucket_mb: cap on the first bucket in MiB (PyTorch DDP uses 1), None for no cap.
        broadcast_buffers: also broadcast buffers (e.g. RoPE tables) from rank 0 at wrap time.
        record_events: keep a timeline of hook and launch events in ``self.events`` (tests, benches).
    """

    def __init__(
        self,
        module: nn.Module,
        env: DistEnv,
        bucket_mb: float = 25.0,
        first_bucket_mb: float | None = 1.0,
        broadcast_buffers: bool = True,
        record_events: bool = False,
    ) -> None:
        super().__init__()
        self.module = module
        self.env = env
        self.bucket_mb = bucket_mb
        self.record_events = record_events
        self.events: list[tuple[str, int, float]] = []  # (kind, index, perf_counter seconds)
        self.num_collectives = 0  # all-reduces issued since construction
        self._sync = True
        self._callback_queued = False
        self._warned_unused = False
        self._params = [p for p in module.parameters() if p.requires_grad]
        if env.is_distributed and not dist.is_initialized():
            raise RuntimeError("DataParallel needs init_distributed(env) first (world_size > 1)")
        if env.is_distributed:
            self._broadcast_from_rank0(broadcast_buffers)
        self.buckets: list[Bucket] = []
        self._where: dict[int, tuple[int, int]] = {}  # id(param) -> (bucket index, slot)
        for b, idxs in enumerate(plan_buckets(self._params, bucket_mb, first_bucket_mb)):
            ps = [self._params[i] for i in idxs]
            offsets, total = [], 0
            for p in ps:
                offsets.append(total)
                total += p.numel()
            buf = torch.zeros(total, dtype=ps[0].dtype, device=ps[0].device)
            views = [buf[o : o + p.numel()].view_as(p) for o, p in zip(offsets, ps)]
            self.buckets.append(Bucket(b, ps, offsets, buf, views=views))
            for slot, p in enumerate(ps):
                self._where[id(p)] = (b, slot)
        self._next_launch = 0
        self._hooks = [p.register_post_accumulate_grad_hook(self._on_grad_ready) for p in self._params]

    # -- set-up -----------------------------------------------------------------------------------
    @torch.no_grad()
    def _broadcast_from_rank0(self, buffers: bool) -> None:
        tensors = list(self.module.parameters()) + (list(self.module.buffers()) if buffers else [])
        with collective_guard(self.env, "DataParallel initial broadcast"):
            # One flat broadcast per dtype: thousands of tiny broadcasts would dominate start-up.
            by_dtype: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
            for t in tensors:
                by_dtype.setdefault((t.dtype, t.device), []).append(t)
            for group in by_dtype.values():
                flat = torch.cat([t.detach().reshape(-1) for t in group])
                dist.broadcast(flat, src=0)
                offset = 0
                for t in group:
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                    offset += t.numel()

    # -- the module interface ----------------------------------------------------------------------
    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    @contextmanager
    def no_sync(self) -> Iterator[None]:
        """Inside this context backward only accumulates local gradients (no communication)."""
        previous, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = previous

    # -- the reducer -----------------------------------------------------------------------------
    def _event(self, kind: str, index: int) -> None:
        if self.record_events:
            self.events.append((kind, index, time.perf_counter()))

    def _on_grad_ready(self, p: torch.Tensor) -> None:
        if not self._sync or not self.env.is_distributed:
            return
        if not self._callback_queued:
            # Runs when the whole backward pass is done: wait for the last buckets there.
            torch.autograd.Variable._execution_engine.queue_callback(self.finish_gradient_sync)
            self._callback_queued = True
        b, slot = self._where[id(p)]
        bucket = self.buckets[b]
        view = bucket.views[slot]
        if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
            view.copy_(p.grad)
            p.grad = view  # the gradient now lives in the bucket: no copy back after the all-reduce
        bucket.ready += 1
        self._event("grad", b)
        while self._next_launch < len(self.buckets) and self.buckets[self._next_launch].ready == len(
            self.buckets[self._next_launch].params
        ):
            self._launch(self.buckets[self._next_launch])

    def _launch(self, bucket: Bucket) -> None:
        with collective_guard(self.env, f"all_reduce of gradient bucket {bucket.index}"):
            bucket.work = dist.all_reduce(bucket.buffer, op=dist.ReduceOp.SUM, async_op=True)
        self.num_collectives += 1
        self._next_launch = bucket.index + 1
        self._event("launch", bucket.index)

    @torch.no_grad()
    def finish_gradient_sync(self) -> None:
        """Wait for every bucket's all-reduce and average; idempotent, and a no-op inside no_sync."""
        if not self._callback_queued:
            return
        # Parameters that got no gradient this step (unused in forward) still take part, as zeros,
        # so that every rank issues the same collectives and nobody waits forever.
        for bucket in self.buckets[self._next_launch :]:
            for p, view in zip(bucket.params, bucket.views):
                if p.grad is None:
                    if not self._warned_unused:
                        names = [n for n, q in self.module.named_parameters() if q is p]
                        log.warning("parameter %s got no gradient: its bucket waits for the end of backward "
                                    "(less overlap); freeze it (requires_grad=False) if it is unused", names[:1])
                        self._warned_unused = True
                    view.zero_()
                    p.grad = view
                elif p.grad.data_ptr() != view.data_ptr():
                    view.copy_(p.grad)
                    p.grad = view
            self._launch(bucket)
        with collective_guard(self.env, "waiting for gradient all-reduce"):
            for bucket in self.buckets:
                if bucket.work is not None:
                    bucket.work.wait()
                    bucket.work = None
                bucket.buffer.div_(self.env.world_size)
                bucket.ready = 0
        self._next_launch = 0
        self._callback_queued = False
        self._event("synced", -1)

    def remove_hooks(self) -> None:
        """Detach the gradient hooks (the wrapped module is then an ordinary module again)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a Kiln/torch data-parallel wrapper (for saving and evaluation)."""
    while isinstance(model, (DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


__all__ = ["Bucket", "DataParallel", "DistributedError", "plan_buckets", "unwrap"]
