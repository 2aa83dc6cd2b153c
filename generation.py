"""Generation: the decoding settings, streaming for greedy, sampling and beam search, one-shot answers.

    params = GenerationParams.from_args(args)            # or from_controls(page values)
    for update in stream_generate(model, tokenizer, prompt_ids, params):
        print(update.text)          # the whole answer so far; update.finished on the last one
    answer = generate_text(model, tokenizer, prompt_ids, params)   # the same stream, to its end

`GenerationParams` is the one source of the generation defaults: its field defaults are the
command-line defaults (`add_args`, `from_args`) and the pages' starting values, and it holds the
pages' control ranges (`from_controls`) and the one validation (`validate`). Every front end
(the QA page, the chat page, `generate.py --instruction`, `chat.py --cli`) generates through
`stream_generate`:

- num_beams == 1 runs `model.generate` in a worker thread with a small streamer, so the final
  text is exactly what the non-streaming `model.generate` returns for the same seed.
- num_beams > 1 runs our own beam search over the model's forward pass and a `DynamicCache`,
  so every step can show the current best hypothesis (transformers' `generate` cannot stream
  beams). Its final tokens equal `model.generate(num_beams=k, do_sample=False, ...)` token for
  token: the bookkeeping below mirrors transformers 5.24's beam search semantics (candidates per
  step, length-penalised scores of finished hypotheses, early stopping) without copying its code
  or calling private `model._...` methods. Only the knobs of `GenerationParams` are applied;
  extra processors a model's generation_config may declare (no_repeat_ngram_size, bad_words_ids,
  ...) are honoured by `model.generate` but not by this loop.

Text is decoded incrementally (`IncrementalDecoder`): each step decodes a handful of tokens,
never the whole answer, and never shows half of a multi-byte character. `generate_batch` runs
`model.generate` on a left-padded batch (not streamed) for batch evaluation and as tests' reference.
torch and transformers load on first use, so importing this module is cheap.
"""
from __future__ import annotations

import argparse
import copy
import inspect
import math
import queue
import threading
from dataclasses import dataclass, field, fields
from typing import ClassVar, Iterator

from errors import UserError, check_bool, check_number

NEG_INF_SCORE = -1.0e9  # the score transformers gives to placeholder / excluded beams
REPLACEMENT_CHAR = "\ufffd"  # what a decoder emits for an incomplete UTF-8 sequence
STREAM_LOOKAHEAD = 2  # how many tokens the greedy worker may run ahead of the reader
MAX_PENDING_TOKENS = 8  # a UTF-8 character is at most 4 byte tokens; beyond this the bytes are invalid
# Sampling divides log-probs by the temperature. Far below this floor the scores of a beam sum to
# less than NEG_INF_SCORE, the mark of excluded beams, so beam sampling ends after one token (an
# empty answer); and sampling that cold is greedy decoding in effect anyway.
MIN_TEMPERATURE = 0.01


# --- parameters -----------------------------------------------------------------------------------


def _knob(default, help: str | None = None, control: tuple | None = None):
    """A GenerationParams field: `help` makes it a command-line flag (add_args), `control` a page
    control as (label, lowest, highest, step) (webui.generation_controls, from_controls)."""
    return field(default=default, metadata={"help": help, "control": control})


