"""`mistral-trt bench`: latency of our runtime against baselines, measured side by side in one run.

For each configuration (prompt length x batch) every system runs `warmup` untimed rounds, then
`repeat` timed rounds *alternated* between systems (ours, hf, ours, hf, ...) so machine drift hits all
of them alike. Per system and configuration:

    ttft        time from the call to the first new token (prefill + first sample)
    decode      per-token latency (time between consecutive new tokens): p50, p90, p99, spread
    tok/s       decode tokens per second (batch x 1 / p50) and prefill tokens per second
    memory      resident memory the system added (after warm-up minus before loading)

The roofline: a decode step must read every weight once (plus the KV cache so far); divided by the
memory bandwidth measured in the same run, that is the floor no implementation can beat. We print our
p50 / floor.

This module sits above runtime and export (it drives HF transformers and onnxruntime-genai as baselines);
the runtime never imports it.
"""
from __future__ import annotations

import gc
import json
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.manifest import DTYPE_BYTES, ModelArgs

# -- statistics ------------------------------------------------------------------------------------
def percentile(xs, q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default, and Excel's PERCENTILE.INC)."""
    xs = sorted(xs)
    if not xs:
        raise ValueError("percentile of nothing")
    k = (len(xs) - 1) * q / 100
    lo, hi = int(np.floor(k)), int(np.ceil(k))
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarize(latencies: list[float]) -> dict:
    return {"p50": percentile(latencies, 50), "p90": percentile(latencies, 90), "p99": percentile(latencies, 99),
            "min": min(latencies), "max": max(latencies), "n": len(latencies)}


def decode_weight_bytes(a: ModelArgs, dtype: str) -> int:
    """Bytes of weights one decode step reads: every layer, the final norm and the output projection.
    The embedding table is only gathered (one row per token) unless it doubles as the output projection."""
    h, hd = a.hidden_size, a.head_dim
    attn = h * a.num_heads * hd * 2 + h * a.num_kv_heads * hd * 2  # q, o + k, v
    mlp = 3 * h * a.intermediate_size
    params = a.num_layers * (attn + mlp + 2 * h) + h + a.vocab_size * h  # + final norm + lm_head
    return params * DTYPE_BYTES[dtype]


def graph_decode_bytes(folder: Path) -> int:
    """Bytes of weights one decode step reads, counted from the ONNX file itself (right for every precision:
    fp32, fp16, int8 and int4 Q/DQ, MatMulNBits): every initializer, except tables only gathered from (embeddings,
    and the fused graph's rotary cos/sin tables, read one row per position) and axes constants."""
    import onnx
    from onnx import helper

    from mistral_trt.runtime.engine import ENGINE_MANIFEST, EngineManifest

    if (Path(folder) / ENGINE_MANIFEST).is_file():  # a TensorRT engine reads what its source ONNX holds
        folder = Path(EngineManifest.load(folder).source["export"])
    g = onnx.load(str(Path(folder) / "model.onnx"), load_external_data=False).graph
    gathered = {("Gather", 0), ("GroupQueryAttention", 7), ("GroupQueryAttention", 8), ("Unsqueeze", 1)}  # (op, input)
    consumers: dict[str, set] = {}
    for n in g.node:
        for k, i in enumerate(n.input):
            consumers.setdefault(i, set()).add((n.op_type, k))
    total = 0
    for t in g.initializer:
        if consumers.get(t.name, set()) <= gathered and t.name in consumers:
            continue
        n = int(np.prod(t.dims, dtype=np.int64))
        total += -(-n // 2) if t.data_type in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4) else \
            n * helper.tensor_dtype_to_np_dtype(t.data_type).itemsize  # int4: two a byte (numpy holds one a byte)
    return total


def kv_bytes(a: ModelArgs, dtype: str, context: int, batch: int) -> int:
    """Bytes of KV cache a decode step reads at `context` cached positions (bounded by a sliding window)."""
    if a.sliding_window:
        context = min(context, a.sliding_window - 1)
    return 2 * a.num_layers * batch * a.num_kv_heads * a.head_dim * context * DTYPE_BYTES[dtype]


def measure_bandwidth(nbytes: int = 256 << 20, threads: int | None = None, rounds: int = 5, kind: str = "read") -> float:
    """Memory bandwidth in bytes/s, all cores at once, best of `rounds`. kind "read": each thread sums its
    own array (what a decode step does to the weights: read, never write); "copy": np.copyto, counting
    read + write bytes. The floor uses "read": with "copy" the demo's fused decode came out *under* its
    floor (17.9 ms against 19.2), so copy bandwidth understates what reading achieves."""
    threads = threads or os.cpu_count() or 1
    n = nbytes // 8 // threads
    src = [np.ones(n) for _ in range(threads)]
    dst = [np.empty(n) for _ in range(threads)] if kind == "copy" else []
    work = (lambda i: src[i].sum()) if kind == "read" else (lambda i: np.copyto(dst[i], src[i]))  # noqa: E731
    moved = n * 8 * threads * (1 if kind == "read" else 2)
    best = 0.0
    for _ in range(rounds):
        ts = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        best = max(best, moved / (time.perf_counter() - t))
    return best


def rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


REPORT_FILES = ("bench.md", "bench.json", "bench.png")


def check_engine_limits(folder: Path, batches: list[int], prompt_lens: list[int], gen_len: int) -> None:
    """A TensorRT engine folder runs only the shapes it was built for: say so before measuring anything."""
    from mistral_trt.runtime.engine import ENGINE_MANIFEST, EngineManifest

    if not (folder / ENGINE_MANIFEST).is_file():
        return
    lim = EngineManifest.load(folder).limits
    if max(batches) > lim["max_batch"]:
        raise UserError(f"--batch {max(batches)}: {folder} was built with --max-batch {lim['max_batch']} "
                        "(mistral-trt engine ... --max-batch N)")
    if max(prompt_lens) + gen_len > lim["max_context"]:
        raise UserError(f"--prompt-len {max(prompt_lens)} + --gen-len {gen_len}: {folder} was built with "
                        f"--max-context {lim['max_context']}")


# -- systems ---------------------------------------------------------------------------------------
class Ours:
    def __init__(self, folder: Path, provider: str):
        from mistral_trt.runtime.backend import open_backend
        from mistral_trt.runtime.engine import ENGINE_MANIFEST
        from mistral_trt.runtime.generate import Generator

        native = (folder / ENGINE_MANIFEST).is_file()
        self.name = f"ours:{folder.name}" + (":tensorrt-native" if native else "" if provider == "cpu" else f":{provider}")
        self.gen = Generator(open_backend(folder, provider))

    def run(self, prompts: np.ndarray, n: int) -> list[float]:
        """Returns the timestamps of each new token, the call's start first."""
        from mistral_trt.runtime.sampling import Sampling

        t = [time.perf_counter()]
        for _ in self.gen.generate(list(prompts), n, Sampling(), stop_on_eos=False):
            t.append(time.perf_counter())
        return t


class Cpp:
    """The C++ runtime (cpp/) on the same export, through its C ABI: the timestamps are taken in C++ (no callback),
    so the difference to `Ours` on the same folder is the Python runtime's overhead per step."""

    def __init__(self, folder: Path, library: Path):
        from .cpp import CppRuntime

        self.name = f"cpp:{folder.name}"
        self.rt = CppRuntime(library, folder)

    def run(self, prompts: np.ndarray, n: int) -> list[float]:
        if prompts.shape[0] != 1:
            raise UserError("--cpp: the C++ runtime generates one sequence per handle; use --batch 1")
        t0 = time.perf_counter()
        return [t0] + [t0 + t for t in self.rt.time_tokens(prompts[0], n)]


class LlamaCpp:
    """llama.cpp (llama-cpp-python) on a GGUF of the same checkpoint: float32 (export/gguf_convert.py's write_gguf,
    the weights to the bit) or quantized from it by llama.cpp's own quantizer (q8_0, q4_1)."""

    QUANTS = {"f32": None, "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0", "q4_1": "LLAMA_FTYPE_MOSTLY_Q4_1"}

    def __init__(self, source: str, quant: str, cache: Path, n_ctx: int):
        import ctypes

        import llama_cpp

        from mistral_trt.export.gguf_convert import write_gguf

        cache.mkdir(parents=True, exist_ok=True)
        f32 = cache / f"{Path(source).name}-f32.gguf"
        if not f32.is_file():
            write_gguf(Path(source), f32)
        path = f32
        if self.QUANTS[quant]:
            path = cache / f"{Path(source).name}-{quant}.gguf"
            if not path.is_file():
                params = llama_cpp.llama_model_quantize_default_params()
                params.ftype = getattr(llama_cpp, self.QUANTS[quant])
                tmp = path.with_name(f".{path.name}.tmp")
                if llama_cpp.llama_model_quantize(str(f32).encode(), str(tmp).encode(), ctypes.byref(params)):
                    raise UserError(f"llama.cpp could not quantize {f32} to {quant}")
                tmp.replace(path)
        threads = len(os.sched_getaffinity(0))
        self.name = f"llama.cpp-{quant}"
        probe_llama_cpp(path)
        self.llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=threads,
                                   n_threads_batch=threads, verbose=False)
        # every tensor is read per token: the demo's tied token_embd is the output matrix too (its rows for the
        # embedding are few); so its floor is its own bytes, not the float checkpoint's
        self.decode_bytes = self.llm._model.size()

    def run(self, prompts: np.ndarray, n: int) -> list[float]:
        if prompts.shape[0] != 1:
            raise UserError("--baseline llama.cpp generates one sequence at a time; use --batch 1")
        # llama-cpp-python's generate keeps the cache of the previous call's longest common prefix, even with
        # reset=True: every round's prompt would be "cached" after the first and TTFT be a single token's.
        self.llm.reset()
        t = [time.perf_counter()]
        for _ in self.llm.generate(prompts[0].tolist(), top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
            t.append(time.perf_counter())
            if len(t) > n:
                break
        return t


class BaselineUnavailable(Exception):
    """A baseline that cannot run on this machine: skipped with this reason, the rest of the bench goes on."""


# llama.cpp decodes a few tokens in a child process first: some builds crash (a segmentation fault in ggml's AMX
# matmul for its quantized types, seen on a Xeon with AMX under a VM), and a crash in this process would lose
# every system's measurements.
LLAMA_PROBE = r"""
import sys, llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_ctx=64, n_batch=64, n_threads=2, n_threads_batch=2, verbose=False)
for i, _ in enumerate(llm.generate([1, 2, 3, 4, 5, 6, 7, 8], top_k=1, temp=0.0, reset=True)):
    if i == 3:
        break
"""


def probe_llama_cpp(path: Path) -> None:
    import signal
    import subprocess

    r = subprocess.run([sys.executable, "-c", LLAMA_PROBE, str(path)], capture_output=True, text=True, timeout=600)
    if r.returncode:
        how = f"signal {signal.Signals(-r.returncode).name}" if r.returncode < 0 else f"exit code {r.returncode}"
        raise BaselineUnavailable(
            f"llama.cpp could not decode with {path.name} in a child process ({how}); if it crashed on a CPU with AMX, rebuild "
            "llama-cpp-python without it: CMAKE_ARGS='-DGGML_NATIVE=OFF -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON "
            "-DGGML_AMX_INT8=OFF -DGGML_AMX_TILE=OFF' pip install --force-reinstall --no-deps llama-cpp-python==0.3.36")


class HF:
    """transformers eager `generate` on the same checkpoint and dtype; a logits processor timestamps each token.
    With --provider cuda or tensorrt it runs on the GPU (where torch has one), each stamp after the step's kernels
    have finished, so the two sides are timed alike."""

    def __init__(self, source: str, dtype: str, provider: str = "cpu"):
        import torch
        from transformers import MistralForCausalLM
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        self.torch = torch
        self.device = "cuda" if provider != "cpu" and torch.cuda.is_available() else "cpu"
        self.name = "hf-eager" + (":cuda" if self.device == "cuda" else "")
        self.model = MistralForCausalLM.from_pretrained(
            source, dtype={"fp32": torch.float32, "fp16": torch.float16}[dtype],
            attn_implementation="eager").to(self.device).eval()

    def run(self, prompts: np.ndarray, n: int) -> list[float]:
        from transformers import LogitsProcessor, LogitsProcessorList

        stamps = []
        sync = self.torch.cuda.synchronize if self.device == "cuda" else (lambda: None)

        class Stamp(LogitsProcessor):
            def __call__(self, ids, scores):
                sync()
                stamps.append(time.perf_counter())
                return scores

        ids = self.torch.from_numpy(prompts).to(self.device)
        sync()
        t0 = time.perf_counter()
        with self.torch.no_grad():
            self.model.generate(ids, attention_mask=self.torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False, logits_processor=LogitsProcessorList([Stamp()]), pad_token_id=0)
        return [t0] + stamps


class OrtGenai:
    """onnxruntime-genai on a model its own builder made from the same checkpoint: fp32 / fp16 as ours, or its int4
    (`-p int4`: MatMulNBits, block 32, its CPU default accuracy level)."""

    def __init__(self, source: str, dtype: str, cache: Path, provider: str = "cpu"):
        try:
            import onnxruntime_genai as og
        except ImportError:
            raise UserError("--baseline ort-genai needs onnxruntime-genai (pip install onnxruntime-genai)") from None
        ep = "cuda" if provider in ("cuda", "tensorrt") else "cpu"  # its builder writes a model for one provider
        out = cache / f"{Path(source).name}-{dtype}" if ep == "cpu" else cache / f"{Path(source).name}-{dtype}-{ep}"
        if not (out / "genai_config.json").is_file():
            import subprocess

            print(f"building the onnxruntime-genai model in {out} ...", file=sys.stderr, flush=True)
            r = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", source, "-o", str(out),
                                "-p", dtype, "-e", ep, "-c", str(cache / "hf-cache")], capture_output=True, text=True)
            if r.returncode:
                raise UserError(f"onnxruntime-genai's builder failed on {source}: {r.stderr[-500:]}")
        self.og, self.name = og, "ort-genai" if dtype in ("fp32", "fp16") else f"ort-genai-{dtype}"
        self.model = og.Model(str(out))
        self.decode_bytes = graph_decode_bytes(out)  # its own ONNX: int4 is not the checkpoint's bytes

    def run(self, prompts: np.ndarray, n: int) -> list[float]:
        og = self.og
        b, p = prompts.shape
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=p + n, min_length=p + n, do_sample=False, batch_size=b)
        t = [time.perf_counter()]
        gen = og.Generator(self.model, params)
        gen.append_tokens(prompts.astype(np.int32))
        while not gen.is_done():
            gen.generate_next_token()
            t.append(time.perf_counter())
        return t[: n + 1]


