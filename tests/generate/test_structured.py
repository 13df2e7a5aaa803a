"""Structured output (``SamplingParams.structured``, llguidance's matchers): whatever a random model
would say, the engine's output is in the language asked for (a JSON schema, any JSON object, a
regex, a set of choices, a Lark grammar), greedy and sampled, on the general path and the (emulated)
CUDA-graph path, beside unconstrained requests and with penalties; it ends with 'stop' when the
language allows nothing more; a bad grammar is refused by name."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest
import torch

from kiln.generate import EngineConfig, LLMEngine, SamplingParams, StructuredOutput
from kiln.model import ModelConfig, Transformer

pytest.importorskip("llguidance")
tokenizer_mod = pytest.importorskip("kiln.tokenizer")

CFG = ModelConfig(vocab_size=257, context_length=128, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=64)
SCHEMA = {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 99},
                                           "tag": {"enum": ["red", "green"]}, "ok": {"type": "boolean"}},
          "required": ["n", "tag", "ok"], "additionalProperties": False}


@pytest.fixture(scope="module")
def model() -> Transformer:
    torch.manual_seed(0)
    return Transformer(CFG).eval()


@pytest.fixture(scope="module")
def tok():
    return tokenizer_mod.Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])


def _check_schema(text: str) -> bool:
    obj = json.loads(text)
    assert set(obj) == {"n", "tag", "ok"} and isinstance(obj["n"], int) and 0 <= obj["n"] <= 99
    assert obj["tag"] in ("red", "green") and isinstance(obj["ok"], bool)
    return True


CASES = [
    (StructuredOutput(json=SCHEMA), _check_schema),
    (StructuredOutput(regex=r"[0-9]{3}-[a-z]{2}"), lambda t: re.fullmatch(r"[0-9]{3}-[a-z]{2}", t)),
    (StructuredOutput(choice=("yes", "no", "a.b (c)")), lambda t: t in ("yes", "no", "a.b (c)")),
    (StructuredOutput(grammar='start: "<" num ">"\nnum: /[1-9][0-9]?/'), lambda t: re.fullmatch(r"<[1-9][0-9]?>", t)),
]


@pytest.mark.parametrize("path", ["general", "graphs"])
def test_outputs_belong_to_their_language_on_every_path(model, tok, path):
    eng = LLMEngine(model, tok, EngineConfig(block_size=8, max_num_seqs=8, decode_steps=4))
    if path == "graphs":
        eng.runner.graph_max = 8  # the CUDA-graph path's buffers, run eagerly on the CPU
    params, checks = [], []
    for i, (spec, check) in enumerate(CASES):
        params += [SamplingParams(max_tokens=60, temperature=0, structured=spec),
                   SamplingParams(max_tokens=60, temperature=1.0, seed=i, structured=spec, frequency_penalty=0.5)]
        checks += [check, check]
    params.append(SamplingParams(max_tokens=20, temperature=0.8, seed=9, ignore_eos=True))  # unconstrained
    prompts = [tok.encode(f"prompt {i}: ") for i in range(len(params))]
    outs = eng.generate(prompts, params)
    for o, check in zip(outs, checks):
        assert o.finish_reason == "stop" and check(o.text), (o.text, o.finish_reason)
        assert tok.eot_id not in o.token_ids  # ended when the language did: no forward step to draw end-of-text
    assert len(outs[-1].token_ids) == 20  # the unconstrained request beside them ran as usual
    free = LLMEngine(model, tok, EngineConfig(block_size=8)).generate([prompts[-1]], params[-1])[0]
    assert free.token_ids == outs[-1].token_ids  # and drew exactly its own tokens


def test_json_object_and_the_unconstrained_model_differ(model, tok):
    eng = LLMEngine(model, tok, EngineConfig(block_size=8))
    prompt = tok.encode("x")
    plain = eng.generate([prompt], SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0].text
    out = eng.generate([prompt], SamplingParams(max_tokens=120, temperature=0,
                                                structured=StructuredOutput(json_object=True)))[0]
    assert not plain.startswith("{")  # the random model says something else unconstrained
    assert out.text.startswith("{")
    if out.finish_reason == "stop":
        assert isinstance(json.loads(out.text), dict)
    else:  # a random model may write a long string; the prefix is still JSON's
        assert out.finish_reason == "length" and len(out.token_ids) == 120


def test_choices_are_literal_strings(model, tok):
    """A choice's regex characters are literals: with 'a' pushed up, 'a+' stays the two characters."""
    eng = LLMEngine(model, tok, EngineConfig(block_size=8))
    out = eng.generate([tok.encode("x")], SamplingParams(max_tokens=10, temperature=0, logit_bias={97: 30.0},
                                                         structured=StructuredOutput(choice=("a+", "b"))))[0]
    assert out.text == "a+" and out.finish_reason == "stop"


