"""Loss-spike guard: judge each step's loss against a window of recent good losses."""

from __future__ import annotations

import math
from collections import deque


class SpikeDetector:
    """Flags non-finite losses always, and finite ones that are far above the recent window.

    A loss is a spike when, with at least ``min_history`` good losses in the window, it exceeds both
    ``mean + zscore * std`` and ``ratio * mean``: the z-score catches jumps in a quiet late phase, the
    ratio keeps a nearly flat window (tiny std) from flagging ordinary noise. Flagged losses are not
    added to the window. ``state_dict`` makes the detector part of an exact resume.
    """

    def __init__(self, window: int, min_history: int, zscore: float, ratio: float) -> None:
        self.window, self.min_history, self.zscore, self.ratio = window, min_history, zscore, ratio
        self.history: deque[float] = deque(maxlen=window)

    def check(self, loss: float) -> str | None:
        """Return why ``loss`` is bad (``"non-finite"``, ``"spike"``), or None and record it."""
        if not math.isfinite(loss):
            return "non-finite"
        if loss > self.threshold():
            return "spike"
        self.history.append(loss)
        return None

    def _mean_std(self) -> tuple[float, float]:
        n = len(self.history)
        mean = sum(self.history) / n
        return mean, math.sqrt(sum((v - mean) ** 2 for v in self.history) / (n - 1))

    def threshold(self) -> float:
        """The loss above which the next step is a spike: ``max(mean + zscore * std, ratio * mean)``
        of the window, or ``inf`` while it holds fewer than ``min_history`` losses. The GPU step
        compares against this value (``kiln.train.step``) so the host never reads the loss first."""
        if len(self.history) < max(self.min_history, 2):
            return math.inf
        mean, std = self._mean_std()
        return max(mean + self.zscore * std, self.ratio * mean)

    def record(self, loss: float, ok: bool, grad_norm: float = 0.0) -> str | None:
        """Record a step the device already judged (``ok``): a good loss joins the window; a bad one
        returns its reason (``"non-finite"`` loss or gradient norm, else ``"spike"``)."""
        if ok:
            self.history.append(loss)
            return None
        return "non-finite" if not (math.isfinite(loss) and math.isfinite(grad_norm)) else "spike"

    def describe(self) -> str:
        """Mean and std of the window, for log lines."""
        if len(self.history) < 2:
            return f"{len(self.history)} losses in window"
        mean, std = self._mean_std()
        return f"window mean {mean:.3f} std {std:.3f}"

    def state_dict(self) -> dict:
        """The window of recent good losses."""
        return {"history": list(self.history)}

    def load_state_dict(self, state: dict) -> None:
        """Restore a window saved by ``state_dict``."""
        self.history = deque((float(v) for v in state["history"]), maxlen=self.window)
