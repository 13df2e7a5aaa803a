"""Pretraining: ``train(cfg, tokens_dir, out_dir)`` -> a run directory, composed of the runtime's parts.

``train`` reads top to bottom: open the token shards, enter the run directory (``RunDir``: reuse,
resume, manifest last), build the model, optimizer and batch source into a ``TrainState``, restore
the newest checkpoint, add the held-out evaluation and text-sample hooks, ``fit``, export the model,
write the manifest. The loop itself is ``kiln.train.loop.fit``; SFT, DPO and GRPO call the same
parts with their own batches and loss (docs/train.md#the-runtime).

Run directory::

    train.log  metrics.jsonl  tb/  checkpoints/step_XXXXXX/  model/  loss.png  manifest.json (last)

Distributed seam: ``dist`` is a ``kiln.distributed.RuntimeProtocol``: ``SingleProcess()`` (the
default) or ``kiln.distributed.Runtime.start(...)`` under torchrun. This module never calls
torch.distributed.
"""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kiln.artifacts import code_version, config_to_dict
from kiln.distributed import SingleProcess, pick_device
from kiln.shards.sampler import WindowSampler
from kiln.train.config import TrainConfig
from kiln.train.data import read_heldout
from kiln.train.loop import (  # noqa: F401 - REPEAT_WARN_EPOCHS, repeat_warning: public here before the split
    REPEAT_WARN_EPOCHS,
    Hook,
    autocast_for,
    check_batch,
    epochs,
    fit,
    micro_batch_size,
    repeat_warning,
)
from kiln.train.metrics import RunLog, log, peak_flops
from kiln.train.optim import AdamW, param_groups
from kiln.train.rundir import RunDir
from kiln.train.spike import SpikeDetector
from kiln.train.state import TrainState
from kiln.train.step import FaultHook, make_loss_fn
from kiln.train.stop import StopRequest

_repeat_warning, _epochs = repeat_warning, epochs  # the names tests and notebooks used before the split


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
    ``stop.paused_at`` is set, and the same call resumes it. ``dist``: a
    ``kiln.distributed.RuntimeProtocol`` (default ``SingleProcess()``).
    """
    dist = dist or SingleProcess()
    tokens_dir = Path(tokens_dir)
    cfg = _override_steps(cfg, max_steps_override)
    data = PretrainData.open(tokens_dir, cfg)
    cfg = _fit_vocab(cfg, data.vocab_size)
    tokenizer_path = tokenizer_path or _find_tokenizer(tokens_dir)
    inputs = [p for p in (tokens_dir, tokenizer_path) if p is not None]
    with RunDir(out_dir, "train", cfg, inputs, resume=resume, dist=dist) as run:
        if run.reused:
            log.info(f"{run.path} holds a finished run with this config and inputs: reused (--no-resume retrains)")
            return run.path
        check_batch(cfg, dist.world_size)  # on every rank, before any collective
        state, model_step = build_state(cfg, data, dist)
        run.begin(state)
        tokenizer = _load_tokenizer(tokenizer_path, run.log)
        _log_header(run, cfg, state, data, tokens_dir)
        hooks = _pretrain_hooks(cfg, state, data, tokenizer, run.log)
        loss_fn = make_loss_fn(model_step, state.model, cfg.loss_impl, cfg.compile, cfg.compile_mode)
        finished = fit(cfg, state, state.data, loss_fn, run, model_step=model_step, hooks=hooks, stop=stop,
                       fault_hook=fault_hook, data_tokens=data.train_tokens,
                       flops_per_token=state.model.flops_per_token(cfg.model.context_length),
                       peak_flops=peak_flops(state.device))
        if finished:
            final = _exportable(state.model, cfg, dist)  # under FSDP a collective: every rank takes part
            run.export_model(final, tokenizer_path)
            stats = _stats(cfg, state, final, data.train_tokens)
            run.finish(stats, seconds=stats["seconds"])
            dist.barrier()
    return run.path


def build_state(cfg: TrainConfig, data: PretrainData, dist: Any) -> tuple[TrainState, torch.nn.Module]:
    """Seed, build the model on its device, wrap it (``dist.wrap``), build the optimizer and the
    batch source: the run's ``TrainState`` at step 0, and the wrapped model to train through."""
    from kiln.model import build_model

    device = pick_device(cfg.device, dist)
    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for any fp32 matmul left outside autocast
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, device=device)
    model_step = dist.wrap(model)  # FSDP2 replaces model's parameters in place: build the optimizer after
    optimizer = build_optimizer(cfg, model, dist, device)
    # One global stream of windows; this rank's rows of each micro-batch (a 2-rank run equals 1 process).
    batches = WindowSampler(data.train, cfg.model.context_length, cfg.seed,
                            doc_starts=data.doc_starts if cfg.doc_aligned else None,
                            batch_size=micro_batch_size(cfg, dist.world_size), rank=dist.rank,
                            world_size=dist.world_size, device=device)
    spikes = SpikeDetector(cfg.spike_window, cfg.spike_min_history, cfg.spike_zscore, cfg.spike_ratio)
    return TrainState(model, optimizer, data=batches, spikes=spikes, config=config_to_dict(cfg)), model_step


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module, dist: Any, device: torch.device) -> Any:
    """Kiln's AdamW (guarded, fused on CUDA), ZeRO-1 sharded when ``dist`` says so; or Muon + AdamW.

    Every param group carries ``lr_scale``: the step sets ``group["lr"] = schedule_lr * lr_scale``,
    so one schedule drives AdamW (scale 1) and Muon (scale muon_lr / lr) together.
    """
    dist = dist or SingleProcess()
    fused = cfg.fused_optimizer and device.type == "cuda"
    kw = {"lr": cfg.lr, "betas": cfg.betas, "eps": cfg.eps, "fused": fused}
    if cfg.optimizer == "muon":
        from kiln.train.muon import muon_with_adamw

        if dist.zero1 or dist.sharded_params:
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
    return dist.optimizer(model, AdamW, params=groups, **kw)


