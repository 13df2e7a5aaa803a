"""The engine (paged KV cache, continuous batching, prefix sharing, preemption) against one-at-a-time
uncached generation, on a tiny random model."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.generate import EngineConfig, LLMEngine, SamplingParams
from kiln.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
EOT = 256


class ByteTokenizer:
    eot_id = EOT
    vocab_size = 257

    def __init__(self) -> None:
        self.vocab = {i: bytes([i]) for i in range(256)}
        self.vocab[EOT] = b"<|endoftext|>"

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.vocab[i] for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


@torch.no_grad()
def uncached_greedy(model: Transformer, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    for _ in range(n):
        ids = torch.cat([ids, model(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    return ids[0, len(prompt):].tolist()


def _prompts(n: int, seed: int = 1) -> list[list[int]]:
    """Mixed lengths; every other prompt starts with the same 20 tokens (prefix sharing)."""
    g = torch.Generator().manual_seed(seed)
    shared = torch.randint(0, 256, (20,), generator=g).tolist()
    out = []
    for i in range(n):
        L = int(torch.randint(1, 30, (1,), generator=g))
        out.append((shared if i % 2 else []) + torch.randint(0, 256, (L,), generator=g).tolist())
    return out


def test_concurrent_greedy_equals_one_at_a_time_with_sharing_and_preemption(model):
    prompts = _prompts(12)
    # 24 blocks of 4 tokens for 6 sequences of up to 61 tokens: preemption is forced; a 16-token budget
    # chunks every prompt longer than what is left of a step.
    eng = LLMEngine(model, None, EngineConfig(block_size=4, num_blocks=24, max_num_seqs=6, max_num_batched_tokens=16))
    outs = eng.generate(prompts, SamplingParams(max_tokens=12, temperature=0))
    s = eng.stats()
    assert s["preemptions"] > 0 and s["prefix_cache_hits"] > 0
    assert s["free_blocks"] == s["num_blocks"] == 24 and s["running"] == s["waiting"] == 0
    assert all(b.ref_count == 0 for b in eng.blocks.blocks)
    for p, o in zip(prompts, outs):
        assert o.finished and o.finish_reason == "length" and len(o.token_ids) == 12
        assert o.token_ids == uncached_greedy(model, p, 12), f"prompt of {len(p)} tokens"


def test_requests_join_between_steps_and_a_long_prompt_is_chunked(model):
    eng = LLMEngine(model, None, EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=8))
    short = eng.add_request([1, 2, 3], SamplingParams(max_tokens=20, temperature=0))
    eng.step()  # prefill: the first token
    long_prompt = list(range(40, 90))  # 50 tokens: 7 steps at 8 tokens a step, shared with the decoder
    rid = eng.add_request(long_prompt, SamplingParams(max_tokens=3, temperature=0))
    steps_with_short = 0
    final = {}
    while eng.has_unfinished():
        outs = {o.request_id: o for o in eng.step()}
        steps_with_short += short in outs and rid not in final
        final.update({k: v for k, v in outs.items() if v.finished})
    assert steps_with_short >= 6  # the short request kept decoding while the long one prefilled
    assert final[rid].token_ids == uncached_greedy(model, long_prompt, 3)
    assert final[short].token_ids == uncached_greedy(model, [1, 2, 3], 20)


def test_seed_reproduces_whatever_is_batched_alongside(model):
    p = SamplingParams(max_tokens=10, temperature=1.0, top_k=50, seed=123)
    alone = LLMEngine(model).generate([[5, 6, 7]], p)[0].token_ids
    crowd = LLMEngine(model).generate([[9] * 30, [5, 6, 7], [1, 2]], [SamplingParams(max_tokens=5, seed=1), p,
                                                                      SamplingParams(max_tokens=8)])[1].token_ids
    other = LLMEngine(model).generate([[5, 6, 7]], SamplingParams(max_tokens=10, top_k=50, seed=124))[0].token_ids
    assert alone == crowd and alone != other


def test_abort_frees_blocks_at_once(model):
    eng = LLMEngine(model, None, EngineConfig(block_size=4, num_blocks=40))
    a = eng.add_request(list(range(30)), SamplingParams(max_tokens=30, temperature=0))
    b = eng.add_request(list(range(30)), SamplingParams(max_tokens=30, temperature=0))
    for _ in range(3):
        eng.step()
    used = eng.stats()["used_blocks"]
    out = eng.abort(a)
    assert out.finished and out.finish_reason == "abort" and eng.abort(a) is None
    assert 0 < eng.stats()["used_blocks"] < used  # b still holds its blocks (some shared with a's prefix)
    eng.abort(b)
    assert eng.stats()["used_blocks"] == 0 and not eng.has_unfinished()


def test_stops_text_and_logprobs(model):
    tok = ByteTokenizer()
    eng = LLMEngine(model, tok)
    base = eng.generate([[104, 105]], SamplingParams(max_tokens=12, temperature=0))[0]
    assert base.text == tok.decode(base.token_ids)
    # a stop token id ends the request at its first occurrence, the token kept in token_ids
    t = base.token_ids[4]
    o = eng.generate([[104, 105]], SamplingParams(max_tokens=12, temperature=0, stop_token_ids=(t,)))[0]
    assert o.finish_reason == "stop" and o.token_ids == base.token_ids[:base.token_ids.index(t) + 1]
    # a stop string cuts the text before it; streamed deltas add up to the final text
    stop = base.text[3:5]
    eng.add_request([104, 105], SamplingParams(max_tokens=12, temperature=0, stop=(stop,)), "s")
    pieces, last = [], None
    while eng.has_unfinished():
        for out in eng.step():
            pieces.append(out.new_text)
            last = out
    assert last.finish_reason == "stop" and last.text == base.text[:base.text.index(stop)] == "".join(pieces)
    # logprobs: the sampled token first, then the top 3, all <= 0 and normalized
    o = eng.generate([[104, 105]], SamplingParams(max_tokens=3, temperature=0, logprobs=3))[0]
    assert len(o.logprobs) == 3 and all(len(d) == 3 for d in o.logprobs)  # greedy: sampled is the top-1
    with torch.no_grad():
        ref = torch.log_softmax(model(torch.tensor([[104, 105]]))[0, -1].float(), -1)
    assert math.isclose(o.logprobs[0][o.token_ids[0]], float(ref.max()), abs_tol=1e-4)


def test_eos_and_context_limit(model):
    eng = LLMEngine(model, None, EngineConfig(eos_token_id=None))
    first = eng.generate([[1, 2, 3]], SamplingParams(max_tokens=1, temperature=0))[0].token_ids[0]
    eng2 = LLMEngine(model, None, EngineConfig(eos_token_id=first))
    o = eng2.generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0))[0]
    assert o.finish_reason == "stop" and o.token_ids == [first]
    o = eng2.generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 5
    o = eng.generate([list(range(60))], SamplingParams(max_tokens=50, temperature=0))[0]
    assert o.finish_reason == "length" and len(o.token_ids) == 5  # positions 60..63, then one last token


def test_bad_requests(model):
    eng = LLMEngine(model)
    with pytest.raises(ValueError, match="empty"):
        eng.add_request([], SamplingParams())
    with pytest.raises(ValueError, match="vocabulary"):
        eng.add_request([999], SamplingParams())
    with pytest.raises(ValueError, match="context"):
        eng.add_request(list(range(65)), SamplingParams())
    with pytest.raises(ValueError, match="tokenizer"):
        eng.add_request([1], SamplingParams(stop=("x",)))
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=-1)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    eng.add_request([1], SamplingParams(), "x")
    with pytest.raises(ValueError, match="already"):
        eng.add_request([1], SamplingParams(), "x")


@pytest.mark.parametrize("kind", ["ngram", "draft", "draft-small"])
def test_speculative_greedy_is_plain_greedy(model, kind):
    torch.manual_seed(5)
    # "draft": the model itself drafts, so whole runs are accepted; "draft-small": a random small model
    # whose drafts are mostly rejected
    draft = model if kind == "draft" else Transformer(
        ModelConfig(vocab_size=257, context_length=64, d_model=16, n_layers=1, n_heads=2, d_ff=32))
    g = torch.Generator().manual_seed(3)
    motif = torch.randint(0, 256, (6,), generator=g).tolist()
    prompts = [motif * 4, torch.randint(0, 256, (9,), generator=g).tolist(), motif * 2 + [7]]
    cfg = EngineConfig(block_size=4, num_blocks=40, max_num_seqs=3, speculative=kind.split("-")[0],
                       num_speculative_tokens=3)
    eng = LLMEngine(model, None, cfg, draft_model=draft)
    outs = eng.generate(prompts, [SamplingParams(max_tokens=20, temperature=0),
                                  SamplingParams(max_tokens=14, temperature=0),
                                  SamplingParams(max_tokens=9, temperature=0, logprobs=0)])
    s = eng.stats()
    assert s["spec_proposed"] > 0 and s["free_blocks"] == s["num_blocks"]
    if kind != "draft-small":
        assert s["spec_accepted"] > s["spec_proposed"] // 4
    for p, o in zip(prompts, outs):
        assert o.token_ids == uncached_greedy(model, p, len(o.token_ids))
        assert len(o.token_ids) == (20 if len(p) == 24 else 14 if len(p) == 9 else 9)
    assert len(outs[2].logprobs) == 9


def test_ngram_proposer_finds_the_latest_match():
    from kiln.generate.speculative import NgramProposer

    prop = NgramProposer(ngram_max=3)
    assert prop.propose_one([1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3], 2) == [8, 5]
    assert prop.propose_one([4, 5, 6, 7], 3) == []
    assert prop.propose_one([1, 2, 1], 3) == [2, 1, 2]  # the copy overlaps its output: period 2
    assert prop.propose_one([7, 7, 7], 4) == [7, 7, 7, 7]
    assert prop.propose_one([5, 1, 2, 3, 1, 2], 5) == [3, 1, 2, 3, 1]  # period 3 after the match [1, 2]


@pytest.mark.parametrize("speculative", ["none", "ngram"])
def test_graph_replay_path_with_padded_rows(model, speculative):
    """The CUDA-graph decode path's static buffers and scratch-block padding, emulated on the CPU."""
    prompts = _prompts(5, seed=4)
    cfg = EngineConfig(block_size=4, max_num_seqs=5, speculative=speculative, num_speculative_tokens=2)
    eng = LLMEngine(model, None, cfg)
    eng.runner.graph_max = 16  # the size a CUDA engine gets; on the CPU replay runs the same buffers eagerly
    outs = eng.generate(prompts, SamplingParams(max_tokens=10, temperature=0))
    assert sorted(eng.runner.graphs) == [1, 2, 4, 8, 16]
    for p, o in zip(prompts, outs):
        assert o.token_ids == uncached_greedy(model, p, 10)


