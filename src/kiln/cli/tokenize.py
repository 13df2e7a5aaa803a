"""`kiln tokenize`: a corpus (or any documents) -> token shards (stage ``"tokens"``)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``tokenize`` subcommand."""
    p = subparsers.add_parser(
        "tokenize",
        help="encode a corpus into token shards (train_00000.bin, val_00000.bin, ...)",
        description=(
            "Encode the documents of a `kiln data run` or corpus artifact (train_XXXXX.jsonl.zst, val_XXXXX..., "
            "found through its manifest) with a Kiln tokenizer "
            "into binary token shards, in parallel over cores, each document followed by <|endoftext|>. "
            "The output folder is an artifact: rerunning with the same inputs and options reuses it."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--corpus", default="",
                   help="`kiln data run` or corpus artifact folder (or any folder of train*/val* files)")
    p.add_argument("--train", nargs="+", default=[], metavar="SOURCE",
                   help="instead of --corpus: train sources (files, folders, globs, URLs, hf://; an artifact "
                        "folder gives its train split)")
    p.add_argument("--val", nargs="+", default=[], metavar="SOURCE",
                   help="instead of --corpus: validation sources (an artifact folder gives its val split)")
    p.add_argument("--tokenizer", required=True, help="tokenizer.json or tokenizer artifact folder")
    p.add_argument("--out", required=True, help="output folder for the token shards")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file")
    p.add_argument("--workers", type=int, default=0, help="encoding processes (0 = all cores)")
    p.add_argument("--text-key", default="text", help="field holding the text in JSON/Parquet/HF records")
    p.add_argument("--no-eot", action="store_true",
                   help="do not append <|endoftext|> after each document (breaks doc-aligned loading)")
    p.add_argument("--force", action="store_true", help="recompute even if a matching artifact exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the TokenizeConfig from the arguments, run the stage, print its stats."""
    from kiln.artifacts import read_manifest
    from kiln.shards.tokenize import TokenizeConfig, tokenize_corpus

    cfg = TokenizeConfig(
        corpus=args.corpus, tokenizer=args.tokenizer, train=tuple(args.train), val=tuple(args.val),
        text_key=args.text_key, shard_tokens=args.shard_tokens, num_workers=args.workers,
        append_eot=not args.no_eot,
    )
    out = tokenize_corpus(cfg, args.out, force=args.force)
    stats = read_manifest(out, "tokens")["stats"]
    for split in ("train", "val"):
        if split in stats:
            s = stats[split]
            print(f"{split}: {s['tokens']:,} tokens, {s['docs']:,} docs, {s['shards']} shards, "
                  f"{s['bytes_per_token']:.3f} bytes/token")
    if stats.get("errors"):
        print("read errors:", json.dumps(stats["errors"]))
    print(f"wrote {out}")
    return 0
