"""Model-based quality filters: a fastText-style linear classifier trained from positive and negative
examples (``kiln data train-quality``), and a perplexity filter scored by any language model (``perplexity_filter(scorer, max)``; Kiln's own
scorer, ``kiln.eval.kiln_lm_scorer``, is built by the caller and passed in).

The classifier itself (model, training, file format) is :mod:`kiln.data.quality_classifier`; its
names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kiln.data.quality_classifier import (
    MAGIC,
    VERSION,
    QualityClassifier,
    QualityTrainConfig,
    features,
    train_quality_classifier,
)
from kiln.data.quality_default import load_default_quality_classifier

__all__ = ["MAGIC", "VERSION", "QualityClassifier", "QualityConfig", "QualityTrainConfig", "features",
           "load_quality_classifier", "perplexity_filter", "quality_classifier_filter", "train_quality_classifier"]


@dataclass(frozen=True)
class QualityConfig:
    """Model-based quality filtering."""

    classifier: str | None = None
    """``"default"`` (the shipped model, :mod:`kiln.data.quality_default`: Wikipedia + news vs
    Usenet posts), the path of a model from ``kiln data train-quality``, or None (no classifier filter)."""
    min_classifier_score: float = 0.5
    """Drop documents whose p(high quality) is below this."""
    perplexity_model: str | None = None
    """A Kiln model folder (``save_pretrained``) for the perplexity filter; None disables it. The
    scorer itself is built by the caller (``kiln.eval.kiln_lm_scorer``, as ``kiln data run`` does) and
    passed to ``run_pipeline(..., perplexity_scorer=...)``; this path names it in the manifest."""
    perplexity_tokenizer: str | None = None
    """tokenizer.json of that model."""
    max_perplexity: float = 1000.0
    """Drop documents whose per-token perplexity under the model is above this."""


def load_quality_classifier(spec: str) -> QualityClassifier:
    """``"default"``: the shipped model (SHA-256 checked); anything else: a model file's path."""
    if spec == "default":
        return load_default_quality_classifier()
    return QualityClassifier.load(spec)


def quality_classifier_filter(cfg: QualityConfig) -> Callable[[str], tuple[str | None, float]]:
    """``text -> (drop reason or None, p(high quality))`` for ``cfg.classifier`` (the pipeline's
    ``quality_classifier`` step: drop reason ``quality_classifier`` below ``min_classifier_score``)."""
    if not cfg.classifier:
        raise ValueError("QualityConfig.classifier is None: set it to 'default' or a model path")
    clf = load_quality_classifier(cfg.classifier)
    thr = cfg.min_classifier_score

    def check(text: str) -> tuple[str | None, float]:
        s = clf.score(text)
        return ("quality_classifier" if s < thr else None), s

    return check


def perplexity_filter(scorer: Callable[[str], float], max_perplexity: float) -> Callable[[str], tuple[str | None, float]]:
    """``text -> (drop reason or None, perplexity)`` for any scorer ``text -> perplexity``."""

    def check(text: str) -> tuple[str | None, float]:
        ppl = scorer(text)
        return ("perplexity_too_high" if ppl > max_perplexity else None), ppl

    return check


def __getattr__(name: str) -> Any:
    # kiln_lm_scorer built a model inside the data stage (an import of a later stage); it lives in
    # kiln.eval now and is passed in (issue 17). Say where it went instead of a bare AttributeError.
    if name == "kiln_lm_scorer":
        raise ImportError("kiln_lm_scorer moved to kiln.eval (from kiln.eval import kiln_lm_scorer); pass the scorer "
                          "to perplexity_filter or to run_pipeline(..., perplexity_scorer=...)")
    raise AttributeError(f"module 'kiln.data.quality' has no attribute {name!r}")
