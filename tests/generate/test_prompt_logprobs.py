"""Prompt log-probabilities (``SamplingParams.prompt_logprobs``): each prompt token's log-prob given the
ones before it equals the uncached forward's log-softmax, however the prompt is computed: in one step,
in chunks, beside other requests, after its prefix was cached by another request, through a
preemption, with ``max_tokens=0`` (scoring only, as lm-eval's log-likelihood requests do)."""

from __future__ import annotations

import pytest
import torch

from kiln.generate import EngineConfig, LLMEngine, SamplingParams
from kiln.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=101, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(1)
    return Transformer(CFG).eval()


@torch.no_grad()
def reference(model: Transformer, prompt: list[int], k: int) -> list[dict[int, float] | None]:
    lp = torch.log_softmax(model(torch.tensor([prompt]))[0].float(), dim=-1)  # (T, V)
    out: list[dict[int, float] | None] = [None]
    for i in range(1, len(prompt)):
        d = {prompt[i]: float(lp[i - 1, prompt[i]])}
        vals, ids = lp[i - 1].topk(k) if k else (torch.tensor([]), torch.tensor([], dtype=torch.long))
        for v, t in zip(vals.tolist(), ids.tolist()):
            d.setdefault(t, v)
        out.append(d)
    return out


def _close(got, want) -> None:
    assert len(got) == len(want) and got[0] is None
    for g, w in zip(got[1:], want[1:]):
        assert list(g) == list(w)  # the prompt token first, then the alternatives in order
        assert list(g.values()) == pytest.approx(list(w.values()), abs=1e-4)


PROMPTS = [[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17], [3, 1, 4, 1, 5, 9, 2, 6], [40, 41]]


@pytest.mark.parametrize("chunk", [2048, 5])
def test_prompt_logprobs_equal_the_uncached_forward(model, chunk):
    eng = LLMEngine(model, None, EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=max(chunk, 4)))
    params = [SamplingParams(max_tokens=3, temperature=0, prompt_logprobs=2),
              SamplingParams(max_tokens=0, prompt_logprobs=0),  # scoring only
              SamplingParams(max_tokens=4, temperature=0)]  # no prompt log-probs: none returned
    outs = eng.generate(PROMPTS, params)
    _close(outs[0].prompt_logprobs, reference(model, PROMPTS[0], 2))
    _close(outs[1].prompt_logprobs, reference(model, PROMPTS[1], 0))
    assert outs[1].token_ids == [] and outs[1].finish_reason == "length"
    assert outs[2].prompt_logprobs is None
    plain = LLMEngine(model, None, EngineConfig(block_size=4)).generate([PROMPTS[0]], SamplingParams(max_tokens=3,
                                                                                                    temperature=0))
    assert outs[0].token_ids == plain[0].token_ids  # asking for them changes nothing generated


def test_a_cached_prefix_is_computed_again_for_prompt_logprobs(model):
    eng = LLMEngine(model, None, EngineConfig(block_size=4))
    eng.generate([PROMPTS[0]], SamplingParams(max_tokens=2, temperature=0))  # publishes its full blocks
    hits = eng.blocks.prefix_hits
    out = eng.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=1))[0]
    _close(out.prompt_logprobs, reference(model, PROMPTS[0], 1))
    assert eng.blocks.prefix_hits == hits  # no block taken from the cache
    eng.generate([PROMPTS[0]], SamplingParams(max_tokens=1, temperature=0))
    assert eng.blocks.prefix_hits > hits  # without them the cache serves as before


def test_prompt_logprobs_survive_preemption(model):
    # 7 blocks of 4 for three 13-15-token prompts prefilled 5 tokens a step and growing 12 tokens each:
    # requests are preempted, some with their prompt log-probs half taken (recomputed, not taken twice)
    eng = LLMEngine(model, None, EngineConfig(block_size=4, num_blocks=7, max_num_seqs=3, max_num_batched_tokens=5))
    partial = []
    preempt = eng.scheduler._preempt
    eng.scheduler._preempt = lambda seq: partial.append(seq.needs_prompt_logprobs and len(seq.prompt_logprobs) > 1) \
        or preempt(seq)
    prompts = [PROMPTS[0], PROMPTS[0][::-1] + [1, 2], [7] * 15]
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, prompt_logprobs=1))
    assert any(partial)
    for p, o in zip(prompts, outs):
        _close(o.prompt_logprobs, reference(model, p, 1))
        assert len(o.token_ids) == 12


def test_prompt_logprobs_through_the_graph_path_and_validation(model):
    eng = LLMEngine(model, None, EngineConfig(block_size=4, max_num_batched_tokens=6, max_num_seqs=6))
    eng.runner.graph_max = 8  # chunks of <= 8 rows replay through the (emulated) decode graph
    out = eng.generate([PROMPTS[1]], SamplingParams(max_tokens=2, temperature=0, prompt_logprobs=3))[0]
    _close(out.prompt_logprobs, reference(model, PROMPTS[1], 3))
    with pytest.raises(ValueError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=-1)
    slide = LLMEngine(model, None, EngineConfig(block_size=4, context_overflow="slide"))
    with pytest.raises(ValueError, match="prompt_logprobs need the whole prompt"):
        slide.add_request(list(range(1, 80)), SamplingParams(prompt_logprobs=0))
