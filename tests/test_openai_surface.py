"""The OpenAI surface beyond completions (issue 43, first part), with the real `openai` client against a real
server on a tiny random Mistral that carries the real v1 tokenizer: unknown fields refused by name, min_p,
logit_bias, /tokenize and /detokenize against mistral-common and `mistral-trt tokenize`."""
from __future__ import annotations

import json
import re

import openai
import pytest
from mistral_common.protocol.instruct.request import ChatCompletionRequest
from mistral_common.tokens.tokenizers.mistral import MistralTokenizer

from conftest import mistral_tokenizer_file
from mistral_trt.main import main
from test_serve import KEY, Server, alone

QUESTION = [{"role": "user", "content": "Name a city in France."}]


@pytest.fixture(scope="module")
def server(tiny_fused):
    s = Server(tiny_fused["full"], "--max-batch", 4, "--max-context", 256, "--api-key", KEY, "--model-name", "tiny")
    yield s
    assert s.stop() == 0


@pytest.fixture(scope="module")
def ref():
    return MistralTokenizer.from_file(str(mistral_tokenizer_file()))


def chat(server, **kw) -> str:
    r = server.client().chat.completions.create(model="tiny", messages=QUESTION, max_tokens=8, **kw)
    return r.choices[0].message.content


def test_unknown_fields_are_a_400_naming_them(server):
    """Another server's parameters (vLLM's older guided_json, guided_regex, guided_choice) and a misspelt one are
    refused by name, never dropped while the caller believes them applied; OpenAI's own fields we do not
    implement say so; the documented extensions are taken."""
    c = server.client()
    for extra, chat_api in (({"guided_json": {"type": "object"}}, True), ({"guided_regex": "a+"}, False),
                            ({"guided_choice": ["a"]}, False), ({"temprature": 0.5}, True),
                            ({"safe_prompt": True}, False)):
        with pytest.raises(openai.BadRequestError) as e:
            if chat_api:
                c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, extra_body=extra)
            else:
                c.completions.create(model="tiny", prompt="Hi", max_tokens=2, extra_body=extra)
        name = next(iter(extra))
        assert e.value.body["param"] == name and e.value.body["code"] == "unknown_parameter", e.value.body
        assert e.value.body["message"].startswith(f"{name}: not a parameter of")
    with pytest.raises(openai.BadRequestError, match="store: storing completions is not supported"):
        c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, store=True)
    r = c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=2, user="u-1", store=False,
                                  extra_body={"top_k": 5, "min_p": 0.1, "repetition_penalty": 1.1, "ignore_eos": True,
                                              "safe_prompt": False}, temperature=0.7, seed=1)
    assert r.usage.completion_tokens == 2
    assert any('"user": "u-1"' in ln for ln in server.lines)  # the end-user id goes to the access log


def test_min_p_of_one_is_greedy_at_any_temperature(server):
    greedy = chat(server, temperature=0)
    sampled = {chat(server, temperature=1.5, seed=s) for s in range(4)}
    assert sampled != {greedy}  # without min_p the draws wander (else this test could not fail)
    for t, s in ((1.5, 0), (1.5, 1), (0.7, 2), (0, None)):
        assert chat(server, temperature=t, seed=s, extra_body={"min_p": 1.0}) == greedy, (t, s)
    with pytest.raises(openai.BadRequestError, match=r"min_p 1.5: expected a number in \[0, 1\]"):
        chat(server, temperature=1, extra_body={"min_p": 1.5})


def test_logit_bias_moves_the_greedy_reply(server, ref, tiny_fused):
    """-100 on the greedy first token (found by the runtime's own Generator, no bias) changes it; +100 on a token
    (its id from mistral-common) makes it the first; ids and biases out of range are a 400 naming the key."""
    c = server.client()
    prompt = ref.encode_chat_completion(ChatCompletionRequest(messages=QUESTION)).tokens
    greedy = alone(tiny_fused["full"], prompt, 1)[0]
    plain = c.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0).choices[0].text
    pushed = c.completions.create(model="tiny", prompt=prompt, max_tokens=1, temperature=0,
                                  logit_bias={str(greedy): -100}).choices[0].text
    piece = lambda i: ref.instruct_tokenizer.tokenizer.id_to_piece(i).replace("\u2581", " ").lstrip()  # noqa: E731
    assert plain == piece(greedy) and pushed != plain  # (a reply's text starts without sentencepiece's space)
    paris = ref.instruct_tokenizer.tokenizer.encode(" Paris", bos=False, eos=False)[-1]
    forced = c.completions.create(model="tiny", prompt=prompt, max_tokens=3, temperature=0,
                                  logit_bias={str(paris): 100}).choices[0].text
    assert forced.startswith(piece(paris)) and piece(paris) == "Paris"
    for bias, expected in (({"32000": 1}, "key '32000': expected a token id in [0, 32000)"),
                           ({"x": 1}, "key 'x': expected a token id"), ({"5": 101}, "logit_bias['5'] 101: expected")):
        with pytest.raises(openai.BadRequestError) as e:
            c.completions.create(model="tiny", prompt="Hi", max_tokens=1, logit_bias=bias)
        assert expected in e.value.body["message"] and e.value.body["param"] == "logit_bias"


