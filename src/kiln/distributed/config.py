"""``DistConfig``: how a training run is spread over ranks (nest it in the trainer's config)."""

from __future__ import annotations

from dataclasses import dataclass

STRATEGIES = ("ddp", "torch_ddp", "fsdp")


@dataclass(frozen=True)
class DistConfig:
    """Parallelism settings; the defaults run anywhere (one CPU process included)."""

    strategy: str = "ddp"
    """"ddp": Kiln's DataParallel; "torch_ddp": PyTorch's DistributedDataParallel (the reference);
    "fsdp": PyTorch FSDP2 ``fully_shard`` (parameters, gradients and optimizer state sharded)."""
    bucket_mb: float = 25.0
    """Gradient bucket size in MiB for "ddp" and "torch_ddp" (PyTorch's default is 25)."""
    first_bucket_mb: float = 1.0
    """Cap on the first gradient bucket in MiB, so communication starts early (PyTorch DDP: 1 MiB)."""
    zero1: bool = False
    """Shard optimizer state over ranks (ZeRO stage 1); with "ddp" or "torch_ddp" only."""
    timeout_s: float = 600.0
    """Seconds before a collective that a dead or stuck rank never joins raises instead of hanging."""
    fsdp_reshard_after_forward: bool = True
    """FSDP: free gathered parameters after forward (ZeRO-3 memory); False keeps them (ZeRO-2-like)."""
    fsdp_param_dtype: str | None = None
    """FSDP: compute dtype of gathered parameters, e.g. "bfloat16"; None keeps the parameter dtype."""
    fsdp_reduce_dtype: str | None = "float32"
    """FSDP: dtype of gradient reduce-scatter; float32 keeps the mean exact under bf16 compute."""

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not one of {STRATEGIES}")
        if self.bucket_mb <= 0:
            raise ValueError(f"bucket_mb={self.bucket_mb} must be > 0 (MiB)")
        if self.timeout_s <= 0:
            raise ValueError(f"timeout_s={self.timeout_s} must be > 0")
        if self.zero1 and self.strategy == "fsdp":
            raise ValueError("zero1=True is redundant with strategy='fsdp' (FSDP already shards optimizer state); drop it")
        for name in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
            v = getattr(self, name)
            if v is not None and v not in ("float32", "bfloat16", "float16"):
                raise ValueError(f"{name}={v!r} must be float32, bfloat16, float16 or None")
