"""The `transformers` references of ``kiln bench serve``'s throughput table, on Kiln's weights exported
in Hugging Face Llama layout (``export_for_references``), offline, greedy, a fixed number of output
tokens per request (no end-of-sequence stop: random weights would stop at random places).

- ``hf_generate_run``: ``model.generate`` on static batches of ``c`` left-padded prompts, one batch
  after the other. A request's TTFT is its batch's prefill (from the batch's start to its first
  token); ITL is the batch's step time. What a user gets from ``transformers`` without a server.
- ``hf_cb_run``: ``transformers``' own continuous batching (``model.init_continuous_batching()``, the
  ``ContinuousBatchingManager`` behind ``generate_batch`` and ``transformers serve
  --continuous-batching``: a paged cache, requests joining between steps, CUDA graphs on a GPU),
  driven in-process closed-loop with ``c`` requests in flight, ``eos_token_id=-1`` (never stop).
  TTFT: ``add_request`` to the first token's timestamp; ITL: gaps between token timestamps.

Both return ``Timings`` (output tokens, wall seconds, TTFTs and ITLs in seconds). ``transformers`` is
imported lazily: it is a bench dependency, never a Kiln runtime one.
"""

from __future__ import annotations

import time
from itertools import pairwise
from pathlib import Path
from typing import Any

from kiln.bench.serve_http import Timings


def load_hf(export_dir: Path, device: Any) -> Any:
    """The exported model as ``LlamaForCausalLM`` (bf16 on CUDA, fp32 on the CPU, SDPA attention)."""
    import os

    import torch

    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a local folder; never reach for the Hub
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    return AutoModelForCausalLM.from_pretrained(str(export_dir), dtype=dtype, attn_implementation="sdpa").to(device).eval()


def _sync(device: Any) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _StepClock:
    """A ``generate`` streamer that only notes the time of each call: the first ``put`` is the prompt,
    each later one a decode step's tokens (moved to the host, so the step has finished)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value: Any) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


def hf_generate_run(model: Any, prompts: list[list[int]], c: int, max_tokens: int,
                    outputs: list | None = None) -> Timings:
    """``generate`` on batches of ``c`` prompts (in order, left-padded), greedy, exactly ``max_tokens``
    new tokens each (``min_new_tokens``); see the module docstring for what TTFT/ITL mean here.
    ``outputs``: a list that receives each prompt's new ids, in order (for checks)."""
    import torch

    dev = model.device
    t = Timings()
    t0 = time.perf_counter()
    with torch.inference_mode():
        for s in range(0, len(prompts), c):
            batch = prompts[s:s + c]
            L = max(map(len, batch))
            ids = torch.zeros(len(batch), L, dtype=torch.long)  # (B, L), left-padded with id 0
            mask = torch.zeros(len(batch), L, dtype=torch.long)
            for i, p in enumerate(batch):
                ids[i, L - len(p):] = torch.tensor(p)
                mask[i, L - len(p):] = 1
            clock = _StepClock()
            start = time.perf_counter()
            out = model.generate(ids.to(dev), attention_mask=mask.to(dev), max_new_tokens=max_tokens,
                                 min_new_tokens=max_tokens, do_sample=False, pad_token_id=0, eos_token_id=None,
                                 streamer=clock)
            new = out.shape[1] - L
            t.tokens += new * len(batch)
            if outputs is not None:
                outputs += out[:, L:].tolist()
            steps = clock.times[1:]  # the first put is the prompt
            if steps:
                t.ttft += [steps[0] - start] * len(batch)
                t.itl += [b - a for a, b in pairwise(steps) for _ in batch]
    _sync(dev)
    t.seconds = time.perf_counter() - t0
    return t


def hf_cb_manager(model: Any, max_tokens: int, max_requests: int) -> Any:
    """A started ``ContinuousBatchingManager`` for greedy decoding of ``max_tokens`` tokens, at most
    ``max_requests`` in a batch, warmed up (its CUDA graphs captured on a GPU; its cache allocated).
    On a GPU the cache takes transformers' default share of free memory (as Kiln's engine sizes its
    pool); on the CPU, that default would allocate most of the RAM (minutes), so it holds
    ``max_requests`` full contexts."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    gen = GenerationConfig(max_new_tokens=max_tokens, do_sample=False, eos_token_id=-1, pad_token_id=0)
    cb: dict[str, Any] = {"max_requests_per_batch": max_requests}
    # Stay on SDPA: otherwise the manager may switch to a flash-attention kernel that the `kernels`
    # package would fetch from the Hub (offline here; and every row should use SDPA). Newer versions
    # have a switch for that; older ones (5.17) keep an implementation already marked paged.
    if "auto_switch_to_flash" in ContinuousBatchingConfig.__dataclass_fields__:
        cb["auto_switch_to_flash"] = False
    else:
        model.set_attn_implementation("paged|sdpa")
    if model.device.type != "cuda":
        cb["num_blocks"] = max_requests * -(-model.config.max_position_embeddings // 256) + 2  # 256-token blocks
    manager = model.init_continuous_batching(generation_config=gen,
                                             continuous_batching_config=ContinuousBatchingConfig(**cb))
    if model.device.type == "cuda":
        manager.warmup()
    manager.start()
    hf_cb_run(manager, [[1, 2, 3]] * 2, 2, 2)  # warm-up: the first request allocates the cache
    return manager


def hf_cb_run(manager: Any, prompts: list[list[int]], c: int, max_tokens: int, timeout_s: float = 600.0,
              outputs: dict | None = None) -> Timings:
    """Closed loop over ``manager``: keep ``c`` requests in flight until every prompt is done.
    ``outputs``: a dict that receives {prompt index: new ids} (for checks)."""
    pending = list(reversed(list(enumerate(prompts))))
    index: dict[str, int] = {}
    start: dict[str, float] = {}
    t = Timings()
    t0 = time.perf_counter()
    deadline = t0 + timeout_s
    while pending or start:
        while pending and len(start) < c:
            i, p = pending.pop()
            sent = time.perf_counter()
            rid = manager.add_request(p, max_new_tokens=max_tokens, record_timestamps=True, eos_token_id=-1)
            if rid is None:
                raise RuntimeError("transformers' continuous batching manager refused a request (stopped?)")
            start[rid], index[rid] = sent, i
        r = manager.get_result(timeout=1.0)
        if r is None:
            if time.perf_counter() > deadline or not manager.is_running():
                raise RuntimeError(f"transformers continuous batching: {len(start)} requests unanswered "
                                   f"({'timeout' if manager.is_running() else 'its thread stopped'})")
            continue
        if not r.is_finished() or r.request_id not in start:
            continue
        sent = start.pop(r.request_id)
        if r.error:
            t.errors += 1
            continue
        t.tokens += len(r.generated_tokens)
        if outputs is not None:
            outputs[index[r.request_id]] = list(r.generated_tokens)
        ts = r.timestamps or []
        if ts:
            t.ttft.append(ts[0] - sent)
            t.itl += [b - a for a, b in pairwise(ts)]
    t.seconds = time.perf_counter() - t0
    return t
