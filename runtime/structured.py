"""Structured outputs: a JSON schema, a regular expression, a list of choices or a grammar (GBNF or Lark) as the
tokens allowed at each step, through llguidance (Rust, no torch: its matcher fills a bitmask over the vocabulary on
the CPU, tens of microseconds a token; bench/structured.py measures it beside xgrammar, which needs torch).

    spec = Grammar("json_schema", json.dumps(schema))
    mask = grammar_mask(spec, tok, manifest)      # a runtime/sampling.py TokenMask: one per request
    Request(prompt, 256, mask=mask)               # the Sequence asks allowed() before each token, accept() after

A compiled grammar is kept by content (LRU, COMPILED entries), so a repeated schema is compiled once; each request
gets a copy of its matcher. A grammar llguidance cannot compile is a UserError naming the keyword it came from.
When the grammar is complete only EOS is allowed, so a reply ends there with finish_reason "stop"; at max_tokens
first it ends with "length" and the partial text, as vLLM does.
"""
from __future__ import annotations

import collections
import json
import threading
from dataclasses import dataclass

import numpy as np

from .errors import UserError

KINDS = ("json_schema", "regex", "choice", "grammar")
# JSON replies: whitespace between tokens as a pretty-printer writes it, at most 20 characters a gap. Unbounded (JSON's
# own rule), a sampled small model pads with blank lines until max_tokens; a schema's "x-guidance" may override it.
JSON_OPTIONS = {"whitespace_pattern": r"[\x20\x0A\x0D\x09]{0,20}"}
COMPILED = 256  # grammars kept compiled


@dataclass(frozen=True)
class Grammar:
    """What a reply must match. kind: json_schema (a JSON schema as JSON text; {"type": "object"} is any object),
    regex, choice (a JSON list of strings), grammar (GBNF, llama.cpp's format, or Lark). `origin`: the field the
    caller gave it in, for messages."""

    kind: str
    text: str
    origin: str = ""


class GrammarMask:
    """One request's matcher: the TokenMask of runtime/sampling.py."""

    def __init__(self, template, vocab_size: int, origin: str):
        """`template`: the compiled matcher in its start state (shared, never advanced); this request's is a copy."""
        from llguidance.numpy import allocate_token_bitmask

        self.template, self.vocab_size, self.origin = template, vocab_size, origin
        self.m = template.deep_copy()
        self.bits = allocate_token_bitmask(1, vocab_size)

    def copy(self) -> "GrammarMask":
        """Another request's matcher for the same grammar, at its start (n > 1: one per choice)."""
        return GrammarMask(self.template, self.vocab_size, self.origin)

    def allowed(self) -> np.ndarray:
        from llguidance.numpy import fill_next_token_bitmask

        fill_next_token_bitmask(self.m, self.bits)
        if self.m.is_error():
            raise UserError(f"{self.origin}: the grammar failed: {self.m.get_error()}")
        return np.unpackbits(self.bits.view(np.uint8), bitorder="little")[:self.vocab_size].astype(bool)

    def accept(self, token: int) -> None:
        if not self.m.consume_token(int(token)):
            raise UserError(f"{self.origin}: token {token} was not allowed ({self.m.get_error()})")


def grammar_mask(spec: Grammar, tok, manifest) -> GrammarMask:
    template = _compiled(spec, tok, tuple(manifest.eos_token_id))
    return GrammarMask(template, manifest.model.vocab_size, spec.origin or spec.kind)


_lock = threading.Lock()
_cache: collections.OrderedDict = collections.OrderedDict()
_tokenizers: dict = {}


def _compiled(spec: Grammar, tok, eos: tuple[int, ...]):
    """The matcher for `spec` in its start state, compiled once per content (and tokenizer)."""
    import llguidance

    key = (id(tok), eos, spec.kind, spec.text)
    with _lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    lltok = ll_tokenizer(tok, eos)
    where = spec.origin or spec.kind
    try:
        if spec.kind == "json_schema":
            grammar = llguidance.LLMatcher.grammar_from_json_schema(spec.text, defaults=JSON_OPTIONS)
        elif spec.kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(spec.text)
        elif spec.kind == "choice":
            choices = json.loads(spec.text)
            if not (isinstance(choices, list) and choices and all(isinstance(c, str) and c for c in choices)):
                raise UserError(f"{where}: expected a non-empty list of non-empty strings")
            grammar = llguidance.grammar_from("choice", spec.text)
        elif spec.kind == "grammar":
            grammar = llguidance.grammar_from("grammar", spec.text)
        else:
            raise UserError(f"{where}: expected one of {', '.join(KINDS)}")
    except ValueError as e:
        raise UserError(f"{where}: {first_line(str(e))}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar, lltok)
    if error and not error.startswith("WARNING"):
        raise UserError(f"{where}: cannot be compiled: {first_line(error)}")
    from llguidance.numpy import allocate_token_bitmask, fill_next_token_bitmask

    matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
    probe = matcher.deep_copy()  # a grammar can compile and still allow no first token (`root ::= root`)
    if not matcher.is_error():
        fill_next_token_bitmask(probe, allocate_token_bitmask(1, lltok.vocab_size))
    if probe.is_error():
        raise UserError(f"{where}: cannot be compiled: {first_line(probe.get_error())}")
    with _lock:
        _cache[key] = matcher
        while len(_cache) > COMPILED:
            _cache.popitem(last=False)
    return matcher


def first_line(text: str, limit: int = 300) -> str:
    return text.strip().split("\n")[0][:limit]


def ll_tokenizer(tok, eos: tuple[int, ...]):
    """llguidance's view of our tokenizer: every id's bytes as they appear in text, which ids are special, EOS."""
    import llguidance

    key = (id(tok), eos)
    with _lock:
        if key not in _tokenizers:
            _tokenizers[key] = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Vocabulary(tok, eos)),
                                                      eos_token=list(eos))
        return _tokenizers[key]


class _Vocabulary:
    """What llguidance's TokenizerWrapper reads: tokens (bytes per id), special ids, BOS/EOS, and encode."""

    def __init__(self, tok, eos: tuple[int, ...]):
        self.tok = tok
        self.eos_token_id, self.bos_token_id = eos[0], tok.bos_id
        self.tokens, self.special_token_ids = token_bytes(tok)

    def __call__(self, text) -> list[int]:
        """Ids whose bytes are exactly `text`'s (llguidance relies on it). sentencepiece puts its dummy prefix "▁"
        before a text: encoded after a newline, the text starts after the newline's byte token instead."""
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        if self.tok.kind != "sentencepiece":
            return self.tok.encode(text).tolist()
        ids = self.tok.impl.encode("\n" + text)
        newline = self.tok.impl.piece_to_id("<0x0A>")
        return ids[ids.index(newline) + 1:] if newline in ids else ids


def token_bytes(tok) -> tuple[list[bytes], list[int]]:
    return tok.token_bytes(), sorted(tok.special_ids())
