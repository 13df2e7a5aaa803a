"""Quality classifier (train, save, load, score) and the perplexity filter's scorer slot."""

from __future__ import annotations

import pytest
from webfixtures import english_paragraphs

from kiln.data.quality import (
    QualityClassifier,
    QualityTrainConfig,
    perplexity_filter,
    train_quality_classifier,
)


def test_classifier_separates_and_round_trips(tmp_path) -> None:
    pos = [english_paragraphs(i, 8) for i in range(80)]
    neg = [" ".join(["click", "here", "buy", "cheap", "deals", "now", f"n{i}"] * 10) for i in range(80)]
    model, metrics = train_quality_classifier(pos, neg, QualityTrainConfig(buckets_log2=16, epochs=3))
    assert metrics["val_accuracy"] >= 0.9
    assert model.score(english_paragraphs(999, 8)) > 0.5 > model.score("buy cheap deals now click here " * 5)
    model.save(tmp_path / "q.npz")
    again = QualityClassifier.load(tmp_path / "q.npz")
    assert again.score(pos[0]) == pytest.approx(model.score(pos[0]), abs=1e-6)


def test_load_rejects_other_files(tmp_path) -> None:
    import numpy as np

    np.savez(tmp_path / "x.npz", meta=np.array('{"magic": "OTHER"}'), w=np.zeros(4))
    with pytest.raises(ValueError, match="train-quality"):
        QualityClassifier.load(tmp_path / "x.npz")


def test_perplexity_filter_takes_any_scorer() -> None:
    check = perplexity_filter(lambda text: 10.0 * len(text), max_perplexity=100.0)
    assert check("short") == (None, 50.0)
    assert check("a much longer text")[0] == "perplexity_too_high"


def test_kiln_lm_scorer_on_a_tiny_model(tmp_path) -> None:
    torch = pytest.importorskip("torch")
    model_mod = pytest.importorskip("kiln.model")
    from kiln.eval import kiln_lm_scorer
    from kiln.tokenizer import Tokenizer

    torch.manual_seed(0)
    cfg = model_mod.ModelConfig(vocab_size=256, context_length=32, d_model=32, n_layers=1, n_heads=2)
    model_mod.save_pretrained(model_mod.Transformer(cfg), tmp_path / "model")
    Tokenizer({i: bytes([i]) for i in range(256)}, []).save(tmp_path / "tokenizer.json")
    score = kiln_lm_scorer(str(tmp_path / "model"), str(tmp_path / "tokenizer.json"))
    ppl = score("the kiln is hot " * 20)  # longer than the context: truncated, not an error
    # exp(mean next-token loss) over the first context_length + 1 = 33 tokens (bytes here), by hand
    ids = torch.tensor(list(("the kiln is hot " * 20).encode())[:33])
    with torch.no_grad():
        logits = model_mod.load_pretrained(tmp_path / "model")(ids[None, :-1])[0]  # (32, V)
    nll = -(logits.float().log_softmax(-1)[torch.arange(32), ids[1:]]).mean()
    assert ppl == pytest.approx(float(torch.exp(nll)), rel=1e-5)
    assert perplexity_filter(score, max_perplexity=0.5)("some text")[0] == "perplexity_too_high"


def test_kiln_lm_scorer_lives_in_eval_and_data_builds_no_model() -> None:
    """Issue 17: the data stage takes a scorer; building a model is kiln.eval's (the old name says where it went)."""
    import pickle

    import kiln.data.quality as q
    from kiln.eval import KilnLMScorer, kiln_lm_scorer

    with pytest.raises(ImportError, match="kiln.eval"):
        q.kiln_lm_scorer  # noqa: B018
    s = pickle.loads(pickle.dumps(kiln_lm_scorer("m", "t.json")))  # ships to workers unloaded
    assert isinstance(s, KilnLMScorer) and s._model is None


def test_pipeline_perplexity_needs_a_passed_scorer(tmp_path) -> None:
    from dataclasses import replace

    from kiln.data.pipeline import minimal, run_pipeline
    from kiln.data.quality import QualityConfig

    (tmp_path / "a.txt").write_text("The kiln is hot today. " * 30)
    cfg = replace(minimal(), workers=1, report=False, dedup=None, quality=QualityConfig(perplexity_model="m", max_perplexity=50.0))
    with pytest.raises(ValueError, match="kiln_lm_scorer"):
        run_pipeline(cfg, [str(tmp_path / "a.txt")], tmp_path / "out", executor=None)
    stats = run_pipeline(cfg, [str(tmp_path / "a.txt")], tmp_path / "out2", perplexity_scorer=_ConstScorer(100.0), force=True)
    assert stats.dropped.get("perplexity_too_high") == 1 and stats.kept == 0


class _ConstScorer:
    def __init__(self, v: float) -> None:
        self.v = v

    def __call__(self, text: str) -> float:
        return self.v
