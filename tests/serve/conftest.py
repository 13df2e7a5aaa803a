"""Fixtures for the server tests: a tiny chat model trained in a few seconds on a handful of
conversations (so replies are readable text that ends with <|end|>), saved as a Kiln model folder,
and ``kiln serve`` over it as a subprocess on 127.0.0.1."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

REPLIES = [
    ("hi", "Hello! I am Kiln, a small model."),
    ("hello", "Hello! I am Kiln, a small model."),
    ("who are you?", "I am Kiln, a small model."),
    ("what can you do?", "I can say hello."),
    ("tell me a story", "Once upon a time there was a kiln."),
]
CONTEXT = 128


def build_chat_model(out: Path, steps: int = 160, seed: int = 0) -> Path:
    """A byte-level tokenizer with the chat tokens and a 1-layer model overfit on REPLIES (and one
    two-turn chat, so the chat page's second turn has a known answer too)."""
    import torch

    from kiln.align.chat import ChatTemplate, add_chat_tokens
    from kiln.model import ModelConfig, Transformer, save_pretrained
    from kiln.tokenizer import Tokenizer

    tok = add_chat_tokens(Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"]))
    tpl = ChatTemplate.from_tokenizer(tok)
    chats = [[("user", q), ("assistant", a)] for q, a in REPLIES]
    chats.append([("user", "hi"), ("assistant", REPLIES[0][1]), ("user", "who are you?"), ("assistant", REPLIES[2][1])])
    rows = [tpl.render([{"role": r, "content": c} for r, c in chat], add_generation_prompt=False) for chat in chats]
    T = max(len(r) for r in rows)
    x = torch.full((len(rows), T), tok.eot_id)
    for i, r in enumerate(rows):
        x[i, : len(r)] = torch.tensor(r)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=264, context_length=CONTEXT, d_model=64, n_layers=1, n_heads=4, d_ff=128)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):  # overfit: a fixture, not a training run
        logits = model(x[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    save_pretrained(model, out)
    tok.save(out / "tokenizer.json")
    return out


@pytest.fixture(scope="session")
def chat_model_dir(tmp_path_factory) -> Path:
    """Built once per test run: pytest-xdist workers share the base temp folder's parent and a lock."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent
    out = root / "kiln-chat-tiny"
    with FileLock(str(root / "kiln-chat-tiny.lock")):
        if not (out / "tokenizer.json").is_file():
            build_chat_model(out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``kiln serve`` in a subprocess; ``url`` is its base address."""

    def __init__(self, model_dir: Path, *args: str, timeout_s: float = 60.0) -> None:
        import httpx

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        launcher = os.environ.get("KILN_TEST_SERVE_LAUNCHER")
        cmd = [sys.executable, launcher] if launcher else [sys.executable, "-m", "kiln.cli.main"]
        self.proc = subprocess.Popen(
            [*cmd, "serve", str(model_dir), "--port", str(self.port), "--device", "cpu", *args],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + timeout_s
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"kiln serve exited with {self.proc.returncode}:\n{self.proc.stdout.read()}")
            try:
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError("kiln serve did not answer /health in time")
            time.sleep(0.2)

    def health(self) -> dict:
        import httpx

        return httpx.get(self.url + "/health", timeout=5).json()

    def stop(self) -> str:
        """SIGTERM, wait for the graceful shutdown; returns the server's output."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.stdout.read()


@pytest.fixture
def server_process() -> type[ServerProcess]:
    """The ``ServerProcess`` class, for a test that starts its own server with other flags (a bare
    ``from conftest import`` picks whichever folder's conftest was loaded first in a full run)."""
    return ServerProcess


@pytest.fixture(scope="session")
def server(chat_model_dir):
    s = ServerProcess(chat_model_dir)
    yield s
    s.stop()


@pytest.fixture(scope="module", params=["process", "thread"])
def srv(request, server, chat_model_dir):
    """``kiln serve`` with the engine in a child process (the session's server: the default) or in
    a thread of the server (``--no-engine-process``); each module that asks gets its own thread one."""
    if request.param == "process":
        yield server
        return
    s = ServerProcess(chat_model_dir, "--no-engine-process")
    yield s
    s.stop()
