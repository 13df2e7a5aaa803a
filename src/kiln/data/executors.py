"""Executors: run one function over many shards, in parallel, resumably.

A task is ``fn(*args)`` for one shard; it writes its outputs and then a completion marker (an empty
file written last). :func:`run_tasks` skips the tasks whose marker exists, so a relaunch of a killed
run redoes only the unfinished shards. Results come back in task order, so output is deterministic
whatever the scheduling.

- :class:`LocalExecutor`: ``multiprocessing`` pool on this machine (the default; ``workers=1`` runs
  in-process, which tests and debuggers like).
- :class:`RayExecutor`: one Ray task per shard (``pip install ray``), for a cluster; ``address=None``
  starts or joins a local Ray instance.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _call(fn: Callable[..., Any], args: tuple) -> Any:
    return fn(*args)


class LocalExecutor:
    """A process pool on this machine (``workers`` processes; 0 = all cores)."""

    def __init__(self, workers: int = 0) -> None:
        self.workers = workers or os.cpu_count() or 1

    def map(self, fn: Callable[..., Any], arg_list: Sequence[tuple]) -> list[Any]:
        """``[fn(*args) for args in arg_list]`` computed in parallel, in order."""
        if self.workers <= 1 or len(arg_list) <= 1:
            return [fn(*a) for a in arg_list]
        # spawn: fork after threads (numpy, fastText) is unsafe. ProcessPoolExecutor, unlike Pool,
        # fails loudly (BrokenProcessPool) when a worker dies instead of respawning it forever.
        ctx = mp.get_context("spawn")
        with ProcessPoolExecutor(min(self.workers, len(arg_list)), mp_context=ctx) as pool:
            futures = [pool.submit(_call, fn, a) for a in arg_list]
            return [f.result() for f in futures]


class RayExecutor:
    """One Ray task per shard. ``address``: a cluster address, or None for a local instance."""

    def __init__(self, address: str | None = None, num_cpus: int | None = None) -> None:
        self.address = address
        self.num_cpus = num_cpus

    def map(self, fn: Callable[..., Any], arg_list: Sequence[tuple]) -> list[Any]:
        try:
            import ray
        except ImportError as e:
            raise ImportError("the Ray executor needs ray: pip install 'ray[default]'") from e
        if not ray.is_initialized():
            kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False}
            if self.address:
                kwargs["address"] = self.address
            elif self.num_cpus:
                kwargs["num_cpus"] = self.num_cpus
            ray.init(**kwargs)
        remote = ray.remote(_call)
        return ray.get([remote.remote(fn, a) for a in arg_list])


Executor = LocalExecutor | RayExecutor


def make_executor(name: str, workers: int = 0, address: str | None = None) -> Executor:
    """``"local"`` or ``"ray"`` (a plain dict of choices, no registry magic)."""
    choices = {"local": lambda: LocalExecutor(workers), "ray": lambda: RayExecutor(address, workers or None)}
    if name not in choices:
        raise ValueError(f"executor {name!r} is unknown; pick one of {', '.join(choices)}")
    return choices[name]()


def marker_path(marker_dir: Path, stage: str, shard: int) -> Path:
    """Completion marker of one shard of one stage."""
    return marker_dir / f"{stage}_{shard:05d}.done"


def run_tasks(
    executor: Executor, stage: str, fn: Callable[..., Any], shard_args: Sequence[tuple], marker_dir: Path
) -> int:
    """Run ``fn(shard, *args)`` for every shard whose marker is missing; returns how many ran.

    ``fn`` must write its outputs and then call :func:`mark_done` itself (the marker is the last
    thing a finished shard writes, from the process that did the work).
    """
    marker_dir.mkdir(parents=True, exist_ok=True)
    todo = [(i, *a) for i, a in enumerate(shard_args) if not marker_path(marker_dir, stage, i).exists()]
    skipped = len(shard_args) - len(todo)
    if skipped:
        log.info("%s: %d of %d shards already done (completion markers), skipping them", stage, skipped, len(shard_args))
    if todo:
        executor.map(fn, todo)
    return len(todo)


def mark_done(marker_dir: Path, stage: str, shard: int) -> None:
    """Write the completion marker of a shard (after its outputs)."""
    p = marker_path(marker_dir, stage, shard)
    tmp = p.with_suffix(".tmp")
    tmp.write_text("")
    os.replace(tmp, p)
