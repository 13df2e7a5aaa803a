"""Text generation: the engine (``LLMEngine``: paged KV cache, continuous batching, prefix sharing;
``sequence``, ``block_manager``, ``scheduler``, ``model_runner``, ``llm_engine``), sampling
(``sampling``), and the older one-call helpers built on it: streaming decoding (``engine``) and
batched decoding of many prompts at once (``batch``).

See docs/engine.md and docs/generate.md.
"""

from kiln.generate.batch import generate_batch, generate_texts
from kiln.generate.engine import TextStreamer, generate, generate_tokens, stream
from kiln.generate.llm_engine import EngineConfig, LLMEngine, RequestMetrics, RequestOutput
from kiln.generate.sampling import SamplingParams, filter_logits, sample_next
from kiln.generate.structured import StructuredOutput

__all__ = ["EngineConfig", "LLMEngine", "RequestMetrics", "RequestOutput", "SamplingParams", "StructuredOutput",
           "TextStreamer", "filter_logits", "generate", "generate_batch", "generate_texts", "generate_tokens",
           "sample_next", "stream"]
