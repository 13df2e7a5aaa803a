"""``kiln tokenizer train`` and ``kiln tokenizer inspect``."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tokenizer`` command group."""
    p = subparsers.add_parser("tokenizer", help="train or inspect a byte-level BPE tokenizer",
                              description="Train or inspect a byte-level BPE tokenizer.")
    sub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND")
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])

    fmt = argparse.ArgumentDefaultsHelpFormatter
    t = sub.add_parser("train", help="train BPE on text and write a tokenizer artifact", formatter_class=fmt,
                       description="Train a byte-level BPE tokenizer (GPT-2 style) and write OUT/tokenizer.json "
                                   "with a manifest. Reuses OUT when config and inputs are unchanged.")
    t.add_argument("--input", "-i", nargs="+", required=True, metavar="PATH",
                   help="training text: .txt/.jsonl files (field \"text\"), any file Kiln reads (.jsonl.zst, .gz, "
                        "Parquet...), globs, hf://, or a `kiln data run` / corpus artifact folder (its train files)")
    t.add_argument("--out", "-o", required=True, help="output artifact directory")
    t.add_argument("--vocab-size", type=int, default=8192, help="vocab size including the 256 bytes and special tokens")
    t.add_argument("--special-tokens", nargs="*", default=["<|endoftext|>"], metavar="TOKEN",
                   help="special tokens, never merged across (ids after the merges)")
    t.add_argument("--pattern", default="gpt2",
                   help="split pattern: gpt2, cl100k (GPT-4 style), gpt2_digits (one digit per pre-token), or a regex")
    t.add_argument("--max-doc-chars", type=int, default=None, help="truncate each .jsonl document to this many characters")
    t.add_argument("--max-bytes", type=int, default=None, help="train on about the first this-many bytes of input")
    t.add_argument("--heldout", nargs="*", default=[], metavar="PATH",
                   help="held-out files for the bytes/token statistic (default: the val split of an artifact input)")
    t.add_argument("--workers", type=int, default=0, help="parallel workers for pre-tokenization (0: all cores)")
    t.add_argument("--backend", choices=["auto", "native", "python"], default="auto",
                   help="auto: the C core when built; python: the pure-Python reference")
    t.add_argument("--force", action="store_true", help="retrain even if OUT matches")
    t.set_defaults(func=run_train)

    s = sub.add_parser("inspect", help="compression and suspicious tokens of a tokenizer", formatter_class=fmt,
                       description="Report a tokenizer's compression (bytes/token) on held-out files, its longest "
                                   "and least frequent tokens, and tokens that look like boilerplate.")
    s.add_argument("tokenizer", help="tokenizer artifact dir or tokenizer.json")
    s.add_argument("--heldout", nargs="*", default=[], metavar="PATH", help=".txt or .jsonl files to measure on")
    s.add_argument("--max-bytes", type=int, default=20_000_000, help="bytes of held-out text to encode")
    s.add_argument("--top", type=int, default=20, help="tokens to list per section")
    s.add_argument("--json", action="store_true", help="print the report as JSON")
    s.set_defaults(func=run_inspect)

    e = sub.add_parser("export", help="write a tokenizer in Hugging Face or tiktoken format", formatter_class=fmt,
                       description="Export a Kiln tokenizer to a Hugging Face tokenizer.json (byte-level BPE) "
                                   "and/or a .tiktoken mergeable-ranks file.")
    e.add_argument("tokenizer", help="tokenizer artifact dir or tokenizer.json")
    e.add_argument("--hf", default=None, metavar="PATH", help="write a Hugging Face tokenizer.json here")
    e.add_argument("--tiktoken", default=None, metavar="PATH", help="write a .tiktoken ranks file here")
    e.set_defaults(func=run_export)

    a = sub.add_parser("add-special", help="add chat (or other) special tokens to a trained tokenizer",
                       formatter_class=fmt,
                       description="Write a copy of a tokenizer with special tokens added after its largest id "
                                   "(ordinary ids unchanged). --chat adds Kiln's chat tokens (<|system|>, <|user|>, "
                                   "<|assistant|>, <|end|>) and writes tokenizer_config.json with the Hugging Face "
                                   "chat_template beside it. The model's embedding grows at `kiln sft` start.")
    a.add_argument("tokenizer", help="tokenizer artifact dir or tokenizer.json")
    a.add_argument("--out", "-o", required=True, help="output directory")
    a.add_argument("--chat", action="store_true", help="add Kiln's chat tokens")
    a.add_argument("--tokens", nargs="*", default=[], metavar="TOKEN", help="other special tokens to add")
    a.set_defaults(func=run_add_special)


def run_train(args: argparse.Namespace) -> int:
    """Build the config from ``args`` and run the stage."""
    from kiln.data.readers import read_texts
    from kiln.tokenizer.stage import TokenizerTrainConfig, train_tokenizer

    cfg = TokenizerTrainConfig(
        inputs=tuple(args.input), vocab_size=args.vocab_size, special_tokens=tuple(args.special_tokens),
        pattern=args.pattern, max_doc_chars=args.max_doc_chars, max_bytes=args.max_bytes,
        heldout=tuple(args.heldout), workers=args.workers, backend=args.backend,
    )
    out = train_tokenizer(cfg, args.out, force=args.force, progress=True, read_texts=read_texts)
    from kiln.artifacts import read_manifest

    print(json.dumps(read_manifest(out)["stats"], indent=1))
    return 0


def run_inspect(args: argparse.Namespace) -> int:
    """Print ``kiln.tokenizer.inspect.inspect_tokenizer``'s report."""
    from kiln.tokenizer.inspect import format_report, inspect_tokenizer
    from kiln.tokenizer import load_tokenizer

    report = inspect_tokenizer(load_tokenizer(args.tokenizer), args.heldout, max_bytes=args.max_bytes, top=args.top)
    print(json.dumps(report, indent=1, ensure_ascii=False) if args.json else format_report(report))
    return 0


def run_export(args: argparse.Namespace) -> int:
    """Write the requested formats."""
    from kiln.tokenizer.interop import save_hf, save_tiktoken
    from kiln.tokenizer import load_tokenizer

    if not args.hf and not args.tiktoken:
        raise ValueError("nothing to export: pass --hf PATH and/or --tiktoken PATH")
    tok = load_tokenizer(args.tokenizer)
    if args.hf:
        print(f"wrote {save_hf(tok, args.hf)}")
    if args.tiktoken:
        print(f"wrote {save_tiktoken(tok, args.tiktoken)} (special tokens: {tok.special_tokens})")
    return 0


def run_add_special(args: argparse.Namespace) -> int:
    """Add the tokens and write OUT/tokenizer.json (+ the Hugging Face files with --chat)."""
    from pathlib import Path

    from kiln.align.chat import add_chat_tokens, save_hf_tokenizer
    from kiln.tokenizer.tokenizer import Tokenizer

    if not args.chat and not args.tokens:
        raise ValueError("nothing to add: pass --chat and/or --tokens TOKEN ...")
    tok = Tokenizer.load(args.tokenizer)
    if args.tokens:
        specials = sorted(tok.special_tokens, key=tok.special_tokens.__getitem__)
        specials += [t for t in args.tokens if t not in tok.special_tokens]
        tok = Tokenizer(tok.vocab, tok.merges, specials, pattern=tok.pattern)
    if args.chat:
        tok = add_chat_tokens(tok)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    hf = out / "hf"
    save_hf_tokenizer(tok, hf)
    print(f"wrote {out / 'tokenizer.json'} and {hf}/ (Hugging Face files); special tokens: {tok.special_tokens}")
    return 0
