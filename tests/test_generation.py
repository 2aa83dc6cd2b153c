"""generation.py: beam streaming equals model.generate token for token; greedy/sampled streams equal
generate; incremental decoding is linear and never shows half a character; cancel stops quickly;
GenerationParams is the one source of the flags' and the controls' defaults; one-shot answers are
the stream run to its end."""

import argparse
import dataclasses
import re
import threading

import pytest
import torch
from transformers import AutoModelForCausalLM, set_seed

from prompt import Conversation, build_prompt_ids
from generation import (STREAM_LOOKAHEAD, GenerationParams, IncrementalDecoder, generate_batch, generate_text,
                        stream_generate)
from errors import UserError
from models import load_tokenizer

PROMPTS = ["Hello world, how are", "### Instruction:\n你好\n\n### Response:\n", "1 2 3 4"]
# (repetition_penalty, length_penalty, early_stopping)
BEAM_CONFIGS = [(1.0, 1.0, False), (1.3, 0.5, True), (1.3, 2.0, False), (1.0, 1.0, "never"),
                (1.0, -0.5, False)]
CHINESE = "你好，世界。我们的模型会用中文和英文回答问题。今天天气很好。饕餮、鬣狗和麒麟都是罕见的字。"


def load(path):
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), load_tokenizer(path)


@pytest.fixture(scope="module")
def models(tiny_models):
    return {name: load(path) for name, path in tiny_models.items()}


@pytest.fixture(scope="module")
def eos_models(tiny_models):
    """Tiny models whose EOS logit varies strongly with the hidden state, so that beams often
    finish early: exercises the finished-hypothesis bookkeeping (random models rarely end)."""
    out = {}
    for name, path in tiny_models.items():
        model, tokenizer = load(path)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            model.lm_head.weight[tokenizer.eos_token_id] = torch.randn(model.config.hidden_size,
                                                                        generator=generator) * 0.25
        out[name] = (model, tokenizer)
    return out


def reference(model, tokenizer, ids, params, stop_strings=None):
    """What the non-streaming model.generate returns (new tokens only)."""
    kwargs = {"stop_strings": stop_strings, "tokenizer": tokenizer} if stop_strings else {}
    x = torch.tensor([ids])
    if params.seed is not None:
        set_seed(params.seed)
    with torch.inference_mode():
        out = model.generate(input_ids=x, attention_mask=torch.ones_like(x), **kwargs,
                             **params.generate_kwargs(tokenizer, model))
    return out[0, len(ids):].tolist()


