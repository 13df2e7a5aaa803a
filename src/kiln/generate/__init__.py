"""Text generation with a KV cache: sampling (``sampling``), streaming decoding (``engine``) and
batched decoding of many prompts at once (``batch``).

See docs/generate.md.
"""

from kiln.generate.batch import generate_batch, generate_texts
from kiln.generate.engine import TextStreamer, generate, generate_tokens, stream
from kiln.generate.sampling import filter_logits, sample_next

__all__ = ["TextStreamer", "filter_logits", "generate", "generate_batch", "generate_texts", "generate_tokens",
           "sample_next", "stream"]
