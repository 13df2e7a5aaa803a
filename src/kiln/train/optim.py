"""AdamW with decoupled weight decay, parameter groups, and gradient-norm clipping without host syncs."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from kiln.distributed.parallel import clip_grad_norm_  # noqa: F401 - public here too: one definition for every runtime


class AdamW(torch.optim.Optimizer):
    """Adam with decoupled weight decay (Loshchilov & Hutter, arXiv:1711.05101).

    Per parameter ``p`` with gradient ``g`` at step ``t`` (1-based)::

        p   <- p - lr * wd * p                      # decay first, independent of the gradient
        m   <- b1 m + (1 - b1) g ;  v <- b2 v + (1 - b2) g^2
        p   <- p - lr / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

    State per parameter: ``step`` (fp32 scalar on the CPU, so reading it never syncs a GPU),
    ``exp_avg`` and ``exp_avg_sq`` (same dtype/device as the parameter). Param groups carry their own
    ``lr``/``weight_decay``, so norms and embeddings can skip decay (see ``param_groups``).
    The update runs as multi-tensor (``torch._foreach_*``) ops per group: a handful of kernel
    launches per step instead of several per parameter.

    ``step(ok=flag)`` is the *guarded* update the trainer uses: ``flag`` is a 0-dim bool tensor on
    the parameters' device, computed on the GPU (finite loss, finite gradient norm, no spike), and
    a step with ``flag`` false leaves parameters and moments exactly as they were, so a bad batch is
    skipped without the host ever reading the loss. On that path ``step`` and ``lr`` live on the
    device too (``step`` per parameter, as torch's fused Adam keeps it) and, with ``fused=True``,
    each parameter is updated by one pass of Kiln's Triton kernel (``kiln.kernels.adamw``: p, g,
    m, v read once, p, m, v written once). Without ``fused`` the same math runs as eager torch ops.
    """

    #: ``step(ok=...)`` is supported: the trainer may skip a bad step without a host sync.
    supports_ok_mask = True

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        fused: bool = False,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"AdamW lr={lr} must be >= 0")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"AdamW betas={betas} must each be in [0, 1), e.g. (0.9, 0.95)")
        if not eps >= 0:
            raise ValueError(f"AdamW eps={eps} must be >= 0")
        if not weight_decay >= 0:
            raise ValueError(f"AdamW weight_decay={weight_decay} must be >= 0")
        super().__init__(params, {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay})
        self.fused = fused
        self._lr_t: dict[int, torch.Tensor] = {}  # group index -> 0-dim device lr (guarded path)

    @torch.no_grad()
    def step(self, closure=None, ok: torch.Tensor | None = None):  # type: ignore[override]
        """One update of every parameter that has a gradient. Returns ``closure()`` if given.

        ok: optional 0-dim bool tensor on the parameters' device; where false the update is a no-op
        (parameters, moments and step counts unchanged), decided on the device with no host sync.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if ok is not None:
            self._guarded_step(ok)
            return loss
        for group in self.param_groups:
            params, grads, avgs, avg_sqs, steps = self._gather(group, device_steps=False)
            if not params:
                continue
            lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
            beta1, beta2 = group["betas"]
            for s in steps:
                s += 1
            t = steps[0].item()  # CPU scalar: no device sync
            bias1 = 1.0 - beta1**t
            bias2_sqrt = math.sqrt(1.0 - beta2**t)
            if wd != 0:
                torch._foreach_mul_(params, 1.0 - lr * wd)
            torch._foreach_lerp_(avgs, grads, 1.0 - beta1)
            torch._foreach_mul_(avg_sqs, beta2)
            torch._foreach_addcmul_(avg_sqs, grads, grads, 1.0 - beta2)
            denom = torch._foreach_sqrt(avg_sqs)
            torch._foreach_div_(denom, bias2_sqrt)
            torch._foreach_add_(denom, eps)
            torch._foreach_addcdiv_(params, avgs, denom, -lr / bias1)
        return loss

    def _gather(self, group: dict, device_steps: bool) -> tuple[list[torch.Tensor], ...]:
        """(params, grads, exp_avgs, exp_avg_sqs, steps) of a group's parameters that have a gradient,
        creating their state on first use. ``device_steps``: step counters on the parameter's device
        (the guarded path), else fp32 CPU scalars (the plain path: reading them never syncs)."""
        params, grads, avgs, avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("kiln AdamW does not support sparse gradients")
            state = self.state[p]
            if not state:
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device if device_steps else "cpu")
            elif device_steps and state["step"].device != p.device:  # a CPU counter from the plain path or a checkpoint
                state["step"] = state["step"].to(p.device, torch.float32)
            params.append(p)
            grads.append(p.grad)
            avgs.append(state["exp_avg"])
            avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        return params, grads, avgs, avg_sqs, steps

    def _guarded_step(self, ok: torch.Tensor) -> None:
        fn = _adamw_guarded_update
        if self.fused:  # Kiln's Triton kernel (kiln.kernels.adamw); it falls back to fn where it cannot run
            from kiln.kernels.adamw import adamw_fused_update_

            fn = adamw_fused_update_
        for i, group in enumerate(self.param_groups):
            params, grads, avgs, avg_sqs, steps = self._gather(group, device_steps=True)
            if not params:
                continue
            lr_t = self._lr_t.get(i)
            if lr_t is None or lr_t.device != params[0].device:
                lr_t = self._lr_t[i] = torch.zeros((), dtype=torch.float32, device=params[0].device)
            lr_t.fill_(group["lr"])  # a device-side fill: no sync, and no recompile when lr changes
            beta1, beta2 = group["betas"]
            fn(params, grads, avgs, avg_sqs, steps, lr_t, ok, beta1, beta2, group["eps"], group["weight_decay"])


