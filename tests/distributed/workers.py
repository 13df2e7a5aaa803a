"""Per-rank programs for tests/distributed, launched torchrun-style (RANK, WORLD_SIZE, ... set).

``python tests/distributed/workers.py SCENARIO OUT_DIR [ARGS...]``; each rank writes
``OUT_DIR/<scenario>_rank<r>.json``. A DistributedError exits with status 1 and a one-line
``error:`` message on stderr, as the ``kiln`` CLI does. Not collected by pytest (no ``test_``).
"""

from __future__ import annotations

import copy
import json
import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from kiln.distributed import (
    DataParallel,
    DistConfig,
    DistEnv,
    DistributedError,
    Runtime,
    ShardedOptimizer,
    apply_fsdp,
    check_consistency,
    collective_guard,
    full_state_dict,
    init_distributed,
    load_sharded_checkpoint,
    no_sync,
    optimizer_state_bytes,
    save_sharded_checkpoint,
    shutdown_distributed,
)


class Block(nn.Module):
    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.tanh(self.fc(x))


class TinyNet(nn.Module):
    """Input projection, residual blocks, scalar head; ``unused`` never takes part in forward."""

    def __init__(self, d_in: int = 8, d: int = 32, n_layers: int = 3, with_unused: bool = False) -> None:
        super().__init__()
        # Registered first, so it sits in the last bucket (reverse order): that bucket can only be
        # reduced at the end of backward, the others still overlap.
        self.unused = nn.Linear(3, 3) if with_unused else None
        self.inp = nn.Linear(d_in, d)
        self.layers = nn.ModuleList([Block(d) for _ in range(n_layers)])
        self.head = nn.Linear(d, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h).squeeze(-1)


class Balanced(nn.Module):
    """Four equal 64x64 weight matrices (16 KiB each in fp32): known bucket counts, even ZeRO split."""

    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(64, 64, bias=False) for _ in range(4)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x.sum(-1)


