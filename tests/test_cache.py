"""The cache owns each sequence (runtime/cache.py): slots that are admitted and released between steps, and, on
the fused graph, ragged steps that mix one slot's prefill with another's decode. The reference is each
sequence generated alone through the same Generator."""
from __future__ import annotations

import numpy as np
import pytest

from mistral_trt.runtime import UserError
from mistral_trt.runtime.backend import open_backend
from mistral_trt.runtime.cache import ColumnCache, ColumnStorage, positions
from mistral_trt.runtime.generate import Generator
from mistral_trt.runtime.sampling import Sampling


def alone(backend, prompt, n) -> list[int]:
    return [int(t[0]) for t in Generator(backend).generate([prompt], n, Sampling(), stop_on_eos=False)]


@pytest.mark.parametrize("where", ["numpy", "ortvalue"])
@pytest.mark.parametrize("name", ["window", "full"])
def test_sequences_join_and_leave_a_running_batch(tiny_fused, name, where):
    """Three sequences, two slots: B joins while A decodes (B's whole prompt in the same step as A's token),
    A ends and C takes A's slot while B decodes. Each gets exactly the tokens it gets alone. `ortvalue`: the
    cache as onnxruntime-allocated OrtValues bound whole (what the CUDA provider gets, its memory uninitialised),
    here in host memory; the reference is still the numpy cache."""
    backend = open_backend(tiny_fused[name])
    rng = np.random.default_rng(7)
    prompts = {"A": rng.integers(3, 32000, 11), "B": rng.integers(3, 32000, 6), "C": rng.integers(3, 32000, 9)}
    want = {k: alone(backend, p, 12) for k, p in prompts.items()}
    if where == "ortvalue":
        backend.cache_device = "cpu"
    cache = backend.new_cache(2, 64)
    assert cache.ragged and isinstance(cache.buffers[0], np.ndarray) == (where == "numpy")
    got = {k: [] for k in prompts}
    slot = {}
    pending = {}  # slot -> tokens to feed next step

    def admit(k):
        slot[k] = cache.admit()
        pending[slot[k]] = prompts[k]

    def step():
        tokens = [pending.pop(s, np.zeros(0, np.int64)) for s in range(cache.slots)]
        logits = backend.step(cache, tokens)
        for k, s in slot.items():
            if len(tokens[s]):
                t = int(np.argmax(logits[s]))
                got[k].append(t)
                if len(got[k]) < 12:
                    pending[s] = np.array([t])

    admit("A")
    for _ in range(4):
        step()
    admit("B")  # joins: this step prefills B and decodes A
    while len(got["A"]) < 12:
        step()
    cache.release(slot.pop("A"))
    admit("C")  # reuses A's slot; what A left there is never read
    assert slot["C"] == 0
    while len(got["B"]) < 12 or len(got["C"]) < 12:
        step()
    assert got == want


@pytest.mark.parametrize("name", ["full", "window"])
def test_portable_rows_advance_together(tiny_exports, name):
    """A ColumnCache refuses a sequence joining a running batch. A row may sit out a step only without a
    window (its padding column is masked); with one, the column would widen its window, so that is refused
    too, while a released (finished) row idles freely."""
    backend = open_backend(tiny_exports[name, "fp32"])
    rng = np.random.default_rng(8)
    p1, p2 = rng.integers(3, 32000, 10), rng.integers(3, 32000, 4)
    want1 = alone(backend, p1, 20)
    gen = Generator(backend, prefill_chunk=4)
    cache = gen.new_cache(2, 64)
    a, b = cache.admit(), cache.admit()
    logits = gen.prefill(cache, [a, b], [p1, p2])
    got1 = [int(np.argmax(logits[0]))]
    if name == "window":
        with pytest.raises(UserError, match=r"slot\(s\) \[0\] take no token this step: with a sliding window"):
            gen.decode_one_token(cache, [b], [int(np.argmax(logits[1]))])
    else:
        gen.decode_one_token(cache, [b], [int(np.argmax(logits[1]))])  # a sits this one out
    cache.release(b)  # b is done; a goes on alone
    with pytest.raises(UserError, match="starts a batch together"):
        cache.admit()  # a free slot, but the batch is running
    for _ in range(19):
        got1.append(int(np.argmax(gen.decode_one_token(cache, [a], [got1[-1]])[0])))
    assert got1 == want1
    if name == "window":
        assert cache.columns == 7  # trimmed to W - 1 all along


