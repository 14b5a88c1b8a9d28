"""int8-w8a8: SmoothQuant scale migration + calibrated per-tensor int8 activations, as explicit Q/DQ.

int8-w8a16's weights (calib/qdq.py) plus int8 activations into the layers' weight MatMuls: SmoothQuant migration
(alpha chosen per activation by measured output error), then one per-tensor symmetric QuantizeLinear/
DequantizeLinear pair (zero point 0) per MatMul input, its scale calibrated on the calibration set. Masks,
softmax, norms and the residual stream stay float; activations with "massive" outlier channels (max >
outlier_ratio x their 99.99th percentile) stay float too, and so does lm_head's input (its weights are int8).

Three steps, each shared by the two roads to the artifact:

    statistics   per activation: per-channel max |x| and a sample of rows (the same rows on both roads:
                 `RowSampler`), from running an fp32 export (`activation_stats`, onnxruntime: `quantize`) or
                 from the checkpoint one decoder layer at a time (calib/layerwise.py, torch: `export
                 --precision int8-w8a8`, for models whose fp32 export does not fit)
    decision     per activation (`plan_activation`): alpha, the smoothing vector s, the clip; keyed by
                 (layer, group), so it does not depend on which road measured it
    edits        (`SmoothQuantEdits`, from the graph's structure): 1/s folded into the producer or an explicit
                 Mul, s into the weights, the Q/DQ pairs; applied to an export in memory (`quantize`) or to
                 each weight as export/onnx_export.py streams it from the checkpoint

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
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mistral_trt.export.weights import int8_scale
from mistral_trt.runtime.cache import pack_rows
from mistral_trt.runtime.manifest import ONNX_NAME, Manifest

from .qdq import fold_weight_transposes, save_model, weight_only_model

CALIB_METHODS = ("max", "percentile", "mse")
GROUPS = ("qkv", "o", "gate_up", "down", "lm_head")  # the weight MatMuls of a Mistral layer, by the input they read
# lm_head's input stays float (its weights are int8): quantizing it costs +0.25 % ppl on the demo for one MatMul
ACTIVATION_GROUPS = ("qkv", "o", "gate_up", "down")
ROWS_PER_SEQ = 32  # sampled rows per calibration sequence and activation (plus each batch's two outlier rows)
CALIB_BATCH = 8


# -- which MatMul reads which activation (graph structure only) ---------------------------------------------
def weight_matmuls(nodes, shapes: dict[str, tuple], args) -> dict[str, tuple[str, list]]:
    """activation name -> (group, MatMul nodes reading it with a 2-D float weight [K, N] from `shapes`), in graph
    order. `shapes`: the float initializers' shapes (the weights need not be in memory)."""
    acts: dict[str, list] = {}
    for n in nodes:
        if n.op_type == "MatMul" and len(shapes.get(n.input[1], ())) == 2:
            acts.setdefault(n.input[0], []).append(n)
    out = {}
    for a, users in acts.items():
        k, n = shapes[users[0].input[1]]
        group = ("qkv" if len(users) == 3 else "gate_up" if len(users) == 2 else "down" if k == args.intermediate_size
                 else "lm_head" if n == args.vocab_size else "o")
        out[a] = (group, users)
    return out


def float_shapes(model) -> dict[str, tuple]:
    from onnx import TensorProto

    return {t.name: tuple(t.dims) for t in model.graph.initializer if t.data_type == TensorProto.FLOAT}


def activation_key(group: str, users, args) -> tuple[int, str]:
    """(layer, group) of an activation, from its MatMuls' weight names (`model.layers.{i}.`); lm_head's layer is
    num_layers. The key both roads share: a torch module path and an ONNX tensor name agree on it."""
    if group == "lm_head":
        return args.num_layers, group
    found = re.search(r"layers\.(\d+)\.", users[0].input[1])
    if not found:
        raise ValueError(f"no layer index in weight name {users[0].input[1]!r}")
    return int(found.group(1)), group


# -- statistics -------------------------------------------------------------------------------------------
def calibration_batches(seqs: list[np.ndarray], batch: int = CALIB_BATCH) -> list[tuple[np.ndarray, np.ndarray]]:
    """(ids [b, s] right-padded, lengths [b]) batches of similar lengths (little padding), in a fixed order.
    Right padding: a causal model's real positions never see it; padded rows are dropped from the statistics."""
    order = np.argsort([len(s) for s in seqs], kind="stable")
    out = []
    for i in range(0, len(order), batch):
        group = [seqs[j] for j in order[i:i + batch]]
        out.append((pack_rows(group, align="right"), np.array([len(x) for x in group])))
    return out