@dataclass
class GenerationParams:
    """Decoding knobs shared by every front end: the single source of the generation defaults.

    The field defaults are the defaults of the command-line flags (`add_args`, `from_args`) and the
    starting values of the pages' controls (`webui.generation_controls`, `from_controls`), whose
    ranges and labels are here too. Greedy unless asked: `do_sample` samples, `num_beams` > 1 is
    beam search (both: beam sampling). `validate` is the one check of the values.
    """

    max_new_tokens: int = _knob(256, "most tokens to generate for one answer", ("Max new tokens", 1, 2048, 1))
    # 0, as llama.cpp, ollama, vLLM and vicuna.cpp: a model whose best first token is EOS answers
    # nothing in every runtime alike (a floor of 1 made transformers answer where the others did not)
    min_new_tokens: int = _knob(0, "tokens to generate before the answer may end (at most --max_new_tokens)",
                                ("Min new tokens", 0, 512, 1))
    num_beams: int = _knob(1, "beam search over this many beams (1: greedy, or plain sampling with --do_sample)",
                           ("Beams", 1, 10, 1))
    do_sample: bool = _knob(False, "sample instead of greedy/beam search",
                            ("Sample (otherwise greedy / beam search)", None, None, None))
    temperature: float = _knob(0.7, f"sampling temperature (with --do_sample; at least {MIN_TEMPERATURE})",
                               ("Temperature", 0.05, 2.0, 0.05))
    top_p: float = _knob(0.9, "sample from the most likely tokens holding this much probability (with --do_sample)",
                         ("Top-p", 0.05, 1.0, 0.05))
    top_k: int = _knob(40, "sample from the k most likely tokens, 0 = all (with --do_sample)",
                       ("Top-k (0 = off)", 0, 100, 1))
    repetition_penalty: float = _knob(1.1, "penalise tokens already in the prompt or answer (1.0 = off)",
                                      ("Repetition penalty", 1.0, 3.0, 0.05))
    length_penalty: float = 1.0  # beams: finished scores are sum(logprob) / len**length_penalty
    early_stopping: bool | str = False  # beams: True, False or "never", as in transformers
    seed: int | None = _knob(None, "seed for sampling")

    # The pages' controls in the order of their handlers' positional parameters (the API order).
    CONTROLS: ClassVar[tuple[str, ...]] = ("temperature", "top_p", "top_k", "num_beams", "max_new_tokens",
                                           "min_new_tokens", "repetition_penalty", "do_sample")

    # --- command-line flags and page controls ---

    @classmethod
    def flags(cls) -> list[str]:
        """The fields that are command-line flags, in --help order."""
        return [f.name for f in fields(cls) if f.metadata.get("help")]

    @classmethod
    def control(cls, name: str) -> tuple:
        """(label, lowest, highest, step) of a page control; the range of a slider (webui widens it
        to hold a starting value outside it) and what from_controls accepts."""
        return next(f.metadata["control"] for f in fields(cls) if f.name == name)

    @classmethod
    def add_args(cls, parser, **overrides) -> None:
        """Add the generation flags to `parser`, defaulting to the field defaults (or `overrides`).

        Use a formatter that shows defaults (argparse.ArgumentDefaultsHelpFormatter): every flag
        has a help text, so --help shows every default.
        """
        known = cls.flags()
        unknown = sorted(set(overrides) - set(known))
        if unknown:
            raise TypeError(f"not generation flags: {', '.join(unknown)}")
        for f in fields(cls):
            if f.name not in known:
                continue
            default = overrides.get(f.name, f.default)
            if f.name == "do_sample":
                parser.add_argument("--do_sample", action=argparse.BooleanOptionalAction, default=default,
                                    help=f.metadata["help"])
            else:
                kind = type(f.default) if f.default is not None else int  # seed: an int or nothing
                parser.add_argument(f"--{f.name}", type=kind, default=default, help=f.metadata["help"])

    @classmethod
    def from_args(cls, args) -> "GenerationParams":
        """GenerationParams from the flags add_args added, validated."""
        params = cls(**{name: getattr(args, name) for name in cls.flags()})
        params.validate()
        return params

    @classmethod
    def from_controls(cls, values, components: list | None = None, seed: int | None = None) -> "GenerationParams":
        """Validated GenerationParams from a page's control values (in CONTROLS order).

        Each value must lie within its control: `components` as webui.generation_controls made them
        (their ranges, widened to hold a starting value outside the standard one), by default the
        standard ranges of `control`; a refusal (UserError) names the control as the page labels it.
        """
        values = list(values)
        if len(values) != len(cls.CONTROLS):
            raise UserError(f"expected {len(cls.CONTROLS)} generation settings ({', '.join(cls.CONTROLS)}), "
                            f"got {len(values)}")
        v = {}
        for i, (name, value) in enumerate(zip(cls.CONTROLS, values)):
            component = components[i] if components is not None else None
            label, low, high, step = cls.control(name)
            label = getattr(component, "label", None) or label
            if name == "do_sample":
                v[name] = check_bool(label, value)
                continue
            if component is not None:
                low, high = component.minimum, component.maximum
            v[name] = check_number(label, value, low, high, integer=float(step).is_integer())
        params = cls(**v, seed=seed)
        params.validate()
        return params

    def control_values(self) -> list:
        """This instance's values of the page controls, in CONTROLS order (a page's positional API)."""
        return [getattr(self, name) for name in self.CONTROLS]

    # --- checks and transformers' keyword arguments ---

    def validate(self) -> None:
        """Raise UserError naming the flag for values generation cannot use."""
        for name in ("temperature", "top_p", "repetition_penalty", "length_penalty"):
            value = getattr(self, name)
            if not math.isfinite(value):
                raise UserError(f"--{name} must be a finite number, got {value}")
        if self.num_beams < 1:
            raise UserError(f"--num_beams must be >= 1, got {self.num_beams}")
        if self.max_new_tokens < 1:
            raise UserError(f"--max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.min_new_tokens < 0:
            raise UserError(f"--min_new_tokens must be >= 0, got {self.min_new_tokens}")
        if self.do_sample and not self.temperature >= MIN_TEMPERATURE:
            raise UserError(f"--temperature must be at least {MIN_TEMPERATURE} when sampling, got {self.temperature:g}; "
                            "colder sampling is greedy decoding in effect: drop --do_sample")
        if self.do_sample and not 0 < self.top_p <= 1:
            raise UserError(f"--top_p must be in (0, 1], got {self.top_p}")
        if self.do_sample and self.top_k < 0:
            raise UserError(f"--top_k must be >= 0 (0 disables it), got {self.top_k}")
        if not self.repetition_penalty > 0:
            raise UserError(f"--repetition_penalty must be > 0 (1.0 disables it), got {self.repetition_penalty}")
        if self.early_stopping not in (True, False, "never"):
            raise UserError(f"--early_stopping must be true, false or never, got {self.early_stopping!r}")

    @property
    def effective_min_new_tokens(self) -> int:
        return min(self.min_new_tokens, self.max_new_tokens)

    def generate_kwargs(self, tokenizer, model=None) -> dict:
        """The equivalent keyword arguments for `model.generate` (without input ids).

        EOS is the tokenizer's, plus the model's generation_config EOS ids when `model` is given
        (LLaMA-3 style checkpoints list several). Sampling knobs are None unless sampling, so the
        model's generation_config cannot switch them back on; beam-only knobs appear only with beams.
        """
        self.validate()
        eos = eos_token_ids(tokenizer, model)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else None)
        kwargs = {"max_new_tokens": self.max_new_tokens, "min_new_tokens": self.effective_min_new_tokens,
                  "num_beams": self.num_beams, "do_sample": self.do_sample,
                  "repetition_penalty": float(self.repetition_penalty),
                  "eos_token_id": eos[0] if len(eos) == 1 else (eos or None), "pad_token_id": pad}
        if self.num_beams > 1:
            kwargs.update(length_penalty=float(self.length_penalty), early_stopping=self.early_stopping)
        if self.do_sample:
            kwargs.update(temperature=float(self.temperature), top_p=float(self.top_p), top_k=int(self.top_k))
        else:
            kwargs.update(temperature=None, top_p=None, top_k=None)
        return kwargs


