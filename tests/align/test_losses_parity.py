"""Kiln's SFT, DPO and GRPO losses equal trl's (its trainers' loss code, on the exported model), and so do
the gradients: a Kiln model and its Hugging Face export, same batch, within 1e-5 relative."""

from __future__ import annotations

import warnings

import pytest
import torch

from kiln.align import losses as L

pytest.importorskip("trl")
RTOL = 1e-5


@pytest.fixture(scope="module")
def pair(tmp_path_factory, chat_tokenizer):
    """(kiln model, HF LlamaForCausalLM of the same weights, HF tokenizer dir)."""
    from transformers import AutoModelForCausalLM

    from kiln.align.chat import save_hf_tokenizer
    from kiln.model import ModelConfig
    from kiln.model.hf import save_pretrained
    from kiln.model.transformer import build_model

    torch.manual_seed(0)
    km = build_model(ModelConfig(vocab_size=chat_tokenizer.vocab_size, context_length=64, d_model=32, n_layers=2, n_heads=2))
    d = tmp_path_factory.mktemp("hf")
    save_pretrained(km, d)
    save_hf_tokenizer(chat_tokenizer, d)
    hf = AutoModelForCausalLM.from_pretrained(d, attn_implementation="eager")
    return km, hf, d


def _kiln_to_hf_name(name: str) -> str:
    return name if name.startswith("lm_head.") else "model." + name


def _check_grads(km, hf):
    hg = {n: p.grad for n, p in hf.named_parameters()}
    for n, p in km.named_parameters():
        ref = hg[_kiln_to_hf_name(n)]
        assert ref.abs().max() > 0, n
        # 1e-5 of the tensor's largest entry: float32 sums in another order differ by ~1e-7 per entry
        torch.testing.assert_close(p.grad, ref, rtol=RTOL, atol=RTOL * ref.abs().max().item(),
                                   msg=lambda m, n=n: f"{n}: {m}")
    km.zero_grad(set_to_none=True)
    hf.zero_grad(set_to_none=True)


def _batch(V, B=4, T=12, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    for b in range(B):
        mask[b, 4 + b : T - b] = 1  # responses of different lengths; trailing positions are padding
    return ids, mask


def _args(cls, tmp, **kw):
    return cls(output_dir=str(tmp), report_to=[], use_cpu=True, bf16=False, **kw)


def test_sft_loss_matches_trl(pair, tmp_path):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    km, hf, d = pair
    ids, mask = _batch(km.config.vocab_size)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = SFTTrainer(model=hf, args=_args(SFTConfig, tmp_path), processing_class=AutoTokenizer.from_pretrained(d),
                        train_dataset=Dataset.from_dict({"text": ["The quick fox"] * 2}))
    labels = ids.masked_fill(mask == 0, -100)
    ref = tr.compute_loss(hf, {"input_ids": ids.clone(), "attention_mask": torch.ones_like(ids), "labels": labels})
    lp = L.get_response_log_probs(km, ids[:, :-1], ids[:, 1:])["log_probs"]
    ours = L.sft_loss(lp, mask[:, 1:])
    torch.testing.assert_close(ours, ref.to(ours.dtype), rtol=RTOL, atol=0)
    ours.backward()
    ref.backward()
    _check_grads(km, hf)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "hinge"])
def test_dpo_loss_matches_trl(pair, tmp_path, loss_type):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    km, hf, d = pair
    ids, mask = _batch(km.config.vocab_size, B=4)  # rows 0-1 chosen, 2-3 rejected
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = DPOTrainer(model=hf, args=_args(DPOConfig, tmp_path, beta=0.3, loss_type=[loss_type]),
                        processing_class=AutoTokenizer.from_pretrained(d),
                        train_dataset=Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]}))
    tr.precompute_ref_logps = True
    ref_c, ref_r = torch.tensor([-30.0, -25.0]), torch.tensor([-28.0, -31.0])
    inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask,
              "ref_chosen_logps": ref_c, "ref_rejected_logps": ref_r}
    ref_loss = tr._compute_loss(hf, inputs, return_outputs=False)

    seq = L.sequence_log_probs(km, ids[:, :-1], ids[:, 1:], mask[:, 1:])  # (4,)
    n = mask[:, 1:].sum(-1)
    losses, rc, rr = L.dpo_loss(seq[:2], seq[2:], ref_c, ref_r, beta=0.3, loss_type=loss_type,
                                chosen_tokens=n[:2], rejected_tokens=n[2:])
    ours = losses.mean()
    torch.testing.assert_close(ours, ref_loss.to(ours.dtype), rtol=RTOL, atol=0)
    torch.testing.assert_close(rc, 0.3 * (seq[:2].detach() - ref_c))
    ours.backward()
    ref_loss.backward()
    _check_grads(km, hf)


def test_conservative_dpo_formula():
    d = torch.tensor([0.5, -1.0, 2.0])
    z = torch.zeros(3)
    losses, _, _ = L.dpo_loss(d, z, z, z, beta=0.5, loss_type="conservative", label_smoothing=0.1)
    p = torch.sigmoid(0.5 * d)
    torch.testing.assert_close(losses, -(0.9 * p.log() + 0.1 * (1 - p).log()))
    plain, _, _ = L.dpo_loss(d, z, z, z, beta=0.5, loss_type="conservative", label_smoothing=0.0)
    torch.testing.assert_close(plain, L.dpo_loss(d, z, z, z, beta=0.5)[0])


