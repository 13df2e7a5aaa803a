"""Serving a model: the OpenAI-compatible HTTP server (``kiln serve``), its chat page and the terminal
chat (``kiln chat``), all over the one engine in ``kiln.generate``.

    config.py    ServeConfig: every knob of kiln serve (flags, limits)
    worker.py    EngineWorker: the thread that owns the engine; asyncio queues to the requests
    prompts.py   chat messages -> prompt ids (the model's chat template, or plain text)
    protocol.py  the OpenAI wire format: request models, errors, logprobs, usage
    app.py       FastAPI routes, server-sent events, limits, API key
    metrics.py   GET /metrics: Prometheus' text format, per-sequence latencies, vLLM's metric names
    tools.py     forced tool calls (tool_choice named or "required") by structured output
    server.py    model folder -> engine -> uvicorn
    terminal.py  kiln chat
    static/      the chat page (plain HTML + JavaScript, no build step)

FastAPI and uvicorn come with the ``serve`` extra (``pip install 'kiln[serve]'``). See docs/serve.md.
"""

from kiln.serve.config import ServeConfig

__all__ = ["ServeConfig"]
