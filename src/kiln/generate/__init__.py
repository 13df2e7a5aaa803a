"""Text generation with a KV cache: sampling (``sampling``) and streaming decoding (``engine``).

See docs/generate.md.
"""

from kiln.generate.engine import TextStreamer, generate, generate_tokens, stream
from kiln.generate.sampling import filter_logits, sample_next

__all__ = ["TextStreamer", "filter_logits", "generate", "generate_tokens", "sample_next", "stream"]
