"""The prefix cache (runtime/cache.py InPlaceCache.admit_prefix, serve's scheduler): a slot keeps the ids it holds
after its request, and a later prompt that starts the same way is fed only from where it differs. Greedy replies
are those of the runtime's own Generator on the whole prompt (a fresh cache), token for token."""
from __future__ import annotations

import contextlib
import json
import threading

import numpy as np
import pytest

from mistral_trt.runtime.backend import open_backend
from mistral_trt.runtime.generate import Generator
from mistral_trt.runtime.request import Request
from mistral_trt.runtime.sampling import Sampling
from mistral_trt.runtime.tokenizer import Tokenizer
from mistral_trt.serve.scheduler import Scheduler


def alone(backend, prompt, n):
    gen = Generator(backend)
    out = []
    for t in gen.generate([prompt], n, Sampling(), stop_on_eos=False):
        out.append(int(t[0]))
    return out


@contextlib.contextmanager
def started(*args, **kwargs):
    """A running Scheduler, stopped at the end."""
    sched = Scheduler(*args, **kwargs)
    sched.start()
    try:
        yield sched
    finally:
        sched.stop()


def run(sched: Scheduler, prompt, n: int):
    """(generated ids, cached prompt tokens) of one greedy request through the scheduler."""
    done, ids, last = threading.Event(), [], []

    def emit(out):
        ids.extend(out.token_ids)
        if out.finish_reason:
            last.append(out)
            done.set()

    sched.submit(Request(np.asarray(prompt, np.int64), n, Sampling(), stop_on_eos=False), emit)
    assert done.wait(120)
    assert last[0].error is None, last[0].error
    return ids, last[0].cached_tokens


@pytest.fixture(scope="module")
def setup(demo_fused):
    backend = open_backend(demo_fused)
    tok = Tokenizer.for_export(demo_fused, backend.manifest)
    rng = np.random.default_rng(0)
    system = rng.integers(100, 20000, 300).tolist()  # a shared "system prompt" of 300 ids
    return backend, tok, system, rng


def test_reuse_is_exact_across_chunks_prefixes_and_eviction(setup):
    """Chunks of 32 so cached prefixes end mid-chunk; a prompt sharing 300 ids with the previous one is fed from
    there; a prompt that is a prefix of a cached one re-feeds only its last token (its logits); with 2 slots, a
    third distinct prompt evicts the least recently used one, and the evicted prompt comes back cold; every reply
    equals the Generator's on the whole prompt."""
    backend, tok, system, rng = setup
    with started(backend, tok, max_batch=2, max_context=1024, prefill_chunk=32, prefix_cache_mib=0) as sched:
        a = system + rng.integers(100, 20000, 40).tolist()
        b = system + rng.integers(100, 20000, 57).tolist()
        c = rng.integers(100, 20000, 90).tolist()
        d = rng.integers(100, 20000, 70).tolist()
        cases = [(a, 0), (b, 300), (a[:200], 199), (b + [5, 6], len(b)), (c, 0), (d, 0)]
        for prompt, expected_cached in cases:
            ids, cached = run(sched, prompt, 12)
            assert cached == expected_cached, (len(prompt), cached)
            assert ids == alone(backend, prompt, 12)
        # a and b's slots were taken by c and d (least recently used first): b comes back cold, then warm
        assert run(sched, b, 12)[1] == 0
        ids, cached = run(sched, b, 12)
        assert cached == len(b) - 1 and ids == alone(backend, b, 12)