def encode(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def final(updates):
    assert updates and updates[-1].finished and not any(u.finished for u in updates[:-1])
    return updates[-1]


# --- beam search equals model.generate ---------------------------------------------------------------


def check_beams_equal_generate(model, tokenizer, k, max_new_tokens, min_new_tokens=3):
    ended_early = 0
    for repetition_penalty, length_penalty, early_stopping in BEAM_CONFIGS:
        for text in PROMPTS:
            ids = encode(tokenizer, text)
            params = GenerationParams(max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, num_beams=k,
                                      repetition_penalty=repetition_penalty, length_penalty=length_penalty,
                                      early_stopping=early_stopping)
            expected = reference(model, tokenizer, ids, params)
            last = final(list(stream_generate(model, tokenizer, ids, params)))
            assert last.token_ids == expected, (k, repetition_penalty, length_penalty, early_stopping, text)
            assert last.text == tokenizer.decode(expected, skip_special_tokens=True)
            assert len(expected) >= min_new_tokens
            ended_early += expected[-1] == tokenizer.eos_token_id and len(expected) < max_new_tokens
    return ended_early


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("name", ["bpe", "sp"])
def test_beam_stream_equals_generate(models, name, k):
    model, tokenizer = models[name]
    check_beams_equal_generate(model, tokenizer, k, max_new_tokens=10)


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("name", ["bpe", "sp"])
def test_beam_stream_equals_generate_when_eos_is_likely(eos_models, name, k):
    model, tokenizer = eos_models[name]
    ended_early = check_beams_equal_generate(model, tokenizer, k, max_new_tokens=14, min_new_tokens=2)
    assert ended_early >= len(BEAM_CONFIGS)  # finished hypotheses really decided the answers


def test_beam_stream_stops_at_stop_strings_like_generate(models):
    model, tokenizer = models["sp"]
    hits = 0
    for stop in (["e"], ["o", "a"]):
        for text in PROMPTS:
            ids = encode(tokenizer, text)
            params = GenerationParams(max_new_tokens=12, num_beams=3, repetition_penalty=1.0)
            expected = reference(model, tokenizer, ids, params, stop_strings=stop)
            last = final(list(stream_generate(model, tokenizer, ids, params, stop_strings=stop)))
            assert last.token_ids == expected
            hits += any(s in last.text for s in stop)
    assert hits


def test_beam_stream_on_the_embedded_model(embedded_path):
    model, tokenizer = load(embedded_path)
    for question, max_new_tokens, early_stopping in (("What is the capital of France?", 24, False),
                                                     ("用一句话介绍你自己。", 16, True)):
        ids = build_prompt_ids("chat_template", Conversation(turns=[(question, None)]), tokenizer)
        params = GenerationParams(max_new_tokens=max_new_tokens, num_beams=3, early_stopping=early_stopping)
        updates = list(stream_generate(model, tokenizer, ids, params))
        assert final(updates).token_ids == reference(model, tokenizer, ids, params)
        assert len(updates) > 2  # streamed, not one update at the end


def test_beam_stream_shows_all_beams_and_is_seeded_when_sampling(models):
    model, tokenizer = models["sp"]
    ids = encode(tokenizer, PROMPTS[0])
    params = GenerationParams(max_new_tokens=8, num_beams=3, do_sample=True, seed=7)
    first = list(stream_generate(model, tokenizer, ids, params, all_beams=True))
    again = list(stream_generate(model, tokenizer, ids, params, all_beams=True))
    assert [u.beams for u in first] == [u.beams for u in again]
    assert all(len(u.beams) == 3 and u.text == u.beams[0] for u in first[:-1])
    assert final(first).text == final(again).text and len(first[-1].token_ids) >= 1


# --- greedy and sampling equal model.generate --------------------------------------------------------


@pytest.mark.parametrize("do_sample", [False, True])
def test_single_stream_equals_generate(models, do_sample):
    model, tokenizer = models["bpe"]
    for text in PROMPTS[:2]:
        ids = encode(tokenizer, text)
        params = GenerationParams(max_new_tokens=16, do_sample=do_sample, seed=1234 if do_sample else None)
        expected = reference(model, tokenizer, ids, params)
        updates = list(stream_generate(model, tokenizer, ids, params))
        last = final(updates)
        assert last.token_ids == expected
        assert last.text == tokenizer.decode(expected, skip_special_tokens=True)
        assert len(updates) == len(expected) + 1  # one update per token, then the final one
        assert all(last.text.startswith(u.text) for u in updates)


def test_single_stream_surfaces_worker_errors(models):
    model, tokenizer = models["sp"]
    with pytest.raises(IndexError):  # an id beyond the embedding table fails inside generate
        list(stream_generate(model, tokenizer, [10 ** 6], GenerationParams(max_new_tokens=4)))


# --- cancel --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 3])
def test_cancel_ends_the_stream_within_a_step(models, num_beams):
    model, tokenizer = models["bpe"]
    forwards = []
    hook = model.register_forward_hook(lambda *_: forwards.append(1))
    cancel = threading.Event()
    params = GenerationParams(max_new_tokens=64, min_new_tokens=64, num_beams=num_beams)
    try:
        updates = []
        for update in stream_generate(model, tokenizer, encode(tokenizer, PROMPTS[0]), params, cancel=cancel):
            updates.append(update)
            if len(updates) == 3:
                cancel.set()
    finally:
        hook.remove()
    assert len(updates) == 4 and final(updates).text.startswith(updates[2].text)
    assert len(updates[-1].token_ids) <= 4
    assert len(forwards) <= 3 + STREAM_LOOKAHEAD + 1  # far from the 64 steps asked for
    assert not any(t.name == "stream_generate" and t.is_alive() for t in threading.enumerate())


def test_abandoned_stream_stops_its_worker(models):
    model, tokenizer = models["bpe"]
    stream = stream_generate(model, tokenizer, encode(tokenizer, PROMPTS[0]),
                             GenerationParams(max_new_tokens=64, min_new_tokens=64))
    next(stream)
    stream.close()
    assert not any(t.name == "stream_generate" and t.is_alive() for t in threading.enumerate())


# --- incremental decoding --------------------------------------------------------------------------------


class CountingTokenizer:
    """Counts the tokens passed to decode."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.decoded = 0

    def decode(self, ids, **kwargs):
        self.decoded += len(ids)
        return self.tokenizer.decode(ids, **kwargs)


@pytest.mark.parametrize("which", ["bpe", "sp"])
def test_incremental_decoder_never_splits_a_character(bpe_tokenizer, sp_tokenizer, which):
    tokenizer = bpe_tokenizer if which == "bpe" else sp_tokenizer
    ids = encode(tokenizer, CHINESE + " Mixed text, then 中文 again.")
    if which == "bpe":  # SmolLM2's byte-level BPE spreads most Chinese characters over several tokens
        assert any("\ufffd" in tokenizer.decode([i]) for i in ids)
    decoder = IncrementalDecoder(tokenizer)
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert not any("\ufffd" in p for p in pieces)
    assert "".join(pieces) == decoder.text == tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_decoder_is_linear(bpe_tokenizer):
    paragraph = CHINESE + " The quick brown fox jumps over the lazy dog.\n"
    ids = []
    while len(ids) < 2000:
        ids += encode(bpe_tokenizer, paragraph)
    ids = ids[:2000]
    counting = CountingTokenizer(bpe_tokenizer)
    decoder = IncrementalDecoder(counting)
    for i in ids:
        decoder.push(i)
    decoder.flush()
    assert counting.decoded < 20 * len(ids)
    assert decoder.text == bpe_tokenizer.decode(ids, skip_special_tokens=True)


def test_incremental_decoder_forks_mid_character(bpe_tokenizer):
    ids = encode(bpe_tokenizer, "好饕餮")
    split = next(n for n in range(1, len(ids)) if bpe_tokenizer.decode(ids[:n]).endswith("\ufffd"))
    parent = IncrementalDecoder(bpe_tokenizer)
    for i in ids[:split]:
        parent.push(i)
    child = parent.fork()
    for i in ids[split:]:
        child.push(i)
    other = encode(bpe_tokenizer, "!")
    parent.push(other[0])
    assert child.text + child.flush() == "好饕餮"
    assert parent.text + parent.flush() == bpe_tokenizer.decode(ids[:split] + other)


# --- parameters ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, flag", [({"num_beams": 0}, "--num_beams"), ({"max_new_tokens": 0}, "--max_new_tokens"),
                                       ({"do_sample": True, "temperature": 0.0}, "--temperature"),
                                       ({"do_sample": True, "temperature": 1e-30}, "--temperature must be at least 0.01"),
                                       ({"do_sample": True, "num_beams": 3, "temperature": 1e-4}, "--temperature"),
                                       ({"temperature": float("inf")}, "--temperature must be a finite number"),
                                       ({"repetition_penalty": float("nan")}, "--repetition_penalty"),
                                       ({"do_sample": True, "top_p": 1.5}, "--top_p"),
                                       ({"repetition_penalty": 0.0}, "--repetition_penalty")])
def test_params_validate_names_the_flag(bad, flag):
    with pytest.raises(UserError, match=flag):
        GenerationParams(**bad).validate()


def test_beam_sampling_at_the_temperature_floor_runs_to_length(models):
    """Sampling divides log-probs by the temperature: at 1e-30 a beam's score fell far below -1e9,
    the mark of excluded beams, so the search ended after one token (an empty answer on the page).
    Temperatures below MIN_TEMPERATURE are refused; at the floor beams run their full length."""
    from generation import MIN_TEMPERATURE

    model, tokenizer = models["bpe"]
    ids = encode(tokenizer, PROMPTS[0])
    for beams in (1, 3):
        params = GenerationParams(num_beams=beams, do_sample=True, temperature=MIN_TEMPERATURE, max_new_tokens=12,
                                  min_new_tokens=12, seed=0)
        assert len(final(list(stream_generate(model, tokenizer, ids, params))).token_ids) == 12


def test_generate_kwargs(bpe_tokenizer):
    defaults = GenerationParams()
    greedy = GenerationParams(min_new_tokens=500).generate_kwargs(bpe_tokenizer)
    assert greedy["temperature"] is None and greedy["top_p"] is None and greedy["top_k"] is None
    assert greedy["min_new_tokens"] == defaults.max_new_tokens and "length_penalty" not in greedy
    assert greedy["eos_token_id"] == bpe_tokenizer.eos_token_id
    assert greedy["pad_token_id"] == bpe_tokenizer.pad_token_id
    sampled = GenerationParams(do_sample=True, num_beams=2, length_penalty=0.5).generate_kwargs(bpe_tokenizer)
    assert (sampled["temperature"], sampled["top_p"], sampled["top_k"]) == \
        (defaults.temperature, defaults.top_p, defaults.top_k)
    assert sampled["length_penalty"] == 0.5 and sampled["early_stopping"] is False


# --- one source of defaults: flags and page controls -------------------------------------------------------


def parser(**overrides):
    p = argparse.ArgumentParser(formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    GenerationParams.add_args(p, **overrides)
    return p


def test_flags_default_to_the_fields_and_greedy():
    assert GenerationParams.from_args(parser().parse_args([])) == GenerationParams()
    assert (GenerationParams().num_beams, GenerationParams().do_sample) == (1, False)  # greedy unless asked
    sampled = GenerationParams.from_args(parser().parse_args(["--do_sample"]))
    assert (sampled.do_sample, sampled.num_beams) == (True, 1)  # --do_sample alone: plain sampling
    beams = GenerationParams.from_args(parser().parse_args(["--num_beams", "4", "--seed", "3"]))
    assert (beams.do_sample, beams.num_beams, beams.seed) == (False, 4, 3)
    assert GenerationParams.from_args(parser(max_new_tokens=64).parse_args([])).max_new_tokens == 64
    with pytest.raises(TypeError, match="length_penalty"):
        parser(length_penalty=2.0)  # not a flag
    with pytest.raises(UserError, match="--num_beams"):
        GenerationParams.from_args(parser().parse_args(["--num_beams", "0"]))


def test_help_shows_every_flag_with_its_default():
    text = " ".join(parser().format_help().split())
    for name in GenerationParams.flags():
        default = getattr(GenerationParams(), name)
        assert f"--{name}" in text and f"(default: {default})" in text, name
    assert set(GenerationParams.flags()) >= set(GenerationParams.CONTROLS)


def test_controls_start_at_the_defaults_and_check_their_ranges():
    defaults = GenerationParams()
    assert GenerationParams.from_controls(defaults.control_values()) == defaults
    beams = GenerationParams(num_beams=3, do_sample=True, temperature=1.5)
    assert GenerationParams.from_controls(beams.control_values(), seed=5) == dataclasses.replace(beams, seed=5)
    for name, bad, message in (("num_beams", 64, "Beams must be from 1 to 10, got 64"),
                               ("num_beams", 2.5, "Beams must be a whole number, got 2.5"),
                               ("temperature", float("nan"), "Temperature must be a number from 0.05 to 2"),
                               ("do_sample", "yes", "Sample (otherwise greedy / beam search) must be true or false")):
        values = defaults.control_values()
        values[GenerationParams.CONTROLS.index(name)] = bad
        with pytest.raises(UserError, match=re.escape(message)):
            GenerationParams.from_controls(values)
    with pytest.raises(UserError, match="expected 8 generation settings"):
        GenerationParams.from_controls(defaults.control_values()[:3])


# --- one-shot answers take the streaming path ------------------------------------------------------------


@pytest.mark.parametrize("num_beams", [1, 3])
def test_generate_text_equals_generate(models, num_beams):
    model, tokenizer = models["sp"]
    ids = encode(tokenizer, PROMPTS[0])
    params = GenerationParams(max_new_tokens=10, num_beams=num_beams)
    expected = tokenizer.decode(reference(model, tokenizer, ids, params, stop_strings=["o"]), skip_special_tokens=True)
    assert generate_text(model, tokenizer, ids, params, stop_strings=["o"]) == expected
    assert generate_batch(model, tokenizer, [ids], params.generate_kwargs(tokenizer, model), ["o"]) == [expected]