# -- the benchmark ---------------------------------------------------------------------------------
@dataclass
class Result:
    system: str
    prompt_len: int
    batch: int
    ttft_s: list[float] = field(default_factory=list)  # one per timed round
    decode_s: list[float] = field(default_factory=list)  # every per-token latency of every timed round
    rss_added_bytes: int = 0

    def summary(self) -> dict:
        d = summarize(self.decode_s)
        ttft = statistics.median(self.ttft_s)
        return {"system": self.system, "prompt_len": self.prompt_len, "batch": self.batch,
                "ttft_ms": ttft * 1e3, "ttft_spread_ms": [min(self.ttft_s) * 1e3, max(self.ttft_s) * 1e3],
                "decode_ms": {k: (v * 1e3 if k != "n" else v) for k, v in d.items()},
                "decode_tok_s": self.batch / d["p50"], "prefill_tok_s": self.prompt_len * self.batch / ttft,
                "rss_added_gib": self.rss_added_bytes / 2**30}


def run_bench(systems: list, prompt_lens: list[int], batches: list[int], gen_len: int, warmup: int, repeat: int,
              vocab: int, seed: int = 0, log=print, probe=None, probes: list | None = None) -> list[Result]:
    """probe: called after every timed round (bandwidth), its values appended to `probes`."""
    rng = np.random.default_rng(seed)
    results = []
    systems = list(systems)

    def timed(s, prompts):
        """s.run, or None where a baseline fails (its runtime's own error): it is dropped, said once, the rest goes on.
        Ours failing is the bench's failure."""
        try:
            return s.run(prompts, gen_len)
        except Exception as e:
            if s is systems[0] or isinstance(e, UserError):
                raise
            log(f"note: {s.name} failed at prompt {prompts.shape[1]}, batch {prompts.shape[0]} and is left out of the "
                f"rest of the run: {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}")
            systems.remove(s)
            return None

    for p in prompt_lens:
        for b in batches:
            prompts = rng.integers(3, vocab, (b, p), dtype=np.int64)
            for s in list(systems):
                for _ in range(warmup):
                    if timed(s, prompts) is None:
                        break
            rs = {s.name: Result(s.name, p, b) for s in systems}
            for r in range(repeat):
                for s in (list(systems) if r % 2 == 0 else systems[::-1]):  # alternate the order too
                    t = timed(s, prompts)
                    if t is None:
                        del rs[s.name]
                        continue
                    rs[s.name].ttft_s.append(t[1] - t[0])
                    rs[s.name].decode_s += list(np.diff(t[1:]))
                if probe is not None:
                    probes.append(probe())
            for s in systems:
                rs[s.name].rss_added_bytes = getattr(s, "rss_added", 0)
            log(f"  prompt {p}, batch {b}: " + ", ".join(
                f"{n} {statistics.median(np.array(x.decode_s)) * 1e3:.1f} ms/token" for n, x in rs.items()))
            results += rs.values()
    return results


