"""`kiln bench align`: the clock that times steps after warm-up, the generated data, one Kiln row end
to end (tiny, CPU), and the learning check's pieces (hh-rlhf split, report table)."""

from __future__ import annotations

import gzip
import json
import sys

import pytest

from kiln.bench.align import PHASES, StepClock, prepare, run_child
from kiln.bench.align_learning import PLANS, learning_table, split_hh, window_mean


def test_step_clock_times_the_steps_after_warmup(tmp_path):
    c = StepClock(warmup=2, cuda=False, progress=tmp_path / "p.json", progress_every=3600.0)
    read = [s for s in range(6) if c.due(s, last=(s == 5)) and c.fn(s) is None]
    assert read == [0, 1, 2, 5]  # start-up marks, the warm-up's end, the last step: nothing in between
    on_disk = json.loads((tmp_path / "p.json").read_text())
    assert on_disk["steps"] == 5 and on_disk["timed_steps"] == 3 and on_disk["peak_mib"] > 0
    assert [n for n, _ in on_disk["phases"]][1:] == ["first step", "warm-up steps"]
    c.marks = [(2, 10.0), (5, 16.0)]
    res = c.result()
    assert (res["steps"], res["timed_steps"], res["steady_seconds"]) == (5, 3, 6.0)
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
    assert res["epoch_steps"] == res["steps"]  # one epoch, read from the stage's log at step 0
    assert [n for n, _ in res["phases"]] == list(PHASES["kiln"][:3])  # warm-up 1: the first step is all of it
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
                         "heldout_reward_after": 0.4, "gpu_s": 13.0, "curve": curve,
                         "reply_tokens": [[1.0, 9.0], [9.0, 2.5]]},
           "grpo_trl": {"rollouts": 2, "train_seconds": 11.0, "heldout_reward_after": 0.25, "curve": [[9.0, 0.3]]},
           "gsm8k": {"before": 0.0, "after_grpo": 0.0, "questions": 4}}
    t = learning_table(res)
    assert "| 3.200 | 0.900 | 4.0 |" in t and "| 0.500 | 0.560 | 2.0 |" in t
    assert "Kiln 0.500, trl 0.300" in t and "Kiln 4, trl 1" in t
    assert "tokens per reply there (stop token included): Kiln 2.500, trl -." in t  # trl's row had none
    assert "GSM8K (4 questions, greedy)" in t


STUB = """import json, sys, time
from pathlib import Path
from kiln.bench.align import StepClock
spec = json.loads(sys.argv[-1])
clock = StepClock(spec["warmup"], False, Path(spec["progress"]), spec["t0"], progress_every=0.0)
clock.phase("imports")
clock.phase("model load")
clock.phase("trainer init: load, tokenize, pack (DPO: reference pass)")
clock.phase("train() set-up (accelerate, optimizer, dataloader)")
clock.epoch_steps = 10
step = 0
while True:  # a trainer slower than the timeout: killed by the parent mid-epoch
    time.sleep(0.02)
    step += 1
    clock.step_end(step, False)
"""


def test_a_row_stopped_by_the_timeout_reports_its_partial_rate(tmp_path):
    from kiln.bench.align import AlignRow, _child, _table

    (tmp_path / "stub.py").write_text(STUB)
    spec = {"work": str(tmp_path), "device": "cpu", "warmup": 2, "prompts": 1, "group": 1, "rollouts": 1}
    row = _child("sft", "trl", spec, {"sft_tokens": 5000, "pairs": 0}, timeout=2.0,
                 program=[sys.executable, str(tmp_path / "stub.py")])
    assert row.partial == "stopped after 2 s (--timeout)" and not row.error
    assert row.epoch_steps == 10 and row.timed_steps >= 3 and row.steps == row.timed_steps + 2
    assert row.rate == pytest.approx(500 * row.timed_steps / row.steady_seconds)  # 5000 tokens / 10 steps
    names = [n for n, _ in row.phases]
    assert names[:4] == ["imports", "model load", "trainer init: load, tokenize, pack (DPO: reference pass)",
                         "train() set-up (accelerate, optimizer, dataloader)"]
    assert names[4:6] == ["first step", "warm-up steps"] and row.seconds >= 2.0
    kiln = AlignRow("sft", "Kiln", "tokens", count=5000, seconds=3.0, steps=10, timed_steps=8,
                    steady_seconds=1.0, rate=2 * row.rate, peak_mib=100.0)
    table = _table([kiln, row])
    assert "| 2.00x |" in table  # vs trl from trl's partial rate
    assert f"| {row.rate:,.1f} | tokens | {row.steps} ({row.timed_steps}) |" in table
    assert "partial: stopped after 2 s (--timeout) |" in table


