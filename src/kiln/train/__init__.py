"""Training: the math (cross-entropy, AdamW, clipping, schedules), batches, checkpoints, the loop.

- ``cross_entropy`` (from ``kiln.model.loss``; ``loss`` keeps the old path);  ``optim``: ``AdamW``, ``param_groups``, ``clip_grad_norm_``;
  ``schedule``: ``cosine_lr``, ``wsd_lr``;  ``data``: ``get_batch``, ``TokenSampler``;
- ``checkpoint``: ``save_checkpoint``, ``load_checkpoint``, ``restore_checkpoint``;
- ``config``: ``TrainConfig``, presets ``tiny``/``gpt2_small`` in ``PRESETS``, ``apply_overrides``;
- ``spike``: ``SpikeDetector``;  ``metrics``: log lines, ``metrics.jsonl``, TensorBoard, MFU, plots;
- ``stop``: ``StopRequest`` (pause at a time limit or on SIGTERM, resume exactly);
- ``trainer``: ``train``, the loop. See docs/train.md.
"""

from kiln.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    load_checkpoint_extra,
    restore_checkpoint,
    save_checkpoint,
)
from kiln.train.config import PRESETS, TrainConfig, apply_overrides, gpt2_small, tiny
from kiln.train.data import TokenSampler, get_batch
from kiln.model.loss import cross_entropy
from kiln.train.optim import AdamW, clip_grad_norm_, param_groups
from kiln.train.schedule import cosine_lr, wsd_lr
from kiln.train.spike import SpikeDetector
from kiln.train.stop import StopRequest
from kiln.train.trainer import SingleProcess, train

__all__ = [
    "PRESETS",
    "AdamW",
    "CheckpointError",
    "SingleProcess",
    "SpikeDetector",
    "StopRequest",
    "TokenSampler",
    "TrainConfig",
    "apply_overrides",
    "clip_grad_norm_",
    "cosine_lr",
    "cross_entropy",
    "get_batch",
    "gpt2_small",
    "load_checkpoint",
    "load_checkpoint_extra",
    "param_groups",
    "restore_checkpoint",
    "save_checkpoint",
    "tiny",
    "train",
    "wsd_lr",
]