def global_batch(step: int, n: int, d_in: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randn(n, d_in, generator=g), torch.randn(n, generator=g)


def local(t: torch.Tensor, env: DistEnv) -> torch.Tensor:
    n = t.shape[0] // env.world_size
    return t[env.rank * n : (env.rank + 1) * n]


def max_diff(a: nn.Module, b: nn.Module) -> float:
    return max((p - q).abs().max().item() for p, q in zip(a.parameters(), b.parameters()))


# ------------------------------------------------------------------------------------------------
def scenario_dp(env: DistEnv, out: dict) -> None:
    """Kiln DataParallel and ZeRO-1 against single-process training; overlap; bucket counts."""
    B, steps = 8, 4  # global batch, optimizer steps; step 2 accumulates over 2 micro-batches
    torch.manual_seed(env.rank)  # different init per rank: the wrapper's broadcast must fix it
    net = TinyNet(with_unused=True)
    dp = DataParallel(net, env, bucket_mb=2e-3, record_events=True)  # ~2 KiB: several buckets
    opt = torch.optim.SGD(dp.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(0)
    ref = TinyNet(with_unused=True)
    if env.rank == 0:
        out["init_equal_rank0"] = max_diff(ref, net) == 0.0
    ref.load_state_dict({k: v.clone() for k, v in net.state_dict().items()})
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    collectives_per_step = []
    for step in range(steps):
        x, y = global_batch(step, B)
        before = dp.num_collectives
        opt.zero_grad(set_to_none=step % 2 == 0)  # exercise both zero_grad modes
        if step == 2:
            xs, ys = local(x, env).chunk(2), local(y, env).chunk(2)
            with no_sync(dp):
                (nn.functional.mse_loss(dp(xs[0]), ys[0]) / 2).backward()
            (nn.functional.mse_loss(dp(xs[1]), ys[1]) / 2).backward()
        else:
            nn.functional.mse_loss(dp(local(x, env)), local(y, env)).backward()
        opt.step()
        collectives_per_step.append(dp.num_collectives - before)
        ref_opt.zero_grad()
        nn.functional.mse_loss(ref(x), y).backward()
        ref_opt.step()
    out["dp_vs_single_max_diff"] = max_diff(net, ref)
    out["n_buckets"] = len(dp.buckets)
    out["collectives_per_step"] = collectives_per_step
    # Overlap: the timeline of the last backward. A bucket's all-reduce must have been launched
    # while later gradient hooks were still to fire, i.e. before backward finished.
    last = dp.events[max(i for i, e in enumerate(dp.events) if e[0] == "synced" and i < len(dp.events) - 1) + 1 :]
    kinds = [e[0] for e in last]
    out["events_last_step"] = kinds
    first_launch = kinds.index("launch")
    last_grad = len(kinds) - 1 - kinds[::-1].index("grad")
    out["first_launch_before_last_grad"] = first_launch < last_grad
    out["launch_time_before_backward_end"] = last[first_launch][2] < last[-1][2]

    # Bucket counts for a known layout: 4 tensors of 16 KiB.
    counts = {}
    for mb in (16 / 1024, 20 / 1024, 32 / 1024, 100.0):
        torch.manual_seed(0)
        b = DataParallel(Balanced(), env, bucket_mb=mb)
        before = b.num_collectives
        b(torch.randn(2, 64)).sum().backward()
        counts[str(mb)] = [len(b.buckets), b.num_collectives - before]
        b.remove_hooks()
    out["bucket_counts"] = counts

    # ZeRO-1: same DataParallel gradients, AdamW sharded vs AdamW unsharded (must be identical),
    # and vs single-process AdamW on the concatenated batch (tight tolerance).
    def run(sharded: bool | None) -> tuple[nn.Module, object]:
        torch.manual_seed(0)
        m = Balanced()
        model = DataParallel(m, env, bucket_mb=1.0) if sharded is not None else m
        kw = {"lr": 1e-2, "weight_decay": 0.1, "foreach": False}
        o = ShardedOptimizer(model.parameters(), torch.optim.AdamW, env, **kw) if sharded else torch.optim.AdamW(model.parameters(), **kw)
        for step in range(3):
            g = torch.Generator().manual_seed(step)
            x = torch.randn(8, 64, generator=g)
            o.zero_grad()
            inp = local(x, env) if sharded is not None else x
            model(inp).pow(2).mean().backward()
            o.step()
        return m, o

    zm, zo = run(True)
    um, uo = run(False)
    sm, _so = run(None)
    out["zero_vs_dp_adamw_max_diff"] = max_diff(zm, um)
    out["zero_vs_single_max_diff"] = max_diff(zm, sm)
    out["zero_state_bytes"] = optimizer_state_bytes(zo)
    out["full_state_bytes"] = optimizer_state_bytes(uo)
    out["zero_owned_params"] = len(zo.local_params)

    # The Kiln Transformer under DataParallel matches single-process training too.
    try:
        from kiln.model import ModelConfig, Transformer
    except ImportError:
        out["transformer_max_diff"] = None
        return
    cfg = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
    torch.manual_seed(0)
    tm = Transformer(cfg)
    tref = copy.deepcopy(tm)
    tdp = DataParallel(tm, env, bucket_mb=0.01)
    topt = torch.optim.SGD(tdp.parameters(), lr=0.05)
    ropt = torch.optim.SGD(tref.parameters(), lr=0.05)
    for step in range(3):
        g = torch.Generator().manual_seed(step)
        idx = torch.randint(0, 64, (4, 17), generator=g)
        x, y = idx[:, :-1], idx[:, 1:]
        topt.zero_grad()
        nn.functional.cross_entropy(tdp(local(x, env)).flatten(0, 1), local(y, env).flatten()).backward()
        topt.step()
        ropt.zero_grad()
        nn.functional.cross_entropy(tref(x).flatten(0, 1), y.flatten()).backward()
        ropt.step()
    out["transformer_max_diff"] = max_diff(tm, tref)


def _fsdp_train(model: nn.Module, opt: torch.optim.Optimizer, env: DistEnv, steps: range, B: int = 8) -> list[float]:
    """Train on the global batches of ``steps``; returns the global mean loss of each step."""
    losses = []
    for step in steps:
        x, y = global_batch(step, B)
        opt.zero_grad()
        loss = nn.functional.mse_loss(model(local(x, env)), local(y, env))
        loss.backward()
        opt.step()
        t = loss.detach().clone()
        if env.is_distributed:
            dist.all_reduce(t)
            t /= env.world_size
        losses.append(t.item())
    return losses


def scenario_fsdp(env: DistEnv, out: dict, ckpt: str) -> None:
    """FSDP2 vs single-process; sharded save at step 3; exact resume on the same world size."""
    cfg = DistConfig(strategy="fsdp")
    kw = {"lr": 1e-2, "weight_decay": 0.1, "foreach": False}
    torch.manual_seed(0)
    ref = TinyNet()
    model = apply_fsdp(copy.deepcopy(ref), env, cfg)
    out["sharded"] = type(next(model.parameters())).__name__
    opt = torch.optim.AdamW(model.parameters(), **kw)
    ref_opt = torch.optim.AdamW(ref.parameters(), **kw)
    _fsdp_train(model, opt, env, range(3))
    _fsdp_train(ref, ref_opt, DistEnv(), range(3))
    save_sharded_checkpoint(ckpt, model, opt, env, extra={"step": 3})
    out["losses_after"] = _fsdp_train(model, opt, env, range(3, 6))
    out["ref_losses_after"] = _fsdp_train(ref, ref_opt, DistEnv(), range(3, 6))
    full = full_state_dict(model)
    out["fsdp_vs_single_max_diff"] = max((full[k] - v).abs().max().item() for k, v in ref.state_dict().items())
    # Resume: a fresh sharded model and optimizer, loaded from the checkpoint, replays steps 3..5.
    torch.manual_seed(123)
    fresh = apply_fsdp(TinyNet(), env, cfg)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), **kw)
    extra = load_sharded_checkpoint(ckpt, fresh, fresh_opt)
    out["extra"] = extra
    out["resumed_losses"] = _fsdp_train(fresh, fresh_opt, env, range(3, 6))
    if env.is_main:
        torch.save(full, Path(ckpt).parent / "final_full.pt")


