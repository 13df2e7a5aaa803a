"""`kiln bench serve-http`'s pieces: requests cut to the context, the direct-engine loop and the
streaming HTTP client (against the session's server), each counting tokens and latencies."""

from __future__ import annotations

import pytest

from kiln.bench.serve_http import Timings, chat_requests, chat_tokenizer, pct, run_direct, run_http


def test_chat_requests_are_cut_to_leave_room_for_the_reply():
    tok = chat_tokenizer(None)
    reqs = chat_requests("/nonexistent.jsonl", 6, tok, context=48, max_tokens=16)
    assert len(reqs) == 6
    assert all(len(ids) <= 32 for _, ids in reqs)
    assert max(len(ids) for _, ids in reqs) == 32  # the long built-in prompt was cut to fit exactly
    assert reqs[4][0] == reqs[0][0]  # cycled


def test_percentiles_nearest_rank():
    assert pct([], 0.5) is None
    assert pct([0.001 * i for i in range(1, 101)], 0.99) == pytest.approx(99.0)
    assert pct([0.002, 0.001], 0.5) == pytest.approx(1.0)


def test_direct_loop_counts_every_token():
    import torch

    from kiln.generate import LLMEngine
    from kiln.model import ModelConfig, Transformer

    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=264, context_length=64, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    engine = LLMEngine(model.eval(), tokenizer=chat_tokenizer(None))
    t = run_direct(engine, [[1, 2, 3]] * 5, c=2, max_tokens=4)
    assert t.tokens == 20 and len(t.ttft) == 5 and len(t.itl) == 15 and t.seconds > 0
    assert engine.stats()["used_blocks"] == 0


def test_http_client_counts_tokens_and_gaps(server):
    tok = chat_tokenizer(None)
    reqs = chat_requests("/nonexistent.jsonl", 4, tok, context=128, max_tokens=5)
    t: Timings = run_http(server.url, "kiln-chat-tiny", reqs, c=2, max_tokens=5, procs=1)
    assert t.errors == 0 and t.tokens == 20  # ignore_eos: exactly max_tokens each, counted from usage
    # one gap per chunk after the first; a chunk holds every token of a step (more when the loop lags)
    assert len(t.ttft) == 4 and 1 <= len(t.itl) <= 16 and t.seconds > 0 and t.client_cpu_s > 0


def test_process_cpu_counts_this_process():
    import os
    import time

    from kiln.bench.serve_http import HttpRow, format_table, process_cpu_s

    a = process_cpu_s(os.getpid())
    t0 = time.process_time()
    while time.process_time() - t0 < 0.1:
        pass
    b = process_cpu_s(os.getpid())
    assert a is not None and b - a >= 0.05
    assert process_cpu_s(2**22 + 7) is None  # no such process
    table = format_table([HttpRow("kiln http", 4, 8, 100.0, server_cpu_us=123.4, engine_thread_cpu_us=45.6)])
    assert "| kiln http | 4 | 8 | 100.0 |" in table and "| 123 | 46 |" in table


def test_thread_cpu_counts_the_named_thread_only():
    import os
    import threading
    import time

    from kiln.bench.serve_http import process_cpu_s
    from kiln.serve.worker import _name_os_thread

    def spin() -> None:
        _name_os_thread("kiln-test-spin")
        t0 = time.thread_time()
        while time.thread_time() - t0 < 0.2:
            pass

    before = process_cpu_s(os.getpid(), "kiln-test-spin")
    t = threading.Thread(target=spin)
    t.start()
    t.join()  # a finished thread leaves /proc/PID/task: measure one that is still alive instead
    assert before == 0.0

    done = threading.Event()

    def spin_then_wait() -> None:
        spin()
        done.wait(10)

    t = threading.Thread(target=spin_then_wait)
    t.start()
    try:
        deadline = time.monotonic() + 10
        while (process_cpu_s(os.getpid(), "kiln-test-spin") or 0) < 0.15 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert 0.15 <= process_cpu_s(os.getpid(), "kiln-test-spin") < 1.0  # its 0.2 s, not the process's
    finally:
        done.set()
        t.join()
