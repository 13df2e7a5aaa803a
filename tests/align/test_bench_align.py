"""`kiln bench align`: the clock that times steps after warm-up, the generated data, one Kiln row end
to end (tiny, CPU), and the learning check's pieces (hh-rlhf split, report table)."""

from __future__ import annotations

import gzip
import json

import pytest

from kiln.bench.align import StepClock, prepare, run_child
from kiln.bench.align_learning import PLANS, learning_table, split_hh, window_mean


def test_step_clock_times_the_steps_after_warmup():
    c = StepClock(warmup=2, cuda=False)
    assert [s for s in range(6) if c.due(s, last=(s == 5))] == [2, 5]
    c.marks = [(2, 10.0), (5, 16.0)]
    assert c.result() == {"steps": 5, "timed_steps": 3, "steady_seconds": 6.0}
    short = StepClock(warmup=4, cuda=False)
    short.marks = [(3, 1.0)]  # a run shorter than the warm-up: nothing timed, said so by the caller
    assert short.result()["timed_steps"] == 0


def test_prepare_multi_turn_data_and_a_kiln_row(tmp_path):
    counts = prepare(tmp_path, "tiny", n=12, seq=128, seed=0, turns=3)
    sft = [json.loads(x) for x in (tmp_path / "sft.jsonl").read_text().splitlines()]
    dpo = [json.loads(x) for x in (tmp_path / "dpo.jsonl").read_text().splitlines()]
    assert len(sft) == len(dpo) == counts["pairs"] == 12
    assert [m["role"] for m in sft[0]["messages"]] == ["user", "assistant"] * 3
    # a DPO prompt is the conversation up to its last question; chosen is the right sum, rejected 7 more
    assert dpo[0]["prompt"] == sft[0]["messages"][:-1] and dpo[0]["chosen"] == sft[0]["messages"][-1:]
    right = int(dpo[0]["chosen"][0]["content"].split()[-1].rstrip("."))
    assert dpo[0]["rejected"][0]["content"] == f"The answer is {right + 7}."
    assert counts["sft_tokens"] > 12 * 3 * 10
    spec = {"work": str(tmp_path), "device": "cpu", "batch": 2, "seq": 128, "seed": 0, "prompts": 2, "group": 2,
            "rollouts": 2, "max_new_tokens": 4, "warmup": 1, "stage": "sft", "side": "kiln"}
    res = run_child(spec)
    assert res["steps"] >= 2 and res["timed_steps"] == res["steps"] - 1
    assert 0 < res["steady_seconds"] < res["seconds"]
    (tmp_path / "long").mkdir()
    with pytest.raises(ValueError, match="lower --turns"):
        prepare(tmp_path / "long", "tiny", n=4, seq=32, seed=0, turns=6)


def test_split_hh_is_seeded_and_disjoint(tmp_path):
    src = tmp_path / "hh.jsonl.gz"
    recs = [{"chosen": f"\n\nHuman: q{i}\n\nAssistant: a{i}", "rejected": f"\n\nHuman: q{i}\n\nAssistant: b{i}"}
            for i in range(40)]
    with gzip.open(src, "wt") as f:
        f.write("".join(json.dumps(r) + "\n" for r in recs))
    plan = PLANS["tiny"]
    train, held = split_hh(src, plan, tmp_path, seed=3)
    a, b = train.read_text().splitlines(), held.read_text().splitlines()
    assert len(b) == plan.dpo_heldout and len(a) == min(40 - plan.dpo_heldout, plan.dpo_max_pairs)
    assert not set(a) & set(b)
    again = split_hh(src, plan, tmp_path / ".." / tmp_path.name, seed=3)[1].read_text().splitlines()
    assert again == b


def test_learning_table_and_window_mean():
    curve = [[1.0, 0.1], [5.0, 0.2], [8.5, 0.4], [10.0, 0.6], [12.0, 0.9]]
    assert window_mean(curve, 10.0) == pytest.approx(0.5)  # the points in [8, 10] s only
    assert window_mean(curve, 0.5) is None
    res = {"plan": {"grpo_seconds": 10.0}, "device": "cpu",
           "sft": {"steps": 60, "heldout_loss_before": 3.2, "heldout_loss_after": 0.9, "gpu_s": 4.0,
                   "greedy_accuracy_after": 0.25},
           "dpo": {"pairs": 100, "steps": 7, "heldout_pairs": 16, "likelihood_accuracy_before": 0.5,
                   "likelihood_accuracy_after": 0.56, "reward_accuracy_after": 0.6, "gpu_s": 2.0},
           "grpo_kiln": {"rollouts": 5, "train_seconds": 12.0, "heldout_reward_before": 0.2,
                         "heldout_reward_after": 0.4, "gpu_s": 13.0, "curve": curve},
           "grpo_trl": {"rollouts": 2, "train_seconds": 11.0, "heldout_reward_after": 0.25, "curve": [[9.0, 0.3]]},
           "gsm8k": {"before": 0.0, "after_grpo": 0.0, "questions": 4}}
    t = learning_table(res)
    assert "| 3.200 | 0.900 | 4.0 |" in t and "| 0.500 | 0.560 | 2.0 |" in t
    assert "Kiln 0.500, trl 0.300" in t and "Kiln 4, trl 1" in t
    assert "GSM8K (4 questions, greedy)" in t
