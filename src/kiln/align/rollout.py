"""Sampling replies from the policy: the one function GRPO, the SFT samples and the demo go through.

``generate_replies`` runs the serving engine (``kiln.generate.LLMEngine``: paged KV cache,
continuous batching, prefix sharing, so the G samples of a GRPO group share their prompt's
blocks). A fresh engine per call: the policy's weights change between calls, so cached blocks of
an earlier call would be stale.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def generate_replies(
    model: torch.nn.Module,
    prompts: Sequence[Sequence[int]],
    max_tokens: int,
    temperature: float,
    seed: int,
    stop_token_ids: Sequence[int],
    max_num_seqs: int = 64,
    vocab_limit: int | None = None,
) -> list[list[int]]:
    """New ids for each prompt; a reply ends with (and keeps) its first stop id, or at ``max_tokens``.

    Prompt i samples from its own generator seeded ``seed + i``, so replies depend on the seed and
    the prompts only (not on batching); GRPO's exact resume stores the seed of each rollout batch.
    ``vocab_limit``: never sample ids at or above it (rows of a padded vocabulary). The model's
    train/eval mode is restored.
    """
    from kiln.generate import EngineConfig, LLMEngine, SamplingParams

    was = model.training
    model.eval()
    try:
        cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, max_num_seqs),
                           cuda_graphs=False, vocab_limit=vocab_limit, context_overflow="stop")
        engine = LLMEngine(model, None, cfg)
        params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed + i,
                                 stop_token_ids=tuple(stop_token_ids), ignore_eos=True)
                  for i in range(len(prompts))]
        outs = engine.generate([list(p) for p in prompts], params)
    finally:
        model.train(was)
    return [list(o.token_ids) for o in outs]