def test_plan_of_a_column_step():
    """Worked example: two rows, the second left-padded; positions continue per row, padding masked."""
    cache = ColumnCache(ColumnStorage(2, (2, 1, 4), 16, np.float32), slots=2, capacity=16, keep=None)
    cache.admit(), cache.admit()
    plan = cache.metadata(np.array([3, 1]))
    assert plan.attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert plan.position_ids.tolist() == [[0, 1, 2], [0, 0, 0]]
    assert cache.pack([[7, 8, 9], [5]], plan).tolist() == [[7, 8, 9], [0, 0, 5]]
    cache.commit(plan)
    plan = cache.metadata(np.array([1, 2]))
    assert plan.attention_mask.tolist() == [[1, 1, 1, 0, 1], [0, 0, 1, 1, 1]]
    assert plan.position_ids.tolist() == [[3, 3], [1, 2]]
    assert positions(np.array([0, 5]), np.array([[0, 1, 1], [1, 1, 1]])).tolist() == [[0, 0, 1], [5, 6, 7]]


def test_fused_runs_split_a_mixed_step():
    """A one-token row padded to a prefill chunk's width would cost the chunk: such steps run apart."""
    from mistral_trt.runtime.cache import runs

    as_lists = lambda q: [g.tolist() for g in runs(np.array(q))]  # noqa: E731
    assert as_lists([1, 1, 0, 1]) == [[0, 1, 3]] and as_lists([5, 0, 9]) == [[0, 2]] and as_lists([0, 0]) == []
    assert as_lists([1, 1, 0, 40, 0, 1]) == [[0, 1, 5], [3]]
    assert as_lists([1, 30, 30, 1]) == [[0, 3], [1, 2]]  # neighbouring chunks: one run
    assert as_lists([40, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 40]) == [list(range(1, 11)), [0], [11]]  # far apart: two
    # with each row's room: a run never spans a row (busy or idle) that lacks room for the run's width
    fit = lambda q, room: [g.tolist() for g in runs(np.array(q), np.array(room))]  # noqa: E731
    assert fit([1, 30, 30, 1], [9, 99, 99, 9]) == [[0, 3], [1, 2]]  # room enough: as without
    assert fit([1, 30, 30, 1], [9, 99, 29, 29]) == [[0, 3], [1], [2]]
    assert as_lists([8, 512, 5]) == [[0], [1], [2]]  # drafts beside a chunk: not all padded to 512
    assert fit([8, 1, 8], [50, 50, 50]) == [[1], [0, 2]] and fit([8, 1, 8], [50, 7, 50]) == [[1], [0], [2]]
    assert fit([8, 20], [10, 100]) == [[0], [1]] and fit([8, 20], [20, 100]) == [[0, 1]]
    assert fit([1, 0, 1], [1, 0, 1]) == [[0], [2]]  # a full idle row inside a one-token run


def test_fused_step_runs_within_every_rows_room(tiny_fused):
    """A speculative row near its capacity (8 tokens fed, 10 positions left) beside a 20-token prefill: one run
    of width 20 would pad the first row past its capacity, which onnxruntime's GroupQueryAttention refuses (seen
    in serve --speculate under load). The step runs them apart and gives each row what it gets alone."""
    from mistral_trt.runtime.cache import runs

    assert len(runs(np.array([8, 20]))) == 1  # without the room, the cost rule merges them
    backend = open_backend(tiny_fused["full"])
    rng = np.random.default_rng(5)
    past, drafts, prompt = rng.integers(3, 32000, 54), rng.integers(3, 32000, 8), rng.integers(3, 32000, 20)
    cache = backend.new_cache(2, 64)
    a, b = cache.admit(), cache.admit()
    backend.step(cache, [past, np.zeros(0, np.int64)])
    both = backend.step(cache, [drafts, prompt], last=False).copy()
    alone = []
    for rows in ([past, drafts], [prompt]):
        c = backend.new_cache(1, 64)
        c.admit()
        for r in rows:
            out = backend.step(c, [r], last=False)
        alone.append(out[0, :len(rows[-1])].copy())
    np.testing.assert_allclose(both[a, :8], alone[0], atol=1e-4)
    np.testing.assert_allclose(both[b, :20], alone[1], atol=1e-4)


