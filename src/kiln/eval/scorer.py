"""A perplexity scorer for the data stage's perplexity filter, built from a small Kiln model.

``kiln.data.quality.perplexity_filter`` takes any ``text -> perplexity`` callable; the data stage
never builds a model itself (imports flow data -> ... -> eval, issue 17). ``kiln data run
--perplexity-model DIR --perplexity-tokenizer tokenizer.json`` builds this scorer and passes it in
(``run_pipeline(..., perplexity_scorer=...)``).
"""

from __future__ import annotations

import math
from typing import Any


class KilnLMScorer:
    """``text -> perplexity``: ``exp(mean next-token cross-entropy)`` over the first ``max_tokens``
    tokens under a Kiln model (``save_pretrained`` folder) and its tokenizer. The model loads on the
    first call, so the scorer pickles small into worker processes (each loads its own copy)."""

    def __init__(self, model_dir: str, tokenizer_path: str, max_tokens: int = 512) -> None:
        self.model_dir = str(model_dir)
        self.tokenizer_path = str(tokenizer_path)
        self.max_tokens = max_tokens
        self._model: Any = None
        self._tok: Any = None

    def _load(self) -> None:
        from kiln.model import load_pretrained
        from kiln.tokenizer import Tokenizer

        self._model = load_pretrained(self.model_dir).eval()
        self._tok = Tokenizer.load(self.tokenizer_path)
        context = getattr(getattr(self._model, "config", None), "context_length", None)
        if context:
            self.max_tokens = min(self.max_tokens, int(context))

    def __call__(self, text: str) -> float:
        """Perplexity of ``text`` (``inf`` for text of fewer than 2 tokens)."""
        import torch

        if self._model is None:
            self._load()
        ids = self._tok.encode(text)[: self.max_tokens + 1]
        if len(ids) < 2:
            return math.inf
        x = torch.tensor(ids, dtype=torch.long)[None, :]  # (1, T+1)
        with torch.no_grad():
            logits = self._model(x[:, :-1])  # (1, T, V)
            loss = torch.nn.functional.cross_entropy(logits[0].float(), x[0, 1:])
        return float(torch.exp(loss))

    def __getstate__(self) -> dict[str, Any]:  # ship to workers without the loaded model
        return {**self.__dict__, "_model": None, "_tok": None}


def kiln_lm_scorer(model_dir: str, tokenizer_path: str, max_tokens: int = 512) -> KilnLMScorer:
    """A perplexity scorer from a small Kiln model (moved here from ``kiln.data.quality``, issue 17)."""
    return KilnLMScorer(model_dir, tokenizer_path, max_tokens)
