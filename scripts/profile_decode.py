"""Where a decode step's time goes: onnxruntime's profiler over decode steps at a given context length.

    python scripts/profile_decode.py build/onnx/smollm2-135m-instruct-fp32 --context 128 2048 --steps 32

Per context: the cache is filled by one prefill, then `steps` decode steps run with profiling on; node
events are summed by operator type and printed as ms per step and share of the step, largest first.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np


def profile(folder: Path, context: int, steps: int) -> tuple[dict[str, float], float, int]:
    import onnxruntime as ort

    from mistral_trt.runtime.backend import open_backend

    e = open_backend(folder)  # portable or fused
    with tempfile.TemporaryDirectory() as tmp:
        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.profile_file_prefix = os.path.join(tmp, "decode")
        opts.log_severity_level = 3
        e.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        cache = e.new_cache(1, context + steps + 1)
        cache.admit()
        ids = np.random.default_rng(0).integers(3, e.args.vocab_size, context)
        e.step(cache, [ids])
        e.session.end_profiling()  # the prefill's profile is discarded: a fresh session times the decode steps
        e.session = ort.InferenceSession(str(folder / "model.onnx"), opts, providers=["CPUExecutionProvider"])
        e._bound = None  # FusedBackend: its IOBinding belonged to the first session
        for _ in range(steps):
            e.step(cache, [ids[:1]])
        events = json.loads(Path(e.session.end_profiling()).read_text())
    by_op: dict[str, float] = defaultdict(float)
    nodes = set()
    total = 0.0
    for ev in events:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            by_op[ev["args"]["op_name"]] += ev["dur"] / 1e3 / steps
            nodes.add(ev["name"])
        elif ev.get("cat") == "Session" and ev["name"] == "model_run":
            total += ev["dur"] / 1e3 / steps
    return dict(by_op), total, len(nodes)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("folder", type=Path)
    ap.add_argument("--context", type=int, nargs="+", default=[128, 2048])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--top", type=int, default=12)
    a = ap.parse_args()
    for ctx in a.context:
        by_op, total, n = profile(a.folder, ctx, a.steps)
        kernels = sum(by_op.values())
        print(f"\n{a.folder.name}, context {ctx}: {total:.2f} ms per decode step (model_run), kernels {kernels:.2f} ms "
              f"over {n} nodes, outside kernels {total - kernels:.2f} ms")
        print("| op | ms / step | share of step |\n|---|---|---|")
        for op, ms in sorted(by_op.items(), key=lambda x: -x[1])[:a.top]:
            print(f"| {op} | {ms:.3f} | {100 * ms / total:.1f}% |")


if __name__ == "__main__":
    main()
