"""Kiln's shipped quality classifier: reference text vs random web-like text, built from one PyPI wheel.

The GPT-3 / CCNet / DCLM recipe (Brown et al. 2020, arXiv:2005.14165 App. A; Wenzek et al. 2019;
Li et al. 2024, arXiv:2406.11794): a linear classifier over word n-grams, reference text as the
positive class, random web text as the negative class; documents the classifier finds unlike the
reference are dropped. Kiln's default is built reproducibly from files inside the **gensim 4.4.0
wheel** (any platform's; the files are checked by SHA-256), which a fresh install can fetch with pip
and which is read as a zip, never imported:

- positives: the 206-article English Wikipedia excerpt (wiki markup stripped) and the Lee news
  corpus (300 edited news articles, Lee et al. 2005);
- negatives: ``mini_newsgroup``, 718 Usenet posts (20 Newsgroups; headers dropped, quotes,
  signatures and all kept), the closest thing to unedited web text that ships inside a wheel. The
  file is a pickle: its strings are read with :mod:`pickletools` (opcodes listed, nothing executed).

Both classes are cut into windows of ``window_words`` words and balanced. The model is a
:class:`~kiln.data.quality_classifier.QualityClassifier` over 2**16 hashed unigram+bigram buckets, saved as
float16 (``kiln/data/models/quality_default.npz``, ~100-200 KB, SHA-256 pinned in
:data:`DEFAULT_MODEL_SHA256`). Rebuild with ``kiln data build-quality-model``; held-out accuracy and
the effect of filtering are in docs/benchmarks.md.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import io
import pickletools
import random
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from kiln.data.quality_classifier import (
    QualityClassifier,
    QualityTrainConfig,
    train_quality_classifier,
)

GENSIM_VERSION = "4.4.0"
_DATA = "gensim/test/test_data/"
WHEEL_FILES = {
    "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2": "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d",
    "lee_background.cor": "5d78d6dafd953bbf65797bef09a9ffb9ec430583381be705f8fd460000f370fb",
    "mini_newsgroup": "be0084ee9aded5eeefabea86bd23f0e5e3a743d9c1875aa1e47bc0728d6a5311",
}
"""Files read from the gensim wheel and their SHA-256 (the same in every platform's wheel)."""
DEFAULT_MODEL = Path(__file__).parent / "models" / "quality_default.npz"
DEFAULT_MODEL_SHA256 = "8064deae19e4e0d7957c95e6120aa8f3e6cb0c0996cdad5509531eed8ba3fbee"
"""SHA-256 of the shipped model file; :func:`load_default_quality_classifier` checks it."""
LABELS = ("low", "high")


@dataclass(frozen=True)
class DefaultQualityBuild:
    """How the shipped model is built (``kiln data build-quality-model``)."""

    window_words: int = 120
    """Words per training example (documents are cut into windows of this length)."""
    min_words: int = 40
    """Windows shorter than this (a document's tail) are dropped."""
    train: QualityTrainConfig = field(default_factory=lambda: QualityTrainConfig(
        buckets_log2=16, optimizer="adam", lr=0.05, l2=1e-6, steps=300, max_words=2000, val_fraction=0.2, seed=0))
    """The classifier's training config (2**16 buckets: 128 KB of float16 weights)."""


# ---- the sources ------------------------------------------------------------------------------------


def fetch_gensim_wheel(cache: Path) -> Path:
    """The gensim wheel in ``cache`` (downloaded with ``pip download`` when absent)."""
    cache.mkdir(parents=True, exist_ok=True)
    found = sorted(cache.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", f"gensim=={GENSIM_VERSION}", "--no-deps", "--only-binary=:all:", "-d", str(cache)]
        if subprocess.run(cmd, check=False).returncode != 0:
            raise RuntimeError(f"could not download the gensim {GENSIM_VERSION} wheel; download it yourself "
                               f"(pip download gensim=={GENSIM_VERSION} --no-deps) and pass --gensim-wheel")
        found = sorted(cache.glob(f"gensim-{GENSIM_VERSION}-*.whl"))
    return found[0]


def read_wheel_files(wheel: str | Path) -> dict[str, bytes]:
    """The :data:`WHEEL_FILES` of a gensim wheel, each checked against its SHA-256."""
    out = {}
    with zipfile.ZipFile(wheel) as z:
        for name, sha in WHEEL_FILES.items():
            data = z.read(_DATA + name)
            if hashlib.sha256(data).hexdigest() != sha:
                raise ValueError(f"{wheel}: {name} has an unexpected SHA-256; use the gensim {GENSIM_VERSION} wheel")
            out[name] = data
    return out


_WIKI_TEXT_RE = re.compile(r"<text[^>]*>(.*?)</text>", re.DOTALL)
_TEMPLATE_RE = re.compile(r"\{\{[^{}]*\}\}")
_TABLE_RE = re.compile(r"\{\|.*?\|\}", re.DOTALL)
_REF_RE = re.compile(r"<ref[^>]*/>|<ref[^>]*>.*?</ref>|<!--.*?-->|<[^>]+>", re.DOTALL)
_FILE_LINK_RE = re.compile(r"\[\[(?:File|Image|Category|[a-z]{2,3}(?:-[a-z]+)?):[^\[\]]*(?:\[\[[^\]]*\]\][^\[\]]*)*\]\]")
_LINK_RE = re.compile(r"\[\[(?:[^|\]]*\|)?([^\]]*)\]\]")
_EXT_LINK_RE = re.compile(r"\[https?://\S+ ?([^\]]*)\]")


def wikipedia_articles(bz2_xml: bytes) -> list[str]:
    """Plain text of the articles of a MediaWiki XML dump (markup stripped; paragraphs of prose only)."""
    xml = bz2.decompress(bz2_xml).decode("utf-8")
    out = []
    for m in _WIKI_TEXT_RE.finditer(xml):
        t = html.unescape(m.group(1))
        if t.lstrip().lower().startswith("#redirect"):
            continue
        t = _TABLE_RE.sub("", t)
        for _ in range(3):  # nested templates, innermost first
            t = _TEMPLATE_RE.sub("", t)
        t = _REF_RE.sub("", _FILE_LINK_RE.sub("", t))
        t = _EXT_LINK_RE.sub(r"\1", _LINK_RE.sub(r"\1", t)).replace("'''", "").replace("''", "")
        paras = [p.strip() for p in t.split("\n") if len(p.strip()) > 80 and not p.lstrip().startswith(("=", "*", "|", "!", "{", ":", "#"))]
        if paras:
            out.append("\n".join(paras))
    return out


def newsgroup_posts(pickled_zlib: bytes) -> list[str]:
    """Bodies of the 20 Newsgroups posts in gensim's ``mini_newsgroup`` (zlib of a protocol-0
    pickle of a scikit-learn Bunch), read with :func:`pickletools.genops`: the opcodes are listed,
    no object is built and no code runs. Headers (up to the first blank line) are dropped."""
    import zlib

    data = zlib.decompress(pickled_zlib)
    posts = []
    for op, arg, _ in pickletools.genops(io.BytesIO(data)):
        if op.name in ("UNICODE", "BINUNICODE", "SHORT_BINUNICODE") and isinstance(arg, str) and arg.startswith(("From:", "Newsgroups:", "Path:")):
            head, _, body = arg.partition("\n\n")
            if body.strip():
                posts.append(body.strip())
    return posts


def windows(text: str, n: int, min_words: int) -> list[str]:
    """``text`` cut into consecutive windows of ``n`` words (newlines kept); short tails dropped."""
    words = re.split(r"(?<=\S)(?=\s)", text)
    out = []
    for i in range(0, len(words), n):
        w = "".join(words[i : i + n]).strip()
        if len(w.split()) >= min_words:
            out.append(w)
    return out


def default_training_texts(files: dict[str, bytes], cfg: DefaultQualityBuild = DefaultQualityBuild()) -> tuple[list[str], list[str]]:
    """``(positives, negatives)`` windows from the wheel's files, balanced (the larger side sampled)."""
    pos_docs = wikipedia_articles(files["enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"])
    pos_docs += [ln for ln in files["lee_background.cor"].decode("utf-8", "replace").splitlines() if ln.strip()]
    neg_docs = newsgroup_posts(files["mini_newsgroup"])
    pos = [w for d in pos_docs for w in windows(d, cfg.window_words, cfg.min_words)]
    neg = [w for d in neg_docs for w in windows(d, cfg.window_words, cfg.min_words)]
    rng = random.Random(cfg.train.seed)
    n = min(len(pos), len(neg))
    return rng.sample(pos, n), rng.sample(neg, n)


def build_default_quality_classifier(
    wheel: str | Path, out: str | Path = DEFAULT_MODEL, cfg: DefaultQualityBuild = DefaultQualityBuild()
) -> dict[str, float]:
    """Build the shipped model from a gensim wheel into ``out`` (float16 weights); returns its
    training metrics (held-out accuracy on ``cfg.train.val_fraction`` of the windows) and SHA-256."""
    pos, neg = default_training_texts(read_wheel_files(wheel), cfg)
    model, metrics = train_quality_classifier(pos, neg, cfg.train)
    model.save(out, dtype="float16")
    metrics = {**metrics, "positives": len(pos), "negatives": len(neg),
               "bytes": Path(out).stat().st_size, "sha256": hashlib.sha256(Path(out).read_bytes()).hexdigest()}
    return metrics


def load_default_quality_classifier(path: str | Path | None = None) -> QualityClassifier:
    """The shipped model (its SHA-256 checked), or the one at ``path``."""
    if path is not None:
        return QualityClassifier.load(path)
    data = DEFAULT_MODEL.read_bytes() if DEFAULT_MODEL.is_file() else b""
    if hashlib.sha256(data).hexdigest() != DEFAULT_MODEL_SHA256:
        raise ValueError(f"{DEFAULT_MODEL} is missing or altered (SHA-256 mismatch); reinstall Kiln or rebuild it "
                         "with `kiln data build-quality-model`")
    return QualityClassifier.load(io.BytesIO(data))


def classify_quality(text: str, model: QualityClassifier | None = None, threshold: float = 0.5) -> tuple[str, float]:
    """``("high" | "low", p(high))`` of ``text`` under ``model`` (default: the shipped one)."""
    m = model or _default()
    p = m.score(text)
    return LABELS[p >= threshold], p


_CACHE: dict[str, QualityClassifier] = {}


def _default() -> QualityClassifier:
    if "default" not in _CACHE:
        _CACHE["default"] = load_default_quality_classifier()
    return _CACHE["default"]
