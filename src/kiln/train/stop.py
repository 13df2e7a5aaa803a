"""Pausing a run on purpose: a job's time limit or a scheduler's signal, then an exact resume.

Cluster jobs end on a clock (SLURM's ``--time``, a cloud instance's lease, a 10-minute device
slot). Killed mid-step, a run loses everything since its last checkpoint. A ``StopRequest`` lets
it stop cleanly instead: at the next step boundary the trainer writes a checkpoint and returns
without a manifest, so running the same command again resumes from exactly that step (bitwise,
as any resume).

Two things trigger it:

- ``time_limit``: seconds of this process's wall clock, counted from the request's creation. Set
  it a little under the job's slot (one checkpoint save must still fit).
- a signal, inside ``with request.signals_handled():`` in the main thread: SIGTERM (what SLURM,
  Kubernetes and ``timeout`` send before a kill; SLURM's ``--signal=TERM@120`` sends it early
  on purpose) and SIGUSR1.

``kiln train --time-limit 3h50m`` builds one; the command then exits with status 75
(``EX_TEMPFAIL``: "try again") when the run paused, so a job script can requeue itself.
"""

from __future__ import annotations

import contextlib
import re
import signal
import threading
import time
from collections.abc import Iterator

PAUSED_EXIT_CODE = 75  # EX_TEMPFAIL from sysexits.h: the work is not done, the same command continues it

_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_duration(text: str) -> float:
    """Seconds in ``"540"``, ``"90s"``, ``"9m"``, ``"3h50m"`` or ``"1d2h"``; a clear error otherwise."""
    s = str(text).strip().lower()
    parts = re.findall(r"(\d+(?:\.\d*)?)\s*([smhd]?)", s)
    if not s or not parts or re.sub(r"(\d+(?:\.\d*)?)\s*([smhd]?)", "", s).strip():
        raise ValueError(f"cannot read {text!r} as a duration: write seconds (540) or units, e.g. 90s, 9m, 3h50m")
    if len(parts) > 1 and any(unit == "" for _, unit in parts):
        raise ValueError(f"cannot read {text!r} as a duration: give every number a unit (s, m, h, d), e.g. 1h30m")
    seconds = sum(float(n) * _UNITS[u] for n, u in parts)
    if seconds <= 0:
        raise ValueError(f"duration {text!r} must be positive")
    return seconds


class StopRequest:
    """When to pause a run: after ``time_limit`` seconds of this process, or on a signal.

    ``reason()`` is polled by the trainer between steps (no device sync). After a pause,
    ``paused_at`` holds the step the checkpoint was written at; it stays ``None`` when the run
    finished.
    """

    def __init__(self, time_limit: float | None = None) -> None:
        if time_limit is not None and time_limit <= 0:
            raise ValueError(f"time_limit must be positive seconds, got {time_limit}")
        self.time_limit = time_limit
        self.started = time.monotonic()
        self.paused_at: int | None = None
        self._signal: str | None = None

    def request(self, why: str) -> None:
        """Ask for a pause at the next step boundary (what the signal handler does)."""
        self._signal = self._signal or why

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def reason(self) -> str | None:
        """Why the run should pause now, or None to go on."""
        if self._signal is not None:
            return self._signal
        if self.time_limit is not None and self.elapsed() >= self.time_limit:
            return f"time limit of {self.time_limit:g} s reached"
        return None

    @property
    def paused(self) -> bool:
        return self.paused_at is not None

    @contextlib.contextmanager
    def signals_handled(self, signums: tuple[int, ...] | None = None) -> Iterator[StopRequest]:
        """Within the block, SIGTERM and SIGUSR1 (or ``signums``) call ``request`` instead of ending
        the process; the previous handlers come back after it. Outside the main thread (where
        Python cannot set handlers) the block runs with the handlers untouched."""
        if threading.current_thread() is not threading.main_thread():
            yield self
            return
        if signums is None:
            signums = tuple(s for s in (getattr(signal, "SIGTERM", None), getattr(signal, "SIGUSR1", None)) if s)
        previous = {s: signal.signal(s, self._on_signal) for s in signums}
        try:
            yield self
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)

    def _on_signal(self, signum: int, frame: object) -> None:  # noqa: ARG002 - the handler signature
        self.request(f"signal {signal.Signals(signum).name} received")
