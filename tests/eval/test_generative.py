"""Answer extraction and checking (GSM8K, MATH), pass@k, decoding and the generative loop."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kiln.eval.answers import answers_match, extract_boxed, extract_gsm8k, normalize_math, to_number
from kiln.eval.generative import GenItem, decode, evaluate_generative, load_gsm8k, load_math, pass_at_k


@pytest.mark.parametrize("text,ans", [
    ("She pays 3 * 2 = 6.\n#### 42", "42"),
    ("#### 1,234", "1234"),
    ("#### $18.00", "18"),
    ("so the answer is 7.", "7"),
    ("The answer is: -3.5", "-3.5"),
    ("First 12 eggs, then 5 more, 17 total", "17"),
    ("no digits here", None),
])
def test_extract_gsm8k(text, ans):
    assert extract_gsm8k(text) == ans


@pytest.mark.parametrize("text,ans", [
    ("so $\\boxed{\\frac{1}{2}}$.", "\\frac{1}{2}"),
    ("\\boxed{a} then \\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("\\boxed 5", "5"),
    ("\\fbox{x^{2}}", "x^{2}"),
    ("\\boxed{unclosed", None),
    ("nothing", None),
])
def test_extract_boxed(text, ans):
    assert extract_boxed(text) == ans


@pytest.mark.parametrize("a,b", [
    ("1/2", "0.5"), ("\\frac{1}{2}", "0.5"), ("\\dfrac{1}{2}", "\\frac12"), ("0.50", ".5"),
    ("1,000", "1000"), ("-\\frac{3}{4}", "-0.75"), ("10\\%", "10"), ("\\$5", "5"), ("90^\\circ", "90"),
    ("\\left(3,\\frac{\\pi}{2}\\right)", "(3, \\frac{\\pi}{2})"), ("\\text{ (B) }", "(B)"),
])
def test_equivalent_answers(a, b):
    assert answers_match(a, b, symbolic=False)


@pytest.mark.parametrize("a,b", [("1/3", "0.33"), ("2", "3"), (None, "1"), ("x", "y")])
def test_different_answers(a, b):
    assert not answers_match(a, b)


def test_symbolic_equivalence_with_math_verify():
    pytest.importorskip("math_verify")
    assert answers_match("\\sqrt{8}", "2\\sqrt{2}")
    assert not answers_match("\\sqrt{8}", "3\\sqrt{2}")


def test_number_parsing():
    assert to_number("\\frac{6}{4}") == to_number("3/2") == to_number("1.5")
    assert to_number("x+1") is None and normalize_math(" $ 12.0 $ ") == "12"


def test_pass_at_k():
    assert pass_at_k(5, 0, 1) == 0.0 and pass_at_k(5, 5, 3) == 1.0
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(4, 1, 2) == pytest.approx(1 - math.comb(3, 2) / math.comb(4, 2))  # 0.5
    with pytest.raises(ValueError):
        pass_at_k(2, 1, 3)


def test_loaders_and_errors(tmp_path):
    g = tmp_path / "g.jsonl"
    g.write_text(json.dumps({"question": "1+1?", "answer": "1+1=2\n#### 2"}) + "\n"
                 + json.dumps({"question": "x", "answer": "no marker"}) + "\n")
    assert load_gsm8k(g, limit=1)[0].answer == "2"
    with pytest.raises(ValueError, match=r"g\.jsonl:2: .*####"):
        load_gsm8k(g)
    m = tmp_path / "m.jsonl"
    m.write_text(json.dumps({"problem": "p", "solution": "so \\boxed{\\frac{1}{2}}"}) + "\n"
                 + json.dumps({"problem": "p", "solution": "no box"}) + "\n")
    assert load_math(m, limit=1)[0].answer == "\\frac{1}{2}"
    with pytest.raises(ValueError, match=r"m\.jsonl:2: .*boxed"):
        load_math(m)


def test_real_files(shared_data):
    g = load_gsm8k(shared_data / "eval/gsm8k/test.jsonl", limit=3)
    assert g[0].answer == "18"
    m = load_math(shared_data / "eval/math/MATH500_test.jsonl", limit=3)
    assert m[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert answers_match(extract_boxed(m[0].solution), m[0].answer)


def test_greedy_decode_follows_the_argmax(bigram, char_tok):
    # after ':' -> ' ' -> 'b' -> 'b' ... (each the argmax); stop strings cut the text
    assert decode(bigram, char_tok, "q:", max_new_tokens=4) == " bbb"
    assert decode(bigram, char_tok, "q:", max_new_tokens=10, stop=("bb",)) == " "
    s = decode(bigram, char_tok, "q:", max_new_tokens=5, temperature=1.0, top_k=2, seed=3)
    assert len(s) <= 5 and set(s) <= {" ", "b", "a", "é", "q", ":"}
    assert s == decode(bigram, char_tok, "q:", max_new_tokens=5, temperature=1.0, top_k=2, seed=3)


def test_decode_uses_kiln_generate_for_kiln_models():
    from kiln.model import ModelConfig, Transformer
    from kiln.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    model = Transformer(ModelConfig(vocab_size=257, context_length=32, d_model=32, n_layers=1, n_heads=2)).eval()
    with_cache = decode(model, tok, "Hello", max_new_tokens=40)  # runs past the context: cache restarts

    class NoCache(torch.nn.Module):  # the same weights behind the bare protocol
        def __init__(self, m):
            super().__init__()
            self.m, self.config = m, m.config

        def forward(self, idx):
            return self.m(idx)

    assert with_cache[:20] == decode(NoCache(model), tok, "Hello", max_new_tokens=40)[:20]
    # a padded model vocabulary never yields ids the tokenizer cannot decode
    padded = Transformer(ModelConfig(vocab_size=320, context_length=32, d_model=32, n_layers=1, n_heads=2)).eval()
    with torch.no_grad():
        padded.lm_head.weight[257:] = 10.0  # make the padding ids the most likely
    assert len(decode(padded, tok, "Hi", max_new_tokens=5, temperature=1.0)) <= 5


def test_evaluate_generative_with_a_scripted_decoder():
    outs = {"Q1": "so #### 4", "Q2": "it is 7"}

    def fake(model, tok, prompt, **kw):
        q = prompt.rsplit("Question: ", 1)[1].split("\n")[0]
        if kw.get("temperature", 0) > 0:
            return "#### 5"  # every sample says 5
        return outs[q]

    items = [GenItem("Q1", "4"), GenItem("Q2", "5")]
    r = evaluate_generative(None, None, items, "gsm8k", samples=3, ks=(1, 2), decode_fn=fake)
    assert r.accuracy == 0.5
    assert r.pass_at_k == {"pass@1": 0.5, "pass@2": 0.5}  # Q1 never right when sampled, Q2 always


def test_batched_generative_eval_equals_one_prompt_at_a_time():
    from kiln.model import ModelConfig, Transformer
    from kiln.tokenizer import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    model = Transformer(ModelConfig(vocab_size=257, context_length=96, d_model=32, n_layers=2, n_heads=4)).eval()
    with torch.no_grad():
        for layer in model.layers:
            layer.self_attn.q_proj.weight.mul_(6.0)
            layer.self_attn.k_proj.weight.mul_(6.0)
    items = [GenItem(q, "4") for q in ("What is 2+2?", "Tom has 3 apples and buys 5 more.", "Hi", "x" * 30)]
    batched = evaluate_generative(model, tok, items, "gsm8k", max_new_tokens=24, batch_size=3)
    single = evaluate_generative(model, tok, items, "gsm8k", max_new_tokens=24, decode_fn=decode)
    assert [e["output"] for e in batched.examples] == [e["output"] for e in single.examples]
    assert any(e["output"] for e in batched.examples)
    kw = {"max_new_tokens": 12, "samples": 3, "ks": (1, 3), "seed": 5, "batch_size": 4}
    a = evaluate_generative(model, tok, items, "math", **kw)
    assert a.pass_at_k == evaluate_generative(model, tok, items, "math", **kw).pass_at_k
