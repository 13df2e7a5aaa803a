"""Bad input on 2 gloo ranks: mismatched configs, a rank that dies, a rank that hangs."""

from __future__ import annotations

import pytest
from dist_launch import run_ranks


def test_config_mismatch_stops_every_rank_with_a_clear_error(tmp_path):
    results = run_ranks("mismatch", tmp_path, timeout=60)
    for r in results:
        assert r.returncode == 1, r.output
        assert "ranks disagree on config" in r.output and "ranks [0]" in r.output and "ranks [1]" in r.output, r.output
        assert "code" not in r.output.split("ranks disagree on")[1].split(".")[0]  # only config differs
        assert r.result is None


@pytest.mark.parametrize("how", ["exit", "hang"])
def test_dead_or_stuck_rank_is_an_error_not_a_hang(tmp_path, how):
    # A 3 s collective timeout: a dead peer is noticed at once (closed socket), a stuck one after 3 s.
    results = run_ranks("dead_rank", tmp_path, args=(how,), timeout=60, collective_timeout_s=3,
                        grace=30 if how == "exit" else 3)  # the survivor must fail by itself
    r0 = results[0]
    assert r0.returncode == 1, r0.output
    assert "error: rank 0/2: collective 'all_reduce after a peer died' failed" in r0.output, r0.output
    # It failed by itself (exit 1 above, not the launcher's kill); a stuck peer is noticed through the
    # collective timeout, so not before it (a lower bound: an upper one would time a loaded machine).
    if how == "hang":
        assert r0.result["seconds_to_error"] >= 3
    # The dead rank exited with its own status; the stuck one was killed, as torchrun's agent would.
    assert results[1].returncode == (17 if how == "exit" else -9)
