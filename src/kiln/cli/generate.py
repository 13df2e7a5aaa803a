"""``kiln generate``: stream a trained model's continuation of a prompt to stdout (docs/generate.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.cli.serve import processing_args


def _processing(args: argparse.Namespace) -> dict:
    """The logits-processing flags as ``SamplingParams`` fields."""
    return {"repetition_penalty": args.repetition_penalty, "presence_penalty": args.presence_penalty,
            "frequency_penalty": args.frequency_penalty, "min_p": args.min_p, "min_tokens": args.min_tokens}


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``generate`` subcommand."""
    p = subparsers.add_parser(
        "generate",
        help="sample text from a trained model",
        description="Continue --prompt with a trained model, streaming the text to stdout as it decodes "
        "(the engine: paged KV cache, continuous batching for --prompts-file; temperature, top-k and top-p "
        "sampling; stops at end-of-text).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--model", required=True,
                   help="a train run directory (its model/ is used) or a model directory written by "
                   "save_pretrained (config.json + model.safetensors, Hugging Face Llama layout)")
    p.add_argument("--tokenizer", default="",
                   help="tokenizer.json or tokenizer artifact dir (default: beside the model or found "
                   "through the run's manifests)")
    p.add_argument("--prompt", default="", help="text to continue ('' starts from the end-of-text token)")
    p.add_argument("--prompts-file", default=None, metavar="PATH",
                   help="continue every line of this text file instead (batched decoding; one JSON line "
                   "{\"prompt\", \"completion\"} per prompt on stdout, in order)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts decoded together with --prompts-file")
    p.add_argument("--max-new-tokens", type=int, default=200, help="most tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="softmax temperature; 0 is greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling: smallest set with this mass")
    p.add_argument("--seed", type=int, default=None, help="random seed (same seed, same text on one device)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda if available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weight dtype; auto: bf16 on cuda, as stored on cpu")
    p.add_argument("--attention", default=None, choices=["kiln", "sdpa", "triton"],
                   help="attention kernel (default: the one the model was saved with)")
    p.add_argument("--quantize", default="none", choices=["none", "int8", "int4"],
                   help="weight-only quantization of the loaded model (kiln.model.quantize; int4: groups of 128)")
    p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="stack each layer's q/k/v and gate/up weights into one matrix each, before --quantize "
                        "(kiln.model.fuse_projections: 4 matrix products a layer instead of 7, the same outputs)")
    p.add_argument("--compile", action="store_true",
                   help="CUDA: capture CUDA graphs and torch.compile the decode step (gpt-fast's mode: about a "
                        "minute of compilation, then the fastest batch-1 decode; greedy runs 8 tokens per graph)")
    p.add_argument("--speculative", default="none", choices=["none", "ngram"],
                   help="prompt-lookup speculative decoding for --prompt with --temperature 0 (same text, "
                   "fewer forward passes when the output repeats the context)")
    processing_args(p)
    p.add_argument("--no-echo", action="store_true", help="print only the continuation, not the prompt")
    p.add_argument("--keep-eot", action="store_true", help="do not stop at the end-of-text token")
    p.set_defaults(func=run)


def resolve_model_dir(path: str | Path) -> Path:
    """The model directory for ``path``: itself if it holds config.json, else its ``model/``."""
    d = Path(path)
    if (d / "config.json").is_file():
        return d
    if (d / "model" / "config.json").is_file():
        return d / "model"
    if not d.exists():
        raise FileNotFoundError(f"--model {d} does not exist; pass a train run directory or an exported model")
    raise FileNotFoundError(
        f"--model {d} has neither config.json nor model/config.json; pass a finished train run directory "
        "(training writes model/ at the end) or a directory written by save_pretrained"
    )


def run(args: argparse.Namespace) -> int:
    """Load the model and tokenizer, then stream the continuation to stdout."""
    import time

    import torch

    from kiln.generate import SamplingParams, stream
    from kiln.model import load_pretrained
    from kiln.tokenizer import find_tokenizer, load_tokenizer

    SamplingParams(max_tokens=max(0, args.max_new_tokens), **_processing(args))  # bad values fail before loading
    model_dir = resolve_model_dir(args.model)
    tok_path = Path(args.tokenizer) if args.tokenizer else find_tokenizer(model_dir)
    if not tok_path.exists():
        raise FileNotFoundError(f"--tokenizer {tok_path} does not exist; pass a tokenizer.json or tokenizer artifact")
    from kiln.distributed import pick_device

    device = str(pick_device(args.device))
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}.get(args.dtype)
    if args.dtype == "auto" and torch.device(device).type == "cuda":
        dtype = torch.bfloat16
    tokenizer = load_tokenizer(tok_path)
    model = load_pretrained(model_dir, device=device, dtype=dtype, attention_impl=args.attention)
    if args.fuse_projections:  # before quantizing: the fused matrices are quantized whole
        from kiln.model import fuse_projections

        fuse_projections(model)
    if args.quantize != "none":
        from kiln.model import quantize_model

        model = quantize_model(model, args.quantize)
    if args.prompts_file:
        return _run_batch(args, model, tokenizer, device)
    if not args.no_echo:
        sys.stdout.write(args.prompt)
        sys.stdout.flush()
    t0 = time.perf_counter()
    n_chars = 0
    for piece in stream(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                        temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                        stop_at_eot=not args.keep_eot, speculative=args.speculative, compile=args.compile,
                        **_processing(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
        n_chars += len(piece)
    sys.stdout.write("\n")
    dt = time.perf_counter() - t0
    print(f"[{n_chars} characters in {dt:.2f} s on {device}]", file=sys.stderr)
    return 0


def _run_batch(args: argparse.Namespace, model, tokenizer, device: str) -> int:
    """--prompts-file: every non-empty line is a prompt; batched decoding; JSON lines out."""
    import json
    import time

    from kiln.generate import generate_texts

    path = Path(args.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"--prompts-file {path} does not exist; give a text file with one prompt per line")
    prompts = [line.rstrip("\n") for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"--prompts-file {path} holds no prompts (one per line, blank lines skipped)")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    t0 = time.perf_counter()
    outs = generate_texts(model, tokenizer, prompts, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          stop_at_eot=not args.keep_eot, batch_size=args.batch_size, **_processing(args))
    for prompt, out in zip(prompts, outs):
        print(json.dumps({"prompt": prompt, "completion": out}, ensure_ascii=False))
    print(f"[{len(prompts)} prompts in {time.perf_counter() - t0:.2f} s on {device}]", file=sys.stderr)
    return 0
