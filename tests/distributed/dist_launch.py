"""Launch 2-process gloo groups for tests/distributed, torchrun-style, with a hard timeout.

A plain module with a unique name (not conftest.py): test modules import it directly, and no other
test folder's ``conftest`` can shadow it."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
WORKERS = HERE / "workers.py"
SRC = HERE.parents[1] / "src"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def base_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(SRC), env.get("PYTHONPATH", "")])
    env["OMP_NUM_THREADS"] = "1"
    for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
              "TORCHELASTIC_USE_AGENT_STORE", "TORCHELASTIC_RESTART_COUNT"):
        env.pop(k, None)
    return env


@dataclass
class RankResult:
    rank: int
    returncode: int
    output: str
    result: dict | None


def wait_all(procs: list[subprocess.Popen], timeout: float, grace: float = 20.0) -> list[tuple[int, str]]:
    """Wait for every process, as torchrun's agent does: once one fails, the others get ``grace``
    seconds to exit on their own, then are killed (return code -9). Past ``timeout`` everything is
    killed and the test fails: a hang is a bug."""
    deadline = time.time() + timeout
    failed_at: float | None = None
    while any(p.poll() is None for p in procs):
        now = time.time()
        if failed_at is None and any(p.returncode not in (None, 0) for p in procs):
            failed_at = now
        if failed_at is not None and now - failed_at > grace:
            for p in procs:
                if p.poll() is None:
                    p.kill()
            break
        if now > deadline:
            for p in procs:
                p.kill()
            for p in procs:
                p.wait()
            pytest.fail(f"distributed workers still running after {timeout:.0f}s: a hang")
        time.sleep(0.1)
    outs = []
    for p in procs:
        rc = p.wait()
        log = p.kiln_log  # type: ignore[attr-defined]
        log.seek(0)
        outs.append((rc, log.read().decode(errors="replace")))
        log.close()
    return outs


def spawn(cmd: list[str], env: dict[str, str]) -> subprocess.Popen:
    """Start ``cmd`` with output to a temporary file (a full pipe cannot block it)."""
    log = tempfile.TemporaryFile()  # noqa: SIM115 (lives as long as the process)
    p = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
    p.kiln_log = log  # type: ignore[attr-defined]
    return p


def run_ranks(scenario: str, out_dir: Path, world_size: int = 2, args: tuple[str, ...] = (),
              timeout: float = 90, collective_timeout_s: float = 30, grace: float = 20.0) -> list[RankResult]:
    """Start ``world_size`` ranks of ``workers.py scenario`` with torchrun's variables; gather results."""
    port = free_port()
    procs = []
    for r in range(world_size):
        env = base_env()
        env.update(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), KILN_TEST_TIMEOUT_S=str(collective_timeout_s))
        procs.append(spawn([sys.executable, str(WORKERS), scenario, str(out_dir), *args], env))
    results = []
    for r, (rc, o) in enumerate(wait_all(procs, timeout, grace)):
        f = out_dir / f"{scenario}_rank{r}.json"
        results.append(RankResult(r, rc, o, json.loads(f.read_text()) if f.exists() else None))
    return results