def test_prefixes_whose_slot_was_taken_come_back_from_kept_memory(setup):
    """--prefix-cache-mib: with 2 slots and room for two ~110-position prefixes (5 MiB each), four conversations
    turn the slots over; the first comes back from the kept memory (its whole prompt but the last token), which
    pushes out the least recently used one, which then comes back cold; every reply is the Generator's."""
    backend, tok, _, rng = setup
    p1, p2, p3, p4 = (rng.integers(100, 20000, 100).tolist() for _ in range(4))
    with started(backend, tok, max_batch=2, max_context=512, prefix_cache_mib=12) as sched:
        for p in (p1, p2, p3, p4):
            assert run(sched, p, 12)[1] == 0
        store = sched.cache.store
        assert [len(e.ids) for e in store.entries] == [111, 111] and store.bytes <= 12 * 2**20
        for p, expected in ((p1, 99), (p2, 0), (p3, 99)):
            ids, cached = run(sched, p, 12)
            assert cached == expected and ids == alone(backend, p, 12), (cached, expected)
    with started(backend, tok, max_batch=2, max_context=512, prefix_cache_mib=0) as sched:
        for p in (p1, p2, p3, p1):
            assert run(sched, p, 4)[1] == 0 and sched.cache.store is None


def test_a_running_sequence_lends_its_prefix(setup):
    """A prompt arriving while another with the same 300-id start is still running gets that prefix copied from
    the running slot (the donor keeps running, unchanged); both replies equal the Generator's."""
    backend, tok, system, rng = setup
    with started(backend, tok, max_batch=2, max_context=1024, prefill_chunk=64) as sched:
        a = system + rng.integers(100, 20000, 20).tolist()
        b = system + rng.integers(100, 20000, 25).tolist()
        results = {}
        t = threading.Thread(target=lambda: results.setdefault("a", run(sched, a, 120)))
        t.start()
        while not sched.running or not all(e.seq.prefilled for e in sched.running.values()):
            threading.Event().wait(0.01)
        results["b"] = run(sched, b, 12)
        t.join(120)
        assert results["b"][1] == 300 and results["a"][1] == 0
        assert results["b"][0] == alone(backend, b, 12) and results["a"][0] == alone(backend, a, 120)


def test_without_the_prefix_cache_nothing_is_reused(setup):
    backend, tok, system, rng = setup
    with started(backend, tok, max_batch=1, max_context=1024, prefix_cache=False) as sched:
        a = system + [7, 8, 9]
        assert run(sched, a, 4)[1] == 0 and run(sched, a, 4)[1] == 0


@pytest.mark.slow
def test_server_reports_cached_tokens_and_a_conversation_pays_once(demo_fused):
    """Through `serve` and the `openai` client: a repeated chat reuses all but its last prompt token and answers the
    same; the next turn of the conversation (history + reply + a new question) reuses the history; usage reports
    prompt_tokens_details.cached_tokens, /metrics the prefix-cache counters; --no-prefix-cache turns it off."""
    from test_serve import Server

    msgs = [{"role": "system", "content": "You are a terse assistant. " * 20},
            {"role": "user", "content": "Name a colour."}]
    for flag, reused in (((), True), (("--no-prefix-cache",), False)):
        s = Server(demo_fused, "--model-name", "demo", *flag)
        try:
            client = s.client(key="x")
            first = client.chat.completions.create(model="demo", messages=msgs, max_tokens=8, temperature=0)
            again = client.chat.completions.create(model="demo", messages=msgs, max_tokens=8, temperature=0)
            assert again.choices[0].message.content == first.choices[0].message.content
            turn2 = msgs + [{"role": "assistant", "content": first.choices[0].message.content},
                            {"role": "user", "content": "Another one."}]
            second = client.chat.completions.create(model="demo", messages=turn2, max_tokens=8, temperature=0)
            cached = [r.usage.prompt_tokens_details.cached_tokens for r in (first, again, second)]
            if reused:
                assert cached[0] == 0 and cached[1] == first.usage.prompt_tokens - 1
                assert cached[2] >= first.usage.prompt_tokens, (cached, first.usage.prompt_tokens)
                text = s.get("/metrics")[1]
                hits = float(next(ln.split()[-1] for ln in text.splitlines()
                                  if ln.startswith("mistral_trt_prefix_cache_hits_total")))
                assert hits == cached[1] + cached[2]
            else:
                assert cached == [0, 0, 0]
        finally:
            assert s.stop() == 0


