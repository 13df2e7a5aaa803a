"""``kiln serve`` (OpenAI-compatible HTTP server and chat page) and ``kiln chat`` (terminal chat).
See docs/serve.md."""

from __future__ import annotations

import argparse
import dataclasses


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("model_dir", metavar="MODEL_DIR",
                   help="a model folder (config.json + model.safetensors) or a finished train run directory")
    p.add_argument("--tokenizer", default="",
                   help="tokenizer.json or tokenizer artifact folder (default: beside the model or via its manifests)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    p.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="weight dtype; auto: bf16 on cuda, as stored on cpu")
    p.add_argument("--engine", action="append", default=[], metavar="NAME=VALUE",
                   help="override an EngineConfig field (repeatable), e.g. --engine num_blocks=512")
    p.add_argument("--warmup", default="auto", choices=["auto", "on", "off"],
                   help="run throwaway requests at load so the first request does not pay kernel "
                        "compilation; auto: on CUDA only")
    p.add_argument("--fuse-projections", action=argparse.BooleanOptionalAction, default=True,
                   help="stack each layer's q/k/v and gate/up weights into one matrix each (4 matrix "
                        "products a layer instead of 7, the same outputs); --no-fuse-projections keeps them apart")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add the ``serve`` and ``chat`` subcommands."""
    from kiln.serve.config import ServeConfig

    p = subparsers.add_parser(
        "serve", help="serve a model over an OpenAI-compatible HTTP API, with a chat page at /",
        description="OpenAI-compatible /v1/chat/completions, /v1/completions, /v1/models, /health and a "
        "chat page at /. Binds to 127.0.0.1; any other --host needs --api-key.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_args(p)
    doc = _attribute_docs(ServeConfig)
    for f in dataclasses.fields(ServeConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.name == "request_timeout_s":
            flag = "--request-timeout"
        elif f.name == "shutdown_grace_s":
            flag = "--shutdown-grace"
        if str(f.type) == "bool":
            p.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=f.default,
                           help=doc.get(f.name, ""))
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        p.add_argument(flag, dest=f.name, type=kind, default=f.default, help=doc.get(f.name, ""))
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"],
                   help="uvicorn's log level")
    p.set_defaults(func=run_serve)

    c = subparsers.add_parser(
        "chat", help="chat with a model in the terminal (streaming, with history)",
        description="A terminal conversation with a model, in-process. /reset forgets the history, "
        "/system TEXT sets a system message, /exit quits; Ctrl-C stops a reply.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _model_args(c)
    c.add_argument("--max-tokens", type=int, default=256, help="most tokens per reply")
    c.add_argument("--temperature", type=float, default=0.7, help="softmax temperature; 0 is greedy")
    c.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens only")
    c.add_argument("--top-p", type=float, default=0.95, help="nucleus sampling mass")
    c.add_argument("--seed", type=int, default=None, help="seed of the first reply (then seed + turn)")
    c.add_argument("--json", action="store_true", help="every reply is a JSON object (structured output)")
    processing_args(c)
    c.set_defaults(func=run_chat)


def processing_args(p: argparse.ArgumentParser) -> None:
    """The logits-processing flags of ``kiln chat`` (``SamplingParams``' fields of the same names)."""
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide the logit of every token already in the prompt or output by this (multiply "
                        "when negative; CTRL's, as Hugging Face and vLLM); > 0, 1 = none, > 1 discourages repeats")
    p.add_argument("--presence-penalty", type=float, default=0.0,
                   help="subtract this from the logit of every token already in the output (OpenAI's), in [-2, 2]")
    p.add_argument("--frequency-penalty", type=float, default=0.0,
                   help="subtract this times a token's count in the output so far from its logit (OpenAI's), "
                        "in [-2, 2]")
    p.add_argument("--min-p", type=float, default=0.0,
                   help="keep only tokens at least this fraction as likely as the most likely one, in [0, 1]")
    p.add_argument("--min-tokens", type=int, default=0,
                   help="end-of-text and stop tokens cannot end the output before this many tokens")


def _attribute_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass (the string right after each field), for --help."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body  # type: ignore[attr-defined]
    out = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            out[node.target.id] = str(nxt.value.value).replace("%", "%%")  # type: ignore[union-attr]
    return out


def _spec(args: argparse.Namespace):
    from kiln.serve.server import ModelSpec, parse_overrides

    return ModelSpec(args.model_dir, args.tokenizer, args.device, args.dtype, parse_overrides(args.engine),
                     args.warmup, args.fuse_projections)


def run_serve(args: argparse.Namespace) -> int:
    from kiln.serve.config import ServeConfig
    from kiln.serve.server import load, make_state, serve, start_engine_process

    cfg = ServeConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ServeConfig)})
    loaded = start_engine_process(_spec(args)) if cfg.engine_process else load(_spec(args))
    state = make_state(loaded, cfg)
    print(f"kiln serve: {state.model_name} on {loaded.device} at http://{cfg.host}:{cfg.port}/ "
          f"(chat page at /, OpenAI API at /v1; {state.renderer.kind} chat format)", flush=True)
    serve(state, cfg, log_level=args.log_level)
    return 0


def chat_settings(args: argparse.Namespace):
    """``kiln chat``'s flags as a ``ChatSettings``."""
    from kiln.serve.terminal import ChatSettings

    return ChatSettings(args.max_tokens, args.temperature, args.top_k, args.top_p, args.seed,
                        repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                        frequency_penalty=args.frequency_penalty, min_p=args.min_p, min_tokens=args.min_tokens,
                        json_object=args.json)


def run_chat(args: argparse.Namespace) -> int:
    from kiln.serve.server import load
    from kiln.serve.terminal import chat_loop

    settings = chat_settings(args)  # bad values fail here, before the model loads
    loaded = load(_spec(args))
    chat_loop(loaded.engine, loaded.tokenizer, loaded.context_length, settings)
    return 0
