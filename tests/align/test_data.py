"""Readers: every format to messages / preference pairs; bad records counted with file and line."""

from __future__ import annotations

import json

import pytest

from kiln.align.chat import ChatTemplate
from kiln.align.data import (
    ReadReport,
    encode_conversation,
    encode_preference,
    parse_hh_transcript,
    read_conversations,
    read_preferences,
)

SFT_LINES = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                  {"role": "assistant", "content": "Hello."}]},
    {"conversations": [{"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]},
    {"instruction": "Add.", "input": "12 and 30", "output": "42"},
    {"conversations": ["What is a fox?", "An animal.", "And a dog?", "Also one."]},
    {"prompt": "Say hi", "completion": "hi"},
    {"messages": [{"role": "user", "content": "no reply"}]},
    {"instruction": "x", "input": "", "output": "   "},
    {"foo": 1},
]


def _write_jsonl(path, records, bad_line_at=None):
    lines = [json.dumps(r) for r in records]
    if bad_line_at is not None:
        lines.insert(bad_line_at, '{"messages": [oops')
    path.write_text("\n".join(lines) + "\n")
    return path


def test_read_conversations_all_formats_and_drops(tmp_path):
    p = _write_jsonl(tmp_path / "sft.jsonl", SFT_LINES, bad_line_at=3)
    rep = ReadReport()
    convs = read_conversations([p], rep)
    assert len(convs) == rep.kept == 5
    assert dict(rep.dropped) == {"malformed_json": 1, "no_assistant_turn": 1, "empty_response": 1, "unknown_format": 1}
    assert any(e.startswith(f"{p}:4: malformed_json") for e in rep.examples)
    assert any(e.startswith(f"{p}:7: no_assistant_turn") for e in rep.examples)
    assert convs[2].messages[0]["content"] == "Add.\n\n12 and 30"
    assert [m["role"] for m in convs[3].messages] == ["user", "assistant", "user", "assistant"]
    assert convs[1].messages[1] == {"role": "assistant", "content": "4"}
    assert "no_assistant_turn: 1" in rep.summary()


def test_parquet_and_hf_stand_in(tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"prompt": "Q", "chosen": "good", "rejected": "bad"}, {"prompt": "Q", "chosen": "same", "rejected": "same"}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet")
    rep = ReadReport()
    pairs = read_preferences([tmp_path / "p.parquet"], rep)
    assert [(p.chosen, p.rejected) for p in pairs] == [("good", "bad")]
    assert rep.dropped == {"chosen_equals_rejected": 1} and ":row 1" in rep.examples[0]
    seen = {}

    def fake_load(name, split):
        seen["args"] = (name, split)
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load)
    assert len(read_preferences(["hf:org/prefs:test"])) == 1
    assert seen["args"] == ("org/prefs", "test")


def test_hh_transcripts_and_conversational_prefs(tmp_path):
    recs = [
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: fine, thanks",
         "rejected": "\n\nHuman: hi\n\nAssistant: hello\n\nHuman: how are you?\n\nAssistant: go away"},
        {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: other\n\nAssistant: c"},
        {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "yes"}],
         "rejected": [{"role": "assistant", "content": ""}]},
        {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "A"},
         "rejected": {"from": "gpt", "value": "B"}},
    ]
    rep = ReadReport()
    pairs = read_preferences([_write_jsonl(tmp_path / "hh.jsonl", recs)], rep)
    assert len(pairs) == 2
    assert [m["content"] for m in pairs[0].prompt] == ["hi", "hello", "how are you?"]
    assert (pairs[0].chosen, pairs[0].rejected) == ("fine, thanks", "go away")
    assert rep.dropped == {"prompt_mismatch": 1, "empty_response": 1}
    assert parse_hh_transcript("no turns") is None