def test_a_session_pays_for_a_conversation_once(demo_fused):
    """runtime/session.py: three turns of a conversation; from the second on, the prompt is fed from where it
    differs from the cache (the history is held), and each reply equals a fresh Generator run on the whole prompt."""
    from mistral_trt.runtime.request import build_request
    from mistral_trt.runtime.session import Session

    backend = open_backend(demo_fused)
    tok = Tokenizer.for_export(demo_fused, backend.manifest)
    gen = Generator(backend, prefill_chunk=64)
    session = Session(gen)
    history = [{"role": "system", "content": "You answer in one short sentence. " * 8}]
    previous = 0
    for question in ("What is the sea?", "And the sky?", "And a forest?"):
        history.append({"role": "user", "content": question})
        req = build_request({"messages": history, "max_tokens": 10, "temperature": 0}, tok, backend.manifest,
                            gen.max_context)
        ids = [t for u in session.run(req, tok) if u is not None for t in u.tokens]
        fresh = [t for (u,) in Generator(backend).run([req], tok) if u is not None for t in u.tokens]
        assert ids == fresh
        assert (session.cached == 0) if previous == 0 else (session.cached >= previous), (session.cached, previous)
        previous = len(req.prompt)
        history.append({"role": "assistant", "content": tok.decode([t for t in ids if t not in gen.eos])})
    session.reset()
    list(session.run(req, tok))
    assert session.cached == 0


