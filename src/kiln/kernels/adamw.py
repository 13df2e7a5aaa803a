"""Fused, guarded AdamW update: one Triton kernel pass per parameter tensor.

Per element (``okf`` = 1.0 if the step's device-side guard passed, else 0.0; ``t`` the step count)::

    g  <- ok ? g : 0                                  # a skipped step's inf/NaN never reaches the state
    p  <- p * (1 - lr * wd * okf)
    m  <- m + (1 - b1) * okf * (g - m) ;  v <- v + (1 - b2) * okf * (g^2 - v)
    p  <- p - lr * okf / (1 - b1^t) * m / (sqrt(v / (1 - b2^t)) + eps)

Each element is read once (p, g, m, v) and written once (p, m, v): 28 bytes per fp32 parameter,
the floor for Adam. ``lr``, ``ok`` and the step counts are device tensors, so nothing reads a
value back to the host, and a learning-rate change needs no recompilation. The eager reference is
``adamw_update_ref`` below (``kiln.train.AdamW``'s unfused path); tests compare the two (interpreted on the CPU).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from kiln.kernels._backend import HAVE_TRITON, unsupported_reason, warn_fallback

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _adamw_math(p, g, m, v, okf, lr, t, beta1, beta2, eps, weight_decay):
        # The update of the module docstring on fp32 values: (p, m, v) after one guarded step.
        bias1 = 1.0 - tl.exp2(t * tl.log2(beta1))
        bias2 = 1.0 - tl.exp2(t * tl.log2(beta2))
        g = tl.where(okf > 0.5, g, 0.0)
        p = p * (1.0 - lr * weight_decay)
        m = m + (1.0 - beta1) * okf * (g - m)
        v = v + (1.0 - beta2) * okf * (g * g - v)
        denom = tl.sqrt(v / bias2) + eps
        p = p - (lr / bias1) * m / denom
        return p, m, v

    @triton.jit
    def _adamw_kernel(P, G, M, V, STEP, LR, OK, n, beta1, beta2, eps, weight_decay, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        okf = tl.load(OK).to(tl.float32)
        lr = tl.load(LR).to(tl.float32) * okf
        t = tl.maximum(tl.load(STEP).to(tl.float32), 1.0)
        p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        m = tl.load(M + offs, mask=mask, other=0.0).to(tl.float32)
        v = tl.load(V + offs, mask=mask, other=0.0).to(tl.float32)
        p, m, v = _adamw_math(p, g, m, v, okf, lr, t, beta1, beta2, eps, weight_decay)
        tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)
        tl.store(M + offs, m.to(M.dtype.element_ty), mask=mask)
        tl.store(V + offs, v.to(V.dtype.element_ty), mask=mask)


    @triton.jit
    def _adamw_multi_kernel(PTRS, NUMEL, TILE_T, TILE_S, LR, OK, beta1, beta2, eps, weight_decay,
                            BLOCK: tl.constexpr):
        # One program updates BLOCK elements of one tensor: tile -> (tensor, first element) from the two
        # tables; the tensor's p, g, m, v and step addresses from its row of PTRS (int64, 5 per tensor).
        pid = tl.program_id(0)
        ti = tl.load(TILE_T + pid).to(tl.int64)
        row = PTRS + ti * 5
        P = tl.load(row).to(tl.pointer_type(tl.float32))
        G = tl.load(row + 1).to(tl.pointer_type(tl.float32))
        M = tl.load(row + 2).to(tl.pointer_type(tl.float32))
        V = tl.load(row + 3).to(tl.pointer_type(tl.float32))
        STEP = tl.load(row + 4).to(tl.pointer_type(tl.float32))
        offs = tl.load(TILE_S + pid) + tl.arange(0, BLOCK)
        mask = offs < tl.load(NUMEL + ti)
        okf = tl.load(OK).to(tl.float32)
        lr = tl.load(LR).to(tl.float32) * okf
        t = tl.maximum(tl.load(STEP), 1.0)
        p = tl.load(P + offs, mask=mask, other=0.0)
        g = tl.load(G + offs, mask=mask, other=0.0)
        m = tl.load(M + offs, mask=mask, other=0.0)
        v = tl.load(V + offs, mask=mask, other=0.0)
        p, m, v = _adamw_math(p, g, m, v, okf, lr, t, beta1, beta2, eps, weight_decay)
        tl.store(P + offs, p, mask=mask)
        tl.store(M + offs, m, mask=mask)
        tl.store(V + offs, v, mask=mask)


BLOCK = 2048
_MULTI = {"on": False}
_TILES: dict = {}  # (device, numels) -> (tile -> tensor, tile -> first element, numels) device tables
_PTRS: dict = {}  # (device, numels) -> (the last pointer list, its device table): reused while no address changes


@contextlib.contextmanager
def multi_tensor_mode() -> Iterator[None]:
    """Within the block, ``adamw_fused_update_`` updates every fp32 tensor of a group in ONE launch
    (a table of addresses) instead of one launch per tensor: a small model's step is bound by the
    host's launches (75 AdamW launches a step at d512, 8 layers). Same arithmetic per element."""
    saved = _MULTI["on"]
    _MULTI["on"] = True
    try:
        yield
    finally:
        _MULTI["on"] = saved


