"""Hugging Face Llama interop: state-dict loading, ``save_pretrained`` / ``load_pretrained``.

A saved model directory holds ``config.json`` (``LlamaConfig`` field names plus a ``"kiln"`` block
with the full ``ModelConfig``) and ``model.safetensors`` in the ``LlamaForCausalLM`` key layout
(``model.layers.0.self_attn.q_proj.weight``, ``lm_head.weight``), so
``transformers.LlamaForCausalLM.from_pretrained(dir)`` loads it and ``load_pretrained`` reads
Hugging Face Llama directories (safetensors only: pickled ``.bin`` files are never opened).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from kiln.model.config import ModelConfig
from kiln.model.transformer import Transformer

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"
_HF_PREFIX = "model."


def _strip_hf_prefix(name: str) -> str:
    return name.removeprefix(_HF_PREFIX)


@torch.no_grad()
def load_llama_state_dict(model: Transformer, state_dict: dict[str, Tensor]) -> None:
    """Copy Llama-layout tensors into ``model`` in place (dtype cast to the model's).

    Accepts Kiln names (``layers.0.mlp.up_proj.weight``) and Hugging Face ``LlamaForCausalLM`` names
    (the same with a ``model.`` prefix; ``lm_head.weight`` has none). Ignores HF's saved
    ``rotary_emb.inv_freq`` buffers, and ``lm_head.weight`` when the model ties embeddings.
    Missing, unexpected or mis-shaped tensors raise one ValueError listing them.
    """
    sd = {_strip_hf_prefix(k): v for k, v in state_dict.items() if not k.endswith("rotary_emb.inv_freq")}
    params = dict(model.named_parameters())  # a tied lm_head.weight appears once, as embed_tokens.weight
    tied = model.config.tie_embeddings
    if tied:
        sd.pop("lm_head.weight", None)
    missing = sorted(set(params) - set(sd))
    unexpected = sorted(set(sd) - set(params))
    problems = []
    if missing:
        hint = ""
        if missing == ["lm_head.weight"]:
            hint = " (the source ties its embeddings: build the model with tie_embeddings=True)"
        problems.append(f"missing {missing[:6]}{' ...' if len(missing) > 6 else ''}{hint}")
    if unexpected:
        problems.append(f"unexpected {unexpected[:6]}{' ...' if len(unexpected) > 6 else ''}")
    if any(k.endswith(("qkv_proj.weight", "gate_up_proj.weight")) for k in params):
        problems.append("the model's projections are fused (kiln.model.fuse_projections): load into the "
                        "unfused model, then fuse")
    bad_shapes = [
        f"{k}: model {tuple(params[k].shape)} vs given {tuple(sd[k].shape)}"
        for k in sorted(set(params) & set(sd))
        if tuple(params[k].shape) != tuple(sd[k].shape)
    ]
    if bad_shapes:
        problems.append(f"shape mismatch {bad_shapes[:4]}")
    if problems:
        raise ValueError(
            "state dict does not match the model's ModelConfig: " + "; ".join(problems)
            + ". Build the model from the config the weights were saved with."
        )
    for k, p in params.items():
        p.copy_(sd[k])
    model.tie_weights()


def to_hf_state_dict(model: Transformer, dtype: torch.dtype | None = None) -> dict[str, Tensor]:
    """The model's tensors under ``LlamaForCausalLM`` names, contiguous, on the CPU.

    A tied ``lm_head.weight`` is left out (Hugging Face re-ties it from ``tie_word_embeddings``).
    A model with fused projections (``kiln.model.fuse_projections``) gives its separate q/k/v and
    gate/up matrices (``unfused_parameters``), so its saved folder is an ordinary one.
    """
    from kiln.model.fuse import unfused_parameters

    out = {}
    for name, p in unfused_parameters(model):
        key = name if name.startswith("lm_head.") else _HF_PREFIX + name
        t = p.detach().to("cpu")
        if t.untyped_storage().nbytes() > t.numel() * t.element_size():  # rows of a fused matrix: their own copy
            t = t.clone()
        out[key] = (t if dtype is None else t.to(dtype)).contiguous()
    return out


def hf_config_dict(config: ModelConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """A ``LlamaConfig``-compatible dict for ``config``, with the full ModelConfig under ``"kiln"``."""
    dtype_name = str(dtype).removeprefix("torch.")
    # QK-norm is Qwen3's layout (q_norm/k_norm per head, same names): export as Qwen3 then.
    arch, model_type = ("Qwen3ForCausalLM", "qwen3") if config.qk_norm else ("LlamaForCausalLM", "llama")
    return {
        "architectures": [arch],
        "model_type": model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.d_model,
        "intermediate_size": config.d_ff,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.context_length,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        # transformers >= 5 reads RoPE settings from here; older versions read rope_theta above.
        "rope_parameters": {"rope_type": "default", "rope_theta": config.rope_theta},
        "rope_scaling": None,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": 0.0,
        "initializer_range": 0.02,
        "torch_dtype": dtype_name,  # transformers < 5
        "dtype": dtype_name,
        "kiln": config.to_dict(),
    }


def config_from_hf(hf: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig from a Hugging Face Llama ``config.json`` dict (the ``"kiln"`` block wins if present)."""
    if "kiln" in hf:
        return ModelConfig.from_dict(hf["kiln"])
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" and "LlamaForCausalLM" not in archs:
        raise ValueError(
            f"{source} describes model_type={hf.get('model_type')!r} {archs}, not a Llama model; "
            "Kiln loads only Llama-architecture checkpoints"
        )
    unsupported = []
    scaling = hf.get("rope_scaling") or {}
    rope_params = hf.get("rope_parameters") or {}
    if scaling.get("rope_type", scaling.get("type", "default")) != "default" or rope_params.get("rope_type", "default") != "default":
        unsupported.append(f"RoPE scaling {scaling or rope_params}")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        unsupported.append("bias terms (attention_bias/mlp_bias)")
    if hf.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf.get('hidden_act')!r}")
    d, h = hf["hidden_size"], hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, d // h):
        unsupported.append(f"head_dim={hf['head_dim']} != hidden_size/num_attention_heads={d // h}")
    if unsupported:
        raise ValueError(f"{source}: Kiln's Transformer does not support {', '.join(unsupported)}")
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        context_length=hf.get("max_position_embeddings", 2048),
        d_model=d,
        n_layers=hf["num_hidden_layers"],
        n_heads=h,
        n_kv_heads=hf.get("num_key_value_heads") or h,
        d_ff=hf["intermediate_size"],
        rope_theta=float(rope_params.get("rope_theta", hf.get("rope_theta", 10000.0))),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
    )