def test_tokenize_and_detokenize(server, ref, tiny_fused, tmp_path, capsys):
    """vLLM's shapes. A conversation's ids are mistral-common's InstructTokenizerV1 encoding and a chat completion's
    prompt_tokens; without the generation prompt, `mistral-trt tokenize`'s; plain text with and without BOS is
    sentencepiece's; /detokenize gives the text back."""
    conv = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi ✓"},
            {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "More"}]
    status, r, _ = server.post("/tokenize", {"model": "tiny", "messages": conv})
    want = ref.encode_chat_completion(ChatCompletionRequest(messages=conv)).tokens
    assert status == 200 and r["tokens"] == want and r["count"] == len(want) and r["max_model_len"] == 256
    usage = server.client().chat.completions.create(model="tiny", messages=conv, max_tokens=1).usage
    assert usage.prompt_tokens == len(want)
    (tmp_path / "conv.json").write_text(json.dumps(conv))
    capsys.readouterr()
    assert main(["tokenize", str(tiny_fused["full"]), "--messages", str(tmp_path / "conv.json")]) == 0
    cli = json.loads(capsys.readouterr().out)["ids"]
    status, r, _ = server.post("/tokenize", {"model": "tiny", "messages": conv, "add_generation_prompt": False,
                                             "return_token_strs": True})
    assert status == 200 and r["tokens"] == cli and len(r["token_strs"]) == len(cli)
    text = "The sky is blue ✓ 你好"
    sp = ref.instruct_tokenizer.tokenizer
    for special, bos in ((True, True), (False, False)):
        status, r, _ = server.post("/tokenize", {"prompt": text, "add_special_tokens": special})
        assert status == 200 and r["tokens"] == sp.encode(text, bos=bos, eos=False)
    status, r, _ = server.post("/detokenize", {"model": "tiny", "tokens": sp.encode(text, bos=True, eos=False)})
    assert status == 200 and r["prompt"] == text
    for path, body, expected in (("/tokenize", {"prompt": "x", "messages": conv}, "one of them"),
                                 ("/tokenize", {"prompt": "x", "add_generation_prompt": True}, "goes with messages"),
                                 ("/tokenize", {"prompt": "x", "extra": 1}, "extra: not a parameter of /tokenize"),
                                 ("/detokenize", {"tokens": [32000]}, "tokens: expected a list of token ids"),
                                 ("/detokenize", {"tokens": "1 2"}, "tokens: expected a list")):
        status, r, _ = server.post(path, body)
        assert status == 400 and expected in r["error"]["message"], (path, body, r)
    status, r, _ = server.post("/tokenize", {"prompt": "x"}, key="wrong")
    assert status == 401


def metric(text: str, name: str) -> float:
    return sum(float(ln.split()[-1]) for ln in text.splitlines() if ln.startswith(name + " ") or
               ln.startswith(name + "{"))


