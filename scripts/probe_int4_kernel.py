"""An int4 kernel of our own against onnxruntime's, on a fused int4 export's decode step (a probe: nothing ships).

    python scripts/probe_int4_kernel.py build/onnx/smollm2-135m-instruct-fused-int8-w8a8-dynamic \\
        build/onnx/smollm2-135m-instruct-fused-int4 --positions 128 400 --rounds 4

Builds scripts/int4_kernel_probe.cc (g++, AVX2; onnxruntime's C++ headers from `make cpp`'s build/cpp-deps) into
a custom-op library, checks it against MatMulNBits on the int4 export's own first-layer weights, then times
decode steps (one token, next-token logits, the cache holding P positions) in a fresh process per measurement,
the variants alternated round by round:

    int8              the int8 export as it is
    int4              the int4 export as it is (onnxruntime's MatMulNBits)
    int4, probe op    its 4-bit layer MatMulNBits on the probe op (same initializers)
    per-call cost     those calls quantizing their activations and dispatching an empty parallel-for
    no layer MatMuls  those calls writing zeros instead (everything else kept: attention, norms, the lm_head)
    no MatMuls        every MatMulNBits writing zeros, the lm_head's too

From them: each variant's layer-MatMul time and read rate, and the int4 / int8 decode ratio that one kernel
streaming both widths' layer weights at a rate R would give, (L8 / R + S) / (L4 / R + S), S being the step
without its layer MatMuls: what any kernel, ours or onnxruntime's, can reach on this model and machine.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SOURCE = Path(__file__).with_name("int4_kernel_probe.cc")
DOMAIN = "mtrt_probe"


def fail(message: str) -> None:
    print(f"probe_int4_kernel: {message}", file=sys.stderr)
    sys.exit(2)


def build(include: Path, out: Path) -> Path:
    if not (include / "onnxruntime_cxx_api.h").is_file():
        fail(f"--include {include}: no onnxruntime_cxx_api.h there (`make cpp` fetches it)")
    if "avx2" not in Path("/proc/cpuinfo").read_text():
        fail("this CPU has no AVX2, which the probe kernel is written for")
    lib = out / "libint4_kernel_probe.so"
    try:
        subprocess.run(["g++", "-O3", "-mavx2", "-mfma", "-shared", "-fPIC", "-std=c++17", f"-I{include}", str(SOURCE),
                        "-o", str(lib)], check=True)
    except (OSError, subprocess.CalledProcessError) as e:
        fail(f"building {SOURCE.name} with g++ failed: {e}")
    return lib


def session(model, lib: Path | None):
    import onnxruntime as ort

    o = ort.SessionOptions()
    o.log_severity_level = 3
    if lib is not None:
        o.register_custom_ops_library(str(lib))
    return ort.InferenceSession(model, o, providers=["CPUExecutionProvider"])


def attrs(node) -> dict:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def layer_matmuls(model, vocab: int) -> list[tuple]:
    """(node, attributes) of every MatMulNBits but the lm_head's (the one whose N is the vocabulary)."""
    return [(n, a) for n in model.graph.node if n.op_type == "MatMulNBits" for a in [attrs(n)] if a["N"] != vocab]


def rewrite(model, keep_lm_head: bool, mode: int, vocab: int):
    """A copy of `model` with its MatMulNBits on the probe op in `mode`: all but the lm_head (keep_lm_head) or all.
    Mode 0 computes, so main checks first that every layer MatMulNBits is one the op computes."""
    import onnx
    from onnx import helper

    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes = list(m.graph.node)
    del m.graph.node[:]
    for n in nodes:
        a = attrs(n) if n.op_type == "MatMulNBits" else {}
        take = a and not (keep_lm_head and a["N"] == vocab)
        m.graph.node.append(helper.make_node("Q4Gemm", list(n.input[:3]), list(n.output), name=n.name, domain=DOMAIN,
                                             K=a["K"], N=a["N"], mode=mode) if take else n)
    m.opset_import.append(helper.make_opsetid(DOMAIN, 1))
    return m


def layer_bytes(model, vocab: int) -> int:
    from onnx import numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    return sum(numpy_helper.to_array(inits[name]).nbytes for n, _ in layer_matmuls(model, vocab) for name in n.input[1:3])