def test_encode_long_is_counted(chat_tokenizer):
    from kiln.align.data import Conversation, PreferencePair

    tpl = ChatTemplate.from_tokenizer(chat_tokenizer)
    rep = ReadReport()
    conv = Conversation(({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello " * 50}), "f:3")
    assert encode_conversation(conv, tpl, 20, rep) is None
    ids, mask = encode_conversation(conv, tpl, 500, rep)
    assert sum(mask) > 0
    pair = PreferencePair(({"role": "user", "content": "Hi"},), "Hello " * 50, "no", "g:9")
    assert encode_preference(pair, tpl, 20, rep) is None
    prompt, ch, rj = encode_preference(pair, tpl, 500, rep)
    assert prompt[-1] == chat_tokenizer.special_tokens["<|assistant|>"] and ch[-1] == rj[-1] == tpl.end_id
    assert rep.dropped == {"longer_than_context": 2} and rep.examples[0].startswith("f:3")


def test_truncate_cuts_instead_of_dropping(chat_tokenizer):
    """``truncate``: a long conversation keeps its first tokens (and its loss mask); one cut before any
    assistant token is still dropped; a long pair keeps the prompt's end and cuts each reply to fit;
    replies equal once cut are dropped. Each cut is counted, never silent."""
    from kiln.align.data import Conversation, PreferencePair

    tpl = ChatTemplate.from_tokenizer(chat_tokenizer)
    rep = ReadReport()
    conv = Conversation(({"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello " * 50}), "f:3")
    full_ids, full_mask = encode_conversation(conv, tpl, 500, rep)
    ids, mask = encode_conversation(conv, tpl, 20, rep, truncate=True)
    assert ids == full_ids[:20] and mask == full_mask[:20] and sum(mask) > 0
    early = Conversation(({"role": "user", "content": "Hi " * 40}, {"role": "assistant", "content": "ok"}), "f:4")
    assert encode_conversation(early, tpl, 20, rep, truncate=True) is None
    long_prompt = ({"role": "user", "content": "question " * 40},)
    whole = tpl.render(long_prompt, add_generation_prompt=True)
    prompt, ch, rj = encode_preference(PreferencePair(long_prompt, "yes " * 30, "no " * 30, "g:9"), tpl, 40, rep,
                                       truncate=True)
    assert prompt == whole[-20:] and prompt[-1] == chat_tokenizer.special_tokens["<|assistant|>"]
    assert len(prompt) + max(len(ch), len(rj)) <= 40 and ch != rj
    same = PreferencePair(({"role": "user", "content": "Hi"},), "same start " * 30 + "A", "same start " * 30 + "B", "g:10")
    assert encode_preference(same, tpl, 40, rep, truncate=True) is None
    assert rep.truncated == 2 and rep.dropped == {"longer_than_context": 1, "equal_after_truncation": 1}
    assert rep.to_dict()["truncated"] == 2 and "truncated 2" in rep.summary()
    assert any(e.startswith("f:3: truncated") for e in rep.examples)


def test_shared_sets(shared_data):
    d = shared_data / "align"
    rep = ReadReport()
    assert len(read_conversations([d / "lima" / "lima.json", d / "llamafactory_demo" / "alpaca_en_demo.json"], rep)) > 1000
    rep = ReadReport()
    hh = read_preferences([d / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"], rep)
    assert len(hh) > 2000 and sum(rep.dropped.values()) < 0.05 * len(hh)
    assert len(read_preferences([d / "llamafactory_demo" / "dpo_en_demo.json"])) > 100


def test_no_usable_records_error_says_what_the_read_found(tmp_path):
    from kiln.align.data import ReadReport, read_conversations, require_usable

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n')
    report = ReadReport()
    convs = list(read_conversations([str(bad)], report))
    with pytest.raises(ValueError) as e:
        require_usable(convs, "training conversations", [str(bad)], report)
    msg = str(e.value)
    assert "no usable training conversations in" in msg and str(bad) in msg
    assert f"{bad}:1: no_assistant_turn" in msg and f"{bad}:2: malformed_json" in msg
