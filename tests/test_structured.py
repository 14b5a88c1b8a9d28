"""Structured outputs (runtime/structured.py, llguidance) through the real `openai` client against a real server on
the demo model: every reply validates against its JSON schema with the `jsonschema` package (13 schemas: nested
objects, enums, arrays with minItems/maxItems, anyOf with null, string patterns, integer bounds, consts), greedy
and sampled, streamed and not, and 16 at once with different schemas; regex, choice and GBNF grammars; bad
constraints are 400s naming the field; speculative decoding leaves the constrained reply unchanged."""
from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import jsonschema
import numpy as np
import openai
import pytest

from test_serve import KEY, Server

SCHEMAS = json.loads((Path(__file__).parent / "data" / "schemas.json").read_text())
ASK = "Reply with a JSON value for a {} record."


@pytest.fixture(scope="module")
def server(demo_fused):
    s = Server(demo_fused, "--max-batch", 16, "--max-context", 512, "--api-key", KEY, "--model-name", "demo")
    yield s
    assert s.stop() == 0


def ask(c, name: str, how: str, stream: bool, temperature: float, seed: int | None = None) -> tuple[str, str]:
    """(text, finish_reason) of a chat completion constrained to SCHEMAS[name], the constraint sent the way `how`
    says: OpenAI's response_format, vLLM's structured_outputs or llama.cpp's json_schema."""
    schema = SCHEMAS[name]
    kw = {"response_format": {"type": "json_schema", "json_schema": {"name": name, "schema": schema, "strict": True}}}
    if how == "vllm":
        kw = {"extra_body": {"structured_outputs": {"json": schema}}}
    elif how == "llama.cpp":
        kw = {"extra_body": {"json_schema": schema}}
    r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": ASK.format(name)}],
                                  max_tokens=200, temperature=temperature, seed=seed, stream=stream, **kw)
    if not stream:
        return r.choices[0].message.content, r.choices[0].finish_reason
    text, finish = [], None
    for ch in r:
        if ch.choices:
            text.append(ch.choices[0].delta.content or "")
            finish = ch.choices[0].finish_reason or finish
    return "".join(text), finish


def check(name: str, text: str, finish: str) -> None:
    assert finish == "stop", (name, finish, text)
    jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_every_reply_validates_against_its_schema(server):
    c = server.client()
    assert len(SCHEMAS) >= 12
    for k, name in enumerate(SCHEMAS):
        how = ("openai", "vllm", "llama.cpp")[k % 3]
        check(name, *ask(c, name, how, stream=False, temperature=0))
        check(name, *ask(c, name, how, stream=True, temperature=1.0, seed=k))


def test_sixteen_at_once_with_different_schemas(server):
    """16 concurrent requests, each its own schema and its own matcher inside one running batch."""
    c, out, names = server.client(), {}, (list(SCHEMAS) * 2)[:16]

    def one(i: int) -> None:
        out[i] = ask(c, names[i], ("openai", "vllm")[i % 2], stream=bool(i % 2), temperature=1.0, seed=100 + i)

    threads = [threading.Thread(target=one, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(600)
    assert sorted(out) == list(range(16))
    for i, name in enumerate(names):
        check(name, *out[i])


def test_regex_choice_grammar_and_json_object(server):
    c = server.client()
    msgs = [{"role": "user", "content": "Is the sky blue? Answer and say why."}]
    pattern = r"(yes|no), because [a-z ]{1,40}\."
    r = c.chat.completions.create(model="demo", messages=msgs, max_tokens=60, temperature=0,
                                  extra_body={"structured_outputs": {"regex": pattern}})
    assert re.fullmatch(pattern, r.choices[0].message.content) and r.choices[0].finish_reason == "stop"
    choices = ["sunny", "rainy", "snowy"]
    for seed in range(3):
        r = c.chat.completions.create(model="demo", messages=msgs, max_tokens=10, temperature=1.0, seed=seed,
                                      extra_body={"structured_outputs": {"choice": choices}})
        assert r.choices[0].message.content in choices
    gbnf = 'root ::= "The answer is " ("yes" | "no") "."'
    r = c.completions.create(model="demo", prompt="Q: Is water wet?\nA:", max_tokens=20, temperature=0,
                             extra_body={"grammar": gbnf})
    assert re.fullmatch(r"The answer is (yes|no)\.", r.choices[0].text)
    r = c.chat.completions.create(model="demo", messages=[{"role": "user", "content": "A JSON object about cats."}],
                                  max_tokens=120, temperature=0, response_format={"type": "json_object"})
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    else:  # an open-ended object may run to max_tokens: then it is a prefix of one
        assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.lstrip().startswith("{")


def test_an_open_grammar_at_max_tokens_ends_with_length_and_the_partial_text(server):
    r = server.client().chat.completions.create(
        model="demo", messages=[{"role": "user", "content": ASK.format("nested")}], max_tokens=6, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "n", "schema": SCHEMAS["nested"]}})
    assert r.choices[0].finish_reason == "length" and r.choices[0].message.content.lstrip().startswith("{")
    with pytest.raises(json.JSONDecodeError):
        json.loads(r.choices[0].message.content)


