"""Sampling replies from the policy: the one function GRPO, the SFT samples and the demo go through.

``generate_replies`` runs Kiln's batched generation (``kiln.generate.generate_batch``: one KV
cache, left-padded rows, one seeded ``torch.Generator``). When the serving engine
(``kiln.generate.LLMEngine``) is present, this is the place that switches to it; callers do not
change.
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
    batch_size: int = 64,
) -> list[list[int]]:
    """New ids for each prompt; a reply ends with (and keeps) its first stop id, or at ``max_tokens``.

    The same ``seed``, prompts, batch size and device give the same replies (GRPO's exact resume
    stores the seed of each rollout batch). The model is put back in its train/eval mode.
    """
    from kiln.generate import generate_batch

    stops = set(stop_token_ids)
    return generate_batch(model, prompts, max_new_tokens=max_tokens, temperature=temperature, seed=seed,
                          eot_id=None, stop=lambda new: new[-1] in stops, batch_size=batch_size)