@dataclass
class ActivationStats:
    """Per activation: per-channel max |x| over every real row, and sampled rows (outlier rows first)."""

    amax: np.ndarray
    rows: np.ndarray
    hessian: np.ndarray | None = None  # E[x x^T] over every real row (GPTQ's H; calib/layerwise.py, on request)


@dataclass
class RowSampler:
    """Accumulates one activation's statistics batch by batch. Each batch contributes its two rows with the largest
    |x| (BOS and other attention-sink tokens carry outliers that a random sample would miss, and they matter to
    every later token) and a random sample of ROWS_PER_SEQ rows per sequence, drawn from a generator seeded by
    (batch, layer, group): whichever road computes the activation, the same rows are sampled."""

    key: tuple[int, str]
    amax: np.ndarray | None = None
    top: list = field(default_factory=list)
    sample: list = field(default_factory=list)

    def add(self, batch_index: int, x: np.ndarray, sequences: int) -> None:
        """x: [rows, K] the real rows of one batch, float32."""
        m = np.abs(x).max(0)
        self.amax = m if self.amax is None else np.maximum(self.amax, m)
        rng = np.random.default_rng([batch_index, self.key[0], GROUPS.index(self.key[1])])
        self.top.append(x[np.argsort(np.abs(x).max(1))[-2:]])
        self.sample.append(x[rng.choice(len(x), min(len(x), ROWS_PER_SEQ * sequences), replace=False)])

    def finish(self) -> ActivationStats:
        return ActivationStats(self.amax, np.concatenate(self.top + self.sample))  # the alpha search reads the first rows


def activation_stats(model, manifest, seqs, acts: dict[str, tuple[int, str]], batch: int = CALIB_BATCH,
                     log=print) -> dict[str, ActivationStats]:
    """One pass of an fp32 export (onnxruntime) over the calibration sequences, every activation in `acts`
    (name -> key) an extra output."""
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
    samplers = {a: RowSampler(key) for a, key in acts.items()}
    t0 = time.perf_counter()
    done = 0
    for i, (ids, lengths) in enumerate(calibration_batches(seqs, batch)):
        b, s = ids.shape
        mask = (np.arange(s)[None] < lengths[:, None]).astype(np.int64)
        feed = {"input_ids": ids, "attention_mask": mask, "position_ids": np.broadcast_to(np.arange(s), (b, s)).copy()}
        for name in manifest.input_names()[3:]:
            feed[name] = np.zeros((b, a_.num_kv_heads, 0, a_.head_dim), np.float32)
        outs = sess.run(list(acts), feed)
        valid = mask.reshape(-1).astype(bool)
        for a, o in zip(acts, outs):
            samplers[a].add(i, o.reshape(b * s, -1)[valid], b)
        done += b
        log(f"calibration statistics: {done}/{len(seqs)} sequences ({time.perf_counter() - t0:.0f}s)")
    return {a: sm.finish() for a, sm in samplers.items()}


# -- the decision per activation ---------------------------------------------------------------------------
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


@dataclass
class Smoothing:
    """One activation's decision: the smoothing vector s (x/s and s*W; None: the activation stays float) and the
    clip t of the smoothed activation (scale t / 127). `record`: what quantization.json reports."""

    s: np.ndarray | None
    clip: float | None
    alpha: float | None
    record: dict


@dataclass(frozen=True)
class Recipe:
    """int8-w8a8's settings: alpha per group (absent: "auto", chosen by output error), the activation range
    method, which groups get int8 activations, and the massive-activation threshold (0: off)."""

    alpha: dict = field(default_factory=dict)
    method: str = "max"
    percentile: float = 99.99
    groups: tuple[str, ...] = GROUPS
    outlier_ratio: float = 0.0


