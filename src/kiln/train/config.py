"""``TrainConfig``: every knob of a pretraining run, validated on creation, and its presets."""

from __future__ import annotations

import dataclasses
import difflib
from dataclasses import dataclass, field, replace
from typing import Any

from kiln.model.config import ModelConfig

SCHEDULES = ("cosine", "wsd")
DTYPES = ("auto", "bf16", "fp32")
LOSS_IMPLS = ("torch", "fused")
OPTIMIZERS = ("adamw", "muon")


@dataclass(frozen=True)
class TrainConfig:
    """A pretraining run: model shape, batch, optimizer, schedule, evaluation, checkpoints, guards.

    The defaults run (a small model on the CPU); presets below give named starting points.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    """Model shape (see ``kiln.model.ModelConfig``); set keys as ``model.d_model=...``."""
    vocab_from_data: bool = True
    """Set model.vocab_size from the token shards' header (rounded up to pad_vocab_to)."""
    pad_vocab_to: int = 64
    """Round a data-derived vocab size up to a multiple of this (GPU matmuls like multiples of 64)."""
    batch_size: int = 32
    """Sequences per optimizer step, over all ranks (tokens per step = batch_size * context_length)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward on one rank; 0 means batch_size (no gradient accumulation)."""
    lr: float = 1e-3
    """Peak learning rate after warm-up."""
    min_lr: float = 1e-4
    """Learning rate at the end of the decay."""
    warmup_steps: int = 50
    """Steps of linear warm-up from 0 to lr."""
    schedule: str = "cosine"
    """Learning-rate schedule: "cosine" or "wsd" (warmup-stable-decay)."""
    decay_frac: float = 0.2
    """For "wsd": fraction of max_steps spent in the final linear decay."""
    weight_decay: float = 0.1
    """Decoupled AdamW weight decay on matrices (norms, embeddings: none)."""
    betas: tuple[float, float] = (0.9, 0.95)
    """AdamW (beta1, beta2); on the command line ``betas=0.9,0.95``."""
    eps: float = 1e-8
    """AdamW epsilon."""
    grad_clip: float = 1.0
    """Clip the global gradient L2 norm to this; 0 disables clipping."""
    max_steps: int = 1000
    """Optimizer steps to run (ignored when max_tokens > 0)."""
    max_tokens: int = 0
    """Token budget; when > 0, max_steps = ceil(max_tokens / tokens per step)."""
    eval_every: int = 100
    """Validation loss and bits per byte every this many steps (and at the end); 0 disables."""
    eval_batches: int = 20
    """Batches of validation windows per evaluation (micro-batch x context tokens each, so the
    held-out set moves with the batch size; ``eval_tokens`` fixes it)."""
    eval_tokens: int = 0
    """When > 0, each evaluation scores this many held-out tokens (rounded down to whole
    context-length windows) instead of ``eval_batches`` batches: the same tokens for every batch
    size, so runs that differ in batch size compare on one set."""
    sample_every: int = 200
    """Print a text sample every this many steps (and at the end); 0 disables. Needs a tokenizer."""
    sample_prompt: str = ""
    """Prompt for samples ("" starts from the end-of-text token)."""
    sample_tokens: int = 64
    """Tokens generated per sample."""
    sample_temperature: float = 0.8
    """Sampling temperature (0 = greedy)."""
    save_every: int = 500
    """Checkpoint every this many steps (and at the end); 0 saves only at the end."""
    keep_last: int = 2
    """Checkpoints kept on disk (older ones are deleted); at least 1."""
    seed: int = 1337
    """Seed for initialization and data order."""
    deterministic: bool = False
    """Bitwise-reproducible steps on the GPU (``kiln.kernels.deterministic_mode``: torch's deterministic
    algorithms, cuBLAS's fixed workspace, one fixed launch configuration per Kiln kernel); costs speed
    (docs/train.md#reproducibility). The CPU is deterministic without it, at any fixed thread count."""
    device: str = "auto"
    """"auto" (cuda if available, else cpu), or a torch device string ("cpu", "cuda:0")."""
    dtype: str = "auto"
    """"auto" (bf16 autocast on cuda, fp32 on cpu), "bf16" or "fp32"."""
    compile: bool = False
    """torch.compile the model and its loss as one graph (GPU speed; the first step pays the compile time)."""
    compile_mode: str = "default"
    """torch.compile mode: "default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"."""
    loss_impl: str = "torch"
    """"torch": logits + Kiln's cross_entropy (fused by torch.compile when compile=true); "fused":
    Kiln's chunked Triton linear + cross-entropy kernel (logits never held)."""
    fused_optimizer: bool = True
    """On CUDA, Kiln's Triton optimizer kernels: AdamW's one-pass update (``kiln.kernels.adamw``) and
    Muon's two elementwise passes around Newton-Schulz (``kiln.kernels.muon``); else eager torch ops."""
    optimizer: str = "adamw"
    """"adamw" for every parameter, or "muon": Muon (orthogonalized momentum) for the transformer
    blocks' matrices and AdamW for embeddings, head and norms (``kiln.train.muon``)."""
    muon_lr: float = 0.0
    """Peak learning rate of the Muon matrices (optimizer="muon"); 0: the same as lr (Muon's update is
    scaled to AdamW's RMS, Moonshot's rule, so one lr fits both). The schedule scales it like lr."""
    muon_momentum: float = 0.95
    """Muon's momentum (Nesterov)."""
    muon_weight_decay: float = -1.0
    """Decoupled weight decay of the Muon matrices (optimizer="muon"); -1: the same as weight_decay.
    With tied embeddings the Muon matrices are the only decayed weights, so this is the knob that
    matters when the data is repeated for several epochs (see docs/train.md#speedrun)."""
    max_seconds: float = 0.0
    """Time budget in seconds of training steps (not counting the first step, which carries the
    compilation, nor evaluation and saving); 0: none.
    The schedule follows steps or seconds, whichever is further along, so a cut run ends decayed."""
    doc_aligned: bool = False
    """Training windows start at document starts (long documents continue in the next windows), so a
    sequence begins with a document's first tokens instead of a random offset; windows stay packed."""
    log_every: int = 1
    """Write a log line every this many steps (metrics.jsonl gets every step); 0: none."""
    spike_window: int = 50
    """Recent good losses kept to judge whether a new loss is a spike."""
    spike_min_history: int = 20
    """Good losses needed before spike detection starts (non-finite losses are always caught)."""
    spike_zscore: float = 6.0
    """A loss is a spike if above mean + spike_zscore * std of the window..."""
    spike_ratio: float = 1.3
    """...and also above spike_ratio * the window mean (so flat windows do not cry wolf)."""
    rollback_after: int = 3
    """This many skipped steps within spike_window steps roll back to the last good checkpoint."""
    max_rollbacks: int = 3
    """Give up with an error after this many rollbacks."""

    def __post_init__(self) -> None:
        def positive(name: str, allow_zero: bool = False) -> None:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < (0 if allow_zero else 1):
                bound = ">= 0" if allow_zero else ">= 1"
                raise ValueError(f"TrainConfig.{name}={v!r} must be an integer {bound}")

        for name in ("batch_size", "max_steps", "eval_batches", "keep_last", "spike_window",
                     "rollback_after", "sample_tokens", "pad_vocab_to"):
            positive(name)
        for name in ("micro_batch_size", "warmup_steps", "max_tokens", "eval_every", "eval_tokens", "sample_every",
                     "save_every", "spike_min_history", "max_rollbacks", "log_every"):
            positive(name, allow_zero=True)
        mb = self.micro_batch_size or self.batch_size
        if self.batch_size % mb:
            raise ValueError(
                f"batch_size {self.batch_size} is not divisible by micro_batch_size {mb}; "
                f"pick a micro_batch_size that divides it (e.g. {max(d for d in range(1, mb + 1) if self.batch_size % d == 0)})"
            )
        if not self.lr > 0:
            raise ValueError(f"TrainConfig.lr={self.lr} must be > 0 (e.g. 6e-4)")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"TrainConfig.min_lr={self.min_lr} must be in [0, lr={self.lr}]")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"TrainConfig.schedule={self.schedule!r} is unknown; use one of {SCHEDULES}")
        if not 0 <= self.decay_frac <= 1:
            raise ValueError(f"TrainConfig.decay_frac={self.decay_frac} must be in [0, 1]")
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"TrainConfig.loss_impl={self.loss_impl!r} is unknown; use one of {LOSS_IMPLS}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"TrainConfig.optimizer={self.optimizer!r} is unknown; use one of {OPTIMIZERS}")
        if self.compile_mode not in ("default", "max-autotune-no-cudagraphs", "max-autotune", "reduce-overhead"):
            raise ValueError(f"TrainConfig.compile_mode={self.compile_mode!r} is unknown; use default, "
                             "max-autotune-no-cudagraphs, max-autotune or reduce-overhead")
        if self.max_seconds < 0 or self.muon_lr < 0 or not 0 <= self.muon_momentum < 1:
            raise ValueError("TrainConfig.max_seconds must be >= 0, muon_lr >= 0 and muon_momentum in [0, 1)")
        if not (self.muon_weight_decay >= 0 or self.muon_weight_decay == -1):
            raise ValueError(f"TrainConfig.muon_weight_decay={self.muon_weight_decay} must be >= 0, "
                             "or -1 for the same as weight_decay")
        if self.dtype not in DTYPES:
            raise ValueError(f"TrainConfig.dtype={self.dtype!r} is unknown; use one of {DTYPES}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"TrainConfig.betas={self.betas} must be two numbers in [0, 1), e.g. 0.9,0.95")
        if self.weight_decay < 0 or self.grad_clip < 0 or self.eps < 0:
            raise ValueError("TrainConfig.weight_decay, grad_clip and eps must be >= 0")
        if self.spike_zscore <= 0 or self.spike_ratio < 1:
            raise ValueError("TrainConfig.spike_zscore must be > 0 and spike_ratio >= 1")
        if self.warmup_steps > self.max_steps and self.max_tokens == 0:
            raise ValueError(
                f"warmup_steps {self.warmup_steps} exceeds max_steps {self.max_steps}; lower warmup_steps"
            )

    @property
    def micro_batch(self) -> int:
        """Sequences per forward/backward (micro_batch_size, or batch_size when 0)."""
        return self.micro_batch_size or self.batch_size

    @property
    def tokens_per_step(self) -> int:
        """Tokens consumed by one optimizer step."""
        return self.batch_size * self.model.context_length

    @property
    def eval_token_count(self) -> int:
        """Held-out tokens one evaluation scores: ``eval_tokens`` in whole context-length windows,
        else ``eval_batches`` x micro-batch windows."""
        ctx = self.model.context_length
        if self.eval_tokens > 0:
            return max(self.eval_tokens // ctx, 1) * ctx
        return self.eval_batches * self.micro_batch * ctx

    @property
    def total_steps(self) -> int:
        """max_steps, or the token budget in steps when max_tokens > 0."""
        if self.max_tokens:
            return -(-self.max_tokens // self.tokens_per_step)
        return self.max_steps


# Presets are functions returning a config (a registry is a plain dict literal).
def tiny() -> TrainConfig:
    """A 1.4M-parameter model for the CPU demo: on a 2-core CPU, 400 steps of 2,048 tokens take
    about 200 s (~4.8k tok/s) and reach ~1.47 bits per byte on held-out KJV chapters, with
    samples that read as English. Width 128 rather than 192: the CPU is compute-bound (matmuls
    ~60% of the step), and d 192 (2.6M params) doubles the time for 0.04 bits per byte."""
    return TrainConfig(
        model=ModelConfig(vocab_size=4096, context_length=128, d_model=128, n_layers=4, n_heads=4,
                          d_ff=384, tie_embeddings=True),
        batch_size=16, lr=3e-3, min_lr=3e-4, warmup_steps=30, max_steps=400, weight_decay=0.1,
        eval_every=100, eval_batches=10, sample_every=200, save_every=200,
    )


def gpt2_small() -> TrainConfig:
    """GPT-2-small shape (124M, Llama-style) for one GPU: 0.5M tokens per step, 20 tokens per
    parameter (Chinchilla, arXiv:2203.15556) = 2.5B tokens, about 4,800 steps."""
    return TrainConfig(
        model=ModelConfig(vocab_size=50304, context_length=1024, d_model=768, n_layers=12, n_heads=12,
                          d_ff=2048, tie_embeddings=True, attention_impl="sdpa"),
        batch_size=512, micro_batch_size=32, lr=6e-4, min_lr=6e-5, warmup_steps=700,
        max_tokens=2_500_000_000, eval_every=250, eval_batches=40, sample_every=1000, save_every=1000,
        compile=True, log_every=10,
    )


def speedrun() -> TrainConfig:
    """The best model Kiln trains in 10 minutes of one H100 on the Gutenberg books (tokenized by
    Kiln's tokenizer, vocab 8192): see docs/train.md#speedrun for the measured run and
    docs/LOG.md for the ablations behind each choice. ``max_seconds=600`` is the budget; the
    schedule (WSD, decay over the last 30%) follows the clock, so a cut run still ends decayed.
    The 600 s run sees the 92M-token corpus ~3.8 times, so it is data-bound: Muon's matrices get
    weight decay 0.8 (held-out 2.919, against 2.965 with 0.4 and 3.056 with 0.1 on the same seed;
    the train loss ends higher)."""
    return TrainConfig(
        model=ModelConfig(vocab_size=8192, context_length=1024, d_model=768, n_layers=12, n_heads=6,
                          tie_embeddings=True, attention_impl="sdpa"),
        batch_size=64, lr=1.5e-3, min_lr=0.0, warmup_steps=100, schedule="wsd", decay_frac=0.3, optimizer="muon",
        muon_weight_decay=0.8, max_steps=100_000, max_seconds=600.0, compile=True, doc_aligned=True,
        eval_every=1000, eval_batches=32, eval_tokens=2_097_152, sample_every=0, save_every=0, log_every=50,
    )


PRESETS = {"tiny": tiny, "gpt2_small": gpt2_small, "speedrun": speedrun}


def _parse_value(raw: str, current: Any, key: str) -> Any:
    if isinstance(current, bool):
        low = raw.strip().lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--set {key}={raw}: expected true or false")
    try:
        if isinstance(current, int):
            try:
                return int(raw.replace("_", ""))
            except ValueError:
                f = float(raw)  # accept 1e6
                if not f.is_integer():
                    raise
                return int(f)
        if isinstance(current, float):
            return float(raw)
        if isinstance(current, tuple):
            return tuple(type(current[0])(v) if current else float(v) for v in raw.split(","))
    except ValueError:
        raise ValueError(f"--set {key}={raw}: expected a {type(current).__name__} like {current!r}") from None
    if current is None:  # optional fields: a number if it parses, else the string
        if raw.strip().lower() == "none":
            return None
        for conv in (int, float):
            try:
                return conv(raw)
            except ValueError:
                pass
    return raw


def apply_overrides(cfg: TrainConfig, overrides: list[str]) -> TrainConfig:
    """Apply ``key=value`` strings (``lr=3e-4``, ``model.d_model=512``, ``betas=0.9,0.99``) to a
    config, converting each value to the field's type. Unknown keys raise a ValueError naming the
    closest known keys. All keys are applied together, so ``model.d_model=32 model.n_heads=2`` is
    validated as a pair, not one at a time."""
    top: dict[str, Any] = {}
    model: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. lr=3e-4 or model.n_layers=6")
        key, raw = item.split("=", 1)
        key = key.strip()
        if key.startswith("model."):
            sub, owner, name = cfg.model, "model.", key[6:]
        else:
            sub, owner, name = cfg, "", key
        names = [f.name for f in dataclasses.fields(sub)]
        if name not in names or name == "model":
            known = [f"model.{n}" for n in (f.name for f in dataclasses.fields(cfg.model))] + [
                n for n in (f.name for f in dataclasses.fields(cfg)) if n != "model"
            ]
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
            raise ValueError(f"--set {key}: unknown config key{hint}")
        (model if owner else top)[name] = _parse_value(raw, getattr(sub, name), key)
    if model:
        m = cfg.model
        # Derived fields follow their source unless set too: plain multi-head attention stays plain,
        # a default SwiGLU width follows d_model.
        if "n_heads" in model and "n_kv_heads" not in model and m.n_kv_heads == m.n_heads:
            model["n_kv_heads"] = None
        if "d_model" in model and "d_ff" not in model and m.d_ff == 64 * -(-(8 * m.d_model // 3) // 64):
            model["d_ff"] = None
        top["model"] = replace(m, **model)
    return replace(cfg, **top) if top else cfg

