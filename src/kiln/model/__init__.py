"""Kiln's language model, built from scratch in raw PyTorch (Llama layout, HF-compatible names).

Building blocks (``layers``), attention with swappable kernels (``attention``), the KV cache
(``kv_cache``), the model (``transformer``), fused projections for inference (``fuse``), Hugging Face
interop (``hf``), the loss (``loss.cross_entropy``) and the held-out loss over a token array
(``heldout.evaluate_heldout``). See docs/model.md.
"""

from kiln.model.attention import (
    ATTENTION_IMPLS,
    MultiHeadSelfAttention,
    causal_mask,
    kiln_attention,
    sdpa_attention,
    triton_attention,
)
from kiln.model.config import ModelConfig
from kiln.model.fuse import fuse_projections, is_fused, unfuse_projections
from kiln.model.hf import (
    load_llama_state_dict,
    load_pretrained,
    save_pretrained,
    to_hf_state_dict,
)
from kiln.model.kv_cache import KVCache, PagedKVCache, PagedMetadata
from kiln.model.layers import (
    NORM_IMPLS,
    Embedding,
    Linear,
    RMSNorm,
    RotaryEmbedding,
    SwiGLU,
    apply_rotary,
    rms_norm,
    rotate_half,
    scaled_dot_product_attention,
    silu,
    softmax,
    triton_rms_norm,
)
from kiln.model.quantize import Int4Linear, Int8Linear, quantize_model
from kiln.model.transformer import Transformer, TransformerBlock, build_model

__all__ = [
    "ATTENTION_IMPLS",
    "NORM_IMPLS",
    "Embedding",
    "Int4Linear",
    "Int8Linear",
    "KVCache",
    "Linear",
    "ModelConfig",
    "MultiHeadSelfAttention",
    "PagedKVCache",
    "PagedMetadata",
    "RMSNorm",
    "RotaryEmbedding",
    "SwiGLU",
    "Transformer",
    "TransformerBlock",
    "apply_rotary",
    "build_model",
    "causal_mask",
    "fuse_projections",
    "is_fused",
    "kiln_attention",
    "load_llama_state_dict",
    "load_pretrained",
    "quantize_model",
    "rms_norm",
    "rotate_half",
    "save_pretrained",
    "scaled_dot_product_attention",
    "sdpa_attention",
    "silu",
    "softmax",
    "to_hf_state_dict",
    "triton_attention",
    "triton_rms_norm",
    "unfuse_projections",
]
