"""Draft proposers for speculative decoding (Leviathan et al., arXiv:2211.17192; Chen et al.,
arXiv:2302.01318): cheap guesses of a greedy request's next tokens, which the engine verifies in one
forward pass of the large model (``LLMEngine._accept``), keeping the longest agreeing run plus one
token of the model's own. The output is exactly plain greedy decoding's; only the speed changes.

- ``NgramProposer`` (prompt lookup decoding, Saxena 2023): find the most recent earlier occurrence of
  the sequence's last n tokens and propose what followed it. Free, and strong when the output copies
  from the prompt (summaries, code edits, extraction).
- ``DraftModelProposer``: a small Kiln model with the same vocabulary decodes k tokens greedily. It has
  its own paged cache indexed by the *same* block tables as the large model (a token's slot is the
  same in both pools), so it needs no allocator of its own; ``Sequence.draft_computed`` tracks how much
  of the window its cache holds.
"""

from __future__ import annotations

from typing import Any

import torch

from kiln.generate.model_runner import ModelRunner, StepItem
from kiln.generate.sequence import Sequence


class NgramProposer:
    """Prompt-lookup drafts: the tokens that followed the last earlier match of the tail n-gram."""

    def __init__(self, ngram_max: int = 3, ngram_min: int = 1) -> None:
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min

    def propose_one(self, tokens: list[int], k: int) -> list[int]:
        """``k`` tokens following the most recent earlier occurrence of the longest matching tail. The
        copy may overlap its own output (as LZ77's): when the match sits d tokens before the tail, the
        text is taken to repeat with period d, so a loop or a repeated line yields k drafts, not d."""
        L = len(tokens)
        for n in range(min(self.ngram_max, L - 1), self.ngram_min - 1, -1):
            tail = tokens[L - n:]
            for start in range(L - n - 1, -1, -1):  # most recent match first, never the tail itself
                if tokens[start:start + n] == tail:
                    out = tokens[start + n:start + n + k]
                    while len(out) < k:  # past the end: continue from the drafts themselves
                        out.append(out[start + n + len(out) - L])
                    return out
        return []

    def propose(self, want: list[tuple[Sequence, int]]) -> dict[str, list[int]]:
        return {seq.request_id: d for seq, k in want if (d := self.propose_one(seq.window, k))}


class DraftModelProposer:
    """Greedy drafts from a small model over its own paged cache (same block tables as the target)."""

    def __init__(self, draft: Any, num_blocks: int, block_size: int, vocab_limit: int, graph_rows: int = 0) -> None:
        self.runner = ModelRunner(draft, num_blocks, block_size, cuda_graph_max_batch=graph_rows)
        self.vocab_limit = vocab_limit

    @torch.inference_mode()
    def propose(self, want: list[tuple[Sequence, int]]) -> dict[str, list[int]]:
        # Catch up: feed every window token the draft cache lacks (the prompt at first, then the tokens
        # accepted last step); its last logits give draft token 1. Then one token per forward.
        items = [StepItem(seq, seq.draft_computed, seq.window[seq.draft_computed:]) for seq, _ in want]
        drafts: dict[str, list[int]] = {}
        k_of = {seq.request_id: k for seq, k in want}
        while items:
            nxt = self.runner.run(items)[:, :self.vocab_limit].argmax(-1).tolist()
            again = []
            for it, t in zip(items, nxt):
                seq = it.seq
                seq.draft_computed = it.start + len(it.tokens)
                d = drafts.setdefault(seq.request_id, [])
                d.append(t)
                if len(d) < k_of[seq.request_id]:
                    again.append(StepItem(seq, seq.draft_computed, [t]))
            items = again
        return drafts


def make_proposer(config: Any, model: Any, draft_model: Any, num_blocks: int, vocab_limit: int) -> Any:
    """The proposer ``config.speculative`` names (None for 'none'); checks the draft model fits."""
    if config.speculative == "none":
        return None
    if config.speculative == "ngram":
        return NgramProposer(config.ngram_max)
    if draft_model is None:
        raise ValueError("speculative='draft' needs LLMEngine(..., draft_model=<a small Kiln Transformer>)")
    dc, mc = draft_model.config, model.config
    if dc.vocab_size < vocab_limit or dc.context_length < mc.context_length:
        raise ValueError(f"the draft model (vocab {dc.vocab_size}, context {dc.context_length}) must cover the "
                         f"model's vocabulary ({vocab_limit} ids used) and context ({mc.context_length})")
    graphs = config.max_num_seqs if config.cuda_graphs else 0
    return DraftModelProposer(draft_model, num_blocks, config.block_size, vocab_limit, graphs)
