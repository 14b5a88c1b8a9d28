"""Reduced-precision artifacts from an fp32 export, each a new export folder with its own manifest.

    fp16        the export's strongly typed fp16 mode (re-exported from the source checkpoint): weights,
                activations and KV cache in fp16, with RMSNorm statistics, RoPE and softmax computed in fp32
                inside the graph (HF's own modelling code does the upcasts)
    int8-w8a16  per-output-channel symmetric int8 weights for every MatMul, as explicit
                DequantizeLinear(int8 weight, fp32 scale, zero point 0, axis=1) in front of the MatMul;
                activations, norms, softmax, masks and the residual stream stay float32

    int8-w8a8   int8-w8a16's weights plus int8 activations into the layers' weight MatMuls: SmoothQuant migration
                (alpha chosen per activation by measured output error), then one per-tensor symmetric
                QuantizeLinear/DequantizeLinear pair (zero point 0) per MatMul input, its scale calibrated on
                the calibration set. Masks, softmax, norms and the residual stream stay float; activations
                with "massive" outlier channels (max > outlier_ratio x their 99.99th percentile) stay float too,
                and so does lm_head's input (its weights are int8).

    int8-w8a8-dynamic   (fused graph only, export --graph fused) onnxruntime's MatMulNBits with 8-bit weights:
                symmetric int8 per block of 32 input channels, and activations quantized to int8 per block at
                run time (accuracy_level 4: integer dot products). One fused kernel per MatMul, lm_head included;
                the embedding table stays float for its Gather. Quantized by onnxruntime's own
                MatMulNBitsQuantizer. Needs no calibration set.

The first three are what TensorRT 10/11 wants (strongly typed fp16; explicit symmetric Q/DQ) and run on onnxruntime's
CPU provider, so CI checks them.

Measured on the demo model (Δppl vs fp32) while choosing int8-w8a8's defaults. First 3,000 held-out tokens:
no smoothing +143 %; alpha 0.5 everywhere +34 % (max), +166 % (percentile 99.99), +23 % (MSE clip);
alpha per activation by output error +3.2 % (max), +21.6 % (MSE clip: it clips the rare massive tokens);
one group at a time (alpha 0.5, max): qkv +0.9 %, o +0.3 %, gate/up +1.3 %, down +29 %, lm_head +0.7 % —
down_proj's input is the problem: layer 11's has a channel at 3065 against a 99.99th percentile of 3.7.
Whole held-out text (11,551 tokens): auto alpha + max +3.40 %; + outlier tokens in the alpha search
+3.10 %; + lm_head input float (the default) +2.73 %.
"""
from __future__ import annotations

import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from mistral_trt.runtime.errors import UserError
from mistral_trt.runtime.manifest import ONNX_DATA_NAME, ONNX_NAME, Manifest

PRECISIONS = ("fp16", "int8-w8a16", "int8-w8a8", "int8-w8a8-dynamic")
FUSED_PRECISIONS = ("fp16", "int8-w8a8-dynamic")  # what a --graph fused export takes; the others are Q/DQ graphs
NBITS_BLOCK = 32  # int8-w8a8-dynamic's default block: the best quality of 32/64/128 (README table); 64 decodes 10-17 % faster
EXTERNAL_DATA_THRESHOLD = 2**31 - 2**26


