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


def _gone(pid: int) -> bool:
    """The process has exited (absent, or a zombie waiting for its new parent to reap it)."""
    from pathlib import Path

    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_transformers_serve_without_its_packages_is_an_error_row_naming_the_module(tmp_path, monkeypatch):
    """As on a GPU machine whose carried openai lacked its httpx2 wheel: no server is started."""
    import argparse
    import sys

    import torch

    from kiln.bench.serve_http import server_rows, transformers_server

    monkeypatch.setitem(sys.modules, "openai", None)  # importing it raises ImportError
    args = argparse.Namespace(concurrency=[1, 4], max_tokens=4, client_procs=1, threads=0, min_requests=4, engine={})
    rows = server_rows(args, "transformers serve", lambda: transformers_server(args, tmp_path, torch.device("cpu")),
                       "m", [])
    assert len(rows) == 2 and all("cannot run here: importing openai" in r.error for r in rows)


def test_a_server_that_fails_to_start_is_an_error_row_and_leaves_no_process(tmp_path):
    """Two failures: a server that exits at once (after starting a child of its own) and one that never
    answers /health. Each becomes one error row per concurrency; nothing it started survives."""
    import argparse
    import re
    import sys
    import time

    from kiln.bench.serve_http import Server, _free_port, server_rows

    spawn = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
             "print('child', p.pid, flush=True); time.sleep({}); sys.exit(3)")
    args = argparse.Namespace(concurrency=[1, 4], max_tokens=4, client_procs=1, threads=0, min_requests=4)
    pids = []

    def start(hold_s: float, wait_s: float):
        def go() -> Server:
            port = _free_port()
            try:
                return Server([sys.executable, "-c", spawn.format(hold_s)], port, wait_s=wait_s)
            except RuntimeError as e:
                pids.extend(int(p) for p in re.findall(r"child (\d+)", str(e)))
                raise
        return go

    for hold_s, wait_s, words in ((0.3, 30.0, "exited with 3"), (60.0, 1.5, "did not answer /health")):
        t0 = time.monotonic()
        rows = server_rows(args, "transformers serve", start(hold_s, wait_s), "m", [])
        assert [r.concurrency for r in rows] == [1, 4] and all(words in r.error and not r.tok_s for r in rows)
        assert time.monotonic() - t0 < 20
    assert len(pids) == 2  # each server's own child, read from the log in the error
    deadline = time.monotonic() + 5
    while not all(_gone(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert all(_gone(p) for p in pids)


def test_transformers_serve_row_streams_tokens_through_the_same_client(tmp_path):
    """`transformers serve --continuous-batching` on a tiny exported Kiln model (byte-level tokenizer +
    the chat template), driven by the bench's client: every request streams max_tokens tokens, one
    text event each (the head's special and non-UTF-8 rows are zeroed), and the server is gone after."""
    import argparse

    import torch

    pytest.importorskip("transformers")
    from transformers.utils.import_utils import is_serve_available

    if not is_serve_available():
        pytest.skip("transformers serve needs fastapi, uvicorn, pydantic and openai ('transformers[serving]')")
    from kiln.bench.serve_http import child_pids, export_hf_dir, server_rows, text_only_head, transformers_server
    from kiln.model import ModelConfig, Transformer

    tok = chat_tokenizer(None)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=tok.vocab_size, context_length=64, d_model=32, n_layers=1, n_heads=2,
                                    d_ff=64)).eval()
    assert text_only_head(model, tok) == tok.vocab_size - 128  # 128 ASCII bytes left; 128 high bytes, 5 specials
    hf = export_hf_dir(model, tok, tmp_path / "hf")
    reqs = chat_requests("/nonexistent.jsonl", 6, tok, context=64, max_tokens=4)
    args = argparse.Namespace(concurrency=[2], max_tokens=4, client_procs=1, threads=1, min_requests=6, http_row_s=0.0,
                              server_wait_s=120.0, engine={})
    servers, kids = [], []

    def start():
        servers.append(transformers_server(args, hf, torch.device("cpu")))
        kids.extend(child_pids(servers[-1].proc.pid))  # 5.25 loads the model in a process of its own
        return servers[-1]

    rows = server_rows(args, "transformers serve", start, str(hf), reqs)
    if rows[0].error and "cannot run here" in rows[0].error:
        pytest.skip(rows[0].error)
    (row,) = rows
    assert row.error == "" and row.requests == 6 and row.tokens == 6 * 4  # eos_token_id -1: every token comes
    # a text event per token, or a few when its event loop lags (5.25 joins queued texts): ITL is per event
    assert 12 <= row.events <= 24 and "tokens per event" in row.note
    assert row.ttft_p50_ms > 0 and row.itl_p50_ms is not None and row.tok_s > 0
    assert servers[0].proc.poll() is not None and all(_gone(k) for k in kids)


