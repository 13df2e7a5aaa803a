"""Boilerplate removal: a block classifier over resiliparse's main-content output.

resiliparse (C++) finds the main content of a page quickly and keeps nearly all of it (recall 0.94
on trafilatura's evaluation set) but also keeps much boilerplate: related-article lists, share and
follow prompts, author boxes, captions, dates, copyright lines (precision 0.80). Kiln asks it for
``minimal_html`` (paragraphs, headings, lists, links kept as tags), splits that into blocks, and
scores each block with two small logistic models, the shallow-text-feature approach of boilerpipe
(Kohlschütter et al., WSDM 2010: text length, link density, position and the same features of the
neighbours) and jusText (Pomikálek 2011: short link-dense blocks near other bad blocks are bad):

1. ``STAGE1``: features of the block and its neighbours (``block_features``).
2. ``STAGE2``: the same features plus stage 1's probabilities of the block, its two neighbours on
   each side and the page's mean (context smoothing, as jusText's second pass does).

Blocks with stage-2 probability >= ``threshold`` are kept, then :func:`drop_families` removes three
families that shallow features miss ("Read More" teasers with their headlines, gallery counters
and photo captions, staff lists). The weights were tuned by 5-fold cross-validation on trafilatura's
``evaldata.json`` pages (:mod:`kiln.bench.extract_cv`: fit and threshold on four folds, F1 on the
fifth; pooled held-out F1 0.926 against trafilatura's 0.918 on the same folds) and the shipped
weights are then fit on all pages with the threshold the folds chose (0.5). Block labels: contains a
"with" snippet -> content, a "without" snippet -> boilerplate; other blocks unlabelled. Reproduce
with ``kiln bench data --what extract_cv`` and ``--what extract --refit``.
"""

from __future__ import annotations

import html as htmllib
import math
import re
from dataclasses import dataclass

import numpy as np

_TAG_RE = re.compile(r"<[^>]+>")
_A_RE = re.compile(r"<a\b[^>]*>(.*?)</a>", re.DOTALL)
_LEAD_RE = re.compile(r"^\s*<(\w+)")
_BR_RE = re.compile(r"<br\s*/?>")
_BLOCK_SPLIT_RE = re.compile(r"\n\s*\n")
_NEWLINES_RE = re.compile(r"\n+")
_HEADINGS = frozenset(("h1", "h2", "h3", "h4", "h5", "h6"))
_END_PUNCT = (".", "!", "?", '"', "”", "“", ";", "»", "«", ")")
# Words of boilerplate blocks in the five languages of the evaluation set (de, en, es, fr, pl).
_BOILER_RE = re.compile(  # matched on the lower-cased first _BOILER_SAMPLE characters
    r"\b(share|teilen|kommentar|comment|newsletter|related|verwandte|mehr zum thema|lesen sie auch|"
    r"auch interessant|weitere|copyright|alle rechte|all rights|impressum|datenschutz|privacy|cookie|"
    r"werbung|anzeige|advert|follow|folge|subscribe|abonn|tags?|schlagw|foto|bild|quelle|photo|image|"
    r"credit|getty|dpa|login|anmelden|registr|sign up|read more|weiterlesen|mehr lesen|click|klick|"
    r"download|menu|menü|home|startseite|kontakt|contact|facebook|twitter|instagram|whatsapp|linkedin|"
    r"pinterest|e-mail|email|print|drucken|zurück|back|next|previous|vorherig|nächst|lire aussi|"
    r"leer más|zobacz|publicidad|suscr|partager|compartir|udostępnij)"
)
_DIGIT_RE = re.compile(r"\d")
_UPPER_RE = re.compile(r"[A-ZÀ-ÖØ-ÞĀ-Ž]")
_BOILER_SAMPLE = 200  # keywords matter in short blocks; long ones are content whatever words they use
_SAMPLE = 1000  # characters of a block used for the share and keyword features (bounded time)
_DATE_RE = re.compile(r"\b\d{1,2}[./]\d{1,2}[./]\d{2,4}\b|\b\d{4}-\d{2}-\d{2}\b|\b\d{1,2}:\d{2}\b")


