"""The training loop: ``train(cfg, tokens_dir, out_dir)`` -> a run directory.

``train`` reads top to bottom: set up, then per step evaluate, sample, save, take the step, log.
Everything else (data, device, checkpoint contents, the finish) is a small helper below it.

Run directory::

    train.log  metrics.jsonl  tb/  checkpoints/step_XXXXXX/  model/  loss.png  manifest.json (last)

Distributed seam: ``dist`` is any object with ``rank``, ``world_size``, ``is_main``, ``device``
(or None), ``wrap(model)``, ``no_sync(model)``, ``all_reduce_mean(tensor)`` and ``barrier()``;
``SingleProcess`` is the one-process version. ``kiln.distributed.Runtime`` adds ``optimizer``
(ZeRO-1), ``clip_grad_norm_`` (DTensor-aware under FSDP), ``sharded_checkpoints`` with
``save_sharded`` / ``load_sharded`` (every rank writes its shards) and ``full_state_dict`` (FSDP
export); the trainer uses them when present. This module never calls torch.distributed.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import subprocess
import time
import uuid
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.artifacts import (
    MANIFEST,
    code_version,
    config_to_dict,
    input_hash,
    write_json_atomic,
)
from kiln.train.checkpoint import restore_checkpoint, save_checkpoint
from kiln.train.config import TrainConfig
from kiln.train.data import TokenSampler, read_heldout
from kiln.train.metrics import (
    RunLog,
    format_duration,
    format_rate,
    log,
    peak_flops,
    plot_loss,
    read_metrics,
)
from kiln.train.optim import AdamW, clip_grad_norm_, param_groups
from kiln.train.schedule import cosine_lr, wsd_lr
from kiln.train.spike import SpikeDetector
from kiln.train.step import StepResult, TrainStep, make_loss_fn
from kiln.train.stop import StopRequest

FaultHook = Callable[[int, torch.Tensor], torch.Tensor]


class SingleProcess:
    """The ``dist`` object for one process: rank 0 of 1, every collective a no-op."""

    rank, world_size, is_main, device = 0, 1, True, None

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model

    def no_sync(self, model: torch.nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def all_reduce_mean(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def barrier(self) -> None:
        pass


def train(
    cfg: TrainConfig,
    tokens_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    tokenizer_path: str | os.PathLike | None = None,
    resume: bool = True,
    max_steps_override: int | None = None,
    dist: Any = None,
    fault_hook: FaultHook | None = None,
    stop: StopRequest | None = None,
) -> Path:
    """Pretrain ``cfg.model`` on the ``train_*.bin`` shards of ``tokens_dir``; return ``out_dir``.

    Resumes from the newest checkpoint in ``out_dir/checkpoints`` when ``resume`` (bit-identical
    losses on the CPU). ``max_steps_override`` replaces max_steps and max_tokens (and a longer
    warm-up). ``tokenizer_path`` (default: found through the tokens manifest) enables
    bits per byte and text samples. ``fault_hook(step, loss) -> loss`` may alter each micro-batch
    loss before backward (fault injection for tests). A finished run with the same config and
    inputs is reused, not retrained. ``stop`` (``kiln.train.stop.StopRequest``: a time limit for this
    process, or SIGTERM) pauses the run at a step boundary: a checkpoint is written, no manifest,
    ``stop.paused_at`` is set, and the same call resumes it.
    """
    dist = dist or SingleProcess()
    out, tokens_dir = Path(out_dir), Path(tokens_dir)
    if max_steps_override is not None:
        n = max_steps_override  # a warm-up longer than the run shrinks to a tenth of it
        cfg = replace(cfg, max_steps=n, max_tokens=0, warmup_steps=cfg.warmup_steps if cfg.warmup_steps <= n else n // 10)
    data = _Data.open(tokens_dir, cfg)
    cfg = _fit_vocab(cfg, data.vocab_size)
    tokenizer_path = tokenizer_path or _find_tokenizer(tokens_dir)
    inputs = {os.fspath(p): input_hash(p) for p in (tokens_dir, tokenizer_path) if p is not None}
    reusable = resume and _reusable(out, cfg, inputs)
    dist.barrier()  # every rank has decided before rank 0 removes the old manifest below
    if reusable:
        log.info(f"{out} holds a finished run with this config and inputs: reused (--no-resume retrains)")
        return out
    _check_batch(cfg, dist.world_size)  # on every rank, before any collective
    device = _pick_device(cfg.device, dist)
    amp = _autocast(cfg.dtype, device)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    from kiln.model import build_model

    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, device=device)
    model_step = dist.wrap(model)  # FSDP2 replaces model's parameters in place: build the optimizer after
    optimizer = _build_optimizer(cfg, model, dist, device)
    clip = getattr(dist, "clip_grad_norm_", clip_grad_norm_)
    train_tokens = sum(len(t) for t in data.train)  # for epochs and the data-bound warning
    starts = data.doc_starts if cfg.doc_aligned else None
    sampler = _RankSlice(TokenSampler(data.train, cfg.model.context_length, cfg.seed, doc_starts=starts),
                         dist.rank, dist.world_size)
    spikes = SpikeDetector(cfg.spike_window, cfg.spike_min_history, cfg.spike_zscore, cfg.spike_ratio)
    state = _RunState()
    ckpts = out / "checkpoints"
    out.mkdir(parents=True, exist_ok=True)
    if dist.is_main:
        (out / MANIFEST).unlink(missing_ok=True)  # the run is incomplete until the manifest is back
    start = 0
    latest = _checkpoints(ckpts)[-1:] if resume else []
    dist.barrier()  # every rank has listed the checkpoints before rank 0 may clear them
    if latest:
        start = _restore(latest[0], cfg, model, optimizer, sampler, spikes, state, dist)
    elif dist.is_main:
        _clear_run(out)
    dist.barrier()
    runlog = RunLog(out, resume_step=start, enabled=dist.is_main)
    try:
        tokenizer = _load_tokenizer(tokenizer_path, runlog)
        if cfg.eval_every and data.val is None:
            runlog.warning(f"no held-out tokens in {tokens_dir} (val_*.bin missing, or shorter than one "
                           f"{cfg.model.context_length + 1}-token window): no validation loss; tokenize the "
                           "corpus with a validation split, or set eval_every=0 to silence this")
        token_bytes = tokenizer.token_bytes() if tokenizer is not None else None
        max_steps, mb = cfg.total_steps, _micro_batch(cfg, dist.world_size)
        accum = cfg.batch_size // (mb * dist.world_size)
        flops_per_token, peak = model.flops_per_token(cfg.model.context_length), peak_flops(device)

        def mfu_at(tok_s: float) -> float | None:
            return flops_per_token * tok_s / (peak * dist.world_size) if peak else None

        _log_header(runlog, cfg, model, device, amp, start, inputs, mb, accum, dist.world_size, train_tokens)
        step, skipped, t_start, dt_ema = start, deque(), time.perf_counter(), None
        loss_fn = make_loss_fn(model_step, model, cfg.loss_impl, cfg.compile, cfg.compile_mode)
        train_step = TrainStep(loss_fn, model, model_step, optimizer, clip, cfg.grad_clip, dist, amp, device, fault_hook)
        train_step.set_threshold(spikes.threshold())
        pending: StepResult | None = None
        last_read = time.perf_counter()  # when the last result was read (reset after evals and saves)
        logged = (start, state.seconds)  # (step, state.seconds) at the last log line: its rate is over the interval

        def _settle(r: StepResult) -> int | None:
            """Read step r's results, log them, count a skip; returns the restored step after a rollback."""
            nonlocal dt_ema, last_read, logged
            loss_value, grad_norm, ok = r.read()
            now = time.perf_counter()
            dt, last_read = now - last_read, now
            verdict = spikes.record(loss_value, ok, grad_norm)
            train_step.set_threshold(spikes.threshold())
            if verdict is not None:
                state.skips += 1
                skipped.append(r.step)
                while skipped and skipped[0] <= r.step - cfg.spike_window:
                    skipped.popleft()
                runlog.warning(f"step {r.step}: {verdict} loss {loss_value:.4g} (grad norm {grad_norm:.3g}; "
                               f"{spikes.describe()}): update skipped "
                               f"({len(skipped)}/{cfg.rollback_after} within {cfg.spike_window} steps before a rollback)")
                runlog.metrics({"step": r.step + 1, "event": "skip", "reason": verdict})
                if len(skipped) >= cfg.rollback_after:
                    back = _rollback(ckpts, skipped[0], cfg, model, optimizer, sampler, spikes, state, runlog, dist)
                    skipped.clear()
                    train_step.set_threshold(spikes.threshold())
                    last_read = time.perf_counter()
                    return back
            dt_ema = dt if dt_ema is None else 0.9 * dt_ema + 0.1 * dt
            tok_s = cfg.tokens_per_step / dt
            state.seconds += dt
            if not state.first_step_timed:  # this process's first step carries the compilation: off the budget
                state.first_step_timed, state.first_step_seconds = True, dt
                state.excluded_seconds += dt
            if verdict is None:
                state.train_losses.append(loss_value)
            before, state.tokens_seen = state.tokens_seen, (r.step + 1) * cfg.tokens_per_step
            repeat = _repeat_warning(before, state.tokens_seen, train_tokens)
            if repeat:
                runlog.warning(f"step {r.step + 1}: {repeat}")
            mfu = mfu_at(tok_s)
            if cfg.log_every and ((r.step + 1) % cfg.log_every == 0 or r.step + 1 == max_steps or r.step == start):
                # The line's rate is over the steps since the last line: one step's time between two reads
                # of a pipelined loop jitters (a read right after another can find the step already done).
                steps_since, secs_since = r.step + 1 - logged[0], state.seconds - logged[1]
                rate = cfg.tokens_per_step * steps_since / secs_since if steps_since > 0 and secs_since > 0 else tok_s
                logged = (r.step + 1, state.seconds)
                line = f"step {r.step + 1}/{max_steps} | loss {loss_value:.3f} | lr {r.lr:.1e} | {format_rate(rate)} tok/s"
                line += f" | mfu {100 * mfu_at(rate):.1f}%" if peak else ""
                eta = dt_ema * (max_steps - r.step - 1)
                if cfg.max_seconds:  # a time budget ends the run first, whatever max_steps says
                    eta = min(eta, max(cfg.max_seconds - state.budget_seconds, 0.0))
                runlog.info(line + f" | eta {format_duration(eta)}")
            runlog.metrics({"step": r.step + 1, "loss": loss_value, "lr": r.lr, "grad_norm": grad_norm, "tok_s": tok_s,
                            "mfu": mfu, "tokens": state.tokens_seen,
                            "epochs": round(_epochs(state.tokens_seen, train_tokens), 4),
                            "time": round(time.perf_counter() - t_start, 3),
                            "skipped": verdict is not None})
            return None

        def _settle_pending() -> None:
            nonlocal pending, step
            if pending is not None:
                r, pending = pending, None
                back = _settle(r)
                if back is not None:
                    step = back

        # Rank 0 evaluates and samples alone, except under FSDP where every forward is a collective.
        looks = dist.is_main or getattr(dist, "sharded_params", False)
        while True:
            last = step == max_steps
            looking = last or (cfg.eval_every and step % cfg.eval_every == 0) or (
                cfg.sample_every and step % cfg.sample_every == 0) or (cfg.save_every and step % cfg.save_every == 0)
            if looking and pending is not None:  # evaluations, samples and checkpoints see every result so far
                before = step
                _settle_pending()
                if step != before:
                    continue
                last = step == max_steps
            if looks and cfg.eval_every and (step % cfg.eval_every == 0 or last) and data.val is not None:
                _evaluate(model, data, token_bytes, cfg, device, amp, step, runlog, state)
            if looks and cfg.sample_every and tokenizer is not None and (step % cfg.sample_every == 0 or last):
                _sample(model, tokenizer, cfg, device, amp, step, runlog)
            if (step == 0 and start == 0) or (step > start and (last or (cfg.save_every and step % cfg.save_every == 0))):
                _save(ckpts, step, cfg, model, optimizer, sampler, spikes, state, runlog, dist)
                dist.barrier()
            if last:
                break
            if looking:
                last_read = time.perf_counter()  # step times exclude evaluation, sampling and saving
            # -- queue one guarded step (no host sync), then read the previous one's results --
            lr = _lr_at(cfg, step + 1, max_steps, state.budget_seconds)  # step + 1: the first update already moves
            result = train_step(step, lr, lambda: sampler.next_batch(mb, device), accum)
            prev, pending = pending, result
            if prev is not None:
                new_step = _settle(prev)
                if new_step is not None:  # rolled back: the step just queued is void
                    pending, step = None, new_step
                    continue
            step += 1
            if cfg.max_seconds and state.budget_seconds >= cfg.max_seconds and step < max_steps:
                _settle_pending()
                runlog.info(f"time budget of {cfg.max_seconds:g} s of training steps reached at step {step}: finishing")
                max_steps = step
                continue
            why = _stop_reason(stop, step, dist) if stop is not None and step < max_steps else None
            if why:
                _settle_pending()  # a rollback here moves step back; the checkpoint is then that step's
                _save(ckpts, step, cfg, model, optimizer, sampler, spikes, state, runlog, dist)
                dist.barrier()
                stop.paused_at = step
                runlog.info(f"paused at step {step}/{max_steps} ({why}): checkpoint written; "
                            "run the same command again to resume from it")
                break
        if stop is not None and stop.paused:
            return out
        _settle_pending()
        final = _exportable(model, cfg, dist)  # under FSDP a collective: every rank takes part
        if dist.is_main:
            _finish(out, cfg, final, tokenizer_path, inputs, state, runlog, train_tokens)
        dist.barrier()
    finally:
        runlog.close()
    return out


