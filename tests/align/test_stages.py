"""kiln sft / dpo / grpo on the runtime, end to end on a tiny model: each stopped at a step and resumed
continues bit-identically (losses, evaluations, final weights); bad input is counted, not fatal."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

from kiln.align.rewards import addition_conversations

if not hasattr(__import__("kiln.train", fromlist=["fit"]), "fit"):  # before the runtime branch is merged
    pytest.skip("kiln.train.fit (the shared runtime) is not in this tree yet", allow_module_level=True)


class StopAt:
    """A stop request that pauses the run after ``n`` steps (what SIGTERM does to a real run)."""

    def __init__(self, n: int) -> None:
        self.n, self.calls, self.paused_at = n, 0, None

    def reason(self) -> str | None:
        self.calls += 1
        return "test stop" if self.calls >= self.n else None


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory, base_tokenizer):
    """A tiny base model folder (no chat tokens) with Kiln's tokenizer.json."""
    from kiln.model import ModelConfig, save_pretrained
    from kiln.model.transformer import build_model

    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=base_tokenizer.vocab_size, context_length=48, d_model=32,
                                    n_layers=1, n_heads=2, d_ff=64))
    d = tmp_path_factory.mktemp("base")
    save_pretrained(model, d)
    base_tokenizer.save(d / "tokenizer.json")
    return d


def _rows(path):
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


def _weights(path):
    from safetensors.torch import load_file

    return load_file(path / "model" / "model.safetensors")


def _same_run(a, b, keys=("loss",)):
    ra, rb = _rows(a), _rows(b)
    for k in keys:
        va = [(r["step"], r[k]) for r in ra if k in r]
        assert va and va == [(r["step"], r[k]) for r in rb if k in r], k  # float equality: bit-identical
    wa, wb = _weights(a), _weights(b)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def _resume_check(run, cfg, base_dir, tmp_path, stop_at, keys):
    straight = run(cfg, base_dir, tmp_path / "a")
    paused = StopAt(stop_at)
    run(cfg, base_dir, tmp_path / "b", stop=paused)
    assert not (tmp_path / "b" / "manifest.json").exists()
    resumed = run(cfg, base_dir, tmp_path / "b")
    _same_run(straight, resumed, keys)
    return straight


def test_sft_learns_resumes_and_counts_bad_input(tmp_path, base_dir):
    from kiln.align.sft import SFTConfig, run_sft

    data = tmp_path / "chat.jsonl"
    lines = [json.dumps(r) for r in addition_conversations(60, seed=1, digits=1)]
    lines += ['{"messages": [broken', json.dumps({"messages": [{"role": "user", "content": "no reply"}]})]
    data.write_text("\n".join(lines) + "\n")
    cfg = SFTConfig(data=(str(data),), max_steps=8, eval_every=4, sample_every=8, add_chat_tokens=True,
                    heldout_frac=0.1, train=replace(SFTConfig().train, lr=3e-3, batch_size=4, save_every=4, log_every=1))
    with pytest.raises(ValueError, match="kiln tokenizer add-special"):
        run_sft(replace(cfg, add_chat_tokens=False), base_dir, tmp_path / "x")
    out = _resume_check(run_sft, cfg, base_dir, tmp_path, 3, ("loss", "heldout_loss"))
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["heldout_loss"] < stats["heldout_loss_first"]
    assert stats["read"]["dropped"] == {"malformed_json": 1, "no_assistant_turn": 1}
    assert "chat_template" in (out / "model" / "tokenizer_config.json").read_text()
    assert "sample | user:" in (out / "train.log").read_text()


def test_dpo_resumes_with_cached_reference(tmp_path, base_dir, monkeypatch):
    from kiln.align import dpo
    from kiln.align.dpo import DPOConfig, run_dpo

    data = tmp_path / "prefs.jsonl"
    recs = [{"prompt": q, "chosen": a, "rejected": str(int(a) + 1)} for q, a in
            ((m["messages"][0]["content"], m["messages"][1]["content"]) for m in addition_conversations(20, 2, 1))]
    recs.append({"prompt": "same", "chosen": "x", "rejected": "x"})
    data.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    cfg = DPOConfig(data=(str(data),), max_steps=6, eval_every=3, add_chat_tokens=True, heldout_frac=0.2,
                    train=replace(DPOConfig().train, lr=3e-3, batch_size=4, save_every=3, log_every=1, warmup_steps=1))
    out = _resume_check(run_dpo, cfg, base_dir, tmp_path, 4, ("loss", "heldout_accuracy", "reward_margin"))
    assert (out / "reference" / "ref_logps.safetensors").is_file()
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    margins = [r["reward_margin"] for r in _rows(out) if "reward_margin" in r]
    assert margins[0] == 0.0 and min(margins[-2:]) > 0.01  # the policy moves toward the chosen replies
    assert "heldout_accuracy" in stats["last_eval"]
    assert stats["read"]["dropped"] == {"chosen_equals_rejected": 1}
    # a rerun reads the cached reference log-probs (the reference is never scored again)
    monkeypatch.setattr(dpo, "compute_reference_logps", lambda *a, **k: pytest.fail("reference recomputed"))
    run_dpo(replace(cfg, max_steps=7), base_dir, tmp_path / "a")