def load_system(kind: str, arg, rss_before: int):
    s = kind(*arg)
    s.rss_added = rss_bytes() - rss_before
    return s


def report(results: list[Result], gen_len: int, args: ModelArgs, dtype: str, bandwidth: float,
           weight_bytes: dict[str, int] | None = None, bandwidth_source: str = "read, measured now"
           ) -> tuple[str, dict]:
    """weight_bytes: per system name, the bytes of weights a decode step reads (default: from ModelArgs)."""
    rows = [r.summary() for r in results]
    weight_bytes = weight_bytes or {}
    ours = {}  # the first export folder is "ours": every other row's time over its time (3x: ours is 3x faster)
    for r in rows:
        if r["system"] == rows[0]["system"]:
            ours.setdefault((r["prompt_len"], r["batch"]), r)
    lines = [
        f"memory bandwidth ({bandwidth_source}): {bandwidth / 1e9:.1f} GB/s; decode reads "
        + ", ".join(f"{n} {b / 1e6:.0f} MB" for n, b in weight_bytes.items())
        + (", " if weight_bytes else "") + f"{dtype} checkpoint {decode_weight_bytes(args, dtype) / 1e6:.0f} MB of weights per step",
        "",
        "| system | prompt | batch | TTFT ms | decode p50 ms | p90 | p99 | decode tok/s | prefill tok/s | floor ms | p50/floor | time / first EXPORT_DIR's (decode, TTFT) | RSS added GiB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ctx = r["prompt_len"] + gen_len // 2
        wb = weight_bytes.get(r["system"], decode_weight_bytes(args, dtype))
        floor = (wb + kv_bytes(args, dtype, ctx, r["batch"])) / bandwidth
        r["floor_ms"], r["p50_over_floor"] = floor * 1e3, r["decode_ms"]["p50"] / (floor * 1e3)
        o = ours.get((r["prompt_len"], r["batch"]))
        if o and o is not r:
            r["ours_speedup_decode"] = r["decode_ms"]["p50"] / o["decode_ms"]["p50"]
            r["ours_speedup_ttft"] = r["ttft_ms"] / o["ttft_ms"]
            speed = f"{r['ours_speedup_decode']:.2f}x, {r['ours_speedup_ttft']:.2f}x"
        else:
            speed = "-"
        d = r["decode_ms"]
        lines.append(f"| {r['system']} | {r['prompt_len']} | {r['batch']} | {r['ttft_ms']:.0f} | {d['p50']:.1f} | "
                     f"{d['p90']:.1f} | {d['p99']:.1f} | {r['decode_tok_s']:.1f} | {r['prefill_tok_s']:.0f} | "
                     f"{r['floor_ms']:.1f} | {r['p50_over_floor']:.2f} | {speed} | {r['rss_added_gib']:.2f} |")
    return "\n".join(lines), {"bandwidth_bytes_s": bandwidth, "gen_len": gen_len, "dtype": dtype, "rows": rows}


def parse_target(text: str) -> tuple[str, str, float]:
    """`--target 'A/B>=R'`: system A's decode at least R times as fast as B's (B's p50 / A's p50 >= R)."""
    pair, sep, ratio = text.partition(">=")
    a, slash, b = pair.partition("/")
    try:
        r = float(ratio)
    except ValueError:
        r = 0.0
    if not (sep and slash and a and b and r > 0):
        raise UserError(f"--target {text!r}: expected FAST/SLOW>=RATIO with two system names from the table, e.g. "
                        "'ours:int4/ort-genai-int4>=1.3'")
    return a.strip(), b.strip(), r


def targets_table(rows: list[dict], targets: list[tuple[str, str, float]]) -> tuple[str, list[dict]]:
    """Each target's measured decode ratio at every prompt length and batch of this run, and whether it is met."""
    by = {(r["system"], r["prompt_len"], r["batch"]): r for r in rows}
    out = []
    lines = ["| target | prompt | batch | decode ratio | met |", "|---|---|---|---|---|"]
    for a, b, want in targets:  # names checked by main_bench before measuring
        for (s, p, bt), r in sorted(by.items(), key=lambda kv: (kv[0][1], kv[0][2])):
            if s != a or (b, p, bt) not in by:
                continue
            ratio = float(by[b, p, bt]["decode_ms"]["p50"] / r["decode_ms"]["p50"])
            out.append({"fast": a, "slow": b, "want": want, "prompt_len": p, "batch": bt, "ratio": ratio,
                        "met": bool(ratio >= want)})
            lines.append(f"| {a} >= {want:g}x {b} | {p} | {bt} | {ratio:.2f}x | {'met' if ratio >= want else 'not met'} |")
    return "\n".join(lines), out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    rows = data["rows"]
    for system in dict.fromkeys(r["system"] for r in rows):
        for b in sorted({r["batch"] for r in rows}):
            sel = sorted((r for r in rows if r["system"] == system and r["batch"] == b), key=lambda r: r["prompt_len"])
            x = [r["prompt_len"] for r in sel]
            label = f"{system} (batch {b})"
            axes[0].errorbar(x, [r["decode_ms"]["p50"] for r in sel], marker="o", label=label,
                             yerr=[[r["decode_ms"]["p50"] - r["decode_ms"]["min"] for r in sel],
                                   [r["decode_ms"]["p90"] - r["decode_ms"]["p50"] for r in sel]], capsize=3)
            axes[1].plot(x, [r["ttft_ms"] for r in sel], marker="o", label=label)
    first, b0 = rows[0]["system"], min(r["batch"] for r in rows)  # the floor of the first system (ours)
    floor = sorted((r for r in rows if r["system"] == first and r["batch"] == b0), key=lambda r: r["prompt_len"])
    axes[0].plot([r["prompt_len"] for r in floor], [r["floor_ms"] for r in floor], "k--", label=f"bandwidth floor ({first})")
    axes[0].set(xlabel="prompt length (tokens)", ylabel="decode latency p50 (ms/token; bars: min..p90)", xscale="log", yscale="log")
    axes[1].set(xlabel="prompt length (tokens)", ylabel="time to first token (ms)", xscale="log", yscale="log")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"mistral-trt bench ({data['dtype']}, {data['gen_len']} new tokens)")
    from mistral_trt.calib.evaluate import save_png

    save_png(fig, path)


