"""``KVCache``: preallocated keys and values of every layer, for prefill-then-decode generation."""

from __future__ import annotations

import torch
from torch import Tensor


class KVCache:
    """Keys and values of the tokens seen so far, one preallocated pair of tensors per layer.

    ``k[i]``, ``v[i]``: (B, n_kv_heads, max_seq_len, head_dim). ``length`` tokens are filled, the
    same number for every row of the batch. A forward pass writes its T new tokens' keys/values at
    ``[length, length + T)`` in every layer (``update``) and then advances ``length`` by T once
    (``Transformer.forward`` calls ``advance``).
    """

    def __init__(
        self,
        n_layers: int,
        batch_size: int,
        n_kv_heads: int,
        max_seq_len: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (batch_size, n_kv_heads, max_seq_len, head_dim)
        self.k: list[Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v: list[Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.max_seq_len = max_seq_len
        self.batch_size = batch_size
        self.length = 0

    @classmethod
    def for_model(
        cls,
        model: torch.nn.Module,
        batch_size: int = 1,
        max_seq_len: int | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> KVCache:
        """A cache shaped for ``model`` (a ``Transformer``); device and dtype default to its weights'."""
        cfg = model.config
        p = next(model.parameters())
        max_seq_len = cfg.context_length if max_seq_len is None else max_seq_len
        if max_seq_len > cfg.context_length:
            raise ValueError(
                f"KVCache max_seq_len={max_seq_len} exceeds the model's context_length={cfg.context_length}"
            )
        return cls(
            cfg.n_layers, batch_size, cfg.n_kv_heads, max_seq_len, cfg.head_dim,
            device=p.device if device is None else device, dtype=p.dtype if dtype is None else dtype,
        )

    def update(self, layer: int, k_new: Tensor, v_new: Tensor) -> tuple[Tensor, Tensor]:
        """Store k_new, v_new: (B, n_kv_heads, T, head_dim) at ``[length, length+T)`` of ``layer``.

        Returns the keys and values of all tokens so far: (B, n_kv_heads, length + T, head_dim).
        """
        B, _, T, _ = k_new.shape
        end = self.length + T
        if end > self.max_seq_len:
            raise ValueError(
                f"KVCache is full: {self.length} cached + {T} new tokens > max_seq_len={self.max_seq_len}; "
                "reset() it or build a longer cache"
            )
        if B != self.batch_size:
            raise ValueError(f"KVCache holds batch size {self.batch_size}, got a batch of {B}")
        self.k[layer][:, :, self.length:end] = k_new
        self.v[layer][:, :, self.length:end] = v_new
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n_tokens: int) -> None:
        """Mark ``n_tokens`` more positions as filled (after every layer has called ``update``)."""
        self.length += n_tokens

    def reset(self) -> None:
        """Forget every cached token (the buffers are reused)."""
        self.length = 0

    def select(self, rows: Tensor, start: int = 0) -> None:
        """Keep only batch rows ``rows`` (long, (B',)) and drop the first ``start`` cached slots.

        Used by batched decoding: finished rows leave the batch, and slots that are padding in every
        remaining row are trimmed. The buffers keep their ``max_seq_len``; ``length`` drops by ``start``.
        """
        if not 0 <= start <= self.length:
            raise ValueError(f"start={start} must be in [0, length={self.length}]")
        n = self.length - start
        for store in (self.k, self.v):
            for i, buf in enumerate(store):
                new = buf.new_zeros((len(rows), *buf.shape[1:]))  # (B', Hkv, max_seq_len, D)
                new[:, :, :n] = buf[rows, :, start:self.length]
                store[i] = new
        self.batch_size = len(rows)
        self.length = n


class PagedKVCache:
    """Keys and values in a pool of fixed-size blocks shared by many sequences (Kwon et al.,
    "Efficient Memory Management for LLM Serving with PagedAttention", arXiv:2309.06180).

    ``k[i]``, ``v[i]``: (num_blocks + 1, block_size, n_kv_heads, head_dim) for layer i. A sequence owns
    a list of block ids (its *block table*, kept by ``kiln.generate.block_manager``); its token at
    position p lives at slot ``table[p // block_size] * block_size + p % block_size``. The extra last
    block (``scratch_block``) is never handed out: padded rows of a CUDA-graph batch write there.

    The engine sets ``meta`` (a ``PagedMetadata``) before each forward; the model's attention then
    writes the step's new keys/values by ``meta.slot_mapping`` and reads through ``meta.block_tables``.
    """

    def __init__(
        self,
        n_layers: int,
        num_blocks: int,
        block_size: int,
        n_kv_heads: int,
        head_dim: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        shape = (num_blocks + 1, block_size, n_kv_heads, head_dim)
        self.k: list[Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v: list[Tensor] = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.scratch_block = num_blocks
        self.meta: PagedMetadata | None = None
        self.write_op = True
        """On CUDA keys/values are written by Kiln's ``kv_write`` kernel (one launch for both; in a
        compiled decode step the custom op ``kiln::kv_write``, in place under ``torch.compile``);
        False: two ``index_copy_`` (kept to measure one against the other)."""
        self.decode_write = False
        """With ``write_op``, a CUDA decode step's keys/values are written by the decode attention
        kernel itself, whose last split also combines the splits (``kiln::paged_decode_write``: one
        launch a layer instead of three: ``kv_write``, attention, the reduce kernel). Off by default
        until it is timed and its memory ordering checked on a GPU (tested under the interpreter;
        bench row ``one-launch`` runs it)."""

    def write(self, layer: int, k_new: Tensor, v_new: Tensor) -> None:
        """Store k_new, v_new: (N, n_kv_heads, head_dim) at the slots ``meta.slot_mapping`` (N,)."""
        assert self.meta is not None, "set PagedKVCache.meta before the forward pass"
        slots = self.meta.slot_mapping
        if self.write_op and k_new.is_cuda:
            from kiln.kernels.paged_attention import kv_write  # lazy: Triton is optional

            kv_write(k_new, v_new, self.k[layer], self.v[layer], slots)
            return
        self.k[layer].view(-1, *k_new.shape[1:]).index_copy_(0, slots, k_new.to(self.k[layer].dtype))
        self.v[layer].view(-1, *v_new.shape[1:]).index_copy_(0, slots, v_new.to(self.v[layer].dtype))

    def nbytes(self) -> int:
        """Bytes held by the pool (all layers, keys and values)."""
        return sum(t.numel() * t.element_size() for t in self.k + self.v)


class PagedMetadata:
    """Where one engine step's tokens go, for a forward pass over B sequences packed into N tokens.

    Tensors (on the cache's device): ``slot_mapping`` (N,) long, the pool slot of each new token;
    ``block_tables`` (B, max_blocks) int32; ``context_lens`` (B,) int32, tokens in the cache per
    sequence after this step (cached + new); ``query_start`` (B + 1,) int32, where each sequence's
    new tokens start in the packed N. Python copies of the lengths (``query_lens``, ``context_lens_list``)
    drive the readable per-sequence prefill path without device syncs. ``decode``: every sequence
    has exactly one new token (the Triton kernel's case, and the shape CUDA graphs capture).
    """

    def __init__(
        self,
        slot_mapping: Tensor,
        block_tables: Tensor,
        context_lens: Tensor,
        query_start: Tensor,
        query_lens: list[int],
        context_lens_list: list[int],
    ) -> None:
        self.slot_mapping = slot_mapping
        self.block_tables = block_tables
        self.context_lens = context_lens
        self.query_start = query_start
        self.query_lens = query_lens
        self.context_lens_list = context_lens_list
        self.decode = all(n == 1 for n in query_lens)
        self.decode_gather: tuple[Tensor, Tensor] | None = None  # the PyTorch decode path's, per step
        self.split: tuple[dict, PagedMetadata] | None = None  # CUDA mixed steps: decoders vs chunks
        self.prefill_kernel = False  # steps with chunks: Kiln's Triton prefill kernel (``paged_attention``)
        self.prefill_tiles: Tensor | None = None  # that kernel's query tiles, built once a step
