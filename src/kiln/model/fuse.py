"""Fused projections for inference: each attention layer's q, k and v as one ``qkv_proj`` and each
MLP's gate and up as one ``gate_up_proj``, so a layer runs 4 matrix products instead of 7.

At batch-1 decode on a GPU every projection is one GEMV launch, and at GPT-2-small to 350M shapes
these are bound by launch latency, not bytes; gpt-fast keeps a fused ``wqkv`` for the same reason.
The fused layer holds the row-concatenation of its parts' weights (done once, here, not per call as
the training-time ``fused_proj`` switch of ``kernels_swapped`` does), and the forward splits its
output into views. Works on ``Linear``, ``Int8Linear`` and ``Int4Linear``: their quantization is per
output row (int8's scales, int4's groups lie along a row), so stacking quantized rows gives bit for
bit what quantizing the stacked weight gives, and fusing before or after ``quantize_model`` is the
same model.

    model = fuse_projections(load_pretrained(path, device="cuda", dtype=torch.bfloat16))

A fused model is for inference only (``kiln serve``, ``kiln chat``, ``kiln generate``, the Kiln rows
of ``kiln bench serve`` turn it on). Not for a model being trained: the fused matrix is a copy, and an
engine sharing a policy's layers (GRPO rollouts) would decode with stale weights. Saving:
``to_hf_state_dict`` / ``save_pretrained`` write the unfused Llama layout from a fused model
(``unfused_parameters``), a training checkpoint of one is refused, and ``unfuse_projections`` gives
the separate layers back exactly.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from kiln.model.attention import MultiHeadSelfAttention
from kiln.model.layers import Linear, SwiGLU
from kiln.model.quantize import Int4Linear, Int8Linear


def _layout(module: nn.Module) -> tuple[str, tuple[str, ...], tuple[int, ...]] | None:
    """(fused name, part names, part output sizes) of a module that has projections to fuse, else None."""
    if isinstance(module, MultiHeadSelfAttention):
        H, Hkv, D = module.num_heads, module.num_kv_heads, module.head_dim
        return "qkv_proj", ("q_proj", "k_proj", "v_proj"), (H * D, Hkv * D, Hkv * D)
    if isinstance(module, SwiGLU):
        fused = module.gate_up_proj
        d_ff = fused.out_features // 2 if fused is not None else module.gate_proj.out_features
        return "gate_up_proj", ("gate_proj", "up_proj"), (d_ff, d_ff)
    return None


def is_fused(model: nn.Module) -> bool:
    """True when any attention or MLP layer of ``model`` holds fused projections."""
    return any(getattr(m, lay[0]) is not None for m in model.modules() if (lay := _layout(m)) is not None)


def concat_linears(parts: Sequence[nn.Module]) -> nn.Module:
    """One layer whose output is the parts' outputs side by side (their weight rows stacked in order):
    ``Linear`` (its ``impl``, dtype and device kept), ``Int8Linear`` or ``Int4Linear`` (the quantized
    tensors stacked, nothing quantized again). All parts must be one kind with one input size."""
    kinds = {(type(p), getattr(p, "in_features", None), getattr(p, "impl", None), getattr(p, "tuned", None),
              getattr(p, "group_size", None), tuple((t.dtype, t.device) for t in p.state_dict().values()))
             for p in parts}
    if len(kinds) != 1:
        raise ValueError(f"cannot fuse projections of different kinds {sorted(map(str, kinds))}; fuse before "
                         "quantizing or quantize every layer the same way")
    first = parts[0]
    with torch.no_grad():
        if type(first) is Linear:
            w = torch.cat([p.weight for p in parts])  # (sum of out_features, in_features)
            fused = Linear(first.in_features, w.shape[0], device="meta", dtype=w.dtype, impl=first.impl)
            fused.weight = nn.Parameter(w, requires_grad=first.weight.requires_grad)
            return fused
        if type(first) is Int8Linear:
            return Int8Linear.from_quantized(torch.cat([p.q for p in parts]), torch.cat([p.scale for p in parts]),
                                             first.tuned)
        if type(first) is Int4Linear:
            packed, scale, low = (torch.cat([getattr(p, n) for p in parts]) for n in ("packed", "scale", "low"))
            return Int4Linear.from_quantized(packed, scale, low, first.group_size, first.tuned)
    raise ValueError(f"cannot fuse {type(first).__name__} projections: only Linear, Int8Linear and Int4Linear")


def split_linear(fused: nn.Module, sizes: Sequence[int]) -> list[nn.Module]:
    """``concat_linears``' inverse: layers of ``sizes`` output rows each, copies of the fused rows."""
    with torch.no_grad():
        if type(fused) is Linear:
            out = []
            for w in fused.weight.split(list(sizes)):  # (size, in_features) each
                lin = Linear(fused.in_features, w.shape[0], device="meta", dtype=w.dtype, impl=fused.impl)
                lin.weight = nn.Parameter(w.clone(), requires_grad=fused.weight.requires_grad)
                out.append(lin)
            return out
        if type(fused) is Int8Linear:
            return [Int8Linear.from_quantized(q.clone(), s.clone(), fused.tuned)
                    for q, s in zip(fused.q.split(list(sizes)), fused.scale.split(list(sizes)))]
        if type(fused) is Int4Linear:
            rows = zip(*(getattr(fused, n).split(list(sizes)) for n in ("packed", "scale", "low")))
            return [Int4Linear.from_quantized(p.clone(), s.clone(), lo.clone(), fused.group_size, fused.tuned)
                    for p, s, lo in rows]
    raise ValueError(f"cannot split a {type(fused).__name__}: only Linear, Int8Linear and Int4Linear")


