"""Speculative decoding with prompt-lookup drafts (runtime/speculative.py): greedy output identical to plain
decoding token for token, and with sampling the same distribution (the standard acceptance rule)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import cli
from mistral_trt.runtime import UserError
from mistral_trt.runtime.backend import open_backend
from mistral_trt.runtime.generate import Generator
from mistral_trt.runtime.sampling import Sampling
from mistral_trt.runtime.request import Request
from mistral_trt.runtime.speculative import NgramIndex, Speculation, accept


def test_ngram_index_proposes_what_followed_the_longest_tail():
    ix = NgramIndex([5, 6, 7, 8, 5, 6])
    assert ix.draft(3) == [7, 8, 5]
    ix.append(9)  # "5 6 9": no earlier "6 9" or "5 6 9"; "9" nowhere before
    assert ix.draft(3) == []
    ix = NgramIndex([1, 2, 3, 9, 2, 3, 4, 2, 3])  # "2 3" twice before: the latest wins
    assert ix.draft(2) == [4, 2]
    assert NgramIndex([1, 2, 1]).draft(4) == [2, 1]  # stops at the end of the sequence
    # how many: 2n + 1 after a match of n tokens, at most k
    ix = NgramIndex(list(range(10, 30)) + [10])  # "10": a 1-token match, 3 drafts
    assert ix.draft(16) == [11, 12, 13]
    ix.append(11)  # "10 11": 5
    assert ix.draft(16) == [12, 13, 14, 15, 16]
    ix.append(12)  # "10 11 12": 7, or k
    assert ix.draft(16) == list(range(13, 20)) and ix.draft(4) == [13, 14, 15, 16]
    assert Speculation.parse("ngram") == Speculation(k=7) and Speculation.parse("ngram:4").k == 4
    for bad in ("ngram:0", "ngram:17", "eagle", "ngram:x"):
        with pytest.raises(UserError, match="expected ngram or ngram:K"):
            Speculation.parse(bad)


def window_prompts(folder, n: int = 3) -> list[list[int]]:
    """Prompts whose last 16 tokens occurred earlier, followed by the model's own greedy continuation of them: with a
    window of 8 and 2 layers a token sees 2 x 7 positions back, so the model sees the same context again and the
    drafts come true even on random weights."""
    gen = Generator(open_backend(folder))
    rng = np.random.default_rng(4)
    out = []
    for i in range(n):
        x = rng.integers(3, 32000, 16).tolist()
        cont = np.stack(list(gen.generate([x], 40, Sampling(), stop_on_eos=False)), 1)[0].tolist()
        out.append(rng.integers(3, 32000, 3 * i).tolist() + x + cont + x)
    return out


def speculative(gen, prompts, n: int, spec: Speculation, sampling: Sampling | None = None):
    """Generator.run with speculation, ids only: (rows of new ids, model steps, each row's final Stats)."""
    reqs = [Request(np.asarray(p, np.int64), n, sampling or Sampling(), stop_on_eos=False) for p in prompts]
    rows, steps, stats = [[] for _ in prompts], 0, [None] * len(prompts)
    for updates in gen.run(reqs, speculation=spec):
        steps += 1
        for b, u in enumerate(updates):
            if u is not None:
                rows[b] += u.tokens
                if u.output is not None and u.output.finish_reason:
                    stats[b] = u.output.stats
    return rows, steps, stats


def plain_and_speculative(folder, prompts, n: int, k: int = 4):
    gen = Generator(open_backend(folder))
    plain = np.stack(list(gen.generate(prompts, n, Sampling(), stop_on_eos=False)), 1).tolist()
    rows, steps, stats = speculative(gen, prompts, n, Speculation(k=k))
    assert rows == [[t for step in gen.generate_speculative(prompts, n, Speculation(k=k), stop_on_eos=False)
                     for t in step[b]] for b in range(len(prompts))]  # the ids-only wrapper says the same
    return plain, rows, steps, stats


@pytest.mark.parametrize("name", ["window", "full"])
def test_greedy_speculative_equals_plain_decoding(tiny_fused, name):
    """Batch 3 (different lengths, joining the same cache), 160 tokens each, with and without a window: the same
    tokens as plain greedy decoding. With the window the drafts come true (window_prompts) and steps are saved."""
    folder = tiny_fused[name]
    prompts = window_prompts(folder) if name == "window" else [
        np.random.default_rng(i).integers(3, 32000, 12 + 9 * i).tolist() * 2 for i in range(3)]
    plain, spec, steps, stats = plain_and_speculative(folder, prompts, 160)
    assert spec == plain
    assert sum(st.drafted for st in stats) > 20
    if name == "window":
        assert sum(st.accepted for st in stats) > 60 and steps < 140


def test_speculative_text_equals_plain_text(tiny_fused):
    """Through Sequence's text path (a tokenizer, held-back stops): a step that keeps several drafted tokens sends all
    of their text. The streamed outputs of speculative decoding join to plain decoding's text, stop included."""
    from mistral_trt.runtime.manifest import Manifest
    from mistral_trt.runtime.tokenizer import Tokenizer

    folder = tiny_fused["window"]
    gen = Generator(open_backend(folder))
    tok = Tokenizer.for_export(folder, Manifest.load(folder))
    prompt = np.asarray(window_prompts(folder, 1)[0], np.int64)

    def text(spec, stop=()):
        req = Request(prompt, 40, Sampling(), stop=list(stop), stop_on_eos=False)
        outs = [u.output for (u,) in gen.run([req], tok, spec) if u is not None and u.output is not None]
        return "".join(o.text for o in outs), outs[-1].stats

    plain, _ = text(None)
    spec, st = text(Speculation(k=4))
    assert spec == plain and st.accepted > 10, (st.drafted, st.accepted)
    stop = plain[len(plain) // 2:len(plain) // 2 + 3]
    assert text(Speculation(k=4), [stop])[0] == text(None, [stop])[0] == plain[:plain.index(stop)]


@pytest.mark.slow
def test_demo_greedy_speculative_equals_plain_and_saves_steps(demo_fused):
    """A grounded prompt (rewrite a given passage) on the demo model: identical greedy text, most drafts accepted."""
    import inspect

    from mistral_trt.runtime.chat import format_chat
    from mistral_trt.runtime.manifest import Manifest
    from mistral_trt.runtime.tokenizer import Tokenizer

    m = Manifest.load(demo_fused)
    tok = Tokenizer.for_export(demo_fused, m)
    doc = (inspect.getdoc(json) or "")[:700]
    prompt = format_chat(tok, [{"role": "user", "content": f"Rewrite the following text, fixing any typos:\n\n{doc}"}],
                         m.chat_format, m.chat_template)
    plain, spec, steps, (st,) = plain_and_speculative(demo_fused, [prompt], 160)
    assert spec == plain
    assert st.accepted > 0.5 * st.drafted and steps < 100


@pytest.mark.slow
def test_sampled_speculative_keeps_the_distribution(tiny_fused):
    """temperature 1, top-k 4, three tokens, 700 draws each way: the speculative joint distribution of (t1, t2, t3)
    matches plain sampling's (a chi-square test on the pooled counts), and both acceptance and rejection of drafts
    happened (drafts come from window_prompts, the model keeps or refuses them by chance)."""
    folder = tiny_fused["window"]
    prompt = window_prompts(folder, 1)[0]
    gen = Generator(open_backend(folder))
    s = Sampling(temperature=1.0, top_k=4, seed=None)
    draws = 700

    def joint(speculate: bool, seed: int) -> tuple[dict, int, int]:
        counts, drafted, accepted = {}, 0, 0
        for i in range(draws):
            smp = Sampling(temperature=s.temperature, top_k=s.top_k, seed=seed + i)
            if speculate:
                (row,), _, (st,) = speculative(gen, [prompt], 3, Speculation(k=3), smp)
                drafted, accepted = drafted + st.drafted, accepted + st.accepted
            else:
                row = [int(t[0]) for t in gen.generate([prompt], 3, smp, stop_on_eos=False)]
            counts[tuple(row)] = counts.get(tuple(row), 0) + 1
        return counts, drafted, accepted

    a, _, _ = joint(False, 0)
    b, drafted, accepted = joint(True, 10**6)
    assert 0 < accepted < drafted  # drafts were kept and refused
    keys = [k for k in set(a) | set(b) if a.get(k, 0) + b.get(k, 0) >= 10]  # pool rare outcomes
    rest = [k for k in set(a) | set(b) if k not in keys]
    obs = np.array([[a.get(k, 0) for k in keys] + [sum(a.get(k, 0) for k in rest)],
                    [b.get(k, 0) for k in keys] + [sum(b.get(k, 0) for k in rest)]], float)
    obs = obs[:, obs.sum(0) > 0]
    expected = obs.sum(1, keepdims=True) * obs.sum(0, keepdims=True) / obs.sum()
    chi2, dof = float(((obs - expected) ** 2 / expected).sum()), obs.shape[1] - 1
    # the 0.999 quantile of chi-square(dof) is below dof + 4.5 sqrt(2 dof) + 10 for every dof >= 1
    assert dof >= 3 and chi2 < dof + 4.5 * np.sqrt(2 * dof) + 10, (chi2, dof)


def test_accept_rule():
    """Greedy keeps drafts while they are the argmax, then adds the model's own token; sampling with a point-mass
    draft rejects a token of probability 0 and then never returns it."""
    v = 6
    logits = np.full((3, v), -5.0, np.float32)
    logits[0, 2], logits[1, 4], logits[2, 1] = 5, 5, 5
    assert accept(logits, [2, 4], Sampling(), np.random.default_rng(0), [0], []) == [2, 4, 1]
    assert accept(logits, [2, 3], Sampling(), np.random.default_rng(0), [0], []) == [2, 4]
    s = Sampling(temperature=1.0, top_k=2)
    rng = np.random.default_rng(0)
    outs = [accept(logits, [5, 4], s, rng, [0], []) for _ in range(200)]  # 5 is outside the top 2 at column 0
    assert all(len(o) == 1 and o[0] != 5 for o in outs)


def test_speculate_needs_the_fused_graph_and_cli(tiny_exports, tiny_fused, capsys):
    with pytest.raises(UserError, match="needs the fused graph"):
        list(Generator(open_backend(tiny_exports["full", "fp32"])).generate_speculative([[1, 2, 3]], 4, Speculation()))
    rc, out, _ = cli(capsys, "generate", tiny_fused["window"], "--prompt", "Hi there, hi there, hi there",
                     "--max-new-tokens", 24, "--speculate", "ngram:3", "--json")
    got = json.loads(out)
    rc2, out2, _ = cli(capsys, "generate", tiny_fused["window"], "--prompt", "Hi there, hi there, hi there",
                       "--max-new-tokens", 24, "--json")
    assert rc == rc2 == 0 and got["ids"] == json.loads(out2)["ids"] and "speculation" in got["stats"]
    rc, _, err = cli(capsys, "generate", tiny_fused["window"], "--prompt", "x", "--speculate", "ngram:99")
    assert rc == 2 and "--speculate: expected auto, off, ngram or ngram:K" in err


def test_draft_lengths_follow_the_exports_step_costs(tiny_fused, tmp_path):
    """Float weights draft 3 / 5 / 7 tokens after a match of 1 / 2 / 3; MatMulNBits exports, whose several-token steps
    cost more, 0 / 2 / 6 (draft_lengths). A prompt whose tail repeats what came before (3-token matches that come
    true, window_prompts) gets steps of 8 tokens on the fp32 export, of at most 7 on its int8 quantization."""
    from mistral_trt.calib.quantize import quantize
    from mistral_trt.runtime.speculative import FLOAT_LENGTHS, NBITS_LENGTHS, draft_lengths

    ix = NgramIndex(list(range(10, 30)) + [10])
    assert ix.draft(16, NBITS_LENGTHS) == [] and ix.draft(16) == [11, 12, 13]  # a 1-token match: none on nbits
    ix.append(11)
    assert ix.draft(16, NBITS_LENGTHS) == [12, 13]
    ix.append(12)
    assert ix.draft(16, NBITS_LENGTHS) == list(range(13, 19)) and ix.draft(4, NBITS_LENGTHS) == [13, 14, 15, 16]
    quantize(tiny_fused["window"], "int8-w8a8-dynamic", tmp_path / "q8")
    widest = {}
    for name, folder in (("fp32", tiny_fused["window"]), ("int8", tmp_path / "q8")):
        gen = Generator(open_backend(folder))
        assert draft_lengths(gen.backend.manifest) == (FLOAT_LENGTHS if name == "fp32" else NBITS_LENGTHS)
        steps = gen.generate_speculative(window_prompts(tiny_fused["window"], 1), 40, Speculation(), stop_on_eos=False)
        widest[name] = max(len(step[0]) for step in steps)
    assert widest == {"fp32": 8, "int8": 7}


def test_generate_speculates_by_default_only_where_lossless_and_measured(tiny_exports, tiny_fused, tmp_path, capsys):
    """--speculate auto (the default): prompt lookup on a fused fp32 export on the CPU provider, with the same
    tokens as --speculate off; plain decoding on the portable graph (no per-row rollback), on MatMulNBits exports
    (not token-identical), and on a windowed model whose request would need a larger cache than plain decoding's."""
    from mistral_trt.calib.quantize import quantize
    from mistral_trt.runtime.speculative import auto_speculation

    ids = ",".join(map(str, window_prompts(tiny_fused["full"], 1)[0]))  # its last 16 tokens occurred before: drafts
    args = ("--ids", ids, "--max-new-tokens", 24, "--json")
    rc, out, _ = cli(capsys, "generate", tiny_fused["full"], *args)
    rc2, out2, _ = cli(capsys, "generate", tiny_fused["full"], *args, "--speculate", "off")
    on, off = json.loads(out), json.loads(out2)
    assert rc == rc2 == 0 and on["ids"] == off["ids"] and len(on["ids"]) == 24
    assert on["stats"]["speculation"]["k"] == 7 and on["stats"]["speculation"]["drafted"] > 0
    assert "speculation" not in off["stats"]
    rc, out, err = cli(capsys, "generate", tiny_fused["full"], *args[:-1])  # the summary line says what it kept
    assert rc == 0 and "drafted tokens kept" in err
    rc, out, _ = cli(capsys, "generate", tiny_exports["full", "fp32"], *args)  # portable: plain, no error
    assert rc == 0 and "speculation" not in json.loads(out)["stats"]

    full = Generator(open_backend(tiny_fused["full"]))
    assert auto_speculation(full, 20, 128) == Speculation()
    quantize(tiny_fused["full"], "int8-w8a8-dynamic", tmp_path / "q8")
    assert auto_speculation(Generator(open_backend(tmp_path / "q8")), 20, 128) is None
    assert auto_speculation(Generator(open_backend(tiny_exports["full", "fp32"])), 20, 128) is None
    window = Generator(open_backend(tiny_fused["window"]))  # window 8: plain decoding's cache holds window + chunk
    fits = window.keep + window.chunk - Speculation().k
    assert auto_speculation(window, fits - 4, 4) == Speculation() and auto_speculation(window, fits - 4, 5) is None


def test_ceiling_pays_only_for_the_drafts_the_model_keeps():
    """bench-speculate's ceiling: a reply replayed with the n-gram index's drafts (up to k), each step charged for
    the last token and the kept drafts only."""
    from mistral_trt.bench.speculative import ceiling

    cost = {w: 1.0 + 0.1 * (w - 1) for w in range(1, 9)}
    # after 1, the prompt's "2 3 4 5 6" comes true: one step of 6 tokens (1.5) for 6 plain steps (6.0)
    assert ceiling([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 9], 7, cost) == pytest.approx(4.0)
    # k = 2: two steps of 3 (2 x 1.2), the second drafting after the 3-token match "1 2 3"
    assert ceiling([1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 9], 2, cost) == pytest.approx(6.0 / 2.4)
    # drafts that never come true cost nothing here: plain decoding's time exactly
    assert ceiling([1, 2, 3], [1, 7, 8, 9], 7, cost) == pytest.approx(1.0)


def test_bench_speculate_end_to_end(tiny_fused, tmp_path, capsys):
    out = tmp_path / "bs"
    rc, stdout, _ = cli(capsys, "bench-speculate", tiny_fused["full"], "--max-new-tokens", 6, "-o", out)
    assert rc == 0 and "| grounded | 20 |" in stdout and "| open chat | 10 |" in stdout
    assert "| open chat, sampled | 10 |" in stdout and "| open chat after a document | 10 |" in stdout
    name = tiny_fused["full"].name  # a system is named by its folder
    data = json.loads((out / "bench-speculate.json").read_text())["systems"][name]
    assert data["grounded"]["identical"] and data["open chat"]["identical"]
    assert data["open chat after a document"]["identical"] and data["open chat, sampled"]["identical"] is None
    # the document as long as the tiny model's context (1024) leaves room for, not the demo's ~1,500 tokens
    assert all(600 < r["prompt_tokens"] <= 1024 - 6 - 7 for r in data["open chat after a document"]["rows"])
    assert all(r["plain_tok_s"] > 0 and r["speculative_tok_s"] > 0 for r in data["grounded"]["rows"])
    # the ceiling for the greedy workloads (never below plain decoding: unkept drafts are not charged), none sampled
    assert all(data[k]["ceiling"] >= 1.0 for k in ("grounded", "open chat", "open chat after a document"))
    assert data["open chat, sampled"]["ceiling"] is None and "| ceiling of these drafts |" in stdout
    assert (out / "bench-speculate.png").read_bytes()[:4] == b"\x89PNG"
    from mistral_trt.bench.speculative import TARGETS

    for kind, (want, label) in TARGETS.items():  # the targets' table: each measured median against its target
        got = data[kind]["median_speedup"]
        assert f"| {kind} {label} | {name} | {got:.2f}x | {'yes' if got >= want else 'no'} |" in stdout
    rc, _, err = cli(capsys, "bench-speculate", tmp_path / "none", "-o", tmp_path / "x")
    assert rc == 2
