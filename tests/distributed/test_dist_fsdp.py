"""FSDP2 on 2 gloo ranks: equality with one process, sharded checkpoint, exact resume, 2 -> 1 ranks."""

from __future__ import annotations

from dist_launch import run_ranks


def test_fsdp_trains_saves_and_resumes_on_fewer_ranks(tmp_path):
    ckpt = tmp_path / "ckpt"
    two = run_ranks("fsdp", tmp_path, args=(str(ckpt),), timeout=150)
    for r in two:
        assert r.returncode == 0, r.output
    r0, r1 = (r.result for r in two)
    assert r0["sharded"] == "DTensor"
    assert r0["fsdp_vs_single_max_diff"] < 1e-5
    assert max(abs(a - b) for a, b in zip(r0["losses_after"], r0["ref_losses_after"])) < 1e-5
    # Exact resume: a fresh sharded model loaded from the checkpoint replays steps 3..5 bit for bit.
    assert r0["resumed_losses"] == r0["losses_after"] == r1["losses_after"]
    assert r0["extra"] == {"world_size": 2, "step": 3}
    assert sorted(p.name for p in ckpt.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    # Resume on a different world size: one process, no process group, plain (unsharded) model.
    (one,) = run_ranks("resume1", tmp_path, world_size=1, args=(str(ckpt),), timeout=90)
    assert one.returncode == 0, one.output
    assert max(abs(a - b) for a, b in zip(one.result["losses_after"], r0["losses_after"])) < 1e-5
    assert one.result["vs_two_rank_final_max_diff"] < 1e-5
