"""Fused elementwise passes of Kiln's Muon step: one Triton kernel before Newton-Schulz, one after.

Muon's matmuls (Newton-Schulz) run in cuBLAS; what surrounds them is memory-bound bookkeeping that,
as separate torch ops, reads and writes every fp32 parameter-sized tensor about ten times a step
(guard, momentum, Nesterov mix, stacking, norm, cast, weight decay, scaled add). Two kernels do it
in two passes, per matrix ``i`` of a same-shape bucket (``okf`` = 1.0 if the step's device-side
guard passed, else 0.0)::

    momentum pass:  g    <- ok ? g : 0                    # a skipped step's NaN never reaches the state
                    buf  <- buf * (okf ? mu : 1) + g
                    u    <- nesterov ? g + mu * buf : buf
                    U[i] <- u  (in Newton-Schulz's dtype),  partial[i, block] <- sum(u^2) of the block
    apply pass:     p    <- p * (1 - lr * wd * okf) + alpha * okf * O[i]    # alpha = -lr * update_scale

Reads and writes: momentum g, buf in, buf and U out (14 bytes per fp32 element with a bf16 U); apply
p and O in, p out (10 bytes). The block sums are added up by ``torch.sum`` afterwards (no atomics:
the same inputs give the same bits on every run). The eager reference is
``kiln.train.muon._muon_momentum_reference`` / ``_muon_apply_reference``; tests compare the two
(interpreted on the CPU).
"""

from __future__ import annotations

import torch

from kiln.kernels._backend import HAVE_TRITON, unsupported_reason, warn_fallback

if HAVE_TRITON:
    import triton
    import triton.language as tl

    @triton.jit
    def _muon_momentum_kernel(G, BUF, U, PART, OK, n, mu, NESTEROV: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        okf = tl.load(OK).to(tl.float32)
        g = tl.load(G + offs, mask=mask, other=0.0).to(tl.float32)
        g = tl.where(okf > 0.5, g, 0.0)
        buf = tl.load(BUF + offs, mask=mask, other=0.0).to(tl.float32)
        buf = buf * (1.0 + (mu - 1.0) * okf) + g
        if NESTEROV:
            u = g + mu * buf
        else:
            u = buf
        tl.store(BUF + offs, buf.to(BUF.dtype.element_ty), mask=mask)
        tl.store(U + offs, u.to(U.dtype.element_ty), mask=mask)
        tl.store(PART + pid, tl.sum(u * u, axis=0))

    @triton.jit
    def _muon_apply_kernel(P, O, OK, n, decay, alpha, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        okf = tl.load(OK).to(tl.float32)
        p = tl.load(P + offs, mask=mask, other=0.0).to(tl.float32)
        o = tl.load(O + offs, mask=mask, other=0.0).to(tl.float32)
        p = p * (1.0 - decay * okf) + (alpha * okf) * o
        tl.store(P + offs, p.to(P.dtype.element_ty), mask=mask)


BLOCK = 4096


def muon_supported(params: list[torch.Tensor], grads: list[torch.Tensor], bufs: list[torch.Tensor],
                   ok: torch.Tensor) -> str | None:
    """None if the fused passes can run on these tensors, else why not (the caller falls back)."""
    reason = unsupported_reason(*params[:1], ok)
    if reason is None and not all(t.is_contiguous() for ts in (params, grads, bufs) for t in ts):
        reason = "non-contiguous parameter, gradient or momentum buffer"
    return reason


def muon_momentum_(grads: list[torch.Tensor], bufs: list[torch.Tensor], ok: torch.Tensor, mu: float,
                   nesterov: bool, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """The momentum pass over one bucket of same-shaped matrices (``bufs`` updated in place).

    grads, bufs: k tensors of one shape (rows, cols); ok: 0-dim bool on their device.
    Returns ``U`` (k, rows, cols) in ``dtype``, the Nesterov (or plain) momentum update of each
    matrix, and ``sumsq`` (k,) fp32, the squared Frobenius norm of each update (before the cast).
    """
    k, shape = len(grads), grads[0].shape
    n = grads[0].numel()
    nblocks = triton.cdiv(n, BLOCK)
    U = torch.empty((k, *shape), dtype=dtype, device=grads[0].device)  # (k, rows, cols)
    part = torch.empty((k, nblocks), dtype=torch.float32, device=grads[0].device)  # (k, blocks)
    okf = ok.to(torch.float32)
    for i, (g, b) in enumerate(zip(grads, bufs, strict=True)):
        _muon_momentum_kernel[(nblocks,)](g, b, U[i], part[i], okf, n, mu, NESTEROV=bool(nesterov),
                                          BLOCK=BLOCK, num_warps=8)
    return U, part.sum(dim=1)


def muon_apply_(params: list[torch.Tensor], O: torch.Tensor, ok: torch.Tensor, decay: float, alpha: float) -> None:
    """The apply pass: ``p <- p * (1 - decay * okf) + alpha * okf * O[i]`` for each matrix ``i``.

    params: k tensors of one shape; O: (k, rows, cols) contiguous (the orthogonalized updates);
    decay = lr * weight_decay; alpha = -lr * update_scale."""
    okf = ok.to(torch.float32)
    n = params[0].numel()
    grid = (triton.cdiv(n, BLOCK),)
    for i, p in enumerate(params):
        _muon_apply_kernel[grid](p, O[i], okf, n, decay, alpha, BLOCK=BLOCK, num_warps=8)


def fallback_warning(reason: str) -> None:
    """One warning that Muon's elementwise passes run as eager torch ops (same answer, slower)."""
    warn_fallback("muon", reason)
