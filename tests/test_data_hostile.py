"""Adversarial data files: every malformed shape is one clear DataError line naming the file and
the line (JSONL, pretty-printed objects) or record (JSON list), never a traceback; valid files that
used to be rejected (raw U+2028 in JSONL, BOM, CRLF, pretty-printed objects) load exactly."""

import json
import os
import re

import pytest

from conftest import run_script
from data import DataError, load_conversations, read_records
from prompt import Conversation

I = b'{"instruction": "a", "output": "b"}'  # one good instruct record
SHARE = b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}'
OPENAI = b'{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}'
DEEP = 100_000
BIG = b"1" * 5000

# (id, file name, content, regex for the message after the file name; ":N: " is a line, ": record N: "
# a JSON list index)
HOSTILE = [
    # wrong types of roles (used to raise TypeError: unhashable)
    ("sharegpt-role-list", "d.jsonl", b'{"conversations": [{"from": ["human"], "value": "a"}]}\n',
     r":1: conversations\[0\] has from=a list; expected one of \['assistant', 'gpt', 'human', 'system', 'user'\]$"),
    ("openai-role-dict", "d.jsonl", b'{"messages": [{"role": {"a": 1}, "content": "a"}]}\n',
     r":1: messages\[0\] has role=a dict; expected one of \['assistant', 'system', 'user'\]$"),
    ("openai-role-int", "d.jsonl", OPENAI + b'\n{"messages": [{"role": 1, "content": "a"}]}\n',
     r":2: messages\[0\] has role=1; expected one of"),
    ("openai-role-missing", "d.jsonl", b'{"messages": [{"content": "a"}]}\n', r":1: messages\[0\] has role=null;"),
    ("openai-role-huge-string", "d.jsonl", b'{"messages": [{"role": "' + b"x" * 100_000 + b'", "content": "a"}]}\n',
     r":1: messages\[0\] has role='x{40}'\.\.\.; expected one of"),
    ("sharegpt-role-bool", "d.json", b'[' + SHARE + b', {"conversations": [{"from": true, "value": "a"}]}]',
     r": record 1: conversations\[0\] has from=true;"),
    # wrong types of every other field
    ("sharegpt-conversations-string", "d.jsonl", b'{"conversations": "hi"}\n',
     r":1: field 'conversations' must be a list, got str$"),
    ("sharegpt-conversations-null", "d.jsonl", b'{"conversations": null}\n',
     r":1: field 'conversations' must be a list, got null$"),
    ("sharegpt-item-string", "d.jsonl", b'{"conversations": ["hi"]}\n',
     r":1: conversations\[0\] must be an object, got str$"),
    ("sharegpt-value-int", "d.jsonl", b'{"conversations": [{"from": "human", "value": 3}]}\n',
     r":1: conversations\[0\] field 'value' must be a string, got int$"),
    ("openai-messages-dict", "d.jsonl", b'{"messages": {"role": "user"}}\n',
     r":1: field 'messages' must be a list, got dict$"),
    ("openai-item-list", "d.jsonl", b'{"messages": [["user", "a"]]}\n',
     r":1: messages\[0\] must be an object, got list$"),
    ("openai-content-parts", "d.jsonl",
     b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]}\n',
     r":1: messages\[0\] field 'content' must be a string, got list$"),
    ("openai-content-missing", "d.jsonl", b'{"messages": [{"role": "user"}]}\n',
     r":1: messages\[0\] field 'content' must be a string, got null$"),
    ("instruct-instruction-bool", "d.jsonl", b'{"instruction": true, "output": "b"}\n',
     r":1: field 'instruction' must be a string, got bool$"),
    ("instruct-instruction-list", "d.jsonl", I + b'\n{"instruction": ["a"], "output": "b"}\n',
     r":2: field 'instruction' must be a string, got list$"),
    ("instruct-input-list", "d.jsonl", b'{"instruction": "a", "input": ["x"], "output": "b"}\n',
     r":1: field 'input' must be a string, got list$"),
    ("instruct-output-dict", "d.jsonl", b'{"instruction": "a", "output": {"text": "b"}}\n',
     r":1: field 'output' must be a string, got dict$"),
    ("instruct-output-float", "d.json", b'[' + I + b', {"instruction": "a", "output": 1.5}]',
     r": record 1: field 'output' must be a string, got float$"),
    ("instruct-empty-instruction", "d.jsonl", b'{"instruction": "", "output": "b"}\n', r":1: empty 'instruction'$"),
    ("instruct-blank-instruction", "d.jsonl", b'{"instruction": " \\n\\t", "output": "b"}\n',
     r":1: empty 'instruction'$"),
    ("vicuna-item-int", "d.jsonl", b'{"input": ["a", 1], "output": ["b", "c"]}\n',
     r":1: field 'input' must hold only strings; input\[1\] is int$"),
    ("vicuna-output-string", "d.jsonl", b'{"input": ["a"], "output": "b"}\n',
     r":1: field 'output' must be a list of strings for chat data, got str$"),
    ("vicuna-system-list", "d.jsonl", b'{"input": ["a"], "output": ["b"], "instruction": ["s"]}\n',
     r":1: field 'instruction' must be a string, got list$"),
    # records that are not objects
    ("scalar-file", "d.json", b"5", r":1: expected a JSON object, got int$"),
    ("string-file", "d.json", b'"hello"', r":1: expected a JSON object, got str$"),
    ("null-file", "d.jsonl", b"null\n", r":1: expected a JSON object, got null$"),
    ("list-of-scalars", "d.json", b"[1, 2, 3]", r": record 0: expected a JSON object, got int$"),
    ("list-of-lists", "d.json", b"[[" + I + b"]]", r": record 0: expected a JSON object, got list$"),
    ("jsonl-line-is-list", "d.jsonl", I + b"\n[1]\n", r":2: expected a JSON object, got list$"),
    ("jsonl-line-is-string", "d.jsonl", I + b'\n"text"\n', r":2: expected a JSON object, got str$"),
    ("mixed-formats", "d.jsonl", I + b"\n" + SHARE + b"\n",
     r":2: record format 'sharegpt' differs from the file's first record \('instruct'\)"),
    ("unknown-format", "d.jsonl", b'{"prompt": "a", "completion": "b"}\n',
     r":1: unknown record format with keys \['completion', 'prompt'\]"),
    ("unknown-format-many-long-keys", "d.jsonl",
     json.dumps({f"key{i}" * 50: i for i in range(1000)}).encode() + b"\n",
     r":1: unknown record format with keys \['key0key0.{22}'\.\.\., .*\.\.\. \(994 more\)\]; expected"),
    # huge nesting (used to raise RecursionError)
    ("deep-list-file", "d.json", b"[" * DEEP, r":1: JSON nested too deeply"),
    ("deep-object-file", "d.json", b'{"a": ' * DEEP, r":1: JSON nested too deeply"),
    ("deep-inside-record", "d.jsonl", I + b'\n{"instruction": "a", "output": "b", "x": ' + b"[" * DEEP + b"\n",
     r":2: JSON nested too deeply \(the parser stops near \d+ levels\)"),
    ("deep-inside-list-record", "d.json", b"[\n" + I + b",\n" + b"[" * DEEP + b"]", r":3: JSON nested too deeply"),
    # huge numbers (used to raise ValueError: Exceeds the limit (4300 digits))
    ("huge-int-jsonl", "d.jsonl", I + b'\n{"instruction": "a", "output": "b", "id": ' + BIG + b"}\n",
     r":2: a number with more than \d+ digits; write it as a string or remove it$"),
    ("huge-int-list", "d.json", b"[\n" + I + b',\n{"instruction": "a", "output": -' + BIG + b"}]",
     r":3: a number with more than \d+ digits"),
    ("huge-int-top-level", "d.json", BIG, r":1: a number with more than \d+ digits"),
    # NaN / Infinity (Python's json accepts them): never a string, so a clear type error
    ("nan-in-output", "d.jsonl", b'{"instruction": "a", "output": NaN}\n',
     r":1: field 'output' must be a string, got float$"),
    ("infinity-as-role", "d.jsonl", b'{"messages": [{"role": -Infinity, "content": "a"}]}\n',
     r":1: messages\[0\] has role=-Infinity;"),
    # unpaired surrogate escapes: valid JSON syntax, but not encodable text
    ("surrogate-instruct", "d.jsonl", I + b'\n{"instruction": "a", "output": "x\\ud800y"}\n',
     r":2: field 'output' holds an unpaired surrogate escape \\ud800 at character 1; "
     r"remove it or write the whole pair"),
    ("surrogate-low-alone", "d.json", b'[{"instruction": "\\udc00", "output": "b"}]',
     r": record 0: field 'instruction' holds an unpaired surrogate escape \\udc00 at character 0"),
    ("surrogate-reversed-pair", "d.jsonl", b'{"instruction": "a", "input": "\\ude00\\ud83d", "output": "b"}\n',
     r":1: field 'input' holds an unpaired surrogate escape \\ude00"),
    ("surrogate-sharegpt", "d.jsonl",
     b'{"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "\\ud83d"}]}\n',
     r":1: conversations\[1\] field 'value' holds an unpaired surrogate escape \\ud83d"),
    ("surrogate-openai-system", "d.jsonl", b'{"messages": [{"role": "system", "content": "\\udfff"}]}\n',
     r":1: messages\[0\] field 'content' holds an unpaired surrogate"),
    ("surrogate-vicuna", "d.jsonl", b'{"input": ["q"], "output": ["\\ud800"]}\n',
     r":1: output\[0\] holds an unpaired surrogate"),
    ("surrogate-vicuna-system", "d.jsonl", b'{"input": ["q"], "output": ["a"], "instruction": "\\ud800"}\n',
     r":1: field 'instruction' holds an unpaired surrogate"),
    # bytes that are not UTF-8 JSON text
    ("nul-byte", "d.jsonl", I + b'\n{"instruction": "a\x00", "output": "b"}\n',
     r":2: NUL byte at column 19; the file is binary or UTF-16, not UTF-8 JSON; save it as UTF-8 JSON or JSONL$"),
    ("utf16-no-bom", "d.jsonl", I.decode().encode("utf-16-le"), r":1: NUL byte at column 2;"),
    ("utf16-bom", "d.jsonl", I.decode().encode("utf-16"),
     r": UTF-16 text \(it starts with a UTF-16 byte-order mark\); save it as UTF-8$"),
    ("invalid-utf8", "d.jsonl", I + b'\n{"instruction": "\xff", "output": "b"}\n',
     r":2: not UTF-8 text \(invalid start byte at byte 53\); save it as UTF-8$"),
    ("latin1", "d.json", b'[{"instruction": "caf\xe9", "output": "b"}]',
     r":1: not UTF-8 text \(invalid continuation byte at byte 21\)"),
    ("encoded-surrogate-bytes", "d.jsonl", b'{"instruction": "\xed\xa0\x80", "output": "b"}\n', r":1: not UTF-8 text"),
    ("gzip", "d.jsonl", b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03",
     r": gzip-compressed; decompress it first \(gunzip\)"),
    # raw control characters are not allowed inside JSON strings (escaped ones are: see below)
    ("raw-form-feed", "d.jsonl", I + b'\n{"instruction": "a", "output": "b\x0cc"}\n',
     r":2: invalid JSON \(raw control character U\+000C inside a string at column 34; write it as \\u000c\)"),
    ("raw-tab", "d.json", b'[{"instruction": "a\tb", "output": "c"}]',
     r":1: invalid JSON \(raw control character U\+0009 inside a string at column 20; write it as \\u0009\)"),
    # syntax
    ("jsonl-truncated-last-line", "d.jsonl", I + b'\n{"instruction": "x", "output": ',
     r":2: invalid JSON \(Expecting value at column 32\); write one JSON object per line$"),
    ("jsonl-two-objects-per-line", "d.jsonl", I + b"\n" + I + I + b"\n",
     r":2: invalid JSON \(Extra data at column 36\)"),
    ("jsonl-single-quotes", "d.jsonl", I + b"\n{'instruction': 'a', 'output': 'b'}\n",
     r":2: invalid JSON \(Expecting property name enclosed in double quotes at column 2\)"),
    ("jsonl-bad-escape", "d.jsonl", b'{"instruction": "\\x41", "output": "b"}\n',
     r":1: invalid JSON \(Invalid \\escape at column 18\)"),
    ("jsonl-first-line-truncated", "d.jsonl", b'{"instruction": "x", "output": \n' + I + b"\n",
     r":3: invalid JSON \(Expecting ',' delimiter at column 1\) in the record that starts on line 1; "
     r"write one JSON object per line, or one JSON list of objects$"),
    ("pretty-object-missing-comma", "d.json", b'{\n  "instruction": "a",\n  "output": "b"\n  "x": 1\n}\n',
     r":4: invalid JSON \(Expecting ',' delimiter at column 3\) in the record that starts on line 1"),
    ("pretty-objects-second-bad", "d.jsonl", b'{\n  "instruction": "a",\n  "output": "b"\n}\n{\n  "instruction": \n}\n',
     r":7: invalid JSON \(Expecting value at column 1\) in the record that starts on line 5"),
    ("garbage-after-object", "d.json", I + b" xyz\n", r":1: invalid JSON \(Expecting value at column 37\)"),
    ("list-trailing-comma", "d.json", b"[" + I + b",\n]", r":2: invalid JSON \(Expecting value at column 1\)"),
    ("list-unclosed", "d.json", b"[\n" + I + b"\n", r":3: invalid JSON \(Expecting ',' delimiter at column 1\)"),
    ("list-missing-comma", "d.json", b"[" + I + b"\n" + I + b"]",
     r":2: invalid JSON \(Expecting ',' delimiter at column 1\)"),
    ("list-then-more", "d.json", b"[" + I + b"]\n[" + I + b"]\n",
     r":2: invalid JSON \(Extra data at column 1\); the JSON list ends on line 1, put every record inside it$"),
    ("not-json-at-all", "d.txt", b"hello world\n", r":1: invalid JSON \(Expecting value at column 1\)"),
    ("csv", "d.csv", b"instruction,output\na,b\n", r":1: invalid JSON \(Expecting value at column 1\)"),
    # nothing in it
    ("empty-file", "d.jsonl", b"", r": no records; the file is empty$"),
    ("only-whitespace", "d.jsonl", b" \n\t\r\n\n", r": no records; the file is empty$"),
    ("only-bom", "d.json", b"\xef\xbb\xbf\n", r": no records; the file is empty$"),
    ("empty-list", "d.json", b" [ ]\n", r": no records; the JSON list is empty$"),
    # conversation structure
    ("empty-conversation", "d.jsonl", b'{"messages": []}\n', r":1: empty conversation$"),
    ("only-system", "d.jsonl", b'{"conversations": [{"from": "system", "value": "s"}]}\n', r":1: empty conversation$"),
    ("two-systems", "d.jsonl",
     b'{"messages": [{"role": "system", "content": "s"}, {"role": "system", "content": "t"}]}\n',
     r":1: turn 0 is 'system' but 'user' was expected"),
]


