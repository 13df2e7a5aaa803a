"""``kiln export``: a training checkpoint (or run, or older model folder) to a Hugging Face folder.

A checkpoint (``checkpoints/step_N``) holds Kiln's parameter names (``layers.0.mlp.up_proj.weight``,
no ``model.`` prefix), the optimizer and the run state, and no ``config.json``: the model config is
the ``model`` part of the train config saved in its ``meta.json``. Exporting builds the model from
that config, loads the weights and writes the folder ``save_pretrained`` writes (``config.json``,
``model.safetensors`` in ``LlamaForCausalLM`` names, the tokenizer files), so
``AutoModelForCausalLM``, ``AutoTokenizer``, lm-eval's ``--model hf`` and ``kiln generate`` open it.
"""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path

import torch

from kiln.artifacts import KilnError
from kiln.model import ModelConfig, Transformer, load_pretrained, save_pretrained
from kiln.tokenizer import load_tokenizer
from kiln.train.checkpoint import CheckpointError, load_checkpoint, load_checkpoint_extra

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete whole-model checkpoint of a run directory, or None."""
    steps = sorted(p for p in (run_dir / "checkpoints").glob("step_*") if (p / "meta.json").is_file())
    return steps[-1] if steps else None


def _model_from_checkpoint(ckpt: Path) -> Transformer:
    if (ckpt / "trainer" / "meta.json").is_file():
        raise CheckpointError(f"{ckpt} is a sharded (FSDP / ZeRO-1) checkpoint; resume the run on one process "
                              "(--dist-strategy ddp, no --zero1) to write a whole-model checkpoint, then export that")
    saved = load_checkpoint_extra(ckpt).get("config", {})
    if not isinstance(saved, dict) or not isinstance(saved.get("model"), dict):
        raise CheckpointError(f"{ckpt}/meta.json records no model config (extra.config.model); "
                              "it was not written by `kiln train`: export a checkpoint of a Kiln run")
    config = ModelConfig.from_dict(saved["model"])
    with torch.device("meta"):
        model = Transformer(config)
    model.to_empty(device="cpu")
    model.rope.reset_parameters()  # the RoPE tables are buffers, not in the checkpoint
    model.tie_weights()
    load_checkpoint(ckpt, model)
    return model


def export_checkpoint(
    source: str | os.PathLike, out_dir: str | os.PathLike, tokenizer: str | os.PathLike | None = None,
    dtype: str | None = None, chat_template: str | None = None,
) -> Path:
    """Write a Hugging Face folder for ``source`` into ``out_dir`` (atomically); returns ``out_dir``.

    source: a checkpoint folder (``checkpoints/step_N``), a run folder (its newest checkpoint, or
        its ``model/`` when no checkpoint is left), or a model folder (re-written with Hugging
        Face's tokenizer files: how an older Kiln model folder is brought up to date).
    tokenizer: default: found from ``source`` (``kiln.tokenizer.find_tokenizer``).
    dtype: "fp32", "bf16" or "fp16" for the weights; default: as stored.
    chat_template: a Jinja template written into ``tokenizer_config.json``.
    """
    src, out = Path(source), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f"{src} does not exist; pass a checkpoint (run/checkpoints/step_N), a run or a model folder")
    if out.exists() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise KilnError(f"{out} exists and is not a model folder; pass a new folder (an earlier export is replaced)")
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    ckpt = src if (src / "meta.json").is_file() or (src / "trainer" / "meta.json").is_file() else newest_checkpoint(src)
    if ckpt is not None:
        model = _model_from_checkpoint(ckpt)
    elif (src / "config.json").is_file() or (src / "model" / "config.json").is_file():
        model = load_pretrained(src)
    else:
        raise KilnError(f"{src} is neither a checkpoint (no meta.json), a run with checkpoints, nor a model "
                        "folder (no config.json); pass run/checkpoints/step_N")
    tok = load_tokenizer(tokenizer if tokenizer is not None else src)
    if tok.vocab_size > model.config.vocab_size:
        raise KilnError(f"the tokenizer has {tok.vocab_size} ids but the model only {model.config.vocab_size}; "
                        "pass the tokenizer the run was trained with (--tokenizer)")
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        save_pretrained(model, tmp, dtype=DTYPES.get(dtype or ""), tokenizer=tok, chat_template=chat_template)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
