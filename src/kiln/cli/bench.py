"""`kiln bench ...`: side-by-side benchmarks (Kiln vs the reference each names, same run).

Each benchmark module in ``kiln/bench/`` exposes ``add_bench_parser(bench_subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib

BENCH_MODULES = [
    "kiln.bench.tokenizer",
    "kiln.bench.data",
    "kiln.bench.kernels",
    "kiln.bench.train",
    "kiln.bench.optim",
    "kiln.bench.speedrun",
    "kiln.bench.distributed",
    "kiln.bench.serve",
    "kiln.bench.serve_http",
    "kiln.bench.align",
]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench",
        help="side-by-side benchmarks: Kiln vs the reference implementation, same machine, same run",
        description="Benchmarks print a table of Kiln vs its named reference and can write it to a file. "
        "Recorded results live in docs/benchmarks.md.",
    )
    bench_sub = parser.add_subparsers(dest="bench", metavar="BENCHMARK")
    for name in BENCH_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:
                continue
            raise
        module.add_bench_parser(bench_sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
