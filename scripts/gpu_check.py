"""GPU check: every precision of the demo model through every GPU path, against onnxruntime CPU fp32.

    python scripts/gpu_check.py build/gpu-check          # after scripts/gpu_check.sh has built the artifacts

For each artifact folder (portable: fp32, fp16, int8-w8a16, int8-w8a8, int4-w4a16; fused: fused-fp16,
fused-int4-fp16) and each path available here — the native TensorRT engine (ENGINE_DIR from `mistral-trt
engine`), onnxruntime's TensorRT execution provider and its CUDA execution provider (the fused graph: CUDA only)
— one table row: logits of a 128-token prefill compared with onnxruntime CPU fp32 (max |Δlogit|, top-1
agreement), whether 64 greedy tokens equal the CPU fp32 run, and decode ms/token. Fused rows also decode the
same 64 tokens speculatively (prompt lookup: drafts verified in one step, rejected ones rolled back in the
device cache) and say whether they equal that path's plain greedy tokens. Writes gpu_check.md and
gpu_check.json beside the artifacts.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np

from mistral_trt.runtime.backend import open_backend
from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.generate import Generator
from mistral_trt.runtime.sampling import Sampling
from mistral_trt.runtime.manifest import Manifest
from mistral_trt.runtime.speculative import Speculation
from mistral_trt.runtime.tokenizer import Tokenizer

ARTIFACTS = ("fp32", "fp16", "int8-w8a16", "int8-w8a8", "int4-w4a16", "fused-fp16", "fused-int4-fp16")

PROMPT = ("Explain, step by step, how a hash map handles collisions, and compare separate chaining with open "
          "addressing in terms of memory use and cache behaviour.")


def logits_and_tokens(backend, ids: np.ndarray, n: int) -> tuple[np.ndarray, list[int], float]:
    cache = backend.new_cache(1, len(ids) + 1)
    cache.admit()
    first = backend.step(cache, [ids], last=False)[0].astype(np.float32)  # every position of the prefill
    t0 = time.perf_counter()
    toks = [int(t[0]) for t in Generator(backend).generate([ids], n, Sampling(), stop_on_eos=False)]
    ms = (time.perf_counter() - t0) * 1e3 / n
    return first, toks, ms


def speculative_tokens(backend, ids: np.ndarray, n: int) -> list[int]:
    gen = Generator(backend)
    toks = [t for step in gen.generate_speculative([ids], n, Speculation.parse("ngram"), Sampling(), stop_on_eos=False)
            for t in step[0]]
    return toks[:n]


def main(root: Path) -> int:
    ref_dir = root / "fp32"
    tok = Tokenizer.for_export(ref_dir, Manifest.load(ref_dir))
    ids = np.asarray(tok.encode(PROMPT, bos=True), np.int64)
    ids = np.resize(ids, 128)  # a 128-token prefill
    ref = ref_logits, ref_toks, cpu_ms = logits_and_tokens(open_backend(ref_dir), ids, 64)
    rows = [{"artifact": "fp32", "path": "onnxruntime cpu", "max_abs_dlogit": 0.0, "top1": 1.0, "greedy_equal": True,
             "decode_ms": cpu_ms}]
    for art in ARTIFACTS:
        if not (root / art).exists():
            continue
        fused = Manifest.load(root / art).graph == "fused"
        # the same artifact on the CPU provider: what the GPU path must reproduce (quantization error excluded)
        try:
            same = ref if art == "fp32" else logits_and_tokens(open_backend(root / art, exact=True), ids, 64)
        except (UserError, RuntimeError) as e:
            same = None
            print(f"{art} / onnxruntime cpu: {e}", file=sys.stderr)
        for path in ("onnxruntime cuda",) if fused else ("tensorrt native", "onnxruntime tensorrt", "onnxruntime cuda"):
            folder = root / (f"engine-{art}" if path == "tensorrt native" else art)
            if not folder.exists():
                continue
            spec = None
            try:
                # an engine folder opens as the native TensorRT backend; an export on the path's provider
                backend = open_backend(folder, "cpu" if path == "tensorrt native" else path.split()[1])
                got, toks, ms = logits_and_tokens(backend, ids, 64)
                if fused:
                    spec = speculative_tokens(backend, ids, 64) == toks
            except (UserError, RuntimeError) as e:
                rows.append({"artifact": art, "path": path, "error": str(e)[:160]})
                print(f"{art} / {path}: {e}", file=sys.stderr)
                continue
            rows.append({"artifact": art, "path": path, "max_abs_dlogit": float(np.abs(got - ref_logits).max()),
                         "top1": float((got.argmax(-1) == ref_logits.argmax(-1)).mean()),
                         "greedy_equal": toks == ref_toks, "greedy_first_diff": next(
                             (i for i, (a, b) in enumerate(zip(toks, ref_toks)) if a != b), None),
                         "decode_ms": ms, "speculative_equal": spec})
            if same is not None:
                rows[-1].update({"max_abs_dlogit_same_cpu": float(np.abs(got - same[0]).max()),
                                 "top1_same_cpu": float((got.argmax(-1) == same[0].argmax(-1)).mean()),
                                 "greedy_equal_same_cpu": toks == same[1]})
            print(rows[-1], file=sys.stderr, flush=True)
    lines = ["| artifact | path | vs CPU fp32: max abs dlogit | top-1 (128 positions) | 64 greedy tokens equal | "
             "vs this artifact on CPU: max abs dlogit | top-1 | greedy equal | decode ms/token | "
             "speculative = plain greedy |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['artifact']} | {r['path']} | error: {r['error']} | | | | | | | |")
        else:
            eq = "yes" if r["greedy_equal"] else f"no (from token {r.get('greedy_first_diff')})"
            spec = {None: "", True: "yes", False: "NO"}[r.get("speculative_equal")]
            same = (f"{r['max_abs_dlogit_same_cpu']:.3g} | {100 * r['top1_same_cpu']:.1f}% | "
                    f"{'yes' if r['greedy_equal_same_cpu'] else 'no'}") if "top1_same_cpu" in r else "- | - | -"
            lines.append(f"| {r['artifact']} | {r['path']} | {r['max_abs_dlogit']:.3g} | {100 * r['top1']:.1f}% | "
                         f"{eq} | {same} | {r['decode_ms']:.2f} | {spec} |")
    table = "\n".join(lines)
    print(table)
    (root / "gpu_check.md").write_text(table + "\n")
    (root / "gpu_check.json").write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[1] if len(sys.argv) > 1 else "build/gpu-check")))
