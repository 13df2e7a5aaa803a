"""The alignment math as pure functions of token log-probabilities (SFT, DPO, GRPO).

These are the public building blocks that learners compose and tests check one by one (names and
signatures as in Stanford CS336's assignment 5, so its tests read them). They take Kiln models and
Hugging Face causal LMs alike: ``model(input_ids)`` returning logits ``(B, T, V)`` or an object
with ``.logits``. Tokenizers: a Kiln ``Tokenizer`` (``encode_ordinary``) or a Hugging Face one
(``encode(text, add_special_tokens=False)``).

Shapes: ``B`` sequences, ``T`` positions (after the one-token shift), ``V`` vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LossType = Literal["no_baseline", "reinforce_with_baseline", "grpo_clip"]
DPOLossType = Literal["sigmoid", "ipo", "conservative", "hinge"]


# ------------------------------------------------------------------ tokens and log-probs
def _encode(tokenizer: Any, text: str) -> list[int]:
    if hasattr(tokenizer, "encode_ordinary"):  # Kiln: text only, special-token strings stay text
        return tokenizer.encode_ordinary(text)
    return list(tokenizer.encode(text, add_special_tokens=False))


def _pad_id(tokenizer: Any) -> int:
    for name in ("pad_token_id", "eos_token_id", "eot_id"):
        v = getattr(tokenizer, name, None)
        if isinstance(v, int):
            return v
    return 0


def tokenize_prompt_and_output(
    prompt_strs: Sequence[str], output_strs: Sequence[str], tokenizer: Any
) -> dict[str, Tensor]:
    """Tokenize prompt and output separately, concatenate, right-pad, shift by one.

    Returns ``input_ids`` (B, L-1), ``labels`` (B, L-1) (the inputs shifted left) and
    ``response_mask`` (B, L-1) bool, True where the label is an output token; L is the longest
    ``len(prompt) + len(output)``. Padding uses the tokenizer's pad (or eos) id and is masked out.
    """
    if len(prompt_strs) != len(output_strs):
        raise ValueError(f"{len(prompt_strs)} prompts but {len(output_strs)} outputs")
    pairs = [(_encode(tokenizer, p), _encode(tokenizer, o)) for p, o in zip(prompt_strs, output_strs)]
    L = max(len(p) + len(o) for p, o in pairs)
    pad = _pad_id(tokenizer)
    full = torch.full((len(pairs), L), pad, dtype=torch.long)  # (B, L)
    mask = torch.zeros((len(pairs), L), dtype=torch.bool)
    for b, (p, o) in enumerate(pairs):
        full[b, : len(p) + len(o)] = torch.tensor(p + o, dtype=torch.long)
        mask[b, len(p) : len(p) + len(o)] = True
    return {"input_ids": full[:, :-1], "labels": full[:, 1:], "response_mask": mask[:, 1:]}


def model_logits(model: Callable[..., Any], input_ids: Tensor, **kwargs: Any) -> Tensor:
    """Logits (B, T, V) of a Kiln model or a Hugging Face causal LM (``.logits``)."""
    out = model(input_ids, **kwargs)
    return out.logits if hasattr(out, "logits") else out


def compute_entropy(logits: Tensor) -> Tensor:
    """Entropy (nats) of the next-token distribution: logits (..., V) -> (...).

    ``H = logsumexp(z) - sum softmax(z) z``, computed from logits without forming log p twice.
    """
    logits = logits.float()
    lse = torch.logsumexp(logits, dim=-1)  # (...)
    return lse - (torch.softmax(logits, dim=-1) * logits).sum(-1)


def token_log_probs(logits: Tensor, labels: Tensor, temperature: float = 1.0, vocab_limit: int | None = None) -> Tensor:
    """log p(label): logits (B, T, V), labels (B, T) long -> (B, T) float32.

    ``logit[label] - logsumexp(logits)``: one gather and one reduction, no (B, T, V) log-softmax kept.
    Labels < 0 (ignore index) get 0. ``temperature`` and ``vocab_limit``: the log-probs of
    ``softmax(logits[..., :vocab_limit] / temperature)``, the distribution a sampler at that
    temperature that never draws ids at or above ``vocab_limit`` (the rows of a padded vocabulary,
    ``kiln.generate``'s ``vocab_limit``) drew from; GRPO's policy gradient needs exactly those. The
    division is done in fp32, after the upcast. Labels at or above ``vocab_limit`` (no sampler
    drew them) read the last kept id: mask them out.
    """
    if vocab_limit is not None and vocab_limit < logits.shape[-1]:
        logits = logits[..., :vocab_limit]
    logits = logits.float()
    if temperature != 1.0:
        logits = logits / temperature
    safe = labels.clamp(min=0, max=logits.shape[-1] - 1)
    picked = logits.gather(-1, safe.unsqueeze(-1)).squeeze(-1)  # (B, T)
    out = picked - torch.logsumexp(logits, dim=-1)
    return out.masked_fill(labels < 0, 0.0)


def get_response_log_probs(
    model: Callable[..., Any],
    input_ids: Tensor,
    labels: Tensor,
    return_token_entropy: bool = False,
    **model_kwargs: Any,
) -> dict[str, Tensor]:
    """Per-token log p(labels | input_ids) under ``model``.

    input_ids, labels: (B, T) long. Returns ``{"log_probs": (B, T)}`` and, with
    ``return_token_entropy``, ``"token_entropy": (B, T)`` (nats; computed without gradient).
    ``model_kwargs`` go to the model (e.g. ``token_positions`` for packed sequences).
    """
    logits = model_logits(model, input_ids, **model_kwargs)  # (B, T, V)
    out = {"log_probs": token_log_probs(logits, labels)}
    if return_token_entropy:
        with torch.no_grad():
            out["token_entropy"] = compute_entropy(logits)
    return out


# ------------------------------------------------------------------ masked reductions
def masked_mean(tensor: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``tensor`` where ``mask`` is 1, over ``dim`` (all elements when None).

    An all-zero mask gives NaN (0/0), as an empty mean should; callers that may see one guard it.
    """
    mask = mask.to(tensor.dtype)
    if dim is None:
        return (tensor * mask).sum() / mask.sum()
    return (tensor * mask).sum(dim) / mask.sum(dim)


def masked_normalize(
    tensor: Tensor, mask: Tensor, normalize_constant: float, dim: int | None = None
) -> Tensor:
    """Sum of ``tensor`` where ``mask`` is 1 (over ``dim``, or all), divided by ``normalize_constant``."""
    mask = mask.to(tensor.dtype)
    s = (tensor * mask).sum() if dim is None else (tensor * mask).sum(dim)
    return s / normalize_constant


# ------------------------------------------------------------------ SFT
def sft_loss(policy_log_probs: Tensor, response_mask: Tensor) -> Tensor:
    """Mean negative log-likelihood over response tokens: (B, T), (B, T) -> scalar.

    Each response token weighs the same across the batch (what ``transformers``' loss with
    ``labels=-100`` outside the response, and so trl's SFTTrainer, computes).
    """
    return -masked_mean(policy_log_probs, response_mask)


def sft_microbatch_train_step(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    gradient_accumulation_steps: int,
    normalize_constant: float = 1.0,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch of SFT: backward of ``-sum(log p * mask) / normalize_constant``, per sequence
    averaged over the batch, divided by ``gradient_accumulation_steps``.

    policy_log_probs, response_mask: (B, T). Returns (the loss that was backpropagated, metadata).
    """
    nll = -masked_normalize(policy_log_probs, response_mask, normalize_constant, dim=-1)  # (B,)
    loss = nll.mean() / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), {"nll_per_sequence": nll.detach(), "response_tokens": response_mask.sum()}


# ------------------------------------------------------------------ DPO
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
    loss_type: DPOLossType = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_tokens: Tensor | None = None,
    rejected_tokens: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-pair preference losses and implicit rewards; every input is (B,) sequence log-probs.

    - ``sigmoid``: DPO, ``-log sigma(beta * delta)``, delta = (pi_c - ref_c) - (pi_r - ref_r)
      (Rafailov et al. 2023, arXiv:2305.18290, eq. 7).
    - ``conservative``: cDPO, labels flipped with probability ``label_smoothing``:
      ``-(1-e) log sigma(beta delta) - e log sigma(-beta delta)`` (Mitchell 2023).
    - ``ipo``: ``(delta' - 1/(2 beta))^2`` with delta' from per-token averaged log-ratios
      (Azar et al. 2023, arXiv:2310.12036, eq. 17; the length-normalized form trl uses); needs
      ``chosen_tokens`` and ``rejected_tokens`` (B,) response lengths.
    - ``hinge``: ``relu(1 - beta * delta)`` (SLiC, Zhao et al. 2023).

    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)); rewards are
    ``beta * (pi - ref)`` detached, as logged by every DPO implementation.
    """
    chosen_lr = policy_chosen_logps - ref_chosen_logps
    rejected_lr = policy_rejected_logps - ref_rejected_logps
    delta = chosen_lr - rejected_lr
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * delta)
    elif loss_type == "conservative":
        e = label_smoothing
        losses = -(1 - e) * F.logsigmoid(beta * delta) - e * F.logsigmoid(-beta * delta)
    elif loss_type == "ipo":
        if chosen_tokens is None or rejected_tokens is None:
            raise ValueError("loss_type='ipo' needs chosen_tokens and rejected_tokens (response lengths)")
        d = chosen_lr / chosen_tokens.clamp(min=1) - rejected_lr / rejected_tokens.clamp(min=1)
        losses = (d - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * delta)
    else:
        raise ValueError(f"DPO loss_type={loss_type!r} is unknown; use sigmoid, conservative, ipo or hinge")
    return losses, (beta * chosen_lr).detach(), (beta * rejected_lr).detach()


def sequence_log_probs(
    model: Callable[..., Any], input_ids: Tensor, labels: Tensor, response_mask: Tensor
) -> Tensor:
    """Summed log-prob of each sequence's response tokens: (B, T) inputs -> (B,)."""
    lp = get_response_log_probs(model, input_ids, labels)["log_probs"]
    return (lp * response_mask.to(lp.dtype)).sum(-1)


def per_instance_dpo_loss(
    lm: Callable[..., Any],
    lm_ref: Callable[..., Any],
    tokenizer: Any,
    beta: float,
    prompt: str,
    response_chosen: str,
    response_rejected: str,
) -> Tensor:
    """DPO loss (scalar) of one preference pair under ``lm`` against ``lm_ref``.

    The prompt and responses are used as given (apply a chat template before); each response is
    scored by the sum of its tokens' log-probs given the prompt. The reference runs without grad.
    """
    batch = tokenize_prompt_and_output([prompt, prompt], [response_chosen, response_rejected], tokenizer)
    dev = next(iter(lm.parameters())).device if isinstance(lm, nn.Module) else None
    batch = {k: v.to(dev) for k, v in batch.items()} if dev is not None else batch
    pi = sequence_log_probs(lm, batch["input_ids"], batch["labels"], batch["response_mask"])  # (2,)
    with torch.no_grad():
        ref = sequence_log_probs(lm_ref, batch["input_ids"], batch["labels"], batch["response_mask"])
    losses, _, _ = dpo_loss(pi[:1], pi[1:], ref[:1].to(pi.device), ref[1:].to(pi.device), beta)
    return losses[0]


# ------------------------------------------------------------------ GRPO
def _reward_value(r: Any) -> float:
    if isinstance(r, dict):
        return float(r["reward"])
    return float(r)


def compute_group_normalized_rewards(
    reward_fn: Callable[[str, str], Any],
    rollout_responses: Sequence[str],
    repeated_ground_truths: Sequence[str],
    group_size: int,
    advantage_eps: float,
    normalize_by_std: bool,
) -> tuple[Tensor, Tensor, dict[str, float]]:
    """Score rollouts and normalize rewards within each group of ``group_size`` (GRPO's baseline).

    ``reward_fn(response, ground_truth)`` returns a float or a dict with ``"reward"``. Consecutive
    ``group_size`` responses share one prompt. Advantage = reward - group mean, divided by
    (group std + ``advantage_eps``) when ``normalize_by_std`` (Shao et al. 2024, arXiv:2402.03300;
    without it: Dr. GRPO, Liu et al. 2025, arXiv:2503.20783). The std is the unbiased one
    (``torch.std``), as trl and the DeepSeekMath description use.

    Returns (advantages (B,), raw_rewards (B,), metadata: mean/std/min/max of the raw rewards and
    ``groups_with_signal``, the share of groups whose rewards are not all equal: a group that scores
    alike has zero advantages and teaches nothing, so this share is GRPO's usable signal).
    """
    if len(rollout_responses) != len(repeated_ground_truths):
        raise ValueError(f"{len(rollout_responses)} responses but {len(repeated_ground_truths)} ground truths")
    if len(rollout_responses) % group_size:
        raise ValueError(f"{len(rollout_responses)} responses are not a multiple of group_size={group_size}")
    raw = torch.tensor([_reward_value(reward_fn(r, g)) for r, g in zip(rollout_responses, repeated_ground_truths)],
                       dtype=torch.float32)
    adv = group_normalize(raw, group_size, advantage_eps, normalize_by_std)
    meta = {"reward_mean": raw.mean().item(), "reward_std": raw.std().item() if raw.numel() > 1 else 0.0,
            "reward_min": raw.min().item(), "reward_max": raw.max().item(),
            "groups_with_signal": (raw.view(-1, group_size).amax(-1) > raw.view(-1, group_size).amin(-1)).float().mean().item()}
    return adv, raw, meta


def group_normalize(rewards: Tensor, group_size: int, eps: float = 1e-6, normalize_by_std: bool = True) -> Tensor:
    """(B,) rewards, consecutive groups of ``group_size`` -> (B,) advantages (see above)."""
    g = rewards.view(-1, group_size)  # (B/G, G)
    adv = g - g.mean(-1, keepdim=True)
    if normalize_by_std:
        adv = adv / (g.std(-1, keepdim=True) + eps)
    return adv.reshape(-1)


def compute_naive_policy_gradient_loss(raw_rewards_or_advantages: Tensor, policy_log_probs: Tensor) -> Tensor:
    """REINFORCE per-token loss ``-A * log p``: A (B, 1), log-probs (B, T) -> (B, T)."""
    return -raw_rewards_or_advantages * policy_log_probs


def compute_grpo_clip_loss(
    advantages: Tensor, policy_log_probs: Tensor, old_log_probs: Tensor, cliprange: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO's clipped surrogate per token (Schulman et al. 2017, arXiv:1707.06347, eq. 7).

    ``-min(r A, clip(r, 1-eps, 1+eps) A)`` with ``r = exp(log p - log p_old)``. advantages (B, 1);
    log-probs (B, T). Returns (loss (B, T), {"clipped": (B, T) bool where the clipped term won}).
    """
    ratio = torch.exp(policy_log_probs - old_log_probs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1 - cliprange, 1 + cliprange) * advantages
    return -torch.min(unclipped, clipped), {"clipped": clipped < unclipped}


def compute_policy_gradient_loss(
    policy_log_probs: Tensor,
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Per-token policy-gradient loss (B, T) for ``loss_type``:

    ``no_baseline`` (REINFORCE on ``raw_rewards``), ``reinforce_with_baseline`` (REINFORCE on
    ``advantages``), ``grpo_clip`` (clipped surrogate: ``advantages``, ``old_log_probs``,
    ``cliprange``). Rewards/advantages are (B, 1) (a (B,) tensor is unsqueezed).
    """

    def col(x: Tensor | None, name: str) -> Tensor:
        if x is None:
            raise ValueError(f"loss_type={loss_type!r} needs {name}")
        return x.unsqueeze(-1) if x.ndim == 1 else x

    if loss_type == "no_baseline":
        return compute_naive_policy_gradient_loss(col(raw_rewards, "raw_rewards"), policy_log_probs), {}
    if loss_type == "reinforce_with_baseline":
        return compute_naive_policy_gradient_loss(col(advantages, "advantages"), policy_log_probs), {}
    if loss_type == "grpo_clip":
        if old_log_probs is None or cliprange is None:
            raise ValueError("loss_type='grpo_clip' needs old_log_probs and cliprange")
        return compute_grpo_clip_loss(col(advantages, "advantages"), policy_log_probs, old_log_probs, cliprange)
    raise ValueError(f"loss_type={loss_type!r} is unknown; use no_baseline, reinforce_with_baseline or grpo_clip")


def kl_to_reference(policy_log_probs: Tensor, ref_log_probs: Tensor) -> Tensor:
    """Per-token KL(pi || ref) estimate ``exp(ref - pi) - (ref - pi) - 1`` (Schulman's k3; >= 0)."""
    d = ref_log_probs - policy_log_probs
    return torch.exp(d) - d - 1


def grpo_loss(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
    ref_log_probs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_importance_weight: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO's loss of a micro-batch (scalar, not backpropagated): the per-token policy-gradient
    loss plus ``kl_coef`` x the KL to ``ref_log_probs``, averaged over each response's tokens, then
    over the batch (the DeepSeekMath / trl ``grpo`` normalization). ``kiln grpo`` trains on this.

    kl_importance_weight: multiply the KL term by ``pi / pi_old`` so that its gradient is the
    unbiased reverse-KL gradient off-policy (DeepSeek-V3.2, arXiv:2512.02556; trl's default
    ``use_bias_correction_kl``); needs ``old_log_probs``.
    """
    per_token, meta = compute_policy_gradient_loss(policy_log_probs, loss_type, raw_rewards, advantages,
                                                   old_log_probs, cliprange)
    if kl_coef and ref_log_probs is not None:
        kl = kl_to_reference(policy_log_probs, ref_log_probs)
        if kl_importance_weight:
            if old_log_probs is None:
                raise ValueError("kl_importance_weight needs old_log_probs")
            kl = kl * torch.exp(policy_log_probs - old_log_probs)
        per_token = per_token + kl_coef * kl
        meta["kl"] = masked_mean(kl.detach(), response_mask)
    if "clipped" in meta:
        meta["clip_fraction"] = masked_mean(meta["clipped"].float(), response_mask)
    return masked_mean(per_token, response_mask, dim=-1).mean(), meta


def grpo_microbatch_train_step(
    policy_log_probs: Tensor,
    response_mask: Tensor,
    gradient_accumulation_steps: int,
    loss_type: LossType,
    raw_rewards: Tensor | None = None,
    advantages: Tensor | None = None,
    old_log_probs: Tensor | None = None,
    cliprange: float | None = None,
    ref_log_probs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_importance_weight: bool = False,
) -> tuple[Tensor, dict[str, Tensor]]:
    """One micro-batch of GRPO: ``grpo_loss`` divided by ``gradient_accumulation_steps`` and
    backpropagated here. Returns (that loss, detached; metadata: clip fraction, KL)."""
    loss, meta = grpo_loss(policy_log_probs, response_mask, loss_type, raw_rewards, advantages, old_log_probs,
                           cliprange, ref_log_probs, kl_coef, kl_importance_weight)
    loss = loss / gradient_accumulation_steps
    loss.backward()
    return loss.detach(), meta
