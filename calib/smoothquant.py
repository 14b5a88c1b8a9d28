"""int8-w8a8: SmoothQuant scale migration + calibrated per-tensor int8 activations, as explicit Q/DQ.

int8-w8a16's weights (calib/qdq.py) plus int8 activations into the layers' weight MatMuls: SmoothQuant migration
(alpha chosen per activation by measured output error), then one per-tensor symmetric QuantizeLinear/
DequantizeLinear pair (zero point 0) per MatMul input, its scale calibrated on the calibration set. Masks,
softmax, norms and the residual stream stay float; activations with "massive" outlier channels (max >
outlier_ratio x their 99.99th percentile) stay float too, and so does lm_head's input (its weights are int8).

Measured on the demo model (Δppl vs fp32) while choosing int8-w8a8's defaults. First 3,000 held-out tokens:
no smoothing +143 %; alpha 0.5 everywhere +34 % (max), +166 % (percentile 99.99), +23 % (MSE clip);
alpha per activation by output error +3.2 % (max), +21.6 % (MSE clip: it clips the rare massive tokens);
one group at a time (alpha 0.5, max): qkv +0.9 %, o +0.3 %, gate/up +1.3 %, down +29 %, lm_head +0.7 % —
down_proj's input is the problem: layer 11's has a channel at 3065 against a 99.99th percentile of 3.7.
Whole held-out text (11,551 tokens): auto alpha + max +3.40 %; + outlier tokens in the alpha search
+3.10 %; + lm_head input float (the default) +2.73 %.
"""
from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np

from mistral_trt.runtime.cache import pack_rows
from mistral_trt.runtime.manifest import ONNX_NAME, Manifest

from .qdq import fold_weight_transposes, save_model, weight_only_int8_model, weight_scale

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
        ids = pack_rows(group, align="right")  # right padding: a causal model's real positions never see it
        b, s = ids.shape
        mask = (np.arange(s)[None] < np.array([len(x) for x in group])[:, None]).astype(np.int64)
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