@pytest.mark.parametrize("name,content,message", [c[1:] for c in HOSTILE], ids=[c[0] for c in HOSTILE])
def test_hostile_file_is_one_line_naming_file_and_place(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        load_conversations(str(path))
    text = str(info.value)
    assert "\n" not in text and len(text) - len(str(path)) < 400, text
    assert re.match(re.escape(str(path)) + message, text), text


def test_directory_missing_and_device(tmp_path):
    (tmp_path / "dir.jsonl").mkdir()
    cases = [(str(tmp_path / "dir.jsonl"), "is a directory; pass a JSON or JSONL file to --data_path"),
             (str(tmp_path / "none.jsonl"), "no such file; pass an existing JSON or JSONL file to --data_path")]
    if os.path.exists("/dev/null"):  # a device: /dev/zero or a tape would be read until memory runs out
        cases.append(("/dev/null", "not a regular file; pass a JSON or JSONL file to --data_path"))
    for path, message in cases:
        with pytest.raises(DataError, match=f"^{re.escape(path)}: {message}$"):
            load_conversations(path)


def test_unreadable_file(tmp_path):
    path = tmp_path / "secret.jsonl"
    path.write_bytes(I + b"\n")
    path.chmod(0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions are not enforced")
        with pytest.raises(DataError, match=rf"^{re.escape(str(path))}: cannot read it \(Permission denied\); "
                                            "pass a readable JSON or JSONL file$"):
            load_conversations(str(path))
    finally:
        path.chmod(0o600)


def test_unprintable_path_is_quoted_so_the_message_stays_one_line(tmp_path):
    path = tmp_path / "a\nb.jsonl"
    path.write_bytes(b"5\n")
    with pytest.raises(DataError) as info:
        load_conversations(str(path))
    assert str(info.value) == f"{str(path)!r}:1: expected a JSON object, got int"


# Valid files and what they must load as; the old line-splitting reader rejected the raw separators,
# the BOM before JSONL and the pretty-printed objects.
INSTRUCT_AB = ("instruct", [Conversation(turns=[("a", "b")], input="")])
SEP = "\u2028 \u2029 \x85"  # all allowed raw inside JSON strings; str.splitlines splits on each
VALID = [
    ("raw-line-separators-in-jsonl", "d.jsonl",
     ('{"instruction": "x\u2028y", "output": "p\u2029q\x85r"}\n' + I.decode() + "\n").encode(),
     ("instruct", [Conversation(turns=[("x\u2028y", "p\u2029q\x85r")], input=""),
                   Conversation(turns=[("a", "b")], input="")])),
    ("raw-separators-in-chat", "d.jsonl",
     json.dumps({"messages": [{"role": "user", "content": SEP}, {"role": "assistant", "content": "ok" + SEP}]},
                ensure_ascii=False).encode() + b"\n",
     ("openai", [Conversation(turns=[(SEP, "ok" + SEP)])])),
    ("escaped-controls", "d.jsonl", b'{"instruction": "a\\u000bb\\u000c\\u001c\\u001d\\u001e", "output": "\\u0000"}\n',
     ("instruct", [Conversation(turns=[("a\x0bb\x0c\x1c\x1d\x1e", "\x00")], input="")])),
    ("bom-jsonl", "d.jsonl", b"\xef\xbb\xbf" + I + b"\n" + I + b"\n", ("instruct", INSTRUCT_AB[1] * 2)),
    ("bom-inside-concatenated-jsonl", "d.jsonl", I + b"\n\xef\xbb\xbf" + I + b"\n", ("instruct", INSTRUCT_AB[1] * 2)),
    ("bom-json-list", "d.json", b"\xef\xbb\xbf[" + I + b"]", INSTRUCT_AB),
    ("crlf-jsonl", "d.jsonl", I + b"\r\n\r\n" + I + b"\r\n", ("instruct", INSTRUCT_AB[1] * 2)),
    ("crlf-pretty-list", "d.json", b"[\r\n  " + I + b"\r\n]\r\n", INSTRUCT_AB),
    ("no-final-newline", "d.jsonl", I, INSTRUCT_AB),
    ("pretty-single-object", "d.json",
     json.dumps({"instruction": "a", "input": "ctx", "output": "b"}, indent=2).encode(),
     ("instruct", [Conversation(turns=[("a", "b")], input="ctx")])),
    ("pretty-single-object-bom-crlf", "d.json",
     b"\xef\xbb\xbf" + json.dumps(json.loads(SHARE), indent=4).replace("\n", "\r\n").encode(),
     ("sharegpt", [Conversation(turns=[("q", "a")])])),
    ("pretty-objects-concatenated", "d.jsonl",
     b"\n".join(json.dumps(r, indent=2, ensure_ascii=False).encode()
                for r in [{"instruction": "一", "output": "1"}, {"instruction": "二", "output": "2"}]) + b"\n",
     ("instruct", [Conversation(turns=[("一", "1")], input=""), Conversation(turns=[("二", "2")], input="")])),
    ("surrogate-pair-escape", "d.jsonl", b'{"instruction": "\\ud83d\\ude00", "output": "b"}\n',
     ("instruct", [Conversation(turns=[("\U0001f600", "b")], input="")])),
    ("nan-and-big-float-in-unused-field", "d.jsonl", b'{"instruction": "a", "output": "b", "x": NaN, "y": 1e999999}\n',
     INSTRUCT_AB),
    ("moderate-nesting-in-unused-field", "d.jsonl",
     b'{"instruction": "a", "output": "b", "x": ' + b"[" * 200 + b"]" * 200 + b"}\n",
     INSTRUCT_AB),
    ("empty-strings-allowed", "d.jsonl", b'{"instruction": "a", "input": "", "output": ""}\n',
     ("instruct", [Conversation(turns=[("a", "")], input="")])),
]


@pytest.mark.parametrize("name,content,expected", [c[1:] for c in VALID], ids=[c[0] for c in VALID])
def test_valid_file_loads_exactly(tmp_path, name, content, expected):
    path = tmp_path / name
    path.write_bytes(content)
    assert load_conversations(str(path)) == expected


def test_records_are_named_by_the_line_they_start_on(tmp_path):
    pretty = tmp_path / "p.jsonl"
    pretty.write_text('\n{\n  "instruction": "a",\n  "output": "b"\n}\n\n{"instruction": "c",\n "output": "d"}\n')
    assert [where for where, _ in read_records(str(pretty))] == [f"{pretty}:2", f"{pretty}:7"]
    lines = tmp_path / "l.jsonl"
    lines.write_bytes(I + b"\n\n" + ('{"instruction": "\u2028", "output": "b"}\r\n').encode() + I)
    assert [where for where, _ in read_records(str(lines))] == [f"{lines}:1", f"{lines}:3", f"{lines}:4"]
    listed = tmp_path / "l.json"
    listed.write_bytes(b"[\n" + I + b",\n\n" + I + b"]")
    assert [where for where, _ in read_records(str(listed))] == [f"{listed}: record 0", f"{listed}: record 1"]
    with pytest.raises(DataError, match=rf"^{re.escape(str(pretty))}:7: field 'output' must be a string, got int$"):
        pretty.write_text('{\n"instruction": "a",\n"output": "b"\n}\n\n\n{"instruction": "c",\n "output": 5}\n')
        load_conversations(str(pretty))


CLI = ["sharegpt-role-list", "deep-list-file", "huge-int-jsonl", "surrogate-instruct", "nul-byte", "invalid-utf8",
       "utf16-bom", "pretty-object-missing-comma", "empty-list"]


@pytest.mark.parametrize("case", [c for c in HOSTILE if c[0] in CLI], ids=CLI)
def test_cli_hostile_data_exits_2_with_one_line(tmp_path, case):
    _, name, content, message = case
    data = tmp_path / name
    data.write_bytes(content)
    out = tmp_path / "out"
    result = run_script("finetune.py", "--data_path", str(data), "--output_path", str(out), timeout=120)
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert re.match("error: " + re.escape(str(data)) + message, lines[0]), lines[0]
    assert result.stdout == ""
    assert not out.exists()
