"""``Scheduler``: which sequences run in the next step, and how many of their tokens (continuous
batching with chunked prefill, as in Orca (Yu et al., OSDI 2022) and vLLM / Sarathi (arXiv:2308.16369)).

Every step has a token budget (``max_num_batched_tokens``). Running sequences go first, oldest first:
a decoding sequence needs one token, one still prefilling takes what is left of its prompt up to the
budget (a long prompt is computed in chunks over several steps, so it never stalls the others'
decoding). Then waiting sequences are admitted, oldest first, while the budget, the sequence limit
and the free blocks allow; each takes its longest cached prefix from the block manager first.

When a running sequence needs a block and none is free, the newest running sequence is *preempted by
recompute*: its blocks are released and it goes back to the front of the waiting queue with its tokens
(prompt + generated so far), to be prefilled again later. Requests join and leave between steps.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from kiln.generate.block_manager import BlockManager
from kiln.generate.sequence import Sequence, Status


class Scheduler:
    """The waiting queue and the running list over one ``BlockManager``."""

    def __init__(
        self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
        lookahead: Callable[[Sequence], int] | None = None,
    ) -> None:
        """``lookahead(seq)``: draft tokens a decoding sequence may verify this step (speculative decoding);
        they are budgeted and given blocks like prompt tokens."""
        if max_num_batched_tokens < max_num_seqs:
            raise ValueError(f"max_num_batched_tokens={max_num_batched_tokens} < max_num_seqs={max_num_seqs}: "
                             "every running sequence needs a token per step; raise the budget")
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.lookahead = lookahead

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running)

    def finish(self, seq: Sequence) -> None:
        """Take ``seq`` out of the queues and free its blocks (done, or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.FINISHED

    def schedule(self) -> list[tuple[Sequence, int]]:
        """This step's work: (sequence, number of its tokens to compute), running ones first."""
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        preempted = False
        for seq in list(self.running):
            if budget == 0:
                break
            if seq.status is not Status.RUNNING:  # preempted below to make room for an older one
                continue
            n = min(seq.num_uncomputed, budget)
            if n == seq.num_uncomputed == 1 and self.lookahead is not None:
                n = min(1 + self.lookahead(seq), budget)
                if not self.blocks.can_grow(seq, n):  # drafts never cost another sequence its blocks
                    n = 1
            while not self.blocks.can_grow(seq, n):
                victim = self.running[-1]
                self._preempt(victim)
                preempted = True
                if victim is seq:
                    break
            if seq.status is Status.RUNNING:
                self.blocks.grow(seq, n)
                batch.append((seq, n))
                budget -= n
        if not preempted:  # admit new work only when nothing was preempted: else the preempted would thrash
            self._admit(batch, budget)
        return batch

    def _admit(self, batch: list[tuple[Sequence, int]], budget: int) -> int:
        """Admit waiting sequences, oldest first, into ``batch`` while ``budget`` tokens, the sequence
        limit and the free blocks allow (each takes its longest cached prefix first); the budget left."""
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            hits = self.blocks.match_prefix(seq)
            n = min(seq.num_window_tokens - len(hits) * self.blocks.block_size, budget)
            if not self.blocks.can_admit(seq, hits, n):
                break
            self.waiting.popleft()
            self.blocks.admit(seq, hits)
            self.blocks.grow(seq, n)
            seq.status = Status.RUNNING
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return budget

    def schedule_mixed(self, num_tokens: int, max_decode: int,
                       admit: bool = True) -> tuple[list[Sequence], list[tuple[Sequence, int]]] | None:
        """A mixed step: the running sequences that decode get blocks for ``num_tokens`` more tokens each
        (the lean multi-step decode), and beside them prompts are prefilled: the chunks of running
        sequences still prefilling, then (``admit``) waiting ones admitted as ``schedule`` admits them,
        within the token budget and the free blocks, never preempting. Returns (decoding sequences,
        prefill batch), or None when it does not apply: nothing decodes, more than ``max_decode`` do,
        nothing is to prefill, or the decoders' blocks do not fit (``schedule`` then preempts as usual)."""
        decoding = [s for s in self.running if s.num_uncomputed == 1]
        prefilling = [s for s in self.running if s.num_uncomputed > 1]
        if not decoding or len(decoding) > max_decode or not (prefilling or admit and self.waiting):
            return None
        need = sum(self.blocks.blocks_for(s.num_computed + num_tokens) - len(s.block_table) for s in decoding)
        if need > self.blocks.num_free:
            return None
        for seq in decoding:
            self.blocks.grow(seq, num_tokens)
        budget = self.max_num_batched_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in prefilling:  # chunks of prompts already admitted, oldest first; no preemption here
            n = min(seq.num_uncomputed, budget)
            if n == 0 or not self.blocks.can_grow(seq, n):
                break
            self.blocks.grow(seq, n)
            batch.append((seq, n))
            budget -= n
        if admit and len(batch) == len(prefilling):
            self._admit(batch, budget)
        return decoding, batch

    def schedule_decode(self, num_tokens: int, defer_waiting: bool = False) -> list[Sequence] | None:
        """Every running sequence decodes, with blocks for ``num_tokens`` more tokens each (a lean or
        multi-step decode step), or None when that does not fit: something waits (unless the caller
        defers the waiting ones: ``EngineConfig.admission_wait_ms``), a sequence is still prefilling,
        or the free blocks fall short (``schedule`` then preempts as usual)."""
        if (self.waiting and not defer_waiting) or not self.running:
            return None
        need = 0
        for seq in self.running:
            if seq.num_uncomputed != 1:
                return None
            need += self.blocks.blocks_for(seq.num_computed + num_tokens) - len(seq.block_table)
        if need > self.blocks.num_free:
            return None
        for seq in self.running:
            self.blocks.grow(seq, num_tokens)
        return list(self.running)

    def _preempt(self, seq: Sequence) -> None:
        """Release ``seq``'s blocks and requeue it at the front (it is recomputed when readmitted)."""
        self.running.remove(seq)
        self.blocks.release(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1
