"""What SFT, DPO and GRPO share around the runtime: loading the policy, the run state, the export.

Each stage is a thin user of ``kiln.train``'s runtime (``fit(cfg, state, batches, loss_fn, run,
hooks=...)``): it supplies a batch source (``Stateful``: its position is in every checkpoint), a
loss function and hooks; the loop, checkpoints, resume, logging and the schedule are the runtime's.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

from kiln.align.chat import CHAT_TOKENS, ChatTemplate, prepare_chat_model
from kiln.distributed.runtime import pick_device as pick_device  # the one device choice; stages import it here
from kiln.tokenizer.tokenizer import Tokenizer

NO_SPIKE_GUARD = {"spike_min_history": 10**9}
"""TrainConfig overrides that switch the spike guard off: preference and policy-gradient losses
change sign and scale by design (a DPO loss falls toward 0, a GRPO loss is centered on 0), so a
loss 1.3x its median is no sign of divergence there."""


def to_device(tensors: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, ...]:
    """Host tensors onto ``device`` without waiting: on CUDA through pinned memory with
    ``non_blocking=True``. A copy from pageable memory synchronizes the stream, so the host would wait
    for every queued step before building the next batch, and the runtime's steps (queued without
    host syncs, ``kiln.train.step``) would run one at a time. The pinned buffers come from torch's
    caching host allocator, which keeps each one until its copy has run."""
    if device.type != "cuda":
        return tuple(t.to(device) for t in tensors)
    return tuple(t.pin_memory().to(device, non_blocking=True) for t in tensors)


class EpochBatches:
    """Base of the stages' batch sources: items drawn ``micro_batch`` at a time, epoch after epoch,
    each epoch in its own seeded order; ``Stateful`` (``(epoch, pos, seed)`` is the position).

    A subclass sets ``micro_batch`` and ``seed``, defines ``_epoch_items(epoch)`` (that epoch's items in
    order) and ``collate(items)`` (the batch tuple), and calls ``_start()`` once its data is in place.
    """

    micro_batch: int
    seed: int

    def _start(self) -> None:
        self.epoch, self.pos = 0, 0
        self._items = self._epoch_items(0)

    def _epoch_items(self, epoch: int) -> list:
        raise NotImplementedError

    def collate(self, items: list) -> tuple[torch.Tensor, ...]:
        raise NotImplementedError

    def _permutation(self, n: int, epoch: int) -> list[int]:
        """Epoch ``epoch``'s order of ``n`` items (the same for the same seed, on any machine)."""
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(n, generator=g).tolist()

    def __iter__(self) -> EpochBatches:
        return self

    def __next__(self) -> tuple[torch.Tensor, ...]:
        picked = []
        while len(picked) < self.micro_batch:
            if self.pos >= len(self._items):
                self.epoch, self.pos = self.epoch + 1, 0
                self._items = self._epoch_items(self.epoch)
            picked.append(self._items[self.pos])
            self.pos += 1
        return self.collate(picked)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos, "seed": self.seed}

    def load_state_dict(self, s: dict) -> None:
        self.seed, self.epoch, self.pos = int(s["seed"]), int(s["epoch"]), int(s["pos"])
        self._items = self._epoch_items(self.epoch)

    def reseed(self, seed: int) -> None:
        """A new order from this point (the runtime's rollback)."""
        self.seed = seed
        self._items = self._epoch_items(self.epoch)


def seeded_holdout(items: list, frac: float, max_n: int, seed: int) -> tuple[list, list]:
    """(train, held-out) of ``items``: ``min(int(len * frac), max_n)`` of them drawn with ``seed`` (the same
    split on any machine), held-out in their original order, the rest kept in theirs."""
    n = min(int(len(items) * frac), max_n)
    if n <= 0:
        return list(items), []
    held = set(torch.randperm(len(items), generator=torch.Generator().manual_seed(seed))[:n].tolist())
    return [x for i, x in enumerate(items) if i not in held], [items[i] for i in sorted(held)]


