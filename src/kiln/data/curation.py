"""What one shard of the curation pipeline goes through: the config, one class per step, the presets.

Each step is a small class that owns its (frozen) config and its keep/drop decision (a
:class:`~kiln.data.steps.Filter` returns a drop reason or None; a :class:`~kiln.data.steps.Map`
changes the text and drops nothing), the datatrove way. ``STEPS`` lists them in run order; each
class's ``build(cfg)`` returns the configured step, or None when ``cfg`` turns it off.

Adding a filter touches this file only: a field in :class:`PipelineConfig` holding its config
(None: off), a class with ``name``, ``decide`` and ``build``, and its place in ``STEPS``. Its drop
reasons then appear in the funnel, ``stats.json`` and ``report.html``, and ``kiln data run --set
<field>.<key>=<value>`` sets its knobs.
"""

from __future__ import annotations

import dataclasses
import difflib
import logging
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kiln.data.books import strip_gutenberg
from kiln.data.dedup import DedupConfig, MinHashConfig
from kiln.data.document import Document
from kiln.data.extract import ExtractConfig, extract_text
from kiln.data.filters import (
    C4Config,
    GopherQualityConfig,
    GopherRepetitionConfig,
    c4_clean,
    gopher_quality,
    gopher_repetition,
)
from kiln.data.langid import LangIdConfig, LanguageIdentifier
from kiln.data.pii import PIIConfig, mask_pii
from kiln.data.quality import QualityConfig
from kiln.data.steps import BYTES_IN, Filter, Map, Stats, Step
from kiln.data.toxicity import ToxicityConfig, toxicity_filter

log = logging.getLogger(__name__)

OUTPUT_FORMATS = ("jsonl.zst", "parquet")


@dataclass(frozen=True)
class PipelineConfig:
    """The whole curation pipeline; a None sub-config disables that step."""

    name: str = "custom"
    """Preset name (recorded in the manifest and the report)."""
    text_key: str = "text"
    """Field holding the text in JSON/Parquet inputs."""
    max_bytes: int = 5_000_000
    """Documents larger than this (UTF-8 bytes) are dropped as ``too_large``."""
    max_bad_char_frac: float = 0.05
    """Drop as ``binary_or_bad_encoding`` when NULs or U+FFFD exceed this share of characters."""
    strip_gutenberg: bool = False
    """Remove Project Gutenberg headers and footers first."""
    extract: ExtractConfig | None = field(default_factory=ExtractConfig)
    """HTML -> text for documents read as HTML (WARC responses, .html files)."""
    langid: LangIdConfig | None = field(default_factory=LangIdConfig)
    """Language ID and filter."""
    gopher_repetition: GopherRepetitionConfig | None = field(default_factory=GopherRepetitionConfig)
    """Gopher repetition rules."""
    gopher_quality: GopherQualityConfig | None = field(default_factory=GopherQualityConfig)
    """Gopher quality rules."""
    c4: C4Config | None = field(default_factory=lambda: C4Config(require_terminal_punct=False))
    """C4 rules (line clean-up off by default, as FineWeb does)."""
    quality: QualityConfig = field(default_factory=QualityConfig)
    """Model-based filters (classifier, perplexity); off unless a model is given."""
    toxicity: ToxicityConfig | None = field(default_factory=ToxicityConfig)
    """Toxicity / NSFW filter."""
    pii: PIIConfig | None = field(default_factory=PIIConfig)
    """PII masking."""
    dedup: DedupConfig | None = field(default_factory=DedupConfig)
    """Exact, MinHash and line-level dedup across all shards."""
    keep_dropped_fraction: float = 0.0
    """Keep this share of documents a filter dropped (tagged ``kept_despite``), to audit the filters."""
    val_fraction: float = 0.0
    """Share of kept documents (by id hash) written to ``val_XXXXX.jsonl.zst`` instead of train."""
    output_format: str = "jsonl.zst"
    """``jsonl.zst`` (one JSON object a line: id, text, metadata fields) or ``parquet`` (columns id,
    text, metadata as a JSON string); ``kiln tokenize --corpus <out>`` reads either."""
    zstd_level: int = 3
    """Compression level of the output shards."""
    workers: int = 0
    """Processes for the local executor (0 = all cores)."""
    report: bool = True
    """Write report.html and funnel.png."""

    def __post_init__(self) -> None:
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"val_fraction={self.val_fraction} must be in [0, 1)")
        if not 0.0 <= self.keep_dropped_fraction <= 1.0:
            raise ValueError(f"keep_dropped_fraction={self.keep_dropped_fraction} must be in [0, 1]")
        if self.max_bytes <= 0:
            raise ValueError(f"max_bytes={self.max_bytes} must be positive")
        if self.output_format not in OUTPUT_FORMATS:
            raise ValueError(f"output_format={self.output_format!r}; pick one of {', '.join(OUTPUT_FORMATS)}")


