"""One request builder for every interface: `mistral-trt generate` / `chat`, the HTTP API and Triton's model turn
their inputs into the same parameters, and this builds the Request (runtime/sequence.py) with one set of rules
and one set of messages. Each interface only says how it spells a field (`Spelling`), so a bad value gets the
same verdict and the same message everywhere, in the caller's own words:

    req = build_request({"text": "Hi", "temperature": 0.7, "top_p": 0.9, "max_tokens": 64}, tok, manifest,
                        max_context=4096, spell=HTTP)
    build_request({"text": "Hi", "top_p": 0.9}, ..., spell=CLI, defaults=CLI_DEFAULTS)
    # RequestError: --top-p 0.9 applies to sampling: add --temperature T (T > 0); at temperature 0 decoding is greedy

Fields (canonical names): the prompt as `text` (a user message in the model's chat format; with `raw` the text as
the tokenizer encodes it), `messages` (a conversation, with "prefix": true on a final assistant message to
continue it) or `ids`; `safe_prompt`; `max_tokens`; `truncate`; the sampling parameters (runtime/sampling.py's
SAMPLING_RULES); `stop`; `logprobs` (k alternatives, 0..20); `ignore_eos` (vLLM's: exactly max_tokens tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from .chat import check_messages, format_chat
from .errors import RequestError, UserError
from .sampling import SAMPLING_RULES, Sampling, TokenMask, build_sampling, is_count
from .tokenizer import Tokenizer, check_text

# Mistral's documented guardrail system prompt (docs.mistral.ai, "Guardrailing"); the model card says the
# model has no moderation of its own. `safe_prompt` prepends it.
SAFE_PROMPT = ("Always assist with care, respect, and truth. Respond with utmost utility yet securely. Avoid harmful, "
               "unethical, prejudiced, or negative content. Ensure replies promote fairness and positivity.")
MAX_STOPS = 16
MAX_LOGPROBS = 20
FIELDS = ("text", "messages", "ids", "raw", "safe_prompt", "max_tokens", "truncate", *SAMPLING_RULES, "logit_bias",
          "stop", "logprobs", "ignore_eos", "grammar")
LOGIT_BIAS_RANGE = 100  # OpenAI's: a bias in [-100, 100]


TRUNCATE_KEEP = 0.5  # truncation keeps at least this share of a prompt, or refuses


@dataclass
class Request:
    """What is asked, validated (build_request makes it from any interface's fields; runtime/sequence.py runs it)."""

    prompt: np.ndarray  # token ids [T]
    max_tokens: int
    sampling: Sampling = field(default_factory=Sampling)
    stop: list[str] = field(default_factory=list)  # the stop text itself is not returned
    logprobs: int | None = None  # None: off; k >= 0: each token's logprob and its k most likely alternatives
    stop_on_eos: bool = True
    mask: TokenMask | None = None  # the tokens allowed at each step (structured outputs); None: any


@dataclass(frozen=True)
class Spelling:
    """How an interface names the fields in its messages: canonical name -> its own (default: the same)."""

    names: dict = field(default_factory=dict)
    pattern: str = "{}"  # e.g. Triton's "input '{}'"

    def __call__(self, name: str) -> str:
        return self.pattern.format(self.names.get(name, name))


@dataclass(frozen=True)
class Defaults:
    """What an interface assumes for a field the caller left out."""

    temperature: float = 1.0  # OpenAI's: servers sample unless told otherwise
    max_tokens: int | None = None  # None: the room the context limit leaves after the prompt (OpenAI's)
    max_tokens_cap: int | None = None  # when max_tokens is None: at most this many (serve --default-max-tokens)


CLI = Spelling({"text": "--prompt", "messages": "--messages", "ids": "--ids", "raw": "--raw",
                "max_tokens": "--max-new-tokens", "truncate": "--truncate", "temperature": "--temperature",
                "top_p": "--top-p", "top_k": "--top-k", "min_p": "--min-p", "repetition_penalty": "--repetition-penalty",
                "frequency_penalty": "--frequency-penalty", "presence_penalty": "--presence-penalty",
                "seed": "--seed", "stop": "--stop"})
CLI_DEFAULTS = Defaults(temperature=0.0, max_tokens=128)  # a command line is greedy (reproducible) by default
HTTP = Spelling({"text": "prompt", "ids": "prompt", "logprobs": "top_logprobs"})
TRITON = Spelling({"text": "text_input", "ids": "input_ids"}, "input '{}'")
SERVER_DEFAULTS = Defaults()


def _bool(params: dict, name: str, default: bool, spell: Spelling) -> bool:
    v = params.get(name)
    if v is None:
        return default
    if not isinstance(v, (bool, np.bool_)):
        raise RequestError(name, f"{spell(name)} {v!r}: expected true or false")
    return bool(v)


def _checked_text(text: str, name: str, spell: Spelling) -> None:
    """Text that cannot be UTF-8 (lone surrogates: a JSON "\\ud800", or bytes a terminal could not decode) is
    refused naming the field, as every other bad value is."""
    try:
        check_text(text, spell(name))
    except UserError as e:
        raise RequestError(name, str(e)) from None


def build_prompt(params: dict, tok: Tokenizer, manifest, spell: Spelling = Spelling()) -> list[int]:
    """The prompt's ids from exactly one of text, messages, ids (with raw and safe_prompt)."""
    given = [n for n in ("text", "messages", "ids") if params.get(n) is not None]
    if len(given) != 1:
        names = ", ".join(dict.fromkeys(spell(n) for n in ("text", "messages", "ids")))
        raise RequestError(given[1] if given else "text", f"give the prompt as one of {names}")
    raw, safe = _bool(params, "raw", False, spell), _bool(params, "safe_prompt", False, spell)
    if raw and given[0] != "text":
        raise RequestError("raw", f"{spell('raw')} goes with {spell('text')} (a conversation has its chat format; "
                                  f"{spell('ids')} are ids already)")
    if params.get("ids") is not None:
        ids = params["ids"]
        vocab = manifest.model.vocab_size
        if not (isinstance(ids, (list, np.ndarray)) and len(ids) and all(is_count(i) and 0 <= i < vocab for i in ids)):
            raise RequestError("ids", f"{spell('ids')}: expected a non-empty list of token ids in [0, {vocab})")
        return [int(i) for i in ids]
    if params.get("text") is not None:
        text = params["text"]
        if not isinstance(text, str):
            raise RequestError("text", f"{spell('text')}: expected a string")
        _checked_text(text, "text", spell)
        if raw:
            return tok.encode(text, bos=tok.add_bos).tolist()
        messages = [{"role": "user", "content": text}]
    else:
        try:
            messages = check_messages(params["messages"])
            for i, m in enumerate(messages):
                check_text(m["content"], f"conversation message {i} content")  # the C++ runtime's words
        except UserError as e:
            raise RequestError("messages", f"{spell('messages')}: {e}") from None
    if safe:
        messages = [{"role": "system", "content": SAFE_PROMPT}] + messages
    try:
        return format_chat(tok, messages, manifest.chat_format, manifest.chat_template)
    except UserError as e:
        raise RequestError(given[0], f"{spell(given[0])}: {e}") from None


def build_stop(params: dict, spell: Spelling = Spelling()) -> list[str]:
    stop = params.get("stop")
    if stop is None:
        return []
    stop = [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or not stop or len(stop) > MAX_STOPS or not all(isinstance(s, str) and s for s in stop):
        raise RequestError("stop", f"{spell('stop')}: expected a non-empty string or a list of 1 to {MAX_STOPS} of "
                                   "them (an empty stop string would stop at once)")
    for s in stop:
        _checked_text(s, "stop", spell)
    return stop


def build_request(params: dict, tok: Tokenizer, manifest, max_context: int, spell: Spelling = Spelling(),
                  defaults: Defaults = SERVER_DEFAULTS) -> Request:
    """The Request for `params` (canonical names, None or absent: left out); RequestError names what is wrong."""
    unknown = set(params) - set(FIELDS)
    if unknown:  # an interface passing a field this builder does not know is a bug, not a user's error
        raise ValueError(f"unknown request fields {sorted(unknown)}")
    sampling = build_sampling(params, spell, defaults.temperature)  # before the prompt: cheap checks first
    sampling.logit_bias = build_logit_bias(params.get("logit_bias"), manifest.model.vocab_size, spell)
    stop = build_stop(params, spell)
    logprobs = params.get("logprobs")
    if logprobs is not None and not (is_count(logprobs) and 0 <= logprobs <= MAX_LOGPROBS):
        raise RequestError("logprobs", f"{spell('logprobs')} {logprobs!r}: expected an integer in [0, {MAX_LOGPROBS}]")
    ignore_eos = _bool(params, "ignore_eos", False, spell)
    grammar = params.get("grammar")  # runtime/structured.py's Grammar: the interface has read its own fields
    if grammar is not None and ignore_eos:
        raise RequestError("ignore_eos", f"{spell('ignore_eos')} and {grammar.origin or grammar.kind}: a finished "
                                         "structured reply ends at EOS; give one of them")
    truncate = _bool(params, "truncate", False, spell)
    max_tokens = params.get("max_tokens")
    if max_tokens is not None and not (is_count(max_tokens) and max_tokens >= 1):
        raise RequestError("max_tokens", f"{spell('max_tokens')} {max_tokens!r}: expected an integer >= 1")
    prompt = np.asarray(build_prompt(params, tok, manifest, spell), np.int64)
    if max_tokens is None:
        max_tokens = defaults.max_tokens or max(max_context - len(prompt), 1)
        if defaults.max_tokens is None and defaults.max_tokens_cap:
            max_tokens = min(max_tokens, defaults.max_tokens_cap)
    names = {"max_new_tokens": spell("max_tokens"), "truncate": spell("truncate")}
    try:
        prompt = fit_context(prompt, int(max_tokens), max_context, truncate, names)
    except UserError as e:
        raise RequestError("max_tokens", str(e), "context_length_exceeded") from None
    mask = None
    if grammar is not None:
        from .structured import grammar_mask  # llguidance: imported only by requests that ask for a grammar

        try:
            mask = grammar_mask(grammar, tok, manifest)
        except UserError as e:
            raise RequestError(grammar.origin or "grammar", str(e)) from None
    return Request(prompt=prompt, max_tokens=int(max_tokens), sampling=sampling, stop=stop,
                   logprobs=None if logprobs is None else int(logprobs), stop_on_eos=not ignore_eos, mask=mask)


def build_logit_bias(bias, vocab_size: int, spell: Spelling) -> dict[int, float] | None:
    """OpenAI's logit_bias: {"token id": bias}, ids as strings (JSON keys) or ints, biases in [-100, 100]."""
    if bias is None or bias == {}:
        return None
    name = spell("logit_bias")
    if not isinstance(bias, dict):
        raise RequestError("logit_bias", f"{name}: expected an object mapping token ids to biases in "
                                         f"[-{LOGIT_BIAS_RANGE}, {LOGIT_BIAS_RANGE}]")
    out = {}
    for key, value in bias.items():
        text = str(key)
        if not (text.isascii() and text.isdigit() and int(text) < vocab_size):
            raise RequestError("logit_bias", f"{name}: key {key!r}: expected a token id in [0, {vocab_size})")
        if not (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
                and -LOGIT_BIAS_RANGE <= value <= LOGIT_BIAS_RANGE):
            raise RequestError("logit_bias", f"{name}[{key!r}] {value!r}: expected a number in "
                                             f"[-{LOGIT_BIAS_RANGE}, {LOGIT_BIAS_RANGE}]")
        out[int(text)] = float(value)
    return out


def fit_context(prompt: np.ndarray, max_new_tokens: int, max_context: int, truncate: bool = False,
                names: dict | None = None, what: str = "the prompt") -> np.ndarray:
    """Every prompt plus `max_new_tokens` must fit `max_context` positions. `truncate` keeps the last tokens of a
    prompt that does not, but at least half of it (TRUNCATE_KEEP): cutting a prompt to a few tokens to make room
    for a huge max_new_tokens would answer a question nobody asked. `names`: how the caller's interface spells
    max_new_tokens and truncate, for its messages (the CLI: --max-new-tokens, --truncate); `what`: the prompt's."""
    n = {"max_new_tokens": "max_new_tokens", "truncate": "truncate"} | (names or {})
    if not is_count(max_new_tokens) or max_new_tokens < 1:
        raise UserError(f"{n['max_new_tokens']} {max_new_tokens!r}: expected an integer >= 1")
    if max_new_tokens >= max_context:
        raise UserError(f"{n['max_new_tokens']} {max_new_tokens}: the context limit is {max_context} positions "
                        f"(prompt + new tokens); expected at most {max_context - 1}")
    room = max_context - max_new_tokens
    p = prompt
    if len(p) == 0:
        raise UserError(f"{what} is empty")
    if len(p) > room:
        fits = (f"{what} has {len(p)} tokens; with {n['max_new_tokens']} {max_new_tokens} the context "
                f"limit {max_context} leaves room for {room}")
        if not truncate:
            raise UserError(f"{fits} ({n['truncate']} keeps the last ones)")
        kept = math.ceil(len(p) * TRUNCATE_KEEP)
        if room < kept:
            if kept >= max_context:  # no max_new_tokens helps: even the half that must stay does not fit
                raise UserError(f"{fits}: {n['truncate']} keeps at least {TRUNCATE_KEEP:.0%} of a prompt, and "
                                f"{kept} tokens do not fit the context limit at all: shorten the prompt")
            raise UserError(f"{fits}: {n['truncate']} keeps at least {TRUNCATE_KEEP:.0%} of a prompt, so ask "
                            f"for at most {max_context - kept} new tokens")
        p = p[len(p) - room:]
    return p
