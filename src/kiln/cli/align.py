"""``kiln sft``, ``kiln dpo``, ``kiln grpo``: parse, build the stage's config, call ``kiln.align``."""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

_STAGES = {
    "sft": ("kiln.align.sft", "SFTConfig", "run_sft",
            "Supervised fine-tuning on conversations (loss on assistant tokens only, packed rows with a "
            "document-aware mask). Writes OUT/model (a chat model with its template) and a manifest."),
    "dpo": ("kiln.align.dpo", "DPOConfig", "run_dpo",
            "Direct preference optimization against a frozen reference whose log-probs are computed once "
            "and cached (OUT/reference). Logs reward margins and held-out preference accuracy."),
    "grpo": ("kiln.align.grpo", "GRPOConfig", "run_grpo",
             "GRPO with verifiable rewards: rollouts through the engine, group-normalized advantages, the "
             "clipped surrogate, optional KL to the reference. Task: the seeded addition task or a "
             "{question, answer} JSONL (GSM8K layout)."),
}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``sft``, ``dpo`` and ``grpo``."""
    fmt = argparse.ArgumentDefaultsHelpFormatter
    for name, (_, _, _, desc) in _STAGES.items():
        p = subparsers.add_parser(name, help=desc.split(" (")[0].split(". ")[0], description=desc, formatter_class=fmt)
        p.add_argument("model", help="base model folder (a train run's model/ or its run directory)")
        p.add_argument("--out", "-o", required=True, help="run directory (resumed when it holds checkpoints)")
        if name != "grpo":
            p.add_argument("--data", nargs="+", required=True, metavar="SRC",
                           help="files (.jsonl[.gz], .json, .parquet) or hf:NAME[:SPLIT]")
            p.add_argument("--heldout", nargs="*", default=[], metavar="SRC", help="held-out files (default: a share of --data)")
        else:
            p.add_argument("--task", default="addition", help="'addition' or a {question, answer} .jsonl")
        p.add_argument("--tokenizer", default=None, help="tokenizer file or folder (default: the model folder's)")
        p.add_argument("--add-chat-tokens", action="store_true", help="add the chat tokens when the tokenizer lacks them")
        p.add_argument("--max-steps", type=int, default=0, help="optimizer steps (0: from epochs / rollouts)")
        p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                       help="config fields, e.g. beta=0.2 epochs=2 train.lr=1e-5 train.batch_size=16 train.device=cuda")
        p.add_argument("--no-resume", action="store_true", help="start over instead of resuming OUT")
        p.add_argument("--time-limit", default=None, help="pause (checkpoint, exit 75) after this long, e.g. 3h50m")
        p.set_defaults(func=run, stage=name)

    r = subparsers.add_parser("recipe", help="multi-stage recipes (chat: SFT -> DPO -> GRPO -> report)",
                              description="Multi-stage recipes.")
    rsub = r.add_subparsers(dest="recipe", metavar="RECIPE")
    r.set_defaults(func=lambda args: (r.print_help(), 2)[1])
    c = rsub.add_parser("chat", formatter_class=fmt, help="base model -> SFT -> DPO -> GRPO -> report.md",
                        description="Chain SFT on the shared conversation sets, DPO on the shared preference pairs, "
                                    "GRPO on the addition task and GSM8K, and GSM8K before/after; one report.md. "
                                    "Without --base, pretrain first with the demo pipeline.")
    c.add_argument("--preset", choices=["gpu", "cpu"], default="gpu", help="stage sizes (kiln.align.recipe)")
    c.add_argument("--base", default=None, help="base model folder (default: pretrain one first)")
    c.add_argument("--out", "-o", default=None, help="output folder (default: the preset's, runs/chat)")
    c.add_argument("--shared", default=None, help="the shared data folder (default ../shared/data)")
    c.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", dest="overrides",
                   help="recipe fields (sft_steps=500, device=cuda) and stage fields (sft.epochs=2, dpo.beta=0.2)")
    c.set_defaults(func=run_recipe)


def build_config(args: argparse.Namespace) -> Any:
    """The stage config of ``args`` (defaults, then the flags, then ``--set``)."""
    import importlib

    from kiln.align.stage import apply_stage_overrides

    module, cls_name, _, _ = _STAGES[args.stage]
    cls = getattr(importlib.import_module(module), cls_name)
    base = cls()
    kw: dict[str, Any] = {"add_chat_tokens": args.add_chat_tokens, "max_steps": args.max_steps}
    if args.stage == "grpo":
        kw["task"] = args.task
    else:
        kw["data"], kw["heldout"] = tuple(args.data), tuple(args.heldout)
    return apply_stage_overrides(dataclasses.replace(base, **kw), args.overrides)


def run(args: argparse.Namespace) -> int:
    """Run the stage; exit 75 when paused (the same command resumes)."""
    import importlib

    from kiln.artifacts import read_manifest
    from kiln.train.stop import PAUSED_EXIT_CODE, StopRequest, parse_duration

    module, _, fn_name, _ = _STAGES[args.stage]
    cfg = build_config(args)
    stop = StopRequest(parse_duration(args.time_limit) if args.time_limit else None)
    with stop.signals_handled():
        out = getattr(importlib.import_module(module), fn_name)(cfg, args.model, args.out, tokenizer=args.tokenizer,
                                                                 resume=not args.no_resume, stop=stop)
    if stop.paused:
        print(f"paused at step {stop.paused_at}; run the same command to resume")
        return PAUSED_EXIT_CODE
    stats = read_manifest(out)["stats"]
    print(json.dumps({k: v for k, v in stats.items() if k != "read"}, indent=1, default=str))
    print(f"model: {out / 'model'}")
    return 0


def run_recipe(args: argparse.Namespace) -> int:
    """Build the recipe config (``kiln.align.recipe.recipe_config``) and run it, pretraining a base
    model first if none."""
    from kiln.align.recipe import recipe_config, run_chat_recipe

    cfg = recipe_config(args.preset, args.overrides, base=args.base, out=args.out, shared=args.shared)
    base = cfg.base
    if not base:  # pretrain first with the demo pipeline (corpus, tokenizer, the preset)
        from kiln.demo import DemoConfig, run_demo

        run_demo(DemoConfig(data=cfg.pretrain_data, out=f"{cfg.out}/pretrain", preset=cfg.preset,
                            max_steps=cfg.pretrain_steps, seed=cfg.seed, device=cfg.device, chat_steps=0))
        base = f"{cfg.out}/pretrain/train/model"
    run_chat_recipe(dataclasses.replace(cfg, base=base))
    return 0
