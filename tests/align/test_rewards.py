"""The synthetic task's rewards and the signal GRPO gets from them (component checks, milliseconds).

GRPO learns only from groups whose replies score differently (``groups_with_signal``). A model that
gets two-digit sums mostly but not exactly right gives all-zero groups under the exact reward and
mixed groups under the per-digit one; these tests pin that down and the partial credit itself.
"""

from __future__ import annotations

from dataclasses import replace

from kiln.align import losses as L
from kiln.align.grpo import grpo_addition2_cpu, grpo_addition_cpu
from kiln.align.rewards import (
    REWARDS,
    addition_digits_reward,
    addition_problems,
    addition_reward,
)


def test_addition_digits_partial_credit():
    assert addition_digits_reward("127", "127")["reward"] == 1.0
    assert addition_digits_reward("117", "127")["reward"] == 2 / 3  # the tens digit wrong
    assert addition_digits_reward("27", "127")["reward"] == 2 / 3  # a place missing
    assert addition_digits_reward("1270", "127")["reward"] == 0.0  # shifted: no place agrees
    assert addition_digits_reward("the sum is 127", "127")["reward"] == 0.0  # not one number
    for reply in ("117", "27", "127 ", "x"):  # the answer reward stays the exact check
        assert addition_digits_reward(reply, "127")["answer_reward"] == addition_reward(reply, "127")["answer_reward"]
    assert REWARDS["addition_digits"] is addition_digits_reward


def test_near_misses_give_signal_only_under_partial_credit():
    # two groups of 4 replies to 57 + 68 = 125 and 30 + 41 = 71: near misses, none exact
    replies = ["115", "125 1", "135", "126", "61", "72", "81", "7"]
    truths = ["125"] * 4 + ["71"] * 4
    _, _, exact = L.compute_group_normalized_rewards(addition_reward, replies, truths, 4, 1e-6, True)
    adv, raw, partial = L.compute_group_normalized_rewards(addition_digits_reward, replies, truths, 4, 1e-6, True)
    assert exact["groups_with_signal"] == 0.0 and exact["reward_max"] == 0.0
    assert partial["groups_with_signal"] == 1.0
    assert raw[3] > raw[1] and adv[3] > 0 > adv[1]  # "126" (two places right) beats "125 1" (not a number)


def test_presets_are_on_policy_and_two_digit_has_the_lower_lr():
    one, two = grpo_addition_cpu(), grpo_addition2_cpu()
    assert one.on_policy and two.on_policy and two.digits == 2 and one.digits == 1
    assert two.train.lr <= one.train.lr / 9  # 3e-4 collapsed two-digit accuracy (docs/align.md)
    assert replace(two, rollouts=1).steps_per_rollout == 1
    qs = addition_problems(50, 1, 2)
    assert all(10 <= int(a) <= 99 for q, _ in qs for a in q[8:-1].split(" + "))
