"""Each data format is read into the same conversations; each bad input is one clear line."""

import json
import os

import pytest

from conftest import run_script, write_jsonl
from data import DataError, load_conversations, train_test_split
from prompt import Conversation


def test_instruct_jsonl_and_json_list(tmp_path):
    records = [{"instruction": "A", "input": "ctx", "output": "B"}, {"instruction": "C", "output": "D"}]
    expected = [Conversation(turns=[("A", "B")], input="ctx"), Conversation(turns=[("C", "D")], input="")]
    fmt, convs = load_conversations(write_jsonl(tmp_path / "a.jsonl", records))
    assert (fmt, convs) == ("instruct", expected)
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
    assert load_conversations(str(path)) == ("instruct", expected)


CHAT_EXPECTED = Conversation(turns=[("你好", "你好！"), ("2+2?", "4")], system=None)


@pytest.mark.parametrize("record,fmt", [
    ({"input": ["你好", "2+2?"], "output": ["你好！", "4"]}, "vicuna_chat"),
    ({"conversations": [{"from": "human", "value": "你好"}, {"from": "gpt", "value": "你好！"},
                        {"from": "human", "value": "2+2?"}, {"from": "gpt", "value": "4"}]}, "sharegpt"),
    ({"messages": [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "你好！"},
                   {"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}, "openai"),
])
def test_chat_formats_detected(tmp_path, record, fmt):
    assert load_conversations(write_jsonl(tmp_path / "c.jsonl", [record])) == (fmt, [CHAT_EXPECTED])


def test_system_messages_become_the_conversation_system(tmp_path):
    sharegpt = {"conversations": [{"from": "system", "value": "Be brief."}, {"from": "human", "value": "q"},
                                  {"from": "gpt", "value": "a"}]}
    openai = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "a"}]}
    for rec in (sharegpt, openai):
        _, convs = load_conversations(write_jsonl(tmp_path / "s.jsonl", [rec]))
        assert convs == [Conversation(turns=[("q", "a")], system="Be brief.")]


GOOD = {"instruction": "A", "input": "", "output": "B"}


