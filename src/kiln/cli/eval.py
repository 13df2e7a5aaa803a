"""``kiln eval``: score a model on held-out text and benchmarks (see docs/eval.md)."""

from __future__ import annotations

import argparse


def _csv(s: str) -> tuple[str, ...]:
    return tuple(x.strip() for x in s.split(",") if x.strip())


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(x) for x in _csv(s))


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``eval`` subcommand."""
    from kiln.eval.stage import DEFAULT_TASKS

    p = subparsers.add_parser(
        "eval",
        help="score a model on held-out text and benchmarks",
        description="Score a model directory (save_pretrained output) on benchmarks and held-out text; "
        "writes results.json, results.md and results.png to --out.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True, help="model directory (a train run's model/)")
    p.add_argument("--out", required=True, help="eval artifact directory to write")
    p.add_argument("--tokenizer", default="", help="tokenizer.json or tokenizer artifact dir "
                   "(default: beside the model or through its manifests)")
    p.add_argument("--tasks", type=_csv, default=DEFAULT_TASKS,
                   help="comma-separated: hellaswag,arc_easy,arc_challenge,piqa,winogrande,winograd,lambada,"
                   "openbookqa,copa,boolq,commonsense_qa,siqa,mmlu,mmlu_5shot,gsm8k,math500, or the suites "
                   "all, core, mc ('' for none)")
    p.add_argument("--limit", type=int, default=None, help="at most N items per task")
    p.add_argument("--gen-limit", type=int, default=None, help="at most N problems per generative task "
                   "(gsm8k, math500; default --limit)")
    p.add_argument("--data-dir", default="", help="eval data folder (default $KILN_EVAL_DATA or ../shared/data/eval)")
    p.add_argument("--text", type=_csv, default=(), help="held-out text/jsonl files or .bin shards (comma-separated)")
    p.add_argument("--stride", type=int, default=None, help="sliding-window stride for --text (default T/2)")
    p.add_argument("--batch-size", type=int, default=16, help="rows per forward pass")
    p.add_argument("--scoring", default="auto", choices=["auto", "rows", "cache"],
                   help="multiple choice: rows (each choice with its context), cache (context once, choices "
                   "from its KV cache), auto (cache for Kiln models)")
    p.add_argument("--gen-batch-size", type=int, default=64, help="prompts decoded together (gsm8k, math500)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="auto", help="float32, bfloat16 or auto (bfloat16 on cuda)")
    p.add_argument("--max-new-tokens", type=int, default=256, help="generation budget (gsm8k, math500)")
    p.add_argument("--samples", type=int, default=0, help="sampled solutions per problem for pass@k")
    p.add_argument("--pass-k", type=_ints, default=(1,), help="k values for pass@k, comma-separated")
    p.add_argument("--contamination", type=_csv, default=(), help="token shards to check n-gram overlap against")
    p.add_argument("--ngram", type=int, default=13, help="n for the contamination check")
    p.add_argument("--force", action="store_true", help="recompute even if an identical artifact exists")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Build the EvalConfig, run the stage, print the table."""
    from pathlib import Path

    from kiln.eval.stage import EvalConfig, run_eval

    cfg = EvalConfig(
        model=args.model, tokenizer=args.tokenizer, tasks=args.tasks, data_dir=args.data_dir,
        limit=args.limit, gen_limit=args.gen_limit, scoring=args.scoring, gen_batch_size=args.gen_batch_size,
        text=args.text, stride=args.stride, batch_size=args.batch_size,
        device=args.device, dtype=args.dtype, max_new_tokens=args.max_new_tokens, samples=args.samples,
        pass_k=args.pass_k, contamination=args.contamination, ngram=args.ngram,
    )
    out = run_eval(cfg, args.out, force=args.force)
    print((Path(out) / "results.md").read_text())
    return 0