def quantize(src: str | Path, precision: str, out: str | Path, force: bool = False, calib: str | Path | None = None,
             calib_method: str = "max", alpha: str | float = "auto", outlier_ratio: float = 20.0,
             block_size: int = NBITS_BLOCK, log=lambda s: print(s, file=sys.stderr, flush=True)) -> Manifest:
    from mistral_trt.export.atomic import atomic_folder, check_target
    from mistral_trt.runtime.integrity import hash_file

    src = Path(src)
    m = Manifest.load(src)
    check_target(out, "export", force, inputs=[src, calib])  # before any work
    if precision not in PRECISIONS:
        raise UserError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if m.dtype != "fp32":
        raise UserError(f"{src}: quantize starts from an fp32 export, this one is {m.dtype}")
    if not (outlier_ratio > 1 and outlier_ratio != float("inf")):
        raise UserError(f"--outlier-ratio {outlier_ratio}: expected a finite number > 1")
    if block_size < 16 or block_size & (block_size - 1):
        raise UserError(f"--block-size {block_size}: expected a power of two >= 16 (onnxruntime MatMulNBits)")
    if (m.graph == "fused") != (precision in FUSED_PRECISIONS) and precision != "fp16":
        need = "a --graph fused export" if precision in FUSED_PRECISIONS else "a --graph portable export (Q/DQ for TensorRT)"
        raise UserError(f"{src}: --precision {precision} needs {need}; this one is graph {m.graph!r}")
    if precision == "int8-w8a8":
        if calib is None:
            raise UserError("--precision int8-w8a8 calibrates activations: pass --calib CALIB (from `mistral-trt calibrate`)")
        if calib_method not in CALIB_METHODS:
            raise UserError(f"--calib-method {calib_method!r}: expected one of {', '.join(CALIB_METHODS)}")
        from mistral_trt.calib.data import load, load_manifest

        calib_manifest = load_manifest(calib)
        seqs = load(calib)
    m.check_files(src)  # quantizing weights that changed after export would publish garbage with a new hash
    if precision == "fp16":
        from mistral_trt.export.pipeline import export_model

        new = export_model(m.source["path"], out, dtype="fp16", force=force, graph=m.graph)
        new.precision = {"name": "fp16", "method": "export --dtype fp16 (HF modelling code, fp32 norms/RoPE/softmax)",
                         "from": str(src.absolute())}
        new.save(out)
        return new
    need = sum((src / n).stat().st_size for n in m.files)
    with atomic_folder(out, force, kind="export", inputs=[src, calib], need_bytes=need) as tmp:
        if precision == "int8-w8a8-dynamic":
            stats = nbits_int8(src / ONNX_NAME, tmp / ONNX_NAME, block_size)
            m.precision = {"name": precision, "method": f"onnxruntime MatMulNBits: symmetric int8 weights per block of "
                           f"{block_size}, int8 activations per block at run time (accuracy_level 4)", "calibration": None,
                           "block_size": block_size}
        elif precision == "int8-w8a16":
            stats = weight_only_int8(src / ONNX_NAME, tmp / ONNX_NAME)
            m.precision = {"name": precision, "method": "per-channel symmetric int8 weights (DequantizeLinear, zero point 0)",
                           "calibration": None}
        else:
            alphas = {} if alpha == "auto" else {g: float(alpha) for g in GROUPS}
            stats = int8_w8a8(src, tmp / ONNX_NAME, seqs, alphas, calib_method, groups=ACTIVATION_GROUPS,
                              outlier_ratio=outlier_ratio, log=log)
            acts = stats.pop("activations")
            (tmp / "quantization.json").write_text(json.dumps(acts, indent=1) + "\n")
            kept = [r["activation"] for r in acts if r.get("kept_float")]
            m.precision = {
                "name": precision,
                "method": (f"SmoothQuant (alpha {alpha}{' per activation, by output error' if alpha == 'auto' else ''}) + "
                           f"per-tensor symmetric int8 activations ({calib_method} calibration, QuantizeLinear/"
                           "DequantizeLinear, zero point 0) + per-channel symmetric int8 weights"),
                "calibration": {"path": str(Path(calib).absolute()), "sha256": calib_manifest["sha256"],
                                "sequences": len(seqs), "method": calib_method},
                "quantized_activations": len(acts) - len(kept),
                "float_activations": kept, "outlier_ratio": outlier_ratio, "details": "quantization.json",
            }
        for name in m.tokenizer_files:
            shutil.copy2(src / name, tmp / name)
        names = [n for n in (ONNX_NAME, ONNX_DATA_NAME) if (tmp / n).exists()] + m.tokenizer_files
        m.files = {n: hash_file(tmp / n) for n in names}
        m.precision.update({"from": str(src.absolute()), "quantized_matmuls": stats["matmuls"], "weight_bytes": stats["bytes"]})
        m.verification = []
        m.save(tmp)
    return Manifest.load(out)


def weight_only_int8(src: Path, dst: Path) -> dict:
    import onnx

    model = onnx.load(str(src))
    fold_weight_transposes(model)  # a tied lm_head reaches its MatMul through a Transpose: quantize it too
    stats = weight_only_int8_model(model)
    save_model(model, dst)
    return stats


def nbits_int8(src: Path, dst: Path, block_size: int = NBITS_BLOCK) -> dict:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer").setLevel(logging.WARNING)  # a line per node
    q = MatMulNBitsQuantizer(onnx.load(str(src)), bits=8, block_size=block_size, is_symmetric=True, accuracy_level=4)
    q.process()
    model = q.model.model
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    packed = {i for n in nodes for i in n.input[1:3]}
    nbytes = sum(len(t.raw_data) for t in model.graph.initializer if t.name in packed)
    save_model(model, dst)
    return {"matmuls": len(nodes), "bytes": nbytes}


