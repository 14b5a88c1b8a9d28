"""The server's scheduler (serve/scheduler.py) in process, over a fake backend (tests/fake_backend.py) whose every
token depends on the whole prefix: continuous batching, chunked prefill, cancellation, stop strings, the queue, a
failing step and shutdown, each against the fake model's own greedy continuation computed without a scheduler.
The real model behind a real server: tests/test_serve.py."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from fake_backend import FakeBackend, reference_greedy
from mistral_trt.runtime.tokenizer import Tokenizer
from mistral_trt.runtime.request import Request
from mistral_trt.serve.scheduler import QueueFull, Scheduler


class Collector:
    """One request's events, as the HTTP layer receives them."""

    def __init__(self):
        self.events, self.done = [], threading.Event()

    def __call__(self, ev):
        self.events.append(ev)
        if ev.finish_reason:
            self.done.set()

    @property
    def ids(self) -> list[int]:
        return [t for ev in self.events for t in ev.token_ids]

    @property
    def text(self) -> str:
        return "".join(ev.text for ev in self.events)

    @property
    def finish(self):
        return self.events[-1].finish_reason


@pytest.fixture()
def setup(tiny_fused):
    """A scheduler over the fake backend (the tiny fused export's manifest and Mistral v1 tokenizer)."""
    made = []

    def make(**kw):
        backend = FakeBackend(tiny_fused["full"], fail_at_step=kw.pop("fail_at_step", None))
        sched = Scheduler(backend, Tokenizer.for_export(tiny_fused["full"], backend.manifest), **kw)
        sched.start()
        made.append(sched)
        return backend, sched

    yield make
    for s in made:
        s.stop(timeout=0)


def run_all(sched, requests) -> list[Collector]:
    out = []
    for req in requests:
        c = Collector()
        sched.submit(req, c)
        out.append(c)
    for c in out:
        assert c.done.wait(60), "a request never finished"
    return out


def prompts(n: int, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, 32000, int(rng.integers(1, 120))) for _ in range(n)]


def test_continuous_batching_gives_each_request_its_own_greedy_sequence(setup):
    """40 requests, 4 slots, prompts chunked by 16 beside running decodes: every one equals the fake model's greedy
    continuation alone, ends for the right reason, and counts its tokens; every slot is free afterwards."""
    backend, sched = setup(max_batch=4, max_queue=64, prefill_chunk=16)
    reqs = [Request(p, max_tokens=int(5 + i % 23)) for i, p in enumerate(prompts(40))]
    for req, c in zip(reqs, run_all(sched, reqs)):
        want = reference_greedy(backend, req.prompt, req.max_tokens)
        at_eos = want[-1] == backend.eos
        assert c.ids == want[:-1] if at_eos else want  # EOS ends the reply and is not part of it
        assert c.finish == ("stop" if at_eos else "length")
        assert (c.events[-1].prompt_tokens, c.events[-1].completion_tokens) == (len(req.prompt), len(c.ids))
    assert sched.busy_slots == 0 and not sched.cache.active.any()
    assert any(reference_greedy(backend, r.prompt, r.max_tokens)[-1] == backend.eos for r in reqs)  # both reasons
    assert backend.steps < sum(len(r.prompt) + r.max_tokens for r in reqs) / 4  # rows really shared steps


def test_cancelled_requests_free_their_slots_and_the_rest_are_unchanged(setup):
    backend, sched = setup(max_batch=3, prefill_chunk=8)
    reqs = [Request(p, max_tokens=60, stop_on_eos=False) for p in prompts(9, seed=1)]
    collectors, handles = [], []
    for req in reqs:
        c = Collector()
        handles.append(sched.submit(req, c))
        collectors.append(c)
    for h in handles[::2]:  # a client gone: cancelled before or while it runs
        h.cancel()
    for i, (req, c) in enumerate(zip(reqs, collectors)):
        if i % 2:
            assert c.done.wait(60) and c.ids == reference_greedy(backend, req.prompt, 60, stop_on_eos=False)
    for _ in range(200):  # the worker retires cancelled rows at its next step
        if sched.busy_slots == 0:
            break
        threading.Event().wait(0.01)
    assert sched.busy_slots == 0 and not sched.cache.active.any()


def test_stop_string_is_held_back_and_never_sent(setup):
    """A stop string taken from the middle of the reference text: the text sent is exactly what precedes it, and no
    event ever carried a part of it (held back until it could not be a stop, then sent or dropped)."""
    backend, sched = setup(max_batch=2)
    prompt = prompts(1, seed=3)[0]
    full = run_all(sched, [Request(prompt, max_tokens=40, stop_on_eos=False)])[0]
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 4]
    assert len(stop) == 4 and stop not in text[:len(text) // 2]
    cut = run_all(sched, [Request(prompt, max_tokens=40, stop=[stop], stop_on_eos=False)])[0]
    assert cut.text == text[:text.index(stop)] and cut.finish == "stop"
    assert cut.ids == full.ids[:len(cut.ids)]


def test_a_full_queue_refuses_at_once(setup):
    backend, sched = setup(max_batch=1, max_queue=2)
    long = [Request(p, max_tokens=500, stop_on_eos=False) for p in prompts(4, seed=4)]
    handles = [sched.submit(long[0], Collector())]
    while sched.busy_slots == 0:  # it runs
        threading.Event().wait(0.001)
    handles += [sched.submit(r, Collector()) for r in long[1:3]]  # two wait
    with pytest.raises(QueueFull, match="2 requests are waiting [(]--max-queue 2[)]"):
        sched.submit(long[3], Collector())
    for h in handles:
        h.cancel()


def test_a_failing_step_fails_its_requests_and_the_next_ones_run(setup):
    backend, sched = setup(max_batch=2, fail_at_step=3)
    first = run_all(sched, [Request(p, max_tokens=20, stop_on_eos=False) for p in prompts(2, seed=5)])
    assert [c.finish for c in first] == ["error", "error"]
    assert "the fake graph failed this step" in first[0].events[-1].error
    req = Request(prompts(1, seed=6)[0], max_tokens=10, stop_on_eos=False)
    assert run_all(sched, [req])[0].ids == reference_greedy(backend, req.prompt, 10, stop_on_eos=False)


def test_shutdown_ends_waiting_requests_and_lets_running_ones_finish(setup):
    backend, sched = setup(max_batch=1, max_queue=8)
    reqs = [Request(p, max_tokens=30, stop_on_eos=False) for p in prompts(3, seed=7)]
    cs = [Collector() for _ in reqs]
    sched.submit(reqs[0], cs[0])
    while sched.busy_slots == 0:  # the first one runs
        threading.Event().wait(0.001)
    for r, c in zip(reqs[1:], cs[1:]):
        sched.submit(r, c)
    sched.begin_shutdown()
    for c in cs:
        assert c.done.wait(60)
    assert cs[0].ids == reference_greedy(backend, reqs[0].prompt, 30, stop_on_eos=False)
    assert [c.finish for c in cs[1:]] == ["error", "error"] and "shutting down" in cs[1].events[-1].error
    with pytest.raises(QueueFull, match="shutting down"):
        sched.submit(reqs[0], Collector())