def find_tokenizer_file(model_dir: str | os.PathLike) -> Path:
    """Kiln's tokenizer file in a model folder (``kiln_tokenizer.json`` or ``tokenizer.json``)."""
    d = Path(model_dir)
    if not d.is_dir():
        raise FileNotFoundError(f"model folder {d} does not exist; pass a model folder (save_pretrained, "
                                "`kiln export`) or a finished train run directory")
    if not (d / "config.json").is_file() and (d / "model" / "config.json").is_file():
        d = d / "model"
    for name in ("kiln_tokenizer.json", "tokenizer.json"):
        if (d / name).is_file():
            return d / name
    raise FileNotFoundError(f"{d} has no tokenizer.json; export the model with its tokenizer (a train run's model/ has it)")


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A Kiln tokenizer from a model folder or a tokenizer file (Kiln's or Hugging Face's JSON)."""
    from kiln.tokenizer.folder import load_tokenizer as load_file  # the format told by content

    p = Path(path)
    return load_file(find_tokenizer_file(p) if p.is_dir() else p)


def load_policy(
    model_dir: str | os.PathLike, tokenizer: str | os.PathLike | None, add_chat_tokens: bool, device: torch.device
) -> tuple[torch.nn.Module, Tokenizer, ChatTemplate]:
    """(model, tokenizer with chat tokens, template), the model grown for the chat tokens if needed.

    Without chat tokens and ``add_chat_tokens`` False: the one-line error that says how to add them.
    """
    from kiln.model import load_pretrained

    if device.type == "cuda":
        torch.set_float32_matmul_precision("high")  # TF32 for fp32 matmuls outside autocast (rollouts)
    tok_path = Path(tokenizer) if tokenizer is not None else find_tokenizer_file(model_dir)
    tok = load_tokenizer(tok_path)
    if ChatTemplate.from_tokenizer(tok) is None and not add_chat_tokens:
        raise ValueError(
            f"tokenizer {tok_path} has no chat tokens {list(CHAT_TOKENS)}; add them with "
            f"`kiln tokenizer add-special {tok_path} --chat -o TOKDIR` and pass --tokenizer TOKDIR, "
            "or pass --add-chat-tokens")
    # On a GPU, torch's fused attention (the saved config may name Kiln's reference kernel, which
    # materializes the scores); packed SFT rows use their document mask either way.
    model = load_pretrained(model_dir, device=device, dtype=torch.float32,
                            attention_impl="sdpa" if device.type == "cuda" else None)
    tok, model = prepare_chat_model(tok, model)
    return model, tok, ChatTemplate.from_tokenizer(tok)


@contextlib.contextmanager
def fused_kernels(model: torch.nn.Module, enabled: bool = True) -> Iterator[None]:
    """On CUDA, within the block: Kiln's Triton RMSNorm and RoPE in every layer of ``model`` and q/k/v and
    gate/up as one GEMM each (``kiln.model.attention.kernels_swapped``), each kernel launched in its one
    fixed shape (no autotuning: ``kiln.kernels.untuned_mode``), and AdamW's update as one launch for all
    tensors (``kiln.kernels.adamw.multi_tensor_mode``). A small model's eager step on a GPU is bound by
    the host's launches: 1,197 -> 459 per forward + backward at d512, 8 layers, plus 75 -> 1 for AdamW;
    the same math. The kernels are checked on the device first (``kernels_fail``); a failure leaves
    everything off with a warning. Elsewhere (or ``enabled`` False) nothing changes: the CPU keeps the
    PyTorch formulas."""
    if not enabled or next(model.parameters()).device.type != "cuda":
        yield
        return
    from kiln.kernels import untuned_mode
    from kiln.kernels.adamw import multi_tensor_mode
    from kiln.model.attention import kernels_swapped

    c = model.config
    if (why := kernels_fail(next(model.parameters()).device, c.n_heads, c.n_kv_heads, c.head_dim, c.d_model)):
        import warnings

        warnings.warn(f"fused kernels off: {why}; training runs the PyTorch formulas", stacklevel=3)
        yield
        return
    with kernels_swapped(model, norm="triton", rope="triton", fused_proj=True), untuned_mode(), multi_tensor_mode():
        yield


def kernels_fail(device: torch.device, heads: int = 3, kv_heads: int = 1, head_dim: int = 8,
                 width: int = 8) -> str | None:
    """None when Kiln's RoPE and RMSNorm kernels compile and match their references (values and gradients,
    2e-2 relative; bf16 RoPE on CUDA, as under autocast) on ``device``, else why not. One small check
    before a run relies on them, so a kernel that fails to build or to agree on a new machine costs speed,
    never the run or its numbers. With a model's ``heads``, ``kv_heads``, ``head_dim`` and ``width``
    (d_model) the binaries it compiles are the ones the run then uses."""
    from kiln.kernels import rmsnorm, rmsnorm_ref, rope_qk, rope_ref, untuned_mode

    try:
        g = torch.Generator(device=device).manual_seed(0)
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the interpreter runs fp32 only
        q = torch.randn(2, 8, heads, head_dim, device=device, generator=g, dtype=dtype, requires_grad=True)
        k = torch.randn(2, 8, kv_heads, head_dim, device=device, generator=g, dtype=dtype, requires_grad=True)
        half = torch.randn(16, head_dim // 2, device=device, generator=g)
        cos, sin = torch.cat((half, half), dim=1), torch.cat((half, half), dim=1).flip(0)  # RoPE's layout
        x = torch.randn(2, 8, width, device=device, generator=g, requires_grad=True)  # fp32, as the residual; 16 rows
        w = torch.randn(width, device=device, generator=g)
        pos = torch.arange(2, 10, device=device)
        with untuned_mode():
            yq, yk = rope_qk(q, k, cos, sin, pos)
            y = rmsnorm(x, w, 1e-5, out_dtype=dtype)  # as under autocast: the norm writes bf16 on CUDA
            (yq.float().sum() + yk.float().sum() + (y.float() ** 2).sum()).backward()
        rq, rk = rope_ref(q, cos, sin, pos), rope_ref(k, cos, sin, pos)
        ry = rmsnorm_ref(x, w, 1e-5).to(dtype)
        grads = torch.autograd.grad(rq.float().sum() + rk.float().sum() + (ry.float() ** 2).sum(), (q, k, x))
        pairs = [(yq, rq, 2e-2), (yk, rk, 2e-2), (y, ry, 2e-2), *((a, b, 2e-2) for a, b in zip((q.grad, k.grad, x.grad), grads)),
                 *((a, b, 1e-4) for a, b in _adamw_pairs(device, g))]
        for got, want, tol in pairs:
            got, want = got.detach().float(), want.detach().float()
            err = float((got - want).norm() / want.norm().clamp_min(1e-30))
            if not err <= tol:
                return f"a kernel differs from its reference by {err:.2e} relative (> {tol:g})"
    except Exception as e:  # noqa: BLE001 -- any failure to build or run: the formulas still do
        return f"{type(e).__name__}: {e}"[:300]
    return None


def _adamw_pairs(device: torch.device, g: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(kernel, reference) results of one guarded AdamW step in ``multi_tensor_mode`` (one launch over
    three tensors, one of them longer than a tile) on ``device``: the parameters' updates and both moments."""
    from kiln.kernels.adamw import adamw_fused_update_, adamw_update_ref, multi_tensor_mode

    shapes = [(5000,), (7, 3), (1,)]
    ps = [torch.randn(s, device=device, generator=g) for s in shapes]
    gs = [torch.randn(s, device=device, generator=g) for s in shapes]
    lr, ok = torch.full((), 1e-2, device=device), torch.ones((), dtype=torch.bool, device=device)
    runs = []
    for fused in (True, False):
        state = [[p.clone() for p in ps], [torch.zeros_like(p) for p in ps], [torch.zeros_like(p) for p in ps],
                 [torch.zeros((), device=device) for _ in ps]]
        with multi_tensor_mode():
            (adamw_fused_update_ if fused else adamw_update_ref)(state[0], gs, state[1], state[2], state[3], lr, ok,
                                                                 0.9, 0.95, 1e-8, 0.1)
        runs.append([a - p for a, p in zip(state[0], ps)] + state[1] + state[2])
    return list(zip(*runs))


