"""Calibration data, reduced-precision artifacts (explicit symmetric Q/DQ) and the quality report."""
from __future__ import annotations

import importlib
import inspect
import json

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from conftest import cli, score
from mistral_trt.calib import data
from mistral_trt.calib.quantize import quantize
from mistral_trt.main import main
from mistral_trt.runtime import Manifest, UserError
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
    # held-out chat: formatted and answered as calibration is, about documentation calibration never reads
    held_out, entry = data.load_eval_chat(calib / "a")
    assert len(held_out) == entry["conversations"] == data.EVAL_CHAT_COUNT
    assert entry["sha256"] == json.loads((calib / "b" / "manifest.json").read_text())["eval_chat"]["sha256"]
    chats = [tok.decode(s) for s in held_out]
    assert all(t.startswith("[INST]") and "[/INST]" in t for t in chats)
    docs = {name: " ".join((inspect.getdoc(importlib.import_module(name)) or "").split())
            for name in data.EVAL_PROSE_MODULES}
    for t in chats:
        passage = " ".join(t.split("[/INST]")[0].split("\n\n", 1)[1].split())  # the passage after the question
        assert any(passage[:80] in d for d in docs.values())
        assert passage[:80] not in joined


def test_tuning_text_is_plain_text_disjoint_from_eval(calib, tiny_exports):
    """awq-gptq-e2e's plain text: full windows of documentation or source code of calibration's modules,
    deterministic, none of it from the held-out text."""
    tok = Tokenizer.load(tiny_exports["full", "fp32"])
    windows = data.tuning_text(tok, count=24, length=64)
    again = data.tuning_text(tok, count=24, length=64)
    assert len(windows) == 24 and all(len(w) == 64 for w in windows)
    assert all(np.array_equal(a, b) for a, b in zip(windows, again))
    sources = []
    for name in data.CALIB_MODULES:
        module = importlib.import_module(name)
        sources.append(inspect.getdoc(module) or "")
        try:
            sources.append(inspect.getsource(module))
        except (OSError, TypeError):
            pass
    squash = lambda t: "".join(t.split())  # noqa: E731  (the tokenizer's spaces at a window's edges aside)
    calib_text, eval_text = squash("\n".join(sources)), squash((calib / "a" / "eval.txt").read_text())
    pieces = [squash(tok.decode(w))[2:-2] for w in windows]  # edges may be part of a multi-byte character
    assert all(p in calib_text for p in pieces)
    assert not any(p in eval_text for p in pieces)
    assert any("def" in tok.decode(w) for w in windows) and any("def" not in tok.decode(w) for w in windows)


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
    ids = np.random.default_rng(0).integers(3, 32000, 24)
    outs = [score(f, ids) for f in (src, tmp_path / "w8")]
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).mean() >= 0.9
    assert np.abs(outs[0] - outs[1]).max() < 0.1 * np.abs(outs[0]).max()


@pytest.mark.slow
def test_export_precision_w8a16_equals_export_then_quantize(tiny_exports, tiny_full, tmp_path):
    """`export --precision int8-w8a16 --dtype fp32` quantizes each weight as it streams from the checkpoint into the
    portable graph: the artifact equals export + quantize (every initializer to the bit, the same nodes, the same
    logits). (The default, fp16 with fp16 scales, is TensorRT's form: tests/test_int4.py checks its scales.)"""
    direct, two_step = tmp_path / "direct", tmp_path / "two-step"
    assert main(["export", str(tiny_full), "-o", str(direct), "--precision", "int8-w8a16", "--dtype", "fp32"]) == 0
    quantize(tiny_exports["full", "fp32"], "int8-w8a16", two_step)
    graphs = [onnx.load(str(f / "model.onnx")).graph for f in (direct, two_step)]
    a, b = ({t.name: numpy_helper.to_array(t) for t in g.initializer} for g in graphs)
    assert a.keys() == b.keys() and any(k.endswith("_int8") for k in a)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    nodes = [sorted((n.op_type, tuple(n.input), tuple(n.output)) for n in g.node) for g in graphs]
    assert nodes[0] == nodes[1]
    m = Manifest.load(direct)
    other = Manifest.load(two_step).precision
    assert m.precision["name"] == "int8-w8a16" and m.precision["from"] == str(tiny_full.absolute())
    assert {k: v for k, v in m.precision.items() if k != "from"} == {k: v for k, v in other.items() if k != "from"}
    m.check_files(direct, full=True)
    ids = np.random.default_rng(5).integers(3, 32000, 24)
    np.testing.assert_array_equal(score(direct, ids), score(two_step, ids))


