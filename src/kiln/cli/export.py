"""``kiln export``: a training checkpoint to a Hugging Face model folder (see docs/train.md#export)."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``export`` subcommand."""
    p = subparsers.add_parser(
        "export",
        help="make a checkpoint a Hugging Face model folder",
        description="Write config.json, model.safetensors and the tokenizer files (Hugging Face's and Kiln's) "
        "for a training checkpoint (run/checkpoints/step_N), a run folder (its newest checkpoint) or an older "
        "model folder, so AutoModelForCausalLM, AutoTokenizer, lm-eval --model hf and kiln generate open it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="run/checkpoints/step_N, a run folder or a model folder")
    p.add_argument("out", metavar="OUT", help="model folder to write (an earlier export there is replaced)")
    p.add_argument("--tokenizer", default=None, metavar="PATH",
                   help="tokenizer file or folder (default: found from CHECKPOINT through the run's manifests)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="weights dtype (default: as stored)")
    p.add_argument("--chat-template", default=None, metavar="FILE",
                   help="a Jinja chat template file to write into tokenizer_config.json")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Export and say where."""
    from kiln.train.export import export_checkpoint

    template = Path(args.chat_template).read_text(encoding="utf-8") if args.chat_template else None
    out = export_checkpoint(args.checkpoint, args.out, tokenizer=args.tokenizer, dtype=args.dtype,
                            chat_template=template)
    print(f"kiln export: wrote {out}")
    return 0