@pytest.mark.parametrize("name", ["full", "window"])
def test_portable_cache_in_onnxruntime_memory(tiny_exports, name):
    """The portable graph's cache as onnxruntime-allocated buffers bound by pointer (runtime/ort.py's OrtColumns:
    what a GPU provider gets, so the cache stays in device memory) computes what the host numpy cache does: the
    same logits to the bit over chunked prefill and decode of a batch of 2, through the window's trim too. Run here
    on host OrtValues; the GPU differs only in the device name bound."""
    from mistral_trt.runtime.ort import OrtColumns

    host, dev = open_backend(tiny_exports[name, "fp32"]), open_backend(tiny_exports[name, "fp32"])
    assert host.cache_device is None
    dev.cache_device = "cpu"
    rng = np.random.default_rng(11)
    prompts = [rng.integers(3, 32000, 13), rng.integers(3, 32000, 5)]
    out = {}
    for key, backend in (("host", host), ("dev", dev)):
        gen = Generator(backend, prefill_chunk=4)
        cache = gen.new_cache(2, 64)
        assert isinstance(cache.storage, OrtColumns) == (key == "dev")
        slots = [cache.admit(), cache.admit()]
        steps = [gen.prefill(cache, slots, prompts).copy()]
        for _ in range(14):
            steps.append(gen.decode_one_token(cache, slots, steps[-1].argmax(-1).tolist()).copy())
        out[key] = (np.stack(steps), cache.columns)
    np.testing.assert_array_equal(out["dev"][0], out["host"][0])
    assert out["dev"][1] == out["host"][1] == (7 if name == "window" else 13 + 14)


def test_shared_width_metadata():
    """onnxruntime < 1.32's form (no query_seqlens): a row of several tokens runs alone; decode rows run together, an
    idle row spanned taking one column past its length (seqlens_k = its length); a device cache's idle row whose
    cache is full gives up the last position of the prefix it keeps (the op would refuse the step otherwise)."""
    from mistral_trt.runtime.cache import InPlaceCache

    device = [object()] * 4  # not numpy: bound whole, as OrtValues in device memory are
    c = InPlaceCache(device, slots=4, capacity=16, sliding_window=None, shared_width=True)
    for _ in range(4):
        c.admit()
    c.lengths[:] = [5, 9, 16, 2]
    c.held = [list(range(5)), list(range(9)), list(range(16)), list(range(2))]
    c.release(2)  # idle, its 16 positions kept as a prefix
    meta = c.metadata(np.array([1, 6, 0, 1]))
    assert [(r.lo, r.hi, r.width) for r in meta.runs] == [(0, 4, 1), (1, 2, 6)]
    decode, prefill = meta.runs
    assert decode.seqlens_k.tolist() == [5, 9, 15, 2]  # every row's one column at its length; row 2 gave one up
    assert c.lengths[2] == 15 and c.held[2] == list(range(15))
    assert prefill.seqlens_k.tolist() == [9 + 6 - 1] and prefill.logits_index.tolist() == [[5]]
    host = InPlaceCache([np.zeros((4, 1, 16, 2))] * 2, slots=4, capacity=16, sliding_window=None, shared_width=True)
    for _ in range(4):
        host.admit()
    host.lengths[:] = [5, 9, 16, 2]
    host.release(2)
    runs = host.metadata(np.array([1, 6, 0, 1])).runs  # host rows bound by view: the full idle row is not spanned
    assert [(r.lo, r.hi) for r in runs] == [(0, 1), (3, 4), (1, 2)] and host.lengths[2] == 16
