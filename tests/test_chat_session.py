"""chat.ChatSession, the conversation behind the chat page and chat.py --cli, without a browser or
a server: respond, regenerate, stop, clear, the history budget and save."""

from __future__ import annotations

import json
import os
import threading

import pytest

from chat import ChatSession, reply_stream
from errors import UserError
from generation import STREAM_LOOKAHEAD, GenerationParams
from models import load_for_inference

GREEDY = GenerationParams(max_new_tokens=8, repetition_penalty=1.0)
LONG = GenerationParams(max_new_tokens=64, min_new_tokens=64)  # runs its full length unless stopped


@pytest.fixture(scope="module")
def loaded(tiny_model):
    return load_for_inference(tiny_model)


def session(loaded, params=GREEDY, max_memory=512, **kwargs) -> ChatSession:
    model, tokenizer = loaded
    return ChatSession(model, tokenizer, "chat", max_memory, params, **kwargs)


def turn(question, answer):
    return [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]


class CountingForwards:
    """Counts the model's forward passes while active."""

    def __init__(self, model):
        self.model, self.count = model, 0

    def __enter__(self):
        self.hook = self.model.register_forward_hook(lambda *_: setattr(self, "count", self.count + 1))
        return self

    def __exit__(self, *exc):
        self.hook.remove()


def test_respond_streams_and_keeps_the_turn(loaded):
    chat = session(loaded)
    texts = list(chat.respond("hello"))
    assert len(texts) >= 3 and all(texts[-1].startswith(t.rstrip()) for t in texts[:-1])
    assert chat.messages == turn("hello", texts[-1]) and chat.turns == [("hello", texts[-1])]
    # the same text reply_stream gives the page and --cli alike
    model, tokenizer = loaded
    assert list(reply_stream(model, tokenizer, "chat", [], "hello", GREEDY, 512))[-1] == texts[-1]
    second = list(chat.respond("and again"))[-1]
    assert chat.turns == [("hello", texts[-1]), ("and again", second)]


def test_regenerate_replaces_the_last_answer(loaded):
    chat = session(loaded, messages=turn("hello", "hi there") + turn("what now?", "an answer to replace"))
    texts = list(chat.regenerate())
    assert texts and chat.turns == [("hello", "hi there"), ("what now?", texts[-1])]
    assert texts[-1] != "an answer to replace"
    fresh = session(loaded, messages=turn("hello", "hi there"))  # the old answer is not in the prompt
    assert list(fresh.respond("what now?"))[-1] == texts[-1]
    empty = session(loaded, messages=[{"role": "assistant", "content": "no question"}])
    assert list(empty.regenerate()) == [] and empty.messages == []


def test_stop_ends_the_stream_within_a_step(loaded):
    chat = session(loaded, LONG)
    texts = []
    with CountingForwards(loaded[0]) as forwards:
        for text in chat.respond("tell me a long story"):
            texts.append(text)
            if len(texts) == 3:
                assert chat.stop()
    assert len(texts) <= 5 and forwards.count <= 3 + STREAM_LOOKAHEAD + 1  # far from the 64 asked for
    assert chat.turns == [("tell me a long story", texts[-1])]  # the partial answer stays
    assert not chat.stop()  # nothing running any more
    assert not any(t.name == "stream_generate" and t.is_alive() for t in threading.enumerate())


def test_clear_during_a_stream_stops_it_and_leaves_an_empty_history(loaded):
    chat = session(loaded, LONG, messages=turn("hello", "hi there"))
    texts = []
    with CountingForwards(loaded[0]) as forwards:
        for text in chat.respond("tell me a long story"):
            texts.append(text)
            if len(texts) == 2:
                clearing = threading.Thread(target=chat.clear)  # the page's Clear runs in another thread
                clearing.start()
                clearing.join()
    assert chat.messages == [] and chat.cleared
    assert len(texts) <= 3 and forwards.count <= 2 + STREAM_LOOKAHEAD + 1
    assert not any(t.name == "stream_generate" and t.is_alive() for t in threading.enumerate())
    list(chat.respond("hello again"))  # the session goes on, from an empty history
    assert [q for q, _ in chat.turns] == ["hello again"] and not chat.cleared


def test_a_new_reply_stops_the_running_one(loaded):
    chat = session(loaded, LONG)
    first = chat.respond("one")
    next(first)
    second = chat.respond("two")  # Regenerate / a new message while a reply streams
    rest = list(first)
    assert len(rest) <= STREAM_LOOKAHEAD + 2
    chat.params = GREEDY
    list(second)
    assert [q for q, _ in chat.turns] == ["one", "two"]


def test_the_budget_drops_the_oldest_turns_never_the_question(loaded):
    _, tokenizer = loaded
    history = [m for i in range(40) for m in turn(f"question {i}", f"answer {i}")]
    chat = session(loaded, GenerationParams(max_new_tokens=32), max_memory=200, messages=history)
    ids = chat.prompt_ids("the current question")
    text = tokenizer.decode(ids)
    assert len(ids) + 32 <= 200
    assert "the current question" in text and "answer 39" in text
    assert "question 0\n" not in text and "answer 0\n" not in text
    kept = [i for i in range(40) if f"question {i}\n" in text]
    assert kept == list(range(kept[0], 40))  # a suffix: the oldest went first
    with pytest.raises(UserError, match="exceed the model's context of 1024 tokens"):
        session(loaded, max_memory=1024).prompt_ids("饕餮" * 1000)  # alone beyond the context: refused
    with pytest.raises(UserError, match="max memory 256 leaves no room beyond max new tokens 256"):
        session(loaded, GenerationParams(), max_memory=256).prompt_ids("hi")
    with pytest.raises(UserError, match="--max_memory 256 leaves no room beyond --max_new_tokens 256"):
        session(loaded, GenerationParams(), max_memory=256, cli=True).prompt_ids("hi")


def test_a_failed_reply_leaves_the_history_as_it_was(loaded):
    chat = session(loaded, messages=turn("hello", "hi there"))
    with pytest.raises(UserError, match="exceed the model's context"):
        list(chat.respond("饕餮" * 1000))
    assert chat.messages == turn("hello", "hi there")


def test_save_writes_the_conversation_within_the_save_rules(loaded, tmp_path):
    save, lora = tmp_path / "save", tmp_path / "lora"
    lora.mkdir()
    chat = session(loaded, system="Be brief.", messages=turn("hello", "hi there"))
    assert session(loaded).save(str(save)) is None and not save.exists()  # nothing to save yet
    path = chat.save(str(save), "mine.jsonl", str(lora), {"model_path": "m", "lora_path": str(lora)})
    chat.save(str(save), "mine.jsonl", str(lora))  # appends
    assert path == os.path.join(os.path.realpath(save), "mine.jsonl")
    first, second = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert first["conversation"] == chat.messages == second["conversation"]
    assert (first["model_path"], first["system"], first["prompt_type"], first["max_memory"]) == \
        ("m", "Be brief.", "chat", 512)
    assert first["parameters"] == dict(zip(GenerationParams.CONTROLS, GREEDY.control_values()))
    (save / "link.jsonl").symlink_to(tmp_path / "outside.jsonl")
    for name, message in (("../x.jsonl", "plain file name"), ("link.jsonl", "symbolic link")):
        with pytest.raises(UserError, match=message):
            chat.save(str(save), name)
    with pytest.raises(UserError, match="inside the adapter folder"):
        chat.save(str(lora / "logs"), "x.jsonl", str(lora))
    assert not (tmp_path / "x.jsonl").exists() and not (tmp_path / "outside.jsonl").exists()
    assert os.listdir(lora) == []