def train_config(base: Any, model: torch.nn.Module, **overrides: Any) -> Any:
    """The stage's ``TrainConfig`` with the (possibly grown) model's config and ``overrides``."""
    return dataclasses.replace(base, model=model.config, vocab_from_data=False, **overrides)


def build_state(cfg: Any, model: torch.nn.Module, data: Any, dist: Any) -> tuple[Any, torch.nn.Module]:
    """``TrainState`` at step 0 (optimizer, spike guard, the batch source) and the wrapped model."""
    from kiln.artifacts import config_to_dict
    from kiln.train import SpikeDetector, TrainState, build_optimizer

    model_step = dist.wrap(model)
    optimizer = build_optimizer(cfg, model, dist, next(model.parameters()).device)
    spikes = SpikeDetector(cfg.spike_window, cfg.spike_min_history, cfg.spike_zscore, cfg.spike_ratio)
    return TrainState(model, optimizer, data=data, spikes=spikes, config=config_to_dict(cfg)), model_step


def export_chat_model(out_dir: Path, model: torch.nn.Module, tok: Tokenizer) -> Path:
    """Write ``out_dir/model`` atomically (a temporary folder renamed): weights and the tokenizer
    files (Hugging Face's, with the chat template and ``<|end|>`` as eos, and Kiln's
    ``kiln_tokenizer.json``), so Kiln, ``kiln generate`` and ``transformers`` all open it."""
    import shutil
    import uuid

    from kiln.align.chat import JINJA_TEMPLATE
    from kiln.model import save_pretrained

    final = out_dir / "model"
    tmp = out_dir / f".model.tmp-{uuid.uuid4().hex[:8]}"
    save_pretrained(model, tmp, tokenizer=tok, chat_template=JINJA_TEMPLATE)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def chat_reply(model: torch.nn.Module, tpl: ChatTemplate, messages: list[dict[str, str]], max_tokens: int = 64,
               temperature: float = 0.0, seed: int = 0) -> str:
    """The model's reply to ``messages`` (greedy by default), decoded up to its end-of-turn token."""
    from kiln.align.rollout import generate_replies

    ids = tpl.render(messages, add_generation_prompt=True)
    vocab = getattr(tpl.tokenizer, "vocab_size", None)
    out = generate_replies(model, [ids], max_tokens, temperature, seed, tpl.stop_token_ids, vocab_limit=vocab)[0]
    if out and out[-1] in tpl.stop_token_ids:
        out = out[:-1]
    return tpl.tokenizer.decode(out)


def apply_stage_overrides(cfg: Any, overrides: list[str]) -> Any:
    """``key=value`` into a stage config; ``train.*`` keys go to its ``TrainConfig``."""
    from kiln.train.config import _parse_value, apply_overrides

    train_items = [o[len("train."):] for o in overrides if o.startswith("train.")]
    top = {}
    names = [f.name for f in dataclasses.fields(cfg) if f.name != "train"]
    for item in overrides:
        if item.startswith("train."):
            continue
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. beta=0.2 or train.lr=1e-5")
        key, raw = item.split("=", 1)
        if key not in names:
            close = difflib.get_close_matches(key, names + ["train.lr", "train.batch_size"], n=3)
            raise ValueError(f"--set {key}: unknown key" + (f"; did you mean {', '.join(close)}?" if close else
                                                            f"; known: {', '.join(names)}, train.*"))
        current = getattr(cfg, key)
        top[key] = tuple(raw.split(",")) if isinstance(current, tuple) and not current else _parse_value(raw, current, key)
    if train_items:
        if not hasattr(cfg, "train"):
            raise ValueError(f"--set train.*: {type(cfg).__name__} has no train settings")
        top["train"] = apply_overrides(cfg.train, train_items)
    return dataclasses.replace(cfg, **top)
