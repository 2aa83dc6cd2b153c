"""Reading and validating instruction and chat data files.

Formats, detected per file from the first record:
  instruct     {"instruction": str, "input": str (optional), "output": str}      (alpaca)
  vicuna_chat  {"input": [str, ...], "output": [str, ...]}                       (Chinese-Vicuna)
  sharegpt     {"conversations": [{"from": "human"|"gpt"|"system", "value": str}, ...]}
  openai       {"messages": [{"role": "user"|"assistant"|"system", "content": str}, ...]}

A file is a JSON list (`.json`) or one JSON object per line (`.jsonl`, also accepted for `.json`
files that are not a list). Every record is validated before anything is trained; the first bad
one raises `DataError` naming the file, the line (JSONL) or record index (JSON list) and the fix.
"""

from __future__ import annotations

import json
import os
import random

from errors import UserError
from prompt import Conversation


class DataError(UserError):
    """Bad user data: the message is one line, ready to print."""


FORMATS = ("instruct", "vicuna_chat", "sharegpt", "openai")

SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "system": "system"}
OPENAI_ROLES = {"user": "user", "assistant": "assistant", "system": "system"}


def read_records(path: str) -> list[tuple[str, dict]]:
    """[(where, record)] where `where` is "file:line N" or "file:record N" for error messages."""
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file; pass an existing JSON or JSONL file to --data_path")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory; pass a JSON or JSONL file to --data_path")
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    stripped = text.lstrip("\ufeff \t\r\n")
    if stripped.startswith("["):
        try:
            items = json.loads(stripped)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{e.lineno}: invalid JSON ({e.msg} at column {e.colno})") from None
        return [(f"{path}: record {i}", item) for i, item in enumerate(items)]
    records = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno}); "
                            "write one JSON object per line") from None
    return records


def detect_format(record: dict, where: str) -> str:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if "conversations" in record:
        return "sharegpt"
    if "messages" in record:
        return "openai"
    if "instruction" in record:
        return "instruct"
    if isinstance(record.get("input"), list) or isinstance(record.get("output"), list):
        return "vicuna_chat"
    raise DataError(
        f"{where}: unknown record format with keys {sorted(record)}; expected instruction/input/output, "
        "input/output lists, conversations (ShareGPT) or messages (OpenAI)"
    )


def _string(record: dict, key: str, where: str, optional: bool = False) -> str:
    if key not in record or record[key] is None:
        if optional:
            return ""
        raise DataError(f"{where}: missing field {key!r}")
    value = record[key]
    if not isinstance(value, str):
        raise DataError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
    return value


def _pair_turns(messages: list[tuple[str, str]], where: str) -> Conversation:
    """[(role, text)] with an optional leading system message -> Conversation, checking order."""
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
        raise DataError(f"{where}: conversation ends with a user turn; the last turn must be the assistant's")
    return Conversation(turns=turns, system=system)


def parse_record(record: dict, fmt: str, where: str) -> Conversation:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(record).__name__}")
    if fmt == "instruct":
        instruction = _string(record, "instruction", where)
        inp = _string(record, "input", where, optional=True)
        output = _string(record, "output", where)
        if not instruction.strip():
            raise DataError(f"{where}: empty 'instruction'")
        return Conversation(turns=[(instruction, output)], input=inp)
    if fmt == "vicuna_chat":
        inputs, outputs = record.get("input"), record.get("output")
        for key, value in (("input", inputs), ("output", outputs)):
            if not isinstance(value, list):
                raise DataError(f"{where}: field {key!r} must be a list of strings for chat data")
            if not all(isinstance(v, str) for v in value):
                raise DataError(f"{where}: field {key!r} must hold only strings")
        if not inputs:
            raise DataError(f"{where}: empty conversation")
        if len(inputs) != len(outputs):
            raise DataError(f"{where}: {len(inputs)} user turns but {len(outputs)} assistant turns; "
                            "'input' and 'output' must have the same length")
        system = record.get("instruction")
        if system is not None and not isinstance(system, str):
            raise DataError(f"{where}: field 'instruction' must be a string")
        return Conversation(turns=list(zip(inputs, outputs)), system=system or None)
    if fmt == "sharegpt":
        return _pair_turns(_messages(record, where, "conversations", "from", "value", SHAREGPT_ROLES), where)
    if fmt == "openai":
        return _pair_turns(_messages(record, where, "messages", "role", "content", OPENAI_ROLES), where)
    raise DataError(f"{where}: unknown format {fmt!r}")


def _messages(record, where, key, role_key, text_key, roles) -> list[tuple[str, str]]:
    items = record.get(key)
    if not isinstance(items, list):
        raise DataError(f"{where}: field {key!r} must be a list")
    out = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise DataError(f"{where}: {key}[{i}] must be an object")
        role = item.get(role_key)
        if role not in roles:
            raise DataError(f"{where}: {key}[{i}] has {role_key}={role!r}; expected one of {sorted(roles)}")
        text = item.get(text_key)
        if not isinstance(text, str):
            raise DataError(f"{where}: {key}[{i}] field {text_key!r} must be a string")
        out.append((roles[role], text))
    return out


def load_conversations(path: str) -> tuple[str, list[Conversation]]:
    """Read, detect and validate a whole file. Returns (format, conversations)."""
    records = read_records(path)
    if not records:
        raise DataError(f"{path}: no records; the file is empty")
    fmt = detect_format(records[0][1], records[0][0])
    convs = []
    for where, record in records:
        if isinstance(record, dict) and detect_format(record, where) != fmt:
            raise DataError(f"{where}: record format {detect_format(record, where)!r} differs from "
                            f"the file's first record ({fmt!r}); use one format per file")
        convs.append(parse_record(record, fmt, where))
    return fmt, convs


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
