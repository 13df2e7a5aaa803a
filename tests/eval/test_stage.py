"""The eval stage end to end on a tiny Kiln model: artifact, report, CLI, vocab check, QuickEval."""

from __future__ import annotations

import json

import pytest
import torch

from kiln.eval.stage import EvalConfig, QuickEval, evaluate_tasks, find_tokenizer, run_eval


def _byte_tokenizer():
    from kiln.tokenizer import Tokenizer

    return Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])


def _tiny_model(vocab_size=257):
    from kiln.model import ModelConfig, Transformer

    torch.manual_seed(0)
    return Transformer(ModelConfig(vocab_size=vocab_size, context_length=64, d_model=32, n_layers=1, n_heads=2))


@pytest.fixture
def data_dir(tmp_path):
    d = tmp_path / "evaldata"
    (d / "hellaswag").mkdir(parents=True)
    rows = [{"activity_label": "Cat", "ctx_a": f"A cat number {i} sits.", "ctx_b": "it", "ctx": f"A cat number {i} sits. it", "endings": ["jumps.", "sleeps.", "x.", "y."],
             "label": i % 4} for i in range(6)]
    (d / "hellaswag" / "hellaswag_val_subset1000_original_format.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in rows))
    (d / "llm_foundry_local_data" / "world_knowledge").mkdir(parents=True)
    arc = [{"query": f"Question: what is {i}?", "choices": ["one", "two", "three"], "gold": i % 3} for i in range(5)]
    (d / "llm_foundry_local_data" / "world_knowledge" / "arc_easy.jsonl").write_text(
        "".join(json.dumps(r) + "\n" for r in arc))
    (d / "gsm8k").mkdir()
    g = [{"question": f"What is {i}+1?", "answer": f"{i}+1={i + 1}\n#### {i + 1}"} for i in range(4)]
    for split in ("train", "test"):
        (d / "gsm8k" / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in g))
    return d


@pytest.fixture
def model_dir(tmp_path):
    from kiln.model import save_pretrained

    d = tmp_path / "run" / "model"
    save_pretrained(_tiny_model(), d)
    _byte_tokenizer().save(tmp_path / "run" / "tokenizer.json")
    return d


def test_run_eval_writes_artifact(tmp_path, model_dir, data_dir):
    (tmp_path / "held.txt").write_text("Some held-out text. " * 20)
    cfg = EvalConfig(model=str(model_dir), tasks=("hellaswag", "arc_easy", "gsm8k"), data_dir=str(data_dir),
                     limit=4, text=(str(tmp_path / "held.txt"),), max_new_tokens=4, device="cpu")
    out = run_eval(cfg, tmp_path / "eval")
    res = json.loads((out / "results.json").read_text())
    assert set(res["tasks"]) == {"hellaswag", "arc_easy", "gsm8k"}
    hs = res["tasks"]["hellaswag"]
    assert hs["n"] == 4 and hs["baseline"] == 0.25 and hs["metric"] == "acc_norm"
    assert hs["centered"] == pytest.approx((hs["score"] - 0.25) / 0.75)
    assert res["tasks"]["arc_easy"]["baseline"] == pytest.approx(1 / 3)
    assert res["core"] == pytest.approx((hs["centered"] + res["tasks"]["arc_easy"]["centered"]) / 2)
    assert res["text"]["tokens"] == 400 and 7 < res["text"]["bits_per_byte"] < 10  # random init ~ log2(257)
    md = (out / "results.md").read_text()
    assert "| hellaswag | 4 | acc_norm |" in md and "bits/byte" in md
    assert (out / "results.png").stat().st_size > 1000
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["stage"] == "eval" and manifest["stats"]["core"] == res["core"]
    # unchanged config and inputs: reused
    assert run_eval(cfg, tmp_path / "eval") == out


def test_cli(tmp_path, model_dir, data_dir, capsys):
    from kiln.cli.main import main

    rc = main(["eval", "--model", str(model_dir), "--out", str(tmp_path / "ev"), "--tasks", "arc_easy",
               "--data-dir", str(data_dir), "--limit", "2", "--device", "cpu"])
    assert rc == 0 and "| arc_easy | 2 |" in capsys.readouterr().out
    rc = main(["eval", "--model", str(model_dir), "--out", str(tmp_path / "ev2"), "--tasks", "nope",
               "--data-dir", str(data_dir)])
    assert rc == 1 and "unknown task 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "ev2").exists()


