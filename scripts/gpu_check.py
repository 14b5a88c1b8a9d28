"""The GPU check: everything issue 44 measures, as one script that fits one device lease (scripts/gpu_lease.py
carries it there).

    python scripts/gpu_check.py --out DIR                  # on an NVIDIA GPU host, onnxruntime-gpu installed
    python scripts/gpu_check.py --out DIR --device cpu --quick   # the rehearsal here: same steps, CPU, small sizes

Steps, each timed; a step that fails is a row with its error and the others run; once the budget is spent the steps
left are rows that say so:
  1. the demo (SmolLM2-135M, GGUF -> HF folder) exported four ways: portable and fused graphs, fp32 and fp16
  2. logits: each export on the device's provider (the fused graph with its decode step as a CUDA graph) against the
     portable fp32 on the CPU provider: max |dlogit| over a 128-token prefill, top-1, 32 greedy tokens equal
  3. `mistral-trt bench`: the fused fp16 (ours) and the portable fp16 against onnxruntime-genai (its own builder, the
     same checkpoint) and Hugging Face eager on the same device, prompts 128 and 2048, batch 1 and 4
  4. a Mistral-7B-shaped fp16 decode step (random init; 2 and 4 full-width layers, extrapolated to 32 and labelled
     so) against the HBM floor: 7B's fp16 weight bytes over the copy bandwidth probed in this run
  5. TensorRT: one line saying why it did not run where it cannot
Targets (met / not met): demo decode at batch 1 <= 2.0 ms/token and no slower than onnxruntime-genai; 2048 x 4 no
slower than HF eager; the 7B-shaped step <= 1.3x its floor. Writes DIR/gpu_check.md and DIR/gpu_check.json.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from quality_guard import cpu_name  # scripts/ is this script's own folder on sys.path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = {"demo_decode_ms": 2.0, "vs_genai": 1.0, "vs_hf_2048x4": 1.0, "floor_ratio_7b": 1.3}


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return self.end - time.monotonic()


class Check:
    """Runs the steps, keeps the rows, writes the report after every step (a lease can end at any time)."""

    def __init__(self, out: Path, budget: Budget, device: str):
        self.out, self.budget, self.device = out, budget, device
        self.rows: list[dict] = []
        self.info: dict = {"device": device, "started": time.strftime("%Y-%m-%d %H:%M:%S")}

    def step(self, name: str, fn, *args, need: float = 20):
        if self.budget.left() < need:
            self.rows.append({"step": name, "status": "not run", "why": f"budget: {self.budget.left():.0f} s left, "
                              f"needs about {need:.0f}"})
            self.write()
            return None
        t = time.monotonic()
        print(f"== {name} ({self.budget.left():.0f} s left)", flush=True)
        try:
            got = fn(*args)
            self.rows.append({"step": name, "status": "ok", "seconds": round(time.monotonic() - t, 1),
                              **(got if isinstance(got, dict) else {})})
        except Exception as e:  # a failed step is reported; the others still run
            got = None
            self.rows.append({"step": name, "status": "failed", "seconds": round(time.monotonic() - t, 1),
                              "why": f"{type(e).__name__}: {str(e).strip().splitlines()[-1][:300] if str(e).strip() else ''}"})
            print(f"== FAILED {name}: {self.rows[-1]['why']}", flush=True)
        self.write()
        return got

    def write(self) -> None:
        self.info["targets"] = targets(self.rows)
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "gpu_check.json").write_text(json.dumps({"info": self.info, "rows": self.rows}, indent=2) + "\n")
        (self.out / "gpu_check.md").write_text(report(self.info, self.rows))


def cli(*args, timeout: float) -> str:
    r = subprocess.run([sys.executable, "-m", "mistral_trt.main", *map(str, args)], capture_output=True, text=True,
                       timeout=max(timeout, 1), cwd=ROOT)
    if r.returncode:
        raise RuntimeError((r.stderr.strip() or r.stdout.strip()).splitlines()[-1] if (r.stderr or r.stdout) else
                           f"exit {r.returncode}")
    return r.stdout


def device_info(device: str) -> dict:
    import onnxruntime as ort

    info = {"onnxruntime": ort.__version__, "providers": ort.get_available_providers()}
    if device == "cuda":
        import torch

        info.update(gpu=torch.cuda.get_device_name(0), torch=torch.__version__, cuda=torch.version.cuda)
    else:
        info["cpu"] = cpu_name()
    return info


def exports(work: Path, budget: Budget) -> dict:
    """The demo checkpoint and its four exports (no verify: step 2 compares logits)."""
    hf = work / "demo-hf"
    if not (hf / "config.json").is_file():
        cli("convert-gguf", "-o", hf, "--force", timeout=budget.left())
    made = {}
    for graph in ("portable", "fused"):
        for dtype in ("fp32", "fp16"):
            out = work / f"{graph}-{dtype}"
            if not (out / "manifest.json").is_file():
                cli("export", hf, "-o", out, "--graph", graph, "--dtype", dtype, "--no-verify", "--force",
                    timeout=budget.left())
            made[f"{graph}-{dtype}"] = str(out)
    return {"exports": made}


def logits_rows(work: Path, device: str) -> dict:
    """Each export on the device against the portable fp32 on the CPU provider (128-token prefill, 32 greedy tokens)."""
    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.generate import Generator
    from mistral_trt.runtime.sampling import Sampling

    ids = np.resize(np.arange(100, 228, dtype=np.int64) * 37 % 49000 + 10, 128)

    def run(backend):
        cache = backend.new_cache(1, 256)
        cache.admit()
        first = backend.step(cache, [ids], last=False)[0].astype(np.float32)
        cache.close()
        toks = [int(t[0]) for t in Generator(backend).generate([ids], 32, Sampling(), stop_on_eos=False)]
        return first, toks

    ref, ref_toks = run(open_backend(work / "portable-fp32", "cpu"))
    out = []
    for name in ("portable-fp32", "portable-fp16", "fused-fp32", "fused-fp16"):
        row = {"export": name, "provider": device}
        try:
            got, toks = run(open_backend(work / name, device))
            row.update(max_abs_dlogit=float(np.abs(got - ref).max()), top1=float((got.argmax(-1) == ref.argmax(-1)).mean()),
                       greedy_equal=toks == ref_toks)
        except Exception as e:  # e.g. the CUDA provider's GroupQueryAttention takes fp16 only
            row["error"] = str(e).strip().splitlines()[-1][:200] if str(e).strip() else type(e).__name__
        out.append(row)
        print(row, flush=True)
    return {"logits": out}


def bench(work: Path, device: str, quick: bool, budget: Budget) -> dict:
    prompts, gen, repeat = ("16,64", 8, 1) if quick else ("128,2048", 64, 3)
    dest = work / "bench"
    dtype = "fp16" if device == "cuda" else "fp32"  # onnxruntime-genai's fp16 model is a GPU model
    cli("bench", work / f"fused-{dtype}", work / f"portable-{dtype}", "--provider", device, "--baseline", "hf", "--baseline",
        "ort-genai", "--prompt-len", prompts, "--batch", "1,4", "--gen-len", gen, "--repeat", repeat, "--warmup", 1,
        "--genai-cache", work / "ort-genai", "-o", dest, timeout=budget.left() - 5)
    data = json.loads((dest / "bench.json").read_text())
    return {"bench": [{k: r[k] for k in ("system", "prompt_len", "batch", "ttft_ms")} | {"decode_p50_ms": r["decode_ms"]["p50"]}
                      for r in data["rows"]]}


def bandwidth(device: str) -> float:
    """The floor's bandwidth in bytes/s: on the GPU a device-to-device copy (read + write counted), best of 10; on the
    CPU (the rehearsal) bench's own read probe, all cores."""
    n = 1 << 30
    if device == "cuda":
        import cupy as cp

        a, b = cp.ones(n, cp.uint8), cp.empty(n, cp.uint8)
        start, stop, best = cp.cuda.Event(), cp.cuda.Event(), 0.0
        for _ in range(10):
            start.record()
            cp.copyto(b, a)
            stop.record()
            stop.synchronize()
            best = max(best, 2 * n / (cp.cuda.get_elapsed_time(start, stop) / 1e3))
        return best
    from mistral_trt.bench.latency import measure_bandwidth

    return measure_bandwidth()