# ---- three families that shallow features miss (issue 24 item 3) -------------------------------------
# Related-article teasers ("... Read More"), photo captions and gallery counters ("Image 1 of 8",
# "Photo: Anna Berg"), and staff lists ("Editor: ...", "Reporting by ... ; Editing by ..."). They
# look like short content paragraphs to a length/link-density model. Each rule matches a whole
# short block; ``family_of`` names the family, the extractor drops the block (and, for a teaser,
# the headline just before it).
_READ_MORE_RE = re.compile(
    r"(?:read more|read the full (?:story|article)|continue reading|full story|more »|weiterlesen|mehr lesen|"
    r"zum artikel|lire la suite|en savoir plus|leer más|seguir leyendo|czytaj (?:dalej|więcej)|więcej)"
    r"\W{0,4}$", re.IGNORECASE)
_GALLERY_RE = re.compile(
    r"^\W*(?:image|photo|picture|slide|bild|foto|galerie|gallery|imagen|zdjęcie)\s*\d+\s*(?:of|/|von|de|sur|z|aus)\s*\d+\b",
    re.IGNORECASE)
_CAPTION_RE = re.compile(
    r"(?:\(|\b)(?:photos?|fotos?|bild|image|picture|credit|quelle|source|crédit|zdjęcie|imagen)\s*:"
    r"|©|\bgetty images\b|\b(?:ap|afp|dpa|reuters|epa)\s*(?:photo|/|foto)|\bfoto\s*:|\bphoto by\b",
    re.IGNORECASE)
_STAFF_RE = re.compile(
    r"^(?:(?:deputy |managing |photo |executive |senior |contributing )?editors?|edited by|editing by|reporting by|"
    r"additional reporting by|written by|redaktion|redakteur(?:in)?|chefredakt\w*|mitarbeit|text|autor(?:in)?|"
    r"rédaction|rédacteur|rédactrice|redacción|redactor[a]?|redakcja|redaktor\w*)\b\s*[:;,]?",
    re.IGNORECASE)
_NAME_LINE_RE = re.compile(r"^[A-ZÀ-ÖØ-Þ][\w'’.-]+(?: [A-ZÀ-ÖØ-Þ][\w'’.-]+){1,3}$")
FAMILIES = ("read_more_teaser", "gallery_counter", "photo_caption", "staff_list")


def family_of(text: str) -> str | None:
    """The boilerplate family a short block belongs to, or None (see the rules above)."""
    t = text.strip()
    if len(t) > 480 or not t:  # ~60+ words: a paragraph, not one of these (and most blocks stop here)
        return None
    if _READ_MORE_RE.search(t[-40:]):  # the tail only: a "$"-anchored search would scan every position
        return "read_more_teaser"
    if _GALLERY_RE.match(t):
        return "gallery_counter"
    n_words = t.count(" ") + t.count("\n") + 1
    if n_words <= 30 and _CAPTION_RE.search(t):
        return "photo_caption"
    if n_words <= 30 and _STAFF_RE.match(t):
        return "staff_list"
    lines = [ln.strip() for ln in t.split("\n") if ln.strip()]
    if len(lines) >= 3 and all(_NAME_LINE_RE.match(ln) for ln in lines):
        return "staff_list"  # a bare list of names, one a line
    return None


def drop_families(blocks: list[Block], keep: list[bool]) -> list[bool]:
    """``keep`` with the family blocks set False; a teaser also takes the heading or link block before it."""
    keep = list(keep)
    for i, b in enumerate(blocks):
        if not keep[i] and not (i > 0 and keep[i - 1]):  # nothing left to drop here (the rules cost ~5%)
            continue
        fam = family_of(b.text)
        if fam is None:
            continue
        keep[i] = False
        if fam == "read_more_teaser" and i > 0:
            prev = blocks[i - 1]
            if len(prev.text.split()) <= 20 and (prev.tag in _HEADINGS or prev.link_chars >= 0.5 * len(prev.text)):
                keep[i - 1] = False
    return keep


@dataclass
class Block:
    """One paragraph-level block of the page: its tag (``p``, ``h2``, ``ul``, ``""`` for bare text),
    its text (lines kept) and the characters inside links."""

    tag: str
    text: str
    link_chars: int
    links: int


def html_blocks(minimal_html: str) -> list[Block]:
    """Blocks of resiliparse's ``preserve_formatting="minimal_html"`` output (blank-line separated)."""
    out = []
    for raw in _BLOCK_SPLIT_RE.split(minimal_html):
        if not raw.strip():
            continue
        m = _LEAD_RE.match(raw)
        anchors = _A_RE.findall(raw)
        text = htmllib.unescape(_TAG_RE.sub("", _BR_RE.sub("\n", raw)))
        text = _NEWLINES_RE.sub("\n", "\n".join(" ".join(ln.split()) for ln in text.split("\n"))).strip()
        if text:
            link_chars = sum(len(_TAG_RE.sub("", a).strip()) for a in anchors)
            out.append(Block(m.group(1).lower() if m else "", text, link_chars, len(anchors)))
    return out