_build_optimizer = build_optimizer  # the name before the split


def _pretrain_hooks(cfg: TrainConfig, state: TrainState, data: PretrainData, tokenizer: Any, runlog: RunLog) -> list[Hook]:
    """Held-out loss and bits per byte every ``eval_every`` steps; a text sample every ``sample_every``."""
    model, device = state.model, state.device
    amp = autocast_for(cfg.dtype, device)
    hooks = []
    if cfg.eval_every and data.val is not None:
        token_bytes = tokenizer.token_bytes() if tokenizer is not None else None
        hooks.append(Hook(cfg.eval_every, lambda step: _evaluate(model, data, token_bytes, cfg, device, amp, step, runlog)))
    elif cfg.eval_every:
        runlog.warning(f"no held-out tokens in {data.tokens_dir} (val_*.bin missing, or shorter than one "
                       f"{cfg.model.context_length + 1}-token window): no validation loss; tokenize the "
                       "corpus with a validation split, or set eval_every=0 to silence this")
    if cfg.sample_every and tokenizer is not None:
        hooks.append(Hook(cfg.sample_every, lambda step: _sample(model, tokenizer, cfg, device, amp, step, runlog)))
    return hooks


def _exportable(model: torch.nn.Module, cfg: TrainConfig, dist: Any) -> torch.nn.Module:
    """``model`` itself, or under FSDP a plain CPU copy gathered from the shards (every rank calls)."""
    if not dist.sharded_params:
        return model
    from kiln.model import build_model

    plain = build_model(cfg.model, device="cpu")
    plain.load_state_dict(dist.full_state_dict(model))
    return plain


@dataclass
class PretrainData:
    """The run's token arrays: train shards (memmaps), a validation array, the vocab size."""

    train: list[np.ndarray]
    val: np.ndarray | None
    vocab_size: int
    doc_starts: list[np.ndarray] | None = None  # per train shard, for doc_aligned windows
    tokens_dir: Path | None = None

    @property
    def train_tokens(self) -> int:
        """Tokens in one pass over the training shards (for epochs and the data-bound warning)."""
        return sum(len(t) for t in self.train)

    @classmethod
    def open(cls, tokens_dir: Path, cfg: TrainConfig) -> PretrainData:
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
        return cls(train=[s.tokens for s in train], val=val, vocab_size=vocab,
                   doc_starts=[s.doc_starts for s in train], tokens_dir=tokens_dir)


_Data = PretrainData  # the name before the split