def test_a_row_stopped_before_its_first_step_says_where_it_was(tmp_path):
    from kiln.bench.align import _child, _phase_table

    (tmp_path / "stub.py").write_text(STUB.replace('clock.phase("trainer init', 'time.sleep(60)\nclock.phase("x'))
    spec = {"work": str(tmp_path), "device": "cpu", "warmup": 2, "prompts": 1, "group": 1, "rollouts": 1}
    row = _child("dpo", "trl", spec, {"sft_tokens": 0, "pairs": 64}, timeout=1.5,
                 program=[sys.executable, str(tmp_path / "stub.py")])
    assert row.rate is None and row.error == "stopped after 1.5 s (--timeout); 0 timed step(s), too few for a rate"
    assert row.phases[-1][0] == "trainer init: load, tokenize, pack (DPO: reference pass) (unfinished)"
    assert "(unfinished)" in _phase_table([row])


def test_a_row_that_crashes_mid_run_keeps_its_timed_steps(tmp_path):
    from kiln.bench.align import _child, _table

    crash = STUB.replace("    clock.step_end(step, False)", "    clock.step_end(step, False)\n"
                         "    if step == 12:\n        raise RuntimeError('CUDA out of memory')")
    (tmp_path / "stub.py").write_text(crash)
    spec = {"work": str(tmp_path), "device": "cpu", "warmup": 2, "prompts": 1, "group": 1, "rollouts": 1}
    row = _child("sft", "kiln", spec, {"sft_tokens": 5000, "pairs": 0}, timeout=30.0,
                 program=[sys.executable, str(tmp_path / "stub.py")])
    assert row.rate is not None and row.timed_steps >= 3 and not row.error
    assert row.partial.startswith("failed after") and row.partial.endswith("RuntimeError: CUDA out of memory")
    assert "partial: failed after" in _table([row])


def test_learning_check_keeps_what_it_measured_when_a_stage_fails(tmp_path, monkeypatch):
    """Each stage's numbers land in ``learning.partial.json`` as it ends, so a GPU call cut short (or a
    trl side that breaks) still returns the stages before it."""
    import kiln.bench.align_learning as al

    monkeypatch.setattr(al, "build_base", lambda out, plan, seed: out)
    monkeypatch.setattr(al, "sft_rounds", lambda *a: (tmp_path / "sft", {"heldout_loss_after": 0.9}))
    monkeypatch.setattr(al, "grpo_kiln", lambda *a: (tmp_path / "grpo", {"heldout_reward_after": 0.7}))

    def trl_breaks(*a):
        raise RuntimeError("cut")

    monkeypatch.setattr(al, "grpo_trl", trl_breaks)
    with pytest.raises(RuntimeError, match="cut"):
        al.learning_check(PLANS["tiny"], tmp_path / "work", "cpu", 0, None, None, tmp_path / "out")
    got = json.loads((tmp_path / "out" / "learning.partial.json").read_text())
    assert got["sft"] == {"heldout_loss_after": 0.9} and got["grpo_kiln"] == {"heldout_reward_after": 0.7}
    assert got["dpo"] == {"skipped": "no hh-rlhf file"} and "grpo_trl" not in got
