"""Fused q/k/v and gate/up projections (``kiln.model.fuse_projections``): the same logits and the same
greedy tokens (full forward, KV cache, the paged engine), quantizing before or after fusing is the
same model bit for bit, fusing is idempotent and exactly undone, and a fused model saves as an
ordinary Llama folder but never as a training checkpoint."""

from __future__ import annotations

import copy

import pytest
import torch

from kiln.generate import EngineConfig, LLMEngine, SamplingParams
from kiln.model import (
    Int4Linear,
    Int8Linear,
    KVCache,
    Linear,
    ModelConfig,
    Transformer,
    fuse_projections,
    is_fused,
    load_llama_state_dict,
    load_pretrained,
    quantize_model,
    save_pretrained,
    unfuse_projections,
)

GQA = ModelConfig(vocab_size=257, context_length=64, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=96,
                  qk_norm=True)
MHA = ModelConfig(vocab_size=257, context_length=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, tie_embeddings=True)


def _model(cfg: ModelConfig = GQA, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():  # k and v of different scales, so a swapped order cannot go unnoticed
        for layer in m.layers:
            layer.self_attn.v_proj.weight.mul_(3.0)
            layer.mlp.up_proj.weight.mul_(2.0)
    return m


def _pair(cfg: ModelConfig = GQA) -> tuple[Transformer, Transformer]:
    m = _model(cfg)
    return m, fuse_projections(copy.deepcopy(m))


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("cfg", [GQA, MHA], ids=["gqa-qknorm", "mha-tied"])
def test_fused_logits_equal_unfused(cfg):
    m, f = _pair(cfg)
    attn, mlp = f.layers[0].self_attn, f.layers[0].mlp
    D = cfg.head_dim
    assert attn.qkv_proj.weight.shape == ((cfg.n_heads + 2 * cfg.n_kv_heads) * D, cfg.d_model)
    assert mlp.gate_up_proj.weight.shape == (2 * cfg.d_ff, cfg.d_model)
    assert attn.q_proj is attn.k_proj is attn.v_proj is mlp.gate_proj is mlp.up_proj is None
    assert f.num_params() == m.num_params()  # no weight held twice
    assert not any(n.endswith(("q_proj.weight", "gate_proj.weight")) for n, _ in f.named_parameters())
    torch.testing.assert_close(attn.qkv_proj.weight, torch.cat([m.layers[0].self_attn.q_proj.weight,
                                                               m.layers[0].self_attn.k_proj.weight,
                                                               m.layers[0].self_attn.v_proj.weight]), rtol=0, atol=0)
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    with torch.no_grad():
        want, got = m(x), f(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_kv_cache_generation_gives_the_same_tokens():
    m, f = _pair()
    outs = []
    for model in (m, f):
        ids = torch.tensor([[5, 17, 200, 3, 9]])
        cache = KVCache.for_model(model)
        with torch.no_grad():
            logits = model(ids, kv_cache=cache)
            for _ in range(12):
                nxt = logits[:, -1].argmax(-1, keepdim=True)
                ids = torch.cat([ids, nxt], 1)
                logits = model(nxt, kv_cache=cache)
        outs.append(ids[0].tolist())
    assert outs[0] == outs[1]
    with torch.no_grad():  # and the cached path of the fused model agrees with its own full forward
        full = f(torch.tensor([outs[1][:-1]]))[0, 4:].argmax(-1).tolist()
    assert full == outs[1][5:]


@pytest.mark.parametrize("path", ["general", "graphs", "prefill-kernel"])
def test_paged_engine_gives_the_same_tokens(path):
    m, f = _pair()
    g = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=g).tolist() for n in (3, 11, 6, 19)]
    p = SamplingParams(max_tokens=10, temperature=0, ignore_eos=True)
    outs = []
    for model in (m, f):
        eng = LLMEngine(model, None, EngineConfig(block_size=4, max_num_seqs=4, max_num_batched_tokens=16))
        if path != "general":
            eng.runner.graph_max = 8  # the CUDA-graph path's static buffers, run eagerly on the CPU
        eng.runner.prefill_kernel = path == "prefill-kernel"  # Triton RoPE and prefill under the interpreter
        outs.append([o.token_ids for o in eng.generate(prompts, p)])
    assert outs[0] == outs[1] and all(len(t) == 10 for t in outs[0])


