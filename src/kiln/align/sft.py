"""``kiln sft``: supervised fine-tuning on conversations, loss on assistant tokens only.

The stage is a batch source (``SFTBatches``: packed rows with a document-aware causal mask, or one
conversation per padded row), a loss (``sft_loss_fn``: mean NLL over assistant tokens) and two
hooks (held-out loss, sample replies), handed to ``kiln.train.fit``. Epochs: each pass shuffles the
conversations with ``seed + epoch`` and packs them in that order, so the batches of a run are a
function of the seed and the step (exact resume stores only ``(epoch, position)``).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kiln.align.data import Conversation, ReadReport, encode_conversation, read_conversations, require_usable
from kiln.align.packing import Example, ExampleStore, document_attention, pack
from kiln.align.stage import EpochBatches
from kiln.train.config import TrainConfig

log = logging.getLogger(__name__)


def sft_train_defaults() -> TrainConfig:
    """The runtime settings SFT starts from: a lower peak lr than pretraining, no weight decay."""
    return TrainConfig(lr=1e-4, min_lr=1e-5, warmup_steps=5, weight_decay=0.0, batch_size=8, max_steps=100,
                       eval_every=0, sample_every=0, save_every=100, log_every=10)


@dataclass(frozen=True)
class SFTConfig:
    """Supervised fine-tuning (``kiln sft``). ``train`` holds the runtime's settings (lr, batch, dtype...)."""

    data: tuple[str, ...] = ()
    """Conversation files (.jsonl/.json/.parquet) or hf:NAME[:SPLIT]; any mix of formats."""
    heldout: tuple[str, ...] = ()
    """Held-out conversation files; empty: ``heldout_frac`` of ``data`` is held out."""
    heldout_frac: float = 0.05
    """Fraction of ``data`` held out when ``heldout`` is empty (at most ``max_heldout``)."""
    max_heldout: int = 200
    """Most held-out conversations scored per evaluation."""
    pack: bool = True
    """Pack several conversations per row (document-aware mask); False: one per padded row."""
    seq_len: int = 0
    """Row length in tokens; 0: the model's context length. Longer conversations are dropped (counted)
    unless ``truncate``."""
    truncate: bool = False
    """Cut a conversation longer than a row to its first tokens (trl's default) instead of dropping
    it; one whose cut leaves no assistant token is still dropped. Counted as ``truncated``."""
    epochs: float = 1.0
    """Passes over the training conversations (sets the step count unless ``max_steps``)."""
    max_steps: int = 0
    """Optimizer steps; 0: from ``epochs``."""
    add_chat_tokens: bool = False
    """Add the chat tokens to a tokenizer that lacks them (the model's embedding grows)."""
    eval_every: int = 50
    """Steps between held-out evaluations (also at the first and last step); 0: never."""
    sample_every: int = 100
    """Steps between sample replies to ``sample_prompts``; 0: never."""
    sample_prompts: tuple[str, ...] = ("What is 12 plus 30?",)
    """User messages the samples answer."""
    sample_tokens: int = 48
    """Most tokens per sample reply."""
    fused_kernels: bool = True
    """On CUDA, Kiln's Triton RMSNorm and RoPE, one-GEMM q/k/v and gate/up, and AdamW in one launch while
    training (``kiln.align.stage.fused_kernels``; as ``kiln dpo``): fewer launches, the same loss (tested)."""
    train: TrainConfig = field(default_factory=sft_train_defaults)
    """Runtime settings (``train.lr``, ``train.batch_size`` in rows, ``train.device``...)."""

    def __post_init__(self) -> None:
        if not 0 <= self.heldout_frac < 1:
            raise ValueError(f"SFTConfig.heldout_frac={self.heldout_frac} must be in [0, 1)")
        if self.epochs <= 0 and not self.max_steps:
            raise ValueError("SFTConfig.epochs must be > 0 (or set max_steps)")


