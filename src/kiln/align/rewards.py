"""Reward functions (plain callables) and the synthetic verifiable task.

A reward function is ``reward_fn(response: str, ground_truth: str) -> {"reward", "answer_reward",
"format_reward"}`` (floats in [0, 1]), the shape ``compute_group_normalized_rewards`` reads.

- ``gsm8k_reward``: the final number (``#### X``, "the answer is X", else the last number) equals
  the reference's, through ``kiln.eval.answers`` (the same parser Kiln's GSM8K evaluation uses);
- ``math_reward``: the last ``\\boxed{...}`` equals the reference: string, rational, then symbolic
  through ``math-verify`` when it is installed (``pip install math-verify``);
- ``addition_reward``: the synthetic task's check: the reply is the sum and nothing else (answer
  reward: the last number is the sum; format reward: the reply is one number).
- ``addition_digits_reward``: partial credit on the same task: the share of the sum's digits the
  reply gets right, place by place (answer reward: still the exact sum). A model that rarely gets a
  whole two-digit sum right still gets most of its digits right, so its groups differ in reward.

The synthetic task (``addition_problems``): "What is a + b?" with operands of ``digits`` digits,
drawn from a seeded generator, so train and held-out prompts are reproducible and disjoint by seed.
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable

from kiln.eval.answers import answers_match, extract_boxed, extract_gsm8k

Reward = dict[str, float]
RewardFn = Callable[[str, str], Reward]
_ONLY_NUMBER = re.compile(r"\s*-?\d+\s*")


def _reward(answer: bool, formatted: bool, format_weight: float = 0.0) -> Reward:
    a, f = float(answer), float(formatted)
    return {"reward": (1 - format_weight) * a + format_weight * f, "answer_reward": a, "format_reward": f}


def gsm8k_reward(response: str, ground_truth: str) -> Reward:
    """1 when the response's final number equals the reference's (``#### 42`` or a bare ``42``)."""
    gold = extract_gsm8k(ground_truth) or ground_truth.strip()
    pred = extract_gsm8k(response)
    formatted = "####" in response or "answer is" in response.lower()
    return _reward(pred is not None and answers_match(pred, gold), formatted)


def math_reward(response: str, ground_truth: str) -> Reward:
    """1 when the last ``\\boxed{}`` of the response equals the reference (boxed or bare)."""
    gold = extract_boxed(ground_truth) or ground_truth.strip()
    pred = extract_boxed(response)
    return _reward(pred is not None and answers_match(pred, gold), pred is not None)


def addition_reward(response: str, ground_truth: str) -> Reward:
    """The synthetic task: answer reward if the last number is the sum; the reward is 1 only when
    the reply is exactly that number (format and answer both right)."""
    nums = re.findall(r"-?\d+", response)
    answer = bool(nums) and nums[-1] == ground_truth.strip()
    formatted = bool(_ONLY_NUMBER.fullmatch(response))
    return {"reward": float(answer and formatted), "answer_reward": float(answer), "format_reward": float(formatted)}


def addition_digits_reward(response: str, ground_truth: str) -> Reward:
    """Partial credit: digits equal to the sum's, aligned from the units place, over the longer of
    the two lengths (a reply with a digit too many or too few loses that place); 0 unless the reply
    is one number. The answer reward is the exact check of ``addition_reward``."""
    exact = addition_reward(response, ground_truth)
    if not exact["format_reward"]:
        return {**exact, "reward": 0.0}
    got, want = response.strip().lstrip("-")[::-1], ground_truth.strip().lstrip("-")[::-1]
    share = sum(a == b for a, b in zip(got, want)) / max(len(got), len(want))
    return {**exact, "reward": share}


def format_reward(response: str, ground_truth: str = "") -> Reward:
    """1 when the response states a final answer (``####``, "the answer is", or ``\\boxed{}``)."""
    ok = "####" in response or "answer is" in response.lower() or "\\boxed{" in response
    return _reward(ok, ok, 1.0)


REWARDS: dict[str, RewardFn] = {
    "addition": addition_reward,
    "addition_digits": addition_digits_reward,
    "gsm8k": gsm8k_reward,
    "math": math_reward,
    "format": format_reward,
}


def addition_problems(n: int, seed: int, digits: int = 2) -> list[tuple[str, str]]:
    """``n`` (question, answer) pairs "What is a + b?" with ``digits``-digit operands, seeded."""
    rng = random.Random(seed)
    lo, hi = 10 ** (digits - 1) if digits > 1 else 0, 10**digits - 1
    out = []
    for _ in range(n):
        a, b = rng.randint(lo, hi), rng.randint(lo, hi)
        out.append((f"What is {a} + {b}?", str(a + b)))
    return out


def addition_conversations(n: int, seed: int, digits: int = 2) -> list[dict]:
    """The synthetic task as SFT records (``{"messages": [...]}``): the demo's offline chat data."""
    return [{"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
            for q, a in addition_problems(n, seed, digits)]