def test_sampled_requests_survive_preemption_and_prefix_cache_resets(model):
    """A seeded sampled request gives the same tokens when preempted and recomputed as when alone;
    ``reset_prefix_cache`` stops later requests from reusing blocks computed before it."""
    prompts = _prompts(6, seed=7)
    params = [SamplingParams(max_tokens=12, temperature=0.9, top_p=0.95, seed=100 + i) for i in range(6)]
    alone = [LLMEngine(model).generate([p], sp)[0].token_ids for p, sp in zip(prompts, params)]
    tight = LLMEngine(model, None, EngineConfig(block_size=4, num_blocks=20, max_num_seqs=6, max_num_batched_tokens=12))
    outs = tight.generate(prompts, params)
    assert tight.stats()["preemptions"] > 0
    assert [o.token_ids for o in outs] == alone
    eng = LLMEngine(model, None, EngineConfig(block_size=4))
    eng.generate([prompts[1]], SamplingParams(max_tokens=2, temperature=0))
    hits = eng.stats()["prefix_cache_hits"]
    eng.generate([prompts[1]], SamplingParams(max_tokens=2, temperature=0))
    assert eng.stats()["prefix_cache_hits"] > hits
    eng.reset_prefix_cache()
    hits = eng.stats()["prefix_cache_hits"]
    eng.generate([prompts[1]], SamplingParams(max_tokens=2, temperature=0))
    assert eng.stats()["prefix_cache_hits"] == hits


