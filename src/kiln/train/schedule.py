"""Learning-rate schedules as pure functions of the step: cosine and warmup-stable-decay."""

from __future__ import annotations

import math
from typing import Any


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, cosine_steps: int) -> float:
    """Linear warm-up to ``max_lr``, then cosine decay to ``min_lr`` at ``cosine_steps``, then flat.

    ``lr(t) = t / Tw * max_lr`` for ``t < Tw``; ``min + (max - min) * (1 + cos(pi (t - Tw) / (Tc - Tw))) / 2``
    for ``Tw <= t <= Tc``; ``min_lr`` after (SGDR, Loshchilov & Hutter, arXiv:1608.03983).
    """
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    if step > cosine_steps:
        return min_lr
    span = cosine_steps - warmup_steps
    if span <= 0:
        return max_lr if step == warmup_steps else min_lr
    progress = (step - warmup_steps) / span
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def wsd_lr(
    step: int, max_lr: float, min_lr: float, warmup_steps: int, stable_steps: int, decay_steps: int
) -> float:
    """Warmup-stable-decay: linear warm-up, ``max_lr`` held for ``stable_steps``, then linear decay
    to ``min_lr`` over ``decay_steps`` and flat after.

    A constant rate with a short final cool-down matches cosine at the same budget and lets a run be
    extended or branched from any stable-phase checkpoint (MiniCPM, arXiv:2404.06395; Hägele et al.,
    arXiv:2405.18392).
    """
    if step < warmup_steps:
        return max_lr * step / warmup_steps
    decay_start = warmup_steps + stable_steps
    if step < decay_start:
        return max_lr
    if decay_steps <= 0 or step >= decay_start + decay_steps:
        return min_lr
    frac = (step - decay_start) / decay_steps
    return max_lr + (min_lr - max_lr) * frac


def schedule_lr(cfg: Any, t: int, max_steps: int, elapsed: float = 0.0) -> float:
    """The learning rate of update ``t`` (1-based) under a ``TrainConfig``'s schedule (``lr``,
    ``min_lr``, ``warmup_steps``, ``schedule``, ``decay_frac``). With a time budget (``max_seconds``)
    the decay follows whichever is further along, steps or seconds, so a run cut by its budget ends
    decayed."""
    if cfg.max_seconds:
        t = max(t, min(round(max_steps * elapsed / cfg.max_seconds), max_steps))
    if cfg.schedule == "wsd":
        decay = min(round(cfg.decay_frac * max_steps), max(max_steps - cfg.warmup_steps, 0))
        stable = max_steps - cfg.warmup_steps - decay  # so the decay ends exactly at the last step
        return wsd_lr(t, cfg.lr, cfg.min_lr, cfg.warmup_steps, stable, decay)
    return cosine_lr(t, cfg.lr, cfg.min_lr, cfg.warmup_steps, max_steps)
