"""`kiln bench distributed` parses, and runs end to end in one process (the 1-rank row only)."""

from __future__ import annotations

import argparse
import json

from kiln.bench.distributed import add_bench_parser


def test_bench_parser_and_single_process_run(tmp_path, monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    add_bench_parser(sub)
    out = tmp_path / "bench.json"
    args = parser.parse_args(["distributed", "--nproc", "1", "--device", "cpu", "--steps", "1", "--warmup", "1",
                              "--batch", "2", "--context", "16", "--out", str(out)])
    assert args.func(args) == 0
    rows = json.loads(out.read_text())["rows"]
    assert [r["name"] for r in rows] == ["single (1 rank)"] and rows[0]["tokens_per_s"] > 0