FEATURES = (
    "log_chars", "log_words", "link_density", "link_dense", "is_heading", "is_p", "is_list", "is_bare",
    "is_pre", "ends_with_punct", "digit_share", "has_copyright", "has_pipe", "links_per_10",
    "chars_before_share", "chars_through_share", "block_index_share", "after_longest", "before_longest",
    "link_density_prev", "link_density_next", "link_density_prev2", "link_density_next2",
    "log_chars_prev", "log_chars_next", "words_le_3", "words_le_8", "lines_per_word", "upper_share",
    "chars_ge_200", "log_page_chars", "boiler_words", "short_with_boiler_word", "has_date_or_time",
    "after_heading", "ends_with_colon", "starts_lower", "sentence_marks_per_word", "mean_word_len_10",
    "chars_ge_80", "longest_block_share",
)
CONTEXT_FEATURES = ("p", "p_prev", "p_next", "p_prev2", "p_next2", "p_page_mean", "p_page_share_ge_half")


def block_features(blocks: list[Block]) -> np.ndarray:
    """``(n_blocks, len(FEATURES))`` float64 features (see ``FEATURES`` for the columns)."""
    n = len(blocks)
    if n == 0:
        return np.zeros((0, len(FEATURES)))
    lens = [len(b.text) for b in blocks]
    total = sum(lens) or 1
    dens = [min(b.link_chars / max(len(b.text), 1), 1.0) for b in blocks]
    longest = max(range(n), key=lens.__getitem__)
    rows = []
    cum = 0

    def d(j: int) -> float:  # link density of a neighbour; outside the page counts as all links
        return dens[j] if 0 <= j < n else 1.0

    def lc(j: int) -> float:
        return math.log1p(lens[j]) if 0 <= j < n else 0.0

    for i, b in enumerate(blocks):
        t, length = b.text, lens[i]
        words = t.split()
        nw = len(words)
        head = t[:_SAMPLE]
        boiler = len(_BOILER_RE.findall(t[:_BOILER_SAMPLE].lower()))
        digits = (len(head) - len(_DIGIT_RE.sub("", head))) / max(len(head), 1)
        upper = (len(head) - len(_UPPER_RE.sub("", head))) / max(len(head), 1)
        rows.append((
            math.log1p(length), math.log1p(nw), dens[i], float(dens[i] > 0.5), float(b.tag in _HEADINGS),
            float(b.tag == "p"), float(b.tag in ("ul", "ol", "li")), float(b.tag == ""), float(b.tag == "pre"),
            float(t.rstrip().endswith(_END_PUNCT)), digits,
            float("©" in t or "(c)" in t.lower()), float("|" in t), min(b.links, 10) / 10,
            cum / total, (cum + length) / total, i / max(n - 1, 1), float(i > longest), float(i < longest),
            d(i - 1), d(i + 1), d(i - 2), d(i + 2), lc(i - 1), lc(i + 1),
            float(nw <= 3), float(nw <= 8), t.count("\n") / max(nw, 1), upper,
            float(length >= 200), math.log1p(total), min(boiler, 3) / 3, float(boiler > 0 and nw <= 10),
            float(bool(_DATE_RE.search(head))), float(i > 0 and blocks[i - 1].tag in _HEADINGS),
            float(t.rstrip().endswith(":")), float(t[:1].islower()),
            (t.count(".") + t.count("!") + t.count("?")) / max(nw, 1), (length - t.count(" ") - t.count("\n")) / max(nw, 1) / 10,
            float(length >= 80), lens[longest] / total,
        ))
        cum += length
    return np.asarray(rows, dtype=np.float64)


def context_features(p: np.ndarray) -> np.ndarray:
    """Stage-1 probabilities ``p`` (n,) -> ``(n, len(CONTEXT_FEATURES))``; 0.5 outside the page."""
    n = len(p)
    pp = np.concatenate([[0.5, 0.5], p, [0.5, 0.5]])
    return np.stack([p, pp[1 : n + 1], pp[3 : n + 3], pp[0:n], pp[4 : n + 4],
                     np.full(n, p.mean()), np.full(n, (p > 0.5).mean())], axis=1)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -40, 40)))


Weights = tuple  # (intercept, weights): a float and a sequence of floats


