"""Everything a run must carry across a checkpoint: ``TrainState``, and save / restore / rollback.

``TrainState`` gathers the run's parts, each ``Stateful`` (``state_dict()`` / ``load_state_dict()``,
the torchtitan way): the model, the optimizer(s), the batch source's position (``data``), the spike
guard's window, the step, the RNG states of every generator this process draws from (torch CPU,
this rank's CUDA device, numpy, Python) and the run's counters. One dict of those parts is what a
checkpoint holds, so a run stopped at step k and resumed draws the same batches, the same random
numbers and takes bit-identical steps on the CPU.

    state = TrainState(model, optimizer, data=batches, spikes=SpikeDetector(...), config=config_to_dict(cfg))
    save_state(run.checkpoints, state, dist, keep_last=2)     # checkpoints/step_000042/, atomic
    restore_state(path, state, dist)                          # state.step is the saved step
    rollback(run.checkpoints, first_bad, state, dist, ...)    # newest checkpoint <= first_bad, new data order

Checkpoint layout (``kiln.train.checkpoint``): model / optimizer / extra safetensors and meta.json;
``extra`` holds ``config``, ``sampler`` (the data position), ``spikes``, ``rng``, ``counters``.
Under FSDP or ZeRO-1 every rank first writes its shards to ``step_X/shards/`` (DCP), then rank 0
the rest to ``step_X/trainer/``.
"""

from __future__ import annotations

import random
import shutil
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from kiln.train.checkpoint import (
    CheckpointError,
    load_checkpoint_extra,
    restore_checkpoint,
    save_checkpoint,
)
from kiln.train.spike import SpikeDetector

RESEED_STRIDE = 7919
"""A rollback reseeds the data order to ``seed + RESEED_STRIDE * rollbacks`` (a prime: new orders)."""


class Stateful(Protocol):
    """A run part whose position a checkpoint keeps (a batch source, a detector)."""

    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class Counters:
    """Numbers that live across steps and checkpoints (skips, time, tokens, the last evaluation)."""

    skips: int = 0
    rollbacks: int = 0
    tokens_seen: int = 0
    seconds: float = 0.0  # every step's time, all processes of the run
    excluded_seconds: float = 0.0  # the first (compiling) step of every process so far
    first_step_seconds: float = 0.0  # this process's first step; not checkpointed
    first_step_timed: bool = False  # not checkpointed: a resumed process compiles again
    val: dict | None = None  # the last evaluation's results, {"step": s, "loss": ..., ...}
    train_losses: deque = field(default_factory=lambda: deque(maxlen=20))

    @property
    def budget_seconds(self) -> float:
        """Seconds that count against ``max_seconds``: training steps, each process's first excluded."""
        return self.seconds - self.excluded_seconds

    def state_dict(self) -> dict:
        return {"skips": self.skips, "rollbacks": self.rollbacks, "tokens_seen": self.tokens_seen,
                "seconds": self.seconds, "excluded_seconds": self.excluded_seconds, "val": self.val,
                "train_losses": list(self.train_losses)}

    def load_state_dict(self, c: dict) -> None:
        self.skips, self.rollbacks, self.tokens_seen = c["skips"], c["rollbacks"], c["tokens_seen"]
        self.seconds, self.val = c["seconds"], c["val"]
        self.excluded_seconds = c.get("excluded_seconds", 0.0)  # absent in checkpoints before it existed
        self.train_losses.clear()
        self.train_losses.extend(c["train_losses"])


@dataclass
class TrainState:
    """The whole state of a run (see the module docstring).

    ``model`` is the plain module (not the data-parallel wrapper); ``data`` the batch source (any
    ``Stateful``; with ``reseed(seed)`` and ``seed`` a rollback draws a fresh order); ``config`` the
    run's config as a dict, stored in every checkpoint (a resume with another ``config["model"]`` is
    refused).
    """

    model: torch.nn.Module
    optimizer: Any
    data: Any = None
    spikes: SpikeDetector = field(default_factory=lambda: SpikeDetector(50, 20, 6.0, 1.3))
    config: dict = field(default_factory=dict)
    step: int = 0
    counters: Counters = field(default_factory=Counters)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def extra_state_dict(self) -> dict:
        """Every part but the model and optimizer tensors: what ``extra.safetensors`` holds."""
        return {"config": self.config, "sampler": self.data.state_dict() if self.data is not None else None,
                "spikes": self.spikes.state_dict(), "rng": rng_state(self.device),
                "counters": self.counters.state_dict()}

    def load_extra_state_dict(self, extra: dict) -> None:
        """Inverse of ``extra_state_dict`` (sets the RNGs of this process)."""
        if self.data is not None and extra.get("sampler") is not None:
            self.data.load_state_dict(extra["sampler"])
        self.spikes.load_state_dict(extra["spikes"])
        set_rng_state(extra["rng"], self.device)
        self.counters.load_state_dict(extra["counters"])

    def state_dict(self) -> dict:
        """The whole state: ``model``, ``optimizer``, ``step`` and the extra parts."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                **self.extra_state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.model.load_state_dict(sd["model"])
        self.optimizer.load_state_dict(sd["optimizer"])
        self.step = int(sd["step"])
        self.load_extra_state_dict(sd)


def rng_state(device: torch.device) -> dict:
    """This process's RNG states: torch (CPU), numpy, Python, and ``device``'s CUDA generator."""
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


def set_rng_state(state: dict, device: torch.device) -> None:
    """Inverse of ``rng_state``."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    v, internal, gauss = state["python"]
    random.setstate((v, tuple(internal), gauss))
    if "cuda" in state and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def checkpoint_step(path: Path) -> int:
    """The step of ``checkpoints/step_000042`` (42)."""
    return int(path.name.split("_")[1])


