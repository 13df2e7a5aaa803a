"""``kiln grpo``: group relative policy optimization with verifiable rewards (DeepSeekMath, arXiv:2402.03300).

Each rollout batch: ``prompts_per_rollout`` questions, ``group_size`` sampled replies each (the
engine, ``kiln.align.rollout``), rewards from a plain callable, advantages normalized within each
group, and the policy's log-probs of the samples at rollout time (the "old" log-probs of the
clipped ratio). The batch then feeds ``rollout_epochs x samples / train.batch_size`` optimizer
steps. The stage is ``RolloutSource`` (a ``Stateful`` batch source that generates when its buffer
runs out; its state holds the rollout counter, from which every sampling seed derives, and the
unconsumed buffer, so a resumed run samples exactly the same), a loss (``grpo_loss_fn``, the pure
``kiln.align.losses.grpo_loss``) and hooks (rollout rewards, held-out reward), handed to
``kiln.train.fit``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from kiln.align.losses import compute_group_normalized_rewards, grpo_loss, token_log_probs
from kiln.align.rewards import REWARDS, RewardFn, addition_problems
from kiln.align.stage import NO_SPIKE_GUARD
from kiln.train.config import TrainConfig

Problem = tuple[str, str]
"""(question, ground-truth answer)."""


def grpo_train_defaults() -> TrainConfig:
    """The runtime settings GRPO starts from: constant small lr, no decay, the spike guard off."""
    return TrainConfig(lr=2e-5, min_lr=2e-5, warmup_steps=0, weight_decay=0.0, batch_size=16, max_steps=100,
                       eval_every=0, sample_every=0, save_every=20, log_every=1, **NO_SPIKE_GUARD)


@dataclass(frozen=True)
class GRPOConfig:
    """Policy optimization on verifiable rewards (``kiln grpo``). ``train.batch_size``: samples per step."""

    task: str = "addition"
    """"addition" (the seeded synthetic task) or a .jsonl of {"question", "answer"} (GSM8K's layout)."""
    reward: str = ""
    """Reward function: addition, gsm8k, math or format; empty: addition for the synthetic task, else gsm8k."""
    digits: int = 2
    """Operand digits of the synthetic addition task."""
    group_size: int = 8
    """Replies sampled per prompt (G); advantages are normalized within each group."""
    prompts_per_rollout: int = 4
    """Prompts per rollout batch (samples = prompts x group_size)."""
    rollout_epochs: int = 1
    """Passes over each rollout batch (>1: off-policy steps, the clipped ratio against the old log-probs)."""
    rollouts: int = 20
    """Rollout batches in the run (sets the steps unless ``max_steps``)."""
    max_steps: int = 0
    """Optimizer steps; 0: from ``rollouts``."""
    max_new_tokens: int = 16
    """Longest reply, in tokens."""
    temperature: float = 1.0
    """Sampling temperature of the rollouts; the loss takes its log-probs at the same temperature."""
    loss_type: str = "grpo_clip"
    """grpo_clip (clipped surrogate), reinforce_with_baseline, or no_baseline (raw rewards)."""
    cliprange: float = 0.2
    """Clip of the probability ratio (PPO's epsilon)."""
    normalize_by_std: bool = True
    """Divide advantages by the group's std (GRPO); False: mean-centred only (Dr. GRPO)."""
    advantage_eps: float = 1e-6
    """Added to the group std before dividing."""
    kl_coef: float = 0.0
    """Weight of the KL to the reference (the starting policy, kept frozen in memory when > 0)."""
    eval_prompts: int = 64
    """Held-out prompts scored greedily at each evaluation (reward before and after)."""
    eval_every: int = 10
    """Steps between held-out evaluations (also first and last); 0: never."""
    add_chat_tokens: bool = False
    """Add the chat tokens to a tokenizer that lacks them."""
    train: TrainConfig = field(default_factory=grpo_train_defaults)
    """Runtime settings (``train.lr``, ``train.batch_size`` in samples, ``train.seed``, ``train.device``...)."""

    def __post_init__(self) -> None:
        n = self.group_size * self.prompts_per_rollout
        if self.group_size < 2:
            raise ValueError(f"GRPOConfig.group_size={self.group_size} must be >= 2 (advantages compare replies)")
        if (n * self.rollout_epochs) % self.train.batch_size:
            raise ValueError(f"rollout samples x epochs = {n} x {self.rollout_epochs} is not a multiple of "
                             f"train.batch_size={self.train.batch_size}; pick a batch size that divides it")
        if self.loss_type not in ("grpo_clip", "reinforce_with_baseline", "no_baseline"):
            raise ValueError(f"GRPOConfig.loss_type={self.loss_type!r}; use grpo_clip, reinforce_with_baseline "
                             "or no_baseline")

    @property
    def sampling_temperature(self) -> float:
        """The temperature of the distribution the rollouts were drawn from, which every log-prob of
        the loss (policy, old, reference) is taken under: ``softmax(logits / T)``; 1 for greedy rollouts."""
        return self.temperature if self.temperature > 0 else 1.0

    @property
    def on_policy(self) -> bool:
        """One optimizer step per rollout batch: the samples' old log-probs are the step's own."""
        return self.steps_per_rollout == 1

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps each rollout batch feeds."""
        return self.group_size * self.prompts_per_rollout * self.rollout_epochs // self.train.batch_size

    def reward_fn(self) -> RewardFn:
        name = self.reward or ("addition" if self.task == "addition" else "gsm8k")
        if name not in REWARDS:
            raise ValueError(f"GRPOConfig.reward={name!r} is unknown; use one of {sorted(REWARDS)}")
        return REWARDS[name]


def grpo_addition_cpu() -> GRPOConfig:
    """GRPO settings measured to raise greedy accuracy on the synthetic addition task on a CPU.

    One-digit sums, 8 prompts x 8 replies per rollout batch, one on-policy optimizer step per batch
    (64 samples), AdamW at a constant lr 3e-4, sampling temperature 0.7, no KL, 300 rollouts.
    From a 2-layer d=64 model SFT'd to 0.14-0.16 greedy accuracy it reached 0.55-0.66 on 128 held-out
    prompts over seeds 0-2, ~45-51 CPU-seconds each (``python -m kiln.align.learning``; docs/align.md,
    "GRPO that learns"). Start it from a model that already gets some sums right: a group whose
    samples all score the same has zero advantages.
    """
    base = grpo_train_defaults()
    return GRPOConfig(digits=1, group_size=8, prompts_per_rollout=8, rollouts=300, temperature=0.7,
                      kl_coef=0.0, eval_prompts=128, eval_every=100,
                      train=replace(base, lr=3e-4, min_lr=3e-4, batch_size=64, optimizer="adamw"))


def grpo_addition2_cpu() -> GRPOConfig:
    """GRPO settings measured to raise greedy accuracy on two-digit sums on a CPU.

    ``grpo_addition_cpu()`` with two-digit operands, 100 rollouts and **lr 3e-5**, a tenth of the
    one-digit preset's: from a model SFT'd on two-digit sums to ~0.5 greedy accuracy, lr 3e-4 took
    held-out accuracy from 0.48 to 0.13 in 100 rollouts while lr 3e-5 raised it (docs/align.md,
    "Two-digit sums"). The two-digit held-out prompts are mostly sums never seen in training (8,100
    problems), so a gain here is generalization, not recall.
    """
    base = grpo_addition_cpu()
    return replace(base, digits=2, rollouts=100, eval_every=25,
                   train=replace(base.train, lr=3e-5, min_lr=3e-5))


def load_problems(cfg: GRPOConfig, n: int, seed: int) -> list[Problem]:
    """``n`` problems of the task: seeded synthetic ones, or the first ``n`` records of a file."""
    if cfg.task == "addition":
        return addition_problems(n, seed, cfg.digits)
    out: list[Problem] = []
    with open(cfg.task, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            try:
                rec = json.loads(line)
                out.append((rec["question"], rec["answer"]))
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{cfg.task}:{lineno} is not a {{\"question\", \"answer\"}} record ({e})") from None
    return out if n <= 0 else out[:n]


class RolloutSource:
    """GRPO's batch source: generates a rollout batch when the buffer is empty (see the module docstring).

    Yields ``(ids, labels, mask, advantages, raw_rewards, old_log_probs, ref_log_probs)``:
    (m, L) long, (m, L) long, (m, L) bool, (m,), (m,), (m, L), (m, L).
    """

    def __init__(self, model: Any, tpl: Any, problems: list[Problem], cfg: GRPOConfig, micro_batch: int,
                 ref_model: Any = None, vocab_limit: int | None = None) -> None:
        self.model, self.tpl, self.problems, self.cfg = model, tpl, problems, cfg
        self.micro_batch, self.ref_model, self.vocab_limit = micro_batch, ref_model, vocab_limit
        self.reward_fn = cfg.reward_fn()
        self.seed = cfg.train.seed
        self.rollout, self.pos = 0, 0
        self.buffer: list[tuple[Tensor, ...]] = []
        self.stats: list[dict[str, float]] = []  # one row per rollout, read by the logging hook
        self.logged = 0  # rows of ``stats`` already logged (checkpointed with them)
        self.engine: Any = None

    def __iter__(self) -> RolloutSource:
        return self

    def __next__(self) -> tuple[Tensor, ...]:
        if self.pos >= len(self.buffer):
            self.buffer, self.pos = self.generate(self.rollout), 0
            self.rollout += 1
        self.pos += 1
        return self.buffer[self.pos - 1]

    def generate(self, k: int) -> list[tuple[Tensor, ...]]:
        """Rollout batch ``k``: sample, score, normalize, take old (and reference) log-probs, cut into
        micro-batches in a seeded order per epoch. A function of (seed, k, the policy's weights)."""
        from kiln.align.stage import to_device
        from kiln.train.loop import autocast_for

        cfg, G = self.cfg, self.cfg.group_size
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + k)
        picks = torch.randint(len(self.problems), (cfg.prompts_per_rollout,), generator=g).tolist()
        prompts = [self.tpl.render([{"role": "user", "content": self.problems[i][0]}]) for i in picks for _ in range(G)]
        truths = [self.problems[i][1] for i in picks for _ in range(G)]
        replies = self.rollout_engine().generate(prompts, cfg.max_new_tokens, cfg.temperature,
                                       seed=self.seed * 7919 + k * 100_003, stop_token_ids=self.tpl.stop_token_ids)
        texts = [self.tpl.tokenizer.decode([t for t in r if t not in self.tpl.stop_token_ids]) for r in replies]
        adv, raw, meta = compute_group_normalized_rewards(self.reward_fn, texts, truths, G, cfg.advantage_eps,
                                                          cfg.normalize_by_std)
        meta["reply_tokens"] = sum(map(len, replies)) / len(replies)
        self.stats.append({"rollout": k, **meta})
        ids, labels, mask = _rows(prompts, replies, self.tpl.tokenizer.eot_id or 0)
        dev = next(self.model.parameters()).device
        ids, labels, mask, adv, raw = to_device((ids, labels, mask, adv, raw), dev)
        # One optimizer step per rollout batch is on-policy: the old log-probs are the step's own
        # (detached, in the loss), so the extra forward over every sample is skipped (as trl does).
        zeros = torch.zeros(ids.shape, device=dev)
        with autocast_for(cfg.train.dtype, dev):  # the step's own precision: the first ratio is exactly 1
            T = cfg.sampling_temperature
            V = self.vocab_limit
            old = zeros if cfg.on_policy else _log_probs(self.model, ids, labels, self.micro_batch, T, V)
            ref = _log_probs(self.ref_model, ids, labels, self.micro_batch, T, V) if self.ref_model is not None else zeros
        out = []
        for e in range(cfg.rollout_epochs):
            order = torch.randperm(len(prompts), generator=g).to(dev)
            for s in range(0, len(prompts), self.micro_batch):
                j = order[s : s + self.micro_batch]
                out.append((ids[j], labels[j], mask[j], adv[j], raw[j], old[j], ref[j]))
        return out

    def rollout_engine(self) -> Any:
        """The run's one engine (CUDA graphs captured once), made on first use; held-out evaluation
        shares it. Its KV pool holds ``prompts x group`` sequences of the longest rendered prompt
        (with room to spare) plus ``max_new_tokens``, not full contexts: the pool is the engine's
        largest allocation."""
        from kiln.align.rollout import RolloutEngine

        if self.engine is None:
            cfg = self.cfg
            longest = max(len(self.tpl.render([{"role": "user", "content": q}])) for q, _ in self.problems[:512])
            self.engine = RolloutEngine(self.model, max_num_seqs=cfg.prompts_per_rollout * cfg.group_size,
                                        vocab_limit=self.vocab_limit, max_seq_tokens=2 * longest + cfg.max_new_tokens)
        return self.engine

    def state_dict(self) -> dict:
        """The rollout counter (every seed derives from it), the position and the unconsumed buffer."""
        rest = [list(b) for b in self.buffer[self.pos :]]
        return {"seed": self.seed, "rollout": self.rollout, "buffer": rest, "stats": json.dumps(self.stats),
                "logged": self.logged}

    def load_state_dict(self, s: dict) -> None:
        dev = next(self.model.parameters()).device
        self.seed, self.rollout = int(s["seed"]), int(s["rollout"])
        self.buffer = [tuple(t.to(dev) for t in b) for b in s["buffer"]]
        self.pos = 0
        self.stats, self.logged = json.loads(s["stats"]), int(s["logged"])

    def reseed(self, seed: int) -> None:
        self.seed = seed


def _rows(prompts: list[list[int]], replies: list[list[int]], pad_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """prompt + reply rows, right-padded: ids (N, L), labels (N, L), mask (N, L) on the reply's labels."""
    L = max(len(p) + len(r) for p, r in zip(prompts, replies)) - 1
    ids = torch.full((len(prompts), L + 1), pad_id, dtype=torch.long)
    mask = torch.zeros(len(prompts), L + 1, dtype=torch.bool)
    for b, (p, r) in enumerate(zip(prompts, replies)):
        ids[b, : len(p) + len(r)] = torch.tensor(p + r)
        mask[b, len(p) : len(p) + len(r)] = True
    return ids[:, :-1], ids[:, 1:].clone(), mask[:, 1:]


@torch.no_grad()
def _log_probs(model: Any, ids: Tensor, labels: Tensor, micro_batch: int, temperature: float,
               vocab_limit: int | None = None) -> Tensor:
    """Per-token log-probs (N, L) of the sampler's distribution (``temperature``, ids below
    ``vocab_limit``), in micro-batches as the training step sees them."""
    return torch.cat([token_log_probs(model(ids[s : s + micro_batch]), labels[s : s + micro_batch], temperature,
                                      vocab_limit) for s in range(0, len(ids), micro_batch)])


def grpo_loss_fn(model_step: Any, cfg: GRPOConfig, vocab_limit: int | None = None) -> Any:
    """``loss_fn(*batch)``: ``kiln.align.losses.grpo_loss`` of the micro-batch, its log-probs those of
    the distribution the rollouts were sampled from (``cfg.temperature``; ids below ``vocab_limit``,
    the tokenizer's size, as the engine samples: a padded vocabulary's rows are never drawn)."""

    def loss_fn(ids: Tensor, labels: Tensor, mask: Tensor, adv: Tensor, raw: Tensor, old: Tensor,
                ref: Tensor) -> Tensor:
        # log pi_T over the ids the engine samples (as trl's GRPOTrainer takes the temperature): the
        # gradient of log softmax(z) instead, with samples of softmax(z / T), has a term A (p_T - p_1)
        # that a group baseline does not cancel after a shared prefix: it sharpens what follows a
        # rewarded prefix and flattens what follows an unrewarded one; the padded vocabulary's rows
        # in the softmax likewise soaked up mass no sample ever shows (docs/LOG.md, issue 18).
        lp = token_log_probs(model_step(ids), labels, cfg.sampling_temperature, vocab_limit)  # (m, L)
        if cfg.on_policy:
            old = lp.detach()
        loss, _ = grpo_loss(lp, mask, cfg.loss_type, raw_rewards=raw, advantages=adv, old_log_probs=old,
                            cliprange=cfg.cliprange, ref_log_probs=ref, kl_coef=cfg.kl_coef)
        return loss

    return loss_fn


@torch.no_grad()
def evaluate_reward(model: Any, tpl: Any, problems: list[Problem], reward_fn: RewardFn, max_new_tokens: int,
                    vocab_limit: int | None = None, engine: Any = None) -> dict[str, float]:
    """Greedy replies to ``problems``: mean reward, answer accuracy and format rate. ``engine``: a
    ``RolloutEngine`` to reuse (the run's own: its CUDA graphs are already captured)."""
    from kiln.align.rollout import generate_replies

    prompts = [tpl.render([{"role": "user", "content": q}]) for q, _ in problems]
    replies = generate_replies(model, prompts, max_new_tokens, 0.0, 0, tpl.stop_token_ids, vocab_limit=vocab_limit,
                               engine=engine)
    rs = [reward_fn(tpl.tokenizer.decode([t for t in r if t not in tpl.stop_token_ids]), a)
          for r, (_, a) in zip(replies, problems)]
    n = max(len(rs), 1)
    return {"heldout_reward": sum(r["reward"] for r in rs) / n,
            "heldout_accuracy": sum(r["answer_reward"] for r in rs) / n,
            "heldout_format": sum(r["format_reward"] for r in rs) / n}


def run_grpo(cfg: GRPOConfig, model_dir: str | os.PathLike, out_dir: str | os.PathLike,
             tokenizer: str | os.PathLike | None = None, resume: bool = True, dist: Any = None,
             stop: Any = None, extra_hooks: Sequence[Any] = ()) -> Path:
    """Train the model in ``model_dir`` with GRPO on ``cfg.task``; the result lands in ``out_dir/model``.

    ``extra_hooks``: ``kiln.train.Hook``-like objects run after the stage's own (a bench's timer, a
    learning curve's probe); a hook's ``due(step, last)`` says when it runs.
    """
    import copy

    from kiln.align.stage import build_state, export_chat_model, load_policy, pick_device, train_config
    from kiln.distributed import SingleProcess
    from kiln.train import RunDir, fit

    dist = dist or SingleProcess()
    torch.manual_seed(cfg.train.seed)
    model, tok, tpl = load_policy(model_dir, tokenizer, cfg.add_chat_tokens, pick_device(cfg.train.device))
    problems = load_problems(cfg, 100_000 if cfg.task == "addition" else 0, cfg.train.seed)
    held = load_problems(cfg, cfg.eval_prompts, cfg.train.seed + 10**6) if cfg.task == "addition" else problems[-cfg.eval_prompts:]
    train_problems = problems if cfg.task == "addition" else problems[: -cfg.eval_prompts] or problems
    ref = copy.deepcopy(model).eval().requires_grad_(False) if cfg.kl_coef else None
    mb = cfg.train.micro_batch_size or cfg.train.batch_size
    source = RolloutSource(model, tpl, train_problems, cfg, mb, ref, tok.vocab_size)
    steps = cfg.max_steps or cfg.rollouts * cfg.steps_per_rollout
    tcfg = train_config(cfg.train, model, max_steps=steps, warmup_steps=min(cfg.train.warmup_steps, steps))
    inputs = [model_dir] + ([cfg.task] if cfg.task != "addition" else [])
    with RunDir(out_dir, "grpo", replace(cfg, train=tcfg), inputs, resume=resume, dist=dist) as run:
        if run.reused:
            return run.path
        state, model_step = build_state(tcfg, model, source, dist)
        run.begin(state)
        run.log.info(f"grpo: task {cfg.task}, {cfg.prompts_per_rollout} prompts x {cfg.group_size} replies per "
                     f"rollout, {cfg.steps_per_rollout} steps each, {steps} steps, {cfg.loss_type}")
        evals: list[dict] = []
        hooks = [*_hooks(cfg, tcfg, model, tpl, held, source, run.log, evals, tok.vocab_size), *extra_hooks]
        if fit(tcfg, state, source, grpo_loss_fn(model_step, cfg, tok.vocab_size), run, model_step=model_step,
               hooks=hooks, stop=stop):
            export_chat_model(run.path, model, tok)
            run.finish({"steps": steps, "rollouts": source.rollout, "first_eval": evals[0] if evals else None,
                        "last_eval": evals[-1] if evals else None, "rollout_rewards": [s["reward_mean"] for s in source.stats]})
    return run.path


def _hooks(cfg: GRPOConfig, tcfg: TrainConfig, model: Any, tpl: Any, held: list[Problem], source: RolloutSource,
           runlog: Any, evals: list, vocab_limit: int) -> list:
    from kiln.train import Hook

    def log_rollouts(step: int) -> None:
        for s in source.stats[source.logged :]:
            runlog.metrics({"step": step, **s})
            runlog.info(f"step {step} | rollout {s['rollout']} | reward {s['reward_mean']:.3f} (min {s['reward_min']:.2f}"
                        f", max {s['reward_max']:.2f}) | {s['reply_tokens']:.1f} tokens/reply")
        source.logged = len(source.stats)

    def evaluate(step: int) -> dict:
        r = evaluate_reward(model, tpl, held, source.reward_fn, cfg.max_new_tokens, vocab_limit, source.rollout_engine())
        evals.append({"step": step, **r})
        runlog.metrics({"step": step, **r})
        runlog.info(f"step {step} | held-out reward {r['heldout_reward']:.3f} | accuracy {r['heldout_accuracy']:.3f}"
                    f" | format {r['heldout_format']:.3f} ({len(held)} prompts, greedy)")
        return r

    return [Hook(tcfg.log_every, log_rollouts), Hook(cfg.eval_every, evaluate)]