@pytest.mark.parametrize("lines,message", [
    ([GOOD, '{"instruction": "x", "output": '], r"f\.jsonl:2: invalid JSON"),
    ([GOOD, {"instruction": "x"}], r"f\.jsonl:2: missing field 'output'"),
    ([GOOD, GOOD, {"instruction": "x", "output": 3}], r"f\.jsonl:3: field 'output' must be a string, got int"),
    ([{"input": [], "output": []}], r"f\.jsonl:1: empty conversation"),
    ([{"conversations": []}], r"f\.jsonl:1: empty conversation"),
    ([{"conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}],
     r"f\.jsonl:1: turn 1 is 'user' but 'assistant' was expected"),
    ([{"messages": [{"role": "user", "content": "a"}]}], r"f\.jsonl:1: conversation ends with a user turn"),
    ([{"input": ["a", "b"], "output": ["c"]}], r"2 user turns but 1 assistant turns"),
    ([{"prompt": "a", "completion": "b"}], r"f\.jsonl:1: unknown record format"),
    ([GOOD, {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
     r"f\.jsonl:2: record format 'openai' differs"),
    ([{"messages": [{"role": "bot", "content": "a"}]}], r"messages\[0\] has role='bot'"),
])
def test_bad_records_name_file_and_line(tmp_path, lines, message):
    with pytest.raises(DataError, match=message):
        load_conversations(write_jsonl(tmp_path / "f.jsonl", lines))


def test_json_list_errors_name_record_index(tmp_path):
    path = tmp_path / "l.json"
    path.write_text(json.dumps([GOOD, GOOD, {"instruction": "x", "output": None}]))
    with pytest.raises(DataError, match=r"l\.json: record 2: missing field 'output'"):
        load_conversations(str(path))


def test_missing_file_and_empty_file(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        load_conversations(str(tmp_path / "nope.jsonl"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="no records"):
        load_conversations(str(tmp_path / "empty.jsonl"))


def test_split_is_seeded_and_test_size_checked():
    items = list(range(10))
    train, test = train_test_split(items, 3, seed=1, path="d")
    assert sorted(train + test) == items and len(test) == 3
    assert (train, test) == train_test_split(items, 3, seed=1, path="d")
    with pytest.raises(DataError, match="--test_size 10 leaves no training data: d has 10 records"):
        train_test_split(items, 10, seed=1, path="d")


@pytest.mark.parametrize("content,extra,message", [
    ('{"instruction": "a", "output": "b"}\nnot json\n', [], r"data\.jsonl:2: invalid JSON"),
    ('{"instruction": "a", "output": "b"}\n', ["--test_size", "5"], r"--test_size 5 leaves no training data"),
    ('{"text": "a"}\n', [], r"data\.jsonl:1: unknown record format"),
    (None, [], r"no such file"),
    ('{"instruction": "a", "output": "b"}\n', ["--batch_size", "6", "--micro_batch_size", "4"],
     r"--batch_size 6 is not a multiple of --micro_batch_size 4"),
])
def test_cli_bad_input_one_line_no_traceback_nothing_written(tmp_path, content, extra, message):
    data = tmp_path / "data.jsonl"
    if content is not None:
        data.write_text(content)
    out = tmp_path / "out"
    result = run_script("finetune.py", "--data_path", str(data), "--output_path", str(out), *extra)
    assert result.returncode == 2
    lines = [l for l in result.stderr.splitlines() if l.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.stderr
    import re

    assert re.search(message, lines[0]), lines[0]
    assert not out.exists()
    assert result.stdout == ""


# --- several files: --data_path a,b --data_shares; prompt files (--eval_prompts) -------------------


def test_split_counts_and_mix_are_exact_and_seeded():
    from data import mix, split_counts

    assert split_counts(10, [0.7, 0.3]) == [7, 3]
    assert split_counts(5, [1, 1, 1]) == [2, 2, 1]  # largest remainder, ties to the first
    assert split_counts(4, [3, 100]) == [0, 4] and split_counts(0, [1, 2]) == [0, 0]
    a, b = list(range(10)), list(range(100, 104))  # 14 examples: 0.5 -> 7 from a, 7 from b
    taken = mix([a, b], [0.5, 0.5], seed=3)
    assert len(taken[0]) == 7 and len(set(taken[0])) == 7 and set(taken[0]) <= set(a)  # subsampled, no repeats
    assert taken[1][:4] == b and len(taken[1]) == 7 and set(taken[1][4:]) <= set(b)  # whole, then 3 more
    assert mix([a, b], [0.5, 0.5], seed=3) == taken and mix([a, b], [0.5, 0.5], seed=4) != taken
    assert mix([a, b], None, seed=3) == [a, b]


def test_data_paths_and_shares_are_one_line_errors(tmp_path):
    from data import data_paths, parse_shares

    assert data_paths("a.jsonl, b.json") == ["a.jsonl", "b.json"]
    odd = tmp_path / "x,y.jsonl"
    odd.write_text("")
    assert data_paths(str(odd)) == [str(odd)]  # an existing name with a comma is one file
    with pytest.raises(DataError, match="--data_path a.jsonl,,b.json: an empty file name between commas"):
        data_paths("a.jsonl,,b.json")
    with pytest.raises(DataError, match="--data_path names a.jsonl twice"):
        data_paths("a.jsonl,a.jsonl")
    assert parse_shares("0.7,0.3", 2) == [0.7, 0.3] and parse_shares(None, 2) is None
    for spec, message in [("0.7", "has 1 shares but --data_path has 2 files"), ("0.5,0.4", "sums to 0.9"),
                          ("1.5,-0.5", "every share must be a number > 0"), ("a,b", "not a comma-separated list"),
                          ("nan,0.5", "every share must be a number > 0")]:
        with pytest.raises(DataError, match=f"--data_shares {spec}.*{message}" if spec != "0.7" else message):
            parse_shares(spec, 2)


def test_held_out_records_come_from_each_file_in_proportion(tmp_path):
    from data import load_data_files, split_files

    a = write_jsonl(tmp_path / "a.jsonl", [{"instruction": f"a{i}", "output": "x"} for i in range(30)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"messages": [{"role": "user", "content": f"b{i}"},
                                                         {"role": "assistant", "content": "y"}]} for i in range(10)])
    files = load_data_files(f"{a},{b}")
    assert [(f.path, f.format, len(f.conversations)) for f in files] == [(a, "instruct", 30), (b, "openai", 10)]
    assert files[1].conversations[3].where == f"{b}:4"
    (a_train, a_test), (b_train, b_test) = split_files(files, 8, seed=1, spec=f"{a},{b}")
    assert (len(a_train), len(a_test), len(b_train), len(b_test)) == (24, 6, 8, 2)
    with pytest.raises(DataError, match=r"--test_size 40 leaves no training data: --data_path .* has 40 records"):
        split_files(files, 40, seed=1, spec=f"{a},{b}")


def test_prompt_files_need_no_answers(tmp_path):
    from data import load_prompts

    path = tmp_path / "p.jsonl"
    write_jsonl(path, [{"instruction": "Translate.", "input": "你好"},
                       {"instruction": "Hi", "output": "an answer that is dropped"},
                       {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                                     {"role": "user", "content": "c"}]}][:2])
    assert load_prompts(str(path)) == [Conversation(turns=[("Translate.", None)], input="你好"),
                                       Conversation(turns=[("Hi", None)])]
    chat = write_jsonl(tmp_path / "c.jsonl", [
        {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                      {"role": "user", "content": "c"}]},
        {"input": ["x", "y"], "output": ["z"]}][:1])
    assert load_prompts(chat) == [Conversation(turns=[("a", "b"), ("c", None)])]
    with pytest.raises(DataError, match="nope.json: no such file; pass an existing JSON or JSONL file to --eval_prompts"):
        load_prompts(str(tmp_path / "nope.json"))