def save_pretrained(
    model: Transformer, out_dir: str | os.PathLike, dtype: torch.dtype | None = None,
    tokenizer: Any = None, chat_template: str | None = None,
) -> Path:
    """Write ``config.json`` and ``model.safetensors`` (HF Llama layout) into ``out_dir``; returns it.

    dtype: cast the weights (e.g. torch.bfloat16 to halve the file); default: the model's dtype.
    tokenizer: a ``kiln.tokenizer.Tokenizer`` whose files go beside the weights (Hugging Face's
    ``tokenizer.json``, ``tokenizer_config.json`` with ``chat_template`` if given,
    ``special_tokens_map.json``, and Kiln's ``kiln_tokenizer.json``), so ``AutoTokenizer`` and
    ``AutoModelForCausalLM`` open the folder as it is. Each file is written to a temporary name and
    renamed, so a killed save leaves no half file.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sd = to_hf_state_dict(model, dtype)
    stored_dtype = next(iter(sd.values())).dtype
    tmp = out / f".{WEIGHTS_FILE}.tmp"
    save_file(sd, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, out / WEIGHTS_FILE)
    tmp = out / f".{CONFIG_FILE}.tmp"
    tmp.write_text(json.dumps(hf_config_dict(model.config, stored_dtype), indent=2) + "\n")
    os.replace(tmp, out / CONFIG_FILE)
    if tokenizer is not None:
        from kiln.tokenizer import save_tokenizer_files

        save_tokenizer_files(tokenizer, out, chat_template=chat_template)
    return out


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as e:  # safetensors raises its own error types for truncated/foreign files
        raise ValueError(
            f"{path} is not a readable safetensors file ({type(e).__name__}: {e}); "
            "it may be truncated or of another format: re-export it with save_pretrained"
        ) from e


def load_pretrained(
    model_dir: str | os.PathLike,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    attention_impl: str | None = None,
) -> Transformer:
    """Load a model directory written by ``save_pretrained`` or a Hugging Face Llama directory.

    ``model_dir`` may also be a finished train run directory: its ``model/`` is loaded.
    device: where the weights go (default CPU). dtype: default the stored dtype.
    attention_impl: override the saved ``ModelConfig.attention_impl`` (e.g. "sdpa" on a GPU).
    Only safetensors are read; a pickled ``pytorch_model.bin`` is refused.
    """
    import dataclasses

    d = Path(model_dir)
    if not (d / CONFIG_FILE).is_file() and (d / "model" / CONFIG_FILE).is_file():
        d = d / "model"  # a train run directory: training writes its final weights to model/
    cfg_path = d / CONFIG_FILE
    if not cfg_path.is_file():
        what = "does not exist" if not d.exists() else f"has no {CONFIG_FILE}"
        raise FileNotFoundError(
            f"model directory {d} {what}; pass a directory written by save_pretrained (a train run's model/)"
        )
    try:
        hf = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{cfg_path} is not valid JSON ({e}); re-export the model") from e
    config = config_from_hf(hf, str(cfg_path))
    if attention_impl is not None:
        config = dataclasses.replace(config, attention_impl=attention_impl)

    if (d / WEIGHTS_FILE).is_file():
        sd = _read_safetensors(d / WEIGHTS_FILE)
    elif (d / WEIGHTS_INDEX_FILE).is_file():
        index = json.loads((d / WEIGHTS_INDEX_FILE).read_text())
        sd = {}
        for shard in sorted(set(index["weight_map"].values())):
            sd.update(_read_safetensors(d / shard))
    elif any(d.glob("*.bin")) or any(d.glob("*.pt")):
        raise ValueError(
            f"{d} holds only pickled weights; Kiln never unpickles. Convert them to safetensors "
            "(e.g. transformers' save_pretrained(..., safe_serialization=True))"
        )
    else:
        raise FileNotFoundError(f"{d} has no {WEIGHTS_FILE}; the export is incomplete: re-run save_pretrained")

    if dtype is None:
        dtype = next(iter(sd.values())).dtype if sd else torch.float32
    with torch.device("meta"):
        model = Transformer(config, dtype=dtype)
    model.to_empty(device=device or "cpu")
    model.rope.reset_parameters()  # fill the RoPE tables; every parameter is overwritten next
    model.tie_weights()
    load_llama_state_dict(model, sd)
    return model
