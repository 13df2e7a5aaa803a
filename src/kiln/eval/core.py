"""A CORE-style aggregate: one number that tracks a run across many benchmarks.

Each task's accuracy is centered by its random-guess baseline and rescaled so chance is 0 and a
perfect score is 1: ``(acc - baseline) / (1 - baseline)``; the aggregate is the mean over tasks
(llm-foundry's Eval Gauntlet; DCLM's CORE, arXiv:2406.11794). A model below chance scores negative.
"""

from __future__ import annotations

from collections.abc import Mapping


def centered(acc: float, baseline: float) -> float:
    """Accuracy above chance rescaled to [.., 1]: ``(acc - baseline) / (1 - baseline)``."""
    if not 0.0 <= baseline < 1.0:
        raise ValueError(f"random baseline {baseline} must be in [0, 1)")
    return (acc - baseline) / (1.0 - baseline)


def core_score(results: Mapping[str, tuple[float, float]]) -> float:
    """Mean centered accuracy over ``{task: (accuracy, random_baseline)}``."""
    if not results:
        raise ValueError("core_score needs at least one task")
    return sum(centered(a, b) for a, b in results.values()) / len(results)