def _stop_reason(stop: StopRequest, step: int, dist: Any) -> str | None:
    """This process's reason to pause; with several ranks, every rank's, agreed every 10 steps
    (one tiny all-reduce) so all of them save the same step."""
    why = stop.reason()
    if dist.world_size == 1:
        return why
    if step % 10:
        return None
    dev = torch.device(dist.device) if getattr(dist, "device", None) is not None else torch.device("cpu")
    flag = dist.all_reduce_mean(torch.tensor([1.0 if why else 0.0], device=dev))
    return (why or "another rank asked to stop") if float(flag) > 0 else None


def _build_optimizer(cfg: TrainConfig, model: torch.nn.Module, dist: Any, device: torch.device) -> Any:
    """Kiln's AdamW (guarded, fused on CUDA), ZeRO-1 sharded when ``dist`` says so; or Muon + AdamW.

    Every param group carries ``lr_scale``: the step sets ``group["lr"] = schedule_lr * lr_scale``,
    so one schedule drives AdamW (scale 1) and Muon (scale muon_lr / lr) together.
    """
    fused = cfg.fused_optimizer and device.type == "cuda"
    kw = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps, "fused": fused}
    if cfg.optimizer == "muon":
        from kiln.train.muon import muon_with_adamw

        if getattr(getattr(dist, "cfg", None), "zero1", False) or getattr(dist, "sharded_params", False):
            raise ValueError("optimizer=muon needs whole gradients (one GPU or DDP); it does not run with "
                             "--zero1 or fsdp: use optimizer=adamw there")
        opt = muon_with_adamw(model, weight_decay=cfg.weight_decay, adamw_lr=cfg.lr, muon_lr=cfg.muon_lr or cfg.lr,
                              betas=cfg.betas, eps=cfg.eps, momentum=cfg.muon_momentum,
                              muon_weight_decay=None if cfg.muon_weight_decay < 0 else cfg.muon_weight_decay)
        for g in opt.param_groups:
            g["lr_scale"] = g["base_lr"] / cfg.lr
        for inner in opt.optimizers:  # Kiln's AdamW and Muon: Triton passes on CUDA
            inner.fused = fused
        return opt
    groups = param_groups(model, cfg.weight_decay)
    for g in groups:
        g["lr_scale"] = 1.0
    if hasattr(dist, "optimizer"):
        return dist.optimizer(model, AdamW, params=groups, **kw)
    return AdamW(groups, **kw)