def test_engine_note_reads_two_stats_snapshots():
    """The HTTP table's engine note: steps, lean share, tokens a step and busy share between two
    ``LLMEngine.stats()`` snapshots; nothing for an engine without the counters."""
    from kiln.bench.serve_http import engine_note

    a = {"steps": 10, "lean_steps": 4, "step_seconds": 1.0}
    b = {"steps": 30, "lean_steps": 19, "step_seconds": 2.5}
    assert engine_note(a, b, 2.0, 400) == "engine: 20 steps, 75% lean, 20.0 tok/step, busy 75%"
    assert engine_note({}, b, 2.0, 400) == "" and engine_note(a, a, 2.0, 400) == ""
    # with the general steps' seconds and prompt tokens: each kind's mean step
    a.update(general_seconds=0.5, prefill_tokens=100)
    b.update(general_seconds=1.5, prefill_tokens=600)
    assert engine_note(a, b, 2.0, 400) == ("engine: 20 steps, 15 lean at 33.3 ms, 5 general at 200.0 ms "
                                           "(100 prompt tok each), 20.0 tok/step, busy 75%")
    # with mixed steps (prefill beside the lean decode): their count and mean, prompt tokens over both
    a.update(mixed_steps=1, mixed_seconds=0.1)
    b.update(mixed_steps=3, mixed_seconds=0.3)
    assert engine_note(a, b, 2.0, 400) == ("engine: 20 steps, 15 lean at 20.0 ms, 2 mixed at 100.0 ms, 3 general "
                                           "at 333.3 ms (100 prompt tok each), 20.0 tok/step, busy 75%")


def test_row_seconds_is_the_rows_own_span():
    """The busy share is over the requests' span, not the set-up around a row (client processes
    start 5 s before their first request)."""
    from kiln.bench.serve_http import HttpRow, row_seconds

    assert row_seconds(HttpRow("kiln http", 64, 512, 1000.0, tokens=4000)) == 4.0
    assert row_seconds(HttpRow("kiln http", 64, 512, None, tokens=0)) == 0.0


def test_paced_engine_is_the_real_engine_on_a_gpus_clock():
    """``paced_engine``: Kiln's engine with sleeps for its model; every token is 'a', decode runs the
    lean multi-step path as on CUDA, and the wall time is at least the sleeps it owes."""
    import time

    from kiln.bench.serve_http import run_direct
    from kiln.bench.serve_stub import StubSpec, load_stub
    from kiln.generate import SamplingParams

    eng = load_stub(StubSpec(tokens_per_step=4, max_num_seqs=4, pace=(2.0, 0.0, 0.0))).engine
    t0 = time.perf_counter()
    t = run_direct(eng, [[5, 6, 7]] * 4 + [[9] * 20] * 2, 4, 9)
    s = eng.stats()
    assert t.tokens == 6 * 9 and s["finished"] == 6 and s["free_blocks"] == s["num_blocks"]
    assert 0 < s["lean_steps"] < s["steps"]  # prefills took the general step, decodes the graph path
    assert time.perf_counter() - t0 >= 2e-3 * s["steps"]  # >= one 2 ms sleep a step (4 per multi-step)
    assert eng.generate([[1, 2, 3]], SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))[0].text == "aaaaa"


def test_serve_http_over_the_paced_engine(tmp_path):
    """``kiln bench serve-http --stub-engine K --stub-pace A,B,P``: direct and HTTP rows over the same
    paced engine, each with its engine note and a ratio to direct."""
    import json

    from kiln.cli.main import main

    args = ["bench", "serve-http", "--stub-engine", "4", "--stub-pace", "1,0,0", "--concurrency", "2",
            "--requests", "6", "--max-tokens", "6", "--client-procs", "1", "--server-engine", "thread",
            "--prompts", str(tmp_path / "absent.jsonl"), "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_serve-http.json").read_text())
    by = {r["impl"].split(",")[0]: r for r in rows}
    assert by["kiln direct"]["tokens"] == by["kiln http"]["tokens"] > 0
    assert "engine:" in by["kiln direct"]["note"] and "engine:" in by["kiln http"]["note"]
    assert 0 < by["kiln http"]["vs_direct"] < 3


def test_stub_pace_gets_a_clear_error_for_bad_input(tmp_path, capsys):
    """A pace that is not three non-negative numbers, or one without --stub-engine, is refused with
    what to give (exit 2 from the CLI), before any server starts."""
    import pytest

    from kiln.bench.serve_paced import parse_pace
    from kiln.cli.main import main

    assert parse_pace("2.5,0.0234,0.01") == (2.5, 0.0234, 0.01)
    for bad in ("1,2", "a,b,c", "1,-1,0"):
        with pytest.raises(ValueError, match="three non-negative numbers"):
            parse_pace(bad)
    base = ["bench", "serve-http", "--concurrency", "1", "--out", str(tmp_path)]
    assert main(base + ["--stub-pace", "1,0,0"]) != 0
    assert "add --stub-engine" in capsys.readouterr().err
    assert main(base + ["--stub-engine", "2", "--stub-pace", "1,0"]) != 0
    assert "three non-negative numbers" in capsys.readouterr().err
    assert not (tmp_path / "bench_serve-http.json").exists()