def web_en() -> PipelineConfig:
    """FineWeb/Gopher-like English web text: extraction, English >= 0.65, Gopher, C4, toxicity
    (word list + classifier), PII masking, exact + MinHash dedup (5-grams, 20x6 bands, J >= 0.8) and
    line dedup: lines of >= 10 characters found in >= 20 surviving documents (cookie banners, site
    menus and footers that extraction left; CCNet-style paragraph dedup, arXiv:1911.00359, at a
    threshold that spares quotes and boilerplate-like sentences shared by a few pages)."""
    return PipelineConfig(name="web_en", dedup=DedupConfig(line_min_docs=20))


def books() -> PipelineConfig:
    """Books (e.g. Project Gutenberg): strip headers, English, a loose quality check sized for whole
    books, PII masking, exact + MinHash dedup. No extraction, no C4 (dialogue lacks punctuation
    rules' assumptions), no repetition rules (poetry and refrains repeat by design)."""
    return PipelineConfig(
        name="books",
        strip_gutenberg=True,
        max_bytes=50_000_000,
        extract=None,
        langid=LangIdConfig(languages=("en",), min_score=0.5),
        gopher_repetition=None,
        gopher_quality=GopherQualityConfig(max_words=10_000_000, max_bullet_lines_ratio=0.95),
        c4=None,
        toxicity=None,
        dedup=DedupConfig(exact=True, minhash=MinHashConfig(), line_min_docs=0),
    )


def minimal() -> PipelineConfig:
    """Only size/encoding checks and exact dedup (a fast pass over text that is already clean)."""
    return PipelineConfig(
        name="minimal", extract=ExtractConfig(method="resiliparse"), langid=None, gopher_repetition=None,
        gopher_quality=None, c4=None, toxicity=None, pii=None, dedup=DedupConfig(exact=True, minhash=None),
    )


PRESETS = {"web_en": web_en, "books": books, "minimal": minimal}


# ---- the steps, in run order -----------------------------------------------------------------------


@dataclass(frozen=True)
class SizeConfig:
    """Size and encoding checks (every preset runs them)."""

    max_bytes: int = 5_000_000
    """Documents larger than this (UTF-8 bytes at input) are dropped as ``too_large``."""
    max_bad_char_frac: float = 0.05
    """NULs and U+FFFD above this share of the first 20,000 characters: ``binary_or_bad_encoding``."""


class SizeFilter(Filter):
    """``empty``, ``too_large``, ``binary_or_bad_encoding``."""

    name = "size"

    def __init__(self, cfg: SizeConfig) -> None:
        self.cfg = cfg

    @classmethod
    def build(cls, cfg: PipelineConfig) -> SizeFilter:
        return cls(SizeConfig(cfg.max_bytes, cfg.max_bad_char_frac))

    def decide(self, doc: Document) -> str | None:
        if not doc.text.strip():
            return "empty"
        if doc.metadata.get(BYTES_IN, 0) > self.cfg.max_bytes or len(doc.text) > self.cfg.max_bytes:
            return "too_large"
        head = doc.text[:20_000]
        if (head.count("\x00") + head.count("\ufffd")) > self.cfg.max_bad_char_frac * len(head):
            return "binary_or_bad_encoding"
        return None


class GutenbergStrip(Map):
    """Project Gutenberg headers, credits, footers and license removed (:func:`kiln.data.books.strip_gutenberg`)."""

    name = "gutenberg"

    @classmethod
    def build(cls, cfg: PipelineConfig) -> GutenbergStrip | None:
        return cls() if cfg.strip_gutenberg else None

    def apply(self, doc: Document) -> Document:
        doc.text = strip_gutenberg(doc.text)
        return doc


