"""``kiln.align.learning``'s more-SFT baseline scores the GRPO run's own held-out prompts."""

from __future__ import annotations

from kiln.align.grpo import grpo_addition_cpu
from kiln.align.learning import run, sft_more


def test_sft_more_at_a_negligible_lr_reads_the_grpo_runs_starting_accuracy(tmp_path):
    # One-digit sums, 60 SFT steps: a model that gets some held-out sums right (~0.15), so a
    # baseline scored on other prompts, by another rule or from another model would read differently.
    r = run(tmp_path, digits=1, overrides=("rollouts=1", "eval_every=1"))
    assert r["heldout_accuracy_before"] > 0.05
    seed = grpo_addition_cpu().train.seed
    b = sft_more(tmp_path, 1, seed, digits=1, eval_prompts=r["heldout_prompts"], lr=1e-12)
    assert b["heldout_accuracy_after_sft_more"] == r["heldout_accuracy_before"]
    # The baseline's lr does move the model: 60 more steps at 3e-3 changes the held-out reading.
    moved = sft_more(tmp_path, 60, seed, digits=1, eval_prompts=r["heldout_prompts"], lr=3e-3)
    assert moved["heldout_accuracy_after_sft_more"] != r["heldout_accuracy_before"]
