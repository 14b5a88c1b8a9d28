"""Generation: greedy equals HF transformers' generate token for token; incremental decoding equals one
full prefill (mistral-inference's test); sliding-window cache stays bounded; sampling behaves."""
from __future__ import annotations

import json
import resource
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import MistralForCausalLM

from conftest import cli, run_without_torch, score
from mistral_trt.main import main
from mistral_trt.runtime import UserError
from mistral_trt.runtime.backend import open_backend
from mistral_trt.runtime.generate import Generator
from mistral_trt.runtime.manifest import Manifest
from mistral_trt.runtime.sampling import Sampling, sample
from mistral_trt.runtime.tokenizer import Tokenizer


def ours(folder, prompts, n, **kw):
    """Greedy tokens [B, n] through the engine the folder's manifest names (portable or fused graph)."""
    gen = Generator(open_backend(folder), **kw)
    steps = list(gen.generate(prompts, n, Sampling(), stop_on_eos=False))
    return np.stack(steps, 1)  # [B, n]


def hf_greedy(ckpt, prompt, n):
    model = MistralForCausalLM.from_pretrained(ckpt, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_window_greedy_equals_hf_generate(tiny_exports, tiny_window):
    """W = 8, prompt 13 tokens (> W, prefilled in chunks), 48 new tokens: past 7x the window."""
    prompt = np.random.default_rng(0).integers(3, 32000, 13).tolist()
    got = ours(tiny_exports["window", "fp32"], [prompt], 48)[0].tolist()
    assert got == hf_greedy(tiny_window, prompt, 48)


@pytest.mark.parametrize("folder", ["window", "full", "fused-window"])
def test_incremental_equals_full_prefill(tiny_exports, tiny_fused, folder):
    """mistral-inference's test: a chunked prefill then decode steps give the logits of one full prefill."""
    backend = open_backend(tiny_fused["window"] if folder == "fused-window" else tiny_exports[folder, "fp32"])
    gen = Generator(backend, prefill_chunk=5)
    prompt = np.random.default_rng(1).integers(3, 32000, 17)
    cache = gen.new_cache(1, len(prompt) + 24)
    slot = cache.admit()
    seq, steps = list(prompt), [gen.prefill(cache, [slot], [prompt])[0]]
    for _ in range(24):
        t = int(np.argmax(steps[-1]))
        seq.append(t)
        steps.append(gen.decode_one_token(cache, [slot], [t])[0])
    full = score(backend, seq)  # one step over the whole sequence, nothing cached, no window trim
    np.testing.assert_allclose(np.stack(steps), full[len(prompt) - 1:], atol=1e-4)


def test_batch_left_padding_equals_alone(tiny_exports):
    folder = tiny_exports["window", "fp32"]
    rng = np.random.default_rng(2)
    prompts = [rng.integers(3, 32000, n) for n in (11, 4, 7)]
    batched = ours(folder, prompts, 20)
    for i, p in enumerate(prompts):
        assert batched[i].tolist() == ours(folder, [p], 20)[0].tolist()


def test_cache_stays_bounded_past_the_window(tiny_exports):
    gen = Generator(open_backend(tiny_exports["window", "fp16"]))
    cache = gen.new_cache(1, 10_000)
    slot = cache.admit()
    assert cache.capacity == 7 + 8  # the window's 7 positions plus one chunk (chunk = W = 8), whatever the length
    logits = gen.prefill(cache, [slot], [np.arange(3, 40)])
    rss = []
    for i in range(900):
        logits = gen.decode_one_token(cache, [slot], [int(np.argmax(logits[0]))])
        assert cache.columns == 7 and cache.mask.shape == (1, 7)  # W - 1 = 7 positions, always
        if i in (300, 899):
            rss.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    assert cache.next_pos[0] == 37 + 900  # positions stay absolute
    assert rss[1] - rss[0] < 20 * 1024, f"peak RSS grew by {(rss[1] - rss[0]) / 1024:.1f} MiB"


def test_context_limit(tiny_exports):
    gen = Generator(open_backend(tiny_exports["full", "fp32"]))  # max_context 1024
    with pytest.raises(UserError, match="context limit 1024"):
        next(gen.generate([np.arange(3, 1003)], 30))
    steps = list(gen.generate([np.arange(3, 1003)], 30, truncate=True))
    assert len(steps) == 30
    (prompt,) = gen.fit_context([np.arange(3, 1003)], 30, truncate=True)
    assert prompt.tolist() == list(range(9, 1003))  # the last 994 tokens: 1024 - 30
    with pytest.raises(UserError, match="do not fit the context limit at all: shorten the prompt"):
        gen.fit_context([np.arange(3, 2103)], 30, truncate=True)  # over twice the limit: no max_new_tokens helps


def test_sampling_rules():
    rng = np.random.default_rng(0)
    logits = np.array([[1.0, 3.0, 2.0, -1.0]])
    assert sample(logits, Sampling(temperature=1.0, top_k=1), rng, [[]])[0] == 1
    assert sample(logits, Sampling(temperature=1.0, top_p=0.01), rng, [[]])[0] == 1
    # repetition penalty 2: the seen positive logit 3.0 -> 1.5, below 2.0; a seen negative gets more negative
    assert sample(logits, Sampling(repetition_penalty=2.0), rng, [[1]])[0] == 2
    draws = [sample(logits, Sampling(temperature=1.0, top_k=2), rng, [[]])[0] for _ in range(400)]
    assert set(draws) == {1, 2} and 0.6 < np.mean(np.array(draws) == 1) < 0.85  # softmax([3, 2]) = 0.73 / 0.27


def test_nucleus_and_draw_equal_the_full_sort_and_rng_choice():
    """top-p's set from the top m only (nucleus) equals the one a full descending sort gives, on peaked and flat
    distributions of the demo's vocabulary size (flat ones need every token: m grows past V); top-k's partition
    keeps the sort's k; draw() picks rng.choice's token for the same generator state."""
    from mistral_trt.runtime.sampling import draw, nucleus, probabilities

    def by_full_sort(p, top_p):  # the definition: the smallest prefix of the descending order reaching top_p
        order = np.argsort(-p, kind="stable")
        sp = p[order]
        return np.sort(order[np.cumsum(sp) - sp < top_p])

    rng = np.random.default_rng(0)
    for scale in (0.01, 0.5, 3.0, 12.0):
        for top_p in (0.05, 0.5, 0.9, 0.999):
            x = rng.standard_normal(49152) * scale
            p = np.exp(x - x.max())
            p /= p.sum()
            assert (np.sort(nucleus(p, top_p)) == by_full_sort(p, top_p)).all()
    logits = rng.standard_normal((3, 1000)) * 2
    for k in (1, 7, 1000, 5000):
        kept = probabilities(logits, Sampling(temperature=1.0, top_k=k)) > 0
        assert (kept.sum(-1) == min(k, 1000)).all()
        assert (kept == (logits >= np.sort(logits, -1)[:, [-min(k, 1000)]])).all()
    p = probabilities(logits[:1], Sampling(temperature=0.8, top_p=0.9))[0]
    for seed in range(200):
        assert draw(p, np.random.default_rng(seed)) == np.random.default_rng(seed).choice(len(p), p=p)


def test_seed_gives_same_tokens(tiny_exports):
    gen = Generator(open_backend(tiny_exports["full", "fp32"]))
    run = lambda seed: np.stack(list(gen.generate([np.arange(3, 9)], 16, Sampling(temperature=1.5, seed=seed))))  # noqa: E731
    assert (run(7) == run(7)).all()
    assert not (run(7) == run(8)).all()


def test_generate_cli_json_and_stop(tiny_exports, capsys):
    folder = str(tiny_exports["full", "fp32"])
    assert main(["generate", folder, "--prompt", "Hello", "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["ids"]) == 12 and out["stats"]["prompt_tokens"] > 5 and out["stats"]["new_tokens"] == 12
    tok = Tokenizer.load(folder)
    assert out["text"] == tok.decode(out["ids"])
    # a stop string: the text of the 7th token onwards (decoded alone, so it is surely in the text)
    k = next(k for k in range(6, 12) if tok.decode(out["ids"][:k]).strip() and tok.decode(out["ids"][k:k + 2]).strip())
    head, stop = tok.decode(out["ids"][:k]), tok.decode(out["ids"][:k + 2])[len(tok.decode(out["ids"][:k])):]
    assert stop in out["text"]
    assert main(["generate", folder, "--prompt", "Hello", "--max-new-tokens", "12", "--json", "--stop", stop]) == 0
    got = json.loads(capsys.readouterr().out)["text"]
    assert got == out["text"][:out["text"].index(stop)] and len(got) <= len(head)


def test_generate_without_torch(tiny_exports):
    r = run_without_torch(f"""
        from mistral_trt.main import main
        sys.exit(main(["generate", {str(tiny_exports["window", "fp16"])!r}, "--prompt", "Hi", "--max-new-tokens", "40", "--json"]))
    """)
    assert r.returncode == 0, r.stderr
    assert len(json.loads(r.stdout)["ids"]) == 40


def test_chat_cli_keeps_history(tiny_exports):
    """Interactive chat over stdin: two turns, the second prompt carries the first exchange."""
    r = subprocess.run([sys.executable, "-m", "mistral_trt.main", "chat", str(tiny_exports["full", "fp32"]),
                        "--max-new-tokens", "5", "--system", "Be brief."],
                       input="Hello\nAnd again\n", capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.count("> ") == 3  # two prompts answered, then EOF at the third


def test_prompt_over_context_cli(tiny_exports, capsys):
    folder = str(tiny_exports["full", "fp32"])
    long = "word " * 1100  # > 1024 tokens
    assert main(["generate", folder, "--raw", "--prompt", long, "--max-new-tokens", "4", "--json"]) == 2
    assert "context limit 1024" in capsys.readouterr().err
    assert main(["generate", folder, "--raw", "--prompt", long, "--max-new-tokens", "4", "--json", "--truncate"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["prompt_tokens"] == 1020


def test_generate_from_a_conversation_or_ids(tiny_exports, tmp_path, capsys):
    """--messages: a reply to the conversation, or the continuation of a final "prefix": true assistant message;
    a finished last reply has nothing to answer (one line, exit 2). --ids: the same tokens as the text they are."""
    folder = str(tiny_exports["full", "fp32"])
    conv = [{"role": "user", "content": "Hello"}]
    (tmp_path / "u.json").write_text(json.dumps(conv))
    assert main(["generate", folder, "--messages", str(tmp_path / "u.json"), "--max-new-tokens", "6", "--json"]) == 0
    by_messages = json.loads(capsys.readouterr().out)
    assert main(["generate", folder, "--prompt", "Hello", "--max-new-tokens", "6", "--json"]) == 0
    by_prompt = json.loads(capsys.readouterr().out)
    assert by_messages["prompt_ids"] == by_prompt["prompt_ids"] and by_messages["ids"] == by_prompt["ids"]
    ids = ",".join(map(str, by_prompt["prompt_ids"]))
    assert main(["generate", folder, "--ids", ids, "--max-new-tokens", "6", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ids"] == by_prompt["ids"]
    cont = conv + [{"role": "assistant", "content": "Hi there", "prefix": True}]
    (tmp_path / "p.json").write_text(json.dumps(cont))
    assert main(["generate", folder, "--messages", str(tmp_path / "p.json"), "--max-new-tokens", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    tok = Tokenizer.load(folder)
    assert out["prompt_ids"] == by_prompt["prompt_ids"] + tok.encode("Hi there").tolist()  # no EOS: continued
    (tmp_path / "f.json").write_text(json.dumps(conv + [{"role": "assistant", "content": "Hi there"}]))
    assert main(["generate", folder, "--messages", str(tmp_path / "f.json")]) == 2
    err = capsys.readouterr().err
    assert "ends with a finished assistant message" in err and err.count("\n") == 1


def test_chat_goes_on_with_a_conversation(tiny_exports, tmp_path):
    conv = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": "Hi", "prefix": True}]
    (tmp_path / "c.json").write_text(json.dumps(conv))
    r = subprocess.run([sys.executable, "-m", "mistral_trt.main", "chat", str(tiny_exports["full", "fp32"]), "--messages",
                        str(tmp_path / "c.json"), "--max-new-tokens", "3"], input="And again\n", capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("Hi") and r.stdout.count("> ") == 2  # the continued reply, one more turn, then EOF


@pytest.mark.slow
def test_stop_strings_print_what_json_returns(tiny_exports, capsys):
    """`--stop` on stdout prints exactly the text `--json` returns: the start of a stop string that spans tokens is
    held back, never printed, and the text before a stop string inside one token's piece is printed."""
    folder = tiny_exports["full", "fp32"]
    base = ["generate", folder, "--prompt", "Tell me a long story about the sea.", "--max-new-tokens", 48]
    rc, out, _ = cli(capsys, *base, "--json")
    full = json.loads(out)
    text, ids = full["text"], full["ids"]
    tok = Tokenizer.load(folder)
    ends = {len(tok.decode(ids[:k])) for k in range(1, len(ids) + 1)}  # where each token's piece ends
    assert len(text) > 40
    spans = inside = 0
    for start in range(1, len(text) - 3, 3):
        stop = text[start:start + 3]
        i = text.index(stop)
        rc, printed, _ = cli(capsys, *base, "--stop", stop)
        rc2, js, _ = cli(capsys, *base, "--stop", stop, "--json")
        assert rc == rc2 == 0 and printed == text[:i] + "\n" and json.loads(js)["text"] == text[:i], stop
        spans += any(i < e < i + 3 for e in ends)
        inside += i not in ends and not any(i < e < i + 3 for e in ends)
        if spans >= 2 and inside >= 2:
            break
    assert spans >= 2 and inside >= 2  # both ways a stop string meets the pieces were tried


@pytest.mark.slow
def test_stop_cases_stream_what_json_returns(demo_fused, capsys):
    """tests/stop_cases.py's cases through `generate`: a stop spanning tokens, inside one piece, several stops, at
    EOS, and with speculation. stdout (streamed) and --json return the reference reply cut before the earliest stop."""
    from stop_cases import GROUNDED, stop_cases

    base = ["generate", demo_fused, "--prompt", GROUNDED, "--max-new-tokens", 80]
    rc, out, _ = cli(capsys, *base, "--speculate", "off", "--json")
    ref = json.loads(out)
    tok = Tokenizer.for_export(demo_fused, Manifest.load(demo_fused))
    cases = stop_cases(ref["text"], ref["ids"], tok, ended_by_eos=len(ref["ids"]) < 80)
    assert rc == 0 and {c.name for c in cases} >= {"spans tokens", "inside a piece", "several stops", "at EOS",
                                                   "with speculation"}
    for c in cases:
        args = [*base, "--speculate", "ngram" if c.speculate else "off", *[x for s in c.stops for x in ("--stop", s)]]
        rc, printed, _ = cli(capsys, *args)
        rc2, js, _ = cli(capsys, *args, "--json")
        got = json.loads(js)
        assert rc == rc2 == 0 and printed == c.want + "\n" and got["text"] == c.want, c
        if c.speculate:
            assert got["stats"]["speculation"]["accepted"] > 0, got["stats"]  # steps of several tokens happened
