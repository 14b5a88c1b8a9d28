"""int4: the quantizer (export/weights.py), GPTQ (calib/gptq.py), and int4-w4a16, the int4 artifact for TensorRT
(portable graph, blockwise DequantizeLinear of int4 weights, opset 21).

References: onnxruntime's own int4 quantizer (ours searches each block's scale, so no block may come out worse than
onnxruntime's), the float weights, TensorRT's rule that every DequantizeLinear scale is > 0, the fused int4 export of
the same checkpoint (the same weights to within a quantization step, run by the same onnxruntime kernel), and
export + quantize (the two roads give one artifact)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mistral_trt.calib.quantize import quantize
from mistral_trt.main import main
from mistral_trt.runtime.backend import open_backend
from mistral_trt.runtime.manifest import Manifest
from conftest import score


def _graph(folder):
    return onnx.load(str(folder / "model.onnx"))


def portable_weights(folder) -> dict[str, np.ndarray]:
    """'model.layers.{i}.self_attn.q_proj' -> the dequantized W^T [K, N] of every weight DequantizeLinear (int4 per
    block, or int8 per output channel: lm_head's)."""
    g = _graph(folder).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    out = {}
    for n in g.node:
        if n.op_type == "DequantizeLinear" and n.input[0] in inits:
            q, s = inits[n.input[0]].astype(np.float32), inits[n.input[1]]
            block = next((a.i for a in n.attribute if a.name == "block_size"), 0)
            w = q * (np.repeat(s, block, axis=0)[: q.shape[0]] if block else s[None, :])
            name = n.input[0].removeprefix("model.").removesuffix("_int4").removesuffix("_int8").removesuffix(".weight.T")
            out["lm_head" if "embed_tokens" in name else name] = w  # a tied lm_head reads the embedding
    return out


def fused_weights(folder) -> dict[str, np.ndarray]:
    """The same from the fused graph's MatMulNBits (packed uint4 [N, blocks, block/2], zero point 8, or uint8
    [N, blocks, block], zero point 128; scales); its packed q/k/v is split back into the three projections."""
    g = _graph(folder).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    m = Manifest.load(folder).model
    out = {}
    for n in g.node:
        if n.op_type != "MatMulNBits":
            continue
        attrs = {a.name: a.i for a in n.attribute}
        packed, scales = inits[n.input[1]], inits[n.input[2]].reshape(attrs["N"], -1)
        if attrs["bits"] == 4:
            u = np.empty((*packed.shape[:2], attrs["block_size"]), np.float32)
            u[..., 0::2], u[..., 1::2] = packed & 0x0F, packed >> 4
            w = (u - 8) * scales[..., None]
        else:
            w = (packed.astype(np.float32) - 128) * scales[..., None]
        w = w.reshape(attrs["N"], -1)[:, : attrs["K"]].T
        name = n.input[1].removesuffix(f"_Q{attrs['bits']}")
        if name.endswith("qkv_proj"):
            q, kv = m.num_heads * m.head_dim, m.num_kv_heads * m.head_dim
            base = name.removesuffix("qkv_proj")
            out[base + "self_attn.q_proj"], out[base + "self_attn.k_proj"], out[base + "self_attn.v_proj"] = (
                w[:, :q], w[:, q:q + kv], w[:, q + kv:])
        else:
            out[name.replace("o_proj", "self_attn.o_proj").replace("gate_proj", "mlp.gate_proj")
                .replace("up_proj", "mlp.up_proj").replace("down_proj", "mlp.down_proj")] = w
    return out


@pytest.mark.parametrize("k", [96, 100])  # 100: a last block of 4 rows (padded)
def test_int4_blocks_against_onnxruntime_and_tensorrt_rules(k):
    """Round to nearest. Signed convention (the fused graph): onnxruntime's own int4 quantizer's values (a block's
    largest magnitude on -8). Positive (TensorRT): every scale > 0, every weight within half a step (one step where
    it would round to +8), a block's largest magnitude on -8 or +7, whichever its sign allows."""
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits

    from mistral_trt.export.weights import int4_blocks, pack_nbits4, unpack_nbits4

    rng = np.random.default_rng(k)
    w = (rng.standard_normal((k, 64)) * rng.uniform(0.01, 1.0, (k, 1))).astype(np.float32)
    w[3, 5], w[40, 7] = 9.0, -9.0  # outliers of both signs
    blocks = -(-k // 32)
    packed = np.zeros((64, blocks, 16), np.uint8)
    scales = np.zeros((64, blocks), np.float32)
    quantize_matmul_4bits(packed, np.pad(w, ((0, blocks * 32 - k), (0, 0))), scales,
                          np.zeros((64, (blocks + 1) // 2), np.uint8), 32, 64, blocks * 32, True)
    q_ort, s_ort = unpack_nbits4(packed, scales, k)
    rows = lambda s: np.repeat(s, 32, 0)[:k]  # noqa: E731

    for positive in (False, True):
        q, s = int4_blocks(w, 32, positive)
        assert q.dtype == np.int8 and q.min() >= -8 and q.max() <= 7 and s.shape == (blocks, 64)
        assert all(np.array_equal(a, b) for a, b in zip(unpack_nbits4(*pack_nbits4(q, s, 32), k), (q, s)))
        if positive:
            err, r = np.abs(q * rows(s) - w), rows(s)
            assert (s > 0).all() and (err <= r * np.where(w <= 7.5 * r, 0.5 + 1e-5, 1 + 1e-5)).all()  # +8 clips to +7
            top = np.abs(np.pad(q, ((0, blocks * 32 - k), (0, 0))).reshape(blocks, 32, 64)).max(1)
            assert ((top == 7) | (top == 8)).all()
        else:
            np.testing.assert_allclose(s, s_ort, rtol=1e-6)
            assert (q == q_ort).mean() > 0.999 and (s < 0).any()


def test_gptq_spreads_rounding_error_only_through_correlation():
    """calib/gptq.py: with H = I nothing spreads between input channels (each weight is rounded to nearest at the
    scale GPTQ's search chose); with correlated inputs (and an outlier channel) its output error through H is far
    below round to nearest's, in both conventions; an input that is always zero gets zero weights."""
    from mistral_trt.calib.gptq import gptq_int4, output_error
    from mistral_trt.export.weights import int4_blocks, int4_block_scales

    rng = np.random.default_rng(0)
    k, n = 128, 48
    w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
    for positive in (False, True):
        q, s = gptq_int4(w, np.eye(k), 32, positive)
        want = int4_block_scales(w.reshape(4, 32, n).transpose(0, 2, 1), positive, np.ones(32, np.float32))[..., 0]
        np.testing.assert_allclose(s, want, rtol=1e-6)
        assert np.array_equal(q, np.clip(np.rint(w / np.repeat(s, 32, 0)), -8, 7))
    x = rng.standard_normal((3000, k)) @ (np.eye(k) + 0.3 * rng.standard_normal((k, k)))
    x[:, 7] *= 20
    x[:, 9] = 0.0
    h = x.T @ x / len(x)
    for positive in (False, True):
        q, s = gptq_int4(w, h, 32, positive)
        rtn = output_error(w, *int4_blocks(w, 32, positive), h, 32)
        assert output_error(w, q, s, h, 32) < 0.5 * rtn and not q[9].any()
        assert (s > 0).all() if positive else (s < 0).any()


@pytest.mark.slow
def test_int4_w4a16_structure_and_tensorrt_scales(tiny_full, tiny_exports, tmp_path):
    """Every layer's MatMul weight becomes int4 in blocks of 64 input channels (TensorRT's INT4 GEMM takes 64 or 128,
    and the tiny model's K = 64 allows only 64: the default) behind DequantizeLinear (axis 0, zero point 0, opset 21)
    with every scale > 0 (TensorRT refuses others), lm_head int8 per channel (the default recipe); export --dtype fp32
    + quantize gives the same file contents; each weight is the fused int4 graph's to within a quantization step (one
    float weight, two conventions), and onnxruntime's logits of the two are alike. The default export is fp16 with
    fp16 scales (a strongly typed DequantizeLinear outputs its scale's type: TensorRT's GEMMs are then fp16), each
    scale the fp32 one rounded, each weight within a step of it."""
    direct, two_step, fused = tmp_path / "direct", tmp_path / "two-step", tmp_path / "fused"
    assert main(["export", str(tiny_full), "-o", str(direct), "--precision", "int4-w4a16", "--dtype", "fp32"]) == 0
    quantize(tiny_exports["full", "fp32"], "int4-w4a16", two_step)
    assert main(["export", str(tiny_full), "-o", str(fused), "--graph", "fused", "--precision", "int4",
                 "--block-size", "64"]) == 0
    half = tmp_path / "fp16"
    assert main(["export", str(tiny_full), "-o", str(half), "--precision", "int4-w4a16"]) == 0
    h = Manifest.load(half)
    assert h.dtype == "fp16" and h.precision["block_size"] == 64 and "fp16 activations and scales" in h.precision["method"]
    h_inits = {t.name: numpy_helper.to_array(t) for t in _graph(half).graph.initializer}
    d_inits = {t.name: numpy_helper.to_array(t) for t in _graph(direct).graph.initializer}
    scales = [k for k in d_inits if k.endswith("_scale")]
    assert scales and all(h_inits[k].dtype == np.float16 and (h_inits[k] > 0).all() for k in scales)
    for k in scales:
        np.testing.assert_array_equal(h_inits[k], d_inits[k].astype(np.float16))
    h_w, d_w = portable_weights(half), portable_weights(direct)
    for k in d_w:
        step = np.abs(d_w[k]).max() / 7
        assert h_w[k].dtype == np.float32 and np.abs(h_w[k] - d_w[k]).max() <= step, k
    ids = np.random.default_rng(5).integers(3, 32000, 24)
    # the artifacts' own arithmetic (exact: no int8 activations): fp16 scales round some int4 levels the other way,
    # and the fp16 artifact is as far from the float model as the fp32 one
    got16, got32 = score(open_backend(half, exact=True), ids), score(open_backend(direct, exact=True), ids)
    float32 = score(tiny_exports["full", "fp32"], ids)
    assert np.abs(got16 - float32).max() < 1.25 * np.abs(got32 - float32).max()
    assert (got16.argmax(-1) == got32.argmax(-1)).mean() >= 0.9

    model = _graph(direct)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    inits = {t.name: t for t in model.graph.initializer}
    m = Manifest.load(direct)
    assert len(dq) == m.precision["quantized_matmuls"] == 7 * m.model.num_layers + 1
    for n in dq:
        q, s, zp = (inits[i] for i in n.input)
        attrs = {a.name: a.i for a in n.attribute}
        assert not numpy_helper.to_array(zp).astype(np.int8).any() and (numpy_helper.to_array(s) > 0).all()
        if "lm_head" in n.input[0] or "embed_tokens" in n.input[0]:
            assert q.data_type == zp.data_type == onnx.TensorProto.INT8 and attrs == {"axis": 1}
            continue
        assert q.data_type == onnx.TensorProto.INT4 and zp.data_type == onnx.TensorProto.INT4
        assert attrs == {"axis": 0, "block_size": 64} and s.dims[0] == -(-q.dims[0] // 64) and s.dims[1] == q.dims[1]
    assert not any(n.op_type in ("MatMulNBits", "QuantizeLinear") for n in model.graph.node)  # weights only

    a, b = (({t.name: numpy_helper.to_array(t) for t in _graph(f).graph.initializer}) for f in (direct, two_step))
    assert a.keys() == b.keys() and any(k.endswith("_int4") for k in a)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    other = Manifest.load(two_step).precision
    assert {k: v for k, v in m.precision.items() if k != "from"} == {k: v for k, v in other.items() if k != "from"}
    assert m.precision["name"] == "int4-w4a16" and m.precision["block_size"] == 64 and m.precision["lm_head_bits"] == 8
    m.check_files(direct, full=True)

    ours, theirs = portable_weights(direct), fused_weights(fused)
    assert ours.keys() == theirs.keys() and len(ours) == 7 * m.model.num_layers + 1
    for k in ours:
        step = np.abs(theirs[k]).reshape(-1, 64, theirs[k].shape[1]).max(1).repeat(64, 0)[:len(theirs[k])] / 7
        assert ours[k].shape == theirs[k].shape and (np.abs(ours[k] - theirs[k]) <= 2.01 * step).all(), k
        assert not np.array_equal(ours[k], theirs[k]) or k == "lm_head"

    ref, got = score(tiny_exports["full", "fp32"], ids), score(direct, ids)
    np.testing.assert_array_equal(got, score(two_step, ids))
    # onnxruntime's CPU provider fuses each DequantizeLinear(int4) -> MatMul back into MatMulNBits (int8
    # activations, accuracy level 4). int4 on this tiny random model is far from fp32 (top-1 ~1/3; the demo's quality
    # is `eval`'s, docs/precision.md): the two int4 artifacts are about as far from fp32 as each other.
    alike = score(fused, ids)
    assert np.abs(got - ref).max() < 1.5 * np.abs(alike - ref).max()

    pure = tmp_path / "pure"  # --lm-head-bits 4: every MatMul int4, lm_head too
    assert main(["export", str(tiny_full), "-o", str(pure), "--precision", "int4-w4a16", "--lm-head-bits", "4",
                 "--dtype", "fp32"]) == 0
    g = _graph(pure).graph
    head = next(n for n in g.node if n.op_type == "DequantizeLinear" and "lm_head" in n.input[0])
    assert next(t for t in g.initializer if t.name == head.input[0]).data_type == onnx.TensorProto.INT4
    assert Manifest.load(pure).precision["lm_head_bits"] == 4


@pytest.mark.parametrize("precision", ["int8-w8a16", "int4-w4a16"])
@pytest.mark.slow
def test_weight_only_artifacts_exact_on_cpu(precision, tiny_full, tmp_path):
    """Weight-only artifacts compute with float activations (TensorRT's weight-only GEMMs, onnxruntime's CUDA
    provider). The CPU provider fuses their DequantizeLinear -> MatMul into MatMulNBits, whose default accuracy level
    quantizes the activations to int8: fast, what `generate` runs. `exact` (what `eval` opens) gives the unfused
    graph's logits (every graph optimization off) to float rounding; the fast default does not."""
    import onnxruntime as ort

    out = tmp_path / precision
    assert main(["export", str(tiny_full), "-o", str(out), "--precision", precision, "--dtype", "fp32"]) == 0
    ids = np.random.default_rng(11).integers(3, 32000, 24)
    backend = open_backend(out)
    exact, fast = score(open_backend(out, exact=True), ids), score(backend, ids)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    backend.session = ort.InferenceSession(str(out / "model.onnx"), opts, providers=["CPUExecutionProvider"])
    unfused = score(backend, ids)
    scale = np.abs(unfused).max()
    assert np.abs(exact - unfused).max() <= 1e-4 * scale
    assert np.abs(fast - unfused).max() > 10 * max(np.abs(exact - unfused).max(), 1e-6 * scale)


@pytest.mark.slow
def test_int4_w4a16_external_data(tiny_full, tmp_path, monkeypatch):
    """A 7B int4-w4a16 graph keeps its weights in model.onnx.data (over protobuf's 2 GB): int4 goes there packed two
    values a byte, with the packed length recorded; the tiny model forced external loads to the same logits."""
    import mistral_trt.export.onnx_export as onnx_export

    inline, external = tmp_path / "inline", tmp_path / "external"
    assert main(["export", str(tiny_full), "-o", str(inline), "--precision", "int4-w4a16"]) == 0
    monkeypatch.setattr(onnx_export, "EXTERNAL_DATA_THRESHOLD", 0)
    assert main(["export", str(tiny_full), "-o", str(external), "--precision", "int4-w4a16"]) == 0
    assert not (inline / "model.onnx.data").exists() and (external / "model.onnx.data").exists()
    model = onnx.load(str(external / "model.onnx"), load_external_data=False)
    int4 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT4 and t.external_data]
    assert int4 and all(int({e.key: e.value for e in t.external_data}["length"]) == -(-np.prod(t.dims) // 2)
                        for t in int4)
    a, b = portable_weights(inline), portable_weights(external)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    ids = np.random.default_rng(9).integers(3, 32000, 16)
    np.testing.assert_array_equal(score(inline, ids), score(external, ids))
    Manifest.load(external).check_files(external, full=True)


@pytest.mark.slow
def test_int4_calibrated_awq_gptq(tiny_window, tiny_exports, tmp_path):
    """`export --precision int4-w4a16 --calib` and `--graph fused --precision int4 --calib` with `--int4-method
    awq-gptq` (AWQ + GPTQ; `--int4-method awq` rounds to nearest after AWQ): GPTQ's output error below round to
    nearest's for every layer's inputs (awq.json), TensorRT's artifact with scales > 0, the fused one in
    onnxruntime's signed convention, all of them runnable."""
    import json

    cal = tmp_path / "cal"
    assert main(["calibrate", str(tiny_exports["full", "fp32"]), "-o", str(cal), "--count", "12",
                 "--reply-tokens", "4"]) == 0
    portable, fused, awq, rtn = (tmp_path / n for n in ("portable", "fused", "awq", "rtn"))
    assert main(["export", str(tiny_window), "-o", str(portable), "--precision", "int4-w4a16", "--calib", str(cal),
                 "--int4-method", "awq-gptq"]) == 0
    assert main(["export", str(tiny_window), "-o", str(fused), "--graph", "fused", "--precision", "int4", "--calib",
                 str(cal), "--int4-method", "awq-gptq"]) == 0
    assert main(["export", str(tiny_window), "-o", str(awq), "--graph", "fused", "--precision", "int4", "--calib",
                 str(cal), "--int4-method", "awq"]) == 0
    assert main(["export", str(tiny_window), "-o", str(rtn), "--graph", "fused", "--precision", "int4"]) == 0
    p = Manifest.load(portable).precision
    assert p["name"] == "int4-w4a16" and p["int4_method"] == "awq-gptq" and "GPTQ" in p["method"]
    assert Manifest.load(awq).precision["int4_method"] == "awq" and not (awq / "awq.json").read_text().count("gptq")
    layers = Manifest.load(fused).model.num_layers
    for folder in (portable, fused):
        rows = json.loads((folder / "awq.json").read_text())
        assert len(rows) == 4 * layers  # qkv, o, gate_up, down
        assert all(r["output_error_gptq"] < r["output_error_round_to_nearest"] for r in rows), folder
    scales = [numpy_helper.to_array(t) for t in _graph(portable).graph.initializer if t.name.endswith("_scale")]
    assert scales and all((s > 0).all() for s in scales)
    assert any((numpy_helper.to_array(t) < 0).any() for t in _graph(fused).graph.initializer if t.name.endswith("_scales"))
    ids = np.random.default_rng(2).integers(3, 32000, 20)
    assert all(np.isfinite(score(f, ids)).all() for f in (portable, fused, awq, rtn))
    # on a tiny random model closeness to fp32 says little; the demo's perplexity does (test_calib.py, quality)


@pytest.mark.parametrize("method", ["awq-gptq-e2e", "awq-gptq-layerwise"])
@pytest.mark.slow
def test_int4_block_scales_tuned(method, tiny_window, tiny_exports, tmp_path):
    """`--int4-method awq-gptq-e2e` and `awq-gptq-layerwise`: GPTQ's int4 levels kept bit for bit, only the block
    scales moved (each by a positive factor, so TensorRT's stay > 0), the tuning's own measure lowered (e2e: the
    probe's KL to the float model; layerwise: each kept layer's output MSE), and the artifact's own logits
    (onnxruntime, int8 activations) on the probe's calibration sequences closer to the float export's than
    awq-gptq's are."""
    from mistral_trt.calib.data import load

    cal = tmp_path / "cal"
    assert main(["calibrate", str(tiny_exports["window", "fp32"]), "-o", str(cal), "--count", "16",
                 "--reply-tokens", "4"]) == 0
    gptq, tuned, w4 = (tmp_path / n for n in ("gptq", "tuned", "w4"))
    # awq-gptq-e2e is what the default (auto) chooses below a billion parameters: the fused export runs it unasked
    auto = method == "awq-gptq-e2e"
    for folder, flags in ((gptq, ["--graph", "fused", "--precision", "int4", "--int4-method", "awq-gptq"]),
                          (tuned, ["--graph", "fused", "--precision", "int4",
                                   *([] if auto else ["--int4-method", method])]),
                          (w4, ["--precision", "int4-w4a16", "--int4-method", method])):
        assert main(["export", str(tiny_window), "-o", str(folder), "--calib", str(cal), *flags]) == 0
    layers = Manifest.load(gptq).model.num_layers
    for folder in (tuned, w4):
        p = Manifest.load(folder).precision
        t = p["tuning"]
        assert p["int4_method"] == method and t["kept"], t
        assert p.get("int4_method_requested") == ("auto" if auto and folder == tuned else None), p
        # trained on chat and plain text alike: as many text windows as chat sequences drawn, after the 8-long probe
        assert t["text_windows"] == 16 and t["chat_sequences"] == 8 + 16, t
        if method == "awq-gptq-e2e":
            assert "tuned end to end" in p["method"] and t["probe_kl_after"] < t["probe_kl_before"], t
            assert t["steps"] == -(-(8 + 2 * 16) // t["batch"])
        else:
            assert "tuned layer by layer" in p["method"] and [r["layer"] for r in t["layers"]] == list(range(layers))
            assert all(r["mse_after"] < r["mse_before"] for r in t["layers"] if r["kept"]), t
            assert t["steps"] == -(-(8 + 2 * 16) // t["batch"]) * layers
    a = {t.name: numpy_helper.to_array(t) for t in _graph(gptq).graph.initializer}
    b = {t.name: numpy_helper.to_array(t) for t in _graph(tuned).graph.initializer}
    packed = [n for n in a if n.endswith("_Q4")]
    assert packed and all(np.array_equal(a[n], b[n]) for n in packed)  # the levels
    ratios = np.concatenate([(b[n] / a[n]).ravel() for n in a if n.endswith("_scales") and n.startswith("model.layers.")])
    assert (ratios > 0).all() and np.abs(ratios - 1).max() > 1e-4
    assert all((numpy_helper.to_array(t) > 0).all() for t in _graph(w4).graph.initializer if t.name.endswith("_scale"))

    def log_softmax(x):
        x = x.astype(np.float64) - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    def kl_to_float(folder) -> float:
        kls = []
        for ids in load(cal)[:8]:  # the tuning's probe
            ref, out = log_softmax(score(tiny_exports["window", "fp32"], ids)), log_softmax(score(folder, ids))
            kls.append((np.exp(ref) * (ref - out)).sum(-1).mean())
        return float(np.mean(kls))

    assert kl_to_float(tuned) < kl_to_float(gptq)


def test_int4_e2e_refused_without_memory(tiny_window, tiny_exports, tmp_path, capsys, monkeypatch):
    """awq-gptq-e2e holds neither model whole in float32: Mistral-7B's need is int4 levels a byte a weight plus the
    scales' training state and a step's activations, under 24 GiB; where a model's need exceeds the memory available
    the export is refused with one line before any calibration, nothing written. (The tiny checkpoint is given twice
    the memory this machine has available; the check itself runs unchanged.)"""
    import mistral_trt.calib.tune as tune
    from mistral_trt.export.pipeline import available_gib
    from mistral_trt.runtime.manifest import ModelArgs

    mistral_7b = ModelArgs("MistralForCausalLM", 32, 32, 8, 128, 4096, 14336, 32000, 1e6, 32768, None, 1e-5, False)
    need = tune.memory_needed(mistral_7b)
    params = 32 * (4096 * 6144 + 4096 * 4096 + 3 * 4096 * 14336)
    assert params * 1.6 < need < 24 * 2**30  # a byte a weight, 20 bytes a block of 32, a step's activations
    monkeypatch.setattr(tune, "memory_needed", lambda *a, **k: 2 * available_gib() * 2**30)
    cal = tmp_path / "cal"
    assert main(["calibrate", str(tiny_exports["window", "fp32"]), "-o", str(cal), "--count", "2",
                 "--reply-tokens", "2"]) == 0
    capsys.readouterr()
    out = tmp_path / "o"
    for method, says in ((["--int4-method", "awq-gptq-e2e"], "--int4-method awq-gptq-e2e: "),
                         ([], "--int4-method auto chose awq-gptq-e2e (below 1B parameters): ")):  # the default
        assert main(["export", str(tiny_window), "-o", str(out), "--graph", "fused", "--precision", "int4", "--calib",
                     str(cal), *method]) == 2
        err = capsys.readouterr().err
        assert says in err and "GiB available" in err and "use --int4-method awq-gptq (no tuning)" in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists() and "layer by layer: 1/" not in err, err


def test_int4_method_auto():
    """`--int4-method auto` (the default with --calib) chooses by the checkpoint's parameter count alone: end-to-end
    tuning below a billion (the demo), AWQ + GPTQ from there (Mistral-7B). The counts are the published ones."""
    from mistral_trt.calib.quantize import auto_int4_method, parameters
    from mistral_trt.runtime.manifest import ModelArgs

    mistral_7b = ModelArgs("MistralForCausalLM", 32, 32, 8, 128, 4096, 14336, 32000, 1e6, 32768, None, 1e-5, False)
    smollm2 = ModelArgs("MistralForCausalLM", 30, 9, 3, 64, 576, 1536, 49152, 1e5, 8192, None, 1e-5, True)
    assert parameters(mistral_7b) == 7_241_732_096 and parameters(smollm2) == 134_515_008
    assert auto_int4_method(mistral_7b)[0] == "awq-gptq" and auto_int4_method(smollm2)[0] == "awq-gptq-e2e"
    edge = ModelArgs("MistralForCausalLM", 1, 1, 1, 8, 8, 8, 10**9 // 8, 1e4, 64, None, 1e-5, True)  # 1B and a few
    assert parameters(edge) >= 10**9 and auto_int4_method(edge)[0] == "awq-gptq"


@pytest.mark.parametrize("flags, message", [
    (["--precision", "int4"], "add --graph fused; int4 for TensorRT (Q/DQ, portable graph) is --precision int4-w4a16"),
    (["--precision", "int4-w4a16", "--graph", "fused"], "--precision int4-w4a16 writes explicit Q/DQ (TensorRT)"),
    (["--precision", "int4-w4a16", "--block-size", "24"], "--block-size 24: expected a power of two"),
    (["--precision", "int8-w8a16", "--lm-head-bits", "4"], "--lm-head-bits goes with --precision int4 or int4-w4a16"),
    (["--precision", "int4-w4a16", "--int4-method", "awq"], "--int4-method awq chooses how calibrated int4 rounds: it "
                                                            "needs --precision int4 or int4-w4a16 and --calib CALIB"),
])
def test_int4_w4a16_bad_input(tiny_full, tmp_path, capsys, flags, message):
    assert main(["export", str(tiny_full), "-o", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
