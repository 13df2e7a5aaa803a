"""Process-group set-up from torchrun's variables, rank-aware logging, consistency checks, teardown.

This is the only place Kiln reads torchrun's environment variables, and only in
:meth:`DistEnv.from_environment`; every other helper takes a :class:`DistEnv` argument (STYLE rule 4).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from kiln.artifacts import KilnError

log = logging.getLogger(__name__)


class DistributedError(KilnError, RuntimeError):
    """A collective failed: a rank died, timed out or disagrees with the others.

    Subclasses RuntimeError so ``kiln``'s CLI prints it as a one-line error and exits non-zero.
    """


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits in the job, as torchrun describes it.

    A default ``DistEnv()`` is a single process on the CPU: every helper in ``kiln.distributed``
    then does no communication at all.
    """

    rank: int = 0
    """Global rank, 0 .. world_size-1 (torchrun ``RANK``)."""
    local_rank: int = 0
    """Rank on this node; picks the GPU (torchrun ``LOCAL_RANK``)."""
    world_size: int = 1
    """Number of processes in the job (torchrun ``WORLD_SIZE``)."""
    local_world_size: int = 1
    """Processes on this node (torchrun ``LOCAL_WORLD_SIZE``)."""
    master_addr: str = "127.0.0.1"
    """Host of the rendezvous store (torchrun ``MASTER_ADDR``)."""
    master_port: int = 29500
    """Port of the rendezvous store (torchrun ``MASTER_PORT``)."""
    device_type: str = "cpu"
    """"cuda" or "cpu"; picks the backend: NCCL on cuda, gloo on cpu."""
    agent_store: bool = False
    """True under torchrun: its agent already hosts the store, so rank 0 connects as a client."""
    restart_count: int = 0
    """torchrun's ``TORCHELASTIC_RESTART_COUNT``; namespaces the store between restarts."""

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise ValueError(f"WORLD_SIZE={self.world_size} must be >= 1")
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"RANK={self.rank} is outside 0..WORLD_SIZE-1={self.world_size - 1}; check the launcher")
        if not 0 <= self.local_rank < max(self.local_world_size, 1):
            raise ValueError(f"LOCAL_RANK={self.local_rank} is outside 0..LOCAL_WORLD_SIZE-1={self.local_world_size - 1}")
        if self.device_type not in ("cpu", "cuda"):
            raise ValueError(f"device_type={self.device_type!r} must be 'cpu' or 'cuda'")

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, device_type: str | None = None) -> DistEnv:
        """Read torchrun's variables (``RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ...).

        Without them this is a single process. ``device_type`` defaults to "cuda" when a GPU is
        visible, else "cpu" (so a CPU machine gets gloo, a GPU machine NCCL).
        """
        env = os.environ if environ is None else environ

        def geti(name: str, default: int) -> int:
            raw = env.get(name, "")
            try:
                return int(raw) if raw != "" else default
            except ValueError:
                raise ValueError(f"environment variable {name}={raw!r} is not an integer; check the launcher") from None

        if device_type is None:
            device_type = "cuda" if torch.cuda.is_available() else "cpu"
        world = geti("WORLD_SIZE", 1)
        return cls(
            rank=geti("RANK", 0),
            local_rank=geti("LOCAL_RANK", 0),
            world_size=world,
            local_world_size=geti("LOCAL_WORLD_SIZE", world),
            master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
            master_port=geti("MASTER_PORT", 29500),
            device_type=device_type,
            agent_store=env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true",
            restart_count=geti("TORCHELASTIC_RESTART_COUNT", 0),
        )

    @property
    def backend(self) -> str:
        """``"nccl"`` on GPUs, ``"gloo"`` on CPUs."""
        return "nccl" if self.device_type == "cuda" else "gloo"

    @property
    def device(self) -> torch.device:
        """This rank's device: ``cuda:<local_rank>`` or ``cpu``."""
        return torch.device("cuda", self.local_rank) if self.device_type == "cuda" else torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """True on global rank 0, the rank that logs and writes files."""
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        """True when there is more than one process."""
        return self.world_size > 1


def init_distributed(env: DistEnv, timeout_s: float = 600.0) -> None:
    """Join the process group described by ``env``; every collective then fails after ``timeout_s``.

    A no-op for a single process. Under torchrun the agent hosts the TCP store, so every rank
    connects as a client (with the same key prefix that ``env://`` uses); with plain environment
    variables rank 0 hosts it. The timeout is what turns a dead or stuck rank into an error instead
    of a hang (gloo honours it directly; for NCCL the watchdog aborts the communicator).
    """
    if not env.is_distributed or dist.is_initialized():
        return
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed; install a standard torch wheel")
    timeout = timedelta(seconds=timeout_s)
    if env.device_type == "cuda":
        if env.local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={env.local_rank} but only {torch.cuda.device_count()} GPU(s) are visible; "
                             "lower --nproc_per_node to the number of GPUs on this node")
        torch.cuda.set_device(env.local_rank)
    try:
        store: dist.Store = dist.TCPStore(
            env.master_addr,
            env.master_port,
            env.world_size,
            is_master=env.rank == 0 and not env.agent_store,
            timeout=timeout,
        )
    except (RuntimeError, OSError) as e:
        raise DistributedError(
            f"rank {env.rank}: cannot reach the rendezvous store at {env.master_addr}:{env.master_port} "
            f"within {timeout_s:.0f}s ({e}); check MASTER_ADDR/MASTER_PORT and that every node was launched"
        ) from e
    if env.agent_store:
        store = dist.PrefixStore(f"/worker/attempt_{env.restart_count}", store)
    kwargs: dict[str, Any] = {}
    if env.device_type == "cuda":
        kwargs["device_id"] = env.device  # eager NCCL init: errors surface here, not at the first step
    dist.init_process_group(env.backend, store=store, rank=env.rank, world_size=env.world_size, timeout=timeout, **kwargs)
    log.info("joined process group: rank %d/%d, backend %s, timeout %.0fs", env.rank, env.world_size, env.backend, timeout_s)