def test_bad_constraints_are_400s_naming_the_field(server):
    body = {"model": "demo", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
    cases = [({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
              "response_format.json_schema.schema", "cannot be compiled"),
             ({"response_format": {"type": "xml"}}, "response_format", "expected text, json_object or json_schema"),
             ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "response_format",
              "expected a JSON schema"),
             ({"structured_outputs": {"regex": "("}}, "structured_outputs.regex", "cannot be compiled"),
             ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one of"),
             ({"structured_outputs": {"choice": []}}, "structured_outputs.choice", "non-empty list"),
             ({"grammar": 'root ::= "a', "json_schema": {"type": "object"}}, "json_schema", "give one constraint"),
             ({"grammar": 'root ::= "a'}, "grammar", "grammar"),
             ({"grammar": "root ::= root"}, "grammar", "grammar: cannot be compiled"),
             ({"json_schema": {"type": "object"}, "ignore_eos": True}, "ignore_eos", "ends at EOS")]
    for extra, param, words in cases:
        status, r, _ = server.post("/v1/chat/completions", body | extra)
        assert status == 400 and r["error"]["param"] == param and words in r["error"]["message"], (extra, r)


def test_a_schema_is_compiled_once_and_speculation_leaves_the_reply_unchanged(demo_fused):
    """The compiled grammar is kept by content (key order aside): the second request's matcher is a copy of the
    same compiled one, made in well under a millisecond. Prompt-lookup drafts go through the same matcher: the
    greedy constrained reply with speculation equals the one without, token for token."""
    import time

    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.chat import format_chat
    from mistral_trt.runtime.generate import Generator
    from mistral_trt.runtime.request import Request
    from mistral_trt.runtime.sampling import Sampling
    from mistral_trt.runtime.speculative import Speculation
    from mistral_trt.runtime.structured import Grammar, _compiled, grammar_mask
    from mistral_trt.runtime.tokenizer import Tokenizer

    backend = open_backend(demo_fused)
    tok, m = Tokenizer.for_export(demo_fused, backend.manifest), backend.manifest
    schema = SCHEMAS["array_of_objects"]
    first = Grammar("json_schema", json.dumps(schema, sort_keys=True))
    grammar_mask(first, tok, m)
    t = time.perf_counter()
    again = grammar_mask(Grammar("json_schema", json.dumps(dict(reversed(schema.items())), sort_keys=True)), tok, m)
    assert time.perf_counter() - t < 0.005 and again.m is not _compiled(first, tok, tuple(m.eos_token_id))
    gen = Generator(backend)
    prompt = np.array(format_chat(tok, [{"role": "user", "content": ASK.format("items")}], m.chat_format,
                                  m.chat_template), np.int64)
    replies = []
    for spec in (None, Speculation(k=7)):
        req = Request(prompt, 120, Sampling(), mask=grammar_mask(first, tok, m))
        ids = [t for (u,) in gen.run([req], tok, spec) if u is not None for t in u.tokens]
        replies.append(ids)
    assert replies[0] == replies[1]
    check("array_of_objects", tok.decode(replies[0]), "stop")


def test_bench_structured_prints_its_tables_and_targets(tiny_fused, tmp_path, capsys):
    """bench-structured on a tiny model: every schema walked by llguidance (and xgrammar when it is installed), the
    two levels measured with every request yielding exactly --max-tokens tokens, targets printed, JSON and PNG."""
    from mistral_trt.main import main

    out = tmp_path / "bs"
    assert main(["bench-structured", str(tiny_fused["full"]), "--concurrency", "1,2", "--max-tokens", "8", "--rounds",
                 "1", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    data = json.loads((out / "bench-structured.json").read_text())
    assert [r["schema"] for r in data["engines"]] == list(SCHEMAS)
    assert all(r["llguidance_compile_ms"] > 0 and r["llguidance_mask_us"] > 0 for r in data["engines"])
    assert [lv["streams"] for lv in data["levels"]] == [1, 2] and all(lv["ratio"] > 0 for lv in data["levels"])
    assert "Target: constrained >= 0.9x unconstrained" in text and "Target: compiling a schema adds" in text
    assert (out / "bench-structured.png").read_bytes()[:4] == b"\x89PNG"