def list_checkpoints(ckpts: Path) -> list[Path]:
    """Complete checkpoints (meta.json, or trainer/meta.json after the shards of a sharded one), oldest first."""
    if not ckpts.is_dir():
        return []
    return sorted(p for p in ckpts.glob("step_*") if (p / "meta.json").is_file() or (p / "trainer" / "meta.json").is_file())


def save_state(ckpts: Path, state: TrainState, dist: Any, keep_last: int = 2) -> Path:
    """Write ``state`` to ``ckpts/step_XXXXXX`` (every rank calls; rank 0 writes) and keep the newest
    ``keep_last`` checkpoints. Under FSDP or ZeRO-1 every rank first writes its shards (DCP)."""
    path = ckpts / f"step_{state.step:06d}"
    extra = state.extra_state_dict()
    if dist.sharded_checkpoints:
        # Before the first update the optimizer has no state; asking DCP for it would create some
        # (a zero-lr step), shifting Adam's bias correction. Such a checkpoint holds the model only.
        with_optimizer = state.step > 0
        if dist.is_main:
            shutil.rmtree(path, ignore_errors=True)  # a partial save, or the same step before a rollback
        dist.barrier()
        dist.save_sharded(path / "shards", state.model, state.optimizer if with_optimizer else None)  # ends with a barrier
        if dist.is_main:
            save_checkpoint(torch.nn.Module(), None, state.step, path / "trainer",
                            sharded={"optimizer": with_optimizer, "world_size": dist.world_size}, **extra)
    elif dist.is_main:
        save_checkpoint(state.model, state.optimizer, state.step, path, **extra)
    if dist.is_main:
        for old in list_checkpoints(ckpts)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def restore_state(path: Path, state: TrainState, dist: Any) -> int:
    """Load the checkpoint ``path`` into ``state`` (model, optimizer, data position, RNG, counters);
    returns and sets ``state.step``. A checkpoint of another model config is refused."""
    sharded = (path / "trainer" / "meta.json").is_file()
    meta_dir = path / "trainer" if sharded else path
    saved = load_checkpoint_extra(meta_dir).get("config") or {}
    if "model" in state.config and saved.get("model") != state.config["model"]:
        raise ValueError(f"{path} was trained with another model config ({saved.get('model')}); "
                         "use a new --out directory, or --no-resume to start over here")
    if sharded:  # DCP reshards to this job: saved on 2 ranks, resumable on 1 or 4
        step, extra = restore_checkpoint(meta_dir, torch.nn.Module(), None)
        dist.load_sharded(path / "shards", state.model, state.optimizer if extra["sharded"]["optimizer"] else None)
        if not extra["sharded"]["optimizer"]:
            state.optimizer.state.clear()  # saved before the first update: a rollback to it starts Adam afresh
    elif dist.sharded_checkpoints:
        raise ValueError(f"{path} is a whole-model checkpoint but this run shards its state (fsdp or --zero1); "
                         "resume it once with --dist-strategy ddp and no --zero1, or start over with --no-resume")
    else:
        step, extra = restore_checkpoint(path, state.model, state.optimizer)
    try:
        state.load_extra_state_dict(extra)
    except KeyError as e:
        raise CheckpointError(f"checkpoint {path} lacks {e} in its run state; resume from an earlier checkpoint "
                              "or start over with --no-resume") from None
    state.step = step
    return step


def rollback(ckpts: Path, first_bad: int, state: TrainState, dist: Any, max_rollbacks: int) -> Path:
    """Restore the newest checkpoint at or before step ``first_bad`` and reseed the data order (the
    bad batches are not replayed); raises after ``max_rollbacks``. Returns the checkpoint used."""
    c = state.counters
    c.rollbacks += 1
    if c.rollbacks > max_rollbacks:
        raise RuntimeError(f"loss spiked again after {max_rollbacks} rollbacks (last at step {first_bad}); "
                           "giving up: lower lr, raise warmup_steps or grad_clip, or check the data")
    good = [p for p in list_checkpoints(ckpts) if checkpoint_step(p) <= first_bad]
    if not good:
        raise RuntimeError(f"loss spikes from step {first_bad} and no checkpoint before it to roll back to; "
                           "lower lr or save more often (save_every)")
    rollbacks, skips = c.rollbacks, c.skips
    restore_state(good[-1], state, dist)
    c.rollbacks, c.skips = rollbacks, skips
    if state.data is not None and hasattr(state.data, "reseed"):
        state.data.reseed(state.data.seed + RESEED_STRIDE * rollbacks)
    return good[-1]
