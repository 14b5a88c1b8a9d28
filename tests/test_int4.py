"""int4-w4a16: the int4 artifact for TensorRT (portable graph, blockwise DequantizeLinear of int4 weights, opset 21).

Its references: the fused int4 export of the same checkpoint (onnxruntime's MatMulNBits quantizer made those
values: the two graphs must hold the same weights to the bit, round to nearest and activation-aware alike, and
onnxruntime runs both with the same kernel), and export + quantize (the two roads give one artifact)."""
from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from mistral_trt.calib.quantize import quantize
from mistral_trt.main import main
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


def test_int4_w4a16_structure_and_fused_weights(tiny_full, tiny_exports, tmp_path):
    """Every layer's MatMul weight becomes int4 in blocks of 32 input channels behind DequantizeLinear (axis 0, zero
    point 0, opset 21), with values equal to the fused int4 graph's to the bit, and lm_head int8 per channel (the
    default recipe); export + quantize gives the same file contents; onnxruntime runs it as the fused int4 graph."""
    direct, two_step, fused = tmp_path / "direct", tmp_path / "two-step", tmp_path / "fused"
    assert main(["export", str(tiny_full), "-o", str(direct), "--precision", "int4-w4a16"]) == 0
    quantize(tiny_exports["full", "fp32"], "int4-w4a16", two_step)
    assert main(["export", str(tiny_full), "-o", str(fused), "--graph", "fused", "--precision", "int4"]) == 0

    model = _graph(direct)
    assert {o.domain: o.version for o in model.opset_import}[""] == 21
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    inits = {t.name: t for t in model.graph.initializer}
    m = Manifest.load(direct)
    assert len(dq) == m.precision["quantized_matmuls"] == 7 * m.model.num_layers + 1
    for n in dq:
        q, s, zp = (inits[i] for i in n.input)
        attrs = {a.name: a.i for a in n.attribute}
        assert not numpy_helper.to_array(zp).astype(np.int8).any()
        if "lm_head" in n.input[0] or "embed_tokens" in n.input[0]:
            assert q.data_type == zp.data_type == onnx.TensorProto.INT8 and attrs == {"axis": 1}
            continue
        assert q.data_type == onnx.TensorProto.INT4 and zp.data_type == onnx.TensorProto.INT4
        assert attrs == {"axis": 0, "block_size": 32} and s.dims[0] == -(-q.dims[0] // 32) and s.dims[1] == q.dims[1]
    assert not any(n.op_type in ("MatMulNBits", "QuantizeLinear") for n in model.graph.node)  # weights only

    a, b = (({t.name: numpy_helper.to_array(t) for t in _graph(f).graph.initializer}) for f in (direct, two_step))
    assert a.keys() == b.keys() and any(k.endswith("_int4") for k in a)
    assert all(a[k].dtype == b[k].dtype and a[k].tobytes() == b[k].tobytes() for k in a)
    other = Manifest.load(two_step).precision
    assert {k: v for k, v in m.precision.items() if k != "from"} == {k: v for k, v in other.items() if k != "from"}
    assert m.precision["name"] == "int4-w4a16" and m.precision["block_size"] == 32 and m.precision["lm_head_bits"] == 8
    m.check_files(direct, full=True)

    ours, theirs = portable_weights(direct), fused_weights(fused)
    assert ours.keys() == theirs.keys() and len(ours) == 7 * m.model.num_layers + 1
    for k in ours:
        if k == "lm_head":  # int8 both, per channel here (TensorRT's int8 weights), per block of 32 there
            assert np.abs(ours[k] - theirs[k]).max() < 0.02 * np.abs(theirs[k]).max()
        else:
            assert ours[k].shape == theirs[k].shape and np.array_equal(ours[k], theirs[k]), k

    ids = np.random.default_rng(5).integers(3, 32000, 24)
    ref, got = score(tiny_exports["full", "fp32"], ids), score(direct, ids)
    np.testing.assert_array_equal(got, score(two_step, ids))
    # onnxruntime's CPU provider fuses each DequantizeLinear(int4) -> MatMul back into MatMulNBits (int8
    # activations, accuracy level 4): the fused int4 graph's logits (lm_head aside), not a float MatMul's. (int4
    # on this tiny random model is far from fp32: top-1 ~1/3; the demo's quality is `eval`'s, docs/precision.md.)
    alike = score(fused, ids)
    assert np.abs(got - alike).max() < 0.02 * np.abs(alike).max() and (got.argmax(-1) == alike.argmax(-1)).mean() >= 0.9
    assert np.abs(got - ref).max() > 5 * np.abs(got - alike).max()

    pure = tmp_path / "pure"  # --lm-head-bits 4: every MatMul int4, then onnxruntime's fused logits to 1e-4
    assert main(["export", str(tiny_full), "-o", str(pure), "--precision", "int4-w4a16", "--lm-head-bits", "4"]) == 0
    pure_fused = tmp_path / "pure-fused"
    assert main(["export", str(tiny_full), "-o", str(pure_fused), "--graph", "fused", "--precision", "int4",
                 "--lm-head-bits", "4"]) == 0
    ours, theirs = portable_weights(pure), fused_weights(pure_fused)
    assert all(np.array_equal(ours[k], theirs[k]) for k in ours) and Manifest.load(pure).precision["lm_head_bits"] == 4
    got, alike = score(pure, ids), score(pure_fused, ids)
    assert np.abs(got - alike).max() < 1e-4 * np.abs(alike).max() and (got.argmax(-1) == alike.argmax(-1)).all()


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


def test_int4_w4a16_activation_aware_equals_fused(tiny_window, tiny_exports, tmp_path):
    """`export --precision int4-w4a16 --calib` folds the same activation-aware scales as the fused int4 export
    (RMSNorm gammas, up_proj columns): the int4 weights are equal to the bit, and so are the folded gammas."""
    cal = tmp_path / "cal"
    assert main(["calibrate", str(tiny_exports["full", "fp32"]), "-o", str(cal), "--count", "12",
                 "--reply-tokens", "4"]) == 0
    portable, fused = tmp_path / "portable", tmp_path / "fused"
    assert main(["export", str(tiny_window), "-o", str(portable), "--precision", "int4-w4a16", "--calib", str(cal)]) == 0
    assert main(["export", str(tiny_window), "-o", str(fused), "--graph", "fused", "--precision", "int4", "--calib",
                 str(cal)]) == 0
    p = Manifest.load(portable).precision
    assert p["name"] == "int4-w4a16" and p["method"].startswith("activation-aware scaling")
    assert (portable / "awq.json").read_text() == (fused / "awq.json").read_text()
    ours, theirs = portable_weights(portable), fused_weights(fused)
    assert ours.keys() == theirs.keys()
    for k in ours:
        assert k == "lm_head" or np.array_equal(ours[k], theirs[k]), k  # lm_head: int8, per channel vs per block
    pi = {t.name: numpy_helper.to_array(t) for t in _graph(portable).graph.initializer}
    fi = {t.name: numpy_helper.to_array(t) for t in _graph(fused).graph.initializer}
    for i in range(Manifest.load(portable).model.num_layers):
        for norm in ("input_layernorm", "post_attention_layernorm"):
            mine, base = pi[f"model.model.layers.{i}.{norm}.weight"], fi[f"model.layers.{i}.{norm}"]
            assert np.array_equal(mine, base), (i, norm)
    assert not any(n.op_type == "Mul" and n.name.endswith("_SmoothQuant") for n in _graph(portable).graph.node)
    ids = np.random.default_rng(2).integers(3, 32000, 20)
    assert np.isfinite(score(portable, ids)).all()


@pytest.mark.parametrize("flags, message", [
    (["--precision", "int4"], "add --graph fused; int4 for TensorRT (Q/DQ, portable graph) is --precision int4-w4a16"),
    (["--precision", "int4-w4a16", "--graph", "fused"], "--precision int4-w4a16 writes explicit Q/DQ (TensorRT)"),
    (["--precision", "int4-w4a16", "--block-size", "24"], "--block-size 24: expected a power of two"),
    (["--precision", "int8-w8a16", "--lm-head-bits", "4"], "--lm-head-bits goes with --precision int4 or int4-w4a16"),
])
def test_int4_w4a16_bad_input(tiny_full, tmp_path, capsys, flags, message):
    assert main(["export", str(tiny_full), "-o", str(tmp_path / "o"), *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "o").exists()