def test_grpo_resumes_mid_rollout(tmp_path, base_dir):
    from kiln.align.grpo import GRPOConfig, run_grpo

    cfg = GRPOConfig(group_size=4, prompts_per_rollout=2, rollout_epochs=2, rollouts=3, max_new_tokens=4,
                     eval_prompts=8, eval_every=3, digits=1, add_chat_tokens=True, kl_coef=0.05,
                     train=replace(GRPOConfig().train, batch_size=8, micro_batch_size=4, save_every=3, lr=1e-3))
    assert cfg.steps_per_rollout == 2
    out = _resume_check(run_grpo, cfg, base_dir, tmp_path, 3, ("loss", "reward_mean", "heldout_reward"))
    stats = json.loads((out / "manifest.json").read_text())["stats"]
    assert stats["rollouts"] == 3 and len(stats["rollout_rewards"]) == 3


def test_cli_sft(tmp_path, base_dir, capsys):
    from kiln.cli.main import main

    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in addition_conversations(20, seed=5, digits=1)) + "\n")
    assert main(["sft", str(base_dir), "--data", str(data), "-o", str(tmp_path / "sft"), "--max-steps", "2",
                 "--set", "train.batch_size=4", "eval_every=0", "sample_every=0", "--add-chat-tokens"]) == 0
    assert '"steps": 2' in capsys.readouterr().out
    assert main(["dpo", str(base_dir), "--data", str(data), "-o", str(tmp_path / "d")]) == 1  # no chat tokens
    assert "kiln tokenizer add-special" in capsys.readouterr().err


def test_chat_recipe_on_stand_ins(tmp_path, base_dir):
    """The recipe chains SFT -> DPO -> GRPO (addition, GSM8K) and writes one report (stand-in shared files)."""
    import gzip

    from kiln.align.recipe import ChatRecipeConfig, run_chat_recipe

    sh = tmp_path / "shared"
    for sub in ("align/lima", "align/llamafactory_demo", "align/hh-rlhf/harmless-base", "eval/gsm8k"):
        (sh / sub).mkdir(parents=True)
    (sh / "align/lima/lima.json").write_text(json.dumps([{"conversations": ["Hi!", "Hello."]}] * 4))
    (sh / "align/llamafactory_demo/alpaca_en_demo.json").write_text(
        json.dumps([{"instruction": "Say yes.", "input": "", "output": "Yes."}] * 4))
    pair = {"conversations": [{"from": "human", "value": "2+2?"}], "chosen": {"from": "gpt", "value": "4"},
            "rejected": {"from": "gpt", "value": "5"}}
    (sh / "align/llamafactory_demo/dpo_en_demo.json").write_text(json.dumps([pair] * 8))
    with gzip.open(sh / "align/hh-rlhf/harmless-base/test.jsonl.gz", "wt") as f:
        f.write(json.dumps({"chosen": "\n\nHuman: hi\n\nAssistant: hello", "rejected": "\n\nHuman: hi\n\nAssistant: go"}) + "\n")
    gsm = "".join(json.dumps({"question": f"What is {i} + 1?", "answer": f"so #### {i + 1}"}) + "\n" for i in range(8))
    (sh / "eval/gsm8k/train.jsonl").write_text(gsm)
    (sh / "eval/gsm8k/test.jsonl").write_text(gsm)
    cfg = ChatRecipeConfig(out=str(tmp_path / "chat"), base=str(base_dir), shared=str(sh), sft_steps=2, dpo_steps=2,
                           grpo_addition_rollouts=1, grpo_gsm8k_rollouts=1, gsm8k_eval=4, batch_size=4, seq_len=47,
                           device="cpu", overrides=("grpo.max_new_tokens=4", "grpo.eval_prompts=4"))
    report = run_chat_recipe(cfg).read_text()
    for name in ("## sft", "## dpo", "## grpo_addition", "## grpo_gsm8k", "## GSM8K"):
        assert name in report
    assert (tmp_path / "chat" / "grpo_gsm8k" / "model" / "tokenizer_config.json").is_file()


def test_demo_chat_stage(tmp_path, base_dir):
    from kiln.align.demo import EXCHANGE, format_exchange, run_chat_demo, stats

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    text = "In the beginning God created the heaven and the earth. And the earth was without form, and void."
    (corpus / "train.jsonl").write_text(json.dumps({"text": text}) + "\n")
    run, exchange = run_chat_demo(base_dir, corpus, tmp_path / "chat", steps=2, seed=0, device="cpu")
    assert [q for q, _ in exchange] == list(EXCHANGE) and all(isinstance(a, str) for _, a in exchange)
    s = stats(run)
    assert s["steps"] == 2 and s["conversations"] > 1000 and s["heldout_loss_after"] is not None
    h = s["heldout"]  # fresh one-digit sums scored greedily, printed under the exchange
    assert h["questions"] == 20 and 0 <= h["correct"] <= 20 and h["accuracy"] == h["correct"] / 20
    assert f"{h['correct']}/20 right" in format_exchange(exchange, h)


def test_seeded_holdout_is_a_seeded_disjoint_split_in_order():
    from kiln.align.stage import seeded_holdout

    items = list(range(100))
    train, held = seeded_holdout(items, 0.1, 7, seed=3)
    assert len(held) == 7 and len(train) == 93  # min(int(100 * 0.1), 7)
    assert sorted(train + held) == items and held == sorted(held) and train == sorted(train)
    assert seeded_holdout(items, 0.1, 7, seed=3) == (train, held)
    assert seeded_holdout(items, 0.1, 7, seed=4)[1] != held
    assert seeded_holdout(items, 0.001, 7, seed=3) == (items, [])
