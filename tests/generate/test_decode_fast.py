"""The lean decode step and multi-step decode (``ModelRunner.decode``), through the CUDA-graph path
emulated on the CPU (the same static buffers and graph body, run eagerly): greedy output token for
token equal to single-step decoding and to the general path, with stops and max_tokens hitting inside
a multi-step block and requests joining mid-run; sampled requests unchanged; quantized models too."""

from __future__ import annotations

import copy

import pytest
import torch

from kiln.generate import EngineConfig, LLMEngine, SamplingParams
from kiln.model import ModelConfig, Transformer, quantize_model

CFG = ModelConfig(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
EOT = 256


class ByteTokenizer:
    eot_id = EOT
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return b"".join(bytes([i]) if i < 256 else b"<|endoftext|>" for i in ids).decode("utf-8", errors="replace")


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def _engine(model, graphs: bool, decode_steps: int = 8, **kw) -> LLMEngine:
    eng = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=4, max_num_seqs=6, decode_steps=decode_steps, **kw))
    if graphs:
        eng.runner.graph_max = 8  # what a CUDA engine gets; on the CPU the graph body runs eagerly
    return eng


def _spy(eng: LLMEngine) -> list[int]:
    """Record the ``steps`` of every ``ModelRunner.decode`` call."""
    calls: list[int] = []
    inner = eng.runner.decode

    def decode(seqs, steps=1, *rest):
        calls.append(steps)
        return inner(seqs, steps, *rest)

    eng.runner.decode = decode
    return calls


def _run(eng: LLMEngine, arrivals: dict[int, list[tuple[list[int], SamplingParams]]], check_rows: bool = False):
    """Add ``arrivals[step]`` before each step; returns per request (tokens, text, finish, streamed text)."""
    final, streamed, step = {}, {}, 0
    while step <= max(arrivals) or eng.has_unfinished():
        for prompt, params in arrivals.get(step, []):
            eng.add_request(prompt, params, f"r{len(streamed)}")
            streamed[f"r{len(streamed)}"] = ""
        for out in eng.step():
            streamed[out.request_id] += out.new_text
            if out.finished:
                final[out.request_id] = out
        if check_rows and eng.runner._s:
            _check_host_rows(eng)
        step += 1
    return {r: (o.token_ids, o.text, o.finish_reason, streamed[r]) for r, o in final.items()}


def _check_host_rows(eng: LLMEngine) -> None:
    """The pinned rows hold the running sequences' block tables; rows past them the scratch state."""
    r = eng.runner
    G, MB, scratch, np_ = r.graph_max, r.max_blocks_per_seq, r.cache.scratch_block, r._np
    tables = np_[4 * G:].reshape(G, MB)
    for i in range(r._rows_used, G):
        assert np_[2 * G + i] == scratch * r.block_size and np_[3 * G + i] == 1 and (tables[i] == scratch).all()
    for i in range(r._rows_used):
        t = r._row_tables[i]
        assert list(tables[i, :len(t)]) == t and (tables[i, len(t):] == scratch).all()


def test_multi_step_greedy_equals_single_step_with_stops_and_joins(model):
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (5, 17, 3, 30, 9, 12, 41)]
    base = {i: o for i, o in enumerate(_engine(model, False).generate(prompts, SamplingParams(max_tokens=20, temperature=0)))}
    greedy = dict(temperature=0)
    params = [
        SamplingParams(max_tokens=13, **greedy),  # max_tokens inside the second 8-step block
        SamplingParams(max_tokens=20, stop=(base[1].text[9:11],), **greedy),  # a stop string mid-block
        SamplingParams(max_tokens=20, stop_token_ids=(base[2].token_ids[5],), **greedy),
        SamplingParams(max_tokens=3, **greedy),
        SamplingParams(max_tokens=20, **greedy),
        SamplingParams(max_tokens=1, **greedy),
        SamplingParams(max_tokens=30, **greedy),  # 41 + 30 > context 64: finishes at the context's end
    ]
    arrivals = {0: [(prompts[0], params[0]), (prompts[1], params[1])], 2: [(prompts[2], params[2])],
                5: [(prompts[3], params[3]), (prompts[4], params[4])], 9: [(prompts[5], params[5]), (prompts[6], params[6])]}
    multi = _engine(model, True)
    calls = _spy(multi)
    got = _run(multi, arrivals, check_rows=True)
    single = _engine(model, True, decode_steps=1)
    single_calls = _spy(single)
    want = _run(single, arrivals)
    general = _run(_engine(model, False), arrivals)
    assert got == want == general
    assert 8 in calls and 1 in calls and set(single_calls) == {1}  # both paths really ran
    assert got["r1"][2] == "stop" and got["r2"][2] == "stop" and got["r0"][2] == "length" and len(got["r0"][0]) == 13
    assert got["r6"][2] == "length" and len(got["r6"][0]) == 64 - 41 + 1
    s = multi.stats()
    assert s["free_blocks"] == s["num_blocks"] and s["running"] == 0
    assert s["lean_steps"] == len(calls)  # each lean step is one graph launch
    assert 0 < s["lean_steps"] < s["steps"] and s["step_seconds"] > 0  # prefills took the general path
    assert 0 < s["general_seconds"] < s["step_seconds"]
    # every prompt went through a general step; a chunk of one token is a decode row, not a prefill
    assert sum(len(p) for p in prompts) - len(prompts) <= s["prefill_tokens"] <= sum(len(p) for p in prompts)
    assert _engine(model, False).stats()["steps"] == 0


