"""Byte-level BPE tokenizer: training (``train_bpe``), ``Tokenizer`` and the ``tokenizer`` stage.

See docs/tokenizer.md. Submodules: ``pretokenize`` (split patterns), ``train`` (BPE training,
pure-Python reference), ``tokenizer`` (encode/decode, files), ``interop`` (Hugging Face and
tiktoken formats), ``stage`` (``TokenizerTrainConfig``, ``train_tokenizer``), ``inspect``,
``native`` (the optional C core).
"""

from kiln.tokenizer.interop import (
    from_hf_json,
    from_tiktoken,
    save_hf,
    save_tiktoken,
    to_tiktoken,
)
from kiln.tokenizer.pretokenize import CL100K_PATTERN, ENDOFTEXT, GPT2_PATTERN, PATTERNS
from kiln.tokenizer.stage import TokenizerTrainConfig, train_tokenizer
from kiln.tokenizer.tokenizer import Tokenizer
from kiln.tokenizer.train import merge_words_reference, train_bpe

__all__ = [
    "CL100K_PATTERN",
    "ENDOFTEXT",
    "GPT2_PATTERN",
    "PATTERNS",
    "Tokenizer",
    "TokenizerTrainConfig",
    "from_hf_json",
    "from_tiktoken",
    "merge_words_reference",
    "save_hf",
    "save_tiktoken",
    "to_tiktoken",
    "train_bpe",
    "train_tokenizer",
]
