"""Sampling replies from the policy: the one place GRPO, the SFT samples and the demo generate.

``generate_replies`` runs the serving engine (``kiln.generate.LLMEngine``: paged KV cache,
continuous batching, prefix sharing, so the G samples of a GRPO group share their prompt's
blocks). ``RolloutEngine`` keeps one engine for a training run: the optimizer updates the weights
in place, so the engine (and its CUDA graphs, which read the weights by address) stays valid; only
its cached prefix blocks go stale, and they are dropped before every call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


def _params(n: int, max_tokens: int, temperature: float, seed: int, stop_token_ids: Sequence[int]) -> list:
    from kiln.generate import SamplingParams

    return [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i,
                           stop_token_ids=tuple(stop_token_ids), ignore_eos=True) for i in range(n)]


class RolloutEngine:
    """One ``LLMEngine`` over a policy that trains between calls (see the module docstring)."""

    def __init__(self, model: torch.nn.Module, max_num_seqs: int = 64, vocab_limit: int | None = None,
                 max_seq_tokens: int | None = None) -> None:
        """``max_seq_tokens``: the longest prompt + reply expected; the KV pool holds ``max_num_seqs``
        of them (None: full contexts). A longer sequence is not an error: the scheduler preempts."""
        from kiln.generate import EngineConfig, LLMEngine

        self.model = model
        cuda = next(model.parameters()).device.type == "cuda"
        num_blocks = None
        if max_seq_tokens is not None:
            block = EngineConfig().block_size
            per_seq = -(-min(max_seq_tokens, model.config.context_length) // block) + 1
            num_blocks = max_num_seqs * per_seq
        cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, max_num_seqs),
                           num_blocks=num_blocks, cuda_graphs=cuda, vocab_limit=vocab_limit, context_overflow="stop")
        self.engine = LLMEngine(model, None, cfg)

    def generate(self, prompts: Sequence[Sequence[int]], max_tokens: int, temperature: float, seed: int,
                 stop_token_ids: Sequence[int]) -> list[list[int]]:
        """New ids per prompt, as ``generate_replies``; the model is in eval mode meanwhile."""
        was = self.model.training
        self.model.eval()
        try:
            self.engine.reset_prefix_cache()  # blocks cached before the last update hold old keys
            outs = self.engine.generate([list(p) for p in prompts],
                                        _params(len(prompts), max_tokens, temperature, seed, stop_token_ids))
        finally:
            self.model.train(was)
        return [list(o.token_ids) for o in outs]


def generate_replies(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    temperature: float,
    seed: int,
    stop_token_ids: Sequence[int],
    max_num_seqs: int = 64,
    vocab_limit: int | None = None,
    engine: Any = None,
) -> list[list[int]]:
    """New ids for each prompt; a reply ends with (and keeps) its first stop id, or at ``max_tokens``.

    Prompt i samples from its own generator seeded ``seed + i``, so replies depend on the seed and
    the prompts only (not on batching); GRPO's exact resume stores the seed of each rollout batch.
    ``vocab_limit``: never sample ids at or above it (rows of a padded vocabulary). ``engine``: a
    ``RolloutEngine`` to reuse (default: a fresh one, without CUDA graphs, for this call).
    """
    if engine is None:
        engine = RolloutEngine.__new__(RolloutEngine)
        from kiln.generate import EngineConfig, LLMEngine

        engine.model = model
        engine.engine = LLMEngine(model, None, EngineConfig(
            max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, max_num_seqs), cuda_graphs=False,
            vocab_limit=vocab_limit, context_overflow="stop"))
    return engine.generate(prompts, max_tokens, temperature, seed, stop_token_ids)
