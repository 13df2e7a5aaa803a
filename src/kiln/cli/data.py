"""`kiln data ...`: curate raw data into training shards, train the quality classifier, clean books.

    kiln data run --preset web_en --input crawl/*.warc.gz --out data/web
    kiln data run --preset books --input gutenberg_books.tar.gz --out data/books
    kiln data run --input crawl/ --out data/web --output-format parquet --langid-model cld3 --toxicity-threshold 0.8
    kiln data run --input crawl/ --out data/web --set langid.min_score=0.5 --set dedup.minhash.threshold=0.7
    kiln data train-quality --positive books/ wiki.txt --negative c4.jsonl --out quality.npz
    kiln data presets
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class _DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` except where the default is None: those flags say in their help
    what None means (usually: the preset's value)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


# ``--output-format jsonl`` is accepted for the library's ``jsonl.zst`` (the only JSONL output).
_OUTPUT_FORMAT_ALIASES = {"jsonl": "jsonl.zst"}


def _probability(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= x <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return x


def _preset_defaults(get: Any) -> str:
    """``web_en: X, books: Y, ...``: one setting of every preset, for help texts (read from the
    presets themselves, so the help follows the library)."""
    from kiln.data.pipeline import PRESETS

    values = {name: str(get(fn())) for name, fn in PRESETS.items()}
    if len(set(values.values())) == 1:
        return f"{next(iter(values.values()))} in every preset"
    return ", ".join(f"{name}: {v}" for name, v in values.items())


def register(subparsers: Any) -> None:
    """Add ``kiln data`` and its subcommands."""
    from kiln.data.extract import METHODS as EXTRACT_METHODS
    from kiln.data.langid import MODELS as LANGID_MODELS
    from kiln.data.pipeline import OUTPUT_FORMATS

    p = subparsers.add_parser("data", help="curate raw web/book data into clean, deduplicated shards")
    sub = p.add_subparsers(dest="data_command", metavar="DATA_COMMAND")

    from kiln.data.curation import config_keys

    r = sub.add_parser("run", help="run a curation preset over inputs", formatter_class=_DefaultsHelpFormatter,
                       epilog="config keys for --set KEY=VALUE: " + ", ".join(config_keys()))
    r.add_argument("--preset", default="web_en", help="web_en | books | minimal (see `kiln data presets`)")
    r.add_argument("--input", nargs="+", required=True, help="files, folders, globs (WARC/WET/HTML/JSONL/Parquet/txt/tar), URLs, hf://")
    r.add_argument("--out", required=True,
                   help="output folder: train_XXXXX.jsonl.zst (or .parquet), report.html, manifest.json")
    r.add_argument("--workers", type=int, default=0, help="processes (0 = all cores)")
    r.add_argument("--executor", default="local", choices=["local", "ray"], help="where shards run")
    r.add_argument("--ray-address", default=None, help="Ray cluster address (default: a local instance)")
    r.add_argument("--languages", default=None,
                   help="comma-separated language codes to keep; an error with a preset without language ID (default: the preset's; "
                        + _preset_defaults(lambda c: ",".join(c.langid.languages) if c.langid else "no language ID") + ")")
    r.add_argument("--extract", default=None, choices=EXTRACT_METHODS,
                   help="HTML extraction method; an error with a preset without extraction (default: the preset's; "
                        + _preset_defaults(lambda c: c.extract.method if c.extract else "no extraction") + ")")
    r.add_argument("--output-format", default=None, choices=(*OUTPUT_FORMATS, *[a for a, f in _OUTPUT_FORMAT_ALIASES.items() if f in OUTPUT_FORMATS]),
                   help="shard format: jsonl.zst (alias jsonl) or parquet; `kiln tokenize --corpus` reads both "
                        "(default: the preset's; " + _preset_defaults(lambda c: c.output_format) + ")")
    r.add_argument("--langid-model", default=None, choices=LANGID_MODELS,
                   help="language-ID model (default: the preset's; "
                        + _preset_defaults(lambda c: c.langid.model if c.langid else "no language ID") + ")")
    r.add_argument("--toxicity-classifier", default=None, action=argparse.BooleanOptionalAction,
                   help="score documents with the bundled toxicity classifier and drop those above "
                        "--toxicity-threshold; --no-toxicity-classifier keeps only the URL and word-list checks "
                        "(default: the preset's; "
                        + _preset_defaults(lambda c: ("on" if c.toxicity.classifier else "off") if c.toxicity else "no toxicity step") + ")")
    r.add_argument("--toxicity-threshold", type=_probability, default=None,
                   help="drop documents whose toxicity-classifier probability exceeds this (default: the preset's; "
                        + _preset_defaults(lambda c: c.toxicity.max_classifier_score if c.toxicity else "no toxicity step") + ")")
    r.add_argument("--quality-model", default=None,
                   help="'default' (the shipped classifier: Wikipedia + news vs Usenet posts) or a model from "
                        "`kiln data train-quality` to filter with (default: none)")
    r.add_argument("--min-quality", type=float, default=0.5, help="drop below this classifier score")
    r.add_argument("--perplexity-model", default=None,
                   help="a Kiln model folder (save_pretrained) whose perplexity filters documents (default: none)")
    r.add_argument("--perplexity-tokenizer", default=None, help="that model's tokenizer.json (default: none; needed with --perplexity-model)")
    r.add_argument("--max-perplexity", type=float, default=1000.0, help="drop documents above this perplexity")
    r.add_argument("--keep-dropped-fraction", type=float, default=0.0, help="keep this share of filtered documents, tagged")
    r.add_argument("--val-fraction", type=float, default=0.0, help="share of kept documents written to val_* shards")
    r.add_argument("--no-dedup", action="store_true", help="skip exact and MinHash dedup")
    r.add_argument("--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE",
                   help="override any config key after the flags above (repeatable), as `kiln train --set`: "
                        "dotted keys reach the steps' configs, e.g. --set langid.min_score=0.5 "
                        "--set dedup.minhash.threshold=0.7 --set toxicity=none; the keys are those of "
                        "`kiln data presets`")
    r.add_argument("--force", action="store_true", help="recompute even if a matching output exists")
    r.add_argument("--keep-work", action="store_true", help="keep the .work folder (markers, intermediates)")
    r.set_defaults(func=run_data)

    q = sub.add_parser("train-quality", help="train the fastText-style quality classifier", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    q.add_argument("--positive", nargs="+", required=True, help="sources of high-quality text (books, reference)")
    q.add_argument("--negative", nargs="+", required=True, help="sources of random web text")
    q.add_argument("--out", required=True, help="model file (.npz)")
    q.add_argument("--max-docs", type=int, default=20_000, help="documents read per class")
    q.add_argument("--chunk-words", type=int, default=300, help="split long documents (books) into chunks of this many words")
    q.add_argument("--epochs", type=int, default=5, help="SGD passes")
    q.add_argument("--text-key", default="text", help="field holding the text in JSON/Parquet")
    q.set_defaults(func=run_train_quality)
    b = sub.add_parser("build-quality-model", help="rebuild the shipped quality classifier from the gensim wheel",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    b.add_argument("--gensim-wheel", default=None, help="a gensim 4.4.0 wheel (default: pip download it into --cache)")
    b.add_argument("--cache", default=str(Path.home() / ".cache" / "kiln"), help="where the wheel is downloaded")
    b.add_argument("--out", default=None, help="model file (default: the package's kiln/data/models/quality_default.npz)")
    b.set_defaults(func=run_build_quality_model)

    pr = sub.add_parser("presets", help="print the presets' configs as JSON")
    pr.set_defaults(func=run_presets)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def build_config(args: argparse.Namespace):
    """The preset named by ``--preset`` with the command-line overrides applied."""
    from dataclasses import replace

    from kiln.data.pipeline import PRESETS, apply_overrides
    from kiln.data.quality import QualityConfig

    if args.preset not in PRESETS:
        raise ValueError(f"preset {args.preset!r} is unknown; pick one of {', '.join(PRESETS)}")
    cfg = PRESETS[args.preset]()
    changes: dict[str, Any] = {
        "workers": args.workers, "keep_dropped_fraction": args.keep_dropped_fraction, "val_fraction": args.val_fraction,
    }
    if args.languages is not None:
        if cfg.langid is None:
            raise ValueError(f"preset {args.preset!r} has no language-ID step, so --languages does not apply; "
                             "use a preset with one (e.g. web_en) or drop the flag")
        langs = tuple(x for x in args.languages.split(",") if x)
        changes["langid"] = replace(cfg.langid, languages=langs)
    if args.extract:
        if cfg.extract is None:
            raise ValueError(f"preset {args.preset!r} reads text, not HTML, so --extract does not apply; "
                             "use a web preset (e.g. web_en) or drop the flag")
        changes["extract"] = replace(cfg.extract, method=args.extract)
    if args.output_format is not None:
        changes["output_format"] = _OUTPUT_FORMAT_ALIASES.get(args.output_format, args.output_format)
    if args.langid_model is not None:
        if cfg.langid is None:
            raise ValueError(f"preset {args.preset!r} has no language-ID step, so --langid-model does not apply")
        changes["langid"] = replace(changes.get("langid", cfg.langid), model=args.langid_model)
    if args.toxicity_classifier is not None or args.toxicity_threshold is not None:
        changes["toxicity"] = _toxicity_config(cfg.toxicity, args)
    if args.quality_model or getattr(args, "perplexity_model", None):
        if getattr(args, "perplexity_model", None) and not args.perplexity_tokenizer:
            raise ValueError("--perplexity-model needs --perplexity-tokenizer (the model's tokenizer.json)")
        changes["quality"] = QualityConfig(
            classifier=args.quality_model, min_classifier_score=args.min_quality,
            perplexity_model=getattr(args, "perplexity_model", None), perplexity_tokenizer=getattr(args, "perplexity_tokenizer", None),
            max_perplexity=getattr(args, "max_perplexity", 1000.0))
    if args.no_dedup:
        changes["dedup"] = None
    return apply_overrides(replace(cfg, **changes), getattr(args, "overrides", None) or [])


def _toxicity_config(tox: Any, args: argparse.Namespace) -> Any:
    """The preset's ToxicityConfig with ``--[no-]toxicity-classifier`` and ``--toxicity-threshold``."""
    from dataclasses import replace

    from kiln.data.toxicity import ToxicityConfig

    if tox is None:
        flag = "--toxicity-classifier" if args.toxicity_classifier else "--toxicity-threshold"
        if args.toxicity_threshold is None and args.toxicity_classifier is False:
            return None  # no toxicity step: the classifier is already off
        raise ValueError(f"preset {args.preset!r} has no toxicity step, so {flag} does not apply")
    if args.toxicity_classifier is True and not tox.classifier:
        tox = replace(tox, classifier=ToxicityConfig().classifier)  # the bundled model
    elif args.toxicity_classifier is False:
        tox = replace(tox, classifier=None)
    if args.toxicity_threshold is not None:
        if not tox.classifier:
            raise ValueError("--toxicity-threshold applies to the toxicity classifier, which is off "
                             "(drop --no-toxicity-classifier, or pass --toxicity-classifier)")
        tox = replace(tox, max_classifier_score=args.toxicity_threshold)
    return tox