def test_multi_step_under_preemption_and_prefix_sharing(model):
    """A pool too small for everyone: multi-step rounds fall back to the general step when blocks run
    short (it preempts), and the output still equals the general path's, every block freed."""
    g = torch.Generator().manual_seed(5)
    shared = torch.randint(0, 256, (12,), generator=g).tolist()
    prompts = [(shared if i % 2 else []) + torch.randint(0, 256, (3 + 5 * i,), generator=g).tolist() for i in range(6)]
    params = SamplingParams(max_tokens=18, temperature=0, ignore_eos=True)
    eng = _engine(model, True, num_blocks=22)
    calls = _spy(eng)
    got = [o.token_ids for o in eng.generate(prompts, params)]
    want = [o.token_ids for o in _engine(model, False, num_blocks=22).generate(prompts, params)]
    s = eng.stats()
    assert got == want and 8 in calls
    assert s["preemptions"] > 0 and s["prefix_cache_hits"] > 0 and s["free_blocks"] == s["num_blocks"]


def test_lean_step_samples_and_logprobs_like_the_general_path(model):
    """Sampled (seeded) and log-prob requests mixed with greedy ones go through the one-step graph
    (sampling outside it) and give the general path's tokens."""
    prompts = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9], [42] * 6]
    params = [SamplingParams(max_tokens=9, temperature=0.8, top_k=40, seed=3),
              SamplingParams(max_tokens=12, temperature=0),
              SamplingParams(max_tokens=7, temperature=0, logprobs=2)]
    eng = _engine(model, True)
    calls = _spy(eng)
    got = eng.generate(prompts, params)
    want = _engine(model, False).generate(prompts, params)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    assert got[2].logprobs[3].keys() == want[2].logprobs[3].keys()
    assert all(abs(got[2].logprobs[3][t] - want[2].logprobs[3][t]) < 1e-5 for t in got[2].logprobs[3])
    assert 1 in calls and 8 in calls  # one-step while the sampled request runs, then multi-step


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_model_multi_step_equals_its_eager_self(model, mode):
    qm = quantize_model(copy.deepcopy(model), mode)
    prompts = [[3, 1, 4, 1, 5], list(range(100, 120))]
    with torch.no_grad():
        eager = []
        for p in prompts:
            ids = torch.tensor([p])
            for _ in range(11):
                ids = torch.cat([ids, qm(ids)[:, -1].argmax(-1, keepdim=True)], 1)
            eager.append(ids[0, len(p):].tolist())
    eng = _engine(qm, True, decode_steps=4)
    calls = _spy(eng)
    outs = eng.generate(prompts, SamplingParams(max_tokens=11, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in outs] == eager and 4 in calls


def _trace_compiles(monkeypatch) -> list:
    """Make ``torch.compile`` trace through a recording backend (no C++ compiler needed): the list
    fills with one graph per trace."""
    real_compile, traced = torch.compile, []

    def backend(gm, inputs):
        traced.append(gm)
        return gm

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=backend, dynamic=kw.get("dynamic")))
    torch._dynamo.reset()
    return traced


def test_compiled_multi_step_traces_once_and_equals_eager(model, monkeypatch):
    """``compile_decode`` over the multi-step graph body (torch.compile's tracing, with the aot_eager
    backend: no C++ compiler needed): the same tokens as eager, and no recompilation once each batch
    size has been traced, however many steps and sequences follow."""
    traced = _trace_compiles(monkeypatch)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    eng = _engine(model, True, decode_steps=4, compile_decode=True)
    eng.runner.graph_max = 2
    first = [o.token_ids for o in eng.generate(prompts, params)]  # the 2-row graphs
    later = [[9, 9], [4, 5, 6, 7, 8]]
    plist = [params, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)]  # then the 1-row graphs
    again = [o.token_ids for o in eng.generate(later, plist)]
    n_traced = len(traced)  # each size traced once (emulated graphs trace at first use, not at capture)
    assert [o.token_ids for o in eng.generate(later, plist)] == again and len(traced) == n_traced > 0
    torch._dynamo.reset()
    general = _engine(model, False)
    assert first == [o.token_ids for o in general.generate(prompts, params)]
    assert again == [o.token_ids for o in general.generate(later, plist)]