def agreement(model, lib: Path) -> list[str]:
    """The probe op against MatMulNBits on the export's first 4-bit weights of each shape, 1 and 4 rows."""
    from onnx import TensorProto, helper, numpy_helper

    inits = {i.name: i for i in model.graph.initializer}
    rng = np.random.default_rng(0)
    lines, seen = [], set()
    for n in model.graph.node:
        a = attrs(n) if n.op_type == "MatMulNBits" else {}
        if not a or a["bits"] != 4 or (a["K"], a["N"]) in seen:
            continue
        seen.add((a["K"], a["N"]))
        ws = [numpy_helper.from_array(numpy_helper.to_array(inits[x]), f"w{i}") for i, x in enumerate(n.input[1:3])]
        outs = []
        for probe in (False, True):
            node = (helper.make_node("Q4Gemm", ["x", "w0", "w1"], ["y"], domain=DOMAIN, K=a["K"], N=a["N"], mode=0)
                    if probe else helper.make_node("MatMulNBits", ["x", "w0", "w1"], ["y"], domain="com.microsoft",
                                                   **{k: a[k] for k in ("K", "N", "bits", "block_size", "accuracy_level")}))
            g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, a["K"]])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], ws)
            outs.append(session(helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(
                "com.microsoft", 1), helper.make_opsetid(DOMAIN, 1)]).SerializeToString(), lib if probe else None))
        for rows in (1, 4):
            x = rng.standard_normal((rows, a["K"])).astype(np.float32)
            ref, got = (s.run(None, {"x": x})[0] for s in outs)
            lines.append(f"{n.name} (K {a['K']}, N {a['N']}), {rows} row(s): max |probe - MatMulNBits| "
                         f"{np.abs(got - ref).max():.2e}, max |y| {np.abs(ref).max():.2f}")
    return lines