def _override_steps(cfg: TrainConfig, n: int | None) -> TrainConfig:
    """``max_steps_override``: n steps, no token budget; a warm-up longer than the run shrinks to a tenth of it."""
    if n is None:
        return cfg
    return replace(cfg, max_steps=n, max_tokens=0, warmup_steps=cfg.warmup_steps if cfg.warmup_steps <= n else n // 10)


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


@torch.no_grad()
def _evaluate(model, data: PretrainData, token_bytes, cfg: TrainConfig, device, amp, step: int, runlog) -> dict:
    from kiln.model.heldout import evaluate_heldout

    dtype = torch.bfloat16 if isinstance(amp, torch.autocast) else None
    r = evaluate_heldout(model, data.val, token_bytes, cfg.model.context_length, cfg.micro_batch,
                         max_batches=None, device=device, autocast_dtype=dtype)  # data.val is cut to size
    bpb = f" | val bpb {r['bpb']:.4f}" if r["bpb"] is not None else ""
    runlog.info(f"step {step} | val loss {r['loss']:.4f}{bpb} | {r['tokens']} tokens")
    runlog.metrics({"step": step, "val_loss": r["loss"], "val_bpb": r["bpb"]})
    return r


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
    """Temperature sampling with top-k 50 through ``kiln.generate``."""
    from kiln.generate import generate

    was_training = model.training
    model.eval()
    try:
        with amp:
            return generate(model, tokenizer, cfg.sample_prompt, max_new_tokens=cfg.sample_tokens,
                            temperature=cfg.sample_temperature, top_k=50, top_p=None, seed=cfg.seed)
    finally:
        model.train(was_training)


def _log_header(run: RunDir, cfg: TrainConfig, state: TrainState, data: PretrainData, tokens_dir: Path) -> None:
    runlog, model, device, ws = run.log, state.model, state.device, run.dist.world_size
    mb = micro_batch_size(cfg, ws)
    accum = cfg.batch_size // (mb * ws)
    amp = autocast_for(cfg.dtype, device)
    runlog.info(f"kiln train | code {json.dumps(code_version())}")
    runlog.info(f"config {json.dumps(config_to_dict(cfg))}")
    runlog.info(f"inputs {json.dumps(run.inputs)}")
    what = "bf16 autocast" if isinstance(amp, torch.autocast) else "fp32"
    runlog.info(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), {what}; "
                f"model {model.num_params() / 1e6:.2f}M params; {cfg.tokens_per_step} tokens/step "
                f"({mb} x {accum} accum x {ws} ranks x {cfg.model.context_length}); "
                + (f"resuming at step {state.step}" if state.step else "starting at step 0"))
    if data.train_tokens:
        planned = ("" if cfg.max_seconds else
                   f"; {cfg.total_steps} steps = {epochs(cfg.total_steps * cfg.tokens_per_step, data.train_tokens):.2f} epochs")
        runlog.info(f"data: {data.train_tokens:,} training tokens{planned}")
    if device.type == "cuda":
        try:
            smi = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=10, check=False).stdout
            runlog.info("nvidia-smi\n" + smi.rstrip())
        except (OSError, subprocess.SubprocessError):
            pass


def _stats(cfg: TrainConfig, state: TrainState, model: torch.nn.Module, train_tokens: int) -> dict:
    """The manifest's summary of a finished run."""
    c = state.counters
    losses = list(c.train_losses)
    return {
        "steps": c.tokens_seen // cfg.tokens_per_step,  # done (a time budget may end the run early)
        "max_steps": cfg.total_steps,
        "final_train_loss": sum(losses) / len(losses) if losses else None,
        "val_loss": c.val["loss"] if c.val else None,
        "val_bpb": c.val["bpb"] if c.val else None,
        "tokens_seen": c.tokens_seen,
        "train_tokens": train_tokens,
        "epochs": round(epochs(c.tokens_seen, train_tokens), 3),
        "seconds": round(c.seconds, 3),
        "train_seconds": round(c.budget_seconds, 3),  # without any process's first (compiling) step
        "first_step_seconds": round(c.first_step_seconds, 3),
        "params": model.num_params(),
        "skipped_steps": c.skips,
        "rollbacks": c.rollbacks,
    }
