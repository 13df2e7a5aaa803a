"""The public building blocks one by one (values checked by hand or against torch)."""

from __future__ import annotations

import math

import torch

from kiln.align import losses as L


def test_tokenize_prompt_and_output_kiln_and_hf(chat_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    from kiln.align.chat import save_hf_tokenizer

    out = L.tokenize_prompt_and_output(["Hello!", "What is two plus two?"], [" Four.", " 42"], chat_tokenizer)
    p0, o0 = chat_tokenizer.encode("Hello!"), chat_tokenizer.encode(" Four.")
    full1 = chat_tokenizer.encode("What is two plus two?") + chat_tokenizer.encode(" 42")
    L1 = len(full1)
    assert out["input_ids"].shape == out["labels"].shape == out["response_mask"].shape == (2, max(L1, len(p0) + len(o0)) - 1)
    assert out["labels"][1, : L1 - 1].tolist() == full1[1:]
    assert out["labels"][0][out["response_mask"][0]].tolist() == o0
    save_hf_tokenizer(chat_tokenizer, tmp_path)
    hf = L.tokenize_prompt_and_output(["Hello!", "What is two plus two?"], [" Four.", " 42"],
                                      AutoTokenizer.from_pretrained(tmp_path))
    for k in out:
        assert torch.equal(out[k], hf[k]), k


def test_entropy_and_log_probs():
    logits = torch.randn(2, 3, 7)
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(L.compute_entropy(logits), -(p * p.log()).sum(-1))
    assert torch.allclose(L.compute_entropy(torch.zeros(1, 5)), torch.tensor([math.log(5)]))
    labels = torch.randint(0, 7, (2, 3))
    torch.testing.assert_close(L.token_log_probs(logits, labels),
                               torch.log_softmax(logits, -1).gather(-1, labels[..., None])[..., 0])

    class HFLike(torch.nn.Module):  # an object with .logits, as transformers returns
        def forward(self, ids):
            return type("Out", (), {"logits": logits[: ids.shape[0]]})()

    out = L.get_response_log_probs(HFLike(), labels, labels, return_token_entropy=True)
    assert out["log_probs"].shape == out["token_entropy"].shape == (2, 3)


def test_masked_reductions():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]])
    m = torch.tensor([[1, 0, 1], [0, 0, 1]])
    assert abs(L.masked_mean(x, m).item() - (1 + 3 + 6) / 3) < 1e-6
    assert L.masked_mean(x, m, dim=-1).tolist() == [2.0, 6.0]
    assert L.masked_normalize(x, m, 2.0).item() == 5.0
    assert L.masked_normalize(x, m, 2.0, dim=0).tolist() == [0.5, 0.0, 4.5]


def test_sft_microbatch_train_step_gradient():
    lp = torch.tensor([[-1.0, -2.0, -3.0]], requires_grad=True)
    m = torch.tensor([[0, 1, 1]])
    loss, meta = L.sft_microbatch_train_step(lp, m, gradient_accumulation_steps=2, normalize_constant=4.0)
    assert loss.item() == (2 + 3) / 4 / 2
    assert lp.grad.tolist() == [[0.0, -1 / 8, -1 / 8]]


def test_group_normalized_rewards():
    responses = ["4", "5", "4", "x", "1", "1", "1", "1"]
    truths = ["4"] * 4 + ["1"] * 4
    adv, raw, meta = L.compute_group_normalized_rewards(lambda r, g: {"reward": float(r == g)}, responses, truths,
                                                        group_size=4, advantage_eps=1e-6, normalize_by_std=True)
    assert raw.tolist() == [1, 0, 1, 0, 1, 1, 1, 1]
    s = torch.tensor([1.0, 0, 1, 0]).std()
    torch.testing.assert_close(adv[:4], torch.tensor([0.5, -0.5, 0.5, -0.5]) / (s + 1e-6))
    assert adv[4:].tolist() == [0, 0, 0, 0]  # a group that all agree teaches nothing
    adv2, _, _ = L.compute_group_normalized_rewards(lambda r, g: float(r == g), responses, truths, 4, 1e-6, False)
    assert adv2[:4].tolist() == [0.5, -0.5, 0.5, -0.5]
    assert meta["reward_mean"] == 0.75
    assert meta["groups_with_signal"] == 0.5  # the first group is mixed, the second all 1


def test_policy_gradient_losses():
    lp = torch.tensor([[-1.0, -2.0]])
    old = torch.tensor([[-1.5, -2.0]])
    a = torch.tensor([[2.0]])
    assert L.compute_naive_policy_gradient_loss(a, lp).tolist() == [[2.0, 4.0]]
    loss, meta = L.compute_grpo_clip_loss(a, lp, old, 0.2)
    # ratio e^0.5 > 1.2 is clipped for a positive advantage; ratio 1 is not
    torch.testing.assert_close(loss, torch.tensor([[-2.4, -2.0]]))
    assert meta["clipped"].tolist() == [[True, False]]
    neg, _ = L.compute_grpo_clip_loss(-a, lp, old, 0.2)  # negative advantage: the unclipped (larger) ratio counts
    torch.testing.assert_close(neg, torch.tensor([[2 * math.exp(0.5), 2.0]]))
    base, _ = L.compute_policy_gradient_loss(lp, "no_baseline", raw_rewards=torch.tensor([3.0]))
    assert base.tolist() == [[3.0, 6.0]]
