"""The loop: exact resume, spike skip and rollback, learning, reuse, bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kiln.train import train
from kiln.train.config import TrainConfig, apply_overrides, tiny
from kiln.train.metrics import read_metrics


class Interrupted(Exception):
    pass


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def test_exact_resume_is_bitwise(tokens_dir, tmp_path, make_config):
    # Gradient accumulation (2 micro-batches) and evaluation are on, as in a real run.
    cfg = make_config(max_steps=12, micro_batch_size=4, save_every=6, eval_every=3)
    straight = train(cfg, tokens_dir, tmp_path / "a")

    def crash(step, loss):
        if step == 6:  # after the step-6 checkpoint is written, like a killed job
            raise Interrupted
        return loss

    with pytest.raises(Interrupted):
        train(cfg, tokens_dir, tmp_path / "b", fault_hook=crash)
    assert not (tmp_path / "b" / "manifest.json").exists()
    assert [s for s, _ in _losses(tmp_path / "b")] == list(range(1, 7))
    resumed = train(cfg, tokens_dir, tmp_path / "b")
    a, b = _losses(straight), _losses(resumed)
    assert [s for s, _ in a] == list(range(1, 13))
    assert a == b  # float equality: bit-identical losses
    wa = load_file(straight / "model" / "model.safetensors")
    wb = load_file(resumed / "model" / "model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    val_a = [r["val_loss"] for r in read_metrics(straight / "metrics.jsonl") if "val_loss" in r]
    val_b = [r["val_loss"] for r in read_metrics(resumed / "metrics.jsonl") if "val_loss" in r]
    assert val_a == val_b and len(val_a) == 5
    m = json.loads((resumed / "manifest.json").read_text())
    assert m["stage"] == "train" and m["stats"]["tokens_seen"] == 12 * 8 * 16
    assert (resumed / "loss.png").stat().st_size > 0 and (resumed / "tb").is_dir()
    # Same config and inputs again: reused, nothing retrained.
    before = (resumed / "manifest.json").stat().st_mtime_ns
    train(cfg, tokens_dir, tmp_path / "b")
    assert (resumed / "manifest.json").stat().st_mtime_ns == before


def test_loss_goes_down_on_learnable_sequence(tokens_dir, tmp_path, make_config):
    run = train(make_config(max_steps=40, eval_every=40, save_every=0), tokens_dir, tmp_path / "run")
    stats = json.loads((run / "manifest.json").read_text())["stats"]
    first = _losses(run)[0][1]
    assert first > 3.5  # ~ln(64) = 4.16 at init
    assert stats["final_train_loss"] < first - 1.5
    assert stats["val_loss"] < first - 1.5
    assert stats["params"] < 100_000


def test_spike_is_skipped_then_rollback(tokens_dir, tmp_path, caplog, make_config):
    fired = set()

    def spikes(step, loss):
        # One 50x spike at step 8, then three NaNs at 14-16 (each only the first time it is reached).
        if step in (8, 14, 15, 16) and step not in fired:
            fired.add(step)
            return loss * 50 if step == 8 else loss * float("nan")
        return loss

    cfg = make_config(max_steps=20, save_every=10, spike_min_history=4, rollback_after=3, spike_window=6)
    with caplog.at_level("WARNING", logger="kiln.train"):
        run = train(cfg, tokens_dir, tmp_path / "run", fault_hook=spikes)
    log = (run / "train.log").read_text()
    assert "step 8: spike loss" in log and "update skipped" in log
    assert "step 14: non-finite loss" in log
    assert "ROLLBACK 1/3: 3 bad steps since step 14" in log and "restored step_000010" in log
    stats = json.loads((run / "manifest.json").read_text())["stats"]
    assert stats["rollbacks"] == 1 and stats["skipped_steps"] == 4
    assert any("ROLLBACK" in r.message for r in caplog.records)


def test_gives_up_after_max_rollbacks(tokens_dir, tmp_path, make_config):
    cfg = make_config(max_steps=20, save_every=5, rollback_after=2, max_rollbacks=1)
    with pytest.raises(RuntimeError, match="giving up"):
        train(cfg, tokens_dir, tmp_path / "run", fault_hook=lambda s, l: l * float("inf") if s >= 7 else l)


def test_bad_config_errors(make_config):
    with pytest.raises(ValueError, match="not divisible by micro_batch_size"):
        make_config(batch_size=8, micro_batch_size=3)
    with pytest.raises(ValueError, match="schedule"):
        make_config(schedule="linear")
    with pytest.raises(ValueError, match="min_lr"):
        make_config(lr=1e-3, min_lr=1e-2)
    with pytest.raises(ValueError, match="n_heads"):
        apply_overrides(tiny(), ["model.n_heads=5"])
    with pytest.raises(ValueError, match="did you mean lr"):
        apply_overrides(tiny(), ["lrr=3"])
    with pytest.raises(ValueError, match="expected a int"):
        apply_overrides(tiny(), ["batch_size=lots"])
    cfg = apply_overrides(tiny(), ["lr=3e-4", "model.n_layers=2", "betas=0.8,0.9", "compile=false", "max_tokens=1e6"])
    assert (cfg.lr, cfg.model.n_layers, cfg.betas, cfg.compile, cfg.max_tokens) == (3e-4, 2, (0.8, 0.9), False, 1_000_000)
    assert isinstance(TrainConfig(), TrainConfig)


def test_bad_input_errors(tokens_dir, tmp_path, make_config):
    with pytest.raises(ValueError, match="training tokens"):
        train(make_config(batch_size=4096), tokens_dir, tmp_path / "run")
    with pytest.raises(FileNotFoundError, match="kiln tokenize"):
        train(make_config(), tmp_path / "nope", tmp_path / "run")
    with pytest.raises(ValueError, match="vocab"):
        train(make_config(vocab_from_data=False, model=make_config().model.__class__(
            vocab_size=32, context_length=16, d_model=32, n_layers=2, n_heads=2)), tokens_dir, tmp_path / "run")


def test_cli_train_runs_and_rejects_unknown_keys(tokens_dir, tmp_path, capsys):
    from kiln.cli.main import main

    assert main(["train", "--tokens", str(tokens_dir), "--out", str(tmp_path / "run"), "--max-steps", "2",
                 "--set", "model.context_length=16", "--set", "model.d_model=32", "--set", "model.n_heads=2",
                 "--set", "model.n_layers=1", "--set", "batch_size=4", "--set", "warmup_steps=1",
                 "--set", "device=cpu"]) == 0
    assert (tmp_path / "run" / "manifest.json").is_file()
    assert main(["train", "--tokens", str(tokens_dir), "--out", str(tmp_path / "r2"), "--set", "bogus=1"]) == 1
    assert "unknown config key" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    assert "model.d_model" in capsys.readouterr().out


def test_bits_per_byte_and_samples_with_a_tokenizer(tmp_path, make_config):
    import numpy as np

    from kiln.shards import write_shard
    from kiln.tokenizer import Tokenizer

    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], special_tokens=["<|endoftext|>"])
    tok_path = tok.save(tmp_path / "tokenizer.json")
    text = ("In the beginning God created the heaven and the earth. " * 300).encode()
    ids = np.frombuffer(text, dtype=np.uint8).astype(np.int64)
    d = tmp_path / "tokens"
    d.mkdir()
    write_shard(d / "train_00000.bin", ids, [0], tok.vocab_size)
    write_shard(d / "val_00000.bin", ids[:2000], [0], tok.vocab_size)
    cfg = make_config(max_steps=4, eval_every=4, sample_every=4, sample_tokens=8, sample_prompt="In the",
                      vocab_from_data=True)
    run = train(cfg, d, tmp_path / "run", tokenizer_path=tok_path)
    stats = json.loads((run / "manifest.json").read_text())["stats"]
    # Every target is one plain byte, so bits per byte = loss / ln 2.
    assert stats["val_bpb"] == pytest.approx(stats["val_loss"] / math.log(2), rel=1e-6)
    assert "| sample: In the" in (run / "train.log").read_text()
    assert (run / "model" / "tokenizer.json").is_file() and (run / "model" / "config.json").is_file()
    assert json.loads((run / "manifest.json").read_text())["config"]["model"]["vocab_size"] == 320  # 257 -> x64


def test_resume_refuses_another_model_and_no_resume_starts_over(tokens_dir, tmp_path, make_config):
    cfg = make_config(max_steps=3, schedule="wsd", decay_frac=0.5, eval_every=0)
    run = train(cfg, tokens_dir, tmp_path / "run")
    lrs = [r["lr"] for r in read_metrics(run / "metrics.jsonl") if "lr" in r]
    assert lrs[-1] == pytest.approx(cfg.min_lr)  # wsd ends its decay on min_lr
    bigger = apply_overrides(cfg, ["model.d_model=64", "max_steps=4"])
    with pytest.raises(ValueError, match="another model config"):
        train(bigger, tokens_dir, tmp_path / "run")
    train(bigger, tokens_dir, tmp_path / "run", resume=False)
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_000000", "step_000004"]


def test_eval_tokens_fixes_the_heldout_set_across_batch_sizes(tokens_dir, tmp_path, make_config):
    """eval_batches scores micro-batch x context tokens per batch (the set moves with the batch
    size); eval_tokens scores the same whole windows whatever the batch."""

    def scored(batch: int, **kw) -> str:
        run = train(make_config(max_steps=2, batch_size=batch, eval_every=2, save_every=0, eval_batches=2, **kw),
                    tokens_dir, tmp_path / f"b{batch}{kw}")
        line = [ln for ln in (run / "train.log").read_text().splitlines() if "val loss" in ln][-1]
        return line.rsplit("|", 1)[1].strip()

    assert scored(2) != scored(4)  # the older count: 2 batches of 2 or of 4 windows
    assert scored(2, eval_tokens=50) == scored(4, eval_tokens=50) == "48 tokens"  # 3 windows of 16


def test_no_heldout_tokens_is_said_not_skipped_silently(tokens_dir, tmp_path, make_config):
    import shutil

    bare = tmp_path / "bare_tokens"
    shutil.copytree(tokens_dir, bare)
    for p in bare.glob("val_*.bin"):
        p.unlink()
    run = train(make_config(max_steps=2, eval_every=2, save_every=0), bare, tmp_path / "run")
    log = (run / "train.log").read_text()
    assert "no held-out tokens" in log and "validation split" in log and "val loss" not in log
    quiet = train(make_config(max_steps=2, eval_every=0, save_every=0), bare, tmp_path / "quiet")
    assert "no held-out tokens" not in (quiet / "train.log").read_text()


def test_repeat_warning_fires_once_when_the_run_crosses_four_epochs():
    from kiln.train.trainer import REPEAT_WARN_EPOCHS, _repeat_warning

    n = 1000
    limit = int(REPEAT_WARN_EPOCHS * n)
    assert _repeat_warning(limit - 10, limit - 1, n) is None  # not yet
    assert "4x its 1,000 training tokens" in _repeat_warning(limit - 10, limit, n)
    assert _repeat_warning(limit, limit + 10, n) is None  # crossed at an earlier step: said once
    assert _repeat_warning(0, 10 * n, 0) is None  # no training tokens known


def test_trainer_counts_epochs_and_says_when_the_data_repeats(tmp_path, make_config, make_tokens):
    """2,000 training tokens, 128 per step: 4 epochs at step 63. The warning comes once, at that step;
    metrics rows and the manifest carry the epochs."""
    tokens = make_tokens(tmp_path / "small", n_train=2_000, n_val=400)
    run = train(make_config(max_steps=70, eval_every=0, save_every=0, log_every=0), tokens, tmp_path / "run")
    log = (run / "train.log").read_text()
    assert log.count("training tokens: repeated tokens add little") == 1
    assert "step 63: the run has now drawn 4x its 2,000 training tokens" in log
    assert "data: 2,000 training tokens; 70 steps = 4.48 epochs" in log
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in rows if "epochs" in r][-1]
    assert last["step"] == 70 and last["epochs"] == pytest.approx(70 * 128 / 2000)
    stats = json.loads((run / "manifest.json").read_text())["stats"]
    assert stats["train_tokens"] == 2000 and stats["epochs"] == pytest.approx(4.48)
    quiet = train(make_config(max_steps=5, eval_every=0, save_every=0), tokens, tmp_path / "quiet")
    assert "repeated tokens add little" not in (quiet / "train.log").read_text()