def shutdown_distributed() -> None:
    """Leave the process group (idempotent); call it in a ``finally`` so a failing rank exits cleanly."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


@contextmanager
def distributed(env: DistEnv, timeout_s: float = 600.0) -> Iterator[DistEnv]:
    """``with distributed(env):`` joins the group, yields ``env`` and always tears the group down."""
    init_distributed(env, timeout_s)
    try:
        yield env
    finally:
        shutdown_distributed()


@contextmanager
def collective_guard(env: DistEnv, what: str) -> Iterator[None]:
    """Turn a failing collective (a dead peer, a timeout) into a :class:`DistributedError` naming it."""
    try:
        yield
    except DistributedError:
        raise
    except (RuntimeError, TimeoutError) as e:  # DistBackendError and gloo's errors are RuntimeErrors
        raise DistributedError(
            f"rank {env.rank}/{env.world_size}: collective '{what}' failed: another rank died, hung or "
            f"left the job (collectives time out after the process group's timeout). Original error: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e


class _RankFilter(logging.Filter):
    """Drops records below WARNING on ranks other than 0."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        return self.rank == 0 or record.levelno >= logging.WARNING


class _RankFormatter(logging.Formatter):
    """Prefixes ``[rank r]`` to what the handler's own formatter writes (records are not mutated)."""

    def __init__(self, inner: logging.Formatter | None, rank: int) -> None:
        super().__init__()
        self.inner = inner or logging.Formatter()
        self.rank = rank

    def format(self, record: logging.LogRecord) -> str:
        return f"[rank {self.rank}] {self.inner.format(record)}"


def setup_rank_logging(env: DistEnv) -> None:
    """Rank 0 logs as configured; other ranks only log warnings and errors. Lines get ``[rank r]``.

    Call once, from the CLI, after ``logging.basicConfig`` (importing Kiln configures nothing).
    A no-op for a single process.
    """
    if not env.is_distributed:
        return
    for h in logging.getLogger().handlers:
        if not any(isinstance(f, _RankFilter) for f in h.filters):
            h.addFilter(_RankFilter(env.rank))
            h.setFormatter(_RankFormatter(h.formatter, env.rank))


def fingerprint(obj: Any) -> str:
    """SHA-256 of ``obj`` as canonical JSON (dataclasses and paths via ``str``)."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def check_consistency(env: DistEnv, **things: Any) -> None:
    """All-gather a hash of each named thing (config, code version, ...); every rank raises on a mismatch.

    ``check_consistency(env, config=config_to_dict(cfg), code=git_sha)`` at start-up catches a node
    launched with another config or an older checkout before it trains on silently different settings.
    Every rank reaches the same verdict, so every rank exits with the same clear error.
    """
    if not env.is_distributed:
        return
    names = sorted(things)
    digests = [bytes.fromhex(fingerprint(things[n])) for n in names]
    local = torch.tensor([list(d) for d in digests], dtype=torch.uint8, device=env.device).reshape(len(names), 32)
    gathered = [torch.empty_like(local) for _ in range(env.world_size)]
    with collective_guard(env, "check_consistency"):
        dist.all_gather(gathered, local)
    bad: list[str] = []
    for i, name in enumerate(names):
        per_rank = [g[i].cpu().numpy().tobytes().hex()[:12] for g in gathered]
        if len(set(per_rank)) > 1:
            groups = {h: [r for r, x in enumerate(per_rank) if x == h] for h in per_rank}
            bad.append(f"{name}: " + ", ".join(f"ranks {rs} have {h}" for h, rs in groups.items()))
    if bad:
        raise DistributedError(
            f"rank {env.rank}: ranks disagree on " + "; ".join(bad)
            + ". Launch every node from the same checkout with the same config."
        )


def per_rank_batch(global_batch: int, world_size: int, micro_batch: int | None = None) -> tuple[int, int]:
    """Split a global batch (sequences per optimizer step) over ranks and micro-batches.

    Returns ``(per_rank, accum_steps)``: each rank processes ``per_rank`` sequences per step, in
    ``accum_steps`` micro-batches of ``micro_batch`` (one micro-batch of ``per_rank`` by default).
    """
    if global_batch < 1 or world_size < 1:
        raise ValueError(f"global batch {global_batch} and world size {world_size} must be >= 1")
    if global_batch % world_size:
        raise ValueError(
            f"global batch {global_batch} is not divisible by world size {world_size}; "
            f"use a multiple of {world_size} (e.g. {(global_batch // world_size + 1) * world_size}) or change --nproc_per_node"
        )
    per_rank = global_batch // world_size
    micro = per_rank if micro_batch is None else micro_batch
    if micro < 1 or per_rank % micro:
        raise ValueError(
            f"global batch {global_batch} is not divisible by micro-batch x world size = {micro}x{world_size}; "
            f"lower --micro-batch to a divisor of {per_rank}"
        )
    return per_rank, per_rank // micro


def all_reduce_max(env: DistEnv, value: float) -> float:
    """The largest ``value`` over ranks (e.g. the slowest rank's time); ``value`` itself on one process."""
    if not env.is_distributed or not dist.is_initialized():
        return value
    t = torch.tensor([value], dtype=torch.float64, device=env.device)
    with collective_guard(env, "all_reduce_max"):
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