class SFTBatches(EpochBatches):
    """Micro-batches of SFT rows, epoch after epoch (``Stateful``: ``(epoch, pos)`` is the position).

    Packed rows yield ``(ids, labels, mask, positions, doc_ids)``; unpacked ``(ids, labels, mask)``,
    each (micro_batch, seq_len).
    """

    def __init__(self, examples: list[Example], seq_len: int, micro_batch: int, packed: bool, seed: int,
                 pad_id: int = 0, device: torch.device | str = "cpu") -> None:
        if not examples:
            raise ValueError("no training conversations to batch")
        self.examples, self.seq_len, self.micro_batch = examples, seq_len, micro_batch
        self.store = ExampleStore(examples)  # the tokens as flat tensors: a batch is a few tensor ops
        self.packed, self.seed, self.pad_id, self.device = packed, seed, pad_id, torch.device(device)
        self._start()

    def _epoch_items(self, epoch: int) -> list[list[int]]:
        order = self._permutation(len(self.examples), epoch)
        if not self.packed:
            return [[i] for i in order]
        return [[order[j] for j in row] for row in pack([self.examples[i] for i in order], self.seq_len)]

    @property
    def rows_per_epoch(self) -> int:
        """Rows in one pass (epoch 0's packing; later epochs differ by a row or two at most)."""
        return len(self._epoch_items(0))

    def collate(self, rows: list[list[int]]) -> tuple[Tensor, ...]:
        """Stack rows (lists of example indices) into the batch tuple, on the device."""
        from kiln.align.stage import to_device

        built = self.store.rows(rows, self.seq_len, self.pad_id)
        return to_device(built if self.packed else built[:3], self.device)


