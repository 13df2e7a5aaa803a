"""Logits processing before the draw (``kiln.generate.processors``): logit bias, min-tokens bans,
repetition / frequency / presence penalties and min-p, each against a plain per-token reference of
its published definition; and through the engine, every path (general, emulated CUDA graphs of one
and four steps, a tiny slot table that evicts, a tiny block pool that preempts, speculation beside)
token for token equal to uncached generation with the reference processing."""

from __future__ import annotations

import math

import pytest
import torch

from kiln.generate import EngineConfig, LLMEngine, SamplingParams
from kiln.generate.processors import MAX_BANNED, ProcessorTable, ProcRow, ProcTensors, process_logits
from kiln.generate.sampling import row_sampling, sample_tokens, sample_with_uniform
from kiln.generate.sequence import Sequence
from kiln.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=97, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
EOS = 3


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    model = Transformer(CFG).eval()
    with torch.no_grad():  # logits spread over several nats, as a trained model's: min-p and penalties then bite
        model.lm_head.weight.mul_(12.0)
    return model


def reference_process(logits: list[float], prompt: list[int], output: list[int], p: SamplingParams,
                      eos: int | None) -> list[float]:
    """One row, token by token, from the definitions (the module docstring of ``processors``)."""
    out = list(logits)
    for t, b in p.logit_bias:
        out[t] += b
    if len(output) < p.min_tokens:
        for t in set(p.stop_token_ids) | ({eos} if eos is not None and not p.ignore_eos else set()):
            out[t] = -math.inf
    for t in set(prompt) | set(output):
        out[t] = out[t] / p.repetition_penalty if out[t] > 0 else out[t] * p.repetition_penalty
    for t in set(output):
        c = output.count(t)
        out[t] -= p.frequency_penalty * c + p.presence_penalty
    return out


def _seq(rid: str, prompt: list[int], output: list[int], params: SamplingParams) -> Sequence:
    seq = Sequence(rid, prompt, params, seed=1)
    seq.token_ids += output
    return seq


PARAMS = [
    SamplingParams(max_tokens=20, repetition_penalty=1.7),
    SamplingParams(max_tokens=20, frequency_penalty=1.5, presence_penalty=-0.5),
    SamplingParams(max_tokens=20, logit_bias={5: 3.0, 9: -100.0}, min_tokens=6, stop_token_ids=(7,)),
    SamplingParams(max_tokens=20, repetition_penalty=0.6, presence_penalty=2.0, logit_bias={11: 1.0}),
    SamplingParams(max_tokens=20),  # unprocessed: the dummy slot, logits unchanged
]


def test_process_logits_matches_the_definitions_row_by_row():
    g = torch.Generator().manual_seed(3)
    V = 40
    table = ProcessorTable(capacity=4, vocab_size=V, eos=EOS, device=torch.device("cpu"))
    prompts = [[1, 2, 2, 30], [4, 5], [6], [7, 8, 9, 9], [1]]
    outputs = [[2, 2, 5, 17], [5, 5, 5, 6, 0], [1, 2], [9, 12, 12], [3, 3]]
    seqs = [_seq(str(i), pr, out, p) for i, (pr, out, p) in enumerate(zip(prompts, outputs, PARAMS))]
    for step in (0, 3, 4):  # the bans of min_tokens=6 (2 tokens out): on at steps 0-3, off from step 4
        rows = table.rows(seqs)
        logits = torch.randn(len(seqs), V, generator=g) * 3
        got = process_logits(logits, table, table.tensors(rows), step)
        for i, seq in enumerate(seqs):
            if rows[i].slot == table.dummy:
                assert not seq.params.needs_history and torch.equal(got[i], logits[i])
                continue
            prefix_out = seq.output_token_ids
            want = reference_process(logits[i].tolist(), seq.prompt_token_ids, prefix_out, seq.params, EOS)
            if seq.params.min_tokens and step >= seq.params.min_tokens - len(seq.output_token_ids):
                want = reference_process(logits[i].tolist(), seq.prompt_token_ids, prefix_out,
                                         SamplingParams(**{**_fields(seq.params), "min_tokens": 0}), EOS)
            assert got[i].tolist() == pytest.approx(want, rel=1e-6, abs=1e-6), (i, step)


def _fields(p: SamplingParams) -> dict:
    return {f: getattr(p, f) for f in p.__dataclass_fields__}


