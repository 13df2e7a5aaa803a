"""profile_steps on the CPU: a tiny model's training step, traced and summarized."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from kiln.model import ModelConfig, build_model
from kiln.train import AdamW, cross_entropy, param_groups
from kiln.train.profile import CATEGORIES, ProfileReport, categorize, profile_steps


def test_profile_a_training_step(tmp_path):
    torch.manual_seed(0)
    model = build_model(ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=2, n_heads=2))
    opt = AdamW(param_groups(model, 0.1), lr=1e-3)
    x = torch.randint(0, 64, (4, 17), generator=torch.Generator().manual_seed(0))

    def step():
        loss = cross_entropy(model(x[:, :-1]), x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    rep = profile_steps(step, tmp_path / "prof", steps=2, warmup=1)
    assert isinstance(rep, ProfileReport)
    for p in (rep.trace, rep.ops_md, rep.ops_csv, rep.summary_json):
        assert p.is_file() and p.parent == tmp_path / "prof"
    assert not [p for p in (tmp_path / "prof").iterdir() if ".tmp-" in p.name]
    trace = json.loads(rep.trace.read_text())
    assert trace["traceEvents"]
    assert any(str(e.get("name", "")).startswith("kiln.profile.step_") for e in trace["traceEvents"])

    by_name = {o.name: o for o in rep.ops}
    matmuls = [by_name[n] for n in ("aten::mm", "aten::addmm") if n in by_name]
    assert matmuls and all(o.category == "matmul" for o in matmuls)
    assert sum(o.percent for o in rep.ops) == pytest.approx(100.0, abs=0.01)
    assert [o.total_ms for o in rep.ops] == sorted((o.total_ms for o in rep.ops), reverse=True)
    assert "kiln.profile.step_0" not in by_name  # annotations are not ops

    md = rep.ops_md.read_text()
    assert "| `aten::mm` | matmul |" in md or "| `aten::addmm` | matmul |" in md
    rows = list(csv.DictReader(rep.ops_csv.open()))
    assert len(rows) == len(rep.ops)
    assert sum(float(r["percent"]) for r in rows) == pytest.approx(100.0, abs=0.01)

    summary = json.loads(rep.summary_json.read_text())
    assert summary == rep.summary
    assert summary["steps"] == 2 and len(summary["step_time_ms"]["all"]) == 2
    assert set(summary["categories"]) == set(CATEGORIES)
    assert sum(c["percent"] for c in summary["categories"].values()) == pytest.approx(100.0, abs=0.01)
    assert summary["categories"]["matmul"]["total_ms"] > 0
    assert summary["categories"]["optimizer"]["total_ms"] > 0


@pytest.mark.parametrize("name, category", [
    ("aten::mm", "matmul"),
    ("aten::addmm", "matmul"),
    ("sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "matmul"),
    ("nvjet_hsh_256x128_64x4_1x2_h_bz_coopA_TNT", "matmul"),
    ("flash_fwd_kernel<Flash_fwd_kernel_traits<128, 128, 64, 4>>", "attention"),
    ("aten::_scaled_dot_product_flash_attention", "attention"),
    ("_attn_bwd_dq_kernel", "attention"),
    ("_rmsnorm_fwd_kernel", "norm"),
    ("aten::linalg_vector_norm", "norm"),
    ("aten::_log_softmax", "softmax/cross-entropy"),
    ("aten::nll_loss_forward", "softmax/cross-entropy"),
    ("_ce_rows_kernel", "softmax/cross-entropy"),
    ("aten::_foreach_lerp_", "optimizer"),
    ("aten::_foreach_norm", "optimizer"),
    ("void at::native::multi_tensor_apply_kernel<TensorListMetadata<2>, BinaryOpListAlphaFunctor>", "optimizer"),
    ("ncclDevKernel_AllReduce_Sum_f32_RING_LL", "communication"),
    ("c10d::allreduce_", "communication"),
    ("aten::copy_", "memory"),
    ("aten::to", "memory"),
    ("aten::_to_copy", "memory"),
    ("aten::zero_", "memory"),
    ("Memcpy HtoD (Pageable -> Device)", "memory"),
    ("aten::cat", "memory"),
    ("aten::mul", "elementwise/other"),
    ("aten::silu", "elementwise/other"),
])
def test_categorize(name, category):
    assert categorize(name) == category


def test_cuda_table_counts_kernels_not_cpu_ops_or_annotations():
    """The CUDA branch of the table, on stand-in events (this machine has no GPU)."""
    from types import SimpleNamespace

    from torch.autograd import DeviceType

    from kiln.train.profile import _op_table

    def ev(name, device, us, annotation=False):
        return SimpleNamespace(name=name, device_type=device, is_async=False, is_user_annotation=annotation,
                               self_cpu_time_total=us, time_range=SimpleNamespace(elapsed_us=lambda: us))

    events = [
        ev("kiln.profile.step_0", DeviceType.CPU, 900.0, annotation=True),
        ev("kiln.profile.step_0", DeviceType.CUDA, 800.0),  # the GPU copy of the annotation
        ev("aten::mm", DeviceType.CPU, 50.0),
        ev("cudaLaunchKernel", DeviceType.CPU, 5.0),
        ev("sm90_xmma_gemm_bf16bf16", DeviceType.CUDA, 300.0),
        ev("sm90_xmma_gemm_bf16bf16", DeviceType.CUDA, 300.0),
        ev("flash_fwd_kernel", DeviceType.CUDA, 200.0),
        ev("Memset (Device)", DeviceType.CUDA, 200.0),
    ]
    rows = _op_table(events, cuda=True, steps=2)
    assert [(r.name, r.category, r.calls) for r in rows] == [
        ("sm90_xmma_gemm_bf16bf16", "matmul", 2),
        ("Memset (Device)", "memory", 1),
        ("flash_fwd_kernel", "attention", 1),
    ]
    assert rows[0].total_ms == pytest.approx(0.6) and rows[0].per_step_ms == pytest.approx(0.3)
    assert rows[0].percent == pytest.approx(60.0)