class ExtractFilter(Filter):
    """HTML documents -> main text: ``extract_empty``, ``extract_error`` (a parser raised; counted,
    never fatal). Documents that are already text pass untouched."""

    name = "extract"

    def __init__(self, cfg: ExtractConfig) -> None:
        self.cfg = cfg

    @classmethod
    def build(cls, cfg: PipelineConfig) -> Step:
        return cls(cfg.extract) if cfg.extract is not None else HtmlWithoutExtract()

    def decide(self, doc: Document) -> str | None:
        if doc.metadata.get("format") != "html":
            return None
        try:
            doc.text = extract_text(doc.text, doc.metadata.get("url"), self.cfg)
        except ImportError:
            raise
        except Exception as e:  # noqa: BLE001 - a page the parsers choke on is a counted drop, never fatal
            log.debug("extraction failed on %s: %s", doc.id, e)
            return "extract_error"
        doc.metadata["format"] = "text"
        return None if doc.text.strip() else "extract_empty"


class HtmlWithoutExtract(Filter):
    """Without an extraction step, HTML documents are dropped as ``html_not_extracted``."""

    name = "html_without_extract"

    def decide(self, doc: Document) -> str | None:
        return "html_not_extracted" if doc.metadata.get("format") == "html" else None


class LanguageFilter(Filter):
    """Language ID (``metadata["language"]``, ``["language_score"]``): ``langid_other_language``,
    ``langid_low_score``."""

    name = "langid"

    def __init__(self, cfg: LangIdConfig, keep_dropped_fraction: float = 0.0) -> None:
        self.cfg = cfg
        self.keep_dropped_fraction = keep_dropped_fraction
        self.ident = LanguageIdentifier.from_config(cfg)
        self.keep = frozenset(cfg.languages)

    @classmethod
    def build(cls, cfg: PipelineConfig) -> LanguageFilter | None:
        return cls(cfg.langid, cfg.keep_dropped_fraction) if cfg.langid is not None else None

    def decide(self, doc: Document) -> str | None:
        code, score = self.ident.identify(doc.text)
        doc.metadata["language"] = code
        doc.metadata["language_score"] = round(score, 4)
        if self.keep and code not in self.keep:
            return "langid_other_language"
        return "langid_low_score" if score < self.cfg.min_score else None


class GopherRepetitionFilter(Filter):
    """Gopher's repetition rules (``gopher_dup_5gram``...; :func:`kiln.data.filters.gopher_repetition`)."""

    name = "gopher_repetition"

    def __init__(self, cfg: GopherRepetitionConfig, keep_dropped_fraction: float = 0.0) -> None:
        self.cfg = cfg
        self.keep_dropped_fraction = keep_dropped_fraction

    @classmethod
    def build(cls, cfg: PipelineConfig) -> GopherRepetitionFilter | None:
        return cls(cfg.gopher_repetition, cfg.keep_dropped_fraction) if cfg.gopher_repetition else None

    def decide(self, doc: Document) -> str | None:
        return gopher_repetition(doc.text, self.cfg)


class GopherQualityFilter(Filter):
    """Gopher's quality rules (``gopher_short_doc``, ``gopher_stop_words``...)."""

    name = "gopher_quality"

    def __init__(self, cfg: GopherQualityConfig, keep_dropped_fraction: float = 0.0) -> None:
        self.cfg = cfg
        self.keep_dropped_fraction = keep_dropped_fraction

    @classmethod
    def build(cls, cfg: PipelineConfig) -> GopherQualityFilter | None:
        return cls(cfg.gopher_quality, cfg.keep_dropped_fraction) if cfg.gopher_quality else None

    def decide(self, doc: Document) -> str | None:
        return gopher_quality(doc.text, self.cfg)


class C4Filter(Filter):
    """C4's rules: removes lines (counted ``c4_lines_removed``) and drops (``c4_curly_bracket``...)."""

    name = "c4"

    def __init__(self, cfg: C4Config, keep_dropped_fraction: float = 0.0) -> None:
        self.cfg = cfg
        self.keep_dropped_fraction = keep_dropped_fraction

    @classmethod
    def build(cls, cfg: PipelineConfig) -> C4Filter | None:
        return cls(cfg.c4, cfg.keep_dropped_fraction) if cfg.c4 is not None else None

    def decide(self, doc: Document) -> str | None:
        text, reason, removed = c4_clean(doc.text, self.cfg)
        if removed:
            self.count("c4_lines_removed", removed)
        doc.text = text
        return reason