def model_context(model) -> int | None:
    """The model's context in tokens (config.max_position_embeddings), None when it does not say."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "get_text_config"):
        config = config.get_text_config(decoder=True)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def check_context(model, prompt_tokens: int, max_new_tokens: int, prompt: str = "the prompt",
                  new_name: str = "max_new_tokens", fix: str = "shorten the prompt") -> None:
    """Refuse, with the numbers, a prompt that cannot be answered within the model's context."""
    context = model_context(model)
    if context is not None and prompt_tokens + max_new_tokens > context:
        raise UserError(f"{prompt} is {prompt_tokens} tokens and {new_name} is {max_new_tokens}: "
                        f"{prompt_tokens + max_new_tokens} tokens exceed the model's context of {context} tokens; "
                        f"{fix}, or lower {new_name}")


def eos_token_ids(tokenizer, model=None) -> list[int]:
    """The tokenizer's EOS id, then any other EOS ids in the model's generation_config."""
    ids: list[int] = []
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for value in (tokenizer.eos_token_id, config_eos):
        for token_id in value if isinstance(value, (list, tuple)) else [value]:
            if token_id is not None and int(token_id) not in ids:
                ids.append(int(token_id))
    return ids


# --- incremental decoding ----------------------------------------------------------------------------


class IncrementalDecoder:
    """Turn a growing token list into text while decoding only a small window per token.

    State: `text` (committed; never changes once emitted), the tokens of the last commit (kept as
    context, so tokenizers that strip a leading space or merge bytes see a real left neighbour)
    and the pending tokens not yet shown. Each `push` decodes context + pending, which is
    bounded, so a stream of n tokens costs O(n) decoded tokens, unlike re-decoding the answer.

    Text ending in U+FFFD is an incomplete UTF-8 character (one Chinese character is often 2-4
    byte tokens) and is held back until it completes, or until `max_pending` tokens pile up
    (then the bytes are really invalid and are shown as U+FFFD, as `tokenizer.decode` would).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True, max_pending: int = MAX_PENDING_TOKENS):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.max_pending = max_pending
        self.text = ""
        self._context: list[int] = []  # tokens of the last commit, already part of `text`
        self._context_text = ""  # decode(self._context) on its own
        self._pending: list[int] = []

    def fork(self) -> "IncrementalDecoder":
        """An independent copy in O(pending). `text` (a str) and the context list are never
        mutated in place, only replaced, so the copy shares them."""
        other = copy.copy(self)
        other._pending = list(self._pending)
        return other

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        """Add one token; return the newly committed text ('' while a character is incomplete)."""
        self._pending.append(int(token_id))
        return self._commit(force=False)

    def flush(self) -> str:
        """Commit whatever is pending (at the end of a stream)."""
        return self._commit(force=True) if self._pending else ""

    def _commit(self, force: bool) -> str:
        full = self._decode(self._context + self._pending)
        if not force and full.endswith(REPLACEMENT_CHAR) and len(self._pending) < self.max_pending:
            return ""
        # decode(context) is a prefix of `full` for byte-level BPE and SentencePiece alike: the
        # context is what makes a leading "▁" decode to a space instead of being stripped.
        piece = full[len(self._context_text):]
        self.text += piece
        self._context, self._pending = self._pending, []
        self._context_text = self._decode(self._context)
        return piece


# --- the stream ---------------------------------------------------------------------------------------


@dataclass
class StreamUpdate:
    """One step of a stream. `text` is the whole answer so far (special tokens skipped).

    `beams`: every running beam's text when all_beams=True (beam search), else None.
    `token_ids`: the generated ids, on the final update only.
    """

    text: str
    beams: list[str] | None
    finished: bool
    token_ids: list[int] | None = None


def stream_generate(model, tokenizer, input_ids: list[int], params: GenerationParams,
                    stop_strings: list[str] | None = None, cancel: threading.Event | None = None,
                    all_beams: bool = False) -> Iterator[StreamUpdate]:
    """Yield a StreamUpdate per generated token; the last one has finished=True.

    A prompt whose length plus max_new_tokens exceeds the model's context is refused (UserError).
    Generation stops at EOS, max_new_tokens, a stop string (the text containing it is kept; cut
    it with prompt.extract_response) or when `cancel` is set: then it ends within one step and
    yields a final update with what was shown so far. One prompt at a time (beams expand it).
    """
    params.validate()
    if not input_ids:
        raise UserError("the prompt is empty; pass at least one token")
    check_context(model, len(input_ids), params.max_new_tokens)  # never generate past the context
    if params.num_beams == 1:
        return _stream_single(model, tokenizer, list(input_ids), params, stop_strings, cancel, all_beams)
    return _stream_beams(model, tokenizer, list(input_ids), params, stop_strings, cancel, all_beams)


# --- num_beams == 1: model.generate in a worker thread ------------------------------------------------

_DONE = object()


def _stream_single(model, tokenizer, input_ids, params, stop_strings, cancel, all_beams):
    import torch
    from transformers import StoppingCriteria, StoppingCriteriaList, set_seed
    from transformers.generation import BaseStreamer

    abandon = threading.Event()  # set when the reader stops: the worker must not block or go on
    tokens: queue.Queue = queue.Queue(maxsize=STREAM_LOOKAHEAD)

    def hand_over(item) -> None:
        while not abandon.is_set():
            try:
                tokens.put(item, timeout=0.05)
                return
            except queue.Full:
                continue

    class TokenStreamer(BaseStreamer):
        """Receives the prompt once, then each new token from `generate`."""

        def __init__(self):
            self.prompt_seen = False

        def put(self, value):
            if not self.prompt_seen:
                self.prompt_seen = True
                return
            for token_id in value.reshape(-1).tolist():
                hand_over(token_id)

        def end(self):
            pass

    class StopOnEvent(StoppingCriteria):
        def __call__(self, ids, scores, **kwargs):
            stop = abandon.is_set() or (cancel is not None and cancel.is_set())
            return torch.full((ids.shape[0],), stop, dtype=torch.bool, device=ids.device)

    ids = torch.tensor([input_ids], device=model.device)
    kwargs = dict(params.generate_kwargs(tokenizer, model), input_ids=ids, attention_mask=torch.ones_like(ids),
                  streamer=TokenStreamer(), stopping_criteria=StoppingCriteriaList([StopOnEvent()]))
    if stop_strings:
        kwargs.update(stop_strings=list(stop_strings), tokenizer=tokenizer)
    error: list[BaseException] = []

    def work():
        try:
            if params.seed is not None:
                set_seed(params.seed)
            with torch.inference_mode():
                model.generate(**kwargs)
        except BaseException as e:  # re-raised in the reader's thread
            error.append(e)
        finally:
            hand_over(_DONE)

    thread = threading.Thread(target=work, name="stream_generate", daemon=True)
    thread.start()
    generated: list[int] = []
    decoder = IncrementalDecoder(tokenizer)
    try:
        while True:
            item = tokens.get()
            if item is _DONE or (cancel is not None and cancel.is_set()):
                break
            generated.append(item)
            decoder.push(item)
            yield StreamUpdate(decoder.text, [decoder.text] if all_beams else None, False)
    finally:
        abandon.set()  # unblocks the worker's hand_over and stops generate at its next step
        thread.join()
    if error:
        raise error[0]
    text = tokenizer.decode(generated, skip_special_tokens=True)  # once, O(n): exact final text
    yield StreamUpdate(text, [text] if all_beams else None, True, generated)


# --- num_beams > 1: our own beam search -----------------------------------------------------------------


def _forward_accepts(model, name: str) -> bool:
    # A PeftModel forwards extra kwargs to the wrapped transformers model; ask that one.
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(base.forward).parameters


def _score_processors(params: GenerationParams, prompt_len: int, eos: list[int]):
    """The processors `generate` applies to beam log-probs for these params, in its order."""
    from transformers import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                              RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopKLogitsWarper,
                              TopPLogitsWarper)

    processors = LogitsProcessorList()
    if params.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(float(params.repetition_penalty)))
    if params.effective_min_new_tokens > 0 and eos:
        processors.append(MinNewTokensLengthLogitsProcessor(prompt_len, params.effective_min_new_tokens, eos))
    if params.do_sample:
        keep = len(eos) + 1  # beams need a non-EOS continuation to survive the cut
        if params.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(float(params.temperature)))
        if params.top_k != 0:
            processors.append(TopKLogitsWarper(top_k=int(params.top_k), min_tokens_to_keep=keep))
        if params.top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p=float(params.top_p), min_tokens_to_keep=keep))
    return processors


class _BeamSearch:
    """Beam search state for one prompt, advanced one token per `step()`.

    Per step (k = num_beams, V = vocab):
      1. log_softmax of each beam's next-token logits, then the processors (repetition penalty
         per beam over its whole sequence, min_new_tokens masking EOS), plus the beam's score;
      2. the best C = max(2, 1 + #EOS) * k of the k*V continuations (or C sampled ones);
      3. a candidate that ends (EOS, a stop string, max_new_tokens) and ranks in the top k of
         the C becomes a finished hypothesis scored sum(logprob) / new_len**length_penalty, with
         new_len counting the EOS; an ending candidate below the top k is dropped;
      4. the k best candidates that did not end continue (the cache is reordered to them).
    The search ends when no candidate can continue, when early_stopping=True and k hypotheses
    finished, or when the best running beam cannot beat the worst of k finished ones (with
    early_stopping=False its score is normalised at the current length; with "never" and
    length_penalty > 0 at max_new_tokens, an optimistic bound). Scores stay float32 tensors and
    masked entries get -1e9 added, as in transformers, so ties break the same way.
    """

    def __init__(self, model, tokenizer, input_ids: list[int], params: GenerationParams,
                 stop_strings: list[str] | None):
        import torch
        from transformers import DynamicCache, StopStringCriteria

        self.model = model
        self.k = k = params.num_beams
        self.eos = eos_token_ids(tokenizer, model)
        self.prompt_len = len(input_ids)
        self.max_new = params.max_new_tokens
        self.length_penalty = float(params.length_penalty)
        self.early_stopping = params.early_stopping
        self.do_sample = params.do_sample
        self.n_candidates = max(2, 1 + len(self.eos)) * k
        self.processors = _score_processors(params, self.prompt_len, self.eos)
        self.stop_criteria = (StopStringCriteria(tokenizer=tokenizer, stop_strings=list(stop_strings))
                              if stop_strings else None)
        # generate passes logits_to_keep=1 and explicit position ids (and no all-ones mask); do the
        # same so the forward pass runs the same kernels on the same shapes.
        self.forward_kwargs = {"logits_to_keep": 1} if _forward_accepts(model, "logits_to_keep") else {}
        self.pass_positions = _forward_accepts(model, "position_ids")
        device = model.device
        with torch.inference_mode():
            self.eos_tensor = torch.tensor(self.eos, dtype=torch.long, device=device)
            self.seqs = torch.tensor([input_ids], dtype=torch.long, device=device).repeat(k, 1)  # [k, cur_len]
            self.step_input = self.seqs  # prefill: the whole prompt for each beam
            self.positions = torch.arange(self.prompt_len, device=device).unsqueeze(0).repeat(k, 1)
            self.cache = DynamicCache(config=model.config.get_text_config(decoder=True))
            # Only beam 0 is live at first, so the first step does not pick k copies of one token.
            self.running = torch.full((1, k), NEG_INF_SCORE, device=device)  # [1, k] summed log-probs
            self.running[0, 0] = 0.0
            self.done_scores = torch.full((1, k), NEG_INF_SCORE, device=device)  # [1, k] best first
            self.done_flags = torch.zeros((1, k), dtype=torch.bool, device=device)
            self.can_improve = torch.ones((1, 1), dtype=torch.bool, device=device)
            self.top_k_mask = torch.arange(self.n_candidates, device=device).unsqueeze(0) < k  # [1, C]
        self.done_seqs: list = [None] * k  # finished slot -> [new_len] generated ids
        self.new_len = 0  # tokens generated by the running beams
        self.parents: list[int] = []  # after a step: running beam i continues beam parents[i]
        self.tokens: list[int] = []  # ... with token tokens[i]

    def step(self) -> bool:
        """Advance every beam by one token; return True when the search is over."""
        import torch

        k, lp, early = self.k, self.length_penalty, self.early_stopping
        new_len = self.new_len + 1  # generated tokens once this step's token is appended
        with torch.inference_mode():
            model_kwargs = dict(self.forward_kwargs)
            if self.pass_positions:
                model_kwargs["position_ids"] = self.positions
            out = self.model(input_ids=self.step_input, cache=self.cache, use_cache=True, **model_kwargs)
            logits = out.logits[:, -1, :].to(dtype=torch.float32, copy=True)  # [k, V]
            del out
            vocab = logits.shape[-1]
            scores = self.processors(self.seqs, torch.log_softmax(logits, dim=-1))
            totals = (scores + self.running[0, :, None]).view(1, k * vocab)  # [1, k*V]
            if self.do_sample:
                picked = torch.multinomial(torch.softmax(totals, dim=-1), num_samples=self.n_candidates)
                cand_scores, order = totals.gather(1, picked).sort(dim=-1, descending=True)
                picked = picked.gather(1, order)
            else:
                cand_scores, picked = torch.topk(totals, self.n_candidates)  # [1, C], best first
            parents, cand_tokens = picked[0] // vocab, picked[0] % vocab  # [C]
            cand_seqs = torch.cat([self.seqs[parents], cand_tokens[:, None]], dim=1)  # [C, cur_len + 1]

            ends = torch.isin(cand_tokens, self.eos_tensor) | (new_len >= self.max_new)
            if self.stop_criteria is not None:
                ends = ends | self.stop_criteria(cand_seqs, None).to(ends.device)
            ends = ends.unsqueeze(0)  # [1, C]

            # Continue with the k best candidates that did not end.
            live_scores = cand_scores + ends.to(torch.float32) * NEG_INF_SCORE
            keep = torch.topk(live_scores, k).indices[0]  # [k]

            # Finished hypotheses: only enders within the top k of the C candidates count, and
            # none once the finished set is final (early_stopping=True and full, or unbeatable).
            finals = cand_scores / (new_len ** lp)
            is_full = self.done_flags.all(dim=-1, keepdim=True) & (early is True)
            finals += is_full.to(torch.float32) * NEG_INF_SCORE
            finals += (~self.can_improve).to(torch.float32) * NEG_INF_SCORE
            just_done = ends & self.top_k_mask
            finals += (~just_done).to(torch.float32) * NEG_INF_SCORE
            merged = torch.cat([self.done_scores, finals], dim=1)  # [1, k + C]
            best = torch.topk(merged, k).indices[0]
            flags = torch.cat([self.done_flags, just_done], dim=1)
            self.done_seqs = [self.done_seqs[i] if i < k else cand_seqs[i - k, self.prompt_len:].clone()
                              for i in best.tolist()]
            self.done_scores = merged[:, best]
            self.done_flags = flags[:, best]

            self.running = live_scores[:, keep]
            self.seqs = cand_seqs[keep]
            self.step_input = self.seqs[:, -1:]
            self.positions = self.positions[:, -1:] + 1
            self.cache.reorder_cache(parents[keep])
            self.new_len = new_len
            self.parents = parents[keep].tolist()
            self.tokens = cand_tokens[keep].tolist()

            # Can the best running beam still beat the worst finished one?
            bound_len = self.max_new if (early == "never" and lp > 0.0) else new_len
            best_possible = self.running[:, :1] / (bound_len ** lp)
            worst_done = torch.where(self.done_flags, self.done_scores.min(dim=1, keepdim=True).values,
                                     NEG_INF_SCORE)
            self.can_improve = self.can_improve & (best_possible > worst_done).any(dim=-1, keepdim=True)
            return (not bool(self.can_improve.all())) or (bool(self.done_flags.all()) and early is True) \
                or bool(ends.all())

    def answer(self, cancelled: bool) -> list[int]:
        """The best finished hypothesis (what generate returns). After a cancel, the best running
        beam when nothing finished yet or it scores higher at its current length."""
        best_done = self.done_seqs[0] if bool(self.done_flags[0, 0]) else None
        if best_done is None or (cancelled and self.new_len > 0 and
                                 float(self.running[0, 0]) / (self.new_len ** self.length_penalty)
                                 > float(self.done_scores[0, 0])):
            return self.seqs[0, self.prompt_len:].tolist()
        return best_done.tolist()

    def finished(self) -> list[list[int]]:
        """Finished hypotheses, best first."""
        return [s.tolist() for s, done in zip(self.done_seqs, self.done_flags[0].tolist()) if done]


def _stream_beams(model, tokenizer, input_ids, params, stop_strings, cancel, all_beams):
    from transformers import set_seed

    if params.seed is not None:
        set_seed(params.seed)
    search = _BeamSearch(model, tokenizer, input_ids, params, stop_strings)
    decoders = [IncrementalDecoder(tokenizer) for _ in range(params.num_beams)]
    cancelled = False
    while True:
        if cancel is not None and cancel.is_set():
            cancelled = True
            break
        over = search.step()
        # A beam that continues another one takes its decoder state (O(pending) per fork).
        decoders = [decoders[p].fork() for p in search.parents]
        for decoder, token_id in zip(decoders, search.tokens):
            decoder.push(token_id)
        if over:
            break
        yield StreamUpdate(decoders[0].text, [d.text for d in decoders] if all_beams else None, False)
    token_ids = search.answer(cancelled)
    beams = None
    if all_beams:
        finished = [] if cancelled else search.finished()
        beams = ([tokenizer.decode(ids, skip_special_tokens=True) for ids in finished] if finished
                 else [d.text for d in decoders])
    search = None  # free the KV cache before the last yield: the caller may keep the generator
    yield StreamUpdate(tokenizer.decode(token_ids, skip_special_tokens=True), beams, True, token_ids)


# --- one-shot generation ---------------------------------------------------------------------------


def generate_text(model, tokenizer, input_ids: list[int], params: GenerationParams,
                  stop_strings: list[str] | None = None, cancel: threading.Event | None = None) -> str:
    """The whole generated text for one prompt (without the prompt): `stream_generate` run to its
    end, so a one-shot answer takes the pages' path and equals what they show for the same
    settings (greedy and sampling run `model.generate`; beams equal it token for token)."""
    update = None
    for update in stream_generate(model, tokenizer, input_ids, params, stop_strings, cancel):
        pass
    return update.text


def generate_batch(model, tokenizer, prompts: list[list[int]], gen_kwargs: dict,
                   stop_strings: list[str] | None = None) -> list[str]:
    """Several prompts in one left-padded `model.generate` batch (e.g. GenerationParams(...)
    .generate_kwargs(tokenizer, model)); returns the texts without the prompts. Not streamed:
    for a batch of evaluation prompts (tools/demo.py) and as the reference in tests."""
    import torch

    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    kwargs = dict(gen_kwargs, input_ids=ids, attention_mask=mask)
    if stop_strings:
        kwargs.update(stop_strings=stop_strings, tokenizer=tokenizer)
    with torch.inference_mode():
        out = model.generate(**kwargs)
    return [tokenizer.decode(row[width:], skip_special_tokens=True) for row in out]
