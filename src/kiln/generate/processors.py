"""Logits processing before the draw: logit bias, min-tokens, repetition/frequency/presence penalties.

What each setting of ``SamplingParams`` does to row b's logits l (V,) before temperature and filters:

- ``logit_bias`` {t: x}: l[t] += x (OpenAI).
- ``min_tokens`` m: while fewer than m tokens are generated, end-of-text (unless ``ignore_eos``) and the
  request's ``stop_token_ids`` get l[t] = -inf (vLLM).
- ``repetition_penalty`` r: every token t of the prompt or the output so far gets l[t] / r if
  l[t] > 0, else l[t] * r (CTRL, Keskar et al., arXiv:1909.05858; Hugging Face's and vLLM's).
- ``frequency_penalty`` f, ``presence_penalty`` a: l[t] -= f * c[t] + a * [c[t] > 0], c[t] the
  token's count in the output so far (OpenAI's definition; the prompt does not count).

in that order; then temperature, top-k, top-p and min-p (``sampling.sample_with_uniform``).

The per-request state lives on the device in ``ProcessorTable`` slots: the output's token counts, the
prompt's token set, the bias entries and the banned ids. Decode steps read a slot per row and, inside
a multi-step CUDA graph, count each drawn token before the next step, so step j is processed with the
tokens of steps < j. The host keeps the table in step with the sequences (``ProcessorTable.sync``).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

from kiln.generate.sampling import MAX_LOGIT_BIAS, SamplingParams
from kiln.generate.sequence import Sequence

MAX_BANNED = 64
"""Most ids banned by ``min_tokens`` (end-of-text and the stop token ids) of one request."""


class ProcRow(NamedTuple):
    """One row's processing values: its table slot (the dummy slot: none), presence, frequency and
    repetition penalties, min-p, and how many more steps its banned ids stay banned (<= 0: none)."""

    slot: int
    presence: float
    frequency: float
    repetition: float
    min_p: float
    ban_steps: int


class ProcTensors(NamedTuple):
    """``ProcRow`` values of b rows as device tensors: slot (b,) int64, the rest (b,) fp32 / int64."""

    slot: Tensor
    presence: Tensor
    frequency: Tensor
    repetition: Tensor
    min_p: Tensor
    ban_steps: Tensor


def banned_ids(params: SamplingParams, eos: int | None) -> list[int]:
    """The ids ``min_tokens`` keeps from ending the request: end-of-text (unless ignored), stop ids."""
    ids = [] if eos is None or params.ignore_eos else [eos]
    return sorted(set(ids) | set(params.stop_token_ids))


def check_processing(params: SamplingParams, vocab_size: int, eos: int | None) -> None:
    """Raise ValueError for processing settings this vocabulary cannot take (ids outside it, too many
    banned ids)."""
    bad = [t for t, _ in params.logit_bias if t >= vocab_size]
    if bad:
        raise ValueError(f"logit_bias token id {bad[0]} is outside the vocabulary of {vocab_size}")
    if params.min_tokens > 0 and len(banned_ids(params, eos)) > MAX_BANNED:
        raise ValueError(f"min_tokens bans end-of-text and {len(params.stop_token_ids)} stop token ids; "
                         f"at most {MAX_BANNED} in all")


def process_logits(logits: Tensor, table: ProcessorTable, rows: ProcTensors, step: int = 0) -> Tensor:
    """``logits`` (b, V) fp32 with each row's bias, bans, repetition, frequency and presence penalties
    applied (module docstring), read from its slot of ``table``: a new (b, V) fp32 tensor.
    ``step``: the index of this draw within a multi-step graph (bans last ``rows.ban_steps`` draws).
    Rows in the dummy slot come out unchanged. Graph-safe (no host sync)."""
    counts = table.counts[rows.slot]  # (b, V) int32: the output's tokens so far
    ids, vals = table.ids[rows.slot], table.vals[rows.slot]  # (b, W)
    banned = table.ban[rows.slot] & (rows.ban_steps > step)[:, None]  # (b, W)
    logits = logits.scatter_add(1, ids, torch.where(banned, float("-inf"), vals))
    seen = table.prompt[rows.slot] | (counts > 0)  # (b, V)
    r = rows.repetition[:, None]
    logits = torch.where(seen, torch.where(logits > 0, logits / r, logits * r), logits)
    c = counts.float()
    return logits - rows.frequency[:, None] * c - rows.presence[:, None] * (c > 0).float()


def count_tokens(table: ProcessorTable, slot: Tensor, ids: Tensor) -> None:
    """Add the drawn ``ids`` (b,) to their rows' slots (b,) of ``table`` (in place, graph-safe: one
    atomic scatter-add into the flat table; padded rows all add to the dummy slot)."""
    flat = table.counts.view(-1)  # (S * V,)
    flat.scatter_add_(0, slot * table.counts.shape[1] + ids, torch.ones_like(ids, dtype=torch.int32))


class ProcessorTable:
    """Device state of the requests whose logits are processed: ``capacity`` slots and one dummy slot
    (the last) for rows without processing, whose settings leave logits unchanged.

    Slot s: ``counts[s]`` (V,) int32, the output's token counts; ``prompt[s]`` (V,) bool, the prompt's
    tokens (for the repetition penalty); ``ids/vals/ban[s]`` (W,), the bias entries and banned ids
    (padding: id 0, value 0, not banned). ~5 bytes x V a slot (0.25 MB at V = 50k).
    """

    def __init__(self, capacity: int, vocab_size: int, eos: int | None, device: torch.device) -> None:
        S, V, W = capacity + 1, vocab_size, MAX_LOGIT_BIAS + MAX_BANNED
        self.capacity, self.eos, self.device = capacity, eos, device
        self.counts = torch.zeros(S, V, dtype=torch.int32, device=device)
        self.prompt = torch.zeros(S, V, dtype=torch.bool, device=device)
        self.ids = torch.zeros(S, W, dtype=torch.long, device=device)
        self.vals = torch.zeros(S, W, dtype=torch.float32, device=device)
        self.ban = torch.zeros(S, W, dtype=torch.bool, device=device)
        self._slot: dict[str, int] = {}  # request id -> slot
        self._counted = [0] * capacity  # tokens added to counts[s]: the output's first ones, then drops
        self._free = list(range(capacity - 1, -1, -1))

    @property
    def dummy(self) -> int:
        return self.capacity

    def rows(self, seqs: list[Sequence]) -> list[ProcRow]:
        """Each sequence's ``ProcRow`` for its next draw, its slot brought up to date first: assigned
        (evicting a slot of a sequence not in ``seqs`` when none is free) and filled, or its counts
        caught up with the output (the tokens appended since, or rebuilt when the slot counted
        tokens a multi-step graph drew past a stop or a slide)."""
        keep = {s.request_id for s in seqs}
        out = []
        for seq in seqs:
            p = seq.params
            slot = self._sync(seq, keep) if p.needs_history else self.dummy
            out.append(ProcRow(slot, p.presence_penalty, p.frequency_penalty, p.repetition_penalty, p.min_p,
                               p.min_tokens - len(seq.output_token_ids)))
        return out

    def tensors(self, rows: list[ProcRow]) -> ProcTensors:
        """``rows`` as device tensors (eager steps)."""
        slot, pres, freq, rep, min_p, ban = zip(*rows)
        dev, f32 = self.device, torch.float32
        return ProcTensors(torch.tensor(slot, device=dev), torch.tensor(pres, dtype=f32, device=dev),
                           torch.tensor(freq, dtype=f32, device=dev), torch.tensor(rep, dtype=f32, device=dev),
                           torch.tensor(min_p, dtype=f32, device=dev), torch.tensor(ban, device=dev))

    def counted(self, rows: list[ProcRow], steps: int) -> None:
        """Record that a graph counted ``steps`` drawn tokens into each row's slot."""
        for r in rows:
            if r.slot != self.dummy:
                self._counted[r.slot] += steps

    def release(self, request_id: str) -> None:
        """Free the slot of a finished or aborted request (if it has one)."""
        slot = self._slot.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)

    def _sync(self, seq: Sequence, keep: set[str]) -> int:
        slot = self._slot.get(seq.request_id)
        out = seq.output_token_ids
        if slot is None:
            slot = self._assign(seq, keep)
            self._fill(slot, seq)
        elif self._counted[slot] > len(out):  # a graph counted tokens the engine dropped
            self._count(slot, out, fresh=True)
        elif self._counted[slot] < len(out):  # tokens drawn by eager steps since
            self._count(slot, out[self._counted[slot]:])
        return slot

    def _assign(self, seq: Sequence, keep: set[str]) -> int:
        if not self._free:
            victim = next(rid for rid in self._slot if rid not in keep)  # len(keep) <= capacity
            self.release(victim)
        slot = self._free.pop()
        self._slot[seq.request_id] = slot
        return slot

    def _fill(self, slot: int, seq: Sequence) -> None:
        """A fresh slot: the prompt's token set, the bias and ban entries, the output's counts."""
        p, dev = seq.params, self.device
        self.prompt[slot].zero_()
        self.prompt[slot, torch.tensor(seq.prompt_token_ids, device=dev)] = True
        ids, vals, ban = [t for t, _ in p.logit_bias], [b for _, b in p.logit_bias], [False] * len(p.logit_bias)
        if p.min_tokens > 0:
            banned = banned_ids(p, self.eos)
            ids, vals, ban = ids + banned, vals + [0.0] * len(banned), ban + [True] * len(banned)
        W = self.ids.shape[1]
        pad = W - len(ids)
        self.ids[slot] = torch.tensor(ids + [0] * pad, device=dev)
        self.vals[slot] = torch.tensor(vals + [0.0] * pad, device=dev)
        self.ban[slot] = torch.tensor(ban + [False] * pad, device=dev)
        self._count(slot, seq.output_token_ids, fresh=True)

    def _count(self, slot: int, tokens: list[int], fresh: bool = False) -> None:
        """Add ``tokens`` to slot's counts (``fresh``: the slot's counts start from zero)."""
        if fresh:
            self.counts[slot].zero_()
            self._counted[slot] = 0
        if tokens:
            idx = torch.tensor(tokens, device=self.device)
            self.counts[slot].index_put_((idx,), torch.ones_like(idx, dtype=torch.int32), accumulate=True)
        self._counted[slot] += len(tokens)
