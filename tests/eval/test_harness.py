"""The lm-evaluation-harness adapter on a local task definition (skipped without lm-eval)."""

from __future__ import annotations

import json

import pytest

from kiln.eval.multiple_choice import MCItem, score_items

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is optional: pip install lm-eval")

YAML = """task: kiln_toy
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{query}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: gold
metric_list:
  - metric: acc
"""


def test_kiln_lm_on_a_local_task(tmp_path, monkeypatch, bigram, char_tok):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    rows = [{"query": "q:", "choices": ["a", "bbb", "ééé"], "gold": g} for g in (0, 1, 2, 0)]
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "kiln_toy.yaml").write_text(YAML.format(path=data))

    from lm_eval.tasks import TaskManager

    from kiln.eval.harness import lm_class, register

    assert register() is lm_class()
    lm = lm_class()(model=bigram, tokenizer=char_tok, batch_size=4)
    out = lm_eval.simple_evaluate(model=lm, tasks=["kiln_toy"],
                                  task_manager=TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False))
    acc = out["results"]["kiln_toy"]["acc,none"]
    ours = score_items(bigram, char_tok, [MCItem.shared_context("q: ", r["choices"], r["gold"]) for r in rows])
    assert acc == ours.acc == 0.5  # " a" (-3 ln2) always wins unnormalized; gold 0 twice of four


def test_loglikelihood_and_rolling_match_kiln(bigram, char_tok):
    from kiln.eval.harness import lm_class
    from kiln.eval.perplexity import text_loss

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = lm_class()(model=bigram, tokenizer=char_tok)
    (lp, greedy), = lm.loglikelihood([Req("q:", " bb")])
    assert lp == pytest.approx(score_items(bigram, char_tok, [MCItem((("q:", " bb"),), 0, "lm")]).items[0].logprobs[0])
    assert greedy
    roll, = lm.loglikelihood_rolling([Req("q: ab")])
    ref = text_loss(bigram, [char_tok.encode("q: ab")], char_tok.token_bytes(), 0)
    assert roll == pytest.approx(-ref.loss * ref.tokens)
    assert lm.generate_until([Req("q:", {"until": ["bb"], "max_gen_toks": 5})]) == [" "]


def test_kiln_lm_from_a_model_directory(tmp_path):
    import torch

    from kiln.eval.harness import lm_class
    from kiln.model import ModelConfig, Transformer, save_pretrained
    from kiln.tokenizer import Tokenizer

    torch.manual_seed(0)
    save_pretrained(Transformer(ModelConfig(vocab_size=257, context_length=32, d_model=32, n_layers=1, n_heads=2)),
                    tmp_path / "model")
    Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"]).save(tmp_path / "tokenizer.json")

    class Req:
        def __init__(self, *args):
            self.args = args

    lm = lm_class()(model=str(tmp_path / "model"), device="cpu")  # tokenizer found beside the model
    (lp, _), = lm.loglikelihood([Req("Hello", " world")])
    assert lp < 0
    # generate_until decodes a Kiln model's requests in batches: the same text as one at a time
    from kiln.eval.generative import decode

    reqs = [Req("Hello", {"until": ["\n"], "max_gen_toks": 6}), Req("Hi there", {"until": ["\n"], "max_gen_toks": 6}),
            Req("A", {"max_gen_toks": 3})]
    assert lm.generate_until(reqs) == [decode(lm.model, lm.tok, r.args[0], r.args[1]["max_gen_toks"],
                                              stop=r.args[1].get("until", [])) for r in reqs]


def test_model_args_win_over_cli_defaults(bigram, char_tok):
    from kiln.eval.harness import lm_class

    lm = lm_class().create_from_arg_obj({"model": bigram, "tokenizer": char_tok, "batch_size": 8},
                                        {"batch_size": 1, "device": None})
    assert lm.bs == 8
