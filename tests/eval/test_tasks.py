"""Task loaders on tiny fixtures and on the real files (first items only); errors name file:line."""

from __future__ import annotations

import bz2
import json

import pytest

from kiln.eval.tasks import (
    TASKS,
    get_task,
    load_foundry,
    load_hellaswag,
    load_mmlu,
    random_baseline,
)


def _jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def test_hellaswag_txt_and_bz2(tmp_path):
    text = "Cat: A cat sits. it\n2\njumps.\nsleeps.\npurrs.\nruns.\nDog: A dog. it\n0\nbarks.\nx.\ny.\nz.\n"
    (tmp_path / "h.txt").write_text(text)
    with bz2.open(tmp_path / "h.txt.bz2", "wt") as f:
        f.write(text)
    for name in ("h.txt", "h.txt.bz2"):
        items = load_hellaswag(tmp_path / name, prompt="kiln")
        assert len(items) == 2 and items[0].gold == 2
        assert items[0].pairs[0] == ("Cat: A cat sits. it", " jumps.")
        assert items[1].source.endswith(f"{name}:7")
    assert len(load_hellaswag(tmp_path / "h.txt", limit=1, prompt="kiln")) == 1
    with pytest.raises(ValueError, match="lost the ctx_a/ctx_b split"):
        load_hellaswag(tmp_path / "h.txt")  # lm-eval's prompt cannot be rebuilt from it


def test_hellaswag_malformed_names_file_and_line(tmp_path):
    (tmp_path / "h.txt").write_text("ctx\n2\na\nb\nc\nd\nctx2\nseven\na\nb\nc\nd\n")
    with pytest.raises(ValueError, match=r"h\.txt:8: gold label 'seven'"):
        load_hellaswag(tmp_path / "h.txt", prompt="kiln")
    (tmp_path / "short.txt").write_text("ctx\n2\na\n")
    with pytest.raises(ValueError, match=r"short\.txt:3: the file ends inside an item"):
        load_hellaswag(tmp_path / "short.txt", prompt="kiln")


def test_hellaswag_jsonl(tmp_path):
    p = _jsonl(tmp_path / "h.jsonl", [{"activity_label": "Cat", "ctx": "A cat [title] Pet it [step]", "endings": ["a", "b"], "label": 1},
                                      {"ctx": "x", "endings": ["a", "b"], "label": 5}])
    with pytest.raises(ValueError, match=r"h\.jsonl:2: 'label'=5"):
        load_hellaswag(p, prompt="kiln")
    items = load_hellaswag(p, limit=1, prompt="kiln")
    assert items[0].pairs == (("Cat: A cat. Pet it", " a"), ("Cat: A cat. Pet it", " b")) and items[0].gold == 1
    with pytest.raises(ValueError, match=r"h\.jsonl:1: .*'ctx_a'"):
        load_hellaswag(p)  # lm-eval's prompt needs the original fields


def test_hellaswag_lm_eval_prompt(tmp_path):
    """lm-eval's form: ctx_b capitalized, the label always in front, a removed tag's space kept."""
    row = {"activity_label": "Cat", "ctx_a": "A cat [title] Pet it.", "ctx_b": "then it", "ctx": "unused",
           "endings": ["purrs [step] loudly.", " sleeps."], "label": 0}
    items = load_hellaswag(_jsonl(tmp_path / "h.jsonl", [row, {**row, "activity_label": ""}]))
    assert items[0].pairs == (("Cat: A cat. Pet it. Then it", " purrs loudly."), ("Cat: A cat. Pet it. Then it", " sleeps."))
    assert items[1].pairs[0][0] == ": A cat. Pet it. Then it"


def test_foundry_schemas(tmp_path):
    p = _jsonl(tmp_path / "t.jsonl", [
        {"query": "Question: 2+2?", "choices": ["4", "5"], "gold": 0},
        {"context_options": ["Anna ran so Anna", "Anna ran so Bob"], "continuation": "was tired.", "gold": 1},
        {"context": "The last word is", "continuation": "here"},
    ])
    q, w, lam = load_foundry(p, delimiter="\nAnswer: ")
    assert q.pairs == (("Question: 2+2?\nAnswer: ", "4"), ("Question: 2+2?\nAnswer: ", "5"))
    assert w.pairs[1] == ("Anna ran so Bob\nAnswer: ", "was tired.") and w.gold == 1
    assert lam.kind == "lm" and len(lam.pairs) == 1


