"""Evaluation: held-out loss and bits per byte, benchmark tasks, the eval stage, harness adapter.

Modules (importing this package imports none of them; the names below load on first use):

- ``lm``: the model/tokenizer protocol and the batched log-likelihood engine (``score_rows``).
- ``heldout``: ``evaluate_heldout`` over a 1-D token array (in-training validation; defined in
  ``kiln.model.heldout``).
- ``perplexity``: ``evaluate_text`` / ``text_loss``: documents scored with sliding windows.
- ``multiple_choice``: ``MCItem``, ``score_items`` (acc, acc_len, acc_norm).
- ``tasks``: loaders (HellaSwag, llm-foundry jsonl, MMLU) and the ``TASKS`` registry.
- ``generative`` / ``answers``: GSM8K and MATH-500, answer extraction, pass@k.
- ``core``: the centered CORE-style aggregate.
- ``contamination``: n-gram overlap of benchmarks with training shards.
- ``stage``: ``EvalConfig``, ``run_eval`` (the ``"eval"`` artifact), ``QuickEval`` for the trainer.
- ``scorer``: ``kiln_lm_scorer``, the perplexity scorer the data stage's perplexity filter takes.
- ``harness``: the lm-evaluation-harness model class (needs ``pip install lm-eval``).

See docs/eval.md.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "score_rows": "kiln.eval.lm",
    "check_vocab": "kiln.eval.lm",
    "evaluate_heldout": "kiln.model.heldout",
    "evaluate_text": "kiln.eval.perplexity",
    "text_loss": "kiln.eval.perplexity",
    "TextLoss": "kiln.eval.perplexity",
    "MCItem": "kiln.eval.multiple_choice",
    "MCResult": "kiln.eval.multiple_choice",
    "score_items": "kiln.eval.multiple_choice",
    "TASKS": "kiln.eval.tasks",
    "load_hellaswag": "kiln.eval.tasks",
    "load_foundry": "kiln.eval.tasks",
    "load_mmlu": "kiln.eval.tasks",
    "evaluate_generative": "kiln.eval.generative",
    "pass_at_k": "kiln.eval.generative",
    "answers_match": "kiln.eval.answers",
    "core_score": "kiln.eval.core",
    "contamination": "kiln.eval.contamination",
    "EvalConfig": "kiln.eval.stage",
    "run_eval": "kiln.eval.stage",
    "evaluate_tasks": "kiln.eval.stage",
    "QuickEval": "kiln.eval.stage",
    "kiln_lm_scorer": "kiln.eval.scorer",
    "KilnLMScorer": "kiln.eval.scorer",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    """Load an exported name from its module on first access (PEP 562)."""
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'kiln.eval' has no attribute {name!r}")