def plan_activation(st: ActivationStats, ws: list[np.ndarray], group: str, recipe: Recipe) -> Smoothing:
    """SmoothQuant (Xiao et al. 2023) for one activation x read by MatMuls with weights ws [K, N]: per input
    channel c, s_c = max|x_c|^alpha / max|W_c,:|^(1-alpha); x/s and s*W give the same product, with the
    activation's outlier channels moved into the weights."""
    if recipe.outlier_ratio:
        # "massive activations" (Sun et al. 2024): a few channels of a few layers' down_proj inputs reach
        # hundreds of times the bulk on a few tokens. No smoothing lets one int8 scale cover both, so such
        # an activation stays float (that MatMul is w8a16); its weights are still int8.
        ratio = float(st.amax.max() / max(np.percentile(np.abs(st.rows), 99.99), 1e-8))
        if ratio > recipe.outlier_ratio:
            return Smoothing(None, None, None, {
                "group": group, "alpha": None, "fold": "none", "clip": None, "max": float(st.amax.max()),
                "clipped_fraction": 0.0, "kept_float": True, "max_over_p9999": ratio, "output_error": None})
    al, err = recipe.alpha.get(group, "auto"), None
    if al == "auto":
        al, err = _choose_alpha(st.amax, st.rows, ws, recipe.method, recipe.percentile)
    s = _smoothing(st.amax, _wmax(ws), al)
    xs, xmax = st.rows / s, float((st.amax / s).max())  # the smoothed activation's sample and max
    t = activation_scale(xmax, xs, recipe.method, recipe.percentile)
    return Smoothing(s, t, al, {"group": group, "alpha": al, "clip": t, "max": xmax,
                                "clipped_fraction": float((np.abs(xs) > t).mean()), "output_error": err})


ALPHA_GRID = (0.0, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.95, 1.0)
SEARCH_ROWS = 2048  # calibration rows the alpha search multiplies (outlier rows first)
# Output columns per MatMul the search measures: a fixed random subset above this (the error is a sum over columns,
# and each column's int8 scale is its own, so a subset estimates it without bias). Every demo MatMul fits;
# Mistral-7B's gate/up (14,336 columns) cost 7x less.
SEARCH_COLUMNS = 2048


def _choose_alpha(amax, rows, ws, method, percentile, grid=ALPHA_GRID) -> tuple[float, float]:
    """The migration strength for one activation, by measurement: the alpha whose fake-quantised product
    Q(x/s) @ Q(s*W) is closest to x @ W on calibration rows (relative squared error, summed over the MatMuls
    reading x). Outlier-heavy inputs end up with a high alpha, well-behaved ones with a low one."""
    x = rows[:SEARCH_ROWS]
    wmax = _wmax(ws)  # s depends on every column; the error is measured on a subset of them
    rng = np.random.default_rng(0)
    ws = [w if w.shape[1] <= SEARCH_COLUMNS else w[:, np.sort(rng.choice(w.shape[1], SEARCH_COLUMNS, replace=False))]
          for w in ws]
    ys = [x @ w for w in ws]
    norm = sum(float((y * y).sum()) for y in ys)
    best = (0.0, np.inf)
    for al in grid:
        s = _smoothing(amax, wmax, al)
        xs = x / s
        t = activation_scale(float((amax / s).max()), xs, method, percentile)
        xq = _fake_quant(xs, t / 127)
        err = 0.0
        for w, y in zip(ws, ys):
            ws_ = w * s[:, None]
            err += float(((xq @ _fake_quant(ws_, int8_scale(ws_)) - y) ** 2).sum())
        if err / norm < best[1]:
            best = (al, err / norm)
    return best


def _fake_quant(x, scale):
    return np.clip(np.rint(x / scale), -127, 127) * scale


def _wmax(ws: list[np.ndarray]) -> np.ndarray:
    """max |W[c, :]| per input channel c, over every MatMul reading the activation."""
    return np.max([np.abs(w).max(1) for w in ws], axis=0)


def _smoothing(amax: np.ndarray, wmax: np.ndarray, alpha: float) -> np.ndarray:
    if alpha == 0.0:
        return np.ones_like(amax, dtype=np.float32)
    return np.clip(np.maximum(amax, 1e-5) ** alpha / np.maximum(wmax, 1e-5) ** (1 - alpha), 1e-4, 1e4).astype(np.float32)


