"""`kiln` command: one subcommand per stage.

Each stage's CLI lives in ``kiln/cli/<stage>.py`` and exposes ``register(subparsers)``, which adds
its subcommand(s) with ``set_defaults(func=run)``; ``run(args) -> int`` builds the stage's config and
calls the library. Heavy imports (torch) happen inside ``run`` so ``kiln --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# Plain list of CLI modules, in pipeline order (a registry is a literal, never decorator magic).
COMMAND_MODULES = [
    "kiln.cli.demo",
    "kiln.cli.data",
    "kiln.cli.tokenizer",
    "kiln.cli.tokenize",
    "kiln.cli.train",
    "kiln.cli.eval",
    "kiln.cli.generate",
    "kiln.cli.scaling",
    "kiln.cli.bench",
    "kiln.cli.profile",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kiln",
        description="Kiln: raw text to a trained, evaluated language model, built from scratch.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # stage not built yet
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("kiln: interrupted", file=sys.stderr)
        return 130
    except (FileNotFoundError, ValueError, RuntimeError) as e:
        if args.verbose:
            raise
        print(f"kiln {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
