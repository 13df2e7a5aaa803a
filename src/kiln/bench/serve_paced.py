"""Kiln's real engine on a GPU's clock: ``paced_engine`` replaces the model's work by sleeps, so the
scheduler, the block manager, the lean and multi-step decode paths and the server around them run as
they would beside a GPU, on a CPU (``kiln bench serve-http --stub-engine K --stub-pace A,B,P``).
``replace_model_work`` and ``replace_decode`` (no sleeps) also give ``kiln bench serve --parts host``
its engine with the forward removed."""

from __future__ import annotations

import time
from typing import Any


def parse_pace(text: str) -> tuple[float, ...]:
    """``A,B,P`` (``--stub-pace``) -> (A, B, P) in ms; a ValueError saying what to give otherwise."""
    try:
        pace = tuple(float(x) for x in text.split(","))
    except ValueError:
        pace = ()
    if len(pace) != 3 or min(pace) < 0:
        raise ValueError(f"pace {text!r}: give three non-negative numbers A,B,P in ms (per step, per decode "
                         "row, per prompt token), e.g. 2.5,0.0234,0.01")
    return pace


def replace_model_work(model: Any, logits: Any, pace: tuple[float, ...] = (0.0, 0.0, 0.0)) -> None:
    """Replace ``model``'s layers and head (in place) by rows of ``logits`` (R, V'): a forward returns
    zero hidden states after sleeping A + B * (decode rows) + P * (prompt tokens) ms, GIL released,
    with (A, B, P) = ``pace``, and the head gives row i of ``logits``. The engine then runs its host
    side whole (scheduling, packing, copies, sampling) with the model's work removed or paced."""
    import torch

    A, B, P = pace
    d, ref = model.config.d_model, next(model.parameters())

    def hidden_states(idx: Any, pos: Any, cache: Any) -> Any:
        if A or B or P:
            q = cache.meta.query_lens
            time.sleep((A + B * sum(n == 1 for n in q) + P * sum(n for n in q if n > 1)) / 1e3)
        return torch.zeros(1, idx.shape[1], d, device=ref.device, dtype=ref.dtype)

    class _Head(torch.nn.Module):
        def forward(self, h: Any) -> Any:
            return logits[: h.shape[0]].to(h.dtype)

    model.hidden_states = hidden_states
    model.lm_head = _Head()


def replace_decode(runner: Any, logits: Any, pace: tuple[float, ...] = (0.0, 0.0, 0.0)) -> None:
    """The same for ``runner``'s decode-graph body (``ModelRunner._decode``): A + B * rows ms a step,
    rows of ``logits`` and their argmax."""
    A, B, _ = pace
    ids = logits.argmax(-1)

    def decode(tok: Any, pos: Any) -> Any:  # one step of a decode graph of tok.shape[0] rows
        if A or B:
            time.sleep((A + B * tok.shape[0]) / 1e3)
        return logits[: tok.shape[0]], ids[: tok.shape[0]]

    runner._decode = decode


def paced_engine(pace: tuple[float, ...], max_num_seqs: int, decode_steps: int, tokenizer: Any) -> Any:
    """Kiln's real ``LLMEngine`` (scheduler, blocks, prefix cache, lean and multi-step paths as a CUDA
    engine takes them, streamer, stops) over a 1-layer model whose work is replaced by sleeps with the
    GIL released, shaped like a GPU's: a decode step of r rows sleeps A + B r ms, a general step A + B r
    + P ms per prompt token, with (A, B, P) = ``pace``. Every token is byte 'a'. What the engine's
    host side and the server do around a GPU's timing, on a CPU. ``tokenizer``: the server's (its
    vocabulary sizes the model; the engine streams text and stops on its end of text with it)."""
    import torch

    from kiln.generate import EngineConfig, LLMEngine
    from kiln.model import ModelConfig, build_model

    parse_pace(",".join(map(str, pace)))  # three non-negative numbers, or a clear error
    mc = ModelConfig(vocab_size=tokenizer.vocab_size, context_length=1024, d_model=32, n_layers=1, n_heads=2,
                     tie_embeddings=True)
    model = build_model(mc, device="cpu", dtype=torch.float32).eval()
    logits = torch.zeros(max(max_num_seqs, 2048), 128)  # (rows, 128): argmax 97, byte 'a'
    logits[:, 97] = 1.0
    replace_model_work(model, logits, pace)
    eng = LLMEngine(model, tokenizer, EngineConfig(max_num_seqs=max_num_seqs, decode_steps=decode_steps,
                                                   num_blocks=max_num_seqs * 64, max_num_batched_tokens=2048))
    eng.runner.graph_max = max_num_seqs  # the graph paths as on CUDA, their bodies run eagerly
    replace_decode(eng.runner, logits, pace)
    return eng
