"""Run logging: one human line per step, mirrored to ``metrics.jsonl`` and TensorBoard; MFU; plots."""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("kiln.train")

# Dense bf16 tensor-core peaks (FLOP/s, no sparsity), from the vendors' datasheets. Matched by
# substring of torch.cuda.get_device_name(), most specific first.
PEAK_FLOPS_BF16 = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("GH200", 989e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("L40S", 362e12),
    ("L4", 121e12),
    ("A10G", 70e12),
    ("RTX 4090", 165e12),
]


def peak_flops(device: torch.device) -> float | None:
    """Peak dense bf16 FLOP/s of ``device`` if known (None on the CPU and unknown GPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_BF16:
        if key in name:
            return flops
    return None


def format_duration(seconds: float) -> str:
    """``75`` -> ``1m15s``; ``4000`` -> ``1h06m``."""
    s = max(round(seconds), 0)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{(s % 3600) // 60:02d}m"


def format_rate(tokens_per_s: float) -> str:
    """``41234`` -> ``41.2k``."""
    if tokens_per_s >= 1e6:
        return f"{tokens_per_s / 1e6:.2f}M"
    if tokens_per_s >= 1e3:
        return f"{tokens_per_s / 1e3:.1f}k"
    return f"{tokens_per_s:.0f}"


class RunLog:
    """Writes the run's text log (``train.log``), ``metrics.jsonl`` and TensorBoard events.

    ``resume_step`` drops metrics rows at or after that step (they are about to be recomputed) so
    a resumed run's files read as one uninterrupted run.
    """

    def __init__(self, out_dir: Path, resume_step: int = 0, enabled: bool = True) -> None:
        self.enabled = enabled
        self.metrics_path = out_dir / "metrics.jsonl"
        self._text = self._jsonl = self._tb = None
        if not enabled:
            return
        rows = read_metrics(self.metrics_path)
        # A row's step counts completed steps, so step == resume_step rows are already final,
        # except the evaluation at resume_step, which the resumed run repeats.
        kept = [r for r in rows if r.get("step", 0) < resume_step or (r.get("step") == resume_step and "val_loss" not in r)]
        with open(self.metrics_path, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in kept)
        # Held open for the run (closed in close()), line-buffered so a killed run keeps its lines.
        self._jsonl = open(self.metrics_path, "a", buffering=1)  # noqa: SIM115
        self._text = open(out_dir / "train.log", "a", buffering=1)  # noqa: SIM115
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(out_dir / "tb"), purge_step=resume_step if resume_step else None)
        except ImportError:
            log.warning("TensorBoard logging is off: `pip install tensorboard` to enable it")

    def info(self, msg: str) -> None:
        """A line for the console (logger ``kiln.train``) and ``train.log``."""
        log.info(msg)
        if self._text is not None:
            self._text.write(msg + "\n")

    def warning(self, msg: str) -> None:
        """A warning line, also in ``train.log``."""
        log.warning(msg)
        if self._text is not None:
            self._text.write("WARNING " + msg + "\n")

    def metrics(self, row: dict[str, Any]) -> None:
        """One machine-readable row (``step`` required); numbers also go to TensorBoard."""
        if self._jsonl is None:
            return
        self._jsonl.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for k, v in row.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, row["step"])

    def text(self, tag: str, text: str, step: int) -> None:
        """A text sample for TensorBoard."""
        if self._tb is not None:
            self._tb.add_text(tag, text, step)

    def close(self) -> None:
        """Flush and close every file."""
        for f in (self._jsonl, self._text):
            if f is not None:
                f.close()
        if self._tb is not None:
            self._tb.close()
        self._text = self._jsonl = self._tb = None


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Rows of a ``metrics.jsonl`` (an unfinished last line, from a killed run, is skipped)."""
    p = Path(path)
    if not p.is_file():
        return []
    rows = []
    for line in p.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def plot_loss(rows: list[dict[str, Any]], out_png: str | os.PathLike) -> Path:
    """Train loss (per step) and validation loss (per eval) against steps, saved as a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    # After a rollback some steps appear twice: the last row of a step wins. Skipped steps are left out.
    train_by_step = {r["step"]: r["loss"] for r in rows if "loss" in r and not r.get("skipped")}
    val_by_step = {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}
    train, val = sorted(train_by_step.items()), sorted(val_by_step.items())
    fig = Figure(figsize=(7, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train")
    if val:
        ax.plot(*zip(*val), "o-", lw=1.5, label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(out_png)
    return Path(out_png)
