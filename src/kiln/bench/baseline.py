"""The plain PyTorch baseline Kiln's training speed is measured against.

A Llama-style decoder written the way a careful PyTorch user writes it today (nanoGPT's loop with
the Llama block): ``nn.Linear`` without bias, ``F.rms_norm``, RoPE with cos/sin tables, SwiGLU,
``F.scaled_dot_product_attention(is_causal=True)``, tied embeddings, the loss inside ``forward``;
trained under ``torch.compile``, bf16 autocast and ``torch.optim.AdamW(fused=True)``, with torch's
``clip_grad_norm_``. Nothing in it is Kiln's. ``liger=True`` swaps in Liger-Kernel's RMSNorm,
RoPE, SwiGLU and fused linear + cross-entropy (the second reference), where ``liger_kernel`` imports.

The shape comes from a ``kiln.model.ModelConfig`` so both sides train the same model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from kiln.model.config import ModelConfig


class _Block(nn.Module):
    def __init__(self, c: ModelConfig, liger: bool) -> None:
        super().__init__()
        d, hd = c.d_model, c.head_dim
        self.n_heads, self.n_kv, self.hd, self.eps, self.liger = c.n_heads, c.n_kv_heads, hd, c.norm_eps, liger
        self.ln1 = nn.Parameter(torch.ones(d))
        self.ln2 = nn.Parameter(torch.ones(d))
        self.wq = nn.Linear(d, c.n_heads * hd, bias=False)
        self.wk = nn.Linear(d, c.n_kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, c.n_kv_heads * hd, bias=False)
        self.wo = nn.Linear(c.n_heads * hd, d, bias=False)
        self.w_gate = nn.Linear(d, c.d_ff, bias=False)
        self.w_up = nn.Linear(d, c.d_ff, bias=False)
        self.w_down = nn.Linear(c.d_ff, d, bias=False)
        if liger:
            from liger_kernel.transformers.rms_norm import LigerRMSNorm

            self.norm1, self.norm2 = LigerRMSNorm(d, eps=c.norm_eps), LigerRMSNorm(d, eps=c.norm_eps)

    def _norm(self, x: torch.Tensor, which: int) -> torch.Tensor:
        if self.liger:
            return _eager((self.norm1 if which == 1 else self.norm2).forward)(x)
        return F.rms_norm(x, (x.shape[-1],), self.ln1 if which == 1 else self.ln2, self.eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        h = self._norm(x, 1)
        q = self.wq(h).view(B, T, self.n_heads, self.hd).transpose(1, 2)  # (B, H, T, D)
        k = self.wk(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        v = self.wv(h).view(B, T, self.n_kv, self.hd).transpose(1, 2)
        if self.liger:
            from liger_kernel.transformers.rope import liger_rotary_pos_emb

            q, k = _eager(liger_rotary_pos_emb)(q, k, cos.to(q.dtype), sin.to(q.dtype))
        else:
            q, k = _rope(q, cos, sin), _rope(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=self.n_kv != self.n_heads)
        x = x + self.wo(y.transpose(1, 2).reshape(B, T, -1))
        h = self._norm(x, 2)
        if self.liger:
            from liger_kernel.ops.swiglu import LigerSiLUMulFunction

            return x + self.w_down(_eager(LigerSiLUMulFunction.apply)(self.w_gate(h), self.w_up(h)))
        return x + self.w_down(F.silu(self.w_gate(h)) * self.w_up(h))


def _eager(fn):
    """Run ``fn`` outside torch.compile's graph: Liger's Triton kernels are written for eager mode
    (host reads such as ``.item()`` and Python-float kernel arguments break tracing)."""
    return torch.compiler.disable(fn, recursive=True)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, H, T, D), cos/sin (1, T, D) in the rotate-half layout (HF Llama)."""
    x1, x2 = x.chunk(2, dim=-1)
    rot = torch.cat((-x2, x1), dim=-1)
    return (x * cos.unsqueeze(0) + rot * sin.unsqueeze(0)).to(x.dtype)


class PlainLlama(nn.Module):
    """The baseline model: ``forward(idx (B, T), targets (B, T) or None)`` -> loss, or logits."""

    def __init__(self, c: ModelConfig, liger: bool = False) -> None:
        super().__init__()
        self.c, self.liger = c, liger
        self.embed = nn.Embedding(c.vocab_size, c.d_model)
        self.blocks = nn.ModuleList(_Block(c, liger) for _ in range(c.n_layers))
        self.ln_f = nn.Parameter(torch.ones(c.d_model))
        self.head = nn.Linear(c.d_model, c.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied, like Kiln's presets
        inv = 1.0 / (c.rope_theta ** (torch.arange(0, c.head_dim, 2).float() / c.head_dim))
        ang = torch.outer(torch.arange(c.context_length).float(), inv)  # (T, D/2)
        emb = torch.cat((ang, ang), dim=-1)  # (T, D)
        self.register_buffer("cos", emb.cos()[None], persistent=False)  # (1, T, D)
        self.register_buffer("sin", emb.sin()[None], persistent=False)
        for name, p in self.named_parameters():
            if p.ndim == 2:
                std = 0.02 / math.sqrt(2 * c.n_layers) if name.endswith(("wo.weight", "w_down.weight")) else 0.02
                nn.init.normal_(p, 0.0, std)
        if liger:
            from liger_kernel.transformers.fused_linear_cross_entropy import (
                LigerFusedLinearCrossEntropyLoss,
            )

            self.flce = LigerFusedLinearCrossEntropyLoss()

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        T = idx.shape[1]
        x = self.embed(idx)
        cos, sin = self.cos[:, :T], self.sin[:, :T]
        for blk in self.blocks:
            x = blk(x, cos, sin)
        x = F.rms_norm(x, (x.shape[-1],), self.ln_f, self.c.norm_eps)
        if targets is None:
            return self.head(x)
        if self.liger:
            return _eager(self.flce.forward)(self.head.weight, x.reshape(-1, x.shape[-1]), targets.reshape(-1))
        logits = self.head(x)
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))


def build_plain(c: ModelConfig, device: torch.device, liger: bool = False, lr: float = 6e-4,
                weight_decay: float = 0.1, betas: tuple[float, float] = (0.9, 0.95)):
    """The baseline model on ``device`` and its fused torch AdamW (decay on matrices only)."""
    model = PlainLlama(c, liger=liger).to(device)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    rest = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay}, {"params": rest, "weight_decay": 0.0}],
                            lr=lr, betas=betas, fused=fused)
    return model, opt


def plain_step(model_c, opt, x: torch.Tensor, y: torch.Tensor, amp, grad_clip: float = 1.0) -> torch.Tensor:
    """One baseline step (nanoGPT's): forward with the loss inside, backward, clip, step. No host sync."""
    with amp:
        loss = model_c(x, y)
    loss.backward()
    if grad_clip > 0:
        torch.nn.utils.clip_grad_norm_(model_c.parameters(), grad_clip)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.detach()
