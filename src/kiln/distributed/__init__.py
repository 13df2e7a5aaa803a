"""Many ranks: environment, the runtime seam, Kiln's data-parallel wrapper, ZeRO-1, FSDP2.

The only package in Kiln that touches ``torch.distributed``. Importing it starts nothing; see
docs/distributed.md for the trainer seam (``RuntimeProtocol``, ``kiln.distributed.runtime``) and the torchrun command lines.
"""

from kiln.distributed.config import DistConfig
from kiln.distributed.ddp import DataParallel, plan_buckets, unwrap
from kiln.distributed.env import (
    DistEnv,
    DistributedError,
    all_reduce_max,
    check_consistency,
    collective_guard,
    distributed,
    fingerprint,
    init_distributed,
    per_rank_batch,
    setup_rank_logging,
    shutdown_distributed,
)
from kiln.distributed.fsdp import (
    apply_fsdp,
    full_state_dict,
    load_sharded_checkpoint,
    save_sharded_checkpoint,
)
from kiln.distributed.parallel import (
    Runtime,
    build_optimizer,
    clip_grad_norm_,
    no_sync,
    wrap_model,
)
from kiln.distributed.runtime import RuntimeProtocol, SingleProcess, pick_device
from kiln.distributed.zero import (
    ShardedOptimizer,
    optimizer_state_bytes,
    partition_params,
)

__all__ = [
    "DataParallel",
    "DistConfig",
    "DistEnv",
    "DistributedError",
    "DistributedWindowSampler",
    "Runtime",
    "RuntimeProtocol",
    "ShardedOptimizer",
    "SingleProcess",
    "all_reduce_max",
    "apply_fsdp",
    "build_optimizer",
    "check_consistency",
    "clip_grad_norm_",
    "collective_guard",
    "distributed",
    "fingerprint",
    "full_state_dict",
    "init_distributed",
    "load_sharded_checkpoint",
    "no_sync",
    "optimizer_state_bytes",
    "partition_params",
    "per_rank_batch",
    "pick_device",
    "plan_buckets",
    "save_sharded_checkpoint",
    "setup_rank_logging",
    "shutdown_distributed",
    "unwrap",
    "wrap_model",
]


def __getattr__(name: str):  # noqa: ANN202 - PEP 562
    """``DistributedWindowSampler`` moved to ``kiln.shards.sampler`` (Kiln's one sampler); the old
    name still imports from here, loading ``kiln.shards`` only on use (no import of a later stage)."""
    if name == "DistributedWindowSampler":
        from kiln.shards.sampler import DistributedWindowSampler

        return DistributedWindowSampler
    raise AttributeError(f"module 'kiln.distributed' has no attribute {name!r}")