def onnx_statistics(model, m, seqs, groups):
    """The onnxruntime road's statistics of every activation of `groups`, keyed by activation name."""
    from mistral_trt.calib import smoothquant as sq

    table = sq.weight_matmuls(model.graph.node, sq.float_shapes(model), m.model)
    acts = {a: sq.activation_key(g, u, m.model) for a, (g, u) in table.items() if g in groups}
    return sq.activation_stats(model, m, seqs, acts, log=lambda s: None)


@pytest.fixture(scope="module")
def w8a8(tiny_exports, calib, tmp_path_factory):
    out = tmp_path_factory.mktemp("w8a8") / "w8a8"
    assert main(["quantize", str(tiny_exports["full", "fp32"]), "--precision", "int8-w8a8", "--calib",
                 str(calib / "a"), "-o", str(out)]) == 0
    return out


def test_w8a8_qdq_structure(tiny_exports, calib, w8a8):
    """Activations: one per-tensor symmetric Q/DQ pair (int8, zero point 0) on the input of every weight
    MatMul, nothing else; weights: per-channel symmetric DequantizeLinear; masks/softmax/norms untouched."""
    m = Manifest.load(w8a8)
    g = onnx.load(str(w8a8 / "model.onnx")).graph
    ref = onnx.load(str(tiny_exports["full", "fp32"] / "model.onnx")).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output}
    consumers = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    qs = [n for n in g.node if n.op_type == "QuantizeLinear"]
    assert m.precision["quantized_activations"] == 2 * 4  # qkv, o, gate/up, down per layer (lm_head: float)
    assert len(qs) == 2 * 7  # a dedicated pair per MatMul: q, k, v, o, gate, up, down
    for q in qs:
        scale, zp = inits[q.input[1]], inits[q.input[2]]
        assert scale.shape == () and scale > 0 and zp.shape == () and zp.dtype == np.int8 and zp == 0
        (dq,) = consumers[q.output[0]]
        assert dq.op_type == "DequantizeLinear" and list(dq.input[1:]) == list(q.input[1:])
        (u,) = consumers[dq.output[0]]
        assert u.op_type == "MatMul" and u.input[0] == dq.output[0]
        assert producer[u.input[1]].op_type == "DequantizeLinear"  # int8 weights too
    weight_dq = [n for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == m.precision["quantized_matmuls"] == 2 * 7 + 1
    for n in weight_dq:
        assert inits[n.input[0]].dtype == np.int8 and not inits[n.input[2]].any()
        assert [a.i for a in n.attribute if a.name == "axis"] == [1]
    count = lambda graph, op: sum(n.op_type == op for n in graph.node)  # noqa: E731
    for op in ("Softmax", "Where", "Add", "ReduceMean", "Gather", "Concat"):
        assert count(g, op) == count(ref, op), op
    cal = json.loads((calib / "a" / "manifest.json").read_text())
    assert m.precision["calibration"]["sha256"] == cal["sha256"] and m.precision["calibration"]["method"] == "max"
    details = json.loads((w8a8 / "quantization.json").read_text())
    assert all(0.0 <= r["alpha"] <= 1.0 for r in details if not r.get("kept_float"))


def test_w8a8_runs_close_to_fp32(tiny_exports, w8a8):
    src = tiny_exports["full", "fp32"]
    ids = np.random.default_rng(0).integers(3, 32000, 24)
    outs = [score(f, ids) for f in (src, w8a8)]
    assert (outs[0].argmax(-1) == outs[1].argmax(-1)).mean() >= 0.75
    assert np.abs(outs[0] - outs[1]).max() < 0.25 * np.abs(outs[0]).max()


def test_smoothing_is_exact_before_quantization(tiny_exports, calib):
    """SmoothQuant only moves scale between x and W: smoothed but not quantized, the graph computes the same
    logits (1/s folded into RMSNorm gammas and up_proj columns, an explicit Mul before o_proj)."""
    import onnxruntime as ort

    from mistral_trt.calib import qdq
    from mistral_trt.calib import smoothquant as sq

    src = tiny_exports["full", "fp32"]
    m = Manifest.load(src)
    model = onnx.load(str(src / "model.onnx"))
    qdq.fold_weight_transposes(model)
    stats = onnx_statistics(model, m, data.load(calib / "a")[:4], sq.GROUPS)
    rep = sq.smooth_and_quantize(model, m.model, stats, sq.Recipe(alpha={g: 0.7 for g in sq.GROUPS}), quantize=False)
    assert {r["fold"] for r in rep["activations"]} == {"norm weight", "up_proj columns", "Mul"}
    assert not any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ids = np.random.default_rng(3).integers(3, 32000, (1, 16))
    a = m.model
    feed = {"input_ids": ids, "attention_mask": np.ones((1, 16), np.int64), "position_ids": np.arange(16)[None]}
    feed |= {n: np.zeros((1, a.num_kv_heads, 0, a.head_dim), np.float32) for n in m.input_names()[3:]}
    ref = ort.InferenceSession(str(src / "model.onnx"), providers=["CPUExecutionProvider"]).run(["logits"], feed)[0]
    got = sess.run(["logits"], feed)[0]
    assert np.abs(got - ref).max() < 1e-4 * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_w8a8_rejects_bad_calibration(tiny_exports, calib, tmp_path):
    src = tiny_exports["full", "fp32"]
    with pytest.raises(UserError, match="pass --calib CALIB"):
        quantize(src, "int8-w8a8", tmp_path / "x")
    with pytest.raises(UserError, match="manifest.json: missing"):
        quantize(src, "int8-w8a8", tmp_path / "x", calib=tmp_path)
    bad = tmp_path / "cal"
    bad.mkdir()
    (bad / "manifest.json").write_text((calib / "a" / "manifest.json").read_text())
    z = np.load(calib / "a" / "calib.npz")
    np.savez(bad / "calib.npz", ids=z["ids"][::-1], offsets=z["offsets"])  # edited after the manifest was written
    with pytest.raises(UserError, match="does not match manifest.json"):
        quantize(src, "int8-w8a8", tmp_path / "x", calib=bad)
    assert not (tmp_path / "x").exists()


def checkpoint_weights(ckpt):
    from mistral_trt.export import checkpoint as ck
    from mistral_trt.export.weights import CheckpointWeights

    c = ck.inspect_checkpoint(ckpt)
    return c, CheckpointWeights(c.weight_files, c.args.tie_word_embeddings)


@pytest.mark.parametrize("name", ["full", "window"])
def test_layerwise_statistics_equal_onnxruntime_statistics(name, tiny_exports, tiny_full, tiny_window, calib):
    """The checkpoint road (torch, one decoder layer at a time: calib/layerwise.py) measures what the onnxruntime
    road (the fp32 export run whole) measures, for every activation of every layer: the per-channel max and the
    very same sampled rows, with a sliding window too (the calibration sequences are longer than its 8)."""
    from mistral_trt.calib import layerwise
    from mistral_trt.calib import qdq
    from mistral_trt.calib import smoothquant as sq

    src = tiny_exports[name, "fp32"]
    m = Manifest.load(src)
    model = onnx.load(str(src / "model.onnx"))
    qdq.fold_weight_transposes(model)
    seqs = data.load(calib / "a")
    assert max(len(x) for x in seqs) > 3 * 8
    table = sq.weight_matmuls(model.graph.node, sq.float_shapes(model), m.model)
    ref = onnx_statistics(model, m, seqs, sq.ACTIVATION_GROUPS)
    ref = {sq.activation_key(g, u, m.model): ref[a] for a, (g, u) in table.items() if a in ref}
    c, weights = checkpoint_weights({"full": tiny_full, "window": tiny_window}[name])
    got = {}
    layerwise.layerwise_stats(weights, c.config, c.args, seqs, lambda i, st, ws: got.update({(i, g): x for g, x in st.items()}),
                              log=lambda s: None)
    assert got.keys() == ref.keys() and len(got) == 2 * 4
    for key in got:
        np.testing.assert_allclose(got[key].amax, ref[key].amax, rtol=1e-4, atol=1e-6, err_msg=str(key))
        assert got[key].rows.shape == ref[key].rows.shape and len(got[key].rows) > 20 * 8
        np.testing.assert_allclose(got[key].rows, ref[key].rows, rtol=1e-3, atol=1e-5 * float(ref[key].amax.max()),
                                   err_msg=str(key))


@pytest.mark.slow
def test_export_w8a8_given_the_same_statistics_equals_quantize(tiny_exports, tiny_full, calib, w8a8, tmp_path):
    """The checkpoint road writes what `quantize` writes when given the same statistics: decisions, folds, Q/DQ
    nodes and every weight to the bit, edited as it streams (only where the statistics come from differs)."""
    from mistral_trt.calib import qdq
    from mistral_trt.calib import smoothquant as sq
    from mistral_trt.calib.quantize import w8a8_recipe
    from mistral_trt.export.pipeline import Calibration, export_model

    src = tiny_exports["full", "fp32"]
    m = Manifest.load(src)
    model = onnx.load(str(src / "model.onnx"))
    qdq.fold_weight_transposes(model)
    recipe = w8a8_recipe(calib / "a", "max", "auto", 20.0)
    plans = sq.plans_from_stats(model, m.model, onnx_statistics(model, m, data.load(calib / "a"), recipe.groups), recipe)
    edits = sq.SmoothQuantEdits(m.model, plans, describe=lambda report: {"name": "int8-w8a8"})

    class Given(Calibration):  # the checkpoint road's calibration, handed the onnxruntime road's statistics
        def run(self, weights, c, target, log):
            return edits

    export_model(str(tiny_full), tmp_path / "direct", precision="int8-w8a8", calibrate=Given())
    graphs = [onnx.load(str(f / "model.onnx")).graph for f in (tmp_path / "direct", w8a8)]
    a, b = ({t.name: numpy_helper.to_array(t) for t in g.initializer} for g in graphs)
    assert a.keys() == b.keys() and any(k.endswith("_act_scale") for k in a)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    nodes = [sorted((n.op_type, tuple(n.input), tuple(n.output)) for n in g.node) for g in graphs]
    assert nodes[0] == nodes[1]
    assert (tmp_path / "direct" / "quantization.json").read_text() == (w8a8 / "quantization.json").read_text()
    ids = np.random.default_rng(5).integers(3, 32000, 24)
    np.testing.assert_array_equal(score(tmp_path / "direct", ids), score(w8a8, ids))


@pytest.mark.slow
def test_export_w8a8_from_the_checkpoint(tiny_exports, tiny_full, calib, w8a8, tmp_path):
    """`export --precision int8-w8a8 --calib`: calibrated on the checkpoint layer by layer, written as it streams;
    the same decisions as `quantize` on the fp32 export, int8 weights equal but for the rare rounding tie the
    two engines' last-bit differences tip, the same logits within int8 noise, a precision record saying so."""
    out = tmp_path / "direct"
    assert main(["export", str(tiny_full), "-o", str(out), "--precision", "int8-w8a8", "--calib", str(calib / "a")]) == 0
    mine, theirs = Manifest.load(out).precision, Manifest.load(w8a8).precision
    assert mine["calibration"]["statistics"].startswith("the checkpoint, one decoder layer at a time")
    assert theirs["calibration"]["statistics"].startswith("an fp32 export")
    same = ("name", "quantized_activations", "float_activations", "quantized_matmuls", "weight_bytes", "outlier_ratio")
    assert {k: mine[k] for k in same} == {k: theirs[k] for k in same} and mine["calibration"]["sequences"] == 20
    details = [json.loads((f / "quantization.json").read_text()) for f in (out, w8a8)]
    assert [(r["activation"], r["alpha"], r["fold"]) for r in details[0]] == [
        (r["activation"], r["alpha"], r["fold"]) for r in details[1]]
    for x, y in zip(*details):
        assert x["clip"] == pytest.approx(y["clip"], rel=1e-4)
    a, b = ({t.name: numpy_helper.to_array(t) for t in onnx.load(str(f / "model.onnx")).graph.initializer}
            for f in (out, w8a8))
    int8 = [k for k in a if a[k].dtype == np.int8 and a[k].ndim == 2]
    assert len(int8) == 2 * 7 + 1
    assert np.mean([(a[k] == b[k]).mean() for k in int8]) > 0.999
    ids = np.random.default_rng(5).integers(3, 32000, 24)
    x, y = score(out, ids), score(w8a8, ids)
    assert (x.argmax(-1) == y.argmax(-1)).mean() >= 0.95 and np.abs(x - y).max() < 0.05 * np.abs(y).max()
    Manifest.load(out).check_files(out, full=True)


def test_export_w8a8_bad_input(tiny_full, tiny_exports, calib, tmp_path, capsys):
    cal = str(calib / "a")
    for args, says in (
        (["--precision", "int8-w8a8"], "pass --calib CALIB"),
        (["--calib", cal], "--calib goes with --precision int8-w8a8"),
        (["--precision", "int8-w8a16", "--calib", cal], "--calib goes with --precision int8-w8a8"),
        (["--precision", "int8-w8a8", "--calib", cal, "--graph", "fused"], "takes --graph portable"),
        (["--precision", "int8-w8a8", "--calib", cal, "--outlier-ratio", "0.5"], "--outlier-ratio 0.5: expected a finite"),
        (["--precision", "int8-w8a8", "--calib", str(tmp_path)], "manifest.json: missing"),
    ):
        rc, _, err = cli(capsys, "export", tiny_full, "-o", tmp_path / "x", *args)
        assert rc == 2 and says in err, (args, err)
    assert not (tmp_path / "x").exists()


def test_quantize_rejects_bad_input(tiny_exports, tmp_path):
    with pytest.raises(UserError, match="starts from an fp32 export"):
        quantize(tiny_exports["full", "fp16"], "int8-w8a16", tmp_path / "x")
    with pytest.raises(UserError, match="expected one of fp16, int8-w8a16, int8-w8a8"):
        quantize(tiny_exports["full", "fp32"], "int3", tmp_path / "x")
    with pytest.raises(UserError, match="--precision int4 needs a --graph fused export"):
        quantize(tiny_exports["full", "fp32"], "int4", tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_eval_report(tiny_exports, tiny_full, calib, tmp_path, capsys):
    src = tiny_exports["full", "fp32"]
    quantize(src, "int8-w8a16", tmp_path / "w8")
    out = tmp_path / "eval"
    assert main(["eval", str(src), str(tmp_path / "w8"), str(tiny_exports["full", "fp16"]), "--text",
                 str(calib / "a" / "eval.txt"), "--max-tokens", "400", "--window", "128", "-o", str(out)]) == 0
    rows = json.loads((out / "eval.json").read_text())["rows"]
    assert [r["precision"] for r in rows] == ["fp32", "int8-w8a16", "fp16"]
    assert all(r["tokens"] == 399 and r["perplexity"] > 1 for r in rows)
    # the reference's perplexity from PyTorch on the same windows (BOS + text, windows of 128 predictions)
    import torch
    from transformers import MistralForCausalLM

    text = (calib / "a" / "eval.txt").read_text(encoding="utf-8")
    ids = Tokenizer.load(tiny_full / "tokenizer.model").encode(text, bos=True)[:400]
    model = MistralForCausalLM.from_pretrained(tiny_full).eval()
    nll = 0.0
    with torch.no_grad():
        for i in range(0, len(ids) - 1, 128):
            w = torch.from_numpy(ids[i:i + 129])[None]
            nll += torch.nn.functional.cross_entropy(model(w).logits[0, :-1].double(), w[0, 1:], reduction="sum").item()
    assert rows[0]["perplexity"] == pytest.approx(np.exp(nll / 399), rel=1e-5)
    assert all(0 < r["mean_kl"] for r in rows[1:])
    assert (out / "eval.png").read_bytes()[:4] == b"\x89PNG"
    args = ["eval", str(src), "--text", str(calib / "a" / "eval.txt"), "--max-tokens", "40", "--window", "16"]
    assert main(args + ["-o", str(out)]) == 0  # an earlier report of ours: replaced
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "eval.md").write_text("my own notes")
    assert main(args + ["-o", str(tmp_path / "notes")]) == 2  # somebody else's eval.md: refused, kept
    assert "holds eval.md that mistral-trt did not write" in capsys.readouterr().err
    assert (tmp_path / "notes" / "eval.md").read_text() == "my own notes"


@pytest.mark.slow
def test_eval_on_held_out_chat(tiny_exports, tiny_full, calib, tmp_path, capsys):
    """`eval --chat`: every held-out conversation a fresh sequence; the reference's perplexity is PyTorch's on the
    same sequences; an old calibration folder or one tokenized for another model is refused in one line."""
    src = tiny_exports["full", "fp32"]
    quantize(src, "int8-w8a16", tmp_path / "w8")
    out = tmp_path / "eval"
    assert main(["eval", str(src), str(tmp_path / "w8"), "--chat", str(calib / "a"), "-o", str(out)]) == 0
    report = json.loads((out / "eval.json").read_text())
    rows = report["rows"]
    seqs, _ = data.load_eval_chat(calib / "a")
    assert [r["set"] for r in rows] == ["chat", "chat"] and report["text"] is None
    assert all(r["tokens"] == sum(len(s) - 1 for s in seqs) for r in rows)
    import torch
    from transformers import MistralForCausalLM

    model = MistralForCausalLM.from_pretrained(tiny_full).eval()
    nll = 0.0
    with torch.no_grad():
        for s in seqs:
            w = torch.from_numpy(s.astype(np.int64))[None]
            nll += torch.nn.functional.cross_entropy(model(w).logits[0, :-1].double(), w[0, 1:], reduction="sum").item()
    assert rows[0]["perplexity"] == pytest.approx(np.exp(nll / rows[0]["tokens"]), rel=1e-5)
    assert rows[1]["mean_kl"] > 0 and rows[1]["precision"] == "int8-w8a16"
    assert "| chat |" in (out / "eval.md").read_text()

    old = tmp_path / "old"  # a calibration folder from before eval_chat
    old.mkdir()
    raw = json.loads((calib / "a" / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({k: v for k, v in raw.items() if k != "eval_chat"}))
    other = tmp_path / "other"  # held-out chat tokenized by another model's tokenizer
    other.mkdir()
    (other / "eval_chat.npz").write_bytes((calib / "a" / "eval_chat.npz").read_bytes())
    raw["eval_chat"]["tokenizer_sha256"] = "0" * 64
    (other / "manifest.json").write_text(json.dumps(raw))
    capsys.readouterr()
    for folder, why in ((old, "no held-out chat set (field 'eval_chat'"), (other, "another tokenizer")):
        assert main(["eval", str(src), "--chat", str(folder), "-o", str(tmp_path / "x")]) == 2
        err = capsys.readouterr().err.strip()
        assert why in err and len(err.splitlines()) == 1 and str(folder) in err
    assert not (tmp_path / "x").exists()