def _adamw_guarded_update(
    params: list[torch.Tensor], grads: list[torch.Tensor], avgs: list[torch.Tensor], avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor], lr: torch.Tensor, ok: torch.Tensor,
    beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """AdamW on lists of tensors where ``lr`` (0-dim fp32), ``ok`` (0-dim bool) and each ``steps[i]``
    (0-dim fp32) are device tensors, so nothing here reads a value back to the host.

    ``okf = float(ok)`` multiplies every change: a false ``ok`` adds 0 to the step count, lerps the
    moments by weight 0 and moves parameters by 0. Gradients pass through ``where(ok, g, 0)`` first,
    so a skipped step's inf/NaN gradients never reach the state (0 * NaN would be NaN).
    """
    okf = ok.to(torch.float32)
    lr_eff = lr * okf  # 0 when skipped
    for p, g, m, v, s in zip(params, grads, avgs, avg_sqs, steps):
        s.add_(okf)
        t = s.clamp(min=1.0)  # a skipped first step: keep the bias corrections finite
        bias1 = 1.0 - torch.pow(beta1, t)
        bias2 = 1.0 - torch.pow(beta2, t)
        g = torch.where(ok, g, torch.zeros_like(g))
        if weight_decay != 0:
            p.mul_(1.0 - lr_eff * weight_decay)
        m.lerp_(g, ((1.0 - beta1) * okf).to(m.dtype))
        v.mul_(1.0 - (1.0 - beta2) * okf).add_(g * g * ((1.0 - beta2) * okf))
        denom = (v / bias2).sqrt().add_(eps)
        p.sub_(m / denom * (lr_eff / bias1))


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Split parameters into a decayed group (matrices) and an undecayed one (norm gains, biases,
    embeddings). Decaying a norm gain or an embedding row pulls it toward zero for no benefit; only
    the matrices that multiply activations are regularized (as in GPT-3 and Llama recipes)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if p.ndim < 2 or "embed" in name or "norm" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]
