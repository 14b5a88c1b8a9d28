"""Mistral-7B on a 24 GiB CPU machine: quantized exports streamed from a bf16 checkpoint, then decode and TTFT.

    python scripts/measure_7b.py [--precision int8-w8a8-dynamic int4] [--work build/measure-7b] [--keep]

1. A random-init checkpoint with Mistral-7B-Instruct-v0.2's exact shapes, in bf16 like the real weights
   (scripts/measure_export.py --make; kept in WORK for the next run).
2. For each precision: `mistral-trt export CKPT --graph G --precision P` as its own process (wall time and
   peak RSS from GNU time), and the same export of the demo model (G: fused for MatMulNBits precisions,
   portable for the Q/DQ ones: int8-w8a16, which onnxruntime's CPU provider also runs, and int8-w8a8, calibrated
   on the checkpoint one decoder layer at a time). int8-w8a8 needs a calibration set of the model's tokenizer:
   for the 7B shapes it is made by `calibrate` with a tiny random model carrying the same Mistral v1 tokenizer
   (a random 7B's replies would be noise too; what costs is the set's size, --calib-count sequences), for the
   demo by its own fp32 export.
3. Each CPU-runnable artifact in a fresh process (int8-w8a8 is TensorRT's: onnxruntime's CPU provider would
   hold its weights in float32): one 512-token prefill (TTFT) and 32 greedy decode steps, driven through
   the runtime's step contract directly (random weights would hit EOS at random; the step contract has none).
   Bytes per token are counted from the ONNX itself (bench/latency.py), so "effective read bandwidth" =
   bytes per token / decode time per token; the 7B's over the demo's says whether a model 50x larger decodes
   at the same streaming rate (no cliff from paging or layout; target >= 0.7x).

Random weights give meaningless text; what is measured is memory and speed. Prints a table, writes
WORK/measure-7b.json and WORK/measure-7b.png.
"""
from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEMO_HF = ROOT / "build" / "smollm2-135m-instruct"

CHILD = r"""
import json, resource, sys, time
import numpy as np
from mistral_trt.runtime.backend import open_backend
from mistral_trt.bench.latency import graph_decode_bytes
folder, prompt_len, steps = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
t = time.perf_counter()
e = open_backend(folder)
load_s = time.perf_counter() - t
cache = e.new_cache(1, prompt_len + steps + 1)
cache.admit()
prompt = np.random.default_rng(0).integers(3, e.args.vocab_size, prompt_len)
t = time.perf_counter()
tok = int(e.step(cache, [prompt], last=True)[0].argmax())
ttft = time.perf_counter() - t
times = []
for _ in range(steps):
    t = time.perf_counter()
    tok = int(e.step(cache, [[tok]], last=True)[0].argmax())
    times.append(time.perf_counter() - t)
print(json.dumps({"load_s": load_s, "ttft_s": ttft, "decode_ms": 1000 * float(np.median(times)),
                  "bytes_per_token": graph_decode_bytes(folder),
                  "rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))
"""

# The second turn of a conversation on a fused export, through runtime/session.py's Session (the kept cache) and
# from a fresh one (the same prompt fed whole), greedy, EOS ignored (random weights would stop at random).
CHILD_TURNS = r"""
import json, sys, time
import numpy as np
from mistral_trt.runtime.backend import open_backend
from mistral_trt.runtime.generate import Generator
from mistral_trt.runtime.request import Request
from mistral_trt.runtime.sampling import Sampling
from mistral_trt.runtime.session import Session
folder, history, question, reply = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
gen = Generator(open_backend(folder))
rng = np.random.default_rng(1)
def turn(session, prompt):
    req = Request(np.asarray(prompt, np.int64), reply, Sampling(temperature=0.0), stop_on_eos=False)
    t, first, ids = time.perf_counter(), None, []
    for up in session.run(req):
        if up is not None and up.tokens:
            first = first or time.perf_counter() - t
            ids += up.tokens
    return first, ids
one = rng.integers(3, gen.backend.manifest.model.vocab_size, history).tolist()
s = Session(gen)
t1, out1 = turn(s, one)
two = one + out1 + rng.integers(3, gen.backend.manifest.model.vocab_size, question).tolist()
warm, out2 = turn(s, two)
cold, out3 = turn(Session(gen), two)
# Random weights give near-tied logits, and the cold run computes the first turn's reply tokens inside a prefill
# chunk where the kept cache computed them one decode step at a time (other kernels, other rounding): the replies
# are reported, not required to agree (tests/test_prefix_cache.py checks exactness on real weights).
same = next((i for i, (x, y) in enumerate(zip(out2, out3)) if x != y), len(out2))
print(json.dumps({"turn1_tokens": len(one), "turn1_ttft_s": t1, "turn2_tokens": len(two), "cached": s.cached,
                  "turn2_warm_ttft_s": warm, "turn2_cold_ttft_s": cold, "replies_agree_for": same}))
"""