def step_time(folder: str, graph: str, lib: str, positions: int, steps: int) -> float:
    """One process's measurement: ms per decode step."""
    from mistral_trt.runtime.backend import open_backend

    b = open_backend(folder)
    if graph != "-":
        b.session = session(graph, Path(lib))
        b._bound = None  # FusedBackend binds its IOBinding to a session
    c = b.new_cache(1, positions + 8)
    c.admit()
    rng = np.random.default_rng(0)
    b.step(c, [list(rng.integers(100, 10000, positions))])
    token = lambda: [list(rng.integers(100, 10000, 1))]  # noqa: E731
    for _ in range(5):
        b.step(c, token())
        c.rollback(0, 1)
    t = time.perf_counter()
    for _ in range(steps):
        b.step(c, token())
        c.rollback(0, 1)
    return (time.perf_counter() - t) / steps * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("int8", type=Path, nargs="?", help="fused int8-w8a8-dynamic export folder")
    ap.add_argument("int4", type=Path, nargs="?", help="fused int4 export folder (block 32)")
    ap.add_argument("--positions", type=int, nargs="+", default=[128, 400])
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--include", type=Path, default=ROOT / "build" / "cpp-deps" / "include")
    ap.add_argument("--step", nargs=5, help=argparse.SUPPRESS)  # internal: one measurement in this process
    a = ap.parse_args()
    if a.step:
        print(f"{step_time(a.step[0], a.step[1], a.step[2], int(a.step[3]), int(a.step[4])):.4f}")
        return
    import onnx

    from mistral_trt.bench.latency import measure_bandwidth
    from mistral_trt.runtime.manifest import Manifest

    if a.int4 is None:
        ap.error("the int8 and int4 export folders are required")
    for f in (a.int8, a.int4):
        if not (f / "model.onnx").is_file():
            fail(f"{f}: no model.onnx (a fused export folder is expected)")
    vocab = Manifest.load(a.int4).model.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        lib = build(a.include, tmp)
        m4, m8 = onnx.load(str(a.int4 / "model.onnx")), onnx.load(str(a.int8 / "model.onnx"))
        for f, m, want in ((a.int4, m4, (4, 32, 3)), (a.int8, m8, None)):
            kinds = {(x["bits"], x["block_size"], len(n.input)) for n, x in layer_matmuls(m, vocab)}
            ok = kinds == {want} if want else bool(kinds) and {k[0] for k in kinds} == {8}
            if not ok:
                fail(f"{f}: expected a fused export whose layer MatMulNBits are all "
                     + ("4-bit, block 32, without zero points or bias" if want else "8-bit")
                     + f"; found (bits, block size, inputs) {sorted(kinds) or 'none'}")
        calls = len(layer_matmuls(m4, vocab))
        L4, L8 = layer_bytes(m4, vocab), layer_bytes(m8, vocab)
        print("\n".join(agreement(m4, lib)))
        graphs = {"int4, probe op": rewrite(m4, True, 0, vocab), "per-call cost": rewrite(m4, True, 2, vocab),
                  "no layer MatMuls": rewrite(m4, True, 1, vocab), "no MatMuls": rewrite(m4, False, 1, vocab)}
        variants = {"int8": (a.int8, "-"), "int4": (a.int4, "-")}
        for i, (name, g) in enumerate(graphs.items()):
            onnx.save(g, str(tmp / f"{i}.onnx"))
            variants[name] = (a.int4, str(tmp / f"{i}.onnx"))
        del m4, m8, graphs
        t: dict[tuple[str, int], list[float]] = {}
        floors = []
        for r in range(a.rounds):
            for p in a.positions:
                for name, (folder, graph) in variants.items():
                    out = subprocess.run([sys.executable, __file__, "--step", str(folder), graph, str(lib),
                                          str(p), str(a.steps)], capture_output=True, text=True, check=True).stdout
                    t.setdefault((name, p), []).append(float(out.split()[-1]))
            floors.append(measure_bandwidth())
            print(f"round {r + 1}/{a.rounds} done", file=sys.stderr)
    med = {k: statistics.median(v) for k, v in t.items()}
    R = max(floors) / 1e9
    print(f"\nlayer MatMulNBits weights: int8 {L8 / 1e6:.1f} MB, int4 {L4 / 1e6:.1f} MB; read rate (all cores, "
          f"highest of {len(floors)} probes) {R:.1f} GB/s; medians of {a.rounds} fresh processes, {a.steps} steps each\n")
    print("| decode step, ms | " + " | ".join(f"@{p}" for p in a.positions) + " |")
    print("|---|" + "---|" * len(a.positions))
    for name in variants:
        print(f"| {name} | " + " | ".join(f"{med[(name, p)]:.2f}" for p in a.positions) + " |")
    print("\n| derived | " + " | ".join(f"@{p}" for p in a.positions) + " |")
    print("|---|" + "---|" * len(a.positions))
    rows = []
    for p in a.positions:
        S = med[("no layer MatMuls", p)]
        mm = {k: med[(k, p)] - S for k in ("int8", "int4", "int4, probe op")}
        rate = {k: (L8 if k == "int8" else L4) / 1e6 / v for k, v in mm.items()}
        bound = lambda R_: (L8 / 1e6 / R_ + S) / (L4 / 1e6 / R_ + S)  # noqa: E731
        rows.append({
            "layer MatMuls: int8 / int4 / probe (ms)": f"{mm['int8']:.2f} / {mm['int4']:.2f} / {mm['int4, probe op']:.2f}",
            "their read rate (GB/s)": f"{rate['int8']:.0f} / {rate['int4']:.0f} / {rate['int4, probe op']:.0f}",
            "probe op's cost per call (µs)": f"{(med[('per-call cost', p)] - S) / calls * 1e3:.1f}",
            "lm_head + everything else (ms)": f"{S - med[('no MatMuls', p)]:.2f} + {med[('no MatMuls', p)]:.2f}",
            "int4 / int8, onnxruntime's kernels": f"{med[('int8', p)] / med[('int4', p)]:.2f}x",
            "int4 with the probe op / int8": f"{med[('int8', p)] / med[('int4, probe op', p)]:.2f}x",
            "probe op / onnxruntime's int4": f"{med[('int4', p)] / med[('int4, probe op', p)]:.2f}x",
            "one kernel for both at int8's rate / the probe's / the read rate": (
                f"{bound(rate['int8']):.2f}x / {bound(rate['int4, probe op']):.2f}x / {bound(R):.2f}x"),
        })
    for key in rows[0]:
        print(f"| {key} | " + " | ".join(r[key] for r in rows) + " |")


if __name__ == "__main__":
    main()
