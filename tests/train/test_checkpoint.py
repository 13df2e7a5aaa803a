"""Checkpoints: round trip (tied weights, optimizer, extra state), and clear errors for bad ones."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.model import ModelConfig, Transformer
from kiln.train import (
    AdamW,
    CheckpointError,
    load_checkpoint,
    restore_checkpoint,
    save_checkpoint,
)


def _model(seed: int = 0, tie: bool = True) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(ModelConfig(vocab_size=32, context_length=8, d_model=16, n_layers=1, n_heads=2,
                                   tie_embeddings=tie))


def _trained(seed: int = 0):
    model = _model(seed)
    opt = AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    for _ in range(2):
        model(torch.randint(0, 32, (2, 8))).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def test_round_trip_restores_everything(tmp_path):
    model, opt = _trained()
    gen = torch.Generator().manual_seed(5)
    extra = {"sampler": {"generator": gen.get_state(), "seed": 5}, "note": "hi", "pair": (1, 2.5), "xs": [1, None]}
    path = save_checkpoint(model, opt, 42, tmp_path / "step_000042", **extra)
    assert sorted(p.name for p in path.iterdir()) == [
        "extra.safetensors", "meta.json", "model.safetensors", "optimizer.safetensors"]
    model2, opt2 = _trained(seed=1)
    it, got = restore_checkpoint(path, model2, opt2)
    assert it == 42 and load_checkpoint(path, model2, opt2) == 42
    for (n, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), n
    assert model2.lm_head.weight is model2.embed_tokens.weight  # tying survives
    s1, s2 = opt.state_dict(), opt2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s1["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])
    assert torch.equal(got["sampler"]["generator"], gen.get_state())
    assert got["note"] == "hi" and got["pair"] == (1, 2.5) and got["xs"] == [1, None]
    # Saving again over the same name replaces it atomically; no temporary directories are left.
    save_checkpoint(model, opt, 43, path)
    assert load_checkpoint(path, model2) == 43
    assert [p.name for p in tmp_path.iterdir()] == ["step_000042"]


def test_truncated_checkpoint_is_one_clear_error(tmp_path):
    model, opt = _trained()
    path = save_checkpoint(model, opt, 1, tmp_path / "ck")
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        load_checkpoint(path, model, opt)
    (path / "meta.json").unlink()
    with pytest.raises(CheckpointError, match="interrupted"):
        load_checkpoint(path, model, opt)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "missing", model)


def test_foreign_or_mismatched_checkpoint_is_refused(tmp_path):
    model, opt = _trained()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "meta.json").write_text(json.dumps({"iteration": 3}))
    with pytest.raises(CheckpointError, match="not a Kiln checkpoint"):
        load_checkpoint(foreign, model)
    (foreign / "meta.json").write_text("\x00garbage{")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(foreign, model)
    path = save_checkpoint(model, opt, 1, tmp_path / "ck")
    torch.manual_seed(0)
    other = Transformer(ModelConfig(vocab_size=32, context_length=8, d_model=32, n_layers=1, n_heads=2))
    with pytest.raises(CheckpointError, match="does not fit this model"):
        load_checkpoint(path, other)
    # A pickle dressed as a checkpoint file is never unpickled: safetensors refuses it.
    torch.save({"x": torch.zeros(1)}, path / "model.safetensors")
    meta = json.loads((path / "meta.json").read_text())
    meta["files"]["model.safetensors"] = (path / "model.safetensors").stat().st_size
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="unreadable"):
        load_checkpoint(path, model)
