"""Benchmark arithmetic against hand-computed values, and the bench command end to end (tiny sizes)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from mistral_trt.bench.latency import decode_weight_bytes, graph_decode_bytes, kv_bytes, measure_bandwidth, percentile, summarize
from mistral_trt.main import main
from mistral_trt.runtime import Manifest


def test_percentiles_by_hand():
    xs = [4.0, 1.0, 3.0, 2.0]
    assert percentile(xs, 50) == 2.5  # halfway between 2 and 3
    assert percentile(xs, 90) == pytest.approx(3.7)  # rank 2.7: 3 + 0.7 * (4 - 3)
    assert percentile(xs, 99) == pytest.approx(3.97)
    assert percentile([7.0], 99) == 7.0
    s = summarize(list(range(1, 102)))  # 1..101: p50 = 51, p90 = 91, p99 = 100
    assert (s["p50"], s["p90"], s["p99"], s["min"], s["max"], s["n"]) == (51, 91, 100, 1, 101, 101)


def test_weight_bytes_by_hand(tiny_exports):
    a = Manifest.load(tiny_exports["full", "fp32"]).model  # h 64, 4 heads x 16, 2 kv heads, ffn 128, vocab 32000, 2 layers
    per_layer = 64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 128 + 2 * 64  # q,o + k,v + gate,up,down + 2 norms = 36992
    assert decode_weight_bytes(a, "fp32") == (2 * per_layer + 64 + 32000 * 64) * 4 == 8_488_192
    assert decode_weight_bytes(a, "fp16") == 8_488_192 // 2


def test_weight_bytes_match_the_checkpoint(tiny_full):
    """Independent count: every parameter of the real model except the embedding table (only gathered)."""
    from transformers import MistralForCausalLM

    m = MistralForCausalLM.from_pretrained(tiny_full)
    want = sum(p.numel() for n, p in m.named_parameters() if "embed_tokens" not in n) * 4
    from mistral_trt.export.checkpoint import inspect_checkpoint

    assert decode_weight_bytes(inspect_checkpoint(tiny_full).args, "fp32") == want


def test_graph_weight_bytes(tiny_exports, tmp_path):
    """Counted from the ONNX file: equals the arithmetic for fp32 (up to RoPE's tiny inv_freq table),
    halves for fp16, and drops to about a quarter with int8 weights."""
    from mistral_trt.calib.quantize import quantize

    a = Manifest.load(tiny_exports["full", "fp32"]).model
    fp32 = graph_decode_bytes(tiny_exports["full", "fp32"])
    assert fp32 == pytest.approx(decode_weight_bytes(a, "fp32"), rel=1e-4)
    assert graph_decode_bytes(tiny_exports["full", "fp16"]) == pytest.approx(fp32 / 2, rel=1e-3)
    quantize(tiny_exports["full", "fp32"], "int8-w8a16", tmp_path / "w8")
    assert 0.25 < graph_decode_bytes(tmp_path / "w8") / fp32 < 0.27  # int8 + one fp32 scale per output channel
    # int4 two a byte (numpy holds one a byte), + an fp32 scale and an int4 zero point per block of 64 (TensorRT's, the
    # tiny model's K = 64 allows only 64): (0.5 + 4/64 + 1/128) / 4
    quantize(tiny_exports["full", "fp32"], "int4-w4a16", tmp_path / "w4", lm_head_bits=4)
    assert 0.140 < graph_decode_bytes(tmp_path / "w4") / fp32 < 0.145


def test_kv_bytes_by_hand(tiny_exports):
    full = Manifest.load(tiny_exports["full", "fp32"]).model
    window = Manifest.load(tiny_exports["window", "fp16"]).model  # W = 8: at most 7 cached positions
    assert kv_bytes(full, "fp32", context=100, batch=3) == 2 * 2 * 3 * 2 * 16 * 100 * 4
    assert kv_bytes(window, "fp16", context=100, batch=1) == 2 * 2 * 1 * 2 * 16 * 7 * 2


def test_bandwidth_probe_reaches_a_plain_read():
    """The probe's arithmetic (bytes counted, time taken) against a plain numpy sum over the same bytes timed
    here: with one thread it must read as fast (a floor from a slower probe would be beaten). One thread on
    both sides, so a busy second core cannot tilt the comparison."""
    import time

    nbytes = 256 << 20  # the probe's default size (smaller arrays: thread start-up dominates)
    a = np.ones(nbytes // 8)
    tries = []
    for _ in range(3):  # a shared 2-core machine steals whole rounds now and then: up to three comparisons
        bw = measure_bandwidth(nbytes=nbytes, threads=1, rounds=3)
        plain = 0.0
        for _ in range(3):
            t = time.perf_counter()
            a.sum()
            plain = max(plain, nbytes / (time.perf_counter() - t))
        tries.append((bw / 1e9, plain / 1e9))
        if 0.8 * plain <= bw <= 1.25 * plain:
            break
    else:
        raise AssertionError(f"probe GB/s vs plain read GB/s, each try: {tries}")


@pytest.mark.slow
def test_bench_end_to_end(tiny_exports, tmp_path, capsys):
    out = tmp_path / "bench"
    f32, f16 = (f"ours:{tiny_exports['full', d].name}" for d in ("fp32", "fp16"))  # a system is named by its folder
    bad = ["bench", str(tiny_exports["full", "fp32"]), "--prompt-len", "8", "--gen-len", "4", "-o", str(tmp_path / "x")]
    for target, message in ((f"{f32}>1.5", "expected FAST/SLOW>=RATIO"),
                            (f"{f32}/nobody>=2", "--target: no system 'nobody' in this run")):
        assert main([*bad, "--target", target]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err
    assert not (tmp_path / "x").exists()
    assert main(["bench", str(tiny_exports["full", "fp32"]), str(tiny_exports["full", "fp16"]), "--baseline", "hf", "--baseline", "ort-genai",
                 "--prompt-len", "8,16", "--gen-len", "4", "--warmup", "1", "--repeat", "2", "-o", str(out),
                 "--genai-cache", str(tmp_path / "genai"), "--target", f"{f32}/hf-eager>=1.0",
                 "--target", f"{f16}/{f32}>=1000"]) == 0
    table = capsys.readouterr().out
    assert table.count(f"| {f32} |") == 2 and table.count(f"| {f16} |") == 2
    assert table.count("| hf-eager |") == 2 and table.count("| ort-genai |") == 2
    data = json.loads((out / "bench.json").read_text())
    assert len(data["rows"]) == 8 and data["bandwidth_bytes_s"] > 0
    first = {r["prompt_len"]: r for r in data["rows"] if r["system"] == f32}
    assert sorted(first) == [8, 16]
    for r in data["rows"]:
        assert r["decode_ms"]["n"] == 2 * 3  # 2 timed rounds x (4 new tokens - 1 intervals)
        assert r["decode_ms"]["p50"] <= r["decode_ms"]["p90"] <= r["decode_ms"]["p99"]
        o = first[r["prompt_len"]]
        if r is not o:  # every other row: its time over the first folder's, at the same prompt length
            assert r["ours_speedup_decode"] == pytest.approx(r["decode_ms"]["p50"] / o["decode_ms"]["p50"])
            assert r["ours_speedup_ttft"] == pytest.approx(r["ttft_ms"] / o["ttft_ms"])
        else:
            assert "ours_speedup_decode" not in r
    rows = {(r["system"], r["prompt_len"]): r for r in data["rows"]}  # the targets, recomputed from the rows
    assert len(data["targets"]) == 4
    for t in data["targets"]:
        ratio = rows[t["slow"], t["prompt_len"]]["decode_ms"]["p50"] / rows[t["fast"], t["prompt_len"]]["decode_ms"]["p50"]
        assert t["ratio"] == pytest.approx(ratio) and t["met"] == (ratio >= t["want"])
        assert f"| {t['fast']} >= {t['want']:g}x {t['slow']} | {t['prompt_len']} | 1 | {ratio:.2f}x |" in table
    assert not any(t["met"] for t in data["targets"] if t["want"] == 1000)
    png = (out / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_llama_cpp_probe_turns_a_failure_into_a_reason(tmp_path):
    """llama.cpp first decodes in a child process: a build that fails or crashes there (a segmentation fault in
    ggml's AMX matmul, seen here) becomes a skipped baseline with its reason, not a bench that dies with it."""
    pytest.importorskip("llama_cpp")
    from mistral_trt.bench.latency import BaselineUnavailable, probe_llama_cpp

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + bytes(60))
    with pytest.raises(BaselineUnavailable, match=r"could not decode with broken.gguf in a child process \(exit code"):
        probe_llama_cpp(bad)


@pytest.mark.slow
def test_llama_cpp_prefills_every_round(demo_hf):
    """Each round prefills the whole prompt: llama-cpp-python would otherwise reuse the previous call's cache for
    the common prefix, and a repeated prompt's TTFT would be one token's."""
    pytest.importorskip("llama_cpp")
    from mistral_trt.bench.latency import LlamaCpp

    llm = LlamaCpp(str(demo_hf), "f32", demo_hf.parent / "llama-cpp-test", 400)
    prompt = np.random.default_rng(0).integers(3, 49152, (1, 256))
    first = [llm.run(prompt, 2) for _ in range(3)]
    ttft = [t[1] - t[0] for t in first]
    step = min(t[2] - t[1] for t in first)
    assert min(ttft[1:]) > 0.5 * ttft[0] and min(ttft) > 4 * step, (ttft, step)


@pytest.mark.slow
def test_llama_cpp_baseline_runs_or_is_skipped_with_a_reason(demo_fused, tmp_path, capsys):
    """--baseline llama.cpp: a row of its own where llama-cpp-python is installed, else a note and the rest of the
    bench (it compiles llama.cpp for ~10 minutes, so it is not a dependency)."""
    import importlib.util

    assert main(["bench", str(demo_fused), "--baseline", "llama.cpp", "--prompt-len", "8", "--gen-len", "3", "--warmup", "0",
                 "--repeat", "1", "-o", str(tmp_path / "b"), "--genai-cache", str(tmp_path / "genai")]) == 0
    captured = capsys.readouterr()
    if importlib.util.find_spec("llama_cpp") is None:
        assert "--baseline llama.cpp skipped: llama-cpp-python is not installed" in captured.err
        assert "| llama.cpp-f32 |" not in captured.out and f"| ours:{demo_fused.name} |" in captured.out
    else:
        assert "| llama.cpp-f32 |" in captured.out


def test_a_baseline_failing_mid_run_is_dropped_with_its_error():
    """A baseline whose own runtime fails (onnxruntime-genai's fp16 model on a CPU did, in the GPU check's rehearsal)
    is left out of the rest of the run with one note naming it and the error; ours failing is the bench's failure."""
    from mistral_trt.bench.latency import run_bench

    class System:
        def __init__(self, name, fail_at=None):
            self.name, self.fail_at, self.calls = name, fail_at, 0

        def run(self, prompts, n):
            self.calls += 1
            if self.fail_at is not None and prompts.shape[1] >= self.fail_at:
                raise RuntimeError("Non-zero status code returned while running Cast node")
            return [0.0] + [0.01 * (i + 1) for i in range(n)]

    ours, base = System("ours"), System("ort-genai", fail_at=8)
    notes = []
    results = run_bench([ours, base], [4, 8, 16], [1], 3, 1, 2, 100, log=notes.append)
    assert [(r.system, r.prompt_len) for r in results] == [("ours", 4), ("ort-genai", 4), ("ours", 8), ("ours", 16)]
    said = [n for n in notes if n.startswith("note:")]
    assert len(said) == 1 and "ort-genai failed at prompt 8, batch 1" in said[0] and "Cast node" in said[0]
    with pytest.raises(RuntimeError):
        run_bench([System("ours", fail_at=4)], [4], [1], 3, 0, 1, 100, log=notes.append)