def _rollout_batch(V: int, seed: int, cuts: dict[int, int]):
    """A GRPO batch of 4 prompts of 5 ids and completions of 7, completion row r masked from cuts[r]:
    (generator, B, C, prompt, completion, completion mask); the generator goes on for the caller."""
    g = torch.Generator().manual_seed(seed)
    B, P, C = 4, 5, 7
    prompt = torch.randint(0, V, (B, P), generator=g)
    completion = torch.randint(0, V, (B, C), generator=g)
    cmask = torch.ones(B, C, dtype=torch.long)
    for r, c in cuts.items():
        cmask[r, c:] = 0
    return g, B, C, prompt, completion, cmask


@pytest.mark.parametrize("kl_coef,kl_iw", [(0.0, False), (0.05, False), (0.05, True)])
def test_grpo_loss_matches_trl(pair, tmp_path, kl_coef, kl_iw):
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    km, hf, d = pair
    V = km.config.vocab_size
    g, B, C, prompt, completion, cmask = _rollout_batch(V, 3, {1: 5, 3: 2})
    P = prompt.shape[1]
    adv = torch.tensor([1.2, -0.4, 0.3, -1.1])
    old = -torch.rand(B, C, generator=g) * 3 - 2.0  # far enough from the policy that clipping acts
    refl = -torch.rand(B, C, generator=g) * 3 - 2.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = GRPOTrainer(model=hf, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                         args=_args(GRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4,
                                    max_completion_length=8, beta=kl_coef, loss_type="grpo", epsilon=0.2,
                                    use_bias_correction_kl=kl_iw),
                         train_dataset=Dataset.from_dict({"prompt": ["a b"] * 4}),
                         processing_class=AutoTokenizer.from_pretrained(d))
    tr.current_gradient_accumulation_steps = 1
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
              "completion_mask": cmask, "advantages": adv, "old_per_token_logps": old,
              "ref_per_token_logps": refl}
    ref_loss = tr._compute_loss(hf, inputs)

    full = torch.cat([prompt, completion], 1)
    lp = L.get_response_log_probs(km, full[:, :-1], full[:, 1:])["log_probs"][:, P - 1 :]  # (B, C)
    ours, meta = L.grpo_microbatch_train_step(lp, cmask, 1, "grpo_clip", advantages=adv, old_log_probs=old,
                                              cliprange=0.2, ref_log_probs=refl, kl_coef=kl_coef,
                                              kl_importance_weight=kl_iw)
    assert 0 < meta["clip_fraction"] < 1
    torch.testing.assert_close(ours, ref_loss.detach().to(ours.dtype), rtol=RTOL, atol=0)
    ref_loss.backward()
    _check_grads(km, hf)


@pytest.mark.parametrize("temperature,epochs", [(0.7, 1), (0.7, 2), (1.0, 1)])
def test_grpo_stage_loss_matches_trl_at_the_sampling_temperature(pair, tmp_path, temperature, epochs):
    """The GRPO stage's own loss function (``grpo_loss_fn``, as ``kiln grpo`` and ``kiln bench align
    --learning`` train with it) against trl's GRPOTrainer at the bench's sampling temperature 0.7:
    both must take log-probs of ``softmax(logits / T)``, the distribution the rollouts were drawn
    from. Before issue 18's fix Kiln took them at T=1 and only the T=1 case (the trl default the
    test above uses) agreed; its gradient then carried a term the group baseline does not cancel.
    ``epochs=2``: the off-policy path (old log-probs taken by ``_log_probs``, which must use the same T)."""
    from dataclasses import replace

    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from kiln.align.grpo import GRPOConfig as KilnGRPO, _log_probs, grpo_loss_fn

    km, hf, d = pair
    V = km.config.vocab_size
    g, B, C, prompt, completion, cmask = _rollout_batch(V, 5, {0: 4, 2: 1})
    P = prompt.shape[1]
    adv = torch.tensor([1.5, -0.5, 0.25, -1.25])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tr = GRPOTrainer(model=hf, reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                         args=_args(GRPOConfig, tmp_path, per_device_train_batch_size=4, num_generations=4,
                                    max_completion_length=8, beta=0.0, loss_type="grpo", epsilon=0.2,
                                    temperature=temperature),
                         train_dataset=Dataset.from_dict({"prompt": ["a b"] * 4}),
                         processing_class=AutoTokenizer.from_pretrained(d))
    tr.current_gradient_accumulation_steps = 1
    full = torch.cat([prompt, completion], 1)
    ids, labels = full[:, :-1], full[:, 1:]
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, P - 1 :] = cmask.bool()
    base = KilnGRPO()
    cfg = replace(base, temperature=temperature, group_size=4, prompts_per_rollout=1, rollout_epochs=epochs,
                  train=replace(base.train, batch_size=4))
    assert cfg.on_policy == (epochs == 1)
    # Off-policy, the old log-probs of unchanged weights must give ratio 1 exactly as trl's on-policy
    # path does (its old = the policy's own, detached): only if they are taken at the loss's temperature.
    old = _log_probs(km, ids, labels, B, cfg.sampling_temperature) if epochs > 1 else torch.zeros(labels.shape)
    inputs = {"prompt_ids": prompt, "prompt_mask": torch.ones_like(prompt), "completion_ids": completion,
              "completion_mask": cmask, "advantages": adv}
    ref_loss = tr._compute_loss(hf, inputs)
    ours = grpo_loss_fn(km, cfg)(ids, labels, mask, adv, adv, old, torch.zeros(labels.shape))
    torch.testing.assert_close(ours, ref_loss.detach().to(ours.dtype), rtol=RTOL, atol=1e-7)
    ours.backward()
    ref_loss.backward()
    _check_grads(km, hf)
