"""Muon for the hidden matrices, AdamW for the rest, and one object that steps both.

Muon (Keller Jordan et al. 2024, "Muon: An optimizer for hidden layers in neural networks";
Liu et al., "Muon is Scalable for LLM Training", arXiv:2502.16982) replaces a 2-D weight's
momentum update ``M`` by its nearest semi-orthogonal matrix ``U V^T`` (``M = U S V^T``), computed
without an SVD by a few Newton-Schulz iterations. Every singular direction then moves by the same
amount, which amplifies the rare directions that plain momentum updates neglect.

- ``zeropower_via_newtonschulz5(G, steps)``: the orthogonalization, batched over leading dims;
- ``Muon``: the optimizer, for 2-D matrices only;
- ``muon_param_groups(model, ...)``: which parameters go to Muon and which to AdamW;
- ``CombinedOptimizer``: several optimizers behind one ``step``/``zero_grad``/``state_dict``;
- ``muon_with_adamw(model, ...)``: the two built and combined, for the trainer.

Learning rates: every group carries ``base_lr`` (its peak rate). The trainer applies its schedule as a
multiplier, ``group["lr"] = group["base_lr"] * lr_factor`` with ``lr_factor = schedule(t) / cfg.lr``
(``CombinedOptimizer.set_lr_factor`` does exactly this).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, MutableMapping, Sequence
from typing import Any

import torch
from torch import Tensor

from kiln.train.optim import AdamW

NS_COEFFS = (3.4445, -4.7750, 2.0315)
"""Quintic Newton-Schulz coefficients (a, b, c) of ``p(x) = a x + b x^3 + c x^5`` (Keller Jordan 2024).
Chosen for a steep slope at 0 (a = 3.4445) so small singular values grow fast, at the price of not
converging to exactly 1: after 5 steps singular values land in roughly [0.7, 1.2], which is as good
as exact for an update direction."""

SCALES = ("moonshot", "keller")


def zeropower_via_newtonschulz5(
    G: Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> Tensor:
    """Approximate the polar factor ``U V^T`` of ``G = U S V^T`` by ``steps`` quintic Newton-Schulz steps.

    G: (..., m, n), any float dtype -> (..., m, n) in G's dtype, with singular values in about
    [0.7, 1.2] (see ``NS_COEFFS``) and the singular vectors of G. Leading dims are a batch: each
    matrix is normalized and iterated on its own.

    The iteration runs in ``dtype`` (default: bf16 on CUDA, where the matmuls are fast and the
    iteration is stable in bf16; fp32 elsewhere). ``G`` is first divided by its Frobenius norm
    (computed in fp32), which bounds every singular value by 1, inside the iteration's basin. The
    iteration itself is ``newton_schulz_iterations``.
    """
    if G.ndim < 2:
        raise ValueError(f"Newton-Schulz needs a matrix or a batch of matrices, got shape {tuple(G.shape)}")
    if steps < 1:
        raise ValueError(f"Newton-Schulz steps={steps} must be >= 1 (5 is standard)")
    if dtype is None:
        dtype = torch.bfloat16 if G.is_cuda else torch.float32
    X = G.reshape(-1, G.size(-2), G.size(-1)).float()  # (k, m, n)
    norm = torch.linalg.matrix_norm(X, ord="fro", keepdim=True)  # (k, 1, 1)
    X = (X / (norm + eps)).to(dtype)
    return newton_schulz_iterations(X, steps).reshape(G.shape).to(G.dtype)


def newton_schulz_iterations(X: Tensor, steps: int) -> Tensor:
    """``steps`` quintic Newton-Schulz steps on matrices already scaled to spectral norm <= 1.

    X: (k, m, n) in the working dtype -> a new (k, m, n) contiguous tensor. Each step is three
    batched GEMMs with the polynomial folded into cuBLAS's epilogue (``baddbmm``: ``beta * C +
    alpha * A @ B``), so no elementwise kernel runs between them. The Gram matrix is always the
    small one: ``A = X X^T`` (m x m) with ``X <- a X + B X`` for a wide or square X, and
    ``A = X^T X`` (n x n) with ``X <- a X + X B`` for a tall one; both are ``p(X X^T) X`` with
    ``p = a + b A + c A^2``, and neither needs a transposed copy of X.
    """
    a, b, c = NS_COEFFS
    tall = X.size(-2) > X.size(-1)
    for _ in range(steps):
        if tall:
            A = torch.bmm(X.mT, X)  # (k, n, n)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # b A + c A^2, (k, n, n)
            X = torch.baddbmm(X, X, B, beta=a)  # a X + X B, (k, m, n)
        else:
            A = torch.bmm(X, X.mT)  # (k, m, m)
            B = torch.baddbmm(A, A, A, beta=b, alpha=c)  # (k, m, m)
            X = torch.baddbmm(X, B, X, beta=a)  # a X + B X, (k, m, n)
    return X


def update_scale(rows: int, cols: int, scale: str) -> float:
    """Multiplier of the orthogonalized update of a (rows, cols) matrix.

    An orthogonalized (rows, cols) update has min(rows, cols) singular values near 1, so its RMS is
    ``1 / sqrt(max(rows, cols))``: it shrinks as the model widens.

    - ``"moonshot"`` (default): ``0.2 * sqrt(max(rows, cols))`` gives every matrix an update RMS of
      0.2, about AdamW's typical update RMS, so Muon can reuse AdamW's learning rate, weight decay
      and schedule without retuning, at any width (arXiv:2502.16982, section 2.2).
    - ``"keller"``: ``sqrt(max(1, rows / cols))`` (modded-nanogpt); update RMS ``1/sqrt(cols)`` for
      wide-or-square matrices, so it needs its own, larger lr (~0.02-0.05) that changes with width.
    """
    if scale == "moonshot":
        return 0.2 * math.sqrt(max(rows, cols))
    if scale == "keller":
        return math.sqrt(max(1.0, rows / cols))
    raise ValueError(f"Muon scale={scale!r} is not one of {SCALES}")


class Muon(torch.optim.Optimizer):
    """MomentUm Orthogonalized by Newton-Schulz, for 2-D weight matrices.

    Per matrix ``W`` (rows, cols) with gradient ``g``::

        buf <- mu * buf + g                                  # SGD momentum
        u   <- g + mu * buf   (nesterov)   or   buf
        W   <- W - lr * wd * W                               # decoupled weight decay, before the update
        W   <- W - lr * update_scale(rows, cols) * NS5(u)    # NS5: zeropower_via_newtonschulz5

    Newton-Schulz normalizes its input, so the momentum form (SGD sum vs EMA) only changes the mix of
    g and buf, not the step size. Matrices of one shape in one group are stacked and orthogonalized
    in one batched call (a Kiln block's 7 matrices have 3 shapes, 4 with GQA, so a step launches
    about 3 x ns_steps x 3 batched matmuls instead of 7 x n_layers x ns_steps x 3 small ones).
    Each update is normalized by its Frobenius norm (taken in fp32) after the cast to the
    iteration's dtype (bf16 on CUDA, fp32 elsewhere).

    ``fused=True`` (what the trainer sets on CUDA) runs the elementwise work around Newton-Schulz
    as two Triton passes (``kiln.kernels.muon``) instead of about ten eager torch ops; the result
    is the same up to rounding, and where the kernels cannot run it falls back with one warning.

    State per parameter: ``momentum_buffer`` (same dtype/device as the parameter). No step counter
    is needed (no bias correction), and nothing reads a device value on the host. Each group
    carries ``lr``, ``weight_decay``, ``momentum``, ``nesterov``, ``scale`` and ``ns_steps``.
    Only 2-D parameters are accepted: embeddings, the output head, norm gains and biases belong to
    AdamW (see ``muon_param_groups``). Needs whole matrices: fine under DDP, not on FSDP/ZeRO shards.
    """

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict],
        lr: float = 1e-3,
        momentum: float = 0.95,
        nesterov: bool = True,
        weight_decay: float = 0.0,
        scale: str = "moonshot",
        ns_steps: int = 5,
        fused: bool = False,
    ) -> None:
        if not lr >= 0:
            raise ValueError(f"Muon lr={lr} must be >= 0")
        if not 0 <= momentum < 1:
            raise ValueError(f"Muon momentum={momentum} must be in [0, 1), e.g. 0.95")
        if not weight_decay >= 0:
            raise ValueError(f"Muon weight_decay={weight_decay} must be >= 0")
        if scale not in SCALES:
            raise ValueError(f"Muon scale={scale!r} must be one of {SCALES} ('moonshot' reuses AdamW's lr)")
        if not (isinstance(ns_steps, int) and ns_steps >= 1):
            raise ValueError(f"Muon ns_steps={ns_steps} must be a positive integer (5 is standard)")
        defaults = {"lr": lr, "momentum": momentum, "nesterov": bool(nesterov), "weight_decay": weight_decay,
                    "scale": scale, "ns_steps": ns_steps}
        super().__init__(params, defaults)
        self.fused = fused

    def add_param_group(self, param_group: dict) -> None:
        """Add a group after checking that every parameter is a matrix."""
        params = param_group["params"]
        params = [params] if isinstance(params, Tensor) else list(params)
        for p in params:
            p = p[1] if isinstance(p, tuple) else p  # (name, param) pairs, as torch >= 2.6 allows
            if p.ndim != 2:
                raise ValueError(
                    f"Muon only updates 2-D matrices, got a parameter of shape {tuple(p.shape)}; "
                    "give embeddings, norms and biases to AdamW (kiln.train.muon.muon_param_groups does)"
                )
        super().add_param_group({**param_group, "params": params})

    #: ``step(ok=...)``: a device-side skip of a bad step (see ``kiln.train.step``).
    supports_ok_mask = True

    @torch.no_grad()
    def step(self, closure=None, ok: torch.Tensor | None = None):  # type: ignore[override]
        """One update of every matrix that has a gradient. Returns ``closure()`` if given.

        ok: optional 0-dim bool device tensor; where false, parameters and momentum stay unchanged
        (the gradients are zeroed through ``where`` first, so a NaN never reaches the buffer).

        Per bucket of same-shaped matrices: the momentum pass (momentum, Nesterov mix, stacking,
        squared norms), normalization, ``newton_schulz_iterations``, the apply pass (weight decay
        and the scaled update). With ``fused`` the two passes are Kiln's Triton kernels
        (``kiln.kernels.muon``), else eager torch ops (``_muon_momentum_reference`` /
        ``_muon_apply_reference``, also the fallback where the kernels cannot run)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params, grads, bufs = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("kiln Muon does not support sparse gradients")
                state = self.state[p]
                if not state:
                    state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                bufs.append(state["momentum_buffer"])
            if not params:
                continue
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            momentum, apply = _muon_momentum_reference, _muon_apply_reference
            ok_arg = ok
            if self.fused:
                from kiln.kernels import muon as kernels

                if ok_arg is None:
                    ok_arg = self._always_ok(params[0].device)
                reason = kernels.muon_supported(params, grads, bufs, ok_arg)
                if reason is None:
                    momentum, apply = kernels.muon_momentum_, kernels.muon_apply_
                else:
                    kernels.fallback_warning(reason)
                    ok_arg = ok
            # Same-shaped matrices share one batched Newton-Schulz call.
            buckets: dict[tuple, list[int]] = {}
            for i, p in enumerate(params):
                buckets.setdefault((tuple(p.shape), p.device, p.dtype), []).append(i)
            for (shape, device, _), idx in buckets.items():
                ns_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
                U, sumsq = momentum([grads[i] for i in idx], [bufs[i] for i in idx], ok_arg, mu,
                                    group["nesterov"], ns_dtype)  # (k, rows, cols), (k,)
                U.mul_((1.0 / (sumsq.sqrt() + 1e-7)).view(-1, 1, 1))  # Frobenius norm 1: every singular value <= 1
                ortho = newton_schulz_iterations(U, group["ns_steps"])  # (k, rows, cols)
                apply([params[i] for i in idx], ortho, ok_arg, lr * wd,
                      -lr * update_scale(shape[0], shape[1], group["scale"]))
        return loss

    def _always_ok(self, device: torch.device) -> Tensor:
        """A cached 0-dim ``True`` on ``device``: the fused passes always take a guard tensor."""
        cache = self.__dict__.setdefault("_ok_true", {})
        if device not in cache:
            cache[device] = torch.ones((), dtype=torch.bool, device=device)
        return cache[device]


