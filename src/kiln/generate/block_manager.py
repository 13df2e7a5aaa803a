"""``BlockManager``: hands out the paged cache's fixed-size blocks, and shares full blocks between
sequences with the same prefix (hash-chained, reference-counted; as vLLM's prefix caching).

A block is *full* when all ``block_size`` of its slots hold computed keys/values. A full block gets a
hash chained from the hash of the block before it, so equal hashes mean equal windows from position 0
to the block's end (tokens are compared as well, so a hash collision can only miss, never share
wrongly). A new sequence takes the longest run of its leading full blocks that the cache already
holds instead of computing them. Blocks are never written once full, so sharing is safe.

A block whose reference count drops to zero goes to the end of the free list but keeps its hash and
contents: until it is handed out again (oldest first) a later request with the same prefix revives it.
"""

from __future__ import annotations

from collections import OrderedDict

from kiln.generate.sequence import Sequence


class Block:
    """One block of the pool: how many sequences hold it, and its content hash once full."""

    __slots__ = ("block_id", "hash", "ref_count", "token_ids")

    def __init__(self, block_id: int) -> None:
        self.block_id = block_id
        self.ref_count = 0
        self.hash: int | None = None
        self.token_ids: tuple[int, ...] = ()


def chain_hash(prev: int | None, tokens: tuple[int, ...]) -> int:
    """Hash of a full block given the previous block's hash (None for the first block)."""
    return hash((prev, tokens))


class BlockManager:
    """The free list, reference counts and prefix-hash table of ``num_blocks`` blocks of ``block_size``."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"num_blocks={num_blocks} and block_size={block_size} must be >= 1")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))  # LRU order
        self.hash_to_block: dict[int, int] = {}
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_hits = 0  # blocks taken from the cache instead of computed
        self.prefix_queries = 0  # full prompt blocks looked up

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    def blocks_for(self, num_tokens: int) -> int:
        """Blocks that hold ``num_tokens`` tokens."""
        return -(-num_tokens // self.block_size)

    # -- admission: prefix lookup, then fresh blocks --------------------------------------------------

    def match_prefix(self, seq: Sequence) -> list[int]:
        """Cached blocks equal to ``seq``'s leading full blocks (at least one window token is left to
        compute, so the step still yields logits). Changes nothing. None for a sequence whose prompt
        log-probs are still to compute: every prompt position must run."""
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return []
        window, bs = seq.window, self.block_size
        hits: list[int] = []
        h: int | None = None
        for j in range((len(window) - 1) // bs):
            tokens = tuple(window[j * bs:(j + 1) * bs])
            h = chain_hash(h, tokens)
            bid = self.hash_to_block.get(h)
            if bid is None or self.blocks[bid].token_ids != tokens:
                break
            hits.append(bid)
        return hits

    def can_admit(self, seq: Sequence, hits: list[int], num_new_tokens: int) -> bool:
        """Whether ``seq`` (no blocks yet) can take ``hits`` and blocks for ``num_new_tokens`` more tokens."""
        need = self.blocks_for(len(hits) * self.block_size + num_new_tokens) - len(hits)
        revived = sum(1 for b in hits if self.blocks[b].ref_count == 0)  # they leave the free list
        return need + revived <= self.num_free

    def admit(self, seq: Sequence, hits: list[int]) -> None:
        """Give ``seq`` the cached blocks ``hits``: its first ``len(hits) * block_size`` tokens are computed."""
        assert not seq.block_table, "admit() is for a sequence without blocks"
        for bid in hits:
            block = self.blocks[bid]
            if block.ref_count == 0:
                del self.free[bid]
            block.ref_count += 1
            seq.block_table.append(bid)
            seq.block_hashes.append(block.hash)
        n_full = (seq.num_window_tokens - 1) // self.block_size if self.enable_prefix_caching else 0
        self.prefix_queries += n_full
        self.prefix_hits += len(hits)
        seq.num_computed = len(hits) * self.block_size

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        """Whether the free list covers ``num_new_tokens`` more computed tokens for ``seq``."""
        return self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table) <= self.num_free

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Append fresh blocks so ``seq``'s table covers ``num_new_tokens`` more tokens."""
        for _ in range(self.blocks_for(seq.num_computed + num_new_tokens) - len(seq.block_table)):
            bid, _ = self.free.popitem(last=False)  # the least recently freed block
            block = self.blocks[bid]
            if block.hash is not None and self.hash_to_block.get(block.hash) == bid:
                del self.hash_to_block[block.hash]  # its old contents are about to be overwritten
            block.hash, block.token_ids, block.ref_count = None, (), 1
            seq.block_table.append(bid)

    # -- after a forward: publish newly full blocks; release ------------------------------------------

    def publish_full_blocks(self, seq: Sequence) -> None:
        """Hash ``seq``'s blocks that became full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        bs, window = self.block_size, None
        while len(seq.block_hashes) < seq.num_computed // bs:
            j = len(seq.block_hashes)
            window = seq.window if window is None else window
            tokens = tuple(window[j * bs:(j + 1) * bs])
            h = chain_hash(seq.block_hashes[-1] if j else None, tokens)
            block = self.blocks[seq.block_table[j]]
            if block.hash is None:
                block.hash, block.token_ids = h, tokens
                self.hash_to_block.setdefault(h, block.block_id)  # an equal block already published wins
            seq.block_hashes.append(h)

    def release(self, seq: Sequence) -> None:
        """Drop ``seq``'s hold on its blocks (tail first, so a shared prefix outlives its tails in the
        free list's order); the sequence then holds no cache (``num_computed = 0``)."""
        for bid in reversed(seq.block_table):
            block = self.blocks[bid]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {bid} released twice"
            if block.ref_count == 0:
                self.free[bid] = None
        seq.block_table = []  # a new list, never the old one cleared: tables only grow in place, and
        seq.block_hashes = []  # ModelRunner tells a row's sequence by its table's identity
        seq.num_computed = 0
        seq.draft_computed = 0