def test_waves_sets_the_requests_a_row_runs():
    """``--waves W``: c runs min(--requests, max(--min-requests, W x c)) requests (default 8), in the
    throughput part and the HTTP table alike."""
    import argparse

    from kiln.bench import serve, serve_http

    assert serve._count(64, 1000, 16) == 512 and serve._count(64, 1000, 16, waves=16) == 1000
    assert serve._count(1, 1000, 16, waves=16) == 16 and serve._count(256, 1000, 16, waves=2) == 512
    ns = argparse.Namespace(min_requests=16, waves=16)
    assert serve_http._count(ns, 64, 1000) == 1000 and serve_http._count(ns, 16, 1000) == 256
    assert serve_http._count(argparse.Namespace(), 64, 1000) == 512  # a parser without the flag: 8


def test_bench_serve_refuses_bad_waves_with_a_clear_message(capsys):
    """``--waves 0`` would silently fall back to --min-requests: it is refused, naming the flag."""
    from kiln.cli.main import main

    rc = main(["bench", "serve", "--device", "cpu", "--shapes", "tiny", "--parts", "latency", "--waves", "0"])
    assert rc != 0 and "--waves 0" in capsys.readouterr().err
    rc = main(["bench", "serve-http", "--device", "cpu", "--concurrency", "4", "--waves", "-1"])
    assert rc != 0 and "--waves -1" in capsys.readouterr().err


def test_bench_serve_passes_waves_to_the_http_part(monkeypatch, tmp_path):
    """``kiln bench serve --parts http --waves 16`` runs 16 waves a row (it ran the default 8 before:
    the HTTP part's options did not carry the flag)."""
    from kiln.bench import serve_http
    from kiln.cli.main import main

    seen = []
    monkeypatch.setattr(serve_http, "measure", lambda ns, device, work: seen.append(ns) or [])
    main(["bench", "serve", "--device", "cpu", "--shapes", "tiny", "--parts", "http", "--waves", "16",
          "--concurrency", "64", "--out", str(tmp_path)])
    assert seen and seen[0].waves == 16 and serve_http._count(seen[0], 64, 1000) == 1000


def test_pairs_compare_each_http_row_with_its_own_direct_row(tmp_path, capsys):
    """``--pairs 2``: the real engine (CPU, tiny preset) stays loaded beside the server; at each c a
    direct row and an HTTP row run twice in turn, each HTTP row's ratio is over the direct row just
    before it, and a median line follows. ``--pairs 0`` is refused."""
    import json

    from kiln.cli.main import main

    args = ["bench", "serve-http", "--device", "cpu", "--shape", "preset_tiny", "--concurrency", "2", "--requests",
            "4", "--max-tokens", "4", "--client-procs", "1", "--server-engine", "thread", "--threads", "1",
            "--prompts", str(tmp_path / "absent.jsonl"), "--pairs", "2", "--out", str(tmp_path)]
    assert main(args) == 0
    rows = json.loads((tmp_path / "bench_serve-http.json").read_text())
    direct = [r for r in rows if r["impl"] == "kiln direct"]
    http = [r for r in rows if r["impl"] == "kiln http"]
    summary = [r for r in rows if r["impl"] == "kiln http: median of 2 pairs"]
    assert len(direct) == len(http) == 2 and len(summary) == 1 and all(r["vs_direct"] == 1.0 for r in direct)
    i_direct = [i for i, r in enumerate(rows) if r["impl"] == "kiln direct"]
    for j, r in enumerate(http):  # each HTTP row over the direct row of its pair
        pair = rows[[i for i in i_direct if i < rows.index(r)][-1]]
        assert abs(r["vs_direct"] - r["tok_s"] / pair["tok_s"]) < 1e-9
    ratios = sorted(r["vs_direct"] for r in http)
    assert abs(summary[0]["vs_direct"] - sum(ratios) / 2) < 1e-9 and f"{ratios[0]:.2f}-{ratios[1]:.2f}" in summary[0]["note"]
    assert main(args[:-4] + ["--pairs", "0", "--out", str(tmp_path)]) != 0
    assert "--pairs 0" in capsys.readouterr().err
    assert main(args + ["--stub-engine", "4"]) != 0  # the stub's rows are not paired: refused, not ignored
    assert "--stub-engine" in capsys.readouterr().err