def test_n_choices_share_one_prefill(server):
    """n: 3 at temperature 0 gives three greedy choices; with a seed, choice i is the n = 1 reply with seed + i; the
    prompt is fed once (the other choices copy it: prefix-cache hits of the whole prompt but its last token each);
    streamed, every choice ends; the usage counts the prompt once; n outside [1, 16] is a 400."""
    c = server.client()
    prompt = "[INST] Tell me about the sea. [/INST]" + " waves" * 37
    single = c.completions.create(model="tiny", prompt=prompt + " more", max_tokens=6, temperature=0)
    hits0 = metric(server.get("/metrics")[1], "mistral_trt_prefix_cache_hits_total")
    three = c.completions.create(model="tiny", prompt=prompt + " and more", max_tokens=6, temperature=0, n=3)
    hits = metric(server.get("/metrics")[1], "mistral_trt_prefix_cache_hits_total") - hits0
    again = c.completions.create(model="tiny", prompt=prompt + " and more", max_tokens=6, temperature=0)
    p = three.usage.prompt_tokens
    assert [ch.index for ch in three.choices] == [0, 1, 2]
    assert all(ch.text == again.choices[0].text for ch in three.choices)
    assert three.usage.completion_tokens == 3 * again.usage.completion_tokens and p == again.usage.prompt_tokens
    assert hits >= 2 * (p - 1), (hits, p)  # choices 1 and 2 fed only the last prompt token
    assert single.choices[0].text == c.completions.create(model="tiny", prompt=prompt + " more", max_tokens=6,
                                                          temperature=0, n=2).choices[1].text
    sampled = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=1.0, seed=40, n=3)
    for i, ch in enumerate(sampled.choices):
        alone = c.completions.create(model="tiny", prompt=prompt, max_tokens=6, temperature=1.0, seed=40 + i)
        assert ch.text == alone.choices[0].text, i
    assert len({ch.text for ch in sampled.choices}) > 1  # distinct seeds, distinct draws (else this proves little)
    chunks = list(c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True}))
    ends = [ch.choices[0].index for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    texts = ["".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices and ch.choices[0].index == i)
             for i in (0, 1)]
    whole = c.chat.completions.create(model="tiny", messages=QUESTION, max_tokens=5, temperature=0)
    assert sorted(ends) == [0, 1] and texts[0] == texts[1] == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 2 * whole.usage.completion_tokens
    for n in (0, 17):
        with pytest.raises(openai.BadRequestError, match=r"n: expected an integer in \[1, 16\]"):
            c.completions.create(model="tiny", prompt="Hi", max_tokens=2, n=n)


def test_completions_logprobs_against_hf_and_echo(server, ref, tiny_full):
    """/v1/completions' logprobs in the legacy shape: each chosen token's logprob and its top alternatives equal
    log-softmax of HF transformers' logits for the same ids (to 1e-4); text_offset walks the text; echo puts the
    prompt before the text; echo with logprobs is refused (the prompt's logprobs are not computed)."""
    import torch
    from transformers import AutoModelForCausalLM

    c = server.client()
    prompt = ref.encode_chat_completion(ChatCompletionRequest(messages=QUESTION)).tokens
    r = c.completions.create(model="tiny", prompt=prompt, max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    # each token as its own text (a sentencepiece word with its space; the reply's text starts without it)
    assert "".join(lp.tokens).lstrip(" ") == r.choices[0].text and len(lp.tokens) == len(lp.token_logprobs)
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:j]) for j in range(len(lp.tokens))]
    model = AutoModelForCausalLM.from_pretrained(tiny_full, torch_dtype=torch.float32).eval()
    ids = list(prompt)
    for j in range(len(lp.tokens)):
        with torch.no_grad():
            want = torch.log_softmax(model(torch.tensor([ids])).logits[0, -1].double(), -1)
        best = int(want.argmax())
        assert lp.token_logprobs[j] == pytest.approx(float(want[best]), abs=1e-4)
        assert len(lp.top_logprobs[j]) == 3 and max(lp.top_logprobs[j].values()) == pytest.approx(lp.token_logprobs[j])
        piece = ref.instruct_tokenizer.tokenizer.id_to_piece(best)  # mistral-common's piece for HF's argmax
        raw = bytes([int(piece[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-F]{2}>", piece) else piece.replace("\u2581", " ").encode()
        assert lp.tokens[j] == raw.decode("utf-8", errors="replace"), (j, lp.tokens[j], piece)
        ids.append(best)
    e = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0, echo=True)
    plain = c.completions.create(model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0)
    assert e.choices[0].text == "Once upon a time" + plain.choices[0].text
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt="Once upon a time", max_tokens=3, temperature=0, echo=True, stream=True) if ch.choices)
    assert streamed == e.choices[0].text
    for kw, words in (({"echo": True, "logprobs": 1}, "echo with logprobs"), ({"logprobs": 6}, "[0, 5]")):
        with pytest.raises(openai.BadRequestError, match=re.escape(words)):
            c.completions.create(model="tiny", prompt="Hi", max_tokens=2, **kw)