def block_probabilities(blocks: list[Block], stage1: Weights | None = None, stage2: Weights | None = None) -> np.ndarray:
    """Stage-2 probability that each block is content, ``(n_blocks,)`` (default: the shipped weights)."""
    stage1, stage2 = stage1 or STAGE1, stage2 or STAGE2
    x = block_features(blocks)
    if not len(x):
        return np.zeros(0)
    p1 = _sigmoid(stage1[0] + x @ np.asarray(stage1[1]))
    return _sigmoid(stage2[0] + np.hstack([x, context_features(p1)]) @ np.asarray(stage2[1]))


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float = 1.0, iters: int = 50) -> tuple[float, np.ndarray]:
    """L2-regularized logistic regression by Newton's method: ``(intercept, weights)`` in the units of
    ``x`` (standardized inside, as scikit-learn users do; the intercept is not penalized).

    Minimizes ``0.5 * |w|^2 + c * sum(logloss)`` over standardized features (scikit-learn's
    ``LogisticRegression(C=c)`` objective)."""
    mu, sd = x.mean(0), x.std(0)
    sd[sd < 1e-9] = 1.0
    z = np.hstack([np.ones((len(x), 1)), (x - mu) / sd])
    w = np.zeros(z.shape[1])
    reg = np.ones(z.shape[1]) / c
    reg[0] = 0.0
    for _ in range(iters):
        p = _sigmoid(z @ w)
        grad = z.T @ (p - y) + reg * w
        hess = (z * (p * (1 - p))[:, None]).T @ z + np.diag(reg) + 1e-9 * np.eye(len(w))
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-8:
            break
    weights = w[1:] / sd
    return float(w[0] - (weights * mu).sum()), weights


def fit_block_classifier(
    pages: list[dict], blocks: list[list[Block]], c: float = 1.0
) -> tuple[tuple[float, np.ndarray], tuple[float, np.ndarray]]:
    """Fit both stages on evaluation pages (``{"with", "without"}`` snippets) and their blocks."""

    def labelled(feats: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for page, bl, f in zip(pages, blocks, feats):
            for b, row in zip(bl, f):
                good = any(s in b.text for s in page["with"])
                bad = any(s in b.text for s in page["without"])
                if good != bad:
                    xs.append(row)
                    ys.append(float(good))
        return np.asarray(xs), np.asarray(ys)

    f1 = [block_features(bl) for bl in blocks]
    stage1 = fit_logistic(*labelled(f1), c=c)
    f2 = [np.hstack([f, context_features(_sigmoid(stage1[0] + f @ stage1[1]))]) if len(f) else
          np.zeros((0, len(FEATURES) + len(CONTEXT_FEATURES))) for f in f1]
    stage2 = fit_logistic(*labelled(f2), c=c)
    return stage1, stage2


# Fit on all 990 pages of trafilatura's evaluation set (issue 24: the 5-fold cross-validation of
# kiln.bench.extract_cv chose the threshold, 0.5, and gives the honest held-out F1, docs/data.md);
# generated by kiln.bench.extract_cv.refit_all. Intercept, then one weight per FEATURES (+ CONTEXT_FEATURES).
STAGE1: Weights = (
    0.431296,
    (
        -0.261697, 1.09807, -3.62684, 0.997446, 1.28614, 1.77317, 1.45999, 0.152003, 6.60973,
        0.560515, 1.30684, -2.79673, -0.576702, -0.782195, -5.52512, 3.44073, 0.557872,
        0.0357883, 0.238131, -0.580054, -0.688071, -0.433857, -0.624361, 0.195554, 0.0719239,
        0.143939, 0.408205, 0.927295, -2.91264, 0.278717, -0.388961, -1.45919, -1.32118,
        -1.53437, -0.306243, 0.334311, 0.307137, -0.0187127, 0.626833, 0.27284, -0.681112,
    ),
)
STAGE2: Weights = (
    -2.41597,
    (
        -0.285415, 0.781232, -2.60442, 0.963048, 1.00989, 1.27814, 1.04165, 0.105237, 5.30607,
        0.427645, 0.969051, -1.8759, -0.316106, -0.585792, -3.71263, 2.47562, 0.662056,
        0.137028, 0.263297, -0.00130677, -0.300074, 0.0701652, -0.321334, -0.0292531,
        -0.0192393, 0.177626, 0.310433, 0.769806, -1.69397, 0.32757, -0.099603, -0.911941,
        -0.699736, -1.00703, 0.00870711, 0.241655, 0.289624, -0.0632462, 0.340986, 0.270505,
        -0.431658, 2.39621, 1.32103, 1.25864, 0.772221, -0.433124, -2.49851, 0.678068,
    ),
)
