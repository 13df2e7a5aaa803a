"""The runtime every training stage shares: ``fit`` with a batch source and a loss of the caller's,
``TrainState`` checkpoints (exact resume, damaged files), ``TrainStep`` without host syncs, the
clock-driven schedule and the fused loss."""

from __future__ import annotations

import importlib.util
import json
import math

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from kiln.artifacts import config_to_dict
from kiln.distributed import SingleProcess
from kiln.model import build_model
from kiln.train import (
    CheckpointError,
    Hook,
    RunDir,
    TrainState,
    TrainStep,
    build_optimizer,
    cross_entropy,
    fit,
    micro_batch_size,
    restore_state,
    schedule_lr,
    train,
)
from kiln.train.metrics import read_metrics

# tests/train/conftest.py by path: a bare `from conftest import` picks whichever conftest module
# another folder's tests loaded first when the whole suite runs.
_spec = importlib.util.spec_from_file_location("train_conftest", Path(__file__).with_name("conftest.py"))
_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_conftest)
VOCAB, small_config = _conftest.VOCAB, _conftest.small_config


class Interrupted(Exception):
    pass


class Windows:
    """A batch source of the caller's (as SFT would write one): random windows of one token array,
    with a loss mask over positions whose input id is not a multiple of 3."""

    def __init__(self, tokens: np.ndarray, context: int, micro_batch: int, seed: int, masked: bool) -> None:
        self.tokens, self.context, self.micro_batch, self.masked = torch.from_numpy(tokens), context, micro_batch, masked
        self.generator = torch.Generator()
        self.reseed(seed)

    def reseed(self, seed: int) -> None:
        self.seed = seed
        self.generator.manual_seed(seed)

    def __iter__(self):
        return self

    def __next__(self):
        starts = torch.randint(0, len(self.tokens) - self.context - 1, (self.micro_batch,), generator=self.generator)
        w = self.tokens[starts[:, None] + torch.arange(self.context + 1)]  # (mb, T + 1)
        x, y = w[:, :-1], w[:, 1:]
        return (x, y, x % 3 != 0) if self.masked else (x, y)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "generator": self.generator.get_state()}

    def load_state_dict(self, s: dict) -> None:
        self.seed = s["seed"]
        self.generator.set_state(s["generator"])


def _run(out, tokens, masked: bool, crash_at: int | None = None):
    """A stage built on the runtime the way SFT is: its own batches, loss and eval hook."""
    cfg = small_config(max_steps=12, micro_batch_size=4, save_every=6, eval_every=5)
    with RunDir(out, "test-stage", cfg, resume=True) as run:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
        state = TrainState(model, build_optimizer(cfg, model, None, torch.device("cpu")), config=config_to_dict(cfg),
                           data=Windows(tokens, cfg.model.context_length, micro_batch_size(cfg, 1), cfg.seed, masked))
        run.begin(state)

        def loss_fn(x, y, mask=None):
            if mask is None:
                return cross_entropy(model(x), y)
            keep = mask & (torch.rand(mask.shape) > 0.2)  # the global RNG too: it is part of the state
            ce = F.cross_entropy(model(x).flatten(0, 1), y.flatten(), reduction="none")  # (mb * T,)
            return (ce * keep.flatten()).sum() / keep.sum().clamp(min=1)

        def crash(step, loss):
            if step == crash_at:  # after the step-6 checkpoint, like a killed job
                raise Interrupted
            return loss

        @torch.no_grad()
        def evaluate(step):
            loss = cross_entropy(model(torch.from_numpy(tokens[:64]).view(4, 16)), torch.from_numpy(tokens[1:65]).view(4, 16))
            run.log.metrics({"step": step, "val_loss": loss.item()})
            return {"loss": loss.item()}

        if fit(cfg, state, state.data, loss_fn, run, hooks=[Hook(cfg.eval_every, evaluate)], fault_hook=crash):
            run.export_model(model)
            run.finish({"val_loss": state.counters.val["loss"]})
    return run.path


@pytest.mark.parametrize("masked", [False, True], ids=["next-token", "masked"])
def test_fit_resumes_bitwise_with_any_loss(tmp_path, masked):
    tokens = np.random.default_rng(0).integers(0, VOCAB, 4000)
    straight = _run(tmp_path / "a", tokens, masked)
    with pytest.raises(Interrupted):
        _run(tmp_path / "b", tokens, masked, crash_at=6)
    resumed = _run(tmp_path / "b", tokens, masked)
    rows_a, rows_b = read_metrics(straight / "metrics.jsonl"), read_metrics(resumed / "metrics.jsonl")
    losses = [(r["step"], r["loss"]) for r in rows_a if "loss" in r]
    assert [s for s, _ in losses] == list(range(1, 13))
    assert losses == [(r["step"], r["loss"]) for r in rows_b if "loss" in r]  # float equality: bit-identical
    assert [r["val_loss"] for r in rows_a if "val_loss" in r] == [r["val_loss"] for r in rows_b if "val_loss" in r]
    wa, wb = load_file(straight / "model" / "model.safetensors"), load_file(resumed / "model" / "model.safetensors")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    manifest = json.loads((resumed / "manifest.json").read_text())
    assert manifest["stage"] == "test-stage"
    assert manifest["stats"]["val_loss"] == json.loads((straight / "manifest.json").read_text())["stats"]["val_loss"]