def test_compiled_step_traces_every_captured_size_past_the_recompile_limit(model, monkeypatch):
    """An engine with more than eight captured batch sizes (dynamo's default recompile limit) still
    compiles its step at every size, none silently left eager."""
    from kiln.generate.model_runner import graph_batch_sizes

    traced = _trace_compiles(monkeypatch)
    eng = LLMEngine(model, ByteTokenizer(), EngineConfig(block_size=4, max_num_seqs=80, decode_steps=1,
                                                         compile_decode=True))
    runner = eng.runner
    runner.graph_max = 80
    sizes = graph_batch_sizes(80)
    assert len(sizes) > 8
    runner.capture()
    counts = []
    with torch.inference_mode():
        for b in sizes:  # padded rows only (the scratch state): a valid step at every size
            runner._launch(b, 1)
            counts.append(len(traced))
    per_size = counts[0]  # graphs one size traces (on the CPU the eager attention splits the step)
    assert per_size > 0 and counts == [per_size * (i + 1) for i in range(len(sizes))]  # the ninth too
    torch._dynamo.reset()


def test_multi_step_with_sliding_context_equals_the_general_path(model):
    """``context_overflow='slide'`` (the one-call helpers'): near the context's end the rounds drop to
    one step, the slide re-encodes, and multi-step resumes; tokens equal the general path's."""
    prompts = [[1] * 50, [2, 3] * 10, [7]]
    params = SamplingParams(max_tokens=70, temperature=0, ignore_eos=True)
    outs = []
    for graphs in (False, True):
        eng = LLMEngine(model, None, EngineConfig(block_size=4, max_num_seqs=3, context_overflow="slide"))
        if graphs:
            eng.runner.graph_max = 4
            calls = _spy(eng)
        outs.append([o.token_ids for o in eng.generate(prompts, params)])
    assert outs[0] == outs[1] and all(len(t) == 70 for t in outs[1]) and {1, 8} <= set(calls)


def test_admission_wait_batches_arrivals_and_keeps_greedy_output(model):
    """``admission_wait_ms``: arrivals spread over a few steps, while others decode on the lean path, are
    admitted by fewer general steps; greedy output is unchanged and no request waits past the limit."""
    g = torch.Generator().manual_seed(9)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (6, 11, 4, 9, 7)]
    p = SamplingParams(max_tokens=40, temperature=0)
    arrivals = {0: [(prompts[0], p), (prompts[1], p)], 3: [(prompts[2], p)], 4: [(prompts[3], p)],
                5: [(prompts[4], p)]}

    def run(wait_ms: float):
        eng = _engine(model, True, admission_wait_ms=wait_ms)
        tick, first = [0], {}
        eng.clock = lambda: tick[0] * 1e-3  # one millisecond a step
        inner = eng.step

        def step():
            outs = inner()
            for o in outs:
                first.setdefault(o.request_id, tick[0])
            tick[0] += 1
            return outs

        eng.step = step
        got = _run(eng, arrivals)
        s = eng.stats()
        return got, s["steps"] - s["lean_steps"], first

    now, general_now, _ = run(0.0)
    waited, general_waited, first = run(3.0)
    assert waited == now  # same tokens, text and finish reasons
    assert general_waited < general_now
    assert first["r2"] <= 3 + 3 + 1 and first["r4"] <= 5 + 3 + 1  # admitted within the wait (+ its step)
    with pytest.raises(ValueError, match="admission_wait_ms"):
        EngineConfig(admission_wait_ms=-1)