def _micro_batch(cfg: TrainConfig, world_size: int) -> int:
    """Sequences per forward/backward on one rank: micro_batch_size, or the per-rank batch when 0."""
    return cfg.micro_batch_size or max(cfg.batch_size // world_size, 1)


def _check_batch(cfg: TrainConfig, world_size: int) -> None:
    mb = _micro_batch(cfg, world_size)
    if cfg.batch_size % (mb * world_size):
        ok = [m for m in range(mb, 0, -1) if cfg.batch_size % (m * world_size) == 0]
        fix = f"set micro_batch_size to {ok[0]}" if ok else f"use a batch_size that is a multiple of {world_size}"
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by micro_batch_size x world size = "
                         f"{mb} x {world_size}; {fix}, or change the number of ranks")


class _RankSlice:
    """This rank's share of one global stream of windows.

    Every rank draws the same ``micro_batch x world_size`` windows (same seed) and keeps slice
    ``rank``, so ranks read disjoint draws and together read exactly what one process with the
    same global batch reads (a 2-rank run equals a 1-process run). The position is the inner
    sampler's state, identical on every rank and independent of the world size.
    """

    def __init__(self, inner: TokenSampler, rank: int, world_size: int) -> None:
        self.inner, self.rank, self.world_size = inner, rank, world_size

    @property
    def seed(self) -> int:
        return self.inner.seed

    def reseed(self, seed: int) -> None:
        self.inner.reseed(seed)

    def next_batch(self, batch_size: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.world_size == 1:
            return self.inner.next_batch(batch_size, device)
        x, y = self.inner.next_batch(batch_size * self.world_size, "cpu")  # (mb * world, T) each
        rows = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        return x[rows].to(device), y[rows].to(device)

    def state_dict(self) -> dict:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.inner.load_state_dict(state)


def _exportable(model: torch.nn.Module, cfg: TrainConfig, dist: Any) -> torch.nn.Module:
    """``model`` itself, or under FSDP a plain CPU copy gathered from the shards (every rank calls)."""
    if not getattr(dist, "sharded_params", False):
        return model
    from kiln.model import build_model

    plain = build_model(cfg.model, device="cpu")
    plain.load_state_dict(dist.full_state_dict(model))
    return plain


@dataclass
class _RunState:
    """Counters that live across steps and checkpoints."""

    skips: int = 0
    rollbacks: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0  # every step's time, all processes of the run
    excluded_seconds: float = 0.0  # the first (compiling) step of every process so far
    first_step_seconds: float = 0.0  # this process's first step; not checkpointed
    first_step_timed: bool = False  # not checkpointed: a resumed process compiles again
    val: dict | None = None
    train_losses: deque = field(default_factory=lambda: deque(maxlen=20))

    @property
    def budget_seconds(self) -> float:
        """Seconds that count against ``max_seconds``: training steps, each process's first excluded."""
        return self.seconds - self.excluded_seconds


@dataclass
class _Data:
    """The run's token arrays: train shards (memmaps), a validation array, the vocab size."""

    train: list[np.ndarray]
    val: np.ndarray | None
    vocab_size: int
    doc_starts: list[np.ndarray] | None = None  # per train shard, for doc_aligned windows

    @classmethod
    def open(cls, tokens_dir: Path, cfg: TrainConfig) -> _Data:
        from kiln.shards import read_shard

        if not tokens_dir.is_dir():
            raise FileNotFoundError(f"tokens directory {tokens_dir} does not exist; run `kiln tokenize` first")
        train_paths = sorted(tokens_dir.glob("train_*.bin"))
        if not train_paths:
            raise FileNotFoundError(f"no train_*.bin shards in {tokens_dir}; run `kiln tokenize` to write them")
        train = [read_shard(p) for p in train_paths]
        vocab = max(s.vocab_size for s in train)
        n_train = sum(len(s) for s in train)
        need = cfg.tokens_per_step + 1
        if n_train < need:
            raise ValueError(f"one batch needs {need} tokens (batch_size {cfg.batch_size} x context_length "
                             f"{cfg.model.context_length}) but {tokens_dir} holds {n_train} training tokens; "
                             "lower batch_size or context_length, or add data")
        val = read_heldout(tokens_dir, cfg.eval_token_count + 1)  # only what the evaluations read
        if val is not None and len(val) <= cfg.model.context_length:
            val = None
        return cls(train=[s.tokens for s in train], val=val, vocab_size=vocab, doc_starts=[s.doc_starts for s in train])


def _fit_vocab(cfg: TrainConfig, data_vocab: int) -> TrainConfig:
    if cfg.vocab_from_data:
        v = -(-data_vocab // cfg.pad_vocab_to) * cfg.pad_vocab_to
        return replace(cfg, model=replace(cfg.model, vocab_size=v)) if v != cfg.model.vocab_size else cfg
    if data_vocab > cfg.model.vocab_size:
        raise ValueError(f"the token shards use a vocab of {data_vocab} but model.vocab_size is "
                         f"{cfg.model.vocab_size}; set model.vocab_size >= {data_vocab} or vocab_from_data=true")
    return cfg


def _find_tokenizer(tokens_dir: Path) -> Path | None:
    """The tokenizer the tokens were made with (``kiln.tokenizer.find_tokenizer``), if any."""
    from kiln.tokenizer import find_tokenizer

    try:
        return find_tokenizer(tokens_dir)
    except FileNotFoundError:
        return None


def _load_tokenizer(path: Path | None, runlog: RunLog) -> Any:
    if path is None:
        runlog.warning("no tokenizer given or found: no bits per byte and no samples (pass tokenizer_path)")
        return None
    from kiln.tokenizer import load_tokenizer

    return load_tokenizer(path)


def _reusable(out: Path, cfg: TrainConfig, inputs: dict) -> bool:
    from kiln.artifacts import read_manifest

    if not (out / MANIFEST).is_file():
        return False
    try:
        old = read_manifest(out, "train")
    except Exception:  # noqa: BLE001 - any unreadable old manifest just means "retrain"
        return False
    return old.get("config") == config_to_dict(cfg) and old.get("inputs") == inputs


def _pick_device(name: str, dist: Any) -> torch.device:
    if getattr(dist, "device", None) is not None:
        return torch.device(dist.device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {name!r} asked for, but CUDA is not available; use --set device=cpu")
    return dev


def _autocast(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (weights and optimizer stay fp32: exact master copies, no loss scaling)."""
    use_bf16 = dtype == "bf16" or (dtype == "auto" and device.type == "cuda")
    if use_bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _lr_at(cfg: TrainConfig, t: int, max_steps: int, elapsed: float = 0.0) -> float:
    """The learning rate of update ``t`` (1-based). With a time budget (``max_seconds``) the decay
    follows whichever is further along, steps or seconds, so a run cut by its budget ends decayed."""
    if cfg.max_seconds:
        t = max(t, min(round(max_steps * elapsed / cfg.max_seconds), max_steps))
    if cfg.schedule == "wsd":
        decay = min(round(cfg.decay_frac * max_steps), max(max_steps - cfg.warmup_steps, 0))
        stable = max_steps - cfg.warmup_steps - decay  # so the decay ends exactly at the last step
        return wsd_lr(t, cfg.lr, cfg.min_lr, cfg.warmup_steps, stable, decay)
    return cosine_lr(t, cfg.lr, cfg.min_lr, cfg.warmup_steps, max_steps)


def _checkpoints(ckpts: Path) -> list[Path]:
    """Complete checkpoints (meta.json, or trainer/meta.json after the shards of a sharded one), oldest first."""
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.glob("step_*") if (p / "meta.json").is_file() or (p / "trainer" / "meta.json").is_file())


def _clear_run(out: Path) -> None:
    """Remove a previous run's outputs (only the names a run writes) before a fresh start."""
    for name in ("checkpoints", "tb", "model"):
        shutil.rmtree(out / name, ignore_errors=True)
    for name in ("metrics.jsonl", "train.log", "loss.png"):
        (out / name).unlink(missing_ok=True)


def _rng_state(device: torch.device) -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }
    if device.type == "cuda":  # this rank's device only: touching the others would open contexts there
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def _set_rng_state(state: dict, device: torch.device) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _save(ckpts: Path, step: int, cfg: TrainConfig, model, optimizer, sampler, spikes, state, runlog, dist) -> None:
    """Rank 0 writes a whole checkpoint; under FSDP or ZeRO-1 every rank first writes its shards to
    ``step_X/shards/`` (DCP), then rank 0 the trainer state to ``step_X/trainer/`` (its meta.json last)."""
    path = ckpts / f"step_{step:06d}"
    sharded = getattr(dist, "sharded_checkpoints", False)
    extra = {
        "config": config_to_dict(cfg), "sampler": sampler.state_dict(), "spikes": spikes.state_dict(),
        "rng": _rng_state(next(model.parameters()).device),
        "counters": {"skips": state.skips, "rollbacks": state.rollbacks, "tokens_seen": state.tokens_seen,
                     "seconds": state.seconds, "excluded_seconds": state.excluded_seconds, "val": state.val, "train_losses": list(state.train_losses)},
    }
    if sharded:
        # Before the first update the optimizer has no state; asking DCP for it would create some
        # (a zero-lr step), shifting Adam's bias correction. Such a checkpoint holds the model only.
        with_optimizer = step > 0
        if dist.is_main:
            shutil.rmtree(path, ignore_errors=True)  # a partial save, or the same step before a rollback
        dist.barrier()
        dist.save_sharded(path / "shards", model, optimizer if with_optimizer else None)  # ends with a barrier
        if dist.is_main:
            save_checkpoint(torch.nn.Module(), None, step, path / "trainer", sharded={"optimizer": with_optimizer,
                            "world_size": dist.world_size}, **extra)
    elif dist.is_main:
        save_checkpoint(model, optimizer, step, path, **extra)
    if dist.is_main:
        for old in _checkpoints(ckpts)[: -cfg.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        runlog.info(f"saved checkpoint {path}")


def _restore(path: Path, cfg: TrainConfig, model, optimizer, sampler, spikes, state, dist) -> int:
    from kiln.train.checkpoint import load_checkpoint_extra

    sharded = (path / "trainer" / "meta.json").is_file()
    meta_dir = path / "trainer" if sharded else path
    saved_model = load_checkpoint_extra(meta_dir).get("config", {}).get("model")
    if saved_model != config_to_dict(cfg.model):
        raise ValueError(f"{path} was trained with another model config ({saved_model}); "
                         "use a new --out directory, or --no-resume to start over here")
    if sharded:  # DCP reshards to this job: saved on 2 ranks, resumable on 1 or 4
        step, extra = restore_checkpoint(meta_dir, torch.nn.Module(), None)
        load = getattr(dist, "load_sharded", None) or _load_sharded
        load(path / "shards", model, optimizer if extra["sharded"]["optimizer"] else None)
        if not extra["sharded"]["optimizer"]:
            optimizer.state.clear()  # saved before the first update: a rollback to it starts Adam afresh
    elif getattr(dist, "sharded_checkpoints", False):
        raise ValueError(f"{path} is a whole-model checkpoint but this run shards its state (fsdp or --zero1); "
                         "resume it once with --dist-strategy ddp and no --zero1, or start over with --no-resume")
    else:
        step, extra = restore_checkpoint(path, model, optimizer)
    sampler.load_state_dict(extra["sampler"])
    spikes.load_state_dict(extra["spikes"])
    _set_rng_state(extra["rng"], next(model.parameters()).device)
    c = extra["counters"]
    state.skips, state.rollbacks, state.tokens_seen = c["skips"], c["rollbacks"], c["tokens_seen"]
    state.seconds, state.val = c["seconds"], c["val"]
    state.excluded_seconds = c.get("excluded_seconds", 0.0)  # absent in checkpoints before it existed
    state.train_losses.clear()
    state.train_losses.extend(c["train_losses"])
    return step


def _load_sharded(path: Path, model, optimizer) -> None:
    """A sharded checkpoint in a single process without a Runtime (DCP needs no process group)."""
    from kiln.distributed import load_sharded_checkpoint

    load_sharded_checkpoint(path, model, optimizer)


def _rollback(ckpts: Path, first_bad: int, cfg, model, optimizer, sampler, spikes, state, runlog, dist) -> int:
    state.rollbacks += 1
    if state.rollbacks > cfg.max_rollbacks:
        raise RuntimeError(f"loss spiked again after {cfg.max_rollbacks} rollbacks (last at step {first_bad}); "
                           "giving up: lower lr, raise warmup_steps or grad_clip, or check the data")
    good = [p for p in _checkpoints(ckpts) if int(p.name.split("_")[1]) <= first_bad]
    if not good:
        raise RuntimeError(f"loss spikes from step {first_bad} and no checkpoint before it to roll back to; "
                           "lower lr or save more often (save_every)")
    rollbacks, skips = state.rollbacks, state.skips
    step = _restore(good[-1], cfg, model, optimizer, sampler, spikes, state, dist)
    state.rollbacks, state.skips = rollbacks, skips
    sampler.reseed(sampler.seed + 7919 * rollbacks)  # a fresh data order: do not replay the bad batches
    runlog.warning(f"ROLLBACK {rollbacks}/{cfg.max_rollbacks}: {cfg.rollback_after} bad steps since step {first_bad}; "
                   f"restored {good[-1].name} (step {step}) and reseeded the data order")
    runlog.metrics({"step": step, "event": "rollback", "from_step": first_bad})
    return step


@torch.no_grad()
def _evaluate(model, data: _Data, token_bytes, cfg: TrainConfig, device, amp, step: int, runlog, state) -> None:
    from kiln.model.heldout import evaluate_heldout

    dtype = torch.bfloat16 if isinstance(amp, torch.autocast) else None
    r = evaluate_heldout(model, data.val, token_bytes, cfg.model.context_length, cfg.micro_batch,
                         max_batches=None, device=device, autocast_dtype=dtype)  # data.val is cut to size
    state.val = {"step": step, **r}
    bpb = f" | val bpb {r['bpb']:.4f}" if r["bpb"] is not None else ""
    runlog.info(f"step {step} | val loss {r['loss']:.4f}{bpb} | {r['tokens']} tokens")
    runlog.metrics({"step": step, "val_loss": r["loss"], "val_bpb": r["bpb"]})


@torch.no_grad()
def _sample(model, tokenizer, cfg: TrainConfig, device, amp, step: int, runlog) -> None:
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # sampling must not move the training RNG
        try:
            text = _generate(model, tokenizer, cfg, device, amp)
        except Exception as e:  # noqa: BLE001 - a failed sample must never end a training run
            runlog.warning(f"sampling failed at step {step}: {type(e).__name__}: {e}")
            return
    runlog.info(f"step {step} | sample: {cfg.sample_prompt}{text!r}")
    runlog.text("sample", cfg.sample_prompt + text, step)


def _generate(model, tokenizer, cfg: TrainConfig, device, amp) -> str:
    """Temperature sampling with top-k 50; uses ``kiln.generate`` when it exists."""
    try:
        from kiln.generate import generate
    except ImportError:
        generate = None
    was_training = model.training
    model.eval()
    try:
        if generate is not None:
            with amp:
                return generate(model, tokenizer, cfg.sample_prompt, max_new_tokens=cfg.sample_tokens,
                                temperature=cfg.sample_temperature, top_k=50, top_p=None, seed=cfg.seed)
        eot = getattr(tokenizer, "eot_id", None)
        ids = tokenizer.encode(cfg.sample_prompt) if cfg.sample_prompt else [eot if eot is not None else 0]
        g = torch.Generator(device=device).manual_seed(cfg.seed)
        idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, t)
        out: list[int] = []
        for _ in range(cfg.sample_tokens):
            with amp:
                logits = model(idx[:, -cfg.model.context_length:])[0, -1].float()  # (V,)
            if cfg.sample_temperature <= 0:
                nxt = int(logits.argmax())
            else:
                top = torch.topk(logits / cfg.sample_temperature, min(50, logits.numel()))
                nxt = int(top.indices[torch.multinomial(torch.softmax(top.values, -1), 1, generator=g)])
            if nxt == eot:
                break
            out.append(nxt)
            idx = torch.cat([idx, torch.tensor([[nxt]], device=device)], dim=1)
        return tokenizer.decode(out)
    finally:
        model.train(was_training)


REPEAT_WARN_EPOCHS = 4.0
"""Passes over the training tokens after which the trainer warns once that the run is data-bound:
beyond about four epochs repeated tokens are worth much less than new ones (Muennighoff et al.
2023, "Scaling Data-Constrained Language Models"), and held-out loss can stop improving while
the train loss keeps falling (docs/train.md#speedrun: the 600 s speedrun sees its corpus ~3.8 times)."""


def _epochs(tokens_seen: int, train_tokens: int) -> float:
    """Passes over the training tokens so far (windows are drawn at random, so this is an average)."""
    return tokens_seen / train_tokens if train_tokens else 0.0


def _repeat_warning(before: int, after: int, train_tokens: int) -> str | None:
    """The one-time data-bound warning, if the step that took ``tokens_seen`` from ``before`` to
    ``after`` crossed ``REPEAT_WARN_EPOCHS`` passes over the training tokens."""
    limit = REPEAT_WARN_EPOCHS * train_tokens
    if not train_tokens or not before < limit <= after:
        return None
    return (f"the run has now drawn {REPEAT_WARN_EPOCHS:g}x its {train_tokens:,} training tokens: repeated tokens "
            "add little from here and the held-out loss may stop improving while the train loss falls; "
            "more data helps most, else stronger weight decay (weight_decay, or muon_weight_decay with "
            "optimizer=muon) or a smaller model (docs/train.md#speedrun)")


def _log_header(runlog, cfg, model, device, amp, start, inputs, mb, accum, world_size, train_tokens) -> None:
    code = code_version()
    runlog.info(f"kiln train | code {json.dumps(code)}")
    runlog.info(f"config {json.dumps(config_to_dict(cfg))}")
    runlog.info(f"inputs {json.dumps(inputs)}")
    what = "bf16 autocast" if isinstance(amp, torch.autocast) else "fp32"
    runlog.info(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {what}; "
                f"model {model.num_params() / 1e6:.2f}M params; {cfg.tokens_per_step} tokens/step "
                f"({mb} x {accum} accum x {world_size} ranks x {cfg.model.context_length}); "
                + (f"resuming at step {start}" if start else "starting at step 0"))
    if train_tokens:
        planned = ("" if cfg.max_seconds else
                   f"; {cfg.total_steps} steps = {_epochs(cfg.total_steps * cfg.tokens_per_step, train_tokens):.2f} epochs")
        runlog.info(f"data: {train_tokens:,} training tokens{planned}")
    if device.type == "cuda":
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10, check=False).stdout
            runlog.info("nvidia-smi\n" + smi.rstrip())
        except (OSError, subprocess.SubprocessError):
            pass


def _finish(out: Path, cfg: TrainConfig, model, tokenizer_path, inputs: dict, state: _RunState, runlog,
            train_tokens: int = 0) -> None:
    from kiln.model import save_pretrained
    from kiln.tokenizer import load_tokenizer

    tmp = out / f".model.tmp-{uuid.uuid4().hex[:8]}"
    # with its tokenizer, the model folder is all `kiln generate` and Hugging Face's Auto* classes need
    save_pretrained(model, tmp, tokenizer=load_tokenizer(tokenizer_path) if tokenizer_path is not None else None)
    shutil.rmtree(out / "model", ignore_errors=True)
    os.replace(tmp, out / "model")
    rows = read_metrics(out / "metrics.jsonl")
    plot_loss(rows, out / "loss.png")
    losses = list(state.train_losses)
    stats = {
        "steps": state.tokens_seen // cfg.tokens_per_step,  # done (a time budget may end the run early)
        "max_steps": cfg.total_steps,
        "final_train_loss": sum(losses) / len(losses) if losses else None,
        "val_loss": state.val["loss"] if state.val else None,
        "val_bpb": state.val["bpb"] if state.val else None,
        "tokens_seen": state.tokens_seen,
        "train_tokens": train_tokens,
        "epochs": round(_epochs(state.tokens_seen, train_tokens), 3),
        "seconds": round(state.seconds, 3),
        "train_seconds": round(state.budget_seconds, 3),  # without any process's first (compiling) step
        "first_step_seconds": round(state.first_step_seconds, 3),
        "params": model.num_params(),
        "skipped_steps": state.skips,
        "rollbacks": state.rollbacks,
    }
    manifest = {
        "manifest_version": 1, "stage": "train", "config": config_to_dict(cfg), "inputs": inputs,
        "code": code_version(), "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "seconds": stats["seconds"], "stats": stats,
    }
    write_json_atomic(out / MANIFEST, manifest)  # last: the run is complete
    runlog.info(f"done: {json.dumps(stats)}")
