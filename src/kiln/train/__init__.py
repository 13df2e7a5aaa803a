"""Training: the math (cross-entropy, AdamW, clipping, schedules), batches, checkpoints, the loop.

- ``cross_entropy`` (from ``kiln.model.loss``; ``loss`` keeps the old path);  ``optim``: ``AdamW``, ``param_groups``, ``clip_grad_norm_``;
  ``schedule``: ``cosine_lr``, ``wsd_lr``;  ``data``: ``get_batch``, ``TokenSampler``;
- ``checkpoint``: ``save_checkpoint``, ``load_checkpoint``, ``restore_checkpoint``;
- ``config``: ``TrainConfig``, presets ``tiny``/``gpt2_small`` in ``PRESETS``, ``apply_overrides``;
- ``spike``: ``SpikeDetector``;  ``metrics``: log lines, ``metrics.jsonl``, TensorBoard, MFU, plots;
- ``stop``: ``StopRequest`` (pause at a time limit or on SIGTERM, resume exactly);
- the runtime every stage that trains shares (docs/train.md#the-runtime):
  ``state``: ``TrainState`` and ``save_state`` / ``restore_state`` / ``rollback``;
  ``rundir``: ``RunDir`` (reuse, resume, manifest last);  ``step``: ``TrainStep`` (no host syncs);
  ``loop``: ``fit(cfg, state, batches, loss_fn, run, hooks=...)`` and ``Hook``;
- ``trainer``: ``train``, pretraining composed of those parts.
"""

from kiln.distributed.runtime import SingleProcess
from kiln.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_checkpoint_extra,
    restore_checkpoint,
    save_checkpoint,
)
from kiln.train.config import PRESETS, TrainConfig, apply_overrides, gpt2_small, tiny
from kiln.train.data import TokenSampler, get_batch
from kiln.train.loop import (
    Hook,
    accumulation_steps,
    autocast_for,
    check_batch,
    fit,
    micro_batch_size,
)
from kiln.model.loss import cross_entropy
from kiln.train.optim import AdamW, clip_grad_norm_, param_groups
from kiln.train.rundir import RunDir
from kiln.train.schedule import cosine_lr, schedule_lr, wsd_lr
from kiln.train.spike import SpikeDetector
from kiln.train.state import (
    Counters,
    TrainState,
    list_checkpoints,
    restore_state,
    rollback,
    save_state,
)
from kiln.train.step import StepResult, TrainStep, make_loss_fn
from kiln.train.stop import StopRequest
from kiln.train.trainer import build_optimizer, train

__all__ = [
    "PRESETS",
    "AdamW",
    "CheckpointError",
    "Counters",
    "Hook",
    "RunDir",
    "SingleProcess",
    "SpikeDetector",
    "StepResult",
    "StopRequest",
    "TokenSampler",
    "TrainConfig",
    "TrainState",
    "TrainStep",
    "accumulation_steps",
    "apply_overrides",
    "autocast_for",
    "build_optimizer",
    "check_batch",
    "clip_grad_norm_",
    "cosine_lr",
    "cross_entropy",
    "fit",
    "get_batch",
    "gpt2_small",
    "list_checkpoints",
    "load_checkpoint",
    "load_checkpoint_extra",
    "make_loss_fn",
    "micro_batch_size",
    "param_groups",
    "restore_checkpoint",
    "restore_state",
    "rollback",
    "save_checkpoint",
    "save_state",
    "schedule_lr",
    "tiny",
    "train",
    "wsd_lr",
]