def seven_b(work: Path, device: str, quick: bool, budget: Budget) -> dict:
    """The fused fp16 decode step of Mistral-7B's shapes at 2 and 4 layers (random init), extrapolated to 32."""
    from mistral_trt.bench.latency import decode_weight_bytes
    from mistral_trt.runtime.backend import open_backend
    from mistral_trt.runtime.manifest import Manifest

    dtype = "fp16" if device == "cuda" else "fp32"
    layers = (1, 2) if quick else (2, 4)
    step_ms = {}
    for n in layers:
        ckpt, out = work / f"7b-{n}-ckpt", work / f"7b-{n}-fused-{dtype}"
        if not (ckpt / "config.json").is_file():
            subprocess.run([sys.executable, str(ROOT / "scripts" / "measure_export.py"), "--make", str(ckpt), "--layers",
                            str(n), "--dtype", "fp16"], check=True, timeout=budget.left(), capture_output=True)
        if not (out / "manifest.json").is_file():
            cli("export", ckpt, "-o", out, "--graph", "fused", "--dtype", dtype, "--no-verify", "--force",
                timeout=budget.left())
        backend = open_backend(out, device)
        cache = backend.new_cache(1, 512)
        cache.admit()
        backend.step(cache, [np.arange(1, 129)])
        times = []
        for i in range(8 if quick else 40):
            t = time.perf_counter()
            backend.step(cache, [np.array([7 + i])])
            times.append(time.perf_counter() - t)
        step_ms[n] = float(np.median(times[3:]) * 1e3)
        args = Manifest.load(out).model
        del backend, cache
    a, b = layers
    per_layer = (step_ms[b] - step_ms[a]) / (b - a)
    full = step_ms[a] + per_layer * (32 - a)
    bw = bandwidth(device)
    floor_ms = decode_weight_bytes(replace(args, num_layers=32), "fp16") / bw * 1e3
    return {"seven_b": {"step_ms": step_ms, "per_layer_ms": per_layer, "extrapolated_32_layers_ms": full,
                        "bandwidth_gb_s": bw / 1e9, "floor_ms": floor_ms, "ratio_to_floor": full / floor_ms,
                        "dtype": dtype, "note": f"measured at {a} and {b} full-width layers, extrapolated to 32"}}


