"""A bounded load test: 64 concurrent streaming clients for a few seconds, half of them hanging up
mid-stream. It must end with zero 5xx answers, every KV block freed and the server's memory flat."""

from __future__ import annotations

import asyncio
import collections
import time

import pytest

httpx = pytest.importorskip("httpx")

MODEL = "kiln-chat-tiny"
CLIENTS = 64
WARMUP_S, LOAD_S = 2.0, 8.0


async def _client(url: str, i: int, stop_at: float, stats: collections.Counter) -> None:
    quitter = i % 2 == 1  # hangs up after a few events
    async with httpx.AsyncClient(base_url=url, timeout=60) as c:
        while time.monotonic() < stop_at:
            if quitter:
                path, body = "/v1/completions", {"prompt": "Once upon", "max_tokens": 64, "ignore_eos": True}
            else:
                path, body = "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}],
                                                      "max_tokens": 24}
            body.update(model=MODEL, stream=True, temperature=1.0, seed=i)
            async with c.stream("POST", path, json=body) as r:
                stats[f"http_{r.status_code}"] += 1
                if r.status_code != 200:
                    await r.aread()
                    continue
                events = 0
                async for line in r.aiter_lines():
                    if line.startswith("data: "):
                        events += 1
                        if line == "data: [DONE]":
                            stats["completed"] += 1
                        elif '"error"' in line:
                            stats["stream_error"] += 1
                    if quitter and events >= 4:
                        stats["hung_up"] += 1
                        break  # leaving the block closes the connection mid-stream


async def _wave(url: str, seconds: float) -> collections.Counter:
    stats: collections.Counter = collections.Counter()
    stop_at = time.monotonic() + seconds
    await asyncio.gather(*(_client(url, i, stop_at, stats) for i in range(CLIENTS)))
    return stats


def _settled(server, timeout_s: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        h = server.health()
        if (h["pending"] == 0 and h["engine"]["used_blocks"] == 0) or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


def test_64_streaming_clients_half_hanging_up(server):
    asyncio.run(_wave(server.url, WARMUP_S))  # allocator pools and caches reach their steady size
    before = _settled(server)
    stats = asyncio.run(_wave(server.url, LOAD_S))
    after = _settled(server)
    assert not [k for k in stats if k.startswith("http_5")], stats
    assert stats["stream_error"] == 0, stats
    assert stats["completed"] >= CLIENTS // 4 and stats["hung_up"] >= CLIENTS // 4, stats
    # every block back in the pool, nothing left queued, the hung-up requests aborted by the server
    assert after["pending"] == 0 and after["engine"]["used_blocks"] == 0, after
    assert after["engine"]["running"] == 0 and after["engine"]["waiting"] == 0, after
    assert after["aborted"] - before["aborted"] >= stats["hung_up"] * 0.9, (stats, after)
    assert after["errors"] == 0
    growth = after["rss_mib"] - before["rss_mib"]
    assert growth < 40, f"server memory grew {growth:.1f} MiB over the load ({before['rss_mib']} -> {after['rss_mib']})"


def test_sigterm_lets_an_in_flight_stream_finish_then_exits(chat_model_dir, server_process):
    import threading

    s = server_process(chat_model_dir, "--shutdown-grace", "20")
    lines: list[str] = []
    first = threading.Event()

    def read() -> None:
        body = {"model": MODEL, "prompt": "Once", "max_tokens": 60, "ignore_eos": True, "stream": True,
                "temperature": 1.0, "seed": 1}
        with httpx.stream("POST", s.url + "/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                first.set()

    t = threading.Thread(target=read)
    t.start()
    assert first.wait(30)
    s.proc.terminate()  # SIGTERM mid-stream
    t.join(60)
    out = s.stop()
    assert s.proc.returncode in (0, -15), out  # uvicorn re-raises SIGTERM once it has shut down cleanly
    assert "Application shutdown complete" in out and "Traceback" not in out, out
    assert lines[-1] == "data: [DONE]" and '"finish_reason":"length"' in "".join(lines)
    with pytest.raises(httpx.ConnectError):
        httpx.get(s.url + "/health", timeout=2)