class QualityClassifierFilter(Filter):
    """A model from ``kiln data train-quality``, or ``"default"`` (the shipped classifier):
    ``quality_classifier`` below the minimum score."""

    name = "quality_classifier"

    def __init__(self, cfg: QualityConfig, keep_dropped_fraction: float = 0.0) -> None:
        from kiln.data.quality import load_quality_classifier

        self.cfg = cfg
        self.keep_dropped_fraction = keep_dropped_fraction
        self.clf = load_quality_classifier(cfg.classifier)

    @classmethod
    def build(cls, cfg: PipelineConfig) -> QualityClassifierFilter | None:
        return cls(cfg.quality, cfg.keep_dropped_fraction) if cfg.quality.classifier else None

    def decide(self, doc: Document) -> str | None:
        s = self.clf.score(doc.text)
        doc.metadata["quality_score"] = round(s, 4)
        return "quality_classifier" if s < self.cfg.min_classifier_score else None


class PerplexityFilter(Filter):
    """A small language model's perplexity (``metadata["perplexity"]``): ``perplexity`` above the maximum."""

    name = "perplexity"

    def __init__(self, cfg: QualityConfig, scorer: Callable[[str], float], keep_dropped_fraction: float = 0.0) -> None:
        from kiln.data.quality import perplexity_filter

        self.cfg = cfg
        self.keep_dropped_fraction = keep_dropped_fraction
        self.pf = perplexity_filter(scorer, cfg.max_perplexity)

    @classmethod
    def build(cls, cfg: PipelineConfig, perplexity_scorer: Callable[[str], float] | None = None) -> PerplexityFilter | None:
        """The data stage never builds a model (imports flow one way): the caller passes the scorer,
        ``kiln.eval.kiln_lm_scorer(model_dir, tokenizer_json)`` (``kiln data run --perplexity-model``)."""
        if not cfg.quality.perplexity_model:
            return None
        if perplexity_scorer is None:
            raise ValueError("quality.perplexity_model is set but no scorer was passed: call run_pipeline(..., "
                             "perplexity_scorer=kiln.eval.kiln_lm_scorer(model_dir, tokenizer_json)) (kiln data run "
                             "--perplexity-model does this)")
        return cls(cfg.quality, perplexity_scorer, cfg.keep_dropped_fraction)

    def decide(self, doc: Document) -> str | None:
        reason, value = self.pf(doc.text)
        doc.metadata["perplexity"] = round(value, 2)
        return reason


class ToxicityFilter(Filter):
    """``toxic_url``, ``toxic_words``, ``toxic_classifier``; the scores go into the metadata."""

    name = "toxicity"

    def __init__(self, cfg: ToxicityConfig, keep_dropped_fraction: float = 0.0) -> None:
        self.cfg = cfg
        self.keep_dropped_fraction = keep_dropped_fraction
        self.tox = toxicity_filter(cfg)

    @classmethod
    def build(cls, cfg: PipelineConfig) -> ToxicityFilter | None:
        return cls(cfg.toxicity, cfg.keep_dropped_fraction) if cfg.toxicity is not None else None

    def decide(self, doc: Document) -> str | None:
        reason, scores = self.tox(doc.text, doc.metadata.get("url"))
        for name, value in scores.items():
            doc.metadata[name] = round(value, 4)
        return reason


class PIIMask(Map):
    """E-mail addresses, phone numbers and IPs replaced by ``<EMAIL>``, ``<PHONE>``, ``<IP>`` (counted)."""

    name = "pii"

    def __init__(self, cfg: PIIConfig) -> None:
        self.cfg = cfg

    @classmethod
    def build(cls, cfg: PipelineConfig) -> PIIMask | None:
        return cls(cfg.pii) if cfg.pii is not None else None

    def apply(self, doc: Document) -> Document:
        doc.text, counts = mask_pii(doc.text, self.cfg)
        for key, n in counts.items():
            self.count(key, n)
        return doc


STEPS = (
    SizeFilter, GutenbergStrip, ExtractFilter, LanguageFilter, GopherRepetitionFilter, GopherQualityFilter,
    C4Filter, QualityClassifierFilter, PerplexityFilter, ToxicityFilter, PIIMask,
)
"""The per-shard steps in run order; each ``build(cfg)`` returns the step or None (off)."""