def test_bad_specs_are_refused_by_name(model, tok):
    eng = LLMEngine(model, tok, EngineConfig(block_size=8))
    with pytest.raises(ValueError, match="structured output"):
        eng.add_request([1], SamplingParams(structured=StructuredOutput(json='{"type": "nonsense"}')))
    with pytest.raises(ValueError, match="structured output"):
        eng.add_request([1], SamplingParams(structured=StructuredOutput(regex="(unclosed")))
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutput(regex="a", choice=("a",))
    with pytest.raises(ValueError, match="exactly one of"):
        StructuredOutput()
    class Duck:  # a tokenizer-like object without token bytes
        eot_id, vocab_size = 256, 257

    with pytest.raises(ValueError, match="needs a Kiln Tokenizer"):
        LLMEngine(model, Duck(), EngineConfig(block_size=8)).add_request(
            [1], SamplingParams(structured=StructuredOutput(regex="a")))
    with pytest.raises(ValueError, match="needs the engine's tokenizer"):
        LLMEngine(model, None, EngineConfig(block_size=8)).add_request(
            [1], SamplingParams(structured=StructuredOutput(regex="a")))
    assert not eng.has_unfinished()


def test_a_stop_token_ends_an_open_language_where_it_is_complete():
    """A chat reply ends at its template's turn-end token (a stop id), not end-of-text: under a regex
    that could go on, the stop id is allowed wherever the output is in the language."""
    tok = tokenizer_mod.Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>", "<|end|>"])
    end = tok.encode("<|end|>")[0]
    torch.manual_seed(0)
    model = Transformer(dataclasses.replace(CFG, vocab_size=258)).eval()
    eng = LLMEngine(model, tok, EngineConfig(block_size=8))
    p = SamplingParams(max_tokens=20, temperature=0, stop_token_ids=(end,), logit_bias={end: 50.0},
                       structured=StructuredOutput(regex="[0-9]+"))
    out = eng.generate([tok.encode("n=")], p)[0]
    assert out.finish_reason == "stop" and out.token_ids[-1] == end and len(out.token_ids) == 2
    assert re.fullmatch("[0-9]", tok.decode(out.token_ids[:-1]))


def test_warmup_builds_the_guide_so_a_first_request_does_not(model, tok):
    eng = LLMEngine(model, tok, EngineConfig(block_size=8, max_num_batched_tokens=64))
    assert eng.guide is None
    eng.warmup([1, 5])
    assert eng.guide is not None
    out = eng.generate([tok.encode("x")], SamplingParams(max_tokens=10, temperature=0,
                                                         structured=StructuredOutput(choice=("on", "off"))))[0]
    assert out.text in ("on", "off")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="real CUDA graphs need a GPU (the CPU runs their body eagerly above)")
def test_structured_requests_in_real_cuda_graphs_match_eager(model, tok):
    """On a GPU: the graph path (the greedy graph's logits, the mask and draw eager) gives the eager
    path's tokens, beside processed and plain requests sharing the batch."""
    gpu = Transformer(CFG).to("cuda").eval()
    gpu.load_state_dict(model.state_dict())
    params = [SamplingParams(max_tokens=60, temperature=0, structured=spec) for spec, _ in CASES]
    params += [SamplingParams(max_tokens=60, temperature=0.9, seed=3, structured=CASES[0][0], frequency_penalty=0.5),
               SamplingParams(max_tokens=20, temperature=0.8, seed=9, ignore_eos=True, repetition_penalty=1.2),
               SamplingParams(max_tokens=20, temperature=0, ignore_eos=True)]
    prompts = [tok.encode(f"prompt {i}: ") for i in range(len(params))]
    got = {}
    for graphs in (False, True):
        eng = LLMEngine(gpu, tok, EngineConfig(block_size=16, max_num_seqs=8, decode_steps=4, cuda_graphs=graphs))
        got[graphs] = [o.token_ids for o in eng.generate(prompts, params)]
    assert got[True] == got[False]
