"""The training loop every stage shares: ``fit(cfg, state, batches, loss_fn, run)``.

A stage that trains (pretraining, SFT, DPO, GRPO) supplies three things and gets the rest:

- ``batches``: an iterator of micro-batches, each a tuple of tensors on the device (pretraining:
  ``(x, y)``, (mb, T) each; SFT: ``(x, y, mask)``). Make it ``Stateful`` (``state_dict`` /
  ``load_state_dict``) and put it in ``TrainState.data`` for exact resume; with ``reseed(seed)``
  and ``seed`` a rollback draws a fresh order. ``micro_batch_size(cfg, world_size)`` sequences per
  micro-batch on each rank; the loop draws ``accumulation_steps(cfg, world_size)`` per step.
- ``loss_fn(*batch) -> 0-dim loss``: any differentiable mean loss, closing over the wrapped model.
- ``hooks``: ``Hook(every, fn)`` run at step boundaries (step 0, every ``every`` steps, the last
  step) on rank 0 (every rank under FSDP), e.g. a held-out evaluation or a text sample. A hook
  that returns a dict records it as the run's last evaluation (``state.counters.val``).

``fit`` handles gradient accumulation, clipping, the learning-rate schedule (``cfg.schedule``,
following the clock under ``cfg.max_seconds``), the spike guard (skip, then roll back to the last
good checkpoint), checkpoints every ``cfg.save_every`` steps, logging (a line per
``cfg.log_every`` steps, ``metrics.jsonl`` and TensorBoard through ``run.log``), deterministic
GPU kernels when ``cfg.deterministic`` (``kiln.kernels.deterministic_mode``), and pausing on
``stop`` (time limit, SIGTERM/SIGUSR1: a checkpoint, then ``False``; the CLI exits 75). Steps are
queued without host syncs (``kiln.train.step``): step t's results are read after step t + 1 is queued.
Resumed from a checkpoint (``RunDir.begin``), a run continues bit-identically on the CPU.
"""

from __future__ import annotations

import contextlib
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from time import perf_counter

import torch

from kiln.kernels import deterministic_mode
from kiln.train.config import TrainConfig
from kiln.train.metrics import format_duration, format_rate
from kiln.train.rundir import RunDir
from kiln.train.schedule import schedule_lr
from kiln.train.state import TrainState, rollback, save_state
from kiln.train.step import FaultHook, StepResult, TrainStep
from kiln.train.stop import StopRequest

REPEAT_WARN_EPOCHS = 4.0
"""Passes over the training tokens after which the loop warns once that the run is data-bound:
beyond about four epochs repeated tokens are worth much less than new ones (Muennighoff et al.
2023, "Scaling Data-Constrained Language Models"), and held-out loss can stop improving while
the train loss keeps falling (docs/train.md#speedrun: the 600 s speedrun sees its corpus ~3.8 times)."""


@dataclass
class Hook:
    """``fn(step)`` at step 0, every ``every`` steps and at the last step (see the module docstring)."""

    every: int
    fn: Callable[[int], dict | None]

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every) and (step % self.every == 0 or last)