def test_table_catches_up_with_eager_tokens_and_rebuilds_after_dropped_ones():
    V = 20
    table = ProcessorTable(capacity=2, vocab_size=V, eos=None, device=torch.device("cpu"))
    p = SamplingParams(max_tokens=20, frequency_penalty=1.0)
    seq = _seq("a", [1, 2], [4], p)
    (row,) = table.rows([seq])
    assert table.counts[row.slot].tolist() == torch.bincount(torch.tensor([4]), minlength=V).tolist()
    seq.token_ids += [5, 5]  # two eager steps appended tokens: counted on the next sync
    table.rows([seq])
    assert table.counts[row.slot, 5] == 2 and table.counts[row.slot].sum() == 3
    table.counts[row.slot, 6] += 3  # a 3-step graph counted 3 tokens of which the engine kept one
    table.counted([row], 3)
    seq.token_ids.append(6)
    table.rows([seq])
    assert table.counts[row.slot].tolist() == torch.bincount(torch.tensor([4, 5, 5, 6]), minlength=V).tolist()
    table.release("a")
    other = _seq("b", [3], [], SamplingParams(max_tokens=5, logit_bias={2: 1.0}))
    (row_b,) = table.rows([other])
    assert table.counts[row_b.slot].sum() == 0 and not table.prompt[row_b.slot, 1]  # a reused slot is refilled
    third = _seq("c", [7, 7], [8, 8, 9], p)
    table.rows([seq, third])  # a gets the free slot; c takes b's (b is not in this step)
    assert sorted(table._slot) == ["a", "c"]
    table.rows([_seq("d", [1], [2], p)])  # no free slot: the oldest holder outside the step (a) gives way
    assert sorted(table._slot) == ["c", "d"]
    (back,) = table.rows([seq])  # a returns: refilled from its prompt and tokens
    assert table.counts[back.slot].tolist() == torch.bincount(torch.tensor([4, 5, 5, 6]), minlength=V).tolist()
    assert table.prompt[back.slot, 1] and table.prompt[back.slot, 2] and not table.prompt[back.slot, 7]


def test_min_p_keeps_the_tokens_within_the_ratio_of_the_best():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 2
    temp = torch.tensor([0.7, 1.0, 1.3, 1.0, 0.9, 1.0])
    min_p = torch.tensor([0.05, 0.2, 0.5, 0.0, 1.0, 0.1])
    n = 400
    for r in range(6):
        probs = torch.softmax(logits[r] / temp[r], -1)
        allowed = probs >= min_p[r] * probs.max() * (1 - 1e-6)
        u = (torch.arange(n, dtype=torch.float64) + 0.5) / n
        rows = logits[r].expand(n, -1)
        toks = sample_with_uniform(rows, temp[r].expand(n), torch.zeros(n, dtype=torch.long), torch.ones(n), u,
                                   filtered=False, min_p=min_p[r].expand(n))
        assert allowed[toks].all()
        kept = probs * allowed  # inverse-CDF over the renormalized kept set: each kept token's share
        want = torch.round(kept / kept.sum() * n)
        got = torch.bincount(toks, minlength=50).double()
        assert (got - want).abs().max() <= 1, r
    assert int(min_p[4] == 1.0) and sample_with_uniform(logits[4:5], temp[4:5], torch.zeros(1, dtype=torch.long),
                                                        torch.ones(1), torch.tensor([0.99], dtype=torch.float64),
                                                        filtered=False, min_p=min_p[4:5]) == logits[4].argmax()


@torch.no_grad()
def reference_generate(model: Transformer, prompt: list[int], p: SamplingParams, seed: int) -> list[int]:
    """Uncached generation: the whole sequence through the model each token, the reference
    processing, then the engine's sampler at (seed, position) (argmax when greedy)."""
    ids, out = list(prompt), []
    while len(out) < p.max_tokens:
        logits = model(torch.tensor([ids]))[0, -1].float()
        proc = torch.tensor(reference_process(logits.tolist(), prompt, out, p, EOS))
        if p.temperature == 0:
            tok = int(proc.argmax())
        else:
            t, k, tp, s, pos = row_sampling(p, seed, len(ids))
            tok = int(sample_tokens(proc[None], torch.tensor([t]), torch.tensor([k]), torch.tensor([tp]),
                                    torch.tensor([s]), torch.tensor([pos]), min_p=torch.tensor([p.min_p]))[0])
        ids.append(tok)
        out.append(tok)
        if (tok == EOS and not p.ignore_eos) or tok in p.stop_token_ids:
            break
    return out


def _requests() -> tuple[list[list[int]], list[SamplingParams]]:
    prompts = [[5, 6, 7, 8, 5, 6], [9, 9, 9], [1, 2, 3, 4, 5, 6, 7], [20, 21], [30, 31, 32, 33], [40] * 5, [50, 51], [42] * 6]
    params = [
        SamplingParams(max_tokens=14, temperature=0, repetition_penalty=1.8),
        SamplingParams(max_tokens=12, temperature=0, frequency_penalty=2.0, presence_penalty=0.5),
        SamplingParams(max_tokens=11, temperature=0.9, seed=4, frequency_penalty=1.0, min_p=0.1, top_k=20),
        SamplingParams(max_tokens=9, temperature=0, logit_bias={EOS: 100.0}, min_tokens=5),
        SamplingParams(max_tokens=13, temperature=0),  # unprocessed, batched beside the others
        SamplingParams(max_tokens=10, temperature=1.1, seed=8, min_p=0.3, repetition_penalty=1.3, top_p=0.9),
        SamplingParams(max_tokens=10, temperature=0.8, seed=2),  # sampled, unprocessed
        SamplingParams(max_tokens=10, temperature=0, logit_bias={42: 50.0}),  # n-gram drafts would match
    ]
    return prompts, params


