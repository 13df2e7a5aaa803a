"""Kiln's DataParallel and ZeRO-1 on 2 gloo ranks, against single-process training."""

from __future__ import annotations

from dist_launch import run_ranks


def test_data_parallel_and_zero1_match_single_process(tmp_path):
    results = run_ranks("dp", tmp_path, timeout=120)
    for r in results:
        assert r.returncode == 0, r.output
    r0, r1 = (r.result for r in results)
    assert r0["init_equal_rank0"]  # rank 0's init is the broadcast one
    for out in (r0, r1):
        # Equality with one process on the concatenated batch (SGD + momentum, 4 steps, one of them
        # accumulating 2 micro-batches under no_sync, one parameter never used).
        assert out["dp_vs_single_max_diff"] < 1e-6, out["dp_vs_single_max_diff"]
        # Accumulation: one all-reduce per bucket per optimizer step, never one per micro-batch.
        assert out["collectives_per_step"] == [out["n_buckets"]] * 4
        assert out["n_buckets"] >= 3
        # Overlap: the first bucket's all-reduce was issued while gradients were still arriving.
        assert out["first_launch_before_last_grad"], out["events_last_step"]
        assert out["launch_time_before_backward_end"]
        # Four 16 KiB tensors: buckets close at >= bucket_mb, so 16 KiB -> 4, 20 KiB -> 2, 32 KiB -> 2, 100 MiB -> 1.
        assert out["bucket_counts"] == {str(16 / 1024): [4, 4], str(20 / 1024): [2, 2], str(32 / 1024): [2, 2], "100.0": [1, 1]}
        # ZeRO-1 is the same computation as unsharded AdamW, bit for bit on the same gradients...
        assert out["zero_vs_dp_adamw_max_diff"] == 0.0
        # ... and within float rounding of one process on the concatenated batch.
        assert out["zero_vs_single_max_diff"] < 1e-5
        # Each rank holds the state of 2 of the 4 equal tensors: half of the total, within 5%.
        share = out["zero_state_bytes"] / (out["full_state_bytes"] / 2)
        assert abs(share - 1) <= 0.05, share
        assert out["zero_owned_params"] == 2
        if out["transformer_max_diff"] is not None:
            assert out["transformer_max_diff"] < 1e-5