def save_model(model, dst: Path) -> None:
    import onnx

    external = model.ByteSize() >= EXTERNAL_DATA_THRESHOLD
    onnx.save(model, str(dst), save_as_external_data=external, all_tensors_to_one_file=True, location=ONNX_DATA_NAME)


def weight_only_int8_model(model) -> dict:
    """Every MatMul whose second input is a 2-D initializer W [K, N] gets
    DequantizeLinear(round(W / s) int8, s float32 [N], zero point int8 0 [N], axis=1), s = max|W[:, n]| / 127."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    new_nodes, done, nbytes = [], {}, 0
    for node in g.node:
        if node.op_type == "MatMul" and node.input[1] in inits:
            name = node.input[1]
            if name not in done:
                w = numpy_helper.to_array(inits[name])
                if w.ndim != 2 or w.dtype != np.float32:
                    new_nodes.append(node)
                    continue
                scale = weight_scale(w)
                q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)  # symmetric: -128 unused
                g.initializer.extend([
                    numpy_helper.from_array(q, f"{name}_int8"),
                    numpy_helper.from_array(scale, f"{name}_scale"),
                    numpy_helper.from_array(np.zeros(scale.shape, np.int8), f"{name}_zero_point"),
                ])
                new_nodes.append(helper.make_node("DequantizeLinear", [f"{name}_int8", f"{name}_scale", f"{name}_zero_point"],
                                                  [f"{name}_dq"], name=f"{name}_DequantizeLinear", axis=1))
                done[name] = f"{name}_dq"
                nbytes += q.nbytes + scale.nbytes
            node.input[1] = done[name]
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    still_used = {i for node in g.node for i in node.input}
    keep = [t for t in g.initializer if t.name in still_used]
    del g.initializer[:]
    g.initializer.extend(keep)
    return {"matmuls": len(done), "bytes": nbytes}


def weight_scale(w: np.ndarray) -> np.ndarray:
    """Per output column of W [K, N]: max |W[:, n]| / 127 (an all-zero column gets 1)."""
    scale = (np.abs(w).max(axis=0) / 127).astype(np.float32)
    scale[scale == 0] = 1.0
    return scale


def fold_weight_transposes(model) -> int:
    """MatMul(x, Transpose(W)) with W an initializer -> MatMul(x, W^T) with W^T a new initializer (the tied
    lm_head of a model like SmolLM2 reaches the graph this way), so weight quantizers see every weight."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    folded = 0
    for node in g.node:
        p = producer.get(node.input[1]) if node.op_type == "MatMul" else None
        if p is not None and p.op_type == "Transpose" and p.input[0] in inits:
            w = numpy_helper.to_array(inits[p.input[0]])
            perm = [a.ints for a in p.attribute if a.name == "perm"]
            wt = np.ascontiguousarray(np.transpose(w, list(perm[0]) if perm else None))
            name = f"{p.input[0]}.T"
            if name not in inits:
                g.initializer.append(numpy_helper.from_array(wt, name))
                inits[name] = g.initializer[-1]
            node.input[1] = name
            folded += 1
    used = {i for n in g.node for i in n.input} | {o.name for o in g.output}
    dead = [n for n in g.node if n.op_type == "Transpose" and n.input[0] in inits and n.output[0] not in used]
    for n in dead:
        g.node.remove(n)
    return folded


# ---------------------------------------------------------------------------------------------------------------
# int8-w8a8: SmoothQuant migration + calibrated per-tensor activation scales
# ---------------------------------------------------------------------------------------------------------------

CALIB_METHODS = ("max", "percentile", "mse")
GROUPS = ("qkv", "o", "gate_up", "down", "lm_head")  # the weight MatMuls of a Mistral layer, by the input they read
# lm_head's input stays float (its weights are int8): quantizing it costs +0.25 % ppl on the demo for one MatMul
ACTIVATION_GROUPS = ("qkv", "o", "gate_up", "down")