@pytest.mark.parametrize("speculative", ["none", "ngram"])
def test_random_arrivals_and_aborts_keep_outputs_and_blocks_right(model, speculative):
    """Requests join at random steps, some are aborted mid-prefill or mid-decode, the pool is tiny:
    every request that finishes equals uncached greedy, and every block comes back."""
    g = torch.Generator().manual_seed(11)
    prompts = _prompts(14, seed=5)
    cfg = EngineConfig(block_size=4, num_blocks=22, max_num_seqs=5, max_num_batched_tokens=10,
                       speculative=speculative, num_speculative_tokens=3)
    eng = LLMEngine(model, None, cfg)
    pending = list(enumerate(prompts))
    final, aborted, live = {}, set(), set()
    while pending or eng.has_unfinished():
        while pending and float(torch.rand((), generator=g)) < 0.5:
            i, p = pending.pop(0)
            live.add(eng.add_request(p, SamplingParams(max_tokens=8, temperature=0), request_id=f"r{i}"))
        if live and float(torch.rand((), generator=g)) < 0.1:
            rid = sorted(live)[int(torch.randint(0, len(live), (), generator=g))]
            eng.abort(rid)
            aborted.add(rid)
            live.discard(rid)
        for o in eng.step():
            if o.finished:
                final[o.request_id] = o
                live.discard(o.request_id)
    assert aborted and len(final) + len(aborted) == len(prompts)
    for rid, o in final.items():
        assert o.token_ids == uncached_greedy(model, prompts[int(rid[1:])], 8), rid
    s = eng.stats()
    assert s["free_blocks"] == s["num_blocks"] and all(b.ref_count == 0 for b in eng.blocks.blocks)
    assert all(eng.blocks.blocks[b].hash == h for h, b in eng.blocks.hash_to_block.items())


