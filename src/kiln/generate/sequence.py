"""``Sequence``: one request's state inside the engine (tokens, cache blocks, sampling, text so far)."""

from __future__ import annotations

import enum
from typing import Any

from kiln.generate.sampling import SamplingParams


class Status(enum.Enum):
    """Where a sequence is: queued for (re)admission, holding cache blocks, or done."""

    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class Sequence:
    """One request: its tokens, which of them are in the paged cache, and its decoding state.

    ``token_ids`` is prompt + generated. The cache holds the tokens ``token_ids[window_start:]`` (the
    *window*; ``window_start`` moves only when a sequence slides past the context length), at positions
    0, 1, ... of the window; ``num_computed`` of them have their keys/values in the blocks of
    ``block_table``. A preempted sequence loses its blocks (``num_computed = 0``) and is recomputed
    from its tokens when readmitted, so preemption never changes what it generates.
    """

    def __init__(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, seed: int, streamer: Any = None,
    ) -> None:
        """``seed``: the request's sampling seed (``params.seed``, or a random one the engine drew)."""
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_ids)
        self.token_ids = list(prompt_ids)
        self.params = params
        self.processed = params.processed  # logits processed before each draw (read every step: a field)
        self.seed = seed  # token i of the request is drawn from a hash of (seed, i)
        self.status = Status.WAITING
        self.window_start = 0
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []  # hash of each full, computed block of the window, in order
        self.num_computed = 0
        self.draft_computed = 0  # window tokens in the draft model's cache (speculative decoding)
        self.num_cached_prompt_tokens = 0  # tokens taken from the prefix cache at the first admission
        self.streamer = streamer  # a TextStreamer, or None without a tokenizer
        self.text = ""
        self.num_text_emitted = 0  # characters of ``text`` already returned as new_text
        self.num_tokens_emitted = 0  # generated tokens already returned as new_token_ids
        self.logprobs: list[dict[int, float]] = []
        # the prompt tokens' log-probs (``SamplingParams.prompt_logprobs``): None for the first, then one
        # dict per prompt token as its position is computed
        self.prompt_logprobs: list[dict[int, float] | None] = [None] if params.prompt_logprobs is not None else []
        self.matcher: Any = None  # structured output: the llguidance matcher of the output so far
        self.arrival = 0.0  # the engine's clock when it was added (``EngineConfig.admission_wait_ms``)
        self.first_scheduled: float | None = None  # ... when a step first ran it (``RequestMetrics``)
        self.first_token: float | None = None  # ... when its first token was drawn
        self.finished_time: float | None = None  # ... when it ended
        self.finish_reason: str | None = None

    @property
    def needs_prompt_logprobs(self) -> bool:
        """Whether prompt log-probs are asked for and some are still to compute (no prefix-cache hits then)."""
        return self.params.prompt_logprobs is not None and len(self.prompt_logprobs) < len(self.prompt_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        """Generated tokens so far."""
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def window(self) -> list[int]:
        """The tokens the cache holds (or will), position 0 first."""
        return self.token_ids[self.window_start:]

    @property
    def num_window_tokens(self) -> int:
        return len(self.token_ids) - self.window_start

    @property
    def num_uncomputed(self) -> int:
        """Window tokens whose keys/values are not in the cache yet (1 while decoding)."""
        return self.num_window_tokens - self.num_computed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={len(self.token_ids)}, "
                f"computed={self.num_computed}, blocks={len(self.block_table)})")
