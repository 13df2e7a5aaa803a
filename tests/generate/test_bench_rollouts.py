"""`kiln bench serve --parts rollouts`: the rebuilt pre-engine decoder (the "before" row) is the real
thing -- its greedy output equals the engine's token for token -- and the table counts every token."""

from __future__ import annotations

import json

import torch

from kiln.bench.rollouts import gsm8k_prompts, padded_generate
from kiln.bench.serve_http import chat_tokenizer
from kiln.generate import LLMEngine, SamplingParams
from kiln.model import ModelConfig, Transformer


def _model() -> Transformer:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=300, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    model = Transformer(cfg).eval()
    with torch.no_grad():  # sharp attention: a wrong position or a visible pad slot changes the argmax
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(8.0)
            layer.self_attn.k_proj.weight.mul_(8.0)
    return model


def test_padded_batches_equal_the_engine_greedy():
    model = _model()
    g = torch.Generator().manual_seed(1)
    prompts = [torch.randint(0, 300, (n,), generator=g).tolist() for n in (3, 17, 9, 30, 1, 12)]
    before = padded_generate(model, prompts, 10, 0.0, batch_size=4)  # two batches, ragged lengths
    eng = LLMEngine(model, None)
    after = [list(o.token_ids) for o in eng.generate(prompts, SamplingParams(max_tokens=10, temperature=0,
                                                                              ignore_eos=True))]
    assert before == after
    sampled = padded_generate(model, prompts, 10, 1.0, batch_size=4, seed=3)
    assert [len(s) for s in sampled] == [10] * 6 and sampled != before
    assert sampled == padded_generate(model, prompts, 10, 1.0, batch_size=4, seed=3)  # seeded


def test_gsm8k_prompts_fit_and_keep_the_question(tmp_path):
    f = tmp_path / "gsm8k.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"How many apples has child {i}?", "answer": f"x\n#### {i}"})
                           for i in range(6)) + "\n")
    tok = chat_tokenizer(None)
    fewshot = gsm8k_prompts(str(f), 3, 2, tok, room=60, chat=False)
    assert len(fewshot) == 3 and max(map(len, fewshot)) == 60  # two shots make it long: the head is cut
    assert tok.decode(fewshot[0]).endswith("How many apples has child 2?\nAnswer:")
    chat = gsm8k_prompts(str(f), 2, 0, tok, room=200, chat=True)
    assert "child 1" in tok.decode(chat[1]) and len(chat[0]) < 60


def test_bench_serve_rollouts_part(tmp_path):
    from kiln.cli.main import main

    f = tmp_path / "gsm8k.jsonl"
    f.write_text("\n".join(json.dumps({"question": f"What is {i} plus {i}?", "answer": f"x\n#### {2 * i}"})
                           for i in range(12)) + "\n")
    args = ["bench", "serve", "--device", "cpu", "--parts", "rollouts", "--shapes", "tiny", "--max-tokens", "5",
            "--gsm8k", str(f), "--gsm8k-prompts", "6", "--gsm8k-shots", "2", "--group", "3", "--rollout-batch", "4",
            "--sequential-prompts", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_serve.json").read_text())
    got = {(r["task"], r["impl"].split(":")[0]): r for r in rows}
    assert set(got) == {("gsm8k", "before"), ("gsm8k", "after"), ("gsm8k", "one at a time"), ("grpo", "before"),
                        ("grpo", "after")}
    assert all(not r["error"] and r["tokens"] == 5 * r["sequences"] and r["tok_s"] > 0 for r in rows)
    assert got[("gsm8k", "after")]["sequences"] == 6 and got[("grpo", "after")]["sequences"] == 6
    assert got[("gsm8k", "one at a time")]["sequences"] == 2 and got[("gsm8k", "before")]["speedup"] == 1.0
    assert "| grpo | after: RolloutEngine, 4 running |" in (tmp_path / "bench_serve.md").read_text()