@pytest.mark.parametrize("mode,kind", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantize_then_fuse_equals_fuse_then_quantize_bitwise(mode, kind):
    m = _model()
    a = fuse_projections(quantize_model(copy.deepcopy(m), mode, group_size=32))
    b = quantize_model(fuse_projections(copy.deepcopy(m)), mode, group_size=32)
    assert isinstance(a.layers[0].self_attn.qkv_proj, kind) and isinstance(a.layers[1].mlp.gate_up_proj, kind)
    assert a.layers[0].self_attn.qkv_proj.out_features == b.layers[0].self_attn.qkv_proj.out_features
    assert a.layers[0].self_attn.qkv_proj.tuned == b.layers[0].self_attn.qkv_proj.tuned
    _same_state(a, b)
    q = quantize_model(copy.deepcopy(m), mode, group_size=32)
    x = torch.randint(0, 257, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)
        torch.testing.assert_close(a(x), q(x), rtol=1e-5, atol=1e-5)  # fused quantized = unfused quantized
    p = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    toks = [LLMEngine(model, None, EngineConfig(block_size=4)).generate([[1, 2, 3], [7] * 9], p) for model in (q, a)]
    assert [o.token_ids for o in toks[0]] == [o.token_ids for o in toks[1]]
    _same_state(unfuse_projections(a), q)  # and splitting the quantized rows gives the per-layer ones back


def test_fusing_twice_changes_nothing_and_unfuse_is_exact():
    m, f = _pair()
    qkv = f.layers[0].self_attn.qkv_proj
    assert fuse_projections(f) is f and f.layers[0].self_attn.qkv_proj is qkv
    assert is_fused(f) and not is_fused(m)
    u = unfuse_projections(copy.deepcopy(f))
    assert not is_fused(u) and u.layers[0].self_attn.qkv_proj is None and u.layers[0].mlp.gate_up_proj is None
    _same_state(u, m)  # the same names, in the same order, the same values
    assert [n for n, _ in u.named_parameters()] == [n for n, _ in m.named_parameters()]
    _same_state(unfuse_projections(u), m)  # unfusing an unfused model: no-op
    assert repr(u) == repr(m)


def test_dtype_device_and_impl_are_kept():
    cfg = ModelConfig(vocab_size=64, context_length=16, d_model=32, n_layers=1, n_heads=2, d_ff=64, linear_impl="fp8")
    torch.manual_seed(0)
    m = fuse_projections(Transformer(cfg, dtype=torch.bfloat16))
    for lin in (m.layers[0].self_attn.qkv_proj, m.layers[0].mlp.gate_up_proj):
        assert isinstance(lin, Linear) and lin.impl == "fp8" and lin.weight.dtype == torch.bfloat16
        assert lin.weight.device.type == "cpu" and lin.weight.requires_grad


def test_mixed_kinds_are_refused():
    m = _model()
    with torch.no_grad():
        m.layers[0].self_attn.k_proj = Int8Linear(m.layers[0].self_attn.k_proj.weight)
    with pytest.raises(ValueError, match="different kinds"):
        fuse_projections(m)
    m = _model()
    m.layers[1].mlp.up_proj.to(torch.bfloat16)  # one dtype per fused matrix
    with pytest.raises(ValueError, match="different kinds"):
        fuse_projections(m)


def test_a_fused_model_saves_as_an_ordinary_folder_but_no_checkpoint(tmp_path):
    from kiln.train.checkpoint import save_checkpoint

    m, f = _pair(MHA)
    save_pretrained(f, tmp_path / "fused")
    save_pretrained(m, tmp_path / "plain")
    _same_state(load_pretrained(tmp_path / "fused"), m)
    weights = "model.safetensors"
    assert (tmp_path / "fused" / weights).read_bytes() == (tmp_path / "plain" / weights).read_bytes()
    assert is_fused(f)  # saving left the model fused
    with pytest.raises(ValueError, match="unfuse_projections"):
        save_checkpoint(f, None, 1, tmp_path / "ckpt")
    with pytest.raises(ValueError, match="unfuse_projections"):
        f.init_weights()
    with pytest.raises(ValueError, match="fused"):
        load_llama_state_dict(f, m.state_dict())
    save_checkpoint(unfuse_projections(f), None, 1, tmp_path / "ckpt")  # unfused, it is a training model again


def test_a_fused_layer_runs_four_matrix_products_instead_of_seven():
    """What fusing is for: fewer products (at batch-1 decode on a GPU, fewer GEMV launches), counted
    at the dispatcher over one forward: 4 weight products a layer against 7 (attention's own two
    products a layer and the head in both)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func in (torch.ops.aten.mm.default, torch.ops.aten.addmm.default, torch.ops.aten.bmm.default):
                self.n += 1
            return func(*args, **(kwargs or {}))

    m, f = _pair()
    x = torch.randint(0, GQA.vocab_size, (1, 1))
    counts = []
    for model in (m, f):
        with torch.no_grad(), Count() as c:
            model(x)
        counts.append(c.n)
    L = GQA.n_layers
    assert counts == [(7 + 2) * L + 1, (4 + 2) * L + 1], counts