def run_data(args: argparse.Namespace) -> int:
    from kiln.data.executors import make_executor
    from kiln.data.pipeline import run_pipeline
    from kiln.data.report import funnel_rows

    cfg = build_config(args)
    executor = make_executor(args.executor, args.workers, args.ray_address)
    scorer = None
    if cfg.quality.perplexity_model:
        from kiln.eval import kiln_lm_scorer

        scorer = kiln_lm_scorer(cfg.quality.perplexity_model, cfg.quality.perplexity_tokenizer)
    stats = run_pipeline(cfg, args.input, args.out, executor=executor, force=args.force, keep_work=args.keep_work,
                         perplexity_scorer=scorer)
    for row in funnel_rows(stats):
        print(f"{row['stage']:<32} {row['kind']:<8} {row['docs']:>10,} docs {row['bytes']:>14,} bytes")
    print(f"report: {args.out}/report.html")
    return 0


def _chunks(text: str, words: int) -> list[str]:
    ws = text.split()
    return [" ".join(ws[i : i + words]) for i in range(0, len(ws), words)] or [""]


def run_build_quality_model(args: argparse.Namespace) -> int:
    from kiln.data.quality_default import DEFAULT_MODEL, build_default_quality_classifier, fetch_gensim_wheel

    wheel = args.gensim_wheel or fetch_gensim_wheel(Path(args.cache))
    metrics = build_default_quality_classifier(wheel, args.out or DEFAULT_MODEL)
    print(json.dumps(metrics, indent=2))
    return 0


def run_train_quality(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from kiln.data.quality import QualityTrainConfig, train_quality_classifier
    from kiln.data.readers import read_documents

    def load(sources: list[str]) -> list[str]:
        texts: list[str] = []
        for doc in read_documents(sources, text_key=args.text_key):
            texts += [c for c in _chunks(doc.text, args.chunk_words) if len(c) > 50]
            if len(texts) >= args.max_docs:
                break
        return texts[: args.max_docs]

    pos, neg = load(args.positive), load(args.negative)
    n = min(len(pos), len(neg))  # balanced classes
    cfg = replace(QualityTrainConfig(), epochs=args.epochs)
    model, metrics = train_quality_classifier(pos[:n], neg[:n], cfg)
    model.save(args.out)
    print(json.dumps({"out": args.out, "positives": n, "negatives": n, **metrics}, indent=2))
    return 0


def run_presets(args: argparse.Namespace) -> int:
    from kiln.artifacts import config_to_dict
    from kiln.data.pipeline import PRESETS

    print(json.dumps({name: config_to_dict(fn()) for name, fn in PRESETS.items()}, indent=2))
    return 0
