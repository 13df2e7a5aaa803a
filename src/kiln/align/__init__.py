"""Alignment: chat format, SFT, DPO and GRPO as pure loss functions over Kiln's training runtime.

See docs/align.md. Submodules: ``chat`` (chat tokens, ``ChatTemplate``, the Hugging Face
``chat_template``), ``data`` (readers for conversation and preference formats), ``losses`` (the
public building blocks: log-probs, SFT/DPO/GRPO losses, re-exported here), ``packing``, ``sft``,
``dpo``, ``grpo`` (the stages), ``rollout`` (sampling through the engine), ``rewards`` (reward
functions and the synthetic task), ``recipe`` (``kiln recipe chat``), ``demo`` (the demo's chat stage).
"""

from kiln.align.chat import ChatTemplate
from kiln.align.losses import (
    compute_entropy,
    compute_grpo_clip_loss,
    compute_group_normalized_rewards,
    compute_naive_policy_gradient_loss,
    compute_policy_gradient_loss,
    dpo_loss,
    get_response_log_probs,
    grpo_loss,
    grpo_microbatch_train_step,
    masked_mean,
    masked_normalize,
    per_instance_dpo_loss,
    sft_microbatch_train_step,
    tokenize_prompt_and_output,
)

__all__ = [
    "ChatTemplate",
    "compute_entropy",
    "compute_grpo_clip_loss",
    "compute_group_normalized_rewards",
    "compute_naive_policy_gradient_loss",
    "compute_policy_gradient_loss",
    "dpo_loss",
    "get_response_log_probs",
    "grpo_loss",
    "grpo_microbatch_train_step",
    "masked_mean",
    "masked_normalize",
    "per_instance_dpo_loss",
    "sft_microbatch_train_step",
    "tokenize_prompt_and_output",
]
