"""One sweep point in one process: ``python -m kiln.scaling.worker SPEC.json`` (what
``ProcessExecutor`` launches; ``run_job`` is what every executor calls).

SPEC.json holds the sweep's ``ScalingConfig``, the ``Point`` and the tokens and run folders. The
process pauses on SIGTERM (a checkpoint, then exit status 75) and resumes when run again.
"""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any

# A job's end state, as every executor reports it (executors import these from here: the worker is
# the module that runs a job, and the executors only schedule it).
PAUSED = "paused"
DONE = "done"


def run_job(spec_path: str, stop: Any = None) -> str:
    """Train the point described by ``spec_path``; ``"done"`` or ``"paused"``."""
    from kiln.scaling.sweep import Point, ScalingConfig, run_point

    spec = json.loads(Path(spec_path).read_text())
    c = dict(spec["config"])
    c["budgets"] = tuple(c["budgets"])
    cfg, point = ScalingConfig(**c), Point(**spec["point"])
    result = run_point(cfg, point, spec["tokens"], spec["out"], stop=stop)
    return DONE if result is not None else PAUSED


def main(argv: list[str] | None = None) -> int:
    from kiln.train.stop import PAUSED_EXIT_CODE, StopRequest

    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m kiln.scaling.worker SPEC.json", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    stop = StopRequest()
    with stop.signals_handled():
        status = run_job(args[0], stop=stop)
    return PAUSED_EXIT_CODE if status == PAUSED else 0


if __name__ == "__main__":
    sys.exit(main())