def run_timed(cmd: list[str]) -> tuple[float, float, str]:
    """Wall seconds, peak RSS (GiB) and stdout of one command, from GNU time; its progress goes to our stderr."""
    t = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M", *cmd], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wall = time.perf_counter() - t
    err = re.sub(r"MAXRSS_KB=\d+\n?", "", p.stderr)
    sys.stderr.write(err[-3000:])
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode})")
    return wall, int(re.findall(r"MAXRSS_KB=(\d+)", p.stderr)[-1]) / 2**20, p.stdout


def tiny_with_tokenizer(work: Path) -> Path:
    """A tiny random Mistral with the 7B checkpoint's tokenizer (Mistral v1): it writes the calibration replies."""
    folder = work / "tiny-mistral-v1"
    if not (folder / "config.json").is_file():
        sys.path.insert(0, str(ROOT / "tests"))
        from conftest import make_tiny_mistral

        make_tiny_mistral(folder, sliding_window=None)
    return folder


def calibration(work: Path, name: str, ckpt: Path, count: int) -> Path:
    """A calibration set of `count` chat-formatted sequences, replies written by an fp32 export of `ckpt`."""
    out = work / f"calib-{name}-{count}"
    if not (out / "manifest.json").is_file():
        export = work / f"{name}-calib-model-fp32"
        if not (export / "manifest.json").is_file():
            subprocess.run([cli(), "export", str(ckpt), "-o", str(export), "--no-verify", "--force"], check=True)
        subprocess.run([cli(), "calibrate", str(export), "-o", str(out), "--count", str(count), "--force"], check=True)
    return out