def tensorrt_row() -> dict:
    if importlib.util.find_spec("tensorrt") is None:
        return {"tensorrt": "not run: tensorrt is not installed here (PyPI's full TensorRT wheels are placeholders for "
                            "NVIDIA's index, which this machine cannot reach); the engine rows need it"}
    return {"tensorrt": "installed: run `mistral-trt engine` and tests/test_tensorrt.py (not part of the lease check)"}


def targets(rows: list[dict]) -> list[dict]:
    by = {r["step"]: r for r in rows if r["status"] == "ok"}
    out = []
    bench_rows = by.get("bench", {}).get("bench", [])

    def p50(system_prefix, prompt, batch):
        return next((r["decode_p50_ms"] for r in bench_rows if r["system"].startswith(system_prefix)
                     and r["prompt_len"] == prompt and r["batch"] == batch), None)

    prompts = sorted({r["prompt_len"] for r in bench_rows})
    if prompts:
        short, long_ = prompts[0], prompts[-1]
        ours = p50("ours:fused-", short, 1)
        genai = p50("ort-genai", short, 1)
        out.append({"target": f"demo decode, batch 1, prompt {short} <= {TARGETS['demo_decode_ms']} ms/token",
                    "value": ours, "met": ours is not None and ours <= TARGETS["demo_decode_ms"]})
        out.append({"target": "demo decode no slower than onnxruntime-genai (batch 1)", "value": genai and ours and genai / ours,
                    "met": bool(genai and ours and genai / ours >= TARGETS["vs_genai"])})
        ours4, hf4 = p50("ours:fused-", long_, 4), p50("hf-eager", long_, 4)
        out.append({"target": f"{long_} x 4 decode no slower than HF eager", "value": hf4 and ours4 and hf4 / ours4,
                    "met": bool(hf4 and ours4 and hf4 / ours4 >= TARGETS["vs_hf_2048x4"])})
    seven = by.get("7B-shaped step", {}).get("seven_b")
    if seven:
        out.append({"target": f"7B-shaped {seven['dtype']} step <= {TARGETS['floor_ratio_7b']}x the memory floor",
                    "value": seven["ratio_to_floor"], "met": seven["ratio_to_floor"] <= TARGETS["floor_ratio_7b"]})
    return out


