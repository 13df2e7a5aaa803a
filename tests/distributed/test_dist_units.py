"""Single-process pieces of kiln.distributed: environment, bucketing plan, partition, sampler, config."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from torch import nn

from kiln.distributed import (
    DataParallel,
    DistConfig,
    DistEnv,
    DistributedWindowSampler,
    ShardedOptimizer,
    build_optimizer,
    check_consistency,
    no_sync,
    partition_params,
    per_rank_batch,
    plan_buckets,
    setup_rank_logging,
    wrap_model,
)


def test_env_from_torchrun_variables():
    env = DistEnv.from_environment(
        {"RANK": "3", "LOCAL_RANK": "1", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
         "MASTER_PORT": "1234", "TORCHELASTIC_USE_AGENT_STORE": "True"}, device_type="cpu")
    assert (env.rank, env.local_rank, env.world_size, env.master_addr, env.master_port) == (3, 1, 4, "node0", 1234)
    assert env.backend == "gloo" and env.agent_store and not env.is_main and env.is_distributed
    assert DistEnv.from_environment({}, device_type="cuda").backend == "nccl"
    single = DistEnv.from_environment({}, device_type="cpu")
    assert single.world_size == 1 and single.is_main and not single.is_distributed


@pytest.mark.parametrize("bad, msg", [({"RANK": "2", "WORLD_SIZE": "2"}, "outside"), ({"WORLD_SIZE": "two"}, "not an integer")])
def test_env_rejects_bad_variables(bad, msg):
    with pytest.raises(ValueError, match=msg):
        DistEnv.from_environment(bad, device_type="cpu")


def test_per_rank_batch_and_its_errors():
    assert per_rank_batch(32, 4) == (8, 1)
    assert per_rank_batch(32, 4, micro_batch=2) == (8, 4)
    with pytest.raises(ValueError, match="not divisible by world size 3"):
        per_rank_batch(32, 3)
    with pytest.raises(ValueError, match="micro-batch x world size = 3x4"):
        per_rank_batch(32, 4, micro_batch=3)


def test_bucket_plan_is_reverse_order_and_closes_at_size():
    params = [nn.Parameter(torch.zeros(1024)) for _ in range(5)]  # 4 KiB each
    assert plan_buckets(params, 8 / 1024) == [[4, 3], [2, 1], [0]]
    assert plan_buckets(params, 100) == [[4, 3, 2, 1, 0]]
    assert plan_buckets(params, 100, first_bucket_mb=4 / 1024) == [[4], [3, 2, 1, 0]]  # small first bucket
    mixed = [nn.Parameter(torch.zeros(4)), nn.Parameter(torch.zeros(4, dtype=torch.bfloat16))]
    assert plan_buckets(mixed, 100) == [[1], [0]]  # one dtype per bucket


def test_partition_is_balanced_and_deterministic():
    owners = partition_params([100, 10, 50, 50, 10], 2)
    load = [sum(s for s, o in zip([100, 10, 50, 50, 10], owners) if o == r) for r in range(2)]
    assert owners == partition_params([100, 10, 50, 50, 10], 2)
    assert load == [110, 110]


def test_single_process_seam_is_a_no_op():
    env, model = DistEnv(), nn.Linear(4, 4)
    assert wrap_model(model, env, DistConfig()) is model
    opt = build_optimizer(model, torch.optim.AdamW, env, DistConfig(zero1=True), lr=1e-3)
    assert isinstance(opt, torch.optim.AdamW)
    with no_sync(model):
        pass
    check_consistency(env, config={"a": 1})  # nothing to compare against
    dp = DataParallel(nn.Linear(4, 4), env)  # world size 1: hooks never communicate
    with no_sync(dp):
        dp(torch.randn(2, 4)).sum().backward()
    assert dp.num_collectives == 0
    zo = ShardedOptimizer(model.parameters(), torch.optim.AdamW, env, lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    zo.step()
    assert zo.state_bytes() == 2 * 4 * (16 + 4) + 2 * 4  # exp_avg, exp_avg_sq per element; step scalars


@pytest.mark.parametrize("kw, msg", [({"strategy": "zero"}, "not one of"), ({"bucket_mb": 0}, "bucket_mb"),
                                     ({"strategy": "fsdp", "zero1": True}, "redundant")])
def test_config_errors_say_how_to_fix(kw, msg):
    with pytest.raises(ValueError, match=msg):
        DistConfig(**kw)


def test_rank_logging_silences_info_off_rank0():
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(self.format(record))

    root = logging.getLogger()
    saved, root.handlers = root.handlers, [Collect()]
    saved_level = root.level
    root.setLevel(logging.INFO)
    try:
        setup_rank_logging(DistEnv(rank=1, world_size=2))
        logging.getLogger("kiln.test_rank_logging").warning("disk almost full")
        logging.getLogger("kiln.test_rank_logging").info("step 1")
        root.handlers = [Collect()]
        setup_rank_logging(DistEnv(rank=0, world_size=2))
        logging.getLogger("kiln.test_rank_logging").info("step 1")
    finally:
        root.handlers = saved
        root.setLevel(saved_level)
    assert seen == ["[rank 1] disk almost full", "[rank 0] step 1"]


def _sampler(rank: int, world: int, batch: int = 3, n_tokens: int = 10 * 8 + 1, seed: int = 0) -> DistributedWindowSampler:
    return DistributedWindowSampler(n_tokens, context_length=8, batch_size=batch, env=DistEnv(rank=rank, world_size=world), seed=seed)


def test_sampler_ranks_are_disjoint_and_cover_an_epoch():
    samplers = [_sampler(r, 2, batch=1) for r in range(2)]
    seen = [s.next_starts() for _ in range(5) for s in samplers]  # 10 windows, 1 epoch
    flat = np.concatenate(seen)
    assert sorted(flat.tolist()) == list(range(0, 80, 8))
    assert all(s.epoch == 0 for s in samplers)
    samplers[0].next_starts()
    assert samplers[0].epoch == 1


def test_sampler_is_deterministic_and_seeded():
    a, b, c = _sampler(0, 2), _sampler(0, 2), _sampler(0, 2, seed=1)
    xs = [a.next_starts().tolist() for _ in range(4)]
    assert xs == [b.next_starts().tolist() for _ in range(4)]
    assert xs != [c.next_starts().tolist() for _ in range(4)]


def test_sampler_batches_are_inputs_and_next_token_targets():
    tokens = np.arange(81, dtype=np.uint16)
    x, y = _sampler(1, 2).next_batch(tokens)
    assert x.shape == y.shape == (3, 8) and x.dtype == torch.int64
    assert torch.equal(y[:, :-1], x[:, 1:]) and torch.equal(y[:, -1], x[:, -1] + 1)


def test_sampler_resumes_exactly_even_on_another_world_size():
    run = [_sampler(r, 2, batch=1) for r in range(2)]
    for _ in range(2):
        for s in run:
            s.next_starts()
    state = run[0].state_dict()
    uninterrupted = np.concatenate([s.next_starts() for s in run])  # global batch 3 of the 2-rank run
    resumed = _sampler(0, 1, batch=2)  # 1 rank, same global batch of 2
    resumed.load_state_dict(state)
    assert resumed.next_starts().tolist() == uninterrupted.tolist()
    with pytest.raises(ValueError, match="same tokens and context length"):
        _sampler(0, 1, n_tokens=200).load_state_dict(state)


def test_sampler_rejects_too_little_data():
    with pytest.raises(ValueError, match="fewer than one global batch"):
        _sampler(0, 4, batch=3)