def scenario_resume1(env: DistEnv, out: dict, ckpt: str) -> None:
    """World size 1 (no process group): load the 2-rank checkpoint into a plain model, replay steps 3..5."""
    torch.manual_seed(7)
    model = TinyNet()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1, foreach=False)
    out["extra"] = load_sharded_checkpoint(ckpt, model, opt)
    out["losses_after"] = _fsdp_train(model, opt, env, range(3, 6))
    final = torch.load(Path(ckpt).parent / "final_full.pt")
    out["vs_two_rank_final_max_diff"] = max((final[k] - v).abs().max().item() for k, v in model.state_dict().items())


def scenario_mismatch(env: DistEnv, out: dict) -> None:
    """Rank 1 runs with another config: every rank must stop with the same clear error."""
    config = {"lr": 3e-4, "d_model": 256 if env.rank == 0 else 512}
    check_consistency(env, config=config, code="v1")
    out["passed_check"] = True


def scenario_consistent(env: DistEnv, out: dict) -> None:
    check_consistency(env, config={"lr": 3e-4}, code="v1")
    out["passed_check"] = True


def scenario_dead_rank(env: DistEnv, out: dict, how: str) -> None:
    """Rank 1 dies (or hangs) after start-up; rank 0's next collective must fail fast, not hang."""
    t = torch.ones(4)
    with collective_guard(env, "warm-up all_reduce"):
        dist.all_reduce(t)
    if env.rank == 1:
        if how == "exit":
            os._exit(17)
        time.sleep(120)  # stuck in user code: never joins the next collective
    start = time.time()
    out["started"] = start
    try:
        with collective_guard(env, "all_reduce after a peer died"):
            dist.all_reduce(t)
    finally:
        out["seconds_to_error"] = time.time() - start
        write(out, env, "dead_rank")


def scenario_rendezvous(env: DistEnv, out: dict) -> None:
    """Sum of ranks over the group; proves every process found the others and its own place."""
    t = torch.tensor([float(env.rank)])
    dist.all_reduce(t)
    rt = Runtime(env, DistConfig())  # the trainer's seam
    out["runtime_mean"] = rt.all_reduce_mean(torch.tensor(float(env.rank))).item()
    rt.barrier()
    out.update(rank=env.rank, local_rank=env.local_rank, world_size=env.world_size,
               local_world_size=env.local_world_size, agent_store=env.agent_store, rank_sum=t.item(),
               pg_world=dist.get_world_size())


SCENARIOS = {
    "dp": scenario_dp,
    "fsdp": scenario_fsdp,
    "resume1": scenario_resume1,
    "mismatch": scenario_mismatch,
    "consistent": scenario_consistent,
    "dead_rank": scenario_dead_rank,
    "rendezvous": scenario_rendezvous,
}


def write(out: dict, env: DistEnv, name: str) -> None:
    path = Path(OUT_DIR) / f"{name}_rank{env.rank}.json"
    path.write_text(json.dumps(out))


OUT_DIR = "."


def main(argv: list[str]) -> int:
    global OUT_DIR
    name, OUT_DIR, *args = argv
    torch.set_num_threads(1)
    env = DistEnv.from_environment(device_type="cpu")
    timeout = float(os.environ.get("KILN_TEST_TIMEOUT_S", "60"))
    out: dict = {}
    try:
        init_distributed(env, timeout_s=timeout)
        SCENARIOS[name](env, out, *args)
    except DistributedError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.stdout.flush()
        # After a failed collective the group may be unusable, and interpreter shutdown with a live
        # gloo group can abort in its C++ destructors (SIGABRT instead of exit 1): leave at once.
        os._exit(1)
    write(out, env, name)
    shutdown_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
