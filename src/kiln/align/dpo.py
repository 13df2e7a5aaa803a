"""``kiln dpo``: direct preference optimization against a frozen reference, reference log-probs cached.

The reference model's summed log-probs of every chosen and rejected reply are computed once before
training and written as an artifact (``OUT/reference/ref_logps.safetensors`` with the hash of the
reference weights and the encoded pairs), so the reference is not in memory while the policy
trains, and a resumed or repeated run reads them back. The stage is a batch source
(``DPOBatches``: pairs with their cached reference log-probs), a loss (``dpo_loss_fn``, the pure
``kiln.align.losses.dpo_loss``) and hooks (train-batch reward metrics, held-out preference
accuracy), handed to ``kiln.train.fit``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kiln.align.data import PreferencePair, ReadReport, encode_preference, read_preferences, require_usable
from kiln.align.losses import dpo_loss, token_log_probs
from kiln.align.packing import ExampleStore
from kiln.align.stage import NO_SPIKE_GUARD, EpochBatches, to_device
from kiln.train.config import TrainConfig

Encoded = tuple[list[int], list[int], list[int]]
"""(prompt ids, chosen ids, rejected ids)."""


def dpo_train_defaults() -> TrainConfig:
    """The runtime settings DPO starts from (Rafailov et al. use lr 1e-6 at 6B with batch 64; small
    models take a larger step)."""
    return TrainConfig(lr=5e-6, min_lr=5e-7, warmup_steps=5, weight_decay=0.0, batch_size=8, max_steps=100,
                       eval_every=0, sample_every=0, save_every=100, log_every=10, **NO_SPIKE_GUARD)


@dataclass(frozen=True)
class DPOConfig:
    """Preference optimization (``kiln dpo``). ``train``: the runtime's settings (batch in pairs)."""

    data: tuple[str, ...] = ()
    """Preference files (prompt/chosen/rejected, hh-rlhf transcripts, ...) or hf:NAME[:SPLIT]."""
    heldout: tuple[str, ...] = ()
    """Held-out preference files; empty: ``heldout_frac`` of ``data``."""
    heldout_frac: float = 0.05
    """Fraction of ``data`` held out when ``heldout`` is empty (at most ``max_heldout``)."""
    max_heldout: int = 256
    """Most held-out pairs scored per evaluation."""
    beta: float = 0.1
    """Strength of the KL anchor to the reference (DPO's beta; IPO's tau)."""
    loss_type: str = "sigmoid"
    """sigmoid (DPO), ipo, conservative (cDPO with ``label_smoothing``) or hinge."""
    label_smoothing: float = 0.0
    """cDPO: probability that a preference label is flipped."""
    reference: str = ""
    """Reference model folder; empty: the starting policy (``model_dir``)."""
    seq_len: int = 0
    """Longest prompt + reply in tokens; 0: the model's context length. Longer pairs are dropped (counted)
    unless ``truncate``."""
    truncate: bool = False
    """Fit a longer pair instead of dropping it, as trl's DPO does: the prompt keeps its last
    ``seq_len // 2`` tokens at most, each reply is cut to the room left (counted as ``truncated``)."""
    epochs: float = 1.0
    """Passes over the training pairs (sets the step count unless ``max_steps``)."""
    max_steps: int = 0
    """Optimizer steps; 0: from ``epochs``."""
    add_chat_tokens: bool = False
    """Add the chat tokens to a tokenizer that lacks them."""
    eval_every: int = 50
    """Steps between held-out preference evaluations (also first and last); 0: never."""
    fused_kernels: bool = True
    """On CUDA, the policy and reference run Kiln's Triton RMSNorm and RoPE, one-GEMM q/k/v and gate/up, and
    AdamW in one launch (``kiln.align.stage.fused_kernels``): 1,197 -> 459 launches per forward + backward
    of a small model's host-bound step; the same loss (tested against the PyTorch formulas)."""
    train: TrainConfig = field(default_factory=dpo_train_defaults)
    """Runtime settings (``train.lr``, ``train.batch_size`` in pairs, ``train.device``...)."""

    def __post_init__(self) -> None:
        if self.loss_type not in ("sigmoid", "ipo", "conservative", "hinge"):
            raise ValueError(f"DPOConfig.loss_type={self.loss_type!r}; use sigmoid, ipo, conservative or hinge")
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta={self.beta} must be > 0 (e.g. 0.1)")
        if not 0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing={self.label_smoothing} must be in [0, 0.5)")