def micro_batch_size(cfg: TrainConfig, world_size: int) -> int:
    """Sequences per forward/backward on one rank: micro_batch_size, or the per-rank batch when 0."""
    return cfg.micro_batch_size or max(cfg.batch_size // world_size, 1)


def accumulation_steps(cfg: TrainConfig, world_size: int) -> int:
    """Micro-batches per optimizer step on each rank."""
    return cfg.batch_size // (micro_batch_size(cfg, world_size) * world_size)


def check_batch(cfg: TrainConfig, world_size: int) -> None:
    """Fail early (on every rank, before any collective) when the batch does not split over ranks."""
    mb = micro_batch_size(cfg, world_size)
    if cfg.batch_size % (mb * world_size):
        ok = [m for m in range(mb, 0, -1) if cfg.batch_size % (m * world_size) == 0]
        fix = f"set micro_batch_size to {ok[0]}" if ok else f"use a batch_size that is a multiple of {world_size}"
        raise ValueError(f"batch_size {cfg.batch_size} is not divisible by micro_batch_size x world size = "
                         f"{mb} x {world_size}; {fix}, or change the number of ranks")


def autocast_for(dtype: str, device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (weights and optimizer stay fp32: exact master copies, no loss scaling)."""
    if dtype == "bf16" or (dtype == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def fit(cfg: TrainConfig, state: TrainState, batches: Iterator[tuple[torch.Tensor, ...]],
        loss_fn: Callable[..., torch.Tensor], run: RunDir, *, model_step: torch.nn.Module | None = None,
        hooks: Sequence[Hook] = (), stop: StopRequest | None = None, fault_hook: FaultHook | None = None,
        data_tokens: int = 0, flops_per_token: float | None = None, peak_flops: float | None = None) -> bool:
    """Train ``state`` from ``state.step`` to ``cfg.total_steps``; True when finished, False when paused.

    ``run.begin(state)`` must have run (it restores a checkpoint and opens ``run.log``).
    ``model_step``: the wrapped model (``dist.wrap(model)``; default ``state.model``), for ``no_sync``.
    ``fault_hook(step, loss) -> loss`` alters each micro-batch loss before backward (tests).
    ``data_tokens``: tokens in one pass over the data (epochs, the data-bound warning; 0: unknown).
    ``flops_per_token`` and ``peak_flops`` (FLOP/s per device) add MFU to the log.
    """
    if state.data is None and hasattr(batches, "state_dict"):
        state.data = batches
    with deterministic_mode(cfg.deterministic):
        return _Loop(cfg, state, batches, loss_fn, run, model_step, hooks, stop, fault_hook, data_tokens,
                     flops_per_token, peak_flops).run()


class _Loop:
    """``fit``'s state between steps; ``run`` is the loop, top to bottom."""

    def __init__(self, cfg, state, batches, loss_fn, run, model_step, hooks, stop, fault_hook, data_tokens,
                 flops_per_token, peak_flops) -> None:
        self.cfg, self.state, self.run_dir, self.log, self.dist = cfg, state, run, run.log, run.dist
        self.hooks, self.stop, self.data_tokens = list(hooks), stop, data_tokens
        self.max_steps, ws, self.start = cfg.total_steps, run.dist.world_size, state.step
        self.mb, self.accum = micro_batch_size(cfg, ws), accumulation_steps(cfg, ws)
        self.mfu_scale = flops_per_token / (peak_flops * ws) if flops_per_token and peak_flops else None
        device = state.device
        self.step_fn = TrainStep(loss_fn, state.model, model_step or state.model, state.optimizer,
                                 run.dist.clip_grad_norm_, cfg.grad_clip, run.dist, autocast_for(cfg.dtype, device),
                                 device, fault_hook)
        self.step_fn.set_threshold(state.spikes.threshold())
        self.next_batch = lambda: next(batches)
        self.skipped: deque[int] = deque()
        self.pending: StepResult | None = None
        self.t_start = self.last_read = perf_counter()  # last_read: when the last result was read
        self.dt_ema: float | None = None
        self.logged = (state.step, state.counters.seconds)  # at the last log line: its rate is over the interval
        # Rank 0 runs the hooks alone, except under FSDP where every forward is a collective.
        self.looks = run.dist.is_main or run.dist.sharded_params

    def run(self) -> bool:
        s, cfg, start = self.state, self.cfg, self.start
        while True:
            last = s.step == self.max_steps
            looking = last or any(h.due(s.step, False) for h in self.hooks) or self._save_due(s.step)
            if looking and self.pending is not None and self._settle_pending():
                continue  # rolled back: state.step moved
            if self.looks:
                for hook in self.hooks:
                    if hook.due(s.step, last) and (r := hook.fn(s.step)) is not None:
                        s.counters.val = {"step": s.step, **r}
            if (s.step == 0 and start == 0) or (s.step > start and (last or self._save_due(s.step))):
                self._save()
            if last:
                return True
            if looking:
                self.last_read = perf_counter()  # step times exclude hooks and saving
            lr = schedule_lr(cfg, s.step + 1, self.max_steps, s.counters.budget_seconds)  # the first update already moves
            result = self.step_fn(s.step, lr, self.next_batch, self.accum)
            prev, self.pending = self.pending, result
            if prev is not None and self._settle(prev):
                self.pending = None  # rolled back: the step just queued is void
                continue
            s.step += 1
            if cfg.max_seconds and s.counters.budget_seconds >= cfg.max_seconds and s.step < self.max_steps:
                self._settle_pending()
                self.log.info(f"time budget of {cfg.max_seconds:g} s of training steps reached at step {s.step}: finishing")
                self.max_steps = s.step
                continue
            why = self._stop_reason() if self.stop is not None and s.step < self.max_steps else None
            if why:
                self._settle_pending()  # a rollback here moves the step back; the checkpoint is then that step's
                self._save()
                self.stop.paused_at = s.step
                self.log.info(f"paused at step {s.step}/{self.max_steps} ({why}): checkpoint written; "
                              "run the same command again to resume from it")
                return False

    def _save_due(self, step: int) -> bool:
        return bool(self.cfg.save_every) and step % self.cfg.save_every == 0

    def _save(self) -> None:
        path = save_state(self.run_dir.checkpoints, self.state, self.dist, self.cfg.keep_last)
        self.log.info(f"saved checkpoint {path}")

    def _settle_pending(self) -> bool:
        """Read the queued step's results; True when that rolled the run back."""
        r, self.pending = self.pending, None
        return r is not None and self._settle(r)

    def _settle(self, r: StepResult) -> bool:
        """Read step r's results, judge them, log them; True after a rollback (``state.step`` moved)."""
        loss, grad_norm, ok = r.read()
        now = perf_counter()
        dt, self.last_read = now - self.last_read, now
        spikes, c = self.state.spikes, self.state.counters
        verdict = spikes.record(loss, ok, grad_norm)
        self.step_fn.set_threshold(spikes.threshold())
        if verdict is not None and self._skip(r, verdict, loss, grad_norm):
            return True
        self.dt_ema = dt if self.dt_ema is None else 0.9 * self.dt_ema + 0.1 * dt
        c.seconds += dt
        if not c.first_step_timed:  # this process's first step carries the compilation: off the budget
            c.first_step_timed, c.first_step_seconds = True, dt
            c.excluded_seconds += dt
        if verdict is None:
            c.train_losses.append(loss)
        before, c.tokens_seen = c.tokens_seen, (r.step + 1) * self.cfg.tokens_per_step
        if (repeat := repeat_warning(before, c.tokens_seen, self.data_tokens)) is not None:
            self.log.warning(f"step {r.step + 1}: {repeat}")
        self._log_step(r, loss, grad_norm, dt, skipped=verdict is not None)
        return False

    def _skip(self, r: StepResult, verdict: str, loss: float, grad_norm: float) -> bool:
        """Count a skipped update; roll back after ``rollback_after`` within the window (True)."""
        cfg, c = self.cfg, self.state.counters
        c.skips += 1
        self.skipped.append(r.step)
        while self.skipped and self.skipped[0] <= r.step - cfg.spike_window:
            self.skipped.popleft()
        self.log.warning(f"step {r.step}: {verdict} loss {loss:.4g} (grad norm {grad_norm:.3g}; "
                         f"{self.state.spikes.describe()}): update skipped "
                         f"({len(self.skipped)}/{cfg.rollback_after} within {cfg.spike_window} steps before a rollback)")
        self.log.metrics({"step": r.step + 1, "event": "skip", "reason": verdict})
        if len(self.skipped) < cfg.rollback_after:
            return False
        first_bad = self.skipped[0]
        path = rollback(self.run_dir.checkpoints, first_bad, self.state, self.dist, cfg.max_rollbacks)
        self.skipped.clear()
        self.step_fn.set_threshold(self.state.spikes.threshold())
        self.last_read = perf_counter()
        self.log.warning(f"ROLLBACK {c.rollbacks}/{cfg.max_rollbacks}: {cfg.rollback_after} bad steps since step "
                         f"{first_bad}; restored {path.name} (step {self.state.step}) and reseeded the data order")
        self.log.metrics({"step": self.state.step, "event": "rollback", "from_step": first_bad})
        return True

    def _log_step(self, r: StepResult, loss: float, grad_norm: float, dt: float, skipped: bool) -> None:
        """The step's ``metrics.jsonl`` row, and every ``log_every`` steps a line whose rate is over the
        steps since the last line (one step's time between two reads of a pipelined loop jitters)."""
        cfg, c, done = self.cfg, self.state.counters, r.step + 1
        tok_s = cfg.tokens_per_step / dt
        mfu = lambda rate: self.mfu_scale * rate if self.mfu_scale else None
        if cfg.log_every and (done % cfg.log_every == 0 or done == self.max_steps or r.step == self.start):
            steps_since, secs_since = done - self.logged[0], c.seconds - self.logged[1]
            rate = cfg.tokens_per_step * steps_since / secs_since if steps_since > 0 and secs_since > 0 else tok_s
            self.logged = (done, c.seconds)
            line = f"step {done}/{self.max_steps} | loss {loss:.3f} | lr {r.lr:.1e} | {format_rate(rate)} tok/s"
            line += f" | mfu {100 * mfu(rate):.1f}%" if self.mfu_scale else ""
            eta = self.dt_ema * (self.max_steps - done)
            if cfg.max_seconds:  # a time budget ends the run first, whatever max_steps says
                eta = min(eta, max(cfg.max_seconds - c.budget_seconds, 0.0))
            self.log.info(line + f" | eta {format_duration(eta)}")
        self.log.metrics({"step": done, "loss": loss, "lr": r.lr, "grad_norm": grad_norm, "tok_s": tok_s,
                          "mfu": mfu(tok_s), "tokens": c.tokens_seen, "epochs": round(epochs(c.tokens_seen, self.data_tokens), 4),
                          "time": round(perf_counter() - self.t_start, 3), "skipped": skipped})

    def _stop_reason(self) -> str | None:
        """This process's reason to pause; with several ranks, every rank's, agreed every 10 steps
        (one tiny all-reduce) so all of them save the same step."""
        why = self.stop.reason()
        if self.dist.world_size == 1:
            return why
        if self.state.step % 10:
            return None
        dev = torch.device(self.dist.device) if self.dist.device is not None else torch.device("cpu")
        flag = self.dist.all_reduce_mean(torch.tensor([1.0 if why else 0.0], device=dev))
        return (why or "another rank asked to stop") if float(flag) > 0 else None


def epochs(tokens_seen: int, data_tokens: int) -> float:
    """Passes over the training tokens so far (windows are drawn at random, so this is an average)."""
    return tokens_seen / data_tokens if data_tokens else 0.0


def repeat_warning(before: int, after: int, data_tokens: int) -> str | None:
    """The one-time data-bound warning, if the step that took ``tokens_seen`` from ``before`` to
    ``after`` crossed ``REPEAT_WARN_EPOCHS`` passes over the training tokens."""
    limit = REPEAT_WARN_EPOCHS * data_tokens
    if not data_tokens or not before < limit <= after:
        return None
    return (f"the run has now drawn {REPEAT_WARN_EPOCHS:g}x its {data_tokens:,} training tokens: repeated tokens "
            "add little from here and the held-out loss may stop improving while the train loss falls; "
            "more data helps most, else stronger weight decay (weight_decay, or muon_weight_decay with "
            "optimizer=muon) or a smaller model (docs/train.md#speedrun)")
