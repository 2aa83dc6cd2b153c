"""Reading and validating instruction and chat data files.

Formats, detected per file from the first record:
  instruct     {"instruction": str, "input": str (optional), "output": str}      (alpaca)
  vicuna_chat  {"input": [str, ...], "output": [str, ...]}                       (Chinese-Vicuna)
  sharegpt     {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
  openai       {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}

A file is a JSON list (`.json`) or one JSON object per line (`.jsonl`, also accepted for `.json`
files that are not a list); lines are split on "\n" only, CRLF and a UTF-8 BOM are accepted, and a
file whose first record spans several lines is read as pretty-printed objects one after another.
Every record is validated before anything is trained; the first bad one raises `DataError` naming
the file, the line (JSONL) or record index (JSON list) and the fix. Hostile input (deep nesting,
huge numbers, unpaired surrogate escapes, NUL bytes, invalid UTF-8, wrong types) is a `DataError`
too, never a traceback.
"""

from __future__ import annotations

import json
import math
import os
import random
import re
import stat
import sys
from dataclasses import dataclass

from errors import UserError, one_line
from prompt import Conversation


class DataError(UserError):
    """Bad user data: the message is one line, ready to print."""


FORMATS = ("instruct", "vicuna_chat", "sharegpt", "openai")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


_WS = re.compile(r"[ \t\n\r]*")  # JSON whitespace
_DECODER = json.JSONDecoder()
_SURROGATE = re.compile("[\ud800-\udfff]")
_JSONL_HINT = "; write one JSON object per line"


def _name(path: str) -> str:
    """The path as printed in messages: repr'd when it holds a newline or other unprintable character."""
    return path if path.isprintable() else repr(path)


def _short(value, limit: int = 40) -> str:
    """A short repr for messages: long strings are cut, other values shown by type."""
    if isinstance(value, str):
        return repr(value[:limit]) + ("..." if len(value) > limit else "")
    if value is None or isinstance(value, (bool, int, float)):
        return json.dumps(value) if not isinstance(value, int) or abs(value) < 10**40 else "a huge number"
    return f"a {_type(value)}"


def _type(value) -> str:
    return "null" if value is None else type(value).__name__


