"""``RequestOutput.metrics``: when a finished request arrived, first ran, drew its first token and
ended, on the engine's clock; a request that waited behind another has the wait as its queue time;
one aborted before it ran has no first step or token; unfinished outputs carry none."""

from __future__ import annotations

import torch

from kiln.generate import EngineConfig, LLMEngine, SamplingParams
from kiln.model import ModelConfig, Transformer

CFG = ModelConfig(vocab_size=64, context_length=64, d_model=32, n_layers=1, n_heads=2, d_ff=64)


def test_phases_on_the_engine_clock():
    torch.manual_seed(0)
    eng = LLMEngine(Transformer(CFG).eval(), None, EngineConfig(block_size=4, max_num_seqs=1))
    ticks = iter(range(1000))
    eng.clock = lambda: float(next(ticks))  # every reading one second later than the last
    p = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True)
    first, second = eng.add_request([1, 2, 3], p), eng.add_request([4, 5], p)
    gone = eng.add_request([6], p)
    final = {}
    while eng.has_unfinished():
        for out in eng.step():
            assert (out.metrics is None) != out.finished  # only a finished output carries them
            if out.finished:
                final[out.request_id] = out.metrics
        if first in final and gone not in final:
            final[gone] = eng.abort(gone).metrics  # still waiting: never ran
    a, b, c = final[first], final[second], final[gone]
    for m in (a, b):
        assert m.arrival < m.first_scheduled < m.first_token < m.finished
        assert m.queue_time + m.prefill_time + m.decode_time == m.finished - m.arrival
    assert b.first_scheduled > a.finished  # max_num_seqs=1: the second ran after the first ended
    assert b.queue_time > a.queue_time
    assert c.first_scheduled is None and c.first_token is None and c.queue_time is None
    assert c.prefill_time is None and c.decode_time is None and c.finished > c.arrival
