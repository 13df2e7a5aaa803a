"""Where a sweep's points run: in this process, in one process per GPU slot, or on a Ray cluster.

An executor is any object with ``run(jobs) -> dict[str, str]``: ``jobs`` are ``Job``s (a point's
JSON file and its run folder), the answer maps each job's id to ``"done"``, ``"paused"`` or an
error message. Every executor ends up in ``kiln.scaling.worker.run_job`` (the same function, so a
point trains the same wherever it runs), and every point resumes where it stopped, so a sweep
killed anywhere is finished by running it again.

- ``LocalExecutor``: one point after another in this process (the CPU default; the tests).
- ``ProcessExecutor``: ``slots`` worker processes (``python -m kiln.scaling.worker``) at a time,
  each pinned to one device by ``CUDA_VISIBLE_DEVICES`` (``devices=("0", "1", ...)``; several
  slots per GPU fill a GPU that one small model leaves idle). With ``time_limit`` it stops
  starting points at the limit and sends the running ones SIGTERM, which the trainer turns into a
  checkpoint and a clean exit (``kiln.train.stop``).
- ``RayExecutor``: one Ray task per point with ``num_gpus`` each, on ``ray.init(address)``
  (optional dependency: ``pip install 'kiln[ray]'``). The tasks read the tokens and write the
  run folders through a path every node sees (a shared file system).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kiln.scaling.worker import DONE, PAUSED  # the job states live with the worker


@dataclass(frozen=True)
class Job:
    """One point to run: ``spec`` (a JSON file: sweep config, point, tokens folder) and ``out``."""

    id: str
    spec: str
    out: str


class LocalExecutor:
    """Run jobs one after another in this process (``time_limit``: seconds for all of them)."""

    def __init__(self, time_limit: float | None = None) -> None:
        self.time_limit = time_limit

    def run(self, jobs: Sequence[Job]) -> dict[str, str]:
        from kiln.scaling.worker import run_job
        from kiln.train.stop import StopRequest

        stop = StopRequest(self.time_limit)
        status = {}
        for job in jobs:
            if stop.reason() is not None:
                status[job.id] = PAUSED
                continue
            with stop.signals_handled():
                status[job.id] = run_job(job.spec, stop=stop)
        return status


class ProcessExecutor:
    """``len(devices) * per_device`` worker processes at once, one device each (see the module docstring)."""

    def __init__(self, devices: Sequence[str] = ("0",), per_device: int = 1, time_limit: float | None = None,
                 python: str = sys.executable) -> None:
        if not devices or per_device < 1:
            raise ValueError("ProcessExecutor needs one or more devices and per_device >= 1")
        self.slots = [d for d in devices for _ in range(per_device)]
        self.time_limit, self.python = time_limit, python

    def run(self, jobs: Sequence[Job]) -> dict[str, str]:
        t0, queue, running, status = time.monotonic(), list(jobs), {}, {}
        free = list(self.slots)
        stopping = False
        while queue or running:
            over = self.time_limit is not None and time.monotonic() - t0 >= self.time_limit
            if over and not stopping:
                stopping = True
                for proc, _, _ in running.values():
                    proc.send_signal(signal.SIGTERM)  # the trainer saves a checkpoint and exits 75
            while queue and free and not stopping:
                job, dev = queue.pop(0), free.pop(0)
                env = dict(os.environ, CUDA_VISIBLE_DEVICES=dev) if dev != "cpu" else dict(os.environ)
                Path(job.out).mkdir(parents=True, exist_ok=True)
                log = open(Path(job.out) / "worker.log", "a")  # noqa: SIM115 - closed when the process ends
                proc = subprocess.Popen([self.python, "-m", "kiln.scaling.worker", job.spec], env=env,
                                        stdout=log, stderr=subprocess.STDOUT)
                running[job.id] = (proc, dev, log)
            for jid, (proc, dev, log) in list(running.items()):
                rc = proc.poll()
                if rc is None:
                    continue
                log.close()
                free.append(dev)
                del running[jid]
                status[jid] = DONE if rc == 0 else PAUSED if rc == 75 else \
                    f"exit {rc}: see {Path(log.name)}"
            if stopping:
                for job in queue:
                    status[job.id] = PAUSED
                queue = []
            time.sleep(0.2)
        return status


class RayExecutor:
    """One Ray task per point (``num_gpus`` each) on the cluster at ``address`` (None: a local one)."""

    def __init__(self, address: str | None = None, num_gpus: float = 1.0, local_mode: bool = False) -> None:
        self.address, self.num_gpus, self.local_mode = address, num_gpus, local_mode

    def run(self, jobs: Sequence[Job]) -> dict[str, str]:
        try:
            import ray
        except ImportError as e:
            raise RuntimeError("the Ray executor needs Ray: pip install 'kiln[ray]' (or ray>=2.9)") from e
        from kiln.scaling.worker import run_job

        if not ray.is_initialized():
            ray.init(address=self.address, local_mode=self.local_mode, ignore_reinit_error=True,
                     log_to_driver=False)
        task = ray.remote(num_gpus=self.num_gpus)(run_job)
        refs = {job.id: task.remote(job.spec) for job in jobs}
        status = {}
        for jid, ref in refs.items():
            try:
                status[jid] = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - one failed point is reported, the others go on
                status[jid] = f"{type(e).__name__}: {e}"
        return status
