"""The engine's sampler (``sampling.sample_tokens``): its draws follow softmax(logits / T) restricted
to the top-k / top-p sets, over seeds and over positions, with no correlation between neighbouring
positions or seeds; a row's draw depends on its own (logits, settings, seed, position) only; and
through the engine a seeded request gets the same tokens alone or in a mixed batch, with 1 or 4
decode steps per (emulated) CUDA graph, on the general path, and under speculative sampling."""

from __future__ import annotations

import pytest
import torch

from kiln.generate import EngineConfig, LLMEngine, SamplingParams, filter_logits
from kiln.generate.sampling import (
    draw_tokens,
    row_keys,
    row_sampling,
    sample_tokens,
    sampling_mode,
)
from kiln.model import ModelConfig, Transformer

# chi-square critical values at p = 1e-4 (scipy.stats.chi2.isf(1e-4, df)): a correct sampler fails
# one of these checks about once in 10,000 runs of each (and the draws are deterministic anyway)
CHI2_CRIT = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 15: 44.3}


def _rows(n: int, temperature: float, top_k: int = 0, top_p: float = 1.0, seed=None, position=None):
    seed = torch.arange(n) if seed is None else seed
    position = torch.full((n,), 7) if position is None else position
    return (torch.full((n,), temperature), torch.full((n,), top_k, dtype=torch.long), torch.full((n,), top_p),
            seed, position)


def _chi2(draws: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's statistic of ``draws`` against ``probs`` over the cells with probability > 0
    (a draw in a zero-probability cell fails at once)."""
    counts = torch.bincount(draws, minlength=probs.numel()).double()
    assert counts[probs == 0].sum() == 0, "drew a token the filters exclude"
    n, live = counts.sum(), probs > 0
    want = n * probs[live]
    return float(((counts[live] - want) ** 2 / want).sum())


LOGITS = torch.tensor([1.0, -0.5, 2.0, 0.3, 0.0, -2.0])


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 1.0), (1.6, 3, 1.0),
                                                     (1.0, 0, 0.8), (0.8, 4, 0.9)])
def test_draws_follow_the_filtered_tempered_distribution(temperature, top_k, top_p):
    n = 30_000
    want = torch.softmax(filter_logits(LOGITS.double() / temperature, top_k or None, top_p), -1)
    live = int((want > 0).sum())
    over_seeds = sample_tokens(LOGITS.expand(n, 6), *_rows(n, temperature, top_k, top_p))
    one_seed = sample_tokens(LOGITS.expand(n, 6), *_rows(n, temperature, top_k, top_p, seed=torch.full((n,), 12345),
                                                          position=torch.arange(n)))
    for draws in (over_seeds, one_seed):
        assert _chi2(draws, want) < CHI2_CRIT[live - 1], (temperature, top_k, top_p)


def test_neighbouring_positions_and_seeds_are_independent():
    """Joint frequencies of (token at t, token at t + 1) for one seed, and of seeds s, s + 1 at one
    position (GRPO's groups use consecutive seeds), match the product of the marginals."""
    logits = torch.tensor([0.5, 0.0, -0.3, 0.2])
    p = torch.softmax(logits.double(), -1)
    joint = (p[:, None] * p[None, :]).flatten()  # (16,)
    n = 20_001
    by_pos = sample_tokens(logits.expand(n, 4), *_rows(n, 1.0, seed=torch.full((n,), 3), position=torch.arange(n)))
    by_seed = sample_tokens(logits.expand(n, 4), *_rows(n, 1.0, seed=torch.arange(n) + 2**40))
    for d in (by_pos, by_seed):
        pairs = d[:-1:2] * 4 + d[1::2]  # disjoint pairs (t, t + 1)
        assert _chi2(pairs, joint) < CHI2_CRIT[15]


def test_a_rows_draw_ignores_the_batch_and_the_variant():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(7, 300, generator=g)
    temp = torch.tensor([0.0, 0.7, 1.0, 1.3, 0.9, 1.0, 0.5])
    top_k = torch.tensor([0, 0, 40, 0, 1, 5, 0])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.9, 1.0, 0.5, 1.0])
    seed, pos = torch.tensor([5, -3, 2**62, 11, 12, 13, 14]), torch.tensor([0, 9, 9, 100, 3, 4, 2**31 + 5])
    batch = sample_tokens(logits, temp, top_k, top_p, seed, pos)
    alone = [int(sample_tokens(logits[i:i + 1], temp[i:i + 1], top_k[i:i + 1], top_p[i:i + 1], seed[i:i + 1],
                               pos[i:i + 1])) for i in range(7)]
    assert batch.tolist() == alone
    assert batch[0] == logits[0].argmax() and batch[4] == logits[4].argmax()  # greedy; top-k 1 is greedy
    i = torch.tensor([0, 1, 6])  # rows without filters: the variant without thresholds
    assert sample_tokens(logits[i], temp[i], top_k[i], top_p[i], seed[i], pos[i], filtered=False).tolist() == \
        batch[i].tolist()
    i = torch.tensor([0, 1, 2, 4, 5, 6])  # rows with top-k <= 64 (or no filter): 64 candidates, not a sort
    assert sample_tokens(logits[i], temp[i], top_k[i], top_p[i], seed[i], pos[i], candidates=64).tolist() == \
        batch[i].tolist()
    allowed = torch.isfinite(filter_logits(logits[5] / 0.5 * 0.5, 5, 0.5))
    assert allowed[batch[5]]
    # the keys see every bit of the seed and the position
    k = row_keys(torch.tensor([1, 1 + 2**40, 1, 1]), torch.tensor([0, 0, 1, 2**31]))
    assert len(set(k.tolist())) == 4