@pytest.mark.parametrize("path", ["general", "graph1", "graph4", "tiny-table", "tiny-pool", "speculative"])
def test_engine_processed_requests_match_uncached_reference(model, path):
    prompts, params = _requests()
    kw = {"max_num_seqs": 7, "block_size": 4, "decode_steps": 4 if path != "graph1" else 1, "eos_token_id": EOS}
    if path == "tiny-table":
        kw["max_num_seqs"] = 2  # two slots for six processed requests: slots freed and refilled
    if path == "tiny-pool":
        kw["num_blocks"] = 14  # preemption by recompute: a preempted request keeps its counts
    if path == "speculative":
        kw["speculative"] = "ngram"
    eng = LLMEngine(model, None, EngineConfig(**kw))
    if path.startswith("graph") or path in ("tiny-table", "tiny-pool"):
        eng.runner.graph_max = kw["max_num_seqs"] + 1  # the CUDA-graph path's buffers, run eagerly on the CPU
    outs = eng.generate(prompts, params)
    for prompt, p, o in zip(prompts, params, outs):
        assert o.token_ids == reference_generate(model, prompt, p, p.seed or 0), (path, p)
    assert eng.procs is not None and not eng.procs._slot  # every slot released
    if path.startswith("graph"):
        assert any(m.endswith("+proc") for _, _, m in eng.runner.sampled_graphs)


def test_bias_and_min_tokens_shape_the_output(model):
    eng = LLMEngine(model, None, EngineConfig(block_size=4, eos_token_id=EOS))
    forced = eng.generate([[1, 2]], SamplingParams(max_tokens=8, temperature=0.7, seed=1, logit_bias={42: 100.0}))
    assert forced[0].token_ids == [42] * 8
    late = eng.generate([[1, 2]], SamplingParams(max_tokens=12, temperature=0, logit_bias={EOS: 100.0}, min_tokens=5))
    assert late[0].token_ids[-1] == EOS and len(late[0].token_ids) == 6 and late[0].finish_reason == "stop"
    stop7 = eng.generate([[1, 2]], SamplingParams(max_tokens=12, temperature=0, logit_bias={7: 100.0}, min_tokens=3,
                                                  stop_token_ids=(7,), ignore_eos=True))
    assert stop7[0].token_ids[3] == 7 and len(stop7[0].token_ids) == 4 and EOS not in stop7[0].token_ids[:3]


def test_bad_processing_settings_are_refused_by_name(model):
    eng = LLMEngine(model, None, EngineConfig(block_size=4, eos_token_id=EOS))
    with pytest.raises(ValueError, match="logit_bias token id 97 is outside the vocabulary of 97"):
        eng.add_request([1], SamplingParams(logit_bias={97: 1.0}))
    with pytest.raises(ValueError, match="min_tokens bans"):
        eng.add_request([1], SamplingParams(max_tokens=5, min_tokens=1, stop_token_ids=tuple(range(10, 10 + MAX_BANNED))))
    for bad, msg in (({"presence_penalty": 2.5}, "presence_penalty"), ({"repetition_penalty": 0.0}, "repetition"),
                     ({"min_p": 1.5}, "min_p"), ({"logit_bias": {1: 101}}, "logit_bias"),
                     ({"max_tokens": 3, "min_tokens": 4}, "min_tokens")):
        with pytest.raises(ValueError, match=msg):
            SamplingParams(**bad)
    assert not eng.has_unfinished()


def test_dummy_rows_leave_logits_bitwise_unchanged():
    table = ProcessorTable(capacity=1, vocab_size=30, eos=EOS, device=torch.device("cpu"))
    logits = torch.randn(4, 30)
    rows = [ProcRow(table.dummy, 0.0, 0.0, 1.0, 0.0, 0)] * 4
    table.counts[table.dummy, 5] = 7  # what padded rows of a graph count there does not matter
    got = process_logits(logits, table, table.tensors(rows), 0)
    assert torch.equal(got, logits) and isinstance(table.tensors(rows), ProcTensors)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU (the CPU runs their body eagerly above)")
def test_engine_processed_requests_in_real_cuda_graphs_match_eager(model):
    """Captured graphs (a warm-up that must not count, replays that must) against the eager path."""
    gpu = Transformer(CFG).to("cuda").eval()
    gpu.load_state_dict(model.state_dict())
    prompts, params = _requests()
    got = {}
    for graphs in (False, True):
        eng = LLMEngine(gpu, None, EngineConfig(max_num_seqs=8, block_size=16, decode_steps=4, eos_token_id=EOS,
                                                cuda_graphs=graphs))
        got[graphs] = [o.token_ids for o in eng.generate(prompts, params)]
        if graphs:
            assert any(m.endswith("+proc") for _, _, m in eng.runner.sampled_graphs)
    assert got[True] == got[False]
