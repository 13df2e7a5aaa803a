"""Documents -> token shards (versioned header, memory map) -> training batches.

- :mod:`kiln.shards.format`: the shard file (``write_shard``, ``read_shard``, ``ShardWriter``).
- :mod:`kiln.shards.tokenize`: the ``"tokens"`` stage (``TokenizeConfig``, ``tokenize_corpus``).
- :mod:`kiln.shards.sampler`: ``WindowSampler``, the one batch source of training ((x, y) windows,
  this rank's slice, resumable; random or epoch order) and ``get_batch``.
- :mod:`kiln.shards.loader`: ``TokenDataset`` and ``ShardLoader`` (``WindowSampler`` over a folder).

The format is specified in ``docs/architecture.md`` and ``docs/shards.md``.
"""

from kiln.shards.format import (
    HEADER_BYTES,
    MAGIC,
    VERSION,
    Shard,
    ShardFormatError,
    ShardWriter,
    dtype_for_vocab,
    read_header,
    read_shard,
    write_shard,
)
from kiln.shards.loader import ShardLoader, TokenDataset, shard_paths
from kiln.shards.sampler import WindowSampler, get_batch
from kiln.shards.tokenize import TokenizeConfig, tokenize_corpus

__all__ = [
    "HEADER_BYTES",
    "MAGIC",
    "VERSION",
    "Shard",
    "ShardFormatError",
    "ShardLoader",
    "ShardWriter",
    "TokenDataset",
    "TokenizeConfig",
    "WindowSampler",
    "dtype_for_vocab",
    "get_batch",
    "read_header",
    "read_shard",
    "shard_paths",
    "tokenize_corpus",
    "write_shard",
]
