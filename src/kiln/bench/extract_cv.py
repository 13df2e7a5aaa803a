"""Cross-validated tuning of Kiln's block classifier on trafilatura's evaluation pages (issue 24 item 3).

The pages are shuffled (seed 0) into ``k`` folds. For each fold, the two logistic stages are fit on
the other folds and the keep threshold is picked there (the best F1 over a grid, on the fitting
pages); the held-out fold is then extracted once with those weights. Reported per fold: the tuning
F1 (on the fitting pages) and the held-out F1 of Kiln, with and without the family rules
(:func:`kiln.data.boilerplate.family_of`), beside trafilatura and resiliparse on the same fold.
The pooled held-out row adds every fold's snippet counts. ``refit_all`` fits the shipped weights on
every page with the threshold the folds chose most often.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import dataclass
from typing import Any

import numpy as np

THRESHOLDS = (0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7)


@dataclass
class PageCache:
    """What every fold reuses: each page's blocks and features, and the references' outputs."""

    blocks: list[list[Any]]
    feats: list[np.ndarray]
    trafilatura: list[str]
    resiliparse: list[str]
    seconds: dict[str, float]


def build_cache(pages: list[dict[str, Any]]) -> PageCache:
    """Blocks (resiliparse ``minimal_html``), features, and trafilatura / resiliparse outputs; each
    page goes through every method in turn, so the timings (seconds per method over all pages) see
    the same machine load: their ratios are fair on a busy machine."""
    from resiliparse.extract.html2text import extract_plain_text

    from kiln.data.boilerplate import block_features, html_blocks
    from kiln.data.extract import SKIP_ELEMENTS, ExtractConfig, _trafilatura, extract_text

    blocks, feats, traf, resi = [], [], [], []
    secs: Counter = Counter()
    for p in pages:
        t0 = time.perf_counter()
        try:
            mh = extract_plain_text(p["html"], preserve_formatting="minimal_html", main_content=True, alt_texts=False,
                                    comments=False, links=True, skip_elements=list(SKIP_ELEMENTS))
        except Exception:  # noqa: BLE001 - a page resiliparse cannot parse has no blocks
            mh = ""
        b = html_blocks(mh)
        blocks.append(b)
        feats.append(block_features(b))
        secs["kiln_blocks"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            traf.append(_trafilatura(p["html"], p["url"]))
        except Exception:  # noqa: BLE001 - a crash is an empty extraction
            traf.append("")
        secs["trafilatura"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            extract_text(p["html"], p["url"], ExtractConfig(method="kiln"))  # timed only: the full default path
        except Exception:  # noqa: BLE001
            pass
        secs["kiln (default extract_text)"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        try:
            resi.append(extract_text(p["html"], p["url"], ExtractConfig(method="resiliparse")))
        except Exception:  # noqa: BLE001
            resi.append("")
        secs["resiliparse"] += time.perf_counter() - t0
    return PageCache(blocks, feats, traf, resi, dict(secs))


def _kiln_text(cache: PageCache, i: int, weights: tuple, threshold: float, families: bool, min_chars: int = 200) -> str:
    from kiln.data.boilerplate import _sigmoid, context_features, drop_families
    from kiln.data.extract import _drop_family_lines

    (b1, w1), (b2, w2) = weights
    x, bl = cache.feats[i], cache.blocks[i]
    text = ""
    if len(x):
        p1 = _sigmoid(b1 + x @ np.asarray(w1))
        p = _sigmoid(b2 + np.hstack([x, context_features(p1)]) @ np.asarray(w2))
        keep = [bool(q >= threshold) for q in p]
        if families:
            keep = drop_families(bl, keep)
        text = "\n\n".join(b.text for b, k in zip(bl, keep) if k)
    if len(text) < min_chars:
        alt = _drop_family_lines(cache.trafilatura[i]) if families else cache.trafilatura[i]
        if len(alt) > len(text):
            text = alt
    return text


def counts(pages: list[dict[str, Any]], idx: list[int], outs: list[str]) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) of snippet matching over pages ``idx``."""
    tp = fp = fn = 0
    for i, out in zip(idx, outs):
        for s in pages[i]["with"]:
            if s in out:
                tp += 1
            else:
                fn += 1
        fp += sum(1 for s in pages[i]["without"] if s in out)
    return tp, fp, fn


def f1(c: tuple[int, int, int]) -> float:
    tp, fp, fn = c
    p, r = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
    return 2 * p * r / max(p + r, 1e-12)


def _fit(pages: list[dict[str, Any]], cache: PageCache, idx: list[int], c: float = 1.0) -> tuple:
    from kiln.data.boilerplate import fit_block_classifier

    return fit_block_classifier([pages[i] for i in idx], [cache.blocks[i] for i in idx], c=c)


def cross_validate(pages: list[dict[str, Any]], cache: PageCache, k: int = 5, seed: int = 0) -> list[dict[str, Any]]:
    """One row per fold and a pooled row: tuning and held-out F1 of Kiln (families on/off), and the
    references on the held-out fold."""
    order = list(range(len(pages)))
    random.Random(seed).shuffle(order)
    folds = [order[f::k] for f in range(k)]
    rows = []
    pooled: dict[str, list[int]] = {}
    for f, held in enumerate(folds):
        fit_idx = [i for g, fold in enumerate(folds) if g != f for i in fold]
        weights = _fit(pages, cache, fit_idx)
        tune = {t: f1(counts(pages, fit_idx, [_kiln_text(cache, i, weights, t, True) for i in fit_idx])) for t in THRESHOLDS}
        thr = max(tune, key=tune.__getitem__)
        res = {
            "kiln (families)": [_kiln_text(cache, i, weights, thr, True) for i in held],
            "kiln (no families)": [_kiln_text(cache, i, weights, thr, False) for i in held],
            "trafilatura": [cache.trafilatura[i] for i in held],
            "resiliparse": [cache.resiliparse[i] for i in held],
        }
        row: dict[str, Any] = {"fold": f, "pages": len(held), "threshold": thr, "tuning_f1": tune[thr]}
        for name, outs in res.items():
            c = counts(pages, held, outs)
            row[f"{name} F1"] = f1(c)
            pooled.setdefault(name, [0, 0, 0])
            pooled[name] = [a + b for a, b in zip(pooled[name], c)]
        rows.append(row)
    mean_row: dict[str, Any] = {"fold": "pooled held-out", "pages": len(pages), "threshold": Counter(r["threshold"] for r in rows).most_common(1)[0][0],
                                "tuning_f1": float(np.mean([r["tuning_f1"] for r in rows]))}
    for name, c in pooled.items():
        mean_row[f"{name} F1"] = f1(tuple(c))
        tp, fp, fn = c
        mean_row[f"{name} P/R"] = f"{tp / max(tp + fp, 1):.3f}/{tp / max(tp + fn, 1):.3f}"
    rows.append(mean_row)
    return rows


def refit_all(pages: list[dict[str, Any]], cache: PageCache) -> tuple:
    """The shipped weights: both stages fit on every page."""
    return _fit(pages, cache, list(range(len(pages))))