def collate_pairs(pairs: list[Encoded], pad_id: int = 0) -> tuple[Tensor, Tensor, Tensor]:
    """Rows ``prompt + reply`` for every chosen then every rejected reply, right-padded to the longest
    (rounded up to 8): ids (2B, T), labels (2B, T), reply mask (2B, T) on the reply's labels."""
    seqs = [(p, c) for p, c, _ in pairs] + [(p, r) for p, _, r in pairs]
    T = max(len(p) + len(r) for p, r in seqs) - 1
    T = -(-T // 8) * 8
    ids = torch.full((len(seqs), T + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(len(seqs), T + 1, dtype=torch.bool)
    for b, (p, r) in enumerate(seqs):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        mask[b, len(p) : len(p) + len(r)] = True
    return ids[:, :-1], ids[:, 1:].clone(), mask[:, 1:]


def reply_log_probs(model: Any, ids: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Summed log-prob of each row's reply: (R, T) -> (R,)."""
    return (token_log_probs(model(ids), labels) * mask).sum(-1)


@torch.no_grad()
def compute_reference_logps(model: Any, pairs: list[Encoded], batch_pairs: int = 8, pad_id: int = 0) -> Tensor:
    """(N, 2) float32: the reference's summed log-prob of each pair's (chosen, rejected) reply."""
    device = next(model.parameters()).device
    was = model.training
    model.eval()
    out = []
    try:
        for s in range(0, len(pairs), batch_pairs):
            chunk = pairs[s : s + batch_pairs]
            ids, labels, mask = to_device(collate_pairs(chunk, pad_id), device)
            lp = reply_log_probs(model, ids, labels, mask).float()  # (2b,) on the device: one copy at the end
            out.append(torch.stack([lp[: len(chunk)], lp[len(chunk) :]], dim=1))
    finally:
        model.train(was)
    return torch.cat(out).cpu() if out else torch.zeros(0, 2)


def pairs_hash(pairs: list[Encoded]) -> str:
    """Content hash of the encoded pairs (the reference cache's key, with the reference's weights)."""
    h = hashlib.sha256()
    for p, c, r in pairs:
        h.update(json.dumps([p, c, r]).encode())
    return h.hexdigest()[:16]


def cached_reference_logps(cache: Path, key: str, compute: Any) -> Tensor:
    """Read ``cache`` (safetensors) when its key matches, else ``compute()`` and write it atomically."""
    from safetensors.torch import load_file, save_file

    if cache.is_file():
        from safetensors import safe_open

        with safe_open(str(cache), "pt") as f:
            if (f.metadata() or {}).get("key") == key:
                return load_file(str(cache))["logps"]
    logps = compute()
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_name(f".{cache.name}.tmp")
    save_file({"logps": logps.contiguous()}, str(tmp), metadata={"key": key})
    os.replace(tmp, cache)
    return logps


class DPOBatches(EpochBatches):
    """Micro-batches of pairs with their reference log-probs (``Stateful``: ``(epoch, pos)``).

    Yields ``(ids (2m, T), labels, mask, ref (m, 2), lengths (m, 2))`` on the device.
    """

    def __init__(self, pairs: list[Encoded], ref: Tensor, micro_batch: int, seed: int, pad_id: int = 0,
                 device: torch.device | str = "cpu") -> None:
        if not pairs:
            raise ValueError("no training pairs to batch")
        self.pairs, self.ref, self.micro_batch = pairs, ref, micro_batch
        self.seed, self.pad_id, self.device = seed, pad_id, torch.device(device)
        # prompt + chosen (rows 0..N-1) and prompt + rejected (N..2N-1), learned on the reply: a
        # batch is then a few tensor ops (``collate_pairs``'s layout, built without Python loops)
        self.store = ExampleStore([(p + c, [0] * len(p) + [1] * len(c)) for p, c, _ in pairs]
                                  + [(p + r, [0] * len(p) + [1] * len(r)) for p, _, r in pairs])
        self.lengths = torch.tensor([[len(c), len(r)] for _, c, r in pairs], dtype=torch.float32)  # (N, 2)
        self.tokens = [0, 0]  # (real, computed) token positions of the batches drawn: padding's share of the work
        self._start()
        self.metrics = DPOMetrics()  # rewards of the batches drawn since the last log line (checkpointed)

    def _epoch_items(self, epoch: int) -> list[int]:
        return self._permutation(len(self.pairs), epoch)

    def collate(self, idx: list[int]) -> tuple[Tensor, ...]:
        """``collate_pairs`` of the pairs at ``idx`` with their reference log-probs and reply lengths."""
        N = len(self.pairs)
        rows = [[i] for i in idx] + [[N + i] for i in idx]
        lens = self.store.lens[[r[0] for r in rows]]  # (2m,) prompt + reply tokens of each row
        T = -(-(int(lens.max()) - 1) // 8) * 8
        self.tokens[0] += int(lens.sum()) - len(rows)  # a row of n tokens has n - 1 inputs with a label
        self.tokens[1] += len(rows) * T
        ids, labels, mask = self.store.rows(rows, T, self.pad_id)[:3]
        return to_device((ids, labels, mask, self.ref[idx], self.lengths[idx]), self.device)

    def state_dict(self) -> dict:
        return {**super().state_dict(), "metrics": self.metrics.sums}

    def load_state_dict(self, s: dict) -> None:
        super().load_state_dict(s)
        m = s.get("metrics")
        self.metrics.sums = None if m is None else m.to(self.device)


class DPOMetrics:
    """Train-batch rewards summed on the device (no host sync per step), read by a logging hook."""

    def __init__(self) -> None:
        self.sums: Tensor | None = None  # chosen reward, rejected reward, margin, accuracy, pairs

    def add(self, rc: Tensor, rr: Tensor) -> None:
        row = torch.stack([rc.sum(), rr.sum(), (rc - rr).sum(), (rc > rr).float().sum(),
                           rc.new_full((), float(rc.numel()))])  # a fill, not a host-to-device copy (a sync)
        self.sums = row if self.sums is None else self.sums + row

    def pop(self) -> dict[str, float] | None:
        if self.sums is None:
            return None
        s = self.sums.tolist()
        self.sums = None
        n = max(s[4], 1.0)
        return {"rewards_chosen": s[0] / n, "rewards_rejected": s[1] / n, "reward_margin": s[2] / n,
                "reward_accuracy": s[3] / n}


def dpo_loss_fn(model_step: Any, cfg: DPOConfig, metrics: DPOMetrics) -> Any:
    """``loss_fn(*batch)``: mean DPO loss of the micro-batch's pairs; rewards go to ``metrics``."""

    def loss_fn(ids: Tensor, labels: Tensor, mask: Tensor, ref: Tensor, lengths: Tensor) -> Tensor:
        lp = reply_log_probs(model_step, ids, labels, mask)  # (2m,)
        m = ref.shape[0]
        losses, rc, rr = dpo_loss(lp[:m], lp[m:], ref[:, 0], ref[:, 1], cfg.beta, cfg.loss_type,
                                  cfg.label_smoothing, lengths[:, 0], lengths[:, 1])
        metrics.add(rc, rr)
        return losses.mean()

    return loss_fn


@torch.no_grad()
def evaluate_preferences(model: Any, batches: DPOBatches, cfg: DPOConfig) -> dict[str, float]:
    """Held-out DPO loss, reward accuracy (share of pairs with chosen reward > rejected) and margin."""
    was = model.training
    model.eval()
    metrics, total, n = DPOMetrics(), 0.0, 0
    loss_fn = dpo_loss_fn(model, cfg, metrics)
    try:
        for s in range(0, len(batches.pairs), batches.micro_batch):
            idx = list(range(s, min(s + batches.micro_batch, len(batches.pairs))))
            total += float(loss_fn(*batches.collate(idx))) * len(idx)
            n += len(idx)
    finally:
        model.train(was)
    r = metrics.pop() or {}
    return {"heldout_loss": total / max(n, 1), "heldout_accuracy": r.get("reward_accuracy", 0.0),
            "heldout_margin": r.get("reward_margin", 0.0)}


def split_pairs(pairs: list[PreferencePair], cfg: DPOConfig) -> tuple[list[PreferencePair], list[PreferencePair]]:
    """(train, held-out): ``cfg.heldout`` files, else a seeded ``heldout_frac`` of ``pairs``."""
    if cfg.heldout:
        return pairs, read_preferences(cfg.heldout)[: cfg.max_heldout]
    from kiln.align.stage import seeded_holdout

    return seeded_holdout(pairs, cfg.heldout_frac, cfg.max_heldout, cfg.train.seed)


def run_dpo(cfg: DPOConfig, model_dir: str | os.PathLike, out_dir: str | os.PathLike,
            tokenizer: str | os.PathLike | None = None, resume: bool = True, dist: Any = None,
            stop: Any = None, extra_hooks: Sequence[Any] = ()) -> Path:
    """Train the model in ``model_dir`` on ``cfg.data``'s preferences; the result lands in ``out_dir/model``.

    ``extra_hooks``: ``kiln.train.Hook``-like objects run after the stage's own (a bench's timer, a
    learning curve's probe); a hook's ``due(step, last)`` says when it runs.
    """
    from kiln.align.stage import fused_kernels, load_policy, pick_device
    from kiln.distributed import SingleProcess

    dist = dist or SingleProcess()
    torch.manual_seed(cfg.train.seed)
    device = pick_device(cfg.train.device)
    model, tok, tpl = load_policy(model_dir, tokenizer, cfg.add_chat_tokens, device)
    report = ReadReport()
    train_p, held_p = split_pairs(read_preferences(cfg.data, report), cfg)
    seq_len = cfg.seq_len or model.config.context_length
    enc = [e for e in (encode_preference(p, tpl, seq_len + 1, report, cfg.truncate) for p in train_p) if e is not None]
    enc = require_usable(enc, "training pairs", cfg.data, report)  # before the reference scores anything
    held = [e for e in (encode_preference(p, tpl, seq_len + 1, report, cfg.truncate) for p in held_p) if e is not None]
    with fused_kernels(model, cfg.fused_kernels):  # the reference pass and the steps run the same kernels
        return _train_dpo(cfg, model, tok, model_dir, tokenizer, out_dir, report, enc, held, resume, dist, stop,
                          extra_hooks)


def _train_dpo(cfg: DPOConfig, model: Any, tok: Any, model_dir: Any, tokenizer: Any, out_dir: Any, report: ReadReport,
               enc: list[Encoded], held: list[Encoded], resume: bool, dist: Any, stop: Any,
               extra_hooks: Sequence[Any]) -> Path:
    """``run_dpo`` after the pairs are encoded: the reference pass, then the runtime's steps."""
    from kiln.align.stage import build_state, export_chat_model, train_config
    from kiln.train import RunDir, fit

    device = next(model.parameters()).device
    mb, pad = cfg.train.micro_batch_size or cfg.train.batch_size, tok.eot_id or 0
    ref_train, ref_held = _reference(cfg, model, model_dir, tokenizer, Path(out_dir), enc, held, mb, pad)
    batches = DPOBatches(enc, ref_train, mb, cfg.train.seed, pad, device)
    held_src = DPOBatches(held, ref_held, mb, 0, pad, device) if held else None
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(enc) / cfg.train.batch_size))
    tcfg = train_config(cfg.train, model, max_steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps))
    inputs = [model_dir, *[d for d in cfg.data if not str(d).startswith("hf:")]]
    with RunDir(out_dir, "dpo", replace(cfg, train=tcfg), inputs, resume=resume, dist=dist) as run:
        if run.reused:
            return run.path
        state, model_step = build_state(tcfg, model, batches, dist)
        run.begin(state)
        run.log.info(f"dpo: {len(enc)} training pairs, {len(held)} held out, {steps} steps, beta {cfg.beta}, "
                     f"{cfg.loss_type}\n" + report.summary())
        metrics, evals = batches.metrics, []
        hooks = [*_hooks(cfg, tcfg, model, held_src, metrics, run.log, evals, batches.tokens), *extra_hooks]
        if fit(tcfg, state, batches, dpo_loss_fn(model_step, cfg, metrics), run, model_step=model_step,
               hooks=hooks, stop=stop):
            export_chat_model(run.path, model, tok)
            run.finish({"steps": steps, "pairs": len(enc), "read": report.to_dict(),
                        "tokens": {"real": batches.tokens[0], "computed": batches.tokens[1]},
                        "first_eval": evals[0] if evals else None, "last_eval": evals[-1] if evals else None})
    return run.path


def _reference(cfg: DPOConfig, model: Any, model_dir: Any, tokenizer: Any, out: Path, enc: list[Encoded],
               held: list[Encoded], mb: int, pad: int) -> tuple[Tensor, Tensor]:
    """Reference log-probs of the training and held-out pairs, from the cache or computed once.

    With no ``cfg.reference`` the reference is the starting policy, whose weights ``model`` holds
    now (before any step): it is scored in place, and no second copy is loaded.
    """
    from kiln.align.stage import fused_kernels, load_policy

    ref_model = model
    if cfg.reference:
        ref_model, _, _ = load_policy(cfg.reference, tokenizer, True, next(model.parameters()).device)
    key = hashlib.sha256()
    for t in ref_model.state_dict().values():
        t = t.detach().cpu().double()  # leading bytes, shape and sum of every tensor: cheap, and any
        key.update(t.flatten()[:1024].numpy().tobytes())  # training step moves the sums
        key.update(f"{tuple(t.shape)}:{t.sum().item()!r}".encode())
    key.update((pairs_hash(enc) + pairs_hash(held)).encode())
    key.update(f"{cfg.train.dtype}:{next(ref_model.parameters()).device.type}:{cfg.fused_kernels}".encode())  # how it was scored
    from kiln.train.loop import autocast_for

    def compute() -> Tensor:  # under the training step's autocast and kernels: at step 0 the policy's log-probs equal these
        kernels = fused_kernels(ref_model, cfg.fused_kernels) if ref_model is not model else contextlib.nullcontext()
        with autocast_for(cfg.train.dtype, next(ref_model.parameters()).device), kernels:
            return compute_reference_logps(ref_model, enc + held, mb, pad)

    logps = cached_reference_logps(out / "reference" / "ref_logps.safetensors", key.hexdigest()[:24], compute)
    return logps[: len(enc)], logps[len(enc) :]


def _hooks(cfg: DPOConfig, tcfg: TrainConfig, model: Any, held_src: DPOBatches | None, metrics: DPOMetrics,
           runlog: Any, evals: list, tokens: list[int]) -> list:
    """Reward logging (with ``tokens``: the training batches' [real, computed] token positions so far) and
    the held-out evaluation."""
    from kiln.train import Hook

    def log_rewards(step: int) -> None:
        r = metrics.pop()
        if r is not None:
            real, computed = tokens
            runlog.metrics({"step": step, **r, "tokens_real": real, "tokens_computed": computed})
            runlog.info(f"step {step} | rewards chosen {r['rewards_chosen']:.3f} rejected {r['rewards_rejected']:.3f} "
                        f"| margin {r['reward_margin']:.3f} | accuracy {r['reward_accuracy']:.2f} "
                        f"| tokens real {real} computed {computed}")

    def evaluate(step: int) -> dict | None:
        if held_src is None:
            return None
        r = evaluate_preferences(model, held_src, cfg)
        evals.append({"step": step, **r})
        runlog.metrics({"step": step, **r})
        runlog.info(f"step {step} | held-out preference accuracy {r['heldout_accuracy']:.3f} | margin "
                    f"{r['heldout_margin']:.3f} | loss {r['heldout_loss']:.4f}")
        return r

    return [Hook(tcfg.log_every, log_rewards), Hook(cfg.eval_every, evaluate)]
