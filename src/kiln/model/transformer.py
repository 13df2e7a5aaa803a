"""The decoder-only transformer: ``TransformerBlock`` (pre-norm) and ``Transformer`` (Llama layout)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from kiln.model.attention import AttentionFn, MultiHeadSelfAttention
from kiln.model.config import ModelConfig
from kiln.model.kv_cache import KVCache, PagedKVCache
from kiln.model.layers import Embedding, Linear, RMSNorm, RotaryEmbedding, SwiGLU, trunc_normal_


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm(x))`` then ``x + mlp(norm(x))`` (GPT-2 / Llama ordering).

    Children (HF Llama names): input_layernorm, self_attn, post_attention_layernorm, mlp.
    """

    def __init__(
        self,
        d_model: int,
        num_heads: int,
        d_ff: int,
        rope: RotaryEmbedding | None = None,
        num_kv_heads: int | None = None,
        norm_eps: float = 1e-5,
        max_seq_len: int | None = None,
        rope_theta: float = 10000.0,
        attention_impl: str | AttentionFn = "kiln",
        norm_impl: str = "kiln",
        layer_idx: int = 0,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        qk_norm: bool = False,
        linear_impl: str = "kiln",
    ) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(d_model, norm_eps, device=device, dtype=dtype, impl=norm_impl)
        self.self_attn = MultiHeadSelfAttention(
            d_model, num_heads, rope=rope, num_kv_heads=num_kv_heads, max_seq_len=max_seq_len,
            rope_theta=rope_theta, attention_impl=attention_impl, layer_idx=layer_idx, device=device, dtype=dtype,
            qk_norm=qk_norm, norm_eps=norm_eps, linear_impl=linear_impl,
        )
        self.post_attention_layernorm = RMSNorm(d_model, norm_eps, device=device, dtype=dtype, impl=norm_impl)
        self.mlp = SwiGLU(d_model, d_ff, device=device, dtype=dtype, impl=linear_impl)

    def forward(
        self, x: Tensor, token_positions: Tensor | None = None, kv_cache: KVCache | PagedKVCache | None = None
    ) -> Tensor:
        """x: (B, T, d_model) -> (B, T, d_model)."""
        x = x + self.self_attn(self.input_layernorm(x), token_positions, kv_cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """Llama-style language model: embed_tokens -> layers.{i} -> norm -> lm_head.

    Parameter names equal Hugging Face ``LlamaForCausalLM``'s without its ``model.`` prefix, e.g.
    ``layers.0.self_attn.q_proj.weight``. One ``RotaryEmbedding`` (``rope``, buffers only) is shared by
    every layer.

    To build a large model without allocating it twice, build on the meta device, move, then
    initialize (``build_model`` does this)::

        with torch.device("meta"):
            model = Transformer(cfg)
        model.to_empty(device="cuda")
        model.init_weights()
    """

    def __init__(
        self,
        config: ModelConfig,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(config, ModelConfig):
            raise TypeError(f"Transformer needs a ModelConfig, got {type(config).__name__}")
        self.config = config
        c = config
        self.embed_tokens = Embedding(c.vocab_size, c.d_model, device=device, dtype=dtype)
        self.rope = RotaryEmbedding(c.rope_theta, c.head_dim, c.context_length, device=device)
        self.layers = nn.ModuleList(
            TransformerBlock(
                c.d_model, c.n_heads, c.d_ff, rope=self.rope, num_kv_heads=c.n_kv_heads, norm_eps=c.norm_eps,
                attention_impl=c.attention_impl, norm_impl=c.norm_impl, layer_idx=i, device=device, dtype=dtype,
                qk_norm=c.qk_norm, linear_impl=c.linear_impl,  # the block matrices; embedding and head stay
            )
            for i in range(c.n_layers)
        )
        self.norm = RMSNorm(c.d_model, c.norm_eps, device=device, dtype=dtype, impl=c.norm_impl)
        self.lm_head = Linear(c.d_model, c.vocab_size, device=device, dtype=dtype)
        self.tie_weights()
        if not self.embed_tokens.weight.is_meta:
            self.init_weights()

    def tie_weights(self) -> None:
        """Make lm_head share embed_tokens' matrix when ``config.tie_embeddings`` (idempotent)."""
        if self.config.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @torch.no_grad()
    def init_weights(self, std: float = 0.02) -> None:
        """GPT-2 initialization (Radford et al. 2019; nanoGPT): every matrix ~ N(0, std^2) truncated
        at 3 std, except the two projections that write into the residual stream (o_proj, down_proj),
        scaled by 1/sqrt(2 * n_layers) so the residual's variance does not grow with depth. Norm gains
        are ones. Also recomputes the RoPE tables (needed after ``to_empty`` from the meta device)."""
        if any(layer.self_attn.q_proj is None or layer.mlp.gate_proj is None for layer in self.layers):
            raise ValueError("the model's projections are fused (kiln.model.fuse_projections, for inference); "
                             "call kiln.model.unfuse_projections(model) before init_weights")
        self.tie_weights()
        self.rope.reset_parameters()
        resid_std = std / math.sqrt(2 * self.config.n_layers)
        trunc_normal_(self.embed_tokens.weight, std)
        if not self.config.tie_embeddings:
            trunc_normal_(self.lm_head.weight, std)
        for layer in self.layers:
            for lin in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                        layer.mlp.gate_proj, layer.mlp.up_proj):
                trunc_normal_(lin.weight, std)
            trunc_normal_(layer.self_attn.o_proj.weight, resid_std)
            trunc_normal_(layer.mlp.down_proj.weight, resid_std)
            layer.input_layernorm.reset_parameters()
            if layer.self_attn.q_norm is not None:
                layer.self_attn.q_norm.reset_parameters()
                layer.self_attn.k_norm.reset_parameters()
            layer.post_attention_layernorm.reset_parameters()
        self.norm.reset_parameters()

    def hidden_states(
        self, idx: Tensor, token_positions: Tensor | None = None, kv_cache: KVCache | PagedKVCache | None = None
    ) -> Tensor:
        """idx: (B, T) long -> final normed hidden states (B, T, d_model), before ``lm_head``.

        For fused linear + cross-entropy losses, which take these and ``lm_head.weight`` and never
        materialize the (B, T, V) logits. With a ``PagedKVCache`` (the engine), idx is one step packed
        as (1, N) and token_positions (N,) is required.
        """
        if idx.ndim != 2:
            raise ValueError(f"Transformer input must be (batch, seq) token ids, got shape {tuple(idx.shape)}")
        T = idx.shape[1]
        if isinstance(kv_cache, PagedKVCache) and token_positions is None:
            raise ValueError("a PagedKVCache forward needs token_positions (N,) for the packed tokens")
        offset = kv_cache.length if isinstance(kv_cache, KVCache) else 0
        if token_positions is None and offset + T > self.config.context_length:
            raise ValueError(
                f"sequence of {offset + T} tokens ({offset} cached + {T} new) exceeds "
                f"context_length={self.config.context_length}; shorten the input"
            )
        x = self.embed_tokens(idx)  # (B, T, d_model)
        for layer in self.layers:
            x = layer(x, token_positions, kv_cache)
        if isinstance(kv_cache, KVCache):
            kv_cache.advance(T)
        return self.norm(x)

    def forward(
        self, idx: Tensor, token_positions: Tensor | None = None, kv_cache: KVCache | None = None,
        *, return_hidden: bool = False,
    ) -> Tensor:
        """idx: (B, T) long token ids -> logits (B, T, vocab_size).

        token_positions: optional (T,) or (B, T) positions for RoPE (default: consecutive, starting
        after the tokens already in ``kv_cache``). kv_cache: a ``KVCache``; the T new tokens are
        appended to it and it is advanced by T. return_hidden: return the final normed hidden states
        (B, T, d_model) instead of logits, through ``forward`` so wrappers (DDP, FSDP, compile) see
        the call; for fused linear + cross-entropy losses.
        """
        h = self.hidden_states(idx, token_positions, kv_cache)
        return h if return_hidden else self.lm_head(h)

    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (a tied matrix counted once).

        exclude_embeddings: leave out the input embedding table (a lookup, no FLOPs), as Kaplan et al.
        (arXiv:2001.08361) count N. A tied table is kept: it is also the output head's matrix.
        """
        n = sum(p.numel() for p in self.parameters())  # parameters() deduplicates tied tensors
        if exclude_embeddings and not self.config.tie_embeddings:
            n -= self.embed_tokens.weight.numel()
        return n

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token (forward + backward) at sequence length ``seq_len`` (default
        context_length): ``6 N + 12 L d T`` with N the non-embedding parameters (lm_head included).
        The attention term counts the full T x T score matrix (q k^T and probs v), as PaLM
        (Chowdhery et al., arXiv:2204.02311, appendix B) and nanochat do. See docs/model.md."""
        c = self.config
        T = c.context_length if seq_len is None else seq_len
        return 6.0 * self.num_params(exclude_embeddings=True) + 12.0 * c.n_layers * c.n_heads * c.head_dim * T


def build_model(
    config: ModelConfig, device: torch.device | str = "cpu", dtype: torch.dtype | None = None
) -> Transformer:
    """Build on the meta device (no memory, no init work), allocate on ``device``, then initialize."""
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype)
    model.to_empty(device=device)
    model.init_weights()
    return model
