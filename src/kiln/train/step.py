"""One training step with no host synchronization, and the deferred read of its results.

A GPU step is a queue of kernels; the host only has to *launch* them. Any read of a device value
(``loss.item()``, ``if loss > x``) makes the host wait until the queue drains, so the next step's
launches start late and the GPU idles for the launch latency of every step. Kiln's step therefore
decides everything on the device:

- the loss of each micro-batch is summed on the device;
- the gradient norm is computed and the gradients clipped on the device (``clip_grad_norm_``);
- the spike guard's verdict ``ok = isfinite(loss) & isfinite(norm) & (loss <= threshold)`` is a
  device bool, and the optimizer applies the update *masked* by it (``AdamW.step(ok=...)``: a bad
  step leaves parameters and moments exactly unchanged);
- the three scalars are copied into pinned host memory with ``non_blocking=True`` behind a CUDA
  event. The trainer reads step ``t``'s results only after it has queued step ``t + 1``, by which
  time they are ready: the host never stalls the queue.

The spike threshold (``SpikeDetector.threshold()``, from the losses read so far) is written to a
device scalar after each read, so step ``t + 1`` is judged against the losses up to step ``t - 1``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from kiln.train.loss import cross_entropy

FaultHook = Callable[[int, torch.Tensor], torch.Tensor]


@dataclass
class StepResult:
    """The queued results of one optimizer step: device scalars, their pinned host copies, an event."""

    step: int
    """The step index (0-based: the update that makes the model step + 1)."""
    lr: float
    loss: torch.Tensor  # 0-dim fp32 on the device, mean over micro-batches (and ranks)
    host: torch.Tensor  # (3,) fp32 [loss, grad_norm before clipping, ok (update applied)] in (pinned) host memory
    event: Any  # torch.cuda.Event recorded after the copy, or None on the CPU

    def read(self) -> tuple[float, float, bool]:
        """Wait for this step's copy (already done in steady state) and return (loss, grad_norm, ok)."""
        if self.event is not None:
            self.event.synchronize()
        loss, norm, ok = self.host.tolist()
        return loss, norm, ok > 0.5


def make_loss_fn(model_step: torch.nn.Module, model: torch.nn.Module, loss_impl: str, compile_: bool,
                 compile_mode: str = "default") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``loss(x (B, T) long, y (B, T) long) -> 0-dim mean cross-entropy`` for training.

    ``loss_impl="torch"``: logits from the model and Kiln's ``cross_entropy``; with ``compile_`` the
    *pair* is one ``torch.compile``-d graph, so Inductor fuses the fp32 upcast, log-sum-exp and
    gather into the logits' consumer and the (B, T, V) fp32 logits are never written out.
    ``loss_impl="fused"``: the model's final hidden states and Kiln's chunked Triton linear +
    cross-entropy kernel (``kiln.kernels.linear_cross_entropy``): logits are never held at all,
    at most one (chunk, V) block of them.
    """
    if loss_impl == "fused":
        from kiln.kernels import linear_cross_entropy

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            h = model_step(x, return_hidden=True)  # (B, T, d)
            return linear_cross_entropy(h.reshape(-1, h.shape[-1]), model.lm_head.weight, y.reshape(-1))
    else:
        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return cross_entropy(model_step(x), y)
    if compile_:
        return torch.compile(loss, mode=None if compile_mode == "default" else compile_mode)
    return loss


class TrainStep:
    """Queue one guarded optimizer step: micro-batches, backward, clip, spike guard, masked update.

    ``loss_fn(*batch) -> 0-dim loss`` is any differentiable loss of a micro-batch (next-token
    cross-entropy, a masked SFT loss, a DPO loss); ``clip(params, max_norm) -> norm`` is the
    runtime's ``clip_grad_norm_``; ``dist`` a ``kiln.distributed.RuntimeProtocol``.

    ``threshold`` is a 0-dim fp32 device tensor (``inf`` until the detector has enough history);
    the trainer writes ``SpikeDetector.threshold()`` into it after reading each result.
    """

    def __init__(self, loss_fn, model: torch.nn.Module, model_step: torch.nn.Module, optimizer: Any, clip,
                 grad_clip: float, dist: Any, amp: contextlib.AbstractContextManager, device: torch.device,
                 fault_hook: FaultHook | None = None) -> None:
        self.loss_fn, self.model, self.model_step, self.optimizer = loss_fn, model, model_step, optimizer
        self.clip, self.max_norm = clip, (grad_clip if grad_clip > 0 else math.inf)
        self.dist, self.amp, self.device, self.fault_hook = dist, amp, device, fault_hook
        self.threshold = torch.full((), math.inf, dtype=torch.float32, device=device)
        self.masked = bool(getattr(optimizer, "supports_ok_mask", False))
        pin = device.type == "cuda"
        self._host = [torch.zeros(3, dtype=torch.float32, pin_memory=pin) for _ in range(2)]  # double buffer
        self._flip = 0

    def set_threshold(self, value: float) -> None:
        """Judge later steps against ``value`` (a device-side fill: no sync)."""
        self.threshold.fill_(value)

    def __call__(self, step: int, lr: float, batches: Callable[[], tuple[torch.Tensor, ...]],
                 accum: int) -> StepResult:
        """Run ``accum`` micro-batches from ``batches()`` and the guarded update; nothing waits on the GPU.

        Each micro-batch is a tuple of tensors already on the device (for pretraining ``(x, y)``,
        (mb, T) each); the loss is ``loss_fn(*batch)``, a 0-dim mean over the micro-batch."""
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(accum):
            batch = batches()
            sync = self.dist.no_sync(self.model_step) if micro < accum - 1 else contextlib.nullcontext()
            with sync, self.amp:
                loss = self.loss_fn(*batch)
                if self.fault_hook is not None:
                    loss = self.fault_hook(step, loss)
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        norm = self.clip(self.model.parameters(), self.max_norm).to(torch.float32)
        loss_t = self.dist.all_reduce_mean(loss_sum / accum)
        ok = torch.isfinite(loss_t) & torch.isfinite(norm) & (loss_t <= self.threshold)
        if self.masked:
            self.optimizer.step(ok=ok)
        elif bool(ok):  # an optimizer without a masked step: one host sync per step
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        host = self._host[self._flip]
        self._flip ^= 1
        vals = torch.stack([loss_t, norm, ok.to(torch.float32)])  # (3,)
        event = None
        if self.device.type == "cuda":
            host.copy_(vals, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        else:
            host.copy_(vals)
        return StepResult(step, lr, loss_t, host, event)