def test_speculative_sampling_keeps_the_distribution():
    """Rejection sampling against prompt-lookup drafts: the second generated token's distribution over
    a tiny vocabulary matches plain sampling's (600 seeded requests each)."""
    torch.manual_seed(2)
    m = Transformer(ModelConfig(vocab_size=8, context_length=32, d_model=16, n_layers=1, n_heads=2, d_ff=32)).eval()
    prompt = [1, 2, 3, 1, 2, 3, 1, 2]

    def second_tokens(spec: bool) -> torch.Tensor:
        cfg = EngineConfig(block_size=4, max_num_seqs=64, speculative="ngram" if spec else "none",
                           speculative_sampling=spec, num_speculative_tokens=2)
        eng = LLMEngine(m, None, cfg)
        outs = eng.generate([prompt] * 600, [SamplingParams(max_tokens=3, seed=s) for s in range(600)])
        if spec:
            assert eng.stats()["spec_proposed"] > 0 and eng.stats()["spec_accepted"] > 0
        return torch.bincount(torch.tensor([o.token_ids[1] for o in outs]), minlength=8).float() / 600

    plain, spec = second_tokens(False), second_tokens(True)
    assert 0.5 * (plain - spec).abs().sum() < 0.1, (plain, spec)


def test_warmup_leaves_no_trace(model):
    """``warmup`` runs many throwaway requests (graphs emulated on the CPU); afterwards every block is
    free, no prefix is cached, the counters read as before, and outputs equal a fresh engine's."""
    cfg = EngineConfig(block_size=4, num_blocks=40, max_num_seqs=4, max_num_batched_tokens=32, decode_steps=4)
    eng = LLMEngine(model, ByteTokenizer(), cfg)
    eng.runner.graph_max = 4  # emulated CUDA graphs: the multi-step path runs too
    eng.runner.capture()
    before = eng.stats()
    assert eng.warmup() > 0
    assert eng.stats() == before
    assert not eng.blocks.hash_to_block  # the warm-up's prefixes are forgotten
    prompts = _prompts(6)
    params = SamplingParams(max_tokens=9, temperature=0)
    got = [o.token_ids for o in eng.generate(prompts, params)]
    assert got == [uncached_greedy(model, p, 9) for p in prompts]
    assert [o.request_id for o in eng.generate([[1, 2]], params)] == ["6"]  # request ids carry on as before
    eng.add_request([1, 2, 3], params)
    with pytest.raises(RuntimeError, match="idle engine"):
        eng.warmup()