# -- the graph edits -------------------------------------------------------------------------------------
class SmoothQuantEdits:
    """What the decisions do to a graph, worked out from its structure alone (the weights need not be loaded):

        edits = SmoothQuantEdits(args, plans).prepare(graph.node, shapes)   # plans: (layer, group) -> Smoothing
        w = edits.weight(name, w)        # every float initializer passes through here once, as it is written
        edits.finish(graph, add)         # the Mul and Q/DQ nodes; add(name, array) adds an initializer

    1/s is folded into the activation's producer where that is a plain scale (RMSNorm gamma; up_proj's columns for
    down_proj's input, since SwiGLU is silu(gate) * up), otherwise it is an explicit Mul(x, 1/s) before the
    MatMuls. Each MatMul reading a smoothed activation gets its own QuantizeLinear -> DequantizeLinear pair
    (per-tensor symmetric int8, zero point 0, one scale per activation), the form modelopt and onnxruntime's
    quantizer (DedicatedQDQPair) write; TensorRT fuses each pair into its int8 GEMM. The weights themselves
    become int8 afterwards (calib/qdq.py, or as they stream), which is not this class's business.
    quantize=False only smooths: the float graph computes the same logits (the tests check that)."""

    def __init__(self, args, plans: dict, quantize: bool = True, describe=None):
        self.args, self.plans, self.quantize, self.describe = args, plans, quantize, describe
        self.row_scale: dict[str, np.ndarray] = {}  # MatMul weight [K, N]: rows * s
        self.col_div: dict[str, np.ndarray] = {}  # up_proj weight [K, N]: columns / s (down_proj's input smoothed)
        self.vec_div: dict[str, np.ndarray] = {}  # RMSNorm gamma [K]: / s
        self.report: list[dict] = []  # quantization.json: one record per activation, in graph order
        self._acts: list = []  # (activation, its MatMuls, Smoothing, needs an explicit Mul)

    def prepare(self, nodes, shapes: dict[str, tuple]) -> "SmoothQuantEdits":
        """Decide every edit from the graph's structure: `nodes` with MatMuls reading their weights [K, N] by
        name, `shapes` of the float initializers."""
        nodes = list(nodes)
        consumers: dict[str, list] = {}
        for n in nodes:
            for i in n.input:
                consumers.setdefault(i, []).append(n)
        producer = {o: n for n in nodes for o in n.output}
        for a, (group, users) in weight_matmuls(nodes, shapes, self.args).items():
            plan = self.plans.get(activation_key(group, users, self.args))
            if plan is None:
                continue
            if plan.s is None:
                self.report.append({"activation": a, **plan.record})
                continue
            fold = self._fold(a, plan.s, producer, consumers, shapes, len(users)) if plan.alpha else "none"
            for u in users:
                self.row_scale[u.input[1]] = plan.s
            self._acts.append((a, users, plan, fold is None))
            self.report.append({"activation": a, **plan.record, "fold": fold or "Mul"})
        return self

    def _fold(self, a, s, producer, consumers, shapes, n_users) -> str | None:
        """Where 1/s can be folded exactly, touching nothing else: the gamma of the RMSNorm producing `a`, or
        the columns of up_proj when `a` = silu(gate) * up. None: an explicit Mul is needed."""
        p = producer.get(a)
        if p is None or p.op_type != "Mul" or len(consumers.get(a, [])) != n_users:
            return None
        for i, other in ((0, 1), (1, 0)):
            name = p.input[i]
            if name in shapes and len(consumers.get(name, [])) == 1 and tuple(shapes[name]) == s.shape:
                self.vec_div[name] = s  # RMSNorm: gamma * normed
                return "norm weight"
            up = producer.get(name)  # SwiGLU: silu(gate) * up, up = x @ W_up -> scale W_up's columns
            if (up is not None and up.op_type == "MatMul" and up.input[1] in shapes and len(consumers[name]) == 1
                    and producer.get(p.input[other]) is not None):
                if tuple(shapes[up.input[1]])[1:] == s.shape and len(consumers[up.input[1]]) == 1:
                    self.col_div[up.input[1]] = s
                    return "up_proj columns"
        return None

    def weight(self, name: str, w: np.ndarray) -> np.ndarray:
        """A float initializer as the smoothed graph needs it. For up_proj both apply, rows first (the order the
        decisions were made in: gate/up's input comes before down's in every layer)."""
        if name in self.row_scale:
            w = (w * self.row_scale[name][:, None]).astype(np.float32)
        if name in self.col_div:
            w = (w / self.col_div[name][None, :]).astype(np.float32)
        if name in self.vec_div:
            w = (w / self.vec_div[name]).astype(np.float32)
        return w

    def record(self) -> dict:
        """The manifest's precision record (`describe(report)`, given by the caller, who knows the recipe)."""
        return self.describe(self.report)

    def files(self) -> dict[str, str]:
        """Files the artifact carries beside the graph (not read at run time): every activation's decision."""
        return {"quantization.json": json.dumps(self.report, indent=1) + "\n"}

    def touches(self, name: str) -> bool:
        return name in self.row_scale or name in self.col_div or name in self.vec_div

    def finish(self, g, add) -> None:
        """Rewire the MatMuls, add the Mul and Q/DQ nodes right after their producers (graph order stays
        topological); add(name, array) adds an initializer."""
        from onnx import helper

        new_nodes: list = []
        by_name = {n.name: n for n in g.node}  # the graph's own nodes now (a writer may have rebuilt its node list)
        for a, users, plan, explicit in self._acts:
            users = [by_name[u.name] for u in users]
            x_name = a
            if explicit:
                x_name = f"{a}_smoothed"
                add(f"{a}_smooth_inv", (1 / plan.s).astype(np.float32))
                new_nodes.append(helper.make_node("Mul", [a, f"{a}_smooth_inv"], [x_name], name=f"{a}_SmoothQuant"))
            if not self.quantize:
                for u in users:
                    u.input[0] = x_name
                continue
            scale, zp = f"{a}_act_scale", f"{a}_act_zero_point"
            add(scale, np.array(plan.clip / 127, np.float32))
            add(zp, np.array(0, np.int8))
            # onnxruntime's CPU provider turns only some of these into integer kernels (and saturates without
            # VNNI: runtime/ort.py keeps them unfused), so w8a8 is a TensorRT artifact; on CPU the fused
            # int8-w8a8-dynamic export is the fast one.
            for k, u in enumerate(users):
                new_nodes += [helper.make_node("QuantizeLinear", [x_name, scale, zp], [f"{a}_q{k}"],
                                               name=f"{a}_QuantizeLinear{k}"),
                              helper.make_node("DequantizeLinear", [f"{a}_q{k}", scale, zp], [f"{a}_dq{k}"],
                                               name=f"{a}_DequantizeLinear{k}")]
                u.input[0] = f"{a}_dq{k}"
        insert_after_producers(g, new_nodes)