def weight_matmuls(model, args) -> dict[str, tuple[str, list]]:
    """activation name -> (group, MatMul nodes reading it with a 2-D float initializer weight [K, N])."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    acts: dict[str, list] = {}
    for n in model.graph.node:
        w = inits.get(n.input[1]) if n.op_type == "MatMul" else None
        if w is not None and len(w.dims) == 2 and w.data_type == TensorProto.FLOAT:
            acts.setdefault(n.input[0], []).append(n)
    out = {}
    for a, users in acts.items():
        k, n = inits[users[0].input[1]].dims
        group = ("qkv" if len(users) == 3 else "gate_up" if len(users) == 2 else "down" if k == args.intermediate_size
                 else "lm_head" if n == args.vocab_size else "o")
        out[a] = (group, users)
    return out


def activation_stats(model, manifest, seqs, acts: list[str], rows_per_seq: int = 32, batch: int = 8, log=print):
    """One pass over the calibration sequences: per-channel max |x| of every activation (all rows) and a
    random sample of rows (for percentile / MSE scales after smoothing). Sequences are batched with right
    padding: causal attention means padding never changes a real position, and padded rows are dropped.
    Each batch also contributes its two rows with the largest |x| (BOS and other attention-sink tokens carry
    outliers that a random sample would miss, and they matter to every later token)."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for a in acts:
        probe.graph.output.append(helper.make_empty_tensor_value_info(a))
    with tempfile.TemporaryDirectory() as tmp:  # a file, not bytes: models over 2 GB need external data
        path = Path(tmp) / "probe.onnx"
        save_model(probe, path)
        del probe
        opts = ort.SessionOptions()
        opts.log_severity_level = 3
        sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    a_ = manifest.model
    rng = np.random.default_rng(0)
    amax: dict[str, np.ndarray] = {}
    rows: dict[str, list] = {a: [] for a in acts}
    order = np.argsort([len(s) for s in seqs])  # similar lengths together: little padding
    t0 = time.perf_counter()
    for i in range(0, len(order), batch):
        group = [seqs[j] for j in order[i:i + batch]]
        b, s = len(group), max(len(x) for x in group)
        ids = np.zeros((b, s), np.int64)
        mask = np.zeros((b, s), np.int64)
        for r, x in enumerate(group):
            ids[r, :len(x)], mask[r, :len(x)] = x, 1
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.broadcast_to(np.arange(s), (b, s)).copy()}
        for name in manifest.input_names()[3:]:
            feed[name] = np.zeros((b, a_.num_kv_heads, 0, a_.head_dim), np.float32)
        outs = sess.run(acts, feed)
        valid = mask.reshape(-1).astype(bool)
        for a, o in zip(acts, outs):
            x = o.reshape(b * s, -1)[valid]
            m = np.abs(x).max(0)
            amax[a] = m if a not in amax else np.maximum(amax[a], m)
            top = np.argsort(np.abs(x).max(1))[-2:]  # the outlier tokens (BOS, attention sinks): always seen
            rows[a].append(x[np.concatenate([top, rng.choice(len(x), min(len(x), rows_per_seq * b), replace=False)])])
        log(f"calibration statistics: {min(i + batch, len(order))}/{len(order)} sequences ({time.perf_counter() - t0:.0f}s)")
    # outlier rows first (the alpha search reads the first rows), then the random ones
    out = {}
    for a, r in rows.items():
        out[a] = np.concatenate([x[:2] for x in r] + [x[2:] for x in r])
    return amax, out


def activation_scale(amax: float, sample: np.ndarray, method: str, percentile: float) -> float:
    """The per-tensor clip t (scale = t / 127) of one (smoothed) activation.
    max: the largest |x| seen; percentile: that percentile of |x| over the sampled rows; mse: the clip in
    [max/50, max] minimising the sampled rows' fake-quantisation error (rounding + clipping)."""
    if method == "max":
        return float(amax)
    x = np.abs(sample).reshape(-1)
    if method == "percentile":
        return float(min(amax, np.percentile(x, percentile)))
    if x.size > 1 << 18:  # a fixed random subset keeps the search fast; the error estimate barely moves
        x = np.random.default_rng(0).choice(x, 1 << 18, replace=False)
    best, best_err = amax, np.inf
    for t in amax * np.geomspace(0.02, 1.0, 40):
        err = float(np.mean((_fake_quant(x, t / 127) - x) ** 2))
        if err < best_err:
            best, best_err = t, err
    return float(best)