def test_mixed_steps_prefill_beside_the_lean_decode_with_the_same_tokens(model):
    """``mixed_steps``: requests arriving (and long prompts chunked over several steps) while others
    decode are prefilled beside a multi-step decode round, not in general steps; the tokens, texts and
    finish reasons equal the engine's without it and the general path's, greedy and seeded sampling,
    under a token budget that chunks prompts, and with prefix sharing."""
    g = torch.Generator().manual_seed(11)
    shared = torch.randint(0, 256, (9,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 256, (n,), generator=g).tolist() for n in (2, 30, 5, 14, 3, 20)]
    greedy = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=17, temperature=0.9, top_p=0.9, seed=4)
    arrivals = {0: [(prompts[0], greedy)], 1: [(prompts[1], sampled)], 3: [(prompts[2], greedy)],
                4: [(prompts[3], greedy), (prompts[4], sampled)], 6: [(prompts[5], greedy)]}

    def run(graphs: bool, mixed: bool):
        eng = _engine(model, graphs, mixed_steps=mixed, max_num_batched_tokens=16)  # 16: prompts chunk
        calls = _spy(eng)
        return _run(eng, arrivals), eng.stats(), calls

    got, s, calls = run(True, True)
    without, s0, _ = run(True, False)
    general, _, _ = run(False, True)  # without graphs nothing is mixed
    assert got == without == general
    assert s["mixed_steps"] > 0 and s["mixed_seconds"] > 0 and s0["mixed_steps"] == 0
    general_steps = s["steps"] - s["lean_steps"] - s["mixed_steps"]
    assert general_steps < s0["steps"] - s0["lean_steps"]  # arrivals no longer each cost a general step
    assert s["prefix_cache_hits"] > 0 and s["prefill_tokens"] >= s0["prefill_tokens"] - len(prompts)
    assert s["free_blocks"] == s["num_blocks"] and 8 in calls


def test_mixed_steps_under_block_pressure_fall_back_and_free_everything(model):
    """A pool too small for everyone: a mixed step never preempts (the general step does, when the
    decoders' blocks run short); output equals the general path's and every block comes back."""
    g = torch.Generator().manual_seed(6)
    p = [torch.randint(0, 256, (4 + 5 * i,), generator=g).tolist() for i in range(6)]
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True)
    arrivals = {0: [(p[0], params), (p[1], params), (p[2], params)], 2: [(p[3], params)], 3: [(p[4], params)],
                4: [(p[5], params)]}  # arrivals while the decoders' next round does not fit the free blocks
    eng = _engine(model, True, num_blocks=16, mixed_steps=True)
    got = _run(eng, arrivals)
    want = _run(_engine(model, False, num_blocks=16), arrivals)
    s = eng.stats()
    assert got == want and s["mixed_steps"] > 0 and s["preemptions"] > 0
    assert s["free_blocks"] == s["num_blocks"] and s["running"] == s["waiting"] == 0


def test_prefill_kernel_engine_equals_the_pytorch_paths(model):
    """The engine with its prefill steps through Kiln's Triton prefill kernel (the CUDA default; here
    under the interpreter): the same tokens as the PyTorch paths, with chunked prompts, prefix hits,
    decodes beside chunks and mixed steps."""
    g = torch.Generator().manual_seed(12)
    shared = torch.randint(0, 256, (10,), generator=g).tolist()
    prompts = [shared + torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 25, 7)]
    p = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    arrivals = {0: [(prompts[0], p)], 2: [(prompts[1], p)], 3: [(prompts[2], p)]}
    want = _run(_engine(model, False, max_num_batched_tokens=12), arrivals)
    eng = _engine(model, True, max_num_batched_tokens=12, mixed_steps=True)
    eng.runner.prefill_kernel = True
    calls = []
    import kiln.kernels.paged_attention as pa

    inner = pa.paged_prefill_attention

    def spy(*a, **kw):
        calls.append(a[-1])  # the step's query tiles
        return inner(*a, **kw)

    pa.paged_prefill_attention = spy
    try:
        got = _run(eng, arrivals)
    finally:
        pa.paged_prefill_attention = inner
    assert got == want and calls and eng.stats()["prefix_cache_hits"] > 0
    assert len({id(t) for t in calls}) * CFG.n_layers == len(calls)  # tiles built once a step, not a layer
    assert not LLMEngine(model, None, EngineConfig(prefill_kernel=True)).runner.prefill_kernel  # CPU: PyTorch paths
    assert EngineConfig().prefill_kernel  # the default since the H100 run (docs/benchmarks.md)


def test_prefill_kernel_step_writes_the_same_cache(model):
    """A prompt step on the prefill kernel's path (RoPE by ``rope_qk``, under the interpreter here) leaves the same rotated keys and values in the pool as the PyTorch path. The
    greedy-token test above cannot see a RoPE offset shared by a step's q and k (attention within the
    step is unchanged by it); the keys that later decode steps read can."""
    prompts = [[5, 17, 200, 3, 9, 41, 7], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
    pools = []
    for fast in (False, True):
        eng = _engine(model, False)
        eng.runner.prefill_kernel = fast
        for ids in prompts:
            eng.add_request(ids, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
        eng.step()  # the prompts' step
        pools.append(eng.runner.cache)
    plain, fast = pools
    assert plain.k[0].abs().sum() > 0  # the step wrote something to compare
    for layer in range(CFG.n_layers):
        torch.testing.assert_close(fast.k[layer], plain.k[layer], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.v[layer], plain.v[layer], rtol=1e-5, atol=1e-6)
