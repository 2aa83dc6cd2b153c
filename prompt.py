"""Every prompt template, its tokenization and its label mask, in one place.

Training (`finetune*.py`) and generation (`generate.py`, `chat.py`) both build token ids
through `build_example` / `build_prompt_ids` below, so the model sees at inference exactly the
token sequence it was trained on. Templates are named; the name is saved with every adapter
(see `models.save_training_config`) and read back by the generation scripts.

A conversation is rendered as alternating pieces: prompt, response, prompt, response, ...
Each piece is encoded on its own (never re-tokenizing a prefix and subtracting lengths) and the
ids are concatenated. Response pieces, and the EOS appended after each, carry labels; everything
else is IGNORE_INDEX.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from errors import UserError

IGNORE_INDEX = -100  # the label torch.nn.CrossEntropyLoss skips

PROMPT_TYPES = ("instruct", "chat", "chat_template")

# --- instruct: exactly Chinese-Vicuna's (and alpaca's) training template -------------------------
INSTRUCT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
INSTRUCT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

# --- chat: Chinese-Vicuna's chatv1 format ----------------------------------------------------------
CHAT_PREAMBLE = (
    "The following is a conversation between an AI assistant called Assistant and a human user "
    "called User. The assistant is intelligent, knowledgeable and polite to answer questions of "
    "user.\n\n"
)
CHAT_USER = "User:{input}\n\nAssistant:"
CHAT_TURN_SEPARATOR = "\n\n"  # between an assistant reply (and its EOS) and the next "User:"

# Text that, once generated, means the model has started a new turn: generation stops there.
STOP_STRINGS = {
    "instruct": ["### "],
    "chat": ["\nUser:"],
    "chat_template": [],
}


@dataclass
class Conversation:
    """One training record or one chat session, independent of the file format it came from.

    `turns` is a list of (user, assistant) pairs; at generation time the last assistant is None.
    `input` is only used by the instruct template (alpaca's optional context field).
    """

    turns: list[tuple[str, str | None]]
    system: str | None = None
    input: str = ""
    where: str = field(default="", compare=False, repr=False)  # "file:line" of a data record

    @property
    def is_single_turn(self) -> bool:
        return len(self.turns) == 1


@dataclass
class Pieces:
    """Alternating text pieces: prompts[i] precedes responses[i]."""

    prompts: list[str]
    responses: list[str]
    # Set by render: {"eos_in_template": True} when the template ends each response with its own
    # end-of-turn token (chat_template), so tokenize_pieces adds no EOS after it.
    meta: dict = field(default_factory=dict)

    def text(self) -> str:
        out = []
        for i, p in enumerate(self.prompts):
            out.append(p)
            if i < len(self.responses):
                out.append(self.responses[i])
        return "".join(out)


class TemplateError(UserError):
    """A conversation that the chosen template cannot express."""


def render_instruct(conv: Conversation) -> Pieces:
    if not conv.is_single_turn:
        raise TemplateError(
            f"the instruct template holds one instruction and one response, got {len(conv.turns)} "
            "turns; use --prompt_type chat or chat_template for multi-turn data"
        )
    instruction, output = conv.turns[0]
    if conv.input:
        prompt = INSTRUCT_WITH_INPUT.format(instruction=instruction, input=conv.input)
    else:
        prompt = INSTRUCT_NO_INPUT.format(instruction=instruction)
    return Pieces([prompt], [] if output is None else [output])


def render_chat(conv: Conversation) -> Pieces:
    """chatv1: preamble, then `User:{in}\\n\\nAssistant:{out}` turns joined by a blank line.

    A `system` text (from the data or chat.py's instruction box) replaces the preamble.
    """
    preamble = CHAT_PREAMBLE if conv.system is None else conv.system.rstrip("\n") + "\n\n"
    prompts, responses = [], []
    for i, (user, assistant) in enumerate(conv.turns):
        text = _user_text(conv, i, user)
        prompts.append((preamble if i == 0 else CHAT_TURN_SEPARATOR) + CHAT_USER.format(input=text))
        if assistant is not None:
            responses.append(assistant)
    return Pieces(prompts, responses)


def _user_text(conv: Conversation, i: int, user: str) -> str:
    # alpaca records carry context in `input`; outside the instruct template it joins the question.
    if i == 0 and conv.input:
        return f"{user}\n{conv.input}"
    return user


def question_text(conv: Conversation) -> str:
    """The last user turn as a person reads it (alpaca's `input` joined to a first instruction)."""
    return _user_text(conv, len(conv.turns) - 1, conv.turns[-1][0])


def render_chat_template(conv: Conversation, tokenizer) -> Pieces:
    """Split the tokenizer's own chat template into prompt and response pieces.

    The response piece for turn i is the text the template adds between rendering the history with
    `add_generation_prompt=True` and rendering it with the assistant message appended, so it
    includes the template's own end-of-turn marker (e.g. `<|im_end|>`).
    """
    if not getattr(tokenizer, "chat_template", None):
        raise TemplateError(
            "this tokenizer has no chat template; use --prompt_type instruct or chat"
        )
    messages = [] if conv.system is None else [{"role": "system", "content": conv.system}]
    prompts, responses = [], []
    done = ""  # text rendered so far
    for i, (user, assistant) in enumerate(conv.turns):
        messages.append({"role": "user", "content": _user_text(conv, i, user)})
        with_gen = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        if not with_gen.startswith(done):
            raise TemplateError("the tokenizer's chat template does not render turns as a prefix")
        prompts.append(with_gen[len(done):])
        if assistant is None:
            break
        messages.append({"role": "assistant", "content": assistant})
        full = tokenizer.apply_chat_template(messages, tokenize=False)
        if not full.startswith(with_gen):
            raise TemplateError("the tokenizer's chat template does not render turns as a prefix")
        responses.append(full[len(with_gen):])
        done = full
    return Pieces(prompts, responses, meta={"eos_in_template": True})


def render(prompt_type: str, conv: Conversation, tokenizer=None) -> Pieces:
    if prompt_type == "instruct":
        return render_instruct(conv)
    if prompt_type == "chat":
        return render_chat(conv)
    if prompt_type == "chat_template":
        return render_chat_template(conv, tokenizer)
    raise TemplateError(f"unknown prompt type {prompt_type!r}; choose one of {', '.join(PROMPT_TYPES)}")


def generation_prompt(prompt_type: str, conv: Conversation, tokenizer=None) -> str:
    """The text the model continues: every piece up to and including the last prompt piece."""
    pieces = render(prompt_type, conv, tokenizer)
    assert len(pieces.prompts) == len(pieces.responses) + 1, "last turn must be unanswered"
    return pieces.text()


# --- the templates as Jinja (GGUF tokenizer.chat_template, merged folders) -------------------------


def _jinja_str(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal (\n, \", \\, \uXXXX)


def chat_template_jinja(prompt_type: str, tokenizer) -> str:
    """A Jinja chat template rendering `messages` the way render() renders our templates: what
    tools/convert_gguf.py stores as a GGUF's tokenizer.chat_template and tools/merge_lora.py as a
    merged folder's chat template, so llama.cpp, ollama and `tokenizer.apply_chat_template` give
    the prompt text the model was trained on (the prompt ends open: no add_generation_prompt needed).

    instruct: the last user message is the instruction (a user message may carry an "input" key,
    alpaca's context field); earlier turns are dropped, as the template holds one exchange.
    chat: chatv1 -- a system message replaces the preamble; each assistant reply is followed by the
    EOS token, as in training. chat_template: the tokenizer's own template, unchanged.
    """
    if prompt_type == "chat_template":
        template = getattr(tokenizer, "chat_template", None)
        if not template:
            raise TemplateError("this tokenizer has no chat template; use --prompt_type instruct or chat")
        return template
    if prompt_type == "instruct":
        no_in_head, no_in_tail = INSTRUCT_NO_INPUT.split("{instruction}")
        in_head, rest = INSTRUCT_WITH_INPUT.split("{instruction}")
        in_mid, in_tail = rest.split("{input}")
        return (
            "{%- set ns = namespace(user=none, answer=none) -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}{%- set ns.user = message -%}{%- set ns.answer = none -%}"
            "{%- elif message['role'] == 'assistant' -%}{%- set ns.answer = message['content'] -%}"
            "{%- endif -%}"
            "{%- endfor -%}"
            "{%- if ns.user is not none -%}"
            "{%- if ns.user['input'] is defined and ns.user['input'] -%}"
            f"{{{{- {_jinja_str(in_head)} + ns.user['content'] + {_jinja_str(in_mid)} + ns.user['input'] + "
            f"{_jinja_str(in_tail)} -}}}}"
            "{%- else -%}"
            f"{{{{- {_jinja_str(no_in_head)} + ns.user['content'] + {_jinja_str(no_in_tail)} -}}}}"
            "{%- endif -%}"
            "{%- if ns.answer is not none -%}{{- ns.answer + eos_token -}}{%- endif -%}"
            "{%- endif -%}"
        )
    if prompt_type == "chat":
        user_head, user_tail = CHAT_USER.split("{input}")
        return (
            "{%- set ns = namespace(first=true) -%}"
            "{%- if messages and messages[0]['role'] == 'system' -%}"
            "{{- messages[0]['content'].rstrip('\\n') + '\\n\\n' -}}"
            "{%- else -%}"
            f"{{{{- {_jinja_str(CHAT_PREAMBLE)} -}}}}"
            "{%- endif -%}"
            "{%- for message in messages -%}"
            "{%- if message['role'] == 'user' -%}"
            f"{{%- if not ns.first -%}}{{{{- {_jinja_str(CHAT_TURN_SEPARATOR)} -}}}}{{%- endif -%}}"
            f"{{{{- {_jinja_str(user_head)} + message['content'] + {_jinja_str(user_tail)} -}}}}"
            "{%- set ns.first = false -%}"
            "{%- elif message['role'] == 'assistant' -%}"
            "{{- message['content'] + eos_token -}}"
            "{%- endif -%}"
            "{%- endfor -%}"
        )
    raise TemplateError(f"unknown prompt type {prompt_type!r}; choose one of {', '.join(PROMPT_TYPES)}")


# --- tokenization and labels ----------------------------------------------------------------------


def leading_special_ids(tokenizer, first_text: str = "") -> list[int]:
    """The special ids the tokenizer puts in front of a text (LLaMA: [BOS]; SmolLM2: []); none
    when `first_text`, the rendered prompt, already starts with them: chat templates that write
    `bos_token` themselves (Llama-2/3, Mistral) must not get a second BOS."""
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start:start + len(plain)] == plain:
            lead = list(with_special[:start])
            if lead and first_text.startswith("".join(tokenizer.convert_ids_to_tokens(lead))):
                return []
            return lead
    return []


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _encode_capped(tokenizer, text: str, limit: int | None) -> list[int]:
    """`_encode(text)`, or, when `limit` is set, its first `limit` ids at least without encoding
    all of a huge text: a prefix of the text gives the same leading ids as the whole text, except
    the last few before the cut, so the prefix is taken with a margin and doubled until it yields
    more than `limit + MARGIN` ids (or is the whole text)."""
    if limit is None or len(text) <= 64 * (limit + _CAP_MARGIN):
        return _encode(tokenizer, text)
    chars = 8 * (limit + _CAP_MARGIN)  # most vocabularies average 3-5 characters a token
    while True:
        if chars >= len(text):
            return _encode(tokenizer, text)
        ids = _encode(tokenizer, text[:chars])
        if len(ids) > limit + _CAP_MARGIN:
            return ids
        chars *= 4


_CAP_MARGIN = 64  # ids kept beyond a cut prefix's end, so the ids before the cut are final


def tokenize_pieces(pieces: Pieces, tokenizer, train_on: str = "all",
                    max_len: int | None = None) -> tuple[list[int], list[int]]:
    """Token ids and labels for rendered pieces.

    train_on: "all" supervises every response, "last" only the final one (Chinese-Vicuna's chat
    recipe). Every response is followed by EOS unless the template already ends its turns with
    its own end-of-turn token. With `max_len`, encoding stops once more than `max_len` ids exist
    (the result is longer than `max_len` exactly when the whole text is): a 50 MB record costs
    what its first `max_len` tokens cost.
    """
    if train_on not in ("all", "last"):
        raise ValueError(f"train_on must be 'all' or 'last', not {train_on!r}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TemplateError("the tokenizer has no EOS token; set one in its tokenizer_config.json")
    add_eos = not pieces.meta.get("eos_in_template", False)
    input_ids = leading_special_ids(tokenizer, pieces.prompts[0] if pieces.prompts else "")
    labels = [IGNORE_INDEX] * len(input_ids)
    n = len(pieces.responses)

    def room() -> int | None:
        return None if max_len is None else max_len + 1 - len(input_ids)

    for i, prompt in enumerate(pieces.prompts):
        if room() is not None and room() <= 0:
            break
        ids = _encode_capped(tokenizer, prompt, room())
        input_ids += ids
        labels += [IGNORE_INDEX] * len(ids)
        if i < n:
            if room() is not None and room() <= 0:
                break
            ids = _encode_capped(tokenizer, pieces.responses[i], room()) + ([eos] if add_eos else [])
            supervised = train_on == "all" or i == n - 1
            input_ids += ids
            labels += ids if supervised else [IGNORE_INDEX] * len(ids)
    return input_ids, labels


def encode_example(prompt_type: str, conv: Conversation, tokenizer, cutoff_len: int,
                   train_on: str = "all") -> tuple[dict | None, bool]:
    """(example, truncated): the example cut to cutoff_len (None when no supervised token
    survives the cut) and whether the cut removed any token."""
    return _encode_cut(prompt_type, conv, tokenizer, cutoff_len, train_on, cutoff_len)[:2]


def measure_example(prompt_type: str, conv: Conversation, tokenizer, cutoff_len: int,
                    train_on: str = "all") -> tuple[dict | None, bool, int]:
    """encode_example's (example, truncated) and the whole example's token count before the cut
    (the whole text is tokenized, not only what fits: for --inspect_data's statistics)."""
    return _encode_cut(prompt_type, conv, tokenizer, cutoff_len, train_on, None)


def _encode_cut(prompt_type, conv, tokenizer, cutoff_len, train_on, max_len) -> tuple[dict | None, bool, int]:
    pieces = render(prompt_type, conv, tokenizer)
    input_ids, labels = tokenize_pieces(pieces, tokenizer, train_on, max_len=max_len)
    length, truncated = len(input_ids), len(input_ids) > cutoff_len
    input_ids, labels = input_ids[:cutoff_len], labels[:cutoff_len]
    if all(label == IGNORE_INDEX for label in labels):
        return None, truncated, length
    return {"input_ids": input_ids, "labels": labels}, truncated, length


def build_example(prompt_type: str, conv: Conversation, tokenizer, cutoff_len: int,
                  train_on: str = "all") -> dict | None:
    """One training example, truncated to cutoff_len; None when no supervised token survives."""
    return encode_example(prompt_type, conv, tokenizer, cutoff_len, train_on)[0]


def build_prompt_ids(prompt_type: str, conv: Conversation, tokenizer) -> list[int]:
    """Ids for generation: the same encoding as training, ending with the open prompt piece."""
    pieces = render(prompt_type, conv, tokenizer)
    if len(pieces.prompts) != len(pieces.responses) + 1:
        raise TemplateError("the last turn of a generation prompt must have no answer yet")
    input_ids, _ = tokenize_pieces(pieces, tokenizer)
    return input_ids


def extract_response(text: str, prompt_type: str) -> str:
    """Cut generated text at the first marker of a new turn and strip surrounding whitespace."""
    cut = len(text)
    for marker in STOP_STRINGS.get(prompt_type, []):
        pos = text.find(marker)
        if pos != -1:
            cut = min(cut, pos)
    return text[:cut].strip()


def fit_history(prompt_type: str, conv: Conversation, tokenizer, budget: int,
                max_new_tokens: int) -> tuple[Conversation, list[int]]:
    """Drop the oldest turns until prompt + max_new_tokens fits `budget` tokens.

    The current (last, unanswered) question is never dropped; if it alone does not fit, its
    prompt is returned as is (the caller checks it against the model's context). Returns the
    longest suffix of turns that fits (alpaca's `input` stays only with the first turn) and its
    prompt ids, the same ids `build_prompt_ids` gives for that suffix.

    Linear: walking back from the newest turn, each turn is rendered once in a two-turn window
    and its pieces are encoded once; the walk stops as soon as the turns behind it cannot fit,
    so a long history costs about what is kept. The ids are assembled from those pieces
    (`tokenize_pieces` encodes pieces separately) after one render of the kept suffix confirms
    that its text is the pieces' text. A template whose turns render differently by position
    fails that check and falls back to building candidate suffixes in full, newest-first from
    the estimate, which may keep fewer turns but never exceeds the budget.
    """
    turns = list(conv.turns)
    n = len(turns)

    def suffix(j: int) -> Conversation:
        return Conversation(turns=turns[j:], system=conv.system, input=conv.input if j == 0 else "")

    if n == 1 or prompt_type not in ("chat", "chat_template") or any(a is None for _, a in turns[:-1]) \
            or turns[-1][1] is not None:
        return conv, build_prompt_ids(prompt_type, conv, tokenizer)  # nothing to drop, or a template error
    eos = tokenizer.eos_token_id
    if eos is None:
        raise TemplateError("the tokenizer has no EOS token; set one in its tokenizer_config.json")

    # Per turn: its prompt when it opens the conversation, its prompt after an earlier turn, and
    # its answer (with the EOS tokenize_pieces appends); each as (text, ids).
    opening, following, answer = {}, {}, {}

    def piece(text: str) -> tuple[str, list[int]]:
        return text, _encode(tokenizer, text)

    last = render(prompt_type, suffix(n - 1), tokenizer)
    lead = leading_special_ids(tokenizer, last.prompts[0])
    room = budget - max_new_tokens - len(lead)
    opening[n - 1] = piece(last.prompts[0])
    best, tail = n - 1, 0  # tail: tokens after turn j's opening prompt up to the end
    for j in range(n - 2, -1, -1):
        window = render(prompt_type, Conversation(turns=[turns[j], (turns[j + 1][0], None)], system=conv.system,
                                                  input=conv.input if j == 0 else ""), tokenizer)
        opening[j] = piece(window.prompts[0])
        text, ids = piece(window.responses[0])
        answer[j] = (text, ids + ([] if window.meta.get("eos_in_template") else [eos]))
        following[j + 1] = piece(window.prompts[1])
        tail += len(answer[j][1]) + len(following[j + 1][1])
        if tail > room:
            break  # every older start only adds to the tail
        if len(opening[j][1]) + tail <= room:
            best = j
    parts = [opening[best]]
    for i in range(best, n - 1):
        parts += [answer[i], following[i + 1]]
    if "".join(text for text, _ in parts) == _generation_text(prompt_type, suffix(best), tokenizer):
        return suffix(best), lead + [t for _, ids in parts for t in ids]
    for j in range(best, n):  # position-dependent template: exact builds, fewest turns dropped first
        ids = build_prompt_ids(prompt_type, suffix(j), tokenizer)
        if len(ids) + max_new_tokens <= budget or j == n - 1:
            return suffix(j), ids


def _generation_text(prompt_type: str, conv: Conversation, tokenizer) -> str:
    """generation_prompt(...) in one pass: render_chat_template renders every prefix of the
    conversation (quadratic in turns); its pieces are prefix differences of the last render,
    so one render of the whole conversation gives the same text."""
    if prompt_type != "chat_template":
        return generation_prompt(prompt_type, conv, tokenizer)
    messages = [] if conv.system is None else [{"role": "system", "content": conv.system}]
    for i, (user, assistant) in enumerate(conv.turns):
        messages.append({"role": "user", "content": _user_text(conv, i, user)})
        if assistant is not None:
            messages.append({"role": "assistant", "content": assistant})
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class StopStringFilter:
    """Hold back streamed text that might be the start of a stop marker, and cut at a full one.

    `update(text)` takes the whole text generated so far and returns the part that is safe to
    show; `done` turns true once a marker was seen (the caller may stop generating). The markers
    are the template's (STOP_STRINGS[prompt_type]), or `markers` when given (an API request's).
    """

    def __init__(self, prompt_type: str | None = None, markers: list[str] | None = None):
        self.markers = [m for m in (markers if markers is not None else STOP_STRINGS.get(prompt_type, [])) if m]
        self.done = False

    def visible(self, text: str, final: bool = False) -> str:
        """`text` cut at the first marker, less a tail that is a proper prefix of some marker
        (none when `final`); whitespace untouched."""
        cut = len(text)
        for marker in self.markers:
            pos = text.find(marker)
            if pos != -1:
                cut = min(cut, pos)
                self.done = True
        if self.done or final:
            return text[:cut]
        hold = 0
        for marker in self.markers:
            for k in range(min(len(marker) - 1, len(text)), 0, -1):
                if text.endswith(marker[:k]):
                    hold = max(hold, k)
                    break
        return text[:len(text) - hold]

    def update(self, text: str, final: bool = False) -> str:
        shown = self.visible(text, final)
        return shown.rstrip() if self.done or final else shown