def smooth_and_quantize(model, args, amax: dict, rows: dict, alpha: dict[str, float], method: str,
                        percentile: float, groups: tuple[str, ...] = GROUPS, outlier_ratio: float = 0.0,
                        quantize: bool = True, log=lambda s: None) -> dict:
    """SmoothQuant (Xiao et al. 2023): per input channel c, s_c = max|x_c|^alpha / max|W_c,:|^(1-alpha);
    x/s and s*W give the same product, with the activation's outlier channels moved into the weights.
    1/s is folded into the producer where it is a plain scale (RMSNorm gamma; up_proj's columns for
    down_proj's input, since SwiGLU is silu(gate) * up), otherwise it is an explicit Mul. Then every weight
    becomes per-channel symmetric int8 (DequantizeLinear axis=1) and each MatMul reading a smoothed
    activation gets its own QuantizeLinear -> DequantizeLinear pair (per-tensor symmetric int8, zero point 0,
    one scale per activation). Masks, softmax, norms and the residual stream are never quantized.
    quantize=False only smooths (the float graph computes the same logits; tests check that)."""
    from onnx import helper, numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    producer = {o: n for n in g.node for o in n.output}
    table = weight_matmuls(model, args)
    report = []
    new_nodes: list = []
    t0 = time.perf_counter()
    for k, (a, (group, users)) in enumerate(table.items()):
        if k % 10 == 9 or k == len(table) - 1:
            log(f"smoothing + activation scales: {k + 1}/{len(table)} MatMul inputs ({time.perf_counter() - t0:.0f}s)")
        if group not in groups:
            continue
        ws = [numpy_helper.to_array(inits[u.input[1]]) for u in users]
        if outlier_ratio:
            # "massive activations" (Sun et al. 2024): a few channels of a few layers' down_proj inputs reach
            # hundreds of times the bulk on a few tokens. No smoothing lets one int8 scale cover both, so such
            # an activation stays float (that MatMul is w8a16); its weights are still int8.
            ratio = float(amax[a].max() / max(np.percentile(np.abs(rows[a]), 99.99), 1e-8))
            if ratio > outlier_ratio:
                report.append({"activation": a, "group": group, "alpha": None, "fold": "none", "clip": None,
                               "max": float(amax[a].max()), "clipped_fraction": 0.0, "kept_float": True,
                               "max_over_p9999": ratio, "output_error": None})
                continue
        al, err = alpha.get(group, "auto"), None
        if al == "auto":
            al, err = _choose_alpha(amax[a], rows[a], ws, method, percentile)
        s = _smoothing(amax[a], ws, al)
        folded = _fold_inverse_scale(a, s, producer, consumers, inits, table) if al else "none"
        x_name = a
        if folded is None:  # no plain scale to fold into: an explicit Mul(x, 1/s)
            inv = f"{a}_smooth_inv"
            g.initializer.append(numpy_helper.from_array((1 / s).astype(np.float32), inv))
            x_name = f"{a}_smoothed"
            new_nodes.append(helper.make_node("Mul", [a, inv], [x_name], name=f"{a}_SmoothQuant"))
            folded = "Mul"
        xs, xmax = rows[a] / s, float((amax[a] / s).max())  # the smoothed activation's sample and max
        t = activation_scale(xmax, xs, method, percentile)
        if quantize:
            scale, zp = f"{a}_act_scale", f"{a}_act_zero_point"
            g.initializer.extend([numpy_helper.from_array(np.array(t / 127, np.float32), scale),
                                  numpy_helper.from_array(np.array(0, np.int8), zp)])
            # a dedicated Q/DQ pair per MatMul (same scale), the form modelopt and onnxruntime's quantizer
            # (DedicatedQDQPair) write; TensorRT fuses each pair into its int8 GEMM. onnxruntime's CPU provider
            # turns only 56 of these MatMuls into integer kernels and dequantizes the rest's weights every
            # step, so w8a8 is a TensorRT artifact: on CPU, int8-w8a16 is the fast one.
            for k, u in enumerate(users):
                new_nodes += [helper.make_node("QuantizeLinear", [x_name, scale, zp], [f"{a}_q{k}"],
                                               name=f"{a}_QuantizeLinear{k}"),
                              helper.make_node("DequantizeLinear", [f"{a}_q{k}", scale, zp], [f"{a}_dq{k}"],
                                               name=f"{a}_DequantizeLinear{k}")]
        for k, (u, w) in enumerate(zip(users, ws)):
            inits[u.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(np.float32), u.input[1]))
            u.input[0] = f"{a}_dq{k}" if quantize else x_name
        report.append({"activation": a, "group": group, "alpha": al, "fold": folded, "clip": t, "max": xmax,
                       "clipped_fraction": float((np.abs(xs) > t).mean()), "output_error": err})
    _insert_after_producers(g, new_nodes)
    stats = weight_only_int8_model(model) if quantize else {"matmuls": 0, "bytes": 0}
    return {"activations": report, **stats}