def _swap_children(parent: nn.Module, old: Sequence[str], new: dict[str, nn.Module]) -> None:
    """Put ``new`` children where the first of ``old`` stood (so parameters keep their order) and
    leave each old name as a plain ``None`` attribute: the forward's test for which path to take."""
    order = list(parent._modules)
    at = order.index(old[0])
    for name in old:
        delattr(parent, name)
        setattr(parent, name, None)
    for name, module in new.items():
        setattr(parent, name, module)  # nn.Module drops the plain None attribute of that name first
    order = [n for n in order[:at] if n not in old] + list(new) + [n for n in order[at:] if n not in old]
    reordered = {n: parent._modules[n] for n in order}
    parent._modules.clear()
    parent._modules.update(reordered)


@torch.no_grad()
def fuse_projections(model: nn.Module) -> nn.Module:
    """In place: every ``MultiHeadSelfAttention``'s q_proj, k_proj, v_proj become one ``qkv_proj``
    ((H + 2 Hkv) D, d_model), every ``SwiGLU``'s gate_proj, up_proj one ``gate_up_proj`` (2 d_ff,
    d_model); the separate layers are dropped (set to None), so no weight is held twice. Plain,
    int8 or int4 layers; dtype, device and ``Linear.impl`` kept; q_norm/k_norm (they act on the
    split heads) untouched. A fused layer is left as it is, so fusing twice changes nothing.
    Returns ``model``. Inference only (module docstring)."""
    for module in list(model.modules()):
        lay = _layout(module)
        if lay is None or getattr(module, lay[0]) is not None:
            continue
        name, parts, _ = lay
        _swap_children(module, parts, {name: concat_linears([getattr(module, p) for p in parts])})
    return model


@torch.no_grad()
def unfuse_projections(model: nn.Module) -> nn.Module:
    """``fuse_projections``' inverse, in place and exact (the rows are copied back, in the original
    parameter order): the separate q/k/v and gate/up layers again, e.g. to train or to ``state_dict``
    the model. A model with nothing fused is left as it is. Returns ``model``."""
    for module in list(model.modules()):
        lay = _layout(module)
        if lay is None or getattr(module, lay[0]) is None:
            continue
        name, parts, sizes = lay
        _swap_children(module, (name,), dict(zip(parts, split_linear(getattr(module, name), sizes))))
    return model


def unfused_parameters(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """``model.named_parameters()`` with each fused projection's weight given as its parts' (row views,
    under the unfused names, in the unfused order): what an export writes, so a saved fused model
    is an ordinary Llama folder."""
    fused = {}
    for prefix, module in model.named_modules():
        lay = _layout(module)
        if lay is not None and getattr(module, lay[0]) is not None:
            fused[f"{prefix}.{lay[0]}.weight".lstrip(".")] = (prefix, lay[1], lay[2])
    for name, p in model.named_parameters():
        if name not in fused:
            yield name, p
            continue
        prefix, parts, sizes = fused[name]
        for part, w in zip(parts, p.split(list(sizes))):
            yield f"{prefix}.{part}.weight".lstrip("."), w
