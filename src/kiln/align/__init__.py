"""Alignment: chat format, SFT, DPO and GRPO as pure loss functions over Kiln's training runtime.

See docs/align.md. Submodules: ``chat`` (chat tokens, ``ChatTemplate``, the Hugging Face
``chat_template``), ``data`` (readers for conversation and preference formats), ``losses`` (the
public building blocks: log-probs, SFT/DPO/GRPO losses), ``sft``, ``dpo``, ``grpo`` (the stages),
``rewards`` (reward functions and the synthetic task).
"""
