"""IsoFLOP sweeps: a grid of (budget, size) points, each a ``kiln.train.train`` run, resumable.

``plan(cfg, vocab_size)`` turns budgets into points: per budget C, ``sizes_per_budget`` target sizes
log-spaced over a ``size_spread``-fold range centred on the size that gets ``tokens_per_param``
tokens (Chinchilla's ~20, arXiv:2203.15556), each mapped to a shape by ``ShapeRule``, tokens
``D = C / flops_per_token`` (the exact count or 6N, ``flops_rule``), rounded to whole steps.

``run_point`` trains one point into ``OUT/points/<id>/`` through the public ``kiln.train.train``
(which resumes a killed run from its last checkpoint and reuses a finished one) and writes
``result.json`` (N of every kind, D, C, the held-out loss and its curve) last. ``run_sweep`` runs the
points not yet finished through an executor (``kiln.scaling.executors``), then collects the rows.

**Learning rate across widths.** Every point trains with Muon on the blocks' matrices (AdamW on the
embedding, head and norms) at one peak learning rate for every width: Muon orthogonalizes each
update and Kiln scales it to AdamW's RMS (0.2 sqrt(max(fan_in, fan_out)), Liu et al., "Muon is
Scalable", arXiv:2502.16982), so the per-entry step size does not shrink or grow with width, the
property muP gets by scaling AdamW's lr as 1/width. ``lr_check`` measures it: several widths at
several learning rates, the best lr per width (docs/scaling.md records the check).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kiln.artifacts import write_json_atomic
from kiln.model.config import ModelConfig
from kiln.scaling.fit import Run
from kiln.scaling.shapes import (
    FLOPS_RULES,
    N_KINDS,
    ShapeRule,
    count_params,
    describe,
    flops_per_token,
    shape_for_params,
)


@dataclass(frozen=True)
class ScalingConfig:
    """An IsoFLOP sweep. Defaults: a CPU toy (seconds per point) on a tiny vocab."""

    budgets: tuple[float, ...] = (1e10, 3e10, 1e11)
    """Compute budgets (training FLOPs per run, by ``flops_rule``)."""
    sizes_per_budget: int = 4
    """Model sizes per budget (approach 2 needs three or more)."""
    size_spread: float = 16.0
    """Largest / smallest target N of a budget."""
    tokens_per_param: float = 20.0
    """Tokens per parameter at the centre of each budget's sizes (Chinchilla's ~20)."""
    n_kind: str = "compute"
    """Which N the sweep sizes and reports by default: "compute", "total" or "non_embedding"
    (``kiln.scaling.shapes``); every kind is recorded, so a fit may choose another."""
    flops_rule: str = "exact"
    """FLOPs per token: "exact" (``Transformer.flops_per_token``, attention included) or "6N"."""
    context_length: int = 64
    """Training window (tokens)."""
    head_dim: int = 8
    """Channels per head (the shape ladder's width step)."""
    aspect: int = 16
    """d_model / n_layers of the shape rule."""
    batch_size: int = 8
    """Sequences per optimizer step."""
    lr: float = 1e-2
    """Peak learning rate of every point (Muon and AdamW alike): the width-transfer rule above."""
    optimizer: str = "muon"
    """"muon" (the transfer rule) or "adamw" (no transfer rule: lr is then width-tuned by hand)."""
    warmup_frac: float = 0.05
    """Warm-up as a fraction of each point's steps."""
    min_lr_frac: float = 0.1
    """Cosine decay to this fraction of lr at each point's last step."""
    evals: int = 6
    """Held-out evaluations per point (the loss curve approach 1 reads); the last is the final loss."""
    eval_tokens: int = 16384
    """Held-out tokens per evaluation (the same windows for every point)."""
    saves: int = 4
    """Checkpoints per point (a killed point resumes from the last)."""
    device: str = "auto"
    """Torch device of every point ("auto": cuda if available)."""
    compile: bool = False
    """torch.compile each point (pays off only for long points on a GPU)."""
    attention_impl: str = "kiln"
    """Attention kernel ("sdpa" on a GPU)."""
    seed: int = 1337
    """Seed of every point (init and data order)."""
    max_epochs: float = 4.0
    """Refuse points that would pass over the training tokens more than this many times
    (repeats beyond ~4 epochs are worth much less: Muennighoff et al., arXiv:2305.16264)."""

    def __post_init__(self) -> None:
        if not self.budgets or any(not b > 0 for b in self.budgets):
            raise ValueError(f"ScalingConfig.budgets={self.budgets} must be positive FLOPs, e.g. 1e15,3e15,1e16")
        if self.sizes_per_budget < 1 or self.size_spread < 1:
            raise ValueError("ScalingConfig.sizes_per_budget must be >= 1 and size_spread >= 1")
        if self.n_kind not in N_KINDS or self.flops_rule not in FLOPS_RULES:
            raise ValueError(f"ScalingConfig.n_kind must be one of {N_KINDS}, flops_rule one of {FLOPS_RULES}")
        if self.optimizer not in ("muon", "adamw"):
            raise ValueError(f"ScalingConfig.optimizer={self.optimizer!r}: use muon or adamw")
        if self.evals < 1 or self.saves < 1:
            raise ValueError("ScalingConfig.evals and saves must be >= 1")

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.context_length

    def shape_rule(self, vocab_size: int) -> ShapeRule:
        return ShapeRule(vocab_size=vocab_size, context_length=self.context_length, head_dim=self.head_dim,
                         aspect=self.aspect)


def cpu_toy() -> ScalingConfig:
    """The default: three budgets x four sizes of 2k-90k-parameter models on the CPU (~11k steps
    of 512 tokens in all; the toy corpus of docs/scaling.md)."""
    return ScalingConfig()


def gutenberg_h100() -> ScalingConfig:
    """The H100 check (docs/scaling.md): 4 budgets x up to 5 sizes (0.15M-7.7M parameters) on
    19.5M Gutenberg tokens (Kiln's BPE, vocab 4096), context 512, 32 x 512 tokens per step, no
    point past 4 epochs (18 points, 320M tokens); with ``--check-multiple 4`` the check run
    trains at 2e15 FLOPs."""
    return ScalingConfig(budgets=(3e13, 8e13, 2e14, 5e14), sizes_per_budget=5, size_spread=10.0, context_length=512,
                         head_dim=32, aspect=64, batch_size=32, lr=3e-3, evals=8, eval_tokens=131072, saves=2,
                         device="cuda", attention_impl="sdpa")


PRESETS = {"cpu_toy": cpu_toy, "gutenberg_h100": gutenberg_h100}


@dataclass(frozen=True)
class Point:
    """One training run of the sweep."""

    id: str
    budget: float
    model: dict
    n: dict  # N of every kind
    flops_per_token: float
    steps: int
    tokens: int
    lr: float
    role: str = "sweep"  # or "check" / "lr"

    @property
    def flops(self) -> float:
        return self.flops_per_token * self.tokens


def make_point(cfg: ScalingConfig, model: ModelConfig, budget: float, role: str = "sweep",
               lr: float | None = None, tag: str = "") -> Point:
    """The point that trains ``model`` on ``budget`` FLOPs (whole steps, at least one)."""
    fpt = flops_per_token(model, cfg.flops_rule, cfg.n_kind)
    steps = max(1, round(budget / fpt / cfg.tokens_per_step))
    lr = cfg.lr if lr is None else lr
    pid = f"{role}_C{budget:.2e}_{describe(model).replace(' ', '_')}{tag}".replace("+", "")
    return Point(id=pid, budget=budget, model=model.to_dict(), n={k: count_params(model, k) for k in N_KINDS},
                 flops_per_token=fpt, steps=steps, tokens=steps * cfg.tokens_per_step, lr=lr, role=role)


def plan(cfg: ScalingConfig, vocab_size: int, train_tokens: int | None = None,
         skipped: list[str] | None = None) -> list[Point]:
    """The sweep's points, smallest budget first (see the module docstring). With ``train_tokens``,
    a point that would pass over the data more than ``cfg.max_epochs`` times is left out and said in
    ``skipped``; a budget left with fewer than three sizes is an error saying what to change."""
    rule = cfg.shape_rule(vocab_size)
    points: list[Point] = []
    skipped = [] if skipped is None else skipped
    for c in sorted(cfg.budgets):
        # Centre: C = 6 N D with D = r N: N = sqrt(C / (6 r)).
        centre = math.sqrt(c / (6.0 * cfg.tokens_per_param))
        k = cfg.sizes_per_budget
        targets = [centre * cfg.size_spread ** ((i / (k - 1) - 0.5) if k > 1 else 0.0) for i in range(k)]
        seen, kept = set(), 0
        for t in targets:
            m = shape_for_params(t, rule, cfg.n_kind)
            if m.d_model in seen:
                continue
            seen.add(m.d_model)
            p = make_point(cfg, m, c)
            if train_tokens and p.tokens > cfg.max_epochs * train_tokens:
                skipped.append(f"{p.id}: {p.tokens:,} tokens = {p.tokens / train_tokens:.1f} epochs "
                               f"of the {train_tokens:,} training tokens (> max_epochs {cfg.max_epochs:g})")
                continue
            points.append(p)
            kept += 1
        if kept < min(3, k):
            raise ValueError(f"budget {c:.3g}: {kept} size(s) left ({'; '.join(skipped) or 'the shape ladder is coarse here'}); "
                             "an IsoFLOP curve needs three or more: lower this budget, raise size_spread or "
                             "sizes_per_budget, or add data")
    return points


def train_config(cfg: ScalingConfig, p: Point) -> Any:
    """The ``TrainConfig`` of point ``p``."""
    from kiln.train import TrainConfig

    model = replace(ModelConfig.from_dict(p.model), attention_impl=cfg.attention_impl)
    every = max(1, p.steps // cfg.evals)
    return TrainConfig(
        model=model, vocab_from_data=False, batch_size=cfg.batch_size, lr=p.lr, min_lr=p.lr * cfg.min_lr_frac,
        warmup_steps=min(p.steps, max(1, round(cfg.warmup_frac * p.steps))), schedule="cosine",
        max_steps=p.steps, eval_every=every, eval_tokens=cfg.eval_tokens, sample_every=0,
        save_every=max(1, p.steps // cfg.saves), keep_last=1, seed=cfg.seed, device=cfg.device,
        compile=cfg.compile, optimizer=cfg.optimizer, log_every=max(1, p.steps // 20),
    )


def run_point(cfg: ScalingConfig, p: Point, tokens_dir: str | os.PathLike, out_dir: str | os.PathLike,
              stop: Any = None) -> dict | None:
    """Train point ``p`` into ``out_dir`` (resuming) and write ``result.json`` last; returns the result,
    or None when ``stop`` paused it (the same call resumes)."""
    from kiln.train import train
    from kiln.train.metrics import read_metrics

    out = Path(out_dir)
    done = out / "result.json"
    if done.is_file():
        r = json.loads(done.read_text())
        if r.get("point") == asdict(p):
            return r
    tokens_dir = Path(tokens_dir)
    tok = tokens_dir / "tokenizer.json"
    train(train_config(cfg, p), tokens_dir, out, tokenizer_path=tok if tok.is_file() else None, stop=stop)
    if stop is not None and getattr(stop, "paused", False):
        return None
    manifest = json.loads((out / "manifest.json").read_text())
    curve = [(r["step"] * cfg.tokens_per_step, r["val_loss"]) for r in read_metrics(out / "metrics.jsonl")
             if r.get("val_loss") is not None and r["step"] > 0]
    stats = manifest["stats"]
    result = {"point": asdict(p), "val_loss": stats["val_loss"], "val_bpb": stats["val_bpb"],
              "train_loss": stats["final_train_loss"], "tokens": stats["tokens_seen"], "epochs": stats["epochs"],
              "seconds": stats["seconds"], "curve_tokens": [t for t, _ in curve], "curve_loss": [v for _, v in curve]}
    if result["val_loss"] is None:
        raise RuntimeError(f"{out}: the run has no held-out loss (no val_*.bin in {tokens_dir}?); "
                           "a scaling fit needs one")
    write_json_atomic(done, result)
    return result


def result_run(result: dict, n_kind: str = "compute", flops_rule: str | None = None) -> Run:
    """A fit row from a point's ``result.json``: N of ``n_kind``, D tokens, C FLOPs (the point's
    rule, or 6N with ``flops_rule="6N"``), the final held-out loss and its curve."""
    p = result["point"]
    n = float(p["n"][n_kind])
    fpt = 6.0 * n if flops_rule == "6N" else float(p["flops_per_token"])
    d = float(result["tokens"])
    return Run(n=n, d=d, c=fpt * d, loss=float(result["val_loss"]), budget=float(p["budget"]),
               curve_c=tuple(fpt * t for t in result["curve_tokens"]), curve_loss=tuple(result["curve_loss"]))


def collect(out_dir: str | os.PathLike, role: str = "sweep") -> list[dict]:
    """Every finished point's result under ``out_dir/points`` of ``role``, by budget then size."""
    rows = []
    for f in sorted(Path(out_dir).glob("points/*/result.json")):
        r = json.loads(f.read_text())
        if r["point"].get("role", "sweep") == role:
            rows.append(r)
    return sorted(rows, key=lambda r: (r["point"]["budget"], r["point"]["n"]["total"]))


def point_dir(out_dir: str | os.PathLike, p: Point) -> Path:
    return Path(out_dir) / "points" / p.id


def data_info(tokens_dir: str | os.PathLike) -> tuple[int, int]:
    """(vocab size padded to 64, training tokens) of a shard folder."""
    from kiln.shards import read_header

    paths = sorted(Path(tokens_dir).glob("train_*.bin"))
    if not paths:
        raise FileNotFoundError(f"no train_*.bin shards in {tokens_dir}; see docs/scaling.md for how to make them")
    heads = [read_header(p) for p in paths]
    vocab = max(h["vocab_size"] for h in heads)
    return -(-vocab // 64) * 64, sum(h["n_tokens"] for h in heads)


def table(points: Sequence[Point], train_tokens: int | None = None, n_kind: str = "compute") -> str:
    """A Markdown table of points."""
    lines = ["| point | budget (FLOPs) | shape | N (" + n_kind + ") | N total | tokens | steps | epochs | lr |",
             "|---|---|---|---|---|---|---|---|---|"]
    for p in points:
        ep = f"{p.tokens / train_tokens:.2f}" if train_tokens else "?"
        lines.append(f"| {p.id} | {p.budget:.2e} | {describe(ModelConfig.from_dict(p.model))} | {p.n[n_kind]:,} | "
                     f"{p.n['total']:,} | {p.tokens:,} | {p.steps} | {ep} | {p.lr:g} |")
    return "\n".join(lines)


def apply_sets(cfg: ScalingConfig, sets: Sequence[str]) -> ScalingConfig:
    """``key=value`` overrides (``budgets=1e14,3e14``, ``lr=5e-3``, ``compile=true``), typed by the field."""
    import dataclasses

    fields = {f.name: f for f in dataclasses.fields(cfg)}
    changes: dict[str, Any] = {}
    for item in sets:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or key not in fields:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of {sorted(fields)}")
        cur = getattr(cfg, key)
        try:
            if isinstance(cur, bool):
                if raw.lower() not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError
                val: Any = raw.lower() in ("true", "1", "yes")
            elif isinstance(cur, tuple):
                val = tuple(float(v) for v in raw.split(",") if v.strip())
            elif isinstance(cur, int):
                val = int(float(raw))
            elif isinstance(cur, float):
                val = float(raw)
            else:
                val = raw
        except ValueError:
            raise ValueError(f"--set {item!r}: expected a {type(cur).__name__} like {cur!r}") from None
        changes[key] = val
    return replace(cfg, **changes)
