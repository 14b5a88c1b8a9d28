"""The quality tier (`make test-quality`): each precision's quality target on the demo model, on two held-out texts
from different sources (docs/development.md says when it runs).

  stdlib: the standard library's documentation and source of modules calibration never reads (calib/data.py
          eval_text: the same source family as the calibration and tuning sets, other modules);
  numpy:  numpy's reference documentation (calib/data.py numpy_doc_text): a source no recipe reads, so a tuned
          recipe is judged on text it could not have fitted.

Each test evaluates the first 2048 tokens of each text (`mistral-trt eval` runs whole texts) and records its rows:
with MISTRAL_TRT_QUALITY_RESULTS=FILE the session writes them there (scripts/quality_guard.py keeps them with the
record of the run).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from mistral_trt.calib import data
from mistral_trt.calib.evaluate import evaluate
from mistral_trt.calib.quantize import quantize
from mistral_trt.main import main
from mistral_trt.runtime import Manifest

pytestmark = pytest.mark.quality
TOKENS = 2048
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def results_file():
    yield
    path = os.environ.get("MISTRAL_TRT_QUALITY_RESULTS")
    if path:
        old = json.loads(open(path).read()) if os.path.exists(path) else {}
        with open(path, "w") as f:
            json.dump({**old, **RESULTS}, f, indent=2, sort_keys=True)


@pytest.fixture(scope="module")
def texts(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("texts")
    out = {}
    for name, make in (("stdlib", data.eval_text), ("numpy", data.numpy_doc_text)):
        out[name] = root / f"{name}.txt"
        out[name].write_text(make(), encoding="utf-8")
    return out


def measure(test: str, folders: list, reference, texts: dict) -> dict[str, list[dict]]:
    """Rows per text (reference first, then `folders`), recorded under `test` and printed as a table."""
    rows = {name: evaluate(folders, path, reference, max_tokens=TOKENS, log=lambda s: None)
            for name, path in texts.items()}
    RESULTS[test] = {name: [{"artifact": Path(r["artifact"]).name, "precision": r["precision"],
                             **{k: round(r[k], 5) for k in ("ppl_delta_pct", "top1_agreement", "mean_kl")}}
                            for r in rs[1:]] for name, rs in rows.items()}
    for name, rs in rows.items():
        for r in rs[1:]:
            print(f"{test:28} {name:7} {r['precision']:18} {r['ppl_delta_pct']:+7.2f} %  top-1 {r['top1_agreement']:.3f}"
                  f"  KL {r['mean_kl']:.4f}")
    return rows


def test_fp16_and_w8a16(demo_onnx, texts, tmp_path):
    """fp16: perplexity change <= 0.5 % and top-1 >= 99 %; int8-w8a16: <= 1 %; on both texts."""
    quantize(demo_onnx, "fp16", tmp_path / "fp16")
    quantize(demo_onnx, "int8-w8a16", tmp_path / "w8")
    for text, (_, fp16, w8) in measure("fp16, int8-w8a16", [tmp_path / "fp16", tmp_path / "w8"], demo_onnx,
                                       texts).items():
        assert abs(fp16["ppl_delta_pct"]) <= 0.5 and fp16["top1_agreement"] >= 0.99, (text, fp16)
        assert abs(w8["ppl_delta_pct"]) <= 1.0, (text, w8)
    assert Manifest.load(tmp_path / "w8").precision["quantized_matmuls"] == 30 * 7 + 1  # the tied lm_head too
    assert Manifest.load(tmp_path / "fp16").precision["name"] == "fp16"
    assert all(r["passed"] for r in Manifest.load(tmp_path / "fp16").verification)


def test_w8a8(demo_onnx, demo_hf, demo_calib, texts, tmp_path):
    """int8-w8a8: perplexity change <= 3 % on both texts with the default calibration set (256 sequences; 64 are not
    enough), for `quantize` (statistics from the fp32 export) and `export --precision int8-w8a8` (statistics from the
    checkpoint, layer by layer), with the same KL to fp32 and top-1 agreement."""
    quantize(demo_onnx, "int8-w8a8", tmp_path / "w8a8", calib=demo_calib)
    assert main(["export", str(demo_hf), "-o", str(tmp_path / "direct"), "--precision", "int8-w8a8",
                 "--calib", str(demo_calib)]) == 0
    for text, (_, q, direct) in measure("int8-w8a8", [tmp_path / "w8a8", tmp_path / "direct"], demo_onnx,
                                        texts).items():
        assert abs(q["ppl_delta_pct"]) <= 3.0 and abs(direct["ppl_delta_pct"]) <= 3.0, (text, q, direct)
        # the same quality: on 2048 tokens perplexity differences of half a point are noise; KL to fp32 and top-1
        # agreement are the steadier measures
        assert abs(q["mean_kl"] - direct["mean_kl"]) <= 0.1 * q["mean_kl"], (text, q, direct)
        assert abs(q["top1_agreement"] - direct["top1_agreement"]) <= 0.01, (text, q, direct)
    for folder in ("w8a8", "direct"):
        p = Manifest.load(tmp_path / folder).precision
        assert p["quantized_activations"] + len(p["float_activations"]) == 30 * 4
        assert 0 < len(p["float_activations"]) <= 6  # only the massive-activation down_proj inputs stay float


def test_int8_dynamic(demo_fused, texts, tmp_path):
    """int8-w8a8-dynamic (MatMulNBits, fused graph): perplexity change <= 1 % and top-1 >= 93 % on both texts,
    against the fused fp32 export."""
    quantize(demo_fused, "int8-w8a8-dynamic", tmp_path / "q8")
    for text, (_, q8) in measure("int8-w8a8-dynamic", [tmp_path / "q8"], demo_fused, texts).items():
        assert abs(q8["ppl_delta_pct"]) <= 1.0 and q8["top1_agreement"] >= 0.93, (text, q8)


# int4's target is +3 % on the stdlib text, the text family its tuning reads. On numpy's documentation, which no
# recipe reads, the same default measured +3.2 % to +5.4 % (two numpy versions): the bound there guards against a
# regression and is not the target (docs/precision.md).
INT4_LIMIT = {"stdlib": 3.0, "numpy": 6.0}


def test_int4_calibrated(demo_onnx, demo_hf, store, texts, tmp_path):
    """The default calibrated int4 (`--calib` alone: --int4-method auto, which chooses awq-gptq-e2e below a billion
    parameters; fused, block 32, lm_head int8) against round to nearest: within INT4_LIMIT of fp32, where round to
    nearest is over +10 %, and at most half its KL, on both texts. The calibrated export is the store's
    demo-fused-int4-calib (about 25 minutes on 2 cores when it is not stored, most of it the end-to-end tuning)."""
    cal = store.get("demo-fused-int4-calib")
    rtn = tmp_path / "rtn"
    assert main(["export", str(demo_hf), "-o", str(rtn), "--graph", "fused", "--precision", "int4"]) == 0
    p = Manifest.load(cal).precision
    assert (p["int4_method"], p["int4_method_requested"]) == ("awq-gptq-e2e", "auto") and p["tuning"]["kept"], p
    for text, (_, r, c) in measure("int4 (calibrated default)", [rtn, cal], demo_onnx, texts).items():
        assert c["ppl_delta_pct"] <= INT4_LIMIT[text] and r["ppl_delta_pct"] > 10.0, (text, r, c)
        assert c["mean_kl"] < 0.5 * r["mean_kl"], (text, r, c)