def test_host_rows_and_modes():
    p = SamplingParams(temperature=0.7, top_p=0.95, seed=-1)
    r = row_sampling(p, 2**64 + 5, 3)
    assert r == (0.7, 0, 0.95, 5, 3) and row_sampling(p, -1, 0)[3] == -1 and row_sampling(p, 2**63, 0)[3] == -2**63
    greedy = row_sampling(SamplingParams(temperature=0, top_k=3), 0, 0)
    plain = row_sampling(SamplingParams(temperature=1.0), 0, 0)
    assert sampling_mode([greedy]) == "greedy" and sampling_mode([greedy, plain]) == "sample"
    assert sampling_mode([plain, r]) == "sort"  # top-p without top-k: the nucleus may be anywhere
    top = [row_sampling(SamplingParams(temperature=1.0, top_k=k, top_p=0.9), 0, 0) for k in (50, 64, 500, 1025)]
    assert [sampling_mode([plain, greedy, t]) for t in top] == ["top64", "top64", "top1024", "sort"]
    logits = torch.randn(3, 20)
    assert torch.equal(draw_tokens(logits, [greedy] * 3), logits.argmax(-1))


# -- through the engine --------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


def _engine(model, graphs: bool, decode_steps: int = 4, **kw) -> tuple[LLMEngine, list[int]]:
    """An engine (graphs: the CUDA-graph path emulated on the CPU) and the ``steps`` of its graph calls."""
    eng = LLMEngine(model, None, EngineConfig(block_size=4, max_num_seqs=6, decode_steps=decode_steps, **kw))
    calls: list[int] = []
    if graphs:
        eng.runner.graph_max = 8
        inner = eng.runner.decode
        eng.runner.decode = lambda seqs, steps=1, *rest: calls.append(steps) or inner(seqs, steps, *rest)
    return eng, calls


SEEDED = SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, seed=77, ignore_eos=True)
PROMPT = [5, 6, 7, 8]


def test_seeded_request_same_alone_batched_single_and_multi_step(model):
    crowd_prompts = [[9] * 20, PROMPT, [1, 2], [3] * 7, [4, 4, 4]]
    crowd = [SamplingParams(max_tokens=9, temperature=0),
             SEEDED,
             SamplingParams(max_tokens=11, temperature=1.2, seed=5),
             SamplingParams(max_tokens=20, temperature=0.5, top_k=3, seed=6, ignore_eos=True),
             SamplingParams(max_tokens=26, temperature=0.8, seed=8, ignore_eos=True)]
    got = {}
    for name, graphs, k in (("general", False, 4), ("graph1", True, 1), ("graph4", True, 4)):
        eng, calls = _engine(model, graphs, k)
        alone = eng.generate([PROMPT], SEEDED)[0].token_ids
        batched = eng.generate(crowd_prompts, crowd)
        got[name] = (alone, [o.token_ids for o in batched])
        if name == "graph4":  # sampled requests ran four steps per graph, in each variant
            assert {(4, "sort"), (4, "top64"), (4, "sample")} <= {key[1:] for key in eng.runner.sampled_graphs}
        if name == "graph1":
            assert calls and set(calls) == {1}
    assert got["general"] == got["graph1"] == got["graph4"]
    alone, batched = got["general"]
    assert batched[1] == alone and len(alone) == 14
    other = LLMEngine(model).generate([PROMPT], SamplingParams(max_tokens=14, temperature=0.9, top_p=0.9, seed=78,
                                                              ignore_eos=True))[0].token_ids
    assert other != alone  # the seed matters
    greedy = LLMEngine(model).generate([crowd_prompts[0]], crowd[0])[0].token_ids
    assert batched[0] == greedy  # a greedy request in a sampled batch stays greedy


def test_top_k_one_is_greedy_and_unseeded_requests_differ(model):
    eng, calls = _engine(model, True)
    prompts = [PROMPT, [1, 2, 3]]
    top1 = eng.generate(prompts, SamplingParams(max_tokens=10, temperature=1.5, top_k=1, ignore_eos=True))
    greedy = eng.generate(prompts, SamplingParams(max_tokens=10, temperature=0, ignore_eos=True))
    assert [o.token_ids for o in top1] == [o.token_ids for o in greedy] and 4 in calls
    eng.runner.capture(("sample",))  # up front, as a server or a benchmark may: every size, 1 and 4 steps
    assert {(b, k) for b, k, m in eng.runner.sampled_graphs if m == "sample"} == {(b, k) for b in (1, 2, 4, 8)
                                                                                  for k in (1, 4)}
    free = eng.generate([PROMPT, PROMPT], SamplingParams(max_tokens=10, temperature=1.0, ignore_eos=True))
    assert free[0].token_ids != free[1].token_ids  # each unseeded request drew its own seed


def test_speculative_sampling_draws_the_plain_tokens():
    """A draft is kept when it equals the sampler's draw at its position: with the same seeds the
    tokens are plain sampling's, whatever the drafts were (prompt lookup over a vocabulary of 8, so
    drafts come often and are sometimes right)."""
    torch.manual_seed(2)
    m = Transformer(ModelConfig(vocab_size=8, context_length=32, d_model=16, n_layers=1, n_heads=2, d_ff=32)).eval()
    prompts = [[1, 2, 3, 1, 2, 3, 1, 2]] * 8
    params = [SamplingParams(max_tokens=10, temperature=0.8, seed=s, ignore_eos=True) for s in range(8)]
    plain = [o.token_ids for o in LLMEngine(m).generate(prompts, params)]
    spec = LLMEngine(m, None, EngineConfig(speculative="ngram", speculative_sampling=True, num_speculative_tokens=3))
    assert [o.token_ids for o in spec.generate(prompts, params)] == plain
    s = spec.stats()
    assert 0 < s["spec_accepted"] < s["spec_proposed"]