@pytest.mark.parametrize("row,msg", [
    ('{"query": "q", "choices": ["a"], "gold": 3}', "'gold'=3"),
    ('{"query": "q", "gold": 0}', "missing field 'choices'"),
    ('{"query": "q", "choices": "ab", "gold": 0}', "'choices' should be list"),
    ('{"foo": 1}', "unknown schema"),
    ('{"query": "q", ', "invalid JSON"),
    ('[1, 2]', "expected a JSON object"),
])
def test_foundry_malformed_names_file_and_line(tmp_path, row, msg):
    p = _jsonl(tmp_path / "bad.jsonl", ['{"query": "q", "choices": ["a", "b"], "gold": 1}', "", row])
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: .*" + msg.replace("(", r"\(").replace("[", r"\[")):
        load_foundry(p)


def test_missing_file_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_foundry(tmp_path / "nope.jsonl")


def _mmlu(tmp_path):
    for split, rows in [("dev", ["D1?,a,b,c,d,A", "D2?,a,b,c,d,B", "D3?,a,b,c,d,C"]),
                        ("test", ['"Q1, really?",w,x,y,z,D', "Q2?,w,x,y,z,A"])]:
        (tmp_path / split).mkdir(exist_ok=True)
        (tmp_path / split / f"high_school_math_{split}.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_mmlu_zero_and_few_shot(tmp_path):
    d = _mmlu(tmp_path)
    zero = load_mmlu(d, 0)
    assert len(zero) == 2 and zero[0].gold == 3
    ctx, cont = zero[0].pairs[0]
    assert cont == " A" and [c for _, c in zero[0].pairs] == [" A", " B", " C", " D"]
    assert ctx == ("The following are multiple choice questions (with answers) about high school math.\n\n"
                   "Q1, really?\nA. w\nB. x\nC. y\nD. z\nAnswer:")
    two = load_mmlu(d, 2)[0].pairs[0][0]
    assert "D1?\nA. a\nB. b\nC. c\nD. d\nAnswer: A\n\nD2?" in two and "D3?" not in two
    assert load_mmlu(d, 2) == load_mmlu(d, 2)  # deterministic


def test_mmlu_bad_answer_letter(tmp_path):
    d = _mmlu(tmp_path)
    (d / "test" / "high_school_math_test.csv").write_text("Q?,a,b,c,d,A\nQ?,a,b,c,d,E\n")
    with pytest.raises(ValueError, match=r"high_school_math_test\.csv:2: answer 'E'"):
        load_mmlu(d, 0)


def test_registry_and_baselines():
    assert random_baseline(TASKS["lambada"], []) == 0.0
    from kiln.eval.multiple_choice import MCItem

    items = [MCItem.shared_context("q", ["a", "b"], 0), MCItem.shared_context("q", ["a", "b", "c", "d"], 0)]
    assert random_baseline(TASKS["piqa"], items) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="unknown task 'helaswag'"):
        get_task("helaswag")


# ---------------------------------------------------------------- the real files (first items only)

def test_real_hellaswag(shared_data):
    full = load_hellaswag(shared_data / "eval/hellaswag/hellaswag_val_full.txt.bz2", limit=3, prompt="kiln")
    assert len(full) == 3 and full[0].gold == 3
    assert full[0].pairs[3] == ("Roof shingle removal: A man is sitting on a roof. he",
                                " starts pulling up roofing on a roof.")
    sub = load_hellaswag(shared_data / "eval/hellaswag/hellaswag_val_subset1000_original_format.jsonl", limit=2)
    assert len(sub) == 2 and all(len(it.pairs) == 4 for it in sub)


@pytest.mark.parametrize("name", [n for n in TASKS if not n.startswith("mmlu")] + ["mmlu", "mmlu_5shot"])
def test_every_registered_task_loads(shared_data, name):
    items = TASKS[name].load(shared_data / "eval", 3)
    assert len(items) == 3
    assert all(0 <= it.gold < len(it.pairs) for it in items)


def test_real_mmlu_spans_subjects(shared_data):
    items = load_mmlu(shared_data / "eval/mmlu", 5, limit=57)
    subjects = {it.pairs[0][0].split("about ")[1].split(".")[0] for it in items}
    assert len(subjects) == 57
    assert items[0].pairs[0][0].count("Answer:") == 6


def test_packed_bz2_copies_load_like_the_originals(tmp_path):
    # a packed copy of the eval data (every .jsonl/.csv bzip2-compressed) loads the same items
    plain, packed = tmp_path / "plain", tmp_path / "packed"
    plain.mkdir()
    _mmlu(plain)
    rows = [{"query": "q1", "choices": ["a", "b"], "gold": 1}, {"query": "q2", "choices": ["c", "d"], "gold": 0}]
    _jsonl(plain / "x.jsonl", rows)
    for f in plain.rglob("*.*"):
        out = packed / f.relative_to(plain)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_name(out.name + ".bz2").write_bytes(bz2.compress(f.read_bytes()))
    assert load_foundry(packed / "x.jsonl") == [
        type(it)(it.pairs, it.gold, it.kind, it.source.replace("plain/x.jsonl", "packed/x.jsonl.bz2"))
        for it in load_foundry(plain / "x.jsonl")]
    assert [(it.pairs, it.gold) for it in load_mmlu(packed, 2)] == [(it.pairs, it.gold) for it in load_mmlu(plain, 2)]
    assert len(load_mmlu(packed, 2)) == 2
    # errors still name the file and line
    (packed / "bad.jsonl.bz2").write_bytes(bz2.compress(b'{"query": "q", "choices": ["a"], "gold": 0}\n{oops\n'))
    with pytest.raises(ValueError, match=r"bad\.jsonl\.bz2:2: invalid JSON"):
        load_foundry(packed / "bad.jsonl")
