"""GRPO learns: a tiny policy raises a trivially learnable reward by a margin in a few seconds.

The reward is the share of the reply's characters that are digits; a 1-layer model at its random
initialization samples few of them. On-policy GRPO (one optimizer step per rollout batch) must
lift the mean rollout reward and the greedy held-out reward; a broken sign, a loss mask that
misses the reply, zero advantages or a policy that never updates all fail it.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch

from kiln.align import rewards as R

if not hasattr(__import__("kiln.train", fromlist=["fit"]), "fit"):  # before the runtime branch is merged
    pytest.skip("kiln.train.fit (the shared runtime) is not in this tree yet", allow_module_level=True)

ROLLOUTS, LR = 16, 1e-2  # 16 rollout batches of 4 prompts x 8 replies, one step each


def digit_share(response: str, ground_truth: str = "") -> dict[str, float]:
    """Share of the reply's non-space characters that are digits (0 for an empty reply)."""
    chars = [c for c in response if not c.isspace()]
    r = sum(c.isdigit() for c in chars) / len(chars) if chars else 0.0
    return {"reward": r, "answer_reward": r, "format_reward": float(bool(chars))}


@pytest.fixture
def base_dir(tmp_path, base_tokenizer):
    from kiln.model import ModelConfig, save_pretrained
    from kiln.model.transformer import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=base_tokenizer.vocab_size, context_length=48, d_model=32,
                                    n_layers=1, n_heads=2, d_ff=64))
    save_pretrained(model, tmp_path / "base")
    base_tokenizer.save(tmp_path / "base" / "tokenizer.json")
    return tmp_path / "base"


def test_grpo_raises_a_learnable_reward(tmp_path, base_dir, monkeypatch):
    from kiln.align.grpo import grpo_addition_cpu, run_grpo

    monkeypatch.setitem(R.REWARDS, "digit_share", digit_share)
    preset = grpo_addition_cpu()
    assert preset.on_policy and preset.kl_coef == 0.0
    cfg = replace(preset, reward="digit_share", group_size=8, prompts_per_rollout=4, rollouts=ROLLOUTS,
                  max_new_tokens=4, eval_prompts=16, eval_every=ROLLOUTS, add_chat_tokens=True,
                  train=replace(preset.train, batch_size=32, lr=LR, min_lr=LR, save_every=1000))
    out = run_grpo(cfg, base_dir, tmp_path / "run")
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    rr = stats["rollout_rewards"]
    k = len(rr) // 4
    first, last = sum(rr[:k]) / k, sum(rr[-k:]) / k
    print(f"rollout reward {first:.3f} -> {last:.3f}; held-out {stats['first_eval']} -> {stats['last_eval']}")
    assert last > first + 0.3
    assert stats["last_eval"]["heldout_reward"] > stats["first_eval"]["heldout_reward"] + 0.3



