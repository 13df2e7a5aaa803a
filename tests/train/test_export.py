"""kiln export's refusals, each one line naming what to do (the happy path: tests/e2e/test_demo.py)."""

from __future__ import annotations

import pytest

from kiln.artifacts import KilnError
from kiln.tokenizer import Tokenizer
from kiln.train import train
from kiln.train.export import export_checkpoint


def test_export_refusals(tokens_dir, tmp_path, make_config):
    run = train(make_config(max_steps=5, save_every=5, eval_every=0), tokens_dir, tmp_path / "run")
    ckpt = run / "checkpoints" / "step_000005"
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        export_checkpoint(ckpt, tmp_path / "hf")  # synthetic tokens: no tokenizer anywhere
    tok = tmp_path / "bytes.json"
    Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"]).save(tok)
    with pytest.raises(KilnError, match="tokenizer has 257 ids but the model only 64"):
        export_checkpoint(ckpt, tmp_path / "hf", tokenizer=tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KilnError, match="neither a checkpoint"):
        export_checkpoint(tmp_path / "empty", tmp_path / "hf", tokenizer=tok)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(KilnError, match="not a model folder"):
        export_checkpoint(ckpt, tmp_path / "mine", tokenizer=tok)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "hf").exists()