def _muon_momentum_reference(grads: list[Tensor], bufs: list[Tensor], ok: Tensor | None, mu: float,
                             nesterov: bool, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eager momentum pass over one bucket (``bufs`` updated in place), as ``kiln.kernels.muon``.

    grads, bufs: k tensors of one shape (rows, cols). Returns ``U`` (k, rows, cols) in ``dtype``
    (the Nesterov or plain momentum update) and ``sumsq`` (k,) fp32, each update's squared
    Frobenius norm taken before the cast."""
    if ok is not None:
        okf = ok.to(torch.float32)
        grads = [torch.where(ok, g, torch.zeros_like(g)) for g in grads]
        torch._foreach_mul_(bufs, 1.0 + (mu - 1.0) * okf)  # mu when ok, 1 when skipped
    else:
        torch._foreach_mul_(bufs, mu)
    torch._foreach_add_(bufs, grads)
    updates = torch._foreach_add(grads, bufs, alpha=mu) if nesterov else bufs
    U = torch.stack(updates).float()  # (k, rows, cols)
    return U.to(dtype), U.square().sum(dim=(-2, -1))


def _muon_apply_reference(params: list[Tensor], O: Tensor, ok: Tensor | None, decay: float, alpha: float) -> None:
    """Eager apply pass: ``p <- p * (1 - decay * okf) + alpha * okf * O[i]`` (``okf`` = 1 without ``ok``).

    O: (k, rows, cols), the orthogonalized updates of the k same-shaped ``params``."""
    dtype = params[0].dtype
    O = O.to(dtype)
    if ok is None:
        if decay != 0:
            torch._foreach_mul_(params, 1.0 - decay)
    else:
        okf = ok.to(torch.float32)
        if decay != 0:
            torch._foreach_mul_(params, 1.0 - decay * okf)
        O = O * okf.to(dtype)
    torch._foreach_add_(params, list(O.unbind(0)), alpha=alpha)


def muon_param_groups(
    model: torch.nn.Module, weight_decay: float, adamw_lr: float, muon_lr: float,
    muon_weight_decay: float | None = None,
) -> tuple[list[dict], list[dict]]:
    """Split a Kiln ``Transformer``'s parameters into Muon groups and AdamW groups.

    Muon: the 2-D matrices inside the blocks (names under ``layers.``: q/k/v/o projections,
    gate/up/down), decayed with ``muon_weight_decay`` (None: ``weight_decay``). AdamW: everything else: the embedding (a lookup
    whose rows see sparse, token-frequency-skewed gradients), the output head (Muon's authors keep
    the first and last layers on AdamW), norm gains and any non-matrix. As in
    ``kiln.train.optim.param_groups``, AdamW decays its matrices (an untied lm_head) but not
    embeddings or norm gains. A tied embedding/lm_head matrix appears once (``named_parameters``
    deduplicates shared tensors), in AdamW.

    Every group has ``lr`` and ``base_lr`` (= its peak lr). Empty groups are left out. Returns
    ``(muon_groups, adamw_groups)``; each parameter with ``requires_grad`` is in exactly one group.
    """
    muon, decay, no_decay = [], [], []
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        in_block = name.startswith("layers.") or ".layers." in name  # ".layers.": DDP / compile wrappers
        if p.ndim == 2 and in_block and "embed" not in name:
            muon.append(p)
        elif p.ndim >= 2 and "embed" not in name and "norm" not in name:
            decay.append(p)
        else:
            no_decay.append(p)
    muon_wd = weight_decay if muon_weight_decay is None else muon_weight_decay
    muon_groups = [{"params": muon, "lr": muon_lr, "base_lr": muon_lr, "weight_decay": muon_wd}]
    adamw_groups = [
        {"params": decay, "lr": adamw_lr, "base_lr": adamw_lr, "weight_decay": weight_decay},
        {"params": no_decay, "lr": adamw_lr, "base_lr": adamw_lr, "weight_decay": 0.0},
    ]
    return [g for g in muon_groups if g["params"]], [g for g in adamw_groups if g["params"]]


class _CombinedState(MutableMapping):
    """``CombinedOptimizer.state``: one mapping over every optimizer's ``state`` (param -> dict).

    Reading a parameter's state goes to the optimizer that owns it; ``clear()`` clears them all
    (what the trainer does to restart the moments after a rollback to a step-0 checkpoint)."""

    def __init__(self, owner: CombinedOptimizer) -> None:
        self._owner = owner

    def _opt_for(self, p: Tensor) -> torch.optim.Optimizer:
        opt = self._owner._owner_of.get(id(p))
        if opt is None:
            raise KeyError("parameter is not managed by this CombinedOptimizer")
        return opt

    def __getitem__(self, p: Tensor) -> dict:
        return self._opt_for(p).state[p]

    def __setitem__(self, p: Tensor, value: dict) -> None:
        self._opt_for(p).state[p] = value

    def __delitem__(self, p: Tensor) -> None:
        del self._opt_for(p).state[p]

    def __iter__(self) -> Iterator[Tensor]:
        for opt in self._owner.optimizers:
            yield from opt.state

    def __len__(self) -> int:
        return sum(len(opt.state) for opt in self._owner.optimizers)

    def clear(self) -> None:
        for opt in self._owner.optimizers:
            opt.state.clear()


class CombinedOptimizer:
    """Several optimizers over disjoint parameters, used as one (e.g. Muon + AdamW).

    - ``param_groups``: every optimizer's groups, concatenated (the same dict objects, so setting
      ``group["lr"]`` sets it in the owning optimizer). Each has ``base_lr``, its peak lr (set from
      ``lr`` here if missing). **The trainer sets learning rates as**
      ``group["lr"] = group["base_lr"] * lr_factor`` with ``lr_factor = schedule(t) / cfg.lr``
      (e.g. ``cosine_lr(step + 1, cfg.lr, cfg.min_lr, ...) / cfg.lr``), or ``set_lr_factor(lr_factor)``.
      Do not write ``group["lr"] = schedule(t)``: that would give Muon AdamW's lr.
    - ``step()``, ``zero_grad(set_to_none=True)``: every optimizer, in order.
    - ``state``: a mapping over all optimizers' per-parameter state; ``state.clear()`` clears all.
    - ``state_dict()`` -> ``{"optimizers": [sd, ...], "kinds": [class name, ...]}``;
      ``load_state_dict`` checks kinds and count, then loads each. Group keys (``base_lr`` included)
      come from the saved state, as with any torch optimizer.
    - ``optimizers``: the tuple of wrapped optimizers (e.g. for
      ``torch.distributed.checkpoint.state_dict.get_optimizer_state_dict(model, optimizers)``).
    """

    def __init__(self, optimizers: Sequence[torch.optim.Optimizer]) -> None:
        self.optimizers = tuple(optimizers)
        if not self.optimizers:
            raise ValueError("CombinedOptimizer needs at least one optimizer")
        self._owner_of: dict[int, torch.optim.Optimizer] = {}
        for opt in self.optimizers:
            for group in opt.param_groups:
                group.setdefault("base_lr", group["lr"])
                for p in group["params"]:
                    if id(p) in self._owner_of:
                        raise ValueError(
                            f"a parameter of shape {tuple(p.shape)} is in two optimizers "
                            f"({type(self._owner_of[id(p)]).__name__} and {type(opt).__name__}); "
                            "each parameter must belong to exactly one"
                        )
                    self._owner_of[id(p)] = opt
        self._state = _CombinedState(self)

    @property
    def param_groups(self) -> list[dict]:
        """All groups of all optimizers, in optimizer order (live dicts: writes reach the optimizer)."""
        return [g for opt in self.optimizers for g in opt.param_groups]

    @property
    def state(self) -> _CombinedState:
        """Per-parameter state of every optimizer, as one mapping."""
        return self._state

    def set_lr_factor(self, lr_factor: float) -> None:
        """``group["lr"] = group["base_lr"] * lr_factor`` for every group (the schedule's multiplier)."""
        for group in self.param_groups:
            group["lr"] = group["base_lr"] * lr_factor

    @property
    def supports_ok_mask(self) -> bool:
        """``step(ok=...)`` works when every inner optimizer supports it."""
        return all(getattr(opt, "supports_ok_mask", False) for opt in self.optimizers)

    @torch.no_grad()
    def step(self, closure=None, ok: torch.Tensor | None = None):
        """Step every optimizer (``ok`` passed on). ``closure`` (if given) is evaluated once, before the updates."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for opt in self.optimizers:
            if ok is None:
                opt.step()
            else:
                opt.step(ok=ok)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizers": [opt.state_dict() for opt in self.optimizers],
                "kinds": [type(opt).__name__ for opt in self.optimizers]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not isinstance(state_dict, dict) or "optimizers" not in state_dict:
            raise ValueError("not a CombinedOptimizer state dict (expected keys 'optimizers' and 'kinds'); "
                             "was it saved with a single optimizer?")
        kinds = list(state_dict.get("kinds", []))
        mine = [type(opt).__name__ for opt in self.optimizers]
        if len(state_dict["optimizers"]) != len(self.optimizers) or (kinds and kinds != mine):
            raise ValueError(f"saved optimizers {kinds or len(state_dict['optimizers'])} do not match {mine}; "
                             "resume with the same optimizer setting")
        for opt, sd in zip(self.optimizers, state_dict["optimizers"], strict=True):
            opt.load_state_dict(sd)

    def __repr__(self) -> str:
        return f"CombinedOptimizer({', '.join(type(o).__name__ for o in self.optimizers)})"


def muon_with_adamw(
    model: torch.nn.Module,
    *,
    weight_decay: float,
    adamw_lr: float,
    muon_lr: float | None = None,
    betas: tuple[float, float] = (0.9, 0.95),
    eps: float = 1e-8,
    momentum: float = 0.95,
    nesterov: bool = True,
    scale: str = "moonshot",
    ns_steps: int = 5,
    muon_weight_decay: float | None = None,
) -> CombinedOptimizer:
    """Muon on the block matrices and Kiln's AdamW on the rest, as one ``CombinedOptimizer``.

    ``muon_lr=None`` means ``adamw_lr`` for ``scale="moonshot"`` (its point: the same lr works) and
    0.02 for ``scale="keller"`` (modded-nanogpt's value).
    """
    if muon_lr is None:
        muon_lr = adamw_lr if scale == "moonshot" else 0.02
    muon_groups, adamw_groups = muon_param_groups(model, weight_decay, adamw_lr, muon_lr, muon_weight_decay)
    opts: list[torch.optim.Optimizer] = []
    if muon_groups:
        opts.append(Muon(muon_groups, lr=muon_lr, momentum=momentum, nesterov=nesterov,
                         weight_decay=muon_groups[0]["weight_decay"], scale=scale, ns_steps=ns_steps))
    if adamw_groups:
        opts.append(AdamW(adamw_groups, lr=adamw_lr, betas=betas, eps=eps, weight_decay=weight_decay))
    return CombinedOptimizer(opts)