@pytest.mark.slow
def test_bench_serve_multi_turn(tiny_fused, tmp_path, capsys):
    """bench-serve --multi-turn: both servers, every turn measured, prompts growing turn by turn, a table, JSON and a
    plot; a load flag it does not read is refused."""
    from mistral_trt.main import main

    out = tmp_path / "mt"
    assert main(["bench-serve", str(tiny_fused["full"]), "--multi-turn", "2x3", "--system-len", "64", "--max-tokens",
                 "4", "-o", str(out)]) == 0
    data = json.loads((out / "bench-serve-multi-turn.json").read_text())[tiny_fused["full"].name]
    rows = data["turns_table"]
    assert [r["turn"] for r in rows] == [1, 2, 3] and rows[0]["prompt_tokens"] < rows[1]["prompt_tokens"] < rows[2]["prompt_tokens"]
    assert all(r["warm_p50_ms"] > 0 and r["cold_p50_ms"] > 0 for r in rows)
    assert "Target: turn 3's TTFT p50 <= 0.25x" in capsys.readouterr().out
    assert (out / "bench-serve-multi-turn.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["bench-serve", str(tiny_fused["full"]), "--multi-turn", "2x3", "--concurrency", "4"]) == 2
    assert "--concurrency: not read by --multi-turn" in capsys.readouterr().err
    assert main(["bench-serve", str(tiny_fused["full"]), "--system-len", "64"]) == 2
    assert "--system-len goes with --multi-turn" in capsys.readouterr().err
    assert main(["bench-serve", str(tiny_fused["full"]), "--max-tokens", "8"]) == 2
    assert "need 1040 positions; the export's context is 1024" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_multi_turn_says_when_llama_server_is_not_built(tiny_fused, tmp_path, capsys):
    """--baseline llama-server without the binary: our two servers are measured, and the table says the baseline
    was not run, naming the command that builds it."""
    from mistral_trt.main import main

    out = tmp_path / "mt"
    assert main(["bench-serve", str(tiny_fused["full"]), "--multi-turn", "1x2", "--system-len", "16", "--max-tokens",
                 "2", "--baseline", "llama-server", "--llama-server", str(tmp_path / "none"), "-o", str(out)]) == 0
    text = (out / "bench-serve-multi-turn.md").read_text()
    assert "llama-server: not run" in text and "bash scripts/build_llama_server.sh" in text
    assert "TTFT p50 / p99 ms, llama-server" not in text  # no column for what did not run


@pytest.mark.parametrize("entry", ["demo-fused", "demo-fused-int8"])
def test_reused_prefix_gives_the_cold_logits_bit_for_bit(store, entry):
    """The logits after a reused 200-token prefix equal those of the whole prompt fed cold in one chunk, bit for bit,
    on held-out text: fp32, and int8-w8a8-dynamic, whose MatMulNBits quantizes activations per row block, so what
    else a step carries (its chunking) never changes a row's rounding."""
    from mistral_trt.calib.data import eval_text

    folder = store.get(entry)
    backend = open_backend(folder)
    gen = Generator(backend, prefill_chunk=512)
    ids = Tokenizer.for_export(folder, backend.manifest).encode(eval_text()).tolist()
    for i in range(6):
        prompt = np.array(ids[i * 300:i * 300 + 260], np.int64)
        cold_cache = gen.new_cache(1, 1024)
        cold = gen.prefill(cold_cache, [cold_cache.admit()], [prompt])[0]
        cache = backend.new_cache(1, 1024)
        slot, held = cache.admit_prefix(prompt[:200])
        gen._step(cache, [slot], [prompt[:200]])  # an earlier request that shared the first 200 ids
        cache.release(slot)
        slot, held = cache.admit_prefix(prompt)
        assert held == 200
        assert np.array_equal(gen._step(cache, [slot], [prompt[200:]])[0], cold)


def test_reuse_beside_speculative_decoding(setup):
    """With prompt-lookup speculation a slot is rolled back after rejected drafts: what it holds for reuse follows
    (the rolled-back ids are forgotten), and a prompt reusing it still gets the Generator's greedy reply."""
    from mistral_trt.runtime.speculative import Speculation

    backend, tok, system, rng = setup
    from mistral_trt.serve.metrics import Metrics

    metrics = Metrics("demo", 1)
    with started(backend, tok, max_batch=1, max_context=1024, speculate=Speculation(), metrics=metrics) as sched:
        a = system + system[:50]  # a prompt that quotes itself: drafts are made, some rejected
        ids_a, _ = run(sched, a, 40)
        assert ids_a == alone(backend, a, 40)
        assert metrics.drafted._value.get() > metrics.accepted._value.get()  # rollbacks happened
        held = sched.cache.held[0]
        assert held == a + ids_a[:len(held) - len(a)] and len(held) == int(sched.cache.lengths[0])
        b = a + ids_a[:10] + [11, 12, 13]
        ids_b, cached = run(sched, b, 12)
        assert cached == len(a) + 10 and ids_b == alone(backend, b, 12)


def test_a_prefix_cache_budget_past_the_memory_is_refused_at_start(tiny_fused, tiny_exports):
    """serve --prefix-cache-mib: more than the memory available (MemAvailable, with the slots' cache) is one line
    naming the flag and the most it could be, exit 2; so is the flag beside --no-prefix-cache or on a graph without
    a prefix cache, or a negative budget."""
    import subprocess
    import sys

    from mistral_trt.serve.scheduler import available_memory

    huge = 4 * available_memory() // 2**20  # well past it, however the machine's load moves meanwhile
    cases = [(tiny_fused["full"], ["--prefix-cache-mib", str(huge)], "GiB of memory available; at most "),
             (tiny_fused["full"], ["--prefix-cache-mib", "8", "--no-prefix-cache"], "turns off: give one of them"),
             (tiny_exports["full", "fp32"], ["--prefix-cache-mib", "8"], "export --graph fused"),
             (tiny_fused["full"], ["--prefix-cache-mib", "-1"], "--prefix-cache-mib: expected an integer >= 0")]
    for folder, args, expected in cases:
        r = subprocess.run([sys.executable, "-m", "mistral_trt.main", "serve", str(folder), "--port", "0", *args],
                           capture_output=True, text=True, timeout=120)
        last = r.stderr.strip().splitlines()[-1]
        assert r.returncode == 2 and expected in last and "Traceback" not in r.stderr, (args, r.stderr)
        assert args[:2] != ["--prefix-cache-mib", str(huge)] or f"error: --prefix-cache-mib {huge}: " in last
