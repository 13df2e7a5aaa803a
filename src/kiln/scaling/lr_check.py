"""Does one learning rate fit every width? Train each width at each lr on the same tokens and
report the best lr per width (the check behind the sweep's width-transfer rule, docs/scaling.md)."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from kiln.artifacts import write_json_atomic, write_text_atomic
from kiln.scaling.shapes import flops_per_token
from kiln.scaling.sweep import ScalingConfig, data_info, make_point, point_dir


def lr_check(cfg: ScalingConfig, tokens_dir: str | os.PathLike, out_dir: str | os.PathLike,
             widths: Sequence[int], lrs: Sequence[float], tokens_per_run: int, executor: Any = None) -> dict:
    """Held-out loss of every (width, lr) after ``tokens_per_run`` tokens; ``table`` (Markdown) and
    ``best`` (width -> lr). Resumable like a sweep (finished runs are reused)."""
    from kiln.scaling.executors import LocalExecutor
    from kiln.scaling.study import execute

    vocab, _ = data_info(tokens_dir)
    rule = cfg.shape_rule(vocab)
    points = []
    for w in widths:
        m = rule.shape(w)
        budget = flops_per_token(m, cfg.flops_rule, cfg.n_kind) * tokens_per_run
        points += [make_point(cfg, m, budget, role="lr", lr=lr, tag=f"_lr{lr:g}") for lr in lrs]
    out = Path(out_dir)
    execute(cfg, points, Path(tokens_dir), out, executor or LocalExecutor())
    loss = {(p.model["d_model"], p.lr): json.loads((point_dir(out, p) / "result.json").read_text())["val_loss"]
            for p in points}
    best = {w: min(lrs, key=lambda lr: loss[(w, lr)]) for w in widths}
    lines = ["| d_model | N (" + cfg.n_kind + ") | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | best |",
             "|---" * (len(lrs) + 3) + "|"]
    for w in widths:
        n = next(p.n[cfg.n_kind] for p in points if p.model["d_model"] == w)
        cells = [f"**{loss[(w, lr)]:.4f}**" if lr == best[w] else f"{loss[(w, lr)]:.4f}" for lr in lrs]
        lines.append(f"| {w} | {n:,} | " + " | ".join(cells) + f" | {best[w]:g} |")
    result = {"widths": list(widths), "lrs": list(lrs), "tokens_per_run": tokens_per_run, "optimizer": cfg.optimizer,
              "loss": {f"{w}@{lr:g}": v for (w, lr), v in loss.items()}, "best": {str(w): v for w, v in best.items()},
              "table": "\n".join(lines)}
    write_json_atomic(out / "lr_check.json", result)
    write_text_atomic(out / "lr_check.md", result["table"] + "\n")
    return result
