"""HellaSwag as lm-evaluation-harness builds it: Kiln's default prompt equals lm-eval's on every item
of the local subset, and on a small model Kiln and lm-eval's ``--model hf`` path give the same
per-item log-likelihoods and predictions."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

SUBSET = "eval/hellaswag/hellaswag_val_subset1000_original_format.jsonl"


def _lm_eval_docs(path: Path, limit: int | None = None) -> list[dict]:
    """lm-eval's own process_docs (lm_eval/tasks/hellaswag/utils.py) over the jsonl."""
    lm_eval = pytest.importorskip("lm_eval")
    datasets = pytest.importorskip("datasets")
    spec = importlib.util.spec_from_file_location(
        "lm_eval_hellaswag_utils", Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()[:limit]]
    return list(utils.process_docs(datasets.Dataset.from_list(rows)))


def test_default_prompt_is_lm_evals_on_every_item(shared_data):
    from kiln.eval.tasks import load_hellaswag

    docs = _lm_eval_docs(shared_data / SUBSET)
    ours = load_hellaswag(shared_data / SUBSET)
    assert len(ours) == len(docs) == 1000
    for item, doc in zip(ours, docs):
        # lm-eval's request: (query, target_delimiter + choice), target_delimiter " "
        assert item.pairs == tuple((doc["query"], " " + c) for c in doc["choices"]), item.source
        assert item.gold == doc["gold"]
    kiln = load_hellaswag(shared_data / SUBSET, prompt="kiln")
    differ = sum(a.pairs != b.pairs for a, b in zip(kiln, ours))
    assert differ > 0  # the named variant is still Kiln's own


def test_per_item_predictions_equal_lm_evals_hf_path(shared_data, tmp_path):
    """A small random model, saved as a Hugging Face folder: lm-eval's HFLM and Kiln score the same
    16 items; log-likelihoods agree to fp32 rounding, and so does every prediction."""
    pytest.importorskip("transformers")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from kiln.eval.multiple_choice import score_items
    from kiln.eval.tasks import load_hellaswag
    from kiln.model import ModelConfig, Transformer, save_pretrained
    from kiln.tokenizer import Tokenizer

    n = 16
    tok = Tokenizer({i: bytes([i]) for i in range(256)}, [], ["<|endoftext|>"])
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=257, context_length=1024, d_model=32, n_layers=1, n_heads=2, d_ff=64))
    with torch.no_grad():  # a random model with distinct predictions (the default init is near uniform)
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    save_pretrained(model, tmp_path / "m", tokenizer=tok)
    model.eval()

    items = load_hellaswag(shared_data / SUBSET, limit=n)
    ours = score_items(model, tok, items, batch_size=8, method="rows").items
    docs = _lm_eval_docs(shared_data / SUBSET, limit=n)
    lm = HFLM(pretrained=str(tmp_path / "m"), device="cpu", batch_size=8, dtype="float32")
    reqs = [Instance("loglikelihood", doc, (doc["query"], " " + c), j) for doc in docs for j, c in enumerate(doc["choices"])]
    lls = np.array([ll for ll, _ in lm.loglikelihood(reqs)]).reshape(n, 4)
    for i, (doc, score) in enumerate(zip(docs, ours)):
        np.testing.assert_allclose(score.logprobs, lls[i], rtol=1e-5, atol=1e-3)
        assert score.pred("acc") == int(np.argmax(lls[i])), i
        # lm-eval's acc_norm: log-likelihood per character of the choice (without the delimiter)
        chars = np.array([len(c) for c in doc["choices"]], dtype=float)
        assert int(np.argmax(np.array(score.logprobs) / chars)) == int(np.argmax(lls[i] / chars)), i


def test_mmlu_prompt_is_lm_evals(shared_data):
    """MMLU, 0- and 5-shot, as lm-eval's mmlu/default yaml files define it (description, doc_to_text,
    choices "A".."D" after the target delimiter " ", first-n dev examples joined by "\\n\\n")."""
    lm_eval = pytest.importorskip("lm_eval")
    yaml = pytest.importorskip("yaml")
    jinja2 = pytest.importorskip("jinja2")
    import csv

    from kiln.eval.tasks import load_mmlu

    tasks = Path(lm_eval.__file__).parent / "tasks" / "mmlu" / "default"
    template = yaml.safe_load((tasks / "_default_template_yaml").read_text())
    text = jinja2.Template(template["doc_to_text"])
    letters = template["doc_to_choice"]

    def rows(path: Path, n: int) -> list[list[str]]:
        with open(path, encoding="utf-8", newline="") as f:
            return [r for _, r in zip(range(n), csv.reader(f))]

    def shown(r: list[str]) -> str:
        return text.render(question=r[0], choices=r[1:5])

    subjects = sorted(p.name[: -len("_test.csv")] for p in (shared_data / "eval/mmlu/test").glob("*_test.csv"))
    assert len(subjects) == 57
    for subject in subjects:
        description = yaml.safe_load((tasks / f"mmlu_{subject}.yaml").read_text())["description"]
        dev = rows(shared_data / f"eval/mmlu/dev/{subject}_dev.csv", 5)
        shots = "".join(shown(r) + " " + r[5] + "\n\n" for r in dev)
        for k, prefix in ((0, ""), (5, shots)):
            items = load_mmlu(shared_data / "eval/mmlu", k, subjects=[subject], limit=2)
            for item, r in zip(items, rows(shared_data / f"eval/mmlu/test/{subject}_test.csv", 2)):
                assert item.pairs == tuple((description + prefix + shown(r), " " + x) for x in letters), subject
                assert item.gold == letters.index(r[5])