def test_vocab_mismatch_is_refused(tmp_path, data_dir):
    from kiln.model import save_pretrained

    save_pretrained(_tiny_model(vocab_size=4096), tmp_path / "m")
    _byte_tokenizer().save(tmp_path / "tok.json")
    cfg = EvalConfig(model=str(tmp_path / "m"), tokenizer=str(tmp_path / "tok.json"), tasks=("arc_easy",),
                     data_dir=str(data_dir), device="cpu")
    with pytest.raises(ValueError, match="vocabulary mismatch: the model has vocab_size=4096 but the tokenizer has 257"):
        run_eval(cfg, tmp_path / "eval")


def test_find_tokenizer_through_manifests(tmp_path, model_dir):
    assert find_tokenizer(model_dir) == tmp_path / "run" / "tokenizer.json"
    (tmp_path / "tokdir").mkdir()
    _byte_tokenizer().save(tmp_path / "tokdir" / "tokenizer.json")
    (tmp_path / "tokens").mkdir()
    (tmp_path / "tokens" / "manifest.json").write_text(json.dumps({"inputs": {str(tmp_path / "tokdir"): "x"}}))
    (tmp_path / "train" / "model").mkdir(parents=True)
    (tmp_path / "train" / "manifest.json").write_text(json.dumps({"inputs": {str(tmp_path / "tokens"): "x"}}))
    assert find_tokenizer(tmp_path / "train" / "model") == tmp_path / "tokdir" / "tokenizer.json"
    with pytest.raises(FileNotFoundError, match="--tokenizer"):
        find_tokenizer(tmp_path / "lonely" / "model")


def test_quick_eval_restores_train_mode(data_dir):
    model = _tiny_model().train()
    qe = QuickEval(_byte_tokenizer(), tasks=("hellaswag", "arc_easy"), limit=3, data_dir=data_dir)
    m = qe(model)
    assert set(m) == {"eval/hellaswag", "eval/arc_easy", "eval/core"} and model.training
    full = evaluate_tasks(model.eval(), _byte_tokenizer(), ["hellaswag", "arc_easy"], data_dir, limit=3)
    assert m["eval/hellaswag"] == full["tasks"]["hellaswag"]["score"]
    assert m["eval/core"] == pytest.approx(full["core"])


def test_suites_expand_and_the_report_shows_margins(tmp_path, model_dir, data_dir):
    from kiln.eval.stage import expand_tasks
    from kiln.eval.tasks import TASKS

    assert expand_tasks(("all",)) == (*TASKS, "gsm8k", "math500")
    assert "mmlu" not in expand_tasks(("core",)) and "hellaswag" in expand_tasks(("core",))
    assert expand_tasks(("arc_easy", "core")).count("arc_easy") == 1
    cfg = EvalConfig(model=str(model_dir), tasks=("hellaswag", "gsm8k"), data_dir=str(data_dir), limit=6,
                     gen_limit=2, max_new_tokens=3, device="cpu", scoring="rows", gen_batch_size=2)
    res = json.loads((run_eval(cfg, tmp_path / "ev") / "results.json").read_text())
    hs, g = res["tasks"]["hellaswag"], res["tasks"]["gsm8k"]
    assert hs["n"] == 6 and g["n"] == 2 and g["stderr"]["acc"] == pytest.approx((g["acc"] * (1 - g["acc"]) / 2) ** 0.5)
    assert hs["stderr"]["acc_norm"] == pytest.approx((hs["score"] * (1 - hs["score"]) / 6) ** 0.5)
    assert res["run"]["device"].startswith("cpu") and res["run"]["params"] > 0
    md = (tmp_path / "ev" / "results.md").read_text()
    assert "(score - random) / stderr" in md and "CORE-style centered mean** over 1 tasks" in md
    with pytest.raises(ValueError, match="--scoring"):
        EvalConfig(scoring="fast")


def test_check_vocab_both_directions():
    from kiln.eval.lm import check_vocab

    tok = _byte_tokenizer()
    check_vocab(_tiny_model(257), tok)
    check_vocab(_tiny_model(320), tok)  # padded to a multiple of 64: fine
    for v in (200, 257 + 1024):
        with pytest.raises(ValueError, match=f"vocabulary mismatch: the model has vocab_size={v}"):
            check_vocab(_tiny_model(v), tok)