def masked_nll(logits: Tensor, labels: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """(summed NLL over ``mask``, token count): logits (B, T, V), labels and mask (B, T)."""
    V = logits.shape[-1]
    target = labels.masked_fill(~mask.bool(), -100)
    nll = F.cross_entropy(logits.float().reshape(-1, V), target.reshape(-1), ignore_index=-100, reduction="sum")
    return nll, mask.sum()


def sft_forward(model_step: Any, model: Any, batch: tuple[Tensor, ...]) -> Tensor:
    """Logits (B, T, V) of a batch tuple: packed rows through the document-aware mask."""
    if len(batch) == 5:
        ids, _, _, pos, doc = batch
        with document_attention(model, doc):
            return model_step(ids, pos)
    return model_step(batch[0])


def sft_loss_fn(model_step: Any, model: Any) -> Any:
    """``loss_fn(*batch)``: mean NLL over the micro-batch's assistant tokens (trl's SFT loss)."""

    def loss_fn(*batch: Tensor) -> Tensor:
        nll, n = masked_nll(sft_forward(model_step, model, batch), batch[1], batch[2])
        return nll / n.clamp(min=1)

    return loss_fn


@torch.no_grad()
def heldout_loss(model: Any, batches: SFTBatches, rows: list[list[int]]) -> float:
    """Token-weighted mean NLL (nats) over held-out rows."""
    was = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for s in range(0, len(rows), batches.micro_batch):
            batch = batches.collate(rows[s : s + batches.micro_batch])
            nll, n = masked_nll(sft_forward(model, model, batch), batch[1], batch[2])
            total, count = total + float(nll), count + int(n)
    finally:
        model.train(was)
    return total / max(count, 1)


def split_heldout(convs: list[Conversation], cfg: SFTConfig) -> tuple[list[Conversation], list[Conversation]]:
    """(train, held-out): a seeded ``heldout_frac`` of ``convs`` unless ``cfg.heldout`` files are given."""
    if cfg.heldout:
        return convs, read_conversations(cfg.heldout)[: cfg.max_heldout]
    from kiln.align.stage import seeded_holdout

    return seeded_holdout(convs, cfg.heldout_frac, cfg.max_heldout, cfg.train.seed)


def run_sft(cfg: SFTConfig, model_dir: str | os.PathLike, out_dir: str | os.PathLike,
            tokenizer: str | os.PathLike | None = None, resume: bool = True, dist: Any = None,
            stop: Any = None, extra_hooks: Sequence[Any] = ()) -> Path:
    """Fine-tune the model in ``model_dir`` on ``cfg.data``; the chat model lands in ``out_dir/model``.

    Resumes from ``out_dir``'s newest checkpoint (bit-identical on the CPU); a finished run with
    the same config and inputs is reused. ``extra_hooks``: ``kiln.train.Hook``-like objects run after the stage's own (a bench's timer, a
    learning curve's probe); a hook's ``due(step, last)`` says when it runs.
    """
    from kiln.align.stage import build_state, export_chat_model, fused_kernels, load_policy, pick_device, train_config
    from kiln.distributed import SingleProcess
    from kiln.train import RunDir, fit

    dist = dist or SingleProcess()
    torch.manual_seed(cfg.train.seed)
    model, tok, tpl = load_policy(model_dir, tokenizer, cfg.add_chat_tokens, pick_device(cfg.train.device))
    kernels = fused_kernels(model, cfg.fused_kernels)
    report = ReadReport()
    train_c, held_c = split_heldout(read_conversations(cfg.data, report), cfg)
    seq_len = cfg.seq_len or model.config.context_length
    enc = [encode_conversation(c, tpl, seq_len + 1, report, cfg.truncate) for c in train_c]
    held = [e for e in (encode_conversation(c, tpl, seq_len + 1, report, cfg.truncate) for c in held_c) if e is not None]
    mb = cfg.train.micro_batch_size or cfg.train.batch_size
    device = next(model.parameters()).device
    pad = tok.eot_id or 0
    enc = require_usable([e for e in enc if e is not None], "training conversations", cfg.data, report)
    batches = SFTBatches(enc, seq_len, mb, cfg.pack, cfg.train.seed, pad, device)
    held_src = SFTBatches(held, seq_len, mb, cfg.pack, 0, pad, device) if held else None
    steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * batches.rows_per_epoch / cfg.train.batch_size))
    tcfg = train_config(cfg.train, model, max_steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps))
    inputs = [model_dir, *[d for d in cfg.data if not str(d).startswith("hf:")]]
    with RunDir(out_dir, "sft", replace(cfg, train=tcfg), inputs, resume=resume, dist=dist) as run, kernels:
        if run.reused:
            return run.path
        state, model_step = build_state(tcfg, model, batches, dist)
        run.begin(state)
        run.log.info(f"sft: {len(batches.examples)} training conversations in {batches.rows_per_epoch} rows of "
                     f"{seq_len} tokens ({'packed' if cfg.pack else 'padded'}), {len(held)} held out, {steps} steps\n"
                     + report.summary())
        evals: list[dict] = []
        hooks = [*_hooks(cfg, model, tpl, held_src, run.log, evals), *extra_hooks]
        if fit(tcfg, state, batches, sft_loss_fn(model_step, model), run, model_step=model_step, hooks=hooks,
               stop=stop, data_tokens=batches.rows_per_epoch * seq_len):
            export_chat_model(run.path, model, tok)
            stats = {"steps": steps, "conversations": len(batches.examples), "rows_per_epoch": batches.rows_per_epoch,
                     "read": report.to_dict(), "heldout_loss": evals[-1]["heldout_loss"] if evals else None,
                     "heldout_loss_first": evals[0]["heldout_loss"] if evals else None}
            run.finish(stats)
    return run.path


def _hooks(cfg: SFTConfig, model: Any, tpl: Any, held_src: SFTBatches | None, runlog: Any, evals: list) -> list:
    from kiln.align.stage import chat_reply
    from kiln.train import Hook

    def evaluate(step: int) -> dict | None:
        if held_src is None:
            return None
        r = {"heldout_loss": heldout_loss(model, held_src, held_src._epoch_items(0))}
        evals.append({"step": step, **r})
        runlog.info(f"step {step} | held-out loss {r['heldout_loss']:.4f} (assistant tokens)")
        runlog.metrics({"step": step, **r})
        return r

    def sample(step: int) -> None:
        from kiln.model.attention import kernels_swapped

        # the engine decodes with the model's own kernels (its compiled step traces them), not the
        # training step's fused ones (``fused_kernels``)
        with kernels_swapped(model, norm=model.config.norm_impl, rope="kiln", fused_proj=False):
            for p in cfg.sample_prompts:
                reply = chat_reply(model, tpl, [{"role": "user", "content": p}], cfg.sample_tokens)
                runlog.info(f"step {step} | sample | user: {p!r} -> assistant: {reply!r}")

    return [Hook(cfg.eval_every, evaluate), Hook(cfg.sample_every, sample)]