def main_bench(a) -> None:
    from mistral_trt.runtime.manifest import Manifest

    try:  # bench.png is part of the result: find out now, not after minutes of measuring
        import matplotlib  # noqa: F401
    except ImportError:
        raise UserError("bench draws bench.png with matplotlib, which is not installed: "
                        "pip install 'mistral-trt[bench]'") from None
    for flag, values in (("--prompt-len", a.prompt_len), ("--batch", a.batch)):
        if not values or min(values) < 1:
            raise UserError(f"{flag} {','.join(map(str, values))}: expected comma-separated integers >= 1")
    from mistral_trt.export.atomic import check_report_folder

    out = check_report_folder(a.output, REPORT_FILES, "bench.json", "bandwidth_probes_bytes_s")
    folders = [Path(f) for f in a.export_dirs]
    m = Manifest.load(folders[0])
    for f in folders:
        Manifest.load(f)  # a bad folder fails now, not after minutes of measuring
        check_engine_limits(f, a.batch, a.prompt_len, a.gen_len)
    targets = [parse_target(t) for t in a.target]  # before minutes of measuring
    log = lambda s: print(s, file=sys.stderr, flush=True)  # noqa: E731
    if a.cpp and (a.provider != "cpu" or a.batch != [1]):
        raise UserError("--cpp runs the C++ runtime on onnxruntime's CPU provider, one sequence: --provider cpu --batch 1")
    systems = []
    for f in folders:
        before = rss_bytes()
        systems.append(load_system(Ours, (f, a.provider), before))
        if sum(s.name == systems[-1].name for s in systems) > 1:
            systems[-1].name += f"#{len(systems)}"
        if a.cpp:
            before = rss_bytes()
            systems.append(load_system(Cpp, (f, Path(a.cpp_lib)), before))
    skipped = set()
    for base in a.baseline:
        before = rss_bytes()
        if base.startswith("llama.cpp"):
            quant = base.partition("-")[2] or "f32"
            try:
                import llama_cpp  # noqa: F401
            except ImportError:
                log(f"note: --baseline {base} skipped: llama-cpp-python is not installed (pip install "
                    "llama-cpp-python==0.3.36: it compiles llama.cpp for this CPU, about 10 minutes on 2 cores)")
                skipped.add(f"llama.cpp-{quant}")
                continue
            try:
                systems.append(load_system(LlamaCpp, (m.source["path"], quant, Path(a.genai_cache).parent / "llama-cpp",
                                                      max(a.prompt_len) + a.gen_len + 8), before))
            except BaselineUnavailable as e:
                log(f"note: --baseline {base} skipped: {e}")
                skipped.add(f"llama.cpp-{quant}")
        elif base == "hf":
            systems.append(load_system(HF, (m.source["path"], m.dtype, a.provider), before))
        elif base.startswith("ort-genai"):
            if m.model.sliding_window:
                log("note: onnxruntime-genai's builder ignores a sliding window; its numbers are for full attention")
            precision = base.partition("-genai")[2].lstrip("-") or m.dtype
            systems.append(load_system(OrtGenai, (m.source["path"], precision, Path(a.genai_cache), a.provider), before))
    for name in {n for t in targets for n in t[:2]} - {s.name for s in systems} - skipped:
        raise UserError(f"--target: no system {name!r} in this run; systems: {', '.join(s.name for s in systems)}")
    for t in [t for t in targets if set(t[:2]) & skipped]:
        log(f"note: --target {t[0]}/{t[1]}>={t[2]:g} not checked: {', '.join(sorted(set(t[:2]) & skipped))} was skipped")
        targets.remove(t)
    gc.collect()
    # Host bandwidth drifts on a shared machine (30 to 55 GB/s read within minutes on the CI machine), so it
    # is probed after every timed round and the floor uses the highest value seen: a floor must not be beaten.
    probe = None if a.bandwidth else measure_bandwidth
    probes = [a.bandwidth * 1e9] if a.bandwidth else [measure_bandwidth()]
    log(f"systems: {', '.join(s.name for s in systems)}; bandwidth {probes[0] / 1e9:.1f} GB/s"
        + (" (given with --bandwidth)" if a.bandwidth else " (read, all cores; probed again after every round)"))
    results = run_bench(systems, a.prompt_len, a.batch, a.gen_len, a.warmup, a.repeat, m.model.vocab_size, log=log,
                        probe=probe, probes=probes)
    bandwidth = max(probes)
    how = ("given with --bandwidth" if a.bandwidth else
           f"read, all cores: the highest of {len(probes)} probes during the run, lowest {min(probes) / 1e9:.1f} GB/s")
    per_folder = [f for f in folders for _ in range(2 if a.cpp else 1)]  # a C++ system follows each folder's own
    weight_bytes = {s.name: graph_decode_bytes(f) for s, f in zip(systems, per_folder)}  # counted from each ONNX
    weight_bytes |= {s.name: s.decode_bytes for s in systems[len(per_folder):] if getattr(s, "decode_bytes", None)}
    table, data = report(results, a.gen_len, m.model, m.dtype, bandwidth, weight_bytes, how)
    data["bandwidth_probes_bytes_s"] = probes
    if targets:
        text, data["targets"] = targets_table(data["rows"], targets)
        table += "\n\n" + text
    print(table)
    check_report_folder(out, REPORT_FILES, "bench.json", "bandwidth_probes_bytes_s")  # again: minutes have passed
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(data, indent=2) + "\n")
    (out / "bench.md").write_text(table + "\n")
    plot(data, out / "bench.png")
    log(f"wrote {out}/bench.md, bench.json, bench.png")