def build_steps(
    cfg: PipelineConfig, stats: Stats | None = None, perplexity_scorer: Callable[[str], float] | None = None,
) -> list[Step]:
    """The per-shard steps of ``cfg``, in order. (``stats`` is accepted for the old signature; steps
    count into the Stats that :func:`~kiln.data.steps.run_steps` passes them.) ``perplexity_scorer``
    (``text -> perplexity``) serves ``cfg.quality.perplexity_model``."""
    steps = []
    for cls in STEPS:
        step = cls.build(cfg, perplexity_scorer) if cls is PerplexityFilter else cls.build(cfg)
        if step is not None:
            steps.append(step)
    return steps


# ---- key=value overrides (``kiln data run --set``) ---------------------------------------------------


def apply_overrides(cfg: PipelineConfig, overrides: list[str]) -> PipelineConfig:
    """Apply ``key=value`` strings to a config, as ``kiln train --set`` does, with dotted keys into
    the sub-configs: ``langid.min_score=0.5``, ``dedup.minhash.threshold=0.7``, ``langid.languages=de,fr``,
    ``toxicity=none`` (turns a step off). Values are converted to the field's type. Setting a key
    of a step the config turns off turns it on from that step's defaults. Unknown keys raise a
    ValueError naming the closest known keys; all keys are applied together, then validated."""
    tree: dict[str, Any] = {}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value, e.g. langid.min_score=0.5 or dedup.minhash.threshold=0.7")
        key, raw = (x.strip() for x in item.split("=", 1))
        node = tree
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--set {key}: {part} is set to a value and used as a group at once")
        node[parts[-1]] = raw
    return _apply(cfg, tree, "") if tree else cfg


def config_keys(cls: type = PipelineConfig, prefix: str = "") -> list[str]:
    """Every dotted key ``--set`` accepts for a config class (sub-configs expanded)."""
    hints = typing.get_type_hints(cls)
    keys: list[str] = []
    for f in dataclasses.fields(cls):
        sub = _dataclass_in(hints[f.name])
        keys += config_keys(sub, f"{prefix}{f.name}.") if sub is not None else [prefix + f.name]
    return keys


def _dataclass_in(hint: Any) -> type | None:
    """The dataclass a field's type names (``X`` or ``X | None``), else None."""
    for t in (hint, *typing.get_args(hint)):
        if isinstance(t, type) and dataclasses.is_dataclass(t):
            return t
    return None


def _apply(obj: Any, tree: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    changes: dict[str, Any] = {}
    for name, value in tree.items():
        key = prefix + name
        if name not in names:
            known = config_keys()
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known keys: {', '.join(known)}"
            raise ValueError(f"--set {key}: unknown config key{hint}")
        current, sub = getattr(obj, name), _dataclass_in(hints[name])
        if isinstance(value, dict):
            if sub is None:
                raise ValueError(f"--set {key}.{next(iter(value))}: {key} is a value, not a group of settings")
            changes[name] = _apply(current if current is not None else sub(), value, key + ".")
        elif sub is not None:
            if value.lower() != "none":
                raise ValueError(f"--set {key}={value}: {key} is a group; set its keys ({key}.<name>=...) "
                                 f"or {key}=none to turn that step off")
            changes[name] = None
        else:
            changes[name] = _parse_value(value, current, hints[name], key)
    return dataclasses.replace(obj, **changes)


def _parse_value(raw: str, current: Any, hint: Any, key: str) -> Any:
    """``raw`` as the type of ``current`` (or of the field's annotation when it is None)."""
    options = typing.get_args(hint) or (hint,)
    if raw.lower() == "none" and type(None) in options:
        return None
    kind = type(current) if current is not None else next(
        (t for t in options if t in (bool, int, float, str, tuple)), str)
    try:
        if kind is bool:
            low = raw.lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError
        if kind is int:
            f = float(raw.replace("_", ""))  # accepts 1e6 and 1_000
            if not f.is_integer():
                raise ValueError
            return int(f)
        if kind is float:
            return float(raw)
        if kind is tuple:
            elem = type(current[0]) if current else str
            return tuple(elem(v.strip()) for v in raw.split(",") if v.strip())
    except ValueError:
        raise ValueError(f"--set {key}={raw}: expected a {kind.__name__}"
                         f"{f' like {current!r}' if current is not None else ''}") from None
    return raw