def test_damaged_checkpoint_names_file_key_and_the_earlier_checkpoint(tmp_path, tokens_dir, make_config):
    run = train(make_config(max_steps=6, save_every=3, eval_every=0), tokens_dir, tmp_path / "run")
    ckpts = run / "checkpoints"
    extra = ckpts / "step_000006" / "extra.safetensors"
    raw = bytearray(extra.read_bytes())
    at = raw.index(b"rng.numpy.keys")
    raw[at + len("rng.numpy.ke")] = ord("z")  # one byte of the header: a tensor renamed, the file still readable
    extra.write_bytes(bytes(raw))
    cfg = make_config(max_steps=6)
    model = build_model(cfg.model)
    state = TrainState(model, build_optimizer(cfg, model, None, torch.device("cpu")))
    with pytest.raises(CheckpointError) as e:
        restore_state(ckpts / "step_000006", state, SingleProcess())
    msg = str(e.value)
    assert "\n" not in msg and str(extra) in msg and "'rng.numpy.keys'" in msg
    assert f"resumes from {ckpts / 'step_000003'}" in msg


def test_train_step_queues_without_host_syncs(monkeypatch):
    """Clipping, the spike guard and the masked AdamW update all stay on the device."""
    cfg = small_config()
    torch.manual_seed(0)
    model = build_model(cfg.model)
    opt = build_optimizer(cfg, model, None, torch.device("cpu"))
    x = torch.randint(0, VOCAB, (4, 16))
    step = TrainStep(lambda a, b: cross_entropy(model(a), b), model, model, opt, SingleProcess().clip_grad_norm_,
                     0.5, SingleProcess(), torch.autocast("cpu", enabled=False), torch.device("cpu"))
    step.set_threshold(2.0)  # below the initial loss: the guard must reject the update, on the device
    before = [p.detach().clone() for p in model.parameters()]

    def forbidden(*a, **k):
        raise AssertionError("host sync inside TrainStep")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    result = step(0, 1e-2, lambda: (x, x.roll(-1, 1)), 2)
    monkeypatch.undo()
    loss, norm, ok = result.read()
    assert loss > 2.0 and norm > 0 and not ok
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # the masked update left them alone
    step.set_threshold(math.inf)
    assert step(1, 1e-2, lambda: (x, x.roll(-1, 1)), 2).read()[2]


def test_a_run_cut_by_its_time_budget_ends_at_min_lr(tmp_path, tokens_dir, make_config, monkeypatch):
    cfg = make_config(max_steps=1000, warmup_steps=2, max_seconds=30.0, save_every=0, eval_every=0, lr=1e-2, min_lr=1e-3)
    assert schedule_lr(cfg, 1, cfg.max_steps, elapsed=cfg.max_seconds) == cfg.min_lr  # the clock alone ends the decay
    clock = iter(range(10**6))  # a fake clock: every reading is one second later
    monkeypatch.setattr("kiln.train.loop.perf_counter", lambda: float(next(clock)))
    run = train(cfg, tokens_dir, tmp_path / "run")
    rows = [r for r in read_metrics(run / "metrics.jsonl") if "lr" in r]
    assert 10 < len(rows) < 40  # cut by the clock, far before max_steps
    # Decayed to the floor: within a step (~1 of 30 s) of it, 1.1% of the span; following steps alone, it would be at lr.
    assert cfg.min_lr <= rows[-1]["lr"] < cfg.min_lr + 0.03 * (cfg.lr - cfg.min_lr)
    assert json.loads((run / "manifest.json").read_text())["stats"]["steps"] == len(rows)


def test_fused_loss_trains_like_the_torch_loss(tmp_path, tokens_dir, make_config):
    runs = {impl: train(make_config(max_steps=4, eval_every=0, save_every=0, loss_impl=impl), tokens_dir, tmp_path / impl)
            for impl in ("torch", "fused")}
    losses = {k: [r["loss"] for r in read_metrics(v / "metrics.jsonl") if "loss" in r] for k, v in runs.items()}
    assert len(losses["fused"]) == 4
    assert losses["fused"] == pytest.approx(losses["torch"], rel=1e-5)
    assert losses["fused"][-1] < losses["fused"][0]
