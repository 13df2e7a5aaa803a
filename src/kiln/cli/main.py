"""`kiln` command: one subcommand per stage.

Each stage's CLI lives in ``kiln/cli/<stage>.py`` and exposes ``register(subparsers)``, which adds
its subcommand(s) with ``set_defaults(func=run)``; ``run(args) -> int`` builds the stage's config and
calls the library. Heavy imports (torch) happen inside ``run`` so ``kiln --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from kiln.artifacts import KilnError

# Plain list of CLI modules, in pipeline order (a registry is a literal, never decorator magic).
COMMAND_MODULES = [
    "kiln.cli.demo",
    "kiln.cli.data",
    "kiln.cli.tokenizer",
    "kiln.cli.tokenize",
    "kiln.cli.train",
    "kiln.cli.eval",
    "kiln.cli.align",
    "kiln.cli.generate",
    "kiln.cli.export",
    "kiln.cli.serve",
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
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging (and tracebacks)")
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (also KILN_DEBUG=1; accepted anywhere on the line)")
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


def _debug_requested(argv: list[str]) -> tuple[bool, list[str]]:
    """``--debug`` anywhere on the line (``kiln --debug train`` or ``kiln train ... --debug``), or
    ``KILN_DEBUG=1``: tracebacks instead of one-line errors. Returns (debug, argv without it)."""
    rest = [a for a in argv if a != "--debug"]
    return len(rest) != len(argv) or os.environ.get("KILN_DEBUG", "") not in ("", "0"), rest


def main(argv: list[str] | None = None) -> int:
    debug, argv = _debug_requested(sys.argv[1:] if argv is None else list(argv))
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
    # Kiln's own errors, and a user's ordinary ones (a missing or unreadable file, bad JSON, a config
    # value that cannot work) are one line; anything else is a bug and keeps its traceback.
    except (KilnError, OSError, ValueError, RuntimeError) as e:
        if debug or args.verbose:
            raise
        print(f"kiln {args.command}: error: {e} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