ALPHA_GRID = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)


def _choose_alpha(amax, rows, ws, method, percentile, grid=ALPHA_GRID) -> tuple[float, float]:
    """The migration strength for one activation, by measurement: the alpha whose fake-quantised product
    Q(x/s) @ Q(s*W) is closest to x @ W on calibration rows (relative squared error, summed over the MatMuls
    reading x). Outlier-heavy inputs end up with a high alpha, well-behaved ones with a low one."""
    x = rows[:2048]
    ys = [x @ w for w in ws]
    norm = sum(float((y * y).sum()) for y in ys)
    best = (0.0, np.inf)
    for al in grid:
        s = _smoothing(amax, ws, al)
        xs = x / s
        t = activation_scale(float((amax / s).max()), xs, method, percentile)
        xq = _fake_quant(xs, t / 127)
        err = 0.0
        for w, y in zip(ws, ys):
            ws_ = w * s[:, None]
            err += float(((xq @ _fake_quant(ws_, weight_scale(ws_)) - y) ** 2).sum())
        if err / norm < best[1]:
            best = (al, err / norm)
    return best


def _fake_quant(x, scale):
    return np.clip(np.rint(x / scale), -127, 127) * scale


def _smoothing(amax: np.ndarray, ws: list[np.ndarray], alpha: float) -> np.ndarray:
    if alpha == 0.0:
        return np.ones_like(amax, dtype=np.float32)
    wmax = np.max([np.abs(w).max(1) for w in ws], axis=0)  # per input channel, over every MatMul reading x
    return np.clip(np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha), 1e-4, 1e4).astype(np.float32)


def _fold_inverse_scale(a, s, producer, consumers, inits, table) -> str | None:
    """Divide the activation `a` by s inside its producer, if that is exact and touches nothing else."""
    from onnx import numpy_helper

    p = producer.get(a)
    if p is None or p.op_type != "Mul" or len(consumers.get(a, [])) != len(table[a][1]):
        return None
    for i, other in ((0, 1), (1, 0)):
        name = p.input[i]
        if name in inits and len(consumers.get(name, [])) == 1 and tuple(inits[name].dims) == s.shape:
            gamma = numpy_helper.to_array(inits[name])  # RMSNorm: gamma * normed
            inits[name].CopyFrom(numpy_helper.from_array((gamma / s).astype(np.float32), name))
            return "norm weight"
        up = producer.get(name)  # SwiGLU: silu(gate) * up, up = x @ W_up -> scale W_up's columns
        if (up is not None and up.op_type == "MatMul" and up.input[1] in inits and len(consumers[name]) == 1
                and producer.get(p.input[other]) is not None):
            w = numpy_helper.to_array(inits[up.input[1]])
            if w.shape[1:] == s.shape and len(consumers[up.input[1]]) == 1:
                inits[up.input[1]].CopyFrom(numpy_helper.from_array((w / s[None, :]).astype(np.float32), up.input[1]))
                return "up_proj columns"
    return None


def _insert_after_producers(g, new: list) -> None:
    """Put each new node right after the node producing its first input, so graph order stays topological."""
    after: dict[str, list] = {}
    for n in new:
        after.setdefault(n.input[0], []).append(n)
    nodes: list = []

    def emit(node):
        nodes.append(node)
        for o in node.output:
            for n in after.pop(o, []):
                emit(n)

    for name in [i.name for i in g.input]:
        for n in after.pop(name, []):
            emit(n)
    for node in list(g.node):
        emit(node)
    assert not after, f"no producer for {list(after)}"
    del g.node[:]
    g.node.extend(nodes)


def int8_w8a8(src: Path, dst: Path, seqs: list[np.ndarray], alpha: dict[str, float], method: str,
              percentile: float = 99.99, groups: tuple[str, ...] = GROUPS, outlier_ratio: float = 0.0,
              log=print) -> dict:
    """fp32 export folder `src` -> w8a8 ONNX at `dst`: calibration statistics, then smoothing + Q/DQ."""
    import onnx

    m = Manifest.load(src)
    model = onnx.load(str(src / ONNX_NAME))
    fold_weight_transposes(model)
    stats = activation_stats(model, m, seqs, list(weight_matmuls(model, m.model)), log=log)
    report = smooth_and_quantize(model, m.model, *stats, alpha=alpha, method=method, percentile=percentile, groups=groups,
                                 outlier_ratio=outlier_ratio, log=log)
    save_model(model, dst)
    return report
