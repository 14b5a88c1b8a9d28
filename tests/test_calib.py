"""Calibration data, reduced-precision artifacts (explicit symmetric Q/DQ) and the quality report."""
from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mistral_trt.calib import data
from mistral_trt.calib.quantize import quantize
from mistral_trt.main import main
from mistral_trt.runtime import Manifest, UserError
from mistral_trt.runtime.engine import OrtEngine
from mistral_trt.runtime.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def calib(tiny_exports, tmp_path_factory):
    root = tmp_path_factory.mktemp("calib")
    for name in ("a", "b"):
        assert main(["calibrate", str(tiny_exports["full", "fp32"]), "-o", str(root / name), "--count", "20",
                     "--reply-tokens", "6"]) == 0
    return root


def test_calibration_is_deterministic(calib):
    a = json.loads((calib / "a" / "manifest.json").read_text())
    b = json.loads((calib / "b" / "manifest.json").read_text())
    assert a["sha256"] == b["sha256"] and a["count"] == 20
    assert sum(a["sources"].values()) == 20 and len(a["sources"]) > 3  # project prompts + several stdlib docs
    assert a["tokens"]["min"] < a["tokens"]["max"]  # varied lengths


def test_calibration_is_chat_formatted_and_disjoint_from_eval(calib, tiny_exports):
    tok = Tokenizer.load(tiny_exports["full", "fp32"])
    seqs = data.load(calib / "a")
    assert len(seqs) == 20 and all(s[0] == tok.bos_id for s in seqs)
    texts = [tok.decode(s) for s in seqs]
    assert all(t.startswith("[INST]") and "[/INST]" in t for t in texts)
    assert not set(data.CALIB_MODULES) & set(data.EVAL_PROSE_MODULES + data.EVAL_CODE_MODULES)
    eval_text = (calib / "a" / "eval.txt").read_text()
    assert len(tok.encode(eval_text)) >= 5000 and "def " in eval_text  # prose and code
    lines = [ln.strip() for ln in eval_text.splitlines() if len(ln.strip()) > 60]
    joined = "\n".join(texts)
    assert not any(ln in joined for ln in lines)


def test_w8a16_is_symmetric_per_channel_qdq(tiny_exports, tmp_path):
    src = tiny_exports["full", "fp32"]
    m = quantize(src, "int8-w8a16", tmp_path / "w8")
    g = onnx.load(str(tmp_path / "w8" / "model.onnx")).graph
    ref = onnx.load(str(src / "model.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    ref_inits = {t.name: numpy_helper.to_array(t) for t in ref.initializer}
    dq = [n for n in g.node if n.op_type == "DequantizeLinear"]
    assert len(dq) == m.precision["quantized_matmuls"] == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + lm_head
    matmul_b = {n.input[1] for n in g.node if n.op_type == "MatMul"}
    for n in dq:
        q, scale, zp = (inits[i] for i in n.input)
        assert q.dtype == np.int8 and np.abs(q).max() <= 127 and q.ndim == 2
        assert zp.dtype == np.int8 and not zp.any()  # zero points 0: symmetric
        assert scale.shape == (q.shape[1],) and [a.i for a in n.attribute if a.name == "axis"] == [1]  # per output channel
        assert n.output[0] in matmul_b  # only MatMul weights are quantized
        w = ref_inits[n.input[0].removesuffix("_int8")]
        assert np.abs(q * scale - w).max() <= scale.max() / 2 + 1e-7  # round-to-nearest
    # everything else (masks, softmax, norms, residual adds) is untouched
    count = lambda graph, op: sum(n.op_type == op for n in graph.node)  # noqa: E731
    for op in ("Softmax", "Where", "Add", "ReduceMean", "Gather", "Concat"):
        assert count(g, op) == count(ref, op), op
    assert m.dtype == "fp32" and m.files["model.onnx"]


def test_w8a16_runs_close_to_fp32(tiny_exports, tmp_path):
    src = tiny_exports["full", "fp32"]
    quantize(src, "int8-w8a16", tmp_path / "w8")
    ids = np.random.default_rng(0).integers(3, 32000, (1, 24))
    outs = []
    for f in (src, tmp_path / "w8"):
        e = OrtEngine(f)
        outs.append(e.forward(ids, np.ones((1, 24)), np.arange(24)[None], e.empty_past(1))[0][0])
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).mean() >= 0.9
    assert np.abs(outs[0] - outs[1]).max() < 0.1 * np.abs(outs[0]).max()


def test_quantize_rejects_bad_input(tiny_exports, tmp_path):
    with pytest.raises(UserError, match="starts from an fp32 export"):
        quantize(tiny_exports["full", "fp16"], "int8-w8a16", tmp_path / "x")
    with pytest.raises(UserError, match="expected one of fp16, int8-w8a16"):
        quantize(tiny_exports["full", "fp32"], "int4", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_eval_report(tiny_exports, calib, tmp_path, capsys):
    src = tiny_exports["full", "fp32"]
    quantize(src, "int8-w8a16", tmp_path / "w8")
    out = tmp_path / "eval"
    assert main(["eval", str(src), str(tmp_path / "w8"), str(tiny_exports["full", "fp16"]), "--text",
                 str(calib / "a" / "eval.txt"), "--max-tokens", "400", "--window", "128", "-o", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())
    assert [r["precision"] for r in rows] == ["fp32", "int8-w8a16", "fp16"]
    assert rows[0]["ppl_delta_pct"] == 0 and rows[0]["top1_agreement"] == 1.0 and rows[0]["mean_kl"] == 0
    assert all(r["tokens"] == 399 and r["perplexity"] > 1 for r in rows)
    assert all(0 < r["mean_kl"] for r in rows[1:])
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_demo_quality_targets(demo_onnx, tmp_path):
    """The precision issue's targets on the demo model: fp16 ppl change <= 0.5 % and top-1 >= 99 %;
    int8-w8a16 ppl change <= 1 % (2048 held-out tokens here; `mistral-trt eval` runs the whole text)."""
    from mistral_trt.calib.evaluate import evaluate

    quantize(demo_onnx, "fp16", tmp_path / "fp16")
    quantize(demo_onnx, "int8-w8a16", tmp_path / "w8")
    (tmp_path / "eval.txt").write_text(data.eval_text())
    rows = evaluate([tmp_path / "fp16", tmp_path / "w8"], tmp_path / "eval.txt", demo_onnx, max_tokens=2048)
    fp16, w8 = rows[1], rows[2]
    assert abs(fp16["ppl_delta_pct"]) <= 0.5 and fp16["top1_agreement"] >= 0.99, fp16
    assert abs(w8["ppl_delta_pct"]) <= 1.0, w8
    assert Manifest.load(tmp_path / "w8").precision["quantized_matmuls"] == 30 * 7 + 1  # the tied lm_head too
    assert Manifest.load(tmp_path / "fp16").precision["name"] == "fp16"
    assert all(r["passed"] for r in Manifest.load(tmp_path / "fp16").verification)
