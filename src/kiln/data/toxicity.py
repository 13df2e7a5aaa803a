"""Toxicity / NSFW scoring: a bundled linear classifier, a word-list score and an adult-URL check.

Three signals, each with its own drop reason:

- ``toxic_url``: the URL names an adult site (as FineWeb's URL filter does).
- ``toxic_words``: the share of words on a list of explicit sexual and slur terms (as C4's "bad
  words" rule). A few dozen unambiguous terms ship in code; a larger list (e.g. LDNOOBW's) can be
  given as a file, one term a line.
- ``toxic_classifier``: the probability of offensive language from the linear model bundled in the
  ``alt-profanity-check`` wheel (TF-IDF over 15,442 English words -> 5 calibrated linear SVMs,
  trained on ~200k labelled comments). The wheel stores it as joblib pickles; Kiln never unpickles an
  arbitrary file: :func:`load_profanity_check` first checks both files' SHA-256 against the pinned
  release (1.9.1), then copies the coefficients into :class:`LinearTextClassifier`, plain numpy
  arrays scored by Kiln's own code, which saves and loads as ``.npz`` without pickle
  (``allow_pickle=False``). ``ToxicityConfig.classifier`` takes such an ``.npz`` too.

Any other scorer plugs in through ``toxicity_filter(..., scorer=callable)``.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Unambiguous explicit terms only (common words with innocent senses are left out on purpose).
# Stored lightly obfuscated (reversed) so the source reads cleanly.
_BUILTIN_REVERSED = (
    "nrop", "onrop", "yhpargonrop", "xxx", "iatneh", "kcuf", "gnikcuf", "rekcufrehtom", "tnuc",
    "bojwolb", "bojdnah", "ekaknub", "eipmaerc", "gnimaerc", "gnibbab", "yggod", "noitabrutsam",
    "etabrutsam", "namtsehcnu", "tihs", "hctib", "eyogaf", "toggaf", "reggin", "aggin", "ekyk",
    "knihc", "kcips", "tellub", "elohssa", "onsrop", "mahmaerc", "nrobtuc", "ydlub", "tobkcuf",
)
_ADULT_URL_RE = re.compile(r"(?:porn|xxx|sex|nude|xvideos|xhamster|onlyfans|hentai)", re.IGNORECASE)
_WORD_RE = re.compile(r"[a-z]+")


def builtin_terms() -> frozenset[str]:
    """The built-in explicit-term list."""
    return frozenset(t[::-1] for t in _BUILTIN_REVERSED)


@dataclass(frozen=True)
class ToxicityConfig:
    """Drop documents that look toxic or pornographic."""

    max_score: float = 0.01
    """Drop as ``toxic_words`` when the share of listed words exceeds this (1 listed word in 100)."""
    word_list: str | None = None
    """Extra terms, one per line (added to the built-in list)."""
    check_url: bool = True
    """Drop documents whose URL names an adult site."""
    classifier: str | None = "alt-profanity-check"
    """``alt-profanity-check`` (the bundled model, hash-checked), a ``.npz`` saved by
    :meth:`LinearTextClassifier.save`, or None (word list only)."""
    max_classifier_score: float = 0.9
    """Drop as ``toxic_classifier`` when the classifier's probability exceeds this."""
    classifier_max_chars: int = 100_000
    """Characters of the document the classifier reads (bounded time on gigantic documents)."""
    cache_dir: str | None = None
    """Where the converted bundled model is cached (None: ``~/.cache/kiln/models``; "" disables)."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.max_classifier_score <= 1.0:
            raise ValueError(f"max_classifier_score={self.max_classifier_score} must be a probability in [0, 1]")


def load_terms(cfg: ToxicityConfig) -> frozenset[str]:
    terms = set(builtin_terms())
    if cfg.word_list:
        terms |= {ln.strip().lower() for ln in Path(cfg.word_list).read_text().splitlines() if ln.strip()}
    return frozenset(terms)


def toxicity_score(text: str, terms: frozenset[str]) -> float:
    """Share of words (lower-cased ASCII letters runs) that are listed terms."""
    ws = _WORD_RE.findall(text.lower())
    if not ws:
        return 0.0
    return sum(w in terms for w in ws) / len(ws)


# ---- the bundled classifier ------------------------------------------------------------------------

# alt-profanity-check 1.9.1 (pinned in pyproject's `data` extra): SHA-256 of its two joblib files.
PROFANITY_CHECK_SHA256 = {
    "vectorizer.joblib": "19c5200dc6a41f026e0558e2f164f5fe8d8f58e502b46b37e4385037fcfa4831",
    "model.joblib": "aeafc04849d4d93db4721cf30a86ebf22085595294b8a07d51918e7fa98f538b",
}
_TOKEN_RE = re.compile(r"(?u)\b\w\w+\b")  # scikit-learn's default token_pattern
_NPZ_MAGIC = "kiln-linear-text-classifier"
_NPZ_VERSION = 1


class LinearTextClassifier:
    """TF-IDF (unigrams, l2) -> K linear models, each with a sigmoid calibration; the probability is
    their mean (what scikit-learn's ``CalibratedClassifierCV(LinearSVC).predict_proba`` computes).

    Arrays: ``vocab`` (V,) str, ``idf`` (V,), ``coef`` (K, V), ``intercept`` (K,), and the sigmoid
    parameters ``a``, ``b`` (K,): ``p_k = 1 / (1 + exp(a_k * f_k + b_k))``.
    """

    def __init__(self, vocab: list[str], idf: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                 a: np.ndarray, b: np.ndarray) -> None:
        self.index = {w: i for i, w in enumerate(vocab)}
        self.idf = np.asarray(idf, dtype=np.float64)
        self.coef = np.asarray(coef, dtype=np.float64)  # (K, V)
        self.intercept = np.asarray(intercept, dtype=np.float64)
        self.a = np.asarray(a, dtype=np.float64)
        self.b = np.asarray(b, dtype=np.float64)
        if self.coef.shape != (len(self.a), len(vocab)) or self.idf.shape != (len(vocab),):
            raise ValueError(f"inconsistent classifier arrays: coef {self.coef.shape}, idf {self.idf.shape}, vocab {len(vocab)}")

    def score(self, text: str) -> float:
        """Probability that ``text`` is offensive; 0.5-ish scores mean the model has no evidence."""
        counts = Counter(i for t in _TOKEN_RE.findall(text.lower()) if (i := self.index.get(t)) is not None)
        if counts:
            idx = np.fromiter(counts.keys(), dtype=np.int64, count=len(counts))
            x = np.fromiter(counts.values(), dtype=np.float64, count=len(counts)) * self.idf[idx]
            x /= np.linalg.norm(x)
            f = self.coef[:, idx] @ x + self.intercept  # (K,)
        else:
            f = self.intercept.copy()
        return float(np.mean(1.0 / (1.0 + np.exp(self.a * f + self.b))))

    def save(self, path: str | Path) -> None:
        """Write a ``.npz`` (magic + version, no pickled objects)."""
        vocab = sorted(self.index, key=self.index.__getitem__)
        np.savez_compressed(
            path, magic=np.array(_NPZ_MAGIC), version=np.array(_NPZ_VERSION), vocab=np.array(vocab),
            idf=self.idf, coef=self.coef, intercept=self.intercept, a=self.a, b=self.b,
        )

    @classmethod
    def load(cls, path: str | Path) -> LinearTextClassifier:
        with np.load(path, allow_pickle=False) as z:
            if str(z["magic"]) != _NPZ_MAGIC or int(z["version"]) != _NPZ_VERSION:
                raise ValueError(f"{path} is not a Kiln linear text classifier (version {_NPZ_VERSION})")
            return cls(list(z["vocab"]), z["idf"], z["coef"], z["intercept"], z["a"], z["b"])


def load_profanity_check() -> LinearTextClassifier:
    """The alt-profanity-check model as a :class:`LinearTextClassifier`, after checking its files."""
    import importlib.util

    # Locate the package without importing it: its __init__ unpickles the files at import time.
    spec = importlib.util.find_spec("profanity_check")
    if spec is None or spec.origin is None:
        raise ImportError(
            "the bundled toxicity classifier needs: pip install alt-profanity-check==1.9.1 (Python >= 3.11); "
            "or turn it off with ToxicityConfig(classifier=None)"
        )
    data = Path(spec.origin).parent / "data"
    for name, want in PROFANITY_CHECK_SHA256.items():
        got = hashlib.sha256((data / name).read_bytes()).hexdigest()
        if got != want:
            raise ValueError(
                f"{data / name} has SHA-256 {got}, not the pinned alt-profanity-check 1.9.1 file; refusing to "
                "unpickle it. Install alt-profanity-check==1.9.1 or pass a converted .npz as toxicity.classifier"
            )
    import joblib

    # Safe to unpickle: the bytes are exactly the pinned PyPI release's (checked above).
    vec = joblib.load(data / "vectorizer.joblib")
    model = joblib.load(data / "model.joblib")
    vocab = sorted(vec.vocabulary_, key=vec.vocabulary_.__getitem__)
    cals = model.calibrated_classifiers_
    coef = np.stack([np.asarray(c.estimator.coef_, dtype=np.float64).reshape(-1) for c in cals])
    intercept = np.array([float(np.ravel(c.estimator.intercept_)[0]) for c in cals])
    a = np.array([float(c.calibrators[0].a_) for c in cals])
    b = np.array([float(c.calibrators[0].b_) for c in cals])
    return LinearTextClassifier(vocab, vec.idf_, coef, intercept, a, b)


@functools.lru_cache(maxsize=4)
def load_classifier(spec: str, cache_dir: str | None = None) -> LinearTextClassifier:
    """``alt-profanity-check`` or a path to a ``.npz`` written by :meth:`LinearTextClassifier.save`.

    The bundled model is converted once (2-3 s: scikit-learn import + unpickling) and kept as a
    ``.npz`` in ``cache_dir`` (default ``~/.cache/kiln/models``, or ``$KILN_CACHE/models``), named by
    the pinned files' hashes; later loads read the ``.npz`` (~20 ms, no pickle). Loaded models are
    also kept per process, so a worker that runs many shards loads once."""
    if spec == "alt-profanity-check":
        if cache_dir == "":
            return load_profanity_check()
        from kiln.data.readers import default_cache_dir

        root = Path(cache_dir) if cache_dir else default_cache_dir().parent / "models"
        key = hashlib.sha256("".join(sorted(PROFANITY_CHECK_SHA256.values())).encode()).hexdigest()[:16]
        path = root / f"alt-profanity-check-1.9.1-{key}.npz"
        if path.is_file():
            return LinearTextClassifier.load(path)
        clf = load_profanity_check()
        try:  # a cache is a convenience: an unwritable one is skipped
            root.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            clf.save(tmp)
            os.replace(tmp, path)
        except OSError:
            pass
        return clf
    if not Path(spec).is_file():
        raise FileNotFoundError(f"toxicity classifier {spec!r}: not 'alt-profanity-check' and no such .npz file")
    return LinearTextClassifier.load(spec)


def toxicity_filter(
    cfg: ToxicityConfig, scorer: Callable[[str], float] | None = None
) -> Callable[[str, str | None], tuple[str | None, dict[str, float]]]:
    """A function ``(text, url) -> (drop reason or None, scores)``.

    ``scores`` has ``toxicity_words`` (share of listed words) and, with a classifier,
    ``toxicity_classifier`` (probability). ``scorer`` replaces the configured classifier.
    """
    terms = load_terms(cfg)
    clf_score = scorer
    if clf_score is None and cfg.classifier:
        clf_score = load_classifier(cfg.classifier, cfg.cache_dir).score

    def check(text: str, url: str | None = None) -> tuple[str | None, dict[str, float]]:
        if cfg.check_url and url and _ADULT_URL_RE.search(url):
            return "toxic_url", {}
        scores = {"toxicity_words": toxicity_score(text, terms)}
        if scores["toxicity_words"] > cfg.max_score:
            return "toxic_words", scores
        if clf_score is not None:
            scores["toxicity_classifier"] = clf_score(text[: cfg.classifier_max_chars])
            if scores["toxicity_classifier"] > cfg.max_classifier_score:
                return "toxic_classifier", scores
        return None, scores

    return check