def report(info: dict, rows: list[dict]) -> str:
    lines = [f"# GPU check ({info.get('started')}, {info.get('gpu') or info.get('cpu') or info['device']})", "",
             f"onnxruntime {info.get('onnxruntime')}, providers {info.get('providers')}", "",
             "| step | status | seconds | note |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['step']} | {r['status']} | {r.get('seconds', '')} | {r.get('why', r.get('tensorrt', ''))} |")
    for r in rows:
        if r.get("logits"):
            lines += ["", "| export | provider | max abs dlogit vs CPU fp32 | top-1 | 32 greedy equal |", "|---|---|---|---|---|"]
            for x in r["logits"]:
                lines.append(f"| {x['export']} | {x['provider']} | " + (f"error: {x['error']} | | |" if "error" in x else
                             f"{x['max_abs_dlogit']:.3g} | {100 * x['top1']:.1f}% | {'yes' if x['greedy_equal'] else 'no'} |"))
        if r.get("bench"):
            lines += ["", "| system | prompt | batch | TTFT ms | decode p50 ms |", "|---|---|---|---|---|"]
            lines += [f"| {x['system']} | {x['prompt_len']} | {x['batch']} | {x['ttft_ms']:.1f} | {x['decode_p50_ms']:.2f} |"
                      for x in r["bench"]]
        if r.get("seven_b"):
            s = r["seven_b"]
            lines += ["", f"7B-shaped {s['dtype']} decode step ({s['note']}): {s['extrapolated_32_layers_ms']:.2f} ms; "
                      f"floor {s['floor_ms']:.2f} ms at {s['bandwidth_gb_s']:.0f} GB/s; "
                      f"{s['ratio_to_floor']:.2f}x the floor"]
    t = info["targets"]
    if t:
        lines += ["", "| target | value | met |", "|---|---|---|"]
        lines += [f"| {x['target']} | {x['value'] if x['value'] is None else round(x['value'], 3)} | "
                  f"{'met' if x['met'] else 'not met'} |" for x in t]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True, help="where gpu_check.md / .json go")
    p.add_argument("--work", type=Path, help="where the exports are built (default: OUT/work)")
    p.add_argument("--budget", type=float, default=520, help="seconds for all the steps (the lease's last call: 9 min)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="cpu: the rehearsal of the same steps")
    p.add_argument("--quick", action="store_true", help="small sizes (the rehearsal)")
    a = p.parse_args(argv)
    work = a.work or a.out / "work"
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MISTRAL_TRT_STORE", str(work / "store"))
    budget = Budget(a.budget)
    check = Check(a.out, budget, a.device)
    check.info.update(device_info(a.device))
    check.step("tensorrt", tensorrt_row, need=0)
    if check.step("exports", exports, work, budget, need=60) is None:
        return 1
    check.step("logits", logits_rows, work, a.device, need=30)
    check.step("bench", bench, work, a.device, a.quick, budget, need=90)
    check.step("7B-shaped step", seven_b, work, a.device, a.quick, budget, need=90)
    print((a.out / "gpu_check.md").read_text())
    return 0 if all(r["status"] != "failed" for r in check.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