@pytest.mark.parametrize("temperature,limit", [(0.7, 24), (1.0, 24), (1.3, 24), (0.7, 19), (1.0, 19)])
def test_grpo_gradient_is_the_expected_reward_gradient_of_the_sampler(tiny_model, temperature, limit):
    """The policy-gradient theorem, exactly: weight every one-token reply y by the probability the
    engine samples it with, ``softmax(z[:limit] / T)`` (``limit``: the engine's ``vocab_limit``, the
    tokenizer's size below a padded vocabulary), and the stage's loss (``grpo_loss_fn``, on-policy)
    must have the gradient of ``-E_{y ~ that}[r(y)]``, whatever the (constant) baseline.

    Issue 18: log-probs taken at T=1 while sampling at T=0.7 added ``A (p_T - p_1)`` to the gradient,
    which a baseline does not cancel; on the bench's addition task it drifted the replies longer
    (2.5 -> 4-5 tokens on the CPU, 8.7 on an H100) and the H100 run's reward collapsed. The padded
    vocabulary's rows in the loss's softmax soaked up mass that no sample shows (0.1% -> 8%)."""
    from kiln.align.grpo import GRPOConfig, grpo_loss_fn

    V, P = 24, 5
    model = tiny_model(V, seed=1)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (P,), generator=g)
    reward = torch.rand(limit, generator=g)  # r(y) of each one-token reply the sampler can draw
    rows = torch.cat([prompt.expand(limit, P), torch.arange(limit)[:, None]], 1)  # (limit, P+1): every reply
    ids, labels = rows[:, :-1], rows[:, 1:]
    mask = torch.zeros(limit, P, dtype=torch.bool)
    mask[:, -1] = True  # the reply token

    p = torch.softmax(model(prompt[None])[0, -1, :limit] / temperature, -1)  # (limit,) with grad: the sampler's law
    expected = -(p * reward).sum()
    want = torch.autograd.grad(expected, list(model.parameters()))

    baseline = 0.3  # any constant: E[grad log p] = 0 cancels it
    adv = limit * p.detach() * (reward - baseline)  # the batch mean over the rows is then the expectation
    cfg = GRPOConfig(temperature=temperature, group_size=8, prompts_per_rollout=3,
                     train=replace(GRPOConfig().train, batch_size=24))
    zeros = torch.zeros(limit, P)
    loss = grpo_loss_fn(model, cfg, limit)(ids, labels, mask, adv, adv, zeros, zeros)
    got = torch.autograd.grad(loss, list(model.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * b.abs().max().item(), msg=lambda m, n=name: f"{n}: {m}")


def test_rollout_engine_samples_the_current_policy_after_each_update(tiny_model):
    """GRPO's engine is made once per run (its CUDA graphs read the weights by address); after every
    in-place optimizer step (``kiln.train.AdamW``'s guarded update, the runtime's) the log-probs it
    reports for its samples must be the policy's own, ``token_log_probs(..., vocab_limit)`` of the
    same tokens: a frozen copy of the weights, or a sampler over other ids than the loss's, fails.
    On the CPU the graph path runs eagerly over the same static buffers (``graph_max``)."""
    from kiln.align.losses import token_log_probs
    from kiln.align.rollout import RolloutEngine
    from kiln.generate import SamplingParams
    from kiln.train import AdamW

    V, limit, P, N = 24, 19, 4, 8
    model = tiny_model(V, seed=2)
    eng = RolloutEngine(model, max_num_seqs=N, vocab_limit=limit, max_seq_tokens=16)
    eng.engine.runner.graph_max = N  # what a CUDA engine gets; on the CPU the graph body runs eagerly
    opt = AdamW(model.parameters(), lr=0.05, weight_decay=0.0)
    prompts = torch.randint(0, limit, (N, P), generator=torch.Generator().manual_seed(1)).tolist()
    stale = None  # the weights before the last update: what a frozen engine would still sample
    for update in range(3):
        outs = eng.engine.generate(prompts, [SamplingParams(max_tokens=5, temperature=0.7, seed=i, logprobs=0,
                                                            ignore_eos=True) for i in range(N)])
        assert all(max(o.token_ids) < limit and len(o.token_ids) == 5 for o in outs)
        rows = torch.tensor([p + o.token_ids for p, o in zip(prompts, outs)])  # (N, P+5)
        engine_lp = torch.tensor([[lp[t] for t, lp in zip(o.token_ids, o.logprobs)] for o in outs])  # (N, 5)
        policy_lp = token_log_probs(model(rows[:, :-1]), rows[:, 1:], 1.0, limit)[:, P - 1 :]  # (N, 5)
        torch.testing.assert_close(engine_lp, policy_lp.detach(), rtol=1e-4, atol=1e-4)
        if stale is not None:  # the update moved the policy enough that a stale sampler would show
            with torch.no_grad():
                old_lp = token_log_probs(stale(rows[:, :-1]), rows[:, 1:], 1.0, limit)[:, P - 1 :]
            assert (old_lp - policy_lp.detach()).abs().max() > 0.05
        stale = copy.deepcopy(model)
        (-policy_lp.mean()).backward()  # sharpen toward the samples: any real update
        opt.step(ok=torch.tensor(True))
        opt.zero_grad(set_to_none=True)