def _read_text(path: str, flag: str = "--data_path") -> str:
    name = _name(path)
    if not os.path.exists(path):
        raise DataError(f"{name}: no such file; pass an existing JSON or JSONL file to {flag}")
    if os.path.isdir(path):
        raise DataError(f"{name}: is a directory; pass a JSON or JSONL file to {flag}")
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) or stat.S_ISSOCK(mode):
            raise DataError(f"{name}: not a regular file; pass a JSON or JSONL file to {flag}")
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"{name}: cannot read it ({e.strerror or e}); pass a readable JSON or JSONL file") from None
    if raw.startswith((b"\xff\xfe", b"\xfe\xff")):
        raise DataError(f"{name}: UTF-16 text (it starts with a UTF-16 byte-order mark); save it as UTF-8")
    if raw.startswith(b"\x1f\x8b"):
        raise DataError(f"{name}: gzip-compressed; decompress it first (gunzip) and pass the JSON or JSONL file")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        raise DataError(f"{name}:{line}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    if text.startswith("\ufeff"):  # a UTF-8 byte-order mark; a space keeps error columns right
        text = " " + text[1:]
    nul = text.find("\x00")
    if nul >= 0:
        line = text.count("\n", 0, nul) + 1
        raise DataError(f"{name}:{line}: NUL byte at column {nul - (text.rfind(chr(10), 0, nul) + 1) + 1}; "
                        "the file is binary or UTF-16, not UTF-8 JSON; save it as UTF-8 JSON or JSONL")
    return text


def _decode(doc: str, pos: int, name: str, line: int, first_line: int = 1, hint: str = "") -> tuple[object, int]:
    """Decode the JSON value at doc[pos] -> (value, end). `line` is the file line where the value
    starts and `first_line` the file line of doc's first line: every failure is a one-line DataError."""
    try:
        return _DECODER.raw_decode(doc, pos)
    except json.JSONDecodeError as e:
        raise _json_error(name, e, line, first_line, hint) from None
    except RecursionError:
        raise DataError(f"{name}:{line}: JSON nested too deeply (the parser stops near "
                        f"{sys.getrecursionlimit()} levels); records are objects of strings and lists of "
                        "messages, so flatten it") from None
    except ValueError as e:  # Python's limit on int digits ("Exceeds the limit (4300 digits) ...")
        if "integer string conversion" in str(e):
            raise DataError(f"{name}:{line}: a number with more than {sys.get_int_max_str_digits()} digits; "
                            "write it as a string or remove it") from None
        raise DataError(f"{name}:{line}: invalid JSON ({one_line(e)}){hint}") from None


def _json_error(name: str, e: json.JSONDecodeError, line: int, first_line: int = 1, hint: str = "") -> DataError:
    at = first_line + e.lineno - 1
    if e.msg.startswith("Invalid control character") and e.pos < len(e.doc):
        code = ord(e.doc[e.pos])
        message = (f"{name}:{at}: invalid JSON (raw control character U+{code:04X} inside a string at "
                   f"column {e.colno}; write it as \\u{code:04x})")
    else:
        message = f"{name}:{at}: invalid JSON ({e.msg} at column {e.colno})"
    if at != line:
        message += f" in the record that starts on line {line}"
    return DataError(message + hint)


class _Lines:
    """Line numbers of positions in `text`, for positions visited in increasing order."""

    def __init__(self, text: str):
        self.text, self.pos, self.line = text, 0, 1

    def at(self, pos: int) -> int:
        self.line += self.text.count("\n", self.pos, pos)
        self.pos = pos
        return self.line


def _read_list(text: str, start: int, name: str) -> list[tuple[str, object]]:
    """A file holding one JSON list: each item is a record, named 'file: record N'."""
    try:  # the fast path; on any failure the loop below finds the line and reports it
        items = _DECODER.decode(text)
        if items:
            return [(f"{name}: record {i}", item) for i, item in enumerate(items)]
    except (ValueError, RecursionError):
        pass
    lines = _Lines(text)
    records = []
    pos = _WS.match(text, start + 1).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            value, pos = _decode(text, pos, name, lines.at(pos))
            records.append((f"{name}: record {len(records)}", value))
            pos = _WS.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
                continue
            if text.startswith("]", pos):
                pos += 1
                break
            raise _json_error(name, json.JSONDecodeError("Expecting ',' delimiter", text, pos), lines.at(pos))
    end_line = lines.at(pos)
    pos = _WS.match(text, pos).end()
    if pos < len(text):
        raise _json_error(name, json.JSONDecodeError("Extra data", text, pos), lines.at(pos),
                          hint=f"; the JSON list ends on line {end_line}, put every record inside it")
    if not records:
        raise DataError(f"{name}: no records; the JSON list is empty")
    return records


def _read_objects(text: str, start: int, name: str) -> list[tuple[str, object]]:
    """JSON values one after another, any spread over several lines (pretty-printed objects):
    each is a record, named 'file:line N' by the line it starts on."""
    lines = _Lines(text)
    records = []
    pos = start
    while pos < len(text):
        line = lines.at(pos)
        value, pos = _decode(text, pos, name, line,
                             hint="; write one JSON object per line, or one JSON list of objects")
        records.append((f"{name}:{line}", value))
        pos = _WS.match(text, pos).end()
    return records


def _decode_line(line: str, name: str, lineno: int) -> object:
    """One JSONL line -> its value; anything but whitespace after it is an error."""
    value, end = _decode(line, _WS.match(line).end(), name, lineno, lineno, _JSONL_HINT)
    end = _WS.match(line, end).end()
    if end < len(line):
        raise _json_error(name, json.JSONDecodeError("Extra data", line, end), lineno, lineno, _JSONL_HINT)
    return value


def read_records(path: str, flag: str = "--data_path") -> list[tuple[str, object]]:
    """[(where, record)] where `where` is "file:line N" or "file: record N" for error messages.

    A file that starts with `[` is one JSON list. Otherwise it is JSONL: one value per line, split
    on "\n" only (U+2028 and friends are allowed raw inside JSON strings), CRLF and a UTF-8 BOM
    accepted. When its first line is not a whole JSON value, the file is read as pretty-printed
    objects one after another (a `.json` file holding one object is one record).
    """
    name = _name(path)
    text = _read_text(path, flag)
    start = _WS.match(text).end()
    if start == len(text):
        return []
    if text[start] == "[":
        return _read_list(text, start, name)
    lines = [(lineno, line.lstrip("\ufeff"))  # a BOM left inside by concatenating files
             for lineno, line in enumerate(text.split("\n"), start=1)]
    lines = [(lineno, line) for lineno, line in lines if line.strip()]
    if not lines:
        return []
    try:
        _decode_line(lines[0][1], name, lines[0][0])
    except DataError:
        return _read_objects(text, start, name)
    return [(f"{name}:{lineno}", _decode_line(line, name, lineno)) for lineno, line in lines]


def _keys(record: dict) -> str:
    keys = sorted(record)
    shown = ", ".join(_short(k, 30) for k in keys[:6])
    return f"[{shown}{f', ... ({len(keys) - 6} more)' if len(keys) > 6 else ''}]"


def detect_format(record: dict, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {_type(record)}")
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record:
        return "instruct"
    if isinstance(record.get("input"), list) or isinstance(record.get("output"), list):
        return "vicuna_chat"
    raise DataError(
        f"{where}: unknown record format with keys {_keys(record)}; expected instruction/input/output, "
        "input/output lists, conversations (ShareGPT) or messages (OpenAI)"
    )


def _text(value: str, where: str, field: str) -> str:
    """A string that will be tokenized and written: no unpaired UTF-16 surrogate (a lone "\\ud800"
    escape parses as JSON but cannot be encoded as UTF-8 later)."""
    bad = None if value.isascii() else _SURROGATE.search(value)
    if bad:
        raise DataError(f"{where}: {field} holds an unpaired surrogate escape \\u{ord(bad.group()):04x} at "
                        f"character {bad.start()}; remove it or write the whole pair (e.g. \\ud83d\\ude00)")
    return value


def _string(record: dict, key: str, where: str, optional: bool = False) -> str:
    if key not in record or record[key] is None:
        if optional:
            return ""
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {_type(value)}")
    return _text(value, where, f"field {key!r}")


def _pair_turns(messages: list[tuple[str, str]], where: str, open_end: bool = False) -> Conversation:
    """[(role, text)] with an optional leading system message -> Conversation, checking order.
    `open_end`: a last user turn without an answer is allowed (a generation prompt)."""
    system = None
    if messages and messages[0][0] == "system":
        system = messages[0][1]
        messages = messages[1:]
    if not messages:
        raise DataError(f"{where}: empty conversation")
    turns = []
    for i, (role, text) in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if role != expected:
            raise DataError(f"{where}: turn {i} is {role!r} but {expected!r} was expected; "
                            "turns must alternate user/assistant after an optional system message")
        if expected == "assistant":
            turns.append((messages[i - 1][1], text))
    if len(messages) % 2:
        if not open_end:
            raise DataError(f"{where}: conversation ends with a user turn; the last turn must be the assistant's")
        turns.append((messages[-1][1], None))
    return Conversation(turns=turns, system=system)


def parse_record(record: dict, fmt: str, where: str, open_end: bool = False) -> Conversation:
    """One record as a Conversation; `open_end`: the last answer may be missing (a prompt)."""
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "instruct":
        instruction = _string(record, "instruction", where)
        inp = _string(record, "input", where, optional=True)
        output = _string(record, "output", where, optional=open_end)
        if not instruction.strip():
            raise DataError(f"{where}: empty 'instruction'")
        return Conversation(turns=[(instruction, output)], input=inp)
    if fmt == "vicuna_chat":
        inputs, outputs = record.get("input"), record.get("output")
        for key, value in (("input", inputs), ("output", outputs)):
            if not isinstance(value, list):
                raise DataError(f"{where}: field {key!r} must be a list of strings for chat data, "
                                f"got {_type(value)}")
            for i, v in enumerate(value):
                if not isinstance(v, str):
                    raise DataError(f"{where}: field {key!r} must hold only strings; {key}[{i}] is {_type(v)}")
                _text(v, where, f"{key}[{i}]")
        if not inputs:
            raise DataError(f"{where}: empty conversation")
        if len(inputs) != len(outputs) and not (open_end and len(inputs) == len(outputs) + 1):
            raise DataError(f"{where}: {len(inputs)} user turns but {len(outputs)} assistant turns; "
                            "'input' and 'output' must have the same length")
        system = _string(record, "instruction", where, optional=True)
        return Conversation(turns=list(zip(inputs, outputs + [None])), system=system or None)
    if fmt == "sharegpt":
        return _pair_turns(_messages(record, where, "conversations", "from", "value", SHAREGPT_ROLES), where, open_end)
    if fmt == "openai":
        return _pair_turns(_messages(record, where, "messages", "role", "content", OPENAI_ROLES), where, open_end)
    raise DataError(f"{where}: unknown format {fmt!r}")


def _messages(record, where, key, role_key, text_key, roles) -> list[tuple[str, str]]:
    items = record.get(key)
    if not isinstance(items, list):
        raise DataError(f"{where}: field {key!r} must be a list, got {_type(items)}")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object, got {_type(item)}")
        role = item.get(role_key)
        if not isinstance(role, str) or role not in roles:
            raise DataError(f"{where}: {key}[{i}] has {role_key}={_short(role)}; expected one of {sorted(roles)}")
        text = item.get(text_key)
        if not isinstance(text, str):
            raise DataError(f"{where}: {key}[{i}] field {text_key!r} must be a string, got {_type(text)}")
        out.append((roles[role], _text(text, where, f"{key}[{i}] field {text_key!r}")))
    return out


def parse_records(records: list[tuple[str, object]], open_end: bool = False):
    """(format, where, Conversation or DataError) for each record, in order. The file's format is its
    first record's; one bad record does not stop the others being checked."""
    fmt = None
    for where, record in records:
        try:
            found = detect_format(record, where)
            fmt = fmt or found
            if found != fmt:
                raise DataError(f"{where}: record format {found!r} differs from the file's first record "
                                f"({fmt!r}); use one format per file")
            conv = parse_record(record, fmt, where, open_end)
            conv.where = where
            yield fmt, where, conv
        except DataError as e:
            yield fmt, where, e


def _some_records(path: str, flag: str) -> list[tuple[str, object]]:
    records = read_records(path, flag)
    if not records:
        raise DataError(f"{_name(path)}: no records; the file is empty")
    return records


def load_conversations(path: str, flag: str = "--data_path", open_end: bool = False) -> tuple[str, list[Conversation]]:
    """Read, detect and validate a whole file. Returns (format, conversations); the first bad
    record is a DataError. `open_end`: records may lack their last answer (generation prompts)."""
    records = _some_records(path, flag)
    convs = []
    for fmt, _, conv in parse_records(records, open_end):
        if isinstance(conv, DataError):
            raise conv
        convs.append(conv)
    return fmt, convs


def check_data_file(path: str, flag: str = "--data_path") -> tuple[str | None, int, list[str]]:
    """(format, records, every error as one line) for a file, as load_conversations words them; a
    file that cannot be read (or a JSON syntax error, which ends the reading) is one error."""
    try:
        records = _some_records(path, flag)
    except UserError as e:
        return None, 0, [str(e)]
    fmt, errors = None, []
    for fmt, _, conv in parse_records(records):
        if isinstance(conv, DataError):
            errors.append(str(conv))
    return fmt, len(records), errors


# --- several files in one run: --data_path a.jsonl,b.json --data_shares 0.7,0.3 -------------------


@dataclass
class DataFile:
    """One file of --data_path, read and validated on its own (each file has its own format)."""

    path: str
    format: str
    conversations: list[Conversation]


def data_paths(spec: str) -> list[str]:
    """The files of --data_path: comma-separated (a name that exists as written is one file, even
    with a comma in it)."""
    if "," not in spec or os.path.exists(spec):
        return [spec]
    paths = [p.strip() for p in spec.split(",")]
    if not all(paths):
        raise DataError(f"--data_path {_name(spec)}: an empty file name between commas; pass FILE or FILE1,FILE2")
    twice = sorted({p for p in paths if paths.count(p) > 1})
    if twice:
        raise DataError(f"--data_path names {_name(twice[0])} twice; name each file once (--data_shares gives a "
                        "file more weight)")
    return paths


def load_data_files(spec: str) -> list[DataFile]:
    """Every file of --data_path read and validated (load_conversations): the first bad record of
    any file is a one-line DataError naming it."""
    return [DataFile(path, *load_conversations(path)) for path in data_paths(spec)]


def parse_shares(spec: str | None, n_files: int) -> list[float] | None:
    """--data_shares: one positive share per --data_path file, summing to 1 (None: no mixing)."""
    if spec is None:
        return None
    try:
        shares = [float(x) for x in spec.split(",")]
    except ValueError:
        raise DataError(f"--data_shares {_name(spec)}: not a comma-separated list of numbers, e.g. 0.7,0.3") from None
    if len(shares) != n_files:
        raise DataError(f"--data_shares {spec} has {len(shares)} shares but --data_path has {n_files} "
                        f"file{'s' if n_files != 1 else ''}; pass one share per file")
    if not all(math.isfinite(x) and x > 0 for x in shares):
        raise DataError(f"--data_shares {spec}: every share must be a number > 0")
    if abs(sum(shares) - 1) > 1e-6:
        raise DataError(f"--data_shares {spec} sums to {sum(shares):g}; the shares must sum to 1")
    return shares


def split_counts(total: int, weights: list[float]) -> list[int]:
    """`total` split in proportion to `weights` (largest remainder: the parts sum to `total`)."""
    exact = [total * w / sum(weights) for w in weights]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(weights)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[:total - sum(counts)]:
        counts[i] += 1
    return counts


def split_files(files: list[DataFile], test_size: int, seed: int, spec: str) -> list[tuple[list, list]]:
    """(train, test) conversations of each file: the held-out records are taken from each file in
    proportion to its size (train_test_split within each file)."""
    total = sum(len(f.conversations) for f in files)
    if len(files) > 1 and test_size >= total and test_size > 0:
        raise DataError(f"--test_size {test_size} leaves no training data: --data_path {_name(spec)} has {total} "
                        f"records; pass a smaller --test_size (at most {total - 1}) or 0")
    counts = split_counts(test_size, [len(f.conversations) for f in files])
    return [train_test_split(f.conversations, k, seed, f.path) for f, k in zip(files, counts)]


def as_prompt(conv: Conversation) -> Conversation:
    """The conversation up to its last user turn, unanswered: what a model is asked to continue."""
    user = conv.turns[-1][0]
    return Conversation(turns=[*conv.turns[:-1], (user, None)], system=conv.system, input=conv.input, where=conv.where)


def load_prompts(path: str, flag: str = "--eval_prompts") -> list[Conversation]:
    """Generation prompts from a file in any of the data formats; the last answer may be missing
    (sample/heldout_prompts.json) and is dropped when present."""
    return [as_prompt(conv) for conv in load_conversations(path, flag, open_end=True)[1]]


def read_eval_prompts(spec: str | None, prompt_type: str) -> list[Conversation] | None:
    """--eval_prompts: its prompts read and checked, [] for "none", None for the default (chosen by
    train.py once the held-out split is made)."""
    if spec is None:
        return None
    if spec == "none":
        return []
    prompts = load_prompts(spec)
    for conv in prompts:
        if prompt_type == "instruct" and not conv.is_single_turn:
            raise DataError(f"--eval_prompts {conv.where}: {len(conv.turns)} turns, but the instruct template holds "
                            "one instruction; pass single-turn prompts or --prompt_type chat")
    return prompts


def mix(per_file: list[list], shares: list[float] | None, seed: int) -> list[list]:
    """Each file's training examples as the mix takes them: all of them without `shares`; with
    them, share_i of the total from file i, a random subset (no repeats) when the file has more
    and the whole file repeated, plus a random subset, when it has fewer. Deterministic in `seed`."""
    if shares is None:
        return per_file
    rng = random.Random(seed)
    taken = []
    for items, k in zip(per_file, split_counts(sum(len(x) for x in per_file), shares)):
        whole, rest = divmod(k, len(items)) if items else (0, 0)
        taken.append(items * whole + [items[i] for i in sorted(rng.sample(range(len(items)), rest))])
    return taken


def train_test_split(items: list, test_size: int, seed: int, path: str) -> tuple[list, list]:
    """Shuffle with `seed` and hold out `test_size` items (0 = no evaluation set)."""
    if test_size < 0:
        raise DataError(f"--test_size must be >= 0, got {test_size}")
    if test_size >= len(items) and test_size > 0:
        raise DataError(f"--test_size {test_size} leaves no training data: {path} has {len(items)} "
                        f"records; pass a smaller --test_size (at most {len(items) - 1}) or 0")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    test = [items[i] for i in sorted(order[:test_size])]
    train = [items[i] for i in order[test_size:]]
    return train, test
