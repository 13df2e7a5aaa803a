"""The model on CUDA: kernels agree in bf16, torch.compile matches eager, cached generation on the GPU."""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from kiln.generate import generate_tokens
from kiln.model import KVCache, ModelConfig, Transformer, build_model, load_pretrained, save_pretrained

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CFG = ModelConfig(vocab_size=512, context_length=256, d_model=256, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512)


def _pair(impl: str, norm_impl: str = "kiln") -> tuple[Transformer, Transformer]:
    torch.manual_seed(0)
    ref = build_model(CFG, device="cuda")
    other = build_model(dataclasses.replace(CFG, attention_impl=impl, norm_impl=norm_impl), device="cuda")
    other.load_state_dict(ref.state_dict())
    return ref, other


@pytest.mark.parametrize("impl,norm_impl", [("sdpa", "kiln"), ("triton", "triton")])
def test_kernels_agree_with_reference_under_bf16_autocast(impl, norm_impl):
    ref, other = _pair(impl, norm_impl)
    idx = torch.randint(0, 512, (4, 256), device="cuda")
    outs, grads = [], []
    for m in (ref, other):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = m(idx)
        loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), idx.flatten())
        loss.backward()
        outs.append(logits.float())
        grads.append(m.layers[0].self_attn.q_proj.weight.grad.float())
    torch.testing.assert_close(outs[1], outs[0], atol=5e-2, rtol=5e-2)
    cos = torch.nn.functional.cosine_similarity(grads[0].flatten(), grads[1].flatten(), dim=0)
    assert cos > 0.99


def test_compile_matches_eager():
    torch.manual_seed(0)
    m = build_model(CFG, device="cuda")
    idx = torch.randint(0, 512, (2, 128), device="cuda")
    eager = m(idx)
    compiled = torch.compile(m)(idx)
    torch.testing.assert_close(compiled, eager, atol=1e-3, rtol=1e-3)


def test_compiled_training_loss_with_kiln_kernels_matches_eager():
    """Kiln's Triton attention and RMSNorm and the fused linear + cross-entropy inside
    torch.compile (the trainer's loss function): the loss and every parameter's gradient as eager."""
    from kiln.train.step import make_loss_fn

    cfg = dataclasses.replace(CFG, context_length=512, attention_impl="triton", norm_impl="triton")
    idx = torch.randint(0, 512, (2, 513), device="cuda")  # T 512: the autotuned kernel path
    runs = []
    for compile_ in (False, True):
        torch.manual_seed(0)
        m = build_model(cfg, device="cuda")
        loss_fn = make_loss_fn(m, m, "fused", compile_)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(idx[:, :-1], idx[:, 1:])
        loss.backward()
        runs.append((loss.detach().float(), {n: p.grad.float() for n, p in m.named_parameters()}))
    (loss_e, grads_e), (loss_c, grads_c) = runs
    torch.testing.assert_close(loss_c, loss_e, atol=2e-3, rtol=2e-3)
    for name, g in grads_e.items():
        err = ((grads_c[name] - g).norm() / g.norm().clamp_min(1e-30)).item()
        assert err < 2e-2, f"{name}: compiled vs eager gradient relative error {err:.2e}"


@pytest.mark.parametrize("impl", ["kiln", "sdpa", "triton"])
@torch.no_grad()
def test_cached_greedy_generation_on_gpu(impl, tmp_path):
    torch.manual_seed(0)
    save_pretrained(build_model(CFG, device="cuda"), tmp_path)
    m = load_pretrained(tmp_path, device="cuda", attention_impl=impl).eval()
    prompt = list(range(1, 20))
    ids = torch.tensor([prompt], device="cuda")
    for _ in range(16):
        ids = torch.cat([ids, m(ids)[:, -1].argmax(-1, keepdim=True)], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = list(generate_tokens(m, prompt, 16, temperature=0.0))
        assert got == ids[0, len(prompt):].tolist()
        a = list(generate_tokens(m, prompt, 16, temperature=1.0, top_p=0.9, seed=3))
        assert a == list(generate_tokens(m, prompt, 16, temperature=1.0, top_p=0.9, seed=3))


def test_bf16_weights_and_cache_on_gpu(tmp_path):
    torch.manual_seed(0)
    save_pretrained(build_model(CFG, device="cuda"), tmp_path, dtype=torch.bfloat16)
    m = load_pretrained(tmp_path, device="cuda")
    assert m.lm_head.weight.dtype == torch.bfloat16
    cache = KVCache.for_model(m)
    assert cache.k[0].dtype == torch.bfloat16
    out = m(torch.randint(0, 512, (1, 10), device="cuda"), kv_cache=cache)
    assert torch.isfinite(out.float()).all()