def cli() -> str:
    return str(Path(sys.executable).parent / "mistral-trt")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--precision", nargs="+", default=["int8-w8a8-dynamic", "int4", "int8-w8a16", "int8-w8a8"],
                    help="int8-w8a16, int8-w8a8 and int4-w4a16 are the portable graph (Q/DQ, for TensorRT)")
    ap.add_argument("--calib-count", type=int, default=32, help="calibration sequences for int8-w8a8")
    ap.add_argument("--work", default=str(ROOT / "build" / "measure-7b"))
    ap.add_argument("--prompt-len", type=int, default=512)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--conversation", type=int, default=1500, metavar="N",
                    help="fused exports: a second turn after an N-token first turn, with the kept cache and fed whole")
    ap.add_argument("--keep", action="store_true", help="keep the 7B exports (the checkpoint is always kept)")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "ckpt-7b-bf16"
    if not (ckpt / "config.json").is_file():
        print(f"making {ckpt} (random init, Mistral-7B shapes, bf16) ...", file=sys.stderr, flush=True)
        subprocess.run([sys.executable, str(ROOT / "scripts" / "measure_export.py"), "--make", str(ckpt), "--layers", "32",
                        "--dtype", "bf16"], check=True)
    if not (DEMO_HF / "config.json").is_file():
        subprocess.run([cli(), "convert-gguf", "-o", str(DEMO_HF)], check=True)
    calib = {}
    if "int8-w8a8" in a.precision:
        calib = {ckpt: calibration(work, "7b", tiny_with_tokenizer(work), a.calib_count),
                 DEMO_HF: calibration(work, "demo", DEMO_HF, a.calib_count)}
    rows = []
    for precision in a.precision:
        for model, src in (("Mistral-7B shapes", ckpt), ("demo (SmolLM2-135M)", DEMO_HF)):
            graph = "portable" if precision in ("int8-w8a16", "int8-w8a8", "int4-w4a16") else "fused"
            out = work / f"{'7b' if src == ckpt else 'demo'}-{graph}-{precision}"
            cost_file = work / f"{out.name}.cost.json"
            if (out / "manifest.json").is_file() and cost_file.is_file():
                cost = json.loads(cost_file.read_text())
            else:
                print(f"export {model} -> {precision} ...", file=sys.stderr, flush=True)
                flags = ["--calib", str(calib[src])] if precision == "int8-w8a8" else []
                wall, rss, _ = run_timed([cli(), "export", str(src), "-o", str(out), "--graph", graph,
                                          "--precision", precision, "--force", *flags])
                cost = {"export_s": wall, "export_rss_gib": rss,
                        "size_gib": sum(f.stat().st_size for f in out.iterdir()) / 2**30}
                cost_file.write_text(json.dumps(cost))
            run = {}
            if precision != "int8-w8a8":
                print(f"run {model} {precision}: {a.prompt_len}-token prefill + {a.steps} decode steps ...",
                      file=sys.stderr, flush=True)
                _, _, stdout = run_timed([sys.executable, "-c", CHILD, str(out), str(a.prompt_len), str(a.steps)])
                run = json.loads(stdout)
                run["read_gb_s"] = run["bytes_per_token"] / (run["decode_ms"] / 1000) / 1e9
                if graph == "fused" and a.conversation:
                    print(f"run {model} {precision}: a second turn after {a.conversation} tokens, kept cache and "
                          "fed whole ...", file=sys.stderr, flush=True)
                    _, _, stdout = run_timed([sys.executable, "-c", CHILD_TURNS, str(out), str(a.conversation), "40",
                                              "16"])
                    run["turns"] = json.loads(stdout)
            rows.append({"model": model, "precision": precision, "graph": graph, **cost, **run})
            if src == ckpt and not a.keep:
                import shutil

                shutil.rmtree(out), cost_file.unlink()
    for r in rows:
        demo = next(d for d in rows if d["precision"] == r["precision"] and d["model"].startswith("demo"))
        if "read_gb_s" in r:
            r["read_vs_demo"] = r["read_gb_s"] / demo["read_gb_s"]
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    head = ("| model | graph | precision | export (s) | export peak RSS (GiB) | size (GiB) | run peak RSS (GiB) | load (s) "
            f"| TTFT @{a.prompt_len} (s) | decode (ms/token) | weight bytes/token (GB) | read (GB/s) | read vs demo |")
    print(f"\nCPU: {cpu}, {len(__import__('os').sched_getaffinity(0))} cores; {time.strftime('%Y-%m-%d')}")
    print(head)
    print("|" + "---|" * head.count(" | ") + "---|")
    for r in rows:
        run = (f"| {r['rss_gib']:.2f} | {r['load_s']:.1f} | {r['ttft_s']:.2f} | {r['decode_ms']:.1f} "
               f"| {r['bytes_per_token'] / 1e9:.3f} | {r['read_gb_s']:.2f} | {r['read_vs_demo']:.2f}x |") if "read_gb_s" in r \
            else "| TensorRT artifact: not run on CPU" + " |" * 7
        print(f"| {r['model']} | {r['graph']} | {r['precision']} | {r['export_s']:.0f} | {r['export_rss_gib']:.2f} "
              f"| {r['size_gib']:.2f} {run}")
    turns = [r for r in rows if "turns" in r]
    if turns:
        print(f"\nThe second turn of a conversation (runtime/session.py's Session: the cache kept between turns), "
              "beside the same prompt fed whole:\n")
        print("| model | precision | turn 1: prompt tokens | turn 1 TTFT (s) | turn 2: prompt tokens | cached | "
              "turn 2 TTFT, kept cache (s) | turn 2 TTFT, fed whole (s) | ratio | greedy replies agree for |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for r in turns:
            t = r["turns"]
            print(f"| {r['model']} | {r['precision']} | {t['turn1_tokens']} | {t['turn1_ttft_s']:.1f} | "
                  f"{t['turn2_tokens']} | {t['cached']} | {t['turn2_warm_ttft_s']:.2f} | {t['turn2_cold_ttft_s']:.1f} | "
                  f"{t['turn2_warm_ttft_s'] / t['turn2_cold_ttft_s']:.3f}x | {t['replies_agree_for']} of 16 tokens |")
    (work / "measure-7b.json").write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
        labels = [f"{r['model'].split(' ')[0]}\n{r['precision']}" for r in rows]
        ran = [r for r in rows if "read_gb_s" in r]
        ax[0].bar([f"{r['model'].split(' ')[0]}\n{r['precision']}" for r in ran], [r["read_gb_s"] for r in ran],
                  color=["C0" if "7B" in r["model"] else "C1" for r in ran])
        ax[0].set_ylabel("effective weight read (GB/s)")
        ax[0].set_title("decode: bytes per token / time per token")
        ax[1].bar(labels, [r["export_rss_gib"] for r in rows], color=["C0" if "7B" in r["model"] else "C1" for r in rows])
        ax[1].axhline(16, ls="--", c="k", lw=1)
        ax[1].set_ylabel("export peak RSS (GiB)")
        ax[1].set_title("streamed export, target <= 16 GiB")
        for x in ax:
            x.tick_params(axis="x", labelsize=8)
        fig.suptitle(f"Mistral-7B shapes (bf16 checkpoint) vs the demo model ({cpu}, 2 cores)", fontsize=9)
        fig.tight_layout()
        fig.savefig(work / "measure-7b.png", dpi=110)
        print(f"plot: {work / 'measure-7b.png'}")
    except ImportError:
        pass


if __name__ == "__main__":
    main()
