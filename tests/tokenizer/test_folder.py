"""kiln.tokenizer.folder: one lookup of the tokenizer behind a model, run, tokens or checkpoint folder;
both formats read; a model folder's Hugging Face files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizer_samples import VARIED

from kiln.tokenizer import Tokenizer, find_tokenizer, load_tokenizer, save_tokenizer_files, train_bpe


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Tokenizer:
    p = tmp_path_factory.mktemp("c") / "c.txt"
    p.write_text("\n".join(VARIED) + "<|endoftext|>", encoding="utf-8")
    vocab, merges = train_bpe(str(p), 300, ["<|endoftext|>"])
    return Tokenizer(vocab, merges, ["<|endoftext|>"])


def _manifest(d: Path, *inputs: Path) -> None:
    d.mkdir(parents=True, exist_ok=True)
    (d / "manifest.json").write_text(json.dumps({"inputs": {str(p): "h" for p in inputs}}))


def test_find_through_manifests_and_above(tmp_path, tok):
    (tmp_path / "tokenizer").mkdir()
    tok.save(tmp_path / "tokenizer")
    _manifest(tmp_path / "tokens", tmp_path / "tokenizer")
    _manifest(tmp_path / "run", tmp_path / "tokens")
    want = tmp_path / "tokenizer" / "tokenizer.json"
    assert find_tokenizer(tmp_path / "tokens") == want  # the trainer's lookup
    (tmp_path / "run" / "model").mkdir()
    assert find_tokenizer(tmp_path / "run" / "model") == want  # eval / generate: the run's manifest
    step = tmp_path / "run" / "checkpoints" / "step_000010"
    step.mkdir(parents=True)
    assert find_tokenizer(step) == want  # a checkpoint: two folders up
    assert find_tokenizer(want) == want
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        find_tokenizer(tmp_path / "elsewhere")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        find_tokenizer(tmp_path / "tokenizer" / "missing")  # never a tokenizer found above a typo


def test_model_folder_files_and_both_formats(tmp_path, tok):
    pytest.importorskip("transformers")
    from transformers import AutoTokenizer

    d = save_tokenizer_files(tok, tmp_path / "model", chat_template="{{ messages }}")
    names = sorted(p.name for p in d.iterdir())
    assert names == ["kiln_tokenizer.json", "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert find_tokenizer(d).name == "kiln_tokenizer.json"  # Kiln's own format wins in a folder
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == "{{ messages }}" and cfg["eos_token"] == "<|endoftext|>"
    text = " ".join(VARIED) + "<|endoftext|>tail"
    ids = tok.encode(text)
    hf = AutoTokenizer.from_pretrained(d)
    assert hf.encode(text) == ids and hf.eos_token_id == tok.special_tokens["<|endoftext|>"]
    assert hf.decode(ids) == text
    # Hugging Face's file alone, Kiln's file under the old name: both load to the same tokenizer
    (d / "kiln_tokenizer.json").unlink()
    assert load_tokenizer(d).encode(text) == ids and load_tokenizer(d / "tokenizer.json").vocab == tok.vocab
    old = tmp_path / "old_model"
    old.mkdir()
    tok.save(old / "tokenizer.json")
    assert load_tokenizer(old).encode(text) == ids and Tokenizer.load(old).merges == tok.merges