def _to_device(values: list[int], device: torch.device) -> torch.Tensor:
    t = torch.tensor(values, dtype=torch.int64)
    return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)


def _multi_update(params, grads, avgs, avg_sqs, steps, lr, okf, beta1, beta2, eps, weight_decay) -> None:
    """One launch over every tensor (all fp32, contiguous, on one device)."""
    device = params[0].device
    numels = tuple(p.numel() for p in params)
    key = (device, numels)
    if key not in _TILES:
        tile_t = [i for i, n in enumerate(numels) for _ in range(0, n, BLOCK)]
        tile_s = [s for n in numels for s in range(0, n, BLOCK)]
        _TILES[key] = (_to_device(tile_t, device), _to_device(tile_s, device), _to_device(list(numels), device))
    tile_t, tile_s, n_t = _TILES[key]
    ptrs = [t.data_ptr() for group in zip(params, grads, avgs, avg_sqs, steps) for t in group]
    last = _PTRS.get(key)  # per group (by its shapes): a model's two groups do not evict each other
    if last is None or last[0] != ptrs:  # gradients usually come back at the same addresses
        last = _PTRS[key] = (ptrs, _to_device(ptrs, device))
    _adamw_multi_kernel[(tile_t.numel(),)](last[1], n_t, tile_t, tile_s, lr, okf, beta1, beta2, eps, weight_decay,
                                            BLOCK=BLOCK, num_warps=8)


def adamw_update_ref(
    params: list[torch.Tensor], grads: list[torch.Tensor], avgs: list[torch.Tensor], avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor], lr: torch.Tensor, ok: torch.Tensor,
    beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """The eager reference of the guarded AdamW update (``kiln.train.AdamW``'s default path).

    AdamW on lists of tensors where ``lr`` (0-dim fp32), ``ok`` (0-dim bool) and each ``steps[i]``
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


def adamw_fused_update_(
    params: list[torch.Tensor], grads: list[torch.Tensor], avgs: list[torch.Tensor], avg_sqs: list[torch.Tensor],
    steps: list[torch.Tensor], lr: torch.Tensor, ok: torch.Tensor,
    beta1: float, beta2: float, eps: float, weight_decay: float,
) -> None:
    """The guarded AdamW update of ``adamw_update_ref``, one kernel per tensor.

    ``steps`` are incremented by ``ok`` first (one multi-tensor add); then each parameter's kernel
    reads its own step count. Contiguous tensors only; others (and devices Triton cannot run on)
    go through the eager reference with one warning.
    """
    reason = unsupported_reason(*params[:1], lr, ok)
    if reason is None and not all(t.is_contiguous() for ts in (params, grads, avgs, avg_sqs) for t in ts):
        reason = "non-contiguous parameter, gradient or state tensor"
    if reason is not None:
        warn_fallback("adamw", reason)
        adamw_update_ref(params, grads, avgs, avg_sqs, steps, lr, ok, beta1, beta2, eps, weight_decay)
        return
    okf = ok.to(torch.float32)
    torch._foreach_add_(steps, okf)
    if _MULTI["on"] and all(t.dtype == torch.float32 for ts in (params, grads, avgs, avg_sqs, steps) for t in ts):
        _multi_update(params, grads, avgs, avg_sqs, steps, lr, okf, beta1, beta2, eps, weight_decay)
        return
    for p, g, m, v, s in zip(params, grads, avgs, avg_sqs, steps):
        n = p.numel()
        _adamw_kernel[(triton.cdiv(n, BLOCK),)](p, g, m, v, s, lr, okf, n, beta1, beta2, eps, weight_decay,
                                                BLOCK=BLOCK, num_warps=8)
