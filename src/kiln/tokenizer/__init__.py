"""Byte-level BPE tokenizer: training (``train_bpe``), ``Tokenizer`` and the ``tokenizer`` stage.

See docs/tokenizer.md. Submodules: ``pretokenize`` (split patterns), ``train`` (BPE training,
pure-Python reference), ``tokenizer`` (encode/decode, files), ``interop`` (Hugging Face and
tiktoken formats), ``folder`` (``find_tokenizer``/``load_tokenizer`` for a model, run or tokens
folder; ``save_tokenizer_files``: a model folder's files), ``stage`` (``TokenizerTrainConfig``,
``train_tokenizer``), ``inspect``, ``native`` (the optional C core).
"""

from kiln.tokenizer.folder import find_tokenizer, load_tokenizer, save_tokenizer_files
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
    "find_tokenizer",
    "from_hf_json",
    "from_tiktoken",
    "load_tokenizer",
    "merge_words_reference",
    "save_hf",
    "save_tokenizer_files",
    "save_tiktoken",
    "to_tiktoken",
    "train_bpe",
    "train_tokenizer",
]
