"""One-request text generation through the engine (``kiln.generate.LLMEngine``).

``generate_tokens`` yields token ids; ``stream`` turns them into text pieces holding only complete
UTF-8 characters (a byte-level BPE token can end in the middle of a multi-byte character);
``generate`` joins the pieces. When the context fills up, the cache is rebuilt from the last 3/4 of
the context (a sliding window), so ``max_new_tokens`` may exceed ``context_length``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from kiln.generate.llm_engine import EngineConfig, LLMEngine, window_keep  # noqa: F401 (window_keep: a public name here)
from kiln.generate.sampling import SamplingParams, check_sampling_args
from kiln.generate.streamer import TextStreamer, TokenizerLike
from kiln.model import Transformer


def one_shot_engine(model: Transformer, vocab_limit: int | None, eot_id: int | None, max_num_seqs: int = 1,
                    tokenizer: Any = None, speculative: str = "none", compile: bool = False) -> Any:
    """An ``LLMEngine`` for a one-call helper: a pool sized for ``max_num_seqs`` full contexts, no CUDA
    graphs (a fresh engine per call would recapture them), and the sliding context window.
    ``speculative``: 'none' or 'ngram' (prompt lookup, greedy requests only). ``compile`` (CUDA):
    capture CUDA graphs and ``torch.compile`` the decode step (gpt-fast's mode: about a minute of
    compilation per engine, then the fastest decode; worth it for long or many generations)."""
    if next(model.parameters()).device.type == "cpu":
        # On the CPU the decode step gathers every running sequence's blocks per layer; past ~16
        # sequences of a few hundred tokens that stops fitting in cache and a step slows more than the
        # batch grows (32 GSM8K prompts: 16.2 s with 8 running, 15.5 s with 16, 23.4 s with 32).
        max_num_seqs = min(max_num_seqs, 16)
    cfg = EngineConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=max(2048, max_num_seqs),
                       cuda_graphs=compile, compile_decode=compile, eos_token_id=eot_id, vocab_limit=vocab_limit,
                       context_overflow="slide", enable_prefix_caching=max_num_seqs > 1, speculative=speculative)
    return LLMEngine(model, tokenizer, cfg)


def generate_tokens(
    model: Transformer,
    prompt_ids: list[int],
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eot_id: int | None = None,
    vocab_limit: int | None = None,
    speculative: str = "none",
    compile: bool = False,
    **processing: Any,
) -> Iterator[int]:
    """Yield up to ``max_new_tokens`` sampled token ids after ``prompt_ids``; stop before ``eot_id``.

    One request through the engine (``LLMEngine``). A prompt longer than the context keeps its last
    ``context_length`` tokens, and a full context slides (its most recent 3/4 is re-encoded), so
    ``max_new_tokens`` may exceed ``context_length``. ``seed`` makes the draw reproducible (on a given
    device). The model's train/eval mode is left as it was. ``vocab_limit`` (the tokenizer's
    vocabulary size) keeps sampling away from the padding rows of a model whose vocabulary was
    rounded up for speed (e.g. 50257 -> 50304). ``speculative="ngram"``: prompt-lookup speculative
    decoding when greedy (same tokens, fewer forward passes when the output repeats the context).
    ``compile``: CUDA graphs and a compiled decode step (see ``one_shot_engine``). ``processing``: more
    ``SamplingParams`` fields (repetition_penalty, presence_penalty, frequency_penalty, logit_bias,
    min_p, min_tokens).
    """

    check_sampling_args(temperature, top_k, top_p)
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, ignore_eos=eot_id is None, **processing)
    engine = one_shot_engine(model, vocab_limit, eot_id, speculative=speculative, compile=compile)
    engine.add_request(list(prompt_ids), params)  # checks the prompt now, not at the first token
    return _engine_tokens(engine, eot_id)


def _engine_tokens(engine: Any, eot_id: int | None) -> Iterator[int]:
    """Step a one-request engine, yielding its new tokens (end-of-text held out)."""
    while engine.has_unfinished():
        for out in engine.step():
            for t in out.new_token_ids:
                if out.finish_reason == "stop" and t == eot_id:
                    return
                yield t


def stream(
    model: Transformer,
    tokenizer: TokenizerLike,
    prompt: str,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eot: bool = True,
    speculative: str = "none",
    compile: bool = False,
    **processing: Any,
) -> Iterator[str]:
    """Yield the continuation of ``prompt`` as text pieces, as they decode (prompt not included).

    Each piece holds only complete characters. An empty prompt starts from the end-of-text token.
    Stops after ``max_new_tokens`` tokens or, with ``stop_at_eot``, at the end-of-text token.
    ``processing``: penalties, logit bias, min-p, min-tokens (see ``generate_tokens``).
    """
    limit = tokenizer_vocab_limit(model, tokenizer)
    eot = getattr(tokenizer, "eot_id", None)
    tokens = generate_tokens(
        model, prompt_ids(tokenizer, prompt), max_new_tokens, temperature, top_k, top_p, seed,
        eot if stop_at_eot else None, vocab_limit=limit, speculative=speculative, compile=compile, **processing,
    )
    return _text_pieces(tokens, TextStreamer(tokenizer))


def tokenizer_vocab_limit(model: Transformer, tokenizer: TokenizerLike) -> int | None:
    """The tokenizer's vocabulary size, the bound sampling keeps to (a model's padded vocabulary has
    ids no tokenizer can decode); refuses a tokenizer larger than the model's vocabulary."""
    tok_vocab = getattr(tokenizer, "vocab_size", None)
    if not isinstance(tok_vocab, int):
        return None
    if tok_vocab > model.config.vocab_size:
        raise ValueError(
            f"tokenizer has {tok_vocab} tokens but the model's vocab_size is {model.config.vocab_size}; "
            "use the tokenizer the model was trained with"
        )
    return tok_vocab


def prompt_ids(tokenizer: TokenizerLike, prompt: str) -> list[int]:
    """``prompt`` encoded; an empty prompt starts from the end-of-text token."""
    ids = list(tokenizer.encode(prompt))
    if not ids:
        eot = getattr(tokenizer, "eot_id", None)
        if eot is None:
            raise ValueError("the prompt is empty and the tokenizer has no end-of-text token; give a prompt")
        ids = [eot]
    return ids


def _text_pieces(tokens: Iterator[int], streamer: TextStreamer) -> Iterator[str]:
    for t in tokens:
        piece = streamer.push(t)
        if piece:
            yield piece
    tail = streamer.flush()
    if tail:
        yield tail


def generate(
    model: Transformer,
    tokenizer: TokenizerLike,
    prompt: str,
    max_new_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_at_eot: bool = True,
) -> str:
    """The continuation of ``prompt`` (without the prompt) as one string; see ``stream``."""
    return "".join(stream(model, tokenizer, prompt, max_new_tokens, temperature, top_k, top_p, seed, stop_at_eot))
