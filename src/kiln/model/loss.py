"""Cross-entropy written out: a numerically stable log-sum-exp, then the target's log-probability."""

from __future__ import annotations

import torch


def cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Cross-entropy of ``targets`` under ``softmax(logits)``, in nats.

    Args:
        logits: (..., V) unnormalized scores, any leading dims, any float dtype (computed in fp32).
        targets: (...) integer class ids in [0, V).
        ignore_index: a target id whose positions count neither in the loss nor in the mean.
        reduction: "mean" (over counted positions), "sum", or "none" (shape (...)).

    Uses ``logsumexp(x) = m + log(sum(exp(x - m)))`` with ``m = max(x)``, so large logits never
    overflow ``exp``; ``m`` is detached because its gradient cancels exactly.
    """
    if logits.shape[:-1] != targets.shape:
        raise ValueError(f"logits {tuple(logits.shape)} need targets of shape {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}")
    if reduction == "mean" and ignore_index is None and logits.requires_grad:
        return _MeanCrossEntropy.apply(logits, targets)
    x = logits if logits.dtype in (torch.float32, torch.float64) else logits.float()  # (..., V)
    m = x.amax(dim=-1, keepdim=True).detach()  # (..., 1)
    lse = m.squeeze(-1) + torch.log(torch.exp(x - m).sum(dim=-1))  # (...)
    if ignore_index is not None:
        keep = targets != ignore_index  # (...)
        safe = torch.where(keep, targets, torch.zeros_like(targets))
    else:
        keep, safe = None, targets
    target_logit = x.gather(-1, safe.long().unsqueeze(-1)).squeeze(-1)  # (...)
    loss = lse - target_logit  # (...)
    if keep is not None:
        loss = loss * keep
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        if keep is None:
            return loss.mean()
        # Mean over counted positions; clamp so an all-ignored batch gives 0, not NaN.
        return loss.sum() / keep.sum().clamp(min=1)
    raise ValueError(f"reduction={reduction!r} is unknown; use 'mean', 'sum' or 'none'")


class _MeanCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy with a hand-written backward: ``dlogits = (softmax - onehot) * g / N``.

    The training loss. Autograd's own backward of the composite above writes a zero tensor the size
    of the logits, scatters into it, and keeps fp32 intermediates; this one saves only the logits
    (in their dtype) and the (N,) log-sum-exp, and its backward is one elementwise pass that reads
    the logits once and writes the gradient once in the logits' dtype. Under torch.compile each
    direction becomes one or two fused kernels (measured: docs/LOG.md, 2026-11-22).
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        x = logits.float()  # (..., V)
        lse = torch.logsumexp(x, dim=-1)  # (...)
        target_logit = x.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)  # (...)
        ctx.save_for_backward(logits, targets, lse)
        return (lse - target_logit).mean()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        logits, targets, lse = ctx.saved_tensors
        scale = grad / lse.numel()
        vocab = torch.arange(logits.shape[-1], device=logits.device)  # (V,)
        onehot = vocab == targets.long().unsqueeze(-1)  # (..., V) bool, never materialized when compiled
        dlogits = (torch.exp(logits.float() - lse.unsqueeze(-1)) - onehot.float()) * scale
        return dlogits.to(logits.dtype), None
