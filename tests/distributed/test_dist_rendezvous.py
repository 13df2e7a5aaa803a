"""Rendezvous through torchrun: --standalone with 3 ranks, and 2 'nodes' on one machine via c10d."""

from __future__ import annotations

import json
import sys

from dist_launch import WORKERS, base_env, free_port, spawn, wait_all


def _torchrun(*args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", *args]


def test_standalone_three_ranks(tmp_path):
    cmd = _torchrun("--standalone", "--nproc-per-node", "3", str(WORKERS), "rendezvous", str(tmp_path))
    (rc, out), = wait_all([spawn(cmd, base_env())], 120)
    assert rc == 0, out
    res = [json.loads((tmp_path / f"rendezvous_rank{r}.json").read_text()) for r in range(3)]
    assert [r["rank"] for r in res] == [0, 1, 2]
    assert all(r["rank_sum"] == 3.0 and r["pg_world"] == 3 and r["agent_store"] for r in res)
    assert all(r["runtime_mean"] == 1.0 for r in res)  # Runtime.all_reduce_mean: (0 + 1 + 2) / 3


def test_two_nodes_c10d_on_one_machine(tmp_path):
    # What docs/distributed.md tells users to run on each of N nodes, with N = 2 and localhost.
    port = free_port()
    procs = []
    for node in range(2):
        cmd = _torchrun("--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
                        "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "kiln-test",
                        str(WORKERS), "rendezvous", str(tmp_path))
        procs.append(spawn(cmd, base_env()))
    for rc, out in wait_all(procs, 120):
        assert rc == 0, out
    res = [json.loads((tmp_path / f"rendezvous_rank{r}.json").read_text()) for r in range(2)]
    assert sorted(r["rank"] for r in res) == [0, 1]
    assert all(r["world_size"] == 2 and r["local_rank"] == 0 and r["local_world_size"] == 1 and r["rank_sum"] == 1.0 for r in res)