def insert_after_producers(g, new: list) -> None:
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


# -- road 1: an fp32 export in memory (`quantize`) ---------------------------------------------------------
def plans_from_stats(model, args, stats: dict[str, ActivationStats], recipe: Recipe, log=lambda s: None) -> dict:
    """(layer, group) -> Smoothing from statistics keyed by activation name and the weights in `model`."""
    from onnx import numpy_helper

    inits = {t.name: t for t in model.graph.initializer}
    table = weight_matmuls(model.graph.node, float_shapes(model), args)
    plans, t0 = {}, time.perf_counter()
    for k, (a, (group, users)) in enumerate(table.items()):
        if k % 10 == 9 or k == len(table) - 1:
            log(f"smoothing + activation scales: {k + 1}/{len(table)} MatMul inputs ({time.perf_counter() - t0:.0f}s)")
        if group in recipe.groups:
            ws = [numpy_helper.to_array(inits[u.input[1]]) for u in users]
            plans[activation_key(group, users, args)] = plan_activation(stats[a], ws, group, recipe)
    return plans


def smooth_and_quantize(model, args, stats: dict[str, ActivationStats], recipe: Recipe, quantize: bool = True,
                        log=lambda s: None) -> dict:
    """Decisions from `stats` (activation name -> statistics), then the edits applied to `model` (its
    transposes folded: calib/qdq.py), then int8 weights. Returns {"activations": report, "matmuls", "bytes"}."""
    from onnx import numpy_helper

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    edits = SmoothQuantEdits(args, plans_from_stats(model, args, stats, recipe, log), quantize=quantize)
    edits.prepare(g.node, float_shapes(model))
    for name, t in inits.items():
        if edits.touches(name):
            t.CopyFrom(numpy_helper.from_array(edits.weight(name, numpy_helper.to_array(t)), name))
    edits.finish(g, lambda name, arr: g.initializer.append(numpy_helper.from_array(arr, name)))
    stats_ = weight_only_model(model) if quantize else {"matmuls": 0, "bytes": 0}
    return {"activations": edits.report, **stats_}


def int8_w8a8(src: Path, dst: Path, seqs: list[np.ndarray], recipe: Recipe, log=print) -> dict:
    """fp32 export folder `src` -> w8a8 ONNX at `dst`: calibration statistics, then smoothing + Q/DQ."""
    import onnx

    m = Manifest.load(src)
    model = onnx.load(str(src / ONNX_NAME))
    fold_weight_transposes(model)
    table = weight_matmuls(model.graph.node, float_shapes(model), m.model)
    acts = {a: activation_key(group, users, m.model) for a, (group, users) in table.items() if group in recipe.groups}
    stats = activation_stats(model, m, seqs, acts, log=log)
    report = smooth_and_quantize(model, m.model, stats, recipe, log=log)
    save_model(model, dst)
    return report
